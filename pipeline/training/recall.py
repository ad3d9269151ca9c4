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


MIN_GALLERY = 100  # smallest sub-gallery of the by-gallery-size reports
CALIBRATION_PAIRS = 10_000  # pairs an exit's score calibration is chosen on (the first ones of the sample)
SCALE_GRID = tuple(round(0.5 + 0.01 * i, 2) for i in range(71))  # slopes tried: 0.50 ... 1.20
OFFSET_STEP = 0.0005  # offsets tried: every multiple of this in [-OFFSET_RANGE, OFFSET_RANGE]
OFFSET_RANGE = 0.6


def gallery_parts(n: int, text_to_image: np.ndarray, min_images: int = MIN_GALLERY, seed: int = 0):
    """Yield (size, members, asked, targets) for galleries of n, n/2, n/4, ... sample images (down to ``min_images``),
    largest first: the sample split at random (``seed``) into disjoint parts of each size, ``members`` a part's image
    rows, ``asked`` the captions of its images, ``targets`` each asked caption's image as a position in ``members``.
    """
    text_to_image = np.asarray(text_to_image, np.int64)
    order = np.random.default_rng(seed).permutation(n)
    size = n
    while size >= min_images:
        for part in range(n // size):
            members = order[part * size:(part + 1) * size]
            position = np.full(n, -1, np.int64)
            position[members] = np.arange(size)
            asked = np.flatnonzero(position[text_to_image] >= 0)
            if asked.size:
                yield size, members, asked, position[text_to_image[asked]]
        size //= 2


def own_and_rival(text: np.ndarray, gallery: np.ndarray, members: np.ndarray, asked: np.ndarray,
                  targets: np.ndarray, chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Return, per asked caption, (its similarity to its own image, the highest similarity to any other member)."""
    own, rival = np.empty(len(asked), np.float32), np.empty(len(asked), np.float32)
    g = np.asarray(gallery, np.float32)[members]
    for lo in range(0, len(asked), chunk):
        sim = np.asarray(text, np.float32)[asked[lo:lo + chunk]] @ g.T
        rows = np.arange(sim.shape[0])
        own[lo:lo + chunk] = sim[rows, targets[lo:lo + chunk]]
        sim[rows, targets[lo:lo + chunk]] = -np.inf
        rival[lo:lo + chunk] = sim.max(axis=1)
    return own, rival


def mixed_margins(text: np.ndarray, emb: np.ndarray, full: np.ndarray, min_images: int = MIN_GALLERY,
                  seed: int = 0) -> list[tuple]:
    """Return, per gallery size (smallest first), (size, own_e, rival_e, own_f, rival_f): per caption its
    similarity to its own image and the best rival's, at the exit (``emb``) and at full depth.

    Row i of ``text``, ``emb`` and ``full`` is one image–caption pair; every caption is a query for its own image,
    against galleries of n, n/2, ... pairs down to ``min_images`` (``gallery_parts``; one gallery of all n when
    n < min_images). Text→image R@1 of a caption in any mix of the two depths, under any positive scale and offset
    of the exit's scores, follows from these four numbers exactly.
    """
    text, n = np.asarray(text, np.float32), len(full)
    sizes: dict[int, list] = {}
    for size, members, asked, targets in gallery_parts(n, np.arange(n), min(min_images, n), seed):
        sizes.setdefault(size, []).append(own_and_rival(text, emb, members, asked, targets)
                                          + own_and_rival(text, full, members, asked, targets))
    return [(size, *(np.concatenate(x) for x in zip(*parts))) for size, parts in sorted(sizes.items())]


def calibrated_penalty(margins: list[tuple], scale: float, offset: float, resamples: int = 0,
                       seed: int = 0) -> list[dict]:
    """Return per gallery size of ``mixed_margins`` the mixed-gallery recall@1 with exit scores ``scale * cosine +
    offset``: own exit, own full, exit|full (the caption's image at the exit, every other at full depth), full|exit
    (the reverse), and the penalty: the larger of own exit - exit|full and own full - full|exit. With
    ``resamples``, also "penalty_interval": its 95 % interval over that many bootstrap resamples of the captions
    (paired: each resample scores both galleries on the same captions)."""
    out, rng = [], np.random.default_rng(seed)
    for size, own_e, rival_e, own_f, rival_f in margins:
        hits = {"own_exit_t2i@1": own_e > rival_e, "own_full_t2i@1": own_f > rival_f,
                "exit_vs_full_t2i@1": scale * own_e + offset > rival_f,
                "full_vs_exit_t2i@1": own_f > scale * rival_e + offset}
        exit_side = hits["own_exit_t2i@1"].astype(np.float64) - hits["exit_vs_full_t2i@1"]
        full_side = hits["own_full_t2i@1"].astype(np.float64) - hits["full_vs_exit_t2i@1"]
        r = {k: float(v.mean()) for k, v in hits.items()}
        r["penalty"] = max(r["own_exit_t2i@1"] - r["exit_vs_full_t2i@1"], r["own_full_t2i@1"] - r["full_vs_exit_t2i@1"])
        if resamples:
            idx = rng.integers(0, len(own_e), size=(resamples, len(own_e)))
            boot = np.maximum(exit_side[idx].mean(axis=1), full_side[idx].mean(axis=1))
            r["penalty_interval"] = [float(v) for v in np.percentile(boot, [2.5, 97.5])]
        out.append({"images": int(size), "captions": int(len(own_e)), **r})
    return out


def choose_exit_calibration(margins: list[tuple]) -> dict:
    """Return an exit's score calibration for a mixed index: {"scale", "offset", "penalty", "pairs", "by_gallery",
    "at_grid_edge"} (true when the pair chosen sits on the edge of the grid: a better one may lie beyond it).

    An index ranks an exit row at ``scale * cosine + offset`` against full-depth rows at their cosine (`icar
    index` keeps the scale as the row's norm and the offset in one extra dimension). The calibration chosen (scale
    on SCALE_GRID, offset a multiple of OFFSET_STEP) keeps the worst gallery size's ``calibrated_penalty`` least
    (ties: the smaller mean over sizes, then the one nearest scale 1, offset 0), scored over the whole grid at
    once from ``mixed_margins``. A scale alone moves both mixed directions together and cannot match both the level
    and the spread of an exit's similarities to full depth's (the demo's exit 4 stays over 1 point at every
    scale); the pair can.
    """
    if not margins:
        raise ValueError("an exit's score calibration needs image-caption pairs")
    offsets = np.round(np.arange(-OFFSET_RANGE, OFFSET_RANGE + OFFSET_STEP / 2, OFFSET_STEP), 4)
    own = [((own_e > rival_e).mean(), (own_f > rival_f).mean()) for _, own_e, rival_e, own_f, rival_f in margins]
    best = None
    for scale in SCALE_GRID:
        pen = np.empty((len(margins), len(offsets)))
        for i, (_, own_e, rival_e, own_f, rival_f) in enumerate(margins):
            # exit|full hits where scale*own_e + offset beats the best full-depth rival; full|exit where own_f beats
            # scale*rival_e + offset (the best exit rival stays the best under a positive scale)
            ef = np.searchsorted(np.sort(rival_f - scale * own_e), offsets, side="left") / len(own_e)
            fe = 1.0 - np.searchsorted(np.sort(own_f - scale * rival_e), offsets, side="right") / len(own_e)
            pen[i] = np.maximum(own[i][0] - ef, own[i][1] - fe)
        worst, mean = pen.max(axis=0), pen.mean(axis=0)
        j = np.lexsort((np.abs(offsets) + abs(scale - 1.0), mean, worst))[0]
        key = (round(float(worst[j]), 12), round(float(mean[j]), 12), abs(float(offsets[j])) + abs(scale - 1.0))
        if best is None or key < best[0]:
            best = (key, float(scale), float(offsets[j]))
    _, scale, offset = best
    by_gallery = calibrated_penalty(margins, scale, offset)
    return {"scale": scale, "offset": offset, "penalty": max(r["penalty"] for r in by_gallery),
            "pairs": by_gallery[-1]["captions"], "by_gallery": by_gallery,
            "at_grid_edge": scale in (SCALE_GRID[0], SCALE_GRID[-1]) or abs(offset) >= OFFSET_RANGE}


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
