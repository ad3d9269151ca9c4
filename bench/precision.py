"""Benchmark: what bf16 buys on a CPU with native bfloat16, bare model vs ICAR's model stage, and what it costs in quality.

Side by side in one process, variants interleaved, medians reported (issue #23 point 1):

- speed, per model (``--models``, default ViT-B-32 random init and the shipped demo): open_clip's bare
  ``model.encode_image`` at fp32 and with the model and input cast to bf16, beside ``ModelWorker.embed`` (what a
  model actor runs per batch: scorer, router, adaptive encoder, float16 output) at ``--precision fp32`` and
  ``bf16``, and each worker's scorer alone (a trained CNN scorer follows the worker into bf16; the heuristic
  stays fp32). Wall images/s and images per CPU-second of this process (steadier on a shared machine);
  the bf16/fp32 ratio of the bare model beside the worker's is the point: a worker that loses the bare model's
  gain has a float32 island or a cast somewhere;
- quality, on the demo corpus's held-out test split (``--corpus``, never used to train the demo model, its heads,
  router or scorer): cosine of bf16 to fp32 image embeddings at every exit, and recall@1 (text→image and
  image→text, instance level: identical captions are one query) at fp32 and bf16 for full depth, each fixed exit
  and the shipped router's routing (the same exits at both precisions: the scorer runs in fp32), with fp32's
  95 % bootstrap interval and the paired-bootstrap 95 % interval of bf16 − fp32 (the same resampled queries).
  Text is embedded once in fp32 (queries are what `icar search` encodes);
- end to end (``--e2e N``): `icar embed` (``run_embed`` on a local Ray started once) over N photo-like 500x375
  JPEGs at ``--precision fp32``, ``bf16`` and ``auto``, interleaved; whole-run and model-window images/s.

    python -m bench.precision                           # speed (ViT-B-32, demo) + quality
    python -m bench.precision --e2e 300 --json precision.json
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.adaptive import bootstrap_indices, label_ranks, paired_diff  # noqa: E402
from bench.common import (interleaved, load_average, machine_facts, make_corpus, median,  # noqa: E402
                          print_facts, same_priority_as_peers, timed_run_embed, write_json)
from bench.quality import DEFAULT_CORPUS, ensure_corpus, read_split  # noqa: E402
from pipeline.model import models  # noqa: E402
from pipeline.model import router as routers  # noqa: E402
from pipeline.model.models import pixels_to_tensor  # noqa: E402
from pipeline.model.router import routed_embeddings  # noqa: E402
from pipeline.model.spec import ModelSpec  # noqa: E402
from pipeline.model.worker import DEMO_ASSETS, ModelWorker  # noqa: E402
from pipeline.runtime import native_bf16_flags, read_cpuinfo, resolve_precision  # noqa: E402
from pipeline.training.recall import caption_groups, caption_queries  # noqa: E402

log = logging.getLogger("bench.precision")
PRECISIONS = ("fp32", "bf16")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.precision", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="ViT-B-32,demo", help="models of the speed part, comma-separated ('' none)")
    p.add_argument("--batch-size", type=int, default=32, help="images per call in the speed part")
    p.add_argument("--demo-batch-size", type=int, default=128, help="images per call for the demo model")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--demo-threads", type=int, default=1,
                   help="threads for the demo model (its matmuls are small: on a loaded 2-core machine 2 threads ran "
                        "it 10x slower than 1, waiting on each other)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds of the speed part (after one warm-up)")
    p.add_argument("--no-quality", action="store_true", help="skip the quality part")
    p.add_argument("--corpus", default=str(DEFAULT_CORPUS), help="demo corpus (`icar make-demo-corpus`)")
    p.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "icar" / "bench-quality"))
    p.add_argument("--n-test", type=int, default=None, help="test images (default: the whole split)")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples of the queries")
    p.add_argument("--e2e", type=int, default=0, help="also run `icar embed` on this many photo-like JPEGs")
    p.add_argument("--e2e-model", default="ViT-B-32")
    p.add_argument("--e2e-repeats", type=int, default=1, help="rounds of fp32, bf16, auto (interleaved)")
    p.add_argument("--json", default=None, help="also write every number here")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------ speed


def speed(model: str, batch: int, repeats: int, threads: int) -> dict:
    """Return images/s (wall) and images per CPU-second of bare open_clip and ModelWorker.embed at fp32 and bf16."""
    import torch

    torch.set_num_threads(threads)
    workers = {p: ModelWorker(ModelSpec(model=model, pretrained=None if model == "demo" else "none", device="cpu",
                                        full_depth=True, precision=p, torch_threads=threads)) for p in PRECISIONS}
    bare32 = workers["fp32"].bundle.model
    bare16 = copy.deepcopy(bare32).to(torch.bfloat16)  # open_clip as a user would cast it: model.to(bfloat16)
    size = workers["fp32"].bundle.image_size
    pixels = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    keys = [f"k{i}" for i in range(batch)]
    x32 = pixels_to_tensor(workers["fp32"].bundle, pixels)
    x16 = x32.to(torch.bfloat16)
    scorer = workers["fp32"].scorer
    calls = {"bare fp32": lambda: bare32.encode_image(x32), "bare bf16": lambda: bare16.encode_image(x16),
             "worker fp32": lambda: workers["fp32"].embed(pixels, keys),
             "worker bf16": lambda: workers["bf16"].embed(pixels, keys)}
    if scorer is not None:  # the worker's scorer alone, in the dtype each worker runs it in
        calls["scorer fp32"] = lambda: workers["fp32"].scorer.score(pixels)
        calls["scorer bf16"] = lambda: workers["bf16"].scorer.score(pixels)
    wall: dict[str, list[float]] = {k: [] for k in calls}
    cpu: dict[str, list[float]] = {k: [] for k in calls}
    loads = [load_average()[0]]
    with torch.inference_mode():
        for f in calls.values():  # warm-up: oneDNN picks and caches its kernels on the first call of a shape
            f()
        for name in interleaved(list(calls), repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            calls[name]()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    loads.append(load_average()[0])
    rows = {k: {"images_per_s": batch / median(wall[k]), "images_per_cpu_s": batch / median(cpu[k]),
                "wall_s": wall[k], "cpu_s": cpu[k]} for k in calls}
    ratio = lambda a, b, key: rows[a][key] / rows[b][key]  # noqa: E731
    return {"model": model, "batch": batch, "threads": threads, "repeats": repeats, "rows": rows,
            "ratio_bare": ratio("bare bf16", "bare fp32", "images_per_s"),
            "ratio_worker": ratio("worker bf16", "worker fp32", "images_per_s"),
            "ratio_bare_cpu": ratio("bare bf16", "bare fp32", "images_per_cpu_s"),
            "ratio_worker_cpu": ratio("worker bf16", "worker fp32", "images_per_cpu_s"),
            "scorer": scorer.identity.get("name") if scorer is not None else None, "load_1min": loads}


# ------------------------------------------------------------------------------------------------ quality


def all_exits(worker: ModelWorker, pixels: np.ndarray, batch: int) -> dict[int, np.ndarray]:
    """Return {exit: float32 L2-normalised embeddings} of every image at every exit of ``worker``'s encoder."""
    import torch

    out: dict[int, list] = {e: [] for e in worker.exits}
    with torch.inference_mode():
        for i in range(0, len(pixels), batch):
            for e, emb in worker.encoder.forward_all_exits(pixels_to_tensor(worker.bundle, pixels[i:i + batch])).items():
                out[e].append(emb.float().numpy())
    return {e: np.concatenate(v) for e, v in out.items()}


def hits(text: np.ndarray, images: np.ndarray, groups: np.ndarray, first: np.ndarray) -> dict[str, np.ndarray]:
    """Return per-query recall@1 hits {"t2i": (distinct captions,), "i2t": (images,)} at instance level."""
    sim = text[first] @ images.T
    labels = np.arange(len(first))
    return {"t2i": (label_ranks(sim, labels, groups) == 0).astype(np.float64),
            "i2t": (label_ranks(sim.T, groups, labels) == 0).astype(np.float64)}


def quality(a: argparse.Namespace) -> dict:
    """Return per-exit cosine of bf16 to fp32 and recall@1 at both precisions on the demo's test split."""
    import torch

    torch.set_num_threads(a.threads)
    corpus, doc = ensure_corpus(a.corpus, a.cache_dir)
    workers = {p: ModelWorker(ModelSpec(model="demo", device="cpu", precision=p, torch_threads=a.threads))
               for p in PRECISIONS}
    w32 = workers["fp32"]
    keys, pixels, captions = read_split(corpus, doc, "test", w32.bundle.image_size, a.n_test)
    emb = {p: all_exits(w, pixels, a.demo_batch_size) for p, w in workers.items()}
    text = models.encode_text(w32.bundle, captions)
    groups = caption_groups(captions)
    first, _ = caption_queries(groups)
    idx = {"t2i": bootstrap_indices(len(first), a.bootstrap, seed=0),
           "i2t": bootstrap_indices(len(keys), a.bootstrap, seed=1)}
    shipped = routers.load_router(str(DEMO_ASSETS / "router.json"))
    depth = np.asarray(shipped.route(w32.scorer.score(pixels), keys))
    policies = {f"full depth ({w32.exits[-1]})": np.full(len(keys), w32.exits[-1])}
    policies.update({f"fixed exit {e}": np.full(len(keys), e) for e in w32.exits[:-1]})
    policies["shipped router"] = depth
    rows = []
    for name, d in policies.items():
        h = {p: hits(text, routed_embeddings(d, emb[p]), groups, first) for p in PRECISIONS}
        row = {"policy": name, "mean_exit": float(d.mean())}
        for direction in ("t2i", "i2t"):
            boot = h["fp32"][direction][idx[direction]].mean(axis=1)
            lo, hi = np.percentile(boot, [2.5, 97.5])
            row[direction] = {"fp32": float(h["fp32"][direction].mean()), "fp32_lo": float(lo),
                              "fp32_hi": float(hi), "bf16": float(h["bf16"][direction].mean()),
                              "bf16_minus_fp32": paired_diff(h["bf16"][direction], h["fp32"][direction],
                                                             idx[direction])}
            row[direction]["bf16_within_fp32_interval"] = bool(lo <= row[direction]["bf16"] <= hi)
        rows.append(row)
    cosine = {}
    for e in w32.exits:
        c = (emb["fp32"][e] * emb["bf16"][e]).sum(1)
        cosine[str(e)] = {"min": float(c.min()), "p01": float(np.percentile(c, 1)), "mean": float(c.mean())}
    return {"corpus": corpus, "images": len(keys), "queries_t2i": len(first), "cosine_bf16_vs_fp32": cosine,
            "recall_at_1": rows, "bootstrap": a.bootstrap}


# ------------------------------------------------------------------------------------------------ end to end


def end_to_end(a: argparse.Namespace) -> dict:
    """Return whole-run and model-window images/s of `icar embed` at fp32, bf16 and auto, interleaved."""
    from pipeline.embed.config import EmbedConfig
    from pipeline.runtime import init_ray

    same_priority_as_peers()
    corpus = make_corpus(a.e2e, per_shard=max(1, a.e2e // 4))
    init_ray(None)
    work = Path(tempfile.mkdtemp(prefix="icar-bench-precision-"))
    results: dict[str, list[dict]] = {p: [] for p in ("fp32", "bf16", "auto")}
    for i, p in enumerate(interleaved(list(results), a.e2e_repeats)):
        spec = ModelSpec(model=a.e2e_model, pretrained="none", full_depth=True, precision=p, torch_threads=a.threads)
        cfg = EmbedConfig(inputs=corpus.tars, output=str(work / f"{p}-{i}"), spec=spec, batch_size=a.batch_size,
                          cpus_per_actor=a.threads, progress=False)
        load0 = load_average()[0]
        r = timed_run_embed(cfg, str(work / f"{p}-{i}.batches"))
        r["load_1min"] = [load0, load_average()[0]]
        r["images_per_s"] = r["images"] / r["wall"]
        r["window_images_per_s"] = r["images"] / r["window_wall"]
        r["recorded_precision"] = __import__("json").loads((work / f"{p}-{i}" / "run.json").read_text())["precision"]
        results[p].append(r)
        print(f"  e2e {p:5s} (computed in {r['recorded_precision']}): {r['images_per_s']:.2f} images/s whole run, "
              f"{r['window_images_per_s']:.2f} in the model window (load {r['load_1min']})", flush=True)
    summary = {p: {"images_per_s": median([r["images_per_s"] for r in rs]),
                   "window_images_per_s": median([r["window_images_per_s"] for r in rs]),
                   "precision": rs[0]["recorded_precision"]} for p, rs in results.items()}
    return {"images": a.e2e, "model": a.e2e_model, "batch": a.batch_size, "threads": a.threads, "runs": results,
            "summary": summary, "mean_kb": corpus.mean_kb}


# ------------------------------------------------------------------------------------------------ report


def print_speed(s: dict) -> None:
    print(f"\n## speed: {s['model']}, batch {s['batch']}, {s['threads']} threads, median of {s['repeats']} "
          f"(load {s['load_1min'][0]} -> {s['load_1min'][1]})")
    print(f"  {'':14s} {'images/s':>9s} {'img/CPU-s':>10s}")
    for name, r in s["rows"].items():
        print(f"  {name:14s} {r['images_per_s']:9.2f} {r['images_per_cpu_s']:10.2f}")
    print(f"  bf16/fp32: bare {s['ratio_bare']:.2f}x, worker {s['ratio_worker']:.2f}x (wall); "
          f"bare {s['ratio_bare_cpu']:.2f}x, worker {s['ratio_worker_cpu']:.2f}x (CPU time)")


def print_quality(q: dict) -> None:
    print(f"\n## quality: demo model, held-out test split ({q['images']} images, {q['queries_t2i']} distinct captions), "
          f"{q['bootstrap']} bootstrap resamples")
    print("  cosine bf16 vs fp32 per exit: " + ", ".join(
        f"exit {e}: min {c['min']:.5f} p1 {c['p01']:.5f} mean {c['mean']:.6f}" for e, c in q["cosine_bf16_vs_fp32"].items()))
    for r in q["recall_at_1"]:
        cells = []
        for d in ("t2i", "i2t"):
            x = r[d]
            diff = x["bf16_minus_fp32"]
            cells.append(f"{d} R@1 fp32 {x['fp32']:.3f} [{x['fp32_lo']:.3f}, {x['fp32_hi']:.3f}] bf16 {x['bf16']:.3f} "
                         f"(diff {diff['diff']:+.3f} [{diff['lo']:+.3f}, {diff['hi']:+.3f}])"
                         f"{'' if x['bf16_within_fp32_interval'] else ' OUTSIDE'}")
        print(f"  {r['policy']:20s} " + " | ".join(cells))


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    facts = machine_facts()
    print_facts(facts)
    choice = resolve_precision("auto", "cpu")
    flags = native_bf16_flags(read_cpuinfo())
    import torch

    print(f"# native bf16 flags: {flags or 'none'}; torch CPU capability {torch.backends.cpu.get_cpu_capability()}; "
          f"--precision auto picks {choice.precision} ({choice.reason})")
    out: dict = {"facts": facts, "auto": choice.precision, "flags": flags, "speed": [], "quality": None, "e2e": None}
    for model in [m for m in a.models.split(",") if m.strip()]:
        demo = model == "demo"
        s = speed(model, a.demo_batch_size if demo else a.batch_size, a.repeats, a.demo_threads if demo else a.threads)
        print_speed(s)
        out["speed"].append(s)
    if not a.no_quality:
        out["quality"] = quality(a)
        print_quality(out["quality"])
    if a.e2e:
        print(f"\n## end to end: icar embed, {a.e2e} photo-like JPEGs, {a.e2e_model}, full depth")
        out["e2e"] = end_to_end(a)
        for p, s in out["e2e"]["summary"].items():
            print(f"  --precision {p:5s} ({s['precision']}): {s['images_per_s']:.2f} images/s whole run, "
                  f"{s['window_images_per_s']:.2f} model window")
    print(f"\n# load average at the end {load_average()}")
    write_json(a.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
