"""Benchmark: how close does end-to-end `icar embed` come to the bare model, and where does the rest go?

On a WebDataset corpus of photo-like 500x375 JPEGs (generated once, cached), side by side in one run:

- bare:  ``ModelWorker.embed`` (scorer + router + adaptive encoder, exactly what a model actor runs) on the same
         already-decoded batches, grouped as the shard tasks group them, so the depth mix is the same;
- e2e:   ``run_embed`` (what `icar embed` runs) on the tars: read, decode, batches queued at a Ray model actor,
         Parquet shard commit, manifest. Ray is started once beforehand (its start is not `icar embed`'s work);
         model actors start inside every run. Two rates: the whole run (actor start, first decode and last commit
         included: fixed costs a big corpus amortises) and the model window, from the start of the actor's first
         batch to the end of its last (the steady state; gaps where the actor starves for input count against it).

Passes are interleaved (bare, e2e, e2e, bare, ...) and medians reported; wall time and CPU time are both given
(CPU time of the driver's whole process tree for e2e: Ray's own processes and the workers included), because
on a shared machine wall time also measures the neighbours.

Then it profiles the shard task in-process (``process_shard`` with a local model, cProfile on CPU time) and
times ``decode_image`` per image on one core, and reports where the time goes (read, JPEG decode, resize,
batch assembly, scorer, pixels->tensor, encoder, write) plus the sizing figure: decode CPUs per model actor
for the model to be busy >= 0.85 of the time.

    python -m bench.pipeline                            # ViT-B-32 random init, batch 32, heuristic scorer
    python -m bench.pipeline --n 256 --repeats 3 --route-fractions 0.3,0.3,0.4 --json out.json

With ``--cli`` it measures what a user waits for instead: `icar embed` as a command in a fresh interpreter
(Python start, imports, Ray's start, the model actor's start, the run, Ray's shutdown), interleaved with the bare
model on the same batches, and the same command again with nothing left to do (the resume). ``--tree NAME=DIR``
runs the same command from other source trees instead (e.g. ``git archive`` of two commits), interleaved, so a
change to start-up is measured side by side with the code before it:

    git archive C~1 | tar -x -C /tmp/before; git archive C | tar -x -C /tmp/after
    python -m bench.pipeline --cli --n 256 --per-shard 64 --scorer default --torch-threads 2 --cpus-per-actor 2 \\
        --tree before=/tmp/before --tree after=/tmp/after --repeats 2

(Run it as a module from the repository root: `python bench/pipeline.py` would shadow the `pipeline` package.)
"""

from __future__ import annotations

import sys
from pathlib import Path

# This file is named like the project's package: make sure `import pipeline` finds the package, not this file.
_ROOT = str(Path(__file__).resolve().parent.parent)
sys.path[:] = [_ROOT] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import cProfile  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import pstats  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from bench.common import (batch_window, interleaved, load_average, machine_facts, make_corpus, median,  # noqa: E402
                          print_facts, same_priority_as_peers, spread, timed, timed_run_embed, write_json)
from pipeline.embed import execution  # noqa: E402
from pipeline.embed.config import EmbedConfig  # noqa: E402
from pipeline.embed.execution import ModelFacts, process_shard  # noqa: E402
from pipeline.io.decode import DecodeConfig, decode_image, resize_center_crop  # noqa: E402
from pipeline.io.readers import expand_inputs, iter_samples  # noqa: E402
from pipeline.model.encoder import AdaptiveEncoder  # noqa: E402
from pipeline.model.spec import ModelSpec  # noqa: E402
from pipeline.model.worker import ModelWorker  # noqa: E402

# Target: end-to-end >= 0.85 of the bare model's rate once decode capacity matches.
BUSY_TARGET = 0.85


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=96, help="images in the corpus")
    p.add_argument("--per-shard", type=int, default=32, help="images per tar shard")
    p.add_argument("--model", default="ViT-B-32", help="open_clip model name")
    p.add_argument("--pretrained", default="none", help="tag, checkpoint, or none (seeded random init)")
    p.add_argument("--batch-size", type=int, default=32, help="images per model call")
    p.add_argument("--scorer", default="heuristic", choices=["heuristic", "none", "convnext", "default"])
    p.add_argument("--route-fractions", default=None,
                   help="share of images per exit (e.g. 0.3,0.3,0.4); default: every image at full depth")
    p.add_argument("--torch-threads", type=int, default=1,
                   help="intra-op threads of the model (the actor's default on CPU is 1)")
    p.add_argument("--repeats", type=int, default=2, help="timed passes of each of bare and e2e (interleaved)")
    p.add_argument("--no-profile", action="store_true", help="skip the in-process profile of a shard task")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--compile", action="store_true",
                   help="also time the bare model with torch.compile'd encoder (GPU procedure: does compiling pay?)")
    p.add_argument("--json", default=None, help="also write the results as JSON here")
    p.add_argument("--cli", action="store_true",
                   help="measure `icar embed` as a command in a fresh interpreter (start-up included) and its resume")
    p.add_argument("--cpus-per-actor", type=float, default=1.0, help="--cli: the command's --cpus-per-actor")
    p.add_argument("--tree", action="append", default=[], metavar="NAME=DIR",
                   help="--cli: run the command from the source tree DIR (e.g. an earlier commit), as NAME, instead "
                        "of from this tree; repeat it to compare trees")
    return p.parse_args(argv)


def spec_from(args):
    fractions = [float(f) for f in args.route_fractions.split(",")] if args.route_fractions else None
    return ModelSpec(model=args.model, pretrained=args.pretrained, scorer=args.scorer, route_fractions=fractions,
                     full_depth=fractions is None, device=args.device, precision=args.precision,
                     torch_threads=args.torch_threads)


def decoded_batches(corpus, image_size: int, batch_size: int) -> list[tuple[np.ndarray, list[str]]]:
    """Return the corpus decoded and grouped into batches the way shard tasks group them (per shard, in order)."""
    cfg = DecodeConfig(image_size=image_size)
    per_shard: dict[str, list[str]] = {}
    for k in corpus.keys:
        per_shard.setdefault(k[:5], []).append(k)
    batches = []
    for keys in per_shard.values():
        for lo in range(0, len(keys), batch_size):
            ks = keys[lo:lo + batch_size]
            batches.append((np.stack([decode_image(corpus.jpeg_bytes[k], cfg).pixels for k in ks]), ks))
    return batches


def bare_pass(worker, batches, encoder=None) -> dict:
    """Time ModelWorker.embed over every batch (with ``encoder`` swapped in if given); return wall/CPU s and images."""
    out = {"images": sum(len(k) for _, k in batches)}
    original = worker.encoder
    worker.encoder = encoder or original
    try:
        with timed(out):
            for px, keys in batches:
                worker.embed(px, keys)
    finally:
        worker.encoder = original
    return out


def e2e_pass(cfg_kwargs: dict, workdir: str, index: int) -> dict:
    """Run run_embed once into a fresh run directory; return whole-run and model-window wall/CPU and model-busy.

    The model window runs from the start of the actor's first batch to the end of its last: the steady state,
    without the fixed costs of a run (actor start, first decode, last commit) that a large corpus amortises.
    """
    out_dir = os.path.join(workdir, f"e2e-{index}")
    result = timed_run_embed(EmbedConfig(output=out_dir, **cfg_kwargs), os.path.join(workdir, f"e2e-{index}.batches"))
    shutil.rmtree(out_dir, ignore_errors=True)
    return result


def cli_args(args, tars: list[str], output: str) -> list[str]:
    """Return the `icar embed` arguments of a --cli pass (every option explicit: the trees' defaults may differ)."""
    route = ["--route-fractions", args.route_fractions] if args.route_fractions else ["--full-depth"]
    return [*tars, "--output", output, "--model", args.model, "--pretrained", args.pretrained, *route,
            "--scorer", args.scorer, "--batch-size", str(args.batch_size),
            "--cpus-per-actor", f"{args.cpus_per_actor:g}",
            "--device", args.device, "--precision", args.precision, "--no-progress"]


def cli_pass(args, tree: str, tars: list[str], workdir: str, index: int) -> dict:
    """Run `icar embed` from source tree ``tree`` in a fresh interpreter, then again with nothing to do; return the
    whole command's wall time, the model window (first batch start to last batch end), and the resume's wall time."""
    out = os.path.join(workdir, f"cli-{index}")
    log_path = os.path.join(workdir, f"cli-{index}.batches")
    cmd = [sys.executable, "-m", "bench.common", "timed-embed", log_path, *cli_args(args, tars, out)]
    env = dict(os.environ, PYTHONPATH=tree, RAY_USAGE_STATS_ENABLED="0")
    result: dict = {}
    t0 = time.time()
    with timed(result, tree=True):
        p = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=3600)
    t1 = time.time()
    if p.returncode != 0:
        raise RuntimeError(f"icar embed from {tree} exited {p.returncode}: {p.stderr[-3000:]}")
    w = batch_window(log_path)
    run_json = json.loads(Path(out, "run.json").read_text())
    # What the driver waited for, where the tree records it (plan, ray, model; absent in older trees).
    result["startup_seconds"] = (run_json.get("invocations") or [{}])[0].get("startup_seconds")
    with timed() as resume:
        again = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=3600)
    if again.returncode != 0:
        raise RuntimeError(f"the resume from {tree} exited {again.returncode}: {again.stderr[-3000:]}")
    shutil.rmtree(out, ignore_errors=True)
    result.update(images=w["images"], until_first_batch=w["first"] - t0, after_last_batch=t1 - w["last"],
                  window_wall=w["window"], model_busy=w["busy"] / w["window"], resume_wall=resume["wall"],
                  summary=[line for line in p.stdout.splitlines() if line.startswith("icar embed:")][-1:])
    return result


def cli_main(args, facts: dict, corpus, worker, batches) -> int:
    """--cli: interleave the bare model with `icar embed` commands (this tree and every --tree); print the ratios."""
    trees = {} if args.tree else {"cli": _ROOT}  # with --tree, only the trees named (e.g. before=..., after=...)
    for spec in args.tree:
        name, _, directory = spec.partition("=")
        if not directory or not os.path.isdir(directory):
            raise SystemExit(f"--tree {spec}: give NAME=DIR with DIR a source tree (e.g. `git archive` of a commit)")
        trees[f"cli:{name}"] = os.path.abspath(directory)
    workdir = tempfile.mkdtemp(prefix="icar-bench-cli-")
    variants = ["bare", *trees]
    results: dict[str, list[dict]] = {k: [] for k in variants}
    try:
        for i, name in enumerate(interleaved(variants, args.repeats)):
            r = bare_pass(worker, batches) if name == "bare" else cli_pass(args, trees[name], corpus.tars, workdir, i)
            r["load_average"] = load_average()
            results[name].append(r)
            extra = (f", window {r['images'] / r['window_wall']:.2f} img/s, "
                     f"first batch at {r['until_first_batch']:.1f}s, "
                     f"resume {r['resume_wall']:.1f}s" if name != "bare" else "")
            print(f"  pass {i + 1}: {name:12s} {r['images'] / r['wall']:6.2f} img/s wall{extra}  "
                  f"(load {r['load_average'][0]})", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    n = len(corpus.keys)
    bare_wall = median(r["wall"] for r in results["bare"])
    summary = {"bare_img_s": n / bare_wall}
    print(f"\n`icar embed` as a command vs the bare model ({args.model} {args.pretrained}, scorer {args.scorer}, "
          f"{args.precision}, batch {args.batch_size}, {n} images in {len(corpus.tars)} tars, "
          f"--cpus-per-actor {args.cpus_per_actor:g}, bare on {args.torch_threads} thread(s); medians of "
          f"{args.repeats} interleaved passes)")
    print(f"  bare ModelWorker.embed   {n / bare_wall:7.2f} img/s")
    for name in trees:
        rs = results[name]
        whole, window = median(r["wall"] for r in rs), median(r["window_wall"] for r in rs)
        summary[name] = {"whole_img_s": n / whole, "window_img_s": n / window, "ratio_whole": bare_wall / whole,
                         "ratio_window": bare_wall / window,
                         "until_first_batch_s": median(r["until_first_batch"] for r in rs),
                         "after_last_batch_s": median(r["after_last_batch"] for r in rs),
                         "resume_s": median(r["resume_wall"] for r in rs),
                         "model_busy": median(r["model_busy"] for r in rs),
                         "startup_seconds": [r.get("startup_seconds") for r in rs]}
        s = summary[name]
        print(f"  {name:24s} whole run {s['whole_img_s']:6.2f} img/s = {s['ratio_whole']:.3f} of bare; steady (model "
              f"window) {s['window_img_s']:6.2f} img/s = {s['ratio_window']:.3f}; first batch at "
              f"{s['until_first_batch_s']:.1f}s, {s['after_last_batch_s']:.1f}s after the last; resume with nothing "
              f"to do {s['resume_s']:.1f}s" + (f"; driver waited for {s['startup_seconds'][-1]}"
                                                if s["startup_seconds"][-1] else ""))
    print(f"# load average now {load_average()}")
    write_json(args.json, {"facts": facts, "args": vars(args), "summary": summary, "passes": results})
    return 0


def transfer_cost(batch: np.ndarray, rounds: int = 5) -> dict:
    """Return the median seconds to ship one decoded batch to a Ray actor and back an acknowledgement."""
    import ray

    @ray.remote(num_cpus=0)
    class Sink:
        def take(self, px):
            return px.shape[0]

    sink = Sink.remote()
    ray.get(sink.take.remote(batch[:1]))
    walls = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        ray.get(sink.take.remote(batch), timeout=120)
        walls.append(time.perf_counter() - t0)
    ray.kill(sink)
    return {"batch_bytes": int(batch.nbytes), "seconds_per_batch": median(walls), "all": walls}


def decode_timing(corpus, image_size: int, limit: int = 128) -> dict:
    """Return per-image CPU and wall ms of decode_image and of its two parts (JPEG decode, resize+crop), one core.

    The parts are timed the way decode_image runs them (JPEG draft mode included), so they add up to about it.
    """
    from PIL import Image

    cfg = DecodeConfig(image_size=image_size)
    keys = corpus.keys[:limit]
    parts = {"decode_image": [], "jpeg_decode": [], "resize_crop": []}
    walls = {k: [] for k in parts}
    for k in keys:
        data = corpus.jpeg_bytes[k]
        with timed() as t:
            decode_image(data, cfg)
        parts["decode_image"].append(t["cpu"])
        walls["decode_image"].append(t["wall"])
        with timed() as t:  # as decode_image does it: DCT-domain draft when the JPEG is >= 4x the target size
            img = Image.open(io.BytesIO(data))
            if cfg.draft_jpeg and img.format == "JPEG" and min(img.size) >= 4 * image_size:
                scale = 2 * image_size / min(img.size)
                img.draft(None, (math.ceil(img.width * scale), math.ceil(img.height * scale)))
            img.load()
        parts["jpeg_decode"].append(t["cpu"])
        walls["jpeg_decode"].append(t["wall"])
        with timed() as t:
            resize_center_crop(img.convert("RGB"), image_size)
        parts["resize_crop"].append(t["cpu"])
        walls["resize_crop"].append(t["wall"])
    # process_time has a coarse tick on some kernels: the mean over many images is the robust per-image figure.
    return {k: {"cpu_ms_mean": 1e3 * float(np.mean(v)), "wall_ms_median": 1e3 * median(walls[k]),
                "images": len(v)} for k, v in parts.items()}


def read_timing(corpus) -> dict:
    """Return CPU ms per image to stream the samples out of the tars (iter_samples, no decoding), no profiler."""
    with timed() as t:
        images = sum(1 for shard in expand_inputs(corpus.tars) for _ in iter_samples(shard))
    return {"cpu_ms_mean": 1e3 * t["cpu"] / images, "images": images}


def ray_idle_cost(seconds: float = 10.0) -> float:
    """Return the CPU cores an idle embedded Ray instance (GCS, raylet, idle workers) uses, sampled over ``seconds``."""
    from bench.common import CpuTracker

    with CpuTracker() as cpu:
        time.sleep(seconds)
    return cpu.total / seconds


def _encoder_forward_line() -> int:
    """Return the first line of AdaptiveEncoder.forward (ExitHead defines a forward in the same file too)."""
    return AdaptiveEncoder.forward.__code__.co_firstlineno


# Profile buckets: (label, predicate on (file, line, function)); the cumulative CPU time of the matches is summed.
PROFILE_BUCKETS = [
    ("read (tar, fsspec)", lambda f, line, fn: f.endswith("pipeline/io/readers.py") and fn == "_iter_tar"),
    ("decode total", lambda f, line, fn: f.endswith("pipeline/io/decode.py") and fn == "decode_image"),
    ("  JPEG decode (PIL load)", lambda f, line, fn: f.endswith("PIL/ImageFile.py") and fn == "load"),
    ("  header parse (PIL open)", lambda f, line, fn: f.endswith("pipeline/io/decode.py") and fn == "_open"),
    ("  resize + crop", lambda f, line, fn: f.endswith("pipeline/io/decode.py") and fn == "resize_center_crop"),
    ("  EXIF / RGB", lambda f, line, fn: f.endswith("pipeline/io/decode.py") and fn in ("_orientation", "to_rgb")),
    ("batch assembly (np.stack)", lambda f, line, fn: fn == "stack" and "numpy" in f),
    ("model total (ModelWorker.embed)", lambda f, line, fn: f.endswith("pipeline/model/worker.py") and fn == "embed"),
    ("  scorer", lambda f, line, fn: f.endswith("pipeline/model/scorer.py") and fn == "score"),
    ("  pixels -> tensor", lambda f, line, fn: f.endswith("pipeline/model/models.py") and fn == "pixels_to_tensor"),
    ("  encoder", lambda f, line, fn: f.endswith("pipeline/model/encoder.py") and fn == "forward"
     and line == _encoder_forward_line()),
    ("write (commit_shard)", lambda f, line, fn: f.endswith("pipeline/io/shards.py") and fn == "commit_shard"),
    ("shard task total", lambda f, line, fn: f.endswith("pipeline/embed/execution.py") and fn == "process_shard"),
]


def profile_shard(worker, corpus, cfg_kwargs: dict, workdir: str, image_size: int, embed_dim: int) -> dict:
    """Profile process_shard in-process on the first input shard with a local model; return CPU ms/img by stage."""
    cfg = EmbedConfig(output=os.path.join(workdir, "profile"), **cfg_kwargs)
    shard = expand_inputs([corpus.tars[0]])[0]
    facts = ModelFacts(image_size, embed_dim, worker.scorer_gflops)

    def submit(px, keys):  # the model runs at submit time: a synchronous stand-in for actor.embed.remote
        return worker.embed(px, keys)

    prof = cProfile.Profile(time.process_time)
    prof.enable()
    row = process_shard(shard, 0, cfg, facts, submit=submit, fetch=lambda r: r)
    prof.disable()
    st = pstats.Stats(prof)
    images = row["rows"]
    out = {}
    for label, pred in PROFILE_BUCKETS:
        # sum over matching entries (e.g. np.stack is called from one place per batch); cumulative time.
        # Recursion is not a concern for these functions.
        ct = [v[3] for (f, line, fn), v in st.stats.items() if pred(f, line, fn)]
        out[label] = 1e3 * sum(ct) / images if ct else 0.0
    # the scorer's internals are inside embed; decode parts are inside decode total; the rest of the task:
    known = out["read (tar, fsspec)"] + out["decode total"] + out["batch assembly (np.stack)"] \
        + out["model total (ModelWorker.embed)"] + out["write (commit_shard)"]
    out["other (rows, manifest row, loop)"] = max(0.0, out["shard task total"] - known)
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(25)
    return {"images": images, "cpu_ms_per_image": out, "top": text.getvalue()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import torch

    facts = machine_facts()
    print_facts(facts)
    t_start = time.perf_counter()
    corpus = make_corpus(args.n, args.per_shard)
    print(f"# corpus: {len(corpus.keys)} JPEGs 500x375 (mean {corpus.mean_kb:.0f} KB) in {len(corpus.tars)} tars "
          f"at {corpus.directory}")
    spec = spec_from(args)
    with timed() as t_load:
        worker = ModelWorker(spec)
    print(f"# model {args.model} ({args.pretrained}), exits {worker.exits}, router {worker.router.to_dict()['kind']}, "
          f"scorer {args.scorer}, batch {args.batch_size}, torch threads {torch.get_num_threads()}; "
          f"loaded in {t_load['wall']:.1f}s wall")
    image_size, embed_dim = worker.bundle.image_size, worker.bundle.embed_dim
    batches = decoded_batches(corpus, image_size, args.batch_size)
    worker.embed(*batches[0])  # warm-up: allocator, kernels
    if args.cli:
        return cli_main(args, facts, corpus, worker, batches)
    compiled = None
    if args.compile:
        compiled = torch.compile(worker.encoder, dynamic=True)
        with timed() as t_compile:
            bare_pass(worker, batches, compiled)  # compiles (once per distinct batch shape) before any timing
        print(f"# torch.compile warm-up pass: {t_compile['wall']:.1f}s wall")

    same_priority_as_peers()  # the bare passes run at nice 0 in this process; Ray's workers would run at 15
    ray = execution.init_ray(None)  # started once: its own start is not the pipeline's work
    time.sleep(5)  # let Ray's start-up work (prestarted workers importing) finish before measuring its idle cost
    idle_cores = ray_idle_cost()
    cfg_kwargs = dict(inputs=corpus.tars, spec=spec, batch_size=args.batch_size, progress=False)
    workdir = tempfile.mkdtemp(prefix="icar-bench-pipeline-")
    variants = ["bare", "e2e"] + (["bare_compiled"] if compiled is not None else [])
    results: dict[str, list[dict]] = {k: [] for k in variants}
    try:
        for i, name in enumerate(interleaved(variants, args.repeats)):
            if name == "e2e":
                r = e2e_pass(cfg_kwargs, workdir, i)
            else:
                r = bare_pass(worker, batches, compiled if name == "bare_compiled" else None)
            r["load_average"] = load_average()
            results[name].append(r)
            extra = (f", window {r['images'] / r['window_wall']:.2f} img/s, model busy {r['model_busy']:.2f}"
                     if name == "e2e" else "")
            print(f"  pass {i + 1}: {name:13s} {r['images'] / r['wall']:6.2f} img/s wall, "
                  f"{1e3 * r['cpu'] / r['images']:7.1f} CPU ms/img{extra}  (load {r['load_average'][0]})")
        transfer = transfer_cost(batches[0][0])
    finally:
        ray.shutdown()

    n = args.n
    bare_wall = median(r["wall"] for r in results["bare"])
    bare_cpu = median(r["cpu"] for r in results["bare"])
    e2e = results["e2e"]
    e2e_wall = median(r["wall"] for r in e2e)
    e2e_window = median(r["window_wall"] for r in e2e)
    e2e_cpu = median(r["cpu"] for r in e2e)
    e2e_window_cpu = median(r["window_cpu"] for r in e2e)
    summary = {
        "bare_img_s": n / bare_wall, "e2e_img_s": n / e2e_wall, "e2e_window_img_s": n / e2e_window,
        "ratio_e2e_whole_run": bare_wall / e2e_wall,
        "ratio_e2e_window": bare_wall / e2e_window,
        "model_busy_window": median(r["model_busy"] for r in e2e),
        "cpu_ms_per_img_bare": 1e3 * bare_cpu / n, "cpu_ms_per_img_e2e": 1e3 * e2e_cpu / n,
        "cpu_ms_per_img_e2e_window": 1e3 * e2e_window_cpu / n,
        "cpu_ratio_window": bare_cpu / e2e_window_cpu,
        # the actor's own CPU inside its embed calls: the same work as bare? (then a wall gap is CPU share, not work)
        "actor_model_cpu_ms_per_img": 1e3 * median(r["model_cpu"] for r in e2e) / n,
        "actor_cpu_share_in_embed": median(r["model_cpu"] / r["model_seconds"] for r in e2e),
        "bare_cpu_share": median(r["cpu"] / r["wall"] for r in results["bare"]),
        "until_first_batch_s": median(r["until_first_batch"] for r in e2e),
        "after_last_batch_s": median(r["after_last_batch"] for r in e2e),
        "transfer_ms_per_img": 1e3 * transfer["seconds_per_batch"] / args.batch_size,
        "ray_idle_cores": idle_cores,
        # the window's CPU less what an idle Ray instance burns over the same time: the per-image pipeline work
        "cpu_ms_per_img_e2e_window_less_idle_ray": 1e3 * (e2e_window_cpu - idle_cores * e2e_window) / n,
    }
    print(f"\n{args.model}, batch {args.batch_size}, {n} images, {args.repeats} interleaved passes each (medians; "
          f"wall spread bare {spread(r['wall'] for r in results['bare'])}s, e2e window "
          f"{spread(r['window_wall'] for r in e2e)}s)")
    print(f"  bare ModelWorker.embed      {summary['bare_img_s']:7.2f} img/s   {summary['cpu_ms_per_img_bare']:7.1f} CPU ms/img")
    print(f"  icar embed, model window    {summary['e2e_window_img_s']:7.2f} img/s   "
          f"{summary['cpu_ms_per_img_e2e_window']:7.1f} CPU ms/img   ratio {summary['ratio_e2e_window']:.3f} "
          f"(target >= {BUSY_TARGET}); by CPU time {summary['cpu_ratio_window']:.3f}; "
          f"actor busy {summary['model_busy_window']:.3f} of the window")
    print(f"  icar embed, whole run       {summary['e2e_img_s']:7.2f} img/s   {summary['cpu_ms_per_img_e2e']:7.1f} CPU ms/img"
          f"   ratio {summary['ratio_e2e_whole_run']:.3f} (fixed: {summary['until_first_batch_s']:.1f}s to the first "
          f"batch incl. actor start, {summary['after_last_batch_s']:.1f}s after the last)")
    print(f"  model work: actor {summary['actor_model_cpu_ms_per_img']:.1f} CPU ms/img inside embed vs bare "
          f"{summary['cpu_ms_per_img_bare']:.1f}; CPU share while computing: actor {summary['actor_cpu_share_in_embed']:.2f}"
          f" of a core, bare {summary['bare_cpu_share']:.2f} (a wall gap with equal work is a smaller CPU share: "
          f"other processes on the machine)")
    if compiled is not None:
        c_wall = median(r["wall"] for r in results["bare_compiled"])
        summary["bare_compiled_img_s"] = n / c_wall
        summary["compiled_vs_bare"] = bare_wall / c_wall
        print(f"  bare, torch.compile'd encoder {n / c_wall:7.2f} img/s   ÷ bare eager {bare_wall / c_wall:.3f} "
              f"(icar embed runs the eager encoder)")
    print(f"  batch -> actor transfer     {summary['transfer_ms_per_img']:.2f} ms/img wall "
          f"({transfer['batch_bytes'] / 2**20:.1f} MiB per batch, object store)")
    print(f"  idle Ray instance           {idle_cores:.3f} cores; model-window CPU less that: "
          f"{summary['cpu_ms_per_img_e2e_window_less_idle_ray']:.1f} CPU ms/img "
          f"(by CPU time {summary['cpu_ms_per_img_bare'] / summary['cpu_ms_per_img_e2e_window_less_idle_ray']:.3f})")

    dec = decode_timing(corpus, image_size)
    read = read_timing(corpus)
    model_ms = summary["cpu_ms_per_img_bare"]
    prof = None
    if not args.no_profile:
        prof = profile_shard(worker, corpus, cfg_kwargs, workdir, image_size, embed_dim)
    shutil.rmtree(workdir, ignore_errors=True)
    print(f"\nwhere the time goes (CPU ms per image; in-process shard task, cProfile on CPU time, "
          f"{prof['images'] if prof else 0} images; decode_image alone over {dec['decode_image']['images']} images)")
    print(f"  unprofiled, one core: read {read['cpu_ms_mean']:.2f}; decode_image {dec['decode_image']['cpu_ms_mean']:.2f} "
          f"(JPEG decode {dec['jpeg_decode']['cpu_ms_mean']:.2f}, resize+crop {dec['resize_crop']['cpu_ms_mean']:.2f})")
    print("  profiled shard task (cProfile inflates Python-heavy parts such as tar parsing):")
    if prof:
        total = prof["cpu_ms_per_image"]["shard task total"]
        for label, ms in prof["cpu_ms_per_image"].items():
            print(f"  {label:32s} {ms:8.2f}  {100 * ms / total:5.1f}%")
    # CPU the shard task spends per image outside the model: read and decode timed without the profiler, the
    # small rest (batch assembly, write, loop) from the profile
    rest = 0.0
    if prof:
        p_ms = prof["cpu_ms_per_image"]
        rest = p_ms["batch assembly (np.stack)"] + p_ms["write (commit_shard)"] + p_ms["other (rows, manifest row, loop)"]
    host_ms = read["cpu_ms_mean"] + dec["decode_image"]["cpu_ms_mean"] + rest
    sizing = {
        "decode_cpu_ms_per_img": dec["decode_image"]["cpu_ms_mean"],
        "shard_task_cpu_ms_per_img_excl_model": host_ms,
        "model_cpu_ms_per_img": model_ms,
        "model_threads": args.torch_threads,
        # model wall per image on its threads = CPU ms / threads (ideal scaling); decode CPUs needed to feed it:
        "decode_cpus_per_actor_full": host_ms / (model_ms / args.torch_threads),
        "decode_cpus_per_actor_at_target": BUSY_TARGET * host_ms / (model_ms / args.torch_threads),
    }
    print(f"\nsizing: the shard task spends {host_ms:.2f} CPU ms/img outside the model (read+decode+batch+write); "
          f"the model {model_ms:.1f} CPU ms/img on {args.torch_threads} thread(s):")
    print(f"  decode CPUs per model actor to keep it busy: {sizing['decode_cpus_per_actor_full']:.3f} "
          f"(>= {BUSY_TARGET}: {sizing['decode_cpus_per_actor_at_target']:.3f}); for an accelerator actor: "
          f"{host_ms:.1f} ms x its images/s / 1000 (e.g. 300 img/s -> {host_ms * 0.3:.1f} CPUs, "
          f"3000 img/s -> {host_ms * 3:.1f} CPUs)")
    print(f"# total bench time {time.perf_counter() - t_start:.0f}s, load average now {load_average()}")
    write_json(args.json, {"facts": facts, "args": vars(args), "summary": summary, "passes": results,
                           "transfer": transfer, "decode": dec, "read": read, "profile": prof, "sizing": sizing,
                           "exits": worker.exits})
    return 0


if __name__ == "__main__":
    sys.exit(main())
