"""The frozen recipe's feature cache: what each exit head sees, computed once per image–caption pair.

With the backbone and the text tower frozen, nothing upstream of a head changes during training, so the pooled
block output at each exit (``ExitHead.pool_features``), the full-depth embedding and the caption's embedding are
extracted once (each process its share, gathered in stream order) and kept in OUTPUT as
``features-{split}.safetensors``; a later run reuses them when inputs, model, exits and limits match.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load, save

from pipeline.io import storage
from pipeline.io.readers import expand_inputs
from pipeline.logs import timed_phase
from pipeline.model.models import pixels_to_tensor
from pipeline.training import distributed
from pipeline.training.exit_config import NO_PAIRS, ExitTrainConfig, TrainExitsError, read_output, write_output
from pipeline.training.pairs import PairStats, batches
from pipeline.training.recall import (CALIBRATION_PAIRS, OFFSET_RANGE, SCALE_GRID, calibrated_penalty, caption_groups,
                                      choose_exit_calibration, evaluate_embeddings, mixed_margins)
from pipeline.training.shares import SplitReader

log = logging.getLogger(__name__)

FEATURES = "features-{split}.safetensors"
FEATURES_VERSION = "1"


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
    for batch in batches(pairs, batch_size):
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


def features_to_bytes(fs: FeatureSet, meta: dict) -> bytes:
    """Return ``fs`` as safetensors bytes, ``meta`` (JSON values) in its header."""
    tensors = {f"feat.{e}": v.contiguous() for e, v in fs.features.items()}
    tensors.update(full=fs.full.contiguous(), text=fs.text.contiguous(), groups=fs.groups.contiguous())
    return save(tensors, metadata={k: json.dumps(v) for k, v in meta.items()})


def features_from_bytes(data: bytes) -> tuple[FeatureSet, dict]:
    """Return (FeatureSet, meta) of bytes written by ``features_to_bytes``."""
    meta = {k: json.loads(v) for k, v in storage.safetensors_metadata(data).items()}
    t = load(data)
    # By depth: safetensors' dict order can differ between processes, and the collectives of a data-parallel
    # run must come in the same order in every process.
    feats = dict(sorted((int(k.split(".", 1)[1]), v) for k, v in t.items() if k.startswith("feat.")))
    return FeatureSet(feats, t["full"], t["text"], t["groups"]), meta


@torch.no_grad()
def early_embeddings(heads, fs: FeatureSet) -> dict[int, torch.Tensor]:
    """Return {early exit: L2-normalised embeddings (N, D) on the CPU} of ``heads`` on cached features."""
    return {e: F.normalize(heads.head(e).from_features(fs.features[e].to(_device_of(heads))).float().cpu(), dim=-1)
            for e in heads.early_exits}


def evaluate_features(heads, fs: FeatureSet, num_blocks: int) -> dict:
    """Return per-exit recall and cosine to full depth of ``heads`` on cached features (full depth included)."""
    per_exit = early_embeddings(heads, fs)
    per_exit[num_blocks] = fs.full
    return evaluate_embeddings(per_exit, fs.full, fs.text, fs.groups)


VAL_RESAMPLES = 1000  # bootstrap resamples behind the validation penalty's 95 % interval


def exit_calibration(heads, train: FeatureSet, val: FeatureSet) -> dict[int, dict]:
    """Return {early exit: ``choose_exit_calibration``'s result on the first CALIBRATION_PAIRS training pairs, with
    "val": the ``calibrated_penalty`` it gives the held-out validation pairs, with 95 % intervals}.

    Chosen on training pairs, not validation: a 1-point penalty needs thousands of pairs to resolve (on the demo a
    calibration chosen on 1000 validation pairs missed 1 point on 10 000 test images at both exits; on 10 000
    training pairs it held both under 0.3), and the heads' training does not see this choice.
    """
    n = min(len(train), CALIBRATION_PAIRS)
    head = FeatureSet({e: v[:n] for e, v in train.features.items()}, train.full[:n], train.text[:n], train.groups[:n])
    out = {}
    val_emb = early_embeddings(heads, val)
    for e, x in early_embeddings(heads, head).items():
        r = choose_exit_calibration(mixed_margins(head.text.float().numpy(), x.numpy(), head.full.float().numpy()))
        if r["at_grid_edge"]:
            log.warning("exit %d: its score calibration (scale %.2f, offset %+.4f) sits at the edge of the range "
                        "searched (scale %.2f-%.2f, offset +-%.1f): a better one may lie beyond it; this exit's "
                        "embeddings sit far from full depth's, check its metrics", e, r["scale"], r["offset"],
                        SCALE_GRID[0], SCALE_GRID[-1], OFFSET_RANGE)
        r["val"] = calibrated_penalty(mixed_margins(val.text.float().numpy(), val_emb[e].numpy(),
                                                    val.full.float().numpy()), r["scale"], r["offset"], VAL_RESAMPLES)
        out[e] = r
    return out


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def fingerprint(urls: list[str] | None, cfg: ExitTrainConfig) -> list:
    """Return what identifies the input shards (uri, size, mtime, etag), to validate the feature cache."""
    if not urls:
        return []
    return [[s.uri, s.size, s.mtime, s.etag] for s in expand_inputs(urls, cfg.storage_options)]


class FeatureCache:
    """Each split's FeatureSet for one run: read from OUTPUT when it matches, else extracted and written (rank 0)."""

    def __init__(self, reader: SplitReader, encoder, bundle, key: str, exits: list[int], merge=None):
        self.reader, self.encoder, self.bundle = reader, encoder, bundle
        self.key, self.exits, self.merge = key, exits, merge

    def get(self, split: str) -> FeatureSet:
        """Return the split's features, from OUTPUT's cache when inputs, model and exits match."""
        r = self.reader
        cfg = r.cfg
        url = storage.join(cfg.output, FEATURES.format(split=split))
        given = r.given[split]
        meta = {"version": FEATURES_VERSION, "model_key": self.key, "exits": self.exits,
                "inputs": None if given is not None else fingerprint(
                    cfg.val_inputs if split == "val" and cfg.val_inputs else cfg.inputs, cfg),
                "val_fraction": cfg.val_fraction if not cfg.val_inputs else None,
                "limit": r.limit(split), **({"merge": self.merge.spec} if self.merge else {})}
        if given is None:
            meta = json.loads(json.dumps(meta))  # compare as it reads back
            data, hit = None, False
            if r.dist.is_main:
                data = read_output(url, cfg)
                if data is not None:
                    hit = (features_from_bytes(data)[1] | {"stats": None}) == (meta | {"stats": None})
                    if not hit:
                        log.info("feature cache %s was made for other inputs/model/exits; extracting again", url)
            if distributed.broadcast_object(r.dist, hit):  # one decision, or the processes would part ways
                fs, cached_meta = features_from_bytes(data if data is not None else read_output(url, cfg))
                if cached_meta.get("stats"):
                    r.stats[split] = PairStats(**cached_meta["stats"])
                log.info("%s features: %d pairs from the cache %s", split, len(fs), url)
                return fs
        with timed_phase("features") as extracting:
            fs = self.extract(split)
        log.info("%s features: %d pairs in %.1fs (%d process(es))", split, len(fs), extracting.seconds,
                 r.dist.world_size)
        if given is None and r.dist.is_main:
            write_output(url, features_to_bytes(fs, {**meta, "stats": dataclasses.asdict(r.stats[split])}), cfg)
        return fs

    def extract(self, split: str) -> FeatureSet:
        """Return the split's FeatureSet: each process extracts its share, the shares are gathered in stream order."""
        r = self.reader
        positions, captions = [], []

        def tapped():
            for pos, key, pixels, caption in r.share(split):
                positions.append(pos)
                captions.append(caption)
                yield key, pixels, caption

        local = extract_features(self.encoder, self.bundle, tapped(), r.cfg.extract_batch_size, r.device,
                                 allow_empty=r.dist.enabled, merge=self.merge)
        a = r.assemble(positions, captions, r.limit(split))
        fs = FeatureSet({e: r.gather(local.features[e], a) for e in sorted(local.features)},
                        r.gather(local.full, a),
                        r.gather(local.text, a), a.groups)
        if len(fs) == 0:
            raise TrainExitsError(NO_PAIRS)
        r.merge_stats(split)
        r.stats[split].used = len(fs)
        return fs
