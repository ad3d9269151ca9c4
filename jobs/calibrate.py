"""`icar calibrate`: pick the router's complexity thresholds on a sample, for a GFLOP budget or a recall floor.

Two modes (pipeline/model/router.py explains the family of exit mixes both move along):

  --gflops-budget 0.7   expected cost per image (scorer + encoder up to its exit) <= 0.7 × full-depth cost;
                        needs only complexity scores: from a run (--scores-from RUN) or scored here from inputs.
                        The budget is a ceiling for the images the router will see, not only for the sample: the
                        mix is fitted a little under it (--budget-confidence, default 0.95: a new sample's mean cost
                        stays within the budget 19 times in 20; the margin, std(cost per image) / sqrt(--sample)
                        scaled, is recorded in the router file; 0.5 fits the sample exactly).
  --min-recall 0.97     the cheapest thresholds whose text->image recall@10 (--recall-at K) on captioned sample
                        images stays >= 0.97 × the same at full depth; needs inputs with captions, the model and its
                        heads (every sample image is embedded at every exit, and its caption with the text tower).
                        Like the budget, the floor is meant for the captions that follow: it must hold for the
                        ratio's lower bound over bootstrap resamples of the sample's captions (--recall-confidence,
                        default 0.95; 0.5 checks the sample's own ratio), recorded as recall_ratio_bound.

With --profiles (e.g. 4,6,8@keep0.8,8) the router chooses among profiles, each an exit depth plus a token-merging
schedule (pipeline/model/merging.py), ordered by their counted GFLOPs; both modes work the same way over them. The list
must hold the unmerged full depth (the cost reference and the fallback for unscorable images). --merge-heads
SPEC=FILE names exit heads trained under a schedule (`icar train-exits --merge SPEC`); the router file records them.

With --confidence-heads FILE (from `icar train-confidence`) the router decides inside the tower instead: a row
leaves at the first early exit whose learned confidence clears that exit's threshold; both modes fit one threshold
per early exit on the sample (every image through every exit), counting the confidence heads' GFLOPs: by default one
confidence level for every exit (--confidence-rule level), or along the same family of exit mixes as the complexity
router (--confidence-rule mix, with --shares). No complexity scorer is needed (one named with --scorer runs besides
and is counted). With --complexity-weight W > 0 the scorer runs and a row leaves on its standardised confidence
minus W x its standardised complexity score (sample mean/std stored in the router); embed then needs that scorer.

The router file records mode, target, the achieved cost (and recall) on the sample, the sample size, the scorer
and model identities and the exits; pass it to `icar embed --router FILE`. When the sampled shards carry captions
(at least 10) it also records sample_recall: what the fitted mix keeps of full-depth text->image recall@1/@10 on the
sample, beside every fixed exit (or profile) and its cost (the sample is then embedded at every exit, with a budget
too), and the same recall@1 against halves, quarters, ... of the sample (by_gallery) with its slope
per doubling of the gallery: the share of full depth an early exit keeps falls as a gallery grows, and an index
is far larger than the sample (a warning says so when the share falls by more than a point across the sample).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields

from pipeline.logs import setup_logging
from pipeline.model.router import DEFAULT_BUDGET_CONFIDENCE, DEFAULT_RECALL_CONFIDENCE
from pipeline.model.spec import ModelSpec
from pipeline.training.calibrate import CalibrateConfig, calibrate

from jobs.common import (HelpFormatter, add_logging_args, add_model_args, add_runtime_args, add_storage_args,
                         apply_logging, float_list, set_torch_threads)

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
    m, c = ModelSpec(), CalibrateConfig()
    p = argparse.ArgumentParser(prog="icar calibrate", description=__doc__, epilog=EXAMPLES,
                                formatter_class=HelpFormatter)
    p.add_argument("inputs", nargs="*", help="input shards to sample (tar, Parquet, image folders; paths or URLs)")
    p.add_argument("--scores-from", default=None, help="run directory whose shards' complexity scores to use")
    goal = p.add_mutually_exclusive_group(required=True)
    goal.add_argument("--gflops-budget", type=float, help="expected cost as a fraction of full depth, scorer included")
    goal.add_argument("--min-recall", type=float, help="text->image recall@10 floor as a fraction of full depth's")
    p.add_argument("--budget-confidence", type=float, default=c.budget_confidence, metavar="P",
                   help="with --gflops-budget: probability that the mean cost of a new sample of the same images "
                        "stays within the budget; the mix is fitted that far under it (0.5: exactly at it; "
                        f"default {DEFAULT_BUDGET_CONFIDENCE})")
    p.add_argument("--recall-at", type=int, default=c.recall_at, metavar="K",
                   help="with --min-recall: the k of the text->image recall@k the floor is on (1 is stricter: on a "
                        "small sample recall@10 may be near 1 at every exit)")
    p.add_argument("--recall-confidence", type=float, default=c.recall_confidence, metavar="P",
                   help="with --min-recall: probability that the recall of new captions stays above the floor; "
                        "the floor is checked on the ratio's (1 - P) quantile over bootstrap resamples of the "
                        f"sample's captions (0.5: on the sample's own ratio; default {DEFAULT_RECALL_CONFIDENCE})")
    p.add_argument("--shares", type=float_list, default=None,
                   help="how the early exits share the images moved off full depth, e.g. 1,1 (default: equal)")
    p.add_argument("--profiles", default=None,
                   help="choose among (exit, merge) profiles, e.g. 4,6,8@keep0.8,8 (needs input shards)")
    p.add_argument("--merge-heads", action="append", default=[], metavar="SPEC=FILE",
                   help="exit heads trained under merge schedule SPEC (repeatable), e.g. keep0.8=heads.safetensors")
    p.add_argument("--confidence-heads", default=None, metavar="FILE",
                   help="fit a confidence router (exits decided inside the tower, no scorer needed) for these heads "
                        "from `icar train-confidence` (needs input shards)")
    p.add_argument("--confidence-rule", choices=["level", "mix"], default=c.confidence_rule,
                   help="with --confidence-heads: one confidence level at every exit (level), or the complexity "
                        "router's family of exit mixes with --shares (mix)")
    p.add_argument("--complexity-weight", type=float, default=c.complexity_weight, metavar="W",
                   help="with --confidence-heads: a row leaves on its standardised confidence minus W x its "
                        "standardised complexity score (runs the scorer, default: 0, confidence only)")
    p.add_argument("--sample", type=int, default=c.sample, help="images to calibrate on")
    p.add_argument("--seed", type=int, default=c.seed, help="seed of the sample (and of a random-init model)")
    p.add_argument("--output", "-o", required=True, help="router JSON to write (local path or URL)")
    g = add_model_args(p, m, title="model (with inputs)", seed=False)
    g.add_argument("--batch-size", type=int, default=c.batch_size, help="images per model call")
    s = p.add_argument_group("scorer (with inputs)")
    s.add_argument("--scorer", default=m.scorer, choices=["default", "heuristic", "convnext"],
                   help="complexity scorer, resolved as `icar embed` resolves it (default: the model's own)")
    s.add_argument("--checkpoint", default=m.scorer_checkpoint, help="ConvNeXt-IC checkpoint for --scorer convnext")
    add_runtime_args(p, device_help="model and scorer device", threads_help="torch CPU threads (default: torch's choice)")
    add_storage_args(p)
    add_logging_args(p, progress_help="no progress bars (calibrate logs its progress; accepted like every job's)")
    return p


def config_from_args(a: argparse.Namespace) -> CalibrateConfig:
    """Return the CalibrateConfig of parsed arguments (every field has an argument of the same name)."""
    return CalibrateConfig(**{f.name: getattr(a, f.name) for f in fields(CalibrateConfig)})


def main(argv: list[str] | None = None) -> int:
    """Calibrate and write the router file; return 0 on success, 2 on bad input."""
    a = build_parser().parse_args(argv)
    apply_logging(a)
    set_torch_threads(a.threads)
    try:
        router = calibrate(config_from_args(a))
    except (ValueError, FileNotFoundError) as e:
        print(f"icar calibrate: error: {e}", file=sys.stderr)
        return 2
    c = router.calibration
    summary = {"output": a.output, "mode": c["mode"], "target": c["target"], "exits": getattr(router, "exits", None),
               **({"profiles": router.profiles} if hasattr(router, "profiles") else {}),
               "thresholds": router.to_dict()["thresholds"], "achieved_cost_fraction": c["achieved_cost_fraction"],
               **{k: c[k] for k in ("margin_cost_fraction", "recall_ratio_bound") if k in c},
               "fractions": c["achieved_fractions"], "sample_size": c["sample_size"]}
    if "achieved_recall_ratio" in c:
        summary["achieved_recall_ratio"] = c["achieved_recall_ratio"]
    if c.get("sample_recall"):  # captioned samples: what the mix keeps of full depth, and each fixed exit
        r = c["sample_recall"]
        summary["sample_t2i_recall@1"] = {"full": r["full"]["t2i@1"], "routed": r["routed"]["t2i@1"],
                                          **{f"{r['kind']} {e}": f["t2i@1"] for e, f in r["fixed_exits"].items()}}
        # the share of full depth the mix keeps against growing parts of the sample: it falls as galleries grow
        summary["sample_routed_ratio_by_gallery"] = {str(g["images"]): g["routed_ratio"] for g in r["by_gallery"]}
        summary["sample_routed_ratio_per_doubling"] = r["routed_ratio_per_doubling"]
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    setup_logging()
    raise SystemExit(main())
