"""`icar train-demo`: train the shipped demo CLIP from scratch on a demo corpus (CPU, open_clip's loss)."""

from __future__ import annotations

import argparse
import json
import logging

from pipeline.demo.training import DemoModelConfig, DemoTrainConfig, train_demo

from jobs.common import HelpFormatter, add_logging_args, add_runtime_args, apply_logging

_D = DemoTrainConfig(corpus="")


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of `icar train-demo`."""
    p = argparse.ArgumentParser(
        prog="icar train-demo",
        description=(
            "Train a small open_clip CLIP from scratch on the train split of a demo corpus "
            "(`icar make-demo-corpus`) with open_clip's ClipLoss, evaluate text<->image recall@1/5/10 on its "
            "val split, and write clip_config.json, clip.safetensors, the tokenizer's BPE file and card.json "
            "(metrics, wall time, versions, the reproduce command). `icar embed --model demo` then uses them. "
            "Example: icar make-demo-corpus --n 22000 --val 1000 --test 1000 --output /tmp/demo-corpus && "
            "icar train-demo --corpus /tmp/demo-corpus"),
        formatter_class=HelpFormatter,
    )
    p.add_argument("--corpus", required=True, help="demo corpus directory")
    p.add_argument("--output", "-o", default=_D.output, help="model directory to write")
    p.add_argument("--epochs", type=int, default=_D.epochs, help="passes over the train split")
    p.add_argument("--batch-size", type=int, default=_D.batch_size, help="contrastive batch size")
    p.add_argument("--lr", type=float, default=_D.lr, help="peak learning rate")
    p.add_argument("--warmup-steps", type=int, default=_D.warmup_steps, help="linear warmup steps")
    p.add_argument("--weight-decay", type=float, default=_D.weight_decay, help="AdamW weight decay (matrices)")
    p.add_argument("--full-caption-prob", type=float, default=_D.full_caption_prob,
                   help="chance of the full caption; otherwise a shorter true one (objects alone, one group)")
    p.add_argument("--same-background-batches", type=float, default=_D.same_background_batches,
                   help="share of batches whose images share one background colour (hard negatives)")
    p.add_argument("--plain-epochs", type=int, default=_D.plain_epochs,
                   help="first epochs with full captions and random batches only")
    p.add_argument("--seed", type=int, default=_D.seed, help="init, batch order and augmentation seed")
    p.add_argument("--eval-images", type=int, default=_D.eval_images, help="val images for the recall evaluation")
    p.add_argument("--train-limit", type=int, default=_D.train_limit, help="use only the first N train images")
    p.add_argument("--model-json", default=None,
                   help="JSON object overriding fields of the model shape, e.g. '{\"vision_layers\": 6}'; fields: "
                        + ", ".join(DemoModelConfig.__dataclass_fields__))
    add_runtime_args(p, threads_help="torch threads (1 reproduces the shipped card; more helps only on an idle "
                                     "machine)", threads_default=_D.threads)
    add_logging_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run `icar train-demo`; return the process exit code."""
    args = build_parser().parse_args(argv)
    apply_logging(args)
    # Only when nothing set logging up yet (`python -m`; `icar` and --log-format already did, and a test
    # harness's handlers are left alone).
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model = DemoModelConfig()
    if args.model_json:
        overrides = json.loads(args.model_json)
        unknown = sorted(set(overrides) - set(DemoModelConfig.__dataclass_fields__))
        if unknown:
            raise SystemExit(f"--model-json: unknown fields {unknown}; known: {sorted(DemoModelConfig.__dataclass_fields__)}")
        model = DemoModelConfig(**{**model.__dict__, **overrides})
    cfg = DemoTrainConfig(corpus=args.corpus, output=args.output, model=model, epochs=args.epochs,
                          batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
                          weight_decay=args.weight_decay, seed=args.seed, eval_images=args.eval_images,
                          train_limit=args.train_limit, threads=args.threads,
                          full_caption_prob=args.full_caption_prob,
                          same_background_batches=args.same_background_batches, plain_epochs=args.plain_epochs,
                          progress=not args.no_progress)
    card = train_demo(cfg)
    print(json.dumps({"output": args.output, "val_recall": card["metrics"]["val"]["full"],
                      "wall_seconds": card["wall_seconds"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
