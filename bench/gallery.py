"""Benchmark: how much of full-depth recall each early exit keeps, as the gallery grows.

A calibration sample holds a few thousand images, an index millions. This measures, on one held-out split, the
text→image recall@1 of full depth and of every fixed exit against galleries of n, n/2, n/4, ... of the split's
images (``pipeline.training.calibrate.by_gallery_size``, the function behind `icar calibrate`'s ``by_gallery``
report: disjoint random parts, each caption searched within its image's part, hits pooled), and each exit's share of
full depth at every size, plus the least-squares slope of that share per doubling of the gallery.

It also measures, per size and early exit, what mixing that exit with full depth in one index costs (issue #20
point 1's "mixed-gallery penalty", as `icar train-exits` reports it): the caption's image at the exit among
full-depth images (exit|full) against an all-exit gallery, and the caption's image at full depth among exit images
(full|exit) against an all-full gallery, exit rows scored ``scale * cosine + offset`` with the heads' own
``exit_scales`` and ``exit_offsets`` as `icar index` scores them (``recall.calibrated_penalty``, the figure `icar
train-exits` chooses the calibration by); the penalty is the worse of the two differences (negative: mixing helps).

    python -m bench.gallery --corpus /work/demo-corpus-t10000 --json gallery.json

Recall only (no timing): the load average is printed for the record, the figures do not depend on it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import load_average, machine_facts  # noqa: E402
from bench.quality import add_split_args, embed_split  # noqa: E402
from pipeline.model import models  # noqa: E402
from pipeline.training.calibrate import by_gallery_size, slope_per_doubling  # noqa: E402
from pipeline.training.recall import calibrated_penalty, mixed_margins  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.gallery", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_split_args(p)
    p.add_argument("--min-images", type=int, default=100, help="smallest gallery measured")
    p.add_argument("--seed", type=int, default=0, help="seed of the split into parts")
    p.add_argument("--bootstrap", type=int, default=1000,
                   help="bootstrap resamples of the captions for the penalty's 95 %% interval (default 1000)")
    p.add_argument("--json", default=None, help="write the results here as JSON")
    return p.parse_args(argv)


def share_table(sizes: list[dict], exits: list[int]) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Return ({"exit e": [share of full depth's recall@1 per size]}, {"exit e": slope of the share per doubling})."""
    shares, slopes = {}, {}
    for e in exits[:-1]:
        name = f"exit {e}"
        shares[name] = [s["t2i@1"][name] / s["t2i@1"]["full"] for s in sizes]
        slopes[name] = slope_per_doubling([s["images"] for s in sizes], shares[name])
    return shares, slopes


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.bootstrap < 100:
        raise SystemExit(f"--bootstrap {a.bootstrap}: the penalty's interval needs at least 100 resamples")
    t0, load_start = time.perf_counter(), load_average()
    corpus, keys, captions, heads, exits, emb, bundle = embed_split(a)
    text = models.encode_text(bundle, captions)
    # as `icar calibrate` reports it: every caption a query for its own image (a repeated caption's other images
    # are competitors; 69 of the 10 000 demo test captions repeat)
    galleries = {"full": emb[exits[-1]], **{f"exit {e}": emb[e] for e in exits[:-1]}}
    sizes = by_gallery_size(galleries, text, np.arange(len(keys)), min_images=a.min_images, seed=a.seed)
    shares, slopes = share_table(sizes, exits)
    scales, offsets = heads.exit_scales, heads.exit_offsets
    penalties = {f"exit {e}": [{**r, "scale": scales[e], "offset": offsets[e]} for r in calibrated_penalty(
        mixed_margins(text, emb[e], emb[exits[-1]], a.min_images, a.seed), scales[e], offsets[e], a.bootstrap)]
        for e in exits[:-1]}
    facts = machine_facts()
    print(f"# {facts['date']}, load average {load_start} at start, {load_average()} at end, icar {facts['git']}, "
          f"{time.perf_counter() - t0:.0f} s")
    print(f"{a.split} split of {corpus}: {len(keys)} images and captions; demo CLIP exits {exits}; "
          "text->image recall@1 against disjoint random parts of each size, hits pooled over the parts.\n")
    names = list(shares)
    print("| gallery images | full-depth R@1 | " + " | ".join(f"{n} ÷ full" for n in names) + " |")
    print("|---|---|" + "---|" * len(names))
    for i, s in enumerate(sizes):
        print(f"| {s['images']} | {s['t2i@1']['full']:.3f} | "
              + " | ".join(f"{100 * shares[n][i]:.1f} %" for n in names) + " |")
    if len(sizes) > 1:
        print("\nslope of the share per doubling of the gallery: "
              + ", ".join(f"{n} {100 * slopes[n]:+.1f} points" for n in names))
    print("\nmixed-gallery penalty (points of text->image R@1; the worse of own exit - exit|full and own full - "
          "full|exit, exit rows scored scale x cosine + offset with the heads' exit_scales and exit_offsets: "
          + ", ".join(f"{n} {penalties[n][0]['scale']:g} / {penalties[n][0]['offset']:+g}" for n in names) + "):\n")
    print("| gallery images | " + " | ".join(f"{n}: penalty [95 % interval] (exit side / full side)" for n in names)
          + " |")
    print("|---|" + "---|" * len(names))
    for i, s in enumerate(sizes):
        print(f"| {s['images']} | " + " | ".join(
            f"{100 * p['penalty']:+.1f} [{100 * p['penalty_interval'][0]:+.1f}, {100 * p['penalty_interval'][1]:+.1f}] "
            f"({100 * (p['own_exit_t2i@1'] - p['exit_vs_full_t2i@1']):+.1f} / "
            f"{100 * (p['own_full_t2i@1'] - p['full_vs_exit_t2i@1']):+.1f})" for p in (penalties[n][i] for n in names))
              + " |")
    if a.json:
        Path(a.json).write_text(json.dumps({"facts": facts, "corpus": corpus, "split": a.split, "images": len(keys),
                                            "exits": exits, "sizes": sizes,
                                            "shares": shares, "slope_per_doubling": slopes,
                                            "mixed_penalty": penalties,
                                            "load_average_start": load_start, "load_average_end": load_average()},
                                           indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
