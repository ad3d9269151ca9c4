"""Typed configuration of the embed job; the CLI's defaults come from here (one source of truth)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from pipeline.io.readers import FOLDER_SHARD_SIZE, MAX_SAMPLE_BYTES
from pipeline.model.spec import ModelSpec


@dataclass
class EmbedConfig:
    """Everything `icar embed` needs; see `icar embed --help` for the user's view."""

    inputs: list[str]  # fsspec URLs, globs or directories; one input shard per file (or per image folder)
    output: str  # run directory (local path or URL)
    spec: ModelSpec = field(default_factory=ModelSpec)
    batch_size: int = 32  # images per model call
    # Where JPEGs are decoded: "cpu" in the shard tasks (pixels shipped), "cuda" on the model actor's GPU (bytes
    # shipped, pipeline.model.device_decode; other formats still decoded by the shard tasks).
    decode_device: str = "cpu"
    image_column: str | None = None  # Parquet image-bytes column; None: auto-detect (jpg, image, bytes, img)
    max_pixels: int = 89_478_485  # decompression-bomb limit per image (PIL's default)
    address: str | None = None  # Ray cluster to join; None: $RAY_ADDRESS, else an embedded local Ray
    num_actors: int | None = None  # model actors; None: one per GPU, or 1 on a CPU-only cluster
    gpus_per_actor: float = 1.0  # GPU share of a model actor when GPUs exist (fractions pack actors per GPU)
    cpus_per_actor: float = 1.0  # CPUs reserved per model actor
    decode_tasks: int | None = None  # input shards decoded at once; None: the CPUs left beside the actors
    batches_in_flight: int = 2  # batches a shard task keeps queued at its actor (bounds memory, hides latency)
    shard_retries: int = 2  # retries of a failing input shard before it is reported as failed
    shard_timeout_s: float = 6 * 3600.0  # a shard task that takes longer is cancelled and reported
    actor_start_timeout_s: float = 600.0  # model actors must be up by then (model download/load included)
    # fsspec options (e.g. {"anon": true}); may hold credentials: never logged, and left out of repr()
    storage_options: dict = field(default_factory=dict, repr=False)
    progress: bool = True  # progress bar on stderr
    limit_shards: int | None = None  # embed at most this many pending shards (smoke runs)
    reembed_changed: bool = False  # embed again committed inputs whose size/mtime/ETag changed (scheduled reindex)
    # Move unreadable parts, manifest or run.json into OUTPUT/quarantine/ and embed their inputs again
    # (pipeline/io/repair.py says what is safe to repair and how).
    repair: bool = False
    max_sample_bytes: int = MAX_SAMPLE_BYTES  # larger samples are error rows, skipped unread
    folder_shard_size: int = FOLDER_SHARD_SIZE  # image files per input shard of a folder (sorted listing, chunked)
    follow_symlinks: bool = False  # read folder files reached through links that leave the input root
    # One writer per run directory (OUTPUT/icar.lock, pipeline/io/lock.py): a second run is refused at once.
    break_lock: bool = False  # take the lock over even from a live-looking holder (only when sure it is dead)
    lock_stale_after_s: float = 1800.0  # a lock not refreshed for this long is taken over (its holder is dead)
    lock_heartbeat_s: float = 60.0  # the holder refreshes the lock this often (well below lock_stale_after_s)

    def resolved_address(self) -> str | None:
        """Return the Ray address to join, or None for an embedded local instance."""
        return self.address or os.environ.get("RAY_ADDRESS") or None
