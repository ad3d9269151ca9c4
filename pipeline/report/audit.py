"""Reading and auditing run directories for the cost report: one ``RunData`` per run, or ``AuditError``.

A run is read from its own files only (run.json, manifest.parquet, shards/, errors/), local or on an object
store, and its GFLOP totals are checked three ways (row column, manifest sums, per-depth counts x run.json's
``gflops_per_exit``) before anything is reported; see pipeline/report/build.py for what the report does with them.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import posixpath
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from pipeline.io import storage
from pipeline.io.schema import ERROR_DIR, MANIFEST, RUN_JSON, SHARD_DIR, model_key, part_name
from pipeline.io.shards import RunStateError, read_manifest_rows, read_part, read_run_json

log = logging.getLogger(__name__)

SHARD_COLUMNS = ["source", "complexity", "exit_layer", "gflops"]
MAX_LISTED_PROBLEMS = 20  # audit problems named in an error message (the count is always given)
# Relative tolerance between GFLOP sums computed in different orders / precisions: rows are float32, so one
# depth's figure may differ from run.json's float64 by ~6e-8 relative; anything above 1e-6 is a real mismatch.
GFLOP_RTOL = 1e-6


class AuditError(RunStateError):
    """A run's files disagree with each other, so its totals cannot be trusted: the report refuses it."""



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
    def path_gflops(self) -> dict[int, float]:
        return path_gflops(self.info)

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


def path_gflops(info: dict) -> dict[int, float]:
    """Return {exit: GFLOPs a row leaving there spent, scorer aside} from a run.json: the tower to the exit, and for
    a confidence-routed run also the confidence heads run on the way (its "confidence" "gflops_per_exit", which
    includes the scorer)."""
    paths = (info.get("confidence") or {}).get("gflops_per_exit")
    if paths:
        scorer = float(info.get("scorer_gflops") or 0.0)
        return {int(k): float(v) - scorer for k, v in paths.items()}
    return {int(k): float(v) for k, v in info["gflops_per_exit"].items()}


RANDOM_WEIGHTS = "random weights: embeddings carry no meaning"


def random_weights(identity: dict) -> bool:
    """Return True for a model identity (run.json / index.json "model") of a seeded random init: its "pretrained"
    is "none" (the demo says "shipped", a checkpoint its path, open_clip weights their tag)."""
    return str(identity.get("pretrained") or "").lower() == "none"


def model_label(identity: dict) -> str:
    """Return a short human name for a model: name, pretrained tag (or that its weights are random) and the first
    hex digits of its weights hash."""
    name = identity.get("name") or "unknown model"
    tag = identity.get("pretrained")
    sha = (identity.get("weights_sha256") or "")[:10]
    parts = [str(name)]
    if random_weights(identity):
        parts.append(RANDOM_WEIGHTS)
    elif tag:
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
    info = read_run_json(run, storage_options)
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
    rows = read_manifest_rows(run, storage_options)
    return sorted(rows, key=lambda r: r["part"])


def gflops_agree(a: float, b: float) -> bool:
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


@dataclass
class _Audit:
    """What the checks of one run share: its files as read so far, the problems found, the running totals."""

    run: str
    so: dict  # storage options
    with_keys: bool
    info: dict  # run.json
    manifest: list[dict]  # manifest rows in part order
    problems: list[str] = field(default_factory=list)  # disagreements between the files; any refuses the run
    shard_files: dict[str, str] = field(default_factory=dict)  # {part file name: URL} under shards/
    error_files: dict[str, str] = field(default_factory=dict)  # {part file name: URL} under errors/
    rows_of: dict[int, dict] = field(default_factory=dict)  # part -> compact per-row arrays
    manifest_gflops: float = 0.0
    rows_gflops: float = 0.0
    recomputed_profiles: float = 0.0
    violations: list[dict] = field(default_factory=list)  # the first rows whose gflops break the cost model
    n_violations: int = 0
    counts_all: Counter = field(default_factory=Counter)  # images per exit depth, all committed shards
    stages_of: dict[str, list[str]] = field(default_factory=dict)  # part file name -> failed samples' stages
    failed_shards: list[dict] = field(default_factory=list)  # input shards that failed as a whole

    @property
    def exits(self) -> list[int]:
        return [int(e) for e in self.info["exits"]]

    @property
    def per_exit(self) -> dict[int, float]:
        return path_gflops(self.info)

    @property
    def scorer(self) -> float:
        return float(self.info.get("scorer_gflops") or 0.0)

    def profile_costs(self) -> dict[int, np.ndarray]:
        """Return {exit depth: float32 costs (+ scorer) of the profiles at it} of a run routed to profiles.

        Profiles are exit depth + token merging (pipeline/model/merging.py): a row spent its profile's counted
        figure; rows do not name the schedule, so each must equal one of its depth's profile figures.
        """
        costs: dict[int, list] = {}
        for prof in self.info.get("profiles") or []:
            costs.setdefault(int(prof["exit"]), []).append(float(prof["gflops"]))
        return {d: np.float32(np.asarray(v) + self.scorer) for d, v in costs.items()}


def check_manifest_unique(a: _Audit) -> None:
    """No input shard, output file or part number is listed twice in the manifest."""
    for col, what in (("source", "input shard"), ("output", "output file"), ("part", "part number")):
        dup = [v for v, n in Counter(r[col] for r in a.manifest).items() if n > 1]
        if dup:
            a.problems.append(f"{MANIFEST} lists the same {what} more than once: {dup[:5]}")


def check_manifest_outputs(a: _Audit) -> None:
    """Each manifest row names its part's own shard file."""
    for r in a.manifest:
        expected = f"{SHARD_DIR}/{part_name(r['part'])}"
        if r["output"] != expected:
            a.problems.append(f"{MANIFEST} row of part {r['part']} names output {r['output']!r}, expected {expected!r}")


def check_shard_files(a: _Audit) -> None:
    """Every shard file listed in the manifest exists and no other shard file does."""
    a.shard_files = _list_parts(a.run, SHARD_DIR, a.so)
    a.error_files = _list_parts(a.run, ERROR_DIR, a.so)
    listed = {posixpath.basename(r["output"]): r for r in a.manifest}
    for name in sorted(set(listed) - set(a.shard_files)):
        a.problems.append(f"{SHARD_DIR}/{name} is listed in {MANIFEST} ({listed[name]['rows']} rows of "
                          f"{listed[name]['source']}) but the file is missing")
    for name in sorted(set(a.shard_files) - set(listed)):
        a.problems.append(f"{SHARD_DIR}/{name} exists but is not in {MANIFEST} (a shard committed by an interrupted "
                          f"or still running `icar embed`; re-run it with the same arguments to finish, which "
                          f"removes or redoes such shards)")


def check_shards(a: _Audit) -> None:
    """Every present shard agrees with its manifest row, and each of its rows with the cost model.

    Each shard is checked as it arrives and kept only as compact arrays (exit_layer, gflops, complexity: 14 bytes
    a row), so memory does not hold whole tables.
    """
    present = [r for r in a.manifest if posixpath.basename(r["output"]) in a.shard_files]
    columns = SHARD_COLUMNS + (["key"] if a.with_keys else [])

    def read(r):
        return r, read_part(a.shard_files[posixpath.basename(r["output"])], a.so, columns)

    per_exit, scorer = a.per_exit, a.scorer
    lookup = np.full(max(list(per_exit) + [0]) + 1, np.nan, np.float32)
    for d, g in per_exit.items():
        lookup[d] = np.float32(g + scorer)  # what the worker records: float32(gflops_per_exit + scorer)
    profile_costs = a.profile_costs()
    workers = 1 if storage.is_local(storage.filesystem(a.run, a.so)[0]) else 8  # object stores: overlap round trips
    for r, t in _map_in_order(read, present, workers):
        ex = t.column("exit_layer").to_numpy(zero_copy_only=False).astype(np.int16)
        g32 = t.column("gflops").to_numpy(zero_copy_only=False).astype(np.float32)
        _check_shard_totals(a, r, t, ex, g32.astype(np.float64))
        _check_row_costs(a, r["output"], ex, g32, lookup, profile_costs)
        cx = t.column("complexity").to_numpy(zero_copy_only=False)
        a.rows_of[r["part"]] = {"exit_layer": ex, "gflops": g32.astype(np.float64),
                                "complexity": np.asarray(cx, dtype=np.float32),
                                "keys": t.column("key").to_pylist() if a.with_keys else None}


def _check_shard_totals(a: _Audit, r: dict, t, ex: np.ndarray, g: np.ndarray) -> None:
    """One shard's row count, GFLOP sum, exit counts, scorer GFLOPs and input shard equal its manifest row's."""
    where, n, scorer = r["output"], t.num_rows, a.scorer
    if n != r["rows"]:
        a.problems.append(f"{where} has {n} rows but {MANIFEST} records {r['rows']}")
    if not gflops_agree(float(g.sum()), float(r["gflops"])):
        a.problems.append(f"{where}: its rows' gflops sum to {g.sum():.6f} but {MANIFEST} records {r['gflops']:.6f}")
    a.manifest_gflops += float(r["gflops"])
    a.rows_gflops += float(g.sum())
    depths, counts = np.unique(ex, return_counts=True)
    seen = {str(int(d)): int(c) for d, c in zip(depths, counts)}
    a.counts_all.update({int(d): int(c) for d, c in zip(depths, counts)})
    recorded = {str(k): int(v) for k, v in json.loads(r["exit_counts"] or "{}").items()}
    if seen != recorded:
        a.problems.append(f"{where}: exit counts {seen} differ from {MANIFEST}'s {recorded}")
    if not gflops_agree(float(r["scorer_gflops"]), scorer * n):
        a.problems.append(f"{where}: {MANIFEST} records {r['scorer_gflops']:.6f} scorer GFLOPs, but {n} rows "
                          f"x {scorer} (run.json scorer_gflops) = {scorer * n:.6f}")
    sources = set(t.column("source").unique().to_pylist())
    if sources - {r["source"]}:
        a.problems.append(f"{where}: rows name input shard(s) {sorted(sources)[:3]} but {MANIFEST} says "
                          f"{r['source']!r}")


def _check_row_costs(a: _Audit, where: str, ex: np.ndarray, g32: np.ndarray, lookup: np.ndarray,
                     profile_costs: dict[int, np.ndarray]) -> None:
    """Each row spent exactly its exit's figure (+ scorer), or one of its depth's profile figures."""
    n = ex.size
    known = (ex >= 0) & (ex < lookup.size)
    expected = np.full(n, np.nan, np.float32)
    expected[known] = lookup[ex[known]]
    if profile_costs:
        expected[:] = np.nan
        for d, vals in profile_costs.items():
            at = ex == d
            if at.any():
                expected[at] = vals[np.abs(g32[at, None] - vals[None, :]).argmin(axis=1)]
        a.recomputed_profiles += float(np.nansum(expected.astype(np.float64)))
    bad = np.flatnonzero(~np.isclose(g32, expected, rtol=GFLOP_RTOL, atol=1e-6))
    a.n_violations += bad.size
    for k in bad[: max(0, MAX_LISTED_PROBLEMS - len(a.violations))]:
        a.violations.append({"shard": where, "row": int(k), "exit_layer": int(ex[k]), "gflops": float(g32[k]),
                             "expected": None if np.isnan(expected[k]) else float(expected[k])})


def check_error_files(a: _Audit) -> None:
    """Failed-sample files match the manifest's error counts; collect input shards that failed as a whole.

    Failed samples of committed shards are in errors/ under the shard's part name; a file for a part that is
    not committed records an input shard that failed as a whole (stage "shard").
    """
    by_part = {posixpath.basename(r["output"]): r for r in a.manifest}
    committed_sources = {r["source"] for r in a.manifest}
    for name, url in sorted(a.error_files.items()):
        et = read_part(url, a.so, ["key", "source", "stage", "error"])
        r = by_part.get(name)
        if r is not None:
            if et.num_rows != r["errors"]:
                a.problems.append(f"{ERROR_DIR}/{name} has {et.num_rows} failed samples but {MANIFEST} records "
                                  f"{r['errors']}")
            a.stages_of[name] = et.column("stage").to_pylist()
            continue
        stages = set(et.column("stage").to_pylist())
        if stages != {"shard"}:
            a.problems.append(f"{ERROR_DIR}/{name} holds failed samples ({sorted(stages)}) of part {name} whose shard "
                              f"is not committed (an interrupted commit; re-run `icar embed` with the same arguments)")
            continue
        for row in et.to_pylist():
            if row["source"] in committed_sources:
                continue  # an earlier failure of an input shard that a later invocation committed
            a.failed_shards.append({"source": row["source"], "part": name, "message": row["error"]})
    for name, r in by_part.items():
        if r["errors"] and name not in a.error_files:
            a.problems.append(f"{MANIFEST} records {r['errors']} failed samples for part {r['part']} but "
                              f"{ERROR_DIR}/{name} is missing")


# The audit, in order: each check appends what disagrees to the audit's problems (any refuses the run).
CHECKS = (check_manifest_unique, check_manifest_outputs, check_shard_files, check_shards, check_error_files)


def _refuse_problems(a: _Audit) -> None:
    """Raise AuditError listing the files' disagreements, if any."""
    if not a.problems:
        return
    listed_problems = "\n  - ".join(a.problems[:MAX_LISTED_PROBLEMS])
    more = f"\n  ... and {len(a.problems) - MAX_LISTED_PROBLEMS} more" if len(a.problems) > MAX_LISTED_PROBLEMS else ""
    raise AuditError(f"refusing to report {a.run}: its manifest and shard files disagree in {len(a.problems)} "
                     f"place(s), so its totals cannot be trusted:\n  - {listed_problems}{more}")


def _refuse_row_violations(a: _Audit, unknown_depths: list[int]) -> None:
    """Raise AuditError naming the rows whose gflops break run.json's cost model (strict audits)."""
    if not a.n_violations:
        return
    profiled = bool(a.profile_costs())
    shown = "\n  - ".join(f"{v['shard']} row {v['row']}: exit_layer {v['exit_layer']} recorded {v['gflops']:.6g} "
                          f"GFLOPs, run.json says {v['expected']}" for v in a.violations)
    raise AuditError(
        f"refusing to report {a.run}: {a.n_violations} row(s) recorded GFLOPs that differ from run.json's "
        f"{'profiles (one of those at' if profiled else 'gflops_per_exit for'} their exit_layer"
        f"{')' if profiled else ''} + scorer_gflops ({a.scorer})"
        + (f"; exit depths {unknown_depths} are not in exits {a.exits}" if unknown_depths else "")
        + f":\n  - {shown}\n(pass --allow-gflops-mismatch to report them anyway, marked FAILED)")


def load_run(run: str, storage_options: dict | None = None, since: str | None = None, until: str | None = None,
             strict: bool = True, with_keys: bool = False) -> RunData:
    """Return run ``run`` read and audited; raise AuditError when its files disagree (listing every problem).

    The audit (``CHECKS``) covers all committed shards; ``since``/``until`` then select shards by their commit time.
    """
    so = dict(storage_options or {})
    run = run.rstrip("/") or run
    t_since, t_until = parse_time(since, "--since"), parse_time(until, "--until")
    info = _read_run_json(run, so)
    a = _Audit(run=run, so=so, with_keys=with_keys, info=info, manifest=_read_manifest(run, so))
    for check in CHECKS:
        check(a)
    _refuse_problems(a)
    per_exit, scorer, manifest = a.per_exit, a.scorer, a.manifest
    unknown_depths = sorted(set(a.counts_all) - set(per_exit))
    recomputed = sum(c * per_exit.get(d, math.nan) for d, c in a.counts_all.items()) \
        + scorer * sum(a.counts_all.values())
    if a.profile_costs():
        recomputed = a.recomputed_profiles
    if strict:
        _refuse_row_violations(a, unknown_depths)

    chosen = [r for r in manifest if _in_period(r["committed_at"], t_since, t_until)]
    arrays: dict[str, list] = {"complexity": [], "exit_layer": [], "gflops": [], "row_shard": [], "keys": []}
    errors_by_stage: Counter = Counter()
    for j, r in enumerate(chosen):
        rows = a.rows_of.pop(r["part"])
        for k in ("complexity", "exit_layer", "gflops"):
            arrays[k].append(rows[k])
        arrays["row_shard"].append(np.full(rows["exit_layer"].size, j, np.int32))
        if with_keys:
            arrays["keys"].extend(rows["keys"])
        errors_by_stage.update(a.stages_of.get(posixpath.basename(r["output"]), []))
    if a.failed_shards:
        errors_by_stage["shard"] += len(a.failed_shards)

    cat = (lambda xs, dtype: np.concatenate(xs).astype(dtype) if xs else np.zeros(0, dtype))
    invocations = [i for i in info.get("invocations") or [] if _in_period(i.get("started"), t_since, t_until)]
    status = "FAILED" if a.n_violations else "passed"
    rows_gflops, manifest_gflops = a.rows_gflops, a.manifest_gflops
    audit = {
        "status": status,
        "shards": len(manifest),
        "rows": int(sum(a.counts_all.values())),
        "gflops_rows": rows_gflops,
        "gflops_manifest": manifest_gflops,
        "gflops_recomputed": recomputed,
        "max_difference": max(abs(rows_gflops - manifest_gflops), abs(rows_gflops - recomputed)),
        "row_violations": a.n_violations,
        "violation_examples": a.violations,
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
                   failed_shards=a.failed_shards, errors_by_stage=dict(errors_by_stage), invocations=invocations,
                   audit=audit)
