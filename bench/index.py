"""Benchmark `icar index` on N synthetic clustered unit vectors, beside autofaiss at the same memory budget.

What it measures, for each tool on the same corpus and the same fresh queries (drawn from the corpus's
distribution, not in it): build time per phase, peak memory, bytes per vector on disk, and recall@10 vs
exact (brute-force) search, at icar's tuned nprobe and at a fixed list of nprobes for a like-for-like view.

    .venv/bin/python bench/index.py                          # 200k x 512 in a 20M budget, autofaiss beside it,
                                                             # on 200 and on 3000 clusters, one after the other
    .venv/bin/python bench/index.py --clusters 3000 --autofaiss-choice own   # autofaiss picks its own index
    .venv/bin/python bench/index.py --n 50000 --no-autofaiss # quick look

Latency is reported at each tool's own nprobe (icar's tuned one; autofaiss's tuned or --autofaiss-nprobe): ms per
query in one batch of all queries, and the median of single-query searches.

autofaiss runs in its own virtualenv (bench/.venvs/autofaiss, never a project dependency), created with
`--setup-autofaiss` (offline: autofaiss==2.18.0 numpy<2 pyarrow<26 faiss-cpu==1.13.2, as ENVIRONMENT.md says).
By default it builds the same factory string icar chose (its own choice at small budgets trains OPQ for ~10
minutes on 2 cores); `--autofaiss-choice own` lets it choose. With the same factory its nprobe is fixed to icar's
(index_param); with its own choice it tunes nprobe itself, by timing single queries against a 10 ms target, so the
result follows the machine's load: `--autofaiss-nprobe N` fixes it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from pipeline.io import storage  # noqa: E402
from pipeline.index.params import format_size, parse_size  # noqa: E402
from pipeline.io.schema import MANIFEST, MANIFEST_SCHEMA, RUN_JSON, part_name, shard_schema  # noqa: E402

AUTOFAISS_VENV = os.path.join(ROOT, "bench", ".venvs", "autofaiss")
AUTOFAISS_PINS = ["autofaiss==2.18.0", "numpy<2", "pyarrow<26", "faiss-cpu==1.13.2"]


# ------------------------------------------------------------------------------------------------ data

class Synthetic:
    """Clustered unit vectors like CLIP embeddings: cluster centres plus low-rank variation and a little noise."""

    def __init__(self, dim: int, clusters: int, intrinsic: int = 32, spread: float = 1.0, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.centres = rng.standard_normal((clusters, dim)).astype(np.float32)
        self.centres /= np.linalg.norm(self.centres, axis=1, keepdims=True)
        # Shared directions of variation (orthonormal rows): most of a vector's spread lies in few dimensions.
        q, _ = np.linalg.qr(rng.standard_normal((dim, intrinsic)))
        self.basis = q.T.astype(np.float32)
        self.spread, self.intrinsic, self.dim = spread, intrinsic, dim

    def sample(self, n: int, seed: int) -> np.ndarray:
        """Return ``n`` L2-normalised float32 vectors."""
        rng = np.random.default_rng(seed)
        labels = rng.integers(0, len(self.centres), n)
        z = rng.standard_normal((n, self.intrinsic)).astype(np.float32) / np.sqrt(self.intrinsic)
        iso = rng.standard_normal((n, self.dim)).astype(np.float32) / np.sqrt(self.dim)
        x = self.centres[labels] + self.spread * (z @ self.basis) + 0.1 * self.spread * iso
        return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_run(run: str, npy_dir: str, data: Synthetic, n: int, shard_rows: int, seed: int) -> np.ndarray:
    """Write a run directory (shards, manifest, run.json) and .npy copies for autofaiss; return the corpus (fp16)."""
    os.makedirs(npy_dir, exist_ok=True)
    manifest, parts = [], []
    for part, lo in enumerate(range(0, n, shard_rows)):
        rows = min(shard_rows, n - lo)
        x = data.sample(rows, seed=seed * 100_003 + part).astype(np.float16)
        parts.append(x)
        keys = [f"v{lo + i:09d}" for i in range(rows)]
        table = pa.Table.from_arrays(
            [pa.array(keys), pa.array([f"synthetic/{part}"] * rows), pa.array([None] * rows, pa.string()),
             pa.array([None] * rows, pa.string()), pa.array(np.zeros(rows, np.int32)),
             pa.array(np.zeros(rows, np.int32)), pa.array(np.zeros(rows, np.float32)),
             pa.array(np.zeros(rows, np.int16)), pa.array(np.zeros(rows, np.float32)),
             pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1), pa.float16()), data.dim)],
            schema=shard_schema(data.dim))
        storage.write_parquet(table, storage.join(run, "shards", part_name(part)))
        # autofaiss gets exactly the vectors icar reads (float16 widened to float32).
        np.save(os.path.join(npy_dir, f"part-{part:05d}.npy"), x.astype(np.float32))
        manifest.append({"source": f"synthetic/{part}", "output": f"shards/{part_name(part)}", "part": part,
                         "rows": rows, "errors": 0, "gflops": 0.0, "scorer_gflops": 0.0, "seconds": 0.0,
                         "model_seconds": 0.0, "source_size": None, "source_mtime": None, "source_etag": None,
                         "exit_counts": "{}", "complexity_mean": None, "complexity_p10": None,
                         "complexity_p50": None, "complexity_p90": None,
                         "committed_at": "2026-01-01T00:00:00+00:00"})
    storage.write_parquet(pa.Table.from_pylist(manifest, schema=MANIFEST_SCHEMA), storage.join(run, MANIFEST))
    identity = {"name": "bench-synthetic", "pretrained": "none", "weights_sha256": f"{seed:064x}",
                "embed_dim": data.dim, "image_size": 0, "num_blocks": 0}
    storage.write_json({"model": identity}, storage.join(run, RUN_JSON))
    return np.concatenate(parts)


def exact_top(queries: np.ndarray, corpus16: np.ndarray, k: int, chunk: int = 50_000) -> np.ndarray:
    """Return the exact top-k ids of ``queries`` over the corpus (float16 widened, as the index sees it)."""
    best_s = np.full((len(queries), k), -np.inf, np.float32)
    best_i = np.full((len(queries), k), -1, np.int64)
    for s in range(0, len(corpus16), chunk):
        sims = queries @ corpus16[s: s + chunk].astype(np.float32).T
        ids = np.broadcast_to(np.arange(s, s + sims.shape[1]), sims.shape)
        all_s = np.concatenate([best_s, sims], 1)
        all_i = np.concatenate([best_i, ids], 1)
        top = np.argpartition(-all_s, k - 1, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(all_s, top, 1), np.take_along_axis(all_i, top, 1)
    order = np.argsort(-best_s, axis=1)
    return np.take_along_axis(best_i, order, 1)


def recall_at(index, queries: np.ndarray, exact: np.ndarray, k: int, nprobe: int | None) -> float:
    """Return mean |approx top-k ∩ exact top-k| / k at ``nprobe``."""
    import faiss

    if nprobe is not None:
        ivf = faiss.extract_index_ivf(index)
        ivf.nprobe = nprobe
        q = faiss.downcast_index(ivf.quantizer)
        if hasattr(q, "hnsw"):
            q.hnsw.efSearch = max(16, 2 * nprobe)
    _, found = index.search(queries, k)
    return float(np.mean([len(np.intersect1d(f, e)) / k for f, e in zip(found, exact)]))


# --------------------------------------------------------------------------------------------- runners

def run_icar(run: str, out: str, args) -> dict:
    """Build with `icar index` in a child process (its own peak RSS); return index.json plus wall time."""
    cmd = [sys.executable, "-m", "jobs.index", run, "--output", out, "--max-index-memory", args.budget,
           "--no-progress", "--seed", str(args.seed), "--queries", str(args.tune_queries)]
    for flag, value in (("--max-build-memory", args.build_memory), ("--factory", args.factory),
                        ("--add-tasks", args.workers), ("--threads", args.threads)):
        if value is not None:
            cmd += [flag, str(value)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"icar index failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}")
    print(proc.stdout, flush=True)
    info = json.loads(open(os.path.join(out, "index.json")).read())
    return {"info": info, "wall_s": wall}


AUTOFAISS_SCRIPT = r"""
import json, sys, time, logging
logging.basicConfig(level=logging.WARNING)
from autofaiss import build_index
a = json.loads(sys.argv[1])
t0 = time.perf_counter()
_, infos = build_index(embeddings=a["npy_dir"], index_path=a["index_path"], index_infos_path=a["infos_path"],
                       max_index_memory_usage=a["budget"], current_memory_available=a["available"],
                       index_key=a["index_key"], index_param=a["index_param"], metric_type="ip",
                       nb_cores=a["cores"], save_on_disk=True, verbose=logging.WARNING)
wall = time.perf_counter() - t0
# VmHWM starts afresh at exec; ru_maxrss would carry the benchmark parent's peak over.
hwm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"wall_s": wall, "peak_rss": hwm, "infos": infos}, default=str))
"""


def setup_autofaiss() -> None:
    """Create bench/.venvs/autofaiss with the pinned versions (offline wheels)."""
    subprocess.run([sys.executable, "-m", "venv", AUTOFAISS_VENV], check=True)
    subprocess.run([os.path.join(AUTOFAISS_VENV, "bin", "pip"), "install", "-q", *AUTOFAISS_PINS], check=True)


def autofaiss_key(factory: str, dim: int) -> str:
    """Return the autofaiss index_key closest to icar's factory that autofaiss accepts with inner product.

    autofaiss refuses plain "IVFn,PQm" with the inner product metric; it takes "OPQm_d,IVFn[_HNSW32],PQm" and
    "Padd,IVFn_HNSW32,PQm". An icar factory without OPQ therefore maps to the Pad form (an identity remap
    and an HNSW32 coarse quantizer over the same lists): same lists, same codes, no OPQ training.
    """
    import re

    mo = re.fullmatch(r"(?:OPQ(\d+)(?:_(\d+))?,)?IVF(\d+)(_HNSW32)?,PQ(\d+)(?:x8)?", factory)
    if not mo:
        raise ValueError(f"no autofaiss equivalent of {factory}: pass --autofaiss-choice own")
    opq_m, opq_d, nlist, hnsw, m = mo.groups()
    if opq_m:
        return f"OPQ{opq_m}_{opq_d or dim},IVF{nlist}{hnsw or ''},PQ{m}"
    return f"Pad{dim},IVF{nlist}_HNSW32,PQ{m}"


def run_autofaiss(npy_dir: str, out_dir: str, args, index_key: str | None, nprobe: int) -> dict:
    """Build with autofaiss in its own venv; return its timings, memory and infos (or why it could not run)."""
    python = os.path.join(AUTOFAISS_VENV, "bin", "python")
    if not os.path.exists(python):
        return {"skipped": f"no autofaiss venv at {AUTOFAISS_VENV}: run bench/index.py --setup-autofaiss"}
    os.makedirs(out_dir, exist_ok=True)
    # autofaiss sizes are 2**20-based "MB" strings and it refuses "MiB"; same bytes as our 1024-based budget.
    budget_mb = parse_size(args.budget) / 2**20
    a = {"npy_dir": npy_dir, "index_path": os.path.join(out_dir, "knn.index"),
         "infos_path": os.path.join(out_dir, "infos.json"), "budget": f"{budget_mb:g}MB",
         # It refuses unless the memory it is told about is >= ~1.11x the index budget.
         "available": f"{max(4096, int(budget_mb * 2))}MB", "index_key": index_key,
         "index_param": None if index_key is None and not args.autofaiss_nprobe else
         f"nprobe={args.autofaiss_nprobe or nprobe},efSearch={max(16, 2 * (args.autofaiss_nprobe or nprobe))}",
         "cores": args.threads or os.cpu_count()}
    t0 = time.perf_counter()
    proc = subprocess.run([python, "-c", AUTOFAISS_SCRIPT, json.dumps(a)], capture_output=True, text=True,
                          timeout=args.autofaiss_timeout)
    if proc.returncode != 0:
        return {"skipped": f"autofaiss failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}"}
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["index_path"] = a["index_path"]
    res["total_wall_s"] = time.perf_counter() - t0
    return res


# ------------------------------------------------------------------------------------------------ main

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200_000, help="corpus vectors")
    p.add_argument("--dim", type=int, default=512, help="dimension (512: ViT-B CLIP)")
    p.add_argument("--clusters", default="200,3000",
                   help="cluster centres of the synthetic corpus; a comma list measures one corpus after another "
                        "(200: few broad clusters; 3000: many, as real embedding sets have)")
    p.add_argument("--budget", default="20M", help="--max-index-memory for both tools (1024-based)")
    p.add_argument("--build-memory", default=None, help="--max-build-memory for icar")
    p.add_argument("--factory", default=None, help="force a factory for icar (default: its own choice)")
    p.add_argument("--workers", type=int, default=None, help="icar add tasks (default: all CPUs, on a local Ray)")
    p.add_argument("--threads", type=int, default=None, help="FAISS threads (default: all cores)")
    p.add_argument("--shard-rows", type=int, default=20_000, help="rows per shard")
    p.add_argument("--queries", type=int, default=1000, help="fresh evaluation queries (not in the corpus)")
    p.add_argument("--tune-queries", type=int, default=1000, help="icar's held-out tuning queries")
    p.add_argument("--compare-nprobe", default="4,8,16,32,64,128,256,512,1024",
                   help="nprobes at which both indexes are compared (recall keeps rising past 64 on many clusters)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="where data and indexes go (default: a temp dir, removed)")
    p.add_argument("--reuse-data", action="store_true", help="reuse the corpus already in --workdir (same --n/--dim/--seed)")
    p.add_argument("--icar", action=argparse.BooleanOptionalAction, default=True, help="build with icar")
    p.add_argument("--autofaiss", action=argparse.BooleanOptionalAction, default=True, help="run autofaiss beside")
    p.add_argument("--autofaiss-choice", choices=["same", "own"], default="same",
                   help="same: autofaiss builds icar's factory; own: autofaiss picks its own (slow OPQ training)")
    p.add_argument("--autofaiss-nprobe", type=int, default=None,
                   help="fix autofaiss's nprobe (its own tuning times queries against 10 ms, so it follows the load)")
    p.add_argument("--autofaiss-timeout", type=float, default=1800.0, help="seconds before autofaiss is given up")
    p.add_argument("--setup-autofaiss", action="store_true", help="create the autofaiss venv and exit")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if args.setup_autofaiss:
        setup_autofaiss()
        return 0
    work = args.workdir or tempfile.mkdtemp(prefix="icar-bench-index-")
    os.makedirs(work, exist_ok=True)
    corpora = []
    for clusters in [int(c) for c in str(args.clusters).split(",") if c.strip()]:
        r = run_corpus(args, clusters, os.path.join(work, f"c{clusters}"))
        print_table(r)
        corpora.append(r)
        if args.json:  # after each corpus, so a long second corpus never loses the first one's figures
            with open(args.json, "w") as f:
                json.dump({"command": " ".join(sys.argv), "corpora": corpora}, f, indent=2, default=str)
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def parse_index_param(text: str | None) -> dict:
    """Return autofaiss's index_param string ("nprobe=16,efSearch=32,ht=2048") as a dict of ints."""
    out = {}
    for part in (text or "").split(","):
        if "=" in part:
            key, value = part.split("=", 1)
            out[key.strip()] = int(float(value))
    return out


def latency(index, queries: np.ndarray, k: int = 10, singles: int = 200) -> dict:
    """Return query latency at the index's current search parameters: ms per query in one batch of all
    ``queries``, and the median ms of ``singles`` one-query searches (what a search server answers)."""
    t0 = time.perf_counter()
    index.search(queries, k)
    batch = 1000 * (time.perf_counter() - t0) / len(queries)
    times = []
    for q in queries[:singles]:
        t0 = time.perf_counter()
        index.search(q[None, :], k)
        times.append(1000 * (time.perf_counter() - t0))
    return {"ms_per_query_batch": round(batch, 4), "ms_single_p50": round(float(np.median(times)), 4)}


def run_corpus(args, clusters: int, work: str) -> dict:
    """Build and measure both tools on one synthetic corpus with ``clusters`` centres; return the results."""
    import faiss

    faiss.omp_set_num_threads(args.threads or os.cpu_count() or 1)
    os.makedirs(work, exist_ok=True)
    run, npy_dir = os.path.join(work, "run"), os.path.join(work, "npy")
    data = Synthetic(args.dim, clusters, seed=args.seed)
    t0 = time.perf_counter()
    if args.reuse_data and os.path.exists(os.path.join(run, RUN_JSON)):
        corpus = np.concatenate([np.load(os.path.join(npy_dir, f)).astype(np.float16)
                                 for f in sorted(os.listdir(npy_dir))])
        if corpus.shape != (args.n, args.dim):
            raise SystemExit(f"--reuse-data: {work} holds {corpus.shape}, not ({args.n}, {args.dim})")
    else:
        shutil.rmtree(run, ignore_errors=True)
        shutil.rmtree(npy_dir, ignore_errors=True)
        corpus = write_run(run, npy_dir, data, args.n, args.shard_rows, args.seed)
    gen_s = time.perf_counter() - t0
    for name in ("icar-idx", "autofaiss-idx"):
        shutil.rmtree(os.path.join(work, name), ignore_errors=True)
    queries = data.sample(args.queries, seed=10**9 + args.seed)
    t0 = time.perf_counter()
    exact = exact_top(queries, corpus, 10)
    exact_s = time.perf_counter() - t0
    print(f"corpus: {args.n:,} x {args.dim} in {clusters} clusters in {gen_s:.1f}s; exact top-10 of {args.queries} "
          f"fresh queries in {exact_s:.1f}s; budget {args.budget} ({format_size(parse_size(args.budget))})", flush=True)
    del corpus
    results = {"n": args.n, "dim": args.dim, "clusters": clusters, "budget": args.budget, "cpus": os.cpu_count(),
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_avg_start": os.getloadavg()}

    if args.icar:
        icar = run_icar(run, os.path.join(work, "icar-idx"), args)
        info = icar["info"]
        index = faiss.read_index(os.path.join(work, "icar-idx", "index.faiss"))
        nprobe = info["nprobe"]
        compare = [int(v) for v in args.compare_nprobe.split(",")] if info["nlist"] else [None]
        by_nprobe = {str(n): recall_at(index, queries, exact, 10, n) for n in compare if n is not None
                     and n <= info["nlist"]}
        results["icar"] = {
            "tool": "icar", "factory": info["factory"], "nprobe": nprobe,
            "recall@10_fresh": recall_at(index, queries, exact, 10, nprobe),
            **latency(index, queries),  # at the tuned nprobe, which recall_at left set
            "recall@10_heldout": info["recall"]["image"]["at_nprobe"],
            "recall_by_nprobe": by_nprobe,
            "build_s": info["build_seconds"]["total"], "wall_s": icar["wall_s"], "phases_s": info["build_seconds"],
            "peak_rss_driver": info["memory"]["peak_rss_driver_bytes"],
            "peak_rss_task": info["memory"]["peak_rss_task_bytes"],
            "estimated_index_bytes": info["memory"]["estimated_index_bytes"],
            "index_bytes": info["memory"]["index_file_bytes"], "bytes_per_vector": info["bytes_per_vector"],
            "estimated_recall": info.get("estimated_recall"), "opq_training": info.get("opq_training"),
            "reasons": info["reasons"],
        }
        icar_factory, icar_nprobe = info["factory"], nprobe
    else:
        icar_factory, icar_nprobe, compare = None, None, [int(v) for v in args.compare_nprobe.split(",")]

    if args.autofaiss:
        if args.autofaiss_choice == "same":
            if icar_factory is None:
                raise SystemExit("--autofaiss-choice same needs the icar build: pass --icar or --autofaiss-choice own")
            key = autofaiss_key(icar_factory, args.dim)
        else:
            key = None
        af = run_autofaiss(npy_dir, os.path.join(work, "autofaiss-idx"), args, key, icar_nprobe or 1)
        if "skipped" in af:
            results["autofaiss"] = af
        else:
            aidx = faiss.read_index(af["index_path"])
            akey = af["infos"].get("index_key", key)
            tuned = af["infos"].get("index_param")
            a_ivf = None
            try:
                a_ivf = faiss.extract_index_ivf(aidx)
            except RuntimeError:
                pass
            by_nprobe = {str(n): recall_at(aidx, queries, exact, 10, n) for n in compare
                         if n is not None and a_ivf is not None and n <= a_ivf.nlist}
            if tuned:  # its own setting (nprobe, the HNSW quantizer's efSearch, ht), as it chose or was given
                faiss.ParameterSpace().set_index_parameters(aidx, tuned)
            results["autofaiss"] = {
                "tool": "autofaiss", "factory": akey, "index_param": tuned,
                "nprobe": parse_index_param(tuned).get("nprobe", a_ivf.nprobe if a_ivf else None),
                "recall@10_fresh": recall_at(aidx, queries, exact, 10, None),
                **latency(aidx, queries),
                "recall_by_nprobe": by_nprobe,
                "build_s": af["wall_s"], "wall_s": af["total_wall_s"], "peak_rss_driver": af["peak_rss"],
                "index_bytes": os.path.getsize(af["index_path"]),
                "bytes_per_vector": os.path.getsize(af["index_path"]) / max(1, aidx.ntotal),
                "infos": af["infos"],
            }
    results["load_avg_end"] = os.getloadavg()
    return results


def print_table(r: dict) -> None:
    """Print the side-by-side comparison of one corpus."""
    rows = [r[t] for t in ("icar", "autofaiss") if "tool" in r.get(t, {})]
    print(f"\n{r['n']:,} x {r['dim']} vectors in {r['clusters']} clusters, --max-index-memory {r['budget']}, "
          f"{r['cpus']} CPUs, {r['date']} (load average {r['load_avg_start'][0]:.1f} -> {r['load_avg_end'][0]:.1f})")
    print(f"{'tool':<10} {'factory':<34} {'nprobe':>6} {'recall@10':>9} {'ms/q batch':>10} {'ms/q one':>8} "
          f"{'build s':>8} {'peak RSS':>9} {'bytes/vec':>9} {'index':>8}")
    for x in rows:
        print(f"{x['tool']:<10} {str(x['factory']):<34} {str(x['nprobe']):>6} {x['recall@10_fresh']:>9.3f} "
              f"{x['ms_per_query_batch']:>10.3f} {x['ms_single_p50']:>8.3f} "
              f"{x['build_s']:>8.1f} {format_size(x['peak_rss_driver']):>9} {x['bytes_per_vector']:>9.1f} "
              f"{format_size(x['index_bytes']):>8}")
    for x in rows:
        if x["recall_by_nprobe"]:
            print(f"{x['tool']:<10} recall@10 by nprobe: "
                  + ", ".join(f"{k}: {v:.3f}" for k, v in x["recall_by_nprobe"].items()))
    if "icar" in r:
        print("icar phases: " + ", ".join(f"{k} {v:.1f}s" for k, v in r["icar"]["phases_s"].items()))
        print(f"icar peak RSS: driver {format_size(r['icar']['peak_rss_driver'])}, add task "
              f"{format_size(r['icar']['peak_rss_task'])}; estimated index "
              f"{format_size(r['icar']['estimated_index_bytes'])}, estimated recall {r['icar']['estimated_recall']}")
    if "skipped" in r.get("autofaiss", {}):
        print(f"autofaiss: skipped: {r['autofaiss']['skipped']}")

if __name__ == "__main__":
    raise SystemExit(main())
