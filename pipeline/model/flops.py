"""Counted GFLOPs: what each exit depth of the image tower costs per image, counted once per model and cached.

Counting, not estimating: ``torch.utils.flop_counter.FlopCounterMode`` (a multiply-add = 2 FLOPs), run
with grad enabled, on inputs that require grad, inside ``sdpa_kernel(SDPBackend.MATH)``. Both conditions
matter (ANCHORS.md): under no_grad in eval, ``nn.MultiheadAttention``'s fused fast path is invisible to the
counter (ViT-L-14 image tower 103.8 instead of 162.03), and with grad on, CPU SDPA's flash kernel hides the
attention score matmuls (155.5). Counted this way, the figures equal open_clip's published profile
(ViT-B-32 image tower 8.82, ViT-L-14 162.03, its text tower 13.30).

Per-image accounting in ICAR is the image tower up to the exit (plus the scorer, added by the caller); the
text tower is spent per query, not per image.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import uuid
from pathlib import Path
from typing import Any, Callable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

log = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when the counting method changes, so stale figures are recounted
_memory: dict[str, dict] = {}
_lock = threading.Lock()


def _requiring_grad(x: Any) -> Any:
    """Return ``x`` with floating tensors detached, cloned and requiring grad (disables every fused fast path)."""
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.detach().clone().requires_grad_(True)
    return x


def count_gflops(fn_or_module: Callable | torch.nn.Module, *example_inputs: Any) -> float:
    """Return the GFLOPs of one call ``fn_or_module(*example_inputs)``, counted with FlopCounterMode.

    Grad is enabled, floating inputs require grad (so frozen or eval modules cannot take MHA's fast path),
    and SDPA is forced onto its MATH backend, whose matmuls the counter sees.
    """
    inputs = [_requiring_grad(x) for x in example_inputs]
    counter = FlopCounterMode(display=False)
    with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        fn_or_module(*inputs)
    return counter.get_total_flops() / 1e9


def cache_path() -> Path:
    """Return the JSON cache file: $ICAR_CACHE_DIR/flops.json, else ~/.cache/icar/flops.json."""
    root = os.environ.get("ICAR_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "icar")
    return Path(root) / "flops.json"


def _read_cache(path: Path) -> dict:
    """Return the cache file's entries; a missing or unreadable file is an empty cache (it is only a cache)."""
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.warning("ignoring unreadable GFLOP cache %s (%s); counting afresh", path, e)
        return {}
    return doc if isinstance(doc, dict) else {}


def _write_cache(path: Path, key: str, entry: dict) -> None:
    """Add ``entry`` under ``key`` to the cache file (read-modify-write, atomic rename; last writer wins)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = _read_cache(path)
        doc[key] = entry
        tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex}")
        tmp.write_text(json.dumps(doc, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError as e:  # a read-only home must not stop an embedding job; the figures are still in memory
        log.warning("could not write GFLOP cache %s: %s", path, e)


def _cache_key(bundle) -> str:
    from pipeline.model.models import model_key

    return f"v{CACHE_VERSION}|{model_key(bundle.identity)}|{bundle.image_size}"


def counted_gflops(fn, *args):
    """Return (fn(*args), GFLOPs it counted): one FlopCounterMode around one call (the caller sets the recipe)."""
    counter = FlopCounterMode(display=False)
    with counter:
        out = fn(*args)
    return out, counter.get_total_flops() / 1e9


def count_tower_profile(visual: torch.nn.Module, image_size: int) -> dict:
    """Return per-image GFLOPs of an open_clip ViT tower's parts, counted in ONE batch-1 forward pass.

    {"stem": patch embedding + class/pos tokens, "blocks": [each block], "exit_head": one early-exit head,
    "final_head": the tower's own ln_post/pooling/proj}. Heads of every early exit are alike (LayerNorm +
    the same projection), so one is counted.
    """
    from pipeline.model.encoder import ExitHead, _check_visual

    _check_visual(visual, [len(visual.transformer.resblocks)])
    device = next(visual.parameters()).device
    dtype = next(visual.parameters()).dtype
    x = torch.zeros(1, 3, image_size, image_size, device=device, dtype=dtype, requires_grad=True)
    profile: dict = {"blocks": []}

    with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
        tokens, profile["stem"] = counted_gflops(visual._embeds, x)
        for blk in visual.transformer.resblocks:
            tokens, g = counted_gflops(blk, tokens)
            profile["blocks"].append(g)
        head = ExitHead(visual).to(device) if getattr(visual, "attn_pool", None) is None \
            and visual.pool_type in ("tok", "avg") else None
        profile["exit_head"] = counted_gflops(head, tokens)[1] if head is not None else None

        def final(t):
            pooled, _ = visual._pool(t)
            return pooled @ visual.proj if visual.proj is not None else pooled

        profile["final_head"] = counted_gflops(final, tokens)[1]
    return profile


def exit_gflops_from_profile(profile: dict, exits: list[int]) -> dict[int, float]:
    """Return {exit: per-image GFLOPs of the image tower up to and including that exit's head}."""
    blocks = profile["blocks"]
    out = {}
    for e in exits:
        if not 1 <= e <= len(blocks):
            raise ValueError(f"exit {e} is outside 1..{len(blocks)} for this tower")
        head = profile["final_head"] if e == len(blocks) else profile["exit_head"]
        if head is None:
            raise ValueError(f"this tower has no early-exit heads (attentional pooling); exit {e} is not countable")
        out[int(e)] = float(profile["stem"] + sum(blocks[:e]) + head)
    return out


def tower_profile(bundle, use_cache: bool = True) -> dict:
    """Return the counted per-part profile of ``bundle``'s image tower, from the memory/file cache when present."""
    key = _cache_key(bundle)
    path = cache_path()
    with _lock:
        if use_cache and key in _memory:
            return _memory[key]
        if use_cache:
            entry = _read_cache(path).get(key)
            if entry and "blocks" in entry and len(entry["blocks"]) == bundle.num_blocks:
                _memory[key] = entry
                return entry
        profile = count_tower_profile(bundle.model.visual, bundle.image_size)
        profile["torch"] = torch.__version__
        _memory[key] = profile
        _write_cache(path, key, profile)
    log.info("counted GFLOPs of %s: %.3f per image at full depth",
             bundle.identity.get("name"), exit_gflops_from_profile(profile, [bundle.num_blocks])[bundle.num_blocks])
    return profile


def exit_gflops(bundle, exits: list[int]) -> dict[int, float]:
    """Return {exit depth: per-image GFLOPs of the image tower up to that exit}, cached per model identity."""
    return exit_gflops_from_profile(tower_profile(bundle), list(exits))


def text_gflops(bundle) -> float:
    """Return GFLOPs of encoding one text query (the text tower, spent per query, not per image)."""
    tokens = bundle.tokenizer(["a photo"]).to(next(bundle.model.parameters()).device)
    # Token ids are integers: make the text tower's float activations require grad through the embedding
    # weights instead, so MHA cannot take its fused fast path.
    params = [p for p in bundle.model.parameters()]
    saved = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        return count_gflops(bundle.model.encode_text, tokens)
    finally:
        for p, r in zip(params, saved):
            p.requires_grad_(r)
