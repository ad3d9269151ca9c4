"""Typed configuration of the embed job; the CLI's defaults come from here (one source of truth)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

# Input-reading defaults, shared by the readers (pipeline/readers.py) and every job that lists inputs (embed,
# reindex), so the same folder gives the same shards whoever lists it.
# A sample's encoded bytes above this are refused unread (tar member, folder file, Parquet cell): the largest
# real images (a 100 MP JPEG ~50 MB, a 16-bit 8K PNG ~200 MB) stay below it, and a bomb no longer costs its size
# in memory before decoding refuses it (decoding refuses anything above max_pixels anyway).
MAX_SAMPLE_BYTES = 256 << 20
# Image files per input shard of a folder (img2dataset's unit of work: a resumable, parallel, committed piece).
FOLDER_SHARD_SIZE = 1000


@dataclass
class ModelSpec:
    """Which CLIP, which exits, how images are routed and scored."""

    model: str = "demo"  # open_clip model name (ViT-B-32, ViT-L-14, ...) or "demo" (shipped weights)
    pretrained: str | None = None  # open_clip tag, local checkpoint path, or "none" (seeded random init)
    seed: int = 0  # seed of the random init when pretrained is "none"
    exits: list[int] | None = None  # exit depths in blocks; None: the model's default (last = full depth)
    heads: str | None = None  # exit-heads safetensors; None: the demo's shipped heads, else the tower's own ln_post/proj
    router: str | None = None  # router JSON from `icar calibrate`; None: see route_fractions / exit_at / full_depth
    exit_at: int | None = None  # route every image to this depth (fixed-depth runs, baselines)
    full_depth: bool = False  # route every image to the last block (the open_clip baseline)
    route_fractions: list[float] | None = None  # fixed share of images per exit, by a hash of the key (benchmarks)
    scorer: str = "default"  # default | heuristic | convnext | none
    scorer_checkpoint: str | None = None  # ConvNeXt-IC checkpoint (safetensors) for --scorer convnext
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "fp32"  # fp32 | fp16 | bf16 (autocast on accelerators)
    torch_threads: int | None = None  # intra-op threads per CPU actor; None: CPUs per actor


@dataclass
class EmbedConfig:
    """Everything `icar embed` needs; see `icar embed --help` for the user's view."""

    inputs: list[str]  # fsspec URLs, globs or directories; one input shard per file (or per image folder)
    output: str  # run directory (local path or URL)
    spec: ModelSpec = field(default_factory=ModelSpec)
    batch_size: int = 32  # images per model call
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
    # (pipeline/repair.py says what is safe to repair and how).
    repair: bool = False
    max_sample_bytes: int = MAX_SAMPLE_BYTES  # larger samples are error rows, skipped unread
    folder_shard_size: int = FOLDER_SHARD_SIZE  # image files per input shard of a folder (sorted listing, chunked)
    follow_symlinks: bool = False  # read folder files reached through links that leave the input root
    # One writer per run directory (OUTPUT/icar.lock, pipeline/lock.py): a second run is refused at once.
    break_lock: bool = False  # take the lock over even from a live-looking holder (only when sure it is dead)
    lock_stale_after_s: float = 1800.0  # a lock not refreshed for this long is taken over (its holder is dead)
    lock_heartbeat_s: float = 60.0  # the holder refreshes the lock this often (well below lock_stale_after_s)

    def resolved_address(self) -> str | None:
        """Return the Ray address to join, or None for an embedded local instance."""
        return self.address or os.environ.get("RAY_ADDRESS") or None
