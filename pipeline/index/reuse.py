"""Whether a new build of a grown corpus trains its index afresh or adds into an earlier build's trained index.

A pure policy beside ``params`` (no FAISS, no I/O): it compares what the earlier index was trained on with a
fresh choice for N vectors, and says why in words and numbers that the caller records (`icar reindex` writes
them into the version's reindex.json and index.json).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from pipeline.index.layout import TRAINED_FILE
from pipeline.index.params import BudgetError, choose_index_params, parse_size


@dataclass
class IndexDecision:
    """Train a fresh index, or add every vector into the previous version's trained (empty) index."""

    mode: str  # "train" | "reuse"
    reasons: list[str]  # why, in words (all rules that fired; for reuse, why each rule passed)
    numbers: dict  # the figures the rules compared
    trained_from: str | None = None  # URL of the trained.faiss reused (mode "reuse")
    factory: str | None = None  # the factory of the reused index (mode "reuse")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def guideline_nlist(n: int) -> float:
    """Return the FAISS guideline's list count for ``n`` vectors (4*sqrt(N) below 1M, then its table), capped so
    that k-means gets >= 39 training points per list."""
    if n < 1_000_000:
        wanted = 4 * math.sqrt(n)
    elif n < 10_000_000:
        wanted = 65536
    elif n < 100_000_000:
        wanted = 262144
    else:
        wanted = 1_048_576
    return min(wanted, n / 39)


def decide_index_build(n: int, dim: int, previous: dict | None, settings, supports_reuse: bool,
                       offset_dim: bool = False) -> IndexDecision:
    """Return whether to retrain or reuse the previous version's trained index for ``n`` vectors, and why.

    ``dim`` is the index's dimension (``RunPlan.index_dim``: the embeddings', plus one with exit offsets);
    ``offset_dim`` says its last dimension holds exit offsets (``RunPlan.offset_column``), so that the fresh
    choice compared below is the one the build makes (``choose_index_params``' code of the embeddings' dim - 1).
    ``previous`` describes the version LATEST points to in the same generation (None: there is none):
    its factory, kind, nlist, pq_m, opq, coarse, dim (its index's dimension), settings, measured recall and nprobe,
    and its training lineage (``trained``: version, ntotal, nprobe at training). ``settings`` is the job's
    IndexSettings.

    Retrain when any of these holds (the figures are recorded either way):
    - no previous index in this generation, reuse is off, or the previous one is Flat (nothing trained);
    - the previous index has another dimension (a run.json that gained or lost exit_offsets since);
    - the index settings (max_memory, factory, flat_below) changed since;
    - a fresh choice for N vectors within the budget is a different structure (kind, PQ code size, OPQ,
      coarse quantizer): e.g. the budget no longer holds the old code size at this N;
    - the corpus grew more than ``retrain_growth`` times since the index was trained: the centroids and
      codebooks saw a sample of a corpus less than half this size (distribution drift);
    - with an automatic choice, the FAISS guideline (4*sqrt(N) lists, at most N/39 so k-means gets 39
      points per list) now asks for ``retrain_list_growth`` times more lists than the index has: lists
      are that much longer than intended, and so is every probe;
    - the previous version's measured recall was below the target, or the nprobe it needed grew
      ``retrain_nprobe_growth`` times since training (both signs of drift);
    - this build of pipeline.index.build cannot add into a trained index, or the trained file is missing.
    Otherwise reuse: training (the cost, minutes to hours at scale) is skipped; the build still tunes
    nprobe and measures recall, and a reused build that misses the target is rebuilt with training.
    """
    numbers: dict = {"n": n}
    retrain: list[str] = []
    passed: list[str] = []
    if previous is None:
        return IndexDecision("train", ["first index of this generation: nothing trained to reuse"], numbers)
    numbers["previous_version"] = previous.get("version")
    if not settings.reuse_trained:
        retrain.append("index.reuse_trained is false")
    if previous.get("kind") == "flat" or not previous.get("nlist") and not previous.get("pq_m"):
        retrain.append(f"the previous index ({previous.get('factory')}) is exact search with nothing trained; "
                       f"the automatic choice is made afresh for {n:,} vectors")
        return IndexDecision("train", retrain, numbers)

    old_dim = previous.get("dim")
    if old_dim is not None and int(old_dim) != dim:
        numbers.update(dim=dim, previous_dim=int(old_dim))
        retrain.append(f"the previous index holds {old_dim} dimensions and these vectors {dim} (one more where the "
                       f"run records exit_offsets): its trained index cannot take them")

    now_settings = {"max_memory": settings.max_memory, "factory": settings.factory, "flat_below": settings.flat_below}
    old_settings = previous.get("settings") or {}
    changed = {k: (old_settings.get(k), v) for k, v in now_settings.items() if old_settings.get(k) != v}
    if changed:
        retrain.append("index settings changed since the previous version: " + ", ".join(
            f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()))

    try:
        fresh = choose_index_params(n, dim, parse_size(settings.max_memory), None, factory=settings.factory,
                                    code_bytes=previous.get("code_bytes_per_vector") if settings.factory else None,
                                    flat_below=settings.flat_below, offset_dim=offset_dim)
        numbers["fresh_factory"] = fresh.factory
        structure = lambda p: (p.get("kind"), p.get("pq_m") or 0, bool(p.get("opq")), p.get("coarse") or "")
        old_s = structure(previous)
        new_s = (fresh.kind, fresh.m, fresh.opq, fresh.coarse)
        if fresh.kind != "custom" and old_s != new_s:
            retrain.append(f"a fresh choice for {n:,} vectors within max_memory {settings.max_memory} is "
                           f"{fresh.factory}, not the structure of the trained {previous.get('factory')}")
        else:
            passed.append(f"a fresh choice ({fresh.factory}) has the trained index's structure")
    except (BudgetError, ValueError) as e:
        numbers["fresh_factory"] = None
        retrain.append(f"no index fits the settings for {n:,} vectors ({e}); the build will say so")

    trained = previous.get("trained") or {}
    n0 = trained.get("ntotal")
    numbers["trained_version"] = trained.get("version")
    numbers["n_at_training"] = n0
    if n0:
        growth = n / n0
        numbers["growth_since_training"] = round(growth, 4)
        if growth > settings.retrain_growth:
            retrain.append(f"the corpus grew {growth:.2f}x since the index was trained in {trained.get('version')} "
                           f"({n0:,} -> {n:,} vectors), more than index.retrain_growth {settings.retrain_growth:g}")
        else:
            passed.append(f"grew {growth:.2f}x since training ({n0:,} -> {n:,}), within {settings.retrain_growth:g}x")
    else:
        retrain.append("the previous version does not record the corpus size it was trained on")

    nlist = int(previous.get("nlist") or 0)
    if nlist:
        guide = guideline_nlist(n)
        numbers.update(nlist=nlist, guideline_nlist=round(guide, 1), vectors_per_list=round(n / nlist, 1))
        if trained.get("train_size"):
            numbers["train_points_per_list_at_training"] = round(trained["train_size"] / nlist, 1)
        if settings.factory:
            passed.append(f"nlist {nlist} is fixed by index.factory")
        elif guide / nlist >= settings.retrain_list_growth:
            retrain.append(f"the FAISS guideline for {n:,} vectors is ~{guide:.0f} lists (4*sqrt(N), at most N/39), "
                           f"{guide / nlist:.1f}x the trained {nlist}: lists hold {n / nlist:.0f} vectors each")
        else:
            passed.append(f"{nlist} lists of ~{n / nlist:.0f} vectors are within {settings.retrain_list_growth:g}x "
                          f"of the guideline's ~{guide:.0f}")

    recall = previous.get("recall_min")
    numbers["recall_previous"] = recall
    numbers["target_recall"] = settings.target_recall
    if recall is not None and recall < settings.target_recall:
        retrain.append(f"the previous version's measured recall@{previous.get('k', 10)} {recall:.3f} is below the "
                       f"target {settings.target_recall}")
    nprobe, nprobe0 = previous.get("nprobe"), trained.get("nprobe")
    numbers["nprobe_previous"], numbers["nprobe_at_training"] = nprobe, nprobe0
    if nprobe and nprobe0 and nprobe / nprobe0 >= settings.retrain_nprobe_growth:
        retrain.append(f"nprobe for the target grew {nprobe / nprobe0:.1f}x since training ({nprobe0} -> {nprobe})")

    if not supports_reuse:
        retrain.append("this build of pipeline.index.build cannot add into a trained index (IndexConfig has no "
                       "trained_index: see team/patches/index-trained-reuse.diff)")
    elif not previous.get("trained_file"):
        retrain.append(f"the previous version has no {TRAINED_FILE} to reuse")
    if retrain:
        return IndexDecision("train", retrain, numbers)
    return IndexDecision("reuse", [f"reusing the index trained in {trained.get('version')}: " + "; ".join(passed)],
                         numbers, trained_from=previous["trained_file"], factory=previous.get("factory"))


def recall_min(info: dict) -> float | None:
    """Return the lowest measured recall at the chosen nprobe over the query kinds of an index.json."""
    values = [r["at_nprobe"] for r in (info.get("recall") or {}).values()
              if isinstance(r, dict) and r.get("at_nprobe") is not None]
    return min(values) if values else None
