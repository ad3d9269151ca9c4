"""bench/gpu_check.py, the one prepared GPU check, run on CPU with the demo model (--device cpu --smoke): every
section runs and lands in the JSON, so the check's first run on a borrowed GPU fails only where the GPU differs."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

# bench/ is a folder of scripts, not a package on the test path: load the script by its file.
_spec = importlib.util.spec_from_file_location(
    "bench_gpu_check", Path(__file__).resolve().parents[2] / "bench" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = gpu_check
_spec.loader.exec_module(gpu_check)
main = gpu_check.main


def test_gpu_check_smoke_runs_every_section_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    assert main(["--device", "cpu", "--smoke", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["complete"] and report["errors"] == {} and report["skipped"] == []
    assert report["ray"]["used"] is False and "without Ray" in report["ray"]["note"]
    sections = report["sections"]
    for name in ("setup", "data", "decode", "load demo/bf16", "bare demo/bf16", "worker demo/bf16",
                 "adaptive demo/bf16", "tolerance demo/bf16", "train_step"):
        assert name in sections, name
    assert sections["decode"]["64"]["tolerance_vs_cpu_path"]["max_abs"] <= 2
    for batch in ("4", "8"):
        row = sections["worker demo/bf16"][batch]
        for path in ("full_cpu_pixels", "full_gpu_decode", "routed_cpu_pixels", "routed_gpu_decode"):
            assert row[path]["images_per_s"] > 0, (batch, path)
        assert row["full_mean_gflops"] > row["routed_mean_gflops"] > 0  # the routed mix exits earlier
        assert row["gflops_bound"] > 1
    assert sections["adaptive demo/bf16"]["gflops_bound"] > 1
    assert sections["tolerance demo/bf16"]["cosine_min"] > 0.99
    assert all(math.isfinite(v) for v in sections["train_step"]["losses"])


def test_gpu_check_skips_what_does_not_fit_its_budget_and_says_so(tmp_path):
    out = tmp_path / "gpu_check.json"
    # No wheels and open_clip present: setup passes; a budget of 0 s skips every model section, and says so.
    assert main(["--device", "cpu", "--smoke", "--budget-s", "0", "--out", str(out)]) == 1
    report = json.loads(out.read_text())
    assert not report["complete"]
    assert any(s.startswith("model demo/bf16") for s in report["skipped"])
    assert "decode" in report["sections"]
