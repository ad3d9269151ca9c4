"""Index building: parameter policy, recall vs exact, one-task vs many-task equality, on-disk merge, refusals."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

faiss = pytest.importorskip("faiss")

from pipeline.io import storage  # noqa: E402
from pipeline.index.build import IndexConfig, build_index  # noqa: E402
from pipeline.index.exact import TopK, exact_topk  # noqa: E402
from pipeline.index.layout import IDS_FILE, INDEX_FILE, INDEX_JSON, TRAINED_FILE  # noqa: E402
from pipeline.index.read import RunMismatchError, sample_rows  # noqa: E402
from pipeline.index.search import Searcher  # noqa: E402
from pipeline.index.tune import neighbour_recall  # noqa: E402
from pipeline.index.params import (  # noqa: E402
    BudgetError,
    choose_index_params,
    estimate_index_bytes,
    estimated_recall,
    format_size,
    group_shards,
    parse_size,
)
from pipeline.io.schema import MANIFEST, MANIFEST_SCHEMA, RUN_JSON, part_name, shard_schema  # noqa: E402

MODEL = {"name": "test-clip", "pretrained": None, "weights_sha256": "a" * 64, "embed_dim": 32, "image_size": 32,
         "num_blocks": 2}


def clustered(n: int, dim: int, group: int = 11, spread: float = 0.5, seed: int = 0) -> np.ndarray:
    """Return ``n`` L2-normalised float16 vectors in groups of ``group`` near-duplicates around random centres.

    Each vector's 10 nearest neighbours are mostly its group: a well-defined top-10 that PQ codes can find,
    unlike isotropic noise, where the 10th neighbour is a coin toss for any compressed code.
    """
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((-(-n // group), dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = rng.permutation(np.repeat(np.arange(len(centres)), group)[:n])
    x = centres[labels] + spread * rng.standard_normal((n, dim)).astype(np.float32) / np.sqrt(dim)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float16)


def make_run(run: str, vectors: np.ndarray, keys: list[str] | None = None, shards: int = 4,
             model: dict | None = None, captions: bool = True, storage_options: dict | None = None,
             skip_manifest_parts: tuple[int, ...] = ()) -> str:
    """Write a run directory (shards, manifest, run.json) holding ``vectors``; return its path/URL.

    Parts listed in ``skip_manifest_parts`` are written but left out of the manifest (uncommitted).
    """
    n, dim = vectors.shape
    keys = keys or [f"k{i:06d}" for i in range(n)]
    model = dict(model or MODEL, embed_dim=dim)
    bounds = np.linspace(0, n, shards + 1).astype(int)
    manifest = []
    for part in range(shards):
        lo, hi = bounds[part], bounds[part + 1]
        source = f"input/{part}.tar"
        table = pa.Table.from_arrays(
            [
                pa.array(keys[lo:hi], pa.string()),
                pa.array([source] * (hi - lo), pa.string()),
                pa.array([f"caption of {k}" if captions else None for k in keys[lo:hi]], pa.string()),
                pa.array([f"http://x/{k}.jpg" for k in keys[lo:hi]], pa.string()),
                pa.array(np.full(hi - lo, 32, np.int32)),
                pa.array(np.full(hi - lo, 32, np.int32)),
                pa.array(np.full(hi - lo, 0.5, np.float32)),
                pa.array(np.full(hi - lo, 2, np.int16)),
                pa.array(np.full(hi - lo, 1.0, np.float32)),
                pa.FixedSizeListArray.from_arrays(pa.array(vectors[lo:hi].reshape(-1), pa.float16()), dim),
            ],
            schema=shard_schema(dim),
        )
        storage.write_parquet(table, storage.join(run, "shards", part_name(part)), storage_options)
        if part in skip_manifest_parts:
            continue
        manifest.append({"source": source, "output": f"shards/{part_name(part)}", "part": part, "rows": int(hi - lo),
                         "errors": 0, "gflops": 1.0, "scorer_gflops": 0.0, "seconds": 1.0, "model_seconds": 1.0,
                         "source_size": None, "source_mtime": None, "source_etag": None, "exit_counts": "{}",
                         "complexity_mean": None, "complexity_p10": None, "complexity_p50": None,
                         "complexity_p90": None, "committed_at": "2026-01-01T00:00:00+00:00"})
    manifest.reverse()  # the index must sort by part, not trust file order
    storage.write_parquet(pa.Table.from_pylist(manifest, schema=MANIFEST_SCHEMA), storage.join(run, MANIFEST),
                          storage_options)
    storage.write_json({"model": model, "exits": [2], "heads": None}, storage.join(run, RUN_JSON), storage_options)
    return run


@pytest.fixture(autouse=True, scope="module")
def one_faiss_thread():
    """One FAISS/OpenMP thread: on a shared 2-core box, spinning OpenMP threads make training 4-5x slower."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def cfg_for(runs, out, **kw) -> IndexConfig:
    kw.setdefault("workers", 1)
    kw.setdefault("threads", 1)
    kw.setdefault("text_queries", False)
    kw.setdefault("queries", 200)
    kw.setdefault("progress", False)
    return IndexConfig(runs=list(runs), output=str(out), **kw)


# ------------------------------------------------------------------------------------------- policy

def test_parse_and_format_sizes():
    assert parse_size("4G") == 4 * 2**30
    assert parse_size("512M") == 512 * 2**20
    assert parse_size("1.5k") == 1536
    assert parse_size("2GiB") == parse_size("2GB") == parse_size("2g")
    assert parse_size("1000") == 1000
    with pytest.raises(ValueError, match="1024-based"):
        parse_size("4 gigs")
    assert format_size(3 * 2**30) == "3.0G"


@pytest.mark.parametrize(
    "n, dim, budget, expect",
    [
        # small corpus: exact search
        (20_000, 512, "4G", {"factory": "Flat", "kind": "flat"}),
        # 200k CLIP-B vectors, roomy budget: 4*sqrt(n) ~ 1789 -> 2048 lists, 8-bit scalar codes (no training)
        (200_000, 512, "4G", {"factory": "IVF2048,SQ8", "nlist": 2048, "kind": "ivfsq", "m": 0}),
        # between dim/2 and dim code bytes: 4-bit scalar codes
        (200_000, 512, "66M", {"factory": "IVF2048,SQ4", "nbits": 4}),
        # below dim/2: PQ, capped at dim/4 bytes; 4 dims per sub-quantizer: no rotation
        (200_000, 512, "40M", {"factory": "IVF2048,PQ128", "m": 128, "opq": False, "coarse": "flat"}),
        # same corpus in 20M: 96 code bytes fit, the largest divisor of 512 below is 64; 8 dims per sub-quantizer:
        # OPQ, trained on a subsample; 2048 centroids keep a flat coarse quantizer
        (200_000, 512, "20M", {"factory": "OPQ64,IVF2048,PQ64", "m": 64, "opq_dim": 512,
                               "opq_train_points": 32768}),
        # tight: 32 bytes for 512 dims -> 16 dims per sub-quantizer -> OPQ
        (200_000, 512, "14M", {"factory": "OPQ32,IVF2048,PQ32", "opq": True, "m": 32}),
        # 5M vectors: FAISS's IVF65536 with an HNSW coarse quantizer
        (5_000_000, 768, "1G", {"factory": "IVF65536_HNSW32,PQ128", "coarse": "hnsw32", "nlist": 65536}),
        # ... and in half the memory, 48-byte codes with OPQ, whose rotated sample copy halves nlist in 16G
        (5_000_000, 768, "512M", {"factory": "OPQ48,IVF32768_HNSW32,PQ48", "opq": True}),
        # 1M vectors: 65536 lists would need 2.5M training points; lowered to fit 39 per list
        (1_000_000, 768, "1G", {"nlist": 16384, "coarse": "hnsw32"}),
        # prime dimension: no divisor fits, OPQ pads to a multiple of m
        (100_000, 101, "3M", {"opq": True, "opq_dim": 112, "factory": "OPQ16_112,IVF1024,PQ16"}),
    ],
)
def test_choose_index_params_table(n, dim, budget, expect):
    p = choose_index_params(n, dim, parse_size(budget), max_build_bytes=parse_size("16G"))
    for key, value in expect.items():
        assert getattr(p, key) == value, (key, p.factory, p.reasons)
    assert p.estimated_bytes <= parse_size(budget)
    assert p.reasons and all(isinstance(r, str) for r in p.reasons)
    if p.nlist:
        assert 39 * p.nlist <= p.train_size <= n
        assert p.kind == "ivfsq" or dim % p.m == 0 or p.opq_dim % p.m == 0


def test_choice_weighs_rotation_and_coarse_quantizer_by_estimated_recall_per_byte():
    # 200k x 512 in 20M: PQ64 (8 dims per sub-quantizer); the rotation fits at full dimension and wins on
    # estimated recall; every variant weighed is recorded with its estimated recall and size.
    p = choose_index_params(200_000, 512, parse_size("20M"), max_build_bytes=parse_size("16G"))
    by_factory = {c["factory"]: c for c in p.candidates}
    assert p.factory == "OPQ64,IVF2048,PQ64" and p.candidates[0]["factory"] == p.factory
    assert by_factory["IVF2048,PQ64"]["fits"] and by_factory["IVF2048,PQ64"]["recall"] < p.estimated_recall
    assert {c["coarse"] for c in p.candidates} == {"flat"}  # 2048 x 512 centroids: no HNSW weighed
    text = " | ".join(p.reasons)
    assert "weighed at PQ64" in text and "OPQ64: each sub-quantizer encodes 8 dims" in text
    # The rotation trains on a subsample, briefly: what made autofaiss's OPQ build slow.
    assert p.opq_train_points == 32768 < p.train_size and p.opq_iterations == 10
    assert "OPQ rotation trained on 32,768" in text
    # A little less memory: OPQ64 at full dimension no longer fits; dropping 64 dims makes room (autofaiss's 448).
    full = by_factory["OPQ64,IVF2048,PQ64"]["estimated_bytes"]
    p = choose_index_params(200_000, 512, full - 1, max_build_bytes=parse_size("16G"))
    by_factory = {c["factory"]: c for c in p.candidates}
    assert p.factory == "OPQ64_448,IVF2048,PQ64" and not by_factory["OPQ64,IVF2048,PQ64"]["fits"]
    assert "OPQ output 448 dims" in " | ".join(p.reasons) and p.estimated_bytes <= full - 1
    # 5M x 768: 65536 lists need the HNSW coarse quantizer whatever the code.
    p = choose_index_params(5_000_000, 768, parse_size("512M"), max_build_bytes=parse_size("16G"))
    assert p.coarse == "hnsw32" and p.opq


def test_no_rotation_for_small_sub_vectors_and_no_hnsw_for_few_centroids():
    # PQ128 on 512 dims: 4 dims per sub-quantizer, a rotation gains little.
    p = choose_index_params(200_000, 512, parse_size("40M"), max_build_bytes=parse_size("16G"))
    assert not p.opq and p.opq_train_points == 0 and any(r.startswith("no OPQ") for r in p.reasons)
    # 60k vectors: 1024 lists x 512 dims scan cheaply, so HNSW is not even weighed; OPQ64 fits at full dimension.
    p = choose_index_params(60_000, 512, parse_size("8M"), max_build_bytes=parse_size("16G"))
    assert p.factory == "OPQ64,IVF1024,PQ64" and {c["coarse"] for c in p.candidates} == {"flat"}
    # A budget too small for the rotation beside the codes: plain PQ, the rotation listed as not fitting.
    plain = estimate_index_bytes(60_000, 512, 1024, "flat", 64, 8, 0)
    p = choose_index_params(60_000, 512, plain + 1024, max_build_bytes=parse_size("16G"))
    assert p.factory == "IVF1024,PQ64" and not p.opq
    assert [c["fits"] for c in p.candidates if c["opq_dim"]] == [False]


def test_estimated_recall_grows_with_code_bits_and_rotation():
    assert estimated_recall(512, 32) < estimated_recall(512, 64) < estimated_recall(512, 128)
    assert estimated_recall(512, 64) < estimated_recall(512, 64, opq=True) <= 1.0
    assert estimated_recall(512, 64) == pytest.approx(0.73, abs=0.02)  # measured: IVF2048,PQ64, 3000 clusters


def test_choose_refuses_a_budget_that_cannot_hold_the_index():
    with pytest.raises(BudgetError) as e:
        choose_index_params(10_000_000, 512, parse_size("64M"))
    msg = str(e.value)
    assert "--max-index-memory" in msg and "64.0M" in msg and "at least" in msg


def test_choose_refuses_a_factory_over_budget_and_a_build_over_budget():
    with pytest.raises(BudgetError, match="needs about"):
        choose_index_params(1_000_000, 512, parse_size("100M"), factory="IVF1024,PQ128")
    with pytest.raises(BudgetError, match="--max-build-memory"):
        choose_index_params(1_000_000, 512, parse_size("1G"), max_build_bytes=parse_size("64M"),
                            factory="IVF4096,PQ64")


def test_choose_goes_on_disk_when_the_build_budget_cannot_merge_in_memory():
    p = choose_index_params(12_000_000, 256, parse_size("1G"), max_build_bytes=parse_size("800M"),
                            factory="IVF1024,PQ32", workers=1)
    assert p.merge == "disk"
    assert any("on-disk merge" in r for r in p.reasons)


def test_group_shards_is_contiguous_and_bounded():
    rows = [100, 100, 100, 100, 50]
    groups = group_shards(rows, 2)
    assert [i for g in groups for i in g] == list(range(5))
    assert len(groups) == 2
    assert all(sum(rows[i] for i in g) <= 200 for g in group_shards(rows, 1, max_vectors=200))


def test_sample_rows_is_seeded_uniform_and_held_out():
    t, q, held = sample_rows(100_000, 5000, 500, seed=3)
    t2, q2, _ = sample_rows(100_000, 5000, 500, seed=3)
    assert held and np.array_equal(t, t2) and np.array_equal(q, q2)
    assert len(np.intersect1d(t, q)) == 0 and len(np.unique(t)) == 5000
    assert abs(np.mean(t) / 100_000 - 0.5) < 0.03  # spread over the whole corpus, not its head


def test_topk_and_recall_against_brute_force():
    x = clustered(3000, 16, seed=1).astype(np.float32)
    q = x[:20]
    top = TopK(20, 5)
    for s in range(0, 3000, 700):  # streamed in uneven chunks
        top.merge(exact_topk(q, x[s:s + 700], s, 5))
    brute = np.argsort(-(q @ x.T), axis=1, kind="stable")[:, :5]
    assert neighbour_recall(top.ids, brute, 5) == 1.0
    assert neighbour_recall(top.ids[:, ::-1][:, :1].repeat(5, 1), brute, 5) < 0.5


# -------------------------------------------------------------------------------------------- build

def _read_json(path):
    with open(path) as f:
        return json.load(f)


def test_build_reaches_target_recall_and_writes_the_contract(tmp_path):
    x = clustered(12_000, 32, seed=0)
    run = make_run(str(tmp_path / "run"), x, shards=3, skip_manifest_parts=())
    out = tmp_path / "idx"
    # Parameters chosen automatically (Flat disabled): 4*sqrt(N) lists lowered to 39 training points per list;
    # The budget holds 8-byte PQ codes but not 4-bit scalar ones.
    summary = build_index(cfg_for([run], out, target_recall=0.9, flat_below=1000, max_index_memory="280K"))
    info = _read_json(out / INDEX_JSON)
    assert info["ntotal"] == 12_000 and info["dim"] == 32 and info["factory"] == "IVF256,PQ8"
    assert any("39 training points" in r for r in info["reasons"])
    assert info["metric"] == "inner_product" and info["model"] == MODEL and info["model_key"]
    assert info["recall"]["image"]["at_nprobe"] >= 0.9
    assert info["nprobe"] and str(info["nprobe"]) in info["recall"]["image"]["by_nprobe"]
    assert set(info["build_seconds"]) >= {"plan", "sample", "train", "add", "merge", "tune", "write", "total"}
    assert info["memory"]["peak_rss_driver_bytes"] > 0 and info["memory"]["estimated_index_bytes"] > 0
    assert info["recall"]["text"] == {"skipped": "--no-text-queries"}
    # Plain faiss.read_index opens it, with the tuned nprobe inside, and it agrees with the recorded recall.
    index = faiss.read_index(str(out / INDEX_FILE))
    assert index.ntotal == 12_000
    assert faiss.extract_index_ivf(index).nprobe == info["nprobe"]
    xf = x.astype(np.float32)
    q = xf[np.random.default_rng(9).choice(12_000, 100, replace=False)]
    _, found = index.search(q, 10)
    exact = np.argsort(-(q @ xf.T), axis=1)[:, :10]
    assert neighbour_recall(found, exact, 10) >= 0.85
    # ids.parquet: row id -> key, in shard (part) order, although the manifest lists parts in reverse.
    ids = pq.read_table(out / IDS_FILE)
    assert ids.column("row_id").to_pylist() == list(range(12_000))
    assert ids.column("key").to_pylist() == [f"k{i:06d}" for i in range(12_000)]
    assert ids.column("caption")[5].as_py() == "caption of k000005"
    assert not [p for p in os.listdir(out) if p.startswith("_build") or ".tmp-" in p]
    assert "12,000 vectors" in summary.line()


def test_uncommitted_shards_are_not_indexed(tmp_path):
    x = clustered(4000, 32, seed=2)
    run = make_run(str(tmp_path / "run"), x, shards=4, skip_manifest_parts=(2,))
    out = tmp_path / "idx"
    build_index(cfg_for([run], out, factory="Flat"))
    keys = pq.read_table(out / IDS_FILE).column("key").to_pylist()
    assert len(keys) == 3000 and "k002000" not in keys and keys[2000] == "k003000"


def test_flat_index_for_a_small_corpus(tmp_path):
    x = clustered(3000, 32, seed=4)
    run = make_run(str(tmp_path / "run"), x, shards=2)
    build_index(cfg_for([run], tmp_path / "idx"))
    info = _read_json(tmp_path / "idx" / INDEX_JSON)
    assert info["factory"] == "Flat" and info["nprobe"] is None
    assert info["recall"]["image"]["at_nprobe"] == 1.0


def _ivf_contents(index):
    ivf = faiss.extract_index_ivf(index)
    inv = ivf.invlists
    out = []
    for lst in range(ivf.nlist):
        size = inv.list_size(lst)
        ids = faiss.rev_swig_ptr(inv.get_ids(lst), size).copy() if size else np.zeros(0, np.int64)
        codes = faiss.rev_swig_ptr(inv.get_codes(lst), size * inv.code_size).copy() if size else np.zeros(0, np.uint8)
        out.append((ids, codes))
    return out


def test_one_task_and_many_tasks_build_the_same_index(tmp_path, ray_session):
    x = clustered(9000, 32, seed=5)
    run = make_run(str(tmp_path / "run"), x, shards=5)
    one, many = tmp_path / "one", tmp_path / "many"
    build_index(cfg_for([run], one, factory="IVF32,PQ8x4", workers=1))
    build_index(cfg_for([run], many, factory="IVF32,PQ8x4", workers=3))
    info = _read_json(many / INDEX_JSON)
    assert info["add_groups"] == 3 and info["workers"] >= 1
    a, b = faiss.read_index(str(one / INDEX_FILE)), faiss.read_index(str(many / INDEX_FILE))
    assert a.ntotal == b.ntotal == 9000
    for (ia, ca), (ib, cb) in zip(_ivf_contents(a), _ivf_contents(b)):
        assert np.array_equal(ia, ib) and np.array_equal(ca, cb)
    assert np.array_equal(faiss.serialize_index(a), faiss.serialize_index(b))
    _assert_lists_hold_the_encoded_vectors(b, x.astype(np.float32))
    assert pq.read_table(one / IDS_FILE).equals(pq.read_table(many / IDS_FILE))


def _assert_lists_hold_the_encoded_vectors(index, x):
    """Every vector sits in its coarse list under its row id, with the code the trained index gives it."""
    ivf = faiss.extract_index_ivf(index)
    encoded = index.sa_encode(x)  # per vector: coarse list number, then the PQ code
    coarse = ivf.coarse_code_size()
    lists = np.zeros(len(x), np.int64)
    for b in range(coarse):
        lists |= encoded[:, b].astype(np.int64) << (8 * b)
    for lst, (ids, codes) in enumerate(_ivf_contents(index)):
        assert np.array_equal(ids, np.sort(np.flatnonzero(lists == lst)))  # row ids in shard order
        assert np.array_equal(codes.reshape(len(ids), -1), encoded[ids, coarse:])


def test_on_disk_merge_through_opq(tmp_path, ray_session):
    x = clustered(4000, 32, seed=6)
    run = make_run(str(tmp_path / "run"), x, shards=4)
    disk = tmp_path / "disk"
    # OPQ wraps the IVF in an IndexPreTransform: the merge must reach the inner lists and keep ntotal right.
    build_index(cfg_for([run], disk, factory="OPQ4,IVF16,PQ4x4", workers=2, merge="disk"))
    info = _read_json(disk / INDEX_JSON)
    assert info["merge"] == "disk" and info["ivfdata"] == "index.ivfdata"
    assert (disk / "index.ivfdata").exists()
    index = faiss.read_index(str(disk / INDEX_FILE))  # plain read: the stored .ivfdata path is absolute
    assert index.ntotal == 4000 and faiss.extract_index_ivf(index).nprobe == info["nprobe"]
    xf = x.astype(np.float32)
    _assert_lists_hold_the_encoded_vectors(index, xf)
    q = xf[:50]
    found = index.search(q, 10)[1]
    assert neighbour_recall(found, np.argsort(-(q @ xf.T), axis=1)[:, :10], 10) > 0.5
    # Moved elsewhere, it opens with IO_FLAG_ONDISK_SAME_DIR (never IO_FLAG_MMAP: it segfaults on search).
    moved = tmp_path / "moved"
    os.rename(disk, moved)
    again = faiss.read_index(str(moved / INDEX_FILE), faiss.IO_FLAG_ONDISK_SAME_DIR)
    assert np.array_equal(found, again.search(q, 10)[1])


def test_chosen_opq_index_is_one_file_that_searches_through_its_rotation(tmp_path):
    x = clustered(12_000, 32, seed=11)
    run = make_run(str(tmp_path / "run"), x, shards=3)
    out = tmp_path / "idx"
    # 4-byte codes on 32 dims (8 per sub-quantizer): the policy adds an OPQ rotation, trained briefly.
    build_index(cfg_for([run], out, flat_below=1000, max_index_memory="240K", max_nprobe=32))
    info = _read_json(out / INDEX_JSON)
    assert info["factory"] == "OPQ4,IVF256,PQ4" and info["opq"] and info["opq_dim"] == 32
    assert info["opq_training"] == {"points": min(info["train_size"], 32768), "iterations": 10}
    assert info["estimated_recall"] and info["candidates"][0]["factory"] == info["factory"]
    assert any(r.startswith("OPQ4: each sub-quantizer encodes 8 dims") for r in info["reasons"])
    # The rotation lives inside index.faiss (an IndexPreTransform): readers need nothing else.
    index = faiss.read_index(str(out / INDEX_FILE))
    assert isinstance(index, faiss.IndexPreTransform) and index.d == 32 and index.ntotal == 12_000
    q = x[:20].astype(np.float32)
    with Searcher(str(out)) as s:
        hits = s.search_vectors(q, k=5)
    assert [[h.row_id for h in row] for row in hits] == index.search(q, 5)[1].tolist()
    assert neighbour_recall(index.search(q, 11)[1], np.argsort(-(q @ x.astype(np.float32).T), axis=1)[:, :11],
                            10, np.arange(20)) > 0.5


def test_reduced_opq_with_hnsw_coarse_quantizer_merges_partials(tmp_path, ray_session):
    x = clustered(6000, 32, seed=12)
    run = make_run(str(tmp_path / "run"), x, shards=4)
    one, many = tmp_path / "one", tmp_path / "many"
    # OPQ into 28 of 32 dims and an HNSW graph over the centroids, built by one task and by two merged ones.
    build_index(cfg_for([run], one, factory="OPQ4_28,IVF32_HNSW32,PQ4", workers=1))
    build_index(cfg_for([run], many, factory="OPQ4_28,IVF32_HNSW32,PQ4", workers=2))
    info = _read_json(many / INDEX_JSON)
    assert info["opq_dim"] == 28 and info["coarse_quantizer"] == "hnsw32" and info["quantizer_efsearch"]
    assert info["opq_training"]["iterations"] == 10
    a, b = faiss.read_index(str(one / INDEX_FILE)), faiss.read_index(str(many / INDEX_FILE))
    assert a.ntotal == b.ntotal == 6000
    for (ia, ca), (ib, cb) in zip(_ivf_contents(a), _ivf_contents(b)):
        assert np.array_equal(ia, ib) and np.array_equal(ca, cb)
    q = x[:30].astype(np.float32)
    with Searcher(str(many)) as s:
        assert [[h.row_id for h in row] for row in s.search_vectors(q, k=5)] == b.search(q, 5)[1].tolist()


def test_runs_of_different_models_are_refused(tmp_path):
    r1 = make_run(str(tmp_path / "r1"), clustered(1000, 32, seed=7), shards=1)
    other = dict(MODEL, weights_sha256="b" * 64)
    r2 = make_run(str(tmp_path / "r2"), clustered(1000, 32, seed=8), shards=1, model=other)
    with pytest.raises(RunMismatchError, match="different models"):
        build_index(cfg_for([r1, r2], tmp_path / "idx"))
    assert not (tmp_path / "idx").exists()


def test_two_runs_of_one_model_are_indexed_together_in_order(tmp_path):
    r1 = make_run(str(tmp_path / "r1"), clustered(1500, 32, seed=7), keys=[f"a{i}" for i in range(1500)], shards=2)
    r2 = make_run(str(tmp_path / "r2"), clustered(1000, 32, seed=8), keys=[f"b{i}" for i in range(1000)], shards=1)
    # A roomy budget and Flat disabled: IVF with 8-bit scalar codes (nothing but the lists to train).
    build_index(cfg_for([r1, r2], tmp_path / "idx", flat_below=100, workers=1))
    keys = pq.read_table(tmp_path / "idx" / IDS_FILE).column("key").to_pylist()
    assert keys[:2] == ["a0", "a1"] and keys[1500] == "b0" and len(keys) == 2500
    info = _read_json(tmp_path / "idx" / INDEX_JSON)
    assert [r["rows"] for r in info["runs"]] == [1500, 1000]
    assert info["factory"] == "IVF64,SQ8" and info["kind"] == "ivfsq"
    assert info["recall"]["image"]["at_nprobe"] >= 0.9
    assert isinstance(faiss.downcast_index(faiss.read_index(str(tmp_path / "idx" / INDEX_FILE))),
                      faiss.IndexIVFScalarQuantizer)


def test_existing_index_is_not_overwritten_silently(tmp_path):
    run = make_run(str(tmp_path / "run"), clustered(1000, 32), shards=1)
    build_index(cfg_for([run], tmp_path / "idx"))
    with pytest.raises(FileExistsError, match="--overwrite"):
        build_index(cfg_for([run], tmp_path / "idx"))
    build_index(cfg_for([run], tmp_path / "idx", overwrite=True))


def test_budget_refusal_happens_before_any_work(tmp_path):
    run = make_run(str(tmp_path / "run"), clustered(20_000, 64), shards=2)
    with pytest.raises(BudgetError, match="--max-index-memory"):
        build_index(cfg_for([run], tmp_path / "idx", max_index_memory="100K"))
    assert not (tmp_path / "idx").exists()


def test_s3_output(tmp_path, s3_bucket):
    run = make_run(str(tmp_path / "run"), clustered(2000, 32, seed=9), shards=2)
    out = f"s3://{s3_bucket}/idx"
    build_index(cfg_for([run], out, factory="IVF16,PQ8x4", queries=50))
    fs, _ = storage.filesystem(out)
    fs.invalidate_cache()
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{s3_bucket}/idx"))
    assert names == [IDS_FILE, INDEX_FILE, INDEX_JSON, TRAINED_FILE]
    index = faiss.deserialize_index(np.frombuffer(fs.cat_file(f"{s3_bucket}/idx/{INDEX_FILE}"), np.uint8))
    assert index.ntotal == 2000


def test_adding_into_a_given_trained_index_skips_training(tmp_path):
    """A build into an earlier build's trained.faiss gives the same codes as that build, without training."""
    run = make_run(str(tmp_path / "run"), clustered(2000, 32, seed=3), shards=2)
    first = build_index(cfg_for([run], tmp_path / "a", factory="IVF16,PQ8x4")).info
    assert first["trained"] == {"file": TRAINED_FILE, "reused_from": None}
    trained = str(tmp_path / "a" / TRAINED_FILE)
    assert faiss.read_index(trained).ntotal == 0
    second = build_index(cfg_for([run], tmp_path / "b", factory="IVF16,PQ8x4", trained_index=trained)).info
    assert second["train_size"] == 0 and second["trained"]["reused_from"] == trained
    assert (tmp_path / "a" / INDEX_FILE).read_bytes() == (tmp_path / "b" / INDEX_FILE).read_bytes()
    assert (tmp_path / "b" / TRAINED_FILE).read_bytes() == (tmp_path / "a" / TRAINED_FILE).read_bytes()
    with pytest.raises(ValueError, match="needs --factory"):
        build_index(cfg_for([run], tmp_path / "c", trained_index=trained))
    other = make_run(str(tmp_path / "run16"), clustered(2000, 16, seed=3), shards=1)
    with pytest.raises(ValueError, match="dimension 32 \\(the runs have 16\\)"):
        build_index(cfg_for([other], tmp_path / "d", factory="IVF16,PQ8x4", trained_index=trained))


def test_cli_builds_and_refuses(tmp_path, capsys):
    from jobs import index as index_job

    run = make_run(str(tmp_path / "run"), clustered(2000, 32, seed=10), shards=2)
    out = tmp_path / "idx"
    assert index_job.main([run, "--output", str(out), "--add-tasks", "1", "--threads", "1", "--no-progress",
                           "--no-text-queries", "--queries", "50"]) == 0
    printed = capsys.readouterr().out
    assert "icar index: 2,000 vectors" in printed and "Flat" in printed and "phases:" in printed
    assert index_job.main([run, "--output", str(tmp_path / "small"), "--add-tasks", "1", "--no-progress",
                           "--max-index-memory", "64K", "--flat-below", "100"]) == 2
    err = capsys.readouterr().err
    assert "icar index: error:" in err and "--max-index-memory 64.0K" in err
    assert index_job.main([run, "--output", str(out), "--add-tasks", "1", "--no-progress"]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_model_key_has_one_definition():
    """The index, the searcher, the report and the models check one key: pipeline.io.schema's, torch-free."""
    from pipeline.index import read as index, search  # the index reads the key where it plans the runs
    from pipeline.io import schema
    from pipeline.model import encoder, flops  # the model side keys its heads and GFLOP cache (models has no copy)
    from pipeline.report import build as report, audit as report_audit

    for module in (index, search, report, report_audit, encoder, flops):
        assert module.model_key is schema.model_key, module.__name__
    assert schema.model_key(MODEL) == f"{MODEL['name']}:{MODEL['weights_sha256']}"
    with pytest.raises(ValueError, match="weights_sha256"):
        schema.model_key({"name": "x"})
