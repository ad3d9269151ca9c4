"""Fitting a ConfidenceRouter's thresholds on a sample: for a GFLOP budget or a recall floor, as for complexity.

Pure numpy over a sample's confidences at every early exit (``{exit: (N,)}``, every sample image taken through
every exit). Both goals move along one parameter, by one of two rules:

- ``level`` (default): one confidence level for every early exit (thresholds all equal): a row leaves at the first
  exit where it is predicted good enough. It needs confidences in the same units at every exit, which the
  training targets give (a caption margin, the log-odds of keeping the rank, a cosine). The level is scanned
  over quantiles of the sample's confidences, from +inf (every row at full depth) down.
- ``mix``: the complexity router's family of exit mixes (``router.exit_fractions``, with ``shares``): a mix asks
  for a share of the sample per exit, and the thresholds are set exit by exit, shallowest first, so that exactly
  that share leaves there, taking among the rows still in the tower the most confident at this exit. Rounding and
  ties move rows to the SHALLOWER exit, as the complexity router's quantiles do.

On the demo (val, 1000 images, 0.75 x full-depth GFLOPs) ``level`` reached t2i R@1 0.770 where ``mix`` with
equal shares reached 0.713: equal shares push a third of the images to the weakest exit whatever they are.
Cost per row is what ``ConfidenceRouter.gflops_per_exit`` says: the tower to the exit, plus every confidence head
run on the way.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np

from pipeline.model.router import (ConfidenceRouter, MixRecall, ceiling_margin, ceiling_record, combined_signal,
                                   exit_fractions, row_costs)

log = logging.getLogger(__name__)

STEPS_PER_STAGE = 100  # candidate mixes per stage of the family (each costs one routing of the sample)
LEVELS = 400  # candidate confidence levels (quantiles of the sample's confidences) for the rule "level"
RULES = ("level", "mix")


def _confidences(confidences: dict, exits: list[int]) -> dict[int, np.ndarray]:
    """Return {early exit: float64 (N,)}, or raise naming a missing exit, a length mismatch or a non-finite value."""
    out, n = {}, None
    for e in exits[:-1]:
        if e not in confidences and str(e) not in confidences:
            raise ValueError(f"no sample confidences for early exit {e}; compute them at every early exit {exits[:-1]}")
        c = np.asarray(confidences[e] if e in confidences else confidences[str(e)], np.float64).reshape(-1)
        if not np.isfinite(c).all():
            raise ValueError(f"{int((~np.isfinite(c)).sum())} sample confidences at exit {e} are NaN/inf")
        if n is not None and c.size != n:
            raise ValueError(f"exit {e} has {c.size} sample confidences, the first early exit {n}")
        n = c.size
        out[e] = c
    if not n:
        raise ValueError("no sample confidences to calibrate on")
    return out


def complexity_block(confidences: dict, scores, weight: float) -> dict:
    """Return a ConfidenceRouter complexity block fitted on a sample: each early exit's confidence mean and spread,
    the complexity scores' mean and spread, and ``weight`` (a zero spread is stored as 1, leaving values unscaled).

    ``router.combined_signal`` with it gives each exit's standardised confidence minus ``weight`` times the
    standardised score; `icar calibrate --complexity-weight` and bench/adaptive.py both fit through here."""
    if not (math.isfinite(weight) and weight >= 0):
        raise ValueError(f"--complexity-weight must be a finite number >= 0, got {weight}")
    s = np.asarray(scores, np.float64).reshape(-1)
    if s.size == 0 or not np.isfinite(s).all():
        raise ValueError(f"{int((~np.isfinite(s)).sum())} of {s.size} sample complexity scores are NaN/inf (or none "
                         "given); drop the images the scorer failed on before calibrating")

    def spread(x: np.ndarray) -> float:
        sd = float(np.std(x))
        return sd if sd > 0 else 1.0

    conf = {int(e): np.asarray(v, np.float64).reshape(-1) for e, v in confidences.items()}
    return {"weight": float(weight), "score_mean": float(np.mean(s)), "score_std": spread(s),
            "confidence_mean": {e: float(np.mean(v)) for e, v in conf.items()},
            "confidence_std": {e: spread(v) for e, v in conf.items()}}


def sample_signal(confidences: dict, scores, weight: float) -> tuple[dict, dict]:
    """Return (the complexity block fitted on this sample, {early exit: the sample's combined signal}): what a
    confidence router with that block compares with its thresholds, so fit the thresholds on it."""
    block = complexity_block(confidences, scores, weight)
    return block, combined_signal(confidences, scores, block)


def thresholds_for_mix(confidences: dict, exits: Sequence[int], fractions: Sequence[float]) -> list[float]:
    """Return one threshold per early exit such that ``fractions`` of the sample leave at each exit.

    At each early exit, among the rows still in the tower, the most confident leave until the exit's share is
    met (rounded up, ties included: towards the shallower exit). Thresholds sit midway between neighbouring
    distinct confidences; +inf when none leaves there, -inf when every remaining row must.
    """
    exits = [int(e) for e in exits]
    conf = _confidences(confidences, exits)
    n = next(iter(conf.values())).size
    cum = np.cumsum(np.asarray(fractions, np.float64))
    remaining = np.ones(n, bool)
    left, out = 0, []
    for i, e in enumerate(exits[:-1]):
        want = n if cum[i] >= 1.0 - 1e-12 else int(math.ceil(cum[i] * n - 1e-9))
        k = min(max(want - left, 0), int(remaining.sum()))
        c = conf[e][remaining]
        if k == 0:
            out.append(math.inf)
            continue
        if k >= c.size:
            out.append(-math.inf)
        else:
            s = np.sort(c)[::-1]
            value = s[k - 1]
            below = s[s < value]
            out.append(float((value + below[0]) / 2.0) if below.size else -math.inf)
        leave = remaining & (conf[e] >= out[-1])
        left += int(leave.sum())
        remaining &= ~leave
    return out


def realised(router: ConfidenceRouter, confidences: dict, cost_per_exit: dict) -> dict:
    """Return {"depth": exit per row, "fractions": {exit: share}, "gflops": mean per row} of ``router`` on a sample."""
    depth = router.route_confidences(confidences)
    fractions = {e: float((depth == e).mean()) for e in router.exits}
    gflops = float(sum(fractions[e] * cost_per_exit[e] for e in router.exits))
    return {"depth": depth, "fractions": fractions, "gflops": gflops}


def _candidates(confidences: dict, exits: list[int], tower_gflops: dict, confidence_gflops: dict,
                scorer_gflops: float, rule: str, shares, confidence_identity: dict, scorer_identity: dict | None,
                steps: int):
    """Yield (parameter, router, realised mix, cost per exit) along ``rule``, least aggressive first."""
    if rule not in RULES:
        raise ValueError(f"confidence calibration rule {rule!r} is not one of {', '.join(RULES)}")
    if rule == "level":
        pooled = np.concatenate([confidences[e] for e in exits[:-1]])
        levels = np.unique(np.quantile(pooled, np.linspace(0.0, 1.0, LEVELS + 1)))[::-1]
        grid = np.concatenate([[math.inf], levels, [-math.inf]])
    else:
        grid = np.unique(np.concatenate([np.linspace(st, st + 1, steps + 1) for st in range(len(exits) - 1)]))
    for a in grid:
        thresholds = ([float(a)] * (len(exits) - 1) if rule == "level"
                      else thresholds_for_mix(confidences, exits, exit_fractions(len(exits), a, shares)))
        router = ConfidenceRouter(exits, thresholds, confidence_identity, scorer_identity=scorer_identity)
        cost = router.gflops_per_exit(tower_gflops, confidence_gflops, scorer_gflops)
        yield float(a), router, realised(router, confidences, cost), cost


def _record(router: ConfidenceRouter, rule: str, a: float, mix: dict, cost: dict, tower_gflops: dict,
            confidence_gflops: dict, scorer_gflops: float, shares, n: int, steps: int, **extra) -> None:
    full = float(tower_gflops[router.exits[-1]] if router.exits[-1] in tower_gflops
                 else tower_gflops[str(router.exits[-1])])
    router.calibration = {
        **extra,
        **({"rule": "level: one confidence level for every early exit, the highest whose sample cost meets the goal "
                    "(budget) or the cheapest meeting it (recall); a row leaves at the first exit where its "
                    "confidence reaches it", "level": a if math.isfinite(a) else str(a), "levels": LEVELS} if rule == "level" else
           {"rule": "mix: exit_fractions family, one aggressiveness parameter; at each early exit, shallowest first, "
                    "the most confident rows still in the tower leave until the exit's share is met (ties to the "
                    "shallower exit)", "shares": None if shares is None else [float(x) for x in shares],
            "steps_per_stage": int(steps), "aggressiveness": a}),
        "achieved_fractions": {str(e): f for e, f in mix["fractions"].items()},
        "achieved_cost_fraction": mix["gflops"] / full,
        "achieved_gflops_per_image": mix["gflops"],
        "full_depth_gflops": full,
        "gflops_per_exit": {str(e): float(g) for e, g in cost.items()},
        "confidence_gflops": {str(k): float(v) for k, v in confidence_gflops.items()},
        "scorer_gflops": float(scorer_gflops),
        "sample_size": int(n),
    }


def calibrate_confidence_budget(confidences: dict, exits: Sequence[int], tower_gflops: dict, confidence_gflops: dict,
                                budget: float, confidence_identity: dict, scorer_gflops: float = 0.0,
                                shares: Sequence[float] | None = None, scorer_identity: dict | None = None,
                                steps: int = STEPS_PER_STAGE, rule: str = "level",
                                budget_confidence: float = 0.5) -> ConfidenceRouter:
    """Return the least aggressive ConfidenceRouter whose mean cost per row on the sample is <= budget × full depth.

    Cost counts the confidence heads run on the way (and the scorer, when one runs besides). With
    ``budget_confidence`` above 0.5 the goal is ``router.ceiling_margin`` under the budget (measured on the
    first candidate meeting the budget), so that a new sample's mean cost stays within it with that probability.
    Raises ValueError when even every row at the shallowest exit costs more than the budget.
    """
    exits = sorted(int(e) for e in exits)
    conf = _confidences(confidences, exits)
    n = next(iter(conf.values())).size
    if not budget > 0:
        raise ValueError(f"--gflops-budget must be a positive fraction of full-depth cost, got {budget}")
    floor_router = ConfidenceRouter(exits, [-math.inf] * (len(exits) - 1), confidence_identity)
    floor_cost = floor_router.gflops_per_exit(tower_gflops, confidence_gflops, scorer_gflops)[exits[0]]
    full = float({int(k): v for k, v in tower_gflops.items()}[exits[-1]])
    if budget * full < floor_cost - 1e-12:
        raise ValueError(f"a budget of {budget:.3f} × full depth is unreachable: every row at the shallowest exit "
                         f"{exits[0]} with its confidence head already costs {floor_cost / full:.3f} × full depth; "
                         "raise the budget or add a shallower exit")
    goal, margin = budget * full, None
    for a, router, mix, cost in _candidates(conf, exits, tower_gflops, confidence_gflops, scorer_gflops, rule,
                                            shares, confidence_identity, scorer_identity, steps):
        if mix["gflops"] > goal + 1e-12:
            continue
        if margin is None:  # the first candidate within the budget sets the margin; the goal moves under it
            margin = ceiling_margin(row_costs(mix["depth"], cost), budget_confidence)
            goal = max(goal - margin, floor_cost)
            if mix["gflops"] > goal + 1e-12:
                continue
        _record(router, rule, a, mix, cost, tower_gflops, confidence_gflops, scorer_gflops, shares, n, steps,
                mode="gflops_budget", target=float(budget), **ceiling_record(budget_confidence, margin, full))
        log.info("calibrated confidence thresholds %s to %.3f × full depth (target %.3f, margin %.4f) on %d rows: "
                 "mix %s", router.thresholds, router.calibration["achieved_cost_fraction"], budget, margin / full, n,
                 router.calibration["achieved_fractions"])
        return router
    raise ValueError(f"no mix of the family meets a budget of {budget:.3f} × full depth on this sample; raise it")


def calibrate_confidence_recall(confidences: dict, exit_embeddings: dict, text_embeddings: np.ndarray,
                                text_to_image, min_recall: float, tower_gflops: dict, confidence_gflops: dict,
                                confidence_identity: dict, scorer_gflops: float = 0.0,
                                shares: Sequence[float] | None = None, k: int = 10,
                                scorer_identity: dict | None = None, steps: int = STEPS_PER_STAGE,
                                rule: str = "level", recall_confidence: float = 0.5,
                                exit_scales: dict | None = None, exit_offsets: dict | None = None) -> ConfidenceRouter:
    """Return the cheapest ConfidenceRouter whose text→image recall@k on the sample is ≥ min_recall × full depth's
    (for new captions with probability ``recall_confidence``: ``router.RecallFloor``), each exit's rows scored with
    its ``exit_scales`` and ``exit_offsets`` as `icar index` scores them.

    ``exit_embeddings``: {exit: (N, D) L2-normalised embeddings of the sample at that exit}; ``text_embeddings``
    (T, D) the captions, ``text_to_image`` (T,) the image each describes. Every candidate mix is measured.
    """
    exits = sorted(int(e) for e in exit_embeddings)
    conf = _confidences(confidences, exits)
    n = next(iter(conf.values())).size
    if not 0 < min_recall <= 1.0:
        raise ValueError(f"--min-recall is a fraction of full-depth recall in (0, 1], got {min_recall}")
    for e in exits:
        rows = np.asarray(exit_embeddings[e]).shape[0]
        if rows != n:
            raise ValueError(f"exit {e} has {rows} embeddings for {n} sample confidences")
    measure = MixRecall(exit_embeddings, text_embeddings, text_to_image, k, min_recall, recall_confidence, exit_scales,
                        exit_offsets)
    best = None
    for a, router, mix, cost in _candidates(conf, exits, tower_gflops, confidence_gflops, scorer_gflops, rule,
                                            shares, confidence_identity, scorer_identity, steps):
        if best is not None and mix["gflops"] >= best[2]["gflops"] - 1e-12:
            continue
        hits = measure.hits(mix["depth"])
        if measure.floor.holds(hits)[0]:
            best = (a, router, mix, cost, hits)
    a, router, mix, cost, hits = best  # full depth (a = 0) always passes
    recall, full_recall = float(hits.mean()), measure.full_recall
    _record(router, rule, a, mix, cost, tower_gflops, confidence_gflops, scorer_gflops, shares, n, steps,
            mode="min_recall", target=float(min_recall), **measure.floor.record(hits),
            metric=f"text->image recall@{k}",
            full_depth_recall=float(full_recall), achieved_recall=float(recall),
            achieved_recall_ratio=float(recall / full_recall), captions=int(measure.text_to_image.size))
    log.info("calibrated confidence thresholds %s: recall@%d %.4f (%.3f of full depth) at %.3f × full-depth cost",
             router.thresholds, k, recall, recall / full_recall, router.calibration["achieved_cost_fraction"])
    return router
