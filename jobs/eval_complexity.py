"""`icar eval-complexity`: how well a complexity scorer agrees with human ratings, and how fast it is.

Prints and writes OUTPUT/metrics.json, metrics.csv (one row per category with --per-category, plus their
mean) and predictions.csv: PLCC, SRCC, RMSE, MAE, and images/s of the scorer alone and with decoding.
The same command evaluates the training-free heuristic and a trained ConvNeXt-IC, so the trained scorer's
gain is one table. Images are decoded exactly like `icar embed` decodes them (--decode-size).
"""

from __future__ import annotations

import argparse
import json
import sys

from pipeline.logs import setup_logging
from pipeline.training.complexity import EvalConfig, evaluate_complexity

from jobs.common import HelpFormatter, add_logging_args, add_runtime_args, apply_logging, set_torch_threads

EXAMPLES = """
RMSE/MAE: a trained scorer predicts on its training label scale; the heuristic's raw score (edge density)
is not calibrated to any label scale, so give --fit-labels TRAIN.txt to also report RMSE/MAE after a
least-squares line fitted on the training split (never on the test labels).

examples:
  icar eval-complexity --scorer heuristic --images IC9600/images --labels IC9600/test.txt \\
      --fit-labels IC9600/train.txt --output eval/heuristic
  icar eval-complexity --scorer convnext --checkpoint runs/ic-tiny/best.safetensors \\
      --images IC9600/images --labels IC9600/test.txt --output eval/convnext-tiny
  icar eval-complexity --scorer heuristic --images savoias/images --labels savoias/labels.txt \\
      --per-category --output eval/savoias        # SAVOIAS: per category and their mean, never pooled
"""


def build_parser() -> argparse.ArgumentParser:
    d = EvalConfig(images="", labels="", output="")
    p = argparse.ArgumentParser(prog="icar eval-complexity", description=__doc__, epilog=EXAMPLES,
                                formatter_class=HelpFormatter)
    p.add_argument("--scorer", default=d.scorer, choices=["heuristic", "convnext", "default"],
                   help="which scorer: the training-free heuristic, a trained checkpoint, or the shipped default")
    p.add_argument("--checkpoint", default=d.checkpoint, help="ComplexityNet .safetensors for --scorer convnext")
    p.add_argument("--images", required=True, help="image folder; label names are relative paths inside it")
    p.add_argument("--labels", required=True, help="label file of `name score` lines (the test split)")
    p.add_argument("--per-category", action="store_true",
                   help="metrics per first path component of the names (SAVOIAS: Category/n.jpg) and their mean")
    p.add_argument("--fit-labels", default=d.fit_labels,
                   help="training labels to fit a score->label line on, for RMSE/MAE of an uncalibrated scorer")
    p.add_argument("--score-scale", type=float, default=d.score_scale,
                   help="divide label scores by this (default: 1, or 100 when any score > 1)")
    p.add_argument("--decode-size", type=int, default=d.decode_size, help="decoded size, as the encoder's input size")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="images per scorer call")
    p.add_argument("--decode-workers", type=int, default=d.decode_workers, help="decoding threads (0: one per CPU)")
    p.add_argument("--output", "-o", required=True, help="directory for metrics.json, metrics.csv, predictions.csv")
    add_runtime_args(p, device_help="scorer device", threads_help="torch CPU threads of the scorer (default: "
                                                                  "torch's choice)")
    add_logging_args(p)
    return p


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def main(argv: list[str] | None = None) -> int:
    """Evaluate; return 0 on success, 2 on bad input (the message says what to fix)."""
    a = build_parser().parse_args(argv)
    apply_logging(a)
    set_torch_threads(a.threads)
    cfg = EvalConfig(images=a.images, labels=a.labels, output=a.output, scorer=a.scorer, checkpoint=a.checkpoint,
                     per_category=a.per_category, fit_labels=a.fit_labels, score_scale=a.score_scale,
                     decode_size=a.decode_size, batch_size=a.batch_size, device=a.device,
                     decode_workers=a.decode_workers, progress=not a.no_progress)
    try:
        result = evaluate_complexity(cfg)
    except (ValueError, FileNotFoundError) as e:
        print(f"icar eval-complexity: error: {e}", file=sys.stderr)
        return 2
    rows = result["metrics"] if cfg.per_category else [result["metrics"]]
    columns = [c for c in rows[0] if c not in ("fit_slope", "fit_intercept")]
    print(f"scorer {result['scorer']['name']}: {result['n']} images ({len(result['skipped'])} skipped), "
          f"{result['images_per_s']:.1f} images/s scoring, {result['images_per_s_with_decode']:.1f} with decoding "
          f"on {result['device']}")
    print("  ".join(f"{c:>11}" for c in columns))
    for r in rows:
        print("  ".join(f"{_fmt(r[c]):>11}" for c in columns))
    if result["mean_over_categories"]:
        mean = {"group": "mean", "n": sum(r["n"] for r in rows), **result["mean_over_categories"]}
        print("  ".join(f"{_fmt(mean.get(c, '')):>11}" for c in columns))
    print(result["notes"])
    print(json.dumps({"output": cfg.output}))
    return 0


if __name__ == "__main__":
    setup_logging()
    raise SystemExit(main())
