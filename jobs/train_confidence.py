"""`icar train-confidence INPUT... --output DIR`: train the confidence heads a confidence router exits by.

At each early exit a tiny head (LayerNorm + a two-layer MLP of that exit's pooled features) learns how well the
exit's embedding serves retrieval (pipeline/training/confidence.py): by default the margin by which the image's
own caption prefers it over the best other image. The backbone, the exit heads and the text tower stay frozen;
every training image runs once through every exit, then the heads are fitted full-batch on those features.

Writes DIR/confidence_heads.safetensors (bound to the model and the exit heads: pass it to
`icar calibrate --confidence-heads`) and DIR/confidence_heads.metrics.json (per exit, on a held-out share of the
training pairs: Pearson/Spearman of prediction and target, or accuracy for --target rank; and the seconds spent).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from pipeline.io.readers import InputError
from pipeline.logs import setup_logging
from pipeline.model.confidence import TARGETS, ConfidenceMismatchError
from pipeline.model.models import ModelLoadError
from pipeline.training.confidence import ConfidenceTrainConfig, train_confidence

from jobs.common import (HelpFormatter, add_logging_args, add_model_args, add_runtime_args, add_storage_args,
                         apply_logging, nonnegative_int, positive_int, set_torch_threads)

EXAMPLES = """
then:
  icar calibrate VAL... --confidence-heads DIR/confidence_heads.safetensors --gflops-budget 0.7 -o router.json
  icar embed INPUT... --router router.json --output RUN

examples:
  icar train-confidence demo-corpus/train/*.tar --output conf/demo
  icar train-confidence 's3://bucket/coco/train-*.tar' --model ViT-L-14 --pretrained laion2b_s32b_b82k \\
      --heads heads/l14/exit_heads.safetensors --exits 12,18,24 --max-train 20000 --output conf/l14
"""


def build_parser() -> argparse.ArgumentParser:
    d = ConfidenceTrainConfig()
    p = argparse.ArgumentParser(prog="icar train-confidence", description=__doc__, epilog=EXAMPLES,
                                formatter_class=HelpFormatter)
    p.add_argument("inputs", nargs="+", help="training image–caption shards: files, globs, directories or URLs")
    p.add_argument("--output", "-o", required=True, help="output directory (local path or URL)")
    add_model_args(p, d)
    t = p.add_argument_group("training")
    t.add_argument("--target", choices=TARGETS, default=d.target,
                   help="what a head predicts: margin (own caption vs best other image), loss (what leaving here costs that "
                        "margin below 0, vs full depth), rank (own caption ranks it "
                        "as high as at full depth), cosine (to the full-depth embedding)")
    t.add_argument("--hidden", type=nonnegative_int, default=d.hidden, help="hidden units per head (0: linear)")
    t.add_argument("--epochs", type=positive_int, default=d.epochs, help="full-batch steps")
    t.add_argument("--lr", type=float, default=d.lr, help="AdamW learning rate")
    t.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay")
    t.add_argument("--holdout", type=float, default=d.holdout,
                   help="share of training pairs (by key hash) that picks the epoch and measures the heads")
    t.add_argument("--max-train", type=positive_int, default=d.max_train, help="training pairs used at most")
    t.add_argument("--batch-size", type=positive_int, default=d.batch_size,
                   help="images per forward pass while extracting features")
    t.add_argument("--image-column", default=d.image_column, help="Parquet column with image bytes (default: auto)")
    add_runtime_args(p, device_help="device of the model", threads_help="torch CPU threads (default: torch's choice)")
    add_storage_args(p, d.storage_options)
    add_logging_args(p, progress_help="no progress bars (accepted like every job's)")
    return p


def config_from_args(args: argparse.Namespace) -> ConfidenceTrainConfig:
    """Return the ConfidenceTrainConfig the parsed arguments describe."""
    names = {f.name for f in dataclasses.fields(ConfidenceTrainConfig)}
    return ConfidenceTrainConfig(**{k: v for k, v in vars(args).items() if k in names})


def main(argv: list[str] | None = None) -> int:
    """Run `icar train-confidence`; return 0 on success, 2 on a configuration, model or data problem."""
    args = build_parser().parse_args(argv)
    apply_logging(args)
    set_torch_threads(args.threads)
    try:
        metrics = train_confidence(config_from_args(args))
    except (ConfidenceMismatchError, ModelLoadError, InputError, ValueError, FileNotFoundError) as e:
        print(f"icar train-confidence: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"output": metrics["confidence_heads"]["path"], "target": metrics["target"],
                      "holdout": metrics["holdout"], "seconds": round(metrics["seconds"]["total"], 1)}))
    return 0


if __name__ == "__main__":
    setup_logging()
    raise SystemExit(main())
