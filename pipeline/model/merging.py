"""Token merging (ToMe) for open_clip ViT image towers: fewer tokens per block instead of fewer blocks.

ToMe (Bolya et al., ICLR 2023) merges the r most similar token pairs in every block, between attention and
MLP, by bipartite soft matching: tokens alternate into sets A and B, each A token's best match in B (cosine
similarity of the attention keys, averaged over heads) is scored, and the r best-matched A tokens are folded
into their B partners by a size-weighted average. Each token carries its size (how many patches it stands
for); with proportional attention the softmax adds log(size) to every key, so a merged token is attended to
as much as the patches it replaced. The class token is never merged and always stays first, so class-token
pooling reads it where it always was; average pooling weighs each token by its size.

Here the blocks of open_clip's ``ResidualAttentionBlock`` are run submodule by submodule (``ln_1``, the
attention's own in/out projections, ``ls_1``, merge, ``ln_2``, ``mlp``, ``ls_2``): nothing of open_clip is
patched. A block whose schedule merges nothing, before any merge happened, is called as it is, so with
merging off (schedule ``None``) every output is bit-identical to the tower without merging.

Schedules (``MergeSchedule``, written as a short spec string that run.json and router files carry):

- ``r4``: merge 4 tokens in every block (ToMe's constant r);
- ``keep0.8``: every block keeps 80% of its mergeable (non-class) tokens, i.e. merges round(0.2 × them);
- a suffix ``:noprop`` turns proportional attention off (default on, as in ToMe for off-the-shelf models).

Bipartite matching can at most halve the mergeable tokens in one block; larger requests are clamped, and
``MergeSchedule.token_counts`` gives the token count every block really sees.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

_SPEC = re.compile(r"^(?:r(?P<r>\d+)|keep(?P<keep>\d*\.?\d+))(?P<noprop>:noprop)?$")


@dataclass(frozen=True)
class MergeSchedule:
    """How many tokens each block merges: ``r`` per block, or a ``keep`` ratio of each block's mergeable tokens."""

    r: int | None = None  # tokens merged in every block (constant r)
    keep: float | None = None  # share of mergeable tokens each block keeps, in (0, 1]
    prop_attn: bool = True  # proportional attention: add log(size) to the attention logits

    def __post_init__(self):
        if (self.r is None) == (self.keep is None):
            raise ValueError("a merge schedule needs exactly one of r (tokens per block) or keep (ratio per block)")
        if self.r is not None and (not isinstance(self.r, int) or self.r < 0):
            raise ValueError(f"merge r must be a non-negative int (tokens merged per block), got {self.r!r}")
        if self.keep is not None and not 0.0 < float(self.keep) <= 1.0:
            raise ValueError(f"merge keep ratio must lie in (0, 1], got {self.keep!r}")

    @property
    def spec(self) -> str:
        """Return the short spec string (``r4``, ``keep0.8``, ``r4:noprop``) that ``parse_merge`` reads back."""
        base = f"r{self.r}" if self.r is not None else f"keep{float(self.keep):g}"
        return base if self.prop_attn else base + ":noprop"

    def __str__(self) -> str:
        return self.spec

    def merges(self, num_tokens: int, num_blocks: int) -> list[int]:
        """Return the tokens merged in each of ``num_blocks`` blocks for an input of ``num_tokens`` (class included)."""
        out, t = [], int(num_tokens)
        for _ in range(num_blocks):
            mergeable = t - 1  # the class token never merges
            want = self.r if self.r is not None else int(round((1.0 - float(self.keep)) * mergeable))
            r = max(0, min(int(want), mergeable // 2))  # bipartite matching halves at most
            out.append(r)
            t -= r
        return out

    def token_counts(self, num_tokens: int, num_blocks: int) -> list[int]:
        """Return [tokens entering block 1, ..., entering block n, leaving block n] (class token included)."""
        counts = [int(num_tokens)]
        for r in self.merges(num_tokens, num_blocks):
            counts.append(counts[-1] - r)
        return counts


def parse_merge(spec: str | MergeSchedule | None) -> MergeSchedule | None:
    """Return the MergeSchedule of ``spec`` (``r4``, ``keep0.8``, ``...:noprop``); ``none``/None/empty gives None."""
    if spec is None or isinstance(spec, MergeSchedule):
        return spec
    s = str(spec).strip().lower()
    if s in ("", "none", "off"):
        return None
    m = _SPEC.match(s)
    if not m:
        raise ValueError(f"merge schedule {spec!r} is not understood; write r<N> (merge N tokens per block, e.g. r4), "
                         "keep<RATIO> (each block keeps that share, e.g. keep0.8), optionally with ':noprop', or none")
    prop = m.group("noprop") is None
    if m.group("r") is not None:
        return MergeSchedule(r=int(m.group("r")), prop_attn=prop)
    return MergeSchedule(keep=float(m.group("keep")), prop_attn=prop)


def merge_spec(schedule: MergeSchedule | None) -> str:
    """Return the spec string of ``schedule`` ("none" for no merging)."""
    return schedule.spec if schedule is not None else "none"


def check_mergeable(visual: nn.Module) -> None:
    """Raise a clear error unless ``visual``'s blocks are open_clip ResidualAttentionBlocks we can re-run."""
    from open_clip.transformer import ResidualAttentionBlock

    for i, blk in enumerate(visual.transformer.resblocks):
        if not isinstance(blk, ResidualAttentionBlock) or not isinstance(blk.attn, nn.MultiheadAttention):
            raise NotImplementedError(f"token merging runs open_clip ResidualAttentionBlocks with nn.MultiheadAttention; "
                                      f"block {i} is {type(blk).__name__}/{type(getattr(blk, 'attn', None)).__name__}")
        if hasattr(blk, "ln_1_kv") or not blk.attn._qkv_same_embed_dim or blk.attn.bias_k is not None:
            raise NotImplementedError(f"token merging needs self-attention with one packed qkv projection; block {i} "
                                      "has cross-attention or separate k/v projections")
    if not getattr(visual.transformer, "batch_first", True):
        raise NotImplementedError("token merging needs a batch-first transformer (open_clip >= 2.24)")


# ------------------------------------------------------------------------------------------------ ToMe core

def _attention(attn: nn.MultiheadAttention, x: torch.Tensor, size: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (self-attention output (B, N, C), matching metric: keys averaged over heads (B, N, C/heads)).

    The same computation as ``nn.MultiheadAttention`` (packed in-projection, scaled dot product, out-projection),
    with log(size) added to the logits when ``size`` (B, N, 1) is given (proportional attention).
    """
    b, n, c = x.shape
    h = attn.num_heads
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = qkv.reshape(b, n, 3, h, c // h).permute(2, 0, 3, 1, 4)  # each (B, heads, N, head_dim)
    bias = None
    if size is not None:
        bias = size.log().to(q.dtype).reshape(b, 1, 1, n)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                         dropout_p=attn.dropout if attn.training else 0.0)
    out = F.linear(out.transpose(1, 2).reshape(b, n, c), attn.out_proj.weight, attn.out_proj.bias)
    return out, k.mean(dim=1)


def bipartite_soft_matching(metric: torch.Tensor, r: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Return ``merge(x)``: sums x (B, N, C) over the r best-matched token pairs, keeping the class token first.

    Tokens at even positions form set A (the class token, position 0, is in A and never chosen), odd ones set B.
    Each A token's most similar B token (cosine of ``metric``) is its partner; the r A tokens with the highest
    similarity are added into their partners. Output order: unmerged A tokens in their original order (class
    token first), then all B tokens. ``merge`` sums; a size-weighted average is ``merge(x*s) / merge(s)``.
    """
    n_tokens = metric.shape[1]
    r = min(int(r), (n_tokens - 1) // 2)
    if r <= 0:
        return lambda x: x
    with torch.no_grad():  # the matching is a discrete choice; no gradient flows through it
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[:, ::2], metric[:, 1::2]
        scores = a @ b.transpose(-1, -2)
        scores[:, 0, :] = -math.inf  # the class token is never merged
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
        unm_idx = edge_idx[:, r:].sort(dim=1)[0]  # kept A tokens, in original order: the class token stays first
        src_idx = edge_idx[:, :r]
        dst_idx = node_idx[..., None].gather(dim=1, index=src_idx)

    def merge(x: torch.Tensor) -> torch.Tensor:
        src, dst = x[:, ::2], x[:, 1::2]
        bsz, t1, c = src.shape
        unm = src.gather(dim=1, index=unm_idx.expand(bsz, t1 - r, c))
        src = src.gather(dim=1, index=src_idx.expand(bsz, r, c))
        dst = dst.scatter_reduce(1, dst_idx.expand(bsz, r, c), src, reduce="sum")
        return torch.cat([unm, dst], dim=1)

    return merge


def merge_wavg(merge: Callable, x: torch.Tensor, size: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (size-weighted averages of merged tokens, their sizes (B, N', 1)); ``size`` None means all ones."""
    if size is None:
        size = torch.ones_like(x[..., :1])
    size = size.to(x.dtype)
    # One gather/scatter for both: the size rides along as an extra channel (the same sums, half the small ops,
    # which at a few tokens per image cost more than the arithmetic).
    both = merge(torch.cat([x * size, size], dim=-1))
    total = both[..., -1:]
    return (both[..., :-1] / total).to(x.dtype), total


def run_block(blk: nn.Module, x: torch.Tensor, size: torch.Tensor | None, r: int, prop_attn: bool = True
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Return (tokens, sizes) after one open_clip block that merges ``r`` tokens between attention and MLP.

    With nothing to merge and no sizes yet (``r == 0`` and ``size is None``), this is ``blk(x)`` itself.
    """
    if r <= 0 and (size is None or not prop_attn):
        return blk(x), size
    attn_out, metric = _attention(blk.attn, blk.ln_1(x), size if prop_attn else None)
    x = x + blk.ls_1(attn_out)
    if r > 0:
        x, size = merge_wavg(bipartite_soft_matching(metric, r), x, size)
    x = x + blk.ls_2(blk.mlp(blk.ln_2(x)))
    return x, size


def run_blocks(blocks, x: torch.Tensor, size: torch.Tensor | None, schedule: MergeSchedule | None,
               start: int, stop: int, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Return (tokens, sizes) after blocks ``start..stop-1`` (0-based) under ``schedule``.

    ``num_tokens`` is the tower's token count at the input of block 0, which fixes the schedule's r per block.
    """
    if schedule is None:
        for blk in blocks[start:stop]:
            x = blk(x)
        return x, size
    rs = schedule.merges(num_tokens, len(blocks))
    for i in range(start, stop):
        x, size = run_block(blocks[i], x, size, rs[i], schedule.prop_attn)
    return x, size


# ------------------------------------------------------------------------------------------------ pooling

def _weighted_patch_mean(values: torch.Tensor, size: torch.Tensor | None) -> torch.Tensor:
    """Return the mean over patch tokens (all but the class token), each weighted by the patches it stands for."""
    if size is None:
        return values[:, 1:].mean(dim=1)
    w = size[:, 1:].to(values.dtype)
    return (values[:, 1:] * w).sum(dim=1) / w.sum(dim=1)


def pool_tower(visual: nn.Module, tokens: torch.Tensor, size: torch.Tensor | None) -> torch.Tensor:
    """Return the tower's own output (ln_post, pooling, proj) for merged tokens; ``size`` None is ``visual._pool``."""
    if size is None or visual.pool_type != "avg":
        pooled, _ = visual._pool(tokens)  # class token: position 0, unmoved by merging
    elif getattr(visual, "final_ln_after_pool", False):
        pooled = visual.ln_post(_weighted_patch_mean(tokens, size))
    else:
        pooled = _weighted_patch_mean(visual.ln_post(tokens), size)
    return pooled @ visual.proj if visual.proj is not None else pooled


def pool_head(head: nn.Module, tokens: torch.Tensor, size: torch.Tensor | None) -> torch.Tensor:
    """Return an ExitHead's parameter-free pooled features of merged tokens (size-weighted for avg pooling)."""
    if size is None or head.pool_type == "tok":
        return head.pool_features(tokens)
    if head.final_ln_after_pool:
        return _weighted_patch_mean(tokens, size)
    normed = F.layer_norm(tokens.float(), head.ln.normalized_shape, None, None, head.ln.eps)
    return _weighted_patch_mean(normed, size.float()).to(tokens.dtype)


def encode_image(visual: nn.Module, pixels: torch.Tensor, schedule: MergeSchedule | None) -> torch.Tensor:
    """Return the tower's (unnormalised) embeddings of ``pixels`` with tokens merged by ``schedule``.

    ``schedule`` None is ``visual(pixels)`` computed block by block (bit-identical).
    """
    if schedule is not None:
        check_mergeable(visual)
    x = visual._embeds(pixels)
    blocks = visual.transformer.resblocks
    x, size = run_blocks(blocks, x, None, schedule, 0, len(blocks), x.shape[1])
    return pool_tower(visual, x, size)


# ------------------------------------------------------------------------------------------------ GFLOPs

def count_merged_profile(visual: nn.Module, image_size: int, schedule: MergeSchedule | None) -> dict:
    """Return per-image GFLOPs of the tower's parts under ``schedule``, counted in one batch-1 forward pass.

    The same recipe and layout as ``pipeline.model.flops.count_tower_profile`` ({"stem", "blocks", "exit_head",
    "final_head"}), plus "tokens": the token count entering each block and leaving the last, and "merge": the
    spec. The matching itself (one similarity matmul per merging block) is counted in the block that merges.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from pipeline.model.encoder import ExitHead, _check_visual
    from pipeline.model.flops import counted_gflops

    if schedule is None:
        from pipeline.model.flops import count_tower_profile

        profile = count_tower_profile(visual, image_size)
        n = visual.positional_embedding.shape[0]
        profile["tokens"] = [int(n)] * (len(visual.transformer.resblocks) + 1)
        profile["merge"] = "none"
        return profile
    _check_visual(visual, [len(visual.transformer.resblocks)])
    check_mergeable(visual)
    p = next(visual.parameters())
    x = torch.zeros(1, 3, image_size, image_size, device=p.device, dtype=p.dtype, requires_grad=True)
    blocks = visual.transformer.resblocks
    profile: dict = {"blocks": [], "tokens": [], "merge": schedule.spec}

    with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
        tokens, profile["stem"] = counted_gflops(visual._embeds, x)
        rs = schedule.merges(tokens.shape[1], len(blocks))
        size = None
        for blk, r in zip(blocks, rs):
            profile["tokens"].append(int(tokens.shape[1]))
            (tokens, size), g = counted_gflops(run_block, blk, tokens, size, r, schedule.prop_attn)
            profile["blocks"].append(g)
        profile["tokens"].append(int(tokens.shape[1]))
        if getattr(visual, "attn_pool", None) is None and visual.pool_type in ("tok", "avg"):
            head = ExitHead(visual).to(p.device)
            profile["exit_head"] = counted_gflops(lambda t, s: head.from_features(pool_head(head, t, s)), tokens, size)[1]
        else:
            profile["exit_head"] = None
        profile["final_head"] = counted_gflops(pool_tower, visual, tokens, size)[1]
    return profile


def profile_gflops(bundle, schedule: MergeSchedule | None, use_cache: bool = True) -> dict:
    """Return the counted per-part profile of ``bundle``'s tower under ``schedule``, cached like pipeline.model.flops."""
    from pipeline.model import flops

    if schedule is None:
        prof = dict(flops.tower_profile(bundle, use_cache))
        prof.setdefault("tokens", [int(bundle.model.visual.positional_embedding.shape[0])] * (bundle.num_blocks + 1))
        prof["merge"] = "none"
        return prof
    key = f"{flops._cache_key(bundle)}|merge={schedule.spec}"
    path = flops.cache_path()
    with flops._lock:
        if use_cache and key in flops._memory:
            return flops._memory[key]
        if use_cache:
            entry = flops._read_cache(path).get(key)
            if entry and len(entry.get("blocks", [])) == bundle.num_blocks:
                flops._memory[key] = entry
                return entry
        prof = count_merged_profile(bundle.model.visual, bundle.image_size, schedule)
        prof["torch"] = torch.__version__
        flops._memory[key] = prof
        flops._write_cache(path, key, prof)
    return prof


# ------------------------------------------------------------------------------------------------ profiles

@dataclass(frozen=True)
class Profile:
    """What one image computes: its exit depth and the token-merging schedule on the way (None: no merging)."""

    exit: int
    merge: MergeSchedule | None = None

    @property
    def spec(self) -> str:
        """Return ``DEPTH`` or ``DEPTH@SCHEDULE`` (e.g. ``12``, ``12@keep0.8``), what router files and run.json carry."""
        return str(self.exit) if self.merge is None else f"{self.exit}@{self.merge.spec}"

    def __str__(self) -> str:
        return self.spec


def parse_profile(spec: str | Profile) -> Profile:
    """Return the Profile of ``DEPTH`` or ``DEPTH@SCHEDULE`` (``8``, ``8@r2``, ``6@keep0.8:noprop``)."""
    if isinstance(spec, Profile):
        return spec
    depth, _, merge = str(spec).strip().partition("@")
    try:
        exit_ = int(depth)
    except ValueError:
        raise ValueError(f"profile {spec!r} must be DEPTH or DEPTH@SCHEDULE, e.g. 8 or 8@keep0.8") from None
    if exit_ < 1:
        raise ValueError(f"profile {spec!r}: the exit depth must be a positive block count")
    return Profile(exit_, parse_merge(merge) if merge else None)


def parse_profiles(specs: str | list) -> list[Profile]:
    """Return the profiles of a comma-separated string or a list (``4,6,8@keep0.8,8``), unique, in given order."""
    items = [s for s in specs.split(",")] if isinstance(specs, str) else list(specs)
    out = [parse_profile(s) for s in items if str(s).strip()]
    if not out:
        raise ValueError("no profiles given; e.g. --profiles 4,6,8@keep0.8,8")
    if len({p.spec for p in out}) != len(out):
        raise ValueError(f"profiles must be unique, got {[p.spec for p in out]}")
    return out


def profile_cost(bundle, profile: Profile) -> float:
    """Return the counted per-image GFLOPs of the image tower under ``profile`` (exit head included)."""
    from pipeline.model.flops import exit_gflops_from_profile

    return exit_gflops_from_profile(profile_gflops(bundle, profile.merge), [profile.exit])[profile.exit]
