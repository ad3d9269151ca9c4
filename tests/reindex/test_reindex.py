"""Scheduled reindex: config validation, the root lock, index reuse decisions, retirement, and real runs.

The real runs embed tiny WebDataset corpora with the shipped demo CLIP (64 px, 0.06 GFLOPs an image, loads
in well under a second: the model is not what these tests are about) on the session's real local Ray, locally and on moto S3.
The index-only tests write run directories of synthetic vectors whose manifest matches real input files,
so a run finds nothing to embed and goes straight to building, verifying and publishing the index.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.io import storage
from pipeline.reindex.jobconfig import ConfigError, load_job_config, parse_job_config
from pipeline.io.lock import LockHeld, RootLock
from pipeline.index.layout import TRAINED_FILE
from pipeline.index.reuse import decide_index_build
from pipeline.reindex.errors import (
    EXIT_CONFIG, EXIT_LOCKED, EXIT_MODEL_CHANGED, EXIT_OK, EXIT_SAFETY, EXIT_VERIFY, VerificationError,
)
from pipeline.reindex.inputs import complete_retirements
from pipeline.reindex.root import LATEST, list_versions, read_latest, reindex_status, resolve_latest, run_dir
from pipeline.reindex.run import run_reindex
from pipeline.reindex.versions import reuse_supported, verify_index
from pipeline.io.schema import part_name, shard_schema
from zoo import make_corpus, write_tar_shard

REPO = Path(__file__).resolve().parents[2]
MODEL = {"name": "demo", "scorer": "heuristic", "full_depth": True}
DEMO_DIR = REPO / "pipeline" / "assets" / "demo"


def job(root, inputs, **over) -> dict:
    """Return a job config mapping for a test run (small batches, index built in this process)."""
    cfg = {"name": "test-job", "inputs": [str(i) for i in inputs], "root": str(root), "model": dict(MODEL),
           "embed": {"batch_size": 8}, "ray": {"index_workers": 1},
           "index": {"text_queries": False}, "retention": {"keep_versions": 2}}
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


def tar(path: Path, prefix: str, n: int = 8, seed: int = 0) -> Path:
    """Write a WebDataset shard of ``n`` small photo-like JPEGs keyed PREFIX000000000...; return its path."""
    write_tar_shard(path, make_corpus(np.random.default_rng(seed), n, exts=("jpg",), max_side=64, prefix=prefix))
    return path


def index_keys(index_dir) -> set[str]:
    """Return the keys an index directory holds (its ids.parquet)."""
    fs, path = storage.filesystem(storage.join(str(index_dir), "ids.parquet"))
    with fs.open(path, "rb") as f:
        return set(pq.read_table(f, columns=["key"]).column("key").to_pylist())


# ------------------------------------------------------------------------------------------- config


def test_config_errors_name_every_bad_field(tmp_path):
    bad = job(tmp_path / "root", ["x/*.tar"], index={"max_memory": "lots", "target_recal": 0.5},
              on_model_change="refuze", schedule={"cron": "every night"}, retention={"keep_versions": 0})
    bad["model"]["exits"] = [6, "x"]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError) as e:
        load_job_config(str(path))
    errors = e.value.errors
    assert "index.max_memory: expected a size like 4G, got 'lots'" in errors
    assert any(x.startswith("index.target_recal: unknown setting (did you mean 'target_recall'?)") for x in errors)
    assert any(x.startswith("on_model_change: expected one of 'refuse', 'new_generation'") and "did you mean 'refuse'"
               in x for x in errors)
    assert any(x.startswith("schedule.cron: expected a five-field cron") for x in errors)
    assert "retention.keep_versions: expected an integer >= 1, got 0" in errors
    assert "model.exits[1]: expected an integer, got 'x'" in errors
    assert str(path) in str(e.value)

    (tmp_path / "broken.yaml").write_text("name: x\ninputs: [a\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_job_config(str(tmp_path / "broken.yaml"))
    with pytest.raises(ConfigError, match="root: required setting is missing"):
        parse_job_config({"name": "x", "inputs": ["a"]})
    with pytest.raises(ConfigError, match="model.full_depth: choose one routing setting, model.exit_at and"):
        parse_job_config(job(tmp_path, ["a"], model={"exit_at": 6}))


def test_config_env_expansion_and_defaults(tmp_path, monkeypatch):
    monkeypatch.setenv("ICAR_TEST_BUCKET", "bkt")
    monkeypatch.delenv("ICAR_TEST_UNSET", raising=False)
    cfg = parse_job_config(job("s3://${ICAR_TEST_BUCKET}/root", ["s3://${ICAR_TEST_BUCKET}/in/*.tar"],
                               ray={"address": "${ICAR_TEST_UNSET:-auto}"}))
    assert cfg.root == "s3://bkt/root" and cfg.inputs == ["s3://bkt/in/*.tar"] and cfg.ray.address == "auto"
    assert cfg.model.model == "demo"  # `model.name` is the alias of ModelSpec.model
    with pytest.raises(ConfigError, match=r"root: environment variable ICAR_TEST_UNSET is not set"):
        parse_job_config(job("${ICAR_TEST_UNSET}", ["a"]))
    # Defaults come from the embed/index dataclasses (one source of truth).
    from pipeline.embed.config import EmbedConfig
    from pipeline.index.build import IndexConfig

    e = cfg.embed_config("RUN")
    assert e.reembed_changed and e.shard_retries == EmbedConfig(inputs=[], output="").shard_retries
    i = cfg.index_config("RUN", "OUT")
    assert i.max_index_memory == IndexConfig(runs=[], output="").max_index_memory and i.runs == ["RUN"]


def test_example_configs_are_valid(monkeypatch):
    monkeypatch.setenv("ICAR_BUCKET", "bkt")
    examples = sorted((REPO / "jobs" / "examples").glob("*.yaml"))
    assert len(examples) >= 2
    for path in examples:
        cfg = load_job_config(str(path))
        assert cfg.schedule.cron is not None and cfg.inputs


# ------------------------------------------------------------------------------------------- lock


def test_local_lock_refuses_a_second_holder_and_breaks_a_dead_ones(tmp_path):
    url = str(tmp_path / "reindex.lock")
    first = RootLock(url, "job", stale_after_s=600, heartbeat_s=0.05)
    first.acquire()
    time.sleep(0.2)  # a few heartbeats: the lock is rewritten by compare-and-swap and stays ours
    first.check()
    with pytest.raises(LockHeld, match="is held by job 'job'") as e:
        RootLock(url, "job", stale_after_s=600).acquire()
    assert e.value.holder["pid"] == os.getpid()
    first.release()
    assert not os.path.exists(url)

    # A lock left by a process that is gone (same host) is taken over at once.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    holder = {"job": "job", "run_id": "dead", "host": socket.gethostname(), "pid": int(dead.stdout), "started": "x"}
    Path(url).write_text(json.dumps(holder))
    second = RootLock(url, "job", stale_after_s=600)
    second.acquire()
    assert json.loads(Path(url).read_text())["run_id"] == second.run_id
    second.release()

    # A lock not refreshed for stale_after_s (another host) is stale too.
    Path(url).write_text(json.dumps(dict(holder, host="elsewhere", pid=1)))
    old = time.time() - 120
    os.utime(url, (old, old))
    with pytest.raises(LockHeld):
        RootLock(url, "job", stale_after_s=600).acquire()
    third = RootLock(url, "job", stale_after_s=60)
    third.acquire()
    third.release()


def test_lock_lost_to_a_takeover_is_noticed(tmp_path):
    url = str(tmp_path / "reindex.lock")
    slow = RootLock(url, "job", stale_after_s=600, heartbeat_s=0.05)
    slow.acquire()
    thief = RootLock(url, "job", stale_after_s=600)
    thief.acquire(break_lock=True)
    deadline = time.monotonic() + 5
    while slow._lost is None and time.monotonic() < deadline:
        time.sleep(0.02)
    from pipeline.io.lock import LockLost

    with pytest.raises(LockLost, match="taken over"):
        slow.check()
    slow.release()  # must not delete the thief's lock
    assert json.loads(Path(url).read_text())["run_id"] == thief.run_id
    thief.release()


def test_s3_lock_uses_conditional_writes(s3_bucket):
    url = f"s3://{s3_bucket}/root/reindex.lock"
    first = RootLock(url, "job", stale_after_s=600, heartbeat_s=0.1)
    first.acquire()
    time.sleep(0.35)  # heartbeats: If-Match swaps keep it ours
    first.check()
    with pytest.raises(LockHeld):
        RootLock(url, "job", stale_after_s=600).acquire()
    # Two runs racing to take over the same stale lock: exactly one wins (If-Match on the stale ETag).
    first.release()
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.pipe_file(url, json.dumps({"job": "job", "run_id": "old", "host": "elsewhere", "pid": 1}).encode())
    a, b = RootLock(url, "job", stale_after_s=600), RootLock(url, "job", stale_after_s=600)
    stale = a.backend.read()
    assert a.backend.replace_if(stale[1], b"a") is not None
    assert b.backend.replace_if(stale[1], b"b") is None
    assert not b.backend.delete_if(stale[1])  # a conditional delete with an old ETag is refused too
    fs.rm(url)


# ------------------------------------------------------------------------------------------- decisions


@dataclasses.dataclass
class _Settings:
    max_memory: str = "4G"
    factory: str | None = None
    flat_below: int = 50_000
    target_recall: float = 0.9
    reuse_trained: bool = True
    retrain_growth: float = 2.0
    retrain_list_growth: float = 2.0
    retrain_nprobe_growth: float = 2.0


def _previous(n0: int, **over) -> dict:
    """A previous version trained on n0 vectors with the automatic choice for n0 (IVF-PQ, dim 512)."""
    from pipeline.index.params import choose_index_params, parse_size

    p = choose_index_params(n0, 512, parse_size("4G"), None, flat_below=50_000)
    prev = {"version": "v0001", "factory": p.factory, "kind": p.kind, "nlist": p.nlist, "pq_m": p.m, "opq": p.opq,
            "coarse": p.coarse, "ntotal": n0, "nprobe": 16, "k": 10, "recall_min": 0.95,
            "settings": {"max_memory": "4G", "factory": None, "flat_below": 50_000},
            "trained": {"version": "v0001", "ntotal": n0, "train_size": p.train_size, "nprobe": 16},
            "trained_file": "ROOT/indexes/v0001/trained.faiss"}
    prev.update(over)
    return prev


def test_reuse_or_retrain_decisions_follow_the_numbers():
    s = _Settings()
    first = decide_index_build(200_000, 512, None, s, True)
    assert first.mode == "train" and "first index" in first.reasons[0]

    grown = decide_index_build(260_000, 512, _previous(200_000), s, True)  # 1.3x: same structure, same lists
    assert grown.mode == "reuse", grown.reasons
    assert grown.numbers["growth_since_training"] == 1.3 and grown.trained_from.endswith(TRAINED_FILE)
    assert grown.factory == _previous(200_000)["factory"]

    doubled = decide_index_build(450_000, 512, _previous(200_000), s, True)
    assert doubled.mode == "train" and any("grew 2.25x" in r for r in doubled.reasons)

    # Reused twice in a row: growth counts from the training, not from the last version.
    chained = _previous(200_000, ntotal=380_000)
    assert decide_index_build(420_000, 512, chained, s, True).mode == "train"

    # Lists: trained with 1024 lists at 70k vectors; at 300k the guideline asks ~2191, 2.1x more.
    lists = _previous(70_000)
    assert lists["nlist"] == 1024
    out = decide_index_build(300_000, 512, dict(lists, trained=dict(lists["trained"], ntotal=160_000)), s, True)
    assert out.mode == "train" and any("guideline" in r for r in out.reasons), out.reasons
    assert out.numbers["nlist"] == 1024 and out.numbers["guideline_nlist"] > 2048

    low_recall = decide_index_build(210_000, 512, _previous(200_000, recall_min=0.85), s, True)
    assert low_recall.mode == "train" and any("below the target" in r for r in low_recall.reasons)
    nprobe = decide_index_build(210_000, 512, _previous(200_000, nprobe=64), s, True)
    assert nprobe.mode == "train" and any("nprobe" in r for r in nprobe.reasons)
    budget = decide_index_build(210_000, 512, _previous(200_000), dataclasses.replace(s, max_memory="8G"), True)
    assert budget.mode == "train" and any("settings changed" in r for r in budget.reasons)
    flat = decide_index_build(60_000, 512, _previous(20_000, kind="flat", factory="Flat", nlist=0, pq_m=0), s, True)
    assert flat.mode == "train" and "exact search" in flat.reasons[0]
    unsupported = decide_index_build(210_000, 512, _previous(200_000), s, False)
    assert unsupported.mode == "train" and any("index-trained-reuse.diff" in r for r in unsupported.reasons)


# ------------------------------------------------------------------------------------------- synthetic runs


def clustered(n: int, dim: int, seed: int) -> np.ndarray:
    """Return ``n`` L2-normalised float16 vectors in tight groups of 8 (a well-defined top-10)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((-(-n // 8), dim)).astype(np.float32)
    x = np.repeat(centres, 8, axis=0)[:n] + 0.3 * rng.standard_normal((n, dim)).astype(np.float32) / np.sqrt(dim)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


SYN_IDENTITY = {"name": "synthetic", "pretrained": None, "weights_sha256": "b" * 64, "embed_dim": 32,
                "image_size": 32, "num_blocks": 2}


def synthetic_commit(cfg, input_path: Path, vectors: np.ndarray, gen: str = "g0001") -> None:
    """Commit ``vectors`` as the embedded shard of input file ``input_path`` in the job's run (as `icar embed` would).

    The manifest row carries the input's real fingerprint, so a reindex sees the input as unchanged and
    embeds nothing: it goes straight to the index.
    """
    from pipeline.io.readers import expand_inputs
    from pipeline.io.shards import Manifest

    root = cfg.root
    run = run_dir(root, gen)
    os.makedirs(run, exist_ok=True)
    if not os.path.exists(os.path.join(root, "generations", gen, "generation.json")):
        storage.write_json({"generation": gen}, os.path.join(root, "generations", gen, "generation.json"))
    if not os.path.exists(os.path.join(run, "run.json")):
        storage.write_json({"model": SYN_IDENTITY, "spec": dataclasses.asdict(cfg.model)},
                           os.path.join(run, "run.json"))
    shard = expand_inputs([str(input_path)])[0]
    manifest = Manifest(run)
    part = manifest.next_part()
    n, dim = vectors.shape
    stem = input_path.stem
    keys = [f"{stem}-{i:06d}" for i in range(n)]
    table = pa.Table.from_arrays([
        pa.array(keys), pa.array([shard.uri] * n), pa.array([None] * n, pa.string()), pa.array([None] * n, pa.string()),
        pa.array(np.full(n, 32, np.int32)), pa.array(np.full(n, 32, np.int32)), pa.array(np.full(n, 0.5, np.float32)),
        pa.array(np.full(n, 2, np.int16)), pa.array(np.full(n, 1.0, np.float32)),
        pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float16()), dim)], schema=shard_schema(dim))
    storage.write_parquet(table, os.path.join(run, "shards", part_name(part)))
    manifest.add({"source": shard.uri, "output": f"shards/{part_name(part)}", "part": part, "rows": n, "errors": 0,
                  "gflops": float(n), "scorer_gflops": 0.0, "seconds": 0.1, "model_seconds": 0.1,
                  "source_size": shard.size, "source_mtime": shard.mtime, "source_etag": shard.etag,
                  "exit_counts": json.dumps({"2": n}), "complexity_mean": 0.5, "complexity_p10": 0.5,
                  "complexity_p50": 0.5, "complexity_p90": 0.5, "committed_at": f"2026-01-01T00:00:{part:02d}+00:00"})


def synthetic_job(tmp_path, factory: str | None = None, **over):
    """Return (config, input folder) of a job over synthetic 32-d vectors (IVF16,Flat needs >= 624 of them)."""
    inputs = tmp_path / "in"
    inputs.mkdir(exist_ok=True)
    base = job(tmp_path / "root", [inputs / "*.tar"], index={"factory": factory, "target_recall": 0.9},
               max_retire_fraction=0.5)
    base["model"] = {"name": "synthetic", "pretrained": "none", "scorer": "none"}
    for k, v in over.items():
        base[k] = {**base[k], **v} if isinstance(v, dict) else v
    return parse_job_config(base), inputs


def add_input(cfg, inputs: Path, name: str, n: int, seed: int) -> None:
    path = inputs / f"{name}.tar"
    path.write_bytes(f"input {name}".encode())  # never read: its manifest row says it is embedded already
    synthetic_commit(cfg, path, clustered(n, 32, seed))


def test_index_reuses_the_trained_index_until_the_corpus_doubles(tmp_path):
    cfg, inputs = synthetic_job(tmp_path, factory="IVF16,Flat")
    add_input(cfg, inputs, "a", 700, 1)
    first = run_reindex(cfg)
    assert first.exit_code == EXIT_OK, first.record.get("error")
    v1 = first.record["index"]
    assert v1["version"] == "v0001" and v1["decision"]["mode"] == "train" and v1["published"]
    assert v1["verification"]["faiss_ntotal"] == 700 and v1["verification"]["passed"]

    add_input(cfg, inputs, "b", 300, 2)  # 1.43x since training
    second = run_reindex(cfg).record["index"]
    assert second["version"] == "v0002" and second["ntotal"] == 1000
    numbers = second["decision"]["numbers"]
    assert numbers["n_at_training"] == 700 and numbers["growth_since_training"] == pytest.approx(1000 / 700, 1e-3)
    info = json.loads((tmp_path / "root" / "indexes" / "v0002" / "index.json").read_text())
    assert info["reindex"]["decision"] == second["decision"]  # the decision travels with the index
    if reuse_supported():
        assert second["decision"]["mode"] == "reuse", second["decision"]["reasons"]
        assert second["trained"]["version"] == "v0001" and info["trained"]["reused_from"].endswith(
            "v0001/" + TRAINED_FILE)
        assert "no training" in " ".join(info["reasons"])
    else:
        assert second["decision"]["mode"] == "train"
        assert any("trained_index" in r for r in second["decision"]["reasons"])

    add_input(cfg, inputs, "c", 500, 3)  # 1500 / 700 = 2.14x since training: retrain
    third = run_reindex(cfg).record["index"]
    assert third["decision"]["mode"] == "train" and third["trained"]["version"] == "v0003"
    assert any("grew 2.14x" in r for r in third["decision"]["reasons"]) or not reuse_supported()
    assert read_latest(cfg.root)["version"] == "v0003"
    # keep_versions 2: v0001 is gone, v0002 stays for readers that resolved LATEST just before the switch.
    assert list_versions(cfg.root) == [2, 3]


def mixed_exit_job(tmp_path, calibration: dict):
    """Return (cfg, run, its shard's table, exit depth per row, the run.json as embedded) of a synthetic job whose one
    run has every third row leaving at block 1 (full depth 2) and run.json fields ``calibration`` added."""
    cfg, inputs = synthetic_job(tmp_path, factory="IVF16,Flat")
    add_input(cfg, inputs, "a", 700, 1)
    run = Path(run_dir(cfg.root, "g0001"))
    shard = run / "shards" / part_name(0)
    table = pq.read_table(shard)
    exits = np.where(np.arange(table.num_rows) % 3 == 0, 1, 2).astype(np.int16)
    pq.write_table(table.set_column(table.schema.get_field_index("exit_layer"), "exit_layer", pa.array(exits)), shard)
    doc = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**doc, **calibration}))
    return cfg, run, table, exits, doc


def test_reindex_scales_rows_by_their_runs_exit_scales(tmp_path):
    """A run whose run.json records exit_scales (its exit heads carry them) is indexed with every row multiplied by
    the scale of its exit depth, as `icar index` does; the shards stay unit-length."""
    faiss = pytest.importorskip("faiss")
    cfg, run, table, exits, _ = mixed_exit_job(tmp_path, {"exit_scales": {"1": 1.5, "2": 1.0}})

    result = run_reindex(cfg)
    assert result.exit_code == EXIT_OK, result.record.get("error")
    version = tmp_path / "root" / "indexes" / "v0001"
    info = json.loads((version / "index.json").read_text())
    assert info["runs"][0]["exit_scales"] == {"1": 1.5, "2": 1.0}
    index = faiss.read_index(str(version / "index.faiss"))
    faiss.extract_index_ivf(index).make_direct_map()
    stored = np.stack(table.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
    np.testing.assert_allclose(index.reconstruct_n(0, index.ntotal), stored * np.where(exits == 1, 1.5, 1.0)[:, None],
                               rtol=1e-6)


def test_reindex_gives_exit_offsets_their_dimension_and_retrains_when_it_goes(tmp_path):
    """A run.json with exit_offsets gets the index one dimension more (rows [scale x e, offset], index.json
    query_constant); when the offsets are gone, the next version retrains rather than reuse the wider trained index."""
    faiss = pytest.importorskip("faiss")
    cfg, run, table, exits, doc = mixed_exit_job(tmp_path, {"exit_scales": {"1": 1.5, "2": 1.0},
                                                            "exit_offsets": {"1": 0.2, "2": 0.0}})

    result = run_reindex(cfg)
    assert result.exit_code == EXIT_OK, result.record.get("error")
    info = json.loads((tmp_path / "root" / "indexes" / "v0001" / "index.json").read_text())
    assert info["dim"] == 32 and info["index_dim"] == 33 and info["query_constant"] == 1.0
    assert info["runs"][0]["exit_offsets"] == {"1": 0.2}
    index = faiss.read_index(str(tmp_path / "root" / "indexes" / "v0001" / "index.faiss"))
    faiss.extract_index_ivf(index).make_direct_map()
    stored = np.stack(table.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
    want = np.hstack([stored * np.where(exits == 1, 1.5, 1.0)[:, None], np.where(exits == 1, 0.2, 0.0)[:, None]])
    np.testing.assert_allclose(index.reconstruct_n(0, index.ntotal), want, rtol=1e-6)

    (run / "run.json").write_text(json.dumps(doc))  # offsets (and scales) gone: 32 dimensions again
    forced = dataclasses.replace(cfg, index=dataclasses.replace(cfg.index, force=True))
    again = run_reindex(forced)
    assert again.exit_code == EXIT_OK, again.record.get("error")
    decision = again.record["index"]["decision"]
    assert decision["mode"] == "train" and any("holds 33 dimensions and these vectors 32" in r
                                               for r in decision["reasons"]), decision
    info = json.loads((tmp_path / "root" / "indexes" / "v0002" / "index.json").read_text())
    assert info["dim"] == 32 and "index_dim" not in info and "query_constant" not in info


def test_failed_verification_keeps_latest(tmp_path):
    cfg, inputs = synthetic_job(tmp_path, factory="IVF16,Flat")
    add_input(cfg, inputs, "a", 700, 1)
    assert run_reindex(cfg).exit_code == EXIT_OK
    # A 4-bit code of 2 bytes cannot reach recall 0.99: the build succeeds, verification refuses it.
    strict = dataclasses.replace(cfg, index=dataclasses.replace(cfg.index, factory="PQ4x4", target_recall=0.99,
                                                                force=True))
    result = run_reindex(strict)
    assert result.exit_code == EXIT_VERIFY, result.record.get("error")
    assert result.record["status"] == "verification failed" and "below the target" in result.record["error"]
    assert read_latest(cfg.root)["version"] == "v0001"
    record = json.loads((tmp_path / "root" / "indexes" / "v0002" / "reindex.json").read_text())
    assert record["verified"] is False and record["verification"]["problems"]
    # The next good run publishes v0003 and retention removes the failed v0002.
    good = run_reindex(dataclasses.replace(cfg, index=dataclasses.replace(cfg.index, force=True)))
    assert good.exit_code == EXIT_OK and read_latest(cfg.root)["version"] == "v0003"
    assert list_versions(cfg.root) == [1, 3]
    status = reindex_status(cfg.root)  # what `icar reindex --status` prints
    assert status["latest"]["version"] == "v0003" and status["lock"] is None
    assert [(r["status"], r["exit_code"]) for r in status["recent_runs"]] == [
        ("ok", EXIT_OK), ("verification failed", EXIT_VERIFY), ("ok", EXIT_OK)]


def test_verify_index_checks_rows_model_and_file(tmp_path):
    cfg, inputs = synthetic_job(tmp_path, factory="IVF16,Flat")
    add_input(cfg, inputs, "a", 700, 1)
    assert run_reindex(cfg).exit_code == EXIT_OK
    v = resolve_latest(cfg.root)
    key = f"synthetic:{'b' * 64}"
    assert verify_index(v, 700, key, 0.9)["faiss_ntotal"] == 700
    with pytest.raises(VerificationError, match="ntotal 700 != 701"):
        verify_index(v, 701, key, 0.9)
    with pytest.raises(VerificationError, match="model key"):
        verify_index(v, 700, "other:" + "c" * 64, 0.9)
    data = Path(v, "index.faiss").read_bytes()
    Path(v, "index.faiss").write_bytes(data[: len(data) // 2])
    with pytest.raises(VerificationError, match="cannot be opened with faiss.read_index"):
        verify_index(v, 700, key, 0.9)


def test_safety_stop_when_most_inputs_disappear(tmp_path):
    cfg, inputs = synthetic_job(tmp_path)
    for name, seed in (("a", 1), ("b", 2), ("c", 3)):
        add_input(cfg, inputs, name, 100, seed)
    assert run_reindex(cfg).exit_code == EXIT_OK
    manifest_before = (Path(run_dir(cfg.root, "g0001")) / "manifest.parquet").read_bytes()
    (inputs / "a.tar").unlink()
    (inputs / "b.tar").unlink()
    result = run_reindex(cfg)
    assert result.exit_code == EXIT_SAFETY and "2 of 3 committed inputs disappeared" in result.record["error"]
    assert (Path(run_dir(cfg.root, "g0001")) / "manifest.parquet").read_bytes() == manifest_before
    (inputs / "c.tar").unlink()  # nothing matches the glob any more: still a safety stop, not a retirement
    assert run_reindex(cfg).exit_code == EXIT_SAFETY


def test_interrupted_retirement_is_finished_by_the_next_run(tmp_path):
    from pipeline.io.shards import Manifest

    cfg, inputs = synthetic_job(tmp_path, max_retire_fraction=0.9)
    add_input(cfg, inputs, "a", 100, 1)
    add_input(cfg, inputs, "b", 100, 2)
    assert run_reindex(cfg).exit_code == EXIT_OK
    run = run_dir(cfg.root, "g0001")
    row = next(r for r in Manifest(run).rows if r["source"].endswith("b.tar"))
    # A crash right after writing the intent: manifest and files untouched.
    target = os.path.join(cfg.root, "generations", "g0001", "retired", "crashed")
    storage.write_json({"reindex_id": "crashed", "complete": False, "run": run, "inputs": [
        {"source": row["source"], "part": row["part"], "output": row["output"], "rows": row["rows"], "errors": 0,
         "committed_at": row["committed_at"], "moved_to": os.path.join(target, part_name(row["part"]))}]},
        os.path.join(target, "retired.json"))
    assert complete_retirements(cfg.root, "g0001") == ["crashed"]
    assert [r["source"] for r in Manifest(run).rows] == [str(inputs / "a.tar")]
    assert os.path.exists(os.path.join(target, part_name(row["part"])))
    assert not os.path.exists(os.path.join(run, row["output"]))
    assert json.loads(Path(target, "retired.json").read_text())["complete"] is True
    assert complete_retirements(cfg.root, "g0001") == []  # idempotent


def test_a_held_lock_refuses_the_run(tmp_path):
    cfg, inputs = synthetic_job(tmp_path)
    add_input(cfg, inputs, "a", 100, 1)
    holder = RootLock(os.path.join(cfg.root, "reindex.lock"), "someone-else", stale_after_s=600)
    holder.acquire()
    try:
        result = run_reindex(cfg)
    finally:
        holder.release()
    assert result.exit_code == EXIT_LOCKED and "someone-else" in result.record["error"]
    assert read_latest(cfg.root) is None and list_versions(cfg.root) == []
    logs = list((tmp_path / "root" / "reindex-log").glob("*.json"))
    assert len(logs) == 1 and json.loads(logs[0].read_text())["status"] == "locked"


@pytest.mark.parametrize("stop, code, status", [("sigterm", 143, "terminated"), ("ctrl-c", 130, "interrupted")])
def test_a_stopped_run_releases_the_lock_and_says_so(tmp_path, monkeypatch, stop, code, status):
    """SIGTERM reaches reindex as execution.Terminated out of its embed step (Ctrl-C as KeyboardInterrupt): the run
    ends with its own exit code and record, and the lock is free for the next run."""
    from pipeline.reindex import run as reindex
    from pipeline.runtime import Terminated

    cfg, inputs = synthetic_job(tmp_path)
    add_input(cfg, inputs, "a", 100, 1)

    def stopped(*args, **kwargs):
        raise Terminated("signal 15") if stop == "sigterm" else KeyboardInterrupt()

    monkeypatch.setattr(reindex, "_run_locked", stopped)
    result = run_reindex(cfg)
    assert result.exit_code == code and result.record["status"] == status
    assert "run again to resume" in result.record["error"]
    logs = list((tmp_path / "root" / "reindex-log").glob("*.json"))
    assert len(logs) == 1 and json.loads(logs[0].read_text())["exit_code"] == code
    again = RootLock(os.path.join(cfg.root, "reindex.lock"), "next-run", stale_after_s=600)
    again.acquire()  # raises LockHeld if the stopped run kept it
    again.release()


def test_cli_runs_with_json_logs_and_exit_codes(tmp_path, capsys):
    from jobs.reindex import main

    cfg, inputs = synthetic_job(tmp_path)
    add_input(cfg, inputs, "a", 100, 1)
    path = tmp_path / "job.yaml"
    data = job(cfg.root, [inputs / "*.tar"], model=cfg_model_mapping(cfg))
    path.write_text(yaml.safe_dump(data))
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    env.pop("ICAR_LOG_FORMAT", None)
    run = lambda *a: subprocess.run([sys.executable, "-m", "jobs.reindex", *a], cwd=REPO, env=env,
                                    capture_output=True, text=True, timeout=300)
    out = run("--config", str(path), "--check-config")
    assert out.returncode == 0 and "ok" in out.stdout

    out = run("--config", str(path), "--log-format", "json", "--json")
    assert out.returncode == EXIT_OK, out.stderr[-3000:]
    logs = [json.loads(line) for line in out.stderr.splitlines() if line.startswith("{")]
    assert any(r["logger"] == "pipeline.reindex.run" and "LATEST -> v0001" in r["message"] for r in logs)
    assert all(set(r) >= {"ts", "level", "logger", "message"} for r in logs)
    record = json.loads(out.stdout[: out.stdout.rindex("}") + 1])
    assert record["exit_code"] == EXIT_OK and record["index"]["version"] == "v0001"
    assert out.stdout.strip().splitlines()[-1].startswith("icar reindex test-job: exit 0 (ok)")

    assert main(["--config", str(path), "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["inputs"]["unchanged"] == 1 and plan["next_version"] == "v0002" and plan["safety_stop"] is False
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(dict(data, index={"max_memory": "lots"})))
    assert main(["--config", str(bad)]) == EXIT_CONFIG
    assert "index.max_memory: expected a size like 4G, got 'lots'" in capsys.readouterr().err
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "reindex", "--help"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "exit codes" in out.stdout and "--log-format" in out.stdout


def cfg_model_mapping(cfg) -> dict:
    """Return the model section of a config as YAML would give it."""
    m = dataclasses.asdict(cfg.model)
    m["name"] = m.pop("model")
    return m


# ------------------------------------------------------------------------------------------- real runs


class LatestReader(threading.Thread):
    """Polls LATEST like a search server would, opening every version it resolves; records what it saw."""

    def __init__(self, root: str, storage_options: dict | None = None):
        super().__init__(daemon=True)
        self.root, self.so = root, storage_options
        self.stop = threading.Event()
        self.seen: list[str] = []
        self.failures: list[str] = []
        self.reads = 0

    def run(self):
        import faiss

        while not self.stop.is_set():
            try:
                path = resolve_latest(self.root, self.so)
                info = json.loads(Path(path, "index.json").read_text())
                index = faiss.read_index(str(Path(path, "index.faiss")))
                ids = pq.ParquetFile(Path(path, "ids.parquet")).metadata.num_rows
                if not (index.ntotal == info["ntotal"] == ids):
                    self.failures.append(f"{path}: ntotal {index.ntotal}, index.json {info['ntotal']}, ids {ids}")
                if not self.seen or self.seen[-1] != path:
                    self.seen.append(path)
                self.reads += 1
            except Exception as e:  # any failure to read what LATEST points to is what this test is about
                self.failures.append(f"{type(e).__name__}: {e}")
            time.sleep(0.002)


@pytest.fixture(scope="module")
def history(tmp_path_factory, ray_session):
    """Six runs of one job on a changing corpus; returns their results and snapshots of the root after each."""
    base = tmp_path_factory.mktemp("reindex")
    inputs = base / "in"
    inputs.mkdir()
    root = base / "root"
    tar(inputs / "a.tar", "a-", seed=1)
    tar(inputs / "b.tar", "b-", seed=2)
    path = base / "job.yaml"
    path.write_text(yaml.safe_dump(job(root, [inputs / "*.tar"])))
    cfg = load_job_config(str(path))
    run = Path(run_dir(str(root), "g0001"))
    h = {"root": root, "inputs": inputs, "cfg": cfg}

    h["r1"] = run_reindex(cfg)
    h["manifest1"] = pq.read_table(run / "manifest.parquet").to_pylist()

    tar(inputs / "c.tar", "c-", seed=3)  # the corpus grows by one shard
    reader = LatestReader(str(root))
    reader.start()
    h["r2"] = run_reindex(cfg)
    h["manifest2"] = pq.read_table(run / "manifest.parquet").to_pylist()
    h["run_json2"] = json.loads((run / "run.json").read_text())
    h["keys_v2"] = index_keys(root / "indexes" / "v0002")

    h["r3"] = run_reindex(cfg)  # nothing changed

    tar(inputs / "a.tar", "a2-", n=6, seed=4)  # a.tar rewritten with other images
    (inputs / "b.tar").unlink()  # b.tar is gone
    h["r4"] = run_reindex(cfg)
    reader.stop.set()
    reader.join(timeout=30)
    h["reader"] = reader
    h["keys_v3"] = index_keys(root / "indexes" / "v0003")
    h["manifest4"] = pq.read_table(run / "manifest.parquet").to_pylist()
    h["versions4"] = list_versions(str(root))

    # Another model: a copy of the demo's model directory (a directory's identity is its path, so it differs).
    other_dir = base / "other-model"
    other_dir.mkdir()
    for f in DEMO_DIR.iterdir():
        if f.name.startswith(("clip", "bpe")):
            (other_dir / f.name).write_bytes(f.read_bytes())
    other_model = dict(job(root, [inputs / "*.tar"]), model=dict(MODEL, name=str(other_dir)))
    h["r5"] = run_reindex(parse_job_config(other_model))
    h["latest5"] = read_latest(str(root))
    h["generations5"] = sorted(p.name for p in (root / "generations").iterdir())
    h["manifest5"] = pq.read_table(run / "manifest.parquet").to_pylist()
    h["r6"] = run_reindex(parse_job_config(dict(other_model, on_model_change="new_generation")))
    h["latest6"] = read_latest(str(root))
    return h


def test_first_run_publishes_v0001(history):
    r1 = history["r1"]
    assert r1.exit_code == EXIT_OK, r1.record.get("error")
    assert r1.record["embed"]["shards_committed"] == 2 and r1.record["embed"]["images"] == 16
    assert r1.record["index"]["version"] == "v0001" and r1.record["index"]["verification"]["faiss_ntotal"] == 16
    assert r1.record["latest"] == {"before": None, "after": "v0001"}
    assert not (history["root"] / "reindex.lock").exists()


def test_second_run_embeds_only_the_new_shard(history):
    r2 = history["r2"]
    assert r2.exit_code == EXIT_OK, r2.record.get("error")
    assert r2.record["inputs"]["new"] == [str(history["inputs"] / "c.tar")] and r2.record["inputs"]["unchanged"] == 2
    assert r2.record["embed"]["shards_committed"] == 1 and r2.record["embed"]["shards_skipped"] == 2
    assert r2.record["embed"]["images"] == 8
    last = history["run_json2"]["invocations"][-1]
    assert last["shards_committed"] == 1 and last["shards_skipped"] == 2
    before = {r["source"]: r["committed_at"] for r in history["manifest1"]}
    after = {r["source"]: r["committed_at"] for r in history["manifest2"]}
    assert {s: after[s] for s in before} == before  # a and b were not touched
    assert history["keys_v2"] == {f"{p}{i:09d}" for p in ("a-", "b-", "c-") for i in range(8)}
    assert r2.record["latest"] == {"before": "v0001", "after": "v0002"}


def test_readers_following_latest_never_see_a_partial_index(history):
    reader = history["reader"]
    assert reader.failures == []
    root = history["root"] / "indexes"
    assert reader.seen[0] == str(root / "v0001") and reader.seen[-1] == str(root / "v0003")
    assert str(root / "v0002") in reader.seen and reader.reads > 50


def test_unchanged_corpus_publishes_nothing(history):
    r3 = history["r3"]
    assert r3.exit_code == EXIT_OK and "embed" not in r3.record  # no model actor was started
    assert r3.record["index"]["skipped"].startswith("unchanged since v0002")
    assert r3.record["latest"] == {"before": "v0002", "after": "v0002"}


def test_changed_input_is_reembedded_and_gone_input_retired(history):
    r4, inputs = history["r4"], history["inputs"]
    assert r4.exit_code == EXIT_OK, r4.record.get("error")
    assert r4.record["inputs"]["changed"] == [str(inputs / "a.tar")]
    assert r4.record["inputs"]["disappeared"] == [str(inputs / "b.tar")]
    assert r4.record["embed"]["shards_committed"] == 1 and r4.record["embed"]["images"] == 6
    retired = r4.record["retired"]
    assert [r["source"] for r in retired] == [str(inputs / "b.tar")] and retired[0]["rows"] == 8
    assert Path(retired[0]["moved_to"]).exists()
    assert sorted(r["source"] for r in history["manifest4"]) == [str(inputs / "a.tar"), str(inputs / "c.tar")]
    keys = history["keys_v3"]
    assert keys == {f"a2-{i:09d}" for i in range(6)} | {f"c-{i:09d}" for i in range(8)}
    assert r4.record["index"]["verification"]["expected_rows"] == 14
    # keep_versions 2: v0001 deleted, v0002 kept beside LATEST v0003.
    assert history["versions4"] == [2, 3] and r4.record["retention"]["deleted"] == ["v0001"]


def test_model_change_is_refused_then_starts_a_new_generation(history):
    r5, r6, root = history["r5"], history["r6"], history["root"]
    assert r5.exit_code == EXIT_MODEL_CHANGED and "on_model_change is refuse" in r5.record["error"]
    assert history["latest5"]["version"] == "v0003" and history["manifest5"] == history["manifest4"]
    assert history["generations5"] == ["g0001"]
    assert r6.exit_code == EXIT_OK, r6.record.get("error")
    assert r6.record["generation"] == "g0002" and r6.record["new_generation"]
    assert r6.record["embed"]["shards_committed"] == 2 and r6.record["embed"]["images"] == 14
    assert r6.record["index"]["decision"]["mode"] == "train"
    latest = history["latest6"]
    assert latest["version"] == "v0004" and latest["generation"] == "g0002"
    assert latest["model_key"] != json.loads((root / "indexes" / "v0003" / "index.json").read_text())["model_key"]
    assert (root / "generations" / "g0001" / "run" / "manifest.parquet").exists()  # the old generation is kept
    # The record of every run is in the reindex log, refusals included.
    statuses = [json.loads(p.read_text())["status"] for p in sorted((root / "reindex-log").glob("*.json"))]
    assert statuses == ["ok", "ok", "ok", "ok", "model changed", "ok"]


def test_s3_root_and_inputs(s3_bucket, ray_session, tmp_path):
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.put(str(tar(tmp_path / "a.tar", "a-", n=4, seed=5)), f"{s3_bucket}/in/a.tar")
    fs.put(str(tar(tmp_path / "b.tar", "b-", n=4, seed=6)), f"{s3_bucket}/in/b.tar")
    root = f"s3://{s3_bucket}/icar"
    cfg = parse_job_config(job(root, [f"s3://{s3_bucket}/in/*.tar"]))
    first = run_reindex(cfg)
    assert first.exit_code == EXIT_OK, first.record.get("error")
    assert first.record["embed"]["shards_committed"] == 2

    fs.put(str(tar(tmp_path / "c.tar", "c-", n=4, seed=7)), f"{s3_bucket}/in/c.tar")
    fs.invalidate_cache()
    second = run_reindex(cfg)
    assert second.exit_code == EXIT_OK, second.record.get("error")
    assert second.record["inputs"]["new"] == [f"s3://{s3_bucket}/in/c.tar"]
    assert second.record["embed"]["shards_committed"] == 1 and second.record["embed"]["shards_skipped"] == 2
    assert resolve_latest(root) == f"{root}/indexes/v0002"
    assert second.record["index"]["verification"]["faiss_ntotal"] == 12
    assert index_keys(resolve_latest(root)) == {f"{p}{i:09d}" for p in ("a-", "b-", "c-") for i in range(4)}
    fs.invalidate_cache()
    assert not fs.exists(f"{s3_bucket}/icar/reindex.lock")
    assert len(fs.ls(f"{s3_bucket}/icar/reindex-log")) == 2
    assert json.loads(fs.cat_file(f"{s3_bucket}/icar/indexes/{LATEST}"))["version"] == "v0002"
