"""Shared helpers of the throughput benchmarks: a photo-like WebDataset corpus, machine facts, CPU accounting.

Every benchmark here publishes ratios measured side by side in one run (interleaved, repeated, medians): on a
machine shared with other work, an absolute images/s means little, a ratio of two things timed alike does.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pipeline.embed import execution  # noqa: E402
from pipeline.embed.execution import ModelActor  # noqa: E402
# Where generated corpora are cached between runs (keyed by their parameters): generating 512 JPEGs takes ~10 s.
CACHE_DIR = Path(os.environ.get("ICAR_BENCH_CACHE", Path(tempfile.gettempdir()) / "icar-bench-cache"))


# ------------------------------------------------------------------------------------------------ corpus

def photo_like(rng: np.random.Generator, width: int = 500, height: int = 375):
    """Return a PIL RGB image with the statistics of a web photo: smooth regions, edges, objects, sensor grain.

    Real 500x375 photos at JPEG quality 90 are 40-120 KB; what makes JPEG decoding cost what it costs is the size
    and the entropy of the coefficients, so the image mixes smooth multi-scale colour fields (sky, walls),
    sharp-edged shapes (objects) and per-pixel grain (texture), and lands in that size range.
    """
    from PIL import Image, ImageDraw, ImageFilter

    field_ = np.zeros((height, width, 3), np.float32)
    for cells, amp in ((3, 90.0), (12, 40.0), (48, 18.0)):  # coarse to fine colour variation
        small = rng.uniform(-1, 1, (max(2, cells * height // width), cells, 3)).astype(np.float32)
        up = Image.fromarray(((small + 1) * 127.5).astype(np.uint8)).resize((width, height), Image.BICUBIC)
        field_ += (np.asarray(up, np.float32) / 127.5 - 1) * amp
    base = np.clip(field_ + rng.uniform(60, 190, 3), 0, 255).astype(np.uint8)
    img = Image.fromarray(base)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(4, 20))):
        x0, y0 = rng.uniform(0, width), rng.uniform(0, height)
        w, h = rng.uniform(15, width / 2.5), rng.uniform(15, height / 2.5)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        box = [x0, y0, x0 + w, y0 + h]
        if rng.random() < 0.5:
            draw.ellipse(box, fill=colour)
        else:
            draw.polygon([(x0 + rng.uniform(0, w), y0 + rng.uniform(0, h)) for _ in range(int(rng.integers(3, 7)))],
                         fill=colour)
    img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.6, 1.6))))  # lens softness
    grain = rng.normal(0, float(rng.uniform(3, 9)), (height, width, 1)).astype(np.float32)
    arr = np.clip(np.asarray(img, np.float32) + grain, 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def photo_jpeg(rng: np.random.Generator, width: int = 500, height: int = 375, quality: int = 90) -> bytes:
    """Return the JPEG bytes of one photo-like image (see ``photo_like``)."""
    buf = io.BytesIO()
    photo_like(rng, width, height).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 1_700_000_000
    tar.addfile(info, io.BytesIO(data))


@dataclass
class Corpus:
    """A cached WebDataset corpus: tar shards in img2dataset layout, plus the raw JPEG bytes by key."""

    directory: Path
    tars: list[str]  # absolute paths, sorted
    keys: list[str]
    jpeg_bytes: dict[str, bytes] = field(repr=False)

    @property
    def mean_kb(self) -> float:
        return statistics.mean(len(b) for b in self.jpeg_bytes.values()) / 1024


def make_corpus(n: int, per_shard: int, width: int = 500, height: int = 375, seed: int = 0,
                root: Path | None = None) -> Corpus:
    """Return a corpus of ``n`` photo-like JPEGs in tars of ``per_shard`` (generated once, then read from the cache)."""
    tag = hashlib.sha256(json.dumps([n, per_shard, width, height, seed, 2]).encode()).hexdigest()[:12]
    directory = (root or CACHE_DIR) / f"wds-{n}x{width}x{height}-per{per_shard}-{tag}"
    done = directory / "DONE"
    if not done.exists():
        directory.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(seed)
        for shard, lo in enumerate(range(0, n, per_shard)):
            tmp = directory / f"{shard:05d}.tar.tmp"
            with tarfile.open(tmp, "w") as tar:
                for i in range(lo, min(n, lo + per_shard)):
                    key = f"{shard:05d}{i - lo:04d}"
                    _tar_member(tar, f"{key}.jpg", photo_jpeg(rng, width, height))
                    _tar_member(tar, f"{key}.txt", f"photo-like image {i}".encode())
                    meta = {"url": f"https://example.invalid/{key}.jpg", "key": key, "width": width, "height": height}
                    _tar_member(tar, f"{key}.json", json.dumps(meta).encode())
            tmp.rename(directory / f"{shard:05d}.tar")
        done.write_text("ok\n")
    tars = sorted(str(p) for p in directory.glob("*.tar"))
    keys, data = [], {}
    for t in tars:
        with tarfile.open(t) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".jpg"):
                    k = m.name[:-4]
                    keys.append(k)
                    data[k] = tar.extractfile(m).read()
    return Corpus(directory, tars, keys, data)


# ------------------------------------------------------------------------------------------------ fairness

def same_priority_as_peers() -> None:
    """Make the Ray this process starts run its workers at normal priority, as every other process here runs.

    Ray starts its worker processes at nice 15 (RAY_worker_niceness) so that its own system processes win. On a
    dedicated machine that changes nothing; on a shared one it hands ICAR's model actor and decode tasks a
    fraction of a core whenever anything else is busy, while the bare model in this process and a peer tool run
    at nice 0, and the comparison would measure the neighbours. Must run before Ray starts (the raylet reads it).
    """
    os.environ.setdefault("RAY_worker_niceness", "0")


# ------------------------------------------------------------------------------------------------ facts

def load_average() -> list[float]:
    """Return the 1, 5 and 15 minute load averages (what else this shared machine was doing)."""
    return [round(x, 2) for x in os.getloadavg()]


def git_commit() -> str:
    """Return the repository's HEAD commit (and '+dirty' when the working tree differs)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError) as e:
        return f"unknown ({type(e).__name__})"


def machine_facts() -> dict:
    """Return date, host facts, load average and library versions, to print beside every figure."""
    import torch

    facts = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "cpu": _cpu_model(),
        "load_average_1_5_15": load_average(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "git": git_commit(),
    }
    for mod in ("open_clip", "ray", "PIL", "numpy", "pyarrow"):
        try:
            facts[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001 - a missing optional library is a fact to print, not a failure
            facts[mod] = f"unavailable ({type(e).__name__})"
    return facts


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def print_facts(facts: dict) -> None:
    print(f"# {facts['date']}  load average {facts['load_average_1_5_15']} on {facts['cpu_count']} CPUs "
          f"({facts['cpu']}), device {facts['cuda'] or 'cpu'}")
    print(f"# torch {facts['torch']}, open_clip {facts['open_clip']}, ray {facts['ray']}, PIL {facts['PIL']}, "
          f"numpy {facts['numpy']}, pyarrow {facts['pyarrow']}, icar {facts['git']}")


# ------------------------------------------------------------------------------------------------ timing

def _proc_stats() -> dict[int, tuple[int, int, float]]:
    """Return {pid: (parent pid, start time in ticks, CPU seconds of the process itself)} from /proc (Linux)."""
    ticks = os.sysconf("SC_CLK_TCK")
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry}/stat").read_text()
        except OSError:  # the process ended while we listed
            continue
        f = text[text.rindex(")") + 2:].split()  # fields after "pid (comm) ", from state (field 3) on
        out[int(entry)] = (int(f[1]), int(f[19]), (int(f[11]) + int(f[12])) / ticks)
    return out


def _tree(stats: dict, root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        if p in stats:
            out.append(p)
            todo += children.get(p, [])
    return out


def tree_cpu_seconds(pid: int | None = None) -> float:
    """Return CPU seconds (user+system) that process ``pid`` and its living descendants have used so far.

    Processes that already ended are not in it (Ray's raylet does not account its reaped workers in its children's
    times): for a span during which processes come and go, use CpuTracker, which samples.
    """
    stats = _proc_stats()
    return sum(stats[p][2] for p in _tree(stats, pid or os.getpid()))


class CpuTracker:
    """CPU seconds used by this process tree since start(), sampled every ``period`` s on a thread.

    Each process (pid + start time) counts from its value at the first sample (0 if born later) to its value at the
    last sample it was seen in, so processes that end during the span keep what they used up to ~one period before.
    The sampler's own CPU time is subtracted. ``at(t)`` interpolates the running total at epoch time ``t``.
    """

    def __init__(self, period: float = 0.5, root: int | None = None):
        import threading

        self.period, self.root = period, root or os.getpid()
        self.first: dict[tuple[int, int], float] = {}
        self.last: dict[tuple[int, int], float] = {}
        self.samples: list[tuple[float, float]] = []
        self.own = 0.0
        self._started = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> float:
        c0 = time.thread_time()
        stats = _proc_stats()
        for p in _tree(stats, self.root):
            key = (p, stats[p][1])
            if key not in self.first:
                self.first[key] = stats[p][2] if not self._started else 0.0
            self.last[key] = stats[p][2]
        self._started = True
        self.own += time.thread_time() - c0
        total = sum(self.last[k] - self.first[k] for k in self.last) - self.own
        self.samples.append((time.time(), total))
        return total

    def _run(self):
        while not self._stop.wait(self.period):
            self.sample()

    def __enter__(self):
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.sample()

    @property
    def total(self) -> float:
        return self.samples[-1][1]

    def at(self, t: float) -> float:
        """Return the CPU seconds used from the start up to epoch time ``t`` (linear between samples)."""
        return float(np.interp(t, [s[0] for s in self.samples], [s[1] for s in self.samples]))


@contextmanager
def timed(into: dict | None = None, tree: bool = False):
    """Measure wall and CPU seconds of the block into ``into`` (keys wall, cpu); ``tree`` counts child processes."""
    out = into if into is not None else {}
    tracker = CpuTracker().__enter__() if tree else None
    c0 = time.process_time()
    t0 = time.perf_counter()
    try:
        yield out
    finally:
        out["wall"] = time.perf_counter() - t0
        if tracker is not None:
            tracker.__exit__(None, None, None)
            out["cpu"] = tracker.total
        else:
            out["cpu"] = time.process_time() - c0


def median(xs) -> float:
    xs = list(xs)
    return statistics.median(xs) if xs else float("nan")


def spread(xs) -> str:
    """Return 'min-max' of a list of numbers, to print beside a median."""
    xs = list(xs)
    return f"{min(xs):.3g}-{max(xs):.3g}" if xs else "-"


def interleaved(names: list[str], repeats: int) -> list[str]:
    """Return the run order ABC, CBA, ABC, ... so that slow drifts in machine load hit every variant alike."""
    order = []
    for r in range(repeats):
        order += names if r % 2 == 0 else names[::-1]
    return order


def write_json(path: str | None, obj: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(obj, indent=1, default=str) + "\n")
        print(f"# results written to {path}")


# ---------------------------------------------------------------------------------------- instrumented icar embed

def timed_actor_class(log_path: str):
    """Return a ModelActor that appends "start end images" (epoch seconds) of every embed call to ``log_path``.

    Defined in a function so that Ray ships the class by value; only the timing is added, the work is the actor's.
    Each line also names the actor's process id, so several actors' busy time can be told apart, and the actor
    process's CPU seconds during the call (the model's work, comparable with the bare model's CPU time).
    """
    class TimedModelActor(ModelActor):
        def embed(self, pixels, keys):
            t0, c0 = time.time(), time.process_time()
            out = super().embed(pixels, keys)
            with open(log_path, "a") as f:
                f.write(f"{t0} {time.time()} {len(keys)} {os.getpid()} {time.process_time() - c0}\n")
            return out

    return TimedModelActor


def timed_embed_main(argv: list[str]) -> int:
    """`python -m bench.common timed-embed BATCH_LOG ICAR_EMBED_ARGS...`: run `icar embed` with a timed model actor.

    The job is jobs.embed.main, unchanged; only the model actor appends each batch's start/end times to BATCH_LOG,
    so a benchmark can tell the steady state (first batch to last) from a run's fixed costs.
    """
    import logging

    from jobs import embed

    log_path, args = argv[0], argv[1:]
    logging.basicConfig(level=logging.WARNING)
    execution.ModelActor = timed_actor_class(os.path.abspath(log_path))
    return embed.main(args)


def batch_window(log_path: str) -> dict:
    """Return the model window (first batch start to last batch end), busy seconds and images from a batch log."""
    calls = np.loadtxt(log_path, ndmin=2)
    first, last = float(calls[:, 0].min()), float(calls[:, 1].max())
    busy_by_actor = {int(pid): float((calls[calls[:, 3] == pid, 1] - calls[calls[:, 3] == pid, 0]).sum())
                     for pid in np.unique(calls[:, 3])}
    return {"first": first, "last": last, "window": last - first, "busy": float((calls[:, 1] - calls[:, 0]).sum()),
            "busy_by_actor": busy_by_actor, "images": int(calls[:, 2].sum()), "batches": len(calls),
            "model_cpu": float(calls[:, 4].sum())}


def timed_run_embed(cfg, log_path: str) -> dict:
    """Run pipeline.embed.execution.run_embed(cfg) in this process with timed model actors; return its costs.

    Returned: whole-run wall and CPU (this process tree: the driver, and Ray's processes when this driver started
    them), the model window (first batch start to last batch end over all actors) with its wall and CPU, the actors'
    busy seconds, and the summary. Ray must already be initialised by the caller (its start is not the run's work).
    """
    original = execution.ModelActor
    execution.ModelActor = timed_actor_class(os.path.abspath(log_path))
    try:
        with CpuTracker() as cpu:
            t0, e0 = time.perf_counter(), time.time()
            summary = execution.run_embed(cfg)
            t1 = time.perf_counter()
    finally:
        execution.ModelActor = original
    if summary.shards_failed or summary.errors:
        raise RuntimeError(f"run {cfg.output} failed: {summary.line()} {summary.shards_failed}")
    w = batch_window(log_path)
    return {"images": summary.images, "shards": summary.shards_committed, "wall": t1 - t0,
            "cpu": cpu.total, "until_first_batch": w["first"] - e0,
            "after_last_batch": (t1 - t0) - (w["last"] - e0), "window_wall": w["window"],
            "window_cpu": cpu.at(w["last"]) - cpu.at(w["first"]), "model_seconds": w["busy"],
            "model_busy": w["busy"] / w["window"], "model_cpu": w["model_cpu"], "busy_by_actor": w["busy_by_actor"],
            "batches": w["batches"],
            "exit_counts": summary.exit_counts}


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "timed-embed":
        raise SystemExit(timed_embed_main(sys.argv[2:]))
    raise SystemExit("usage: python -m bench.common timed-embed BATCH_LOG ICAR_EMBED_ARGS...")
