"""bench/adaptive.py's pure parts: category labels of the demo corpus, per-query ranks, paired bootstrap."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.model.confidence_calibration import sample_signal
from pipeline.model.router import combined_signal

# bench/ is a folder of scripts run with `python -m bench.adaptive`, not a package on the test path: load the file.
_spec = importlib.util.spec_from_file_location(
    "bench_adaptive", Path(__file__).resolve().parents[2] / "bench" / "adaptive.py")
adaptive = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = adaptive
_spec.loader.exec_module(adaptive)


def test_main_objects_name_the_first_group_of_each_caption(tmp_path):
    from jobs import make_demo_corpus

    corpus = tmp_path / "corpus"
    assert make_demo_corpus.main(["--n", "40", "--val", "10", "--test", "12", "--seed", "5", "--shard-size", "10",
                                  "--complexity-train", "5", "--output", str(corpus), "--no-progress"]) == 0
    import pyarrow.parquet as pq

    t = pq.read_table(corpus / "scenes.parquet").to_pydict()
    test = [(k, c) for k, c, s in zip(t["key"], t["caption"], t["split"]) if s == "test"]
    labels = adaptive.main_objects(str(corpus), "test", [k for k, _ in test][::-1])[::-1]
    assert len(labels) == 12
    for (key, caption), label in zip(test, labels):
        colour, shape = label.split()
        first = caption.split(" and ")[0].split(",")[0]  # the caption names the first group first
        assert colour in first and shape.rstrip("s")[:4] in first, (key, caption, label)
    with pytest.raises(ValueError, match="no test row"):
        adaptive.main_objects(str(corpus), "test", ["nope"])


def test_label_ranks_count_items_scored_strictly_higher_than_the_best_match():
    sim = np.array([[0.9, 0.5, 0.7],
                    [0.1, 0.2, 0.3]])
    assert adaptive.label_ranks(sim, np.array(["a", "b"]), np.array(["x", "a", "b"])).tolist() == [2, 0]
    # a category shared by several items: the best-scored one counts
    assert adaptive.label_ranks(sim, np.array(["c", "c"]), np.array(["c", "d", "c"])).tolist() == [0, 0]
    with pytest.raises(ValueError, match="no gallery item"):
        adaptive.label_ranks(sim, np.array(["z", "a"]), np.array(["x", "a", "b"]))


def test_queries_category_level_is_at_least_instance_level():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(30, 8)).astype(np.float32)
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    text = images + rng.normal(scale=0.8, size=images.shape).astype(np.float32)
    text = np.repeat(text[::2], 2, axis=0)  # twins share their caption's embedding
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    captions = [f"caption {i // 2}" for i in range(30)]  # identical captions are one t2i query
    categories = np.array([f"cat{(i // 2) % 4}" for i in range(30)])  # a caption names one main object
    q = adaptive.Queries.build(text, captions, categories)
    assert len(q.text) == 15
    hits = q.hits(images)
    for d in ("t2i", "i2t"):
        for k in adaptive.KS:
            assert (hits[f"{d}/category/{k}"] >= hits[f"{d}/instance/{k}"]).all()
    assert hits["t2i/instance/1"].shape == (15,) and hits["i2t/instance/1"].shape == (30,)
    # a perfect gallery (each image is its caption's text) finds everything first
    perfect = q.hits(text)
    assert perfect["i2t/instance/1"].mean() == 1.0 and perfect["t2i/instance/1"].mean() == 1.0


def test_paired_bootstrap_intervals():
    idx = adaptive.bootstrap_indices(200, 500, seed=0)
    rng = np.random.default_rng(1)
    b = (rng.random(200) < 0.6).astype(float)
    same = adaptive.paired_diff(b, b, idx)
    assert same == {"diff": 0.0, "lo": 0.0, "hi": 0.0}
    better = np.maximum(b, (rng.random(200) < 0.3).astype(float))  # never worse, often better
    d = adaptive.paired_diff(better, b, idx)
    assert d["lo"] > 0 and d["lo"] <= d["diff"] <= d["hi"]
    r = adaptive.paired_ratio(better, b, idx)
    assert r["ratio"] == pytest.approx(better.mean() / b.mean()) and 1.0 < r["lo"] <= r["ratio"] <= r["hi"]
    with pytest.raises(ValueError, match="same queries"):
        adaptive.paired_diff(b, b[:10], idx)


def test_same_mix_shuffle_and_best_fixed_exit():
    depth = np.array([4] * 5 + [6] * 3 + [8] * 2)
    shuffled = adaptive.same_mix_shuffle(depth, 3)
    assert sorted(shuffled.tolist()) == sorted(depth.tolist()) and not np.array_equal(shuffled, depth)
    costs = {4: 0.53, 6: 0.76, 8: 1.0}
    assert adaptive.best_fixed_exit(0.70, costs) == 4
    assert adaptive.best_fixed_exit(0.76, costs) == 6
    assert adaptive.best_fixed_exit(0.5, costs) is None


def test_parse_heads(tmp_path):
    assert list(adaptive.parse_heads(None)) == ["old"]
    f = tmp_path / "h.safetensors"
    f.write_bytes(b"x")
    assert adaptive.parse_heads([f"a={f}", f"b={f}"]) == {"a": str(f), "b": str(f)}
    with pytest.raises(ValueError, match="NAME=PATH"):
        adaptive.parse_heads([str(f)])
    with pytest.raises(FileNotFoundError):
        adaptive.parse_heads([f"a={tmp_path / 'missing'}"])


def test_combined_signal_is_standardised_on_val_and_prefers_simple_confident_images():
    rng = np.random.default_rng(2)
    conf_val = {4: rng.normal(3.0, 2.0, 500), 6: rng.normal(-1.0, 0.5, 500)}
    scores_val = rng.uniform(0, 1, 500)
    conf_test = {4: np.array([3.0, 3.0]), 6: np.array([-1.0, -1.0])}
    # the signal the bench fits its confidence+complexity routers on: the product's standardisation
    block, val = sample_signal(conf_val, scores_val, adaptive.COMPLEXITY_WEIGHT)
    test = combined_signal(conf_test, np.array([0.1, 0.9]), block)
    for e in (4, 6):
        assert abs(val[e].mean()) < 1e-9 and val[e].std() == pytest.approx(np.sqrt(2), rel=0.1)
        assert test[e][0] > test[e][1]  # same confidence, the simpler image scores higher
    assert adaptive.share_variants([4, 6, 8]) == [("", None), (" deep-first", [0.0, 1.0])]
    assert adaptive.share_variants([4, 8]) == [("", None)]


def test_oracle_takes_the_best_gain_per_gflop_and_never_fills_into_a_loss():
    exits, cost = [4, 6, 8], {4: 0.5, 6: 0.75, 8: 1.0}
    # image 0 hits everywhere, 1 only at full depth, 2 from exit 6 on, 3 at exit 4 and 8 but not 6
    util = np.array([[2.0, 2.0, 2.0], [0.0, 0.0, 2.0], [0.0, 2.0, 2.0], [2.0, 0.0, 2.0]])
    close = np.array([[0.9, 0.95, 1.0], [0.5, 0.8, 1.0], [0.6, 0.9, 1.0], [0.7, 0.9, 1.0]])
    n = len(util)

    def at(spare):
        return adaptive.oracle_depth(util, exits, cost, 0.5 + spare / n, close).tolist()

    assert at(0.0) == [4, 4, 4, 4]
    assert at(0.25) == [4, 4, 6, 4]  # 2 points for 0.25: the steepest gain first
    assert at(0.75) == [4, 8, 6, 4]
    assert at(1.0) == [6, 8, 6, 4]  # the fill: no own-caption gain left, never into exit 6 for image 3
    assert at(2.0) == [8, 8, 8, 4]
    with pytest.raises(ValueError, match="below the cheapest"):
        adaptive.oracle_depth(util, exits, cost, 0.4, close)


def test_own_caption_utility_scores_each_exit_against_full_depth_others():
    rng = np.random.default_rng(3)
    full = rng.normal(size=(12, 16)).astype(np.float32)
    full /= np.linalg.norm(full, axis=1, keepdims=True)
    q = adaptive.Queries.build(full.copy(), [f"c{i}" for i in range(12)], np.array(["x"] * 12))
    early = full.copy()
    early[0] = full[5]  # image 0's early embedding is image 5's: its caption ranks image 5 (full) as high
    u = adaptive.own_caption_utility(q, {4: early, 8: full}, [4, 8])
    assert u[:, 1] == pytest.approx(np.full(12, 2.02))  # a perfect gallery: rank 1 both ways
    assert u[1:, 0] == pytest.approx(np.full(11, 2.02))
    assert u[0, 0] < 1.0  # a tie with image 5 does not count as a miss, its i2t does: caption 5 ranks first
