"""icar train-confidence, then icar calibrate --confidence-heads, then icar embed --router: rows leave where their
confidence clears the threshold, with the GFLOPs their path through the tower and the confidence heads cost."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from safetensors.torch import save_file

from jobs import calibrate as calibrate_job
from jobs import embed as embed_job
from jobs import train_confidence as train_job
from pipeline.demo import corpus as dc
from pipeline.model import models
from pipeline.model import router as R
from pipeline.training.confidence import confidence_targets
from tinyclip import TINY


def _unit(v):
    v = np.asarray(v, np.float32)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def test_targets_by_hand():
    # three images on the axes; captions point at them; image 2's caption also points a little at image 0
    full = _unit(np.eye(3))
    text = _unit([[1, 0, 0], [0, 1, 0], [0.5, 0, 1]])
    early = _unit([[1, 0.2, 0], [1, 1, 0], [0, 0, 1]])  # image 1's early embedding drifted towards image 0
    emb = {1: early, 2: full}
    groups = np.arange(3)
    margin = confidence_targets("margin", emb, text, groups)[1]
    own = (text * early).sum(1)
    best_other = np.array([0.0, 0.0, text[2, 0]])  # the best OTHER image at full depth for each caption
    np.testing.assert_allclose(margin, own - best_other, atol=1e-6)
    loss = confidence_targets("loss", emb, text, groups)[1]
    full_margin = (text * full).sum(1) - best_other
    np.testing.assert_allclose(loss, np.minimum(own - best_other, 0) - np.minimum(full_margin, 0), atol=1e-6)
    rank = confidence_targets("rank", emb, text, groups)[1]
    assert rank.tolist() == [1.0, 1.0, 1.0]  # caption 1 still prefers its own (0.707 > 0): no rank lost
    drifted = {1: _unit([[1, 0, 0], [1, -0.1, 0], [0, 0, 1]]), 2: full}  # caption 1 now prefers others
    assert confidence_targets("rank", drifted, text, groups)[1].tolist() == [1.0, 0.0, 1.0]
    cos = confidence_targets("cosine", emb, text, groups)[1]
    np.testing.assert_allclose(cos, (early * full).sum(1), atol=1e-6)
    # an identical caption's image is no competitor: with images 0 and 2 sharing a caption, 0 has no rival left
    same = confidence_targets("margin", emb, text, np.array([0, 1, 0]))[1]
    assert same[0] == pytest.approx(own[0] - 0.0) and same[2] == pytest.approx(own[2] - 0.0)
    with pytest.raises(ValueError, match="--target 'gain'"):
        confidence_targets("gain", emb, text, groups)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The tiny random CLIP as a model directory, like the demo's."""
    d = tmp_path_factory.mktemp("tiny-model")
    b = models.bundle_from_config(TINY, seed=0)
    (d / "clip_config.json").write_text(json.dumps({"model_name": "tiny", "model_cfg": TINY}))
    save_file({k: v.contiguous() for k, v in b.model.state_dict().items()}, str(d / "clip.safetensors"))
    return str(d)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    dc.make_demo_corpus(dc.DemoCorpusConfig(output=str(root), n=160, val=40, test=0, shard_size=60, image_size=32,
                                            complexity_train=0, progress=False))
    return root


def test_train_calibrate_embed_end_to_end(model_dir, corpus, tmp_path, ray_session, monkeypatch, capsys):
    monkeypatch.setenv("ICAR_CACHE_DIR", str(tmp_path / "cache"))
    model = ["--model", model_dir, "--exits", "1,2,4", "--device", "cpu"]
    out = tmp_path / "conf"
    assert train_job.main([str(corpus / "train" / "*.tar"), "--output", str(out), "--epochs", "30", "--hidden", "8",
                           *model]) == 0
    metrics = json.loads((out / "confidence_heads.metrics.json").read_text())
    assert metrics["target"] == "margin" and set(metrics["holdout"]) == {"1", "2"}
    assert metrics["pairs"]["fit"] + metrics["pairs"]["holdout"] == 120 and metrics["seconds"]["total"] > 0
    heads = str(out / "confidence_heads.safetensors")
    router_path = tmp_path / "router.json"
    val = str(corpus / "val" / "*.tar")
    assert calibrate_job.main([val, "--confidence-heads", heads, "--gflops-budget", "0.7", "--sample", "40",
                               "--output", str(router_path), *model]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    router = R.load_router(str(router_path))
    assert isinstance(router, R.ConfidenceRouter) and router.confidence["path"] == heads
    c = router.calibration
    assert summary["achieved_cost_fraction"] == c["achieved_cost_fraction"] <= 0.7 and c["sample_size"] == 40
    assert c["achieved_fractions"]["1"] > 0  # a budget of 0.7 on a 4-block tower needs the first exit
    run = tmp_path / "run"
    assert embed_job.main([val, "--output", str(run), "--router", str(router_path), "--batch-size", "8",
                           "--no-progress", *model]) == 0
    said = capsys.readouterr()
    assert "AUDIT FAILED" not in said.out + said.err  # the cost report accounts for the confidence heads too
    rows = pq.read_table(run / "shards").to_pandas() if (run / "shards").is_dir() else None
    assert rows is not None and len(rows) == 40
    run_json = json.loads((run / "run.json").read_text())
    assert run_json["router"]["kind"] == "confidence" and run_json["scorer"] is None
    cost = router.gflops_per_exit(run_json["gflops_per_exit"], run_json["confidence"]["gflops"])
    assert run_json["confidence"]["gflops_per_exit"] == {str(k): pytest.approx(v) for k, v in cost.items()}
    # every row: an exit of the router, and exactly the GFLOPs of its path (tower + confidence heads on the way)
    assert set(rows["exit_layer"]) <= {1, 2, 4}
    np.testing.assert_allclose(rows["gflops"], [cost[int(e)] for e in rows["exit_layer"]], rtol=1e-6)
    assert rows["complexity"].isna().all()  # no scorer ran: the confidence router needs none
    # the run embedded the calibration sample itself: the same rows leave at the same exits
    realised = {str(e): float((rows["exit_layer"] == e).mean()) for e in router.exits}
    assert realised == pytest.approx(c["achieved_fractions"], abs=1.5 / 40)
    assert float(rows["gflops"].mean()) / cost[4] <= 0.7 + 1.5 * cost[4] / 40 / cost[4]
    # heads for other exit heads are refused before any image is embedded
    other = tmp_path / "other.json"
    R.save_router(R.ConfidenceRouter([1, 2, 4], router.thresholds, {**router.confidence, "sha256": "0" * 64}),
                  str(other))
    assert embed_job.main([val, "--output", str(tmp_path / "run2"), "--router", str(other), "--no-progress",
                           *model]) == 2
    assert "its thresholds were fitted for confidence heads 0000000000000000" in capsys.readouterr().err


def test_calibrate_with_complexity_weight_writes_the_block_and_embed_follows_it(model_dir, corpus, tmp_path,
                                                                               ray_session, monkeypatch, capsys):
    """--complexity-weight: the scorer runs, the router stores the sample standardisation, and `icar embed` (per-row
    thresholds inside the tower) sends the calibration sample to the exits calibration counted. (The heuristic
    scorer: the shipped CNN costs 40x this tiny tower.)"""
    from pipeline.model import encoder as enc
    from pipeline.model.confidence import ConfidenceHeads
    from pipeline.training.confidence import model_and_exits

    monkeypatch.setenv("ICAR_CACHE_DIR", str(tmp_path / "cache"))
    model = ["--model", model_dir, "--exits", "1,2,4", "--device", "cpu", "--scorer", "heuristic"]
    bundle, heads, exits = model_and_exits(model_dir, None, 0, None, [1, 2, 4], "cpu")
    encoder = enc.AdaptiveEncoder(bundle.model.visual, exits, heads)
    conf_path = str(tmp_path / "conf.safetensors")  # untrained heads: calibration only needs their confidences
    ConfidenceHeads.for_encoder(bundle, encoder, hidden=8).save(conf_path)
    val = str(corpus / "val" / "*.tar")
    router_path = tmp_path / "combined.json"
    assert calibrate_job.main([val, "--confidence-heads", conf_path, "--complexity-weight", "1", "--gflops-budget",
                               "0.9", "--sample", "40", "--output", str(router_path), *model]) == 0
    said = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(said["sample_t2i_recall@1"]) == {"full", "routed", "exit 1", "exit 2"}
    doc = json.loads(router_path.read_text())
    block = doc["complexity"]
    assert block["weight"] == 1.0 and set(block["confidence_mean"]) == set(block["confidence_std"]) == {"1", "2"}
    assert block["score_std"] > 0 and doc["scorer"] is not None and doc["calibration"]["scorer_gflops"] > 0
    report = doc["calibration"]["sample_recall"]  # captioned sample: the mix beside each fixed exit
    assert report["captions"] == 40 and set(report["fixed_exits"]) == {"1", "2"}
    assert 0 <= report["routed"]["t2i@1"] <= 1 and report["full"]["t2i@10"] > 0
    router = R.load_router(str(router_path))
    assert router.needs_scores and router.calibration["achieved_cost_fraction"] <= 0.9
    assert calibrate_job.main([val, "--complexity-weight", "1", "--gflops-budget", "0.7", "--output",
                               str(tmp_path / "x.json"), *model]) == 2
    assert "it needs --confidence-heads FILE" in capsys.readouterr().err
    run = tmp_path / "run"
    # fp32 as calibrate computes: untrained heads give nearly equal confidences, which bf16 rounding (auto on a
    # bf16 CPU) would move across the thresholds
    assert embed_job.main([val, "--output", str(run), "--router", str(router_path), "--batch-size", "8",
                           "--precision", "fp32", "--no-progress", *model]) == 0
    rows = pq.read_table(run / "shards").to_pandas()
    assert len(rows) == 40 and rows["complexity"].notna().all()  # the scorer ran although not named
    realised = {str(e): float((rows["exit_layer"] == e).mean()) for e in router.exits}
    assert realised == pytest.approx(router.calibration["achieved_fractions"], abs=1.5 / 40)
    assert len({int(e) for e in rows["exit_layer"]}) > 1
