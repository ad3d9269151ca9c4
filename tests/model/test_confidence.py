"""Confidence exits: heads bound to their model and exit heads, the router's JSON, and the one-pass encoder that
lets rows leave where their confidence clears the threshold (no block twice, the same embeddings as routed)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from pipeline.model import encoder as enc
from pipeline.model import router as R
from pipeline.model.confidence import ConfidenceHeads, ConfidenceMismatchError, confidence_gflops, every_exit
from pipeline.model.confidence_calibration import thresholds_for_mix
from tinyclip import tiny

EXITS = [1, 2, 4]


@pytest.fixture(scope="module")
def bundle():
    return tiny()


def _encoder(bundle, heads=None):
    return enc.AdaptiveEncoder(bundle.model.visual, EXITS, heads).eval()


def _pixels(n=24, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _count_block_rows(encoder):
    """Return (rows seen per block, hook handles): each block's forward adds its batch size."""
    seen = [0] * len(encoder.visual.transformer.resblocks)
    handles = []
    for i, blk in enumerate(encoder.visual.transformer.resblocks):
        def hook(module, args, output, i=i):
            seen[i] += args[0].shape[0]
        handles.append(blk.register_forward_hook(hook))
    return seen, handles


def test_rows_leave_where_confidence_clears_and_no_block_runs_twice(bundle):
    encoder = _encoder(bundle)
    conf = ConfidenceHeads.for_encoder(bundle, encoder, hidden=8)
    x = _pixels()
    with torch.no_grad():
        _, sample, _ = every_exit(encoder, conf, x)
        sample = {e: c.numpy() for e, c in sample.items()}
        thresholds = thresholds_for_mix(sample, EXITS, [0.375, 0.25, 0.375])  # 9, 6 and 9 of 24 rows
        seen, handles = _count_block_rows(encoder)
        try:
            emb, depth = encoder.forward_confident(x, conf, thresholds)
        finally:
            for h in handles:
                h.remove()
        routed = encoder(x, depth.long())
    depth = depth.numpy()
    assert depth.dtype == np.int16
    assert [int((depth == e).sum()) for e in EXITS] == [9, 6, 9]
    # the same rule on precomputed confidences (calibration's view) gives the same exits
    router = R.ConfidenceRouter(EXITS, thresholds, {"path": "unused"})
    assert np.array_equal(router.route_confidences(sample), depth)
    # a row's embedding is the one it gets when routed to that exit up front
    torch.testing.assert_close(emb, routed, atol=1e-5, rtol=1e-5)
    assert torch.allclose(emb.norm(dim=1), torch.ones(len(x)), atol=1e-5)
    # block b (0-based) ran once for each row whose exit lies beyond it, and for no other row
    assert seen == [int((depth > b).sum()) for b in range(4)]


def test_closed_and_wide_open_exits(bundle):
    encoder = _encoder(bundle)
    conf = ConfidenceHeads.for_encoder(bundle, encoder, hidden=0)
    calls = []
    handle = conf.heads["1"].register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    x = _pixels(6)
    with torch.no_grad():
        emb, depth = encoder.forward_confident(x, conf, [math.inf, math.inf])
        full = torch.nn.functional.normalize(bundle.model.encode_image(x).float(), dim=-1)
        assert calls == []  # a closed exit (+inf) does not even run its confidence head
        assert (depth == 4).all()
        torch.testing.assert_close(emb, full, atol=1e-5, rtol=1e-5)
        emb, depth = encoder.forward_confident(x, conf, [-math.inf, math.inf])
        assert (depth == 1).all() and calls == [6]
        torch.testing.assert_close(emb, encoder(x, torch.full((6,), 1)), atol=1e-5, rtol=1e-5)
        empty, d0 = encoder.forward_confident(x[:0], conf, [0.0, 0.0])
        assert empty.shape == (0, bundle.embed_dim) and d0.numel() == 0
    handle.remove()
    with pytest.raises(ValueError, match="3 confidence thresholds for the 2 early exits"):
        encoder.forward_confident(x, conf, [0.0, 0.0, 0.0])


def test_heads_file_round_trip_and_binding(bundle, tmp_path):
    trained = enc.ExitHeads.for_bundle(bundle, EXITS)
    encoder = _encoder(bundle, trained)
    conf = ConfidenceHeads.for_encoder(bundle, encoder, hidden=8, target="rank")
    conf.metrics = {"note": "kept"}
    path = str(tmp_path / "conf.safetensors")
    ident = conf.save(path)
    back = ConfidenceHeads.load(path, bundle, trained)
    assert back.sha256() == ident["sha256"] and back.target == "rank" and back.metrics == {"note": "kept"}
    f = torch.randn(5, 64)
    torch.testing.assert_close(back.score(2, f), conf.score(2, f))
    other = enc.ExitHeads.for_bundle(bundle, EXITS)
    with torch.no_grad():
        other.head(1).proj.add_(0.01)
    with pytest.raises(ConfidenceMismatchError, match="judge the embeddings of exit heads"):
        ConfidenceHeads.load(path, bundle, other)
    stranger = tiny(seed=1)
    with pytest.raises(ConfidenceMismatchError, match="trained for backbone"):
        ConfidenceHeads.load(path, stranger, enc.ExitHeads.for_bundle(stranger, EXITS))
    trained.save(str(tmp_path / "exit_heads.safetensors"))
    with pytest.raises(ValueError, match="not an ICAR confidence-heads file"):
        ConfidenceHeads.load(str(tmp_path / "exit_heads.safetensors"), bundle, trained)


def test_router_json_round_trip_and_costs(tmp_path):
    router = R.ConfidenceRouter(EXITS, [0.25, math.inf], {"path": "c.safetensors", "sha256": "ab" * 32},
                                calibration={"mode": "gflops_budget"})
    path = str(tmp_path / "router.json")
    R.save_router(router, path)
    doc = json.loads(open(path).read())  # strict JSON a person can read
    assert doc["kind"] == "confidence" and doc["thresholds"] == [0.25, "inf"] and doc["confidence"]["path"]
    back = R.load_router(path)
    assert isinstance(back, R.ConfidenceRouter) and back.to_dict() == router.to_dict()
    assert back.needs_scores is False and back.evaluated_exits == [1]
    with pytest.raises(TypeError, match="decides inside the tower"):
        back.route(np.zeros(3), ["a", "b", "c"])
    # cost per exit: tower to the exit + the confidence heads run on the way (exit 2's is closed: never run)
    cost = back.gflops_per_exit({1: 1.0, 2: 2.0, 4: 4.0}, {1: 0.1, 2: 0.2}, scorer_gflops=0.5)
    assert cost == pytest.approx({1: 1.6, 2: 2.6, 4: 4.6})
    with pytest.raises(ValueError, match="2 confidence thresholds"):
        R.ConfidenceRouter(EXITS, [0.1], {"path": "c"})
    with pytest.raises(ValueError, match="names its confidence-heads file"):
        R.ConfidenceRouter(EXITS, [0.1, 0.2], {})


def test_confidence_gflops_are_counted(bundle):
    encoder = _encoder(bundle)
    small = confidence_gflops(ConfidenceHeads.for_encoder(bundle, encoder, hidden=8), bundle.model.visual)
    big = confidence_gflops(ConfidenceHeads.for_encoder(bundle, encoder, hidden=64), bundle.model.visual)
    assert set(small) == {1, 2}
    # LayerNorm + Linear(64, h) + Linear(h, 1): the matmuls alone are 2·(64·h + h) FLOPs
    assert small[1] >= 2 * (64 * 8 + 8) / 1e9 and big[1] >= 2 * (64 * 64 + 64) / 1e9 > small[1]


def test_shipped_demo_pair_runs_without_a_scorer(tmp_path, monkeypatch):
    """The demo's confidence heads fit the demo's shipped exit heads (retrain them when those change)."""
    from pipeline.model.spec import ModelSpec
    from pipeline.model.worker import DEMO_ASSETS, ModelWorker

    monkeypatch.setenv("ICAR_CACHE_DIR", str(tmp_path / "cache"))
    w = ModelWorker(ModelSpec(model="demo", device="cpu", torch_threads=1,
                              router=str(DEMO_ASSETS / "confidence_router.json")))
    assert w.scorer is None and w.confidence is not None and w.describe()["confidence"]["target"] == "loss"
    pixels = np.random.default_rng(0).integers(0, 256, (8, 64, 64, 3), dtype=np.uint8)
    out = w.embed(pixels, [f"k{i}" for i in range(8)])
    cost = w.router.gflops_per_exit(w.gflops_per_exit, w.confidence_gflops)
    assert set(out["exit_layer"].tolist()) <= {4, 6, 8} and np.isnan(out["complexity"]).all()
    np.testing.assert_allclose(out["gflops"], [cost[int(e)] for e in out["exit_layer"]], rtol=1e-6)
    # a scorer runs only when named; then its score is recorded and its GFLOPs are counted in every row
    scored = ModelWorker(ModelSpec(model="demo", device="cpu", torch_threads=1, scorer="heuristic",
                                   router=str(DEMO_ASSETS / "confidence_router.json")))
    out2 = scored.embed(pixels, [f"k{i}" for i in range(8)])
    assert np.isfinite(out2["complexity"]).all() and scored.scorer_gflops > 0
    np.testing.assert_array_equal(out2["exit_layer"], out["exit_layer"])
    np.testing.assert_allclose(out2["gflops"], out["gflops"] + scored.scorer_gflops, rtol=1e-6)
