"""Which model an embed run uses and how it routes images: the model side of the embed job's configuration.

Its own module below ``embed`` so that the model stage (the worker, the scorer resolver) and the embed driver
share one definition without the model stage importing the Ray wiring.
"""

from __future__ import annotations

from dataclasses import dataclass


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
    merge: str | None = None  # token-merging schedule (r2, keep0.8) for every image at exit_at or full depth: a one-profile router
