"""bench/gallery.py end to end on a tiny generated corpus: shares of full depth per gallery size."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

_spec = importlib.util.spec_from_file_location(
    "bench_gallery", Path(__file__).resolve().parents[2] / "bench" / "gallery.py")
gallery = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = gallery
_spec.loader.exec_module(gallery)

from pipeline.training.recall import calibrated_penalty, mixed_margins  # noqa: E402


def test_gallery_bench_reports_each_exit_share_per_size(tmp_path, capsys):
    from jobs import make_demo_corpus

    corpus = tmp_path / "corpus"
    assert make_demo_corpus.main(["--n", "60", "--val", "10", "--test", "40", "--seed", "3", "--shard-size", "20",
                                  "--complexity-train", "5", "--output", str(corpus), "--no-progress"]) == 0
    out = tmp_path / "g.json"
    assert gallery.main(["--corpus", str(corpus), "--min-images", "10", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| 40 |" in printed and "slope of the share per doubling" in printed
    r = json.loads(out.read_text())
    assert r["images"] == 40 and r["exits"] == [4, 6, 8]
    assert [s["images"] for s in r["sizes"]] == [10, 20, 40]
    assert all(s["captions"] == 40 for s in r["sizes"])  # every caption searched once per size
    full = [s["t2i@1"]["full"] for s in r["sizes"]]
    assert full == sorted(full, reverse=True)  # fewer competitors: recall can only rise
    for name in ("exit 4", "exit 6"):
        assert r["shares"][name] == pytest.approx([s["t2i@1"][name] / s["t2i@1"]["full"] for s in r["sizes"]])
        want = np.polyfit(np.log2([10, 20, 40]), r["shares"][name], 1)[0]
        assert r["slope_per_doubling"][name] == pytest.approx(want)
    assert set(r["mixed_penalty"]) == {"exit 4", "exit 6"}
    for rows in r["mixed_penalty"].values():
        assert [p["images"] for p in rows] == [10, 20, 40] and all(p["captions"] == 40 for p in rows)
        for p in rows:
            assert p["penalty"] == pytest.approx(max(p["own_exit_t2i@1"] - p["exit_vs_full_t2i@1"],
                                                     p["own_full_t2i@1"] - p["full_vs_exit_t2i@1"]))
            lo, hi = p["penalty_interval"]
            assert lo <= hi and lo <= p["penalty"] + 1e-9  # a bootstrap of the max sits at or above the estimate
    assert "mixed-gallery penalty" in printed


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_mixed_penalty_is_the_worse_direction_computed_by_hand():
    rng = np.random.default_rng(0)
    n, d = 64, 16
    full = _unit(rng.normal(size=(n, d)))
    exit_emb = _unit(full + 0.6 * rng.normal(size=(n, d)))
    text = _unit(full + 0.5 * rng.normal(size=(n, d)))
    t2i = np.arange(n)
    # the same embeddings at both depths, uncalibrated: mixing changes nothing
    same = calibrated_penalty(mixed_margins(text, full, full, min_images=n), 1.0, 0.0)
    assert len(same) == 1 and same[0]["penalty"] == 0.0
    assert (same[0]["own_exit_t2i@1"] == same[0]["exit_vs_full_t2i@1"] == same[0]["own_full_t2i@1"]
            == same[0]["full_vs_exit_t2i@1"])
    # one gallery of every image: recompute each direction with plain numpy, exit rows scored scale x cos + offset
    scale, offset = 1.07, -0.02
    [row] = calibrated_penalty(mixed_margins(text, exit_emb, full, min_images=n), scale, offset)
    se, sf = text @ exit_emb.T, text @ full.T
    own = np.eye(n, dtype=bool)

    def r1(scores):
        return float(np.mean(scores.argmax(axis=1) == t2i))

    want = {"own_exit_t2i@1": r1(se), "own_full_t2i@1": r1(sf),
            "exit_vs_full_t2i@1": r1(np.where(own, scale * se + offset, sf)),
            "full_vs_exit_t2i@1": r1(np.where(own, sf, scale * se + offset))}
    assert {k: row[k] for k in want} == pytest.approx(want)
    worse = max(want["own_exit_t2i@1"] - want["exit_vs_full_t2i@1"], want["own_full_t2i@1"] - want["full_vs_exit_t2i@1"])
    assert row["penalty"] == pytest.approx(worse)
    # the case is not trivial
    assert want["exit_vs_full_t2i@1"] != want["own_exit_t2i@1"] or want["full_vs_exit_t2i@1"] != want["own_full_t2i@1"]
    # halves: the same split as by_gallery_size, so the penalty rows pair with its shares
    halves = calibrated_penalty(mixed_margins(text, exit_emb, full, min_images=n // 2), scale, offset)
    assert [p["images"] for p in halves] == [n // 2, n] and halves[0]["captions"] == n
