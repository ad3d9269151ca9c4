"""The cost report: audited GFLOPs spent vs full depth, exit mix, throughput and cost, per run and across runs.

A report reads only the run directory's own files (run.json, manifest.parquet, shards/, errors/), local or on
an object store. Every GFLOP total is known three ways that must agree before anything is reported:

- the rows' ``gflops`` column (what each image recorded as spent),
- the manifest's per-shard sums (what the run committed),
- the per-depth image counts x run.json's ``gflops_per_exit`` + the scorer (what the cost model says).

A run whose manifest and shard files disagree (a listed shard missing, an unlisted shard present, row counts,
GFLOP sums or exit counts that differ) is refused with ``AuditError``: a cost figure nobody can reproduce is
worse than none. Rows whose ``gflops`` differs from the per-depth figure of their ``exit_layer`` are refused
too unless ``strict=False``, in which case the report lists them and marks the audit FAILED.

The full-depth baseline is ``gflops_per_exit[exits[-1]]`` per image with no scorer. Its time (and so its
GPU-hours and cost) is MEASURED where a full-depth run of the same model on the same device exists (``compare``,
or a fixed full-depth run among the runs), otherwise an ESTIMATE: the run's own accelerator time scaled by the
GFLOP ratio, labelled as such everywhere it appears.

Entry points: ``build_report(runs, config) -> dict``, ``summary_line(report) -> str``, ``render_text``,
``render_html``, ``report_csv_rows`` and ``write_report(report, output_dir)``; ``jobs/report.py`` is the CLI.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from pipeline import __version__
from pipeline.io import storage
from pipeline.report.audit import GFLOP_RTOL, AuditError, RunData, gflops_agree, load_run, model_key, model_label
from pipeline.report.html import depth_colours, render_html
from pipeline.report.text import render_csv, render_text, report_csv_rows, summary_line

log = logging.getLogger(__name__)

# The report's public API is this module; reading/auditing, text/CSV and HTML live in report_audit,
# report_text and report_html.
__all__ = ["REPORT_FORMAT", "AuditError", "ReportConfig", "RunData", "build_report", "depth_colours", "load_run",
           "model_key", "model_label", "render_csv", "render_html", "render_text", "report_csv_rows",
           "summary_line", "write_report"]

REPORT_FORMAT = 1  # version of report.json
COMPLEXITY_BINS = 20  # bins of the complexity histogram over [0, 1]
CUMULATIVE_POINTS = 300  # points kept of the cumulative GFLOPs curve (the JSON stays small for any run size)


@dataclass
class ReportConfig:
    """What a cost report covers and how it prices time."""

    gpu_hour_price: float = 2.5  # price of one accelerator-hour (GPU-hour) in `currency`
    currency: str = "USD"  # currency of gpu_hour_price, printed beside every cost
    compare: str | None = None  # a second run shown side by side; if full depth, it is the measured baseline
    since: str | None = None  # only shards committed at/after this ISO-8601 date or time (UTC); None: all
    until: str | None = None  # only shards committed before this ISO-8601 date or time (UTC); None: all
    strict: bool = True  # refuse rows whose gflops disagree with run.json's per-depth figure (False: report them)
    storage_options: dict = field(default_factory=dict)  # fsspec options for s3:// and other remote runs


# --------------------------------------------------------------------------------------------------------------
# Figures: time, baseline, cost and the per-scope sections


def _pct(saved: float, base: float) -> float | None:
    return 100.0 * saved / base if base else None


def run_timing(run: RunData) -> dict:
    """Return the measured time of ``run``: wall time from run.json invocations, accelerator time from the manifest."""
    accel = float(sum(r["model_seconds"] for r in run.manifest))
    inv = run.invocations
    wall = float(sum(float(i.get("wall_seconds") or 0.0) for i in inv))
    images_timed = int(sum(int(i.get("images") or 0) for i in inv))
    resources = run.info.get("resources") or {}
    actors = float(resources.get("actors") or 0)
    gpus = actors * float(resources.get("gpus_per_actor") or 0.0)
    notes = []
    if "invocations" not in run.info:
        notes.append("run.json has no 'invocations' (recorded by `icar embed` from this version on): wall-clock "
                     "throughput is unknown for this run; accelerator time comes from the manifest")
    elif images_timed != run.images:
        notes.append(f"the timed invocations embedded {images_timed} images, the report counts {run.images} "
                     f"(images committed outside the recorded invocations or the period)")
    return {
        "device": run.info.get("device"),
        "precision": run.info.get("precision"),
        "invocations": len(inv),
        "wall_seconds": wall if inv else None,
        "images_timed": images_timed if inv else None,
        "images_per_second_wall": images_timed / wall if wall else None,
        "accelerator_seconds": accel,
        "images_per_accelerator_second": run.images / accel if accel else None,
        "model_actors": actors or None,
        "gpus_reserved": gpus,
        "reserved_gpu_hours": wall * gpus / 3600 if wall and gpus else None,
        # Share of the actors' wall time spent inside the model: low means the accelerators waited for decoding,
        # and model time saved by early exit will not shorten the bill for reserved GPUs.
        "model_busy_share": accel / (wall * actors) if wall and actors else None,
        "notes": notes,
    }


def full_depth_measurement(run: RunData) -> dict | None:
    """Return the measured full-depth time per image of ``run`` if it is a full-depth run with timings, else None."""
    if not run.is_full_depth_run or run.images == 0:
        return None
    t = run_timing(run)
    if not t["accelerator_seconds"]:
        return None
    return {"run": run.url, "model_key": run.model_key, "device": t["device"], "precision": t["precision"],
            "images": run.images, "accelerator_seconds": t["accelerator_seconds"],
            "accelerator_seconds_per_image": t["accelerator_seconds"] / run.images,
            "images_per_second_wall": t["images_per_second_wall"], "scorer_gflops": run.scorer_gflops}


def run_cost(run: RunData, timing: dict, measurements: list[dict], price: float, currency: str) -> dict:
    """Return accelerator-hours and cost of ``run`` as run and at full depth (measured where possible, else estimated).
    """
    accel = timing["accelerator_seconds"]
    spent = float(run.gflops.sum())
    full = run.full_gflops * run.images
    notes: list[str] = []
    realised = None
    if run.is_full_depth_run:
        basis, base_seconds = "measured", accel
        notes.append("MEASURED: this run is itself full depth (fixed router at the last exit)")
    else:
        same = [m for m in measurements if m["model_key"] == run.model_key and m["run"] != run.url]
        usable = [m for m in same if (m["device"], m["precision"]) == (timing["device"], timing["precision"])]
        if usable:
            m = max(usable, key=lambda m: m["images"])  # the largest measurement is the least noisy
            basis = "measured"
            base_seconds = run.images * m["accelerator_seconds_per_image"]
            notes.append(f"MEASURED: {run.images} images x {m['accelerator_seconds_per_image']:.4g} accelerator-s per "
                         f"image, measured by full-depth run {m['run']} ({m['images']} images, {m['device']}, "
                         f"{m['precision']})")
            if m["scorer_gflops"]:
                notes.append(f"that baseline run also ran a scorer ({m['scorer_gflops']:.3g} GFLOPs/image), so its "
                             f"time is slightly high; embed baselines with --full-depth --scorer none")
            if spent and accel:
                realised = (base_seconds / accel) / (full / spent)
        elif accel and spent:
            basis = "estimate"
            base_seconds = accel * full / spent
            notes.append(f"ESTIMATE: this run's {accel:.4g} accelerator-s x the GFLOP ratio full depth / spent "
                         f"({full:.6g} / {spent:.6g} = {full / spent:.3f}); assumes accelerator time is proportional "
                         f"to GFLOPs. Measure it: `icar report RUN --compare FULL_DEPTH_RUN` with a run embedded "
                         f"with --full-depth on the same model and device")
            for m in same:
                notes.append(f"full-depth run {m['run']} ran on {m['device']}/{m['precision']}, not "
                             f"{timing['device']}/{timing['precision']}: not used as the baseline")
        else:
            basis, base_seconds = "unavailable", None
            notes.append("no accelerator time recorded (model_seconds are 0): no baseline time")
    hours = accel / 3600
    base_hours = base_seconds / 3600 if base_seconds is not None else None
    saved_hours = base_hours - hours if base_hours is not None else None
    return {
        "price_per_hour": price,
        "currency": currency,
        "accelerator_hours": hours,
        "cost": hours * price,
        "full_depth": {
            "basis": basis,
            "accelerator_hours": base_hours,
            "cost": base_hours * price if base_hours is not None else None,
            "note": "; ".join(notes),
        },
        "saved_hours": saved_hours,
        "saved_cost": saved_hours * price if saved_hours is not None else None,
        "saved_pct": _pct(saved_hours, base_hours) if saved_hours is not None else None,
        # Measured speedup / the speedup the GFLOP ratio allows: 1.0 = every GFLOP saved became time saved.
        "realised_efficiency": realised,
    }


def _sum_costs(costs: list[dict], price: float, currency: str) -> dict:
    """Return the cost figures of several runs added up, with the baseline's basis summarised."""
    hours = sum(c["accelerator_hours"] for c in costs)
    bases = [c["full_depth"] for c in costs]
    kinds = {b["basis"] for b in bases}
    known = [b for b in bases if b["accelerator_hours"] is not None]
    base_hours = sum(b["accelerator_hours"] for b in known) if len(known) == len(bases) and bases else None
    if kinds == {"measured"}:
        basis, note = "measured", "MEASURED for every run (see each run)"
    elif kinds == {"estimate"}:
        basis, note = "estimate", "ESTIMATE for every run: accelerator time scaled by the GFLOP ratio (see each run)"
    elif "unavailable" in kinds:
        basis, note = "unavailable", "some runs have no accelerator time; no total baseline"
    else:
        n_est = sum(b["basis"] == "estimate" for b in bases)
        basis, note = "mixed", f"ESTIMATE for {n_est} of {len(bases)} runs, measured for the rest (see each run)"
    saved = base_hours - hours if base_hours is not None else None
    return {"price_per_hour": price, "currency": currency, "accelerator_hours": hours, "cost": hours * price,
            "full_depth": {"basis": basis, "accelerator_hours": base_hours,
                           "cost": base_hours * price if base_hours is not None else None, "note": note},
            "saved_hours": saved, "saved_cost": saved * price if saved is not None else None,
            "saved_pct": _pct(saved, base_hours) if saved is not None else None, "realised_efficiency": None}


def _sum_timings(timings: list[dict]) -> dict:
    """Return the time figures of several runs added up (wall time is summed per run, not elapsed)."""
    walls = [t["wall_seconds"] for t in timings if t["wall_seconds"] is not None]
    wall = sum(walls) if walls else None
    timed = sum(t["images_timed"] or 0 for t in timings)
    accel = sum(t["accelerator_seconds"] for t in timings)
    reserved = [t["reserved_gpu_hours"] for t in timings if t["reserved_gpu_hours"] is not None]
    devices = sorted({str(t["device"]) for t in timings})
    notes = []
    if len(walls) < len(timings):
        notes.append(f"{len(timings) - len(walls)} of {len(timings)} runs have no recorded wall time")
    if len(timings) > 1:
        notes.append("wall time is the sum of each run's invocations (runs may have overlapped)")
    return {"device": ", ".join(devices), "precision": None, "invocations": sum(t["invocations"] for t in timings),
            "wall_seconds": wall, "images_timed": timed if walls else None,
            "images_per_second_wall": timed / wall if wall else None, "accelerator_seconds": accel,
            "images_per_accelerator_second": None, "model_actors": None, "gpus_reserved": None,
            "reserved_gpu_hours": sum(reserved) if reserved else None, "model_busy_share": None, "notes": notes}


def _section(scope: str, name: str, runs: list[RunData], timings: list[dict], costs: list[dict],
             cfg: ReportConfig) -> dict:
    """Return every figure of one scope (a run, a model's runs, or all runs) from the rows of ``runs``."""
    images = sum(r.images for r in runs)
    exit_layer = np.concatenate([r.exit_layer for r in runs]) if runs else np.zeros(0, np.int16)
    gflops = np.concatenate([r.gflops for r in runs]) if runs else np.zeros(0)
    complexity = np.concatenate([r.complexity for r in runs]) if runs else np.zeros(0, np.float32)
    full_row = np.concatenate([np.full(r.images, r.full_gflops) for r in runs]) if runs else np.zeros(0)
    scorer_row = np.concatenate([np.full(r.images, r.scorer_gflops) for r in runs]) if runs else np.zeros(0)

    spent = float(gflops.sum())
    scorer = float(scorer_row.sum())
    full = float(full_row.sum())
    saved = full - spent
    if abs(saved) <= GFLOP_RTOL * max(full, 1.0):
        saved = 0.0  # rows are float32: a full-depth run must not show a saving of 1e-6 %
    manifest_sum = float(sum(m["gflops"] for r in runs for m in r.manifest))
    recomputed = 0.0
    for r in runs:
        if r.info.get("profiles"):  # profile runs: the audit matched every row to its profile's counted figure
            recomputed += float(r.gflops.sum())
            continue
        depths, counts = np.unique(r.exit_layer, return_counts=True)
        per_exit = r.path_gflops  # the tower to each exit (+ confidence heads on the way, for confidence runs)
        recomputed += sum(int(c) * per_exit.get(int(d), math.nan) for d, c in zip(depths, counts))
        recomputed += r.scorer_gflops * r.images
    agree = gflops_agree(spent, manifest_sum) and gflops_agree(spent, recomputed)

    # Exit mix: count, share and GFLOPs per depth.
    depths, counts = np.unique(exit_layer, return_counts=True)
    per_exit_all: dict[int, float] = {}
    for r in runs:
        for d, g in r.gflops_per_exit.items():
            per_exit_all.setdefault(d, g)
    if any(r.info.get("profiles") for r in runs):
        # Rows routed to profiles spent their merged profile's figure, not the unmerged depth's: the mean the
        # rows themselves carry (less the scorer) is what an image leaving at that depth cost the encoder.
        per_exit_all = {int(d): float((gflops - scorer_row)[exit_layer == d].mean()) for d in depths}
    exit_mix = [{"depth": int(d), "images": int(c), "share": int(c) / images,
                 "encoder_gflops_per_image": per_exit_all.get(int(d)),
                 "gflops": float(gflops[exit_layer == d].sum())} for d, c in zip(depths, counts)]

    # Savings by complexity decile: ten equal-count groups of the scored images, in order of complexity.
    deciles = []
    scored = np.flatnonzero(~np.isnan(complexity))
    ordered = scored[np.argsort(complexity[scored], kind="stable")]
    for i, idx in enumerate(np.array_split(ordered, 10) if ordered.size else []):
        if idx.size == 0:
            continue
        s, f = float(gflops[idx].sum()), float(full_row[idx].sum())
        deciles.append({"decile": i + 1, "complexity_min": float(complexity[idx].min()),
                        "complexity_max": float(complexity[idx].max()), "images": int(idx.size),
                        "mean_exit_layer": float(exit_layer[idx].mean()), "gflops_spent": s,
                        "gflops_full_depth": f, "saved_pct": _pct(f - s, f)})
    unscored = images - scored.size
    if unscored:
        idx = np.flatnonzero(np.isnan(complexity))
        s, f = float(gflops[idx].sum()), float(full_row[idx].sum())
        deciles.append({"decile": None, "complexity_min": None, "complexity_max": None, "images": int(unscored),
                        "mean_exit_layer": float(exit_layer[idx].mean()), "gflops_spent": s,
                        "gflops_full_depth": f, "saved_pct": _pct(f - s, f),
                        "note": "no complexity score (run with --scorer none)"})

    # Savings by input shard.
    by_shard = []
    for k, r in enumerate(runs):
        n = len(r.manifest)
        spent_s = np.bincount(r.row_shard, weights=r.gflops, minlength=n)
        rows_s = np.bincount(r.row_shard, minlength=n)
        depth_s = np.bincount(r.row_shard, weights=r.exit_layer.astype(np.float64), minlength=n)
        for j, m in enumerate(r.manifest):
            f = r.full_gflops * int(rows_s[j])
            by_shard.append({"run": r.url, "run_number": k + 1, "part": m["part"], "output": m["output"],
                             "source": m["source"],
                             "images": int(rows_s[j]), "failed": int(m["errors"]), "gflops_spent": float(spent_s[j]),
                             "gflops_full_depth": f, "saved_pct": _pct(f - float(spent_s[j]), f),
                             "mean_exit_layer": float(depth_s[j] / rows_s[j]) if rows_s[j] else None,
                             "seconds": m["seconds"], "accelerator_seconds": m["model_seconds"],
                             "committed_at": m["committed_at"]})

    # Complexity histogram by exit depth (fixed bins over [0, 1]) and the cumulative GFLOPs curve.
    edges = np.linspace(0.0, 1.0, COMPLEXITY_BINS + 1)
    hist = {str(int(d)): np.histogram(np.clip(complexity[(exit_layer == d) & ~np.isnan(complexity)], 0, 1),
                                      bins=edges)[0].tolist() for d in depths}
    take = np.unique(np.linspace(0, images, min(images, CUMULATIVE_POINTS) + 1).round().astype(int))
    cum_spent = np.concatenate([[0.0], np.cumsum(gflops)])[take]
    cum_full = np.concatenate([[0.0], np.cumsum(full_row)])[take]

    failed_samples = int(sum(m["errors"] for r in runs for m in r.manifest))
    failed_shards = [dict(f, run=r.url) for r in runs for f in r.failed_shards]
    by_stage: Counter = Counter()
    for r in runs:
        by_stage.update(r.errors_by_stage)
    stamps = sorted(m["committed_at"] for r in runs for m in r.manifest)
    started = sorted(i["started"] for r in runs for i in r.invocations if i.get("started"))
    finished = sorted(i["finished"] for r in runs for i in r.invocations if i.get("finished"))
    models = {r.model_key: r.info.get("model") or {} for r in runs}

    time = timings[0] if len(timings) == 1 else _sum_timings(timings)
    cost = costs[0] if len(costs) == 1 else _sum_costs(costs, cfg.gpu_hour_price, cfg.currency)
    if images and time["accelerator_seconds"]:
        time = dict(time, images_per_accelerator_second=images / time["accelerator_seconds"])
    section = {
        "scope": scope,
        "name": name,
        "runs": [r.url for r in runs],
        "models": [{"key": k, "label": model_label(v), "identity": v} for k, v in models.items()],
        "period": {"first_committed": stamps[0] if stamps else None,
                   "last_committed": stamps[-1] if stamps else None,
                   "first_started": started[0] if started else None,
                   "last_finished": finished[-1] if finished else None},
        "images": images,
        "failed": {"samples": failed_samples, "input_shards": len(failed_shards), "by_stage": dict(by_stage),
                   "failed_input_shards": failed_shards},
        "gflops": {
            "spent": spent, "scorer": scorer, "encoder": spent - scorer, "full_depth": full,
            "saved": saved, "saved_pct": _pct(saved, full),
            "spent_per_image": spent / images if images else None,
            "full_depth_per_image": full / images if images else None,
            "baseline": "every image through exits[-1] blocks (gflops_per_exit of the last exit), no scorer",
            # Every run scored its images but none routed by the score (run.json "routes_by_score", written since
            # 2026-12; older runs do not say, and read as routed): the scorer's GFLOPs bought calibration data only.
            "scored_not_routed": bool(runs) and all(r.info.get("routes_by_score") is False and r.scorer_gflops > 0
                                                    for r in runs),
        },
        "exit_mix": exit_mix,
        "by_complexity_decile": deciles,
        "by_shard": by_shard,
        "complexity_histogram": {"edges": edges.round(4).tolist(), "counts_by_exit": hist,
                                 "scored_images": int(scored.size)},
        "cumulative": {"images": take.tolist(), "gflops_spent": cum_spent.tolist(),
                       "gflops_full_depth": cum_full.tolist()},
        "time": time,
        "cost": cost,
        "audit": {
            "status": "passed" if agree and all(r.audit["status"] == "passed" for r in runs) else "FAILED",
            "gflops_rows": spent, "gflops_manifest": manifest_sum, "gflops_recomputed": recomputed,
            "agree": agree, "row_violations": sum(r.audit["row_violations"] for r in runs),
        },
    }
    if len(runs) == 1:
        r = runs[0]
        section["run_config"] = {"exits": r.exits, "gflops_per_exit": r.gflops_per_exit,
                                 "scorer_gflops": r.scorer_gflops, "scorer": r.info.get("scorer"),
                                 "router": r.info.get("router"), "device": r.info.get("device"),
                                 "precision": r.info.get("precision"), "full_depth_run": r.is_full_depth_run,
                                 "num_blocks": (r.info.get("model") or {}).get("num_blocks")}
        section["audit"].update({k: v for k, v in r.audit.items() if k not in section["audit"]})
    return section


def _compare(a_runs: list[RunData], a: dict, b_run: RunData, b: dict) -> dict:
    """Return runs A (the report's) and B (--compare) side by side, and how many images they share."""
    a_keys = set().union(*(set(r.keys or []) for r in a_runs))
    b_keys = set(b_run.keys or [])

    def figures(s: dict) -> dict:
        n = s["images"] or 0
        t, c, g = s["time"], s["cost"], s["gflops"]
        return {
            "images": n,
            "gflops_per_image": g["spent_per_image"],
            "saved_pct_vs_full_depth": g["saved_pct"],
            "accelerator_ms_per_image": 1000 * t["accelerator_seconds"] / n if n and t["accelerator_seconds"] else None,
            "images_per_second_wall": t["images_per_second_wall"],
            "cost_per_million_images": c["cost"] / n * 1e6 if n else None,
            "mean_exit_layer": sum(e["depth"] * e["images"] for e in s["exit_mix"]) / n if n else None,
        }

    fa, fb = figures(a), figures(b)
    units = {"images": "images", "gflops_per_image": "GFLOPs", "saved_pct_vs_full_depth": "%",
             "accelerator_ms_per_image": "ms", "images_per_second_wall": "images/s",
             "cost_per_million_images": a["cost"]["currency"], "mean_exit_layer": "blocks"}
    rows = [{"metric": k, "unit": units[k], "a": fa[k], "b": fb[k],
             "b_over_a": fb[k] / fa[k] if fa[k] not in (None, 0) and fb[k] is not None else None} for k in fa]
    depths = sorted({e["depth"] for e in a["exit_mix"]} | {e["depth"] for e in b["exit_mix"]})
    share = (lambda s, d: next((e["share"] for e in s["exit_mix"] if e["depth"] == d), 0.0))
    same_model = {m["key"] for m in a["models"]} == {b_run.model_key}
    return {
        "a": {"runs": a["runs"], "label": "this report's run" + ("s" if len(a["runs"]) > 1 else "")},
        "b": {"runs": [b_run.url], "label": "compared run", "full_depth_run": b_run.is_full_depth_run},
        "same_model": same_model,
        "common_images": len(a_keys & b_keys),
        "images_only_in_a": len(a_keys - b_keys),
        "images_only_in_b": len(b_keys - a_keys),
        "metrics": rows,
        "exit_mix": {"depths": depths, "a": [share(a, d) for d in depths], "b": [share(b, d) for d in depths]},
        "b_section": b,
    }


def build_report(runs: Sequence[str], config: ReportConfig | None = None) -> dict:
    """Return the cost report of ``runs`` (run directory URLs) as a JSON-ready dict; raise AuditError on bad runs.

    Runs are grouped per model (name + weights hash); totals add every run up. With ``config.compare`` the
    compared run is shown side by side and, when it is a full-depth run of the same model on the same device,
    it is the measured baseline for the others.
    """
    cfg = config or ReportConfig()
    if not runs:
        raise ValueError("no run directories given: pass one or more RUN paths or URLs")
    if cfg.gpu_hour_price < 0:
        raise ValueError(f"--gpu-hour-price must be >= 0, got {cfg.gpu_hour_price}")
    urls = list(dict.fromkeys(r.rstrip("/") or r for r in runs))
    with_keys = cfg.compare is not None
    loaded = [load_run(u, cfg.storage_options, cfg.since, cfg.until, cfg.strict, with_keys) for u in urls]
    b_run = (load_run(cfg.compare, cfg.storage_options, cfg.since, cfg.until, cfg.strict, True)
             if cfg.compare else None)
    loaded.sort(key=lambda r: (r.manifest[0]["committed_at"] if r.manifest else "", r.url))

    measurements = [m for m in map(full_depth_measurement, loaded + ([b_run] if b_run else [])) if m]
    timings = {r.url: run_timing(r) for r in loaded}
    costs = {r.url: run_cost(r, timings[r.url], measurements, cfg.gpu_hour_price, cfg.currency) for r in loaded}

    def section(scope, name, rs):
        return _section(scope, name, rs, [timings[r.url] for r in rs], [costs[r.url] for r in rs], cfg)

    run_sections = [section("run", r.url, [r]) for r in loaded]
    groups: dict[str, list[RunData]] = {}
    for r in loaded:
        groups.setdefault(r.model_key, []).append(r)
    model_sections = [section("model", model_label(rs[0].info.get("model") or {}), rs) for rs in groups.values()]
    total = section("all", "all runs", loaded)
    if len(groups) > 1:
        # Depths of different models are different things: the all-runs exit mix would mislead, so drop it.
        total["exit_mix"] = []
        total["by_complexity_decile"] = []
        total["note"] = f"{len(groups)} models: exit mix and complexity figures are per model"

    report = {
        "format": REPORT_FORMAT,
        "generated_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "icar_version": __version__,
        "config": {"runs": urls, "gpu_hour_price": cfg.gpu_hour_price, "currency": cfg.currency,
                   "compare": cfg.compare, "since": cfg.since, "until": cfg.until, "strict": cfg.strict},
        "definitions": {
            "gflops": "counted once per model with torch FlopCounterMode (a multiply-add = 2 FLOPs); each row "
                      "records scorer + image-tower GFLOPs spent on that image; text-tower GFLOPs are per query",
            "full_depth": "the same images through every block of the image tower (exits[-1]), no scorer",
            "accelerator_hours": "time inside the model actors (scorer + encoder), summed over shards, from the "
                                 "manifest's model_seconds; priced at gpu_hour_price",
            "reserved_gpu_hours": "wall time of each `icar embed` invocation x GPUs reserved for model actors",
            "estimate": "a full-depth figure not measured on a full-depth run: this run's accelerator time x "
                        "(full-depth GFLOPs / spent GFLOPs)",
        },
        "totals": total,
        "models": model_sections,
        "runs": run_sections,
        "compare": None,
        "audit": {
            "status": "passed" if all(s["audit"]["status"] == "passed" for s in run_sections) else "FAILED",
            "runs": {s["name"]: s["audit"] for s in run_sections},
        },
    }
    if b_run is not None:
        b_timing = run_timing(b_run)
        b_cost = run_cost(b_run, b_timing, measurements, cfg.gpu_hour_price, cfg.currency)
        b_section = _section("run", b_run.url, [b_run], [b_timing], [b_cost], cfg)
        report["compare"] = _compare(loaded, total, b_run, b_section)
    return report



def write_report(report: dict, output: str, storage_options: dict | None = None) -> dict[str, str]:
    """Write report.json, report.csv and report.html into ``output`` (atomically); return {kind: URL}."""
    storage.makedirs(output, storage_options)
    urls = {k: storage.join(output, f"report.{k}") for k in ("json", "csv", "html")}
    storage.write_json(report, urls["json"], storage_options)
    storage.atomic_write_bytes(urls["csv"], render_csv(report).encode(), storage_options)
    storage.atomic_write_bytes(urls["html"], render_html(report).encode(), storage_options)
    return urls
