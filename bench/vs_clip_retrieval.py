"""Benchmark: `icar embed` beside clip-retrieval's `clip inference`, same images, same model, same batch, one run.

The peer is what users run today to embed a WebDataset corpus with CLIP. Both tools get:
- the same photo-like 500x375 JPEG tars (bench.common.make_corpus; WebDataset layout);
- the same architecture AND weights: ViT-B-32 with ICAR's seeded random init (seed 0), saved as a state_dict .pt
  that clip-retrieval loads as `open_clip:ViT-B-32//ABS/PATH.pt` (no download anywhere);
- the same batch size, full depth, image tower only (`enable_text=False`), the same model threads
  (OMP_NUM_THREADS for the peer's main process, `--threads` for ICAR's actor) and two decode workers each.
The embeddings must agree (cosine ~ 1 for every image at full depth): that is what makes the rates comparable.

Variants, interleaved (A B C, C B A, ...), each a fresh process under a timeout:
- clip-retrieval  its inference main() (what the `clip-retrieval inference` CLI calls), in its own virtualenv;
- icar full       `icar embed --full-depth --scorer none` (the same work as the peer);
- icar routed     `icar embed --scorer heuristic --route-fractions F` over the default exits (routing on: the
                  scorer runs and its GFLOPs are counted; the fraction router fixes the depth mix).

Rates, all images/s, each tool judged by the same kind of clock:
- steady: images / the model loop's span. clip-retrieval: the sum of its per-batch total_duration (read wait +
  inference + write, from its own stats/*.json; its printed samples/s is wrong beyond one batch). ICAR: from the
  start of the model actor's first batch to the end of its last (a timed subclass of the actor logs them).
- model only: images / summed model time per batch (peer: inference_duration; ICAR: the actor's embed time).
- wall minus start: images / (wall - start-up), start-up = process start to the model loop's first batch (peer: the
  time its "done warming up" line arrived; ICAR: the actor's first batch); the end (flush, exit) stays in.
- whole run: images / process wall time, fixed start costs included (Python + imports, Ray, model build, warm-up).
CPU seconds of each whole process tree (sampled from /proc every 0.5 s) are reported beside them: per image over the
whole run, and marginal (run minus a run of the same tool on a tiny 2-image corpus, divided by the extra images):
CPU time is disturbed far less than wall time by the other work on a shared machine.

If the peer cannot be installed or run here, `--peer minimal` compares against a faithful minimal equivalent of its
loop (WebDataset reader -> open_clip preprocess in DataLoader workers -> encode_image -> fp16 .npy), labelled so.

    python -m bench.vs_clip_retrieval --setup        # create bench/.venvs/clip-retrieval (~5 min, offline wheels)
    python -m bench.vs_clip_retrieval                # 128 images, batch 32, 2 interleaved rounds
    python -m bench.vs_clip_retrieval --n 512 --repeats 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import (CACHE_DIR, CpuTracker, batch_window, interleaved, load_average, machine_facts,  # noqa: E402
                          make_corpus, median, print_facts, spread, write_json)
from pipeline.io.shards import read_run_table  # noqa: E402
from pipeline.model.models import load_clip  # noqa: E402

PEER_VENV = ROOT / "bench" / ".venvs" / "clip-retrieval"
# Versions that install and run offline here (ENVIRONMENT.md): clip-retrieval 2.45 wants numpy<2, pyarrow<16,
# open_clip_torch<3 and pkg_resources (setuptools<81); torch/torchvision are the ones on this machine's disk.
PEER_PINS = ["clip-retrieval==2.45.0", "numpy<2", "pyarrow<16", "open_clip_torch<3", "setuptools<81",
             "torch==2.14.1", "torchvision==0.29.1"]

# Runs clip-retrieval's inference main() exactly as its CLI would (`clip-retrieval inference` is fire.Fire over it);
# calling it from Python avoids fire's parsing of brace patterns and absolute paths.
PEER_SCRIPT = textwrap.dedent("""
    import json, sys
    from clip_retrieval.clip_inference.main import main
    main(**json.loads(sys.argv[1]))
""")

# A faithful minimal equivalent of clip-retrieval's inference loop, for machines where the peer cannot run:
# webdataset-style tar reading and open_clip's own preprocess in DataLoader worker processes, encode_image,
# L2 normalisation, fp16 .npy and a key list. Runs in ICAR's environment (open_clip, torch); labelled "minimal".
MINIMAL_SCRIPT = textwrap.dedent("""
    import io, json, sys, tarfile, time
    import numpy as np, torch, open_clip
    from PIL import Image
    cfg = json.loads(sys.argv[1])
    model, _, preprocess = open_clip.create_model_and_transforms(cfg["model"], pretrained=None)
    model.load_state_dict(torch.load(cfg["checkpoint"], weights_only=True))
    model.eval()
    print("model ready", flush=True)

    class Tars(torch.utils.data.IterableDataset):
        def __iter__(self):
            info = torch.utils.data.get_worker_info()
            mine = cfg["tars"][info.id::info.num_workers] if info else cfg["tars"]
            for path in mine:
                with tarfile.open(path) as tar:
                    for m in tar:
                        if m.name.endswith(".jpg"):
                            img = Image.open(io.BytesIO(tar.extractfile(m).read()))
                            yield m.name[:-4], preprocess(img)

    loader = torch.utils.data.DataLoader(Tars(), batch_size=cfg["batch_size"], num_workers=cfg["workers"])
    stats = {"sample_count": 0, "total_duration": 0.0, "inference_duration": 0.0, "read_duration": 0.0,
             "write_duration": 0.0}
    embs, keys = [], []
    it = iter(loader)
    while True:
        t0 = time.perf_counter()
        try:
            k, x = next(it)
        except StopIteration:
            break
        t1 = time.perf_counter()
        with torch.no_grad():
            f = model.encode_image(x)
            f /= f.norm(dim=-1, keepdim=True)
        t2 = time.perf_counter()
        embs.append(f.to(torch.float16).numpy()); keys += list(k)
        t3 = time.perf_counter()
        stats["sample_count"] += len(k); stats["read_duration"] += t1 - t0; stats["inference_duration"] += t2 - t1
        stats["write_duration"] += t3 - t2; stats["total_duration"] += t3 - t0
    np.save(cfg["output"] + "/img_emb_0.npy", np.concatenate(embs))
    json.dump({"keys": keys, "stats": stats}, open(cfg["output"] + "/result.json", "w"))
""")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.vs_clip_retrieval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=128, help="images in the corpus")
    p.add_argument("--per-shard", type=int, default=64,
                   help="images per tar (the peer hangs with fewer tars than workers)")
    p.add_argument("--model", default="ViT-B-32", help="open_clip architecture, both tools (seeded random init)")
    p.add_argument("--batch-size", type=int, default=32, help="images per model call, both tools")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16", "auto"],
                   help="ICAR's precision in the full and routed variants (the peer picks bf16, else fp16, on a GPU by "
                        "itself; fp32 on CPU)")
    p.add_argument("--no-routed", action="store_true",
                   help="leave out the routed variant (the peer has no counterpart; saves a third of the time)")
    p.add_argument("--auto", action="store_true",
                   help="add the variant icar_auto: full depth with `--precision auto` (bf16 where the CPU runs it "
                        "natively), judged against the peer's fp32 rate and embeddings")
    p.add_argument("--stock-kernels", action="store_true",
                   help="add the variant icar_stock: icar_full with ICAR_CPU_KERNELS=torch (open_clip's own block "
                        "forward instead of the oneDNN kernels), to show what the kernels add")
    p.add_argument("--threads", type=int, default=1,
                   help="model intra-op threads, both tools (ICAR's CPU actor default)")
    p.add_argument("--workers", type=int, default=2,
                   help="decode workers: the peer's num_prepro_workers, ICAR's --decode-tasks")
    p.add_argument("--route-fractions", default="0.3,0.3,0.4", help="ICAR routed variant: share per exit (6, 9, 12)")
    p.add_argument("--repeats", type=int, default=2, help="interleaved rounds of the three variants")
    p.add_argument("--timeout", type=float, default=900,
                   help="seconds before a run is killed (the peer hangs on errors)")
    p.add_argument("--peer", choices=["clip-retrieval", "minimal"], default="clip-retrieval",
                   help="the real peer, or the faithful minimal equivalent of its loop (labelled as such)")
    p.add_argument("--setup", action="store_true", help=f"create the peer's virtualenv at {PEER_VENV} and exit")
    p.add_argument("--no-fixed-cost", action="store_true", help="skip the tiny-corpus runs that measure fixed costs")
    p.add_argument("--json", default=None, help="also write the results as JSON here")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------ peer environment

def setup_peer(timeout: float = 1800) -> None:
    """Create the peer's virtualenv with the pins that install offline here."""
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(PEER_VENV)], check=True, timeout=300)
    subprocess.run([str(PEER_VENV / "bin" / "pip"), "install", "-q", *PEER_PINS], check=True, timeout=timeout)


def peer_problem() -> str | None:
    """Return why the peer cannot run here (no venv, import fails), or None when it can."""
    py = PEER_VENV / "bin" / "python"
    if not py.exists():
        return f"no virtualenv at {PEER_VENV}: run `python -m bench.vs_clip_retrieval --setup`"
    r = subprocess.run([str(py), "-c", "import clip_retrieval.clip_inference.main, open_clip, torch; "
                        "print(open_clip.__version__, torch.__version__)"], capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        return f"clip-retrieval does not import in {PEER_VENV}: {r.stderr.strip().splitlines()[-1:]}"
    return None


def peer_versions() -> dict:
    py = str(PEER_VENV / "bin" / "python")
    code = ("import importlib.metadata as m; import json; print(json.dumps({p: m.version(p) for p in "
            "['clip-retrieval', 'open_clip_torch', 'torch', 'torchvision', 'webdataset', 'numpy', 'pyarrow']}))")
    r = subprocess.run([py, "-c", code], capture_output=True, text=True, timeout=300)
    return json.loads(r.stdout) if r.returncode == 0 else {"error": r.stderr[-300:]}


# ------------------------------------------------------------------------------------------------ running

def run_process(cmd: list[str], env: dict, timeout: float, log_path: Path) -> dict:
    """Run ``cmd`` in its own session under ``timeout``; return wall, CPU of its whole process tree, its output lines.

    CPU is sampled from /proc (CpuTracker): getrusage of reaped children would miss the Ray workers, whose times the
    raylet does not collect, and so flatter ICAR. Each output line is kept with the seconds since the start at which it
    arrived (the peer's own log says when its model is loaded and warmed up: the end of its start-up).
    """
    import threading

    lines: list[tuple[float, str]] = []
    t0, e0 = time.perf_counter(), time.time()
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, text=True, errors="replace")

    def pump():
        with open(log_path, "w") as log:
            for line in proc.stdout:
                at = time.perf_counter() - t0
                lines.append((at, line.rstrip("\n")))
                log.write(f"[{at:8.2f}s] {line}")

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    with CpuTracker(root=proc.pid) as cpu:
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the process group this call started, nothing else
            proc.wait()
            rc = "timeout"
    reader.join(timeout=30)
    return {"wall": time.perf_counter() - t0, "epoch_start": e0, "cpu": cpu.total, "rc": rc, "log": str(log_path),
            "lines": lines}


def base_env(threads: int | None = None) -> dict:
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)  # ICAR must start its own embedded Ray, never join a neighbour's
    # Ray runs its workers at nice 15 by default; the peer runs at nice 0. On a shared machine that alone would
    # decide the race: ICAR's workers get the same priority as the peer (see bench.common.same_priority_as_peers).
    env["RAY_worker_niceness"] = "0"
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def run_peer(args, tars: list[str], checkpoint: str, out: Path, kind: str) -> dict:
    """Run clip-retrieval (or the minimal loop) once into ``out``; return timings and its per-batch stats."""
    out.mkdir(parents=True)
    if kind == "clip-retrieval":
        # one brace pattern, as its CLI expects for WebDataset input (main() brace-expands it)
        folder = os.path.dirname(tars[0])
        names = [os.path.basename(t)[:-4] for t in tars]
        pattern = f"{folder}/{{{names[0]}..{names[-1]}}}.tar" if len(names) > 1 else tars[0]
        cfg = {"input_dataset": pattern, "output_folder": str(out / "out"), "input_format": "webdataset",
               "batch_size": args.batch_size, "num_prepro_workers": min(args.workers, len(tars)),
               "enable_text": False, "enable_image": True, "enable_metadata": False,
               "clip_model": f"open_clip:{args.model}/{checkpoint}", "wds_number_file_per_input_file": 10000}
        cmd = [str(PEER_VENV / "bin" / "python"), "-c", PEER_SCRIPT, json.dumps(cfg)]
    else:
        cfg = {"tars": tars, "model": args.model, "checkpoint": checkpoint, "batch_size": args.batch_size,
               "workers": min(args.workers, len(tars)), "output": str(out)}
        cmd = [str(ROOT / ".venv" / "bin" / "python"), "-c", MINIMAL_SCRIPT, json.dumps(cfg)]
    r = run_process(cmd, base_env(args.threads), args.timeout, out / "log.txt")
    if r["rc"] != 0:
        raise RuntimeError(f"{kind} run failed ({r['rc']}); log: {tail(r['log'])}")
    if kind == "clip-retrieval":
        stats_files = sorted((out / "out" / "stats").glob("*.json"))
        stats = {}
        for f in stats_files:
            for k, v in json.loads(f.read_text()).items():
                stats[k] = stats.get(k, 0) + v
    else:
        stats = json.loads((out / "result.json").read_text())["stats"]
    # start-up ends when the model is loaded and warmed up; the loop follows (clip-retrieval prints this line)
    marks = [at for at, line in r["lines"] if line.startswith(("done warming up", "model ready"))]
    r.update({"images": int(stats["sample_count"]), "loop_seconds": stats["total_duration"],
              "model_seconds": stats["inference_duration"], "read_wait_seconds": stats["read_duration"],
              "start_seconds": marks[-1] if marks else float("nan")})
    del r["lines"]
    return r


def run_icar(args, tars: list[str], out: Path, routed: bool, precision: str | None = None,
             stock_kernels: bool = False) -> dict:
    """Run `icar embed` (jobs.embed, with a timed model actor) once into ``out``; return timings and batch window."""
    out.mkdir(parents=True)
    batches = out / "batches.log"
    cmd = [str(ROOT / ".venv" / "bin" / "python"), "-m", "bench.common", "timed-embed", str(batches), *tars,
           "--output", str(out / "run"), "--model", args.model, "--pretrained", "none", "--seed", "0",
           "--precision", precision or args.precision,
           "--batch-size", str(args.batch_size), "--threads", str(args.threads),
           "--decode-tasks", str(min(args.workers, len(tars))), "--no-progress"]
    cmd += ["--scorer", "heuristic", "--route-fractions", args.route_fractions] if routed else \
        ["--scorer", "none", "--full-depth"]
    env = base_env()
    if stock_kernels:
        env["ICAR_CPU_KERNELS"] = "torch"
    else:
        env.pop("ICAR_CPU_KERNELS", None)
    r = run_process(cmd, env, args.timeout, out / "log.txt")
    if r["rc"] != 0:
        raise RuntimeError(f"icar run failed ({r['rc']}); log: {tail(r['log'])}")
    w = batch_window(str(batches))
    r.update({"images": w["images"], "loop_seconds": w["window"], "model_seconds": w["busy"],
              "start_seconds": w["first"] - r["epoch_start"]})
    del r["lines"]
    return r


def tail(path: str, lines: int = 15) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError as e:
        return f"(no log: {e})"


# ------------------------------------------------------------------------------------------------ fairness

def save_checkpoint(model: str) -> str:
    """Save ICAR's seeded random init (seed 0) of ``model`` as a state_dict .pt; return its absolute path."""
    import torch

    path = CACHE_DIR / f"{model}-none-seed0.pt"
    if not path.exists():
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        bundle = load_clip(model, "none", seed=0)
        tmp = path.with_suffix(".tmp")
        torch.save(bundle.model.state_dict(), tmp)
        tmp.rename(path)
    return str(path.resolve())


def peer_embeddings(out: Path, kind: str) -> dict[str, np.ndarray]:
    """Return the peer's embeddings by key."""
    import pyarrow.parquet as pq

    if kind == "clip-retrieval":
        emb = np.concatenate([np.load(f) for f in sorted((out / "out" / "img_emb").glob("*.npy"))])
        keys = []
        for f in sorted((out / "out" / "metadata").glob("*.parquet")):
            keys += pq.read_table(f).column("image_path").to_pylist()
    else:
        emb = np.load(out / "img_emb_0.npy")
        keys = json.loads((out / "result.json").read_text())["keys"]
    return dict(zip(keys, emb.astype(np.float32)))


def icar_embeddings(out: Path) -> dict[str, np.ndarray]:
    t = read_run_table(str(out / "run"), columns=["key", "embedding"])
    emb = np.asarray(t.column("embedding").combine_chunks().flatten(), np.float32).reshape(t.num_rows, -1)
    return dict(zip(t.column("key").to_pylist(), emb))


def agreement(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict:
    """Return cosine statistics between two embedding sets on their common keys."""
    common = sorted(set(a) & set(b))
    if not common:
        return {"common": 0}
    x = np.stack([a[k] for k in common])
    y = np.stack([b[k] for k in common])
    cos = (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))
    return {"common": len(common), "only_icar": len(set(a) - set(b)), "only_peer": len(set(b) - set(a)),
            "cosine_min": float(cos.min()), "cosine_mean": float(cos.mean())}


# ------------------------------------------------------------------------------------------------ main

def rates(r: dict, n: int, tiny: dict | None) -> dict:
    """Return a run's images/s by each clock, and CPU ms per image (whole run, and marginal over the tiny run)."""
    out = {"steady": r["images"] / r["loop_seconds"], "model_only": r["images"] / r["model_seconds"],
           "wall_minus_start": n / (r["wall"] - r["start_seconds"]), "whole_run": n / r["wall"],
           "cpu_ms_per_img": 1e3 * r["cpu"] / n}
    if tiny is not None:  # the tiny run pays the same fixed costs: the difference is what the images cost
        out["marginal_cpu_ms_per_img"] = 1e3 * (r["cpu"] - tiny["cpu"]) / (n - tiny["images"])
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.setup:
        setup_peer()
        print(peer_problem() or f"clip-retrieval ready in {PEER_VENV}: {peer_versions()}")
        return 0
    facts = machine_facts()
    print_facts(facts)
    t_start = time.perf_counter()
    peer_kind = args.peer
    why_not = peer_problem() if peer_kind == "clip-retrieval" else None
    if why_not:
        print(f"# clip-retrieval cannot run here: {why_not}\n# comparing against the MINIMAL EQUIVALENT of its loop")
        peer_kind = "minimal"
    peer_label = "clip-retrieval 2.45" if peer_kind == "clip-retrieval" else "minimal clip-retrieval-like loop"
    facts["peer"] = peer_versions() if peer_kind == "clip-retrieval" else {"peer": "minimal equivalent loop"}
    print(f"# peer: {peer_label} {facts['peer']}")
    corpus = make_corpus(args.n, args.per_shard)
    tiny = make_corpus(2, 1, seed=1)  # two tars of one image: the peer needs >= as many tars as workers
    checkpoint = save_checkpoint(args.model)
    print(f"# corpus {len(corpus.keys)} JPEGs 500x375 (mean {corpus.mean_kb:.0f} KB) in {len(corpus.tars)} tars; "
          f"{args.model} seed-0 weights at {checkpoint}; batch {args.batch_size}, {args.threads} model thread(s), "
          f"{args.workers} decode workers")
    work = Path(tempfile.mkdtemp(prefix="icar-bench-vscr-"))
    names = ["peer", "icar_full"] + ([] if args.no_routed else ["icar_routed"]) + (["icar_auto"] if args.auto else []) \
        + (["icar_stock"] if args.stock_kernels else [])

    def run(name: str, tars: list[str], tag: str) -> dict:
        out = work / f"{name}-{tag}"
        if name == "peer":
            return run_peer(args, tars, checkpoint, out, peer_kind)
        return run_icar(args, tars, out, routed=name == "icar_routed",
                        precision="auto" if name == "icar_auto" else None, stock_kernels=name == "icar_stock")

    tiny_runs = {}
    if not args.no_fixed_cost:
        for name in ("peer", "icar_full"):
            r = run(name, tiny.tars, "tiny")
            tiny_runs[name] = r
            print(f"  fixed cost {name:12s} {r['wall']:6.1f}s wall ({r['start_seconds']:.1f}s before the first batch), "
                  f"{r['cpu']:6.1f}s CPU (2 images)")
        tiny_runs["icar_routed"] = tiny_runs["icar_auto"] = tiny_runs["icar_stock"] = tiny_runs["icar_full"]
    results: dict[str, list[dict]] = {k: [] for k in names}
    equal = equal_auto = None
    for i, name in enumerate(interleaved(names, args.repeats)):
        r = run(name, corpus.tars, str(i))
        r.update(index=str(i), load_average=load_average(), rates=rates(r, args.n, tiny_runs.get(name)))
        results[name].append(r)
        print(f"  run {i + 1}: {name:12s} steady {r['rates']['steady']:6.2f} img/s, model only "
              f"{r['rates']['model_only']:6.2f}, whole run {r['rates']['whole_run']:6.2f} ({r['wall']:.0f}s wall, "
              f"{r['cpu']:.0f}s CPU)  load {r['load_average'][0]}")
        if equal is None and results["peer"] and results["icar_full"]:  # same images, same weights: cosine ~ 1?
            equal = agreement(icar_embeddings(work / f"icar_full-{results['icar_full'][0]['index']}"),
                              peer_embeddings(work / f"peer-{results['peer'][0]['index']}", peer_kind))
            print(f"  embeddings at full depth, icar vs peer: {equal}")
        if equal_auto is None and results["peer"] and results.get("icar_auto"):
            equal_auto = agreement(icar_embeddings(work / f"icar_auto-{results['icar_auto'][0]['index']}"),
                                   peer_embeddings(work / f"peer-{results['peer'][0]['index']}", peer_kind))
            print(f"  embeddings at full depth, icar --precision auto vs peer (fp32): {equal_auto}")

    med = {k: {m: median(r["rates"][m] for r in v) for m in v[0]["rates"]} for k, v in results.items()}
    print(f"\n{peer_label} vs icar embed: {args.model} (same seed-0 weights), batch {args.batch_size}, {args.n} images, "
          f"{args.repeats} interleaved rounds (medians)")
    print(f"  embeddings at full depth, icar vs peer: {equal}")
    if equal_auto is not None:
        print(f"  embeddings at full depth, icar --precision auto vs peer: {equal_auto}")
    cols = ["steady", "model_only", "wall_minus_start", "whole_run", "cpu_ms_per_img", "marginal_cpu_ms_per_img"]
    cols = [c for c in cols if c in med["peer"]]
    print("  " + f"{'':16s}" + "".join(f"{c:>18s}" for c in cols))
    for k in names:
        print("  " + f"{k:16s}" + "".join(f"{med[k][c]:18.2f}" for c in cols))
    ratios = {}
    for k in names[1:]:
        ratios[k] = {c: (med["peer"][c] / med[k][c] if "cpu" in c else med[k][c] / med["peer"][c]) for c in cols}
        print("  " + f"{k + ' ÷ peer':16s}" + "".join(f"{ratios[k][c]:17.3f}x" for c in cols))
    print("  (CPU ratios are peer ÷ icar: above 1 means icar spends less CPU per image)")
    print("  wall spread: " + ", ".join(f"{k} {spread(r['wall'] for r in v)}s" for k, v in results.items()))
    print(f"# total bench time {time.perf_counter() - t_start:.0f}s, load average now {load_average()}")
    write_json(args.json, {"facts": facts, "args": vars(args), "peer": peer_label, "tiny_runs": tiny_runs,
                           "runs": results, "medians": med, "ratios_vs_peer": ratios, "agreement": equal,
                           "agreement_auto": equal_auto})
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
