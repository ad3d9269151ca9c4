"""Routing: which exit depth each image runs to, and the calibration that picks the thresholds.

A router maps complexity scores (and sample keys) to exit depths. The policies:

- ``FixedRouter(depth)``: every image to one depth (baselines, full-depth runs).
- ``FractionRouter(exits, fractions)``: a fixed share of images per exit, chosen by a stable hash of the
  key (benchmarks that need a known mix without a scorer); the same key always gets the same exit, on
  every process and every run.
- ``ThresholdRouter(exits, thresholds)``: score <= thresholds[0] -> exits[0], ..., > thresholds[-1] ->
  exits[-1]. Simple images leave early; any number of exits (the paper's binary router is two exits).
- ``ProfileRouter(profiles, thresholds)``: the same by score, over (exit, token-merging) profiles.
- ``ConfidenceRouter(exits, thresholds, confidence)``: decided inside the tower: a row leaves at the first early
  exit whose learned confidence (pipeline/model/confidence.py) clears that exit's threshold; no score needed,
  unless it carries a complexity block (confidence minus a weighted complexity score, both standardised); its
  thresholds are fitted by pipeline/model/confidence_calibration.py.

Calibration is pure functions over a sample of scores: ``calibrate_budget`` (a GFLOP budget as a share of
full-depth cost, scorer included; optionally a ceiling that a new sample's mean cost stays under with a stated
probability, ``ceiling_margin``) and ``calibrate_recall`` (the cheapest thresholds whose text→image
recall@10 stays above a floor). Both move along the same one-parameter family of exit mixes, described in
``exit_fractions``, and record what they chose and why in ``router.calibration``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Sequence
from statistics import NormalDist

import numpy as np

from pipeline.io import storage
from pipeline.metrics import best_relevant_rank
from pipeline.model.spec import parse_profiles

log = logging.getLogger(__name__)

ROUTER_FORMAT = 1  # version of the router JSON document
# `icar calibrate --budget-confidence` / `--recall-confidence`: how surely --gflops-budget / --min-recall hold for the
# images that follow (the share of new samples whose mean cost stays within the budget, resp. recall above the floor)
DEFAULT_BUDGET_CONFIDENCE = 0.95
DEFAULT_RECALL_CONFIDENCE = 0.95


def _check_exits(exits: Sequence[int]) -> list[int]:
    """Return ``exits`` as a list of ints, or raise unless they are positive and strictly increasing."""
    out = [int(e) for e in exits]
    if not out:
        raise ValueError("a router needs at least one exit depth")
    if any(e <= 0 for e in out) or any(b <= a for a, b in zip(out, out[1:])):
        raise ValueError(f"exits must be positive block counts in increasing order, got {list(exits)}")
    return out


def _encode_float(x: float) -> float | str:
    """Return ``x`` for JSON: strict JSON has no infinities, so they are written as "inf"/"-inf"."""
    x = float(x)
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x


class FixedRouter:
    """Routes every image to one depth."""

    kind = "fixed"
    needs_scores = False

    def __init__(self, depth: int):
        self.depth = int(depth)
        if self.depth <= 0:
            raise ValueError(f"FixedRouter depth must be a positive block count, got {depth}")

    def route(self, scores: np.ndarray | None, keys: list[str]) -> np.ndarray:
        """Return the exit depth (int16) of each of ``keys``: always ``depth``."""
        return np.full(len(keys), self.depth, np.int16)

    def to_dict(self) -> dict:
        """Return the JSON-ready description of this router."""
        return {"format": ROUTER_FORMAT, "kind": self.kind, "depth": self.depth}


def stable_unit_hash(keys: Sequence[str], salt: str = "") -> np.ndarray:
    """Return a float64 in [0, 1) per key from blake2b of salt+key: identical on every process and run.

    Python's hash() is salted per process, so it would route the same key differently on each actor.
    """
    out = np.empty(len(keys), np.float64)
    for i, key in enumerate(keys):
        digest = hashlib.blake2b((salt + key).encode("utf-8"), digest_size=8).digest()
        out[i] = int.from_bytes(digest, "big") / 2.0**64
    return out


class FractionRouter:
    """Sends a fixed share of images to each exit, chosen by a stable hash of the key (no scorer needed)."""

    kind = "fraction"
    needs_scores = False

    def __init__(self, exits: Sequence[int], fractions: Sequence[float], salt: str = ""):
        self.exits = _check_exits(exits)
        self.fractions = [float(f) for f in fractions]
        self.salt = salt  # changes which keys land where, keeping the shares
        if len(self.fractions) != len(self.exits):
            raise ValueError(f"FractionRouter needs one fraction per exit: {len(self.exits)} exits {self.exits} "
                             f"but {len(self.fractions)} fractions {self.fractions}")
        if any(f < 0 or not math.isfinite(f) for f in self.fractions):
            raise ValueError(f"route fractions must be finite and >= 0, got {self.fractions}")
        total = sum(self.fractions)
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"route fractions must sum to 1, got {self.fractions} (sum {total:.6g}); "
                             "e.g. --route-fractions 0.5,0.5 for two exits")
        self._edges = np.cumsum(self.fractions)[:-1]

    def route(self, scores: np.ndarray | None, keys: list[str]) -> np.ndarray:
        """Return the exit depth (int16) of each key; the scores are ignored."""
        u = stable_unit_hash(keys, self.salt)
        idx = np.searchsorted(self._edges, u, side="right")
        return np.asarray(self.exits, np.int16)[idx]

    def to_dict(self) -> dict:
        """Return the JSON-ready description of this router."""
        return {"format": ROUTER_FORMAT, "kind": self.kind, "exits": self.exits, "fractions": self.fractions,
                "salt": self.salt}


class ThresholdRouter:
    """Routes by complexity: score <= thresholds[i] -> exits[i] (first match), above all -> exits[-1].

    NaN scores (a scorer that failed on an image) go to full depth, never to an early exit, and are
    counted in ``nan_routed`` so a run can report them.
    """

    kind = "threshold"
    needs_scores = True

    def __init__(self, exits: Sequence[int], thresholds: Sequence[float | str],
                 scorer_identity: dict | None = None, calibration: dict | None = None):
        self.exits = _check_exits(exits)
        self.thresholds = [float(t) for t in thresholds]
        if len(self.thresholds) != len(self.exits) - 1:
            raise ValueError(f"{len(self.exits)} exits {self.exits} need {len(self.exits) - 1} thresholds, "
                             f"got {len(self.thresholds)}: {self.thresholds}")
        if any(math.isnan(t) for t in self.thresholds) or any(
                b < a for a, b in zip(self.thresholds, self.thresholds[1:])):
            raise ValueError(f"thresholds must be non-decreasing numbers, got {self.thresholds}")
        self.scorer_identity = scorer_identity  # the scorer the thresholds were calibrated for
        self.calibration = dict(calibration or {})  # how the thresholds were chosen (mode, target, sample, ...)
        self.nan_routed = 0  # NaN scores sent to full depth so far

    def route(self, scores: np.ndarray, keys: list[str] | None = None) -> np.ndarray:
        """Return the exit depth (int16) of each score (keys only fix the count)."""
        s = np.asarray(scores, np.float64).reshape(-1)
        if keys is not None and len(keys) != s.size:
            raise ValueError(f"{s.size} scores for {len(keys)} keys; the scorer must score every image")
        idx = np.searchsorted(np.asarray(self.thresholds, np.float64), s, side="left")
        nan = np.isnan(s)
        if nan.any():
            idx[nan] = len(self.exits) - 1
            self.nan_routed += int(nan.sum())
            log.warning("%d images had no complexity score (NaN): routed to full depth %d",
                        int(nan.sum()), self.exits[-1])
        return np.asarray(self.exits, np.int16)[idx]

    def to_dict(self) -> dict:
        """Return the JSON-ready description of this router."""
        return {"format": ROUTER_FORMAT, "kind": self.kind, "exits": self.exits,
                "thresholds": [_encode_float(t) for t in self.thresholds],
                "scorer": self.scorer_identity, "calibration": self.calibration}


class ProfileRouter:
    """Routes by complexity to profiles (exit depth + token-merging schedule, pipeline.model.spec), cheapest first.

    ``profiles`` are spec strings (``4``, ``8@keep0.8``, ...) in increasing cost; score <= thresholds[i] ->
    profiles[i], above all -> profiles[-1] (NaN scores too: the last profile should be full depth unmerged).
    It is a ThresholdRouter over profile positions, so calibration moves along the same family of mixes.
    ``heads``: {merge schedule spec: exit-heads file trained under that schedule} (``icar train-exits --merge``).
    """

    kind = "profile"
    needs_scores = True

    def __init__(self, profiles: Sequence[str], thresholds: Sequence[float | str],
                 scorer_identity: dict | None = None, calibration: dict | None = None, heads: dict | None = None):
        self.profile_list = parse_profiles(list(profiles))
        self.profiles = [p.spec for p in self.profile_list]
        self._levels = ThresholdRouter(range(1, len(self.profiles) + 1), thresholds, scorer_identity, calibration)
        self._depths = np.asarray([p.exit for p in self.profile_list], np.int16)
        self.heads = {str(k): str(v) for k, v in (heads or {}).items()}
        self.needs_scores = len(self.profiles) > 1  # one profile (e.g. merging only) routes without a scorer

    thresholds = property(lambda self: self._levels.thresholds)
    scorer_identity = property(lambda self: self._levels.scorer_identity)
    calibration = property(lambda self: self._levels.calibration,
                           lambda self, value: setattr(self._levels, "calibration", dict(value)))
    nan_routed = property(lambda self: self._levels.nan_routed)

    @property
    def profile_exits(self) -> list[int]:
        """Return the exit depths the profiles use (sorted, unique)."""
        return sorted({p.exit for p in self.profile_list})

    def route_profiles(self, scores: np.ndarray, keys: list[str] | None = None) -> np.ndarray:
        """Return each image's profile position (int16 index into ``profiles``)."""
        if len(self.profiles) == 1:  # nothing to choose: no scores needed, none missing
            return np.zeros(len(keys) if keys is not None else np.asarray(scores).size, np.int16)
        return (self._levels.route(scores, keys) - 1).astype(np.int16)

    def route(self, scores: np.ndarray, keys: list[str] | None = None) -> np.ndarray:
        """Return each image's exit depth (int16), as every router does."""
        return self._depths[self.route_profiles(scores, keys)]

    def to_dict(self) -> dict:
        """Return the JSON-ready description of this router."""
        d = {"format": ROUTER_FORMAT, "kind": self.kind, "profiles": self.profiles,
             "thresholds": [_encode_float(t) for t in self.thresholds], "scorer": self.scorer_identity,
             "calibration": self.calibration}
        if self.heads:
            d["heads"] = self.heads
        return d


class ConfidenceRouter:
    """Routes inside the tower: a row leaves at the first early exit whose confidence is >= that exit's threshold.

    Confidences come from ConfidenceHeads (pipeline/model/confidence.py) evaluated on the way by
    ``AdaptiveEncoder.forward_confident``; the last exit takes every row left. A threshold of +inf closes its exit
    (its confidence head is not even run), -inf sends every row that reaches it out there. No complexity score is
    needed (``needs_scores`` False); ``confidence`` is the identity of the heads file the thresholds were fitted
    for (its "path" is where the worker loads it from).

    With a ``complexity`` block (``icar calibrate --complexity-weight W``) the compared signal is each exit's
    standardised confidence minus W times the image's standardised complexity score (``combined_signal``): a
    scorer must then run (``needs_scores`` True), the one recorded in ``scorer_identity``.
    """

    kind = "confidence"

    def __init__(self, exits: Sequence[int], thresholds: Sequence[float | str], confidence: dict,
                 scorer_identity: dict | None = None, calibration: dict | None = None,
                 complexity: dict | None = None):
        self.exits = _check_exits(exits)
        self.thresholds = [float(t) for t in thresholds]
        if len(self.thresholds) != len(self.exits) - 1:
            raise ValueError(f"{len(self.exits)} exits {self.exits} need {len(self.exits) - 1} confidence thresholds "
                             f"(one per early exit), got {len(self.thresholds)}: {self.thresholds}")
        if any(math.isnan(t) for t in self.thresholds):
            raise ValueError(f"confidence thresholds must be numbers or +-inf, got {self.thresholds}")
        if not isinstance(confidence, dict) or not confidence.get("path"):
            raise ValueError("a confidence router names its confidence-heads file ({'path': ..., 'sha256': ...}); "
                             "write one with `icar calibrate --confidence-heads FILE`")
        self.confidence = dict(confidence)
        self.scorer_identity = scorer_identity  # a scorer the run is asked to run besides (its GFLOPs were counted)
        self.calibration = dict(calibration or {})
        self.complexity = _check_complexity(complexity, self.exits) if complexity is not None else None
        # With a complexity block the rule reads the image's complexity score too: a scorer must run, the one the
        # standardisation was fitted on (checked as for the complexity router).
        self.needs_scores = self.complexity is not None

    @property
    def evaluated_exits(self) -> list[int]:
        """Return the early exits whose confidence head runs (those with a threshold below +inf)."""
        return [e for e, t in zip(self.exits, self.thresholds) if t != math.inf]

    def route(self, scores, keys=None) -> np.ndarray:
        """Refuse: this router decides from confidences inside the tower, not from complexity scores."""
        raise TypeError("a confidence router decides inside the tower; embed with AdaptiveEncoder.forward_confident "
                        "(the model worker does), or route precomputed confidences with route_confidences")

    def route_confidences(self, confidences: dict, scores=None) -> np.ndarray:
        """Return each row's exit depth (int16) from every early exit's confidences {exit: (N,)} (e.g. on a sample).

        The same rule as ``forward_confident``: the first early exit whose confidence >= its threshold; NaN never
        clears a threshold. With a complexity block the compared signal is ``combined_signal`` (``scores`` needed).
        """
        if self.complexity is not None:
            if scores is None:
                raise ValueError("this confidence router also reads complexity scores (its 'complexity' block); "
                                 "pass the rows' scores to route_confidences")
            confidences = combined_signal(confidences, scores, self.complexity)
        n = len(np.asarray(confidences[self.exits[0]]).reshape(-1)) if self.exits[:-1] else 0
        out = np.full(n, self.exits[-1], np.int16)
        open_rows = np.ones(n, bool)
        for e, t in zip(self.exits, self.thresholds):
            if t == math.inf:
                continue
            leave = open_rows & (np.asarray(confidences[e], np.float64).reshape(-1) >= t)
            out[leave] = e
            open_rows &= ~leave
        return out

    def with_complexity(self, block: dict) -> "ConfidenceRouter":
        """Return this router reading ``block`` too: its thresholds were fitted on ``combined_signal`` of a sample
        (``confidence_calibration.sample_signal``), so routing must compute that signal as well."""
        return ConfidenceRouter(self.exits, self.thresholds, self.confidence, scorer_identity=self.scorer_identity,
                                calibration=self.calibration, complexity=block)

    def row_thresholds(self, scores) -> list:
        """Return per early exit the threshold on the RAW confidence that the combined rule amounts to: a float (no
        complexity block, or a closed exit) or a float64 (N,) array, mean_e + std_e * (threshold_e + w * z(score)).

        So ``forward_confident`` compares raw confidences only; a NaN score gives NaN thresholds (full depth)."""
        if self.complexity is None:
            return list(self.thresholds)
        c = self.complexity
        z = (np.asarray(scores, np.float64).reshape(-1) - c["score_mean"]) / c["score_std"]
        out: list = []
        for e, t in zip(self.exits, self.thresholds):
            if t == math.inf:
                out.append(t)  # closed whatever the score: its confidence head is not even run
                continue
            out.append(c["confidence_mean"][e] + c["confidence_std"][e] * (t + c["weight"] * z))
        return out

    def gflops_per_exit(self, tower_gflops: dict, confidence_gflops: dict, scorer_gflops: float = 0.0) -> dict:
        """Return {exit: GFLOPs a row leaving there spent}: tower up to it (its head included), every confidence head
        run on the way (at the open early exits up to and including it), and the scorer if one runs."""
        tower = _gflops_table(self.exits, tower_gflops)
        conf = {int(k): float(v) for k, v in confidence_gflops.items()}
        missing = [e for e in self.evaluated_exits if e not in conf]
        if missing:
            raise ValueError(f"no counted confidence-head GFLOPs for exits {missing}; count them with "
                             "pipeline.model.confidence.confidence_gflops")
        out, spent = {}, 0.0
        for e in self.exits:
            if e in self.evaluated_exits:
                spent += conf[e]
            out[e] = float(tower[e] + spent + scorer_gflops)
        return out

    def to_dict(self) -> dict:
        """Return the JSON-ready description of this router."""
        return {"format": ROUTER_FORMAT, "kind": self.kind, "exits": self.exits,
                "thresholds": [_encode_float(t) for t in self.thresholds], "confidence": self.confidence,
                "scorer": self.scorer_identity, "calibration": self.calibration,
                **({"complexity": _complexity_json(self.complexity)} if self.complexity is not None else {})}


def _check_complexity(block: dict, exits: list[int]) -> dict:
    """Return a confidence router's complexity block with int exit keys and float values, or raise naming the gap.

    ``{"weight": w, "confidence_mean": {exit: m}, "confidence_std": {exit: s}, "score_mean": m, "score_std": s}``:
    the sample statistics ``combined_signal`` standardises with (pipeline.model.confidence_calibration fits them).
    """
    fix = "refit it with `icar calibrate --confidence-heads FILE --complexity-weight W`"
    try:
        out = {"weight": float(block["weight"]), "score_mean": float(block["score_mean"]),
               "score_std": float(block["score_std"]),
               "confidence_mean": {int(k): float(v) for k, v in block["confidence_mean"].items()},
               "confidence_std": {int(k): float(v) for k, v in block["confidence_std"].items()}}
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"a confidence router's complexity block needs weight, confidence_mean, confidence_std, "
                         f"score_mean and score_std ({type(e).__name__}: {e}); {fix}") from None
    missing = [e for e in exits[:-1] if e not in out["confidence_mean"] or e not in out["confidence_std"]]
    if missing:
        raise ValueError(f"the complexity block has no confidence mean/std for early exits {missing}; {fix}")
    stds = [out["score_std"], *(out["confidence_std"][e] for e in exits[:-1])]
    if not all(math.isfinite(v) and v > 0 for v in stds) or not math.isfinite(out["weight"]) or out["weight"] < 0:
        raise ValueError(f"the complexity block needs positive finite spreads and a weight >= 0, got {block}; {fix}")
    return out


def _complexity_json(block: dict) -> dict:
    """Return a complexity block for JSON (exit keys as strings)."""
    return {"weight": block["weight"], "score_mean": block["score_mean"], "score_std": block["score_std"],
            "confidence_mean": {str(e): v for e, v in block["confidence_mean"].items()},
            "confidence_std": {str(e): v for e, v in block["confidence_std"].items()}}


def combined_signal(confidences: dict, scores, block: dict) -> dict[int, np.ndarray]:
    """Return {early exit: float64 (N,)}: (conf_e - mean_e) / std_e - weight * (score - score_mean) / score_std.

    A confident, simple image scores high; ``block`` holds the sample statistics (keys int or str). The confidence
    router with a complexity block compares this signal with its thresholds."""
    s = np.asarray(scores, np.float64).reshape(-1)
    mean = {int(k): float(v) for k, v in block["confidence_mean"].items()}
    std = {int(k): float(v) for k, v in block["confidence_std"].items()}
    z_score = (s - float(block["score_mean"])) / float(block["score_std"])
    out = {}
    for e in mean:
        c = np.asarray(confidences[e] if e in confidences else confidences[str(e)], np.float64).reshape(-1)
        if c.size != s.size:
            raise ValueError(f"{c.size} confidences at exit {e} for {s.size} complexity scores")
        out[e] = (c - mean[e]) / std[e] - float(block["weight"]) * z_score
    return out


def router_from_dict(d: dict):
    """Return the router described by ``d`` (the output of ``.to_dict()``)."""
    kind = d.get("kind")
    if d.get("format", ROUTER_FORMAT) > ROUTER_FORMAT:
        raise ValueError(f"router format {d.get('format')} is newer than this icar understands ({ROUTER_FORMAT}); "
                         "upgrade icar")
    if kind == FixedRouter.kind:
        return FixedRouter(d["depth"])
    if kind == FractionRouter.kind:
        return FractionRouter(d["exits"], d["fractions"], salt=d.get("salt", ""))
    if kind == ThresholdRouter.kind:
        return ThresholdRouter(d["exits"], d["thresholds"], scorer_identity=d.get("scorer"),
                               calibration=d.get("calibration"))
    if kind == ProfileRouter.kind:
        return ProfileRouter(d["profiles"], d["thresholds"], scorer_identity=d.get("scorer"),
                             calibration=d.get("calibration"), heads=d.get("heads"))
    if kind == ConfidenceRouter.kind:
        return ConfidenceRouter(d["exits"], d["thresholds"], d.get("confidence"), scorer_identity=d.get("scorer"),
                                calibration=d.get("calibration"), complexity=d.get("complexity"))
    raise ValueError(f"unknown router kind {kind!r}; expected fixed, fraction, threshold, profile or confidence")


def save_router(router, url: str, storage_options: dict | None = None) -> None:
    """Write ``router`` as JSON to ``url`` (local path or fsspec URL), atomically."""
    storage.write_json(router.to_dict(), url, storage_options)


def load_router(url: str, storage_options: dict | None = None):
    """Return the router stored as JSON at ``url``."""
    try:
        d = storage.read_json(url, storage_options)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"router file {url} does not exist; make one with `icar calibrate`") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"router file {url} is not valid JSON ({e}); re-create it with `icar calibrate`") from e
    return router_from_dict(d)


# ------------------------------------------------------------------------------------------ calibration
#
# The family of exit mixes. With n exits e_0 < ... < e_{n-1} and shares w_0..w_{n-2} for the early exits
# (default: equal), a mix is set by one number, the aggressiveness a in [0, n-1], starting from every
# image at full depth (a = 0):
#   stage 0 (a in [0, 1]) moves a share a of the images from e_{n-1} to e_0..e_{n-2}, split by their shares;
#   stage 1 (a in [1, 2]) then moves the same way a share a-1 of the images at e_{n-2} to e_0..e_{n-3};
#   ... until a = n-1 puts every image at e_0.
# Cost is continuous, piecewise linear and non-increasing in a, so a budget has one least-aggressive
# solution, and since thresholds are score quantiles the least complex images always take the shallowest
# exits. Equal shares spread the savings over all early exits instead of piling every simple image into
# the shallowest one; with two exits the family is exactly the paper's binary router.


def exit_fractions(n_exits: int, aggressiveness: float, shares: Sequence[float] | None = None) -> np.ndarray:
    """Return the share of images per exit (sums to 1) at ``aggressiveness`` a in [0, n_exits-1]."""
    if n_exits < 1:
        raise ValueError("need at least one exit")
    w = np.ones(n_exits - 1) if shares is None else np.asarray(shares, np.float64)
    if w.shape != (n_exits - 1,) or (w < 0).any() or not np.isfinite(w).all() or (n_exits > 1 and w.sum() <= 0):
        raise ValueError(f"shares must be {n_exits - 1} non-negative weights (one per early exit, not all 0), "
                         f"got {shares}")
    a = float(np.clip(aggressiveness, 0.0, n_exits - 1))
    frac = np.zeros(n_exits)
    frac[-1] = 1.0
    for stage in range(n_exits - 1):
        t = min(max(a - stage, 0.0), 1.0)
        if t <= 0.0:
            break
        m = n_exits - 1 - stage  # the exit being emptied in this stage
        moved = frac[m] * t
        frac[m] -= moved
        ws = w[:m]
        if ws.sum() > 0:
            frac[:m] += moved * ws / ws.sum()
        else:
            frac[0] += moved
    return frac


def _expected_cost(fractions: np.ndarray, exits: Sequence[int], gflops_per_exit: dict, scorer_gflops: float
                   ) -> float:
    """Return the expected GFLOPs per image of an exit mix, scorer included."""
    return float(scorer_gflops + sum(f * float(gflops_per_exit[e]) for f, e in zip(fractions, exits)))


def _gflops_table(exits: Sequence[int], gflops_per_exit: dict) -> dict[int, float]:
    """Return {exit: gflops} with int keys (JSON gives strings), or raise naming a missing exit."""
    table = {int(k): float(v) for k, v in gflops_per_exit.items()}
    missing = [e for e in exits if e not in table]
    if missing:
        raise ValueError(f"gflops_per_exit has no cost for exits {missing}; count them with pipeline.model.flops.exit_gflops")
    costs = [table[e] for e in exits]
    if any(b < a for a, b in zip(costs, costs[1:])):
        raise ValueError(f"GFLOPs per exit must grow with depth, got {dict(zip(exits, costs))}")
    return table


def thresholds_for_fractions(scores: np.ndarray, fractions: Sequence[float]) -> list[float]:
    """Return thresholds that send the lowest-scored images to the shallowest exits in the given shares.

    Each threshold sits midway between two neighbouring distinct sample scores (so unseen scores split
    the same way as the sample does). Rounding and ties always move images to the SHALLOWER exit, so the
    realised cost on the sample never exceeds the cost of the requested mix. A share of 0 gives -inf,
    a cumulative share of 1 gives +inf.
    """
    s = np.sort(np.asarray(scores, np.float64).reshape(-1))
    n = s.size
    if n == 0:
        raise ValueError("no scores to calibrate on; score a sample of images first")
    cum = np.cumsum(np.asarray(fractions, np.float64))[:-1]
    out = []
    for c in cum:
        if c <= 1e-12:
            out.append(-math.inf)
            continue
        if c >= 1.0 - 1e-12:
            out.append(math.inf)
            continue
        count = int(math.ceil(c * n - 1e-9))  # images at or below this threshold, at least c·n
        value = s[count - 1]
        above = s[s > value]
        out.append(float((value + above[0]) / 2.0) if above.size else math.inf)
    return out


def realised_mix(router: ThresholdRouter, scores: np.ndarray, gflops_per_exit: dict, scorer_gflops: float
                 ) -> dict:
    """Return {"fractions": {exit: share}, "gflops": mean per image, "cost_fraction": ÷ full depth} on scores."""
    table = _gflops_table(router.exits, gflops_per_exit)
    depth = router.route(np.asarray(scores), None)
    fractions = np.array([(depth == e).mean() for e in router.exits])
    g = _expected_cost(fractions, router.exits, table, scorer_gflops)
    return {"fractions": {str(e): float(f) for e, f in zip(router.exits, fractions)}, "gflops": g,
            "cost_fraction": g / table[router.exits[-1]]}


def _finite_scores(scores) -> np.ndarray:
    """Return ``scores`` as float64, or raise when any is NaN/inf (a failed scorer must not set thresholds)."""
    s = np.asarray(scores, np.float64).reshape(-1)
    bad = ~np.isfinite(s)
    if bad.any():
        raise ValueError(f"{int(bad.sum())} of {s.size} calibration scores are NaN/inf; drop the images the "
                         "scorer failed on before calibrating")
    if s.size == 0:
        raise ValueError("no scores to calibrate on; score a sample of images first")
    return s


def check_confidence(confidence: float, flag: str = "--budget-confidence") -> float:
    """Return ``confidence`` if it is a probability in [0.5, 1), else raise naming ``flag`` and what it means."""
    if not 0.5 <= confidence < 1.0:
        raise ValueError(f"{flag} is a probability in [0.5, 1), got {confidence} (0.5 fits the sample exactly; 0.95 "
                         "makes the goal hold for the images that follow 19 times in 20)")
    return float(confidence)


class RecallFloor:
    """Whether a candidate's recall holds ``min_recall`` × full depth's for the captions that follow, not only the
    sample's: with ``confidence`` above 0.5, the ratio's (1 - confidence) quantile over paired bootstrap resamples of
    the sample's queries must reach the floor (the same resamples for every candidate and for full depth); at 0.5
    the sample's own ratio must. Full depth always passes (its ratio is 1 in every resample)."""

    def __init__(self, full_hits: np.ndarray, min_recall: float, confidence: float, resamples: int = 400,
                 seed: int = 0):
        self.min_recall, self.confidence = float(min_recall), check_confidence(confidence, "--recall-confidence")
        self.full_hits = np.asarray(full_hits, np.float64)
        self.full = float(self.full_hits.mean())
        n = self.full_hits.size
        self.idx = (np.random.default_rng(seed).integers(0, n, size=(resamples, n)) if self.confidence > 0.5
                    else None)
        self.full_boot = None if self.idx is None else self.full_hits[self.idx].mean(1)

    def bound(self, hits: np.ndarray) -> float:
        """Return the recall ratio of per-query ``hits`` that holds with the floor's confidence (a resample in which
        full depth finds nothing counts as ratio 1: there was nothing to lose)."""
        hits = np.asarray(hits, np.float64)
        if self.idx is None:
            return float(hits.mean()) / self.full
        found = self.full_boot > 0
        ratio = np.where(found, hits[self.idx].mean(1) / np.where(found, self.full_boot, 1.0), 1.0)
        return float(np.quantile(ratio, 1.0 - self.confidence))

    def holds(self, hits: np.ndarray) -> tuple[bool, float]:
        """Return (whether the floor holds, the bound) for per-query ``hits``; skips the resampling below the floor."""
        point = float(np.mean(hits)) / self.full
        if point < self.min_recall - 1e-12:
            return False, point
        b = self.bound(hits)
        return b >= self.min_recall - 1e-12, b

    def record(self, hits: np.ndarray) -> dict:
        """Return the calibration fields that say what the floor was checked against."""
        return {"recall_confidence": self.confidence, "recall_ratio_bound": self.bound(hits),
                "recall_rule": "the (1 - recall_confidence) quantile of the recall ratio over paired bootstrap "
                               "resamples of the sample's captions reaches the target (0.5: the sample's own ratio)"}


def hits_at_k(sim: np.ndarray, relevant, k: int) -> np.ndarray:
    """Return per query whether a relevant item is among its top ``k`` (float 0/1)."""
    return (best_relevant_rank(sim, relevant) < k).astype(np.float64)


class MixRecall:
    """Text→image hits@k of exit mixes on a captioned calibration sample, and the floor they must hold.

    One matmul per exit (each exit's similarities times its ``exit_scales`` plus its ``exit_offsets``, as `icar
    index` scores its rows);
    a candidate mix (an exit ``depth`` per image) only takes each image's column from its exit. Raises when full
    depth finds nothing (the sample could not tell good routing from bad). ``floor`` is the ``RecallFloor`` of
    ``min_recall`` at ``recall_confidence``.
    """

    def __init__(self, exit_embeddings: dict, text_embeddings: np.ndarray, text_to_image, k: int, min_recall: float,
                 recall_confidence: float, exit_scales: dict | None = None, exit_offsets: dict | None = None):
        self.exits = sorted(int(e) for e in exit_embeddings)
        self.k = int(k)
        text = np.asarray(text_embeddings, np.float32)
        self.text_to_image = np.asarray(text_to_image, np.int64)
        scales = {int(e): float(v) for e, v in (exit_scales or {}).items()}
        offsets = {int(e): float(v) for e, v in (exit_offsets or {}).items()}
        self.sims = {e: (text @ np.asarray(exit_embeddings[e], np.float32).T) * scales.get(e, 1.0) + offsets.get(e, 0.0)
                     for e in self.exits}
        full_hits = hits_at_k(self.sims[self.exits[-1]], self.text_to_image, self.k)
        self.full_recall = float(full_hits.mean())
        if self.full_recall == 0.0:
            raise ValueError(f"full-depth recall@{k} on the calibration captions is 0: the sample cannot tell good "
                             "routing from bad; use more captioned images or a trained model")
        self.floor = RecallFloor(full_hits, min_recall, recall_confidence)

    def hits(self, depth: np.ndarray) -> np.ndarray:
        """Return per caption whether its image is in the top k when each image sits at its ``depth``."""
        sim = np.empty_like(self.sims[self.exits[-1]])
        for e in self.exits:
            cols = depth == e
            sim[:, cols] = self.sims[e][:, cols]
        return hits_at_k(sim, self.text_to_image, self.k)


def ceiling_margin(costs, confidence: float) -> float:
    """Return how far (in GFLOPs) under a budget to fit a mix so that the mean cost of a new sample of the same
    images stays at or under the budget with probability ``confidence`` (one-sided normal bound).

    Thresholds are quantiles of the calibration sample: the share of a new sample past each one moves by its
    binomial error, so the mean cost per image moves by about std(row cost) / sqrt(n) of the sample. ``confidence``
    0.5 fits the sample exactly (margin 0), as calibration did before the margin existed.
    """
    check_confidence(confidence)
    c = np.asarray(costs, np.float64).reshape(-1)
    if confidence == 0.5 or c.size < 2:
        return 0.0
    return NormalDist().inv_cdf(confidence) * float(c.std(ddof=1)) / math.sqrt(c.size)


def row_costs(depth: np.ndarray, cost_per_exit: dict) -> np.ndarray:
    """Return each row's GFLOPs (N,) given its exit ``depth`` (N,) and {exit: GFLOPs}."""
    depth = np.asarray(depth)
    out = np.zeros(depth.shape, np.float64)
    for e, g in cost_per_exit.items():
        out[depth == int(e)] = float(g)
    return out


def calibrate_budget(scores, exits: Sequence[int], gflops_per_exit: dict, scorer_gflops: float, budget: float,
                     shares: Sequence[float] | None = None, scorer_identity: dict | None = None,
                     budget_confidence: float = 0.5) -> ThresholdRouter:
    """Return the ThresholdRouter whose expected cost on ``scores`` is at most ``budget`` × full depth.

    Cost counts the scorer: expected (scorer + encoder) GFLOPs per image ÷ full-depth encoder GFLOPs. The
    mix is the least aggressive one of the ``exit_fractions`` family that meets the budget (so no more
    quality is given up than the budget demands). With ``budget_confidence`` above 0.5 the mix is fitted
    ``ceiling_margin`` under the budget, so that a new sample's mean cost stays within it with that probability.
    Raises ValueError when even the scorer plus the shallowest exit for every image costs more than the budget.
    """
    exits = _check_exits(exits)
    s = _finite_scores(scores)
    table = _gflops_table(exits, gflops_per_exit)
    full = table[exits[-1]]
    if not 0 < budget:
        raise ValueError(f"--gflops-budget must be a positive fraction of full-depth cost, got {budget}")
    floor = (scorer_gflops + table[exits[0]]) / full
    if budget < floor - 1e-12:
        raise ValueError(f"a budget of {budget:.3f} × full depth is unreachable: the scorer ({scorer_gflops:.3f} "
                         f"GFLOPs) plus the shallowest exit {exits[0]} ({table[exits[0]]:.3f}) already cost "
                         f"{floor:.3f} × full depth ({full:.3f} GFLOPs); raise the budget, add a shallower exit, "
                         "or use a cheaper scorer")

    def cost(a: float) -> float:
        return _expected_cost(exit_fractions(len(exits), a, shares), exits, table, scorer_gflops)

    def fit(target: float) -> tuple[float, np.ndarray, ThresholdRouter]:
        if cost(0.0) <= target:
            a = 0.0
        else:
            # Piecewise linear and non-increasing in a: find the stage that crosses the target, solve inside it.
            a = float(len(exits) - 1)
            for stage in range(len(exits) - 1):
                lo, hi = cost(float(stage)), cost(stage + 1.0)
                if hi <= target:
                    a = stage + (lo - target) / (lo - hi) if lo > hi else float(stage)
                    break
        fractions = exit_fractions(len(exits), a, shares)
        return a, fractions, ThresholdRouter(exits, thresholds_for_fractions(s, fractions),
                                             scorer_identity=scorer_identity)

    a, fractions, router = fit(budget * full)
    margin = ceiling_margin(row_costs(router.route(s, None), table), budget_confidence)
    if margin > 0:
        a, fractions, router = fit(max(budget * full - margin, floor * full))
    achieved = realised_mix(router, s, table, scorer_gflops)
    router.calibration = {
        "mode": "gflops_budget",
        "target": float(budget),
        **ceiling_record(budget_confidence, margin, full),
        "rule": "exit_fractions family: one aggressiveness parameter; early exits share the saved images in "
                "proportion to `shares`; thresholds are score quantiles rounded towards the shallower exit",
        "shares": None if shares is None else [float(x) for x in shares],
        "aggressiveness": a,
        "planned_fractions": {str(e): float(f) for e, f in zip(exits, fractions)},
        "achieved_fractions": achieved["fractions"],
        "achieved_cost_fraction": achieved["cost_fraction"],
        "achieved_gflops_per_image": achieved["gflops"],
        "full_depth_gflops": full,
        "scorer_gflops": float(scorer_gflops),
        "gflops_per_exit": {str(e): table[e] for e in exits},
        "sample_size": int(s.size),
    }
    log.info("calibrated to %.3f × full depth (target %.3f, margin %.4f) on %d scores: thresholds %s, mix %s",
             achieved["cost_fraction"], budget, margin / full, s.size, router.thresholds, achieved["fractions"])
    return router


def ceiling_record(budget_confidence: float, margin: float, full: float) -> dict:
    """Return the calibration fields that say how far under the budget the mix was fitted, and why."""
    return {"budget_confidence": float(budget_confidence), "margin_cost_fraction": margin / full,
            "margin_rule": "fitted ceiling_margin under the budget: z(budget_confidence) · std(row GFLOPs) / "
                           "sqrt(sample size), so a new sample's mean cost stays within the budget with that "
                           "probability"}


def routed_embeddings(depth: np.ndarray, exit_embeddings: dict) -> np.ndarray:
    """Return each image's embedding at its routed depth, taken from per-exit embedding matrices."""
    exits = sorted(int(e) for e in exit_embeddings)
    first = np.asarray(exit_embeddings[exits[0]])
    out = np.empty_like(first, dtype=np.float32)
    for e in exits:
        mask = depth == e
        if mask.any():
            out[mask] = np.asarray(exit_embeddings[e])[mask]
    return out


def calibrate_recall(scores, exit_embeddings: dict, text_embeddings: np.ndarray, text_to_image,
                     min_recall: float, gflops_per_exit: dict, scorer_gflops: float = 0.0,
                     shares: Sequence[float] | None = None, k: int = 10, steps: int = 50,
                     scorer_identity: dict | None = None, recall_confidence: float = 0.5,
                     exit_scales: dict | None = None, exit_offsets: dict | None = None) -> ThresholdRouter:
    """Return the cheapest ThresholdRouter whose text→image recall@k is ≥ min_recall × full-depth recall@k
    (for new captions with probability ``recall_confidence``: ``RecallFloor``), each exit's rows scored with its
    ``exit_scales`` and ``exit_offsets`` as `icar index` scores them.

    ``exit_embeddings`` maps every exit depth to the (N, D) L2-normalised embeddings of the N calibration
    images computed at that exit; ``text_embeddings`` (T, D) are their captions, ``text_to_image`` (T,)
    the image each caption describes. Candidate mixes are ``steps`` points per stage of the
    ``exit_fractions`` family; recall is not strictly monotone in the mix, so every candidate is measured
    and the cheapest passing one kept (full depth always passes). The achieved recall and cost are
    recorded in ``router.calibration``; a small sample makes both noisy, so say the sample size.
    """
    s = _finite_scores(scores)
    exits = _check_exits(sorted(int(e) for e in exit_embeddings))
    table = _gflops_table(exits, gflops_per_exit)
    if not 0 < min_recall <= 1.0:
        raise ValueError(f"--min-recall is a fraction of full-depth recall in (0, 1], got {min_recall}")
    emb = {e: np.asarray(exit_embeddings[e], np.float32) for e in exits}
    for e in exits:
        if emb[e].shape[0] != s.size:
            raise ValueError(f"exit {e} has {emb[e].shape[0]} embeddings for {s.size} scores; embed every "
                             "calibration image at every exit")
    measure = MixRecall(emb, text_embeddings, text_to_image, k, min_recall, recall_confidence, exit_scales,
                        exit_offsets)
    best = None
    for a in np.unique(np.concatenate([np.linspace(st, st + 1, steps + 1) for st in range(len(exits) - 1)])):
        router = ThresholdRouter(exits, thresholds_for_fractions(s, exit_fractions(len(exits), a, shares)),
                                 scorer_identity=scorer_identity)
        mix = realised_mix(router, s, table, scorer_gflops)
        if best is not None and mix["gflops"] >= best[2]["gflops"] - 1e-12:
            continue  # not cheaper than a mix that already holds the floor: no need to measure it
        hits = measure.hits(router.route(s, None))
        if measure.floor.holds(hits)[0]:
            best = (a, router, mix, hits)
    a, router, mix, hits = best
    recall, full_recall = float(hits.mean()), measure.full_recall
    router.calibration = {
        "mode": "min_recall",
        "target": float(min_recall),
        **measure.floor.record(hits),
        "metric": f"text->image recall@{k}",
        "full_depth_recall": float(full_recall),
        "achieved_recall": float(recall),
        "achieved_recall_ratio": float(recall / full_recall),
        "rule": "cheapest candidate of the exit_fractions family (steps per stage below) meeting the recall floor",
        "steps_per_stage": int(steps),
        "shares": None if shares is None else [float(x) for x in shares],
        "aggressiveness": float(a),
        "achieved_fractions": mix["fractions"],
        "achieved_cost_fraction": mix["cost_fraction"],
        "achieved_gflops_per_image": mix["gflops"],
        "full_depth_gflops": table[exits[-1]],
        "scorer_gflops": float(scorer_gflops),
        "gflops_per_exit": {str(e): table[e] for e in exits},
        "sample_size": int(s.size),
        "captions": int(measure.text_to_image.size),
    }
    log.info("calibrated to recall@%d %.4f (%.3f of full depth %.4f, floor %.3f) at %.3f × full-depth cost; "
             "thresholds %s", k, recall, recall / full_recall, full_recall, min_recall,
             mix["cost_fraction"], router.thresholds)
    return router


# ------------------------------------------------------------------------------------------ profiles
#
# Profiles (exit depth + token-merging schedule) are calibrated as "levels" 1..P in increasing counted cost:
# the same exit_fractions family, the same quantile thresholds, the same budget and recall searches as for
# exits alone. The last (most expensive) profile is the reference "full" cost and the NaN fallback, so it
# should be the unmerged full depth.


def _profile_levels(profiles: Sequence[str], gflops_per_profile: dict) -> tuple[list[str], dict[int, float]]:
    """Return (profiles sorted by cost, {level: gflops}), or raise naming a profile without a cost."""
    specs = [p.spec for p in parse_profiles(list(profiles))]
    costs = {str(k): float(v) for k, v in gflops_per_profile.items()}
    missing = [p for p in specs if p not in costs]
    if missing:
        raise ValueError(f"no counted GFLOPs for profiles {missing}; count them with pipeline.model.flops.profile_cost")
    ordered = sorted(specs, key=lambda p: costs[p])
    return ordered, {i + 1: costs[p] for i, p in enumerate(ordered)}


def _as_profile_router(inner: ThresholdRouter, ordered: list[str], gflops_per_profile: dict,
                       scorer_identity: dict | None) -> ProfileRouter:
    router = ProfileRouter(ordered, inner.thresholds, scorer_identity=scorer_identity,
                           calibration=inner.calibration)
    cal = router.calibration
    for key in ("planned_fractions", "achieved_fractions"):
        if key in cal:
            cal[key] = {ordered[int(k) - 1]: v for k, v in cal[key].items()}
    cal.pop("gflops_per_exit", None)
    cal["gflops_per_profile"] = {p: float(gflops_per_profile[p]) for p in ordered}
    cal["full_profile"] = ordered[-1]
    return router


def calibrate_profiles_budget(scores, profiles: Sequence[str], gflops_per_profile: dict, scorer_gflops: float,
                              budget: float, shares: Sequence[float] | None = None,
                              scorer_identity: dict | None = None, budget_confidence: float = 0.5) -> ProfileRouter:
    """Return the ProfileRouter whose expected cost on ``scores`` is at most ``budget`` × the dearest profile's."""
    ordered, table = _profile_levels(profiles, gflops_per_profile)
    floor = (scorer_gflops + table[1]) / table[len(ordered)]
    if 0 < budget < floor - 1e-12:
        raise ValueError(f"a budget of {budget:.3f} × the dearest profile {ordered[-1]} is unreachable: the scorer "
                         f"({scorer_gflops:.4f} GFLOPs) plus the cheapest profile {ordered[0]} ({table[1]:.4f}) already "
                         f"cost {floor:.3f}; raise the budget or offer a cheaper profile")
    inner = calibrate_budget(scores, list(table), table, scorer_gflops, budget, shares=shares,
                             scorer_identity=scorer_identity, budget_confidence=budget_confidence)
    return _as_profile_router(inner, ordered, {p: table[i + 1] for i, p in enumerate(ordered)}, scorer_identity)


def calibrate_profiles_recall(scores, profile_embeddings: dict, text_embeddings: np.ndarray, text_to_image,
                              min_recall: float, gflops_per_profile: dict, scorer_gflops: float = 0.0,
                              shares: Sequence[float] | None = None, k: int = 10, steps: int = 50,
                              scorer_identity: dict | None = None, recall_confidence: float = 0.5) -> ProfileRouter:
    """Return the cheapest ProfileRouter whose text→image recall@k is ≥ min_recall × the dearest profile's.

    ``profile_embeddings``: {profile spec: (N, D) embeddings of the N calibration images under that profile}.
    """
    ordered, table = _profile_levels(list(profile_embeddings), gflops_per_profile)
    inner = calibrate_recall(scores, {i + 1: profile_embeddings[p] for i, p in enumerate(ordered)}, text_embeddings,
                             text_to_image, min_recall, table, scorer_gflops=scorer_gflops, shares=shares, k=k,
                             steps=steps, scorer_identity=scorer_identity, recall_confidence=recall_confidence)
    return _as_profile_router(inner, ordered, {p: table[i + 1] for i, p in enumerate(ordered)}, scorer_identity)
