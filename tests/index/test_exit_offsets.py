"""Per-exit similarity offsets (issue #20): a run.json's ``exit_offsets`` make an early-exit row score
scale x cosine + offset in `icar index`'s inner-product index, through one extra dimension: each row ends with its
exit's offset (0 at full depth and for runs without offsets), each L2-normalised query with index.json's
``query_constant`` (1.0). Without a nonzero offset the index is exactly today's.

The runs are real: test_exit_scales's `icar embed` run (demo CLIP, exits 4/6/8, scales 1.25/1.1) under a run.json
that records offsets too, as the heads' ``exit_offsets`` put there; and, for IVF-PQ, test_index's synthetic run
(real shards of the shard schema) with mixed exit depths. FAISS is real throughout.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

faiss = pytest.importorskip("faiss")

from pipeline.index.build import IndexConfig, build_index  # noqa: E402
from pipeline.index.layout import INDEX_FILE, INDEX_JSON, TRAINED_FILE  # noqa: E402
from pipeline.index.params import choose_index_params, estimate_index_bytes, parse_size  # noqa: E402
from pipeline.index.read import plan_runs, read_sample_group  # noqa: E402
from pipeline.index.search import Searcher  # noqa: E402
from pipeline.io.schema import EXIT_OFFSETS, EXIT_SCALES, RUN_JSON  # noqa: E402
import test_exit_scales  # noqa: E402
from test_exit_scales import SCALES, build, shard_rows, vectors  # noqa: E402
from test_index import clustered, make_run  # noqa: E402

scaled_run = test_exit_scales.scaled_run  # the fixture: a real `icar embed` run whose run.json records SCALES

# Large enough to reorder rows, inside [-1, 1]; exit 6 negative, the full depth (8) none.
OFFSETS = {4: 0.3, 6: -0.2}


def with_run_json(src: Path, dst: Path, **changes) -> Path:
    """Copy run ``src`` to ``dst`` with run.json fields replaced (a value of None deletes the field)."""
    shutil.copytree(src, dst)
    doc = json.loads((dst / RUN_JSON).read_text())
    for key, value in changes.items():
        if value is None:
            doc.pop(key, None)
        else:
            doc[key] = value
    (dst / RUN_JSON).write_text(json.dumps(doc))
    return dst


def offsets_json(offsets: dict) -> dict:
    """Return run.json's exit_offsets for the demo run's exits 4/6/8 (0.0 at full depth, as `icar embed` writes)."""
    return {str(e): float(offsets.get(e, 0.0)) for e in (4, 6, 8)}


def calibration(exits: np.ndarray, scales: dict, offsets: dict) -> tuple[np.ndarray, np.ndarray]:
    """Return (scale, offset) per row for rows at depths ``exits``."""
    return (np.array([scales.get(int(e), 1.0) for e in exits], np.float32),
            np.array([offsets.get(int(e), 0.0) for e in exits], np.float32))


def all_scores(searcher: Searcher, query: np.ndarray) -> dict[int, float]:
    """Return row id -> score of every row of an exact index for one query."""
    return {h.row_id: h.score for h in searcher.search_vectors(query, k=searcher.index.ntotal)[0]}


@pytest.fixture(scope="module")
def scales_only(scaled_run, tmp_path_factory) -> Path:
    """The scaled demo run under a run.json that records SCALES and no offsets (whatever the heads carried)."""
    return with_run_json(scaled_run, tmp_path_factory.mktemp("scales-only") / "run", **{EXIT_OFFSETS: None})


@pytest.fixture(scope="module")
def offset_run(scaled_run, tmp_path_factory) -> Path:
    """The scaled demo run under a run.json that also records OFFSETS."""
    return with_run_json(scaled_run, tmp_path_factory.mktemp("offsets") / "run",
                         **{EXIT_OFFSETS: offsets_json(OFFSETS)})


@pytest.fixture(scope="module")
def stored(scaled_run):
    """(embeddings as float32, exit depths) of the demo run's rows, in row-id order."""
    rows = shard_rows(scaled_run)
    return (np.stack(rows.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32),
            rows.column("exit_layer").to_numpy())


def test_exact_scores_are_scale_times_cosine_plus_offset_and_reorder_rows(offset_run, scales_only, stored, tmp_path):
    x, exits = stored
    dim = x.shape[1]
    scale, offset = calibration(exits, SCALES, OFFSETS)
    info = build(offset_run, tmp_path / "flat")
    assert info["factory"] == "Flat" and info["dim"] == dim
    assert info["index_dim"] == dim + 1 and info["query_constant"] == 1.0
    assert info["runs"][0][EXIT_OFFSETS] == {"4": 0.3, "6": -0.2}  # the nonzero ones
    assert info["runs"][0][EXIT_SCALES] == {"4": 1.25, "6": 1.1, "8": 1.0}
    assert any("exit 4 +0.3, exit 6 -0.2" in r for r in info["reasons"])
    assert any(f"index dimension {dim + 1}" in r for r in info["reasons"])

    index = faiss.read_index(str(tmp_path / "flat" / INDEX_FILE))
    assert index.d == dim + 1
    held = vectors(index)
    np.testing.assert_allclose(held[:, :dim], x * scale[:, None], rtol=1e-6)
    np.testing.assert_array_equal(held[:, dim], offset)  # 0.0 for every full-depth row

    # Every row's score is its scale x cosine + offset, for queries of any length (they are normalised first).
    searcher = Searcher(str(tmp_path / "flat"))
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    rng = np.random.default_rng(0)
    # The rows as stored (unit length to float16 precision) are what the index holds; the query is normalised.
    for query in (3.0 * x[int(np.flatnonzero(exits == 4)[0])], x[int(np.flatnonzero(exits == 8)[0])],
                  rng.standard_normal(dim).astype(np.float32)):
        got = all_scores(searcher, query)
        want = scale * (x @ (query / np.linalg.norm(query))) + offset
        np.testing.assert_allclose([got[i] for i in range(len(x))], want, atol=1e-5)

    # Ranking: find an exit-4 row a and a full-depth row b that the scale alone ranks b over a, and the offset
    # a over b (1.25 cos_a < cos_b < 1.25 cos_a + 0.3, with a margin); the index without offsets and the one with
    # them must order them so.
    build(scales_only, tmp_path / "scaled")
    before = Searcher(str(tmp_path / "scaled"))
    flipped = 0
    for qi in np.flatnonzero(exits == 8):
        cos = unit @ unit[qi]
        for a in np.flatnonzero(exits == 4):
            for b in np.flatnonzero(exits == 8):
                if b == qi or not 1.25 * cos[a] + 0.02 < cos[b] < 1.25 * cos[a] + 0.28:
                    continue
                old, new = all_scores(before, x[qi]), all_scores(searcher, x[qi])
                assert old[b] > old[a] and new[a] > new[b]
                assert new[a] - old[a] == pytest.approx(0.3, abs=1e-5) and new[b] == pytest.approx(old[b], abs=1e-6)
                flipped += 1
    assert flipped  # the demo corpus holds such pairs: the test checks something


def test_without_a_nonzero_offset_the_index_is_todays(scales_only, offset_run, stored, tmp_path):
    x, exits = stored
    scale, _ = calibration(exits, SCALES, {})
    today = build(scales_only, tmp_path / "today")
    # A run.json whose offsets are all 0 (heads trained to need none) builds the very same index and index.json.
    zeros = build(with_run_json(offset_run, tmp_path / "zeros-run", **{EXIT_OFFSETS: offsets_json({})}),
                  tmp_path / "zeros")
    assert "index_dim" not in today and "query_constant" not in today and EXIT_OFFSETS not in today["runs"][0]
    assert today["dim"] == x.shape[1] and not any("offset" in r for r in today["reasons"])
    assert (tmp_path / "today" / INDEX_FILE).read_bytes() == (tmp_path / "zeros" / INDEX_FILE).read_bytes()
    # index.json: the same fields and values, but for timings, memory, the date and the run's path.
    same = (lambda info, run: json.loads(json.dumps({k: v for k, v in info.items() if k not in
                                                     {"build_seconds", "memory", "created_at", "tuning"}})
                                         .replace(str(run), "RUN")))
    assert same(today, scales_only) == same(zeros, tmp_path / "zeros-run")
    # Byte for byte what FAISS writes for the scaled rows alone: the dimension of the embeddings, nothing appended.
    expected = faiss.IndexFlatIP(x.shape[1])
    expected.add(x * scale[:, None])
    assert (tmp_path / "today" / INDEX_FILE).read_bytes() == faiss.serialize_index(expected).tobytes()
    plan = plan_runs([str(scales_only)])
    assert plan.index_dim == plan.dim and not plan.shards[0].offset_column
    sample = read_sample_group(plan.shards, [np.arange(4)], [np.arange(3)], plan.dim, None)
    assert sample["train"].shape[1] == sample["queries"].shape[1] == plan.dim


def test_a_run_without_offsets_scores_plain_cosines_beside_one_with_them(offset_run, stored, tmp_path):
    x, exits = stored
    dim, n = x.shape[1], len(x)
    scale, offset = calibration(exits, SCALES, OFFSETS)
    plain_run = with_run_json(offset_run, tmp_path / "plain-run", **{EXIT_OFFSETS: None, EXIT_SCALES: None})
    build_index(IndexConfig(runs=[str(offset_run), str(plain_run)], output=str(tmp_path / "both"), workers=1,
                            threads=1, text_queries=False, queries=8, progress=False))
    info = json.loads((tmp_path / "both" / INDEX_JSON).read_text())
    assert info["ntotal"] == 2 * n and info["index_dim"] == dim + 1 and info["query_constant"] == 1.0
    assert EXIT_OFFSETS in info["runs"][0] and EXIT_OFFSETS not in info["runs"][1]
    assert EXIT_SCALES not in info["runs"][1]
    held = vectors(faiss.read_index(str(tmp_path / "both" / INDEX_FILE)))
    np.testing.assert_array_equal(held[n:], np.hstack([x, np.zeros((n, 1), np.float32)]))  # as stored, then 0

    searcher = Searcher(str(tmp_path / "both"))
    query = x[int(np.flatnonzero(exits == 4)[1])]
    cos = x @ (query / np.linalg.norm(query))  # the rows as stored: unit length to float16 precision
    got = all_scores(searcher, query)
    np.testing.assert_allclose([got[i] for i in range(n)], scale * cos + offset, atol=1e-5)
    np.testing.assert_allclose([got[n + i] for i in range(n)], cos, atol=1e-5)  # plain cosines, every depth


@pytest.mark.parametrize("bad, words", [
    ({"4": 1.5}, "offsets that are not finite numbers in \\[-1, 1\\]"),
    ({"four": 0.1}, "exit_offsets must map exit depths to offsets"),
    ([0.1], "exit_offsets must map exit depths to offsets"),
])
def test_bad_offsets_in_a_run_json_are_refused_naming_it(offset_run, tmp_path, bad, words):
    run = with_run_json(offset_run, tmp_path / "run", **{EXIT_OFFSETS: bad})
    with pytest.raises(ValueError, match=words) as e:
        plan_runs([str(run)])
    assert str(run / RUN_JSON) in str(e.value)
    with pytest.raises(ValueError, match=words):
        build(run, tmp_path / "idx")
    assert not (tmp_path / "idx" / INDEX_JSON).exists()


def test_a_trained_index_without_the_offset_dimension_is_refused(scales_only, offset_run, stored, tmp_path):
    dim = stored[0].shape[1]
    build(scales_only, tmp_path / "a", factory="IVF1,Flat")
    trained = tmp_path / "a" / TRAINED_FILE
    assert faiss.read_index(str(trained)).d == dim
    with pytest.raises(ValueError, match=f"dimension {dim} \\(the runs have {dim + 1}\\)") as e:
        build(offset_run, tmp_path / "b", factory="IVF1,Flat", trained_index=str(trained))
    assert "exit offsets" in str(e.value) and str(offset_run) in str(e.value) and EXIT_OFFSETS in str(e.value)
    # The offset plan's own trained index is taken, and the reverse (offsets gone since) is refused likewise.
    build(offset_run, tmp_path / "c", factory="IVF1,Flat")
    own = tmp_path / "c" / TRAINED_FILE
    reused = build(offset_run, tmp_path / "d", factory="IVF1,Flat", trained_index=str(own))
    assert reused["train_size"] == 0 and reused["index_dim"] == dim + 1
    with pytest.raises(ValueError, match=f"dimension {dim + 1} \\(the runs have {dim}\\).*no run records exit_offsets"):
        build(scales_only, tmp_path / "e", factory="IVF1,Flat", trained_index=str(own))


@pytest.mark.parametrize("n, dim, budget, code", [
    (30_000_000, 513, "4G", "embeddings"), (1_000_000, 513, "90M", "embeddings"), (200_000, 129, "12M", "embeddings"),
    (12_000, 33, "300K", "embeddings"),
    # dim's own code: the padded embeddings' code does not fit (80M, 280K), or 129's padded PQ24 is the larger.
    (1_000_000, 513, "80M", "own"), (200_000, 129, "8M", "own"), (12_000, 33, "280K", "own")])
def test_automatic_pq_codes_fit_a_dimension_plus_one(n, dim, budget, code):
    # The last dimension holds exit offsets: the PQ code is the one the embeddings' dim - 1 get (m dividing it), OPQ
    # rotating into a multiple of m (513 -> OPQ64_576 with PQ64 as 512 gets PQ64, not 513 = 27 x 19's PQ57), unless
    # dim's own code is the larger that fits. Without offsets, 513 keeps its divisors; 129 = 3 x 43 and 33 pad.
    budget = parse_size(budget)
    p = choose_index_params(n, dim, budget, None, flat_below=1000, offset_dim=True)
    embeddings = choose_index_params(n, dim - 1, budget, None, flat_below=1000)
    plain = choose_index_params(n, dim, budget, None, flat_below=1000)
    assert p.m and p.opq_dim >= dim and p.opq_dim % p.m == 0 and p.estimated_bytes <= budget
    if code == "embeddings":
        assert p.m == embeddings.m >= plain.m and p.opq_dim == p.m * math.ceil(dim / p.m), (p.factory, plain.factory)
        assert (f"the last of {dim} dimensions holds exit offsets: PQ{p.m} as for the embeddings' {dim - 1}, OPQ "
                f"rotates into {p.opq_dim}") in p.reasons
    else:
        padded = embeddings.m * math.ceil(dim / embeddings.m)
        assert p.factory == plain.factory and (
            plain.m > embeddings.m or estimate_index_bytes(n, dim, p.nlist, p.coarse, embeddings.m, 8, padded) > budget)
    assert not any("exit offsets" in r for r in plain.reasons)
    if dim == 513:  # a plain 513-d plan keeps today's choice: a divisor of 513, no padding
        assert dim % plain.m == 0 and plain.opq_dim in (0, dim) and plain.m < embeddings.m
    for factory in (p.factory, plain.factory):
        assert faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT).d == dim


def mixed_depth_run(path: Path, n: int, dim: int, scales: dict, offsets: dict) -> tuple[Path, np.ndarray, np.ndarray]:
    """Write test_index's synthetic run with every third row at exit 1 (full depth 2) and a run.json recording
    ``scales`` and ``offsets``; return (run, vectors as float32, exit depths)."""
    x = clustered(n, dim, seed=5)
    run = Path(make_run(str(path), x, shards=3))
    exits = np.where(np.arange(n) % 3 == 0, 1, 2).astype(np.int16)
    first = 0
    for part in sorted((run / "shards").iterdir()):
        table = pq.read_table(part)
        rows = table.num_rows
        column = table.schema.get_field_index("exit_layer")
        table = table.set_column(column, table.schema.field(column), pa.array(exits[first: first + rows]))
        pq.write_table(table, part)
        first += rows
    doc = json.loads((run / RUN_JSON).read_text())
    doc.update(exits=[1, 2], **{EXIT_SCALES: {str(e): s for e, s in scales.items()},
                                EXIT_OFFSETS: {str(e): o for e, o in offsets.items()}})
    (run / RUN_JSON).write_text(json.dumps(doc))
    return run, x.astype(np.float32), exits


def test_ivf_pq_build_with_the_offset_dimension_searches_with_offset_scores(tmp_path):
    # An offset that keeps each cluster's rows ahead of other clusters' exit rows: a well-defined calibrated top-10.
    scales, offsets = {1: 1.1, 2: 1.0}, {1: 0.1, 2: 0.0}
    run, x, exits = mixed_depth_run(tmp_path / "run", 10_000, 32, scales, offsets)
    # The automatic choice (Flat disabled) for 33 dimensions in a budget for small PQ codes: the code 32 dimensions
    # get (the build says the last holds exit offsets), OPQ rotating into a padded multiple of the code size.
    build_index(IndexConfig(runs=[str(run)], output=str(tmp_path / "idx"), workers=1, threads=1, text_queries=False,
                            queries=200, progress=False, flat_below=1000, max_index_memory="260K"))
    info = json.loads((tmp_path / "idx" / INDEX_JSON).read_text())
    assert info["kind"] == "ivfpq" and info["opq_dim"] > 33 and info["opq_dim"] % info["pq_m"] == 0, info["factory"]
    assert info["pq_m"] == choose_index_params(10_000, 32, parse_size("260K"), None, flat_below=1000).m
    assert any(r.startswith("the last of 33 dimensions holds exit offsets: PQ") for r in info["reasons"])
    assert info["dim"] == 32 and info["index_dim"] == 33 and info["query_constant"] == 1.0
    assert info["recall"]["image"]["at_nprobe"] >= 0.8  # tuned against the exact calibrated top-k

    scale, offset = calibration(exits, scales, offsets)
    searcher = Searcher(str(tmp_path / "idx"))
    assert searcher.index.d == 33
    queries = x[np.random.default_rng(1).choice(len(x), 50, replace=False)]
    calibrated = (queries @ x.T) * scale + offset  # unit rows and queries: scale x cosine + offset
    results = searcher.search_vectors(queries, k=10)
    found = sum(len(set(np.argsort(-want)[:10]) & {h.row_id for h in hits}) for want, hits in zip(calibrated, results))
    assert found / (10 * len(queries)) >= 0.8  # the approximate top-10 is mostly the calibrated one

    # A score is the inner product of [query, 1] with the row's decoded vector, whose last value is its offset
    # (approximately: PQ codes); exit rows are among the hits.
    ivf = faiss.extract_index_ivf(searcher.index)
    ivf.make_direct_map()
    hits = [h for r in results for h in r]
    decoded = np.stack([searcher.index.reconstruct(h.row_id) for h in hits])
    unit = np.repeat(queries / np.linalg.norm(queries, axis=1, keepdims=True), 10, axis=0)  # as search normalises
    augmented = np.hstack([unit, np.ones((len(hits), 1), np.float32)])
    np.testing.assert_allclose([h.score for h in hits], np.sum(augmented * decoded, axis=1), atol=2e-5)
    at_exit = exits[[h.row_id for h in hits]] == 1
    assert 0.2 < at_exit.mean() < 0.5
    assert decoded[at_exit, 32].mean() == pytest.approx(0.1, abs=0.03)
    assert decoded[~at_exit, 32].mean() == pytest.approx(0.0, abs=0.03)
    # Without the query constant (a reader that ignored index.json) the offsets would be missing from the scores.
    scores, _ = searcher.index.search(np.hstack([queries, np.zeros((50, 1), np.float32)]), 10)
    assert not np.allclose(scores, [[h.score for h in r] for r in results], atol=1e-3)


def test_reindex_retrains_rather_than_reuse_a_trained_index_of_another_dimension():
    from pipeline.index.reuse import decide_index_build
    from pipeline.reindex.jobconfig import IndexSettings

    def previous(dim: int) -> dict:
        """The version LATEST points to, trained on 200k vectors of dimension ``dim`` (what previous_version reads)."""
        p = choose_index_params(200_000, dim, parse_size("4G"), None, flat_below=50_000)
        return {"version": "v0001", "factory": p.factory, "kind": p.kind, "nlist": p.nlist, "pq_m": p.m, "opq": p.opq,
                "coarse": p.coarse, "dim": dim, "ntotal": 200_000, "nprobe": 16, "k": 10, "recall_min": 0.95,
                "settings": {"max_memory": "4G", "factory": None, "flat_below": 50_000},
                "trained": {"version": "v0001", "ntotal": 200_000, "train_size": p.train_size, "nprobe": 16},
                "trained_file": "ROOT/indexes/v0001/trained.faiss"}

    s = IndexSettings()
    assert decide_index_build(210_000, 513, previous(513), s, True).mode == "reuse"
    gained = decide_index_build(210_000, 513, previous(512), s, True)  # the run.json gained exit_offsets since
    assert gained.mode == "train" and any("holds 512 dimensions and these vectors 513" in r for r in gained.reasons)
    assert gained.numbers["previous_dim"] == 512



def test_embed_with_the_shipped_heads_carries_their_calibration_into_the_index(ray_session, tmp_path):
    # End to end with nothing edited by hand: the shipped demo heads record a scale and an offset per exit
    # (`icar train-exits`), `icar embed` copies them into run.json, `icar index` gives the rows the offset
    # dimension and `icar search` scores an exit row scale x cosine + offset.
    from pipeline.embed.config import EmbedConfig
    from pipeline.embed.execution import run_embed
    from pipeline.io.schema import parse_exit_offsets, parse_exit_scales
    from pipeline.io.storage import safetensors_metadata
    from pipeline.model.spec import ModelSpec
    from zoo import make_corpus, write_tar_shard

    meta = safetensors_metadata(test_exit_scales.DEMO_HEADS.read_bytes())
    scales = parse_exit_scales(meta.get(EXIT_SCALES), "demo heads")
    offsets = parse_exit_offsets(meta.get(EXIT_OFFSETS), "demo heads")
    assert set(offsets) == {4, 6} and all(offsets.values())  # the shipped heads carry a nonzero offset per exit
    write_tar_shard(tmp_path / "in.tar", make_corpus(np.random.default_rng(1), 30, exts=("jpg",), max_side=64))
    spec = ModelSpec(model="demo", heads=str(test_exit_scales.DEMO_HEADS), route_fractions=[0.4, 0.3, 0.3],
                     scorer="none")
    run_embed(EmbedConfig(inputs=[str(tmp_path / "in.tar")], output=str(tmp_path / "run"), spec=spec, batch_size=8,
                          progress=False))
    doc = json.loads((tmp_path / "run" / RUN_JSON).read_text())
    assert doc[EXIT_OFFSETS] == offsets_json(offsets)
    assert doc[EXIT_SCALES] == {str(e): scales.get(e, 1.0) for e in (4, 6, 8)}

    info = build(tmp_path / "run", tmp_path / "idx")
    assert info["factory"] == "Flat" and info["index_dim"] == info["dim"] + 1 and info["query_constant"] == 1.0
    rows = shard_rows(tmp_path / "run")
    emb = np.stack(rows.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
    exits = rows.column("exit_layer").to_numpy()
    assert set(exits) == {4, 6, 8}
    scale, offset = calibration(exits, scales, offsets)
    searcher = Searcher(str(tmp_path / "idx"))
    for probe in (int(np.flatnonzero(exits == 4)[0]), int(np.flatnonzero(exits == 8)[0])):
        got = all_scores(searcher, emb[probe])
        want = scale * (emb @ (emb[probe] / np.linalg.norm(emb[probe]))) + offset
        np.testing.assert_allclose([got[i] for i in range(len(emb))], want, rtol=1e-5, atol=1e-5)
