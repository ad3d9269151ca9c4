"""Calibrating a router: sample images (or a run's scores), score them, and fit the thresholds `icar embed` routes by.

Two goals, the threshold fitting itself in ``pipeline.model.router``:

- a GFLOP budget (``gflops_budget``): expected cost per image (scorer + encoder up to its exit) <= budget × the
  full depth's; needs only complexity scores, from a run's shards or scored here on a sample of inputs;
- a recall floor (``min_recall``): the cheapest thresholds whose text->image recall@10 on captioned sample images
  stays >= floor × recall@10 at full depth; every sample image is embedded at every exit (or under every profile)
  and its caption with the text tower.

``calibrate(cfg)`` returns the router and writes it to ``cfg.output``; the job ``icar calibrate`` parses its
arguments into a ``CalibrateConfig`` and calls it.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow.compute as pc
import torch

from pipeline.io import schema, storage
from pipeline.io.decode import DecodeConfig, DecodeError, decode_image
from pipeline.index.read import append_column, append_query_constant, offset_values, scale_rows
from pipeline.io.readers import expand_inputs, iter_samples
from pipeline.metrics import recall_at_k
from pipeline.model import encoder as enc
from pipeline.model import flops, models
from pipeline.model import router as routers
from pipeline.model.confidence import ConfidenceHeads, confidence_gflops, every_exit
from pipeline.model.confidence_calibration import (calibrate_confidence_budget, calibrate_confidence_recall,
                                                   sample_signal)
from pipeline.model.scorer import scorer_for_model
from pipeline.model.spec import ModelSpec, merge_spec, parse_merge, parse_profiles
from pipeline.runtime import resolve_device
from pipeline.training.confidence import model_and_exits
from pipeline.training.recall import MIN_GALLERY, gallery_parts

log = logging.getLogger("icar.calibrate")


@dataclass
class CalibrateConfig:
    """Everything `icar calibrate` needs; the CLI's defaults come from here (model defaults from ModelSpec)."""

    inputs: list[str] = field(default_factory=list)  # input shards to sample (tar, Parquet, folders; paths or URLs)
    scores_from: str | None = None  # run directory whose shards' complexity scores to use (instead of inputs)
    gflops_budget: float | None = None  # expected cost as a fraction of full depth, scorer included
    budget_confidence: float | None = None  # P(a new sample's mean cost <= budget); 0.5: exact; None: the default
    recall_confidence: float | None = None  # P(new captions' recall ratio >= min_recall); 0.5: the sample's own
    min_recall: float | None = None  # text->image recall@k floor as a fraction of full depth's (needs captions)
    recall_at: int = 10  # k of that recall@k (1 is the stricter test on a small sample, where @10 saturates)
    shares: list[float] | None = None  # how the early exits share the images moved off full depth; None: equal
    profiles: str | None = None  # choose among (exit, merge) profiles, e.g. "4,6,8@keep0.8,8" (needs inputs)
    merge_heads: list[str] = field(default_factory=list)  # "SPEC=FILE": exit heads trained under merge schedule SPEC
    confidence_heads: str | None = None  # from `icar train-confidence`: fit a ConfidenceRouter instead (needs inputs)
    confidence_rule: str = "level"  # level (one confidence level at every exit) | mix (the exit_fractions family)
    complexity_weight: float = 0.0  # with confidence heads: > 0 subtracts this × the standardised complexity score
    sample: int = 2000  # images (or run scores) to calibrate on
    seed: int = 0  # seed of the sample (and of a random-init model)
    output: str = ""  # router JSON to write (local path or URL)
    model: str = ModelSpec.model  # open_clip model name, "demo", or a model directory
    pretrained: str | None = ModelSpec.pretrained  # open_clip tag, local checkpoint, or "none"
    exits: list[int] | None = ModelSpec.exits  # exit depths; None: the heads' exits, else the model's default
    heads: str | None = ModelSpec.heads  # exit-heads safetensors from `icar train-exits`
    batch_size: int = 32  # images per model call
    scorer: str = ModelSpec.scorer  # default | heuristic | convnext, resolved as `icar embed` resolves it
    checkpoint: str | None = ModelSpec.scorer_checkpoint  # ConvNeXt-IC checkpoint for scorer "convnext"
    device: str = ModelSpec.device  # auto | cpu | cuda | cuda:N, for the model and the scorer
    storage_options: dict = field(default_factory=dict)  # fsspec options for remote paths


def scores_from_run(run: str, sample: int, seed: int, storage_options: dict | None = None
                    ) -> tuple[np.ndarray, dict]:
    """Return (a seeded sample of the run's complexity scores, its run.json)."""
    run_json = storage.read_json(storage.join(run, schema.RUN_JSON), storage_options)
    fs, root = storage.filesystem(storage.join(run, schema.SHARD_DIR), storage_options)
    parts = sorted(fs.glob(storage.join(root, "part-*.parquet")))
    if not parts:
        raise ValueError(f"{run} has no shards under {schema.SHARD_DIR}/; run `icar embed` first")
    columns = [storage.read_parquet(storage.unstrip(fs, p), storage_options, columns=["complexity"])["complexity"]
               for p in parts]
    scores = np.concatenate([pc.drop_null(c).to_numpy(zero_copy_only=False) for c in columns]).astype(np.float64)
    if scores.size == 0:
        raise ValueError(f"{run} holds no complexity scores (embedded with --scorer none?); calibrate from inputs")
    if scores.size > sample:
        scores = np.random.default_rng(seed).choice(scores, size=sample, replace=False)
    return scores, run_json


def sample_inputs(inputs: list[str], size: int, sample: int, seed: int, storage_options: dict | None = None
                  ) -> tuple[np.ndarray, list[str], list[str | None]]:
    """Return (uint8 pixels (N, size, size, 3), keys, captions) of up to ``sample`` decodable input images.

    Shards are visited in a seeded random order and read from the start until the sample is full, so a large
    corpus is never read whole; unreadable and undecodable samples are skipped (and counted in the log).
    """
    shards = expand_inputs(inputs, storage_options)
    random.Random(seed).shuffle(shards)
    cfg = DecodeConfig(image_size=size)
    pixels, keys, captions, bad = [], [], [], 0
    for shard in shards:
        for s in iter_samples(shard, storage_options):
            if s.data is None:
                bad += 1
                continue
            try:
                pixels.append(decode_image(s.data, cfg).pixels)
            except DecodeError:
                bad += 1
                continue
            keys.append(s.key)
            captions.append(s.caption)
            if len(keys) >= sample:
                break
        if len(keys) >= sample:
            break
    if not keys:
        raise ValueError(f"no decodable image in {inputs}")
    log.info("calibration sample: %d images from %d shard(s) (%d unreadable skipped)", len(keys), len(shards), bad)
    return np.stack(pixels), keys, captions


MIN_CAPTIONS = 10  # captioned sample images below which recall says nothing (--min-recall refuses, no report)


def captioned_indices(captions: list[str | None], required: bool = True) -> list[int]:
    """Return the sample positions that have a caption; --min-recall (``required``) needs at least MIN_CAPTIONS of
    them, else the recall report is skipped (an empty list)."""
    captioned = [i for i, c in enumerate(captions) if c]
    if len(captioned) < MIN_CAPTIONS:
        if not required:
            return []
        raise ValueError(f"only {len(captioned)} of {len(captions)} sample images have captions; --min-recall needs a "
                         "captioned validation set (e.g. COCO/Flickr val shards with .txt captions)")
    return captioned


GALLERY_DROP_WARN = 0.01  # routed ratio falling more than this from the smallest sub-gallery to the whole: warn


def by_gallery_size(galleries: dict[str, np.ndarray], text: np.ndarray, text_to_image: np.ndarray,
                    min_images: int = MIN_GALLERY, seed: int = 0) -> list[dict]:
    """Return text->image recall@1 of each of ``galleries`` ({name: (N, D) image embeddings, row i = sample image i})
    against galleries of n, n/2, n/4, ... images (down to ``min_images``), smallest first.

    The sample's images are split at random (``seed``) into disjoint parts of each size (``gallery_parts``); every
    caption is searched within its own image's part, and the hits of all parts are pooled. One split for every
    gallery name, so the figures of one size are paired. Ratios to full depth fall as a gallery grows (more
    near-duplicates compete for rank 1), which is what this shows: an index is far larger than any calibration sample.
    """
    text = np.asarray(text, np.float32)
    n = next(iter(galleries.values())).shape[0]
    hits: dict[int, dict[str, float]] = {}
    queries: dict[int, int] = {}
    for size, members, asked, targets in gallery_parts(n, text_to_image, min_images, seed):
        for name, emb in galleries.items():
            r = recall_at_k(text[asked] @ np.asarray(emb, np.float32)[members].T, targets, (1,))[1]
            hits.setdefault(size, dict.fromkeys(galleries, 0.0))[name] += r * asked.size
        queries[size] = queries.get(size, 0) + asked.size
    return [{"images": size, "captions": queries[size], "t2i@1": {k: v / queries[size] for k, v in hits[size].items()}}
            for size in sorted(queries)]


def slope_per_doubling(images: list[int], shares: list[float]) -> float | None:
    """Return the least-squares slope of ``shares`` against log2(``images``): the change per doubling of the gallery
    (None with fewer than two sizes)."""
    return float(np.polyfit(np.log2(images), shares, 1)[0]) if len(images) > 1 else None


def sample_recall(depth: np.ndarray, exit_embeddings: dict, text: np.ndarray, text_to_image: np.ndarray,
                  tower_gflops: dict, exit_scales: dict | None = None, exit_offsets: dict | None = None,
                  labels: dict | None = None, kind: str = "exit") -> dict:
    """Return what a router's exit mix (``depth`` per sample image) keeps of full-depth text→image recall@1/@10 on
    the calibration sample, beside every fixed exit and its cost: the figures a team weighs before adopting it.

    The gallery is the sample's images, each routed row scored with its exit's ``exit_scales`` and ``exit_offsets``
    as `icar index` scores it (the offset in one extra dimension, where the queries hold 1); a budget's thresholds
    were fitted for cost, not recall, so the routed figure is not an in-sample optimum.
    A real index is larger, and there recall is lower and so is the share of it an early exit keeps (measured per
    gallery size by bench/gallery.py; figures in docs/benchmarks/adaptive.md): ``by_gallery`` shows the trend
    within the sample (recall@1 against halves, quarters, ... of it), and a warning says when the routed share
    falls by more than GALLERY_DROP_WARN across it.

    ``depth`` and the keys of ``exit_embeddings`` / ``tower_gflops`` are exit depths, the deepest the reference; a
    profile router passes its profiles' cost ranks instead, with ``labels`` ({rank: profile spec}) naming them in
    the report and ``kind`` "profile".
    """
    exits = sorted(int(e) for e in exit_embeddings)
    tower = {int(k): float(v) for k, v in tower_gflops.items()}
    name = {e: str((labels or {}).get(e, e)) for e in exits}

    offsets = tuple(sorted((int(e), float(b)) for e, b in (exit_offsets or {}).items() if b))
    text = np.asarray(text, np.float32)
    galleries = {"full": np.asarray(exit_embeddings[exits[-1]], np.float32),
                 **{f"{kind} {name[e]}": np.asarray(exit_embeddings[e], np.float32) for e in exits[:-1]}}
    routed_gallery = routers.routed_embeddings(depth, exit_embeddings)  # a fresh float32 array, scaled in place
    routed_gallery = scale_rows(routed_gallery, depth, tuple(sorted((int(e), float(s))
                                                                   for e, s in (exit_scales or {}).items())))
    if offsets:  # the offset as `icar index` keeps it: one more dimension, the query constant in every query
        routed_gallery = append_column(routed_gallery, offset_values(depth, offsets, len(routed_gallery)))
        text = append_query_constant(text)
        # one depth per gallery: its offset would change no rank
        galleries = {k: append_column(v, 0.0) for k, v in galleries.items()}
    galleries["routed"] = routed_gallery

    def recall(name: str) -> dict:
        r = recall_at_k(text @ galleries[name].T, text_to_image, (1, 10))
        return {f"t2i@{k}": float(v) for k, v in r.items()}

    full, routed = recall("full"), recall("routed")
    fixed = {name[e]: {"cost_fraction": tower[e] / tower[exits[-1]], **recall(f"{kind} {name[e]}")}
             for e in exits[:-1]}
    sizes = by_gallery_size(galleries, text, text_to_image)
    for row in sizes:
        row["routed_ratio"] = row["t2i@1"]["routed"] / row["t2i@1"]["full"] if row["t2i@1"]["full"] else None
    known = [row for row in sizes if row["routed_ratio"] is not None]
    per_doubling = slope_per_doubling([r["images"] for r in known], [r["routed_ratio"] for r in known])
    if len(known) > 1 and known[0]["routed_ratio"] - known[-1]["routed_ratio"] > GALLERY_DROP_WARN:
        log.warning("the routed mix keeps %.1f %% of full-depth text->image recall@1 among %d sample images but %.1f "
                    "%% among all %d (%+.1f points per doubling of the gallery): the share falls as the gallery "
                    "grows, and an index holds far more images than this sample; expect less than the sample says "
                    "(calibrate on a larger --sample to see further)", 100 * known[0]["routed_ratio"],
                    known[0]["images"], 100 * known[-1]["routed_ratio"], known[-1]["images"], 100 * per_doubling)
    return {"metric": "text->image recall@1/@10 of the sample's captions against the sample's images",
            "captions": int(len(text_to_image)), "gallery_images": int(len(depth)), "kind": kind, "full": full,
            "routed": routed, "routed_ratio": {k: (routed[k] / full[k] if full[k] else None) for k in full},
            "fixed_exits": fixed, "by_gallery": sizes, "routed_ratio_per_doubling": per_doubling}


def saved_calibration(heads) -> dict:
    """Return {"exit_scales", "exit_offsets"}: the per-exit score calibration `icar index` applies to a run of
    ``heads`` (what the heads file records; None for what it does not)."""
    return heads.recorded_calibration() if heads is not None else {"exit_scales": None, "exit_offsets": None}


def calibrate(cfg: CalibrateConfig):
    """Return the calibrated router (ThresholdRouter, ProfileRouter with profiles, ConfidenceRouter with confidence
    heads) and write it to cfg.output."""
    if bool(cfg.scores_from) == bool(cfg.inputs):
        raise ValueError("give either --scores-from RUN or input shards to sample, not both or neither")
    if cfg.sample < 2:
        raise ValueError(f"--sample must be at least 2, got {cfg.sample}")
    if cfg.budget_confidence is not None and cfg.gflops_budget is None:
        raise ValueError("--budget-confidence says how surely a --gflops-budget holds for the images that follow; "
                         "with --min-recall use --recall-confidence")
    if cfg.recall_at < 1:
        raise ValueError(f"--recall-at is the k of recall@k, a positive integer, got {cfg.recall_at}")
    if cfg.recall_confidence is not None and cfg.min_recall is None:
        raise ValueError("--recall-confidence says how surely a --min-recall floor holds for the captions that "
                         "follow; with --gflops-budget use --budget-confidence")
    budget_p = routers.DEFAULT_BUDGET_CONFIDENCE if cfg.budget_confidence is None else cfg.budget_confidence
    recall_p = routers.DEFAULT_RECALL_CONFIDENCE if cfg.recall_confidence is None else cfg.recall_confidence
    cfg = replace(cfg, budget_confidence=routers.check_confidence(budget_p),
                  recall_confidence=routers.check_confidence(recall_p, "--recall-confidence"))
    if cfg.confidence_heads:
        if cfg.scores_from or cfg.profiles:
            raise ValueError("--confidence-heads needs every sample image taken through every exit: pass input shards "
                             "(not --scores-from), and no --profiles (confidence routing is unmerged)")
        router = calibrate_confidence(cfg)
    elif cfg.complexity_weight:
        raise ValueError("--complexity-weight combines a confidence router's confidences with the complexity score; "
                         "it needs --confidence-heads FILE")
    elif cfg.scores_from:
        if cfg.profiles:
            raise ValueError("--profiles needs the model to count each profile's GFLOPs (and, for --min-recall, to "
                             "embed under it): pass input shards instead of --scores-from")
        if cfg.min_recall is not None:
            raise ValueError("--min-recall needs every sample image embedded at every exit plus captions; a run holds "
                             "only the routed embedding: pass captioned input shards instead of --scores-from")
        scores, run_json = scores_from_run(cfg.scores_from, cfg.sample, cfg.seed, cfg.storage_options)
        exits = cfg.exits or [int(e) for e in run_json["exits"]]
        router = routers.calibrate_budget(scores, exits, run_json["gflops_per_exit"],
                                          float(run_json.get("scorer_gflops") or 0.0), cfg.gflops_budget,
                                          shares=cfg.shares, scorer_identity=run_json.get("scorer"),
                                          budget_confidence=cfg.budget_confidence)
        router.calibration.update(source={"run": cfg.scores_from}, model=run_json.get("model"), exits=router.exits,
                                  heads=run_json.get("heads"))
    else:
        router = calibrate_from_inputs(cfg)
    routers.save_router(router, cfg.output, cfg.storage_options)
    return router


def calibrate_from_inputs(cfg: CalibrateConfig):
    """Return the router calibrated on a sample of input images scored (and, for recall, embedded) here."""
    device = resolve_device(cfg.device)
    # the heads `icar embed` runs (the demo's shipped ones without --heads), so --min-recall measures what it routes
    bundle, heads, exits = model_and_exits(cfg.model, cfg.pretrained, cfg.seed, cfg.heads, cfg.exits, device)
    scorer = scorer_for_model(cfg.model, cfg.scorer, cfg.checkpoint, device=device,  # the one `icar embed` runs
                              image_size=bundle.image_size)
    pixels, keys, captions = sample_inputs(cfg.inputs, bundle.image_size, cfg.sample, cfg.seed, cfg.storage_options)
    scores = np.concatenate([scorer.score(pixels[i:i + cfg.batch_size])
                             for i in range(0, len(pixels), cfg.batch_size)])
    if cfg.profiles:
        return calibrate_profiles(cfg, bundle, heads, exits, scorer, pixels, captions, scores, device)
    gflops = flops.exit_gflops(bundle, exits)
    identity = {"model": bundle.identity, "exits": exits, "heads": heads.identity if heads is not None else None,
                "source": {"inputs": list(cfg.inputs), "sample_seed": cfg.seed}}
    budget = cfg.gflops_budget is not None
    captioned = captioned_indices(captions, required=not budget)
    exit_embeddings = text = None
    if captioned:  # recall needs every exit's embeddings; with a budget they only feed the report
        log.info("embedding the %d sample images at every exit (%d captions)", len(pixels), len(captioned))
        encoder = enc.AdaptiveEncoder(bundle.model.visual, exits, heads).to(device).eval()
        per_exit: dict[int, list[np.ndarray]] = {e: [] for e in exits}
        with torch.inference_mode():
            for i in range(0, len(pixels), cfg.batch_size):
                x = models.pixels_to_tensor(bundle, pixels[i:i + cfg.batch_size], device=device)
                for e, emb in encoder.forward_all_exits(x).items():
                    per_exit[e].append(emb.float().cpu().numpy())
        exit_embeddings = {e: np.concatenate(v) for e, v in per_exit.items()}
        text = models.encode_text(bundle, [captions[i] for i in captioned])
    if budget:
        router = routers.calibrate_budget(scores, exits, gflops, scorer.gflops_per_image, cfg.gflops_budget,
                                          shares=cfg.shares, scorer_identity=scorer.identity,
                                          budget_confidence=cfg.budget_confidence)
    else:
        router = routers.calibrate_recall(scores, exit_embeddings, text, np.asarray(captioned), cfg.min_recall,
                                          gflops, scorer_gflops=scorer.gflops_per_image, shares=cfg.shares,
                                          scorer_identity=scorer.identity, recall_confidence=cfg.recall_confidence,
                                          k=cfg.recall_at, **saved_calibration(heads))
    router.calibration.update(identity)
    if text is not None:
        router.calibration["sample_recall"] = sample_recall(router.route(scores, None), exit_embeddings, text,
                                                            np.asarray(captioned), gflops, **saved_calibration(heads))
    return router


def calibrate_profiles(cfg: CalibrateConfig, bundle, heads, exits, scorer, pixels, captions, scores, device):
    """Return the ProfileRouter calibrated on the sample; with captions every image is embedded under every profile
    (the recall floor needs it, and the sample_recall report beside a budget)."""
    profiles = parse_profiles(cfg.profiles)
    full = f"{bundle.num_blocks}"
    if full not in [p.spec for p in profiles]:
        raise ValueError(f"--profiles {cfg.profiles} must include the unmerged full depth {full} (the cost reference "
                         f"and the fallback for images the scorer fails on), e.g. --profiles {cfg.profiles},{full}")
    schedules_offered = sorted({merge_spec(p.merge) for p in profiles} - {"none"})
    if len(schedules_offered) > 1:
        log.warning("--profiles use %d merge schedules (%s): schedules never share a forward, so each batch runs one "
                    "pass per schedule present, with fewer rows each (~10%% slower on the demo than one schedule; "
                    "bench.merging); profiles of one schedule plus unmerged ones avoid it",
                    len(schedules_offered), ", ".join(schedules_offered))
    exits = sorted(set(exits) | {p.exit for p in profiles})
    merge_heads = {}
    for item in cfg.merge_heads:
        spec, sep, path = item.partition("=")
        if not sep or not path:
            raise ValueError(f"--merge-heads {item!r} must be SPEC=FILE, e.g. keep0.8=heads.safetensors")
        mh = enc.ExitHeads.load(path, bundle)
        spec = merge_spec(parse_merge(spec))
        if mh.merge != spec:
            raise ValueError(f"--merge-heads {item}: {path} was trained under merge schedule {mh.merge}, not {spec}")
        merge_heads[spec] = mh
    costs = {p.spec: flops.profile_cost(bundle, p) for p in profiles}
    identity = {"model": bundle.identity, "exits": exits, "heads": heads.identity if heads is not None else None,
                "merge_heads": {k: v.identity for k, v in merge_heads.items()},
                "source": {"inputs": list(cfg.inputs), "sample_seed": cfg.seed}}
    paths = {k: v.path for k, v in merge_heads.items()}
    captioned = captioned_indices(captions, required=cfg.gflops_budget is None)  # a budget reports recall if it can
    embeddings = text = None
    if captioned:  # every image under every profile: for the recall floor, or for the report beside a budget
        log.info("embedding the %d sample images under every profile (%d captions)", len(pixels), len(captioned))
        schedules = [p.merge for p in profiles if p.merge is not None]
        encoder = enc.AdaptiveEncoder(bundle.model.visual, exits, heads, schedules, merge_heads).to(device).eval()
        per_profile: dict[str, list[np.ndarray]] = {p.spec: [] for p in profiles}
        with torch.inference_mode():
            for i in range(0, len(pixels), cfg.batch_size):
                x = models.pixels_to_tensor(bundle, pixels[i:i + cfg.batch_size], device=device)
                for sched in encoder.schedules:
                    wanted = [p for p in profiles if merge_spec(p.merge) == merge_spec(sched)]
                    if wanted:
                        out = encoder.forward_all_exits(x, sched)
                        for p in wanted:
                            per_profile[p.spec].append(out[p.exit].float().cpu().numpy())
        embeddings = {k: np.concatenate(v) for k, v in per_profile.items()}
        text = models.encode_text(bundle, [captions[i] for i in captioned])
    if cfg.gflops_budget is not None:
        router = routers.calibrate_profiles_budget(scores, [p.spec for p in profiles], costs, scorer.gflops_per_image,
                                                   cfg.gflops_budget, shares=cfg.shares,
                                                   scorer_identity=scorer.identity,
                                                   budget_confidence=cfg.budget_confidence)
    else:
        router = routers.calibrate_profiles_recall(scores, embeddings, text, np.asarray(captioned), cfg.min_recall,
                                                   costs, scorer_gflops=scorer.gflops_per_image, shares=cfg.shares,
                                                   scorer_identity=scorer.identity,
                                                   recall_confidence=cfg.recall_confidence, k=cfg.recall_at)
    router.heads.update(paths)
    router.calibration.update(identity)
    if embeddings is not None:  # keyed by cost rank: the router's profiles are in cost order, full depth last
        ranked = dict(enumerate(router.profiles, start=1))
        router.calibration["sample_recall"] = sample_recall(
            router.route_profiles(scores).astype(np.int64) + 1, {r: embeddings[p] for r, p in ranked.items()}, text,
            np.asarray(captioned), {r: costs[p] for r, p in ranked.items()}, labels=ranked, kind="profile")
    return router


def calibrate_confidence(cfg: CalibrateConfig) -> routers.ConfidenceRouter:
    """Return the ConfidenceRouter fitted on a sample: every image through every exit, its confidence at each.

    The exit heads are the ones `icar embed` runs (``--heads``, the demo's shipped heads by default), and the
    confidence heads must have been trained for them. No scorer runs unless one is named (``--scorer heuristic``
    ...): then its GFLOPs count in the budget, as `icar embed` will spend them. With ``complexity_weight`` > 0 the
    scorer always runs (the default one as `icar embed`'s) and the thresholds are fitted on the combined signal
    (``confidence_calibration.sample_signal``), whose standardisation the router stores as its complexity block.
    """
    device = resolve_device(cfg.device)
    bundle, heads, exits = model_and_exits(cfg.model, cfg.pretrained, cfg.seed, cfg.heads, cfg.exits, device)
    encoder = enc.AdaptiveEncoder(bundle.model.visual, exits, heads).to(device).eval()
    conf = ConfidenceHeads.load(cfg.confidence_heads, bundle, encoder.heads)
    if conf.exits != exits:
        raise ValueError(f"confidence heads {cfg.confidence_heads} were trained for exits {conf.exits}, the encoder "
                         f"has {exits}; pass --exits {','.join(map(str, conf.exits))}")
    combined = cfg.complexity_weight != 0
    if combined and not (math.isfinite(cfg.complexity_weight) and cfg.complexity_weight > 0):
        raise ValueError(f"--complexity-weight must be a positive number (0: confidence only), got "
                         f"{cfg.complexity_weight}")
    scorer = None if cfg.scorer == "default" and not combined else scorer_for_model(
        cfg.model, cfg.scorer, cfg.checkpoint, device=device, image_size=bundle.image_size)
    pixels, keys, captions = sample_inputs(cfg.inputs, bundle.image_size, cfg.sample, cfg.seed, cfg.storage_options)
    confidences: dict[int, list[np.ndarray]] = {}
    embeddings: dict[int, list[np.ndarray]] = {}
    scores: list[np.ndarray] = []  # the batches' complexity scores, with a complexity weight only
    with torch.inference_mode():
        for i in range(0, len(pixels), cfg.batch_size):
            batch = pixels[i:i + cfg.batch_size]
            x = models.pixels_to_tensor(bundle, batch, device=device)
            _, c, emb = every_exit(encoder, conf, x)
            for e, v in c.items():
                confidences.setdefault(e, []).append(v.float().cpu().numpy())
            for e, v in emb.items():
                embeddings.setdefault(e, []).append(v.float().cpu().numpy())
            if combined:
                scores.append(np.asarray(scorer.score(batch)))
    conf_sample = {e: np.concatenate(v) for e, v in confidences.items()}
    block = None
    if combined:
        block, conf_sample = sample_signal(conf_sample, np.concatenate(scores), cfg.complexity_weight)
    tower = flops.exit_gflops(bundle, exits)
    conf_gflops = confidence_gflops(conf, bundle.model.visual)
    scorer_gflops = float(scorer.gflops_per_image) if scorer is not None else 0.0
    scorer_identity = scorer.identity if scorer is not None else None
    sample_emb = {e: np.concatenate(v) for e, v in embeddings.items()}
    captioned = captioned_indices(captions, required=cfg.min_recall is not None)
    text = models.encode_text(bundle, [captions[i] for i in captioned]) if captioned else None
    if cfg.gflops_budget is not None:
        router = calibrate_confidence_budget(conf_sample, exits, tower, conf_gflops, cfg.gflops_budget, conf.identity,
                                             scorer_gflops=scorer_gflops, shares=cfg.shares,
                                             scorer_identity=scorer_identity, rule=cfg.confidence_rule,
                                             budget_confidence=cfg.budget_confidence)
    else:
        router = calibrate_confidence_recall(conf_sample, sample_emb, text, np.asarray(captioned), cfg.min_recall,
                                             tower, conf_gflops, conf.identity, scorer_gflops=scorer_gflops,
                                             shares=cfg.shares, scorer_identity=scorer_identity,
                                             rule=cfg.confidence_rule, recall_confidence=cfg.recall_confidence,
                                             k=cfg.recall_at, **saved_calibration(encoder.heads))
    router.calibration.update(model=bundle.identity, exits=exits, heads=encoder.heads.identity,
                              confidence=conf.identity, source={"inputs": list(cfg.inputs), "sample_seed": cfg.seed})
    if text is not None:  # every exit's embeddings are here already: say what the mix keeps, beside fixed exits
        router.calibration["sample_recall"] = sample_recall(router.route_confidences(conf_sample), sample_emb, text,
                                                            np.asarray(captioned), tower,
                                                            **saved_calibration(encoder.heads))
    if block is not None:  # the thresholds above are on the combined signal: the router must compute it too
        router.calibration["signal"] = ("combined: standardised confidence minus complexity_weight x standardised "
                                        "complexity score (sample mean/std in the complexity block)")
        router = router.with_complexity(block)
    return router
