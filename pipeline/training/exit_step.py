"""One step of exit training: the trainable state, the dual-path loss and the optimiser step.

Loss per exit, on L2-normalised embeddings:

    contrastive_weight * CLIP contrastive(exit embedding, frozen text embedding)
  + distill_weight     * (1 - cos(exit embedding, full-depth embedding of the same image))

The contrastive term keeps early embeddings answerable by the same text queries; the distillation term keeps
them close to where the full tower puts the image, so early- and full-depth rows mix in one index. By default
(``mixed_clip_loss_share``) the contrastive term is computed in the gallery such an index holds: a caption's
image at exit k competes with the other images at full depth and at every exit, and its full-depth image with the
other images at exit k, so an exit learns to neither lose to nor push down full-depth rows; trained in a gallery
of its own depth only (``clip_loss_share``), an exit scored 5-10 points lower text→image when mixed. Every loss
here is computed as this process's *share* of a global batch (the shares of a data-parallel group sum to the
single-process loss), so a step's update does not depend on the number of processes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from pipeline.training import distributed
from pipeline.training.distributed import Dist


class HeadTrainer(torch.nn.Module):
    """The trainable state: exit heads, one log logit-scale per exit (and for full depth when fine-tuning)."""

    def __init__(self, heads, init_logit_scale: float, learn_temperature: bool, full_depth: int):
        super().__init__()
        self.heads = heads
        init = min(float(init_logit_scale), math.log(100.0))
        self.log_scales = torch.nn.ParameterDict({
            str(e): torch.nn.Parameter(torch.tensor(init), requires_grad=learn_temperature)
            for e in heads.early_exits + [full_depth]})

    def scale(self, depth: int) -> torch.Tensor:
        """Return exp(log scale) for ``depth``, clamped at 100 as CLIP does."""
        return self.log_scales[str(depth)].clamp(max=math.log(100.0)).exp()


def _clip_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Return the symmetric CLIP contrastive loss of matched rows (open_clip's ClipLoss, single process)."""
    return clip_loss_share(Dist(), image, text, text, scale, [image.shape[0]])


def clip_loss_share(d: Dist, image: torch.Tensor, text: torch.Tensor, all_text: torch.Tensor, scale: torch.Tensor,
                    sizes: list[int]) -> torch.Tensor:
    """Return this process's share of the symmetric CLIP loss of the global batch; the shares sum to the loss.

    ``image``/``text``: this process's rows (L2-normalised); ``all_text``: every process's captions in rank
    order (the text tower is frozen, so they carry no gradient); ``sizes``: rows per process. The share is this
    process's images against every caption plus its captions against every image (gathered with their
    gradient), summed over its rows and divided by the global batch: open_clip's ClipLoss, split by rows.
    """
    n, lo = sum(sizes), sum(sizes[:d.rank])
    all_image = distributed.all_gather_rows_with_grad(d, image, sizes)
    target = torch.arange(lo, lo + image.shape[0], device=image.device)
    i2t = F.cross_entropy(scale * image @ all_text.T, target, reduction="sum")
    t2i = F.cross_entropy(scale * text @ all_image.T, target, reduction="sum")
    return (i2t + t2i) / (2 * n)


def mixed_clip_loss_share(d: Dist, e: int, image: torch.Tensor, all_images: dict[int, torch.Tensor],
                          text: torch.Tensor, all_text: torch.Tensor, all_full: torch.Tensor, scale: torch.Tensor,
                          sizes: list[int]) -> torch.Tensor:
    """Return this process's share of exit ``e``'s contrastive loss in the mixed gallery; the shares sum to the loss.

    ``image``: this process's exit-``e`` rows; ``all_images``: every early exit's rows of the global batch
    (gathered with their gradient); ``all_full``: the global batch at full depth (frozen). Image→text is CLIP's
    (its gallery is captions, the same for every depth). Text→image is the mean of two terms: the caption's image
    at exit ``e`` against every other image at every depth (full and each early exit), and its image at full depth
    against every other image at full depth and at exit ``e``. One scale per row: an index compares raw cosines
    across depths, so no depth may hide behind a temperature of its own. The caption's image at another depth
    is no negative (an index holds each image once).
    """
    n, lo, m = sum(sizes), sum(sizes[:d.rank]), text.shape[0]
    rows = torch.arange(m, device=text.device)
    target = lo + rows
    i2t = F.cross_entropy(scale * image @ all_text.T, target, reduction="sum")

    def t2i(blocks: list[torch.Tensor]) -> torch.Tensor:  # blocks[0] holds the positive
        sim = scale * text @ torch.cat(blocks).T  # (m, len(blocks) * n)
        same = torch.zeros(sim.shape, dtype=torch.bool, device=sim.device)
        for b in range(1, len(blocks)):
            same[rows, b * n + target] = True
        return F.cross_entropy(sim.masked_fill(same, float("-inf")), target, reduction="sum")

    others = [all_images[o] for o in sorted(all_images) if o != e]
    t2i_exit = t2i([all_images[e], all_full] + others)
    t2i_full = t2i([all_full, all_images[e]])
    return (i2t + (t2i_exit + t2i_full) / 2) / (2 * n)


def exit_losses(trainer: HeadTrainer, feats: dict[int, torch.Tensor], full: torch.Tensor, text: torch.Tensor,
                contrastive_weight: float, distill_weight: float,
                mixed_gallery: bool = True) -> tuple[torch.Tensor, dict[int, float]]:
    """Return (mean loss over exits, {exit: its loss}) for one batch of cached features (frozen recipe)."""
    emb = {e: F.normalize(trainer.heads.head(e).from_features(f), dim=-1) for e, f in feats.items()}
    total, parts = exit_loss_shares(Dist(), trainer, emb, full, text, text, [full.shape[0]], contrastive_weight,
                                    distill_weight, all_full=full if mixed_gallery else None)
    return total, {e: float(v) for e, v in parts.items()}


def exit_loss_shares(d: Dist, trainer: HeadTrainer, emb: dict[int, torch.Tensor], full: torch.Tensor,
                     text: torch.Tensor, all_text: torch.Tensor, sizes: list[int], contrastive_weight: float,
                     distill_weight: float, *,
                     all_full: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Return (this process's share of the mean loss over exits, {exit: its share, detached}) of a global batch.

    Per exit: contrastive_weight * contrastive loss + distill_weight * mean(1 - cos(exit, full)), both split by
    rows; summed over processes the shares are the single-process loss. The contrastive loss is the mixed
    gallery's (``mixed_clip_loss_share``) when ``all_full`` (the global batch at full depth) is given, else each
    exit's own-depth gallery (``clip_loss_share``).
    """
    n = sum(sizes)
    total, parts = 0.0, {}
    # One order in every process: each gather must meet its own.
    gathered = ({e: distributed.all_gather_rows_with_grad(d, emb[e], sizes) for e in sorted(emb)}
                if all_full is not None else {})
    for e in sorted(emb):
        x = emb[e]
        if all_full is not None:
            contrastive = mixed_clip_loss_share(d, e, x, gathered, text, all_text, all_full, trainer.scale(e), sizes)
        else:
            contrastive = clip_loss_share(d, x, text, all_text, trainer.scale(e), sizes)
        loss = contrastive_weight * contrastive
        if distill_weight:
            loss = loss + distill_weight * (1 - (x * full).sum(dim=1)).sum() / n
        parts[e] = loss.detach()
        total = total + loss
    return total / max(1, len(emb)), parts


class HeadsStep(torch.nn.Module):
    """What DDP wraps in the frozen recipe: the early heads and their temperatures (cached features in)."""

    def __init__(self, trainer: HeadTrainer, exits: list[int]):
        super().__init__()
        self.heads = trainer.heads
        # Only the temperatures the loss uses: DDP expects a gradient for every parameter it holds.
        self.log_scales = torch.nn.ParameterDict({str(e): trainer.log_scales[str(e)] for e in exits})

    def forward(self, feats: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        return {e: F.normalize(self.heads.head(e).from_features(feats[e]), dim=-1) for e in sorted(feats)}


class EncoderStep(torch.nn.Module):
    """What DDP wraps in the fine-tune recipe: the vision backbone, the heads and every temperature (pixels in)."""

    def __init__(self, encoder, trainer: HeadTrainer):
        super().__init__()
        self.encoder = encoder
        self.log_scales = trainer.log_scales

    def forward(self, pixels: torch.Tensor) -> dict[int, torch.Tensor]:
        return self.encoder.forward_all_exits(pixels)


def parallel(module: torch.nn.Module, d: Dist, device: str) -> torch.nn.Module:
    """Return ``module`` wrapped in DDP (gradients averaged over processes), or itself in one process."""
    if not d.enabled:
        return module
    on_gpu = device.startswith("cuda")
    return DistributedDataParallel(module, device_ids=[torch.device(device).index] if on_gpu else None)


def optimizer_step(share: torch.Tensor, opt, sched, d: Dist) -> None:
    """Apply one optimiser step for this process's ``share`` of a global batch's loss."""
    opt.zero_grad(set_to_none=True)
    # DDP averages gradients over processes; the shares sum to the loss, so scale each back up.
    (share * d.world_size).backward()
    opt.step()
    sched.step()
