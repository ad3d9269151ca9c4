"""`icar index RUN... --output IDX`: build a FAISS index directory (index.faiss, ids.parquet, index.json) from runs."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from pipeline.index.build import IndexConfig, build_index
from pipeline.index.params import BudgetError
from pipeline.index.read import RunMismatchError
from pipeline.io.lock import LockHeld, LockLost
from pipeline.io.storage import CorruptFileError
from pipeline.logs import setup_logging
from pipeline.runtime import resolve_device, stop_reason

from jobs.common import (HelpFormatter, add_deprecated_alias, add_logging_args, add_runtime_args, add_storage_args,
                     apply_logging)

log = logging.getLogger("icar.index")

EXAMPLES = """
The index is chosen from the vector count and the memory budgets (sizes are 1024-based: K, M, G, T):
exact search (Flat) for small corpora; IVF with ~4*sqrt(N) lists (65536+ with an HNSW coarse quantizer
beyond 1M vectors) and the largest code the budget holds: 8/4-bit scalar codes when it holds 4+ bits per
dimension, else PQ (OPQ when the code is small); trained on a uniform sample, nprobe tuned to
--target-recall on held-out image queries and, where captions and the model's text tower exist, caption
queries. index.json records every choice and why.

Runs indexed together must share one model (name + weights hash); others are refused.

examples:
  icar index runs/demo --output idx/demo
  icar index s3://bucket/runs/a s3://bucket/runs/b --output s3://bucket/idx/v3 --max-index-memory 64G \\
      --address auto --work-dir s3://bucket/tmp/idx-v3        # partials on storage every node shares
  icar index runs/demo --output idx/demo-opq --factory OPQ32,IVF1024,PQ32 --overwrite
"""


def build_parser() -> argparse.ArgumentParser:
    d = IndexConfig(runs=[], output="")
    p = argparse.ArgumentParser(prog="icar index", description=__doc__, epilog=EXAMPLES, formatter_class=HelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories written by `icar embed` (local paths or URLs)")
    p.add_argument("--output", "-o", required=True, help="index directory to write (local path or URL)")
    p.add_argument("--overwrite", action="store_true", help="replace an index already in --output")
    p.add_argument("--break-lock", action="store_true",
                   help="take over the output's lock (OUTPUT/icar.lock) from another build; only once you are sure "
                        "it is dead (a lock is taken over by itself when its holder's process on this host is gone, "
                        f"or after {d.lock_stale_after_s:.0f}s without a heartbeat)")
    c = p.add_argument_group("index choice")
    c.add_argument("--trained-index", default=d.trained_index,
                   help="add into this trained, empty index (an earlier index's trained.faiss) instead of training; "
                        "needs --factory with the factory it was built with (its index.json 'factory')")
    c.add_argument("--max-index-memory", default=d.max_index_memory,
                   help="memory the built index may take (what a search server holds), e.g. 4G; 1024-based K/M/G/T")
    c.add_argument("--max-build-memory", default=d.max_build_memory,
                   help="peak memory of the build on one machine (training sample, add tasks, in-memory merge); "
                        "default: 75%% of this machine's RAM")
    c.add_argument("--factory", default=d.factory,
                   help="FAISS index_factory string overriding the automatic choice, e.g. OPQ32,IVF4096,PQ32")
    c.add_argument("--merge-partials", dest="merge", default=d.merge, choices=["auto", "memory", "disk"],
                   help="merge the add tasks' partial indexes in memory, or on disk into index.ivfdata (auto: disk "
                        "only when --max-build-memory cannot hold the index)")
    add_deprecated_alias(c, "--merge", "--merge-partials", dest="merge", choices=["auto", "memory", "disk"])
    c.add_argument("--flat-below", type=int, default=d.flat_below,
                   help="exact search (Flat) below this many vectors, when it fits --max-index-memory")
    t = p.add_argument_group("tuning")
    t.add_argument("--target-recall", type=float, default=d.target_recall,
                   help="recall@k vs exact search that the chosen nprobe must reach")
    t.add_argument("-k", type=int, default=d.k, help="the k of recall@k")
    t.add_argument("--queries", type=int, default=d.queries,
                   help="held-out image queries (and as many caption queries) used for tuning")
    t.add_argument("--text-queries", action=argparse.BooleanOptionalAction, default=d.text_queries,
                   help="tune on caption queries encoded by the runs' text tower too (default: when captions exist "
                        "and the model loads; --text-queries makes a failure to load it an error)")
    t.add_argument("--max-nprobe", type=int, default=d.max_nprobe, help="largest nprobe tried")
    t.add_argument("--seed", type=int, default=d.seed, help="sampling and k-means seed")
    x = add_runtime_args(p, device_help="device of the text encoder for caption queries",
                         threads_help="FAISS threads on the driver (default: all cores)", threads_default=d.threads,
                         address_help="Ray cluster to join (default: $RAY_ADDRESS, else a local Ray)",
                         title="runtime and execution")
    x.add_argument("--add-tasks", dest="workers", type=int, default=d.workers, metavar="N",
                   help="add tasks at once (default: the cluster's CPUs); 1 without --address builds in this process")
    add_deprecated_alias(x, "--workers", "--add-tasks", dest="workers", type=int)
    x.add_argument("--work-dir", default=d.work_dir,
                   help="where add tasks write partial indexes; on a multi-node cluster, storage every node "
                        "shares (default: OUTPUT/_build, removed at the end)")
    x.add_argument("--task-timeout", type=float, default=d.task_timeout_s,
                   help="seconds before a stuck add task fails the build")
    add_storage_args(p)
    add_logging_args(p)
    out = p.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="print index.json to stdout at the end (machines)")
    return p


def config_from_args(a: argparse.Namespace) -> IndexConfig:
    """Return the IndexConfig described by parsed arguments."""
    return IndexConfig(runs=a.runs, output=a.output, max_index_memory=a.max_index_memory,
                       max_build_memory=a.max_build_memory, factory=a.factory, target_recall=a.target_recall,
                       k=a.k, queries=a.queries, text_queries=a.text_queries, workers=a.workers, address=a.address,
                       work_dir=a.work_dir, seed=a.seed, overwrite=a.overwrite, flat_below=a.flat_below,
                       max_nprobe=a.max_nprobe, task_timeout_s=a.task_timeout, device=resolve_device(a.device), threads=a.threads,
                       merge=a.merge, storage_options=a.storage_options, progress=not a.no_progress,
                       trained_index=a.trained_index, break_lock=a.break_lock)


def main(argv: list[str] | None = None) -> int:
    """Run the index job; return 0 on success, 2 on bad input, a budget that cannot hold the index or an output
    another build holds the lock of, 1 when another build took the lock over mid-build, 130 when interrupted
    (Ctrl-C) and 143 when terminated (SIGTERM)."""
    args = build_parser().parse_args(argv)
    apply_logging(args)
    cfg = config_from_args(args)
    try:
        summary = build_index(cfg)
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (which Ray may hand back as a plain KeyboardInterrupt)
        stop = stop_reason(e)
        print(f"icar index: {stop.words}; {cfg.output} holds no complete index (index.json is written last): run the "
              f"same command again", file=sys.stderr)
        return stop.exit_code
    except LockHeld as e:  # another build writes this output: refused before Ray started or anything was read
        print(f"icar index: error: {e}", file=sys.stderr)
        return 2
    except LockLost as e:  # another build took the output over mid-build: this one wrote no index.json
        print(f"icar index: error: {e}; this build stopped without writing {cfg.output}/index.json", file=sys.stderr)
        return 1
    except CorruptFileError as e:  # a damaged shard, manifest, run.json or --trained-index: names it and the fix
        # Raised in an add task on Ray, it arrives wrapped with the task's traceback: print the error itself.
        print(f"icar index: error: {getattr(e, 'cause', None) or e}", file=sys.stderr)
        return 2
    except (BudgetError, RunMismatchError, FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"icar index: error: {e}", file=sys.stderr)
        return 2
    info = summary.info
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for reason in info["reasons"]:
            print(f"  - {reason}")
        for row in info["tuning"]:
            kinds = [k for k in ("image", "text") if k in row]
            print(f"  nprobe {row['nprobe']}: " + ", ".join(f"{k} recall@{info['k']} {row[k]:.3f}" for k in kinds)
                  + f" ({row['ms_per_query']:.3f} ms/query)")
        phases = ", ".join(f"{k} {v:.1f}s" for k, v in info["build_seconds"].items() if k != "total")
        print(f"  phases: {phases}")
    print(summary.line(), file=sys.stderr if args.json else sys.stdout)
    return 0


if __name__ == "__main__":
    setup_logging()
    raise SystemExit(main())
