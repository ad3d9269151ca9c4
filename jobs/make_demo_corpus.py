"""`icar make-demo-corpus`: generate the offline demo corpus (synthetic captioned scenes, img2dataset layout)."""

from __future__ import annotations

import argparse
import json
import logging

from pipeline.demo.corpus import DemoCorpusConfig, make_demo_corpus

from jobs.common import HelpFormatter, add_logging_args, apply_logging

_D = DemoCorpusConfig(output="")


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of `icar make-demo-corpus`."""
    p = argparse.ArgumentParser(
        prog="icar make-demo-corpus",
        description=(
            "Generate seeded synthetic scenes (coloured shapes, counts, positions, backgrounds, clutter) with "
            "true captions and a known complexity, written as img2dataset WebDataset shards in train/, val/ and "
            "test/, plus IC9600-layout complexity labels in complexity/. The same seed gives byte-identical "
            "shards. Example: icar make-demo-corpus --n 22000 --val 1000 --test 1000 --output /tmp/demo-corpus"),
        formatter_class=HelpFormatter,
    )
    p.add_argument("--output", "-o", required=True, help="corpus directory (local path or fsspec URL)")
    p.add_argument("--n", type=int, default=_D.n, help="images in all splits together (train gets n - val - test)")
    p.add_argument("--val", type=int, default=_D.val,
                   help="held-out images for exit training and calibration (default: 5%% of --n)")
    p.add_argument("--test", type=int, default=_D.test,
                   help="held-out images for the quality benchmark (default: 5%% of --n)")
    p.add_argument("--seed", type=int, default=_D.seed, help="random seed; same seed -> identical shards")
    p.add_argument("--shard-size", type=int, default=_D.shard_size, help="images per WebDataset shard")
    p.add_argument("--image-size", type=int, default=_D.image_size, help="side of the square JPEGs in pixels")
    p.add_argument("--jpeg-quality", type=int, default=_D.jpeg_quality, help="JPEG quality")
    p.add_argument("--complexity-train", type=int, default=_D.complexity_train,
                   help="train images also written to complexity/ with labels (at most the train split)")
    add_logging_args(p, progress_help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run `icar make-demo-corpus`; return the process exit code."""
    args = build_parser().parse_args(argv)
    apply_logging(args)
    # Only when nothing set logging up yet (`python -m`; `icar` and --log-format already did, and a test
    # harness's handlers are left alone).
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = DemoCorpusConfig(output=args.output, n=args.n, val=args.val, test=args.test, seed=args.seed,
                           shard_size=args.shard_size, image_size=args.image_size, jpeg_quality=args.jpeg_quality,
                           complexity_train=args.complexity_train, progress=not args.no_progress)
    doc = make_demo_corpus(cfg)
    summary = {name: split["count"] for name, split in doc["splits"].items()}
    print(json.dumps({"output": args.output, "images": summary,
                      "complexity_labels": {"train": doc["complexity"]["train_count"],
                                            "test": doc["complexity"]["test_count"]}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
