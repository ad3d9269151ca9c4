"""`icar calibrate`: pick the router's complexity thresholds on a sample, for a GFLOP budget or a recall floor.

Two modes (pipeline/model/router.py explains the family of exit mixes both move along):

  --gflops-budget 0.7   expected cost per image (scorer + encoder up to its exit) <= 0.7 × full-depth cost;
                        needs only complexity scores: from a run (--scores-from RUN) or scored here from inputs.
  --min-recall 0.97     the cheapest thresholds whose text->image recall@10 on captioned sample images stays
                        >= 0.97 × recall@10 at full depth; needs inputs with captions, the model and its heads
                        (every sample image is embedded at every exit, and its caption with the text tower).

With --profiles (e.g. 4,6,8@keep0.8,8) the router chooses among profiles, each an exit depth plus a token-merging
schedule (pipeline/model/merging.py), ordered by their counted GFLOPs; both modes work the same way over them. The list
must hold the unmerged full depth (the cost reference and the fallback for unscorable images). --merge-heads
SPEC=FILE names exit heads trained under a schedule (`icar train-exits --merge SPEC`); the router file records them.

The router file records mode, target, the achieved cost (and recall) on the sample, the sample size, the scorer
and model identities and the exits; pass it to `icar embed --router FILE`.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys

import numpy as np

from pipeline.logs import setup_logging
from pipeline.runtime import resolve_device
from pipeline.model.spec import ModelSpec, merge_spec, parse_merge, parse_profiles

from jobs.common import (HelpFormatter, add_logging_args, add_model_args, add_runtime_args, add_storage_args,
                         apply_logging, float_list, set_torch_threads)

log = logging.getLogger("icar.calibrate")

EXAMPLES = """
examples:
  icar calibrate --scores-from runs/demo --gflops-budget 0.7 --output router.json
  icar calibrate shards/val/*.tar --model ViT-B-32 --pretrained none --exits 6,9,12 --scorer heuristic \\
      --gflops-budget 0.6 --sample 2000 --output router.json
  icar calibrate demo-corpus/val/*.tar --model demo --profiles 6@r2,8@r2,8 \
      --merge-heads r2=heads-r2/exit_heads.safetensors --min-recall 0.98 --sample 1000 --output router.json
  icar calibrate coco-val/*.tar --model ViT-L-14 --pretrained laion2b_s32b_b82k --heads heads.safetensors \\
      --min-recall 0.97 --sample 5000 --output router.json
"""


def build_parser() -> argparse.ArgumentParser:
    m = ModelSpec()
    p = argparse.ArgumentParser(prog="icar calibrate", description=__doc__, epilog=EXAMPLES,
                                formatter_class=HelpFormatter)
    p.add_argument("inputs", nargs="*", help="input shards to sample (tar, Parquet, image folders; paths or URLs)")
    p.add_argument("--scores-from", default=None, help="run directory whose shards' complexity scores to use")
    goal = p.add_mutually_exclusive_group(required=True)
    goal.add_argument("--gflops-budget", type=float, help="expected cost as a fraction of full depth, scorer included")
    goal.add_argument("--min-recall", type=float, help="text->image recall@10 floor as a fraction of full depth's")
    p.add_argument("--shares", type=float_list, default=None,
                   help="how the early exits share the images moved off full depth, e.g. 1,1 (default: equal)")
    p.add_argument("--profiles", default=None,
                   help="choose among (exit, merge) profiles, e.g. 4,6,8@keep0.8,8 (needs input shards)")
    p.add_argument("--merge-heads", action="append", default=[], metavar="SPEC=FILE",
                   help="exit heads trained under merge schedule SPEC (repeatable), e.g. keep0.8=heads.safetensors")
    p.add_argument("--sample", type=int, default=2000, help="images to calibrate on")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample (and of a random-init model)")
    p.add_argument("--output", "-o", required=True, help="router JSON to write (local path or URL)")
    g = add_model_args(p, m, title="model (with inputs)", seed=False)
    g.add_argument("--batch-size", type=int, default=32, help="images per model call")
    s = p.add_argument_group("scorer (with inputs)")
    s.add_argument("--scorer", default=m.scorer, choices=["default", "heuristic", "convnext"],
                   help="complexity scorer, resolved as `icar embed` resolves it (default: the model's own)")
    s.add_argument("--checkpoint", default=m.scorer_checkpoint, help="ConvNeXt-IC checkpoint for --scorer convnext")
    add_runtime_args(p, device_help="model and scorer device", threads_help="torch CPU threads (default: torch's choice)")
    add_storage_args(p)
    add_logging_args(p, progress_help="no progress bars (calibrate logs its progress; accepted like every job's)")
    return p


def scores_from_run(run: str, sample: int, seed: int, storage_options: dict | None = None
                    ) -> tuple[np.ndarray, dict]:
    """Return (a seeded sample of the run's complexity scores, its run.json)."""
    import pyarrow.compute as pc

    from pipeline.io import schema, storage

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
    from pipeline.io.decode import DecodeConfig, DecodeError, decode_image
    from pipeline.io.readers import expand_inputs, iter_samples

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


def main(argv: list[str] | None = None) -> int:
    """Calibrate and write the router file; return 0 on success, 2 on bad input."""
    a = build_parser().parse_args(argv)
    apply_logging(a)
    set_torch_threads(a.threads)
    try:
        router = calibrate(a)
    except (ValueError, FileNotFoundError) as e:
        print(f"icar calibrate: error: {e}", file=sys.stderr)
        return 2
    c = router.calibration
    summary = {"output": a.output, "mode": c["mode"], "target": c["target"], "exits": getattr(router, "exits", None),
               **({"profiles": router.profiles} if hasattr(router, "profiles") else {}),
               "thresholds": router.to_dict()["thresholds"], "achieved_cost_fraction": c["achieved_cost_fraction"],
               "fractions": c["achieved_fractions"], "sample_size": c["sample_size"]}
    if "achieved_recall_ratio" in c:
        summary["achieved_recall_ratio"] = c["achieved_recall_ratio"]
    print(json.dumps(summary))
    return 0


def calibrate(a: argparse.Namespace):
    """Return the calibrated ThresholdRouter for parsed arguments (and write it to a.output)."""
    from pipeline.model import router as routers

    if bool(a.scores_from) == bool(a.inputs):
        raise ValueError("give either --scores-from RUN or input shards to sample, not both or neither")
    if a.sample < 2:
        raise ValueError(f"--sample must be at least 2, got {a.sample}")
    if a.scores_from:
        if a.profiles:
            raise ValueError("--profiles needs the model to count each profile's GFLOPs (and, for --min-recall, to "
                             "embed under it): pass input shards instead of --scores-from")
        if a.min_recall is not None:
            raise ValueError("--min-recall needs every sample image embedded at every exit plus captions; a run holds "
                             "only the routed embedding: pass captioned input shards instead of --scores-from")
        scores, run_json = scores_from_run(a.scores_from, a.sample, a.seed, a.storage_options)
        exits = a.exits or [int(e) for e in run_json["exits"]]
        router = routers.calibrate_budget(scores, exits, run_json["gflops_per_exit"],
                                          float(run_json.get("scorer_gflops") or 0.0), a.gflops_budget,
                                          shares=a.shares, scorer_identity=run_json.get("scorer"))
        router.calibration.update(source={"run": a.scores_from}, model=run_json.get("model"), exits=router.exits,
                                  heads=run_json.get("heads"))
    else:
        router = _calibrate_from_inputs(a)
    routers.save_router(router, a.output, a.storage_options)
    return router


def _calibrate_from_inputs(a: argparse.Namespace):
    """Return the router calibrated on a sample of input images scored (and, for recall, embedded) here."""
    import torch

    from pipeline.model import encoder as enc
    from pipeline.model import flops, models
    from pipeline.model import router as routers
    from pipeline.model.scorer import scorer_for_model

    device = resolve_device(a.device)
    bundle = models.load_clip(a.model, a.pretrained, seed=a.seed, device=device)
    heads = enc.ExitHeads.load(a.heads, bundle) if a.heads else None
    exits = list(a.exits) if a.exits else (list(heads.exits) if heads is not None
                                           else enc.default_exits(bundle.num_blocks))
    scorer = scorer_for_model(a.model, a.scorer, a.checkpoint, device=device,  # the one `icar embed` runs
                              image_size=bundle.image_size)
    pixels, keys, captions = sample_inputs(a.inputs, bundle.image_size, a.sample, a.seed, a.storage_options)
    scores = np.concatenate([scorer.score(pixels[i:i + a.batch_size]) for i in range(0, len(pixels), a.batch_size)])
    if a.profiles:
        return _calibrate_profiles(a, bundle, heads, exits, scorer, pixels, captions, scores, device)
    gflops = flops.exit_gflops(bundle, exits)
    identity = {"model": bundle.identity, "exits": exits, "heads": heads.identity if heads is not None else None,
                "source": {"inputs": list(a.inputs), "sample_seed": a.seed}}
    if a.gflops_budget is not None:
        router = routers.calibrate_budget(scores, exits, gflops, scorer.gflops_per_image, a.gflops_budget,
                                          shares=a.shares, scorer_identity=scorer.identity)
        router.calibration.update(identity)
        return router
    captioned = captioned_indices(captions)
    encoder = enc.AdaptiveEncoder(bundle.model.visual, exits, heads).to(device).eval()
    per_exit: dict[int, list[np.ndarray]] = {e: [] for e in exits}
    with torch.inference_mode():
        for i in range(0, len(pixels), a.batch_size):
            x = models.pixels_to_tensor(bundle, pixels[i:i + a.batch_size], device=device)
            for e, emb in encoder.forward_all_exits(x).items():
                per_exit[e].append(emb.float().cpu().numpy())
    exit_embeddings = {e: np.concatenate(v) for e, v in per_exit.items()}
    text = models.encode_text(bundle, [captions[i] for i in captioned])
    router = routers.calibrate_recall(scores, exit_embeddings, text, np.asarray(captioned), a.min_recall, gflops,
                                      scorer_gflops=scorer.gflops_per_image, shares=a.shares,
                                      scorer_identity=scorer.identity)
    router.calibration.update(identity)
    return router


def captioned_indices(captions: list[str | None]) -> list[int]:
    """Return the sample positions that have a caption; --min-recall needs at least 10 of them."""
    captioned = [i for i, c in enumerate(captions) if c]
    if len(captioned) < 10:
        raise ValueError(f"only {len(captioned)} of {len(captions)} sample images have captions; --min-recall needs a "
                         "captioned validation set (e.g. COCO/Flickr val shards with .txt captions)")
    return captioned


def _calibrate_profiles(a: argparse.Namespace, bundle, heads, exits, scorer, pixels, captions, scores, device):
    """Return the ProfileRouter calibrated on the sample: every image embedded under every profile for recall."""
    import torch

    from pipeline.model import encoder as enc
    from pipeline.model import flops, models
    from pipeline.model import router as routers

    profiles = parse_profiles(a.profiles)
    full = f"{bundle.num_blocks}"
    if full not in [p.spec for p in profiles]:
        raise ValueError(f"--profiles {a.profiles} must include the unmerged full depth {full} (the cost reference "
                         f"and the fallback for images the scorer fails on), e.g. --profiles {a.profiles},{full}")
    schedules_offered = sorted({merge_spec(p.merge) for p in profiles} - {"none"})
    if len(schedules_offered) > 1:
        log.warning("--profiles use %d merge schedules (%s): schedules never share a forward, so each batch runs one "
                    "pass per schedule present, with fewer rows each (~10%% slower on the demo than one schedule; "
                    "bench.merging); profiles of one schedule plus unmerged ones avoid it",
                    len(schedules_offered), ", ".join(schedules_offered))
    exits = sorted(set(exits) | {p.exit for p in profiles})
    merge_heads = {}
    for item in a.merge_heads:
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
                "source": {"inputs": list(a.inputs), "sample_seed": a.seed}}
    paths = {k: v.path for k, v in merge_heads.items()}
    if a.gflops_budget is not None:
        router = routers.calibrate_profiles_budget(scores, [p.spec for p in profiles], costs, scorer.gflops_per_image,
                                                   a.gflops_budget, shares=a.shares, scorer_identity=scorer.identity)
        router.heads.update(paths)
        router.calibration.update(identity)
        return router
    captioned = captioned_indices(captions)
    schedules = [p.merge for p in profiles if p.merge is not None]
    encoder = enc.AdaptiveEncoder(bundle.model.visual, exits, heads, schedules, merge_heads).to(device).eval()
    per_profile: dict[str, list[np.ndarray]] = {p.spec: [] for p in profiles}
    with torch.inference_mode():
        for i in range(0, len(pixels), a.batch_size):
            x = models.pixels_to_tensor(bundle, pixels[i:i + a.batch_size], device=device)
            for sched in encoder.schedules:
                wanted = [p for p in profiles if merge_spec(p.merge) == merge_spec(sched)]
                if wanted:
                    out = encoder.forward_all_exits(x, sched)
                    for p in wanted:
                        per_profile[p.spec].append(out[p.exit].float().cpu().numpy())
    embeddings = {k: np.concatenate(v) for k, v in per_profile.items()}
    text = models.encode_text(bundle, [captions[i] for i in captioned])
    router = routers.calibrate_profiles_recall(scores, embeddings, text, np.asarray(captioned), a.min_recall, costs,
                                               scorer_gflops=scorer.gflops_per_image, shares=a.shares,
                                               scorer_identity=scorer.identity)
    router.heads.update(paths)
    router.calibration.update(identity)
    return router


if __name__ == "__main__":
    setup_logging()
    raise SystemExit(main())
