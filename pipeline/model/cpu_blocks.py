"""open_clip ViT blocks run on a CPU through oneDNN's linear kernels: the same arithmetic, less time.

open_clip's ``ResidualAttentionBlock`` runs its four matmuls as aten ``addmm``/``mm`` (MKL's sgemm for float32)
inside ``nn.MultiheadAttention``'s fast path, which adds a separate bias-and-rescale pass over q, k and v. The
same block written with oneDNN's ``mkldnn._linear_pointwise`` (bias added in the kernel, exact GELU fused into the
first MLP matmul) and ``scaled_dot_product_attention`` computes the same function: on ViT-B-32, batch 32, 2 threads,
AMD EPYC with AVX-512, 1.2x the images/s of the stock block in float32 and ~1.07x in bfloat16, embeddings at cosine
>= 0.9999998 to the stock ones in float32 (docs/benchmarks/vs-clip-retrieval.md). In float32 the weights are used
as they are; in bfloat16 they are packed once into oneDNN's layout (1.08x more, for a second copy of the block
weights: ~170 MB for ViT-B-32, ~600 MB for ViT-L-14; ``ICAR_CPU_KERNELS=onednn-inplace`` declines the copy).

Only for inference on a CPU, and only on blocks of exactly the stock shape (anything else: LayerScale is fine,
cross-attention, masks, biases on k/v, non-batch-first attention are not) is a block replaced; the rest run as
open_clip wrote them. ``fast_blocks`` checks its own output against the stock block on a small batch before it is
used, and gives up (saying why) if they disagree. ``ICAR_CPU_KERNELS=torch`` turns it off. Token merging, training
and GFLOP counting always run the original modules.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

ENV = "ICAR_CPU_KERNELS"  # "torch": open_clip's own block forward; unset or "onednn": this module where it applies


def _linear_op():
    """Return oneDNN's fused linear op, or None where this torch build has none."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return None


def unsupported(block: nn.Module) -> str | None:
    """Return why ``block`` cannot run as a ``OneDnnBlock`` (None when it can)."""
    attn = getattr(block, "attn", None)
    mlp = getattr(block, "mlp", None)
    if not isinstance(attn, nn.MultiheadAttention):
        return f"{type(block).__name__} has no nn.MultiheadAttention 'attn'"
    if not attn.batch_first or not attn._qkv_same_embed_dim or attn.bias_k is not None or attn.add_zero_attn:
        return "its attention is not batch-first self-attention with one packed q/k/v projection"
    if hasattr(block, "ln_1_kv"):
        return "it is a cross-attention block"
    for name in ("ln_1", "ln_2", "ls_1", "ls_2"):
        if not isinstance(getattr(block, name, None), nn.Module):
            return f"it has no {name}"
    if not isinstance(mlp, nn.Sequential) or [n for n, _ in mlp.named_children()] != ["c_fc", "gelu", "c_proj"]:
        return "its MLP is not c_fc -> activation -> c_proj"
    if not (isinstance(mlp.c_fc, nn.Linear) and isinstance(mlp.c_proj, nn.Linear)):
        return "its MLP layers are not nn.Linear"
    if type(block).forward is not _stock_forward():
        return f"{type(block).__name__} overrides the stock forward"
    return None


def _stock_forward():
    from open_clip.transformer import ResidualAttentionBlock  # lazy: open_clip imports torchvision (~2 s)

    return ResidualAttentionBlock.forward


class OneDnnBlock(nn.Module):
    """One open_clip ``ResidualAttentionBlock`` computed with oneDNN linear kernels (shares the block's tensors)."""

    def __init__(self, block: nn.Module, linear, pack=None):
        """``pack``: None uses the block's weights in place; else a function (weight -> oneDNN's packed layout of
        it) whose copies the kernels read instead (bfloat16: measured ~1.08x, for one more copy of the weights)."""
        super().__init__()
        attn, mlp = block.attn, block.mlp
        self.linear = linear
        self.heads = attn.num_heads
        self.ln_1, self.ln_2, self.ls_1, self.ls_2 = block.ln_1, block.ln_2, block.ls_1, block.ls_2
        w = (lambda t: t.detach()) if pack is None else (lambda t: pack(t.detach()))
        self.qkv = (w(attn.in_proj_weight), attn.in_proj_bias)
        self.out = (w(attn.out_proj.weight), attn.out_proj.bias)
        self.fc = (w(mlp.c_fc.weight), mlp.c_fc.bias)
        self.proj = (w(mlp.c_proj.weight), mlp.c_proj.bias)
        act = mlp.gelu
        # Exact (erf) GELU and its tanh form are oneDNN post-ops of the first MLP matmul; any other activation
        # (QuickGELU of the OpenAI checkpoints) runs as its own module after it.
        self.fused = act.approximate if isinstance(act, nn.GELU) else None
        self.act = act

    def _lin(self, x: torch.Tensor, wb, post: str = "none", algorithm: str = "") -> torch.Tensor:
        return self.linear(x, wb[0], wb[1], post, [], algorithm)

    def forward(self, x: torch.Tensor, attn_mask=None) -> torch.Tensor:
        if attn_mask is not None:
            raise ValueError("OneDnnBlock runs unmasked self-attention only (the vision tower's)")
        n, t, d = x.shape
        qkv = self._lin(self.ln_1(x).reshape(n * t, d), self.qkv)
        q, k, v = qkv.reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n * t, d)
        x = x + self.ls_1(self._lin(a, self.out).reshape(n, t, d))
        h = self.ln_2(x).reshape(n * t, d)
        h = self._lin(h, self.fc, "gelu", self.fused) if self.fused is not None else self.act(self._lin(h, self.fc))
        return x + self.ls_2(self._lin(h, self.proj).reshape(n, t, d))


@dataclass
class BlockKernels:
    """What ``fast_blocks`` decided: the replacement blocks (None: run the stock ones) and why."""

    blocks: list[nn.Module] | None
    kernels: str  # "onednn" | "torch"
    reason: str


def fast_blocks(blocks: nn.ModuleList, device: str, rows_hint: int = 32 * 50) -> BlockKernels:
    """Return oneDNN replacements for ``blocks`` (an open_clip ViT's resblocks) on a CPU, or why there are none.

    ``rows_hint``: images per batch x tokens per image, for the packed weights' layout (bfloat16 only)."""
    setting = os.environ.get(ENV, "").strip().lower()
    if setting not in ("", "auto", "onednn", "onednn-inplace", "torch"):
        raise ValueError(f"{ENV}={setting!r}: use 'torch' (open_clip's own block forward), 'onednn-inplace' (oneDNN "
                         "kernels on the weights in place, no packed copy) or 'onednn' (unset: oneDNN kernels where "
                         "they apply)")
    if setting == "torch":
        return BlockKernels(None, "torch", f"{ENV}=torch")
    if not str(device).startswith("cpu"):
        return BlockKernels(None, "torch", f"device {device}: oneDNN blocks are a CPU path")
    linear = _linear_op()
    if linear is None:
        return BlockKernels(None, "torch", "this torch build has no oneDNN linear kernel")
    for i, blk in enumerate(blocks):
        why = unsupported(blk)
        if why is not None:
            return BlockKernels(None, "torch", f"block {i}: {why}")
    pack = None if setting == "onednn-inplace" else _packer(blocks[0].attn.in_proj_weight.dtype, rows_hint)
    # Check the first block before converting the rest, so a disagreeing build packs no copy of the other blocks.
    first = OneDnnBlock(blocks[0], linear, pack)
    problem = _disagreement(blocks[0], first)
    if problem is not None and pack is not None:  # the packed layout is the newer op: try the plain weights
        pack, first = None, OneDnnBlock(blocks[0], linear)
        problem = _disagreement(blocks[0], first)
    if problem is not None:
        log.warning("oneDNN blocks disagree with open_clip's on a check batch (%s): running the stock blocks", problem)
        return BlockKernels(None, "torch", f"check batch disagreed: {problem}")
    fast = [first] + [OneDnnBlock(b, linear, pack) for b in blocks[1:]]
    how = "weights packed for oneDNN (a second copy)" if pack is not None else "weights in place"
    return BlockKernels(fast, "onednn", f"oneDNN linear kernels (CPU inference), {how}")


def _packer(dtype: torch.dtype, rows_hint: int):
    """Return weight -> oneDNN packed weight for ``dtype``, or None to use the weights in place.

    Packing pays in bfloat16 (ViT-B-32, batch 32, 2 threads: 1.08x the packed-free kernels, on top of their 1.07x
    over the stock blocks) and not in float32 (no gain measured), and costs one more copy of the block weights.
    ``rows_hint`` (images per batch x tokens) only tunes the layout; any batch size runs on it."""
    if dtype != torch.bfloat16:
        return None
    try:
        reorder = torch.ops.mkldnn._reorder_linear_weight
    except (AttributeError, RuntimeError):
        return None
    return lambda w: reorder(w, rows_hint)


@torch.inference_mode()
def _disagreement(stock: nn.Module, fast: OneDnnBlock) -> str | None:
    """Return how the two blocks differ on a small random batch, or None when they agree to float tolerance."""
    w = stock.attn.in_proj_weight
    d = w.shape[1]
    x = torch.randn(2, 7, d, generator=torch.Generator().manual_seed(0)).to(w.dtype)
    try:
        a, b = stock(x).float(), fast(x).float()
    except RuntimeError as e:  # a kernel this CPU or build lacks for this dtype
        return f"{type(e).__name__}: {e}"
    tol = 1e-4 if w.dtype == torch.float32 else 3e-2
    err = ((a - b).norm() / a.norm().clamp_min(1e-12)).item()
    return None if err <= tol else f"relative error {err:.2e} > {tol:g}"
