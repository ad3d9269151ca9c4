"""The driver's manifest is rewritten now and then, not after every commit, and stays crash-safe.

Real files in tmp_path throughout: the rows, the Parquet file and its rewrites are the production ones. The last
test runs `python -m jobs.embed` on the session's Ray and stops it with SIGTERM mid-run.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.io.schema import MANIFEST_SCHEMA, part_name
from pipeline.io.shards import FLUSH_ROWS, FLUSH_SECONDS, Manifest, ShardRows, commit_shard, flush_due

REPO = Path(__file__).resolve().parents[2]
DIM = 8


def row(part: int, source: str | None = None, rows: int = 3) -> dict:
    """Return a manifest row of committed shard ``part`` (values as `icar embed` writes them)."""
    return {"source": source or f"in/{part:05d}.tar", "output": f"shards/{part_name(part)}", "part": part,
            "rows": rows, "errors": 0, "gflops": 1.5 * rows, "scorer_gflops": 0.1 * rows, "seconds": 0.5,
            "model_seconds": 0.25, "source_size": 1000 + part, "source_mtime": str(1.7e9 + part),
            "source_etag": None, "exit_counts": json.dumps({"12": rows}), "complexity_mean": 0.5,
            "complexity_p10": 0.125, "complexity_p50": 0.5, "complexity_p90": 0.875,
            "committed_at": "2026-01-01T00:00:00+00:00"}


def on_file(run: Path) -> list[dict]:
    return pq.read_table(run / "manifest.parquet").to_pylist()


def test_defaults_throttle():
    """The constructor's defaults are the throttled ones, and nonsense settings are refused by name."""
    m = Manifest("/nonexistent-run-dir-for-defaults")
    assert (m.flush_seconds, m.flush_rows) == (FLUSH_SECONDS, FLUSH_ROWS) and FLUSH_SECONDS > 0 and FLUSH_ROWS > 1
    with pytest.raises(ValueError, match="flush_rows"):
        Manifest("/nonexistent-run-dir-for-defaults", flush_rows=0)
    with pytest.raises(ValueError, match="flush_seconds"):
        Manifest("/nonexistent-run-dir-for-defaults", flush_seconds=-1)


def test_flush_due_policy():
    assert not flush_due(0, None, 10.0, 100)  # nothing to write
    assert flush_due(1, None, 10.0, 100)  # the first commit of a process reaches the file at once
    assert not flush_due(99, 9.9, 10.0, 100)
    assert flush_due(100, 0.0, 10.0, 100)  # enough rows wait
    assert flush_due(1, 10.0, 10.0, 100)  # the interval has passed
    assert flush_due(1, 0.0, 0.0, 1)  # unthrottled: every change


def test_many_adds_within_the_interval_write_once_and_flush_writes_them_all(tmp_path):
    run = tmp_path / "run"
    m = Manifest(str(run), flush_seconds=3600, flush_rows=10_000)
    m.add(row(0))
    assert m.writes == 1 and len(on_file(run)) == 1  # the first commit is written at once
    stamp = (run / "manifest.parquet").stat().st_mtime_ns
    for part in range(1, 500):
        m.add(row(part))
    assert m.writes == 1 and m.pending == 499
    assert (run / "manifest.parquet").stat().st_mtime_ns == stamp and len(on_file(run)) == 1
    assert not m.flush_if_due()
    assert m.flush() and m.writes == 2 and m.pending == 0
    assert on_file(run) == m.rows and [r["part"] for r in on_file(run)] == list(range(500))
    assert not m.flush() and m.writes == 2  # nothing new: the file is left alone


def test_rows_and_seconds_trigger_a_write(tmp_path):
    by_rows = Manifest(str(tmp_path / "a"), flush_seconds=3600, flush_rows=50)
    for part in range(50):
        by_rows.add(row(part))
    assert by_rows.writes == 1 and len(on_file(tmp_path / "a")) == 1
    by_rows.add(row(50))  # the 50th change since the first write
    assert by_rows.writes == 2 and len(on_file(tmp_path / "a")) == 51

    by_time = Manifest(str(tmp_path / "b"), flush_seconds=0.3, flush_rows=10_000)
    by_time.add(row(0))
    by_time.add(row(1))
    assert by_time.writes == 1 and not by_time.flush_if_due()
    time.sleep(0.35)
    assert by_time.flush_if_due() and by_time.writes == 2 and len(on_file(tmp_path / "b")) == 2


def test_throttled_manifest_ends_equal_to_the_unthrottled_one(tmp_path):
    """Commits in the order parallel tasks finish them, one input re-embedded: same file as a write per commit."""
    order = list(range(300))
    random.Random(7).shuffle(order)
    commits = [row(p) for p in order]
    commits.insert(200, row(order[10], rows=5))  # --reembed-changed: the same input, the same part, new content
    files = {}
    for name, kw in {"every": dict(flush_seconds=0, flush_rows=1), "throttled": {}}.items():
        m = Manifest(str(tmp_path / name), **kw)
        for r in commits:
            m.add(r)
        m.flush()
        files[name] = pq.read_table(tmp_path / name / "manifest.parquet")
        if name == "every":
            assert m.writes == len(commits)
        else:
            assert m.writes == 3, "the first commit, the replacing row (written at once), the final flush"
    assert files["throttled"].schema.equals(MANIFEST_SCHEMA)
    assert files["throttled"].equals(files["every"])
    assert [r["part"] for r in files["throttled"].to_pylist()] == list(range(300))
    assert next(r for r in files["throttled"].to_pylist() if r["part"] == order[10])["rows"] == 5


def test_a_replacing_row_is_written_at_once(tmp_path):
    """A re-embedded input overwrote its shard in place: the file must not keep describing the old content."""
    m = Manifest(str(tmp_path), flush_seconds=3600, flush_rows=10_000)
    m.add(row(0))
    m.add(row(1))
    m.add(row(0, rows=7))
    assert m.writes == 2 and m.pending == 0
    assert [(r["part"], r["rows"]) for r in on_file(tmp_path)] == [(0, 7), (1, 3)]


def test_rows_added_then_the_process_dies_leave_the_previous_file(tmp_path):
    """A driver process killed between flushes (SIGKILL, no cleanup): the last written manifest is intact."""
    run = tmp_path / "run"
    script = textwrap.dedent(f"""
        import json, os, signal, sys
        sys.path.insert(0, {str(REPO)!r})
        from pipeline.io.shards import Manifest
        rows = json.loads(sys.stdin.read())
        m = Manifest({str(run)!r}, flush_seconds=3600, flush_rows=10_000)
        for r in rows[:20]:
            m.add(r)
        m.flush()
        for r in rows[20:]:
            m.add(r)
        assert m.writes == 2 and m.pending == 30, (m.writes, m.pending)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    rows = [row(p) for p in range(50)]
    done = subprocess.run([sys.executable, "-c", script], input=json.dumps(rows), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    assert on_file(run) == rows[:20]
    assert not [p for p in run.iterdir() if p.name != "manifest.parquet"], "no temporary file left behind"
    assert Manifest(str(run)).rows == rows[:20]
    # The same in this process: an object dropped without flush writes nothing on its way out.
    m = Manifest(str(run), flush_seconds=3600, flush_rows=10_000)
    m.add(row(50))  # the first commit of a process is written at once
    m.add(row(51))
    m.add(row(52))
    del m
    assert on_file(run) == rows[:20] + [row(50)]


@dataclass
class Input:
    """An input shard as `readers.expand_inputs` lists it (what assign_parts reads of one)."""

    uri: str
    size: int
    mtime: str
    etag: str | None = None


def test_shards_committed_after_the_last_flush_are_orphans_and_redone(tmp_path):
    """The crash-safety argument end to end: shards in place but not on file are removed and planned again."""
    from pipeline.io.rundir import assign_parts, remove_orphans
    from pipeline.io.lock import OUTPUT_LOCK, RootLock

    run = tmp_path / "run"
    inputs = [Input(f"in/{p:05d}.tar", 1000 + p, str(1.7e9 + p)) for p in range(8)]
    m = Manifest(str(run), flush_seconds=3600, flush_rows=10_000)
    for p, shard in enumerate(inputs[:6]):
        rows = ShardRows(source=shard.uri, keys=[f"{p}-a", f"{p}-b"], captions=[None, None], urls=[None, None],
                         widths=[4, 4], heights=[4, 4], complexity=[np.full(2, 0.5, np.float32)],
                         exit_layer=[np.full(2, 12, np.int16)], gflops=[np.ones(2, np.float32)],
                         embeddings=[np.ones((2, DIM), np.float16)])
        commit_shard(str(run), p, rows, DIM)
        m.add(row(p, shard.uri, rows=2))
        if p == 2:
            m.flush()
    del m  # the driver dies: parts 3-5 are in place, the manifest lists 0-2

    resumed = Manifest(str(run))
    assert [r["part"] for r in resumed.rows] == [0, 1, 2]
    assert sorted(os.listdir(run / "shards")) == [part_name(p) for p in range(6)]
    with RootLock(str(run / OUTPUT_LOCK), "embed") as lock:  # only the run directory's lock holder may remove
        remove_orphans(str(run), resumed, {}, lock)
    assert sorted(os.listdir(run / "shards")) == [part_name(p) for p in range(3)]
    assert [(s.uri, part) for s, part in assign_parts(inputs, resumed)] == [(s.uri, p) for p, s in
                                                                            enumerate(inputs) if p >= 3]


def test_sigterm_raises_terminated_until_restored():
    """The driver's SIGTERM handler: a real signal to this process becomes ``Terminated`` (a KeyboardInterrupt, so
    the commit loop unwinds as for Ctrl-C), and the previous handler comes back afterwards."""
    from pipeline.runtime import Terminated, sigterm_as_interrupt, stop_reason

    before = signal.getsignal(signal.SIGTERM)
    restore = sigterm_as_interrupt()
    try:
        with pytest.raises(Terminated):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler runs at the next bytecode; never reached
    finally:
        restore()
    assert signal.getsignal(signal.SIGTERM) is before
    # The signal is remembered for the exit code (Ray may hand it back as a plain KeyboardInterrupt), once.
    assert stop_reason(KeyboardInterrupt()).exit_code == 143 and stop_reason(KeyboardInterrupt()).exit_code == 130


@pytest.mark.parametrize("stop, code, says", [("ctrl-c", 130, "icar embed: interrupted;"),
                                              ("sigterm", 143, "icar embed: terminated (SIGTERM);")])
def test_embed_job_exit_codes_when_stopped(tmp_path, monkeypatch, capsys, stop, code, says):
    from jobs import embed
    from pipeline import runtime
    from pipeline.embed import execution

    def stopped(cfg):
        raise runtime.Terminated("signal 15") if stop == "sigterm" else KeyboardInterrupt()

    monkeypatch.setattr(execution, "run_embed", stopped)
    assert embed.main([str(tmp_path / "in.tar"), "--output", str(tmp_path / "run")]) == code
    err = capsys.readouterr().err
    assert says in err and "run the same command to resume" in err


@pytest.mark.slow
def test_interrupted_driver_records_every_shard_it_committed(tmp_path, ray_session):
    """A scheduler's stop (SIGTERM, which the driver turns into an interrupt like Ctrl-C) in the middle of `icar
    embed`, while commits wait for the next rewrite: the loop's exit writes them, so only the shard task still in
    flight can leave an orphan, and the re-run ends with every input without embedding a recorded one again."""
    from zoo import make_corpus, write_tar_shard

    corpus = tmp_path / "in"
    corpus.mkdir()
    rng = np.random.default_rng(5)
    shards = 24
    for s in range(shards):
        write_tar_shard(corpus / f"{s:05d}.tar", make_corpus(rng, 6, prefix=f"s{s}-", max_side=96))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "jobs.embed", str(corpus / "*.tar"), "--output", str(out), "--model", "demo",
           "--scorer", "heuristic", "--full-depth", "--batch-size", "4", "--no-progress", "--decode-tasks", "1",
           "--address", ray_session.get_runtime_context().gcs_address]
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    in_place = lambda: sorted(p.name for p in (out / "shards").glob("part-*.parquet")) if (out / "shards").exists() \
        else []
    listed = lambda: sorted(r["output"].rsplit("/", 1)[-1] for r in on_file(out)) if (out / "manifest.parquet") \
        .exists() else []
    deadline = time.monotonic() + 240
    # Wait until committed shards are not yet in the file (the default interval holds them back), and give the
    # driver a moment to receive the last one's row.
    while not (len(in_place()) > len(listed()) >= 1):
        assert proc.poll() is None, "the run ended before a commit waited for the next rewrite: " + \
            proc.stdout.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no commit in time"
        time.sleep(0.01)
    committed = in_place()
    time.sleep(0.25)
    assert proc.poll() is None and len(committed) > len(listed()), "the run ended or wrote before the signal"
    proc.send_signal(signal.SIGTERM)
    log = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 143 and "run the same command to resume" in log, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    interrupted = listed()
    assert set(committed) <= set(interrupted) and len(interrupted) < shards, log[-3000:]
    # Only the shard task in flight (--decode-tasks 1) may still commit after the driver stopped: an orphan.
    assert set(interrupted) <= set(in_place()) and len(set(in_place()) - set(interrupted)) <= 1
    recorded = on_file(out)
    for r in recorded:
        assert pq.read_metadata(out / r["output"]).num_rows == r["rows"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    final = on_file(out)
    assert sorted(r["source"] for r in final) == sorted(str(p) for p in corpus.glob("*.tar"))
    assert [r["part"] for r in final] == list(range(shards)) and sum(r["rows"] for r in final) == 6 * shards
    assert all(r in final for r in recorded), "a shard recorded at the interrupt was embedded again"
