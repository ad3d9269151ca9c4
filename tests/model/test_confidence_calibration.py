"""Fitting confidence thresholds on a sample: the mix asked for is the mix realised, budgets and recall floors hold."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.model.confidence_calibration import (calibrate_confidence_budget, calibrate_confidence_recall,
                                                   thresholds_for_mix)
from pipeline.model.router import ConfidenceRouter

EXITS = [4, 6, 8]
TOWER = {4: 4.0, 6: 6.0, 8: 8.0}
CONF_G = {4: 0.05, 6: 0.05}
IDENT = {"path": "c.safetensors", "sha256": "0" * 64}


def _sample(n=500, seed=0):
    rng = np.random.default_rng(seed)
    return {4: rng.normal(size=n), 6: rng.normal(size=n)}


def test_thresholds_realise_the_mix_shallowest_first():
    conf = _sample()
    t = thresholds_for_mix(conf, EXITS, [0.3, 0.5, 0.2])
    depth = ConfidenceRouter(EXITS, t, IDENT).route_confidences(conf)
    assert [int((depth == e).sum()) for e in EXITS] == [150, 250, 100]
    # those leaving at 4 are the 150 most confident at 4
    assert conf[4][depth == 4].min() > conf[4][depth != 4].max()
    assert thresholds_for_mix(conf, EXITS, [0, 0, 1]) == [math.inf, math.inf]
    assert thresholds_for_mix(conf, EXITS, [1, 0, 0])[0] == -math.inf
    # ties go to the shallower exit: with every confidence equal, asking for 10% sends everyone out at 4
    tied = {4: np.zeros(50), 6: np.zeros(50)}
    depth = ConfidenceRouter(EXITS, thresholds_for_mix(tied, EXITS, [0.1, 0.0, 0.9]), IDENT).route_confidences(tied)
    assert (depth == 4).all()
    with pytest.raises(ValueError, match="NaN/inf"):
        thresholds_for_mix({4: np.array([0.1, np.nan]), 6: np.zeros(2)}, EXITS, [0.5, 0.5, 0])
    with pytest.raises(ValueError, match="no sample confidences for early exit 6"):
        thresholds_for_mix({4: np.zeros(3)}, EXITS, [0.5, 0.5, 0])


@pytest.mark.parametrize("rule", ["level", "mix"])
@pytest.mark.parametrize("budget", [0.6, 0.75, 0.9, 1.0])
def test_budget_is_met_counting_the_confidence_heads(budget, rule):
    conf = _sample()
    r = calibrate_confidence_budget(conf, EXITS, TOWER, CONF_G, budget, IDENT, rule=rule)
    c = r.calibration
    cost = r.gflops_per_exit(TOWER, CONF_G)
    depth = r.route_confidences(conf)
    realised = float(np.mean([cost[int(d)] for d in depth]))
    assert realised == pytest.approx(c["achieved_gflops_per_image"])
    assert c["achieved_cost_fraction"] <= budget + 1e-9
    if budget < 1.0:  # the least aggressive mix meeting it: within one grid step of the budget
        assert c["achieved_cost_fraction"] > budget - 0.02
    else:
        assert r.thresholds == [math.inf, math.inf] and c["achieved_fractions"]["8"] == 1.0
    assert c["mode"] == "gflops_budget" and c["sample_size"] == 500 and c["confidence_gflops"] == {"4": 0.05, "6": 0.05}
    if rule == "level":  # one level: every early exit has the same threshold
        assert r.thresholds[0] == r.thresholds[1] and c["rule"].startswith("level")
    else:
        assert "aggressiveness" in c and c["rule"].startswith("mix")
    # a closed exit's head is not paid for: full depth alone costs exactly the tower
    assert ConfidenceRouter(EXITS, [math.inf, math.inf], IDENT).gflops_per_exit(TOWER, CONF_G)[8] == 8.0


@pytest.mark.parametrize("rule", ["level", "mix"])
def test_budget_confidence_fits_under_the_budget_for_new_rows(rule):
    """With budget_confidence 0.95 the thresholds hold a large fresh sample of the same rows within the budget in
    most calibrations; fitted exactly (0.5) they overspend it about half the time."""
    budget, fresh = 0.8, _sample(200_000, seed=999)
    within = {0.5: [], 0.95: []}
    for seed in range(40):
        conf = _sample(1000, seed)
        for p in within:
            r = calibrate_confidence_budget(conf, EXITS, TOWER, CONF_G, budget, IDENT, rule=rule, budget_confidence=p)
            c, cost = r.calibration, r.gflops_per_exit(TOWER, CONF_G)
            assert c["budget_confidence"] == p
            assert c["achieved_cost_fraction"] <= budget - c["margin_cost_fraction"] + 1e-9
            assert (c["margin_cost_fraction"] == 0.0) == (p == 0.5)
            depth = r.route_confidences(fresh)
            within[p].append(sum(float((depth == e).mean()) * cost[e] for e in EXITS) / TOWER[8] <= budget)
    assert np.mean(within[0.95]) >= 0.85
    assert np.mean(within[0.5]) < 0.85


def test_unreachable_budget_names_the_floor():
    with pytest.raises(ValueError, match=r"every row at the shallowest exit 4 with its confidence head already costs "
                                         r"0\.506"):
        calibrate_confidence_budget(_sample(), EXITS, TOWER, CONF_G, 0.5, IDENT)


def test_recall_floor_is_met_and_good_confidence_beats_bad():
    """Images whose early embedding is wrong get low confidence: the router keeps them deep and pays less for it."""
    rng = np.random.default_rng(1)
    n, d = 200, 16
    full = rng.normal(size=(n, d))
    full /= np.linalg.norm(full, axis=1, keepdims=True)
    text = full + 0.05 * rng.normal(size=(n, d))
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    bad = rng.random(n) < 0.5  # half the images are unrecognisable at the early exits
    early = np.where(bad[:, None], rng.normal(size=(n, d)), full + 0.05 * rng.normal(size=(n, d)))
    early /= np.linalg.norm(early, axis=1, keepdims=True)
    emb = {4: early, 6: early, 8: full}
    informed = {4: (~bad).astype(float) + 0.01 * rng.random(n), 6: (~bad).astype(float) + 0.01 * rng.random(n)}
    blind = {4: rng.random(n), 6: rng.random(n)}
    kw = dict(text_embeddings=text, text_to_image=np.arange(n), min_recall=0.98, tower_gflops=TOWER,
              confidence_gflops=CONF_G, confidence_identity=IDENT, k=1, steps=20)
    for rule in ("level", "mix"):
        good = calibrate_confidence_recall(informed, emb, rule=rule, **kw).calibration
        poor = calibrate_confidence_recall(blind, emb, rule=rule, **kw).calibration
        for c in (good, poor):
            assert c["achieved_recall"] >= 0.98 * c["full_depth_recall"] - 1e-12 and c["mode"] == "min_recall"
        assert good["achieved_cost_fraction"] < poor["achieved_cost_fraction"] - 0.2
        # on a lower bound over resamples of the captions the floor costs more (the blind router must stay deeper)
        sure = calibrate_confidence_recall(blind, emb, rule=rule, recall_confidence=0.95, **kw).calibration
        assert sure["recall_confidence"] == 0.95 and poor["recall_confidence"] == 0.5
        assert 0.98 - 1e-12 <= sure["recall_ratio_bound"] <= sure["achieved_recall_ratio"]
        assert sure["achieved_cost_fraction"] > poor["achieved_cost_fraction"]
    with pytest.raises(ValueError, match="rule 'best' is not one of level, mix"):
        calibrate_confidence_recall(informed, emb, rule="best", **kw)
