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

import csv
import datetime as dt
import html
import io
import json
import logging
import math
import posixpath
import re
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from . import __version__, storage
from .schema import ERROR_DIR, MANIFEST, RUN_JSON, SHARD_DIR, part_name
from .shards import RunStateError

log = logging.getLogger(__name__)

REPORT_FORMAT = 1  # version of report.json
SHARD_COLUMNS = ["source", "complexity", "exit_layer", "gflops"]
COMPLEXITY_BINS = 20  # bins of the complexity histogram over [0, 1]
CUMULATIVE_POINTS = 300  # points kept of the cumulative GFLOPs curve (the JSON stays small for any run size)
MAX_SHARD_BARS = 80  # above this many shards the per-shard chart becomes a histogram of shard savings
MAX_LISTED_PROBLEMS = 20  # audit problems named in an error message (the count is always given)
# Relative tolerance between GFLOP sums computed in different orders / precisions: rows are float32, so one
# depth's figure may differ from run.json's float64 by ~6e-8 relative; anything above 1e-6 is a real mismatch.
GFLOP_RTOL = 1e-6


class AuditError(RunStateError):
    """A run's files disagree with each other, so its totals cannot be trusted: the report refuses it."""


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


@dataclass
class RunData:
    """One run directory, read and audited: the rows of its committed shards and what run.json says."""

    url: str  # the run directory
    info: dict  # run.json
    manifest: list[dict]  # manifest rows of the shards in the report period, in part order
    complexity: np.ndarray  # float32 per row, NaN where no scorer ran
    exit_layer: np.ndarray  # int16 per row
    gflops: np.ndarray  # float64 per row: scorer + encoder GFLOPs recorded for the image
    row_shard: np.ndarray  # int32 per row: index into `manifest`
    keys: list[str] | None  # sample keys (read only when a comparison needs them)
    failed_shards: list[dict]  # input shards that failed as a whole: {source, part, message}
    errors_by_stage: dict[str, int]  # failed samples per stage (read, decode, model, shard)
    invocations: list[dict]  # run.json "invocations" in the report period
    audit: dict  # what was checked and the three GFLOP totals

    @property
    def exits(self) -> list[int]:
        return [int(e) for e in self.info["exits"]]

    @property
    def full_depth(self) -> int:
        return self.exits[-1]

    @property
    def gflops_per_exit(self) -> dict[int, float]:
        return {int(k): float(v) for k, v in self.info["gflops_per_exit"].items()}

    @property
    def scorer_gflops(self) -> float:
        return float(self.info.get("scorer_gflops") or 0.0)

    @property
    def full_gflops(self) -> float:
        """Return the full-depth baseline per image: the last exit's GFLOPs, no scorer."""
        return self.gflops_per_exit[self.full_depth]

    @property
    def model_key(self) -> str:
        return model_key(self.info.get("model") or {})

    @property
    def images(self) -> int:
        return int(self.exit_layer.size)

    @property
    def is_full_depth_run(self) -> bool:
        """Return True for a run whose router sent every image to the last exit (a full-depth baseline)."""
        router = self.info.get("router") or {}
        fixed = router.get("kind") == "fixed" and int(router.get("depth", -1)) == self.full_depth
        return fixed and bool(np.all(self.exit_layer == self.full_depth))


def model_key(identity: dict) -> str:
    """Return the key that groups runs of one model (name + weights hash), as pipeline.models defines it."""
    try:
        from .models import model_key as key_of
    except ModuleNotFoundError as e:
        if e.name != "pipeline.models":
            raise
        return f"{identity.get('name')}:{identity.get('weights_sha256')}"  # the same definition until models.py lands
    return key_of(identity)


def model_label(identity: dict) -> str:
    """Return a short human name for a model: name, pretrained tag and the first hex digits of its weights hash."""
    name = identity.get("name") or "unknown model"
    tag = identity.get("pretrained")
    sha = (identity.get("weights_sha256") or "")[:10]
    parts = [str(name)]
    if tag and str(tag).lower() != "none":
        parts.append(str(tag))
    if sha:
        parts.append(f"weights {sha}")
    return " / ".join(parts)


# --------------------------------------------------------------------------------------------------------------
# Reading and auditing one run


def parse_time(text: str | None, what: str) -> dt.datetime | None:
    """Return ``text`` (ISO-8601 date or date-time, UTC when no zone is given) as an aware datetime."""
    if text is None:
        return None
    try:
        value = dt.datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{what} {text!r} is not an ISO-8601 date or time; use e.g. 2026-01-01 or "
                         f"2026-01-01T12:00:00+00:00") from None
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)


def _in_period(stamp: str | None, since: dt.datetime | None, until: dt.datetime | None) -> bool:
    if since is None and until is None:
        return True
    t = parse_time(stamp, "timestamp")
    if t is None:
        return False
    return (since is None or t >= since) and (until is None or t < until)


def _list_parts(run: str, folder: str, storage_options: dict) -> dict[str, str]:
    """Return {file name: URL} of the Parquet files in RUN/folder (temporary files of atomic writes excluded)."""
    fs, path = storage.filesystem(storage.join(run, folder), storage_options)
    if hasattr(fs, "invalidate_cache"):
        fs.invalidate_cache(path)  # object-store listings are cached; an audit must see the files as they are now
    if not fs.exists(path):
        return {}
    out = {}
    for f in fs.ls(path, detail=False):
        name = f.rstrip("/").rsplit("/", 1)[-1]
        # ".part-N.parquet.tmp-<uuid>": a write in progress (or a killed writer's leftover), never a shard.
        if name.endswith(".parquet") and not name.startswith("."):
            out[name] = storage.join(run, folder, name)
    return out


def _read_run_json(run: str, storage_options: dict) -> dict:
    url = storage.join(run, RUN_JSON)
    if not storage.exists(url, storage_options):
        raise AuditError(f"{run} is not a run directory: {RUN_JSON} is missing (it is written by `icar embed`)")
    info = storage.read_json(url, storage_options)
    missing = [k for k in ("exits", "gflops_per_exit", "model") if k not in info]
    if missing:
        raise AuditError(f"{url} lacks {', '.join(missing)}: the report cannot price this run; re-run `icar embed` "
                         f"with a current version to rewrite it")
    absent = [e for e in info["exits"] if str(e) not in info["gflops_per_exit"]]
    if absent:
        raise AuditError(f"{url}: gflops_per_exit has no figure for exit(s) {absent} of exits {info['exits']}")
    return info


def _read_manifest(run: str, storage_options: dict) -> list[dict]:
    url = storage.join(run, MANIFEST)
    if not storage.exists(url, storage_options):
        raise AuditError(f"{run} has no {MANIFEST}: no shard was ever committed, so there is nothing to report "
                         f"(run `icar embed ... --output {run}` first)")
    rows = storage.read_parquet(url, storage_options).to_pylist()
    return sorted(rows, key=lambda r: r["part"])


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=GFLOP_RTOL, abs_tol=1e-6)


def _map_in_order(fn, items: list, workers: int):
    """Yield fn(item) for each item in order, at most ``2 * workers`` in flight (bounded memory, overlapped I/O)."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque = deque()
        it = iter(items)
        for item in it:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def load_run(run: str, storage_options: dict | None = None, since: str | None = None, until: str | None = None,
             strict: bool = True, with_keys: bool = False) -> RunData:
    """Return run ``run`` read and audited; raise AuditError when its files disagree (listing every problem).

    The audit covers all committed shards; ``since``/``until`` then select shards by their commit time.
    """
    so = dict(storage_options or {})
    run = run.rstrip("/") or run
    t_since, t_until = parse_time(since, "--since"), parse_time(until, "--until")
    info = _read_run_json(run, so)
    manifest = _read_manifest(run, so)
    exits = [int(e) for e in info["exits"]]
    per_exit = {int(k): float(v) for k, v in info["gflops_per_exit"].items()}
    scorer = float(info.get("scorer_gflops") or 0.0)
    problems: list[str] = []

    for col, what in (("source", "input shard"), ("output", "output file"), ("part", "part number")):
        dup = [v for v, n in Counter(r[col] for r in manifest).items() if n > 1]
        if dup:
            problems.append(f"{MANIFEST} lists the same {what} more than once: {dup[:5]}")
    for r in manifest:
        expected = f"{SHARD_DIR}/{part_name(r['part'])}"
        if r["output"] != expected:
            problems.append(f"{MANIFEST} row of part {r['part']} names output {r['output']!r}, expected {expected!r}")

    shard_files = _list_parts(run, SHARD_DIR, so)
    error_files = _list_parts(run, ERROR_DIR, so)
    listed = {posixpath.basename(r["output"]): r for r in manifest}
    for name in sorted(set(listed) - set(shard_files)):
        problems.append(f"{SHARD_DIR}/{name} is listed in {MANIFEST} ({listed[name]['rows']} rows of "
                        f"{listed[name]['source']}) but the file is missing")
    for name in sorted(set(shard_files) - set(listed)):
        problems.append(f"{SHARD_DIR}/{name} exists but is not in {MANIFEST} (a shard committed by an interrupted "
                        f"or still running `icar embed`; re-run it with the same arguments to finish, which "
                        f"removes or redoes such shards)")

    present = [r for r in manifest if posixpath.basename(r["output"]) in shard_files]
    columns = SHARD_COLUMNS + (["key"] if with_keys else [])

    def read(r):
        return r, storage.read_parquet(shard_files[posixpath.basename(r["output"])], so, columns)

    # Each shard is checked against its manifest row as it arrives and kept only as compact arrays
    # (exit_layer, gflops, complexity: 14 bytes a row), so memory does not hold whole tables.
    lookup = np.full(max(list(per_exit) + [0]) + 1, np.nan, np.float32)
    for d, g in per_exit.items():
        lookup[d] = np.float32(g + scorer)  # what the worker records: float32(gflops_per_exit + scorer)
    rows_of: dict[int, dict] = {}
    manifest_gflops = rows_gflops = 0.0
    violations: list[dict] = []
    n_violations = 0
    counts_all: Counter = Counter()
    workers = 1 if storage.is_local(storage.filesystem(run, so)[0]) else 8  # object stores: overlap round trips
    for r, t in _map_in_order(read, present, workers):
        where = r["output"]
        n = t.num_rows
        ex = t.column("exit_layer").to_numpy(zero_copy_only=False).astype(np.int16)
        g32 = t.column("gflops").to_numpy(zero_copy_only=False).astype(np.float32)
        g = g32.astype(np.float64)
        if n != r["rows"]:
            problems.append(f"{where} has {n} rows but {MANIFEST} records {r['rows']}")
        if not _close(float(g.sum()), float(r["gflops"])):
            problems.append(f"{where}: its rows' gflops sum to {g.sum():.6f} but {MANIFEST} records {r['gflops']:.6f}")
        manifest_gflops += float(r["gflops"])
        rows_gflops += float(g.sum())
        depths, counts = np.unique(ex, return_counts=True)
        seen = {str(int(d)): int(c) for d, c in zip(depths, counts)}
        counts_all.update({int(d): int(c) for d, c in zip(depths, counts)})
        recorded = {str(k): int(v) for k, v in json.loads(r["exit_counts"] or "{}").items()}
        if seen != recorded:
            problems.append(f"{where}: exit counts {seen} differ from {MANIFEST}'s {recorded}")
        if not _close(float(r["scorer_gflops"]), scorer * n):
            problems.append(f"{where}: {MANIFEST} records {r['scorer_gflops']:.6f} scorer GFLOPs, but {n} rows "
                            f"x {scorer} (run.json scorer_gflops) = {scorer * n:.6f}")
        sources = set(t.column("source").unique().to_pylist())
        if sources - {r["source"]}:
            problems.append(f"{where}: rows name input shard(s) {sorted(sources)[:3]} but {MANIFEST} says "
                            f"{r['source']!r}")
        # Per-row check against the cost model: each row spent exactly its exit's figure (+ scorer).
        known = (ex >= 0) & (ex < lookup.size)
        expected = np.full(n, np.nan, np.float32)
        expected[known] = lookup[ex[known]]
        bad = np.flatnonzero(~np.isclose(g32, expected, rtol=GFLOP_RTOL, atol=1e-6))
        n_violations += bad.size
        for k in bad[: max(0, MAX_LISTED_PROBLEMS - len(violations))]:
            violations.append({"shard": where, "row": int(k), "exit_layer": int(ex[k]), "gflops": float(g32[k]),
                               "expected": None if np.isnan(expected[k]) else float(expected[k])})
        cx = t.column("complexity").to_numpy(zero_copy_only=False)
        rows_of[r["part"]] = {"exit_layer": ex, "gflops": g, "complexity": np.asarray(cx, dtype=np.float32),
                              "keys": t.column("key").to_pylist() if with_keys else None}

    # Failed samples of committed shards are in errors/ under the shard's part name; a file for a part that is
    # not committed records an input shard that failed as a whole (stage "shard").
    by_part = {posixpath.basename(r["output"]): r for r in manifest}
    stages_of: dict[str, list[str]] = {}
    failed_shards: list[dict] = []
    committed_sources = {r["source"] for r in manifest}
    for name, url in sorted(error_files.items()):
        et = storage.read_parquet(url, so, ["key", "source", "stage", "error"])
        r = by_part.get(name)
        if r is not None:
            if et.num_rows != r["errors"]:
                problems.append(f"{ERROR_DIR}/{name} has {et.num_rows} failed samples but {MANIFEST} records "
                                f"{r['errors']}")
            stages_of[name] = et.column("stage").to_pylist()
            continue
        stages = set(et.column("stage").to_pylist())
        if stages != {"shard"}:
            problems.append(f"{ERROR_DIR}/{name} holds failed samples ({sorted(stages)}) of part {name} whose shard is "
                            f"not committed (an interrupted commit; re-run `icar embed` with the same arguments)")
            continue
        for row in et.to_pylist():
            if row["source"] in committed_sources:
                continue  # an earlier failure of an input shard that a later invocation committed
            failed_shards.append({"source": row["source"], "part": name, "message": row["error"]})
    for name, r in by_part.items():
        if r["errors"] and name not in error_files:
            problems.append(f"{MANIFEST} records {r['errors']} failed samples for part {r['part']} but "
                            f"{ERROR_DIR}/{name} is missing")

    if problems:
        listed_problems = "\n  - ".join(problems[:MAX_LISTED_PROBLEMS])
        more = f"\n  ... and {len(problems) - MAX_LISTED_PROBLEMS} more" if len(problems) > MAX_LISTED_PROBLEMS else ""
        raise AuditError(f"refusing to report {run}: its manifest and shard files disagree in {len(problems)} "
                         f"place(s), so its totals cannot be trusted:\n  - {listed_problems}{more}")

    unknown_depths = sorted(set(counts_all) - set(per_exit))
    recomputed = sum(c * per_exit.get(d, math.nan) for d, c in counts_all.items()) + scorer * sum(counts_all.values())
    if n_violations and strict:
        shown = "\n  - ".join(f"{v['shard']} row {v['row']}: exit_layer {v['exit_layer']} recorded {v['gflops']:.6g} "
                              f"GFLOPs, run.json says {v['expected']}" for v in violations)
        raise AuditError(
            f"refusing to report {run}: {n_violations} row(s) recorded GFLOPs that differ from run.json's "
            f"gflops_per_exit for their exit_layer + scorer_gflops ({scorer})"
            + (f"; exit depths {unknown_depths} are not in exits {exits}" if unknown_depths else "")
            + f":\n  - {shown}\n(pass --allow-gflops-mismatch to report them anyway, marked FAILED)")

    chosen = [r for r in manifest if _in_period(r["committed_at"], t_since, t_until)]
    arrays: dict[str, list] = {"complexity": [], "exit_layer": [], "gflops": [], "row_shard": [], "keys": []}
    errors_by_stage: Counter = Counter()
    for j, r in enumerate(chosen):
        rows = rows_of.pop(r["part"])
        for k in ("complexity", "exit_layer", "gflops"):
            arrays[k].append(rows[k])
        arrays["row_shard"].append(np.full(rows["exit_layer"].size, j, np.int32))
        if with_keys:
            arrays["keys"].extend(rows["keys"])
        errors_by_stage.update(stages_of.get(posixpath.basename(r["output"]), []))
    if failed_shards:
        errors_by_stage["shard"] += len(failed_shards)

    cat = (lambda xs, dtype: np.concatenate(xs).astype(dtype) if xs else np.zeros(0, dtype))
    invocations = [i for i in info.get("invocations") or [] if _in_period(i.get("started"), t_since, t_until)]
    status = "FAILED" if n_violations else "passed"
    audit = {
        "status": status,
        "shards": len(manifest),
        "rows": int(sum(counts_all.values())),
        "gflops_rows": rows_gflops,
        "gflops_manifest": manifest_gflops,
        "gflops_recomputed": recomputed,
        "max_difference": max(abs(rows_gflops - manifest_gflops), abs(rows_gflops - recomputed)),
        "row_violations": n_violations,
        "violation_examples": violations,
        "unknown_exit_depths": unknown_depths,
        "checks": [
            f"every shard file listed in {MANIFEST} exists and no other shard file does",
            "row counts, GFLOP sums, scorer GFLOPs and exit counts of every shard equal the manifest's",
            "failed-sample files match the manifest's error counts",
            "every row's gflops equals run.json gflops_per_exit[exit_layer] + scorer_gflops",
            "total GFLOPs: rows = manifest = per-depth counts x gflops_per_exit + images x scorer_gflops",
        ],
    }
    if since or until:
        audit["period_note"] = (f"the audit covers all {len(manifest)} committed shards; the report counts the "
                                f"{len(chosen)} committed in the period")
    return RunData(url=run, info=info, manifest=chosen, complexity=cat(arrays["complexity"], np.float32),
                   exit_layer=cat(arrays["exit_layer"], np.int16), gflops=cat(arrays["gflops"], np.float64),
                   row_shard=cat(arrays["row_shard"], np.int32), keys=arrays["keys"] if with_keys else None,
                   failed_shards=failed_shards, errors_by_stage=dict(errors_by_stage), invocations=invocations,
                   audit=audit)


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
        depths, counts = np.unique(r.exit_layer, return_counts=True)
        per_exit = r.gflops_per_exit
        recomputed += sum(int(c) * per_exit.get(int(d), math.nan) for d, c in zip(depths, counts))
        recomputed += r.scorer_gflops * r.images
    agree = _close(spent, manifest_sum) and _close(spent, recomputed)

    # Exit mix: count, share and GFLOPs per depth.
    depths, counts = np.unique(exit_layer, return_counts=True)
    per_exit_all: dict[int, float] = {}
    for r in runs:
        for d, g in r.gflops_per_exit.items():
            per_exit_all.setdefault(d, g)
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


# --------------------------------------------------------------------------------------------------------------
# Text: the one-line summary and the readable summary


def _num(x: float | None, digits: int = 1) -> str:
    """Return a GFLOP-like figure with thousands separators ('-' when unknown)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:,.{digits if abs(x) < 1e6 else 0}f}"


def _sig(x: float | None, digits: int = 3) -> str:
    """Return ``x`` with about ``digits`` significant digits, keeping whole numbers whole ('-' when unknown)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if abs(x) >= 10 ** digits:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}" if x else "0"


def _money(x: float | None, currency: str) -> str:
    if x is None:
        return "-"
    if abs(x) >= 100:
        text = f"{x:,.0f}"
    elif abs(x) >= 1:
        text = f"{x:,.2f}"
    else:
        text = _sig(x, 3)
    return f"{text} {currency}".strip()


def _when(stamp: str | None) -> str:
    """Return an ISO-8601 time stamp as 'YYYY-MM-DD HH:MM UTC' for people ('-' when unknown)."""
    if not stamp:
        return "-"
    t = parse_time(stamp, "time stamp").astimezone(dt.timezone.utc)
    return t.strftime("%Y-%m-%d %H:%M UTC")


def _saved_phrase(pct: float | None) -> str:
    if pct is None:
        return "no baseline"
    return f"{pct:.1f}% saved" if pct >= 0 else f"{-pct:.1f}% MORE than full depth"


def summary_line(report: dict) -> str:
    """Return the one-line summary of a report, e.g. for the end of `icar embed`.

    "36 images, 2 failed; 118.3 GFLOPs vs 317.5 at full depth: 62.7% saved; exits 6:12 9:10 12:14"
    """
    t = report["totals"]
    g = t["gflops"]
    failed = t["failed"]
    text = f"{t['images']} images, {failed['samples']} failed"
    if failed["input_shards"]:
        text += f" (+{failed['input_shards']} input shard{'s' if failed['input_shards'] != 1 else ''} failed)"
    text += f"; {_num(g['spent'])} GFLOPs vs {_num(g['full_depth'])} at full depth: {_saved_phrase(g['saved_pct'])}"
    if t["exit_mix"]:
        text += "; exits " + " ".join(f"{e['depth']}:{e['images']}" for e in t["exit_mix"])
    if report["audit"]["status"] != "passed":
        text += f"; AUDIT FAILED ({t['audit']['row_violations']} rows disagree with run.json)"
    return text


def _section_text(s: dict, indent: str = "  ") -> list[str]:
    g, t, c, f = s["gflops"], s["time"], s["cost"], s["failed"]
    cur = c["currency"]
    lines = []
    stages = ", ".join(f"{k} {v}" for k, v in sorted(f["by_stage"].items())) or "none"
    lines.append(f"{indent}images   {s['images']:,} embedded; {f['samples']:,} samples failed, "
                 f"{f['input_shards']} input shard(s) failed (by stage: {stages})")
    lines.append(f"{indent}GFLOPs   {_num(g['spent'])} spent (scorer {_num(g['scorer'])} + encoder "
                 f"{_num(g['encoder'])}) "
                 f"vs {_num(g['full_depth'])} at full depth")
    lines.append(f"{indent}         saved {_num(g['saved'])} GFLOPs: {_saved_phrase(g['saved_pct'])} "
                 f"({_sig(g['spent_per_image'])} vs {_sig(g['full_depth_per_image'])} GFLOPs per image)")
    if s["exit_mix"]:
        lines.append(f"{indent}exits    " + "   ".join(f"{e['depth']}: {e['images']:,} ({100 * e['share']:.1f}%)"
                                                      for e in s["exit_mix"]))
    wall = (f"{_sig(t['wall_seconds'])} s wall over {t['invocations']} invocation(s) "
            f"({_sig(t['images_per_second_wall'])} images/s)") if t["wall_seconds"] else "wall time not recorded"
    lines.append(f"{indent}time     {wall}; {_sig(t['accelerator_seconds'])} accelerator-s "
                 f"({_sig(t['images_per_accelerator_second'])} images/s) on {t['device']}")
    fd = c["full_depth"]
    lines.append(f"{indent}cost     {_sig(c['accelerator_hours'])} accelerator-h = {_money(c['cost'], cur)} as run; "
                 f"full depth {_sig(fd['accelerator_hours'])} h = {_money(fd['cost'], cur)} ({fd['basis'].upper()})")
    if c["saved_hours"] is not None:
        lines.append(f"{indent}         saved {_sig(c['saved_hours'])} h = {_money(c['saved_cost'], cur)} "
                     f"({_saved_phrase(c['saved_pct'])})"
                     + (f"; realised efficiency {c['realised_efficiency']:.2f} (measured speedup / GFLOP-ratio "
                        f"speedup)"
                        if c["realised_efficiency"] is not None else ""))
    if fd["note"]:
        lines.append(f"{indent}         {fd['note']}")
    for note in t["notes"]:
        lines.append(f"{indent}note     {note}")
    a = s["audit"]
    lines.append(f"{indent}audit    {a['status']}: GFLOPs from rows {_num(a['gflops_rows'], 3)} = manifest "
                 f"{_num(a['gflops_manifest'], 3)} = per-depth counts x run.json {_num(a['gflops_recomputed'], 3)}"
                 + (f"; {a['row_violations']} rows disagree with run.json" if a["row_violations"] else ""))
    return lines


def render_text(report: dict) -> str:
    """Return the readable summary printed by `icar report`."""
    cfg = report["config"]
    n_runs, n_models = len(report["runs"]), len(report["models"])
    plural = (lambda n, word: f"{n} {word}{'s' if n != 1 else ''}")
    head = (f"ICAR cost report: {plural(n_runs, 'run')}, {plural(n_models, 'model')}; "
            f"price {cfg['gpu_hour_price']:g} {cfg['currency']} per accelerator-hour")
    if cfg["since"] or cfg["until"]:
        head += f"; shards committed {cfg['since'] or '...'} to {cfg['until'] or '...'}"
    out = [head]
    sections = report["runs"] if n_runs == 1 else report["models"]
    for s in sections:
        label = s["name"] if s["scope"] == "run" else \
            f"model {s['name']} ({len(s['runs'])} run{'s' if len(s['runs']) != 1 else ''})"
        model = f"  [{s['models'][0]['label']}]" if s["scope"] == "run" else ""
        p = s["period"]
        when = f"  committed {_when(p['first_committed'])} .. {_when(p['last_committed'])}"
        out += ["", f"{label}{model}{when}"] + _section_text(s)
    if n_runs > 1:
        out += ["", "runs"]
        cur = report["totals"]["cost"]["currency"]
        for s in report["runs"]:
            g, c = s["gflops"], s["cost"]
            out.append(f"  {s['name']}  [{s['models'][0]['label']}]  {s['images']:,} images, "
                       f"{s['failed']['samples']:,} failed; {_num(g['spent'])} vs {_num(g['full_depth'])} GFLOPs: "
                       f"{_saved_phrase(g['saved_pct'])}; "
                       f"{_money(c['cost'], cur)} vs {_money(c['full_depth']['cost'], cur)} at full depth "
                       f"({c['full_depth']['basis']}); audit {s['audit']['status']}")
        out += ["", "all runs"] + _section_text(report["totals"])
    comp = report["compare"]
    if comp:
        out += ["", f"compare: {', '.join(comp['a']['runs'])} (A) vs {comp['b']['runs'][0]} (B)"
                    + (" [B is a full-depth run]" if comp["b"]["full_depth_run"] else ""),
                f"  images in common {comp['common_images']:,}, only in A {comp['images_only_in_a']:,}, "
                f"only in B {comp['images_only_in_b']:,}" + ("" if comp["same_model"] else "; DIFFERENT MODELS")]
        for m in comp["metrics"]:
            ratio = f"  (B/A {m['b_over_a']:.2f})" if m["b_over_a"] is not None else ""
            out.append(f"  {m['metric']:<26} A {_sig(m['a'], 4):>10}   B {_sig(m['b'], 4):>10} {m['unit']}{ratio}")
    out += ["", "summary: " + summary_line(report)]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------------------
# CSV: flat rows a spreadsheet takes as is


def report_csv_rows(report: dict) -> list[dict]:
    """Return the report as flat rows: scope, metric, value, unit, note."""
    rows: list[dict] = []

    def add(scope, metric, value, unit="", note=""):
        if isinstance(value, float) and math.isnan(value):
            value = None
        rows.append({"scope": scope, "metric": metric, "value": "" if value is None else value, "unit": unit,
                     "note": note})

    sections = [("all", report["totals"])]
    sections += [(f"model:{s['models'][0]['key']}", s) for s in report["models"]]
    sections += [(f"run:{s['name']}", s) for s in report["runs"]]
    if report["compare"]:
        sections.append((f"compare:{report['compare']['b_section']['name']}", report["compare"]["b_section"]))
    for scope, s in sections:
        g, t, c, f = s["gflops"], s["time"], s["cost"], s["failed"]
        cur = c["currency"]
        add(scope, "runs", len(s["runs"]), "runs", "; ".join(s["runs"]))
        add(scope, "model", "; ".join(m["label"] for m in s["models"]), "", "; ".join(m["key"] for m in s["models"]))
        add(scope, "period.first_committed", s["period"]["first_committed"], "UTC")
        add(scope, "period.last_committed", s["period"]["last_committed"], "UTC")
        add(scope, "images.embedded", s["images"], "images")
        add(scope, "images.failed_samples", f["samples"], "images",
            ", ".join(f"{k} {v}" for k, v in sorted(f["by_stage"].items())))
        add(scope, "input_shards.failed", f["input_shards"], "shards",
            "; ".join(x["source"] for x in f["failed_input_shards"]))
        for k in ("spent", "scorer", "encoder", "full_depth", "saved"):
            add(scope, f"gflops.{k}", g[k], "GFLOPs", g["baseline"] if k == "full_depth" else "")
        add(scope, "gflops.saved_pct", g["saved_pct"], "%", "saved / full depth")
        add(scope, "gflops.spent_per_image", g["spent_per_image"], "GFLOPs/image")
        add(scope, "gflops.full_depth_per_image", g["full_depth_per_image"], "GFLOPs/image")
        for e in s["exit_mix"]:
            add(scope, f"exit.{e['depth']}.images", e["images"], "images")
            add(scope, f"exit.{e['depth']}.share", 100 * e["share"], "%")
            add(scope, f"exit.{e['depth']}.gflops", e["gflops"], "GFLOPs")
        for d in s["by_complexity_decile"]:
            name = f"decile.{d['decile']}" if d["decile"] is not None else "decile.unscored"
            rng = (f"complexity {d['complexity_min']:.3f}..{d['complexity_max']:.3f}"
                   if d["decile"] is not None else d.get("note", ""))
            add(scope, f"{name}.images", d["images"], "images", rng)
            add(scope, f"{name}.mean_exit_layer", d["mean_exit_layer"], "blocks", rng)
            add(scope, f"{name}.gflops_spent", d["gflops_spent"], "GFLOPs", rng)
            add(scope, f"{name}.gflops_full_depth", d["gflops_full_depth"], "GFLOPs", rng)
            add(scope, f"{name}.saved_pct", d["saved_pct"], "%", rng)
        if s["scope"] == "run":
            for sh in s["by_shard"]:
                name = f"shard.{posixpath.basename(sh['output']).removesuffix('.parquet')}"
                add(scope, f"{name}.images", sh["images"], "images", sh["source"])
                add(scope, f"{name}.failed", sh["failed"], "images", sh["source"])
                add(scope, f"{name}.gflops_spent", sh["gflops_spent"], "GFLOPs", sh["source"])
                add(scope, f"{name}.gflops_full_depth", sh["gflops_full_depth"], "GFLOPs", sh["source"])
                add(scope, f"{name}.saved_pct", sh["saved_pct"], "%", sh["source"])
                add(scope, f"{name}.accelerator_seconds", sh["accelerator_seconds"], "s", sh["source"])
        add(scope, "time.wall_seconds", t["wall_seconds"], "s", "; ".join(t["notes"]))
        add(scope, "time.images_per_second_wall", t["images_per_second_wall"], "images/s")
        add(scope, "time.accelerator_seconds", t["accelerator_seconds"], "s", f"device {t['device']}")
        add(scope, "time.images_per_accelerator_second", t["images_per_accelerator_second"], "images/s")
        add(scope, "time.reserved_gpu_hours", t["reserved_gpu_hours"], "GPU-h", "wall x GPUs reserved")
        add(scope, "time.model_busy_share", t["model_busy_share"], "fraction", "accelerator time / actor wall time")
        add(scope, "cost.accelerator_hours", c["accelerator_hours"], "h", "as run")
        add(scope, "cost.as_run", c["cost"], cur, f"at {c['price_per_hour']:g} {cur}/h")
        fd = c["full_depth"]
        add(scope, "cost.full_depth_accelerator_hours", fd["accelerator_hours"], "h",
            f"{fd['basis'].upper()}: {fd['note']}")
        add(scope, "cost.full_depth", fd["cost"], cur, f"{fd['basis'].upper()}: {fd['note']}")
        add(scope, "cost.saved", c["saved_cost"], cur, fd["basis"].upper())
        add(scope, "cost.saved_hours", c["saved_hours"], "h", fd["basis"].upper())
        add(scope, "cost.saved_pct", c["saved_pct"], "%", fd["basis"].upper())
        add(scope, "cost.realised_efficiency", c["realised_efficiency"], "ratio",
            "measured speedup / GFLOP-ratio speedup (1.0 = all GFLOP savings became time)")
        a = s["audit"]
        add(scope, "audit.status", a["status"], "", "rows = manifest = per-depth counts x run.json")
        add(scope, "audit.gflops_rows", a["gflops_rows"], "GFLOPs", "sum of the rows' gflops column")
        add(scope, "audit.gflops_manifest", a["gflops_manifest"], "GFLOPs", "sum of manifest.parquet gflops")
        add(scope, "audit.gflops_recomputed", a["gflops_recomputed"], "GFLOPs",
            "per-depth image counts x run.json gflops_per_exit + images x scorer_gflops")
        add(scope, "audit.row_violations", a["row_violations"], "rows", "rows whose gflops differ from run.json")
    if report["compare"]:
        comp = report["compare"]
        for m in comp["metrics"]:
            add("compare", f"{m['metric']}.a", m["a"], m["unit"], "; ".join(comp["a"]["runs"]))
            add("compare", f"{m['metric']}.b", m["b"], m["unit"], comp["b"]["runs"][0])
        add("compare", "common_images", comp["common_images"], "images", "keys present in both")
    return rows


def render_csv(report: dict) -> str:
    """Return report.csv's text."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["scope", "metric", "value", "unit", "note"], lineterminator="\n")
    w.writeheader()
    w.writerows(report_csv_rows(report))
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------------------
# HTML: one self-contained page, plots drawn as inline SVG (no script, no external resource)

# Exit depths from shallow (cheap, green) to deep (costly, dark violet): viridis stops, readable on white.
DEPTH_COLOURS = ["#7ad151", "#35b779", "#1f9e89", "#26828e", "#31688e", "#3e4989", "#482878", "#440154"]
ICAR_COLOUR, BASELINE_COLOUR, SAVED_COLOUR, WORSE_COLOUR = "#1f9e89", "#8a8f98", "#c8ece6", "#d1495b"
SCORER_COLOUR = "#f0a830"
A_COLOUR, B_COLOUR = "#1f9e89", "#e07b39"


def depth_colours(depths: Sequence[int]) -> dict[int, str]:
    """Return a colour per exit depth, shallow to deep spread over the palette."""
    depths = sorted(set(int(d) for d in depths))
    n = len(depths)
    if n == 1:
        return {depths[0]: DEPTH_COLOURS[-3]}
    return {d: DEPTH_COLOURS[round(i * (len(DEPTH_COLOURS) - 1) / (n - 1))] for i, d in enumerate(depths)}


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Return round tick values covering [lo, hi]."""
    if not math.isfinite(lo) or not math.isfinite(hi):
        lo, hi = 0.0, 1.0
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(s * mag for s in (1, 2, 2.5, 5, 10) if s * mag >= raw * (1 - 1e-9))
    start, stop = math.floor(lo / step + 1e-9) * step, math.ceil(hi / step - 1e-9) * step
    return [start + i * step for i in range(int(round((stop - start) / step)) + 1)]


def _tick_label(v: float) -> str:
    a = abs(v)
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if a >= scale:
            return f"{round(v / scale, 6):g}{suffix}"
    return f"{round(v, 6):g}"


class _Plot:
    """One SVG chart: a value axis (y) with grid lines, and helpers to map data to pixels."""

    def __init__(self, plot: str, scope: str, title: str, ylo: float, yhi: float, width: int = 540,
                 height: int = 300, xlo: float | None = None, xhi: float | None = None):
        self.plot, self.scope, self.title = plot, scope, title
        self.w, self.h = width, height
        self.left, self.right, self.top, self.bottom = 62, 14, 30, 46
        self.yt = _ticks(ylo, yhi)
        self.xt = _ticks(xlo, xhi) if xlo is not None else None
        self.parts: list[str] = []

    @property
    def pw(self) -> float:
        return self.w - self.left - self.right

    @property
    def ph(self) -> float:
        return self.h - self.top - self.bottom

    def y(self, v: float) -> float:
        return self.top + (1 - (v - self.yt[0]) / (self.yt[-1] - self.yt[0])) * self.ph

    def x(self, v: float) -> float:
        return self.left + (v - self.xt[0]) / (self.xt[-1] - self.xt[0]) * self.pw

    def axes(self, ylabel: str, xlabel: str, xcats: list[str] | None = None) -> None:
        p = self.parts
        for v in self.yt:
            y = self.y(v)
            p.append(f'<line class="grid" x1="{self.left}" x2="{self.w - self.right}" y1="{y:.1f}" y2="{y:.1f}"/>')
            p.append(f'<text class="tick" x="{self.left - 6}" y="{y + 3.5:.1f}" text-anchor="end">'
                     f'{_tick_label(v)}</text>')
        if self.xt:
            for v in self.xt:
                x = self.x(v)
                bottom = self.top + self.ph
                p.append(f'<line class="axis" x1="{x:.1f}" x2="{x:.1f}" y1="{bottom}" y2="{bottom + 4}"/>')
                p.append(f'<text class="tick" x="{x:.1f}" y="{bottom + 16}" text-anchor="middle">'
                         f'{_tick_label(v)}</text>')
        if xcats:
            band = self.pw / len(xcats)
            every = max(1, math.ceil(len(xcats) / 16))  # no more than ~16 labels, or they overlap
            for i, c in enumerate(xcats):
                if i % every == 0:
                    p.append(f'<text class="tick" x="{self.left + (i + 0.5) * band:.1f}" y="{self.top + self.ph + 16}" '
                             f'text-anchor="middle">{_e(c)}</text>')
        y0 = self.y(0) if self.yt[0] <= 0 <= self.yt[-1] else self.top + self.ph
        p.append(f'<line class="axis" x1="{self.left}" x2="{self.w - self.right}" y1="{y0:.1f}" y2="{y0:.1f}"/>')
        p.append(f'<text class="label" x="{self.left + self.pw / 2:.1f}" y="{self.h - 8}" text-anchor="middle">'
                 f'{_e(xlabel)}</text>')
        p.append(f'<text class="label" transform="translate(14,{self.top + self.ph / 2:.1f}) rotate(-90)" '
                 f'text-anchor="middle">{_e(ylabel)}</text>')

    def legend(self, items: list[tuple[str, str]]) -> None:
        x = self.left
        for label, colour in items:
            self.parts.append(f'<rect class="key" x="{x}" y="9" width="11" height="11" rx="2" fill="{colour}"/>'
                              f'<text class="legend" x="{x + 15}" y="18.5">{_e(label)}</text>')
            x += 26 + 6.4 * len(label)

    def bar(self, x: float, width: float, v0: float, v1: float, colour: str, tip: str, **data: Any) -> None:
        ya, yb = sorted((self.y(v0), self.y(v1)))
        attrs = "".join(f' data-{k.replace("_", "-")}="{_e(v)}"' for k, v in data.items())
        self.parts.append(f'<rect class="bar" x="{x:.1f}" y="{ya:.1f}" width="{max(width, 1):.1f}" '
                          f'height="{max(yb - ya, 0.5):.1f}" fill="{colour}"{attrs}><title>{_e(tip)}</title></rect>')

    def text(self, x: float, y: float, s: str, cls: str = "value", anchor: str = "middle") -> None:
        self.parts.append(f'<text class="{cls}" x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}">{_e(s)}</text>')

    def svg(self) -> str:
        return (f'<svg class="plot" data-plot="{_e(self.plot)}" data-scope="{_e(self.scope)}" '
                f'viewBox="0 0 {self.w} {self.h}" width="{self.w}" height="{self.h}" role="img" '
                f'aria-label="{_e(self.title)}"><title>{_e(self.title)}</title>{"".join(self.parts)}</svg>')


def _bars(plot: str, scope: str, title: str, cats: list[str], values: list[float], colours: list[str],
          labels: list[str], tips: list[str], ylabel: str, xlabel: str, ref: tuple[float, str] | None = None,
          width: int = 540) -> str:
    """Return a vertical bar chart (one bar per category; negative values hang below zero)."""
    lo, hi = min([0.0] + values), max([0.0] + values + ([ref[0]] if ref else []))
    p = _Plot(plot, scope, title, lo, hi * 1.08 if hi > 0 else hi, width=width)
    p.axes(ylabel, xlabel, cats)
    band = p.pw / max(len(cats), 1)
    bw = min(band * 0.72, 64)
    for i, (v, col, lab, tip) in enumerate(zip(values, colours, labels, tips)):
        x = p.left + i * band + (band - bw) / 2
        p.bar(x, bw, 0, v, col, tip, category=cats[i], value=round(v, 6))
        if lab and len(cats) <= 24:
            p.text(x + bw / 2, p.y(v) - 4 if v >= 0 else p.y(v) + 12, lab)
    if ref:
        y = p.y(ref[0])
        p.parts.append(f'<line class="ref" x1="{p.left}" x2="{p.w - p.right}" y1="{y:.1f}" y2="{y:.1f}"/>')
        p.text(p.w - p.right - 2, y - 4, ref[1], cls="reflabel", anchor="end")
    return p.svg()


def plot_exit_histogram(s: dict, scope: str, colours: dict[int, str]) -> str:
    """Return the exit-depth histogram: images per exit depth, one bar per depth."""
    mix = s["exit_mix"]
    return _bars("exit-depth", scope, "Images per exit depth",
                 [f"{e['depth']} blocks" for e in mix], [float(e["images"]) for e in mix],
                 [colours[e["depth"]] for e in mix],
                 [f"{e['images']:,} ({100 * e['share']:.0f}%)" for e in mix],
                 [f"exit at {e['depth']} blocks: {e['images']:,} images, {100 * e['share']:.1f}%, "
                  f"{_num(e['gflops'])} GFLOPs" for e in mix], "images", "exit depth")


def plot_complexity_histogram(s: dict, scope: str, colours: dict[int, str]) -> str:
    """Return the complexity histogram, each bin's bar stacked by exit depth."""
    h = s["complexity_histogram"]
    edges, counts = h["edges"], {int(k): v for k, v in h["counts_by_exit"].items()}
    totals = [sum(c[i] for c in counts.values()) for i in range(len(edges) - 1)]
    p = _Plot("complexity", scope, "Complexity score histogram, coloured by exit depth", 0, max(totals + [1]) * 1.05,
              xlo=0.0, xhi=1.0)
    p.axes("images", "complexity score (scorer output)")
    p.legend([(f"exit {d}", colours[d]) for d in sorted(counts)])
    for i in range(len(edges) - 1):
        x0, x1 = p.x(edges[i]), p.x(edges[i + 1])
        base = 0
        for d in sorted(counts):
            n = counts[d][i]
            if n:
                p.bar(x0 + 0.5, x1 - x0 - 1, base, base + n, colours[d],
                      f"complexity {edges[i]:.2f}-{edges[i + 1]:.2f}, exit {d}: {n:,} images", bin=i, depth=d)
                base += n
    if not h["scored_images"]:
        p.text(p.left + p.pw / 2, p.top + p.ph / 2, "no complexity scores (run without a scorer)", cls="empty")
    return p.svg()


def plot_gflops_breakdown(s: dict, scope: str, colours: dict[int, str]) -> str:
    """Return ICAR's GFLOPs (scorer + encoder per exit depth, stacked) beside the full-depth baseline."""
    g = s["gflops"]
    segments = [(f"encoder, exit {e['depth']}", colours[e["depth"]], e["images"] * (e["encoder_gflops_per_image"] or 0))
                for e in s["exit_mix"]]
    if g["scorer"]:
        segments.append(("scorer", SCORER_COLOUR, g["scorer"]))
    p = _Plot("gflops-breakdown", scope, "GFLOPs spent by ICAR vs the full-depth baseline", 0,
              max(g["full_depth"], g["spent"], 1e-9) * 1.1)
    cats = ["ICAR as run", "full depth"]
    p.axes("GFLOPs", "", cats)
    p.legend([(name.replace("encoder, ", ""), colour) for name, colour, _ in segments]
             + [("full depth", BASELINE_COLOUR)])
    band = p.pw / 2
    bw = min(band * 0.5, 110)
    x = p.left + (band - bw) / 2
    base = 0.0
    for name, colour, v in segments:
        if v > 0:
            p.bar(x, bw, base, base + v, colour, f"{name}: {_num(v)} GFLOPs", series=name)
            base += v
    p.text(x + bw / 2, p.y(base) - 5, f"{_num(g['spent'])}")
    x2 = p.left + band + (band - bw) / 2
    p.bar(x2, bw, 0, g["full_depth"], BASELINE_COLOUR, f"full depth: {_num(g['full_depth'])} GFLOPs",
          series="full depth")
    p.text(x2 + bw / 2, p.y(g["full_depth"]) - 5, f"{_num(g['full_depth'])}")
    if g["saved_pct"] is not None:
        p.text(p.left + band, p.y(max(g["full_depth"], g["spent"]) / 2), _saved_phrase(g["saved_pct"]), cls="callout")
    return p.svg()


def plot_cumulative(s: dict, scope: str) -> str:
    """Return cumulative GFLOPs vs images embedded, ICAR against full depth, the gap shaded as the saving."""
    c = s["cumulative"]
    xs, ys, fs = c["images"], c["gflops_spent"], c["gflops_full_depth"]
    p = _Plot("cumulative", scope, "Cumulative GFLOPs: ICAR vs full depth", 0, max(fs + ys + [1.0]),
              xlo=0, xhi=max(xs[-1] if xs else 1, 1))
    p.axes("GFLOPs (cumulative)", "images embedded (in shard order)")
    p.legend([("ICAR as run", ICAR_COLOUR), ("full depth", BASELINE_COLOUR), ("saved", SAVED_COLOUR)])
    pts = lambda vs: " ".join(f"{p.x(x):.1f},{p.y(v):.1f}" for x, v in zip(xs, vs))
    if len(xs) > 1:
        area = pts(fs) + " " + " ".join(f"{p.x(x):.1f},{p.y(v):.1f}" for x, v in zip(reversed(xs), reversed(ys)))
        p.parts.append(f'<polygon class="saved" points="{area}" fill="{SAVED_COLOUR}"/>')
        p.parts.append(f'<polyline class="line" data-series="full-depth" points="{pts(fs)}" stroke="{BASELINE_COLOUR}" '
                       f'stroke-dasharray="6 4"/>')
        p.parts.append(f'<polyline class="line" data-series="icar" points="{pts(ys)}" stroke="{ICAR_COLOUR}"/>')
        pct = s["gflops"]["saved_pct"]
        if pct is not None:
            # Bottom right: always empty under two curves that rise from the origin.
            p.text(p.w - p.right - 6, p.top + p.ph - 12, _saved_phrase(pct), cls="callout", anchor="end")
    return p.svg()


def plot_shard_savings(s: dict, scope: str) -> str:
    """Return GFLOPs saved per input shard (a histogram of shards by saving when there are too many for bars)."""
    shards = [x for x in s["by_shard"] if x["saved_pct"] is not None]
    overall = s["gflops"]["saved_pct"]
    ref = (overall, f"overall {overall:.1f}%") if overall is not None else None
    if len(shards) <= MAX_SHARD_BARS:
        many = len(s["runs"]) > 1  # part numbers repeat across runs: label shards run/part
        cats = [f"{x['run_number']}/{x['part']}" if many else str(x["part"]) for x in shards]
        vals = [x["saved_pct"] for x in shards]
        return _bars("shard-savings", scope, "GFLOPs saved per input shard", cats, vals,
                     [ICAR_COLOUR if v >= 0 else WORSE_COLOUR for v in vals], ["" for _ in vals],
                     [f"part {x['part']} ({x['source']}): {x['images']:,} images, {x['saved_pct']:.1f}% saved"
                      for x in shards], "GFLOPs saved (%)",
                     "input shard (run number / part)" if many else "input shard (part number)", ref=ref)
    vals = np.array([x["saved_pct"] for x in shards])
    counts, edges = np.histogram(vals, bins=20)
    cats = [f"{edges[i]:.0f}" for i in range(len(counts))]
    return _bars("shard-savings", scope, f"Input shards by GFLOPs saved ({len(shards)} shards)", cats,
                 [float(c) for c in counts], [ICAR_COLOUR] * len(counts), [str(c) if c else "" for c in counts],
                 [f"{c} shards saved {edges[i]:.1f}-{edges[i + 1]:.1f}%" for i, c in enumerate(counts)],
                 "input shards", "GFLOPs saved (%), bin start")


def plot_decile_savings(s: dict, scope: str) -> str:
    """Return GFLOPs saved per complexity decile (simplest tenth of the images first)."""
    ds = [d for d in s["by_complexity_decile"] if d["saved_pct"] is not None]
    cats = [f"D{d['decile']}" if d["decile"] is not None else "no score" for d in ds]
    vals = [d["saved_pct"] for d in ds]
    return _bars("decile-savings", scope, "GFLOPs saved by complexity decile", cats, vals,
                 [ICAR_COLOUR if v >= 0 else WORSE_COLOUR for v in vals], [f"{v:.0f}%" for v in vals],
                 [f"{c}: complexity {d['complexity_min']}-{d['complexity_max']}, {d['images']:,} images, mean exit "
                  f"{d['mean_exit_layer']:.1f} blocks, {d['saved_pct']:.1f}% saved" for c, d in zip(cats, ds)],
                 "GFLOPs saved (%)", "complexity decile (D1 = simplest tenth)")


def _grouped(plot: str, scope: str, title: str, cats: list[str], series: list[tuple[str, str, list[float]]],
             ylabel: str, xlabel: str, fmt=lambda v: _sig(v, 3), width: int = 540) -> str:
    """Return a grouped bar chart: per category one bar per series."""
    hi = max([v for _, _, vs in series for v in vs] + [0.0])
    p = _Plot(plot, scope, title, 0, hi * 1.12 if hi > 0 else 1, width=width)
    p.axes(ylabel, xlabel, cats)
    p.legend([(name, colour) for name, colour, _ in series])
    band = p.pw / max(len(cats), 1)
    bw = min(band * 0.8 / len(series), 56)
    for i, c in enumerate(cats):
        x0 = p.left + i * band + (band - bw * len(series)) / 2
        for k, (name, colour, vs) in enumerate(series):
            p.bar(x0 + k * bw, bw - 2, 0, vs[i], colour, f"{name}, {c}: {fmt(vs[i])}", category=c, series=name)
            p.text(x0 + k * bw + (bw - 2) / 2, p.y(vs[i]) - 4, fmt(vs[i]))
    return p.svg()


def plot_compare(comp: dict) -> list[str]:
    """Return the side-by-side plots of --compare: exit mix and per-image figures of A and B."""
    mix = comp["exit_mix"]
    out = [_grouped("compare-exit-mix", "compare", "Exit mix side by side (share of images)",
                    [f"{d} blocks" for d in mix["depths"]],
                    [("A: " + comp["a"]["label"], A_COLOUR, [100 * v for v in mix["a"]]),
                     ("B: " + comp["b"]["label"], B_COLOUR, [100 * v for v in mix["b"]])],
                    "images (%)", "exit depth", fmt=lambda v: f"{v:.0f}%")]
    titles = {"gflops_per_image": "GFLOPs per image", "accelerator_ms_per_image": "accelerator-ms per image",
              "images_per_second_wall": "images per second (wall)",
              "cost_per_million_images": "cost per million images"}
    for m in comp["metrics"]:
        if m["metric"] not in titles or m["a"] is None or m["b"] is None:
            continue
        out.append(_grouped(f"compare-{m['metric'].replace('_', '-')}", "compare", titles[m["metric"]],
                            [titles[m["metric"]]],
                            [("A", A_COLOUR, [float(m["a"])]), ("B", B_COLOUR, [float(m["b"])])],
                            m["unit"], "", width=260))
    return out


CSS = """
:root { --ink: #1d2430; --muted: #5f6b7a; --line: #e3e7ec; --card: #f6f8fa; --accent: #1f9e89; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
       color: var(--ink); background: #fff; }
main { max-width: 1140px; margin: 0 auto; padding: 28px 28px 60px; }
h1 { font-size: 26px; margin: 0 0 4px; } h2 { font-size: 20px; margin: 36px 0 6px; border-bottom: 2px solid var(--line);
padding-bottom: 6px; } h3 { font-size: 15px; margin: 22px 0 8px; color: var(--muted); text-transform: uppercase;
letter-spacing: .04em; }
.sub { color: var(--muted); margin: 0 0 18px; }
.mono { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 12px; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(165px, 1fr)); gap: 12px; margin: 18px 0 14px; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 10px; padding: 12px 14px; }
.card .k { color: var(--muted); font-size: 12px; text-transform: uppercase; letter-spacing: .04em; }
.card .v { font-size: 20px; font-weight: 650; margin-top: 2px; white-space: nowrap; }
.card .n { color: var(--muted); font-size: 12px; }
.good { color: #137a6a; } .bad { color: #b3263b; }
.badge { display: inline-block; font-size: 11px; font-weight: 650; padding: 1px 7px; border-radius: 9px;
         vertical-align: middle; letter-spacing: .03em; }
.badge.measured, .badge.passed { background: #d8f1ec; color: #0f6657; }
.badge.estimate, .badge.mixed { background: #fff1d6; color: #8a5a00; }
.badge.FAILED, .badge.unavailable { background: #fbdde1; color: #9b1c2f; }
.charts { display: grid; grid-template-columns: repeat(auto-fit, minmax(470px, 1fr)); gap: 18px 28px; }
.charts.small { grid-template-columns: repeat(auto-fit, minmax(240px, 1fr)); }
figure { margin: 0; } figcaption { font-weight: 600; margin: 6px 0 2px; }
svg.plot { width: 100%; max-width: 600px; height: auto; background: #fff; }
svg.plot text { font-family: system-ui, "DejaVu Sans", sans-serif; fill: #3c4654; }
svg.plot .tick { font-size: 10.5px; fill: #6b7684; } svg.plot .label { font-size: 11.5px; fill: #4a5564; }
svg.plot .value { font-size: 10.5px; font-weight: 600; } svg.plot .legend { font-size: 11px; }
svg.plot .grid { stroke: #edf0f3; } svg.plot .axis { stroke: #9aa4b0; }
svg.plot .ref { stroke: #b3263b; stroke-dasharray: 4 3; } svg.plot .reflabel { font-size: 10.5px; fill: #b3263b; }
svg.plot .line { fill: none; stroke-width: 2.4; }
svg.plot .callout { font-size: 13px; font-weight: 700; fill: #137a6a; }
svg.plot .empty { font-size: 13px; fill: #8a94a1; } svg.plot rect.bar:hover { opacity: .8; }
table { border-collapse: collapse; width: 100%; margin: 6px 0 10px; font-size: 13px; }
th, td { text-align: right; padding: 5px 9px; border-bottom: 1px solid var(--line); }
th { background: var(--card); font-weight: 600; color: var(--muted); }
th.l, td.l { text-align: left; }
.note { color: var(--muted); font-size: 12.5px; margin: 4px 0; }
.estimate-note { background: #fff8e8; border-left: 3px solid #e0a100; padding: 7px 10px; font-size: 12.5px;
                 margin: 8px 0; }
details { margin: 10px 0; } summary { cursor: pointer; font-weight: 600; }
footer { margin-top: 40px; color: var(--muted); font-size: 12px; border-top: 1px solid var(--line); padding-top: 10px; }
"""


FIGURE = re.compile(r"^[-+]?[\d.,]+(e[-+]?\d+)?( ?[%a-zA-Z/]{0,8})?$")  # "12", "3.5 s", "18.2%", "0.0031 USD"


def _is_figure(cell: Any) -> bool:
    """Return True for a cell that reads as a number (right-aligned), False for text (left-aligned)."""
    text = str(cell).strip()
    return isinstance(cell, (int, float)) or text == "-" or bool(FIGURE.match(text))


def _table(head: list[str], rows: list[list[Any]]) -> str:
    align = [all(_is_figure(r[i]) for r in rows) if rows else True for i in range(len(head))]
    align[0] = False
    th = "".join(f"<th{'' if a else ' class=l'}>{_e(h)}</th>" for h, a in zip(head, align))
    body = "".join("<tr>" + "".join(f"<td{'' if a else ' class=l'}>{_e(c)}</td>" for c, a in zip(r, align))
                   + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _badge(kind: str) -> str:
    return f'<span class="badge {_e(kind)}">{_e(kind.upper())}</span>'


def _cards(s: dict, audit_status: str) -> str:
    """Return the headline cards of a section (values and notes are HTML, escaped here)."""
    g, c, f = s["gflops"], s["cost"], s["failed"]
    cur, fd = c["currency"], c["full_depth"]
    tone = (lambda x: "good" if (x or 0) >= 0 else "bad")
    cards = [
        ("Images embedded", _e(f"{s['images']:,}"),
         _e(f"{f['samples']:,} failed samples, {f['input_shards']} failed input shards")),
        ("GFLOPs saved", f'<span class="{tone(g["saved_pct"])}">{_e(_saved_phrase(g["saved_pct"]))}</span>',
         _e(f"{_num(g['spent'])} spent vs {_num(g['full_depth'])} at full depth")),
        ("Cost as run", _e(_money(c["cost"], cur)),
         _e(f"{_sig(c['accelerator_hours'])} accelerator-h at {c['price_per_hour']:g} {cur}/h")),
        ("Cost at full depth", _e(_money(fd["cost"], cur)),
         _badge(fd["basis"]) + " " + _e(f"{_sig(fd['accelerator_hours'])} accelerator-h")),
        ("Saved", f'<span class="{tone(c["saved_cost"])}">{_e(_money(c["saved_cost"], cur))}</span>',
         _e(f"{_saved_phrase(c['saved_pct'])} of accelerator time")),
        ("Audit", _badge(audit_status), _e("GFLOPs: rows = manifest = per-depth counts x run.json")),
    ]
    return '<div class="cards">' + "".join(
        f'<div class="card"><div class="k">{_e(k)}</div><div class="v">{v}</div><div class="n">{n}</div></div>'
        for k, v, n in cards) + "</div>"


def _section_html(s: dict, scope: str, colours: dict[int, str]) -> str:
    g, t, c, f, a = s["gflops"], s["time"], s["cost"], s["failed"], s["audit"]
    cur, fd = c["currency"], c["full_depth"]
    out = [_cards(s, a["status"])]
    charts = []
    if s["exit_mix"]:
        charts.append(("Exit depth", plot_exit_histogram(s, scope, colours)))
        charts.append(("Complexity, by exit", plot_complexity_histogram(s, scope, colours)))
    charts.append(("GFLOPs: ICAR vs full depth", plot_gflops_breakdown(s, scope, colours)))
    charts.append(("Cumulative GFLOPs", plot_cumulative(s, scope)))
    charts.append(("Savings by input shard", plot_shard_savings(s, scope)))
    if s["by_complexity_decile"]:
        charts.append(("Savings by complexity decile", plot_decile_savings(s, scope)))
    out.append('<div class="charts">' + "".join(f"<figure><figcaption>{_e(k)}</figcaption>{v}</figure>"
                                                for k, v in charts) + "</div>")
    out.append("<h3>GFLOPs</h3>" + _table(
        ["", "spent (ICAR)", "scorer", "encoder", "full depth", "saved", "saved %", "per image",
         "full depth per image"],
        [["GFLOPs", _num(g["spent"]), _num(g["scorer"]), _num(g["encoder"]), _num(g["full_depth"]), _num(g["saved"]),
          f"{g['saved_pct']:.1f}%" if g["saved_pct"] is not None else "-", _sig(g["spent_per_image"], 4),
          _sig(g["full_depth_per_image"], 4)]]))
    if s["exit_mix"]:
        out.append("<h3>Exit mix</h3>" + _table(
            ["exit depth (blocks)", "images", "share", "encoder GFLOPs / image", "GFLOPs spent"],
            [[e["depth"], f"{e['images']:,}", f"{100 * e['share']:.1f}%", _sig(e["encoder_gflops_per_image"], 4),
              _num(e["gflops"])] for e in s["exit_mix"]]))
    if s["by_complexity_decile"]:
        out.append("<h3>By complexity decile</h3>" + _table(
            ["decile", "complexity", "images", "mean exit", "GFLOPs spent", "full depth", "saved %"],
            [[f"D{d['decile']}" if d["decile"] is not None else "no score",
              f"{d['complexity_min']:.3f} – {d['complexity_max']:.3f}" if d["decile"] is not None else "-",
              f"{d['images']:,}", f"{d['mean_exit_layer']:.1f}", _num(d["gflops_spent"]), _num(d["gflops_full_depth"]),
              f"{d['saved_pct']:.1f}%" if d["saved_pct"] is not None else "-"] for d in s["by_complexity_decile"]]))
    many = len(s["runs"]) > 1
    shard_table = _table(
        (["run"] if many else []) + ["part", "input shard", "images", "failed", "GFLOPs spent", "full depth", "saved %",
                                     "mean exit", "accel. s", "committed"],
        [([f"{x['run_number']}: {x['run']}"] if many else []) +
         [x["part"], x["source"], f"{x['images']:,}", x["failed"], _num(x["gflops_spent"]),
          _num(x["gflops_full_depth"]),
          f"{x['saved_pct']:.1f}%" if x["saved_pct"] is not None else "-",
          f"{x['mean_exit_layer']:.1f}" if x["mean_exit_layer"] is not None else "-", _sig(x["accelerator_seconds"]),
          _when(x["committed_at"])] for x in s["by_shard"]])
    out.append(f"<details{' open' if len(s['by_shard']) <= 12 else ''}><summary>Input shards ({len(s['by_shard'])})"
               f"</summary>{shard_table}</details>")
    if f["failed_input_shards"]:
        out.append("<h3>Failed input shards</h3>" + _table(
            ["input shard", "error"], [[x["source"], x["message"]] for x in f["failed_input_shards"]]))
    out.append("<h3>Time and cost</h3>" + _table(
        ["", "accelerator-hours", f"cost ({cur})", "basis"],
        [["as run", _sig(c["accelerator_hours"], 4), _money(c["cost"], cur), "measured (model_seconds)"],
         ["full depth", _sig(fd["accelerator_hours"], 4), _money(fd["cost"], cur), fd["basis"].upper()],
         ["saved", _sig(c["saved_hours"], 4), _money(c["saved_cost"], cur),
          _saved_phrase(c["saved_pct"])]]))
    if fd["note"]:
        out.append(f'<div class="estimate-note">{_badge(fd["basis"])} {_e(fd["note"])}</div>')
    time_rows = [["wall time", f"{_sig(t['wall_seconds'], 4)} s" if t["wall_seconds"] is not None else "not recorded",
                  f"{t['invocations']} invocation(s) of icar embed"],
                 ["images / s (wall)", _sig(t["images_per_second_wall"], 4), "images timed / wall seconds"],
                 ["accelerator time", f"{_sig(t['accelerator_seconds'], 4)} s",
                  f"inside model actors, on {t['device']}"],
                 ["images / accelerator-s", _sig(t["images_per_accelerator_second"], 4), ""],
                 ["reserved GPU-hours", _sig(t["reserved_gpu_hours"], 4), "wall x GPUs reserved for model actors"],
                 ["model busy share",
                  f"{100 * t['model_busy_share']:.0f}%" if t["model_busy_share"] is not None else "-",
                  "accelerator time / actor wall time; low = accelerators waited for input"]]
    if c["realised_efficiency"] is not None:
        time_rows.append(["realised efficiency", f"{c['realised_efficiency']:.2f}",
                          "measured speedup / GFLOP-ratio speedup (1.0 = every GFLOP saved became time saved)"])
    out.append(_table(["throughput", "value", ""], time_rows))
    out += [f'<p class="note">{_e(n)}</p>' for n in t["notes"]]
    audit_rows = [["rows' gflops column", _num(a["gflops_rows"], 4)],
                  ["manifest.parquet sums", _num(a["gflops_manifest"], 4)],
                  ["per-depth counts x run.json (+ scorer)", _num(a["gflops_recomputed"], 4)],
                  ["rows disagreeing with run.json", f"{a['row_violations']:,}"]]
    out.append(f"<h3>Audit {_badge(a['status'])}</h3>" + _table(["GFLOP total from", "GFLOPs"], audit_rows))
    for v in a.get("violation_examples", []):
        out.append(f'<p class="note bad">{_e(v["shard"])} row {v["row"]}: exit {v["exit_layer"]} recorded '
                   f'{v["gflops"]:.6g} GFLOPs, run.json says {v["expected"]}</p>')
    return "\n".join(out)


def render_html(report: dict) -> str:
    """Return report.html: one self-contained page (inline CSS and SVG; no script, no external resource)."""
    cfg = report["config"]
    runs, models, total = report["runs"], report["models"], report["totals"]
    depths = {e["depth"] for s in runs for e in s["exit_mix"]}
    if report["compare"]:
        depths |= {e["depth"] for e in report["compare"]["b_section"]["exit_mix"]}
    depths = sorted(depths)
    colours = depth_colours(depths or [0])
    period = total["period"]
    body = ["<h1>ICAR cost report</h1>",
            f'<p class="sub">{len(runs)} run{"s" if len(runs) != 1 else ""} · {len(models)} model'
            f'{"s" if len(models) != 1 else ""} · shards committed {_e(_when(period["first_committed"]))} to '
            f'{_e(_when(period["last_committed"]))} · priced at {cfg["gpu_hour_price"]:g} {_e(cfg["currency"])} per '
            f'accelerator-hour · generated {_e(_when(report["generated_at"]))} by icar '
            f'{_e(report["icar_version"])}</p>']
    if len(runs) == 1:
        s = runs[0]
        body.append(f'<p class="mono">{_e(s["name"])} — {_e(s["models"][0]["label"])}</p>')
        body.append(_section_html(s, f"run:{s['name']}", colours))
    else:
        body.append("<h2>All runs</h2>" + _cards(total, report["audit"]["status"]))
        if total.get("note"):
            body.append(f'<p class="note">{_e(total["note"])}</p>')
        body.append(_table(
            ["run", "model", "images", "failed", "GFLOPs spent", "full depth", "saved %", f"cost ({cfg['currency']})",
             "full-depth cost", "basis", "audit"],
            [[s["name"], s["models"][0]["label"], f"{s['images']:,}", s["failed"]["samples"],
              _num(s["gflops"]["spent"]), _num(s["gflops"]["full_depth"]),
              f"{s['gflops']['saved_pct']:.1f}%" if s["gflops"]["saved_pct"] is not None else "-",
              _money(s["cost"]["cost"], ""), _money(s["cost"]["full_depth"]["cost"], ""),
              s["cost"]["full_depth"]["basis"], s["audit"]["status"]] for s in runs]))
        for m in models:
            n = len(m["runs"])
            body.append(f"<h2>Model {_e(m['name'])} <span class='note'>({n} run{'s' if n != 1 else ''})</span></h2>")
            body.append(_section_html(m, f"model:{m['models'][0]['key']}", colours))
        body.append("<h2>Runs</h2>")
        for s in runs:
            body.append(f"<details><summary class='mono'>{_e(s['name'])} — {s['images']:,} images, "
                        f"{_e(_saved_phrase(s['gflops']['saved_pct']))}</summary>"
                        f"{_section_html(s, 'run:' + s['name'], colours)}</details>")
    comp = report["compare"]
    if comp:
        body.append(f"<h2>Side by side: A vs B</h2><p class='sub'>A = {_e(', '.join(comp['a']['runs']))}; "
                    f"B = {_e(comp['b']['runs'][0])}{' (a full-depth run)' if comp['b']['full_depth_run'] else ''}. "
                    f"Images in both: {comp['common_images']:,}; only in A: {comp['images_only_in_a']:,}; only in B: "
                    f"{comp['images_only_in_b']:,}."
                    f"{'' if comp['same_model'] else ' The runs use DIFFERENT models.'}</p>")
        plots = plot_compare(comp)
        body.append(f'<div class="charts"><figure><figcaption>Exit mix</figcaption>{plots[0]}</figure>'
                    '<div class="charts small">' + "".join(f"<figure>{p}</figure>" for p in plots[1:])
                    + "</div></div>")
        body.append(_table(["metric", "unit", "A", "B", "B / A"],
                           [[m["metric"].replace("_", " "), m["unit"], _sig(m["a"], 4), _sig(m["b"], 4),
                             f"{m['b_over_a']:.2f}" if m["b_over_a"] is not None else "-"] for m in comp["metrics"]]))
    defs = "".join(f"<li><b>{_e(k.replace('_', ' '))}</b>: {_e(v)}</li>" for k, v in report["definitions"].items())
    body.append(f"<footer><ul>{defs}</ul></footer>")
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" '
            f'content="width=device-width, initial-scale=1"><title>ICAR cost report</title><style>{CSS}</style>'
            f'</head><body><main>{"".join(body)}</main></body></html>\n')


def write_report(report: dict, output: str, storage_options: dict | None = None) -> dict[str, str]:
    """Write report.json, report.csv and report.html into ``output`` (atomically); return {kind: URL}."""
    storage.makedirs(output, storage_options)
    urls = {k: storage.join(output, f"report.{k}") for k in ("json", "csv", "html")}
    storage.write_json(report, urls["json"], storage_options)
    storage.atomic_write_bytes(urls["csv"], render_csv(report).encode(), storage_options)
    storage.atomic_write_bytes(urls["html"], render_html(report).encode(), storage_options)
    return urls
