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
