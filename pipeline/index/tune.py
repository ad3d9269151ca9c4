"""Tuning a built index: the smallest nprobe whose recall@k against the exact top-k reaches the target, for
held-out image queries and (where the runs' model has a text tower) caption queries.

Query vectors reach ``tune_nprobe`` as the index takes them: with exit offsets, each ends with the query constant
(``read.append_query_constant``, appended by the build to image and caption queries alike).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from pipeline.index.faiss_ops import is_ivf, set_search_params
from pipeline.index.params import nprobe_candidates

log = logging.getLogger(__name__)


def neighbour_recall(found: np.ndarray, exact: np.ndarray, k: int, self_ids: np.ndarray | None = None) -> float:
    """Return mean |found top-k ∩ exact top-k| / k, leaving out each query's own row id where given.

    Both arrays hold k+1 ids per query (-1 = none) so that dropping the query itself still leaves k.
    """
    total, denom = 0, 0
    for i in range(len(found)):
        f, e = found[i], exact[i]
        if self_ids is not None:
            f, e = f[f != self_ids[i]], e[e != self_ids[i]]
        f, e = f[f >= 0][:k], e[e >= 0][:k]
        total += len(np.intersect1d(f, e))
        denom += len(e)
    return total / denom if denom else 1.0


@dataclass
class QuerySet:
    """Queries for tuning: vectors, their exact top-(k+1) ids, and (image queries) their own row ids."""

    kind: str  # "image" | "text"
    vectors: np.ndarray
    exact: np.ndarray
    self_ids: np.ndarray | None


def tune_nprobe(index, query_sets: list[QuerySet], k: int, target: float, max_nprobe: int,
                reasons: list[str]) -> tuple[int | None, list[dict]]:
    """Return (nprobe, table): the smallest nprobe whose recall@k reaches ``target`` for every query kind.

    Tries powers of two upward (stopping once the target is met, or when recall stops improving because the
    codes, not nprobe, limit it), then bisects below the first passing value. Without the target, returns the
    smallest nprobe within 0.01 of the best recall seen, and says so in ``reasons``.
    """
    rows: dict[int, dict] = {}

    def measure(nprobe: int | None) -> dict:
        if nprobe is not None:
            set_search_params(index, nprobe)
        row: dict = {"nprobe": nprobe}
        elapsed, count = 0.0, 0
        for qs in query_sets:
            t0 = time.perf_counter()
            _, found = index.search(qs.vectors, k + 1)
            elapsed += time.perf_counter() - t0
            count += len(qs.vectors)
            row[qs.kind] = round(neighbour_recall(found, qs.exact, k, qs.self_ids), 4)
        row["ms_per_query"] = round(1000 * elapsed / max(count, 1), 4)
        return row

    def worst(row: dict) -> float:
        return min(row[qs.kind] for qs in query_sets)

    if not is_ivf(index):
        row = measure(None)
        if worst(row) < target:
            reasons.append(f"recall@{k} {worst(row):.3f} is below the target {target}: this index has no nprobe to "
                           f"raise; give it a larger code (--max-index-memory or --factory)")
        return None, [row]
    import faiss  # lazy: a heavy C++ library (see faiss_ops)

    nlist = faiss.extract_index_ivf(index).nlist
    passing = None
    previous = None
    for p in nprobe_candidates(nlist, max_nprobe):
        rows[p] = measure(p)
        if worst(rows[p]) >= target:
            passing = p
            break
        if previous is not None and worst(rows[p]) - worst(rows[previous]) < 0.002 and p >= 8:
            break  # the codes limit recall; more lists cannot help
        previous = p
    if passing is not None and previous is not None:
        lo, hi = previous, passing
        while hi - lo > 1:
            mid = (lo + hi) // 2
            rows[mid] = measure(mid)
            if worst(rows[mid]) >= target:
                hi = mid
            else:
                lo = mid
        passing = hi
    table = [rows[p] for p in sorted(rows)]
    if passing is None:
        best = max(worst(r) for r in table)
        passing = min(r["nprobe"] for r in table if worst(r) >= best - 0.01)
        reasons.append(f"target recall@{k} {target} not reached (best {best:.3f}); nprobe {passing} is the smallest "
                       f"within 0.01 of the best: the PQ code limits recall, raise --max-index-memory for a larger one")
    else:
        reasons.append(f"nprobe {passing}: the smallest reaching recall@{k} >= {target} for "
                       + " and ".join(qs.kind for qs in query_sets) + " queries")
    set_search_params(index, passing)
    return passing, table


def encode_caption_queries(identity: dict, captions: list[str], device: str) -> np.ndarray:
    """Return L2-normalised text embeddings of ``captions`` with the runs' model (its text tower)."""
    # lazy: loads torch and open_clip, which a build without captions never needs
    from pipeline.model import models

    bundle = models.load_clip_from_identity(identity, device=device)
    return models.encode_text(bundle, captions)


def caption_queries(text_queries: bool | None, identity: dict, captions: list,
                    device: str) -> tuple[np.ndarray | None, dict]:
    """Return (caption query vectors or None, what happened) per --text-queries (``text_queries``; None: auto)."""
    if text_queries is False:
        return None, {"skipped": "--no-text-queries"}
    texts = list(dict.fromkeys(c.strip() for c in captions if c and c.strip()))
    if not texts:
        if text_queries:
            raise ValueError("--text-queries: the sampled rows have no captions; pass --no-text-queries")
        return None, {"skipped": "the sampled rows have no captions"}
    try:
        q = encode_caption_queries(identity, texts, device)
    except Exception as e:  # auto mode: any failure to load or run the encoder skips text tuning, recorded
        if text_queries:
            raise
        why = f"text encoder unavailable ({type(e).__name__}: {e})"
        log.warning("caption queries skipped: %s; pass --text-queries to make this an error", why)
        return None, {"skipped": why}
    log.info("encoded %d caption queries", len(q))
    return q, {}
