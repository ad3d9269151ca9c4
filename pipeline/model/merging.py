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

How many tokens each block merges is a ``MergeSchedule`` (``pipeline.model.spec``, written as a short spec
string that run.json and router files carry):

- ``r4``: merge 4 tokens in every block (ToMe's constant r);
- ``keep0.8``: every block keeps 80% of its mergeable (non-class) tokens, i.e. merges round(0.2 × them);
- a suffix ``:noprop`` turns proportional attention off (default on, as in ToMe for off-the-shelf models).

Bipartite matching can at most halve the mergeable tokens in one block; larger requests are clamped, and
``MergeSchedule.token_counts`` gives the token count every block really sees. What a merged forward costs is
counted with the exits' costs, in one profile per (model, schedule): ``pipeline.model.flops``.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.model.spec import MergeSchedule


def check_mergeable(visual: nn.Module) -> None:
    """Raise a clear error unless ``visual``'s blocks are open_clip ResidualAttentionBlocks we can re-run."""
    # Lazy: open_clip takes ~2 s to import and only this check needs its classes; flops (and through it the
    # scorer and the jobs that only score) import this module without ever building a CLIP.
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
