"""Training a ComplexityNet (ConvNeXt-IC) scorer on human complexity ratings in the IC9600 layout.

Data: an image folder and label files of ``name score`` lines (IC9600 train.txt/test.txt: scores in [0, 1];
SAVOIAS-style 0–100 scores are divided by 100, detected or given). Images are decoded once, exactly as the
pipeline decodes them (``pipeline.io.decode``: shortest side to ``decode_size``, centre crop), kept in memory as
uint8, and every batch then goes through the scorer's own preprocessing (``scorer.to_float_batch``), so the
trained scorer sees in ``icar embed`` the same pixels it was trained on.

Choices, and why:

- **Bins and target.** K = 10 bins with centres 0, 1/9, ..., 1 (the ends included, so every score in [0, 1]
  can be the expected value). The target is *two-hot*: a score y between centres c_i and c_{i+1} puts weight
  (c_{i+1} - y)/Δ on bin i and the rest on bin i+1, so the target's expected value is exactly y (a Gaussian
  over bins is biased towards 0.5 near the ends, where it gets truncated). Cross-entropy against it is a
  proper scoring rule: its minimiser is the label distribution, whose expected value is the label mean.
  K = 10 spaces centres 0.11 apart, about the spread of rater means on IC9600 (17 raters, 5 levels), so
  finer bins add no information; fewer make the distribution coarse. ``--bins`` changes it.
- **MSE term.** ``mse_weight`` × (expected value − y)² is added (default 1.0): it optimises directly what is
  evaluated (PLCC/RMSE of the expected value). Its gradients are ~10× smaller than the cross-entropy's, so
  CE shapes the distribution and MSE fine-tunes the mean once CE plateaus on label noise.
- **Augmentation.** Complexity depends on how much detail a given view holds, so zooming changes the label:
  the usual RandomResizedCrop (8–100 % of the area, any aspect) would pair zoomed-in, simpler-looking views
  with the full image's score. We use only horizontal flips (mirroring changes no one's rating) and square
  crops keeping ≥ ``crop_scale`` = 85 % of the area (≤ 8 % linear zoom), and no colour jitter (colour
  variety is part of complexity).
- **Optimiser.** AdamW (weight decay 0.05, none on norms/biases/layer scales), linear warm-up then cosine
  decay per step; the backbone's learning rate is ``backbone_lr_mult`` × lr (default 1.0 from random init,
  0.1 with pretrained weights, which a large rate would wash out).
- **Backbone.** ConvNeXt is the default because it is ConvNeXt-IC; it is meant to start from ImageNet
  weights (``backbone_weights``). From random init it learns slowly: on 600 demo-corpus images, 4 epochs
  at 64 px, convnext_atto stayed at SRCC ~0.0 (lr 2e-4 and 2e-3) where torchvision:mobilenet_v2 reached
  0.87. Without weights, prefer a BatchNorm network such as torchvision:mobilenet_v2.
- **Partial fine-tuning** (``trainable_blocks``, off by default). With a pretrained backbone and a few hundred
  labelled images, fine-tuning only the last feature blocks and the head keeps the generic ImageNet features
  of the early blocks and cuts the cost: the frozen blocks run once per image and cached view (the image,
  then ``cached_views`` - 1 random flips/crops as above), and each step runs only the tail. On CPU this is
  about 20× cheaper per step than end-to-end MobileNetV2 training (0.35 s vs 7 s per 32 images at 160 px).
- **Model selection.** The checkpoint kept is the epoch with the best (PLCC + SRCC) / 2 on the validation
  set; every epoch's metrics are in history.json.

Outputs in ``output``: best.safetensors (+ best.json card), history.json, train_state.pt (resume state:
re-running the same command continues after the last finished epoch).
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipeline import __version__
from pipeline.io import storage
from pipeline.io.decode import DecodeConfig, DecodeError, decode_image
from pipeline.logs import timed_phase
from pipeline.metrics import complexity_metrics, fit_linear_map
from pipeline.model.scorer import (IMAGENET_MEAN, IMAGENET_STD, ComplexityNet, load_backbone_weights, load_scorer,
                                   save_checkpoint, to_float_batch)
from pipeline.runtime import resolve_device

log = logging.getLogger(__name__)

STATE_FILE = "train_state.pt"
BEST_FILE = "best.safetensors"
HISTORY_FILE = "history.json"


@dataclass
class TrainConfig:
    """Everything `icar train-complexity` needs; the CLI's defaults come from here."""

    images: str  # image folder (local path or URL); label names are paths relative to it
    train_labels: str  # label file of `name score` lines
    output: str  # directory for best.safetensors, best.json, history.json, train_state.pt
    val_labels: str | None = None  # validation label file; None: hold out val_fraction of the training labels
    val_fraction: float = 0.1  # share of train labels held out (seeded) when val_labels is None
    backbone: str = "convnext_atto"  # timm name (convnext_atto/nano/tiny, convnextv2_*), or "torchvision:NAME"
    backbone_weights: str | None = None  # local pretrained weights (safetensors or torch file); None: random init
    bins: int = 10  # ordered complexity bins (centres linspace(0, 1, bins))
    input_size: int = 224  # scorer input side; 128 or 64 trade accuracy for speed
    decode_size: int = 224  # images are decoded like the pipeline's batches at this size, then resized
    epochs: int = 30  # passes over the training set
    batch_size: int = 32  # images per optimiser step
    lr: float = 4e-4  # peak AdamW learning rate of the head (and backbone × backbone_lr_mult)
    backbone_lr_mult: float | None = None  # backbone lr factor; None: 1.0 from random init, 0.1 with weights
    weight_decay: float = 0.05  # AdamW decoupled weight decay
    warmup_epochs: float = 1.0  # linear warm-up length before the cosine decay
    mse_weight: float = 1.0  # weight of (expected score - label)^2 beside the two-hot cross-entropy
    dropout: float = 0.0  # dropout before the head
    trainable_blocks: int | None = None  # fine-tune only the backbone's last N feature blocks (+ head); the frozen
    #   blocks run once per cached view instead of every step (torchvision MobileNet/EfficientNet). None: all train
    cached_views: int = 4  # with trainable_blocks: views cached per training image (itself, then random crops/flips)
    crop_scale: float = 0.85  # smallest kept area of the random square crop (1.0 disables cropping)
    hflip: bool = True  # random horizontal flips
    score_scale: float | None = None  # divide label scores by this; None: 1, or 100 when any score > 1
    seed: int = 0  # seeds the split, init, shuffling and augmentation
    device: str = "auto"  # auto | cpu | cuda[:N]
    decode_workers: int = 0  # decoding threads; 0: one per CPU
    data_note: str = ""  # what the data is and its licence, written into the checkpoint card
    restart: bool = False  # ignore an existing train_state.pt in output and start over
    progress: bool = True  # tqdm progress bars


# ------------------------------------------------------------------------------------------ labels


def read_labels(url: str) -> list[tuple[str, float]]:
    """Return the (name, score) pairs of a label file: one `name score` per line, white-space separated.

    Blank lines and lines starting with # are skipped; names may contain spaces (the score is the last field).
    """
    fs, path = storage.filesystem(url)
    if not fs.exists(path):
        raise FileNotFoundError(f"label file {url} does not exist")
    with fs.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().splitlines()
    out = []
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        parts = text.rsplit(None, 1)
        try:
            score = float(parts[1]) if len(parts) == 2 else float("nan")
        except ValueError:
            score = float("nan")
        if not math.isfinite(score):
            raise ValueError(f"{url}:{number}: expected `name score`, got {line!r}")
        out.append((parts[0], score))
    if not out:
        raise ValueError(f"label file {url} holds no `name score` lines")
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})[:5]
        raise ValueError(f"label file {url} lists some images twice (e.g. {dup}); one line per image")
    return out


def resolve_score_scale(scores: np.ndarray, scale: float | None) -> float:
    """Return the divisor that maps label scores to [0, 1] (``scale``, or auto: 1 or 100), or raise."""
    lo, hi = float(np.min(scores)), float(np.max(scores))
    if scale is None:
        scale = 1.0 if hi <= 1.0 else 100.0
        if scale != 1.0:
            log.info("label scores reach %.3g > 1: treating them as 0-100 (SAVOIAS style) and dividing by 100", hi)
    if lo < 0 or hi / scale > 1.0 + 1e-6:
        raise ValueError(f"label scores span [{lo:.4g}, {hi:.4g}], outside [0, {scale:g}]; pass --score-scale "
                         "with the maximum of the rating scale")
    return float(scale)


def file_sha256(url: str) -> str:
    """Return the sha256 of the file at ``url``."""
    fs, path = storage.filesystem(url)
    with fs.open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# ------------------------------------------------------------------------------------------ images


def load_images(images: str, names: list[str], size: int, workers: int = 0, progress: bool = False
                ) -> tuple[np.ndarray, list[int], list[tuple[str, str]]]:
    """Return (uint8 pixels (M, size, size, 3), indices of the decoded names, [(name, error)] of the rest).

    Decoded exactly like the pipeline's batches (``pipeline.io.decode.decode_image``). A file that does not
    exist is an error (the folder or the label file is wrong); a file that cannot be decoded is skipped and
    reported, like a bad sample in ``icar embed``.
    """
    fs, root = storage.filesystem(images)
    cfg = DecodeConfig(image_size=size)
    missing = [n for n in names[:50] if not fs.exists(storage.join(root, n))]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of the first {min(50, len(names))} labelled images are not under "
                                f"{images} (e.g. {missing[:3]}); check --images and the label file's names")

    def one(i: int):
        with fs.open(storage.join(root, names[i]), "rb") as f:
            data = f.read()
        try:
            return i, decode_image(data, cfg).pixels, None
        except DecodeError as e:
            return i, None, str(e)

    out = np.empty((len(names), size, size, 3), np.uint8)
    kept, skipped = [], []
    bar = _progress(len(names), "decode", progress)
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        for i, pixels, error in pool.map(one, range(len(names))):
            if error is None:
                out[len(kept)] = pixels
                kept.append(i)
            else:
                skipped.append((names[i], error))
                log.warning("skipping %s: %s", names[i], error)
            bar.update(1)
    bar.close()
    if not kept:
        raise ValueError(f"none of the {len(names)} labelled images under {images} could be decoded")
    return out[: len(kept)], kept, skipped


def _progress(total: int, desc: str, enabled: bool):
    """Return a tqdm bar (or a silent stand-in when ``enabled`` is False)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True, leave=False)


def augment_batch(pixels: torch.Tensor, input_size: int, generator: torch.Generator, crop_scale: float,
                  hflip: bool, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """Return the normalised float batch of randomly flipped, mildly cropped uint8 images (B, S, S, 3)."""
    size = pixels.shape[1]
    views = []
    for img in pixels:
        area = crop_scale + (1.0 - crop_scale) * float(torch.rand((), generator=generator))
        side = max(1, min(size, int(round(size * math.sqrt(area)))))
        top = int(torch.randint(0, size - side + 1, (), generator=generator))
        left = int(torch.randint(0, size - side + 1, (), generator=generator))
        view = img[top:top + side, left:left + side]
        if hflip and float(torch.rand((), generator=generator)) < 0.5:
            view = view.flip(1)
        views.append(to_float_batch(view.unsqueeze(0), input_size, "cpu", mean, std))
    return torch.cat(views)


# ------------------------------------------------------------------------------------------ loss


def two_hot(y: torch.Tensor, bins: int) -> torch.Tensor:
    """Return two-hot targets (B, K) over centres linspace(0, 1, K) whose expected value is exactly ``y``."""
    pos = y.clamp(0.0, 1.0) * (bins - 1)
    lo = pos.floor().clamp(max=bins - 2).long()
    w = (pos - lo.float()).unsqueeze(1)
    target = torch.zeros(y.shape[0], bins, device=y.device)
    target.scatter_(1, lo.unsqueeze(1), 1.0 - w)
    target.scatter_add_(1, (lo + 1).unsqueeze(1), w)
    return target


def complexity_loss(logits: torch.Tensor, y: torch.Tensor, centres: torch.Tensor, mse_weight: float
                    ) -> tuple[torch.Tensor, dict]:
    """Return (loss, parts): two-hot cross-entropy + mse_weight × squared error of the expected score."""
    logp = F.log_softmax(logits.float(), dim=1)
    ce = -(two_hot(y, logits.shape[1]) * logp).sum(1).mean()
    score = logp.exp() @ centres.to(logits.device)
    mse = ((score - y) ** 2).mean()
    return ce + mse_weight * mse, {"ce": float(ce.detach()), "mse": float(mse.detach())}


@torch.inference_mode()
def predict(model: ComplexityNet, pixels: np.ndarray, input_size: int, batch_size: int, device: str,
            mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """Return the expected scores (float32) of a uint8 image array, in eval mode, no augmentation."""
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(pixels), batch_size):
        x = to_float_batch(pixels[start:start + batch_size], input_size, device, mean, std)
        out.append(model.expected_score(model(x)).float().cpu().numpy())
    model.train(was_training)
    return np.concatenate(out).astype(np.float32)


@torch.inference_mode()
def predict_frozen(model: ComplexityNet, frozen: torch.Tensor, trainable_blocks: int, batch_size: int,
                   device: str) -> np.ndarray:
    """Return the expected scores (float32) from cached frozen-block activations (N, C, h, w), in eval mode.

    Equal to ``predict`` on the images those activations came from (the frozen blocks are deterministic).
    """
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(frozen), batch_size):
        logits = model.forward_tail(frozen[start:start + batch_size].to(device).float(), trainable_blocks)
        out.append(model.expected_score(logits).float().cpu().numpy())
    model.train(was_training)
    return np.concatenate(out).astype(np.float32)


@torch.inference_mode()
def frozen_views(model: ComplexityNet, pixels: np.ndarray, trainable_blocks: int, input_size: int, views: int,
                 crop_scale: float, hflip: bool, seed: int, batch_size: int = 64, device: str = "cpu",
                 progress: bool = False) -> torch.Tensor:
    """Return the frozen blocks' activations (N, views, C, h, w) for ``views`` views of each uint8 image.

    View 0 is the image itself (what validation and scoring see); views 1.. are random flips and mild crops
    drawn by ``augment_batch`` with the training settings, seeded by ``seed``. Computed once, in eval mode
    (the frozen blocks' BatchNorm uses its pretrained statistics), so each training epoch only runs the
    trainable tail: about 20× cheaper per step than fine-tuning MobileNetV2 end to end on CPU.
    """
    if views < 1:
        raise ValueError(f"--cached-views must be >= 1, got {views}")
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed * 100_003 + 77_777)
    out = None
    bar = _progress(len(pixels) * views, "frozen blocks", progress)
    for start in range(0, len(pixels), batch_size):
        chunk = torch.from_numpy(np.ascontiguousarray(pixels[start:start + batch_size]))
        for v in range(views):
            x = (to_float_batch(chunk, input_size, device) if v == 0 else
                 augment_batch(chunk, input_size, generator, crop_scale, hflip).to(device))
            h = model.forward_frozen(x, trainable_blocks).cpu()
            if out is None:
                out = torch.empty((len(pixels), views, *h.shape[1:]), dtype=torch.float32)
                log.info("caching frozen activations: %d images x %d views x %s = %.0f MB", len(pixels), views,
                         tuple(h.shape[1:]), out.numel() * 4 / 1e6)
            out[start:start + len(chunk), v] = h
            bar.update(len(chunk))
    bar.close()
    model.train(was_training)
    return out


# ------------------------------------------------------------------------------------------ training


def _batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Return shuffled index batches; a last batch of one image joins the previous one (BatchNorm needs 2)."""
    perm = torch.randperm(n, generator=generator)
    chunks = list(perm.split(batch_size))
    if len(chunks) > 1 and len(chunks[-1]) == 1:
        chunks[-2] = torch.cat([chunks[-2], chunks.pop()])
    return chunks


def _param_groups(model: ComplexityNet, lr: float, backbone_lr_mult: float, weight_decay: float) -> list[dict]:
    """Return AdamW groups: backbone at lr × backbone_lr_mult, head at lr; no weight decay on norms, biases and
    layer scales (1-D tensors), the usual practice, since shrinking them towards 0 is not a useful prior."""
    groups = []
    for part, part_lr in ((model.backbone, lr * backbone_lr_mult), (model.head, lr)):
        params = [p for p in part.parameters() if p.requires_grad]
        groups.append({"params": [p for p in params if p.ndim > 1], "lr": part_lr, "weight_decay": weight_decay})
        groups.append({"params": [p for p in params if p.ndim <= 1], "lr": part_lr, "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


def _schedule(step: int, total: int, warmup: int) -> float:
    """Return the learning-rate factor at ``step``: linear warm-up, then cosine decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# Settings that must match to resume a run (anything else, e.g. progress bars or workers, may change).
_RESUME_KEYS = ("images", "train_labels", "val_labels", "val_fraction", "backbone", "backbone_weights", "bins",
                "input_size", "decode_size", "epochs", "batch_size", "lr", "backbone_lr_mult", "weight_decay",
                "warmup_epochs", "mse_weight", "dropout", "crop_scale", "hflip", "score_scale", "seed",
                "trainable_blocks", "cached_views")


def _split(pairs: list[tuple[str, float]], cfg: TrainConfig):
    """Return (train pairs, val pairs, description of the split)."""
    if cfg.val_labels:
        val = read_labels(cfg.val_labels)
        overlap = {n for n, _ in pairs} & {n for n, _ in val}
        if overlap:
            raise ValueError(f"{len(overlap)} images are in both the train and val label files "
                             f"(e.g. {sorted(overlap)[:3]}); validation must be held out")
        return pairs, val, {"val_labels": cfg.val_labels, "val_labels_sha256": file_sha256(cfg.val_labels)}
    if not 0 < cfg.val_fraction < 1:
        raise ValueError(f"--val-fraction must be in (0, 1) when no --val-labels is given, got {cfg.val_fraction}")
    order = np.random.default_rng(cfg.seed).permutation(len(pairs))
    n_val = max(3, int(round(cfg.val_fraction * len(pairs))))
    if n_val >= len(pairs) - 1:
        raise ValueError(f"{len(pairs)} labelled images are too few to hold out {n_val} for validation")
    val_idx = set(order[:n_val].tolist())
    train = [p for i, p in enumerate(pairs) if i not in val_idx]
    val = [p for i, p in enumerate(pairs) if i in val_idx]
    return train, val, {"val_fraction": cfg.val_fraction, "split_seed": cfg.seed}


def backbone_lr_mult_of(cfg: TrainConfig) -> float:
    """Return the backbone's learning-rate factor: the configured one, else 0.1 with pretrained weights, else 1."""
    if cfg.backbone_lr_mult is not None:
        return cfg.backbone_lr_mult
    return 0.1 if cfg.backbone_weights else 1.0


def build_model(cfg: TrainConfig, device: str) -> tuple[ComplexityNet, dict | None]:
    """Return (the ComplexityNet to train, seeded and with its pretrained backbone weights, weights info or None).

    With ``trainable_blocks`` the blocks before the last N (and nothing else) are frozen (requires_grad off).
    """
    torch.manual_seed(cfg.seed)
    model = ComplexityNet(cfg.backbone, bins=cfg.bins, dropout=cfg.dropout)
    weights_info = load_backbone_weights(model.backbone, cfg.backbone_weights) if cfg.backbone_weights else None
    if cfg.trainable_blocks is not None:
        blocks = model.feature_blocks()
        for block in blocks[: model._split_at(cfg.trainable_blocks)]:
            block.requires_grad_(False)
        if cfg.backbone_weights is None:
            log.warning("--trainable-blocks %d without --backbone-weights freezes randomly initialised blocks; "
                        "partial fine-tuning is meant for a pretrained backbone", cfg.trainable_blocks)
    if cfg.backbone_weights is None and "convnext" in cfg.backbone:
        log.warning("training %s from random init: ConvNeXt learns slowly from scratch (on 600 demo images, 4 "
                    "epochs at 64 px: SRCC ~0.0, where torchvision:mobilenet_v2 reached 0.87); give "
                    "--backbone-weights (ImageNet) to reproduce ConvNeXt-IC", cfg.backbone)
    return model.to(device), weights_info


def fit(model: ComplexityNet, cfg: TrainConfig, x_train, y_train: torch.Tensor, x_val, y_val: np.ndarray,
        device: str, resume: dict | None = None, on_epoch=None) -> dict:
    """Train ``model`` in place; return {"history", "best", "best_state"} (best_state: weights of the best epoch).

    The training loop of `icar train-complexity`, also called directly by benchmarks that train many folds
    on images decoded (and frozen activations computed) once. ``x_train``/``x_val`` are uint8 images
    (N, S, S, 3), or, with ``cfg.trainable_blocks``, cached frozen activations from ``frozen_views``:
    (N, V, C, h, w) for training (each step draws one view per image) and (N, C, h, w) for validation.
    ``resume`` is a saved train state (model, optimizer, RNG, epoch, history, best); ``on_epoch(record,
    improved, state)`` is called after every epoch with what a resumable run must save.
    """
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.lr, backbone_lr_mult_of(cfg), cfg.weight_decay))
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    n = len(y_train)
    steps_per_epoch = len(_batches(n, cfg.batch_size, torch.Generator().manual_seed(0)))
    total_steps = steps_per_epoch * cfg.epochs
    warmup_steps = int(round(cfg.warmup_epochs * steps_per_epoch))
    frozen = cfg.trainable_blocks is not None

    start_epoch, history, best, best_state = 0, [], None, None
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        torch.set_rng_state(resume["torch_rng"])
        start_epoch, history, best = int(resume["epoch"]), list(resume["history"]), resume["best"]
        log.info("resuming %s after epoch %d of %d", cfg.output, start_epoch, cfg.epochs)

    model.train()
    factor = 1.0
    for epoch in range(start_epoch, cfg.epochs):
        t_epoch = time.perf_counter()
        shuffle = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        augment = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch + 50_000)
        batches = _batches(n, cfg.batch_size, shuffle)
        sums = {"loss": 0.0, "ce": 0.0, "mse": 0.0}
        bar = _progress(len(batches), f"epoch {epoch + 1}/{cfg.epochs}", cfg.progress)
        for b, idx in enumerate(batches):
            step = epoch * steps_per_epoch + b
            factor = _schedule(step, total_steps, warmup_steps)
            for group, base in zip(optimizer.param_groups, base_lrs):
                group["lr"] = base * factor
            if frozen:
                view = torch.randint(0, x_train.shape[1], (len(idx),), generator=augment)
                logits = model.forward_tail(x_train[idx, view].to(device), cfg.trainable_blocks)
            else:
                x = augment_batch(torch.from_numpy(x_train[idx.numpy()]), cfg.input_size, augment, cfg.crop_scale,
                                  cfg.hflip).to(device)
                logits = model(x)
            y = y_train[idx].to(device)
            loss, parts = complexity_loss(logits, y, model.centres, cfg.mse_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sums["loss"] += float(loss.detach()) * len(idx)
            sums["ce"] += parts["ce"] * len(idx)
            sums["mse"] += parts["mse"] * len(idx)
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
            bar.update(1)
        bar.close()
        if frozen:
            val_pred = predict_frozen(model, x_val, cfg.trainable_blocks, max(cfg.batch_size, 64), device)
        else:
            val_pred = predict(model, x_val, cfg.input_size, max(cfg.batch_size, 64), device)
        val = complexity_metrics(val_pred, y_val)
        record = {"epoch": epoch + 1, **{f"train_{k}": v / n for k, v in sums.items()},
                  **{f"val_{k}": v for k, v in val.items()}, "lr": base_lrs[-1] * factor,
                  "seconds": time.perf_counter() - t_epoch}
        history.append(record)
        quality = (val["plcc"] + val["srcc"]) / 2
        improved = best is None or (math.isfinite(quality) and not quality <= best["quality"])
        if improved:
            best = {"epoch": epoch + 1, "quality": quality, "val": val}
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        log.info("epoch %d/%d: loss %.4f, val PLCC %.4f SRCC %.4f RMSE %.4f MAE %.4f%s (%.1fs)", epoch + 1,
                 cfg.epochs, record["train_loss"], val["plcc"], val["srcc"], val["rmse"], val["mae"],
                 " *best*" if improved else "", record["seconds"])
        if on_epoch is not None:
            on_epoch(record, improved, {"epoch": epoch + 1, "model": model.state_dict(),
                                        "optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
                                        "history": history, "best": best})
    if best is None:
        raise RuntimeError(f"no epoch was run: --epochs is {cfg.epochs}")
    return {"history": history, "best": best, "best_state": best_state}


def train_complexity(cfg: TrainConfig) -> dict:
    """Train a ComplexityNet on ``cfg``'s data; return a summary (best epoch, val metrics, checkpoint path)."""
    import timm  # lazy: only its version is recorded, and it takes seconds to import

    device = resolve_device(cfg.device)
    storage.makedirs(cfg.output)
    state_url = storage.join(cfg.output, STATE_FILE)
    best_url = storage.join(cfg.output, BEST_FILE)
    resume_cfg = {k: getattr(cfg, k) for k in _RESUME_KEYS}
    state = None
    if storage.exists(state_url) and not cfg.restart:  # checked first: a mismatch fails before any decoding
        fs, path = storage.filesystem(state_url)
        with fs.open(path, "rb") as f:
            state = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
        changed = {k: (state["config"].get(k), v) for k, v in resume_cfg.items() if state["config"].get(k) != v}
        if changed:
            raise ValueError(f"{cfg.output} holds a training run with other settings {changed} (saved, now); "
                             "use another --output, or --restart to start over there")
    pairs = read_labels(cfg.train_labels)
    train_pairs, val_pairs, split_info = _split(pairs, cfg)
    scale = resolve_score_scale(np.array([s for _, s in train_pairs + val_pairs]), cfg.score_scale)

    with timed_phase("decode") as decoding:
        x_train, kept, skipped_train = load_images(cfg.images, [n for n, _ in train_pairs], cfg.decode_size,
                                                   cfg.decode_workers, cfg.progress)
        y_train = torch.tensor([train_pairs[i][1] / scale for i in kept], dtype=torch.float32)
        x_val, kept_val, skipped_val = load_images(cfg.images, [n for n, _ in val_pairs], cfg.decode_size,
                                                   cfg.decode_workers, cfg.progress)
        y_val = np.array([val_pairs[i][1] / scale for i in kept_val], np.float32)
        if len(kept_val) < 3:
            raise ValueError(f"only {len(kept_val)} validation images could be decoded; need at least 3")
    log.info("decoded %d train + %d val images at %d px in %.1fs (%d skipped)", len(kept), len(kept_val),
             cfg.decode_size, decoding.seconds, len(skipped_train) + len(skipped_val))

    model, weights_info = build_model(cfg, device)
    if cfg.trainable_blocks is not None:  # the frozen blocks never change: run them once per view, not per epoch
        x_train = frozen_views(model, x_train, cfg.trainable_blocks, cfg.input_size, cfg.cached_views,
                               cfg.crop_scale, cfg.hflip, cfg.seed, device=device, progress=cfg.progress)
        x_val = frozen_views(model, x_val, cfg.trainable_blocks, cfg.input_size, 1, cfg.crop_scale, cfg.hflip,
                             cfg.seed, device=device, progress=cfg.progress)[:, 0]

    card_base = {
        "input_size": cfg.input_size, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
        "score": "expected bin value: softmax(logits) · linspace(0, 1, bins), in [0, 1]",
        "training": {
            "data": cfg.data_note or f"images {cfg.images}, labels {cfg.train_labels}",
            "images": cfg.images, "train_labels": cfg.train_labels,
            "train_labels_sha256": file_sha256(cfg.train_labels), **split_info,
            "n_train": len(kept), "n_val": len(kept_val),
            "skipped": [{"name": n, "error": e} for n, e in skipped_train + skipped_val],
            "score_scale": scale, "decode_size": cfg.decode_size,
            "augmentation": {"hflip": cfg.hflip, "crop_scale": cfg.crop_scale,
                             **({"cached_views": cfg.cached_views} if cfg.trainable_blocks is not None else {})},
            "loss": {"target": "two-hot", "mse_weight": cfg.mse_weight},
            "optimizer": {"name": "AdamW", "lr": cfg.lr, "backbone_lr_mult": backbone_lr_mult_of(cfg),
                          "weight_decay": cfg.weight_decay, "warmup_epochs": cfg.warmup_epochs,
                          "schedule": "linear warm-up, cosine decay per step"},
            "epochs": cfg.epochs, "batch_size": cfg.batch_size, "dropout": cfg.dropout,
            "trainable_blocks": cfg.trainable_blocks,
            "backbone_weights": weights_info,
        },
        "seed": cfg.seed,
        "versions": {"icar": __version__, "torch": torch.__version__, "timm": timm.__version__},
    }

    def on_epoch(record: dict, improved: bool, train_state: dict) -> None:
        if improved:
            card = {**card_base, "metrics": {"val": train_state["best"]["val"], "best_epoch": record["epoch"],
                                             "selection": "(PLCC+SRCC)/2 on val"}}
            save_checkpoint(model, card, best_url)
        storage.write_json(train_state["history"], storage.join(cfg.output, HISTORY_FILE))
        buf = io.BytesIO()
        torch.save({"config": resume_cfg, **train_state}, buf)
        storage.atomic_write_bytes(state_url, buf.getvalue())

    result = fit(model, cfg, x_train, y_train, x_val, y_val, device, resume=state, on_epoch=on_epoch)
    best, history = result["best"], result["history"]
    summary = {"checkpoint": best_url, "best_epoch": best["epoch"], "val": best["val"],
               "epochs_run": len(history), "n_train": len(kept), "n_val": len(kept_val),
               "skipped": len(skipped_train) + len(skipped_val), "config": asdict(cfg)}
    log.info("best epoch %d: val PLCC %.4f SRCC %.4f -> %s", best["epoch"], best["val"]["plcc"],
             best["val"]["srcc"], best_url)
    return summary


# ------------------------------------------------------------------------------------------ evaluation


@dataclass
class EvalConfig:
    """Everything `icar eval-complexity` needs; the CLI's defaults come from here."""

    images: str  # image folder; label names are relative paths inside it
    labels: str  # label file of `name score` lines (the test split)
    output: str  # directory for metrics.json, metrics.csv, predictions.csv
    scorer: str = "heuristic"  # heuristic | convnext | default
    checkpoint: str | None = None  # ComplexityNet checkpoint for --scorer convnext
    per_category: bool = False  # metrics per first path component (SAVOIAS: Category/n.jpg) and their mean
    fit_labels: str | None = None  # labels (a train split) to fit score -> label lines on, for RMSE/MAE
    score_scale: float | None = None  # divide label scores by this; None: 1, or 100 when any score > 1
    decode_size: int = 224  # decode like the pipeline at this size (the encoder's input size)
    batch_size: int = 64  # images per scorer call
    device: str = "auto"  # auto | cpu | cuda[:N]
    decode_workers: int = 0  # decoding threads; 0: one per CPU
    progress: bool = True  # progress bars


def _category(name: str) -> str:
    """Return the first path component of a label name ("" when there is none)."""
    return name.split("/", 1)[0] if "/" in name else ""


def _score_all(scorer, pixels: np.ndarray, batch_size: int, progress: bool) -> tuple[np.ndarray, float]:
    """Return (scores, seconds spent scoring) for a uint8 image array, after one untimed warm-up batch."""
    scorer.score(pixels[: min(len(pixels), batch_size)])
    out, seconds = [], 0.0
    bar = _progress(len(pixels), "score", progress)
    for start in range(0, len(pixels), batch_size):
        batch = pixels[start:start + batch_size]
        t0 = time.perf_counter()
        out.append(np.asarray(scorer.score(batch), np.float32))
        seconds += time.perf_counter() - t0
        bar.update(len(batch))
    bar.close()
    return np.concatenate(out), seconds


def evaluate_complexity(cfg: EvalConfig) -> dict:
    """Return (and write to ``cfg.output``) PLCC, SRCC, RMSE, MAE and images/s of a scorer on labelled images.

    With ``per_category`` the metrics are computed within each category and averaged (never pooled: SAVOIAS
    normalises scores within each category, so pooled numbers would compare incomparable scales). RMSE/MAE
    of the raw score are only meaningful for a scorer trained on the same label scale; the heuristic's raw
    score is an edge density, so for it they are reported with a note, and ``fit_labels`` adds RMSE/MAE
    after a least-squares line fitted on those (training) labels.
    """
    device = resolve_device(cfg.device)
    scorer = load_scorer(cfg.scorer, cfg.checkpoint, device=device)
    if scorer is None:
        raise ValueError("--scorer none has nothing to evaluate; choose heuristic, convnext or default")
    pairs = read_labels(cfg.labels)
    fit_pairs = read_labels(cfg.fit_labels) if cfg.fit_labels else []
    overlap = {n for n, _ in pairs} & {n for n, _ in fit_pairs}
    if overlap:
        raise ValueError(f"{len(overlap)} images are in both --labels and --fit-labels (e.g. {sorted(overlap)[:3]}); "
                         "fit the score->label map on training labels only")
    scale = resolve_score_scale(np.array([s for _, s in pairs + fit_pairs]), cfg.score_scale)

    with timed_phase("decode") as decoding:
        pixels, kept, skipped = load_images(cfg.images, [n for n, _ in pairs], cfg.decode_size, cfg.decode_workers,
                                            cfg.progress)
    decode_seconds = decoding.seconds
    names = [pairs[i][0] for i in kept]
    labels = np.array([pairs[i][1] / scale for i in kept], np.float32)
    scores, score_seconds = _score_all(scorer, pixels, cfg.batch_size, cfg.progress)
    groups = sorted({_category(n) for n in names}) if cfg.per_category else [""]
    group_of = np.array([_category(n) if cfg.per_category else "" for n in names])

    maps: dict[str, tuple[float, float]] = {}
    fit_skipped: list = []
    if fit_pairs:
        fit_pixels, fit_kept, fit_skipped = load_images(cfg.images, [n for n, _ in fit_pairs], cfg.decode_size,
                                                        cfg.decode_workers, cfg.progress)
        fit_names = [fit_pairs[i][0] for i in fit_kept]
        fit_labels = np.array([fit_pairs[i][1] / scale for i in fit_kept], np.float32)
        fit_scores, _ = _score_all(scorer, fit_pixels, cfg.batch_size, False)
        fit_group = np.array([_category(n) if cfg.per_category else "" for n in fit_names])
        for g in groups:
            m = fit_group == g
            if m.sum() < 2:
                raise ValueError(f"--fit-labels has {int(m.sum())} images of category {g!r}; need >= 2 per category")
            maps[g] = fit_linear_map(fit_scores[m], fit_labels[m])
    fitted = np.array([maps[g][0] * s + maps[g][1] for s, g in zip(scores, group_of)], np.float32) if maps else None

    rows = []
    for g in groups:
        m = group_of == g
        row = {"group": g or "all", **complexity_metrics(scores[m], labels[m])}
        if fitted is not None:
            fm = complexity_metrics(fitted[m], labels[m])
            row.update(rmse_fitted=fm["rmse"], mae_fitted=fm["mae"], fit_slope=maps[g][0], fit_intercept=maps[g][1])
        rows.append(row)
    metric_keys = [k for k in rows[0] if k not in ("group", "n", "fit_slope", "fit_intercept")]
    mean = {k: float(np.mean([r[k] for r in rows])) for k in metric_keys} if cfg.per_category else None
    heuristic = scorer.identity.get("kind") == "heuristic"
    result = {
        "scorer": scorer.identity,
        "scorer_gflops_per_image": scorer.gflops_per_image,
        "labels": cfg.labels, "images": cfg.images, "score_scale": scale, "decode_size": cfg.decode_size,
        "n": int(len(names)), "skipped": [{"name": n, "error": e} for n, e in skipped],
        "fit_labels": cfg.fit_labels, "fit_skipped": len(fit_skipped),
        "device": device,
        "images_per_s": len(names) / score_seconds if score_seconds > 0 else float("inf"),
        "images_per_s_with_decode": len(names) / (score_seconds + decode_seconds),
        "per_category": cfg.per_category,
        "metrics": rows if cfg.per_category else rows[0],
        "mean_over_categories": mean,
        "notes": ("RMSE/MAE compare the raw score with labels scaled to [0, 1]; "
                  + ("the heuristic's raw score is an edge density, not calibrated to the label scale, so its raw "
                     "RMSE/MAE say little; see rmse_fitted/mae_fitted (a line fitted on --fit-labels)"
                     if heuristic else "a trained scorer predicts on the label scale it was trained on")
                  + ("; per-category metrics are averaged, never pooled" if cfg.per_category else "")),
    }
    storage.makedirs(cfg.output)
    storage.write_json(result, storage.join(cfg.output, "metrics.json"))
    columns = list(rows[0])
    lines = [",".join(columns)] + [",".join(_csv(r[c]) for c in columns) for r in rows]
    if mean is not None:
        lines.append(",".join(_csv({"group": "mean", "n": sum(r["n"] for r in rows), **mean}.get(c, "")) for c in columns))
    storage.atomic_write_bytes(storage.join(cfg.output, "metrics.csv"), ("\n".join(lines) + "\n").encode())
    pred_lines = ["name,label,score" + (",fitted" if fitted is not None else "")]
    for i, n in enumerate(names):
        pred_lines.append(",".join([_csv(n), f"{labels[i]:.6f}", f"{scores[i]:.6f}"]
                                   + ([f"{fitted[i]:.6f}"] if fitted is not None else [])))
    storage.atomic_write_bytes(storage.join(cfg.output, "predictions.csv"), ("\n".join(pred_lines) + "\n").encode())
    return result


def _csv(value) -> str:
    """Return ``value`` as one CSV field (floats with 6 decimals, text quoted when it needs to be)."""
    if isinstance(value, float):
        return f"{value:.6f}"
    text = str(value)
    return '"' + text.replace('"', '""') + '"' if any(c in text for c in ',"\n') else text


# ------------------------------------------------------------------------------------------ cross-validation


def category_folds(names: list[str], protocol: str, k: int = 5, seed: int = 0) -> list[dict]:
    """Return folds {"fold", "category", "train", "test"} (index arrays) over per-category labelled images.

    - "loco" (leave one category out): one fold per category, tested on all of it, trained on the others;
      how a scorer does on a kind of image it never saw.
    - "kfold": ``k`` folds within each category (seeded shuffle), trained and tested inside that category.

    The category is the first path component of each name (SAVOIAS: ``Category/n.jpg``).
    """
    cats = np.array([_category(n) for n in names])
    groups = sorted(set(cats.tolist()))
    if protocol == "loco":
        if len(groups) < 2:
            raise ValueError(f"leave-one-category-out needs >= 2 categories, the names hold {groups}")
        return [{"fold": f"loco:{g}", "category": g, "train": np.flatnonzero(cats != g),
                 "test": np.flatnonzero(cats == g)} for g in groups]
    if protocol == "kfold":
        folds = []
        for g in groups:
            members = np.flatnonzero(cats == g)
            if len(members) < 2 * k:
                raise ValueError(f"category {g!r} has {len(members)} images, too few for {k}-fold")
            order = members[np.random.default_rng([seed, len(folds)]).permutation(len(members))]
            for i, test in enumerate(np.array_split(order, k)):
                folds.append({"fold": f"kfold:{g}/{i}", "category": g, "test": np.sort(test),
                              "train": np.setdiff1d(members, test)})
        return folds
    raise ValueError(f"unknown protocol {protocol!r}; choose loco or kfold")


def cross_validate(cfg: TrainConfig, x, y: np.ndarray, folds: list[dict], device: str = "cpu") -> list[dict]:
    """Train one model per fold with ``fit`` and return, per fold, its test predictions and chosen epoch.

    ``x`` is what ``fit`` trains on for all images: uint8 pixels (N, S, S, 3), or with
    ``cfg.trainable_blocks`` the cached frozen views (N, V, C, h, w) whose view 0 is the image itself.
    Each fold holds out ``cfg.val_fraction`` of its training images (seeded) to choose the epoch; the
    test images are seen only once, at the end.
    """
    y = np.asarray(y, np.float32)
    frozen = cfg.trainable_blocks is not None
    out = []
    for number, fold in enumerate(folds):
        t0 = time.perf_counter()
        order = fold["train"][np.random.default_rng([cfg.seed, number]).permutation(len(fold["train"]))]
        n_val = max(3, int(round(cfg.val_fraction * len(order))))
        val, train = np.sort(order[:n_val]), np.sort(order[n_val:])
        if len(train) < 2:
            raise ValueError(f"fold {fold['fold']} has {len(fold['train'])} training images: too few to hold out "
                             f"{n_val} for validation and train on the rest; use fewer folds or more images")
        model, _ = build_model(cfg, device)
        x_val = x[val][:, 0] if frozen else x[val]
        result = fit(model, cfg, x[train], torch.from_numpy(y[train]), x_val, y[val], device)
        model.load_state_dict(result["best_state"])
        test = fold["test"]
        pred = (predict_frozen(model, x[test][:, 0], cfg.trainable_blocks, 256, device) if frozen
                else predict(model, x[test], cfg.input_size, 64, device))
        metrics = complexity_metrics(pred, y[test])
        log.info("%s: trained on %d (+%d val, best epoch %d), test n=%d PLCC %.4f SRCC %.4f (%.0fs)",
                 fold["fold"], len(train), len(val), result["best"]["epoch"], len(test), metrics["plcc"],
                 metrics["srcc"], time.perf_counter() - t0)
        out.append({**fold, "pred": pred, "best_epoch": result["best"]["epoch"], "val": result["best"]["val"],
                    "metrics": metrics})
    return out


def summarise_folds(folds: list[dict], y: np.ndarray, scores: np.ndarray | None = None) -> dict:
    """Return {"per_category": {cat: {"plcc", "srcc", "n", "folds"}}, "mean": {"plcc", "srcc"}}.

    Metrics are computed on each fold's test images and averaged over the folds of a category (one fold per
    category for leave-one-category-out); then averaged over categories, never pooled. With ``scores`` (one
    per image, e.g. a training-free or independently trained scorer) those are evaluated on the same test
    images instead of the folds' own predictions, so every scorer is judged on identical splits.
    """
    y = np.asarray(y, np.float32)
    by_cat: dict[str, list[dict]] = {}
    for fold in folds:
        pred = fold["pred"] if scores is None else np.asarray(scores)[fold["test"]]
        by_cat.setdefault(fold["category"], []).append(complexity_metrics(pred, y[fold["test"]]))
    per = {c: {"plcc": float(np.mean([m["plcc"] for m in ms])), "srcc": float(np.mean([m["srcc"] for m in ms])),
               "n": int(sum(m["n"] for m in ms)), "folds": len(ms)} for c, ms in sorted(by_cat.items())}
    return {"per_category": per, "mean": {k: float(np.mean([v[k] for v in per.values()])) for k in ("plcc", "srcc")}}
