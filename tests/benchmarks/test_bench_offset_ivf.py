"""bench/offset_ivf.py end to end on a tiny generated corpus, and its recall measure checked by hand."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("faiss")

_spec = importlib.util.spec_from_file_location(
    "bench_offset_ivf", Path(__file__).resolve().parents[2] / "bench" / "offset_ivf.py")
offset_ivf = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = offset_ivf
_spec.loader.exec_module(offset_ivf)


def test_ivf_recall_is_one_when_every_list_is_probed_and_less_with_one():
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(400, 8)).astype(np.float32)
    queries = rng.normal(size=(50, 8)).astype(np.float32)
    got = offset_ivf.ivf_recall(rows, queries, nlist=8, nprobes=[1, 8], k=5)
    assert got[8] == 1.0  # every list probed: the exact answer
    assert 0.0 < got[1] < 1.0  # one list of eight misses some of the true top 5 of random vectors


def test_bench_reports_the_three_ways_of_indexing_one_mix(tmp_path, capsys):
    from jobs import make_demo_corpus

    corpus = tmp_path / "corpus"
    assert make_demo_corpus.main(["--n", "70", "--val", "10", "--test", "50", "--seed", "3", "--shard-size", "25",
                                  "--complexity-train", "5", "--output", str(corpus), "--no-progress"]) == 0
    out = tmp_path / "r.json"
    assert offset_ivf.main(["--corpus", str(corpus), "--nlist", "4", "--nprobe", "1,4", "-k", "5",
                            "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    r = json.loads(out.read_text())
    assert r["images"] == 50 and r["queries"] == 50 and r["exits"] == [4, 6, 8] and r["nlist"] == 4
    assert set(r["recall"]) == {"uncalibrated", "scaled", "scaled + offset"}
    for name, by_nprobe in r["recall"].items():
        assert by_nprobe["4"] == 1.0  # every list probed
        assert 0.0 <= by_nprobe["1"] <= 1.0
    assert "| scaled + offset | 129 |" in printed and "| uncalibrated | 128 |" in printed
    with pytest.raises(SystemExit, match="--mix"):
        offset_ivf.main(["--corpus", str(corpus), "--mix", "0.5,0.5"])  # two shares for three exits
    with pytest.raises(SystemExit, match="sum to 1"):
        offset_ivf.main(["--corpus", str(corpus), "--mix", "0.5,0.4,0.3"])
