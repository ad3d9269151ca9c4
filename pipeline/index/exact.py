"""Exact top-k by inner product: the ground truth that nprobe tuning measures recall against.

Add tasks fold each batch of vectors into a running TopK of the tuning queries while they add it to the
index, so the exact answer costs no second pass over the data; partial results merge in any order. Queries and
vectors are as the index takes them (with exit offsets: rows ending with their offset, queries with the query
constant), so the ground truth ranks by the calibrated score, scale x cosine + offset.
"""

from __future__ import annotations

import numpy as np


class TopK:
    """The running exact top-k (by inner product) of a set of queries over streamed vectors."""

    def __init__(self, nq: int, k: int):
        self.k = k
        self.scores = np.full((nq, k), -np.inf, np.float32)
        self.ids = np.full((nq, k), -1, np.int64)

    def update(self, scores: np.ndarray, ids: np.ndarray) -> None:
        """Fold in ``scores`` (nq, b) of vectors with row ids ``ids`` (b,)."""
        if scores.shape[1] > self.k:
            part = np.argpartition(-scores, self.k - 1, axis=1)[:, : self.k]
            scores = np.take_along_axis(scores, part, axis=1)
            cand = ids[part]
        else:
            cand = np.broadcast_to(ids, scores.shape)
        self._fold(scores, cand)

    def merge(self, other: "TopK") -> None:
        """Fold in another TopK over other vectors."""
        self._fold(other.scores, other.ids)

    def _fold(self, scores: np.ndarray, ids: np.ndarray) -> None:
        s = np.concatenate([self.scores, scores], axis=1)
        i = np.concatenate([self.ids, ids], axis=1)
        # Ties broken by row id, so the result does not depend on the order vectors arrived in.
        order = np.lexsort((i, -s), axis=1)[:, : self.k]
        self.scores = np.take_along_axis(s, order, axis=1)
        self.ids = np.take_along_axis(i, order, axis=1)


def exact_topk(queries: np.ndarray, vectors: np.ndarray, first_id: int, k: int, chunk: int = 4096) -> TopK:
    """Return the exact top-k of ``queries`` over ``vectors`` (ids from ``first_id``), chunk by chunk."""
    top = TopK(len(queries), k)
    for s in range(0, len(vectors), chunk):
        x = vectors[s: s + chunk]
        top.update(queries @ x.T, np.arange(first_id + s, first_id + s + len(x), dtype=np.int64))
    return top


def topk_from(result: dict, k: int) -> TopK:
    """Return the TopK an add task returned in its summary (``topk_ids``, ``topk_scores``)."""
    t = TopK(len(result["topk_ids"]), k)
    t.ids, t.scores = result["topk_ids"], result["topk_scores"]
    return t
