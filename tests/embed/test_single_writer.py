"""One writer per output: `icar embed` and `icar index` hold their output's lock, and a stop says which signal came.

Two runs on one `--output` used to delete each other's committed shards as leftovers of an interrupted run. These
tests hold the lock in this process (a live holder: this pid on this host) and check that a second writer is
refused at once, with exit 2 and the holder named, before Ray or a model starts (``init_ray`` and the index's
runner are replaced by tripwires); that orphan removal needs the run's own lock; that a dead holder's lock is
taken over; and that the lock is released however a run ends. None of them starts Ray.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline import runtime
from pipeline.embed import execution
from pipeline.io import rundir
from pipeline.io.lock import OUTPUT_LOCK, LockLost, RootLock
from pipeline.io.schema import part_name
from zoo import make_corpus, write_tar_shard


class RayStarted(Exception):
    """Raised by the tripwire that replaces starting Ray: the run got past its lock."""


def tripwire(*args, **kwargs):
    raise RayStarted("Ray was started")


@pytest.fixture
def corpus(tmp_path) -> Path:
    """Return one small real WebDataset shard (inputs are listed only after the lock is taken)."""
    path = tmp_path / "in" / "00000.tar"
    path.parent.mkdir()
    write_tar_shard(path, make_corpus(np.random.default_rng(0), 2, exts=("jpg",), max_side=48))
    return path


def holder_lock(output: Path, job: str) -> RootLock:
    """Return the output's lock, held by this process as another live run would hold it."""
    lock = RootLock(str(output / OUTPUT_LOCK), job, stale_after_s=600, heartbeat_s=600)
    lock.acquire()
    return lock


def test_second_embed_on_one_output_is_refused_before_ray(tmp_path, corpus, monkeypatch, capsys):
    from jobs import embed

    monkeypatch.setattr(execution, "init_ray", tripwire)
    run = tmp_path / "run"
    (run / "shards").mkdir(parents=True)
    # The live run's committed shard that its manifest does not list yet: what a second run used to delete.
    (run / "shards" / part_name(0)).write_bytes(b"committed by the live run")
    first = holder_lock(run, "embed")
    capsys.readouterr()  # the holder's own "lock taken" log line (when a handler is set up) is not the refusal
    try:
        t0 = time.monotonic()
        code = embed.main([str(corpus), "--output", str(run), "--no-progress"])
        took = time.monotonic() - t0
        err = capsys.readouterr().err
        assert code == 2, err
        assert took < 10
        # Log lines that Ray forwards from an earlier test's model actor ("(ModelActor pid=...) ...") may land here.
        own = [line for line in err.strip().splitlines() if not re.match(r"(\x1b\[\d+m)?\(\w+ pid=\d+", line)]
        assert len(own) == 1, err
        assert f"{run / OUTPUT_LOCK} is held by job 'embed' run {first.run_id} on host {socket.gethostname()} " \
               f"pid {os.getpid()}, started {first.started}, last heartbeat" in err
        assert "--break-lock" in err and "without a heartbeat" in err and "reindex" not in err
        assert (run / "shards" / part_name(0)).exists() and not (run / "manifest.parquet").exists()
        first.check()  # the refused run left the holder's lock alone
    finally:
        first.release()


def test_second_index_on_one_output_is_refused_before_ray(tmp_path, monkeypatch, capsys):
    from jobs import index
    from pipeline.index import build as index_module

    monkeypatch.setattr(index_module, "Runner", tripwire)
    out = tmp_path / "idx"
    out.mkdir()
    (out / "index.json").write_text("{}")  # the live build's finished index: --overwrite must not touch it
    first = holder_lock(out, "index")
    capsys.readouterr()
    try:
        code = index.main([str(tmp_path / "run"), "--output", str(out), "--overwrite", "--no-progress"])
        err = capsys.readouterr().err
        assert code == 2, err
        assert f"{out / OUTPUT_LOCK} is held by job 'index' run {first.run_id}" in err and "--break-lock" in err
        assert (out / "index.json").read_text() == "{}"
        first.check()
    finally:
        first.release()


def test_remove_orphans_needs_the_run_directory_lock(tmp_path):
    from pipeline.io.shards import Manifest

    run = tmp_path / "run"
    (run / "shards").mkdir(parents=True)
    orphan = run / "shards" / part_name(3)
    orphan.write_bytes(b"x")
    manifest = Manifest(str(run))
    not_held = RootLock(str(run / OUTPUT_LOCK), "embed")
    with pytest.raises(LockLost, match="not held"):
        rundir.remove_orphans(str(run), manifest, {}, not_held)
    other = RootLock(str(tmp_path / "elsewhere" / OUTPUT_LOCK), "embed")
    other.acquire()
    try:
        with pytest.raises(ValueError, match="that run directory's own lock"):
            rundir.remove_orphans(str(run), manifest, {}, other)
    finally:
        other.release()
    assert orphan.exists()
    with RootLock(str(run / OUTPUT_LOCK), "embed") as held:
        rundir.remove_orphans(str(run), manifest, {}, held)
        assert (run / OUTPUT_LOCK).exists()  # the lock itself is never taken for a leftover
    assert not orphan.exists()


def test_dead_holders_lock_is_taken_over_and_released_at_the_end(tmp_path, corpus, monkeypatch):
    from jobs import embed

    monkeypatch.setattr(execution, "init_ray", tripwire)
    run = tmp_path / "run"
    run.mkdir()
    gone = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    (run / OUTPUT_LOCK).write_text(json.dumps({"job": "embed", "run_id": "dead", "host": socket.gethostname(),
                                               "pid": gone, "started": "x"}))
    with pytest.raises(RayStarted):  # past the lock: the dead run's lock was taken over
        embed.main([str(corpus), "--output", str(run), "--no-progress"])
    assert not (run / OUTPUT_LOCK).exists()  # and released when the run failed

    # A live holder is taken over only with --break-lock.
    live = holder_lock(run, "embed")
    assert embed.main([str(corpus), "--output", str(run), "--no-progress"]) == 2
    with pytest.raises(RayStarted):
        embed.main([str(corpus), "--output", str(run), "--no-progress", "--break-lock"])
    assert not (run / OUTPUT_LOCK).exists()  # the breaker released the lock it took; the old holder's is gone
    live.release()  # finds the lock no longer its own and leaves it alone


@pytest.mark.parametrize("stop, code", [("ctrl-c", 130), ("sigterm", 143)])
def test_the_lock_is_released_however_the_run_stops(tmp_path, corpus, monkeypatch, capsys, stop, code):
    """Ctrl-C, and a SIGTERM that arrives before Ray is up (Python's default would kill the driver without
    unwinding, leaving the lock behind), both end the run with the lock released."""
    from jobs import embed

    def stopped(address):
        assert (tmp_path / "run" / OUTPUT_LOCK).exists(), "the run does not hold its output's lock"
        if stop == "ctrl-c":
            raise KeyboardInterrupt()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises at the next bytecode
        raise AssertionError("SIGTERM did not stop the run")

    def unhandled(signum, frame):  # what the run would face without its own handler: not an interrupt
        raise RuntimeError("SIGTERM reached the test's own handler: the run installed none")

    monkeypatch.setattr(execution, "init_ray", stopped)
    previous = signal.signal(signal.SIGTERM, unhandled)
    try:
        assert embed.main([str(corpus), "--output", str(tmp_path / "run"), "--no-progress"]) == code
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert not (tmp_path / "run" / OUTPUT_LOCK).exists()
    assert "run the same command to resume" in capsys.readouterr().err


def sigterm_that_ray_hands_back_as_keyboard_interrupt(*args, **kwargs):
    """Do what a driver waiting in ray.wait sees: SIGTERM arrives, and a plain KeyboardInterrupt comes out."""
    restore = runtime.sigterm_as_interrupt()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    except runtime.Terminated:
        raise KeyboardInterrupt() from None
    finally:
        restore()
    raise AssertionError("SIGTERM did not arrive")


def test_sigterm_is_reported_as_143_even_when_ray_turns_it_into_keyboard_interrupt(tmp_path, monkeypatch, capsys):
    from jobs import embed

    monkeypatch.setattr(execution, "run_embed", sigterm_that_ray_hands_back_as_keyboard_interrupt)
    assert embed.main([str(tmp_path / "in.tar"), "--output", str(tmp_path / "run")]) == 143
    assert "icar embed: terminated (SIGTERM);" in capsys.readouterr().err
    # The signal is forgotten once reported: a later Ctrl-C in this process is an interrupt again.
    assert runtime.stop_reason(KeyboardInterrupt()).exit_code == 130


def test_reindex_reports_sigterm_as_143_through_the_same_helper(tmp_path, monkeypatch):
    from pipeline.reindex import run as reindex
    from tests.reindex.test_reindex import add_input, synthetic_job

    cfg, inputs = synthetic_job(tmp_path)
    add_input(cfg, inputs, "a", 100, 1)
    monkeypatch.setattr(reindex, "_run_locked", sigterm_that_ray_hands_back_as_keyboard_interrupt)
    result = reindex.run_reindex(cfg)
    assert result.exit_code == 143 and result.record["status"] == "terminated", result.record
    assert result.record["error"] == "terminated (SIGTERM); run again to resume"


def test_reindex_is_refused_by_an_embed_holding_its_run_directory(tmp_path, monkeypatch):
    """`icar reindex` embeds under its root lock (ROOT/reindex.lock) into a run directory that has a lock of its
    own: different files, so no self-deadlock, and a manual `icar embed` writing that run directory stops it."""
    from pipeline.reindex import run as reindex
    from pipeline.reindex.errors import EXIT_LOCKED
    from pipeline.reindex.root import run_dir
    from tests.reindex.test_reindex import add_input, synthetic_job

    monkeypatch.setattr(execution, "init_ray", tripwire)
    cfg, inputs = synthetic_job(tmp_path)
    add_input(cfg, inputs, "a", 100, 1)
    write_tar_shard(inputs / "b.tar", make_corpus(np.random.default_rng(1), 2, exts=("jpg",), max_side=48))
    manual = holder_lock(Path(run_dir(cfg.root, "g0001")), "embed")
    try:
        result = reindex.run_reindex(cfg)
    finally:
        manual.release()
    assert result.exit_code == EXIT_LOCKED, result.record
    assert "icar.lock is held by job 'embed'" in result.record["error"]
    assert not os.path.exists(os.path.join(cfg.root, "reindex.lock"))  # the root lock was released too
