"""Benchmark: does adaptive-depth embedding realise the speedup its counted GFLOPs allow?

On the same random images, times three things side by side, interleaved (ABC, then CBA, ...) so machine
load hits them alike, and reports medians:

- bare:      ``model.encode_image`` (open_clip, the baseline every user has);
- full:      AdaptiveEncoder with every image at full depth (our overhead over bare: should be ~1.0);
- adaptive:  AdaptiveEncoder with a depth mix (``--fractions`` over ``--exits``), rows shuffled so the
             sort/scatter path is exercised.

On CPU it also reports process CPU time, which other processes on a shared machine disturb less than wall time.

The GFLOP-allowed speedup is full-depth GFLOPs ÷ the mix's mean GFLOPs (pipeline.model.flops, counted); the
realisation ratio is measured speedup ÷ allowed speedup (1.0 = every saved FLOP turned into time; the
target on CPU is >= 0.9). Default: ViT-B-32 random init, batch 32, runtime well under 3 minutes on 2 cores.

    python -m bench.encoder_depth [--model ViT-L-14] [--batch-size 32] [--fractions 0.3,0.3,0.4] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np
import torch

from pipeline.model import flops, models
from pipeline.model import encoder as enc
from pipeline.runtime import resolve_device

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.encoder_depth", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ViT-B-32", help="open_clip model name, 'demo', or a model directory")
    p.add_argument("--pretrained", default="none", help="tag, checkpoint, or none (seeded random init)")
    p.add_argument("--exits", default=None, help="exit depths, e.g. 6,9,12 (default: the model's)")
    p.add_argument("--fractions", default="0.3,0.3,0.4", help="share of images per exit, in exit order")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (each times all three variants)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"],
                   help="autocast dtype on GPU (fp32 on CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads on CPU (default: torch's)")
    p.add_argument("--json", default=None, help="also write the results as JSON here")
    return p.parse_args(argv)


def depth_mix(exits: list[int], fractions: list[float], n: int, seed: int = 0) -> torch.Tensor:
    """Return n exit depths with the given shares (largest-remainder rounding), in a shuffled order."""
    if len(fractions) != len(exits) or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise SystemExit(f"--fractions {fractions} must give one non-negative share per exit {exits}, summing to 1")
    raw = np.asarray(fractions) * n
    counts = np.floor(raw).astype(int)
    counts[np.argsort(-(raw - counts))[: n - counts.sum()]] += 1
    depths = np.repeat(exits, counts)
    np.random.default_rng(seed).shuffle(depths)
    return torch.as_tensor(depths, dtype=torch.long)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    device = resolve_device(args.device)
    if args.threads and device == "cpu":
        torch.set_num_threads(args.threads)
    bundle = models.load_clip(args.model, args.pretrained, seed=0, device=device)
    exits = [int(e) for e in args.exits.split(",")] if args.exits else enc.default_exits(bundle.num_blocks)
    fractions = [float(f) for f in args.fractions.split(",")]
    encoder = enc.AdaptiveEncoder(bundle.model.visual, exits).to(device).eval()
    n = args.batch_size
    x = torch.randn(n, 3, bundle.image_size, bundle.image_size, generator=torch.Generator().manual_seed(0)).to(device)
    mixed = depth_mix(exits, fractions, n).to(device)
    full = torch.full((n,), exits[-1], dtype=torch.long, device=device)
    amp = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.precision) if device != "cpu" else None

    variants = {
        "bare": lambda: bundle.model.encode_image(x),
        "full": lambda: encoder(x, full),
        "adaptive": lambda: encoder(x, mixed),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}  # process CPU seconds: steadier on a shared box
    with torch.inference_mode(), torch.autocast(device.split(":")[0], dtype=amp, enabled=amp is not None):
        for fn in variants.values():  # warm-up: allocator, kernels, caches
            fn()
        _sync(device)
        names = list(variants)
        for r in range(args.repeats):
            for name in (names if r % 2 == 0 else names[::-1]):
                _sync(device)
                t0, c0 = time.perf_counter(), time.process_time()
                variants[name]()
                _sync(device)
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)

    g = flops.exit_gflops(bundle, exits)
    counts = torch.bincount(mixed.cpu(), minlength=exits[-1] + 1)
    share = {e: int(counts[e]) / n for e in exits}
    mean_gflops = sum(share[e] * g[e] for e in exits)
    allowed = g[exits[-1]] / mean_gflops
    med = {k: statistics.median(v) for k, v in times.items()}
    measured = med["full"] / med["adaptive"]
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    measured_cpu = med_cpu["full"] / med_cpu["adaptive"]
    result = {
        "model": bundle.identity["name"], "device": device, "threads": torch.get_num_threads(),
        "precision": args.precision, "batch_size": n, "repeats": args.repeats, "exits": exits,
        "mix": {str(e): share[e] for e in exits}, "gflops_per_exit": {str(e): g[e] for e in exits},
        "gflops_full": g[exits[-1]], "gflops_adaptive_mean": mean_gflops,
        "images_per_s": {k: n / v for k, v in med.items()},
        "seconds_per_batch": {k: {"median": med[k], "all": v} for k, v in times.items()},
        "speedup_measured": measured, "speedup_allowed_by_gflops": allowed,
        "realisation_ratio": measured / allowed, "full_vs_bare": med["bare"] / med["full"],
        "cpu_seconds_per_batch": {k: {"median": med_cpu[k], "all": v} for k, v in cpu.items()},
        "speedup_measured_cpu_time": measured_cpu, "realisation_ratio_cpu_time": measured_cpu / allowed,
    }
    print(f"{result['model']} on {device} ({result['threads']} threads), batch {n}, exits {exits}, "
          f"mix {', '.join(f'{share[e]:.2f}@{e}' for e in exits)}, {args.repeats} interleaved rounds (medians)")
    print(f"  bare encode_image   {n / med['bare']:8.2f} img/s   {g[exits[-1]]:7.2f} GFLOPs/img")
    print(f"  adaptive, all full  {n / med['full']:8.2f} img/s   {g[exits[-1]]:7.2f} GFLOPs/img   "
          f"(÷ bare: {result['full_vs_bare']:.3f})")
    print(f"  adaptive, mixed     {n / med['adaptive']:8.2f} img/s   {mean_gflops:7.2f} GFLOPs/img")
    print(f"  speedup measured {measured:.3f}x, allowed by counted GFLOPs {allowed:.3f}x, "
          f"realised {result['realisation_ratio']:.3f} (target >= 0.9)")
    if device == "cpu":
        print(f"  by process CPU time (less sensitive to other load): speedup {measured_cpu:.3f}x, "
              f"realised {result['realisation_ratio_cpu_time']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
