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

Execution: one process on CUDA when present (``device="auto"``), or data-parallel over N processes with plain
torch DDP (pipeline/training/distributed.py; ``nccl`` on CUDA, one GPU per process, ``gloo`` on CPU), started by
``torchrun --nproc-per-node N -m jobs.train_exits ...`` or by ``workers=N`` (``--workers N``: N local processes).
The result does not depend on N: ``batch_size`` is the GLOBAL batch, every process walks the same shuffled
stream and takes a contiguous slice of each global batch, and the contrastive loss gathers the image embeddings
of all processes with their gradient (as open_clip's ``gather_with_grad``), so each step's loss and update are
the single-process ones up to float rounding, and a checkpoint resumes under any N. Every process reads the
input stream (cheap: tar/Parquet parsing) but decodes and encodes only its share: in the frozen recipe the
one-time feature extraction is split N ways and the features gathered; in the fine-tune recipe each process
decodes and runs the backbone on its slice of every batch. Rank 0 alone writes (checkpoints, feature cache,
heads, metrics, backbone) and logs progress.

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

from pipeline.training import distributed
from pipeline.io import storage
from pipeline.logs import timed_phase
from pipeline.training.distributed import Dist
from pipeline.model.spec import merge_spec, parse_merge
from pipeline.model.models import pixels_to_tensor
from pipeline.runtime import resolve_device

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
HEADS = "exit_heads.safetensors"
METRICS = "metrics.json"
BACKBONE_DIR = "backbone"  # fine-tuned backbone (finetune_backbone only): a model directory for --model
FEATURES = "features-{split}.safetensors"
FEATURES_VERSION = "1"
KS = (1, 5, 10)
NO_PAIRS = ("no usable image–caption pairs: every sample lacked a caption or failed to decode (see the counts "
            "above); train-exits needs captioned images")


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
    max_train: int | None = None  # use at most this many training pairs (smoke runs; fine-tune: of those read)
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
    merge: str | None = None  # token-merging schedule the heads will serve under (pipeline.model.merging spec, e.g. keep0.8)
    full_path_weight: float = 0.5  # finetune: weight of the full-depth contrastive loss (early exits share 1 - it)
    device: str = "auto"  # auto | cpu | cuda
    workers: int = 1  # data-parallel processes to start on this machine (one GPU each on CUDA); or use torchrun
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


def iter_raw_pairs(inputs: list[str], storage_options: dict | None = None, image_column: str | None = None,
                   stats: PairStats | None = None, keep=None) -> Iterator[tuple[str, bytes, str]]:
    """Yield (key, encoded image bytes, caption) for every readable, captioned sample of ``inputs`` (not decoded).

    ``keep(key) -> bool`` filters by key. Samples without a caption or whose bytes cannot be read are counted in
    ``stats`` and skipped; an unreadable shard is counted and the next one is read.
    """
    from pipeline.io.readers import ShardReadError, expand_inputs, iter_samples

    stats = stats if stats is not None else PairStats()
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
                yield s.key, s.data, s.caption
        except ShardReadError as e:
            stats.failed_shards.append(shard.uri)
            log.warning("training shard %s is unreadable past this point, going on with the next: %s", shard.uri, e)


def decode_pixels(key: str, payload, image_size: int, stats: PairStats) -> np.ndarray | None:
    """Return uint8 pixels (S, S, 3) of an encoded image (or of pixels given as such), None when it fails to decode."""
    from pipeline.io.decode import DecodeConfig, DecodeError, decode_image

    if isinstance(payload, np.ndarray):
        stats.used += 1
        return payload
    try:
        pixels = decode_image(payload, DecodeConfig(image_size=image_size)).pixels
    except DecodeError as e:
        stats.decode_errors += 1
        log.debug("skipping %s: %s", key, e)
        return None
    stats.used += 1
    return pixels


def iter_pairs(inputs: list[str], image_size: int, storage_options: dict | None = None,
               image_column: str | None = None, stats: PairStats | None = None,
               keep=None) -> Iterator[tuple[str, np.ndarray, str]]:
    """Yield (key, pixels uint8 (S, S, 3), caption) for every captioned, decodable sample of ``inputs``.

    ``keep(key) -> bool`` filters by key before decoding. Samples without a caption or that fail to read or
    decode are counted in ``stats`` and skipped; an unreadable shard is counted and the next one is read.
    """
    stats = stats if stats is not None else PairStats()
    for key, data, caption in iter_raw_pairs(inputs, storage_options, image_column, stats, keep):
        pixels = decode_pixels(key, data, image_size, stats)
        if pixels is not None:
            yield key, pixels, caption


def merge_stats(parts: list[dict]) -> PairStats:
    """Return the PairStats of a split read by several processes: each read the stream, each decoded its share.

    With a limit (--max-train/--max-val) the processes may read past the point where one process would have
    stopped; the reading counts then include those samples.
    """
    furthest = max(parts, key=lambda p: p["read"])  # reading counts: every process saw the same stream
    return PairStats(read=furthest["read"], used=sum(p["used"] for p in parts), no_caption=furthest["no_caption"],
                     read_errors=furthest["read_errors"], decode_errors=sum(p["decode_errors"] for p in parts),
                     failed_shards=list(furthest["failed_shards"]))


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
                     device: str = "cpu", allow_empty: bool = False, merge=None) -> FeatureSet:
    """Return the FeatureSet of ``pairs`` (key, pixels, caption): one frozen forward per image, one per caption.

    ``allow_empty``: return empty tensors for no pairs (one process's share may be empty) instead of raising.
    ``merge``: token-merging schedule (pipeline.model.merging) the early-exit features are taken under; the full-depth
    target stays unmerged, where the index's full-depth rows are.
    """
    feats: dict[int, list[torch.Tensor]] = {e: [] for e in encoder.exits[:-1]}
    full, text, captions = [], [], []
    t0, n = time.perf_counter(), 0
    for batch in _batches(pairs, batch_size):
        pixels = np.stack([p for _, p, _ in batch])
        caps = [c for _, _, c in batch]
        x = pixels_to_tensor(bundle, pixels, device=device)
        f, emb = encoder.exit_features(x, merge)
        if merge is not None:
            emb = encoder.exit_features(x)[1]
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
        if not allow_empty:
            raise TrainExitsError(NO_PAIRS)
        width, dim = encoder.visual.transformer.width, encoder.visual.output_dim
        return FeatureSet({e: torch.zeros(0, width) for e in feats}, torch.zeros(0, dim), torch.zeros(0, dim),
                          torch.zeros(0, dtype=torch.int64))
    return FeatureSet({e: torch.cat(v) for e, v in feats.items()}, torch.cat(full), torch.cat(text),
                      torch.from_numpy(caption_groups(captions)))


def _features_to_bytes(fs: FeatureSet, meta: dict) -> bytes:
    from safetensors.torch import save

    tensors = {f"feat.{e}": v.contiguous() for e, v in fs.features.items()}
    tensors.update(full=fs.full.contiguous(), text=fs.text.contiguous(), groups=fs.groups.contiguous())
    return save(tensors, metadata={k: json.dumps(v) for k, v in meta.items()})


def _features_from_bytes(data: bytes) -> tuple[FeatureSet, dict]:
    from safetensors.torch import load

    meta = {k: json.loads(v) for k, v in storage.safetensors_metadata(data).items()}
    t = load(data)
    # By depth: safetensors' dict order can differ between processes, and the collectives of a data-parallel
    # run must come in the same order in every process.
    feats = dict(sorted((int(k.split(".", 1)[1]), v) for k, v in t.items() if k.startswith("feat.")))
    return FeatureSet(feats, t["full"], t["text"], t["groups"]), meta


# ----------------------------------------------------------------------------------------------- evaluation

def caption_queries(groups: np.ndarray) -> tuple[np.ndarray, list[list[int]]]:
    """Return (first pair of each caption group: its query, [the pairs (images) of each group: its hits])."""
    n_groups = int(groups.max()) + 1
    first = np.full(n_groups, -1, np.int64)
    images_of: list[list[int]] = [[] for _ in range(n_groups)]
    for i, g in enumerate(groups):
        if first[g] < 0:
            first[g] = i
        images_of[g].append(i)
    return first, images_of


def _recall_table(text: np.ndarray, images: np.ndarray, groups: np.ndarray) -> dict:
    """Return {"t2i": {k: r}, "i2t": {k: r}}; identical captions form one query whose hits are all their images."""
    from pipeline.metrics import recall_at_k

    first, images_of = caption_queries(groups)
    sim = text[first] @ images.T  # one text embedding per distinct caption
    return {"t2i": recall_at_k(sim, images_of, KS), "i2t": recall_at_k(sim.T, groups, KS)}


def evaluate_embeddings(per_exit: dict[int, torch.Tensor], full: torch.Tensor, text: torch.Tensor,
                        groups: torch.Tensor) -> dict:
    """Return {exit: {"t2i": {k: r}, "i2t": {k: r}, "cos_to_full": mean cosine, "mixed_t2i": {k: r}}}.

    ``mixed_t2i`` is text→image recall in the gallery an index of routed rows holds: every other image embedded
    at this exit, the rest at full depth. An exit whose embeddings drift from the full-depth space loses more
    there than its own-gallery recall shows (exit embeddings crowd together or apart from full-depth ones).
    """
    out = {}
    t, g = text.float().numpy(), groups.numpy()
    full_np = full.float().numpy()
    for e, emb in sorted(per_exit.items()):
        emb = emb.float()
        row = _recall_table(t, emb.numpy(), g)
        row["cos_to_full"] = float((emb * full.float()).sum(dim=1).mean())
        mixed = full_np.copy()
        mixed[::2] = emb.numpy()[::2]
        row["mixed_t2i"] = _recall_table(t, mixed, g)["t2i"]
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
    cols.append(("mixed t2i R@1", lambda r: r["mixed_t2i"][1]))
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
    return clip_loss_share(Dist(), image, text, text, scale, [image.shape[0]])


def clip_loss_share(d: Dist, image: torch.Tensor, text: torch.Tensor, all_text: torch.Tensor, scale: torch.Tensor,
                    sizes: list[int]) -> torch.Tensor:
    """Return this process's share of the symmetric CLIP loss of the global batch; the shares sum to the loss.

    ``image``/``text``: this process's rows (L2-normalised); ``all_text``: every process's captions in rank
    order (the text tower is frozen, so they carry no gradient); ``sizes``: rows per process. The share is this
    process's images against every caption plus its captions against every image (gathered with their
    gradient), summed over its rows and divided by the global batch: open_clip's ClipLoss, split by rows.
    """
    n, lo = sum(sizes), sum(sizes[:d.rank])
    all_image = distributed.all_gather_rows_with_grad(d, image, sizes)
    target = torch.arange(lo, lo + image.shape[0], device=image.device)
    i2t = F.cross_entropy(scale * image @ all_text.T, target, reduction="sum")
    t2i = F.cross_entropy(scale * text @ all_image.T, target, reduction="sum")
    return (i2t + t2i) / (2 * n)


def exit_losses(trainer: HeadTrainer, feats: dict[int, torch.Tensor], full: torch.Tensor, text: torch.Tensor,
                contrastive_weight: float, distill_weight: float) -> tuple[torch.Tensor, dict[int, float]]:
    """Return (mean loss over exits, {exit: its loss}) for one batch of cached features (frozen recipe)."""
    emb = {e: F.normalize(trainer.heads.head(e).from_features(f), dim=-1) for e, f in feats.items()}
    total, parts = exit_loss_shares(Dist(), trainer, emb, full, text, text, [full.shape[0]], contrastive_weight,
                                    distill_weight)
    return total, {e: float(v) for e, v in parts.items()}


def exit_loss_shares(d: Dist, trainer: HeadTrainer, emb: dict[int, torch.Tensor], full: torch.Tensor,
                     text: torch.Tensor, all_text: torch.Tensor, sizes: list[int], contrastive_weight: float,
                     distill_weight: float) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Return (this process's share of the mean loss over exits, {exit: its share, detached}) of a global batch.

    Per exit: contrastive_weight * CLIP loss against the captions + distill_weight * mean(1 - cos(exit, full)),
    both split by rows as in ``clip_loss_share``; summed over processes the shares are the single-process loss.
    """
    n = sum(sizes)
    total, parts = 0.0, {}
    for e in sorted(emb):  # one order in every process: each exit's gather must meet its own
        x = emb[e]
        loss = contrastive_weight * clip_loss_share(d, x, text, all_text, trainer.scale(e), sizes)
        if distill_weight:
            loss = loss + distill_weight * (1 - (x * full).sum(dim=1)).sum() / n
        parts[e] = loss.detach()
        total = total + loss
    return total / max(1, len(emb)), parts


class _HeadsStep(torch.nn.Module):
    """What DDP wraps in the frozen recipe: the early heads and their temperatures (cached features in)."""

    def __init__(self, trainer: HeadTrainer, exits: list[int]):
        super().__init__()
        self.heads = trainer.heads
        # Only the temperatures the loss uses: DDP expects a gradient for every parameter it holds.
        self.log_scales = torch.nn.ParameterDict({str(e): trainer.log_scales[str(e)] for e in exits})

    def forward(self, feats: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        return {e: F.normalize(self.heads.head(e).from_features(feats[e]), dim=-1) for e in sorted(feats)}


class _EncoderStep(torch.nn.Module):
    """What DDP wraps in the fine-tune recipe: the vision backbone, the heads and every temperature (pixels in)."""

    def __init__(self, encoder, trainer: HeadTrainer):
        super().__init__()
        self.encoder = encoder
        self.log_scales = trainer.log_scales

    def forward(self, pixels: torch.Tensor) -> dict[int, torch.Tensor]:
        return self.encoder.forward_all_exits(pixels)


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
    from pipeline.io.readers import expand_inputs

    if not urls:
        return []
    return [[s.uri, s.size, s.mtime, s.etag] for s in expand_inputs(urls, cfg.storage_options)]


class ExitTrainer:
    """Runs one `icar train-exits` job: load, extract (or stream), evaluate, train, evaluate, write.

    Data-parallel when a process group is initialised (see ``train_exits``); ``self.dist`` says where this
    process stands. Every process builds the same trainer; rank 0 alone writes.
    """

    def __init__(self, cfg: ExitTrainConfig, train_pairs=None, val_pairs=None):
        """``train_pairs``/``val_pairs``: optional re-iterable sources of (key, pixels, caption) instead of the
        shards named by cfg (tests, notebooks); callables returning a fresh iterator each time."""
        from pipeline.model import encoder as enc
        from pipeline.io.schema import model_key
        from pipeline.model.models import load_clip

        if cfg.finetune_backbone and cfg.distill_weight is None:
            cfg = dataclasses.replace(cfg, distill_weight=0.0)
        elif cfg.distill_weight is None:
            cfg = dataclasses.replace(cfg, distill_weight=1.0)
        if cfg.epochs < 0 or cfg.batch_size < 2:
            raise TrainExitsError(f"need epochs >= 0 and batch_size >= 2 (contrastive needs negatives), got "
                                  f"epochs={cfg.epochs} batch_size={cfg.batch_size}")
        if not 0.0 <= cfg.val_fraction < 1.0:
            raise TrainExitsError(f"val_fraction must be in [0, 1), got {cfg.val_fraction}")
        self.dist = distributed.current()
        if cfg.batch_size < self.dist.world_size:
            raise TrainExitsError(f"batch_size {cfg.batch_size} is the global batch and must give each of the "
                                  f"{self.dist.world_size} processes at least one pair; raise --batch-size")
        self.cfg = cfg
        self.device = distributed.device_of_rank(resolve_device(cfg.device), self.dist)
        self.bundle = load_clip(cfg.model, cfg.pretrained, seed=cfg.seed, device=self.device)
        self.exits = enc.validate_exits(cfg.exits or enc.default_exits(self.bundle.num_blocks), self.bundle.num_blocks)
        if len(self.exits) < 2:
            raise TrainExitsError(f"exits {self.exits} has no early exit to train; e.g. --exits "
                                  f"{','.join(map(str, enc.default_exits(self.bundle.num_blocks)))}")
        self.key = model_key(self.bundle.identity)
        self.heads = enc.ExitHeads.for_bundle(self.bundle, self.exits).to(self.device)
        self.merge = parse_merge(cfg.merge)
        if self.merge is not None and cfg.finetune_backbone:
            raise TrainExitsError("--merge trains heads for merged tokens on the frozen backbone; drop "
                                  "--finetune-backbone or --merge")
        self.heads.merge = merge_spec(self.merge)
        self.encoder = enc.AdaptiveEncoder(self.bundle.model.visual, self.exits, self.heads,
                                           [self.merge] if self.merge else None).eval()
        scale = float(getattr(self.bundle.model, "logit_scale", torch.tensor(math.log(1 / 0.07))).detach().cpu())
        self.trainer = HeadTrainer(self.heads, scale, cfg.learn_temperature, self.bundle.num_blocks).to(self.device)
        self._train_pairs, self._val_pairs = train_pairs, val_pairs
        self.stats = {"train": PairStats(), "val": PairStats()}

    # --- data sources
    def _raw_source(self, split: str) -> Iterator[tuple[str, object, str]]:
        """Yield the split's (key, encoded image bytes or given pixels, caption), the same stream in every process."""
        cfg = self.cfg
        given = self._train_pairs if split == "train" else self._val_pairs
        stats = self.stats[split]
        if given is not None:
            def counted():
                for item in given():
                    stats.read += 1
                    yield item
            return counted()
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
        return iter_raw_pairs(urls, cfg.storage_options, cfg.image_column, stats, keep)

    def _limit(self, split: str) -> int | None:
        return self.cfg.max_train if split == "train" else self.cfg.max_val

    def _share(self, split: str) -> Iterator[tuple[int, str, np.ndarray, str]]:
        """Yield (position in the split's stream, key, pixels, caption) for this process's share of the split.

        Pair i of the stream belongs to process i % world_size, which alone decodes it. Each process yields at
        most the split's limit of decoded pairs: enough, whatever the others' decode failures, for ``_assemble``
        to keep exactly the first ``limit`` decodable pairs of the stream, as a single process would.
        """
        d, limit, stats = self.dist, self._limit(split), self.stats[split]
        if limit is not None and limit <= 0:
            return
        taken = 0
        for pos, (key, payload, caption) in enumerate(self._raw_source(split)):
            if pos % d.world_size != d.rank:
                continue
            pixels = decode_pixels(key, payload, self.bundle.image_size, stats)
            if pixels is None:
                continue
            yield pos, key, pixels, caption
            taken += 1
            if limit is not None and taken >= limit:
                return

    def _assemble(self, positions: list[int], captions: list[str], limit: int | None) -> "_Assembly":
        """Return how the processes' shares (stream ``positions`` and ``captions`` here) make up the split."""
        d = self.dist
        sizes = distributed.gather_sizes(d, len(positions), self.device)
        pos = distributed.all_gather_rows(d, torch.tensor(positions, dtype=torch.int64, device=self.device),
                                          sizes).cpu()
        keep = list(sizes)
        if limit is not None and len(pos) > limit:
            cutoff = pos.sort().values[limit - 1]
            keep = [int((part <= cutoff).sum()) for part in pos.split(sizes)]  # each share is in stream order
            pos = torch.cat([part[:k] for part, k in zip(pos.split(sizes), keep)])
        order = torch.argsort(pos)
        gathered = [c for part in distributed.all_gather_objects(d, captions[:keep[d.rank]]) for c in part]
        ordered = [gathered[i] for i in order.tolist()]
        return _Assembly(keep, order, torch.from_numpy(caption_groups(ordered)) if ordered
                         else torch.zeros(0, dtype=torch.int64))

    def _gather(self, local: torch.Tensor, a: "_Assembly") -> torch.Tensor:
        """Return every process's kept rows of ``local`` in stream order, on the CPU."""
        rows = local[:a.keep[self.dist.rank]].to(self.device)
        return distributed.all_gather_rows(self.dist, rows, a.keep).cpu()[a.order]

    def _merge_stats(self, split: str) -> None:
        parts = distributed.all_gather_objects(self.dist, dataclasses.asdict(self.stats[split]))
        self.stats[split] = merge_stats(parts)

    def _features(self, split: str) -> FeatureSet:
        """Return the split's features, from OUTPUT's cache when inputs, model and exits match."""
        cfg = self.cfg
        url = storage.join(cfg.output, FEATURES.format(split=split))
        given = self._train_pairs if split == "train" else self._val_pairs
        meta = {"version": FEATURES_VERSION, "model_key": self.key, "exits": self.exits,
                "inputs": None if given is not None else _fingerprint(
                    cfg.val_inputs if split == "val" and cfg.val_inputs else cfg.inputs, cfg),
                "val_fraction": cfg.val_fraction if not cfg.val_inputs else None,
                "limit": self._limit(split), **({"merge": self.merge.spec} if self.merge else {})}
        if given is None:
            meta = json.loads(json.dumps(meta))  # compare as it reads back
            data, hit = None, False
            if self.dist.is_main:
                data = _read_or_none(url, cfg)
                if data is not None:
                    hit = (_features_from_bytes(data)[1] | {"stats": None}) == (meta | {"stats": None})
                    if not hit:
                        log.info("feature cache %s was made for other inputs/model/exits; extracting again", url)
            if distributed.broadcast_object(self.dist, hit):  # one decision, or the processes would part ways
                fs, cached_meta = _features_from_bytes(data if data is not None else _read_or_none(url, cfg))
                if cached_meta.get("stats"):
                    self.stats[split] = PairStats(**cached_meta["stats"])
                log.info("%s features: %d pairs from the cache %s", split, len(fs), url)
                return fs
        with timed_phase("features") as extracting:
            fs = self._extract(split)
        log.info("%s features: %d pairs in %.1fs (%d process(es))", split, len(fs), extracting.seconds,
                 self.dist.world_size)
        if given is None and self.dist.is_main:
            _write(url, _features_to_bytes(fs, {**meta, "stats": dataclasses.asdict(self.stats[split])}), cfg)
        return fs

    def _extract(self, split: str) -> FeatureSet:
        """Return the split's FeatureSet: each process extracts its share, the shares are gathered in stream order."""
        positions, captions = [], []

        def tapped():
            for pos, key, pixels, caption in self._share(split):
                positions.append(pos)
                captions.append(caption)
                yield key, pixels, caption

        local = extract_features(self.encoder, self.bundle, tapped(), self.cfg.extract_batch_size, self.device,
                                 allow_empty=self.dist.enabled, merge=self.merge)
        a = self._assemble(positions, captions, self._limit(split))
        fs = FeatureSet({e: self._gather(local.features[e], a) for e in sorted(local.features)},
                        self._gather(local.full, a),
                        self._gather(local.text, a), a.groups)
        if len(fs) == 0:
            raise TrainExitsError(NO_PAIRS)
        self._merge_stats(split)
        self.stats[split].used = len(fs)
        return fs

    # --- checkpoints
    def _checkpoint_url(self) -> str:
        return storage.join(self.cfg.output, CHECKPOINT)

    def _save_checkpoint(self, epoch: int, opt, sched, history: list) -> None:
        """Write the state after ``epoch`` (rank 0 only: the state is the same in every process)."""
        if not self.dist.is_main:
            return
        state = {"epoch": epoch, "model_key": self.key, "exits": self.exits,
                 "trainer": {k: v.detach().cpu() for k, v in self.trainer.state_dict().items()},
                 "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "history": history,
                 "finetune_backbone": self.cfg.finetune_backbone, "world_size": self.dist.world_size,
                 "merge": merge_spec(self.merge)}
        if self.cfg.finetune_backbone:
            state["visual"] = {k: v.detach().cpu() for k, v in self.bundle.model.visual.state_dict().items()}
        buf = io.BytesIO()
        torch.save(state, buf)
        _write(self._checkpoint_url(), buf.getvalue(), self.cfg)

    def _load_checkpoint(self, opt, sched) -> tuple[int, list]:
        """Return (next epoch, history) after restoring a checkpoint, or (0, []) when starting afresh.

        Every process reads it; the barrier after keeps rank 0 from writing the next one before all have.
        """
        try:
            return self._restore(opt, sched)
        finally:
            distributed.barrier(self.dist)

    def _restore(self, opt, sched) -> tuple[int, list]:
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
        trained_merge = state.get("merge", merge_spec(None))  # checkpoints from before --merge: unmerged
        if trained_merge != merge_spec(self.merge):
            raise TrainExitsError(
                f"checkpoint in {self.cfg.output} was trained under merge schedule {trained_merge}, not "
                f"{merge_spec(self.merge)}: heads serve the schedule they were trained under; resume with "
                f"--merge {trained_merge} or use another --output")
        self.trainer.load_state_dict(state["trainer"])
        if "visual" in state:
            self.bundle.model.visual.load_state_dict(state["visual"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        log.info("resumed from %s after epoch %d (written by %d process(es), resumed by %d)", self._checkpoint_url(),
                 state["epoch"] + 1, state.get("world_size", 1), self.dist.world_size)
        return state["epoch"] + 1, state["history"]

    # --- the job
    def run(self) -> dict | None:
        """Train, write heads + metrics (+ backbone when fine-tuning) to OUTPUT; return the metrics document
        (on rank 0; the other processes of a data-parallel run return None)."""
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

    def _parallel(self, module: torch.nn.Module) -> torch.nn.Module:
        """Return ``module`` wrapped in DDP (gradients averaged over processes), or itself in one process."""
        if not self.dist.enabled:
            return module
        from torch.nn.parallel import DistributedDataParallel

        on_gpu = self.device.startswith("cuda")
        return DistributedDataParallel(module, device_ids=[torch.device(self.device).index] if on_gpu else None)

    def _step(self, share: torch.Tensor, opt, sched) -> None:
        """Apply one optimiser step for this process's ``share`` of a global batch's loss."""
        opt.zero_grad(set_to_none=True)
        # DDP averages gradients over processes; the shares sum to the loss, so scale each back up.
        (share * self.dist.world_size).backward()
        opt.step()
        sched.step()

    def _run_frozen(self) -> dict | None:
        cfg, d = self.cfg, self.dist
        t_start = time.perf_counter()
        train, val = self._features("train"), self._features("val")
        if len(train) < 2:
            raise TrainExitsError(f"only {len(train)} training pair(s): contrastive training needs a batch of >= 2")
        before = evaluate_features(self.heads, val, self.bundle.num_blocks)
        steps = math.ceil(len(train) / cfg.batch_size)
        opt, sched = self._optimizer(steps)
        start, history = self._load_checkpoint(opt, sched)
        early = self.heads.early_exits
        model = self._parallel(_HeadsStep(self.trainer, early))
        dev = self.device
        full, text = train.full.to(dev), train.text.to(dev)
        feats = {e: v.to(dev) for e, v in train.features.items()}
        for epoch in range(start, cfg.epochs):
            t0 = time.perf_counter()
            self.trainer.train()
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))
            sums, n_steps = torch.zeros(len(early), dtype=torch.float64, device=dev), 0
            for s in range(0, len(train), cfg.batch_size):
                idx = order[s:s + cfg.batch_size].to(dev)
                if idx.numel() < 2:
                    continue
                sizes = distributed.split_sizes(idx.numel(), d.world_size)
                lo = sum(sizes[:d.rank])
                mine = idx[lo:lo + sizes[d.rank]]
                emb = model({e: feats[e][mine] for e in early})
                share, parts = exit_loss_shares(d, self.trainer, emb, full[mine], text[mine], text[idx], sizes,
                                                cfg.contrastive_weight, cfg.distill_weight)
                self._step(share, opt, sched)
                sums += torch.stack([parts[e] for e in early]).double()
                n_steps += 1
            sums = distributed.all_sum(d, sums).cpu()  # the shares of every process make each step's loss
            self.trainer.eval()
            val_metrics = evaluate_features(self.heads, val, self.bundle.num_blocks)
            entry = {"epoch": epoch, "seconds": time.perf_counter() - t0,
                     "train_loss": {str(e): float(v) / max(1, n_steps) for e, v in zip(early, sums)},
                     "val": {str(e): _summary(m) for e, m in val_metrics.items()}}
            history.append(entry)
            log.info("epoch %d/%d: loss %s; val t2i R@1 %s (%.1fs)", epoch + 1, cfg.epochs,
                     {e: round(v, 4) for e, v in entry["train_loss"].items()},
                     {e: round(m["t2i@1"], 3) for e, m in entry["val"].items()}, entry["seconds"])
            self._save_checkpoint(epoch, opt, sched, history)
        after = evaluate_features(self.heads, val, self.bundle.num_blocks)
        return self._finish(before, after, history, len(train), len(val), time.perf_counter() - t_start)

    def _run_finetune(self) -> dict | None:
        """The paper's recipe: backbone + heads train on streamed pixels; 0.5/0.5 contrastive on both paths."""
        cfg, d = self.cfg, self.dist
        t_start = time.perf_counter()
        val = self._val_pixels()
        before = self._evaluate_pixels(val)
        visual = self.bundle.model.visual
        backbone = [p for p in visual.parameters()]
        for p in backbone:
            p.requires_grad_(True)
        # Streaming: the number of pairs is only known after a pass, so the rates stay constant (as in the paper).
        opt, sched = self._optimizer(None, [{"params": backbone, "lr": cfg.backbone_lr}])
        n_train = 0
        start, history = self._load_checkpoint(opt, sched)
        model = self._parallel(_EncoderStep(self.encoder, self.trainer))
        full_depth = self.bundle.num_blocks
        early = [e for e in self.exits if e != full_depth]
        w_full = cfg.full_path_weight
        for epoch in range(start, cfg.epochs):
            t0 = time.perf_counter()
            self.encoder.train()
            self.stats["train"] = PairStats()  # what one pass reads
            rng = np.random.default_rng([cfg.seed, epoch])  # per epoch: a resumed run shuffles as a straight one
            n_steps, loss_sum, n_train = 0, torch.zeros((), dtype=torch.float64, device=self.device), 0
            stream = _shuffled(_take(self._raw_source("train"), cfg.max_train), cfg.shuffle_buffer, rng)
            for batch in _batches(stream, cfg.batch_size):
                # Every process holds the same global batch of encoded images and decodes its contiguous slice.
                cut = distributed.split_sizes(len(batch), d.world_size)
                lo = sum(cut[:d.rank])
                decoded = [(p, c) for k, raw, c in batch[lo:lo + cut[d.rank]]
                           if (p := decode_pixels(k, raw, self.bundle.image_size, self.stats["train"])) is not None]
                sizes = distributed.gather_sizes(d, len(decoded), self.device)  # decode failures shrink shares
                if sum(sizes) < 2:
                    continue
                text = self._text([c for _, c in decoded]).to(self.device)
                all_text = distributed.all_gather_rows(d, text, sizes)
                if decoded:
                    per_exit = model(pixels_to_tensor(self.bundle, np.stack([p for p, _ in decoded]),
                                                      device=self.device))
                else:  # a share of 0 rows (a small last batch): the tower refuses empty batches, and DDP needs
                    # every parameter in the graph, so run one blank image and keep none of its rows
                    blank = np.zeros((1, self.bundle.image_size, self.bundle.image_size, 3), np.uint8)
                    per_exit = {e: v[:0] for e, v in model(pixels_to_tensor(self.bundle, blank,
                                                                              device=self.device)).items()}
                full = per_exit[full_depth]
                loss_full = clip_loss_share(d, full, text, all_text, self.trainer.scale(full_depth), sizes)
                loss_early = sum(clip_loss_share(d, per_exit[e], text, all_text, self.trainer.scale(e), sizes)
                                 for e in early) / len(early)
                share = cfg.contrastive_weight * ((1 - w_full) * loss_early + w_full * loss_full)
                if cfg.distill_weight:
                    target = full.detach()
                    share = share + cfg.distill_weight * sum(
                        (1 - (per_exit[e] * target).sum(dim=1)).sum() for e in early) / len(early) / sum(sizes)
                self._step(share, opt, sched)
                loss_sum += share.detach().double()
                n_steps += 1
                n_train += sum(sizes)
            loss_sum = float(distributed.all_sum(d, loss_sum))
            self._merge_stats("train")
            self.encoder.eval()
            val_metrics = self._evaluate_pixels(val)
            entry = {"epoch": epoch, "seconds": time.perf_counter() - t0, "train_loss": loss_sum / max(1, n_steps),
                     "val": {str(e): _summary(m) for e, m in val_metrics.items()}}
            history.append(entry)
            log.info("epoch %d/%d: loss %.4f; val t2i R@1 %s (%.1fs)", epoch + 1, cfg.epochs, entry["train_loss"],
                     {e: round(m["t2i@1"], 3) for e, m in entry["val"].items()}, entry["seconds"])
            self._save_checkpoint(epoch, opt, sched, history)
        for p in backbone:
            p.requires_grad_(False)
        after = self._evaluate_pixels(val)
        return self._finish(before, after, history, n_train, len(val.text), time.perf_counter() - t_start)

    def _val_pixels(self) -> "_ValShare":
        """Return this process's share of the validation pixels, with every caption's embedding and group."""
        items = list(self._share("val"))
        a = self._assemble([i[0] for i in items], [i[3] for i in items], self.cfg.max_val)
        items = items[:a.keep[self.dist.rank]]
        if sum(a.keep) == 0:
            raise TrainExitsError("no validation pairs: give --val inputs or a --val-fraction above 0")
        self._merge_stats("val")
        pixels = _stack_pixels([i[2] for i in items], self.bundle.image_size)
        text = self._gather(self._text([i[3] for i in items]), a)
        return _ValShare(pixels, a, text)

    @torch.no_grad()
    def _text(self, captions: list[str]) -> torch.Tensor:
        if not captions:
            return torch.zeros(0, self.bundle.embed_dim)
        tokens = self.bundle.tokenizer(captions).to(self.device)
        return F.normalize(self.bundle.model.encode_text(tokens).float(), dim=-1).cpu()

    @torch.no_grad()
    def _evaluate_pixels(self, val: "_ValShare") -> dict:
        """Return per-exit metrics on the validation pairs; each process embeds its share, all get the metrics."""
        outs: dict[int, list] = {e: [torch.zeros(0, self.bundle.embed_dim)] for e in self.exits}
        for s in range(0, len(val.pixels), self.cfg.extract_batch_size):
            x = pixels_to_tensor(self.bundle, val.pixels[s:s + self.cfg.extract_batch_size], device=self.device)
            for e, v in self.encoder.forward_all_exits(x).items():
                outs[e].append(v.cpu())
        per_exit = {e: self._gather(torch.cat(v), val.assembly) for e, v in outs.items()}
        return evaluate_embeddings(per_exit, per_exit[self.bundle.num_blocks], val.text, val.assembly.groups)

    def _finish(self, before: dict, after: dict, history: list, n_train: int, n_val: int,
                seconds: float) -> dict | None:
        """Write heads (+ fine-tuned backbone), metrics.json; print the before/after table; return the metrics.

        Rank 0 only; the other processes return None.
        """
        cfg = self.cfg
        if not self.dist.is_main:
            return None
        identity = self.bundle.identity
        if cfg.finetune_backbone:
            identity = self._write_backbone()
            from pipeline.io.schema import model_key

            self.heads.backbone = model_key(identity)
        heads_url = storage.join(cfg.output, HEADS)
        self.heads.to("cpu")
        _write(heads_url, self.heads.to_bytes({"trained_by": "icar train-exits", "epochs": cfg.epochs,
                                              "finetune_backbone": cfg.finetune_backbone}), cfg)
        self.heads.path = heads_url
        doc = {
            "model": identity,
            "heads": self.heads.identity,
            "exits": self.exits,
            "recipe": "finetune_backbone (paper: 0.5/0.5 contrastive on both paths)" if cfg.finetune_backbone
            else "frozen backbone and text tower; heads only (contrastive + distillation)",
            "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "storage_options"},
            "world_size": self.dist.world_size,
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
        print("mixed t2i R@1: recall in a gallery of every other image at that exit and the rest at full depth, "
              "as an index of routed rows holds them")
        return doc

    def _write_backbone(self) -> dict:
        """Write the fine-tuned CLIP as a model directory under OUTPUT; return its identity (a new model key)."""
        from safetensors.torch import save

        from pipeline.model.models import DEMO_CONFIG, DEMO_WEIGHTS, weights_sha256

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


@dataclass
class _Assembly:
    """How the processes' shares of a split make it up: rows each keeps, and the order of the gathered rows."""

    keep: list[int]  # per process: how many of its rows (a prefix of its share) belong to the split
    order: torch.Tensor  # permutation of the gathered kept rows into stream order
    groups: torch.Tensor  # caption group per row, in stream order


@dataclass
class _ValShare:
    """This process's validation pixels; captions' embeddings and groups of the whole split (stream order)."""

    pixels: np.ndarray  # uint8 (n_local, S, S, 3)
    assembly: _Assembly
    text: torch.Tensor  # (N, D) L2-normalised


def _stack_pixels(pixels: list[np.ndarray], image_size: int) -> np.ndarray:
    return np.stack(pixels) if pixels else np.zeros((0, image_size, image_size, 3), np.uint8)


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
    return {"t2i@1": m["t2i"][1], "t2i@5": m["t2i"][5], "i2t@1": m["i2t"][1], "cos_to_full": m["cos_to_full"],
            "mixed_t2i@1": m["mixed_t2i"][1]}


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    return x


def train_exits(cfg: ExitTrainConfig) -> dict | None:
    """Return the metrics document of a train-exits run (heads and metrics written under cfg.output).

    One process, or one of a data-parallel group when the environment describes one (torchrun); with
    ``cfg.workers`` > 1 outside such a group, starts that many local processes and returns rank 0's document.
    Inside a group, only rank 0 returns the document; the others return None. Workers are started with the
    "spawn" method, so a script that calls this with workers > 1 needs the usual ``if __name__ == "__main__":``.
    """
    if cfg.workers < 1:
        raise TrainExitsError(f"workers must be >= 1, got {cfg.workers}")
    world = distributed.env_world_size()
    if cfg.workers > 1 and world == 1:
        return _train_spawned(cfg)
    if cfg.workers > 1 and world != cfg.workers:
        raise TrainExitsError(f"--workers {cfg.workers} inside a group of {world} processes (torchrun sets "
                              f"WORLD_SIZE): use torchrun's --nproc-per-node or --workers, not both")
    try:
        with distributed.process_group(resolve_device(cfg.device)):
            return ExitTrainer(cfg).run()
    except distributed.DistributedError as e:
        raise TrainExitsError(str(e)) from e


def _spawned_worker(cfg: ExitTrainConfig) -> None:
    """What each process started by ``workers`` runs (module level: spawned processes import it by name)."""
    train_exits(cfg)


def _train_spawned(cfg: ExitTrainConfig) -> dict:
    """Run ``cfg`` in cfg.workers local processes; return the metrics document rank 0 wrote."""
    from torch.multiprocessing import ProcessExitedException, ProcessRaisedException

    device = resolve_device(cfg.device)
    log.info("train-exits: starting %d worker processes (%s)", cfg.workers, distributed.backend_for(device))
    try:
        distributed.spawn(_spawned_worker, (cfg,), cfg.workers, device)
    except distributed.DistributedError as e:
        raise TrainExitsError(str(e)) from e
    except ProcessRaisedException as e:  # the child's traceback is text; its last line names the error
        last = [line for line in str(e).strip().splitlines() if line.strip()][-1]
        raise TrainExitsError(f"a training worker failed: {last.strip()} (its traceback is logged above)") from e
    except ProcessExitedException as e:
        raise TrainExitsError(f"a training worker died: {e}") from e
    return json.loads(_read_or_none(storage.join(cfg.output, METRICS), cfg))
