"""Evaluation metrics: complexity agreement (PLCC, SRCC, RMSE, MAE) and retrieval recall@k.

Pure numpy (ranks through scipy.stats.rankdata), so every job and test computes them the same way.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from scipy.stats import rankdata


def _pair(pred, true) -> tuple[np.ndarray, np.ndarray]:
    """Return ``pred`` and ``true`` as float64 vectors of one length, or raise naming the mismatch."""
    p = np.asarray(pred, dtype=np.float64).reshape(-1)
    t = np.asarray(true, dtype=np.float64).reshape(-1)
    if p.shape != t.shape:
        raise ValueError(f"predictions ({p.size}) and labels ({t.size}) differ in length; pass one score per label")
    if p.size == 0:
        raise ValueError("no predictions to evaluate: the label file matched no images")
    if not (np.isfinite(p).all() and np.isfinite(t).all()):
        raise ValueError(f"{int((~np.isfinite(p)).sum())} predictions and {int((~np.isfinite(t)).sum())} labels "
                         "are NaN/inf; drop the failed samples before computing metrics")
    return p, t


def plcc(pred, true) -> float:
    """Return the Pearson linear correlation of ``pred`` and ``true`` (NaN when either is constant or n < 2)."""
    p, t = _pair(pred, true)
    if p.size < 2:
        return float("nan")
    p = p - p.mean()
    t = t - t.mean()
    denom = np.sqrt((p * p).sum() * (t * t).sum())
    if denom == 0.0:
        return float("nan")
    return float(np.clip((p * t).sum() / denom, -1.0, 1.0))


def srcc(pred, true) -> float:
    """Return the Spearman rank correlation (Pearson of average ranks, ties shared) of ``pred`` and ``true``."""
    p, t = _pair(pred, true)
    return plcc(rankdata(p), rankdata(t))


def rmse(pred, true) -> float:
    """Return the root-mean-square error of ``pred`` against ``true``, on the labels' own scale."""
    p, t = _pair(pred, true)
    return float(np.sqrt(np.mean((p - t) ** 2)))


def mae(pred, true) -> float:
    """Return the mean absolute error of ``pred`` against ``true``, on the labels' own scale."""
    p, t = _pair(pred, true)
    return float(np.mean(np.abs(p - t)))


def complexity_metrics(pred, true) -> dict:
    """Return {"plcc", "srcc", "rmse", "mae", "n"} of complexity predictions against human scores."""
    p, t = _pair(pred, true)
    return {"plcc": plcc(p, t), "srcc": srcc(p, t), "rmse": rmse(p, t), "mae": mae(p, t), "n": int(p.size)}


def fit_linear_map(pred, true) -> tuple[float, float]:
    """Return (slope, intercept) of the least-squares line true ≈ slope·pred + intercept.

    Used to put an uncalibrated score (the training-free heuristic) on the label scale before RMSE/MAE;
    fit it on training labels and apply it to test predictions, never fit on the test set itself.
    """
    p, t = _pair(pred, true)
    if p.size < 2 or np.ptp(p) == 0.0:
        return 0.0, float(t.mean())
    slope, intercept = np.polyfit(p, t, 1)
    return float(slope), float(intercept)


# --------------------------------------------------------------------------------------------- retrieval


def _relevant_lists(relevant, n_queries: int) -> list[np.ndarray]:
    """Return one int array of relevant gallery indices per query."""
    if isinstance(relevant, np.ndarray) and relevant.ndim == 1 and np.issubdtype(relevant.dtype, np.integer):
        out = [np.asarray([r], np.int64) for r in relevant]
    else:
        out = [np.atleast_1d(np.asarray(list(r) if isinstance(r, Iterable) else [r], np.int64)) for r in relevant]
    if len(out) != n_queries:
        raise ValueError(f"relevant has {len(out)} entries but there are {n_queries} queries; give one per query")
    for i, r in enumerate(out):
        if r.size == 0:
            raise ValueError(f"query {i} has no relevant gallery item; drop it or give its ground truth")
    return out


def best_relevant_rank(sim: np.ndarray, relevant, chunk: int = 1024) -> np.ndarray:
    """Return, per query, the 0-based rank of its best-scored relevant gallery item.

    The rank counts gallery items scored strictly higher than that item, so ties with an irrelevant item
    do not hurt (the usual convention of CLIP retrieval benchmarks, which sort with a stable argsort).
    """
    sim = np.asarray(sim, dtype=np.float32)
    if sim.ndim != 2:
        raise ValueError(f"sim must be a (queries, gallery) matrix, got shape {sim.shape}")
    n_q, n_g = sim.shape
    rel = _relevant_lists(relevant, n_q)
    flat = np.concatenate(rel)
    if flat.size and (flat.min() < 0 or flat.max() >= n_g):
        raise ValueError(f"relevant indices must lie in [0, {n_g}); got {flat.min()}..{flat.max()}")
    single = all(r.size == 1 for r in rel)
    ranks = np.empty(n_q, np.int64)
    for start in range(0, n_q, chunk):
        block = sim[start:start + chunk]
        rows = np.arange(block.shape[0])
        if single:
            best = block[rows, flat[start:start + chunk]]
        else:
            best = np.array([block[j, rel[start + j]].max() for j in rows], np.float32)
        ranks[start:start + chunk] = (block > best[:, None]).sum(axis=1)
    return ranks


def recall_at_k(sim: np.ndarray | None = None, relevant=None, ks: Sequence[int] = (1, 5, 10), *,
                queries: np.ndarray | None = None, gallery: np.ndarray | None = None) -> dict[int, float]:
    """Return {k: recall@k}: the share of queries with at least one relevant item among their top k.

    Give either ``sim`` (queries × gallery similarities) or ``queries`` and ``gallery`` embeddings (their dot
    product is used: L2-normalise them first for cosine). ``relevant`` is, per query, one gallery index
    (an int array: text→image, one image per caption) or a collection of indices (image→text, where any
    of an image's several captions counts as a hit).
    """
    if sim is None:
        if queries is None or gallery is None:
            raise ValueError("recall_at_k needs sim, or both queries and gallery embeddings")
        sim = np.asarray(queries, np.float32) @ np.asarray(gallery, np.float32).T
    if relevant is None:
        raise ValueError("recall_at_k needs the ground truth: relevant gallery index(es) per query")
    ranks = best_relevant_rank(sim, relevant)
    return {int(k): float((ranks < k).mean()) for k in ks}


def invert_mapping(text_to_image, n_images: int) -> list[list[int]]:
    """Return, per image, the list of caption indices that describe it (image→text ground truth)."""
    out: list[list[int]] = [[] for _ in range(n_images)]
    for t, i in enumerate(np.asarray(text_to_image, np.int64)):
        if not 0 <= i < n_images:
            raise ValueError(f"caption {t} points to image {i}, outside [0, {n_images})")
        out[int(i)].append(t)
    return out


def retrieval_recall(text_embeddings: np.ndarray, image_embeddings: np.ndarray, text_to_image,
                     ks: Sequence[int] = (1, 5, 10)) -> dict[str, dict[int, float]]:
    """Return {"t2i": {k: recall}, "i2t": {k: recall}} for captions mapped to images by ``text_to_image``.

    Images with no caption are part of the text→image gallery (distractors) but are not image→text queries.
    """
    text = np.asarray(text_embeddings, np.float32)
    images = np.asarray(image_embeddings, np.float32)
    t2i = np.asarray(text_to_image, np.int64)
    sim = text @ images.T
    out = {"t2i": recall_at_k(sim, t2i, ks)}
    captions = invert_mapping(t2i, images.shape[0])
    has = np.array([len(c) > 0 for c in captions])
    out["i2t"] = recall_at_k(sim.T[has], [c for c in captions if c], ks)
    return out
