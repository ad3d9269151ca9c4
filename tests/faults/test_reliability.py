"""Reliability under real faults: lost nodes, SIGKILLed drivers, killed workers, a full disk, hostile inputs.

Every fault here is real: Ray nodes are killed (``ray.cluster_utils.Cluster``, in a subprocess so that it never
meets the session's Ray), drivers and worker processes get SIGKILL, the disk is a tiny tmpfs, inputs are real
broken files from tests/helpers/zoo.py. Each test compares what survives with an undisturbed run of the same inputs:
the same keys, no duplicates, equal embeddings, and no partial file ever visible under a final name.

Figures (faults injected, runs survived, rows lost) are printed as ``RELIABILITY ...`` lines and, when
$ICAR_RELIABILITY_FIGURES names a file, appended to it as JSON lines (the README's reliability table).
"""

from __future__ import annotations

import ast
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from zoo import (NON_UTF8_CAPTION, NON_UTF8_CAPTION_DECODED, ShardSample, encode, make_corpus, make_photo_like,
                 parquet_without_image_column, truncated_tar, write_parquet_shard, write_tar_shard, zoo_cases,
                 zoo_samples)

REPO = Path(__file__).resolve().parents[2]
# The shipped tiny demo CLIP (3 exits): what is tested here is the pipeline around the model, not the model.
MODEL = dict(model="demo", scorer="heuristic", route_fractions=[0.4, 0.3, 0.3])
CLI_MODEL = ["--model", "demo", "--scorer", "heuristic",
             "--route-fractions", "0.4,0.3,0.3", "--batch-size", "4", "--no-progress"]
SHARDS, PER_SHARD = 6, 4


def record(name: str, **figures) -> None:
    """Print one line of figures for the reliability table and append it to $ICAR_RELIABILITY_FIGURES."""
    print(f"\nRELIABILITY {name} " + " ".join(f"{k}={v}" for k, v in figures.items()))
    path = os.environ.get("ICAR_RELIABILITY_FIGURES")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"test": name, **figures}) + "\n")


# ----------------------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """SHARDS tar shards of PER_SHARD small real images each, keys unique across shards."""
    root = tmp_path_factory.mktemp("rel-corpus")
    rng = np.random.default_rng(11)
    for s in range(SHARDS):
        write_tar_shard(root / f"{s:05d}.tar", make_corpus(rng, PER_SHARD, prefix=f"s{s}-", max_side=96))
    return root


def embed(inputs, output, **kw):
    """Run `icar embed` in this process on the session's Ray; return the summary."""
    from pipeline.embed.config import EmbedConfig
    from pipeline.model.spec import ModelSpec
    from pipeline.embed.execution import run_embed

    spec = ModelSpec(**{**MODEL, **{k: kw.pop(k) for k in list(kw) if k in ModelSpec.__dataclass_fields__}})
    cfg = EmbedConfig(inputs=[str(i) for i in inputs], output=str(output), spec=spec, batch_size=4, progress=False,
                      decode_tasks=kw.pop("decode_tasks", 1), **kw)
    return run_embed(cfg)


def run_rows(run: Path) -> dict[str, tuple]:
    """Return key -> (source, exit_layer, complexity, embedding) of every committed row; no key may repeat."""
    manifest = pq.read_table(run / "manifest.parquet")
    sources = manifest.column("source").to_pylist()
    assert len(sources) == len(set(sources)), f"an input shard is recorded twice: {sources}"
    rows: dict[str, tuple] = {}
    for out, n in zip(manifest.column("output").to_pylist(), manifest.column("rows").to_pylist()):
        t = pq.read_table(run / out)
        assert t.num_rows == n, f"{out} holds {t.num_rows} rows, the manifest says {n}"
        for r in t.select(["key", "source", "exit_layer", "complexity", "embedding"]).to_pylist():
            assert r["key"] not in rows, f"key {r['key']!r} committed twice"
            rows[r["key"]] = (r["source"], r["exit_layer"], r["complexity"], tuple(r["embedding"]))
    return rows


def assert_same_rows(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want), f"keys differ: lost {sorted(set(want) - set(got))[:5]}, " \
                                        f"extra {sorted(set(got) - set(want))[:5]}"
    different = [k for k in want if got[k] != want[k]]
    assert not different, f"{len(different)} rows differ from the undisturbed run, e.g. {different[:3]}"


def check_visible_files(run: Path) -> dict:
    """Assert that nothing partial is visible under a final name; return counts of what was found.

    Every non-hidden Parquet file opens and reads, run.json parses, every shard the manifest lists exists with
    its row count. Hidden temporaries (``.NAME.tmp-*``, ignored by pyarrow/DuckDB dataset discovery) are counted.
    """
    found = {"parquet": 0, "hidden_tmp": 0, "orphans": 0}
    if not run.exists():
        return found
    for p in run.rglob("*"):
        if p.is_dir():
            continue
        if p.name.startswith("."):
            assert ".tmp-" in p.name or p.name.startswith(".icar-write-check-"), f"unexpected hidden file {p}"
            found["hidden_tmp"] += 1
            continue
        if p.suffix == ".parquet":
            pq.read_table(p)  # raises on a partial file
            found["parquet"] += 1
        elif p.name == "run.json":
            json.loads(p.read_text())
        elif p.relative_to(run).as_posix() == "icar.lock":
            found["lock"] = 1  # a killed writer's lock: the next run takes it over (its process is gone)
        else:
            raise AssertionError(f"unexpected file in a run directory: {p}")
    if (run / "manifest.parquet").exists():
        manifest = pq.read_table(run / "manifest.parquet").to_pylist()
        listed = {r["output"] for r in manifest}
        for r in manifest:
            assert (run / r["output"]).exists(), f"manifest lists {r['output']}, which does not exist"
        shards = {f"shards/{p.name}" for p in (run / "shards").glob("part-*.parquet")}
        found["orphans"] = len(shards - listed)  # committed but unrecorded: removed and redone on resume
    return found


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory, ray_session):
    """The undisturbed run every faulty run is compared with."""
    out = tmp_path_factory.mktemp("rel-ref") / "run"
    summary = embed([corpus / "*.tar"], out)
    assert summary.exit_code == 0 and summary.images == SHARDS * PER_SHARD
    rows = run_rows(out)
    assert len({r[1] for r in rows.values()}) == 3, "the routing should use every exit"
    return rows


def ray_address(ray) -> str:
    return ray.get_runtime_context().gcs_address


def session_raylet_pid(ray) -> int:
    """Return the PID of this session's raylet: its worker processes are its children, nobody else's."""
    node = ray._private.worker._global_node
    return node.all_processes["raylet"][0].process.pid


def own_workers(ray, title: str) -> list:
    """Return this Ray session's worker processes whose title starts with ``title`` (e.g. 'ray::shard_task')."""
    import psutil

    raylet = session_raylet_pid(ray)
    found = []
    for proc in psutil.Process(raylet).children(recursive=True):
        try:
            cmd = proc.cmdline()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if cmd and cmd[0].startswith(title):
            found.append(proc)
    return found


# ----------------------------------------------------------------------------------------------- 1. node loss

NODE_LOSS_DRIVER = r'''
import json, os, sys, threading, time
sys.path[:0] = [sys.argv[1]]
args = json.loads(sys.argv[2])
import ray
import psutil
from ray.cluster_utils import Cluster
from pipeline.embed.config import EmbedConfig
from pipeline.model.spec import ModelSpec
from pipeline.embed.execution import run_embed

events = []
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})  # the head runs only the driver
workers = [cluster.add_node(num_cpus=1) for _ in range(3)]
cluster.wait_for_nodes()
ray.init(address=cluster.address)
t0 = time.monotonic()

def committed():
    # Shards in place, not manifest rows: the driver rewrites the manifest only every few seconds.
    import glob
    return len(glob.glob(os.path.join(args["output"], "shards", "part-*.parquet")))

def node_of_pid(pid):
    """The worker node whose raylet is an ancestor of process ``pid``."""
    ancestors = {p.pid for p in psutil.Process(pid).parents()}
    for n in list(cluster.worker_nodes):
        if n.all_processes["raylet"][0].process.pid in ancestors:
            return n

def wait_commits(n, deadline=400):
    while committed() < n:
        assert time.monotonic() - t0 < deadline, "no progress"
        time.sleep(0.05)

def chaos():
    try:
        # 1: after the first commit, kill the node that hosts the model actor (no graceful shutdown).
        wait_commits(1)
        actor = next(a for a in ray._private.state.actors().values()
                     if a["State"] == "ALIVE" and a.get("ActorClassName") == "ModelActor")
        victim = next(n for n in cluster.worker_nodes if n.node_id == actor["Address"]["NodeID"])
        cluster.remove_node(victim, allow_graceful=False)
        events.append({"killed": "model actor node", "at_commit": committed(), "t": round(time.monotonic() - t0, 1)})
        # 2: after the next commit, kill the node running a shard task, then add a fresh node (an autoscaler
        # replacing a preempted machine).
        wait_commits(events[0]["at_commit"] + 1)
        victim = None
        while victim is None:
            tasks = [p for p in psutil.process_iter(["cmdline"])
                     if (p.info["cmdline"] or [""])[0].startswith("ray::shard_task")]
            for p in tasks:
                try:
                    victim = node_of_pid(p.pid)
                except psutil.NoSuchProcess:
                    continue
                if victim is not None:
                    break
            assert time.monotonic() - t0 < 400, "no shard task found"
            time.sleep(0.02)
        at = committed()
        cluster.remove_node(victim, allow_graceful=False)
        events.append({"killed": "shard task node", "at_commit": at, "t": round(time.monotonic() - t0, 1)})
        cluster.add_node(num_cpus=1)
        events.append({"added": "replacement node", "t": round(time.monotonic() - t0, 1)})
    except Exception as e:  # reported in the result; the test fails on it
        events.append({"error": f"{type(e).__name__}: {e}"})

spec = ModelSpec(**args["model"])
cfg = EmbedConfig(inputs=args["inputs"], output=args["output"], spec=spec, batch_size=4, progress=False,
                  decode_tasks=1, address=cluster.address)
outcome = {}

def embed():
    try:
        outcome["summary"] = run_embed(cfg)
    except BaseException as e:
        outcome["error"] = f"{type(e).__name__}: {e}"

# The job runs in a thread; the faults come from the main thread (Cluster.add_node installs signal handlers).
job = threading.Thread(target=embed, daemon=True)
job.start()
chaos()
job.join(timeout=400)
summary = outcome.get("summary")
result = {"exit_code": summary.exit_code if summary else None, "images": summary.images if summary else 0,
          "failed": summary.shards_failed if summary else [], "error": outcome.get("error"),
          "alive": job.is_alive(), "events": events, "seconds": round(time.monotonic() - t0, 1)}

# Phase 2: a distributed `icar index` over the same cluster (back to 3 worker nodes); kill the node running
# one of its tasks (sampling or adding), then add a replacement.
from pipeline.index.build import IndexConfig, build_index

cluster.add_node(num_cpus=1)
index_events = []
icfg = IndexConfig(runs=args["index"]["runs"], output=args["index"]["output"], factory=args["index"]["factory"],
                   workers=3, address=cluster.address, threads=1, text_queries=False, queries=200, progress=False)
index_outcome = {}

def index():
    try:
        index_outcome["info"] = build_index(icfg).info
    except BaseException as e:
        index_outcome["error"] = f"{type(e).__name__}: {e}"

t1 = time.monotonic()
job = threading.Thread(target=index, daemon=True)
job.start()
victim = None
while victim is None and job.is_alive():
    for p in psutil.process_iter(["cmdline"]):
        title = (p.info["cmdline"] or [""])[0]
        if title.startswith(("ray::add_group", "ray::read_sample_group")):
            try:
                victim = node_of_pid(p.pid)
            except psutil.NoSuchProcess:
                continue
            if victim is not None:
                cluster.remove_node(victim, allow_graceful=False)
                index_events.append({"killed": f"node running {title}", "t": round(time.monotonic() - t1, 1)})
                cluster.add_node(num_cpus=1)
                break
    time.sleep(0.01)
job.join(timeout=300)
result["index"] = {"error": index_outcome.get("error"), "alive": job.is_alive(), "events": index_events,
                   "ntotal": (index_outcome.get("info") or {}).get("ntotal"),
                   "seconds": round(time.monotonic() - t1, 1)}
ray.shutdown()
cluster.shutdown()
print("RESULT " + json.dumps(result))
'''


@pytest.mark.slow
def test_node_loss_mid_embed_and_mid_index_loses_and_duplicates_nothing(corpus, reference, index_runs,
                                                                        index_reference, tmp_path):
    """On a 3-node cluster, kill the model actor's node, then a shard task's node, in the middle of `icar embed`;
    then kill the node running a task of a distributed `icar index`. Both results equal undisturbed runs."""
    out = tmp_path / "run"
    idx = tmp_path / "index"
    args = {"inputs": [str(corpus / "*.tar")], "output": str(out), "model": MODEL,
            "index": {"runs": index_runs, "output": str(idx), "factory": INDEX_FACTORY}}
    # A private Ray temp dir: the Cluster's sockets, logs and address file never touch the machine's /tmp/ray.
    ray_tmp = Path(f"/tmp/icar-nl-{os.getpid()}")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=str(ray_tmp), RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               # Declare a killed node dead after ~3 s instead of Ray's default ~15 s of missed health checks.
               RAY_health_check_period_ms="1000", RAY_health_check_failure_threshold="3")
    proc = subprocess.Popen([sys.executable, "-c", NODE_LOSS_DRIVER, str(REPO), json.dumps(args)], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=420)
    except subprocess.TimeoutExpired:
        proc.terminate()  # the driver's Cluster takes its nodes down with it
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        subprocess.run(["rm", "-rf", str(ray_tmp)])
    lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, stdout[-3000:] + stderr[-5000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert not result["error"] and not result["alive"], result
    assert not [e for e in result["events"] if "error" in e], result
    kills = [e for e in result["events"] if "killed" in e]
    assert len(kills) == 2, result
    assert all(e["at_commit"] < SHARDS for e in kills), f"a node died after the work was done: {result}"
    assert result["exit_code"] == 0 and not result["failed"], result
    check_visible_files(out)
    assert_same_rows(run_rows(out), reference)
    record("node-loss-embed", nodes_killed=len(kills), runs=1, survived=1, rows=len(reference), rows_lost=0,
           duplicates=0, seconds=result["seconds"])
    ix = result["index"]
    assert not ix["error"] and not ix["alive"], ix
    assert len(ix["events"]) == 1, f"no index task was caught running: {ix}"
    assert_same_index(idx, index_reference)
    record("node-loss-index", nodes_killed=1, runs=1, survived=1, vectors=ix["ntotal"], vectors_lost=0,
           seconds=ix["seconds"])


# ----------------------------------------------------------------------------------------------- 2. crash + resume


@pytest.mark.slow
def test_sigkilled_driver_resumes_to_the_undisturbed_result(corpus, reference, tmp_path, ray_session):
    """SIGKILL `python -m jobs.embed` at seeded random points, many times; every re-run converges."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "jobs.embed", str(corpus / "*.tar"), "--output", str(out), *CLI_MODEL,
           "--address", ray_address(ray_session), "--decode-tasks", "1"]
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    rng = random.Random(20261125)
    kills, orphans, hidden = [], 0, 0
    for i in range(4):
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        start = committed = _committed(out)
        if i % 2 == 0:  # anywhere from start-up to mid-run (start-up, actor start, resume, commits)
            # Within 4 s: on a quiet machine the whole 6-shard run ends in ~8 s, and a kill point after its end
            # lands nowhere (start-up, Ray connection, actor start and the first commits all fall inside).
            trigger, delay = "time", rng.uniform(1.0, 4.0)
            t_end = time.monotonic() + delay
            while time.monotonic() < t_end and proc.poll() is None:
                time.sleep(0.02)
        else:  # shortly after a commit: between shard write, manifest write and the next shard
            trigger, delay = "commit", rng.uniform(0.0, 1.5)
            deadline = time.monotonic() + 240
            while _committed(out) == start and proc.poll() is None:
                assert time.monotonic() < deadline, "no commit in time"
                time.sleep(0.02)
            time.sleep(delay)
        if proc.poll() is not None:  # finished before the kill point: nothing more to interrupt
            assert proc.returncode == 0, proc.stdout.read().decode()[-3000:]
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
        committed = _committed(out)
        seen = check_visible_files(out)
        orphans += seen["orphans"]
        hidden = max(hidden, seen["hidden_tmp"])
        kills.append({"trigger": trigger, "delay": round(delay, 2), "committed": committed})
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "lock" not in check_visible_files(out), "the finished run must release the output's lock"
    assert_same_rows(run_rows(out), reference)
    assert len(kills) >= 3, f"too few kills landed before the run finished: {kills}"
    assert any(k["committed"] > 0 for k in kills) and any(k["committed"] < SHARDS for k in kills), kills
    record("driver-sigkill", kills=len(kills), runs=len(kills) + 1, survived=len(kills) + 1, rows=len(reference),
           rows_lost=0, duplicates=0, orphans_redone=orphans, max_hidden_tmp=hidden,
           commits_at_kills=[k["committed"] for k in kills])


def _committed(run: Path) -> int:
    try:
        return pq.read_metadata(run / "manifest.parquet").num_rows
    except (FileNotFoundError, OSError, pa.ArrowInvalid):
        return 0


# ----------------------------------------------------------------------------------------------- index under faults

INDEX_N, INDEX_DIM, INDEX_SHARDS, INDEX_FACTORY = 30000, 32, 8, "IVF64,PQ8"


def synthetic_run(run: Path, n: int, dim: int, shards: int, seed: int, prefix: str = "k") -> str:
    """Write a run directory holding ``n`` random unit vectors in contract-schema shards; return its path.

    Real `icar embed` output at this size would take minutes on 2 cores; the index only reads the files.
    """
    from pipeline.io import storage
    from pipeline.io.schema import MANIFEST, MANIFEST_SCHEMA, RUN_JSON, part_name, shard_schema

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)
    bounds = np.linspace(0, n, shards + 1).astype(int)
    manifest = []
    for part in range(shards):
        lo, hi = int(bounds[part]), int(bounds[part + 1])
        m = hi - lo
        table = pa.Table.from_arrays([
            pa.array([f"{prefix}{i:07d}" for i in range(lo, hi)], pa.string()),
            pa.array([f"in/{part}.tar"] * m, pa.string()),
            pa.nulls(m, pa.string()), pa.nulls(m, pa.string()),
            pa.array(np.full(m, 64, np.int32)), pa.array(np.full(m, 64, np.int32)),
            pa.array(np.full(m, 0.5, np.float32)), pa.array(np.full(m, 12, np.int16)),
            pa.array(np.full(m, 4.5, np.float32)),
            pa.FixedSizeListArray.from_arrays(pa.array(x[lo:hi].reshape(-1), pa.float16()), dim)],
            schema=shard_schema(dim))
        storage.write_parquet(table, str(run / "shards" / part_name(part)))
        manifest.append({"source": f"in/{part}.tar", "output": f"shards/{part_name(part)}", "part": part, "rows": m,
                         "errors": 0, "gflops": 4.5 * m, "scorer_gflops": 0.0, "seconds": 1.0, "model_seconds": 1.0,
                         "source_size": None, "source_mtime": None, "source_etag": None, "exit_counts": "{}",
                         "complexity_mean": None, "complexity_p10": None, "complexity_p50": None,
                         "complexity_p90": None, "committed_at": "2026-01-01T00:00:00+00:00"})
    storage.write_parquet(pa.Table.from_pylist(manifest, schema=MANIFEST_SCHEMA), str(run / MANIFEST))
    model = {"name": "reliability-fake", "pretrained": None, "weights_sha256": "f" * 64, "embed_dim": dim,
             "image_size": 32, "num_blocks": 12}
    storage.write_json({"model": model, "exits": [12], "heads": None}, str(run / RUN_JSON))
    return str(run)


@pytest.fixture(scope="module")
def index_runs(tmp_path_factory) -> list[str]:
    return [synthetic_run(tmp_path_factory.mktemp("idx-run") / "run", INDEX_N, INDEX_DIM, INDEX_SHARDS, seed=4)]


def index_config(runs, output, **kw):
    from pipeline.index.build import IndexConfig

    kw = {"factory": INDEX_FACTORY, "workers": 1, "threads": 1, "text_queries": False, "queries": 200,
          "progress": False, **kw}
    return IndexConfig(runs=list(runs), output=str(output), **kw)


@pytest.fixture(scope="module")
def index_reference(index_runs, tmp_path_factory) -> Path:
    """The undisturbed index (one worker, no Ray): every faulty build must give these exact bytes."""
    from pipeline.index.build import build_index

    out = tmp_path_factory.mktemp("idx-ref") / "index"
    build_index(index_config(index_runs, out))
    return out


def assert_same_index(got: Path, want: Path) -> None:
    """The index directory ``got`` is complete and holds exactly the index and ids of ``want``."""
    import faiss

    info = json.loads((got / "index.json").read_text())
    a, b = faiss.read_index(str(got / "index.faiss")), faiss.read_index(str(want / "index.faiss"))
    assert a.ntotal == b.ntotal == info["ntotal"]
    assert np.array_equal(faiss.serialize_index(a), faiss.serialize_index(b)), "the index differs"
    assert pq.read_table(got / "ids.parquet").equals(pq.read_table(want / "ids.parquet")), "the ids differ"


def check_index_dir(idx: Path) -> dict:
    """Assert that what is visible in an index directory is whole and consistent; return what was found.

    index.faiss and ids.parquet, where present, read completely; when index.json is present (the index is
    complete), its vector count is that of index.faiss and of ids.parquet.
    """
    import faiss

    found = {"complete": False, "build_dirs": 0}
    if not idx.exists():
        return found
    ntotal = rows = None
    if (idx / "index.faiss").exists():
        ntotal = faiss.read_index(str(idx / "index.faiss")).ntotal
    if (idx / "ids.parquet").exists():
        rows = pq.read_table(idx / "ids.parquet").num_rows
    if (idx / "index.json").exists():
        info = json.loads((idx / "index.json").read_text())
        assert ntotal == info["ntotal"] == rows, f"index.json says {info['ntotal']}, index.faiss {ntotal}, ids {rows}"
        found["complete"] = True
    if (idx / "_build").exists():
        found["build_dirs"] = sum(1 for _ in (idx / "_build").iterdir())
    return found


@pytest.mark.slow
def test_sigkilled_index_driver_converges_to_the_undisturbed_index(index_runs, index_reference, tmp_path,
                                                                   ray_session):
    """SIGKILL `python -m jobs.index` (add tasks on the session's Ray) at seeded random points; re-run until done."""
    idx = tmp_path / "index"
    cmd = [sys.executable, "-m", "jobs.index", *index_runs, "--output", str(idx), "--factory", INDEX_FACTORY,
           "--add-tasks", "2", "--threads", "1", "--no-text-queries", "--queries", "200", "--no-progress",
           "--address", ray_address(ray_session)]
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    rng = random.Random(9)
    kills, leaked = [], 0
    # Kill points: at a random time (start-up, sampling, training), while partial indexes are being written
    # (add), and right after ids.parquet appears (merge done: tune, index.faiss, index.json).
    triggers = ["time", "partials", "ids"]
    for trigger in triggers:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        delay = rng.uniform(2.0, 9.0) if trigger == "time" else rng.uniform(0.0, 1.0)
        deadline = time.monotonic() + 240
        if trigger == "time":
            ready = lambda: True  # noqa: E731
        elif trigger == "partials":
            ready = lambda: any(p.is_file() for p in (idx / "_build").rglob("*"))  # noqa: E731
        else:
            ready = lambda: (idx / "ids.parquet").exists()  # noqa: E731
        while not ready() and proc.poll() is None:
            assert time.monotonic() < deadline, f"no {trigger} in time"
            time.sleep(0.01)
        t_end = time.monotonic() + delay
        while time.monotonic() < t_end and proc.poll() is None:
            time.sleep(0.01)
        if proc.poll() is not None:
            assert proc.returncode == 0, proc.stdout.read().decode()[-3000:]
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
        seen = check_index_dir(idx)
        leaked = max(leaked, seen["build_dirs"])
        kills.append({"trigger": trigger, "delay": round(delay, 2), "complete": seen["complete"]})
        if seen["complete"]:
            break
        if trigger == "ids":  # the next kill must not find ids.parquet of this attempt and fire at once
            (idx / "ids.parquet").unlink()
    if not (idx / "index.json").exists():
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    check_index_dir(idx)
    assert_same_index(idx, index_reference)
    assert len(kills) >= 2, kills
    record("index-driver-sigkill", kills=len(kills), runs=len(kills) + 1, survived=len(kills) + 1,
           vectors=INDEX_N, vectors_lost=0, max_build_dirs_left=leaked,
           build_dirs_after_success=check_index_dir(idx)["build_dirs"], kill_points=[k["trigger"] for k in kills])


@pytest.mark.slow
def test_overwrite_killed_midway_never_shows_a_mismatched_index_nor_leaks_partials(index_runs, tmp_path):
    """`icar index --overwrite` over a complete index, SIGKILLed while writing partial indexes and then right after
    it replaced ids.parquet: the directory must never pair the old index.json with new ids (a searcher would name
    wrong images), and the build that finally completes must leave no partials of the killed ones behind."""
    from pipeline.index.build import build_index

    idx = tmp_path / "index"
    small = synthetic_run(tmp_path / "small", 3000, INDEX_DIM, 2, seed=5, prefix="other-")
    build_index(index_config([small], idx))
    cmd = [sys.executable, "-m", "jobs.index", *index_runs, "--output", str(idx), "--overwrite", "--factory",
           INDEX_FACTORY, "--add-tasks", "1", "--threads", "1", "--no-text-queries", "--queries", "200", "--no-progress"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    ids_before = (idx / "ids.parquet").stat().st_mtime_ns
    for ready in (lambda: any(p.is_file() for p in (idx / "_build").rglob("*")),
                  lambda: (idx / "ids.parquet").stat().st_mtime_ns != ids_before):
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 240
        while not ready() and proc.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
        check_index_dir(idx)
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert check_index_dir(idx) == {"complete": True, "build_dirs": 0}
    record("index-overwrite-sigkill", kills=2, runs=3, survived=3, mismatched_index_seen=0, partials_left=0)


# ----------------------------------------------------------------------------------------------- reindex under faults

REINDEX_MODEL = {"name": "demo", "scorer": "heuristic", "full_depth": True}


def reindex_job(root: Path, inputs: Path, address: str | None) -> dict:
    """Return a scheduled-reindex job config (see jobs/examples/) for this test's corpus."""
    return {"name": "reliability", "inputs": [str(inputs / "*.tar")], "root": str(root),
            "model": dict(REINDEX_MODEL), "embed": {"batch_size": 8},
            "ray": {"index_workers": 1, "address": address}, "index": {"text_queries": False},
            "retention": {"keep_versions": 2}}


def check_latest(root: Path) -> str | None:
    """Assert that LATEST, when present, names a complete index whose parts agree; return the version path."""
    import faiss

    from pipeline.reindex.root import read_latest, resolve_latest

    if read_latest(str(root)) is None:
        return None
    path = Path(resolve_latest(str(root)))
    info = json.loads((path / "index.json").read_text())
    ntotal = faiss.read_index(str(path / "index.faiss")).ntotal
    rows = pq.read_metadata(path / "ids.parquet").num_rows
    assert ntotal == info["ntotal"] == rows, f"{path}: index.json {info['ntotal']}, index.faiss {ntotal}, ids {rows}"
    return str(path)


@pytest.mark.slow
def test_sigkilled_reindex_converges_and_latest_is_never_partial(tmp_path, ray_session):
    """SIGKILL `python -m jobs.reindex` right after an embed commit and after a version is written; every
    kill leaves LATEST absent or complete, the dead run's lock is taken over, and the last run publishes the
    index an undisturbed reindex publishes."""
    import faiss
    import yaml

    from pipeline.reindex.jobconfig import parse_job_config
    from pipeline.reindex.errors import EXIT_OK
    from pipeline.reindex.root import resolve_latest
    from pipeline.reindex.run import run_reindex

    inputs = tmp_path / "in"
    inputs.mkdir()
    rng = np.random.default_rng(21)
    for s in range(3):
        write_tar_shard(inputs / f"{s:05d}.tar", make_corpus(rng, 6, exts=("jpg",), prefix=f"r{s}-", max_side=64))
    address = ray_address(ray_session)
    ref_root = tmp_path / "ref"
    ref = run_reindex(parse_job_config(reindex_job(ref_root, inputs, address)))
    assert ref.exit_code == EXIT_OK, ref.record.get("error")

    root = tmp_path / "root"
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(reindex_job(root, inputs, address)))
    cmd = [sys.executable, "-m", "jobs.reindex", "--config", str(config)]
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    rng_kill = random.Random(3)
    kills = []
    for trigger in ("commit", "version"):
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        delay = rng_kill.uniform(0.0, 0.5)
        deadline = time.monotonic() + 300
        ready = {"commit": lambda: any(root.glob("generations/*/run/manifest.parquet")),
                 "version": lambda: any(p.is_dir() for p in root.glob("indexes/v*"))}[trigger]
        while not ready() and proc.poll() is None:
            assert time.monotonic() < deadline, f"no {trigger} in time"
            time.sleep(0.01)
        t_end = time.monotonic() + delay
        while time.monotonic() < t_end and proc.poll() is None:
            time.sleep(0.01)
        if proc.poll() is not None:
            out = proc.stdout.read().decode()
            assert proc.returncode == EXIT_OK, out[-3000:]
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
        latest = check_latest(root)
        for run in root.glob("generations/*/run"):
            check_visible_files(run)
        kills.append({"trigger": trigger, "delay": round(delay, 2), "latest": latest is not None})
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == EXIT_OK, done.stdout[-3000:] + done.stderr[-3000:]
    got, want = Path(resolve_latest(str(root))), Path(resolve_latest(str(ref_root)))
    check_latest(root)
    keys = lambda p: sorted(pq.read_table(p / "ids.parquet", columns=["key"]).column("key").to_pylist())  # noqa
    assert keys(got) == keys(want) and len(keys(got)) == 18 and len(set(keys(got))) == 18
    a, b = faiss.read_index(str(got / "index.faiss")), faiss.read_index(str(want / "index.faiss"))
    assert np.array_equal(faiss.serialize_index(a), faiss.serialize_index(b)), "the published index differs"
    assert not (root / "reindex.lock").exists()
    assert len(kills) >= 2, kills
    record("reindex-driver-sigkill", kills=len(kills), runs=len(kills) + 1, survived=len(kills) + 1, rows=18,
           rows_lost=0, duplicates=0, kill_points=[k["trigger"] for k in kills])


# ----------------------------------------------------------------------------------------------- 3. killed workers


def _kill_once(ray, title: str, after: Path | None, log: list, stop: threading.Event,
               or_once_committed: tuple[str, Path] | None = None) -> None:
    """SIGKILL the first of this session's workers titled ``title`` (after ``after`` exists), like the OOM killer.

    ``or_once_committed=(prefix, run)``: if no ``title`` process was caught by the time ``run`` holds a committed
    part, kill the first ``prefix`` process in whatever state it is (a tiny model's calls can be shorter than the
    poll, and the run must not end with nothing killed)."""
    while not stop.is_set():
        if after is None or after.exists():
            procs = own_workers(ray, title)
            if not procs and or_once_committed is not None:
                prefix, run = or_once_committed
                if any(not p.name.startswith(".") for p in run.glob("*/part-*.parquet")):
                    procs = own_workers(ray, prefix)
            if procs:
                procs[0].send_signal(signal.SIGKILL)
                log.append(title)
                return
        time.sleep(0.005)


@pytest.mark.slow
def test_killed_workers_are_retried_or_reported(corpus, reference, tmp_path, ray_session):
    """Kill the model actor's process and a shard task's worker process (what the OOM killer does) in one run with
    no shard retries: the actor restarts and its batches are re-sent, so every other shard equals the undisturbed
    run; the killed shard is reported (summary, errors/, exit 1), never lost silently. (A killed task with retries
    left is redone: see the node-loss test.)"""
    out = tmp_path / "run"
    killed: list = []
    stop = threading.Event()
    threads = [threading.Thread(target=_kill_once, args=(ray_session, title, None, killed, stop, fallback),
                                daemon=True)
               for title, fallback in (("ray::ModelActor.embed", ("ray::ModelActor", out)), ("ray::shard_task", None))]
    for th in threads:
        th.start()
    summary = embed([corpus / "*.tar"], out, shard_retries=0)
    stop.set()
    assert sorted(killed) == ["ray::ModelActor.embed", "ray::shard_task"], killed
    assert summary.exit_code == 1 and len(summary.shards_failed) == 1, summary.shards_failed
    source, message = summary.shards_failed[0]
    assert "Worker" in message or "worker" in message, message  # names the cause: the worker process died
    failure = pq.read_table(out / "errors" / f"part-{int(Path(source).stem):05d}.parquet").to_pylist()
    assert failure[0]["stage"] == "shard" and failure[0]["source"] == source
    assert summary.shards_committed == SHARDS - 1
    check_visible_files(out)
    rows = run_rows(out)
    expected = {k: v for k, v in reference.items() if v[0] != source}
    assert_same_rows(rows, expected)
    record("worker-kill", workers_killed=len(killed), runs=1, shards_reported=1, rows_lost_silently=0,
           duplicates=0)


# ----------------------------------------------------------------------------------------------- 4. bad inputs


@pytest.fixture(scope="module")
def zoo_run(tmp_path_factory, ray_session):
    """`icar embed` over every bad input at once: the zoo as a tar and as Parquet, a truncated tar, a Parquet file
    without an image column, non-UTF-8 captions, hostile keys and a key in two shards. Returns what happened."""
    from jobs.embed import main

    root = tmp_path_factory.mktemp("zoo")
    inputs = root / "in"
    inputs.mkdir()
    rng = np.random.default_rng(5)
    good = encode(make_photo_like(rng, 64, 48), "jpg")
    extra = [
        ShardSample("zoo-non-utf8", good, "jpg", caption=NON_UTF8_CAPTION),
        ShardSample("../../../escape-tar", good, "jpg", caption="a key that looks like a path"),
        ShardSample("zoo-duplicate", good, "jpg", caption="the same key in two input shards"),
    ]
    write_tar_shard(inputs / "a-zoo.tar", zoo_samples() + extra)
    write_parquet_shard(inputs / "b-zoo.parquet", zoo_samples("pq-") + [
        ShardSample("/etc/escape-parquet", good, "jpg"), ShardSample("..\\..\\escape-win", good, "jpg"),
        ShardSample("zoo-duplicate", good, "jpg")])
    truncated_keys = truncated_tar(inputs / "c-truncated.tar")
    parquet_without_image_column(inputs / "d-no-image-column.parquet")
    run = root / "deep" / "er" / "run"
    import contextlib
    import io

    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        rc = main([str(inputs / "*"), "--output", str(run), *CLI_MODEL, "--decode-tasks", "1",
                   "--shard-retries", "1"])
    return {"root": root, "inputs": inputs, "run": run, "rc": rc, "stderr": err.getvalue(), "stdout": out.getvalue(),
            "truncated_keys": truncated_keys}


def test_zoo_every_case_embeds_or_yields_its_error_row(zoo_run):
    run = zoo_run["run"]
    manifest = pq.read_table(run / "manifest.parquet").to_pylist()
    by_source = {Path(r["source"]).name: r for r in manifest}
    assert sorted(by_source) == ["a-zoo.tar", "b-zoo.parquet"]
    rows = {r["key"]: r for p in by_source.values() for r in pq.read_table(run / p["output"]).to_pylist()}
    errors = {}
    for p in by_source.values():
        for e in pq.read_table(run / "errors" / Path(p["output"]).name).to_pylist():
            errors[e["key"]] = e
    tried = 0
    for prefix in ("zoo-", "pq-"):
        for name, case in zoo_cases().items():
            key = prefix + name
            tried += 1
            if case.embeds:
                assert key in rows, f"{key} should embed; error: {errors.get(key)}"
                assert (rows[key]["width"], rows[key]["height"]) == case.size, key
                assert key not in errors
            else:
                assert key not in rows, f"{key} should not embed"
                assert errors[key]["stage"] == "decode", errors[key]
                assert case.error_contains in errors[key]["error"], (key, errors[key]["error"])
    assert rows["zoo-non-utf8"]["caption"] == NON_UTF8_CAPTION_DECODED
    # Manifest counts agree with the files.
    for p in by_source.values():
        assert p["rows"] == pq.read_metadata(run / p["output"]).num_rows
    # Samples: every zoo case as a tar member and as a Parquet row, plus 3 extra in each (a non-UTF-8 caption,
    # hostile keys, a key in both); shards: those two, a truncated tar, a Parquet file without an image column.
    embedded = sum(p["rows"] for p in by_source.values())
    record("bad-input-zoo", samples_tried=tried + 6, shards_tried=4, cases=len(zoo_cases()), layouts=2,
           embedded=embedded, error_rows=len(errors), shard_failures=2, wrong_outcomes=0)


def test_zoo_broken_shards_are_reported_and_the_job_exits_nonzero(zoo_run):
    run, err = zoo_run["run"], zoo_run["stderr"]
    # 1: shards failed (3 when the cost report also refuses; see test_faults_s3 for that patch).
    assert zoo_run["rc"] == 1, err[-3000:]
    failed = dict(re.findall(r"^FAILED (\S+): (.*)$", err, flags=re.M))
    names = {Path(k).name: v for k, v in failed.items()}
    assert sorted(names) == ["c-truncated.tar", "d-no-image-column.parquet"], err[-3000:]
    assert "truncated" in names["c-truncated.tar"]
    assert "--image-column" in names["d-no-image-column.parquet"]
    assert re.search(r"icar embed: \d+ images, \d+ errors, 2 shards committed \(0 already done, 2 failed\)",
                     zoo_run["stdout"]), zoo_run["stdout"][-2000:]
    run_json = json.loads((run / "run.json").read_text())
    assert run_json["invocations"][-1]["shards_failed"] == 2
    for name, part in (("c-truncated.tar", 2), ("d-no-image-column.parquet", 3)):
        failure = pq.read_table(run / "errors" / f"part-{part:05d}.parquet").to_pylist()
        assert len(failure) == 1 and failure[0]["stage"] == "shard" and failure[0]["key"] is None
        assert Path(failure[0]["source"]).name == name


def test_duplicate_keys_across_shards_are_reported(zoo_run):
    """A key in two input shards (zoo-duplicate: in the tar and in the Parquet file) is reported: the later one is
    listed in RUN/duplicates.parquet naming the shard that committed it first, and the summary line says so."""
    dups = pq.read_table(zoo_run["run"] / "duplicates.parquet").to_pylist()
    assert [d["key"] for d in dups] == ["zoo-duplicate"]
    assert dups[0]["stage"] == "dedup" and dups[0]["source"].endswith("b-zoo.parquet")
    assert "a-zoo.tar" in dups[0]["error"]
    assert "1 duplicate keys across shards" in zoo_run["stdout"]
    record("duplicate-keys", keys_in_two_shards=1, reported=1)


# ----------------------------------------------------------------------------------------------- 5. resources


@pytest.fixture()
def tiny_disk(tmp_path):
    """A 48 KiB tmpfs: room for run.json and a shard or two, then ENOSPC (needs root; skipped otherwise)."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); the disk-full test needs root")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.slow
def test_disk_full_is_reported_and_the_run_resumes(corpus, reference, tiny_disk, tmp_path, ray_session):
    import shutil

    from jobs.embed import main

    run = tiny_disk / "run"
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main([str(corpus / "*.tar"), "--output", str(run), *CLI_MODEL, "--decode-tasks", "1",
                   "--shard-retries", "0"])
    message = err.getvalue()
    assert rc == 1, message[-2000:]  # a full disk: exit 1 with a message (committed work is kept), no traceback
    assert "Traceback" not in message, message[-3000:]
    assert "no space left" in message.lower(), message[-2000:]
    assert "re-run the same command" in message, message[-2000:]
    seen = check_visible_files(run)
    committed = _committed(run)
    assert committed < SHARDS
    # Free space (move the run to a roomy disk) and resume: the result is the undisturbed one.
    roomy = tmp_path / "moved"
    shutil.copytree(run, roomy, ignore=shutil.ignore_patterns(".*"))
    summary = embed([corpus / "*.tar"], roomy)
    assert summary.exit_code == 0 and summary.shards_skipped == committed
    assert_same_rows(run_rows(roomy), reference)
    record("disk-full", faults=1, reported=1, committed_before=committed, parquet_visible=seen["parquet"],
           rows_lost=0)


# ----------------------------------------------------------------------------------------------- 6. security

# Calls that deserialise with pickle (arbitrary code execution on untrusted bytes).
_PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}


def unsafe_loads(source: str, filename: str = "<src>") -> list[str]:
    """Return 'file:line: call' for every unsafe deserialisation in ``source``.

    Unsafe: pickle-family load/loads/Unpickler, torch.load without weights_only=True, numpy load with
    allow_pickle=True, yaml.load without a safe Loader, pandas read_pickle.
    """
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = ast.unparse(func)
        kw = {k.arg: k.value for k in node.keywords}
        base = name.split(".")[0]
        last = name.split(".")[-1]
        bad = False
        if base in _PICKLE_MODULES and last in ("load", "loads", "Unpickler", "open"):
            bad = True
        elif name in ("torch.load",) or (last == "load" and base == "torch"):
            v = kw.get("weights_only")
            bad = not (isinstance(v, ast.Constant) and v.value is True)
        elif name in ("np.load", "numpy.load"):
            v = kw.get("allow_pickle")
            bad = isinstance(v, ast.Constant) and v.value is True
        elif name == "yaml.load" or name == "yaml.load_all":
            loader = ast.unparse(kw["Loader"]) if "Loader" in kw else ""
            bad = "Safe" not in loader
        elif last == "read_pickle":
            bad = True
        if bad:
            found.append(f"{filename}:{node.lineno}: {ast.unparse(node)[:120]}")
    return found


def test_the_unsafe_load_scanner_catches_what_it_should():
    bad = "import torch, pickle, yaml, numpy as np\n" \
          "torch.load(p)\ntorch.load(p, weights_only=False)\npickle.loads(b)\nnp.load(f, allow_pickle=True)\n" \
          "yaml.load(s)\nimport pandas as pd\npd.read_pickle(p)\n"
    assert len(unsafe_loads(bad)) == 6
    good = "import torch, yaml, numpy as np\ntorch.load(p, weights_only=True, map_location='cpu')\nnp.load(f)\n" \
           "yaml.load(s, Loader=yaml.SafeLoader)\nyaml.safe_load(s)\n"
    assert unsafe_loads(good) == []


def test_no_pickle_of_untrusted_data_anywhere():
    """Checkpoints load through safetensors or torch.load(weights_only=True); nothing unpickles input data."""
    files = [p for d in ("pipeline", "jobs", "bench", "infra") for p in (REPO / d).rglob("*.py")
             if not any(part.startswith(".") or part == "site-packages" for part in p.relative_to(REPO).parts)]
    assert len(files) > 10
    problems = [hit for p in files for hit in unsafe_loads(p.read_text(), str(p.relative_to(REPO)))]
    assert not problems, "unsafe deserialisation:\n" + "\n".join(problems)


def test_keys_never_become_paths(zoo_run):
    """Keys like ../../../x, /etc/x or ..\\x are data: stored verbatim, never used to name a file."""
    root, run = zoo_run["root"], zoo_run["run"]
    allowed = {run, zoo_run["inputs"]}
    for p in root.rglob("*"):
        if p.is_file():
            assert any(a in p.parents for a in allowed), f"a file appeared outside the run directory: {p}"
    names = {p.name for p in run.rglob("*") if p.is_file() and not p.name.startswith(".")}
    allowed_names = r"part-\d{5}\.parquet|manifest\.parquet|duplicates\.parquet|run\.json"
    assert all(re.fullmatch(allowed_names, n) for n in names), names
    manifest = pq.read_table(run / "manifest.parquet")
    keys = set()
    for out in manifest.column("output").to_pylist():
        keys |= set(pq.read_table(run / out, columns=["key"]).column("key").to_pylist())
    assert {"../../../escape-tar", "/etc/escape-parquet", "..\\..\\escape-win"} <= keys
