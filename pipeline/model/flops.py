"""Counted GFLOPs: what each exit depth of the image tower costs per image, counted once per model and cached.

Counting, not estimating: ``torch.utils.flop_counter.FlopCounterMode`` (a multiply-add = 2 FLOPs), run
with grad enabled, on inputs that require grad, inside ``sdpa_kernel(SDPBackend.MATH)``. Both conditions
matter (ANCHORS.md): under no_grad in eval, ``nn.MultiheadAttention``'s fused fast path is invisible to the
counter (ViT-L-14 image tower 103.8 instead of 162.03), and with grad on, CPU SDPA's flash kernel hides the
attention score matmuls (155.5). Counted this way, the figures equal open_clip's published profile
(ViT-B-32 image tower 8.82, ViT-L-14 162.03, its text tower 13.30).

Per-image accounting in ICAR is the image tower up to the exit (plus the scorer, added by the caller); the
text tower is spent per query, not per image.

One profile per (model, token-merging schedule) is counted and cached: the per-part GFLOPs of one batch-1
forward pass (stem, each block, an early-exit head, the tower's own head). The exits' costs (``exit_gflops``)
and the merged profiles' costs (``profile_cost``) are both sums over it; without merging, the schedule is
"none" and the forward is the unmodified tower.
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

from pipeline.io.schema import model_key
from pipeline.model.merging import check_mergeable, pool_head, pool_tower, run_block
from pipeline.model.spec import MergeSchedule, Profile, merge_spec
from pipeline.model.tower import ExitHead, check_visual, has_early_exit_heads

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


def cached_gflops(key: str, count) -> float:
    """Return the per-image GFLOPs cached under ``key`` (this process, then the cache file), else ``count()``,
    cached under it for later runs.

    For figures fixed by what ``key`` names, e.g. a scorer checkpoint's sha256 and input size: its FlopCounterMode
    pass costs a model actor seconds of start-up in every run otherwise (0.3-GFLOP MobileNetV2, 2 cores: ~1 s
    quiet, 4 s loaded).
    """
    full = f"v{CACHE_VERSION}|{key}"
    path = cache_path()
    with _lock:
        entry = _memory.get(full) or _read_cache(path).get(full)
        if isinstance(entry, dict) and isinstance(entry.get("gflops"), (int, float)):
            _memory[full] = entry
            return float(entry["gflops"])
        entry = {"gflops": float(count()), "torch": torch.__version__}
        _memory[full] = entry
        _write_cache(path, full, entry)
    return entry["gflops"]


def _cache_key(bundle, schedule: MergeSchedule | None) -> str:
    """Return the cache key of ``bundle``'s profile under ``schedule`` (the unmerged key has no merge suffix,
    as in the cache files written before merged profiles shared this cache)."""
    key = f"v{CACHE_VERSION}|{model_key(bundle.identity)}|{bundle.image_size}"
    return key if schedule is None else f"{key}|merge={schedule.spec}"


def counted_gflops(fn, *args):
    """Return (fn(*args), GFLOPs it counted): one FlopCounterMode around one call (the caller sets the recipe)."""
    counter = FlopCounterMode(display=False)
    with counter:
        out = fn(*args)
    return out, counter.get_total_flops() / 1e9


def count_tower_profile(visual: torch.nn.Module, image_size: int, schedule: MergeSchedule | None = None) -> dict:
    """Return per-image GFLOPs of an open_clip ViT tower's parts under ``schedule``, counted in ONE batch-1 pass.

    {"stem": patch embedding + class/pos tokens, "blocks": [each block], "exit_head": one early-exit head,
    "final_head": the tower's own ln_post/pooling/proj, "tokens": the token count entering each block and
    leaving the last, "merge": the schedule's spec ("none": no merging)}. Heads of every early exit are alike
    (LayerNorm + the same projection), so one is counted. Under a schedule, the matching itself (one similarity
    matmul per merging block) is counted in the block that merges; with ``schedule`` None every block runs as it
    is (``merging.run_block`` with nothing to merge is the block itself).
    """
    blocks = visual.transformer.resblocks
    check_visual(visual, [len(blocks)])
    if schedule is not None:
        check_mergeable(visual)
    p = next(visual.parameters())
    x = torch.zeros(1, 3, image_size, image_size, device=p.device, dtype=p.dtype, requires_grad=True)
    profile: dict = {"blocks": [], "tokens": [], "merge": merge_spec(schedule)}

    with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
        tokens, profile["stem"] = counted_gflops(visual._embeds, x)
        rs = schedule.merges(tokens.shape[1], len(blocks)) if schedule is not None else [0] * len(blocks)
        prop_attn = schedule.prop_attn if schedule is not None else True
        size = None
        for blk, r in zip(blocks, rs):
            profile["tokens"].append(int(tokens.shape[1]))
            (tokens, size), g = counted_gflops(run_block, blk, tokens, size, r, prop_attn)
            profile["blocks"].append(g)
        profile["tokens"].append(int(tokens.shape[1]))
        if has_early_exit_heads(visual):
            head = ExitHead(visual).to(p.device)
            profile["exit_head"] = counted_gflops(lambda t, s: head.from_features(pool_head(head, t, s)), tokens, size)[1]
        else:
            profile["exit_head"] = None
        profile["final_head"] = counted_gflops(pool_tower, visual, tokens, size)[1]
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


def tower_profile(bundle, schedule: MergeSchedule | None = None, use_cache: bool = True) -> dict:
    """Return the counted per-part profile of ``bundle``'s image tower under ``schedule`` (None: no merging),
    from the memory/file cache when present; counted once per (model, schedule) and cached under ICAR_CACHE_DIR."""
    key = _cache_key(bundle, schedule)
    path = cache_path()
    with _lock:
        if use_cache and key in _memory:
            return _memory[key]
        if use_cache:
            entry = _read_cache(path).get(key)
            if entry and len(entry.get("blocks", [])) == bundle.num_blocks:
                # Entries written before the unmerged profile carried its token counts: every block sees them all.
                entry.setdefault("tokens", [int(bundle.model.visual.positional_embedding.shape[0])]
                                 * (bundle.num_blocks + 1))
                entry.setdefault("merge", merge_spec(schedule))
                _memory[key] = entry
                return entry
        profile = count_tower_profile(bundle.model.visual, bundle.image_size, schedule)
        profile["torch"] = torch.__version__
        _memory[key] = profile
        _write_cache(path, key, profile)
    if schedule is None:
        log.info("counted GFLOPs of %s: %.3f per image at full depth", bundle.identity.get("name"),
                 exit_gflops_from_profile(profile, [bundle.num_blocks])[bundle.num_blocks])
    return profile


def exit_gflops(bundle, exits: list[int]) -> dict[int, float]:
    """Return {exit depth: per-image GFLOPs of the image tower up to that exit}, cached per model identity."""
    return exit_gflops_from_profile(tower_profile(bundle), list(exits))


def profile_cost(bundle, profile: Profile) -> float:
    """Return the counted per-image GFLOPs of the image tower under ``profile`` (exit head included)."""
    return exit_gflops_from_profile(tower_profile(bundle, profile.merge), [profile.exit])[profile.exit]


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
