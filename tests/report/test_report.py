"""Cost report: totals audited three ways, refusals of inconsistent runs, baselines, CSV/JSON/HTML outputs.

Runs are built with the real shard-writing code (ShardRows, commit_shard, manifest_row, Manifest) and a run.json
like `icar embed` writes, so no model is needed; the HTML is rendered by a real headless Chromium.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.io import storage
from pipeline.report.build import (AuditError, ReportConfig, build_report, depth_colours, render_csv, render_html,
                             summary_line)
from pipeline.io.shards import Manifest, ShardRows, commit_shard, manifest_row, write_shard_failure

from jobs import report as report_job

DIM = 4
EXITS = [6, 9, 12]
GFLOPS_PER_EXIT = {6: 4.9, 9: 6.86, 12: 8.82}
SCORER = 0.25
MODEL = {"name": "ViT-B-32", "pretrained": "none", "weights_sha256": "ab" * 32, "embed_dim": DIM,
         "image_size": 32, "num_blocks": 12}
OTHER_MODEL = dict(MODEL, name="ViT-L-14", weights_sha256="cd" * 32, num_blocks=24)


def make_run(run: str, shards: list[dict], *, router: dict | None = None, scorer: float = SCORER,
             model: dict = MODEL, gflops_per_exit: dict = GFLOPS_PER_EXIT, exits: list[int] = EXITS,
             invocations: list[dict] | None = None, failed_sources: tuple[str, ...] = (), device: str = "cpu",
             storage_options: dict | None = None, committed_at: list[str] | None = None) -> str:
    """Write a run directory as `icar embed` would: shards + errors + manifest through pipeline.io.shards, and run.json.

    Each shard is {"source", "exits": [depth per row], "complexity": [..] (None: no scorer),
    "errors": n failed samples, "model_seconds": s}. Row gflops = gflops_per_exit[depth] + scorer, like the worker.
    """
    so = storage_options or {}
    storage.makedirs(run, so)
    manifest = Manifest(run, so)
    lookup = {d: np.float32(g + scorer) for d, g in gflops_per_exit.items()}
    for part, sh in enumerate(shards):
        depths = np.asarray(sh["exits"], np.int16)
        n = depths.size
        rows = ShardRows(source=sh["source"])
        rows.keys = sh.get("keys") or [f"{sh['source']}/{i:04d}" for i in range(n)]
        rows.captions = [f"caption {i}" for i in range(n)]
        rows.urls = [None] * n
        rows.widths = [64] * n
        rows.heights = [48] * n
        cx = sh.get("complexity")
        rows.complexity = [np.full(n, np.nan, np.float32) if cx is None else np.asarray(cx, np.float32)]
        rows.exit_layer = [depths]
        rows.gflops = [np.array([lookup[int(d)] for d in depths], np.float32)]
        emb = np.random.default_rng(part).normal(size=(n, DIM)).astype(np.float32)
        rows.embeddings = [(emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float16)]
        for i in range(sh.get("errors", 0)):
            rows.add_error(f"{sh['source']}/bad{i}", "decode", "cannot identify image file")
        commit_shard(run, part, rows, DIM, so)
        row = manifest_row(sh["source"], part, rows, seconds=sh.get("seconds", 2.0),
                           model_seconds=sh.get("model_seconds", 1.0), scorer_gflops_per_image=scorer,
                           fingerprint={})
        if committed_at:
            row["committed_at"] = committed_at[part]
        manifest.add(row)
    manifest.flush()  # add() rewrites the file only now and then, as in `icar embed`'s commit loop
    for k, source in enumerate(failed_sources):
        write_shard_failure(run, len(shards) + k, source, "OSError: truncated tar header", so)
    info = {"model": model, "exits": exits, "heads": None,
            "router": router or {"format": 1, "kind": "threshold", "exits": exits, "thresholds": [0.3, 0.6]},
            "scorer": {"name": "heuristic"} if scorer else None,
            "gflops_per_exit": {str(k): v for k, v in gflops_per_exit.items()}, "scorer_gflops": scorer,
            "image_size": 32, "embed_dim": DIM, "device": device, "precision": "fp32",
            "versions": {"icar": "0.1.0"},
            "resources": {"actors": 1, "gpus_per_actor": 1.0 if device == "cuda" else 0.0, "cpus_per_actor": 1,
                          "decode_tasks": 2, "cluster_cpus": 3, "cluster_gpus": 1.0 if device == "cuda" else 0.0}}
    if invocations is not None:
        info["invocations"] = invocations
    storage.write_json(info, storage.join(run, "run.json"), so)
    return run


def standard_shards() -> list[dict]:
    """Three shards, 36 images: 12 at exit 6, 10 at exit 9, 14 at exit 12; complexity rising with depth."""
    return [
        {"source": "in/a.tar", "exits": [6] * 8 + [9] * 2 + [12] * 2, "errors": 1, "model_seconds": 1.0},
        {"source": "in/b.tar", "exits": [6] * 4 + [9] * 4 + [12] * 4, "errors": 1, "model_seconds": 1.5},
        {"source": "in/c.tar", "exits": [9] * 4 + [12] * 8, "errors": 0, "model_seconds": 2.0},
    ]


def with_complexity(shards: list[dict]) -> list[dict]:
    rng = np.random.default_rng(7)
    base = {6: 0.15, 9: 0.45, 12: 0.8}
    for sh in shards:
        sh["complexity"] = [min(1.0, max(0.0, base[d] + rng.uniform(-0.12, 0.12))) for d in sh["exits"]]
    return shards


INVOCATIONS = [{"started": "2026-01-10T10:00:00+00:00", "finished": "2026-01-10T10:00:12+00:00", "wall_seconds": 12.0,
                "images": 36, "errors": 2, "shards_committed": 3, "shards_failed": 1, "gflops": 0.0,
                "model_seconds": 4.5}]


@pytest.fixture()
def run_a(tmp_path) -> str:
    return make_run(str(tmp_path / "run-a"), with_complexity(standard_shards()), invocations=INVOCATIONS,
                    failed_sources=("in/d.tar",))


def expected_spent(counts: dict[int, int], scorer: float = SCORER) -> float:
    return sum(c * (GFLOPS_PER_EXIT[d] + scorer) for d, c in counts.items())


# --------------------------------------------------------------------------------------------------------------
# Totals and the audit


def test_totals_agree_three_ways_and_with_hand_computed_figures(run_a):
    report = build_report([run_a])
    s = report["runs"][0]
    counts = {6: 12, 9: 10, 12: 14}
    spent = expected_spent(counts)
    full = 36 * GFLOPS_PER_EXIT[12]
    g = s["gflops"]
    assert s["images"] == 36
    assert s["failed"]["samples"] == 2 and s["failed"]["input_shards"] == 1
    assert s["failed"]["by_stage"] == {"decode": 2, "shard": 1}
    assert s["failed"]["failed_input_shards"][0]["source"] == "in/d.tar"
    # The three independent totals agree with each other and with the figure computed here by hand.
    a = s["audit"]
    assert a["status"] == "passed" and a["agree"] and a["row_violations"] == 0
    for total in (g["spent"], a["gflops_rows"], a["gflops_manifest"], a["gflops_recomputed"]):
        assert total == pytest.approx(spent, rel=1e-6)
    table = pq.read_table(Path(run_a) / "manifest.parquet")
    assert sum(table.column("gflops").to_pylist()) == pytest.approx(g["spent"], rel=1e-9)
    shard_files = sorted((Path(run_a) / "shards").glob("*.parquet"))
    rows = pa.concat_tables(pq.read_table(p, columns=["gflops"]) for p in shard_files)
    assert float(np.sum(rows.column("gflops").to_numpy().astype(np.float64))) == pytest.approx(g["spent"], rel=1e-12)
    assert g["scorer"] == pytest.approx(36 * SCORER)
    assert g["encoder"] == pytest.approx(spent - 36 * SCORER)
    assert g["full_depth"] == pytest.approx(full)
    assert g["saved"] == pytest.approx(full - spent, rel=1e-6)
    assert g["saved_pct"] == pytest.approx(100 * (full - spent) / full, rel=1e-6)
    assert [(e["depth"], e["images"]) for e in s["exit_mix"]] == [(6, 12), (9, 10), (12, 14)]
    assert sum(e["share"] for e in s["exit_mix"]) == pytest.approx(1.0)
    assert s["exit_mix"][0]["gflops"] == pytest.approx(12 * (4.9 + SCORER), rel=1e-6)
    # By shard: each shard's figures from its own rows; the shards add up to the run.
    by = {x["source"]: x for x in s["by_shard"]}
    assert by["in/a.tar"]["gflops_spent"] == pytest.approx(expected_spent({6: 8, 9: 2, 12: 2}), rel=1e-6)
    assert by["in/c.tar"]["saved_pct"] == pytest.approx(
        100 * (1 - expected_spent({9: 4, 12: 8}) / (12 * 8.82)), rel=1e-6)
    assert sum(x["gflops_spent"] for x in s["by_shard"]) == pytest.approx(spent, rel=1e-6)
    # Deciles: ten equal groups of 36 scored images, simplest first, adding up to the run.
    ds = s["by_complexity_decile"]
    assert len(ds) == 10 and sum(d["images"] for d in ds) == 36
    assert ds[0]["mean_exit_layer"] == 6 and ds[-1]["mean_exit_layer"] == 12
    assert ds[0]["saved_pct"] > ds[-1]["saved_pct"]
    assert sum(d["gflops_spent"] for d in ds) == pytest.approx(spent, rel=1e-6)
    assert all(a["complexity_max"] <= b["complexity_min"] for a, b in zip(ds, ds[1:]))
    # Histogram and cumulative curve cover every image.
    assert sum(sum(v) for v in s["complexity_histogram"]["counts_by_exit"].values()) == 36
    assert s["cumulative"]["images"][-1] == 36
    assert s["cumulative"]["gflops_spent"][-1] == pytest.approx(spent, rel=1e-6)
    assert s["cumulative"]["gflops_full_depth"][-1] == pytest.approx(full)
    # One-line summary in the agreed form.
    assert summary_line(report) == (f"36 images, 2 failed (+1 input shard failed); {spent:,.1f} GFLOPs vs "
                                    f"{full:,.1f} at full depth: {100 * (full - spent) / full:.1f}% saved; "
                                    f"exits 6:12 9:10 12:14; random weights: embeddings carry no meaning")


def test_summary_line_matches_the_lead_example_format(tmp_path):
    # 36 images with the example's mix and a run.json whose figures give 118.3 vs 317.5 GFLOPs.
    per_exit = {6: 4.45, 9: 6.63, 12: 8.82}
    run = make_run(str(tmp_path / "r"), [{"source": "x.tar", "exits": [6] * 12 + [9] * 10 + [12] * 14, "errors": 2}],
                   scorer=0.0, gflops_per_exit=per_exit)
    spent = 12 * 4.45 + 10 * 6.63 + 14 * 8.82
    line = summary_line(build_report([run]))
    # The synthetic runs' model is a seeded random init (MODEL: pretrained "none"), and the line says so.
    assert line == f"36 images, 2 failed; {spent:.1f} GFLOPs vs 317.5 at full depth: " \
                   f"{100 * (317.52 - spent) / 317.52:.1f}% saved; exits 6:12 9:10 12:14; " \
                   f"random weights: embeddings carry no meaning"


def _rewrite_shard(run: str, part: int, transform) -> None:
    path = Path(run) / "shards" / f"part-{part:05d}.parquet"
    table = pq.read_table(path)
    pq.write_table(transform(table), path)


@pytest.mark.parametrize("damage, message", [
    ("missing", "part-00001.parquet is listed in manifest.parquet"),
    ("extra", "part-00007.parquet exists but is not in manifest.parquet"),
    ("fewer_rows", "has 11 rows but manifest.parquet records 12"),
    ("manifest_gflops", "but manifest.parquet records"),
    ("exit_counts", "exit counts"),
    ("error_file", "errors/part-00000.parquet is missing"),
])
def test_refuses_runs_whose_manifest_and_shards_disagree(run_a, damage, message, capsys):
    shards = Path(run_a) / "shards"
    if damage == "missing":
        (shards / "part-00001.parquet").unlink()
    elif damage == "extra":
        shutil.copy(shards / "part-00000.parquet", shards / "part-00007.parquet")
    elif damage == "fewer_rows":
        _rewrite_shard(run_a, 0, lambda t: t.slice(0, t.num_rows - 1))
    elif damage == "manifest_gflops":
        m = pq.read_table(Path(run_a) / "manifest.parquet").to_pylist()
        m[2]["gflops"] += 8.82
        pq.write_table(pa.Table.from_pylist(m, schema=pq.read_schema(Path(run_a) / "manifest.parquet")),
                       Path(run_a) / "manifest.parquet")
    elif damage == "exit_counts":
        # Same GFLOP sum and row count, but the manifest's routing record no longer matches the rows.
        m = pq.read_table(Path(run_a) / "manifest.parquet").to_pylist()
        m[0]["exit_counts"] = json.dumps({"6": 7, "9": 3, "12": 2})
        pq.write_table(pa.Table.from_pylist(m, schema=pq.read_schema(Path(run_a) / "manifest.parquet")),
                       Path(run_a) / "manifest.parquet")
    elif damage == "error_file":
        (Path(run_a) / "errors" / "part-00000.parquet").unlink()
    with pytest.raises(AuditError, match="refusing to report") as info:
        build_report([run_a])
    assert message in str(info.value)
    # The CLI refuses with exit code 3, says why, and writes nothing.
    out = Path(run_a).parent / "report-out"
    assert report_job.main([run_a, "--output", str(out)]) == 3
    err = capsys.readouterr().err
    assert "REFUSED" in err and message in err
    assert not out.exists()


def test_shard_being_written_is_not_mistaken_for_a_shard(run_a):
    # The temporary name of an atomic write in progress is not a committed shard and must not fail the audit.
    (Path(run_a) / "shards" / ".part-00009.parquet.tmp-0123abcd").write_bytes(b"partial")
    assert build_report([run_a])["runs"][0]["audit"]["status"] == "passed"


def test_row_gflops_that_disagree_with_run_json_are_refused_or_reported(run_a):
    # Shift one row's gflops and fix the manifest's sum to match, so only the per-row check can see it.
    def bump(t):
        g = t.column("gflops").to_numpy().copy()
        g[3] += 1.0
        return t.set_column(t.schema.get_field_index("gflops"), "gflops", pa.array(g, pa.float32()))

    _rewrite_shard(run_a, 1, bump)
    m = pq.read_table(Path(run_a) / "manifest.parquet").to_pylist()
    m[1]["gflops"] += 1.0
    pq.write_table(pa.Table.from_pylist(m, schema=pq.read_schema(Path(run_a) / "manifest.parquet")),
                   Path(run_a) / "manifest.parquet")
    with pytest.raises(AuditError, match=r"1 row\(s\) recorded GFLOPs that differ") as info:
        build_report([run_a])
    assert "shards/part-00001.parquet row 3" in str(info.value)
    report = build_report([run_a], ReportConfig(strict=False))
    s = report["runs"][0]
    assert report["audit"]["status"] == "FAILED" and s["audit"]["row_violations"] == 1
    assert s["audit"]["violation_examples"][0]["row"] == 3
    # The totals disagree by exactly the injected GFLOP, and the report says so instead of hiding it.
    assert s["audit"]["gflops_rows"] - s["audit"]["gflops_recomputed"] == pytest.approx(1.0, rel=1e-5)
    assert not s["audit"]["agree"]
    assert "AUDIT FAILED" in summary_line(report)
    assert "audit.status,FAILED" in render_csv(report)


# --------------------------------------------------------------------------------------------------------------
# Time, cost and the baseline


def test_baseline_is_an_estimate_without_a_measurement_and_says_so(run_a):
    s = build_report([run_a], ReportConfig(gpu_hour_price=3.0))["runs"][0]
    accel = 1.0 + 1.5 + 2.0
    t, c = s["time"], s["cost"]
    assert t["accelerator_seconds"] == pytest.approx(accel)
    assert t["wall_seconds"] == 12.0 and t["images_per_second_wall"] == pytest.approx(36 / 12)
    assert t["images_per_accelerator_second"] == pytest.approx(36 / accel)
    assert c["accelerator_hours"] == pytest.approx(accel / 3600)
    assert c["cost"] == pytest.approx(accel / 3600 * 3.0)
    ratio = s["gflops"]["full_depth"] / s["gflops"]["spent"]
    fd = c["full_depth"]
    assert fd["basis"] == "estimate" and fd["note"].startswith("ESTIMATE")
    assert "GFLOP ratio" in fd["note"] and "--compare" in fd["note"]
    assert fd["accelerator_hours"] == pytest.approx(accel * ratio / 3600)
    assert c["saved_cost"] == pytest.approx(fd["cost"] - c["cost"])
    assert c["realised_efficiency"] is None


def test_compare_with_a_full_depth_run_gives_a_measured_baseline(tmp_path, run_a):
    # The same images embedded at full depth with no scorer, 0.25 accelerator-s per image.
    shards = standard_shards()
    full = [{"source": sh["source"], "exits": [12] * len(sh["exits"]), "errors": sh["errors"],
             "model_seconds": 0.25 * len(sh["exits"])} for sh in shards]
    run_b = make_run(str(tmp_path / "run-full"), full, scorer=0.0, router={"format": 1, "kind": "fixed", "depth": 12},
                     invocations=[dict(INVOCATIONS[0], wall_seconds=18.0, model_seconds=9.0)])
    report = build_report([run_a], ReportConfig(compare=run_b, gpu_hour_price=2.0))
    s = report["runs"][0]
    fd = s["cost"]["full_depth"]
    assert fd["basis"] == "measured" and fd["note"].startswith("MEASURED") and run_b in fd["note"]
    assert fd["accelerator_hours"] == pytest.approx(36 * 0.25 / 3600)
    assert fd["cost"] == pytest.approx(36 * 0.25 / 3600 * 2.0)
    measured_speedup = (36 * 0.25) / 4.5
    gflop_speedup = s["gflops"]["full_depth"] / s["gflops"]["spent"]
    assert s["cost"]["realised_efficiency"] == pytest.approx(measured_speedup / gflop_speedup)
    comp = report["compare"]
    assert comp["same_model"] and comp["b"]["full_depth_run"]
    assert comp["common_images"] == 36 and comp["images_only_in_a"] == 0 == comp["images_only_in_b"]
    metrics = {m["metric"]: m for m in comp["metrics"]}
    assert metrics["gflops_per_image"]["b"] == pytest.approx(8.82, rel=1e-6)
    assert metrics["accelerator_ms_per_image"]["b"] == pytest.approx(250.0)
    assert metrics["images_per_second_wall"]["b"] == pytest.approx(2.0)
    assert comp["exit_mix"]["depths"] == [6, 9, 12] and comp["exit_mix"]["b"] == [0.0, 0.0, 1.0]
    # A full-depth run reports itself as its own measured baseline: nothing saved.
    b_cost = comp["b_section"]["cost"]
    assert b_cost["full_depth"]["basis"] == "measured" and b_cost["saved_hours"] == pytest.approx(0.0)


def test_full_depth_measurement_on_another_device_is_not_used(tmp_path, run_a):
    full = [{"source": "in/a.tar", "exits": [12] * 10, "model_seconds": 0.1}]
    run_b = make_run(str(tmp_path / "gpu-full"), full, scorer=0.0, device="cuda",
                     router={"format": 1, "kind": "fixed", "depth": 12}, invocations=INVOCATIONS)
    fd = build_report([run_a], ReportConfig(compare=run_b))["runs"][0]["cost"]["full_depth"]
    assert fd["basis"] == "estimate" and "ran on cuda/fp32, not cpu/fp32" in fd["note"]


def test_missing_invocations_are_reported_not_invented(tmp_path):
    run = make_run(str(tmp_path / "old"), standard_shards(), invocations=None)
    s = build_report([run])["runs"][0]
    assert s["time"]["wall_seconds"] is None and s["time"]["images_per_second_wall"] is None
    assert any("no 'invocations'" in n for n in s["time"]["notes"])
    assert s["time"]["accelerator_seconds"] == pytest.approx(4.5)  # still known from the manifest
    # No scorer ran in this run: unscored images get their own row instead of a made-up decile.
    assert s["by_complexity_decile"][-1]["decile"] is None and s["by_complexity_decile"][-1]["images"] == 36


def test_many_runs_aggregate_per_model_and_in_total(tmp_path, run_a):
    run_a2 = make_run(str(tmp_path / "run-a2"), with_complexity(standard_shards()[:1]), invocations=INVOCATIONS)
    l14_exits, l14 = [12, 24], {12: 81.15, 24: 162.03}
    run_l = make_run(str(tmp_path / "run-l14"), [{"source": "in/z.tar", "exits": [12] * 3 + [24] * 5,
                                                  "model_seconds": 3.0}],
                     model=OTHER_MODEL, exits=l14_exits, gflops_per_exit=l14, scorer=1.09,
                     router={"format": 1, "kind": "threshold", "exits": l14_exits, "thresholds": [0.5]},
                     invocations=INVOCATIONS)
    report = build_report([run_a, run_a2, run_l], ReportConfig(gpu_hour_price=2.5))
    assert len(report["runs"]) == 3 and len(report["models"]) == 2
    by_model = {m["models"][0]["identity"]["name"]: m for m in report["models"]}
    b32, vl = by_model["ViT-B-32"], by_model["ViT-L-14"]
    assert b32["images"] == 48 and vl["images"] == 8 and sorted(b32["runs"]) == sorted([run_a, run_a2])
    assert b32["gflops"]["spent"] == pytest.approx(expected_spent({6: 20, 9: 12, 12: 16}), rel=1e-6)
    assert vl["gflops"]["spent"] == pytest.approx(3 * (81.15 + 1.09) + 5 * (162.03 + 1.09), rel=1e-6)
    assert vl["gflops"]["full_depth"] == pytest.approx(8 * 162.03)
    t = report["totals"]
    assert t["images"] == 56
    assert t["gflops"]["spent"] == pytest.approx(b32["gflops"]["spent"] + vl["gflops"]["spent"], rel=1e-9)
    assert t["gflops"]["full_depth"] == pytest.approx(b32["gflops"]["full_depth"] + vl["gflops"]["full_depth"])
    assert t["cost"]["cost"] == pytest.approx(sum(s["cost"]["cost"] for s in report["runs"]))
    assert t["cost"]["full_depth"]["basis"] == "estimate"
    assert t["exit_mix"] == []  # depths of different models are not one histogram
    assert "exits" not in summary_line(report)
    assert t["audit"]["gflops_recomputed"] == pytest.approx(t["gflops"]["spent"], rel=1e-6)
    # The page shows each model's aggregate plots; shard bars of several runs are labelled run/part.
    plots = {(p["plot"], p["scope"]): p for p in parse_plots(render_html(report)).plots}
    b32_scope = f"model:{b32['models'][0]['key']}"
    assert len(plots[("exit-depth", b32_scope)]["bars"]) == 3
    assert len(plots[("exit-depth", f"model:{vl['models'][0]['key']}")]["bars"]) == 2
    assert [b["data-category"] for b in plots[("shard-savings", b32_scope)]["bars"]] == ["1/0", "1/1", "1/2", "2/0"]


def test_a_full_depth_run_among_the_runs_is_the_measured_baseline_for_its_model(tmp_path, run_a):
    full = [{"source": "in/full.tar", "exits": [12] * 20, "model_seconds": 5.0}]
    run_f = make_run(str(tmp_path / "full"), full, scorer=0.0, router={"format": 1, "kind": "fixed", "depth": 12},
                     invocations=INVOCATIONS)
    report = build_report([run_a, run_f])
    by = {s["name"]: s for s in report["runs"]}
    assert by[run_a]["cost"]["full_depth"]["basis"] == "measured"
    assert by[run_a]["cost"]["full_depth"]["accelerator_hours"] == pytest.approx(36 * 0.25 / 3600)
    assert by[run_f]["cost"]["saved_hours"] == pytest.approx(0.0)
    assert report["totals"]["cost"]["full_depth"]["basis"] == "measured"


def test_since_until_select_shards_by_commit_time(tmp_path):
    stamps = ["2025-12-30T10:00:00+00:00", "2026-01-05T10:00:00+00:00", "2026-02-01T00:00:00+00:00"]
    run = make_run(str(tmp_path / "cron"), standard_shards(), committed_at=stamps, invocations=[
        dict(INVOCATIONS[0], started="2025-12-30T09:59:00+00:00", images=12),
        dict(INVOCATIONS[0], started="2026-01-05T09:59:00+00:00", images=12, wall_seconds=6.0),
        dict(INVOCATIONS[0], started="2026-02-01T00:00:00+00:00", images=12)])
    s = build_report([run], ReportConfig(since="2026-01-01", until="2026-02-01"))["runs"][0]
    assert [x["source"] for x in s["by_shard"]] == ["in/b.tar"]
    assert s["images"] == 12 and s["time"]["wall_seconds"] == 6.0 and s["time"]["invocations"] == 1
    assert s["gflops"]["spent"] == pytest.approx(expected_spent({6: 4, 9: 4, 12: 4}), rel=1e-6)
    with pytest.raises(ValueError, match="not an ISO-8601 date"):
        build_report([run], ReportConfig(since="last month"))


def test_report_reads_a_run_on_s3(s3_bucket):
    run = make_run(f"s3://{s3_bucket}/runs/a", with_complexity(standard_shards()), invocations=INVOCATIONS)
    report = build_report([run])
    assert report["runs"][0]["gflops"]["spent"] == pytest.approx(expected_spent({6: 12, 9: 10, 12: 14}), rel=1e-6)
    import s3fs

    s3fs.S3FileSystem(client_kwargs={"endpoint_url": os.environ["AWS_ENDPOINT_URL"]}).rm(
        f"{s3_bucket}/runs/a/shards/part-00002.parquet")
    with pytest.raises(AuditError, match="part-00002.parquet is listed"):
        build_report([run])


# --------------------------------------------------------------------------------------------------------------
# The CLI and its files


def test_cli_writes_json_csv_html_and_prints_a_summary(run_a, tmp_path, capsys):
    out = tmp_path / "rep"
    assert report_job.main([run_a, "--output", str(out), "--gpu-hour-price", "4"]) == 0
    printed = capsys.readouterr().out
    assert "ICAR cost report: 1 run, 1 model" in printed and "ESTIMATE" in printed
    assert "summary: 36 images, 2 failed" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["gpu_hour_price"] == 4.0 and report["format"] == 1
    rows = list(csv.DictReader(io.StringIO((out / "report.csv").read_text())))
    assert list(rows[0]) == ["scope", "metric", "value", "unit", "note"]
    got = {(r["scope"], r["metric"]): r for r in rows}
    assert float(got[("all", "gflops.spent")]["value"]) == pytest.approx(report["totals"]["gflops"]["spent"])
    assert got[("all", "gflops.spent")]["unit"] == "GFLOPs"
    assert got[(f"run:{run_a}", "exit.12.images")]["value"] == "14"
    assert got[("all", "cost.full_depth")]["note"].startswith("ESTIMATE")
    assert got[(f"run:{run_a}", "shard.part-00002.images")]["note"] == "in/c.tar"
    assert (out / "report.html").read_text().startswith("<!doctype html>")
    # --json prints the same document, also through the `icar` command's dispatch.
    from pipeline.cli import main as icar

    assert icar(["report", run_a, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["totals"]["images"] == 36


def test_cli_expands_globs_and_rejects_non_runs(tmp_path, capsys):
    for name in ("2026-01-01", "2026-01-02"):
        make_run(str(tmp_path / "runs" / name), standard_shards()[:1], invocations=INVOCATIONS)
    assert report_job.main([str(tmp_path / "runs" / "2026-01-*"), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["runs"]) == 2
    (tmp_path / "not-a-run").mkdir()
    assert report_job.main([str(tmp_path / "not-a-run")]) == 3
    assert "run.json is missing" in capsys.readouterr().err
    assert report_job.main([str(tmp_path / "nothing-*")]) == 2


# --------------------------------------------------------------------------------------------------------------
# report.html: self-contained, the right plots, and a real browser renders it


class _SvgCounter(HTMLParser):
    """Collects each <svg class=plot>'s data attributes and the data of its <rect class=bar> elements."""

    def __init__(self):
        super().__init__()
        self.plots: list[dict] = []
        self.external: list[str] = []
        self.scripts = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for k in ("src", "href"):
            if a.get(k):
                self.external.append(a[k])
        if tag == "script":
            self.scripts += 1
        if tag == "svg" and "plot" in (a.get("class") or ""):
            self.plots.append({"plot": a["data-plot"], "scope": a["data-scope"], "bars": [], "lines": 0})
        elif tag == "rect" and a.get("class") == "bar":
            self.plots[-1]["bars"].append(a)
        elif tag == "polyline" and self.plots:
            self.plots[-1]["lines"] += 1


def parse_plots(text: str) -> _SvgCounter:
    p = _SvgCounter()
    p.feed(text)
    return p


def test_html_is_self_contained_with_the_right_bars(run_a, tmp_path):
    full = [{"source": sh["source"], "exits": [12] * len(sh["exits"]), "model_seconds": 3.0}
            for sh in standard_shards()]
    run_b = make_run(str(tmp_path / "full"), full, scorer=0.0, router={"format": 1, "kind": "fixed", "depth": 12},
                     invocations=INVOCATIONS)
    report = build_report([run_a], ReportConfig(compare=run_b))
    text = render_html(report)
    parsed = parse_plots(text)
    assert parsed.external == [] and parsed.scripts == 0
    assert "url(" not in text and "@import" not in text and "http://" not in text and "https://" not in text
    scope = f"run:{run_a}"
    plots = {(p["plot"], p["scope"]): p for p in parsed.plots}
    exit_hist = plots[("exit-depth", scope)]
    assert [(b["data-category"], float(b["data-value"])) for b in exit_hist["bars"]] == [
        ("6 blocks", 12), ("9 blocks", 10), ("12 blocks", 14)]
    s = report["runs"][0]
    hist = s["complexity_histogram"]["counts_by_exit"]
    cx_bars = plots[("complexity", scope)]["bars"]
    assert len(cx_bars) == sum(1 for counts in hist.values() for n in counts if n)
    assert {b["data-depth"] for b in cx_bars} == {"6", "9", "12"}
    assert plots[("cumulative", scope)]["lines"] == 2
    assert len(plots[("shard-savings", scope)]["bars"]) == 3
    assert len(plots[("decile-savings", scope)]["bars"]) == 10
    # --compare: the exit mix side by side (A and B per depth) and per-image figures.
    assert len(plots[("compare-exit-mix", "compare")]["bars"]) == 2 * 3
    assert len(plots[("compare-gflops-per-image", "compare")]["bars"]) == 2
    assert "MEASURED" in text


def test_html_shard_chart_becomes_a_histogram_for_many_shards(tmp_path):
    shards = [{"source": f"in/{i:03d}.tar", "exits": [6] * (i % 5) + [12] * 3, "model_seconds": 0.1} for i in range(90)]
    run = make_run(str(tmp_path / "big"), shards, invocations=INVOCATIONS)
    plots = {p["plot"]: p for p in parse_plots(render_html(build_report([run]))).plots}
    assert len(plots["shard-savings"]["bars"]) == 20


CHROMIUM = "/usr/bin/chromium"


@pytest.mark.skipif(not os.path.exists(CHROMIUM),
                    reason="Debian's chromium is not installed (apt-get install -y chromium): "
                           "cannot render report.html")
def test_html_renders_in_headless_chromium(run_a, tmp_path):
    from PIL import Image

    out = tmp_path / "rep"
    assert report_job.main([run_a, "--output", str(out)]) == 0
    shot = tmp_path / "shot.png"
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--hide-scrollbars", f"--user-data-dir={profile}", f"--screenshot={shot}", "--window-size=1200,2000",
             (out / "report.html").as_uri()], capture_output=True, text=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 0, proc.stderr[-2000:]
    img = np.asarray(Image.open(shot).convert("RGB")).astype(np.int16)
    assert img.shape[:2] == (2000, 1200)
    assert img.std() > 20, "the screenshot is a blank page"
    # The exit-depth bars were painted in their colours: the SVG really rendered, not only the text.
    for depth, colour in depth_colours(EXITS).items():
        rgb = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)])
        hits = int((np.abs(img - rgb).sum(axis=2) < 12).sum())
        assert hits > 500, f"exit {depth} colour {colour} covers only {hits} pixels"
    if os.environ.get("ICAR_REPORT_SCREENSHOT"):  # to look at the page: ICAR_REPORT_SCREENSHOT=/tmp/report.png
        shutil.copy(shot, os.environ["ICAR_REPORT_SCREENSHOT"])
