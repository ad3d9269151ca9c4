"""Peak memory of `icar embed` against corpus size: N images and 10x N, side by side, with their ratios.

DESIGN.md promises that memory is bounded by configuration (batch size, batches in flight, decode tasks), not by
corpus size. This runs the real job (`python -m jobs.embed`, embedded local Ray) on a corpus of N images and on one
of 10x N in shards of the same size, and reads the kernel's peak-RSS counter (VmHWM in /proc/PID/status) of every
process of the job's tree every 0.2 s: the driver, the shard-task workers (read, decode, commit), the model
actor(s), and Ray's own processes. A bounded pipeline shows ratios near 1.0 where the corpus ratio is 10.

    python -m bench.memory                       # N=64, 10N=640, 16 images per shard, ViT-B-32
    python -m bench.memory --model demo          # the shipped 64px demo CLIP: the same pipeline, minutes less
    python -m bench.memory --n 200 --per-shard 50 --json mem.json

Linux only (/proc). Exits 1 when a peak grows by more than --max-growth between N and 10N, and 2 when a role
(driver, shard workers, model actor) was not seen in a run (nothing measured is not "bounded").
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

try:
    from bench.common import ROOT, load_average, machine_facts, make_corpus, print_facts, write_json
except ImportError:  # run as a file: python bench/memory.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench.common import ROOT, load_average, machine_facts, make_corpus, print_facts, write_json

ROLES = ("driver", "shard workers", "model actor", "ray system")


def _read(pid: int, name: str) -> str | None:
    try:
        return Path(f"/proc/{pid}/{name}").read_bytes().decode(errors="replace")
    except OSError:
        return None


def peak_rss_kib(pid: int) -> int | None:
    """Return the peak resident set size (VmHWM, KiB) of process ``pid`` so far, None once it is gone."""
    status = _read(pid, "status")
    if status is None:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return None


def descendants(root: int) -> list[int]:
    """Return the PIDs of every living descendant of ``root`` (a Ray instance started by a driver is its tree)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        stat = _read(int(entry), "stat")
        if stat is None:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        for c in children.get(p, []):
            out.append(c)
            todo.append(c)
    return out


def role_of(title: str, seen: str | None) -> str:
    """Return the role of a process from its title (Ray renames workers by what they run), sticky once known."""
    if title.startswith("ray::ModelActor") or seen == "model actor":
        return "model actor"
    if title.startswith("ray::shard_task") or seen == "shard workers":
        return "shard workers"
    return "ray system"


@dataclass
class Watch:
    """Samples the peak RSS of a job's process tree until stopped."""

    root: int
    interval: float = 0.2
    peaks: dict[int, int] = field(default_factory=dict)  # pid -> VmHWM KiB
    roles: dict[int, str] = field(default_factory=dict)

    def sample(self) -> None:
        hwm = peak_rss_kib(self.root)
        if hwm is not None:
            self.peaks[self.root] = max(self.peaks.get(self.root, 0), hwm)
            self.roles[self.root] = "driver"
        for pid in descendants(self.root):
            hwm = peak_rss_kib(pid)
            cmd = _read(pid, "cmdline")
            if hwm is None or cmd is None:
                continue
            self.roles[pid] = role_of(cmd.split("\0")[0], self.roles.get(pid))
            self.peaks[pid] = max(self.peaks.get(pid, 0), hwm)

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.sample()
            stop.wait(self.interval)

    def summary(self) -> dict:
        """Return per role: the largest single-process peak (MiB) and the count of processes seen."""
        out = {}
        for role in ROLES:
            peaks = [kib for pid, kib in self.peaks.items() if self.roles.get(pid) == role]
            out[role] = {"max_mib": round(max(peaks) / 1024, 1) if peaks else 0.0, "processes": len(peaks)}
        out["sum of peaks"] = {"max_mib": round(sum(self.peaks.values()) / 1024, 1), "processes": len(self.peaks)}
        return out


def run_embed(tars: list[str], output: Path, args: argparse.Namespace) -> dict:
    """Run `python -m jobs.embed` on ``tars`` while watching its processes; return wall time and peaks."""
    cmd = [sys.executable, "-m", "jobs.embed", *tars, "--output", str(output), "--model", args.model,
           "--pretrained", "none", "--scorer", "heuristic", "--route-fractions", "0.4,0.3,0.3",
           "--batch-size", str(args.batch_size), "--no-progress", *args.embed_args]
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)  # an embedded Ray, so that every process of the job is in the driver's tree
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watch, stop = Watch(proc.pid), threading.Event()
    sampler = threading.Thread(target=watch.run, args=(stop,), daemon=True)
    sampler.start()
    out, _ = proc.communicate()
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"icar embed failed ({proc.returncode}):\n{out[-3000:]}")
    line = next((ln for ln in out.splitlines() if ln.startswith("icar embed:")), "")
    return {"wall_s": round(time.perf_counter() - t0, 1), "load_average_after": load_average(), "summary": line,
            "peaks": watch.summary()}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=64, help="images in the small corpus")
    p.add_argument("--factor", type=int, default=10, help="the large corpus has this many times more images")
    p.add_argument("--per-shard", type=int, default=16, help="images per tar shard (the same in both corpora)")
    p.add_argument("--size", default="320x240", help="image size WxH of the generated JPEGs")
    p.add_argument("--model", default="ViT-B-32",
                   help="open_clip model (seeded random weights), or demo (the shipped 64px CLIP, much faster)")
    p.add_argument("--batch-size", type=int, default=16, help="images per model call")
    p.add_argument("--max-growth", type=float, default=1.25,
                   help="largest accepted ratio of a peak at factor*N to the same peak at N")
    p.add_argument("--work-dir", default=None, help="where run directories go (default: a temporary directory)")
    p.add_argument("--embed-args", nargs=argparse.REMAINDER, default=[],
                   help="further `icar embed` arguments, e.g. --embed-args --decode-tasks 1")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    return p


def main(argv: list[str] | None = None) -> int:
    """Measure, print the table and the verdict; return 1 when memory grows with the corpus."""
    args = build_parser().parse_args(argv)
    if not Path("/proc/self/status").exists():
        raise SystemExit("bench.memory reads /proc: Linux only")
    width, height = (int(v) for v in args.size.lower().split("x"))
    facts = machine_facts()
    print_facts(facts)
    sizes = {"N": args.n, f"{args.factor}N": args.n * args.factor}
    results = {}
    with tempfile.TemporaryDirectory(dir=args.work_dir) as work:
        for label, n in sizes.items():
            corpus = make_corpus(n, args.per_shard, width, height, seed=1)
            print(f"# {label}: {n} images in {len(corpus.tars)} shards of {args.per_shard} ...", flush=True)
            results[label] = {"images": n, "shards": len(corpus.tars),
                              **run_embed(corpus.tars, Path(work) / f"run-{n}", args)}
            print(f"#   {results[label]['summary']} (load average after: {results[label]['load_average_after']})",
                  flush=True)
    small, large = (results[k] for k in sizes)
    unseen = [f"{role} at {label}" for label, r in results.items() for role in ROLES[:3]
              if not r["peaks"][role]["processes"]]
    if unseen:  # a role never seen would read as 0 MiB on both sides: no measurement, not a bounded one
        print(f"bench.memory: no process seen for {', '.join(unseen)}; the process titles may have changed "
              f"(see role_of)", file=sys.stderr)
        return 2
    rows = [("images", small["images"], large["images"]), ("shards", small["shards"], large["shards"]),
            ("wall s", small["wall_s"], large["wall_s"])]
    for role in (*ROLES, "sum of peaks"):
        rows.append((f"peak RSS MiB, {role}", small["peaks"][role]["max_mib"], large["peaks"][role]["max_mib"]))
    for role in ROLES[1:3]:
        rows.append((f"processes, {role}", small["peaks"][role]["processes"], large["peaks"][role]["processes"]))
    label_small, label_large = sizes
    print(f"\n{'':38s} {label_small:>10s} {label_large:>10s} {'ratio':>7s}")
    growth = {}
    for name, a, b in rows:
        ratio = b / a if a else float("nan")
        if name.startswith("peak RSS") and "ray system" not in name:  # Ray's own processes are not ours
            growth[name] = ratio
        print(f"{name:38s} {a:>10} {b:>10} {ratio:>7.2f}")
    worst = max(growth, key=growth.get)
    ok = growth[worst] <= args.max_growth
    print(f"\n{'bounded' if ok else 'GROWS'}: the largest peak ratio is {growth[worst]:.2f} ({worst}) for "
          f"{args.factor}x the images; accepted up to {args.max_growth}")
    write_json(args.json, {"facts": facts, "args": vars(args), "results": results, "growth": growth, "ok": ok})
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
