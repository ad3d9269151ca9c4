"""`icar train-complexity`: train a ConvNeXt-IC complexity scorer on human ratings in the IC9600 layout.

The model classifies each image into K ordered complexity bins; its score is the expected bin value in
[0, 1]. Training is two-hot cross-entropy (+ MSE on the expected value), mild augmentation only (flips and
crops keeping >= 85 % of the area: zooming changes how complex an image looks); see
pipeline/training/complexity.py for every choice and why. The best epoch by validation (PLCC+SRCC)/2 is
kept as OUTPUT/best.safetensors with a JSON card; re-running the same command resumes after the last
finished epoch.
"""

from __future__ import annotations

import argparse
import json
import sys

from pipeline.logs import setup_logging
from pipeline.training.complexity import TrainConfig, train_complexity

from jobs.common import HelpFormatter, add_logging_args, add_runtime_args, apply_logging, set_torch_threads

EXAMPLES = """
data layout (IC9600): an image folder and label files with one `name score` line per image, e.g.
  IC9600/images/xxx.jpg  +  IC9600/train.txt: "xxx.jpg  0.4523"   (scores in [0, 1])
SAVOIAS-style 0-100 scores are detected (any score > 1) and divided by 100, or give --score-scale.

examples:
  icar train-complexity --images IC9600/images --train-labels IC9600/train.txt --val-labels IC9600/test.txt \\
      --backbone convnextv2_tiny --backbone-weights convnextv2_tiny_in1k.safetensors --output runs/ic-tiny
  icar train-complexity --images savoias/images --train-labels savoias/labels.txt --val-fraction 0.2 \\
      --backbone torchvision:mobilenet_v2 --backbone-weights mobilenet_v2.pth --input-size 128 --output runs/sav
  icar train-complexity ... --backbone convnext_atto --input-size 128 --epochs 5 --device cpu   # quick CPU run
Then: icar eval-complexity --scorer convnext --checkpoint runs/ic-tiny/best.safetensors --images ... --labels ...
      icar embed ... --scorer convnext --checkpoint runs/ic-tiny/best.safetensors
"""


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig(images="", train_labels="", output="")
    p = argparse.ArgumentParser(prog="icar train-complexity", description=__doc__, epilog=EXAMPLES,
                                formatter_class=HelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--images", required=True, help="image folder; label names are relative paths inside it")
    g.add_argument("--train-labels", required=True, help="label file of `name score` lines")
    g.add_argument("--val-labels", default=d.val_labels, help="validation label file (default: hold out --val-fraction)")
    g.add_argument("--val-fraction", type=float, default=d.val_fraction,
                   help="share of train labels held out for validation (seeded) when --val-labels is not given")
    g.add_argument("--score-scale", type=float, default=d.score_scale,
                   help="divide scores by this to get [0, 1] (default: 1, or 100 when any score > 1)")
    g.add_argument("--decode-size", type=int, default=d.decode_size,
                   help="decode like the pipeline at this size (the encoder's input size), then resize to --input-size")
    g.add_argument("--data-note", default=d.data_note, help="data description and licence for the checkpoint card")
    g.add_argument("--decode-workers", type=int, default=d.decode_workers, help="decoding threads (0: one per CPU)")
    m = p.add_argument_group("model")
    m.add_argument("--backbone", default=d.backbone,
                   help="timm name (convnext_atto|nano|tiny, convnextv2_atto|nano|tiny, any timm model) "
                        "or torchvision:NAME (e.g. torchvision:mobilenet_v2)")
    m.add_argument("--backbone-weights", default=d.backbone_weights,
                   help="local pretrained weights (.safetensors, or a torch file loaded with weights_only=True); "
                        "default: random init (nothing is downloaded)")
    m.add_argument("--bins", type=int, default=d.bins, help="ordered complexity bins")
    m.add_argument("--input-size", type=int, default=d.input_size, help="scorer input side in pixels (128/64: faster)")
    m.add_argument("--dropout", type=float, default=d.dropout, help="dropout before the head")
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=int, default=d.epochs, help="passes over the training set")
    t.add_argument("--batch-size", type=int, default=d.batch_size, help="images per step")
    t.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (AdamW, warm-up + cosine)")
    t.add_argument("--backbone-lr-mult", type=float, default=d.backbone_lr_mult,
                   help="backbone lr = lr × this (default: 1.0 from random init, 0.1 with --backbone-weights)")
    t.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay")
    t.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs, help="linear warm-up length")
    t.add_argument("--mse-weight", type=float, default=d.mse_weight, help="weight of the MSE on the expected score")
    t.add_argument("--crop-scale", type=float, default=d.crop_scale,
                   help="smallest area share kept by the random square crop (1.0: no cropping)")
    t.add_argument("--no-hflip", action="store_true", help="no random horizontal flips")
    t.add_argument("--seed", type=int, default=d.seed, help="seed of split, init, shuffling and augmentation")
    o = p.add_argument_group("output")
    o.add_argument("--output", "-o", required=True, help="output directory (resumes when it holds a run of the same settings)")
    o.add_argument("--restart", action="store_true", help="ignore a previous run in --output and start over")
    add_runtime_args(p, device_help="training device", threads_help="torch CPU threads (default: torch's choice)")
    add_logging_args(p)
    return p


def config_from_args(a: argparse.Namespace) -> TrainConfig:
    """Return the TrainConfig described by parsed arguments."""
    return TrainConfig(
        images=a.images, train_labels=a.train_labels, output=a.output, val_labels=a.val_labels,
        val_fraction=a.val_fraction, backbone=a.backbone, backbone_weights=a.backbone_weights, bins=a.bins,
        input_size=a.input_size, decode_size=a.decode_size, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr,
        backbone_lr_mult=a.backbone_lr_mult, weight_decay=a.weight_decay, warmup_epochs=a.warmup_epochs,
        mse_weight=a.mse_weight, dropout=a.dropout, crop_scale=a.crop_scale, hflip=not a.no_hflip,
        score_scale=a.score_scale, seed=a.seed, device=a.device, decode_workers=a.decode_workers,
        data_note=a.data_note, restart=a.restart, progress=not a.no_progress)


def main(argv: list[str] | None = None) -> int:
    """Train; return 0 on success, 2 on bad input (the message says what to fix)."""
    args = build_parser().parse_args(argv)
    apply_logging(args)
    set_torch_threads(args.threads)
    cfg = config_from_args(args)
    try:
        summary = train_complexity(cfg)
    except (ValueError, FileNotFoundError) as e:
        print(f"icar train-complexity: error: {e}", file=sys.stderr)
        return 2
    val = summary["val"]
    print(json.dumps({"checkpoint": summary["checkpoint"], "best_epoch": summary["best_epoch"],
                      "val": {k: round(v, 4) if isinstance(v, float) else v for k, v in val.items()},
                      "n_train": summary["n_train"], "n_val": summary["n_val"], "skipped": summary["skipped"]}))
    return 0


if __name__ == "__main__":
    setup_logging()
    raise SystemExit(main())
