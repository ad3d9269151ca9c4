"""Metrics against scipy and against brute-force retrieval ranking."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr

from pipeline import metrics


def test_correlations_match_scipy_including_ties():
    rng = np.random.default_rng(0)
    true = rng.random(200)
    pred = 0.6 * true + 0.4 * rng.random(200)
    pred[:40] = np.round(pred[:40], 1)  # ties in one argument
    true[100:150] = 0.5  # a block of ties in the other
    assert metrics.plcc(pred, true) == pytest.approx(pearsonr(pred, true)[0], abs=1e-12)
    assert metrics.srcc(pred, true) == pytest.approx(spearmanr(pred, true)[0], abs=1e-12)
    assert metrics.srcc(-pred, true) == pytest.approx(spearmanr(-pred, true)[0], abs=1e-12)


def test_errors_and_summary():
    pred, true = np.array([0.1, 0.4, 0.9]), np.array([0.2, 0.2, 0.5])
    assert metrics.rmse(pred, true) == pytest.approx(np.sqrt(np.mean((pred - true) ** 2)))
    assert metrics.mae(pred, true) == pytest.approx(np.mean(np.abs(pred - true)))
    m = metrics.complexity_metrics(pred, true)
    assert set(m) == {"plcc", "srcc", "rmse", "mae", "n"} and m["n"] == 3


def test_undefined_and_bad_inputs():
    assert np.isnan(metrics.plcc([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError, match="differ in length"):
        metrics.plcc([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="NaN"):
        metrics.rmse([np.nan, 1], [1, 2])


def test_linear_map_recovers_line():
    x = np.linspace(0, 1, 50)
    slope, intercept = metrics.fit_linear_map(x, 3 * x + 0.25)
    assert slope == pytest.approx(3) and intercept == pytest.approx(0.25)


def _brute_recall(sim, relevant, k):
    hits = 0
    for q, rel in enumerate(relevant):
        top = np.argsort(-sim[q], kind="stable")[:k]
        hits += bool(set(np.atleast_1d(rel).tolist()) & set(top.tolist()))
    return hits / len(relevant)


def test_recall_at_k_single_and_multiple_relevant():
    rng = np.random.default_rng(1)
    n_img, per = 40, 3
    images = rng.normal(size=(n_img, 16)).astype(np.float32)
    t2i = np.repeat(np.arange(n_img), per)
    texts = images[t2i] + 1.5 * rng.normal(size=(n_img * per, 16)).astype(np.float32)
    sim = texts @ images.T
    r = metrics.recall_at_k(sim, t2i, ks=(1, 5, 10))
    for k in (1, 5, 10):
        assert r[k] == pytest.approx(_brute_recall(sim, t2i, k))
    assert 0 < r[1] < r[5] <= r[10] < 1  # a test that cannot pass by accident
    assert metrics.recall_at_k(queries=texts, gallery=images, relevant=t2i) == r
    captions = metrics.invert_mapping(t2i, n_img)
    r_i2t = metrics.recall_at_k(sim.T, captions, ks=(1, 5))
    for k in (1, 5):
        assert r_i2t[k] == pytest.approx(_brute_recall(sim.T, captions, k))
    both = metrics.retrieval_recall(texts, images, t2i, ks=(1, 5))
    assert both["t2i"][1] == pytest.approx(r[1]) and both["i2t"][5] == pytest.approx(r_i2t[5])


def test_recall_ties_count_in_favour_and_bounds_checked():
    sim = np.array([[1.0, 1.0, 0.0]], np.float32)
    assert metrics.recall_at_k(sim, np.array([1]), ks=(1,))[1] == 1.0
    with pytest.raises(ValueError, match="relevant indices"):
        metrics.recall_at_k(sim, np.array([3]))
