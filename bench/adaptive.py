"""Benchmark: every adaptive-depth policy against full depth, fixed exits and random routing, with paired-bootstrap
95 % intervals, on the demo corpus's held-out test split (issue #20 point 3).

For the shipped demo CLIP (8 blocks, exits 4/6/8) and each exit-head file given (``--heads NAME=PATH``, repeatable:
the shipped heads and the mixed-gallery heads run in one go), on the test split (never used to train the model,
its heads, the scorer or to calibrate a router):

- policies: full depth; each fixed exit; the complexity router (the paper's design: a ThresholdRouter on the
  demo's training-free scorer, calibrated on the val split as ``icar calibrate --gflops-budget`` does, scorer
  cost counted); confidence exits (a ConfidenceRouter fitted on val as ``icar calibrate --confidence-heads``
  does, by its default rule, one confidence level at every early exit; confidence heads' cost counted; the heads
  from ``--confidence``, the demo's shipped ones, or trained here once as ``icar train-confidence`` trains them,
  on the train split); confidence + complexity (the same rule on each exit's confidence minus the complexity
  score, both standardised on val, as ``icar calibrate --complexity-weight 1`` fits it); each also calibrated
  "deep-first",
  on the complexity router's family of exit mixes with the images moved off full depth going to the deepest
  early exit first (``--shares 0,1``; for the complexity router its default shares them equally among the early
  exits, for the confidence routers ``--confidence-rule mix``); and, beside every routed row, random routing with
  exactly its exit mix (same GFLOPs, images shuffled, ``--random-seeds`` shuffles averaged per query); at budgets
  ``--budgets`` (0.55-0.9 of full-depth GFLOPs);
- an **oracle** per budget, labelled as what it is: an upper-bound reference that reads the test split's own labels,
  not a method. Each image's exit is chosen greedily by what it gains for its own caption (hit at rank 1 both
  directions, reciprocal ranks breaking ties; text→image against full-depth other images) per extra GFLOP, up to
  the budget (tower GFLOPs only), then evaluated exactly like every routed row (mixed-depth gallery, intervals,
  best fixed exit, random with its mix): how much any router could gain with these heads;
- per row: recall@1/5 text→image and image→text, instance-level (the query's own image or caption, identical
  captions being one query) and category-level (any image whose scene's main object, the first object group the
  caption names, has the query's shape and colour: the demo corpus regenerates each test image's scene), mean
  counted GFLOPs per image (pipeline/model/flops.py, scorer included), and exit mix;
- paired-bootstrap 95 % intervals (``--bootstrap`` resamples of the queries, the same resamples for both sides)
  of: method minus the best fixed exit at equal GFLOPs (the deepest fixed exit costing no more than the
  method's realised GFLOPs), method minus random routing with the same mix, method ÷ full depth (instance R@1),
  method minus full depth (category level), and mixed heads minus old heads for the same policy;
- measured images/s of ``ModelWorker.embed`` (what `icar embed` runs per batch) per policy on ``--time-images``
  test images, interleaved over ``--time-repeats`` rounds, and the realised speedup beside the GFLOP bound.

Every image is embedded once at every exit (``AdaptiveEncoder.forward_all_exits``); a policy only picks each
image's exit (``router.routed_embeddings``), as bench/quality.py does (which also checks that this equals what
ModelWorker.embed writes).

    python -m bench.adaptive [--heads old=pipeline/assets/demo/exit_heads.safetensors --heads mixed=PATH]
                             [--json adaptive.json] [--plot docs/adaptive_tradeoff.svg]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import tempfile
import time
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import interleaved, load_average, machine_facts, median  # noqa: E402
from bench.quality import DEFAULT_CORPUS, embed_all_exits, ensure_corpus, read_split, score_all  # noqa: E402
from pipeline.demo.corpus import scene_caption, scene_of  # noqa: E402
from pipeline.io import storage  # noqa: E402
from pipeline.index.read import append_column, append_query_constant  # noqa: E402
from pipeline.io.schema import EXIT_OFFSETS, EXIT_SCALES, parse_exit_offsets, parse_exit_scales  # noqa: E402
from pipeline.io.storage import read_bytes, safetensors_metadata  # noqa: E402
from pipeline.logs import setup_logging  # noqa: E402
from pipeline.model import models  # noqa: E402
from pipeline.model import router as routers  # noqa: E402
from pipeline.model.confidence import (ConfidenceHeads, ConfidenceMismatchError, confidence_gflops,  # noqa: E402
                                       every_exit)
from pipeline.model.confidence_calibration import calibrate_confidence_budget, sample_signal  # noqa: E402
from pipeline.model.models import pixels_to_tensor  # noqa: E402
from pipeline.model.router import routed_embeddings  # noqa: E402
from pipeline.model.spec import ModelSpec  # noqa: E402
from pipeline.model.worker import DEMO_ASSETS, ModelWorker  # noqa: E402
from pipeline.training.confidence import HEADS_FILE, ConfidenceTrainConfig, train_confidence  # noqa: E402
from pipeline.report.html import escape, tick_label, ticks  # noqa: E402
from pipeline.training.recall import caption_groups, caption_queries  # noqa: E402

log = logging.getLogger("bench.adaptive")

DEFAULT_BUDGETS = [0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9]
DEFAULT_TIME_BUDGETS = [0.6, 0.7, 0.8, 0.9]
KS = (1, 5)
DIRECTIONS = ("t2i", "i2t")
LEVELS = ("instance", "category")
# Targets of issue #20 point 3.
TARGET_MAX_COST = 0.80  # at <= 0.80 of full-depth GFLOPs ...
TARGET_RATIO = 0.95  # ... t2i and i2t recall@1 >= 95 % of full depth
TARGET_MIN_BUDGET = 0.6  # at every budget >= 0.6, confidence exits ahead of the best fixed exit and of random
ORACLE_NOTE = " (upper bound from the test labels, not a method)"
COMPLEXITY_WEIGHT = 1.0  # confidence+complexity: equal weights (`icar calibrate --complexity-weight 1`)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.adaptive", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default=str(DEFAULT_CORPUS), help="demo corpus (from `icar make-demo-corpus`)")
    p.add_argument("--cache-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "icar", "bench-quality"),
                   help="where a generated corpus is kept when --corpus has none")
    p.add_argument("--heads", action="append", default=None, metavar="NAME=PATH",
                   help="exit heads to measure (repeatable; the first is the reference the others are compared "
                        "with); default: old=the shipped demo heads")
    p.add_argument("--confidence", action="append", default=None, metavar="NAME=PATH",
                   help="confidence heads (`icar train-confidence`) for the exit heads named NAME in --heads "
                        "(repeatable; they are bound to those heads); heads without one get the demo's shipped "
                        "confidence heads where those were trained for them, else confidence heads trained here as "
                        "`icar train-confidence` trains them, on the train split, kept in --cache-dir")
    p.add_argument("--confidence-train", type=int, default=4000,
                   help="training pairs (the train split's first) of the confidence heads trained here")
    p.add_argument("--no-confidence", action="store_true", help="no confidence rows for heads without --confidence")
    p.add_argument("--scaled", action="append", default=None, metavar="NAME",
                   help="also measure the heads named NAME with the per-exit score calibration their file records "
                        "for a mixed index applied, as `icar index` applies it: exit rows scored scale x cosine + "
                        "offset (rows 'NAME+scales'; repeatable)")
    p.add_argument("--budget-confidence", type=float, default=routers.DEFAULT_BUDGET_CONFIDENCE, metavar="P",
                   help="routers are fitted on val as `icar calibrate --budget-confidence P` fits them: under each "
                        "budget by a margin that keeps a new sample's mean cost within it with probability P (0.5: "
                        "exactly at it on val, as before 2026-12-06 23:00)")
    p.add_argument("--budgets", default=",".join(map(str, DEFAULT_BUDGETS)),
                   help="GFLOP budgets as fractions of full depth, comma-separated")
    p.add_argument("--bootstrap", type=int, default=1000, help="paired-bootstrap resamples per interval")
    p.add_argument("--random-seeds", type=int, default=5, help="shuffles of random routing averaged per query")
    p.add_argument("--n-test", type=int, default=None, help="test images (default: the whole split)")
    p.add_argument("--n-val", type=int, default=None, help="val images to calibrate on (default: the whole split)")
    p.add_argument("--time-images", type=int, default=256, help="test images per timed ModelWorker.embed round "
                                                                   "(0: no timing)")
    p.add_argument("--time-repeats", type=int, default=3, help="interleaved timing rounds (median reported)")
    p.add_argument("--time-budgets", default=",".join(map(str, DEFAULT_TIME_BUDGETS)),
                   help="budgets whose policies are timed (fixed depths always are)")
    p.add_argument("--batch-size", type=int, default=128, help="images per model call")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--precision", default="fp32",
                   help="model precision (ModelSpec.precision); fp32 by default so that the recall figures do not "
                        "depend on whether this CPU computes bfloat16 natively")
    p.add_argument("--json", default=None, help="also write every number here")
    p.add_argument("--plot", default=None, help="write the recall@1-vs-GFLOPs figure (SVG) here")
    p.add_argument("--from-json", default=None, help="measure nothing: print the tables (and --plot the figure) of "
                                                     "a result written by --json")
    return p.parse_args(argv)


def parse_heads(items: list[str] | None, flag: str = "--heads") -> dict[str, str]:
    """Return {name: path} from NAME=PATH items (default for --heads: the shipped demo heads as "old")."""
    if not items:
        return {"old": str(DEMO_ASSETS / "exit_heads.safetensors")} if flag == "--heads" else {}
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"{flag} {item!r}: give NAME=PATH, e.g. {flag} mixed=heads/mixed.safetensors")
        if name in out:
            raise ValueError(f"{flag} names {name!r} twice; give each file its own name")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{flag} {item}: {path} does not exist")
        out[name] = path
    return out


# ------------------------------------------------------------------------------------------------ pure parts


def main_objects(corpus: str, split: str, keys: list[str]) -> np.ndarray:
    """Return, per key, its scene's main object "colour shape" (the first object group its caption names).

    The demo corpus regenerates any sample's scene from (seed, split, index in split); the index is the key's
    position among the split's rows of scenes.parquet, and the regenerated caption must equal the stored one.
    """
    import pyarrow.parquet as pq

    seed = int(json.loads(Path(corpus, "corpus.json").read_text())["seed"])
    table = pq.read_table(os.path.join(corpus, "scenes.parquet"), columns=["key", "split", "caption"]).to_pydict()
    index, caption = {}, {}
    for k, s, c in zip(table["key"], table["split"], table["caption"]):
        if s == split:
            index[k], caption[k] = len(index), c
    out = []
    for k in keys:
        if k not in index:
            raise ValueError(f"scenes.parquet of {corpus} has no {split} row for key {k}; regenerate the corpus")
        scene = scene_of(seed, split, index[k])
        if scene_caption(scene) != caption[k]:
            raise ValueError(f"the regenerated scene of {split} key {k} does not match its stored caption "
                             f"({caption[k]!r}): the corpus was made by another generator version; regenerate it")
        g = scene.groups[0]
        out.append(f"{g.color} {g.shape}")
    return np.asarray(out)


def label_ranks(sim: np.ndarray, query_labels: np.ndarray, gallery_labels: np.ndarray) -> np.ndarray:
    """Return, per query (row of ``sim``), the 0-based rank of its best-scored gallery item with the same label.

    Ties with a non-matching item do not hurt (items scored strictly higher are counted), as in
    pipeline.metrics.best_relevant_rank.
    """
    match = np.asarray(query_labels)[:, None] == np.asarray(gallery_labels)[None, :]
    lonely = np.flatnonzero(~match.any(axis=1))
    if lonely.size:
        raise ValueError(f"queries {lonely[:5].tolist()} have no gallery item with their label")
    best = np.where(match, sim, -np.inf).max(axis=1)
    return (sim > best[:, None]).sum(axis=1)


@dataclass
class Queries:
    """The test split's queries: distinct captions (t2i) and images (i2t), with instance and category labels."""

    text: np.ndarray  # (distinct captions, D) L2-normalised
    caption_label: np.ndarray  # instance label of each distinct caption (its group id)
    image_label: np.ndarray  # instance label of each image (its caption's group id)
    caption_category: np.ndarray  # main object of the first image of each distinct caption
    image_category: np.ndarray  # main object of each image
    first: np.ndarray  # the first image of each distinct caption

    @classmethod
    def build(cls, text: np.ndarray, captions: list[str], categories: np.ndarray) -> "Queries":
        groups = caption_groups(captions)
        first, _ = caption_queries(groups)
        categories = np.asarray(categories)
        return cls(text=np.asarray(text, np.float32)[first], caption_label=np.arange(len(first)),
                   image_label=groups, caption_category=categories[first], image_category=categories, first=first)

    def ranks(self, images: np.ndarray) -> dict[tuple[str, str], np.ndarray]:
        """Return {(direction, level): per-query rank of the best relevant item} for a gallery of ``images``."""
        sim = self.text @ np.asarray(images, np.float32).T  # (captions, images)
        return {("t2i", "instance"): label_ranks(sim, self.caption_label, self.image_label),
                ("t2i", "category"): label_ranks(sim, self.caption_category, self.image_category),
                ("i2t", "instance"): label_ranks(sim.T, self.image_label, self.caption_label),
                ("i2t", "category"): label_ranks(sim.T, self.image_category, self.caption_category)}

    def hits(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Return {"t2i/instance/1": per-query hit (0/1 float), ...} for every direction, level and k in KS."""
        return {f"{d}/{lv}/{k}": (r < k).astype(np.float64) for (d, lv), r in self.ranks(images).items() for k in KS}


def bootstrap_indices(n: int, resamples: int, seed: int = 0) -> np.ndarray:
    """Return (resamples, n) query indices drawn with replacement: the same draws serve every paired comparison."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def paired_diff(a: np.ndarray, b: np.ndarray, idx: np.ndarray) -> dict:
    """Return mean(a) - mean(b) over the same queries, with the paired-bootstrap 95 % interval (2.5/97.5 %)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired hits must cover the same queries, got {a.shape} and {b.shape}")
    boot = (a - b)[idx].mean(axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"diff": float(a.mean() - b.mean()), "lo": float(lo), "hi": float(hi)}


def paired_ratio(a: np.ndarray, b: np.ndarray, idx: np.ndarray) -> dict:
    """Return mean(a) / mean(b) over the same queries, with the paired-bootstrap 95 % interval."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    num, den = a[idx].mean(axis=1), b[idx].mean(axis=1)
    boot = np.divide(num, den, out=np.full_like(num, np.nan), where=den > 0)
    lo, hi = np.nanpercentile(boot, [2.5, 97.5])
    return {"ratio": float(a.mean() / b.mean()) if b.mean() else float("nan"), "lo": float(lo), "hi": float(hi)}


def same_mix_shuffle(depth: np.ndarray, seed: int) -> np.ndarray:
    """Return ``depth`` randomly permuted: the same exit counts (so the same GFLOPs), assigned at random."""
    return np.random.default_rng(seed).permutation(np.asarray(depth))


def best_fixed_exit(cost_fraction: float, fixed_costs: dict[int, float]) -> int | None:
    """Return the deepest fixed exit whose cost (fraction of full depth) is at most ``cost_fraction`` (None: none)."""
    ok = [e for e, c in fixed_costs.items() if c <= cost_fraction + 1e-9]
    return max(ok) if ok else None


def own_caption_utility(q: "Queries", emb: dict[int, np.ndarray], exits: list[int]) -> np.ndarray:
    """Return (images, exits) utilities of each image's embedding at each exit for its own caption: hit at rank 1
    text→image plus hit at rank 1 image→text, plus 0.01 × the two reciprocal ranks (which break ties).

    Text→image: the image's caption searched in a gallery where this image is at that exit and every other image at
    full depth; image→text does not depend on the other images. Uses the split's own labels: an oracle's input.
    """
    full = np.asarray(emb[exits[-1]], np.float32)
    own = q.image_label
    sim_full = (q.text @ full.T)[own]  # (images, images): row i = image i's caption against full-depth images
    match = own[:, None] == own[None, :]
    twins = np.where(match & ~np.eye(len(own), dtype=bool), sim_full, -np.inf).max(axis=1)
    out = np.zeros((len(own), len(exits)))
    for j, e in enumerate(exits):
        x = np.asarray(emb[e], np.float32)
        best = np.maximum(np.einsum("nd,nd->n", q.text[own], x), twins)
        t2i = ((sim_full > best[:, None]) & ~match).sum(axis=1)
        i2t = label_ranks(x @ q.text.T, own, q.caption_label)
        out[:, j] = (t2i == 0).astype(float) + (i2t == 0) + 0.01 * (1 / (1 + t2i) + 1 / (1 + i2t))
    return out


def oracle_depth(utility: np.ndarray, exits: list[int], cost: dict[int, float], budget: float,
                 closeness: np.ndarray) -> np.ndarray:
    """Return each image's exit chosen by an oracle: greedy by utility gained per extra GFLOP, within ``budget``
    (mean GFLOPs per image), starting from the cheapest exit; the budget left is then filled one exit deeper at a
    time where that loses no utility, shallowest exits first, least ``closeness`` (cosine to full depth, (images,
    exits)) first.

    Greedy on each image's upper convex hull of (cost, utility): the usual solution of this multiple-choice
    knapsack, optimal up to the last item that does not fit.
    """
    c = np.asarray([cost[e] for e in exits], np.float64)
    n, k = utility.shape
    if budget < c[0] - 1e-12:
        raise ValueError(f"oracle: budget {budget} GFLOPs is below the cheapest exit's {c[0]}")
    choice = np.zeros(n, np.int64)
    segments = []
    for i in range(n):
        u, hull = utility[i], [0]
        for j in range(1, k):
            if u[j] <= u[hull[-1]]:
                continue  # no gain for more compute
            while len(hull) >= 2 and ((u[hull[-1]] - u[hull[-2]]) / (c[hull[-1]] - c[hull[-2]])
                                      <= (u[j] - u[hull[-1]]) / (c[j] - c[hull[-1]])):
                hull.pop()
            hull.append(j)
        segments += [((u[b] - u[a]) / (c[b] - c[a]), i, a, b) for a, b in zip(hull, hull[1:])]
    spare = (budget - c[0]) * n
    for _, i, a, b in sorted(segments, key=lambda s: -s[0]):  # an image's hull slopes fall: taken in order
        if choice[i] == a and c[b] - c[a] <= spare + 1e-9:
            choice[i], spare = b, spare - (c[b] - c[a])
    for j in range(k - 1):  # fill: no own-caption gain left, spend what remains where the embedding is farthest
        for i in np.argsort(closeness[:, j], kind="stable"):
            if choice[i] == j and utility[i, j + 1] >= utility[i, j] and c[j + 1] - c[j] <= spare + 1e-9:
                choice[i], spare = j + 1, spare - (c[j + 1] - c[j])
    return np.asarray(exits)[choice]


def share_variants(exits: list[int]) -> list[tuple[str, list[float] | None]]:
    """Return (policy-name suffix, ``shares``) of the two ways a router's calibration shares the images moved off
    full depth among the early exits: equally (`icar calibrate`'s default) and deepest early exit first
    (``--shares 0,...,0,1``), which on a concave recall-vs-depth curve keeps more recall per GFLOP."""
    if len(exits) < 3:
        return [("", None)]
    return [("", None), (" deep-first", [0.0] * (len(exits) - 2) + [1.0])]


def shipped_confidence(worker) -> str | None:
    """Return the demo's shipped confidence heads when they were trained for ``worker``'s exit heads, else None."""
    path = DEMO_ASSETS / HEADS_FILE
    if not path.exists():
        return None
    try:
        ConfidenceHeads.load(str(path), worker.bundle, worker.encoder.heads)
    except ConfidenceMismatchError:
        return None
    return str(path)


def trained_confidence(heads_name: str, heads_path: str, worker, corpus: str, doc: dict, a: argparse.Namespace
                       ) -> str:
    """Return confidence heads for ``worker``'s exit heads: cached, or trained now as `icar train-confidence` would
    on the first ``--confidence-train`` pairs of the corpus's train split (never the val or test split)."""
    digest = hashlib.sha256(os.path.abspath(corpus).encode()).hexdigest()[:8]
    out = os.path.join(a.cache_dir, "confidence", f"{os.path.basename(os.path.normpath(corpus))}-{digest}",
                       f"{worker.encoder.heads.sha256()[:16]}-margin-n{a.confidence_train}")
    path = os.path.join(out, HEADS_FILE)
    if os.path.exists(path):
        return path
    shards = [os.path.join(corpus, s) for s in doc["splits"]["train"]["shards"]]
    log.info("training confidence heads for --heads %s into %s (once; reused afterwards)", heads_name, out)
    train_confidence(ConfidenceTrainConfig(inputs=shards, output=out, model="demo", heads=heads_path,
                                           max_train=a.confidence_train, device="cpu"))
    return path


def confidence_sample(worker, heads: ConfidenceHeads, pixels: np.ndarray, batch_size: int) -> dict[int, np.ndarray]:
    """Return {early exit: float32 confidences (N,)} of every image, each taken through every exit."""
    import torch

    out: dict[int, list] = {}
    with torch.inference_mode():
        for i in range(0, len(pixels), batch_size):
            x = pixels_to_tensor(worker.bundle, pixels[i:i + batch_size], device=worker.device)
            _, conf, _ = every_exit(worker.encoder, heads, x)
            for e, v in conf.items():
                out.setdefault(e, []).append(v.float().cpu().numpy())
    return {e: np.concatenate(v) for e, v in out.items()}


def load_confidence(path: str, worker, ctx: dict, batch_size: int) -> dict:
    """Return the confidence heads at ``path`` (bound to ``worker``'s exit heads), their val and test confidences
    and their counted GFLOPs per early exit."""
    heads = ConfidenceHeads.load(path, worker.bundle, worker.encoder.heads)
    if heads.exits != worker.exits:
        raise ValueError(f"confidence heads {path} have exits {heads.exits}, the encoder {worker.exits}")
    val = confidence_sample(worker, heads, ctx["val_px"], batch_size)
    test = confidence_sample(worker, heads, ctx["test_px"], batch_size)
    block, combined_val = sample_signal(val, ctx["val_scores"], COMPLEXITY_WEIGHT)
    return {"heads": heads, "path": path, "gflops": confidence_gflops(heads, worker.bundle.model.visual),
            "val": val, "test": test, "combined_val": combined_val, "complexity": block}


def confidence_policies(ctx: dict, budget: float) -> dict[str, dict]:
    """Return {policy name: {"depth": test exits (N,), "gflops": mean GFLOPs per image, "router": ...}}.

    Confidence exits: a ConfidenceRouter fitted on the val split at ``budget`` as `icar calibrate
    --confidence-heads` fits it (confidence heads' GFLOPs counted), applied to the test split's confidences.
    Empty when the heads measured have no confidence heads (``ctx["confidence"]`` None).
    """
    c = ctx.get("confidence")
    if c is None:
        return {}
    exits, gpe = ctx["exits"], ctx["gpe"]
    out = {}
    # `icar calibrate --confidence-heads`'s default rule (one confidence level at every early exit), and the
    # complexity router's family of mixes with the deepest early exit first (--confidence-rule mix --shares 0,1).
    variants = [("", None, "level")] + [(sfx, sh, "mix") for sfx, sh in share_variants(exits) if sh is not None]
    for suffix, shares, rule in variants:
        try:
            r = calibrate_confidence_budget(c["val"], exits, gpe, c["gflops"], budget, c["heads"].identity,
                                            shares=shares, rule=rule, budget_confidence=ctx["budget_confidence"])
        except ValueError as e:
            log.info("confidence router at budget %.2f: %s", budget, e)
            continue
        depth = r.route_confidences(c["test"])
        cost = r.gflops_per_exit(gpe, c["gflops"])
        out["confidence" + suffix] = {"depth": depth, "router": r, "thresholds": r.thresholds,
                                      "gflops": float(np.mean([cost[int(d)] for d in depth])),
                                      "heads_path": ctx["heads_path"]}
        # Confidence + complexity: the same rule on a combined signal, each exit's confidence minus the image's
        # complexity score, both standardised on val (equal weights, nothing tuned on test), fitted as `icar
        # calibrate --confidence-heads H --complexity-weight 1` fits it. The scorer runs first and its GFLOPs count;
        # the router (with its complexity block) is what `icar embed --router` runs, so it is timed too.
        try:
            r = calibrate_confidence_budget(c["combined_val"], exits, gpe, c["gflops"], budget, c["heads"].identity,
                                            scorer_gflops=ctx["scorer_gflops"], shares=shares, rule=rule,
                                            budget_confidence=ctx["budget_confidence"])
        except ValueError as e:
            log.info("confidence+complexity router at budget %.2f: %s", budget, e)
            continue
        r = r.with_complexity(c["complexity"])
        depth = r.route_confidences(c["test"], ctx["test_scores"])
        cost = r.gflops_per_exit(gpe, c["gflops"], ctx["scorer_gflops"])
        out["confidence+complexity" + suffix] = {"depth": depth, "router": r, "thresholds": r.thresholds,
                                                 "gflops": float(np.mean([cost[int(d)] for d in depth])),
                                                 "heads_path": ctx["heads_path"]}
    return out


# ------------------------------------------------------------------------------------------------ measuring


class KeyRouter:
    """Routes by a fixed {key: exit} table (timing random routing with an exact mix); needs no scores."""

    kind = "key_table"
    needs_scores = False

    def __init__(self, keys: list[str], depth: np.ndarray):
        self.table = dict(zip(keys, np.asarray(depth).tolist()))

    def route(self, scores, keys: list[str]) -> np.ndarray:
        """Return the tabled exit (int16) of each of ``keys``."""
        return np.asarray([self.table[k] for k in keys], np.int16)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "keys": len(self.table)}


def summarise(hits: dict[str, np.ndarray]) -> dict[str, float]:
    return {k: float(v.mean()) for k, v in hits.items()}


def evaluate(name: str, policy: str, budget: float | None, depth: np.ndarray, gflops: float, full_gflops: float,
             exits: list[int], hits: dict[str, np.ndarray], **extra) -> dict:
    """Return one result row (recall by direction/level/k, GFLOPs, cost fraction, exit mix); hits kept aside."""
    depth = np.asarray(depth)
    return {"name": name, "policy": policy, "budget": budget, "recall": summarise(hits), "gflops": gflops,
            "cost_fraction": gflops / full_gflops, "mix": {str(e): float(np.mean(depth == e)) for e in exits},
            **extra}


def recorded_calibration(path: str) -> dict[int, tuple[float, float]]:
    """Return {exit: (scale, offset)}: the per-exit score calibration a heads file records for a mixed-depth index
    (its metadata's ``exit_scales`` and ``exit_offsets``, written by `icar train-exits`; offset 0 where it records
    none), or raise naming the file."""
    meta = safetensors_metadata(read_bytes(path))
    scales = parse_exit_scales(meta.get(EXIT_SCALES), path)
    if not scales:
        raise ValueError(f"--scaled: {path} records no {EXIT_SCALES}; train the heads with a current `icar "
                         f"train-exits`, or drop --scaled for them")
    offsets = parse_exit_offsets(meta.get(EXIT_OFFSETS), path)
    return {e: (s, offsets.get(e, 0.0)) for e, s in scales.items()}


def measure_heads(name: str, path: str, ctx: dict, budgets: list[float], a: argparse.Namespace,
                  calibration: dict[int, tuple[float, float]] | None = None) -> dict:
    """Return rows and per-query hits of every policy for one heads file (``calibration``: {exit: (scale, offset)},
    each exit's rows scored scale x cosine + offset, as `icar index` holds them: scaled, the offset in one more
    dimension where every query holds 1)."""
    worker = ModelWorker(ModelSpec(model="demo", heads=path, device="cpu", torch_threads=a.threads,
                                   precision=a.precision))
    if worker.exits != ctx["exits"]:
        raise ValueError(f"--heads {name}={path} has exits {worker.exits}, the reference {ctx['exits']}")
    t = time.perf_counter()
    emb = embed_all_exits(worker, ctx["test_px"], a.batch_size)
    embed_s = time.perf_counter() - t
    exits, gpe, q = ctx["exits"], ctx["gpe"], ctx["queries"]
    unit = {e: v / np.linalg.norm(v, axis=1, keepdims=True) for e, v in emb.items()}
    closeness = np.stack([np.einsum("nd,nd->n", unit[e], unit[exits[-1]]) for e in exits], axis=1)
    if calibration:  # as `icar index` holds the rows: scaled, the offset in one more dimension
        emb = {e: append_column(v * np.float32(scale), offset)
               for e, v in emb.items() for scale, offset in [calibration.get(e, (1.0, 0.0))]}
        q = dataclasses.replace(q, text=append_query_constant(q.text))
    full_g = gpe[exits[-1]]
    n = len(ctx["test_keys"])
    rows, hits = [], {}

    def add(key: str, label: str, policy: str, budget, depth, gflops, h=None, **extra):
        h = q.hits(routed_embeddings(np.asarray(depth), emb)) if h is None else h
        hits[key] = h
        # Each caption's own image searched among images of its own depth (the fixed-exit galleries): what the
        # row's exits would give without mixing depths in one index. The gap to the row's t2i R@1 is the mixing.
        own = float(np.mean([hits["full" if d == exits[-1] else f"exit{d}"]["t2i/instance/1"][qi]
                             for qi, d in enumerate(np.asarray(depth)[q.first])]))
        rows.append(evaluate(label, policy, budget, depth, gflops, full_g, exits, h, key=key, heads=name,
                             t2i_r1_own_depth=own, **extra))

    add("full", f"full depth ({exits[-1]} blocks)", "full", None, np.full(n, exits[-1]), full_g)
    for e in exits[:-1]:
        add(f"exit{e}", f"fixed exit {e}", "fixed", None, np.full(n, e), gpe[e])
    conf_path = ctx["confidence_paths"].get(name.removesuffix("+scales"))
    if conf_path is None and not a.no_confidence:
        conf_path = shipped_confidence(worker) or trained_confidence(name, path, worker, ctx["corpus"],
                                                                     ctx["corpus_doc"], a)
    ctx_h = {**ctx, "worker": worker, "test_embeddings": emb, "heads_path": path,
             "confidence": load_confidence(conf_path, worker, ctx, a.batch_size) if conf_path else None}
    oracle_util = own_caption_utility(q, emb, exits)
    for b in budgets:
        policies = {}
        for suffix, shares in share_variants(exits):
            try:
                r = routers.calibrate_budget(ctx["val_scores"], exits, gpe, ctx["scorer_gflops"], b, shares=shares,
                                             budget_confidence=ctx["budget_confidence"])
            except ValueError as e:
                log.info("complexity router at budget %.2f: %s", b, e)
                continue
            depth = r.route(ctx["test_scores"])
            policies["complexity" + suffix] = {
                "depth": depth, "router": r, "scored": True, "thresholds": r.thresholds,
                "gflops": float(np.mean([gpe[int(d)] for d in depth])) + ctx["scorer_gflops"]}
        policies.update(confidence_policies(ctx_h, b))
        # The oracle: each image's exit chosen from the test split's own labels (what it gains for its own caption),
        # an upper-bound reference of what any router could get from these heads, not a method. Tower GFLOPs only
        # (it decides for free); evaluated, and paired with random routing of its mix, like every routed row.
        policies["oracle"] = {"depth": oracle_depth(oracle_util, exits, gpe, b * full_g, closeness)}
        policies["oracle"]["gflops"] = float(np.mean([gpe[int(d)] for d in policies["oracle"]["depth"]]))
        for pol, p in policies.items():
            add(f"{pol}@{b:g}", f"{pol} at budget {b:g}" + (ORACLE_NOTE if pol == "oracle" else ""), pol, b,
                p["depth"], p["gflops"],
                **({"thresholds": p["thresholds"]} if "thresholds" in p else {}))
            # Random routing with exactly this policy's exit mix: same tower GFLOPs, no scorer.
            runs = [q.hits(routed_embeddings(same_mix_shuffle(p["depth"], s), emb)) for s in range(a.random_seeds)]
            mean_h = {k: np.mean([r[k] for r in runs], axis=0) for k in runs[0]}
            tower = float(np.mean([gpe[int(d)] for d in p["depth"]]))
            add(f"random[{pol}]@{b:g}", f"random, {pol}'s mix at budget {b:g}", f"random[{pol}]", b, p["depth"],
                tower, h=mean_h, shuffles=a.random_seeds)
            if pol != "oracle":  # no worker can run it
                ctx.setdefault("timing_routers", {}).setdefault(name, {})[f"{pol}@{b:g}"] = p
    return {"rows": rows, "hits": hits, "embed_seconds": embed_s, "path": path, "confidence": conf_path,
            "identity": worker.heads.identity if worker.heads is not None else None}


def comparisons(results: dict[str, dict], ctx: dict, idx_by_dir: dict[str, np.ndarray]) -> list[dict]:
    """Return the paired-bootstrap comparisons of every row but full depth (see the module docstring)."""
    exits, gpe = ctx["exits"], ctx["gpe"]
    full_g = gpe[exits[-1]]
    fixed_costs = {e: gpe[e] / full_g for e in exits}
    ref = next(iter(results))
    out = []
    for hname, res in results.items():
        hits = res["hits"]
        for row in res["rows"]:
            if row["policy"] == "full":
                continue
            c = {"heads": hname, "key": row["key"], "policy": row["policy"], "budget": row["budget"],
                 "cost_fraction": row["cost_fraction"]}
            # Fixed exits are the reference of 'vs fixed', not compared with themselves.
            fe = None if row["budget"] is None else best_fixed_exit(row["cost_fraction"], fixed_costs)
            c["best_fixed_exit"] = fe
            for d in DIRECTIONS:
                i1, ic = f"{d}/instance/1", f"{d}/category/1"
                mine, idx = hits[row["key"]], idx_by_dir[d]
                if fe is not None:
                    c[f"{d}_vs_fixed"] = paired_diff(mine[i1], hits["full" if fe == exits[-1] else f"exit{fe}"][i1],
                                                     idx)
                if row["budget"] is not None and not row["policy"].startswith("random"):
                    c[f"{d}_vs_random"] = paired_diff(mine[i1], hits[f"random[{row['policy']}]@{row['budget']:g}"][i1],
                                                      idx)
                c[f"{d}_ratio_full"] = paired_ratio(mine[i1], hits["full"][i1], idx)
                c[f"{d}_category_vs_full"] = paired_diff(mine[ic], hits["full"][ic], idx)
                if hname != ref and row["key"] in results[ref]["hits"]:
                    c[f"{d}_vs_{ref}_heads"] = paired_diff(mine[i1], results[ref]["hits"][row["key"]][i1], idx)
            out.append(c)
    return out


def time_policies(ctx: dict, a: argparse.Namespace, time_budgets: list[float]) -> dict:
    """Return images/s of ModelWorker.embed per policy (median of interleaved rounds) and the load during it."""
    n = min(a.time_images, len(ctx["test_keys"]))
    px, keys = ctx["test_px"][:n], ctx["test_keys"][:n]
    spec = ModelSpec(model="demo", device="cpu", torch_threads=a.threads, precision=a.precision)
    scored = ModelWorker(spec)  # the complexity router's worker: scores every batch (its cost is in the GFLOPs)
    plain = ModelWorker(spec)
    plain.drop_scorer()  # fixed, full and random routing do not score
    exits = ctx["exits"]
    jobs = {"full": (plain, routers.FixedRouter(exits[-1]))}
    for e in exits[:-1]:
        jobs[f"exit{e}"] = (plain, routers.FixedRouter(e))
    ref: dict[str, dict] = {}
    for by_key in ctx.get("timing_routers", {}).values():  # the first heads' policies, then any only others have
        for key, p in by_key.items():
            ref.setdefault(key, p)
    tmp = tempfile.mkdtemp(prefix="bench-adaptive-")
    for key, p in ref.items():
        pol, b = key.split("@")
        if float(b) not in time_budgets:
            continue
        if isinstance(p["router"], routers.ConfidenceRouter):
            # Decided inside the tower (AdaptiveEncoder.forward_confident): a worker built from the router file, as
            # `icar embed --heads H --router R` builds it.
            path = os.path.join(tmp, f"{pol}-{b}.json")
            routers.save_router(p["router"], path)
            jobs[key] = (ModelWorker(ModelSpec(model="demo", heads=p["heads_path"], router=path, device="cpu",
                                               torch_threads=a.threads, precision=a.precision)), None)
        else:
            jobs[key] = (scored if p.get("scored") else plain, p["router"])
        if not pol.endswith("deep-first"):  # one random twin per decision rule is enough to show its overhead
            depth = np.asarray(p["depth"])[:n]
            jobs[f"random[{pol}]@{b}"] = (plain, KeyRouter(keys, same_mix_shuffle(depth, 0)))
    seconds: dict[str, list[float]] = {k: [] for k in jobs}
    load_before = load_average()
    for w in (scored, plain):  # warm-up: first calls allocate
        w.router = routers.FixedRouter(exits[-1])
        w.embed(px[:a.batch_size], keys[:a.batch_size])
    for key in interleaved(list(jobs), a.time_repeats):
        w, r = jobs[key]
        if r is not None:
            w.router = r
        t0 = time.perf_counter()
        for i in range(0, n, a.batch_size):
            w.embed(px[i:i + a.batch_size], keys[i:i + a.batch_size])
        seconds[key].append(time.perf_counter() - t0)
    ips = {k: n / median(v) for k, v in seconds.items()}
    return {"images": n, "repeats": a.time_repeats, "images_per_s": ips,
            "speedup": {k: v / ips["full"] for k, v in ips.items()},
            "seconds": seconds, "load_average_before": load_before, "load_average_after": load_average()}


def run(a: argparse.Namespace) -> dict:
    """Measure everything; return the result document."""
    import torch

    t0 = time.perf_counter()
    load_start = load_average()  # machine_facts() below is taken at the end
    torch.set_num_threads(a.threads)
    heads = parse_heads(a.heads)
    confidence = parse_heads(a.confidence, "--confidence")
    missing = sorted(set(a.scaled or []) - set(heads))
    if missing:
        raise ValueError(f"--scaled names {missing}, which are not --heads names {sorted(heads)}")
    unknown = sorted(set(confidence) - set(heads))
    if unknown:
        raise ValueError(f"--confidence names {unknown}, which are not --heads names {sorted(heads)}")
    budgets = [float(b) for b in a.budgets.split(",") if b.strip()]
    time_budgets = [float(b) for b in a.time_budgets.split(",") if b.strip()]
    corpus, doc = ensure_corpus(a.corpus, a.cache_dir)
    base = ModelWorker(ModelSpec(model="demo", heads=next(iter(heads.values())), device="cpu",
                                 torch_threads=a.threads, precision=a.precision))
    size = base.bundle.image_size
    test_keys, test_px, test_caps = read_split(corpus, doc, "test", size, a.n_test)
    val_keys, val_px, _ = read_split(corpus, doc, "val", size, a.n_val)
    text = models.encode_text(base.bundle, test_caps)
    categories = main_objects(corpus, "test", test_keys)
    queries = Queries.build(text, test_caps, categories)
    ctx = {"exits": base.exits, "gpe": base.gflops_per_exit, "scorer_gflops": base.scorer_gflops,
           "test_keys": test_keys, "test_px": test_px, "val_keys": val_keys, "val_px": val_px,
           "val_scores": score_all(base.scorer, val_px, a.batch_size),
           "test_scores": score_all(base.scorer, test_px, a.batch_size), "queries": queries,
           "heads": heads, "corpus": corpus, "corpus_doc": doc, "confidence_paths": confidence,
           "budget_confidence": a.budget_confidence}
    results = {name: measure_heads(name, path, ctx, budgets, a) for name, path in heads.items()}
    for name in a.scaled or []:
        calibration = recorded_calibration(heads[name])
        results[f"{name}+scales"] = measure_heads(f"{name}+scales", heads[name], ctx, budgets, a, calibration)
        results[f"{name}+scales"]["exit_scales"] = {str(e): s for e, (s, _) in calibration.items()}
        results[f"{name}+scales"]["exit_offsets"] = {str(e): b for e, (_, b) in calibration.items()}
    idx = {"t2i": bootstrap_indices(len(queries.text), a.bootstrap, 1),
           "i2t": bootstrap_indices(len(test_keys), a.bootstrap, 2)}
    comps = comparisons(results, ctx, idx)
    timing = time_policies(ctx, a, time_budgets) if a.time_images else None
    rows = [r for res in results.values() for r in res["rows"]]
    if timing:
        for r in rows:
            if r["heads"] == next(iter(heads)) and r["key"] in timing["images_per_s"]:
                r["images_per_s"] = timing["images_per_s"][r["key"]]
                r["speedup"] = timing["speedup"][r["key"]]
    full_g = base.gflops_per_exit[base.exits[-1]]
    return {
        "facts": machine_facts(), "command": "python -m bench.adaptive " + " ".join(a._argv),
        "corpus": {"path": corpus, "command": doc.get("command"), "test_images": len(test_keys),
                   "t2i_queries": len(queries.text), "val_images": len(val_keys),
                   "categories": int(len(set(categories.tolist())))},
        "model": {"identity": base.bundle.identity, "exits": base.exits,
                  "gflops_per_exit": {str(k): v for k, v in base.gflops_per_exit.items()},
                  "full_gflops": full_g, "scorer": base.scorer.identity, "scorer_gflops": base.scorer_gflops},
        "heads": {k: {"path": v["path"], "identity": v["identity"], "confidence_heads": v["confidence"],
                      "exit_scales": v.get("exit_scales"), "exit_offsets": v.get("exit_offsets")}
                  for k, v in results.items()},
        "budgets": budgets, "budget_confidence": a.budget_confidence, "bootstrap": a.bootstrap,
        "random_seeds": a.random_seeds,
        "confidence_available": any(r["policy"].startswith("confidence") for r in rows),
        "rows": rows, "comparisons": comps, "timing": timing, "targets": targets(rows, comps),
        "threads": a.threads, "precision": a.precision, "seconds": time.perf_counter() - t0,
        "load_average_start": load_start, "load_average_end": load_average(),
    }


def targets(rows: list[dict], comps: list[dict]) -> dict:
    """Return the issue's targets, judged per heads and policy, with the numbers they were judged on.

    Fixed exits are judged on the cost and category targets too (they are what the policies must beat).
    """
    out: dict = {"cost_ratio": [], "ahead": [], "category": []}
    by_key = {(c["heads"], c["key"]): c for c in comps}
    for r in rows:
        if r["policy"] == "full" or r["policy"].startswith("random"):
            continue
        c = by_key[(r["heads"], r["key"])]
        base = {"heads": r["heads"], "key": r["key"], "policy": r["policy"], "budget": r["budget"],
                "cost_fraction": r["cost_fraction"]}
        if r["cost_fraction"] <= TARGET_MAX_COST + 1e-9:
            out["cost_ratio"].append({**base, "t2i": c["t2i_ratio_full"], "i2t": c["i2t_ratio_full"],
                                      "met": all(c[f"{d}_ratio_full"]["ratio"] >= TARGET_RATIO for d in DIRECTIONS)})
        if r["budget"] is not None and r["budget"] >= TARGET_MIN_BUDGET - 1e-9:
            out["ahead"].append({**base, **{f"{d}_vs_{vs}": c.get(f"{d}_vs_{vs}") for d in DIRECTIONS
                                            for vs in ("fixed", "random")}})
        cat = {d: c[f"{d}_category_vs_full"] for d in DIRECTIONS}
        out["category"].append({**base, **cat, "unchanged": all(x["lo"] <= 0 <= x["hi"] for x in cat.values())})
    return out


def target_lines(t: dict) -> list[str]:
    """Return the verdict on each target per heads and policy, with by how much a missed one is missed."""
    lines = []
    groups: dict[tuple, list[dict]] = {}
    for x in t["cost_ratio"]:
        groups.setdefault((x["heads"], x["policy"] if x["budget"] is not None else x["key"]), []).append(x)
    for (h, p), xs in groups.items():
        p = p + ORACLE_NOTE if p == "oracle" else p
        met = [x for x in xs if x["met"]]
        if met:
            x = min(met, key=lambda x: x["cost_fraction"])
            lines.append(f"- {h} {p}: R@1 >= {100 * TARGET_RATIO:.0f} % of full at {x['cost_fraction']:.3f} × full "
                         f"GFLOPs: MET (t2i {_ci(x['t2i'])}, i2t {_ci(x['i2t'])})")
        else:
            x = max(xs, key=lambda x: min(x["t2i"]["ratio"], x["i2t"]["ratio"]))
            gap = [100 * (TARGET_RATIO - x[d]["ratio"]) for d in DIRECTIONS]
            lines.append(f"- {h} {p}: R@1 >= {100 * TARGET_RATIO:.0f} % of full at <= {TARGET_MAX_COST} × full "
                         f"GFLOPs: MISSED; best point {x['cost_fraction']:.3f}: t2i {_ci(x['t2i'])}, "
                         f"i2t {_ci(x['i2t'])} (short by {max(gap[0], 0):.1f} / {max(gap[1], 0):.1f} points)")
    ahead: dict[tuple, list[dict]] = {}
    for x in t["ahead"]:
        ahead.setdefault((x["heads"], x["policy"]), []).append(x)
    for (h, p), xs in ahead.items():
        p = p + ORACLE_NOTE if p == "oracle" else p
        for vs in ("fixed", "random"):
            ok = [x for x in xs if all(x[f"{d}_vs_{vs}"] is not None and x[f"{d}_vs_{vs}"]["lo"] > 0
                                       for d in DIRECTIONS)]
            worst = {d: min(xs, key=lambda x: x[f"{d}_vs_{vs}"]["diff"] if x[f"{d}_vs_{vs}"] else 9)
                     for d in DIRECTIONS}
            what = "the best fixed exit at equal GFLOPs" if vs == "fixed" else "random routing with the same mix"
            lines.append(f"- {h} {p} ahead of {what} (interval above 0, both directions) at budgets >= "
                         f"{TARGET_MIN_BUDGET}: {len(ok)} of {len(xs)}"
                         + ("" if len(ok) == len(xs) else "; worst t2i " + f"{worst['t2i']['key']} "
                            f"{_ci(worst['t2i'][f't2i_vs_{vs}'])}, worst i2t {worst['i2t']['key']} "
                            f"{_ci(worst['i2t'][f'i2t_vs_{vs}'])} points"))
    cat: dict[tuple, list[dict]] = {}
    for x in t["category"]:
        cat.setdefault((x["heads"], x["policy"] if x["budget"] is not None else x["key"]), []).append(x)
    for (h, p), xs in cat.items():
        same = [x for x in xs if x["unchanged"]]
        worst = min(xs, key=lambda x: min(x["t2i"]["diff"], x["i2t"]["diff"]))
        lines.append(f"- {h} {p}: category-level R@1 unchanged vs full (interval holds 0, both directions) at "
                     f"{len(same)} of {len(xs)} points" + ("" if len(same) == len(xs) else
                                                           f"; worst {worst['key']}: t2i {_ci(worst['t2i'])}, i2t "
                                                           f"{_ci(worst['i2t'])} points"))
    return lines


# ------------------------------------------------------------------------------------------------ output


def _ci(x: dict | None, pct: bool = True) -> str:
    if x is None:
        return "—"
    if "ratio" in x:
        return f"{100 * x['ratio']:.1f} % [{100 * x['lo']:.1f}, {100 * x['hi']:.1f}]"
    s = 100 if pct else 1
    return f"{s * x['diff']:+.1f} [{s * x['lo']:+.1f}, {s * x['hi']:+.1f}]"


def format_report(r: dict) -> str:
    """Return the tables of a result document (markdown)."""
    f = r["facts"]
    m = r["model"]
    lines = [f"# {f['date']}, load average {r.get('load_average_start', f['load_average_1_5_15'])} at start, "
             f"{r['load_average_end']} at end, "
             f"{f['cpu_count']} CPUs, icar {f['git']}, {r['threads']} torch thread(s), {r['precision']}, "
             f"{r['seconds']:.0f} s", "",
             f"Held-out test split: {r['corpus']['test_images']} images, {r['corpus']['t2i_queries']} distinct "
             f"captions, {r['corpus']['categories']} main-object categories (colour + shape); routers calibrated on "
             f"{r['corpus']['val_images']} val images. Demo CLIP, exits {m['exits']}, full depth "
             f"{m['full_gflops']:.4f} GFLOPs/image; scorer {m['scorer']['name']} {m['scorer_gflops']:.5f} GFLOPs. "
             f"Intervals: paired bootstrap, {r['bootstrap']} resamples of the queries, 95 %. Heads: "
             + "; ".join(f"{k} = {v['path']} (confidence heads {v.get('confidence_heads')})"
                         for k, v in r["heads"].items()) + ".", "",
             "| heads | policy | GFLOPs ÷ full | exit mix % | t2i R@1 | R@5 | i2t R@1 | R@5 | cat. t2i R@1 | R@5 "
             "| cat. i2t R@1 | R@5 | t2i R@1, own-depth galleries | images/s | speedup (GFLOP bound) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        rc = row["recall"]
        mix = " / ".join(f"{100 * v:.0f}" for v in row["mix"].values())
        ips = f"{row['images_per_s']:.0f}" if "images_per_s" in row else "—"
        sp = (f"{row['speedup']:.2f}× ({1 / row['cost_fraction']:.2f}×)" if "speedup" in row
              else f"({1 / row['cost_fraction']:.2f}×)")
        lines.append(f"| {row['heads']} | {row['name']} | {row['cost_fraction']:.3f} | {mix} | "
                     + " | ".join(f"{rc[f'{d}/{lv}/{k}']:.3f}" for lv in LEVELS for d in DIRECTIONS for k in KS)
                     + f" | {row['t2i_r1_own_depth']:.3f} | {ips} | {sp} |")
    lines += ["", "Own-depth galleries: each caption's image searched among images of its own depth only (the "
                  "fixed-exit galleries), averaged: what the row's exits give without mixing depths in one index; "
                  "the gap to its t2i R@1 is what the mixed gallery costs.", "",
              "Paired differences in recall@1 (percentage points, instance level unless said; [95 % interval]). "
                  "'vs fixed': minus the deepest fixed exit costing no more than the row (its number in brackets); "
                  "'vs random': minus random routing with the row's exact exit mix; '% of full': R@1 ÷ full depth's; "
                  "'cat. vs full': category-level R@1 minus full depth's.", "",
              "| heads | policy | cost | t2i vs fixed | i2t vs fixed | t2i vs random | i2t vs random | t2i % of full "
              "| i2t % of full | cat. t2i vs full | cat. i2t vs full | vs first heads (t2i / i2t) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in r["comparisons"]:
        other = [k for k in c if k.endswith("_heads")]
        vs_heads = " / ".join(_ci(c[k]) for k in other) if other else "—"
        lines.append(f"| {c['heads']} | {c['key']} | {c['cost_fraction']:.3f} | {_ci(c.get('t2i_vs_fixed'))} "
                     f"{'' if c['best_fixed_exit'] is None else '(exit %d)' % c['best_fixed_exit']} | "
                     f"{_ci(c.get('i2t_vs_fixed'))} | {_ci(c.get('t2i_vs_random'))} | "
                     f"{_ci(c.get('i2t_vs_random'))} | {_ci(c['t2i_ratio_full'])} | {_ci(c['i2t_ratio_full'])} | "
                     f"{_ci(c['t2i_category_vs_full'])} | {_ci(c['i2t_category_vs_full'])} | {vs_heads} |")
    lines += ["", "Targets (issue #20 point 3):"] + target_lines(r["targets"])
    if not r["confidence_available"]:
        lines.append("- confidence exits: no confidence policy was available to this run (confidence_policies hook)")
    if r["timing"]:
        tm = r["timing"]
        lines += ["", f"Timing: ModelWorker.embed on {tm['images']} test images, batch of the run, {tm['repeats']} "
                      f"interleaved rounds (median), first heads; load average {tm['load_average_before']} before, "
                      f"{tm['load_average_after']} after."]
    return "\n".join(lines)


STYLE = {"full": ("#000000", "star"), "fixed": ("#555555", "square"), "complexity": ("#1f77b4", "circle"),
         "random[complexity]": ("#9ecae1", "circle"), "complexity deep-first": ("#6a3d9a", "circle"),
         "random[complexity deep-first]": ("#cab2d6", "circle"), "confidence": ("#d62728", "diamond"),
         "random[confidence]": ("#f4a582", "diamond"), "confidence deep-first": ("#ff7f00", "diamond"),
         "random[confidence deep-first]": ("#fdbf6f", "diamond"), "confidence+complexity": ("#2ca02c", "triangle"),
         "random[confidence+complexity]": ("#a1d99b", "triangle"),
         "confidence+complexity deep-first": ("#8c510a", "triangle"),
         "random[confidence+complexity deep-first]": ("#dfc27d", "triangle"),
         "oracle": ("#e377c2", "star"), "random[oracle]": ("#f7b6d2", "star")}


def _marker(kind: str, x: float, y: float, colour: str, filled: bool = True) -> str:
    fill = colour if filled else "#ffffff"
    if kind == "square":
        return f'<rect x="{x - 3.5:.1f}" y="{y - 3.5:.1f}" width="7" height="7" fill="{fill}" stroke="{colour}"/>'
    if kind == "diamond":
        return (f'<polygon points="{x:.1f},{y - 5:.1f} {x + 5:.1f},{y:.1f} {x:.1f},{y + 5:.1f} {x - 5:.1f},{y:.1f}" '
                f'fill="{fill}" stroke="{colour}"/>')
    if kind == "triangle":
        return (f'<polygon points="{x:.1f},{y - 5:.1f} {x + 5:.1f},{y + 4:.1f} {x - 5:.1f},{y + 4:.1f}" '
                f'fill="{fill}" stroke="{colour}"/>')
    if kind == "star":
        return f'<circle cx="{x:.1f}" cy="{y:.1f}" r="5" fill="{fill}" stroke="{colour}" stroke-width="2"/>'
    return f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3.5" fill="{fill}" stroke="{colour}"/>'


def plot(r: dict) -> str:
    """Return a self-contained SVG: recall@1 against GFLOPs ÷ full depth, a curve per method; one row of panels per
    heads file (text→image left, image→text right, the same axes in every row)."""
    rows = r["rows"]
    heads = list(r["heads"])
    xs = [row["cost_fraction"] for row in rows]
    xt = ticks(min(xs) - 0.02, 1.02, 6)
    pw, ph, left, gap, top, vgap, bottom, legend = 330, 260, 58, 60, 64, 50, 40, 300
    w = left + 2 * pw + gap + legend
    h = top + len(heads) * ph + (len(heads) - 1) * vgap + bottom
    f = r["facts"]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {w} {h}" width="{w}" height="{h}" '
           f'font-family="Helvetica, Arial, sans-serif" font-size="11">',
           "<title>ICAR adaptive depth: recall@1 vs GFLOPs per method</title>",
           f'<rect width="{w}" height="{h}" fill="#ffffff"/>',
           f'<text x="{left}" y="18" font-size="13" font-weight="bold">Demo CLIP, {r["corpus"]["test_images"]} '
           f'held-out test images: recall@1 vs counted GFLOPs per image (÷ full depth, deciding included)</text>',
           f'<text x="{left}" y="32" fill="#555">{escape(f["date"])}, icar {escape(f["git"])}; one run; dashed '
           f'lines: 95 % of full depth, and 0.80 of its GFLOPs; fixed exits joined only to guide the eye</text>']
    yts = {}
    for d in DIRECTIONS:
        ys = [row["recall"][f"{d}/instance/1"] for row in rows]
        yts[d] = ticks(min(ys) - 0.01, max(ys) + 0.01, 6)
    for hi, hname in enumerate(heads):
        y0 = top + hi * (ph + vgap)
        mine = [row for row in rows if row["heads"] == hname]
        for panel, d in enumerate(DIRECTIONS):
            x0, yt = left + panel * (pw + gap), yts[d]

            def X(v, x0=x0):
                return x0 + (v - xt[0]) / (xt[-1] - xt[0]) * pw

            def Y(v, yt=yt, y0=y0):
                return y0 + (1 - (v - yt[0]) / (yt[-1] - yt[0])) * ph

            out.append(f'<text x="{x0 + pw / 2:.1f}" y="{y0 - 8}" text-anchor="middle" font-weight="bold">'
                       f'heads {escape(hname)}: {"text→image" if d == "t2i" else "image→text"} recall@1</text>')
            for v in yt:
                out.append(f'<line x1="{x0}" x2="{x0 + pw}" y1="{Y(v):.1f}" y2="{Y(v):.1f}" stroke="#e3e3e3"/>'
                           f'<text x="{x0 - 5}" y="{Y(v) + 3.5:.1f}" text-anchor="end" fill="#444">'
                           f'{tick_label(v)}</text>')
            for v in xt:
                out.append(f'<line x1="{X(v):.1f}" x2="{X(v):.1f}" y1="{y0}" y2="{y0 + ph}" stroke="#f0f0f0"/>'
                           f'<text x="{X(v):.1f}" y="{y0 + ph + 15}" text-anchor="middle" fill="#444">'
                           f'{tick_label(v)}</text>')
            goal = TARGET_RATIO * next(row for row in mine if row["policy"] == "full")["recall"][f"{d}/instance/1"]
            out.append(f'<line x1="{x0}" x2="{x0 + pw}" y1="{Y(goal):.1f}" y2="{Y(goal):.1f}" stroke="#999" '
                       f'stroke-dasharray="3,3"/>')
            out.append(f'<line x1="{X(TARGET_MAX_COST):.1f}" x2="{X(TARGET_MAX_COST):.1f}" y1="{y0}" '
                       f'y2="{y0 + ph}" stroke="#999" stroke-dasharray="3,3"/>')
            out.append(f'<rect x="{x0}" y="{y0}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>')
            for pol, (colour, marker) in STYLE.items():
                pts = sorted((row for row in mine if row["policy"] == pol or (pol == "fixed" and row["policy"]
                                                                               in ("fixed", "full"))),
                             key=lambda row: row["cost_fraction"])
                if pol == "full" or not pts:
                    continue
                random_twin = pol.startswith("random")
                dash = ' stroke-dasharray="1,3"' if pol == "fixed" else ' stroke-dasharray="5,3"' if random_twin else ""
                out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5"{dash} points="' + " ".join(
                    f'{X(p["cost_fraction"]):.1f},{Y(p["recall"][f"{d}/instance/1"]):.1f}' for p in pts) + '"/>')
                for p in pts:
                    out.append(_marker(marker, X(p["cost_fraction"]), Y(p["recall"][f"{d}/instance/1"]), colour,
                                       filled=not random_twin))
    out.append(f'<text x="{left + pw + gap / 2:.1f}" y="{h - 10}" text-anchor="middle">GFLOPs per image ÷ full '
               f'depth</text>')
    lx, ly = left + 2 * pw + gap + 14, top + 6
    for pol, (colour, marker) in STYLE.items():
        if pol == "full" or not any(row["policy"] == pol for row in rows):
            continue
        label = {"fixed": "fixed exits and full depth"}.get(pol, pol.replace("random[", "random, same mix as ")
                                                             .rstrip("]"))
        out.append(_marker(marker, lx, ly, colour, filled=not pol.startswith("random")))
        out.append(f'<text x="{lx + 10}" y="{ly + 4}">{escape(label)}</text>')
        ly += 20
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    logging.getLogger("pipeline.model.router").setLevel(logging.WARNING)
    a = parse_args(argv)
    a._argv = list(sys.argv[1:] if argv is None else argv)
    try:
        result = json.loads(Path(a.from_json).read_text()) if a.from_json else run(a)
    except (ValueError, FileNotFoundError) as e:
        print(f"bench.adaptive: error: {e}", file=sys.stderr)
        return 2
    print(format_report(result))
    if a.json and not a.from_json:
        storage.write_json(result, a.json)
    if a.plot:
        Path(a.plot).write_text(plot(result))
        print(f"# figure written to {a.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
