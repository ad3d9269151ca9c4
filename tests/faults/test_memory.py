"""bench.memory's measurement: the peak RSS it reads is the kernel's, per process of a job's tree, by role."""

from __future__ import annotations

import importlib.util
import pickle
import subprocess
import sys
import threading
from pathlib import Path

import pytest

# bench/ is a folder of scripts run with `python -m bench.memory` from the repository root, not a package on the
# test path: load the script by its file.
_spec = importlib.util.spec_from_file_location(
    "bench_memory", Path(__file__).resolve().parents[2] / "bench" / "memory.py")
memory = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = memory
_spec.loader.exec_module(memory)

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")

# A parent that starts a child, the child touches 150 MiB and frees it, then both wait to be read.
CHILD = "import time; b = bytearray(150 << 20); b[::4096] = b'x' * len(b[::4096]); del b; time.sleep(30)"
PARENT = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {CHILD!r}]); time.sleep(30)"


def test_watch_reads_the_peak_of_every_process_of_the_tree_after_the_memory_is_freed():
    proc = subprocess.Popen([sys.executable, "-c", PARENT])
    try:
        watch = memory.Watch(proc.pid, interval=0.05)
        stop = threading.Event()
        sampler = threading.Thread(target=watch.run, args=(stop,), daemon=True)
        sampler.start()
        for _ in range(200):  # the child is seen once it has allocated: its peak is then at least 150 MiB
            if any(pid != proc.pid and kib > 150 * 1024 for pid, kib in dict(watch.peaks).items()):
                break
            threading.Event().wait(0.05)
        stop.set()
        sampler.join()
        children = [pid for pid in watch.peaks if pid != proc.pid]
        assert len(children) == 1 and watch.peaks[children[0]] > 150 * 1024  # freed, but the peak remains
        assert watch.roles[proc.pid] == "driver" and watch.roles[children[0]] == "ray system"
        assert watch.peaks[proc.pid] < 150 * 1024  # the parent never held it
        summary = watch.summary()
        assert summary["driver"]["processes"] == 1 and summary["ray system"]["max_mib"] > 150
        assert summary["model actor"] == {"max_mib": 0.0, "processes": 0}
    finally:
        for pid in memory.descendants(proc.pid):
            subprocess.run(["kill", str(pid)], check=False)
        proc.kill()
        proc.wait()


def test_roles_follow_ray_process_titles_and_stick():
    assert memory.role_of("ray::ModelActor.embed", None) == "model actor"
    assert memory.role_of("ray::shard_task", None) == "shard workers"
    assert memory.role_of("ray::IDLE", "shard workers") == "shard workers"  # a worker between two tasks
    assert memory.role_of("/usr/bin/raylet", None) == "ray system"
    assert memory.peak_rss_kib(2 ** 22 + 12345) is None  # no such process


# What the `icar embed` driver imports (jobs/embed.py, pipeline/embed/execution.py's run_embed, the end-of-run report),
# then what it unpickles from the model actors: their description (ray.get of ModelActor.describe).
DRIVER = """
import pickle, sys
import ray
import jobs.embed
from pipeline import cli
from pipeline.embed import execution, validate
from pipeline.io import readers, shards, storage
from pipeline.report import build as report
description = pickle.loads(open(sys.argv[1], "rb").read())
report.model_key(description["model"])
loaded = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "open_clip", "timm"})
print(" ".join(loaded) or "none")
"""


def test_embed_driver_never_imports_torch(tmp_path):
    """The driver never runs a model: torch (~550 MiB of RSS) is the model actors' business, not its own."""
    from pipeline.model.spec import ModelSpec
    from pipeline.model.worker import ModelWorker

    description = ModelWorker(ModelSpec(model="demo", device="cpu")).describe()
    blob = tmp_path / "description.pickle"
    blob.write_bytes(pickle.dumps(description))
    out = subprocess.run([sys.executable, "-c", DRIVER, str(blob)], cwd=Path(__file__).resolve().parents[2],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["none"], f"the embed driver imported {out.stdout.strip()}"
