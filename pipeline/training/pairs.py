"""Image–caption pairs for exit training: read from shards, filtered by key into train and val, decoded.

Per-sample failures (no caption, unreadable bytes, undecodable image, an unreadable shard) are counted in a
``PairStats`` and skipped, never fatal: metrics.json reports them.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np

from pipeline.io.decode import DecodeConfig, DecodeError, decode_image
from pipeline.io.readers import ShardReadError, expand_inputs, iter_samples

log = logging.getLogger(__name__)


@dataclass
class PairStats:
    """What happened to the samples read (per-sample failures are counted and reported, not fatal)."""

    read: int = 0
    used: int = 0
    no_caption: int = 0
    read_errors: int = 0
    decode_errors: int = 0
    failed_shards: list[str] = field(default_factory=list)


def is_held_out(key: str, fraction: float) -> bool:
    """Return True when ``key`` falls in the held-out share (a stable hash, the same on every run)."""
    h = int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big")
    return h / 2 ** 64 < fraction


def iter_raw_pairs(inputs: list[str], storage_options: dict | None = None, image_column: str | None = None,
                   stats: PairStats | None = None, keep=None) -> Iterator[tuple[str, bytes, str]]:
    """Yield (key, encoded image bytes, caption) for every readable, captioned sample of ``inputs`` (not decoded).

    ``keep(key) -> bool`` filters by key. Samples without a caption or whose bytes cannot be read are counted in
    ``stats`` and skipped; an unreadable shard is counted and the next one is read.
    """
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


def take(pairs: Iterable, limit: int | None) -> Iterator:
    """Yield the first ``limit`` items of ``pairs`` (all of them for None)."""
    for i, p in enumerate(pairs):
        if limit is not None and i >= limit:
            return
        yield p


def batches(pairs: Iterable, size: int) -> Iterator[list]:
    """Yield lists of ``size`` consecutive items of ``pairs`` (the last one shorter)."""
    batch = []
    for p in pairs:
        batch.append(p)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def shuffled(pairs: Iterable, buffer: int, rng: np.random.Generator) -> Iterator:
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


def stack_pixels(pixels: list[np.ndarray], image_size: int) -> np.ndarray:
    """Return ``pixels`` stacked (N, S, S, 3), or an empty uint8 batch of that shape for none."""
    return np.stack(pixels) if pixels else np.zeros((0, image_size, image_size, 3), np.uint8)
