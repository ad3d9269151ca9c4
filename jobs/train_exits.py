"""`icar train-exits INPUT... --output DIR`: train early-exit heads so early embeddings answer the same text queries.

Dual-path training (pipeline/training/exits.py). By default the backbone and the text tower stay frozen and only
the exit heads (LayerNorm + projection per early exit) and their temperatures train, on features computed once
per image: loss per exit = contrastive loss against the frozen caption embeddings + distillation toward the
full-depth embedding of the same image. The contrastive loss is computed in the gallery an index of routed rows
holds (an exit's image competes with full-depth and other exits' images), and the heads written are those of the
epoch with the best validation mixed-gallery recall@1. Full-depth embeddings stay identical to the model's, so
existing full-depth runs and indexes stay valid. --finetune-backbone is the paper's recipe instead (see below).

Writes DIR/exit_heads.safetensors (pass it to `icar embed --heads`), DIR/metrics.json (per-exit recall@1/5/10
text->image and image->text, text->image in mixed-depth galleries, and mean cosine to full depth, before and
after training, and per epoch; and per early exit the score calibration, scale x cosine + offset, that lets its
rows rank fairly against full-depth rows in one inner-product index, chosen on up to 10 000 training pairs, with
its mixed-gallery penalty there and on validation, and recorded in the heads file as exit_scales and exit_offsets,
which `icar index` applies: the offset in one extra index dimension), DIR/checkpoint.pt
(every epoch; --resume continues) and DIR/features-{train,val}.safetensors (the cache of frozen features).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from pipeline.io.readers import InputError
from pipeline.logs import setup_logging
from pipeline.model.models import ModelLoadError
from pipeline.training.exits import ExitTrainConfig, TrainExitsError, train_exits

from jobs.common import (HelpFormatter, add_logging_args, add_model_args, add_runtime_args, add_storage_args,
                         apply_logging, set_torch_threads)

EXAMPLES = """
inputs: image–caption shards in any layout `icar embed` reads (WebDataset .tar with KEY.txt captions, Parquet
with an image column and a caption/text column, folders of images with NAME.txt captions); paths, globs or
s3:// URLs. Samples without a caption, or that fail to decode, are skipped and counted in metrics.json.

examples:
  icar train-exits demo-corpus/train/*.tar --val demo-corpus/val/*.tar --output heads/demo
  icar train-exits 's3://bucket/coco/train-*.tar' --val 's3://bucket/coco/val-*.tar' \\
      --model ViT-L-14 --pretrained laion2b_s32b_b82k --exits 12,18,24 --output s3://bucket/heads/l14
  icar train-exits shards/*.tar --output heads/l14 --resume       # continue after an interruption

--finetune-backbone (the ICAR paper's recipe): the vision backbone trains too (--backbone-lr 1e-6, heads
--lr 1e-4), contrastive loss on both paths weighted 0.5 early / 0.5 full. Early exits may gain recall, but the
result is a NEW model: its weights go to DIR/backbone/ (use --model DIR/backbone with `icar embed`), and
everything embedded with the original model must be re-embedded before sharing an index with it. It runs the
backbone forward and backward for every image every epoch: use a GPU.

execution: one process, CUDA when present; or data-parallel (torch DDP: one process per GPU over nccl, or
CPU processes over gloo), which gives the same result as one process at the same --batch-size (the GLOBAL
batch, split over the processes; the contrastive loss gathers every process's embeddings). Either
  torchrun --nproc-per-node 8 -m jobs.train_exits shards/*.tar --output heads/l14 ...    (also multi-node)
or, on one machine, let the job start them itself:
  icar train-exits shards/*.tar --output heads/l14 --workers 8 ...
Each process reads the input stream but decodes and encodes only its share; rank 0 alone writes the outputs.
A checkpoint written by N processes resumes under any number (--resume).
"""


def build_parser() -> argparse.ArgumentParser:
    d = ExitTrainConfig(inputs=[], output="")
    p = argparse.ArgumentParser(prog="icar train-exits", description=__doc__, epilog=EXAMPLES,
                                formatter_class=HelpFormatter)
    p.add_argument("inputs", nargs="+", help="training image–caption shards: files, globs, directories or URLs")
    p.add_argument("--output", "-o", required=True, help="output directory (local path or URL)")
    m = add_model_args(p, d, seed=False, heads=False,
                       merge="token-merging schedule the heads will serve under (e.g. keep0.8, r2; see "
                             "pipeline/model/merging.py): early-exit features are taken from merged tokens; the heads "
                             "file records it")
    m.add_argument("--seed", type=int, default=d.seed, help="seed of the random init and of shuffling")
    r = add_runtime_args(p, device_help="training device",
                         threads_help="torch CPU threads of this process (default: torch's choice; --workers N "
                                      "share the cores among themselves)")
    r.add_argument("--workers", type=int, default=d.workers,
                   help="data-parallel processes to start on this machine (one GPU each on CUDA); under torchrun "
                        "leave it at 1")
    v = p.add_argument_group("validation")
    v.add_argument("--val", dest="val_inputs", nargs="+", default=d.val_inputs,
                   help="validation shards (default: hold out --val-fraction of the inputs by key hash)")
    v.add_argument("--val-fraction", type=float, default=d.val_fraction, help="held-out share without --val")
    v.add_argument("--max-val", type=int, default=d.max_val, help="validation pairs used at most")
    v.add_argument("--max-train", type=int, default=d.max_train, help="training pairs used at most (smoke runs)")
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=int, default=d.epochs, help="passes over the training pairs")
    t.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="pairs per step over all processes (in-batch negatives)")
    t.add_argument("--lr", type=float, default=d.lr, help="learning rate of the heads and temperatures")
    t.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay")
    t.add_argument("--contrastive-weight", type=float, default=d.contrastive_weight,
                   help="weight of each exit's contrastive loss against the caption embeddings")
    t.add_argument("--distill-weight", type=float, default=d.distill_weight,
                   help="weight of 1 - cos(exit, full depth) (default: 1.0; 0.0 with --finetune-backbone)")
    t.add_argument("--fixed-temperature", dest="learn_temperature", action="store_false",
                   help="keep each exit's temperature at the model's instead of learning it")
    t.add_argument("--own-gallery", dest="mixed_gallery", action="store_false",
                   help="contrast each exit only with images at its own depth (the earlier loss), not in the mixed "
                        "gallery an index of routed rows holds (default: mixed; frozen backbone only)")
    t.add_argument("--select-epoch", choices=("mixed", "last"), default=d.select_epoch,
                   help="heads written: those of the epoch with the best validation mixed-gallery t2i R@1, or the "
                        "last epoch's (frozen backbone only)")
    t.add_argument("--extract-batch-size", type=int, default=d.extract_batch_size,
                   help="images per forward pass while extracting features")
    t.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoint.pt")
    f = p.add_argument_group("paper recipe (changes the model; see below)")
    f.add_argument("--finetune-backbone", action="store_true", help="train the vision backbone too")
    f.add_argument("--backbone-lr", type=float, default=d.backbone_lr, help="backbone learning rate")
    f.add_argument("--full-path-weight", type=float, default=d.full_path_weight,
                   help="weight of the full-depth contrastive loss (the early exits share the rest)")
    f.add_argument("--shuffle-buffer", type=int, default=d.shuffle_buffer, help="streaming shuffle buffer (pairs)")
    x = p.add_argument_group("inputs")
    x.add_argument("--image-column", default=d.image_column, help="Parquet column with image bytes (default: auto)")
    add_storage_args(p, d.storage_options)
    add_logging_args(p, progress_help="no progress bars (train-exits logs its progress; accepted like every job's)")
    return p


def config_from_args(args: argparse.Namespace) -> ExitTrainConfig:
    """Return the ExitTrainConfig the parsed arguments describe."""
    fields = {f.name for f in dataclasses.fields(ExitTrainConfig)}
    return ExitTrainConfig(**{k: v for k, v in vars(args).items() if k in fields})


def main(argv: list[str] | None = None) -> int:
    """Run `icar train-exits`; return 0 on success, 2 on a configuration, model or data problem.

    Under torchrun every process runs this; the process group comes from the environment torchrun sets.
    """
    args = build_parser().parse_args(argv)
    apply_logging(args)
    set_torch_threads(args.threads)
    try:
        train_exits(config_from_args(args))
    except (TrainExitsError, ModelLoadError, InputError, ValueError, FileNotFoundError) as e:
        print(f"icar train-exits: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    setup_logging()
    raise SystemExit(main())
