"""Training confidence heads: per early exit, learn from that exit's pooled features how well its embedding serves.

The backbone, the exit heads and the text tower stay frozen; every training image is taken once through every
exit (``confidence.every_exit``), and a small head per early exit is fitted full-batch on the cached features.
What a head predicts (``target``), computed per image i with caption t_i against a gallery of the OTHER training
images at full depth (what an index mostly holds; images with an identical caption are left out of it):

- ``margin`` (default): t_i·v_e(i) − max_j t_i·v_full(j), how far the image's own caption prefers the exit
  embedding over the best other image. Positive: the caption still finds this image first from this exit.
- ``loss``: min(margin at this exit, 0) − min(margin at full depth, 0): what leaving here costs the image's own
  caption, 0 when it finds the image first either way (and for images full depth cannot find either, only the
  further drop). Low where going deeper would rescue the image, which is where depth should be spent.
- ``rank``: 1 when the image's own caption ranks it at this exit at least as high as at full depth, ranks past
  ``RANK_CAP`` counting as one (in a gallery of thousands few images keep an exact deep rank, and past the top 10
  a search shows nothing), else 0; fitted by logistic regression, the confidence is the log-odds.
- ``cosine``: cos(v_e(i), v_full(i)), the exit's agreement with full depth (what ridge maps were tried on first;
  issue #20 measured that routing by it only ties a fixed exit).

Regression heads (margin, cosine) are fitted on the standardised target and then rescaled, so the confidence is
in the target's own units (a threshold 0.02 on margin reads "the own caption wins by at least 0.02"). A share of
the training pairs (``holdout``, by key hash) picks the epoch and measures Pearson/Spearman (regression) or
accuracy (rank) of the heads; `icar calibrate --confidence-heads` then fits the thresholds on a separate sample.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.io import storage
from pipeline.metrics import plcc, srcc
from pipeline.model import encoder as enc
from pipeline.model import models
from pipeline.model.confidence import TARGETS, ConfidenceHeads, every_exit
from pipeline.model.spec import ModelSpec
from pipeline.runtime import resolve_device
from pipeline.training.pairs import PairStats, is_held_out, iter_pairs, take
from pipeline.training.recall import caption_groups

log = logging.getLogger("icar.train_confidence")

HEADS_FILE = "confidence_heads.safetensors"
METRICS_FILE = "confidence_heads.metrics.json"
DEMO_HEADS = Path(__file__).parent.parent / "assets" / "demo" / "exit_heads.safetensors"
RANK_CAP = 10  # target "rank": ranks from here on are all "not found"


@dataclass
class ConfidenceTrainConfig:
    """Everything `icar train-confidence` needs; the CLI's defaults come from here (model defaults from ModelSpec)."""

    inputs: list[str] = field(default_factory=list)  # training image–caption shards (paths, globs or URLs)
    output: str = ""  # output directory: confidence_heads.safetensors + confidence_heads.metrics.json
    model: str = ModelSpec.model  # open_clip model name, "demo", or a model directory
    pretrained: str | None = ModelSpec.pretrained  # open_clip tag, local checkpoint, or "none"
    seed: int = 0  # seed of a random-init model and of the heads' init
    exits: list[int] | None = ModelSpec.exits  # exit depths; None: the exit heads' exits, else the model's default
    heads: str | None = ModelSpec.heads  # exit heads whose embeddings are judged (default: the demo's shipped ones)
    target: str = "margin"  # margin | rank | cosine (module docstring)
    hidden: int = 64  # hidden units of each head (0: a linear map)
    epochs: int = 300  # full-batch steps
    lr: float = 3e-3  # AdamW learning rate
    weight_decay: float = 1e-2  # AdamW weight decay
    holdout: float = 0.1  # share of training pairs (by key hash) that picks the epoch and measures the heads
    max_train: int | None = 8000  # training pairs used at most
    batch_size: int = 64  # images per forward pass while extracting features
    device: str = ModelSpec.device  # auto | cpu | cuda | cuda:N
    image_column: str | None = None  # Parquet column with image bytes (default: auto)
    storage_options: dict = field(default_factory=dict)  # fsspec options for remote paths


def exit_heads_for(model: str, heads: str | None, bundle) -> enc.ExitHeads | None:
    """Return the exit heads `icar embed` runs for ``model`` and ``--heads`` (the demo's shipped ones by default)."""
    if heads is None and model == "demo" and DEMO_HEADS.exists():
        heads = str(DEMO_HEADS)
    return enc.ExitHeads.load(heads, bundle) if heads else None


def model_and_exits(model: str, pretrained: str | None, seed: int, heads: str | None, exits, device: str):
    """Return (bundle, exit heads or None, exits) as `icar embed` would load them: ``--exits`` when given, else the
    heads' own exits, else the tower's default exits."""
    bundle = models.load_clip(model, pretrained, seed=seed, device=device)
    loaded = exit_heads_for(model, heads, bundle)
    chosen = list(exits) if exits else (list(loaded.exits) if loaded is not None
                                        else enc.default_exits(bundle.num_blocks))
    return bundle, loaded, chosen


def confidence_targets(kind: str, embeddings: dict[int, np.ndarray], text: np.ndarray, groups: np.ndarray,
                       chunk: int = 1024) -> dict[int, np.ndarray]:
    """Return {early exit: target (N,)} for ``kind`` (margin | rank | cosine; module docstring).

    ``embeddings``: {exit: (N, D) L2-normalised}, the last exit the full depth; ``text`` (N, D) each image's caption;
    ``groups``: ``caption_groups`` of the captions (identical captions are not each other's competitors).
    """
    if kind not in TARGETS:
        raise ValueError(f"--target {kind!r}: choose one of {', '.join(TARGETS)}")
    exits = sorted(embeddings)
    full = np.asarray(embeddings[exits[-1]], np.float32)
    text = np.asarray(text, np.float32)
    n = full.shape[0]
    if kind == "cosine":
        return {e: (np.asarray(embeddings[e], np.float32) * full).sum(1) for e in exits[:-1]}
    own = {e: (text * np.asarray(embeddings[e], np.float32)).sum(1) for e in exits}
    best_other = np.empty(n, np.float32)
    ranks = {e: np.empty(n, np.int64) for e in exits}
    for s in range(0, n, chunk):
        sim = text[s:s + chunk] @ full.T  # captions × the gallery at full depth
        sim[groups[s:s + chunk, None] == groups[None, :]] = -np.inf  # own image and same-caption images
        best_other[s:s + chunk] = sim.max(1)
        for e in exits:
            ranks[e][s:s + chunk] = (sim > own[e][s:s + chunk, None]).sum(1)
    if kind == "margin":
        return {e: own[e] - best_other for e in exits[:-1]}
    if kind == "loss":
        full_margin = np.minimum(own[exits[-1]] - best_other, 0.0)
        return {e: np.minimum(own[e] - best_other, 0.0) - full_margin for e in exits[:-1]}
    full_rank = np.minimum(ranks[exits[-1]], RANK_CAP)
    return {e: (np.minimum(ranks[e], RANK_CAP) <= full_rank).astype(np.float32) for e in exits[:-1]}


def read_pairs(inputs: list[str], image_size: int, limit: int | None, storage_options: dict,
               image_column: str | None) -> tuple[list[str], np.ndarray, list[str], PairStats]:
    """Return (keys, uint8 pixels (N, S, S, 3), captions, stats) of up to ``limit`` captioned, decodable pairs."""
    stats = PairStats()
    keys, pixels, captions = [], [], []
    for key, px, caption in take(iter_pairs(inputs, image_size, storage_options, image_column, stats), limit):
        keys.append(key)
        pixels.append(px)
        captions.append(caption)
    if len(keys) < 20:
        raise ValueError(f"only {len(keys)} captioned, decodable pairs in {inputs}; confidence heads need at least "
                         "20 (a few thousand to be useful)")
    return keys, np.stack(pixels), captions, stats


def extract(encoder, bundle, pixels: np.ndarray, batch_size: int, device: str
            ) -> tuple[dict[int, torch.Tensor], dict[int, np.ndarray]]:
    """Return ({early exit: pooled features (N, width), float32 on the CPU}, {exit: embeddings (N, D)}) of ``pixels``."""
    feats: dict[int, list] = {}
    embs: dict[int, list] = {}
    with torch.inference_mode():
        for i in range(0, len(pixels), batch_size):
            x = models.pixels_to_tensor(bundle, pixels[i:i + batch_size], device=device)
            f, _, emb = every_exit(encoder, None, x)
            for e, v in f.items():
                feats.setdefault(e, []).append(v.float().cpu())
            for e, v in emb.items():
                embs.setdefault(e, []).append(v.float().cpu().numpy())
    return {e: torch.cat(v) for e, v in feats.items()}, {e: np.concatenate(v) for e, v in embs.items()}


def fit_head(head, x: torch.Tensor, y: np.ndarray, fit_rows: np.ndarray, check_rows: np.ndarray, kind: str,
             epochs: int, lr: float, weight_decay: float) -> dict:
    """Fit one ConfidenceHead full-batch on rows ``fit_rows``; keep the epoch with the lowest loss on ``check_rows``;
    return what it measured there. Regression heads end in the target's own units (module docstring)."""
    y_t = torch.as_tensor(y, dtype=torch.float32)
    regression = kind != "rank"
    mean, std = (float(y[fit_rows].mean()), float(y[fit_rows].std() + 1e-6)) if regression else (0.0, 1.0)
    z = (y_t - mean) / std
    fit, check = torch.as_tensor(fit_rows), torch.as_tensor(check_rows)

    def loss_of(pred, rows):
        return (F.mse_loss(pred, z[rows]) if regression
                else F.binary_cross_entropy_with_logits(pred, z[rows]))

    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    best = (float("inf"), -1, None)
    for epoch in range(epochs):
        head.train()
        opt.zero_grad()
        loss = loss_of(head(x[fit]), fit)
        loss.backward()
        opt.step()
        head.eval()
        with torch.no_grad():
            held = float(loss_of(head(x[check]), check)) if check.numel() else float(loss)
        if held < best[0]:
            best = (held, epoch, {k: v.detach().clone() for k, v in head.state_dict().items()})
    head.load_state_dict(best[2])
    last = head.mlp[-1] if isinstance(head.mlp, torch.nn.Sequential) else head.mlp
    with torch.no_grad():  # back to the target's units: confidence = std · z + mean
        last.weight.mul_(std)
        last.bias.mul_(std).add_(mean)
        pred = head(x[check]).numpy() if check.numel() else head(x[fit]).numpy()
    truth = y[check_rows] if check.numel() else y[fit_rows]
    out = {"best_epoch": best[1], "holdout_loss": best[0], "target_mean": mean, "target_std": std}
    if regression:
        out.update(pearson=plcc(pred, truth), spearman=srcc(pred, truth))
    else:
        out.update(accuracy=float(((pred > 0) == (truth > 0.5)).mean()), positive_share=float(truth.mean()))
    return out


def train_confidence(cfg: ConfidenceTrainConfig) -> dict:
    """Train confidence heads on ``cfg.inputs``, write them and their metrics under ``cfg.output``; return the metrics."""
    if not cfg.output:
        raise ValueError("--output DIR is required (the confidence heads and their metrics are written there)")
    if cfg.target not in TARGETS:
        raise ValueError(f"--target {cfg.target!r}: choose one of {', '.join(TARGETS)}")
    if not 0.0 <= cfg.holdout < 1.0:
        raise ValueError(f"--holdout is a share of the training pairs in [0, 1), got {cfg.holdout}")
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    bundle, heads, exits = model_and_exits(cfg.model, cfg.pretrained, cfg.seed, cfg.heads, cfg.exits, device)
    encoder = enc.AdaptiveEncoder(bundle.model.visual, exits, heads).to(device).eval()
    keys, pixels, captions, stats = read_pairs(cfg.inputs, bundle.image_size, cfg.max_train, cfg.storage_options,
                                               cfg.image_column)
    t_read = time.perf_counter()
    feats, embs = extract(encoder, bundle, pixels, cfg.batch_size, device)
    text = models.encode_text(bundle, captions)
    targets = confidence_targets(cfg.target, embs, text, caption_groups(captions))
    t_extract = time.perf_counter()
    held = np.asarray([is_held_out(k, cfg.holdout) for k in keys])
    fit_rows, check_rows = np.flatnonzero(~held), np.flatnonzero(held)
    conf = ConfidenceHeads.for_encoder(bundle, encoder, hidden=cfg.hidden, target=cfg.target)
    per_exit = {}
    for e in conf.early_exits:
        per_exit[str(e)] = fit_head(conf.heads[str(e)], feats[e], targets[e], fit_rows, check_rows, cfg.target,
                                    cfg.epochs, cfg.lr, cfg.weight_decay)
        log.info("exit %d: %s", e, json.dumps(per_exit[str(e)]))
    t_fit = time.perf_counter()
    metrics = {
        "target": cfg.target,
        "exits": exits,
        "pairs": {"fit": int(fit_rows.size), "holdout": int(check_rows.size)},
        "samples": asdict(stats),
        "holdout": per_exit,
        "seconds": {"read_decode": t_read - t0, "extract": t_extract - t_read, "fit": t_fit - t_extract,
                    "total": t_fit - t0},
        "device": device,
        "config": asdict(cfg),
    }
    conf.metrics = {k: metrics[k] for k in ("target", "pairs", "holdout", "seconds")}
    identity = conf.save(storage.join(cfg.output, HEADS_FILE))
    metrics["confidence_heads"] = identity
    metrics["exit_heads"] = encoder.heads.identity
    metrics["model"] = bundle.identity
    storage.write_json(metrics, storage.join(cfg.output, METRICS_FILE), cfg.storage_options)
    log.info("trained confidence heads (%s) for exits %s in %.1fs: %s", cfg.target, conf.early_exits,
             t_fit - t0, storage.join(cfg.output, HEADS_FILE))
    return metrics
