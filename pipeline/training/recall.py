"""Text↔image recall of exit embeddings: the numbers exit training reports before, during and after training.

Identical captions form one query whose hits are all their images (``caption_groups``), so a corpus with
repeated captions is scored fairly.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.metrics import recall_at_k

KS = (1, 5, 10)


def caption_groups(captions: list[str]) -> np.ndarray:
    """Return, per pair, the index of its caption among the distinct captions (identical captions share one)."""
    index: dict[str, int] = {}
    return np.asarray([index.setdefault(c.strip(), len(index)) for c in captions], np.int64)


def caption_queries(groups: np.ndarray) -> tuple[np.ndarray, list[list[int]]]:
    """Return (first pair of each caption group: its query, [the pairs (images) of each group: its hits])."""
    n_groups = int(groups.max()) + 1
    first = np.full(n_groups, -1, np.int64)
    images_of: list[list[int]] = [[] for _ in range(n_groups)]
    for i, g in enumerate(groups):
        if first[g] < 0:
            first[g] = i
        images_of[g].append(i)
    return first, images_of


def recall_table(text: np.ndarray, images: np.ndarray, groups: np.ndarray) -> dict:
    """Return {"t2i": {k: r}, "i2t": {k: r}} for k in KS; identical captions are one query hitting all their images.

    ``text``/``images``: L2-normalised embeddings, one row per pair; ``groups``: ``caption_groups`` of the pairs.
    """
    first, images_of = caption_queries(groups)
    sim = text[first] @ images.T  # one text embedding per distinct caption
    return {"t2i": recall_at_k(sim, images_of, KS), "i2t": recall_at_k(sim.T, groups, KS)}


def mixed_gallery_recall(text: np.ndarray, target: np.ndarray, others: np.ndarray, groups: np.ndarray) -> dict:
    """Return {k: text→image recall@k} with each caption's own images as ``target`` rows, all others as ``others``.

    With ``target`` an exit's embeddings and ``others`` full depth: can an early-exit image still be found for its
    caption among full-depth images (the case an index of routed rows puts it in)? Swapped: can a full-depth
    image still be found among early-exit ones? Identical captions are one query, as in ``recall_table``.
    """
    first, images_of = caption_queries(groups)
    q = text[first]
    own = groups[None, :] == np.arange(len(first))[:, None]  # query (caption group) × image: its own images
    sim = np.where(own, q @ target.T, q @ others.T)
    return recall_at_k(sim, images_of, KS)


def evaluate_embeddings(per_exit: dict[int, torch.Tensor], full: torch.Tensor, text: torch.Tensor,
                        groups: torch.Tensor) -> dict:
    """Return {exit: {"t2i", "i2t", "mixed_t2i", "exit_vs_full_t2i", "full_vs_exit_t2i": {k: r}, "cos_to_full"}}.

    ``mixed_t2i`` is text→image recall in the gallery an index of routed rows holds: every other image embedded
    at this exit, the rest at full depth. An exit whose embeddings drift from the full-depth space loses more
    there than its own-gallery recall shows (exit embeddings crowd together or apart from full-depth ones).
    ``exit_vs_full_t2i``: the caption's images at this exit, every other image at full depth (does an early row
    lose to full-depth rows?); ``full_vs_exit_t2i``: the caption's images at full depth, every other at this exit
    (does an early row push a full-depth one down?). Their mean is the mixed-gallery recall exit training selects
    epochs by (``mixed_score``). Image→text has no mixed form: its gallery is captions, one tower for all.
    """
    out = {}
    t, g = text.float().numpy(), groups.numpy()
    full_np = full.float().numpy()
    for e, emb in sorted(per_exit.items()):
        emb = emb.float()
        row = recall_table(t, emb.numpy(), g)
        row["cos_to_full"] = float((emb * full.float()).sum(dim=1).mean())
        mixed = full_np.copy()
        mixed[::2] = emb.numpy()[::2]
        row["mixed_t2i"] = recall_table(t, mixed, g)["t2i"]
        row["exit_vs_full_t2i"] = mixed_gallery_recall(t, emb.numpy(), full_np, g)
        row["full_vs_exit_t2i"] = mixed_gallery_recall(t, full_np, emb.numpy(), g)
        out[int(e)] = row
    return out


SCALE_GRID = tuple(round(0.9 + 0.005 * i, 3) for i in range(61))  # 0.900 ... 1.200


def choose_exit_scale(text: np.ndarray, emb: np.ndarray, full: np.ndarray, groups: np.ndarray) -> dict:
    """Return {"scale", "exit_vs_full_t2i@1", "full_vs_exit_t2i@1", "penalty"}: an exit's scale for a mixed index.

    An inner-product index ranks an exit row ``scale * emb`` against full-depth rows; the scale (on SCALE_GRID)
    is the one whose worse mixed direction loses least against the own-depth gallery: the larger of
    own-exit R@1 - exit|full R@1 and full-depth R@1 - full|exit R@1, the "penalty" (ties: the scale nearest 1).
    """
    first, images_of = caption_queries(groups)
    q = text[first]
    own = groups[None, :] == np.arange(len(first))[:, None]
    se, sf = q @ emb.T, q @ full.T
    own_exit = recall_at_k(se, images_of, (1,))[1]
    own_full = recall_at_k(sf, images_of, (1,))[1]
    best = None
    for scale in sorted(SCALE_GRID, key=lambda v: abs(v - 1.0)):
        ef = recall_at_k(np.where(own, scale * se, sf), images_of, (1,))[1]
        fe = recall_at_k(np.where(own, sf, scale * se), images_of, (1,))[1]
        penalty = max(own_exit - ef, own_full - fe)
        if best is None or penalty < best["penalty"] - 1e-12:
            best = {"scale": scale, "exit_vs_full_t2i@1": ef, "full_vs_exit_t2i@1": fe, "penalty": penalty}
    return best


def format_table(before: dict, after: dict | None = None) -> str:
    """Return a text table of per-exit metrics (before → after when both are given)."""
    cols = [("cos→full", lambda r: r["cos_to_full"])]
    for d in ("t2i", "i2t"):
        for k in KS:
            cols.append((f"{d} R@{k}", lambda r, d=d, k=k: r[d][k]))
    cols.append(("mixed t2i R@1", lambda r: r["mixed_t2i"][1]))
    cols.append(("exit|full R@1", lambda r: r["exit_vs_full_t2i"][1]))
    cols.append(("full|exit R@1", lambda r: r["full_vs_exit_t2i"][1]))
    width = 15 if after is not None else 8
    lines = ["exit  " + "  ".join(f"{name:>{width}}" for name, _ in cols)]
    for e in sorted(before):
        cells = []
        for _, get in cols:
            b = get(before[e])
            cells.append(f"{b:.3f} → {get(after[e]):.3f}" if after is not None else f"{b:.3f}")
        lines.append(f"{e:>4}  " + "  ".join(f"{c:>{width}}" for c in cells))
    return "\n".join(lines)


def summary(m: dict) -> dict:
    """Return the few numbers of an exit's metrics that each epoch's history keeps."""
    return {"t2i@1": m["t2i"][1], "t2i@5": m["t2i"][5], "i2t@1": m["i2t"][1], "cos_to_full": m["cos_to_full"],
            "mixed_t2i@1": m["mixed_t2i"][1], "exit_vs_full_t2i@1": m["exit_vs_full_t2i"][1],
            "full_vs_exit_t2i@1": m["full_vs_exit_t2i"][1]}


def mixed_score(metrics: dict, exits) -> float:
    """Return the mixed-gallery recall@1 of ``exits`` (early ones): the mean of both mixed directions over them.

    What exit training picks its epoch by: an exit whose rows lose to full-depth rows, or push them down, in the
    index they will share scores low, whatever its own-gallery recall.
    """
    vals = [(metrics[e]["exit_vs_full_t2i"][1] + metrics[e]["full_vs_exit_t2i"][1]) / 2 for e in exits]
    return float(sum(vals) / max(1, len(vals)))
