"""Dual-path training of early-exit heads: each exit learns to embed into the same space as the text tower.

Default recipe (frozen backbone): the image backbone and the text tower stay frozen, only the exit heads
(LayerNorm + projection, initialised from ``ln_post``/``proj``) and one temperature per exit train. Because
nothing upstream of a head changes, everything a head sees is computed ONCE per image: the pooled block
output at each exit (``ExitHead.pool_features``), the full-depth embedding and the caption's text embedding.
The heads then train for many epochs on those cached features, which is fast even on a CPU. Loss per exit:

    contrastive_weight * CLIP contrastive(exit embedding, frozen text embedding)
  + distill_weight     * (1 - cos(exit embedding, full-depth embedding of the same image))

The contrastive term keeps early embeddings answerable by the same text queries; the distillation term keeps
them close to where the full tower puts the image, so early- and full-depth rows mix in one index.

Why frozen is the default: full-depth embeddings stay bit-identical to the public model, so every existing
full-depth index, run and query encoder stays valid, and heads can be retrained or swapped at any time.

``finetune_backbone`` is the paper's recipe (ICAR, ECIR 2026): the vision backbone trains too (lr ~1e-6,
heads 1e-4), with contrastive loss on both paths weighted 0.5 early / 0.5 full (distillation off by default).
It can buy recall at the early exits, but it changes the full-depth embeddings: the result is a NEW model
(new weights hash), its fine-tuned weights are written next to the heads, and every image already embedded
with the public model must be re-embedded before it can share an index with the new one. It also needs the
backbone's forward and backward for every image in every epoch (no feature cache), i.e. a GPU for real data.
The text tower stays frozen in both modes, so text queries are still encoded by the original text tower.

Execution: one process, on CUDA when present (``device="auto"``). Multi-GPU is plain torch DDP under
``torchrun`` and is not wired in here; in the frozen recipe the only heavy step is the one-time feature
extraction, which ``icar embed``-style data sharding would split, and the head training itself takes seconds.

Checkpoints (heads, temperatures, optimizer, scheduler, epoch, history) are written after every epoch;
``resume=True`` continues from the last one. The feature cache is reused when inputs, model and exits match.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from . import storage
from .models import pixels_to_tensor

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
HEADS = "exit_heads.safetensors"
METRICS = "metrics.json"
BACKBONE_DIR = "backbone"  # fine-tuned backbone (finetune_backbone only): a model directory for --model
FEATURES = "features-{split}.safetensors"
FEATURES_VERSION = "1"
KS = (1, 5, 10)


class TrainExitsError(RuntimeError):
    """Training cannot start or go on as configured; the message says why and what to do."""


@dataclass
class ExitTrainConfig:
    """Everything `icar train-exits` needs; see `icar train-exits --help` for the user's view."""

    inputs: list[str]  # training image–caption shards (tar / Parquet / folders; paths, globs, URLs)
    output: str  # output directory (local or URL): heads, metrics, checkpoint, feature cache
    model: str = "demo"  # open_clip model name, "demo", or a model directory
    pretrained: str | None = None  # open_clip tag, checkpoint path, or "none" (seeded random init)
    seed: int = 0  # seed of the random init (pretrained none) and of shuffling
    exits: list[int] | None = None  # exit depths (last = full depth); None: the model's default
    val_inputs: list[str] | None = None  # validation shards; None: hold out val_fraction of inputs by key hash
    val_fraction: float = 0.1  # share of training keys held out for validation when val_inputs is None
    max_train: int | None = None  # use at most this many training pairs (smoke runs)
    max_val: int | None = 2000  # use at most this many validation pairs (recall is computed over all of them)
    epochs: int = 10  # passes over the training pairs
    batch_size: int = 128  # pairs per step (contrastive negatives come from the batch)
    lr: float = 1e-4  # learning rate of heads and temperatures
    backbone_lr: float = 1e-6  # learning rate of the vision backbone (finetune_backbone only)
    weight_decay: float = 0.0  # AdamW weight decay (heads start at the tower's proj; decay would pull them away)
    contrastive_weight: float = 1.0  # weight of the CLIP contrastive loss of each exit
    distill_weight: float | None = None  # weight of 1 - cos(exit, full); None: 1.0 frozen, 0.0 with finetune
    learn_temperature: bool = True  # learn one logit scale per exit (initialised from the model's)
    finetune_backbone: bool = False  # the paper's recipe: backbone trains too (new model; see module doc)
    full_path_weight: float = 0.5  # finetune: weight of the full-depth contrastive loss (early exits share 1 - it)
    device: str = "auto"  # auto | cpu | cuda
    extract_batch_size: int = 64  # images per forward pass while extracting features
    shuffle_buffer: int = 2048  # finetune: pairs held for shuffling while streaming the shards each epoch
    resume: bool = False  # continue from OUTPUT/checkpoint.pt
    image_column: str | None = None  # Parquet image-bytes column; None: auto-detect
    storage_options: dict = field(default_factory=dict)  # fsspec options for inputs and output


# ----------------------------------------------------------------------------------------------- data

@dataclass
class PairStats:
    """What happened to the samples read (per-sample failures are counted and reported, not fatal)."""

    read: int = 0
    used: int = 0
    no_caption: int = 0
    read_errors: int = 0
    decode_errors: int = 0
    failed_shards: list[str] = field(default_factory=list)


def _is_val(key: str, fraction: float) -> bool:
    """Return True when ``key`` falls in the held-out share (a stable hash, the same on every run)."""
    h = int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big")
    return h / 2 ** 64 < fraction


def iter_pairs(inputs: list[str], image_size: int, storage_options: dict | None = None,
               image_column: str | None = None, stats: PairStats | None = None,
               keep=None) -> Iterator[tuple[str, np.ndarray, str]]:
    """Yield (key, pixels uint8 (S, S, 3), caption) for every captioned, decodable sample of ``inputs``.

    ``keep(key) -> bool`` filters by key before decoding. Samples without a caption or that fail to read or
    decode are counted in ``stats`` and skipped; an unreadable shard is counted and the next one is read.
    """
    from .decode import DecodeConfig, DecodeError, decode_image
    from .readers import ShardReadError, expand_inputs, iter_samples

    stats = stats if stats is not None else PairStats()
    cfg = DecodeConfig(image_size=image_size)
    for shard in expand_inputs(inputs, storage_options):
        try:
            for s in iter_samples(shard, storage_options, image_column):
                if keep is not None and not keep(s.key):
                    continue
                stats.read += 1
                if s.data is None:
                    stats.read_errors += 1
                    continue
                if not s.caption or not s.caption.strip():
                    stats.no_caption += 1
                    continue
                try:
                    pixels = decode_image(s.data, cfg).pixels
                except DecodeError as e:
                    stats.decode_errors += 1
                    log.debug("skipping %s in %s: %s", s.key, shard.uri, e)
                    continue
                stats.used += 1
                yield s.key, pixels, s.caption
        except ShardReadError as e:
            stats.failed_shards.append(shard.uri)
            log.warning("training shard %s is unreadable past this point, going on with the next: %s", shard.uri, e)


def _take(pairs: Iterable, limit: int | None) -> Iterator:
    for i, p in enumerate(pairs):
        if limit is not None and i >= limit:
            return
        yield p


def _batches(pairs: Iterable, size: int) -> Iterator[list]:
    batch = []
    for p in pairs:
        batch.append(p)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def caption_groups(captions: list[str]) -> np.ndarray:
    """Return, per pair, the index of its caption among the distinct captions (identical captions share one)."""
    index: dict[str, int] = {}
    return np.asarray([index.setdefault(c.strip(), len(index)) for c in captions], np.int64)


# ----------------------------------------------------------------------------------------------- features

@dataclass
class FeatureSet:
    """Cached inputs of the heads' trainable part, one row per image–caption pair."""

    features: dict[int, torch.Tensor]  # early exit -> pooled block output (N, width), float32
    full: torch.Tensor  # full-depth embedding (N, D), L2-normalised
    text: torch.Tensor  # caption embedding (N, D), L2-normalised (frozen text tower)
    groups: torch.Tensor  # (N,) int64: caption group (identical captions share one), for fair recall

    def __len__(self) -> int:
        return int(self.full.shape[0])


@torch.inference_mode()
def extract_features(encoder, bundle, pairs: Iterable[tuple[str, np.ndarray, str]], batch_size: int = 64,
                     device: str = "cpu") -> FeatureSet:
    """Return the FeatureSet of ``pairs`` (key, pixels, caption): one frozen forward per image, one per caption."""
    feats: dict[int, list[torch.Tensor]] = {e: [] for e in encoder.exits[:-1]}
    full, text, captions = [], [], []
    t0, n = time.perf_counter(), 0
    for batch in _batches(pairs, batch_size):
        pixels = np.stack([p for _, p, _ in batch])
        caps = [c for _, _, c in batch]
        f, emb = encoder.exit_features(pixels_to_tensor(bundle, pixels, device=device))
        for e, v in f.items():
            feats[e].append(v.float().cpu())
        full.append(emb.cpu())
        tokens = bundle.tokenizer(caps).to(device)
        text.append(F.normalize(bundle.model.encode_text(tokens).float(), dim=-1).cpu())
        captions.extend(caps)
        n += len(batch)
        if n % (batch_size * 20) < len(batch):
            log.info("features of %d pairs (%.1f pairs/s)", n, n / (time.perf_counter() - t0))
    if n == 0:
        raise TrainExitsError("no usable image–caption pairs: every sample lacked a caption or failed to decode "
                              "(see the counts above); train-exits needs captioned images")
    return FeatureSet({e: torch.cat(v) for e, v in feats.items()}, torch.cat(full), torch.cat(text),
                      torch.from_numpy(caption_groups(captions)))


def _features_to_bytes(fs: FeatureSet, meta: dict) -> bytes:
    from safetensors.torch import save

    tensors = {f"feat.{e}": v.contiguous() for e, v in fs.features.items()}
    tensors.update(full=fs.full.contiguous(), text=fs.text.contiguous(), groups=fs.groups.contiguous())
    return save(tensors, metadata={k: json.dumps(v) for k, v in meta.items()})


def _features_from_bytes(data: bytes) -> tuple[FeatureSet, dict]:
    from safetensors.torch import load

    from .encoder import _safetensors_metadata

    meta = {k: json.loads(v) for k, v in _safetensors_metadata(data).items()}
    t = load(data)
    feats = {int(k.split(".", 1)[1]): v for k, v in t.items() if k.startswith("feat.")}
    return FeatureSet(feats, t["full"], t["text"], t["groups"]), meta


# ----------------------------------------------------------------------------------------------- evaluation

def _recall_table(text: np.ndarray, images: np.ndarray, groups: np.ndarray) -> dict:
    """Return {"t2i": {k: r}, "i2t": {k: r}}; identical captions form one query whose hits are all their images."""
    from .metrics import recall_at_k

    n_groups = int(groups.max()) + 1
    first = np.full(n_groups, -1, np.int64)
    for i, g in enumerate(groups):
        if first[g] < 0:
            first[g] = i
    queries = text[first]  # one text embedding per distinct caption
    images_of = [[] for _ in range(n_groups)]
    for i, g in enumerate(groups):
        images_of[g].append(i)
    sim = queries @ images.T
    return {"t2i": recall_at_k(sim, images_of, KS), "i2t": recall_at_k(sim.T, groups, KS)}


def evaluate_embeddings(per_exit: dict[int, torch.Tensor], full: torch.Tensor, text: torch.Tensor,
                        groups: torch.Tensor) -> dict:
    """Return {exit: {"t2i": {k: r}, "i2t": {k: r}, "cos_to_full": mean cosine}} for normalised embeddings."""
    out = {}
    t, g = text.float().numpy(), groups.numpy()
    for e, emb in sorted(per_exit.items()):
        emb = emb.float()
        row = _recall_table(t, emb.numpy(), g)
        row["cos_to_full"] = float((emb * full.float()).sum(dim=1).mean())
        out[int(e)] = row
    return out


@torch.no_grad()
def evaluate_features(heads, fs: FeatureSet, num_blocks: int) -> dict:
    """Return per-exit recall and cosine to full depth of ``heads`` on cached features (full depth included)."""
    per_exit = {e: F.normalize(heads.head(e).from_features(fs.features[e].to(_device_of(heads))).float().cpu(), dim=-1)
                for e in heads.early_exits}
    per_exit[num_blocks] = fs.full
    return evaluate_embeddings(per_exit, fs.full, fs.text, fs.groups)


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def format_table(before: dict, after: dict | None = None) -> str:
    """Return a text table of per-exit metrics (before → after when both are given)."""
    cols = [("cos→full", lambda r: r["cos_to_full"])]
    for d in ("t2i", "i2t"):
        for k in KS:
            cols.append((f"{d} R@{k}", lambda r, d=d, k=k: r[d][k]))
    width = 15 if after is not None else 8
    lines = ["exit  " + "  ".join(f"{name:>{width}}" for name, _ in cols)]
    for e in sorted(before):
        cells = []
        for _, get in cols:
            b = get(before[e])
            cells.append(f"{b:.3f} → {get(after[e]):.3f}" if after is not None else f"{b:.3f}")
        lines.append(f"{e:>4}  " + "  ".join(f"{c:>{width}}" for c in cells))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- training

class HeadTrainer(torch.nn.Module):
    """The trainable state: exit heads, one log logit-scale per exit (and for full depth when fine-tuning)."""

    def __init__(self, heads, init_logit_scale: float, learn_temperature: bool, full_depth: int):
        super().__init__()
        self.heads = heads
        init = min(float(init_logit_scale), math.log(100.0))
        self.log_scales = torch.nn.ParameterDict({
            str(e): torch.nn.Parameter(torch.tensor(init), requires_grad=learn_temperature)
            for e in heads.early_exits + [full_depth]})

    def scale(self, depth: int) -> torch.Tensor:
        """Return exp(log scale) for ``depth``, clamped at 100 as CLIP does."""
        return self.log_scales[str(depth)].clamp(max=math.log(100.0)).exp()


def _clip_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Return the symmetric CLIP contrastive loss of matched rows (open_clip's ClipLoss, single process)."""
    from open_clip.loss import ClipLoss

    return ClipLoss()(image, text, scale)


def exit_losses(trainer: HeadTrainer, feats: dict[int, torch.Tensor], full: torch.Tensor, text: torch.Tensor,
                contrastive_weight: float, distill_weight: float) -> tuple[torch.Tensor, dict[int, float]]:
    """Return (mean loss over exits, {exit: its loss}) for one batch of cached features (frozen recipe)."""
    total, parts = 0.0, {}
    for e, f in feats.items():
        emb = F.normalize(trainer.heads.head(e).from_features(f), dim=-1)
        loss = contrastive_weight * _clip_loss(emb, text, trainer.scale(e))
        if distill_weight:
            loss = loss + distill_weight * (1 - (emb * full).sum(dim=1)).mean()
        parts[e] = float(loss.detach())
        total = total + loss
    return total / max(1, len(feats)), parts


def _resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TrainExitsError(f"--device {device} was asked for but torch sees no CUDA device; use --device cpu")
    return device


def _write(url: str, data: bytes, cfg: ExitTrainConfig) -> None:
    storage.atomic_write_bytes(url, data, cfg.storage_options)


def _read_or_none(url: str, cfg: ExitTrainConfig) -> bytes | None:
    fs, path = storage.filesystem(url, cfg.storage_options)
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as f:
        return f.read()


def _fingerprint(urls: list[str] | None, cfg: ExitTrainConfig) -> list:
    """Return what identifies the input shards (uri, size, mtime, etag), to validate the feature cache."""
    from .readers import expand_inputs

    if not urls:
        return []
    return [[s.uri, s.size, s.mtime, s.etag] for s in expand_inputs(urls, cfg.storage_options)]


class ExitTrainer:
    """Runs one `icar train-exits` job: load, extract (or stream), evaluate, train, evaluate, write."""

    def __init__(self, cfg: ExitTrainConfig, train_pairs=None, val_pairs=None):
        """``train_pairs``/``val_pairs``: optional re-iterable sources of (key, pixels, caption) instead of the
        shards named by cfg (tests, notebooks); callables returning a fresh iterator each time."""
        from . import encoder as enc
        from .models import load_clip, model_key

        if cfg.finetune_backbone and cfg.distill_weight is None:
            cfg = dataclasses.replace(cfg, distill_weight=0.0)
        elif cfg.distill_weight is None:
            cfg = dataclasses.replace(cfg, distill_weight=1.0)
        if cfg.epochs < 0 or cfg.batch_size < 2:
            raise TrainExitsError(f"need epochs >= 0 and batch_size >= 2 (contrastive needs negatives), got "
                                  f"epochs={cfg.epochs} batch_size={cfg.batch_size}")
        if not 0.0 <= cfg.val_fraction < 1.0:
            raise TrainExitsError(f"val_fraction must be in [0, 1), got {cfg.val_fraction}")
        self.cfg = cfg
        self.device = _resolve_device(cfg.device)
        self.bundle = load_clip(cfg.model, cfg.pretrained, seed=cfg.seed, device=self.device)
        self.exits = enc.validate_exits(cfg.exits or enc.default_exits(self.bundle.num_blocks), self.bundle.num_blocks)
        if len(self.exits) < 2:
            raise TrainExitsError(f"exits {self.exits} has no early exit to train; e.g. --exits "
                                  f"{','.join(map(str, enc.default_exits(self.bundle.num_blocks)))}")
        self.key = model_key(self.bundle.identity)
        self.heads = enc.ExitHeads.for_bundle(self.bundle, self.exits).to(self.device)
        self.encoder = enc.AdaptiveEncoder(self.bundle.model.visual, self.exits, self.heads).eval()
        scale = float(getattr(self.bundle.model, "logit_scale", torch.tensor(math.log(1 / 0.07))).detach().cpu())
        self.trainer = HeadTrainer(self.heads, scale, cfg.learn_temperature, self.bundle.num_blocks).to(self.device)
        self._train_pairs, self._val_pairs = train_pairs, val_pairs
        self.stats = {"train": PairStats(), "val": PairStats()}

    # --- data sources
    def _source(self, split: str) -> Iterator[tuple[str, np.ndarray, str]]:
        cfg = self.cfg
        given = self._train_pairs if split == "train" else self._val_pairs
        limit = cfg.max_train if split == "train" else cfg.max_val
        if given is not None:
            return _take(given(), limit)
        if split == "val" and cfg.val_inputs:
            urls, keep = cfg.val_inputs, None
        else:
            urls = cfg.inputs
            if cfg.val_inputs or cfg.val_fraction == 0:
                keep = None
            else:
                keep = (lambda k: _is_val(k, cfg.val_fraction)) if split == "val" \
                    else (lambda k: not _is_val(k, cfg.val_fraction))
        if split == "val" and not cfg.val_inputs and cfg.val_fraction == 0:
            raise TrainExitsError("no validation data: give --val inputs or a --val-fraction above 0")
        stats = self.stats[split]
        return _take(iter_pairs(urls, self.bundle.image_size, cfg.storage_options, cfg.image_column, stats, keep),
                     limit)

    def _features(self, split: str) -> FeatureSet:
        """Return the split's features, from OUTPUT's cache when inputs, model and exits match."""
        cfg = self.cfg
        url = storage.join(cfg.output, FEATURES.format(split=split))
        given = self._train_pairs if split == "train" else self._val_pairs
        meta = {"version": FEATURES_VERSION, "model_key": self.key, "exits": self.exits,
                "inputs": None if given is not None else _fingerprint(
                    cfg.val_inputs if split == "val" and cfg.val_inputs else cfg.inputs, cfg),
                "val_fraction": cfg.val_fraction if not cfg.val_inputs else None,
                "limit": cfg.max_train if split == "train" else cfg.max_val}
        if given is None:
            meta = json.loads(json.dumps(meta))  # compare as it reads back
            data = _read_or_none(url, cfg)
            if data is not None:
                fs, cached_meta = _features_from_bytes(data)
                cached_stats = cached_meta.pop("stats", None)
                if cached_meta == meta:
                    log.info("%s features: %d pairs from the cache %s", split, len(fs), url)
                    if cached_stats:
                        self.stats[split] = PairStats(**cached_stats)
                    return fs
                log.info("feature cache %s was made for other inputs/model/exits; extracting again", url)
        t0 = time.perf_counter()
        fs = extract_features(self.encoder, self.bundle, self._source(split), cfg.extract_batch_size, self.device)
        log.info("%s features: %d pairs in %.1fs", split, len(fs), time.perf_counter() - t0)
        if given is None:
            _write(url, _features_to_bytes(fs, {**meta, "stats": dataclasses.asdict(self.stats[split])}), cfg)
        return fs

    # --- checkpoints
    def _checkpoint_url(self) -> str:
        return storage.join(self.cfg.output, CHECKPOINT)

    def _save_checkpoint(self, epoch: int, opt, sched, history: list) -> None:
        state = {"epoch": epoch, "model_key": self.key, "exits": self.exits,
                 "trainer": {k: v.detach().cpu() for k, v in self.trainer.state_dict().items()},
                 "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "history": history,
                 "finetune_backbone": self.cfg.finetune_backbone}
        if self.cfg.finetune_backbone:
            state["visual"] = {k: v.detach().cpu() for k, v in self.bundle.model.visual.state_dict().items()}
        buf = io.BytesIO()
        torch.save(state, buf)
        _write(self._checkpoint_url(), buf.getvalue(), self.cfg)

    def _load_checkpoint(self, opt, sched) -> tuple[int, list]:
        """Return (next epoch, history) after restoring a checkpoint, or (0, []) when starting afresh."""
        data = _read_or_none(self._checkpoint_url(), self.cfg)
        if data is None:
            if self.cfg.resume:
                log.info("--resume: no checkpoint in %s yet, starting from epoch 0", self.cfg.output)
            return 0, []
        if not self.cfg.resume:
            raise TrainExitsError(f"{self._checkpoint_url()} exists from an earlier run: pass --resume to continue "
                                  f"it, or choose another --output")
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        if state["model_key"] != self.key or state["exits"] != self.exits \
                or state["finetune_backbone"] != self.cfg.finetune_backbone:
            raise TrainExitsError(
                f"checkpoint in {self.cfg.output} is for model {state['model_key']} exits {state['exits']} "
                f"finetune={state['finetune_backbone']}, not {self.key} exits {self.exits} "
                f"finetune={self.cfg.finetune_backbone}; resume with the same options or use another --output")
        self.trainer.load_state_dict(state["trainer"])
        if "visual" in state:
            self.bundle.model.visual.load_state_dict(state["visual"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        log.info("resumed from %s after epoch %d", self._checkpoint_url(), state["epoch"] + 1)
        return state["epoch"] + 1, state["history"]

    # --- the job
    def run(self) -> dict:
        """Train, write heads + metrics (+ backbone when fine-tuning) to OUTPUT; return the metrics document."""
        if self.cfg.finetune_backbone:
            return self._run_finetune()
        return self._run_frozen()

    def _optimizer(self, steps_per_epoch: int | None, extra_groups: list | None = None):
        """Return (AdamW, schedule): cosine decay over all steps when they are known, else a constant rate."""
        cfg = self.cfg
        params = [p for p in self.trainer.parameters() if p.requires_grad]
        groups = [{"params": params, "lr": cfg.lr}] + (extra_groups or [])
        opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
        if steps_per_epoch is None:
            return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, cfg.epochs * steps_per_epoch))
        return opt, sched

    def _run_frozen(self) -> dict:
        cfg = self.cfg
        t_start = time.perf_counter()
        train, val = self._features("train"), self._features("val")
        if len(train) < 2:
            raise TrainExitsError(f"only {len(train)} training pair(s): contrastive training needs a batch of >= 2")
        before = evaluate_features(self.heads, val, self.bundle.num_blocks)
        steps = math.ceil(len(train) / cfg.batch_size)
        opt, sched = self._optimizer(steps)
        start, history = self._load_checkpoint(opt, sched)
        dev = self.device
        full, text = train.full.to(dev), train.text.to(dev)
        feats = {e: v.to(dev) for e, v in train.features.items()}
        for epoch in range(start, cfg.epochs):
            t0 = time.perf_counter()
            self.trainer.train()
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))
            sums, n_steps = {e: 0.0 for e in feats}, 0
            for s in range(0, len(train), cfg.batch_size):
                idx = order[s:s + cfg.batch_size].to(dev)
                if idx.numel() < 2:
                    continue
                loss, parts = exit_losses(self.trainer, {e: v[idx] for e, v in feats.items()}, full[idx], text[idx],
                                          cfg.contrastive_weight, cfg.distill_weight)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                for e, v in parts.items():
                    sums[e] += v
                n_steps += 1
            self.trainer.eval()
            val_metrics = evaluate_features(self.heads, val, self.bundle.num_blocks)
            entry = {"epoch": epoch, "seconds": time.perf_counter() - t0,
                     "train_loss": {str(e): v / max(1, n_steps) for e, v in sums.items()},
                     "val": {str(e): _summary(m) for e, m in val_metrics.items()}}
            history.append(entry)
            log.info("epoch %d/%d: loss %s; val t2i R@1 %s (%.1fs)", epoch + 1, cfg.epochs,
                     {e: round(v, 4) for e, v in entry["train_loss"].items()},
                     {e: round(m["t2i@1"], 3) for e, m in entry["val"].items()}, entry["seconds"])
            self._save_checkpoint(epoch, opt, sched, history)
        after = evaluate_features(self.heads, val, self.bundle.num_blocks)
        return self._finish(before, after, history, len(train), len(val), time.perf_counter() - t_start)

    def _run_finetune(self) -> dict:
        """The paper's recipe: backbone + heads train on streamed pixels; 0.5/0.5 contrastive on both paths."""
        cfg = self.cfg
        t_start = time.perf_counter()
        val_pairs = list(self._source("val"))
        if not val_pairs:
            raise TrainExitsError("no validation pairs: give --val inputs or a --val-fraction above 0")
        val_pixels = np.stack([p for _, p, _ in val_pairs])
        val_text, val_groups = self._text([c for _, _, c in val_pairs]), \
            torch.from_numpy(caption_groups([c for _, _, c in val_pairs]))
        del val_pairs
        before = self._evaluate_pixels(val_pixels, val_text, val_groups)
        visual = self.bundle.model.visual
        backbone = [p for p in visual.parameters()]
        for p in backbone:
            p.requires_grad_(True)
        # Streaming: the number of pairs is only known after a pass, so the rates stay constant (as in the paper).
        opt, sched = self._optimizer(None, [{"params": backbone, "lr": cfg.backbone_lr}])
        n_train = 0
        start, history = self._load_checkpoint(opt, sched)
        rng = np.random.default_rng(cfg.seed)
        full_depth = self.bundle.num_blocks
        w_full = cfg.full_path_weight
        for epoch in range(start, cfg.epochs):
            t0 = time.perf_counter()
            self.encoder.train()
            n_steps, loss_sum, n_train = 0, 0.0, 0
            for batch in _batches(_shuffled(self._source("train"), cfg.shuffle_buffer, rng), cfg.batch_size):
                if len(batch) < 2:
                    continue
                x = pixels_to_tensor(self.bundle, np.stack([p for _, p, _ in batch]), device=self.device)
                text = self._text([c for _, _, c in batch]).to(self.device)
                per_exit = self._all_exits_train(x)
                full = per_exit[full_depth]
                early = [e for e in self.exits if e != full_depth]
                loss_full = _clip_loss(full, text, self.trainer.scale(full_depth))
                loss_early = sum(_clip_loss(per_exit[e], text, self.trainer.scale(e)) for e in early) / len(early)
                loss = cfg.contrastive_weight * ((1 - w_full) * loss_early + w_full * loss_full)
                if cfg.distill_weight:
                    target = full.detach()
                    loss = loss + cfg.distill_weight * sum(
                        (1 - (per_exit[e] * target).sum(dim=1)).mean() for e in early) / len(early)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                loss_sum += float(loss.detach())
                n_steps += 1
                n_train += len(batch)
            self.encoder.eval()
            val_metrics = self._evaluate_pixels(val_pixels, val_text, val_groups)
            entry = {"epoch": epoch, "seconds": time.perf_counter() - t0, "train_loss": loss_sum / max(1, n_steps),
                     "val": {str(e): _summary(m) for e, m in val_metrics.items()}}
            history.append(entry)
            log.info("epoch %d/%d: loss %.4f; val t2i R@1 %s (%.1fs)", epoch + 1, cfg.epochs, entry["train_loss"],
                     {e: round(m["t2i@1"], 3) for e, m in entry["val"].items()}, entry["seconds"])
            self._save_checkpoint(epoch, opt, sched, history)
        for p in backbone:
            p.requires_grad_(False)
        after = self._evaluate_pixels(val_pixels, val_text, val_groups)
        return self._finish(before, after, history, n_train, len(val_pixels), time.perf_counter() - t_start)

    def _all_exits_train(self, pixels: torch.Tensor) -> dict[int, torch.Tensor]:
        """Return {exit: normalised embeddings} with grad, every image through every exit (dual path)."""
        return self.encoder.forward_all_exits(pixels)

    @torch.no_grad()
    def _text(self, captions: list[str]) -> torch.Tensor:
        tokens = self.bundle.tokenizer(captions).to(self.device)
        return F.normalize(self.bundle.model.encode_text(tokens).float(), dim=-1).cpu()

    @torch.no_grad()
    def _evaluate_pixels(self, pixels: np.ndarray, text: torch.Tensor, groups: torch.Tensor) -> dict:
        outs: dict[int, list] = {e: [] for e in self.exits}
        for s in range(0, len(pixels), self.cfg.extract_batch_size):
            x = pixels_to_tensor(self.bundle, pixels[s:s + self.cfg.extract_batch_size], device=self.device)
            for e, v in self.encoder.forward_all_exits(x).items():
                outs[e].append(v.cpu())
        per_exit = {e: torch.cat(v) for e, v in outs.items()}
        return evaluate_embeddings(per_exit, per_exit[self.bundle.num_blocks], text, groups)

    def _finish(self, before: dict, after: dict, history: list, n_train: int, n_val: int, seconds: float) -> dict:
        """Write heads (+ fine-tuned backbone), metrics.json; print the before/after table; return the metrics."""
        cfg = self.cfg
        identity = self.bundle.identity
        if cfg.finetune_backbone:
            identity = self._write_backbone()
            from .models import model_key

            self.heads.backbone = model_key(identity)
        heads_url = storage.join(cfg.output, HEADS)
        self.heads.to("cpu")
        heads_identity = self.heads.save(heads_url, {"trained_by": "icar train-exits", "epochs": cfg.epochs,
                                                    "finetune_backbone": cfg.finetune_backbone})
        doc = {
            "model": identity,
            "heads": heads_identity,
            "exits": self.exits,
            "recipe": "finetune_backbone (paper: 0.5/0.5 contrastive on both paths)" if cfg.finetune_backbone
            else "frozen backbone and text tower; heads only (contrastive + distillation)",
            "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "storage_options"},
            "pairs": {"train": n_train, "val": n_val},
            "samples": {k: dataclasses.asdict(v) for k, v in self.stats.items()},
            "before": {str(e): m for e, m in before.items()},
            "after": {str(e): m for e, m in after.items()},
            "history": history,
            "seconds": seconds,
            "logit_scales": {k: float(v.detach().exp()) for k, v in self.trainer.log_scales.items()},
        }
        _write(storage.join(cfg.output, METRICS), json.dumps(_jsonable(doc), indent=1).encode(), cfg)
        print(f"exit heads: {heads_url}\nvalidation ({n_val} pairs; before → after training):")
        print(format_table(before, after))
        return doc

    def _write_backbone(self) -> dict:
        """Write the fine-tuned CLIP as a model directory under OUTPUT; return its identity (a new model key)."""
        from safetensors.torch import save

        from .models import DEMO_CONFIG, DEMO_WEIGHTS, weights_sha256

        model, bundle = self.bundle.model, self.bundle
        directory = storage.join(self.cfg.output, BACKBONE_DIR)
        if "://" not in directory:
            directory = os.path.abspath(directory)
        state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
        source = bundle.config_doc or {}
        doc = {"model_name": f"{source.get('model_name') or bundle.identity['name']}-icar-finetuned",
               "model_cfg": _model_cfg_of(bundle),
               "preprocess_cfg": {**source.get("preprocess_cfg", {}), "mean": list(bundle.mean),
                                  "std": list(bundle.std)},
               "finetuned_from": self.key}
        tokenizer = source.get("tokenizer")
        if tokenizer:  # e.g. the demo's cut-down BPE file: copy it next to the new weights
            doc["tokenizer"] = tokenizer
            rel = tokenizer.get("bpe_path") or tokenizer.get("name")
            if rel and not os.path.isabs(rel) and bundle.source_dir \
                    and os.path.isfile(os.path.join(bundle.source_dir, rel)):
                with open(os.path.join(bundle.source_dir, rel), "rb") as f:
                    _write(storage.join(directory, rel), f.read(), self.cfg)
        _write(storage.join(directory, DEMO_WEIGHTS), save(state), self.cfg)
        _write(storage.join(directory, DEMO_CONFIG), json.dumps(doc, indent=1).encode(), self.cfg)
        identity = {"name": doc["model_name"], "pretrained": directory, "weights_sha256": weights_sha256(model),
                    "embed_dim": bundle.embed_dim, "image_size": bundle.image_size, "num_blocks": bundle.num_blocks,
                    "finetuned_from": self.key}
        log.warning("fine-tuned backbone written to %s: it is a NEW model (%s…); embed with --model %s and "
                    "re-embed anything made with the original before indexing them together", directory,
                    identity["weights_sha256"][:16], directory)
        return identity


def _model_cfg_of(bundle) -> dict:
    """Return the open_clip model cfg dict of ``bundle``'s architecture."""
    import open_clip

    if bundle.config_doc:
        return bundle.config_doc["model_cfg"]
    if "model_cfg" in bundle.identity:
        return bundle.identity["model_cfg"]
    cfg = open_clip.get_model_config(bundle.identity["name"])
    if cfg is None:
        raise TrainExitsError(f"cannot find the open_clip config of {bundle.identity['name']} to save the backbone")
    return cfg


def _shuffled(pairs: Iterable, buffer: int, rng: np.random.Generator) -> Iterator:
    """Yield ``pairs`` in a streaming shuffle order (a reservoir of ``buffer`` items)."""
    pool = []
    for p in pairs:
        pool.append(p)
        if len(pool) >= buffer:
            i = int(rng.integers(len(pool)))
            pool[i], pool[-1] = pool[-1], pool[i]
            yield pool.pop()
    rng.shuffle(pool)
    yield from pool


def _summary(m: dict) -> dict:
    return {"t2i@1": m["t2i"][1], "t2i@5": m["t2i"][5], "i2t@1": m["i2t"][1], "cos_to_full": m["cos_to_full"]}


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    return x


def train_exits(cfg: ExitTrainConfig) -> dict:
    """Return the metrics document of a train-exits run (heads and metrics written under cfg.output)."""
    return ExitTrainer(cfg).run()
