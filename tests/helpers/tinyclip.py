"""A CLIP small enough to build in milliseconds, shared by the model, encoder and merging tests: a 4-block ViT
(width 64) on 32 px images with a 2-block text tower, seeded random weights."""

from __future__ import annotations

import copy

from pipeline.model import models

TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 4, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def tiny(seed: int = 0, **vision) -> models.ClipBundle:
    """Return the tiny CLIP built from ``seed``, with ``vision`` overriding fields of its vision config."""
    cfg = copy.deepcopy(TINY)
    cfg["vision_cfg"].update(vision)
    return models.bundle_from_config(cfg, seed=seed, name="tiny")
