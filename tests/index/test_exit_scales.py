"""Per-exit similarity scales (issue #20): the exit heads record them, `icar embed` writes them into run.json, and
`icar index` multiplies each row by its run's scale for the row's exit depth; shards stay unit-length.

The run is real: `icar embed` of a small WebDataset shard with the shipped demo CLIP (64 px, loads in well under a
second) on the session's local Ray, its shipped exit heads re-saved with scales, images routed to exits 4, 6 and 8
by a hash of their key. The indexes are real FAISS (Flat, and IVF,Flat whose codes are the vectors themselves).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

faiss = pytest.importorskip("faiss")

from pipeline.embed.config import EmbedConfig  # noqa: E402
from pipeline.index.build import IndexConfig, build_index  # noqa: E402
from pipeline.index.layout import IDS_FILE, INDEX_FILE, INDEX_JSON  # noqa: E402
from pipeline.index.read import plan_runs, read_sample_group, shard_vectors  # noqa: E402
from pipeline.index.search import Searcher  # noqa: E402
from pipeline.io.schema import EXIT_OFFSETS, EXIT_SCALES, RUN_JSON, parse_exit_scales  # noqa: E402
from pipeline.io.storage import safetensors_metadata  # noqa: E402
from pipeline.model.encoder import ExitHeads  # noqa: E402
from pipeline.model.spec import ModelSpec  # noqa: E402
from tinyclip import tiny  # noqa: E402
from zoo import make_corpus, write_tar_shard  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DEMO_HEADS = REPO / "pipeline" / "assets" / "demo" / "exit_heads.safetensors"
# Far from 1, so that a scaled row cannot pass for an unscaled one within float16 rounding.
SCALES = {4: 1.25, 6: 1.1}


def heads_with_scales(src: Path, dst: Path, scales: dict | None) -> Path:
    """Write the exit heads at ``src`` to ``dst`` with ``scales`` as their exit_scales metadata (None: without) and no
    exit_offsets (the shipped heads' offsets would add the offset dimension: test_exit_offsets.py covers it)."""
    data = src.read_bytes()
    meta = {k: v for k, v in safetensors_metadata(data).items() if k not in (EXIT_SCALES, EXIT_OFFSETS)}
    if scales is not None:
        meta[EXIT_SCALES] = json.dumps({str(e): s for e, s in scales.items()})
    dst.write_bytes(st_save(st_load(data), metadata=meta))
    return dst


def shard_rows(run: Path) -> pa.Table:
    """Return key, exit_layer and embedding of every committed row of ``run``, in the index's row order."""
    manifest = pq.read_table(run / "manifest.parquet").to_pylist()
    parts = [pq.read_table(run / r["output"], columns=["key", "exit_layer", "embedding"])
             for r in sorted(manifest, key=lambda r: r["part"]) if r["rows"] > 0]
    return pa.concat_tables(parts)


def vectors(index) -> np.ndarray:
    """Return every vector an exact (Flat or IVF,Flat) index holds, by row id."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.make_direct_map()
    return index.reconstruct_n(0, index.ntotal)


def build(run: Path, out: Path, **kw) -> dict:
    build_index(IndexConfig(runs=[str(run)], output=str(out), workers=1, threads=1, text_queries=False, queries=8,
                            progress=False, **kw))
    return json.loads((out / INDEX_JSON).read_text())


@pytest.fixture(scope="module")
def scaled_run(tmp_path_factory, ray_session) -> Path:
    """A real `icar embed` run whose exit heads carry SCALES, routed to exits 4/6/8 (40/30/30 % by key hash)."""
    from pipeline.embed.execution import run_embed

    root = tmp_path_factory.mktemp("scales")
    write_tar_shard(root / "in.tar", make_corpus(np.random.default_rng(0), 40, exts=("jpg",), max_side=64))
    heads = heads_with_scales(DEMO_HEADS, root / "exit_heads.safetensors", SCALES)
    spec = ModelSpec(model="demo", heads=str(heads), route_fractions=[0.4, 0.3, 0.3], scorer="none")
    run_embed(EmbedConfig(inputs=[str(root / "in.tar")], output=str(root / "run"), spec=spec, batch_size=8,
                          progress=False))
    return root / "run"


def test_heads_expose_the_scales_they_were_saved_with(tmp_path):
    bundle = tiny()
    heads = ExitHeads.for_bundle(bundle, [2, 3, 4])
    assert heads.exit_scales == {2: 1.0, 3: 1.0, 4: 1.0}  # fresh heads: no scale anywhere
    heads.save(str(tmp_path / "plain.safetensors"))
    heads.save(str(tmp_path / "scaled.safetensors"), {EXIT_SCALES: json.dumps({"2": 1.3})})
    plain = ExitHeads.load(str(tmp_path / "plain.safetensors"), bundle)
    assert plain.exit_scales == {2: 1.0, 3: 1.0, 4: 1.0} and plain.saved_scales == {}
    scaled = ExitHeads.load(str(tmp_path / "scaled.safetensors"), bundle)
    assert scaled.exit_scales == {2: 1.3, 3: 1.0, 4: 1.0}  # exit 3 has none, the full depth is 1.0
    assert scaled.sha256() == plain.sha256()  # the scales are metadata: the heads (and confidence heads) stay bound

    for bad, words in (({"9": 1.1}, r"for exits \[9\], which are not theirs"), ({"2": -1.0}, "positive finite")):
        heads.save(str(tmp_path / "bad.safetensors"), {EXIT_SCALES: json.dumps(bad)})
        with pytest.raises(ValueError, match=words) as e:
            ExitHeads.load(str(tmp_path / "bad.safetensors"), bundle)
        assert "bad.safetensors" in str(e.value)
    assert parse_exit_scales(None, "x") == {} and parse_exit_scales('{"6": 1, "4": 2.5}', "x") == {4: 2.5, 6: 1.0}
    with pytest.raises(ValueError, match="run.json: exit_scales must map exit depths to scales"):
        parse_exit_scales("[1.02]", "run.json")


def test_index_scales_early_exit_rows_and_records_the_scales(scaled_run, tmp_path):
    run_json = json.loads((scaled_run / RUN_JSON).read_text())
    assert run_json[EXIT_SCALES] == {"4": 1.25, "6": 1.1, "8": 1.0}  # ModelWorker.describe(), every exit of the run
    rows = shard_rows(scaled_run)
    stored = np.stack(rows.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
    exits = rows.column("exit_layer").to_numpy()
    assert set(exits) == {4, 6, 8}
    np.testing.assert_allclose(np.linalg.norm(stored, axis=1), 1.0, atol=2e-3)  # the shards stay unit-length
    factor = np.array([{4: 1.25, 6: 1.1}.get(int(e), 1.0) for e in exits], np.float32)

    info = build(scaled_run, tmp_path / "flat")
    assert info["factory"] == "Flat" and info["runs"][0][EXIT_SCALES] == {"4": 1.25, "6": 1.1, "8": 1.0}
    assert any("scaled by exit depth" in r and "exit 4 x1.25" in r for r in info["reasons"])
    index = faiss.read_index(str(tmp_path / "flat" / INDEX_FILE))
    assert pq.read_table(tmp_path / "flat" / IDS_FILE).column("key").to_pylist() == rows.column("key").to_pylist()
    held = vectors(index)
    np.testing.assert_array_equal(held[exits == 8], stored[exits == 8])  # full depth: exactly as stored
    np.testing.assert_allclose(held, stored * factor[:, None], rtol=1e-6)

    # A search's score is the row's scale x its cosine to the (unit) query: a query that is an exit-4 row's own
    # embedding scores that row 1.25, and a full-depth row its plain cosine.
    searcher = Searcher(str(tmp_path / "flat"))
    for probe in (int(np.flatnonzero(exits == 4)[0]), int(np.flatnonzero(exits == 8)[0])):
        hits = searcher.search_vectors(stored[probe], k=len(stored))[0]
        got = {h.row_id: h.score for h in hits}
        want = factor * (stored @ (stored[probe] / np.linalg.norm(stored[probe])))
        np.testing.assert_allclose([got[i] for i in range(len(stored))], want, rtol=1e-5, atol=1e-6)
    assert {h.row_id: h.score for h in hits}[probe] == pytest.approx(1.0, abs=2e-3)

    # IVF: training sample and added rows are scaled alike (IVF,Flat stores the vectors as they were added).
    ivf = build(scaled_run, tmp_path / "ivf", factory="IVF1,Flat")
    assert ivf["runs"][0][EXIT_SCALES] == info["runs"][0][EXIT_SCALES]
    np.testing.assert_allclose(vectors(faiss.read_index(str(tmp_path / "ivf" / INDEX_FILE))), held, rtol=1e-6)
    plan = plan_runs([str(scaled_run)])
    sample = read_sample_group(plan.shards, [np.arange(len(stored))], [np.arange(3)], plan.dim, None)
    np.testing.assert_allclose(sample["train"], (stored * factor[:, None]).astype(np.float16))
    np.testing.assert_array_equal(sample["queries"], stored[:3])  # tuning's image queries stay unit, as search's
    table = pq.read_table(plan.shards[0].url, columns=plan.shards[0].columns)
    np.testing.assert_allclose(shard_vectors(table, plan.shards[0], plan.dim), held[:len(table)], rtol=1e-6)

    with pytest.raises(ValueError, match="L2-normalises the vectors it adds, which undoes the exit scales"):
        build(scaled_run, tmp_path / "normed", factory="L2norm,Flat")


def test_a_run_without_scales_indexes_its_rows_as_stored(scaled_run, tmp_path):
    # The same shards under a run.json that records no scales (a run embedded with heads that carry none, or
    # before heads recorded them): every row goes in exactly as the shard holds it, and index.json says nothing.
    run = tmp_path / "run"
    shutil.copytree(scaled_run, run)
    doc = json.loads((run / RUN_JSON).read_text())
    del doc[EXIT_SCALES]
    (run / RUN_JSON).write_text(json.dumps(doc))
    info = build(run, tmp_path / "idx")
    assert EXIT_SCALES not in info["runs"][0] and not any("scaled by exit depth" in r for r in info["reasons"])
    rows = shard_rows(run)
    stored = np.stack(rows.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
    np.testing.assert_array_equal(vectors(faiss.read_index(str(tmp_path / "idx" / INDEX_FILE))), stored)
    assert plan_runs([str(run)]).shards[0].columns == ["embedding"]  # exit_layer is not even read
