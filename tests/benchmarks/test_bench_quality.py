"""bench/quality.py runs end to end on a tiny demo corpus and its numbers agree with each other."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

# bench/ is a folder of scripts run with `python -m bench.quality` from the repository root, not a package on
# the test path: load the script by its file.
_spec = importlib.util.spec_from_file_location(
    "bench_quality", Path(__file__).resolve().parents[2] / "bench" / "quality.py")
quality = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = quality
_spec.loader.exec_module(quality)


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    from jobs import make_demo_corpus

    root = tmp_path_factory.mktemp("quality")
    corpus = root / "corpus"
    assert make_demo_corpus.main(["--n", "260", "--val", "40", "--test", "40", "--seed", "3", "--shard-size", "100",
                                  "--complexity-train", "120", "--output", str(corpus), "--no-progress"]) == 0
    out = root / "quality.json"
    argv = ["--corpus", str(corpus), "--cache-dir", str(root / "cache"), "--scorer-epochs", "1", "--no-savoias",
            "--sweep", "0.6,1.0", "--random-seeds", "3", "--json", str(out)]
    assert quality.main(argv) == 0
    return json.loads(out.read_text())


def _rows(result):
    return {r["policy"]: r for r in result["rows"]}


def test_rows_cover_every_policy_with_consistent_gflops(result):
    rows = _rows(result)
    exits = result["model"]["exits"]
    gpe = {int(k): v for k, v in result["model"]["gflops_per_exit"].items()}
    assert {"full", "trained", "heuristic_shipped", "random", "oracle"} <= set(rows)
    assert {f"exit{e}" for e in exits[:-1]} <= set(rows)
    for row in result["rows"]:
        tower = sum(share * gpe[int(e)] for e, share in row["mix"].items())
        assert row["tower_gflops"] == pytest.approx(tower, rel=1e-6)
        assert row["gflops"] == pytest.approx(tower + row["scorer_gflops"], rel=1e-6)
        assert row["cost_fraction"] == pytest.approx(row["gflops"] / gpe[exits[-1]], rel=1e-6)
        for d in ("t2i", "i2t"):
            r = row["recall"][d]
            assert 0.0 <= r["1"] <= r["5"] <= r["10"] <= 1.0
    for e in exits[:-1]:
        assert rows[f"exit{e}"]["gflops"] == pytest.approx(gpe[e])
    assert rows["full"]["gflops"] == pytest.approx(gpe[exits[-1]])
    for e in exits:  # a single-depth gallery is its own-depth gallery
        fixed = rows["full" if e == exits[-1] else f"exit{e}"]["t2i_r1_per_image"]
        assert fixed["mixed_gallery"] == fixed["own_depth_gallery"]
    assert rows["full"]["pct_of_full"]["t2i"]["1"] == pytest.approx(100.0)
    assert rows["trained"]["scorer_gflops"] > 0 and rows["heuristic_shipped"]["scorer_gflops"] > 0
    assert rows["random"]["scorer_gflops"] == 0 and rows["oracle"]["scorer_gflops"] == 0


def test_random_routing_spends_the_trained_rows_gflops(result):
    rows = _rows(result)
    # planned exactly at the trained scorer's realised cost; a 40-image hash sample lands near it
    assert rows["random"]["planned_cost_fraction"] == pytest.approx(rows["trained"]["cost_fraction"], abs=1e-6)
    assert rows["random"]["cost_fraction"] == pytest.approx(rows["trained"]["cost_fraction"], abs=0.12)
    assert rows["random"]["runs"] == 3


def test_full_budget_is_full_depth(result):
    full = _rows(result)["full"]
    top = [p for p in result["sweep"] if p["budget"] == 1.0][0]
    for policy in ("random", "oracle"):  # no scorer to pay for: a budget of 1.0 keeps every image at full depth
        assert top[policy]["mix"][str(result["model"]["exits"][-1])] == 1.0
        assert top[policy]["recall"] == full["recall"]
    for policy in ("trained", "heuristic"):  # thresholds come from val: on test, at most full depth + the scorer
        assert top[policy]["cost_fraction"] <= 1.0 + top[policy]["scorer_gflops"] / full["gflops"] + 1e-9


def test_scorers_and_pipeline_check(result):
    for key in ("heuristic", "trained", "oracle"):
        m = result["scorers"][key]["metrics"]
        assert np.isfinite(m["plcc"]) and np.isfinite(m["srcc"])
    assert result["scorers"]["oracle"]["metrics"]["srcc"] == pytest.approx(1.0)
    # what `icar embed` (ModelWorker.embed, float16) writes equals the per-exit combination the bench scores
    assert result["checks"]["pipeline_embed_vs_combination"]["max_abs_diff"] < 2e-3
    assert len(result["goals"]) == len(quality.GOALS)


def test_missing_split_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "corpus.json").write_text(json.dumps({"command": "x", "splits": {"test": {"shards": []},
                                                                                "val": {"shards": []}}}))
    assert quality.main(["--corpus", str(tmp_path), "--cache-dir", str(tmp_path / "c"), "--no-savoias"]) == 2
    assert "make-demo-corpus" in capsys.readouterr().err


def test_a_larger_test_split_of_the_shipped_corpus_is_recognised(tmp_path):
    """Train and val do not move when only the test split grows (the premise), so such a corpus is an extension."""
    from jobs import make_demo_corpus

    common = ["--val", "20", "--seed", "5", "--shard-size", "25", "--complexity-train", "10", "--no-progress"]
    for name, n, test in (("small", 85, 25), ("large", 110, 50)):  # train = n - val - test = 40 in both
        assert make_demo_corpus.main(["--n", str(n), "--test", str(test), *common, "--output",
                                      str(tmp_path / name)]) == 0
    for split in ("train", "val"):
        small = sorted((tmp_path / "small" / split).glob("*.tar"))
        large = sorted((tmp_path / "large" / split).glob("*.tar"))
        assert [p.name for p in small] == [p.name for p in large]
        assert all(a.read_bytes() == b.read_bytes() for a, b in zip(small, large))
    first = sorted((tmp_path / "large" / "test").glob("*.tar"))[0]  # the shipped test images lead the larger split
    assert first.read_bytes() == sorted((tmp_path / "small" / "test").glob("*.tar"))[0].read_bytes()

    shipped = dict(zip(quality.CORPUS_ARGS[::2], quality.CORPUS_ARGS[1::2]))
    doc = {"generator": "icar make-demo-corpus", "seed": int(shipped["--seed"]),
           "image_size": int(shipped["--image-size"]), "jpeg_quality": int(shipped["--jpeg-quality"]),
           "shard_size": int(shipped["--shard-size"]),
           "splits": {"train": {"count": 20000}, "val": {"count": 1000}, "test": {"count": 3000}}}
    assert quality.extends_shipped_test(doc)
    assert not quality.extends_shipped_test({**doc, "seed": 1})
    assert not quality.extends_shipped_test({**doc, "splits": {**doc["splits"], "train": {"count": 22000}}})
    assert not quality.extends_shipped_test({**doc, "splits": {**doc["splits"], "test": {"count": 1000}}})
    assert not quality.extends_shipped_test({**doc, "image_size": 96})
