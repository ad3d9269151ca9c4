"""Benchmark: does `icar embed` scale out with model actors, and does its cost per image stay flat as the corpus grows?

Three measurements, one run:

1. Actors: images/s with 1, 2 and 4 model actors on a multi-node local Ray cluster (``ray.cluster_utils.Cluster``,
   ``--nodes`` nodes of ``--cpus-per-node`` CPUs each: several raylets, shards and actors spread over nodes, objects
   moved between node object stores, as on a real cluster). Runs are interleaved (1, 2, 4, 4, 2, 1, ...). Reported:
   steady images/s (first batch to last over all actors), its ratio to 1 actor, whole-cluster CPU seconds per image
   (flat = adding actors adds no per-image overhead) and how busy each actor was.
   On this development machine the nodes share 2 physical cores, so throughput cannot rise much past 1 actor
   per core: the CPU-per-image column is what shows the pipeline's own scaling here.
2. Corpus growth: the same job on N and 10 x N images (1 actor): wall and CPU per image for the whole run (fixed
   costs such as actor start amortise, so this falls) and for the steady window (must stay flat), plus the
   marginal cost (T(10N) - T(N)) / 9N.
3. Driver bookkeeping per committed shard as the run grows: seconds per commit with 10 ... 10,000 shards already
   recorded, the part of the cost per image that grows with the run; rewriting the manifest on every commit beside
   the throttled manifest `icar embed` uses (a rewrite per ``flush_rows`` commits or ``flush_seconds``).

The model defaults to ViT-B-32 (seeded random init) exiting at block 3 of 12 (``--exit-at 3``, ~27% of full-depth
GFLOPs): a cheaper model makes the pipeline's own costs a larger share, so growth in them shows up more, and keeps the
run short on 2 cores. ``--exit-at 12`` runs full depth.

    python -m bench.scaling                      # actors 1,2,4 on 6 nodes x 2 CPUs; 64 -> 640 images
    python -m bench.scaling --actors 1,2 --sizes 32,320 --json out.json
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import (interleaved, load_average, machine_facts, make_corpus, median, print_facts,  # noqa: E402
                          same_priority_as_peers, timed_run_embed, write_json)
from pipeline.embed.config import EmbedConfig  # noqa: E402
from pipeline.io.shards import Manifest  # noqa: E402
from pipeline.model.spec import ModelSpec  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.scaling", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--actors", default="1,2,4", help="model actor counts to compare")
    p.add_argument("--nodes", type=int, default=6, help="Ray nodes in the local cluster (enough CPUs for the "
                   "largest actor count: actors x (1 + tasks per actor))")
    p.add_argument("--tasks-per-actor", type=int, default=2, help="concurrent shard tasks per actor (--decode-tasks)")
    p.add_argument("--cpus-per-node", type=int, default=2, help="logical CPUs per node")
    p.add_argument("--n", type=int, default=256, help="images for the actor comparison")
    p.add_argument("--sizes", default="64,640", help="corpus sizes for the growth measurement (N,10N)")
    p.add_argument("--per-shard", type=int, default=32, help="images per tar shard")
    p.add_argument("--batch-size", type=int, default=16, help="images per model call")
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--exit-at", type=int, default=3, help="blocks run per image (12 = full depth for ViT-B-32)")
    p.add_argument("--repeats", type=int, default=2, help="interleaved rounds of the actor comparison")
    p.add_argument("--manifest-sizes", default="10,100,1000,10000", help="committed shards for the bookkeeping probe")
    p.add_argument("--skip", default="", help="comma list of sections to skip: actors,growth,manifest")
    p.add_argument("--json", default=None, help="also write the results as JSON here")
    return p.parse_args(argv)


def start_cluster(nodes: int, cpus: int):
    """Start a local multi-node Ray cluster (head + nodes-1 workers) and connect this driver to it; return it."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": cpus, "include_dashboard": False})
    for _ in range(nodes - 1):
        cluster.add_node(num_cpus=cpus)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING")
    return cluster


def embed_cfg(args, tars: list[str], output: str, actors: int):
    spec = ModelSpec(model=args.model, pretrained="none", scorer="none", exit_at=args.exit_at, device="cpu",
                     torch_threads=1)
    # two shard tasks per actor: one shard task per actor leaves the actor idle at every shard boundary (commit,
    # next task's start and first decode); decode CPU itself (~0.03 CPU per 1-thread actor, bench/pipeline.py)
    # never limits here
    return EmbedConfig(inputs=tars, output=output, spec=spec, batch_size=args.batch_size, num_actors=actors,
                       cpus_per_actor=1.0, decode_tasks=args.tasks_per_actor * actors, progress=False)


def one_run(args, tars, work: Path, tag: str, actors: int, address: str) -> dict:
    cfg = embed_cfg(args, tars, str(work / tag), actors)
    cfg.address = address
    r = timed_run_embed(cfg, str(work / f"{tag}.batches"))
    r["load_average"] = load_average()
    shutil.rmtree(work / tag, ignore_errors=True)
    return r


def actor_section(args, cluster, work: Path) -> dict:
    counts = [int(a) for a in args.actors.split(",")]
    corpus = make_corpus(args.n, args.per_shard)
    runs: dict[int, list[dict]] = {a: [] for a in counts}
    for i, a in enumerate(interleaved(counts, args.repeats)):
        r = one_run(args, corpus.tars, work, f"actors{a}-{i}", a, cluster.address)
        runs[a].append(r)
        busy = ", ".join(f"{b / r['window_wall']:.2f}" for b in r["busy_by_actor"].values())
        print(f"  run {i + 1}: {a} actor(s): steady {r['images'] / r['window_wall']:6.2f} img/s, "
              f"{1e3 * r['window_cpu'] / r['images']:6.1f} CPU ms/img, actors busy [{busy}]  load {r['load_average'][0]}")
    base = median(args.n / r["window_wall"] for r in runs[counts[0]])
    table = {}
    for a in counts:
        rate = median(args.n / r["window_wall"] for r in runs[a])
        table[a] = {"steady_img_s": rate, "vs_first": rate / base,
                    "whole_run_img_s": median(args.n / r["wall"] for r in runs[a]),
                    "window_cpu_ms_per_img": median(1e3 * r["window_cpu"] / r["images"] for r in runs[a]),
                    "whole_cpu_ms_per_img": median(1e3 * r["cpu"] / r["images"] for r in runs[a]),
                    "actor_busy_mean": median(np.mean([b / r["window_wall"] for b in r["busy_by_actor"].values()])
                                              for r in runs[a]),
                    "actors_that_worked": median(len(r["busy_by_actor"]) for r in runs[a])}
    return {"runs": runs, "table": table, "images": args.n, "shards": len(corpus.tars)}


def growth_section(args, cluster, work: Path) -> dict:
    sizes = [int(s) for s in args.sizes.split(",")]
    runs = {}
    for n in sizes:
        corpus = make_corpus(n, args.per_shard)
        r = one_run(args, corpus.tars, work, f"grow{n}", 1, cluster.address)
        runs[n] = r
        print(f"  {n:5d} images ({r['shards']} shards): whole run {1e3 * r['wall'] / n:7.1f} ms/img wall, "
              f"{1e3 * r['cpu'] / n:7.1f} CPU ms/img; steady {1e3 * r['window_wall'] / n:7.1f} ms/img wall, "
              f"{1e3 * r['window_cpu'] / n:7.1f} CPU ms/img  load {r['load_average'][0]}")
    lo, hi = sizes[0], sizes[-1]
    a, b = runs[lo], runs[hi]
    table = {n: {"whole_wall_ms_per_img": 1e3 * r["wall"] / n, "whole_cpu_ms_per_img": 1e3 * r["cpu"] / n,
                 "steady_wall_ms_per_img": 1e3 * r["window_wall"] / n,
                 "steady_cpu_ms_per_img": 1e3 * r["window_cpu"] / n, "shards": r["shards"],
                 "fixed_wall_s": r["until_first_batch"] + r["after_last_batch"]} for n, r in runs.items()}
    marginal = {"wall_ms_per_img": 1e3 * (b["wall"] - a["wall"]) / (hi - lo),
                "cpu_ms_per_img": 1e3 * (b["cpu"] - a["cpu"]) / (hi - lo)}
    flat = {"steady_wall_ratio": table[hi]["steady_wall_ms_per_img"] / table[lo]["steady_wall_ms_per_img"],
            "steady_cpu_ratio": table[hi]["steady_cpu_ms_per_img"] / table[lo]["steady_cpu_ms_per_img"]}
    return {"runs": runs, "table": table, "marginal": marginal, "flatness": flat}


def manifest_section(args, work: Path) -> dict:
    """Return the driver's seconds per committed shard with k shards already recorded, for each k (local disk):
    rewriting the manifest on every commit (as before) and with the throttled Manifest (the defaults `icar embed`
    uses), both measured here on the same manifests.

    Throttled, the figure is amortised over one rewrite's worth of commits: ``flush_rows`` adds, the last of which
    rewrites the file (commits arrive faster than the bench can wait ``flush_seconds``; slower ones are rewritten
    every ``flush_seconds``, so fewer times still).
    """
    out = {}
    for k in (int(x) for x in args.manifest_sizes.split(",")):
        run = work / f"manifest-{k}"
        run.mkdir()
        every = Manifest(str(run), flush_seconds=0, flush_rows=1)
        every.rows = [fake_row(i) for i in range(k)]
        every.write()
        times = []
        for j in range(5):
            t0 = time.perf_counter()
            every.add(fake_row(k + j))
            times.append(time.perf_counter() - t0)
        per_rewrite = median(times)
        size = os.path.getsize(run / "manifest.parquet")  # k + 5 rows
        throttled = Manifest(str(run))
        throttled.rows = [fake_row(i) for i in range(k)]
        throttled.write()  # as after the run's first commit: the next rewrite waits for flush_rows or flush_seconds
        writes0, blocks = throttled.writes, []
        for b in range(3):
            first = k + b * throttled.flush_rows
            t0 = time.perf_counter()
            for i in range(first, first + throttled.flush_rows):
                throttled.add(fake_row(i))
            blocks.append((time.perf_counter() - t0) / throttled.flush_rows)
        writes = throttled.writes - writes0
        if writes != len(blocks):
            raise RuntimeError(f"expected one manifest rewrite per {throttled.flush_rows} commits, saw {writes} in "
                               f"{len(blocks)} blocks")
        out[k] = {"seconds_per_commit": per_rewrite, "throttled_seconds_per_commit": median(blocks),
                  "speedup": per_rewrite / median(blocks), "flush_rows": throttled.flush_rows,
                  "flush_seconds": throttled.flush_seconds, "bytes": size}
        shutil.rmtree(run)
        print(f"  {k:6d} shards recorded: {1e3 * per_rewrite:8.2f} ms per commit rewriting every commit, "
              f"{1e3 * out[k]['throttled_seconds_per_commit']:7.3f} ms throttled ({out[k]['speedup']:.0f}x; "
              f"manifest {out[k]['bytes'] / 1024:.0f} KiB)")
    return out


def fake_row(i: int) -> dict:
    """Return a manifest row like a committed shard's (the values do not matter, their size does)."""
    return {"source": f"s3://bucket/laion400m/{i:06d}.tar", "output": f"shards/part-{i:05d}.parquet", "part": i,
            "rows": 10000, "errors": 12, "gflops": 88000.0, "scorer_gflops": 19.0, "seconds": 31.5,
            "model_seconds": 29.0, "source_size": 512 << 20, "source_mtime": "2026-11-25T10:00:00+00:00",
            "source_etag": f'"{i:032x}"', "exit_counts": '{"12": 3000, "18": 3000, "24": 4000}',
            "complexity_mean": 0.5, "complexity_p10": 0.1, "complexity_p50": 0.5, "complexity_p90": 0.9,
            "committed_at": "2026-11-25T10:00:00+00:00"}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.pop("RAY_ADDRESS", None)
    same_priority_as_peers()  # workers at nice 0, as the other work on a shared machine (see bench.common)
    facts = machine_facts()
    print_facts(facts)
    skip = set(filter(None, args.skip.split(",")))
    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="icar-bench-scaling-"))
    result = {"facts": facts, "args": vars(args)}
    import ray

    cluster = None
    try:
        if not {"actors", "growth"} <= skip:
            cluster = start_cluster(args.nodes, args.cpus_per_node)
            print(f"# local Ray cluster: {args.nodes} nodes x {args.cpus_per_node} CPUs "
                  f"({ray.cluster_resources().get('CPU', 0):g} logical CPUs on {os.cpu_count()} cores); "
                  f"{args.model} exit at block {args.exit_at}, batch {args.batch_size}, 1 thread per actor")
        if "actors" not in skip:
            print(f"\n1. model actors ({args.n} images, {args.repeats} interleaved rounds)")
            result["actors"] = actor_section(args, cluster, work)
            print("   actors  steady img/s  vs 1 actor  CPU ms/img (steady)  CPU ms/img (whole run)  actor busy")
            for a, row in result["actors"]["table"].items():
                print(f"   {a:6d}  {row['steady_img_s']:12.2f}  {row['vs_first']:9.2f}x  "
                      f"{row['window_cpu_ms_per_img']:19.1f}  {row['whole_cpu_ms_per_img']:22.1f}  "
                      f"{row['actor_busy_mean']:10.2f}")
        if "growth" not in skip:
            print(f"\n2. corpus growth ({args.sizes} images, 1 actor)")
            g = growth_section(args, cluster, work)
            result["growth"] = g
            print(f"   marginal cost {g['marginal']['wall_ms_per_img']:.1f} ms/img wall, "
                  f"{g['marginal']['cpu_ms_per_img']:.1f} CPU ms/img; steady per-image cost at 10x vs 1x: "
                  f"wall {g['flatness']['steady_wall_ratio']:.3f}, CPU {g['flatness']['steady_cpu_ratio']:.3f} "
                  f"(1.0 = flat)")
    finally:
        if cluster is not None:
            ray.shutdown()
            cluster.shutdown()
    if "manifest" not in skip:
        print("\n3. driver bookkeeping per committed shard (manifest rewrite on every commit vs throttled, local disk)")
        result["manifest"] = manifest_section(args, work)
    shutil.rmtree(work, ignore_errors=True)
    print(f"# total bench time {time.perf_counter() - t0:.0f}s, load average now {load_average()}")
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
