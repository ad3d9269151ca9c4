"""Confidence routing with a complexity block (`icar calibrate --complexity-weight W`): the router JSON, the rule on
precomputed confidences, the same rule as per-row thresholds inside the tower, and the scorer it needs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from pipeline.embed.validate import ArgumentProblem, check_scorer_and_router
from pipeline.model import encoder as enc
from pipeline.model import router as R
from pipeline.model.confidence import ConfidenceHeads, every_exit
from pipeline.model.confidence_calibration import complexity_block, sample_signal
from pipeline.model.scorer_identity import heuristic_identity
from pipeline.model.spec import ModelSpec
from tinyclip import tiny

EXITS = [1, 2, 4]
BLOCK = {"weight": 0.5, "confidence_mean": {"1": 0.2, "2": -0.1}, "confidence_std": {"1": 2.0, "2": 0.5},
         "score_mean": 0.3, "score_std": 0.1}


def test_router_json_round_trip_and_old_files_unchanged(tmp_path):
    plain = R.ConfidenceRouter(EXITS, [0.25, math.inf], {"path": "c.safetensors"})
    assert "complexity" not in plain.to_dict() and plain.needs_scores is False and plain.complexity is None
    combined = R.ConfidenceRouter(EXITS, [0.25, -0.5], {"path": "c.safetensors"}, complexity=BLOCK,
                                  scorer_identity=heuristic_identity(64))
    path = str(tmp_path / "router.json")
    R.save_router(combined, path)
    doc = json.loads(open(path).read())
    assert doc["complexity"] == BLOCK  # exit keys as strings, as a person reads them
    back = R.load_router(path)
    assert back.to_dict() == combined.to_dict() and back.needs_scores is True
    assert back.complexity["confidence_mean"] == {1: 0.2, 2: -0.1}
    R.save_router(plain, path)
    assert R.load_router(path).to_dict() == plain.to_dict()
    with pytest.raises(ValueError, match=r"no confidence mean/std for early exits \[2\]"):
        R.ConfidenceRouter(EXITS, [0.0, 0.0], {"path": "c"},
                           complexity={**BLOCK, "confidence_mean": {"1": 0.0}})
    with pytest.raises(ValueError, match="positive finite spreads"):
        R.ConfidenceRouter(EXITS, [0.0, 0.0], {"path": "c"}, complexity={**BLOCK, "score_std": 0.0})


def test_rule_on_confidences_and_scores_by_hand():
    router = R.ConfidenceRouter(EXITS, [0.0, 0.0], {"path": "c"}, complexity=BLOCK)
    conf = {1: np.array([0.2, 0.2, 0.2, -5.0]), 2: np.array([-0.1, -0.1, 1.0, -5.0])}
    scores = np.array([0.2, 0.4, 0.4, np.nan])
    # row 0: z_conf 0 at both, z_score -1 -> signal +0.5 at exit 1; row 1: -0.5, -0.5 -> full depth;
    # row 2: exit 1 -0.5, exit 2 (1.1 / 0.5) - 0.5 = 1.7 -> exit 2; row 3: NaN score -> never early
    np.testing.assert_array_equal(router.route_confidences(conf, scores), [1, 4, 2, 4])
    with pytest.raises(ValueError, match="pass the rows' scores"):
        router.route_confidences(conf)
    # the same rule as thresholds on the raw confidence, one per row
    thr = router.row_thresholds(scores)
    raw = np.full(4, 4)
    for e, t in zip((2, 1), (thr[1], thr[0])):
        raw[conf[e] >= t] = e
    np.testing.assert_array_equal(raw, [1, 4, 2, 4])
    closed = R.ConfidenceRouter(EXITS, [math.inf, 0.0], {"path": "c"}, complexity=BLOCK)
    assert closed.row_thresholds(scores)[0] == math.inf  # a closed exit stays closed: its head is not run


def test_sample_signal_is_standardised_and_weighted():
    rng = np.random.default_rng(0)
    conf = {1: rng.normal(3.0, 2.0, 400), 2: rng.normal(-1.0, 0.5, 400)}
    scores = rng.uniform(0, 1, 400)
    block, signal = sample_signal(conf, scores, 2.0)
    assert block["weight"] == 2.0 and block["confidence_mean"][1] == pytest.approx(conf[1].mean())
    z = (scores - scores.mean()) / scores.std()
    np.testing.assert_allclose(signal[2], (conf[2] - conf[2].mean()) / conf[2].std() - 2.0 * z)
    assert complexity_block({1: np.ones(3)}, np.ones(3), 1.0)["score_std"] == 1.0  # no spread: left unscaled
    with pytest.raises(ValueError, match="NaN/inf"):
        complexity_block(conf, np.full(400, np.nan), 1.0)


def test_forward_confident_per_row_thresholds_match_the_rule(tmp_path):
    bundle = tiny()
    encoder = enc.AdaptiveEncoder(bundle.model.visual, EXITS, None).eval()
    conf = ConfidenceHeads.for_encoder(bundle, encoder, hidden=8)
    x = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    scores = np.random.default_rng(1).uniform(0, 1, 32)
    scores[5] = np.nan  # a failed score: full depth
    with torch.no_grad():
        _, sample, _ = every_exit(encoder, conf, x)
        sample = {e: c.numpy().astype(np.float64) for e, c in sample.items()}
        block, signal = sample_signal(sample, np.nan_to_num(scores, nan=0.5), 1.0)
        level = float(np.median(np.concatenate(list(signal.values()))))
        router = R.ConfidenceRouter(EXITS, [level, level], {"path": "unused"}, complexity=block)
        want = router.route_confidences(sample, scores)
        thresholds = [torch.as_tensor(t, dtype=torch.float32) if np.ndim(t) else t
                      for t in router.row_thresholds(scores)]
        emb, depth = encoder.forward_confident(x, conf, thresholds)
        routed = encoder(x, depth.long())
    assert len(set(want.tolist())) == 3  # every exit used: the test can tell rules apart
    np.testing.assert_array_equal(depth.numpy(), want)
    assert depth[5] == 4
    torch.testing.assert_close(emb, routed, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"shape \(32,\)"):
        encoder.forward_confident(x, conf, [torch.zeros(3), 0.0])


def _combined_router_file(tmp_path, scorer_identity):
    from pipeline.model.worker import DEMO_ASSETS

    doc = json.loads((DEMO_ASSETS / "confidence_router.json").read_text())
    doc["confidence"]["path"] = str(DEMO_ASSETS / "confidence_heads.safetensors")
    early = [str(e) for e in doc["exits"][:-1]]
    doc["complexity"] = {"weight": 1.0, "confidence_mean": {e: 0.0 for e in early},
                         "confidence_std": {e: 1.0 for e in early}, "score_mean": 0.2, "score_std": 0.1}
    doc["scorer"] = scorer_identity
    path = tmp_path / "combined.json"
    path.write_text(json.dumps(doc))
    return str(path)


def test_worker_needs_the_scorer_the_combined_router_was_fitted_with(tmp_path, monkeypatch):
    from pipeline.model.worker import ModelWorker

    monkeypatch.setenv("ICAR_CACHE_DIR", str(tmp_path / "cache"))
    path = _combined_router_file(tmp_path, heuristic_identity(64))  # the demo's default scorer
    with pytest.raises(ValueError, match="reads complexity scores .* --scorer none was given; pass --scorer default"):
        ModelWorker(ModelSpec(model="demo", device="cpu", torch_threads=1, router=path, scorer="none"))
    with pytest.raises(ArgumentProblem, match="--scorer none: .* routes by complexity score"):
        check_scorer_and_router(ModelSpec(model="demo", router=path, scorer="none"), 8)
    with pytest.raises(ValueError, match="was calibrated for scorer heuristic .*64 px"):
        ModelWorker(ModelSpec(model="demo", device="cpu", torch_threads=1, router=path, scorer="heuristic"))
    w = ModelWorker(ModelSpec(model="demo", device="cpu", torch_threads=1, router=path))
    assert w.scorer is not None and w.confidence is not None  # the default scorer runs although not named
    pixels = np.random.default_rng(0).integers(0, 256, (8, 64, 64, 3), dtype=np.uint8)
    out = w.embed(pixels, [f"k{i}" for i in range(8)])
    assert np.isfinite(out["complexity"]).all() and set(out["exit_layer"].tolist()) <= set(w.exits)
    cost = w.router.gflops_per_exit(w.gflops_per_exit, w.confidence_gflops, w.scorer_gflops)
    np.testing.assert_allclose(out["gflops"], [cost[int(e)] for e in out["exit_layer"]], rtol=1e-6)
