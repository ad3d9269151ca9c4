"""bench.merging: the trade-off figure is a self-contained SVG of its rows; the static baseline's recipe is checked."""

from __future__ import annotations

import importlib.util
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

# bench/ is a folder of scripts run with `python -m bench.merging` from the repository root, not a package on
# the test path: load the script by its file.
_spec = importlib.util.spec_from_file_location(
    "bench_merging", Path(__file__).resolve().parents[2] / "bench" / "merging.py")
bm = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = bm
_spec.loader.exec_module(bm)

SVG = "{http://www.w3.org/2000/svg}"


def _row(name, method, r1, speedup, gflops):
    return {"name": name, "method": method, "t2i": {1: r1, 5: 1.0, 10: 1.0}, "speedup": speedup,
            "gflops": gflops, "gflops_fraction": gflops / 0.06}


def _result():
    rows = [_row("full depth", "full depth", 0.83, 1.0, 0.06),
            _row("exits only (budget 0.6)", "exits only", 0.62, 0.7, 0.036),
            _row("exits only (budget 0.9)", "exits only", 0.75, 0.6, 0.054),
            _row("merging only (8@keep0.8)", "merging only", 0.80, 1.6, 0.03),
            _row("static smaller tower (4 of 8 blocks, trained like the demo model)", "static smaller tower",
                 0.81, 1.9, 0.032)]
    return {"facts": {"date": "2026-11-25T00:00:00+00:00", "git": "abc", "cpu_count": 2},
            "load_average_during": [[1.0, 2.0, 3.0], [1.5, 2.5, 3.5]], "test_images": 1000, "rows": rows,
            "static_model": {"blocks": 4}}


def test_plot_is_a_standalone_svg_with_a_point_per_row_and_a_curve_per_method():
    root = ET.fromstring(bm.plot_tradeoff(_result()))
    assert root.tag == SVG + "svg" and root.get("width") and root.get("height")
    tips = [t.text for t in root.iter(SVG + "title")]
    for name in ("exits only (budget 0.6)", "exits only (budget 0.9)", "merging only (8@keep0.8)", "full depth"):
        assert any(t and t.startswith(name + ":") for t in tips), name
    curves = list(root.iter(SVG + "polyline"))
    assert len(curves) == 1  # only exits only has two points; its curve runs in GFLOPs order (0.6, then 0.9)
    xs = [float(p.split(",")[0]) for p in curves[0].get("points").split()]
    assert xs[0] > xs[1]  # budget 0.6 ran faster than 0.9 here
    text = " ".join("".join(t.itertext()) for t in root.iter(SVG + "text"))
    assert "load average" in text and "1.0, 2.0, 3.0" in text and "4 blocks" in text


def test_static_tower_with_another_recipe_is_refused(tmp_path):
    demo = json.loads((bm.DEMO / "card.json").read_text())["train"]
    card = {**demo, "epochs": 1, "model": {**demo["model"], "vision_layers": 4}}
    (tmp_path / "card.json").write_text(json.dumps({"train": card}))
    (tmp_path / "clip.safetensors").write_bytes(b"")
    a = bm.parse_args(["--static-model", str(tmp_path), "--corpus", demo["corpus"]])
    with pytest.raises(SystemExit, match=r"not trained like the demo model.*'epochs': \(1, 3\)"):
        bm.static_tower(a)
    card["epochs"] = 3
    (tmp_path / "card.json").write_text(json.dumps({"train": card}))
    assert bm.static_tower(a) == str(tmp_path)
    assert bm.static_tower(bm.parse_args(["--static-model", "none"])) is None


def test_hits_at_1_are_the_per_query_parts_of_recall_at_1():
    rng = np.random.default_rng(0)
    groups = np.array([0, 1, 1, 2, 3, 3, 3, 4, 5, 6])  # identical captions share a group: one query each
    text = rng.normal(size=(10, 8)).astype(np.float32)
    images = text + rng.normal(scale=1.0, size=(10, 8)).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    hits = bm.hits_at_1(text, images, groups)
    assert hits.shape == (7,) and hits.dtype == bool
    assert hits.mean() == pytest.approx(bm.recall_row(text, groups, images)[1])
    assert bm.hits_at_1(text, text, groups).all()  # each caption's own embedding is its top image


def test_paired_interval_covers_the_difference_and_excludes_zero_only_for_a_real_gap():
    rng = np.random.default_rng(1)
    base = rng.random(1000) < 0.8
    same = bm.paired_interval(base, base, 500)
    assert same["diff"] == same["lo"] == same["hi"] == 0.0
    better = base | (rng.random(1000) < 0.3)  # fixes ~30% of the misses, breaks nothing
    gap = bm.paired_interval(better, base, 500)
    assert 0 < gap["lo"] <= gap["diff"] <= gap["hi"]
    noisy = rng.permutation(base)  # the same recall on other queries: no real gap, but no shared queries either
    mixed = bm.paired_interval(noisy, base, 500)
    assert mixed["lo"] < 0 < mixed["hi"] and mixed["lo"] <= mixed["diff"] <= mixed["hi"]


def test_budgets_name_the_static_towers_gflops():
    assert bm.parse_budgets("0.45, static,0.6", 0.527) == [0.45, 0.527, 0.6]
    with pytest.raises(SystemExit, match="no static tower"):
        bm.parse_budgets("static", None)
