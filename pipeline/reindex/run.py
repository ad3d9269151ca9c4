"""Scheduled incremental reindex: embed what is new or changed, retire what is gone, publish a verified index.

One job config (pipeline/reindex/jobconfig.py) owns one output ROOT::

    ROOT/reindex.lock                      held while a run writes ROOT (pipeline/io/lock.py)
    ROOT/generations/g0001/run/            the run directory of one model generation (`icar embed` layout)
    ROOT/generations/g0001/generation.json when and why the generation started, with which model spec
    ROOT/generations/g0001/retired/<id>/   shards of inputs that disappeared, moved out of the run + retired.json
    ROOT/indexes/v0003/                    a complete index directory (index.faiss, ids.parquet, index.json)
    ROOT/indexes/v0003/reindex.json        how v0003 was built and verified (decision, numbers, checks)
    ROOT/indexes/LATEST                    {"version": "v0003", ...}: the one version readers use
    ROOT/reindex-log/<reindex id>.json     one record per run: what was embedded, retired, built, published

A run, under the lock:

1. finish any retirement a crash interrupted (see ``retire_inputs``);
2. list the inputs and compare them with the manifest (the source of truth): new, changed (size/mtime/ETag),
   unchanged, disappeared; stop (exit 7) before touching anything when more than ``max_retire_fraction``
   of the committed inputs disappeared at once (an outage or a wrong glob looks exactly like that);
3. embed new and changed inputs (`run_embed`, ``reembed_changed``). A different model, exits, heads, router
   or scorer never mixes with the generation's shards: the run stops (``on_model_change: refuse``, exit 6),
   or starts generation g+1 and embeds every input into it (``new_generation``). With nothing to embed and
   an unchanged model spec, no model actor is started at all;
4. retire disappeared inputs: their manifest rows are dropped and their shards moved to ``retired/``, so the
   next index (which indexes exactly the manifest's shards) no longer holds their keys;
5. when the manifest differs from the one LATEST was built from, build ``indexes/vNNNN`` (adding into the
   previous version's trained index, or training afresh: ``decide_index_build`` decides with numbers and
   the decision is recorded), verify it (opens with faiss.read_index, ntotal = ids = manifest rows, model
   key, measured recall >= target) and only then rewrite LATEST, atomically (a local rename or a single
   object PUT). Readers that follow LATEST (``resolve_latest``) never see a partial or unverified index;
6. keep ``retention.keep_versions`` verified versions (LATEST included), delete older ones;
7. write the run's record to ``reindex-log/`` (also when the run failed) and release the lock.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import hashlib
import json
import logging
import math
import os
import re
import socket
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field

from pipeline.io import storage
from pipeline.reindex.jobconfig import ConfigError, JobConfig, config_summary
from pipeline.io.lock import LockHeld, LockLost, RootLock
from pipeline.io.schema import ERROR_DIR, RUN_JSON, part_name
from pipeline.runtime import EXIT_INTERRUPTED, EXIT_TERMINATED  # chosen by runtime.stop_reason, as for `icar embed`

log = logging.getLogger(__name__)

GENERATIONS = "generations"
RUN_DIR = "run"
RETIRED = "retired"
GENERATION_JSON = "generation.json"
INDEXES = "indexes"
LATEST = "LATEST"
VERSION_RECORD = "reindex.json"
LOG_DIR = "reindex-log"
LOCK_FILE = "reindex.lock"
TRAINED_FILE = "trained.faiss"  # written by pipeline.index.build with the trained-index patch (team/patches)

# Exit codes a scheduler can act on (documented in `icar reindex --help` and the README).
EXIT_OK = 0
EXIT_SHARDS_FAILED = 1
EXIT_CONFIG = 2
EXIT_LOCKED = 4
EXIT_VERIFY = 5
EXIT_MODEL_CHANGED = 6
EXIT_SAFETY = 7
EXIT_ERROR = 8
EXIT_CODES = {
    EXIT_OK: "ok: LATEST is current (a new version was published, or nothing changed)",
    EXIT_SHARDS_FAILED: "some input shards failed after retries; the index was built from the rest and published",
    EXIT_CONFIG: "config or input error (bad field, inputs match nothing, index budget impossible): fix the config",
    EXIT_LOCKED: "another run holds the root's lock (or took it over from this run): nothing was written",
    EXIT_VERIFY: "the new index failed verification: LATEST was not moved; the version is kept for inspection",
    EXIT_MODEL_CHANGED: "the model/exits/heads/router/scorer differ from the root's generation and "
                        "on_model_change is refuse: nothing was written",
    EXIT_SAFETY: "more inputs disappeared than max_retire_fraction allows: nothing was retired or written",
    EXIT_ERROR: "unexpected error (see the log and the reindex-log record)",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C): the lock was released; committed shards are kept and the next run "
                      "resumes; LATEST was not moved unless the publish step had finished",
    EXIT_TERMINATED: "terminated (SIGTERM): the lock was released; committed shards are kept and the next run "
                     "resumes; LATEST was not moved unless the publish step had finished",
}

# ModelSpec fields that decide what is computed; device/precision/threads only decide how fast.
SPEC_IDENTITY = ("model", "pretrained", "seed", "exits", "heads", "router", "exit_at", "full_depth",
                 "route_fractions", "scorer", "scorer_checkpoint")


class ReindexError(RuntimeError):
    """A run stopped for a reason a scheduler can act on; ``exit_code`` says which (EXIT_CODES)."""

    exit_code = EXIT_ERROR


class VerificationError(ReindexError):
    """A built index did not pass verification; ``problems`` lists why, ``checks`` what was measured."""

    exit_code = EXIT_VERIFY

    def __init__(self, where: str, problems: list[str], checks: dict):
        super().__init__(f"{where} failed verification: " + "; ".join(problems))
        self.problems = problems
        self.checks = checks


class ModelChangedError(ReindexError):
    """The configured model differs from the generation's and the job is configured to refuse."""

    exit_code = EXIT_MODEL_CHANGED


class SafetyStop(ReindexError):
    """Too many inputs disappeared at once to retire them without a person looking."""

    exit_code = EXIT_SAFETY


# ------------------------------------------------------------------------------------------- layout


def gen_name(n: int) -> str:
    """Return the name of generation ``n``: g0001."""
    return f"g{n:04d}"


def version_name(n: int) -> str:
    """Return the name of index version ``n``: v0001."""
    return f"v{n:04d}"


def generation_dir(root: str, gen: str) -> str:
    """Return the URL of generation ``gen`` under ``root``."""
    return storage.join(root, GENERATIONS, gen)


def run_dir(root: str, gen: str) -> str:
    """Return the run directory of generation ``gen``."""
    return storage.join(generation_dir(root, gen), RUN_DIR)


def version_dir(root: str, version: str) -> str:
    """Return the index directory of ``version``."""
    return storage.join(root, INDEXES, version)


def _numbered(url: str, prefix: str, storage_options: dict | None) -> list[int]:
    """Return the numbers N of the children named <prefix>NNNN under ``url``, sorted."""
    fs, path = storage.filesystem(url, storage_options)
    fs.invalidate_cache(path)
    try:
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
    except FileNotFoundError:
        return []
    pattern = re.compile(rf"{prefix}(\d{{4,}})")
    return sorted(int(m.group(1)) for n in names if (m := pattern.fullmatch(n)))


def list_generations(root: str, storage_options: dict | None = None) -> list[int]:
    """Return the generation numbers under ``root``."""
    return _numbered(storage.join(root, GENERATIONS), "g", storage_options)


def list_versions(root: str, storage_options: dict | None = None) -> list[int]:
    """Return the index version numbers under ``root`` (complete or not)."""
    return _numbered(storage.join(root, INDEXES), "v", storage_options)


def read_latest(root: str, storage_options: dict | None = None) -> dict | None:
    """Return the LATEST pointer of ``root`` ({"version", "path", "generation", ...}), or None before the first."""
    url = storage.join(root, INDEXES, LATEST)
    try:
        return storage.read_json(url, storage_options)
    except FileNotFoundError:
        return None


def resolve_latest(root: str, storage_options: dict | None = None) -> str:
    """Return the index directory that ROOT/indexes/LATEST points to (for pipeline.index.search.Searcher and others).

    The version is resolved relative to ROOT, so a root that was copied or mounted elsewhere still resolves.
    The directory is complete and verified: LATEST is only ever written after verification.
    """
    latest = read_latest(root, storage_options)
    if latest is None:
        raise FileNotFoundError(f"{root} has no {INDEXES}/{LATEST}: no index was published there yet "
                                f"(run `icar reindex --config JOB.yaml`)")
    path = version_dir(root, latest["version"])
    if not storage.exists(storage.join(path, "index.json"), storage_options):
        raise FileNotFoundError(f"{root}/{INDEXES}/{LATEST} points to {latest['version']}, which has no index.json: "
                                f"it was deleted by hand or by a retention of 1 while you read it; read LATEST again")
    return path


# ------------------------------------------------------------------------------------------- inputs


@dataclass
class InputPlan:
    """How the listed inputs compare with the manifest of the generation's run."""

    listed: int
    new: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    unchanged: int = 0
    disappeared: list[dict] = field(default_factory=list)  # manifest rows whose input is no longer listed

    def to_dict(self) -> dict:
        return {"listed": self.listed, "new": self.new, "changed": self.changed, "unchanged": self.unchanged,
                "disappeared": [r["source"] for r in self.disappeared]}


def plan_inputs(shards: list, manifest_rows: list[dict]) -> InputPlan:
    """Return which listed input shards are new, changed or unchanged, and which committed ones disappeared."""
    from pipeline.io.rundir import changed_since_commit

    committed = {r["source"]: r for r in manifest_rows}
    plan = InputPlan(listed=len(shards))
    for shard in shards:
        row = committed.get(shard.uri)
        if row is None:
            plan.new.append(shard.uri)
        elif changed_since_commit(shard, row):
            plan.changed.append(shard.uri)
        else:
            plan.unchanged += 1
    listed = {s.uri for s in shards}
    plan.disappeared = [r for r in manifest_rows if r["source"] not in listed]
    return plan


def spec_differences(run_json: dict | None, spec) -> list[str]:
    """Return the identity fields of ModelSpec ``spec`` that differ from the spec recorded in run.json."""
    recorded = (run_json or {}).get("spec")
    if not isinstance(recorded, dict):
        return ["spec (not recorded)"] if run_json is not None else []
    now = dataclasses.asdict(spec)
    return [f for f in SPEC_IDENTITY if recorded.get(f) != now.get(f)]


def manifest_digest(rows: list[dict]) -> str:
    """Return a digest of the committed shards: equal digests mean the same vectors would be indexed."""
    keyed = sorted([r["source"], r["output"], int(r["rows"]), r.get("committed_at"), r.get("source_etag"),
                    r.get("source_size"), r.get("source_mtime")] for r in rows)
    return "sha256:" + hashlib.sha256(json.dumps(keyed).encode()).hexdigest()


# ------------------------------------------------------------------------------------------- retirement


def _move(src: str, dst: str, storage_options: dict | None) -> bool:
    """Move ``src`` to ``dst`` (local rename; copy + delete on object stores); return False when src is gone."""
    fs, s = storage.filesystem(src, storage_options)
    _, d = storage.filesystem(dst, storage_options)
    fs.invalidate_cache(s)
    if not fs.exists(s):
        return False
    if storage.is_local(fs):
        os.makedirs(os.path.dirname(d), exist_ok=True)
        os.replace(s, d)
    else:
        fs.copy(s, d)
        fs.rm(s)
    return True


def retire_inputs(run: str, gen_url: str, rows: list[dict], reindex_id: str,
                  storage_options: dict | None = None) -> list[dict]:
    """Drop the manifest rows of disappeared inputs and move their shards to retired/<id>/; return what was retired.

    Crash-safe order: (1) write retired/<id>/retired.json (the intent, complete=false); (2) rewrite the
    manifest without the rows (atomic), from which moment the next index no longer holds their keys;
    (3) move the shard and error files; (4) mark the intent complete. A crash after (1) is finished by
    ``complete_retirements`` at the start of the next run, before anything is embedded (so neither a new
    input can reuse the part number nor `icar embed` delete the unlisted shard as an orphan first).
    """
    if not rows:
        return []
    target = storage.join(gen_url, RETIRED, reindex_id)
    entries = [{"source": r["source"], "part": int(r["part"]), "output": r["output"], "rows": int(r["rows"]),
                "errors": int(r["errors"]), "committed_at": r.get("committed_at"),
                "moved_to": storage.join(target, part_name(int(r["part"])))} for r in rows]
    intent = {"reindex_id": reindex_id, "retired_at": _now(), "complete": False, "run": run, "inputs": entries}
    storage.write_json(intent, storage.join(target, "retired.json"), storage_options)
    _finish_retirement(run, target, intent, storage_options)
    return entries


def _finish_retirement(run: str, target: str, intent: dict, storage_options: dict | None) -> None:
    """Do steps (2)-(4) of ``retire_inputs``; idempotent, so a crashed retirement is finished the same way."""
    from pipeline.io.shards import Manifest

    entries = intent["inputs"]
    manifest = Manifest(run, storage_options)
    doomed = {(e["source"], e["output"], e["committed_at"]) for e in entries}
    kept = [r for r in manifest.rows if (r["source"], r["output"], r.get("committed_at")) not in doomed]
    if len(kept) != len(manifest.rows):
        manifest.rows = kept
        manifest.write()
    listed = {r["output"] for r in kept}
    for e in entries:
        if e["output"] in listed:  # the part was committed again meanwhile: that shard is live, leave it
            continue
        moved = _move(storage.join(run, e["output"]), e["moved_to"], storage_options)
        name = part_name(e["part"])
        _move(storage.join(run, ERROR_DIR, name), storage.join(target, f"errors-{name}"), storage_options)
        if moved:
            log.info("retired %s: %d rows, shard moved to %s", e["source"], e["rows"], e["moved_to"])
    intent["complete"] = True
    storage.write_json(intent, storage.join(target, "retired.json"), storage_options)


def complete_retirements(root: str, gen: str, storage_options: dict | None = None) -> list[str]:
    """Finish retirements a crash left incomplete in generation ``gen``; return their ids."""
    gen_url = generation_dir(root, gen)
    base = storage.join(gen_url, RETIRED)
    fs, path = storage.filesystem(base, storage_options)
    fs.invalidate_cache(path)
    try:
        ids = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
    except FileNotFoundError:
        return []
    finished = []
    for rid in ids:
        url = storage.join(base, rid, "retired.json")
        if not storage.exists(url, storage_options):
            continue
        intent = storage.read_json(url, storage_options)
        if not intent.get("complete"):
            log.warning("finishing retirement %s that an interrupted run left incomplete", rid)
            _finish_retirement(run_dir(root, gen), storage.join(base, rid), intent, storage_options)
            finished.append(rid)
    return finished


# ------------------------------------------------------------------------------------------- index decision


@dataclass
class IndexDecision:
    """Train a fresh index, or add every vector into the previous version's trained (empty) index."""

    mode: str  # "train" | "reuse"
    reasons: list[str]  # why, in words (all rules that fired; for reuse, why each rule passed)
    numbers: dict  # the figures the rules compared
    trained_from: str | None = None  # URL of the trained.faiss reused (mode "reuse")
    factory: str | None = None  # the factory of the reused index (mode "reuse")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def guideline_nlist(n: int) -> float:
    """Return the FAISS guideline's list count for ``n`` vectors (4*sqrt(N) below 1M, then its table), capped so
    that k-means gets >= 39 training points per list."""
    if n < 1_000_000:
        wanted = 4 * math.sqrt(n)
    elif n < 10_000_000:
        wanted = 65536
    elif n < 100_000_000:
        wanted = 262144
    else:
        wanted = 1_048_576
    return min(wanted, n / 39)


def reuse_supported() -> bool:
    """Return True when pipeline.index.build can add into a given trained index (IndexConfig.trained_index)."""
    from pipeline.index.build import IndexConfig

    return "trained_index" in {f.name for f in dataclasses.fields(IndexConfig)}


def decide_index_build(n: int, dim: int, previous: dict | None, settings, supports_reuse: bool) -> IndexDecision:
    """Return whether to retrain or reuse the previous version's trained index for ``n`` vectors, and why.

    ``previous`` describes the version LATEST points to in the same generation (None: there is none):
    its factory, kind, nlist, pq_m, opq, coarse, settings, measured recall and nprobe, and its training
    lineage (``trained``: version, ntotal, nprobe at training). ``settings`` is the job's IndexSettings.

    Retrain when any of these holds (the figures are recorded either way):
    - no previous index in this generation, reuse is off, or the previous one is Flat (nothing trained);
    - the index settings (max_memory, factory, flat_below) changed since;
    - a fresh choice for N vectors within the budget is a different structure (kind, PQ code size, OPQ,
      coarse quantizer): e.g. the budget no longer holds the old code size at this N;
    - the corpus grew more than ``retrain_growth`` times since the index was trained: the centroids and
      codebooks saw a sample of a corpus less than half this size (distribution drift);
    - with an automatic choice, the FAISS guideline (4*sqrt(N) lists, at most N/39 so k-means gets 39
      points per list) now asks for ``retrain_list_growth`` times more lists than the index has: lists
      are that much longer than intended, and so is every probe;
    - the previous version's measured recall was below the target, or the nprobe it needed grew
      ``retrain_nprobe_growth`` times since training (both signs of drift);
    - this build of pipeline.index.build cannot add into a trained index, or the trained file is missing.
    Otherwise reuse: training (the cost, minutes to hours at scale) is skipped; the build still tunes
    nprobe and measures recall, and a reused build that misses the target is rebuilt with training.
    """
    from pipeline.index.params import BudgetError, choose_index_params, parse_size

    numbers: dict = {"n": n}
    retrain: list[str] = []
    passed: list[str] = []
    if previous is None:
        return IndexDecision("train", ["first index of this generation: nothing trained to reuse"], numbers)
    numbers["previous_version"] = previous.get("version")
    if not settings.reuse_trained:
        retrain.append("index.reuse_trained is false")
    if previous.get("kind") == "flat" or not previous.get("nlist") and not previous.get("pq_m"):
        retrain.append(f"the previous index ({previous.get('factory')}) is exact search with nothing trained; "
                       f"the automatic choice is made afresh for {n:,} vectors")
        return IndexDecision("train", retrain, numbers)

    now_settings = {"max_memory": settings.max_memory, "factory": settings.factory, "flat_below": settings.flat_below}
    old_settings = previous.get("settings") or {}
    changed = {k: (old_settings.get(k), v) for k, v in now_settings.items() if old_settings.get(k) != v}
    if changed:
        retrain.append("index settings changed since the previous version: " + ", ".join(
            f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()))

    try:
        fresh = choose_index_params(n, dim, parse_size(settings.max_memory), None, factory=settings.factory,
                                    code_bytes=previous.get("code_bytes_per_vector") if settings.factory else None,
                                    flat_below=settings.flat_below)
        numbers["fresh_factory"] = fresh.factory
        structure = lambda p: (p.get("kind"), p.get("pq_m") or 0, bool(p.get("opq")), p.get("coarse") or "")
        old_s = structure(previous)
        new_s = (fresh.kind, fresh.m, fresh.opq, fresh.coarse)
        if fresh.kind != "custom" and old_s != new_s:
            retrain.append(f"a fresh choice for {n:,} vectors within max_memory {settings.max_memory} is "
                           f"{fresh.factory}, not the structure of the trained {previous.get('factory')}")
        else:
            passed.append(f"a fresh choice ({fresh.factory}) has the trained index's structure")
    except (BudgetError, ValueError) as e:
        numbers["fresh_factory"] = None
        retrain.append(f"no index fits the settings for {n:,} vectors ({e}); the build will say so")

    trained = previous.get("trained") or {}
    n0 = trained.get("ntotal")
    numbers["trained_version"] = trained.get("version")
    numbers["n_at_training"] = n0
    if n0:
        growth = n / n0
        numbers["growth_since_training"] = round(growth, 4)
        if growth > settings.retrain_growth:
            retrain.append(f"the corpus grew {growth:.2f}x since the index was trained in {trained.get('version')} "
                           f"({n0:,} -> {n:,} vectors), more than index.retrain_growth {settings.retrain_growth:g}")
        else:
            passed.append(f"grew {growth:.2f}x since training ({n0:,} -> {n:,}), within {settings.retrain_growth:g}x")
    else:
        retrain.append("the previous version does not record the corpus size it was trained on")

    nlist = int(previous.get("nlist") or 0)
    if nlist:
        guide = guideline_nlist(n)
        numbers.update(nlist=nlist, guideline_nlist=round(guide, 1), vectors_per_list=round(n / nlist, 1))
        if trained.get("train_size"):
            numbers["train_points_per_list_at_training"] = round(trained["train_size"] / nlist, 1)
        if settings.factory:
            passed.append(f"nlist {nlist} is fixed by index.factory")
        elif guide / nlist >= settings.retrain_list_growth:
            retrain.append(f"the FAISS guideline for {n:,} vectors is ~{guide:.0f} lists (4*sqrt(N), at most N/39), "
                           f"{guide / nlist:.1f}x the trained {nlist}: lists hold {n / nlist:.0f} vectors each")
        else:
            passed.append(f"{nlist} lists of ~{n / nlist:.0f} vectors are within {settings.retrain_list_growth:g}x "
                          f"of the guideline's ~{guide:.0f}")

    recall = previous.get("recall_min")
    numbers["recall_previous"] = recall
    numbers["target_recall"] = settings.target_recall
    if recall is not None and recall < settings.target_recall:
        retrain.append(f"the previous version's measured recall@{previous.get('k', 10)} {recall:.3f} is below the "
                       f"target {settings.target_recall}")
    nprobe, nprobe0 = previous.get("nprobe"), trained.get("nprobe")
    numbers["nprobe_previous"], numbers["nprobe_at_training"] = nprobe, nprobe0
    if nprobe and nprobe0 and nprobe / nprobe0 >= settings.retrain_nprobe_growth:
        retrain.append(f"nprobe for the target grew {nprobe / nprobe0:.1f}x since training ({nprobe0} -> {nprobe})")

    if not supports_reuse:
        retrain.append("this build of pipeline.index.build cannot add into a trained index (IndexConfig has no "
                       "trained_index: see team/patches/index-trained-reuse.diff)")
    elif not previous.get("trained_file"):
        retrain.append(f"the previous version has no {TRAINED_FILE} to reuse")
    if retrain:
        return IndexDecision("train", retrain, numbers)
    return IndexDecision("reuse", [f"reusing the index trained in {trained.get('version')}: " + "; ".join(passed)],
                         numbers, trained_from=previous["trained_file"], factory=previous.get("factory"))


def recall_min(info: dict) -> float | None:
    """Return the lowest measured recall at the chosen nprobe over the query kinds of an index.json."""
    values = [r["at_nprobe"] for r in (info.get("recall") or {}).values()
              if isinstance(r, dict) and r.get("at_nprobe") is not None]
    return min(values) if values else None


def previous_version(root: str, latest: dict | None, gen: str, storage_options: dict | None) -> dict | None:
    """Return what ``decide_index_build`` needs of the version LATEST points to, if it belongs to ``gen``."""
    if latest is None or latest.get("generation") != gen:
        return None
    vdir = version_dir(root, latest["version"])
    try:
        info = storage.read_json(storage.join(vdir, "index.json"), storage_options)
        record = storage.read_json(storage.join(vdir, VERSION_RECORD), storage_options)
    except FileNotFoundError:
        return None
    trained_file = storage.join(vdir, TRAINED_FILE)
    return {
        "version": latest["version"], "factory": info.get("factory"), "kind": info.get("kind"),
        "nlist": info.get("nlist"), "pq_m": info.get("pq_m"), "opq": info.get("opq"),
        "coarse": info.get("coarse_quantizer"), "code_bytes_per_vector": info.get("code_bytes_per_vector"),
        "ntotal": info.get("ntotal"), "nprobe": info.get("nprobe"), "k": info.get("k"),
        "recall_min": recall_min(info), "settings": record.get("index_settings"), "trained": record.get("trained"),
        "trained_file": trained_file if storage.exists(trained_file, storage_options) else None,
    }


# ------------------------------------------------------------------------------------------- verification


def verify_index(index_dir: str, expected_rows: int, expected_model_key: str, target_recall: float,
                 open_index: bool = True, storage_options: dict | None = None) -> dict:
    """Return the checks of a built index directory; raise VerificationError listing every failed check.

    Checks: index.json is there; its ntotal, the rows of ids.parquet and (``open_index``) the ntotal of
    the index read back with faiss.read_index all equal ``expected_rows`` (the manifest's rows after
    retirement); the model key matches the run's; the recall measured at the chosen nprobe reaches
    ``target_recall`` for every query kind measured.
    """
    import pyarrow.parquet as pq

    from pipeline.index.build import IDS_FILE, INDEX_FILE, INDEX_JSON

    problems: list[str] = []
    checks: dict = {"expected_rows": expected_rows}
    try:
        info = storage.read_json(storage.join(index_dir, INDEX_JSON), storage_options)
    except FileNotFoundError:
        raise VerificationError(index_dir, [f"{INDEX_JSON} is missing: the build did not finish"], checks) from None
    checks["index_json_ntotal"] = info.get("ntotal")
    if info.get("ntotal") != expected_rows:
        problems.append(f"index.json ntotal {info.get('ntotal')} != {expected_rows} rows in the manifest")
    checks["model_key"] = info.get("model_key")
    if info.get("model_key") != expected_model_key:
        problems.append(f"model key {info.get('model_key')!r} != the run's {expected_model_key!r}")
    fs, ids_path = storage.filesystem(storage.join(index_dir, IDS_FILE), storage_options)
    try:
        with fs.open(ids_path, "rb") as f:
            checks["ids_rows"] = pq.ParquetFile(f).metadata.num_rows
        if checks["ids_rows"] != expected_rows:
            problems.append(f"{IDS_FILE} has {checks['ids_rows']} rows, expected {expected_rows}")
    except (FileNotFoundError, OSError, ValueError) as e:
        problems.append(f"{IDS_FILE} cannot be read: {e}")
    if open_index:
        try:
            checks["faiss_ntotal"] = _open_ntotal(index_dir, info, storage_options)
            if checks["faiss_ntotal"] != expected_rows:
                problems.append(f"{INDEX_FILE} holds {checks['faiss_ntotal']} vectors, expected {expected_rows}")
        except Exception as e:  # any failure to read the index back is a verification failure, with its reason
            problems.append(f"{INDEX_FILE} cannot be opened with faiss.read_index: {type(e).__name__}: {e}")
    recall = {kind: r.get("at_nprobe") for kind, r in (info.get("recall") or {}).items()
              if isinstance(r, dict) and r.get("at_nprobe") is not None}
    checks["recall"] = recall
    checks["target_recall"] = target_recall
    checks["nprobe"] = info.get("nprobe")
    if not recall:
        problems.append("index.json records no measured recall")
    for kind, value in recall.items():
        if value < target_recall:
            problems.append(f"{kind} recall@{info.get('k')} {value:.3f} at nprobe {info.get('nprobe')} is below the "
                            f"target {target_recall}")
    checks["passed"] = not problems
    if problems:
        raise VerificationError(index_dir, problems, checks)
    return checks


def _open_ntotal(index_dir: str, info: dict, storage_options: dict | None) -> int:
    """Return ntotal of the index read back from ``index_dir`` (downloaded first from an object store)."""
    import faiss

    from pipeline.index.build import INDEX_FILE, IVFDATA_FILE, read_index_file

    fs, path = storage.filesystem(storage.join(index_dir, INDEX_FILE), storage_options)
    ondisk = bool(info.get("ivfdata"))
    flags = faiss.IO_FLAG_ONDISK_SAME_DIR if ondisk else 0
    if storage.is_local(fs):
        return int(read_index_file(path, flags).ntotal)
    with tempfile.TemporaryDirectory(prefix="icar-verify-") as d:
        local = os.path.join(d, INDEX_FILE)
        fs.get_file(path, local)
        if ondisk:
            fs.get_file(storage.filesystem(storage.join(index_dir, IVFDATA_FILE), storage_options)[1],
                        os.path.join(d, IVFDATA_FILE))
        return int(read_index_file(local, flags, url=storage.join(index_dir, INDEX_FILE)).ntotal)


# ------------------------------------------------------------------------------------------- retention


def apply_retention(root: str, keep_versions: int, storage_options: dict | None = None,
                    delete_old_generations: bool = False, current_gen: str | None = None) -> dict:
    """Delete index versions beyond ``keep_versions`` verified ones (LATEST always kept); return what happened.

    Kept: the version LATEST points to, the newest ``keep_versions - 1`` verified versions before it, and
    the newest unverified version after it (a failed build, for inspection until the next success).
    Deleted: every other version, including failed or partial ones older than LATEST. Readers that resolved
    LATEST just before a switch still find their version: it is the newest kept one before LATEST (use
    keep_versions >= 2 when readers may hold a resolved path across a whole reindex).
    """
    latest = read_latest(root, storage_options)
    latest_n = int(latest["version"][1:]) if latest else None
    versions = list_versions(root, storage_options)
    records = {}
    for v in versions:
        try:
            records[v] = storage.read_json(storage.join(version_dir(root, version_name(v)), VERSION_RECORD),
                                           storage_options)
        except FileNotFoundError:
            records[v] = {}
    keep: set[int] = set()
    if latest_n is not None:
        keep.add(latest_n)
        older = sorted((v for v in versions if v < latest_n and records[v].get("verified")), reverse=True)
        keep.update(older[: max(0, keep_versions - 1)])
    newer = [v for v in versions if latest_n is None or v > latest_n]
    if newer:
        keep.add(max(newer))
    deleted = []
    for v in versions:
        if v in keep:
            continue
        url = version_dir(root, version_name(v))
        fs, path = storage.filesystem(url, storage_options)
        fs.rm(path, recursive=True)
        deleted.append(version_name(v))
        log.info("retention: deleted index version %s", version_name(v))
    out = {"kept": [version_name(v) for v in sorted(keep)], "deleted": deleted, "deleted_generations": []}
    if delete_old_generations and current_gen:
        used = {records[v].get("generation") for v in keep} | {current_gen}
        for g in list_generations(root, storage_options):
            name = gen_name(g)
            if name not in used:
                fs, path = storage.filesystem(generation_dir(root, name), storage_options)
                fs.rm(path, recursive=True)
                out["deleted_generations"].append(name)
                log.info("retention: deleted generation %s (no kept index version uses it)", name)
    return out


# ------------------------------------------------------------------------------------------- the run


@dataclass
class ReindexResult:
    """What a reindex run did: its exit code and its record (also written to ROOT/reindex-log/)."""

    exit_code: int
    record: dict

    def line(self) -> str:
        """Return the one-line summary for people and schedulers."""
        r = self.record
        inputs = r.get("inputs") or {}
        idx = r.get("index") or {}
        embed = r.get("embed") or {}
        if idx.get("version"):
            published = (f"published {idx['version']} ({idx.get('ntotal', 0):,} vectors, {idx.get('factory')}, "
                         f"{idx.get('decision', {}).get('mode')})" if idx.get("published")
                         else f"built {idx['version']} NOT published")
        else:
            published = f"index: {idx.get('skipped', 'not built')}"
        return (f"icar reindex {r.get('job')}: exit {self.exit_code} ({r.get('status')}); generation "
                f"{r.get('generation')}; inputs {inputs.get('listed', 0)} listed, {len(inputs.get('new', []))} new, "
                f"{len(inputs.get('changed', []))} changed, {len(inputs.get('disappeared', []))} gone; "
                f"embedded {embed.get('images', 0)} images in {embed.get('shards_committed', 0)} shards "
                f"({len(embed.get('shards_failed', []))} failed); {published}; LATEST "
                f"{(r.get('latest') or {}).get('after')}")


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def new_reindex_id() -> str:
    """Return a unique id for one run that sorts by start time: 20261125T170800.123456Z-1a2b3c."""
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ") + "-" + uuid.uuid4().hex[:6]


def current_generation(root: str, storage_options: dict | None) -> str | None:
    """Return the newest generation of ``root`` (the one new shards go to), or None before the first run."""
    gens = list_generations(root, storage_options)
    return gen_name(gens[-1]) if gens else None


def start_generation(root: str, cfg: JobConfig, reason: str) -> str:
    """Create the next generation of ``root`` (its generation.json); return its name."""
    gens = list_generations(root, cfg.storage_options)
    name = gen_name((gens[-1] if gens else 0) + 1)
    storage.write_json({"generation": name, "created": _now(), "reason": reason, "job": cfg.name,
                        "spec": dataclasses.asdict(cfg.model)},
                       storage.join(generation_dir(root, name), GENERATION_JSON), cfg.storage_options)
    log.info("generation %s started: %s", name, reason)
    return name


def _read_run_json(run: str, storage_options: dict | None) -> dict | None:
    from pipeline.io.shards import read_run_json

    try:
        return read_run_json(run, storage_options)
    except FileNotFoundError:
        return None


def plan_reindex(cfg: JobConfig) -> dict:
    """Return what a run would do now (inputs new/changed/gone, generation, LATEST), writing nothing (--dry-run)."""
    from pipeline.io.readers import expand_inputs
    from pipeline.io.shards import Manifest

    so = cfg.storage_options
    root = cfg.root.rstrip("/")
    gen = current_generation(root, so)
    rows = Manifest(run_dir(root, gen), so).rows if gen else []
    plan = plan_inputs(expand_inputs(cfg.inputs, so), rows)
    run_json = _read_run_json(run_dir(root, gen), so) if gen else None
    gone = len(plan.disappeared) / len(rows) if rows else 0.0
    return {"root": root, "generation": gen, "inputs": plan.to_dict(), "committed_inputs": len(rows),
            "disappeared_fraction": round(gone, 4), "safety_stop": gone > cfg.max_retire_fraction,
            "model_spec_differs": spec_differences(run_json, cfg.model), "latest": read_latest(root, so),
            "next_version": version_name((list_versions(root, so) or [0])[-1] + 1)}


def run_reindex(cfg: JobConfig, break_lock: bool = False) -> ReindexResult:
    """Run one scheduled reindex of ``cfg`` (see the module docstring); return its exit code and record."""
    so = cfg.storage_options
    root = cfg.root.rstrip("/")
    t0 = time.perf_counter()
    rid = new_reindex_id()
    record: dict = {"job": cfg.name, "reindex_id": rid, "started": _now(), "host": socket.gethostname(),
                    "pid": os.getpid(), "config": cfg.source, "root": root,
                    "schedule": dataclasses.asdict(cfg.schedule),
                    "status": "running", "phases": {}}
    storage.makedirs(root, so)
    lock = RootLock(storage.join(root, LOCK_FILE), cfg.name, cfg.lock.stale_after_s, cfg.lock.heartbeat_s, so,
                    details={"reindex_id": rid, "config": cfg.source})
    exit_code = EXIT_ERROR
    locked = False
    try:
        lock.acquire(break_lock=break_lock)
        locked = True
        exit_code = _run_locked(cfg, root, rid, lock, record)
    except (LockHeld, LockLost) as e:
        exit_code, record["status"], record["error"] = EXIT_LOCKED, "locked", str(e)
        log.error("%s", e)
    except ReindexError as e:
        exit_code, record["error"] = e.exit_code, str(e)
        record["status"] = {EXIT_VERIFY: "verification failed", EXIT_MODEL_CHANGED: "model changed",
                            EXIT_SAFETY: "safety stop"}.get(e.exit_code, "failed")
        log.error("%s", e)
    except ConfigError as e:
        exit_code, record["status"], record["error"] = EXIT_CONFIG, "config error", str(e)
        log.error("%s", e)
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM during the embed step (however Ray hands it back)
        from pipeline.runtime import stop_reason

        stop = stop_reason(e)
        exit_code, record["status"] = stop.exit_code, stop.status
        record["error"] = f"{stop.status} ({stop.signal}); run again to resume"
        log.error("reindex %s %s; the lock is released and the next run resumes", rid, record["status"])
    except Exception as e:
        from pipeline.index.params import BudgetError
        from pipeline.io.readers import InputError

        from pipeline.io.storage import CorruptFileError

        # A damaged file (a run's shard, manifest or run.json, an index) names itself and the fix: no traceback.
        if isinstance(e, (InputError, BudgetError, CorruptFileError)):
            exit_code, record["status"] = EXIT_CONFIG, "config error"
            log.error("%s", e)
        else:
            exit_code, record["status"] = EXIT_ERROR, "error"
            log.exception("reindex %s failed", rid)
        record["error"] = f"{type(e).__name__}: {e}"
    finally:
        record["exit_code"] = exit_code
        record["exit_meaning"] = EXIT_CODES.get(exit_code)
        record["finished"] = _now()
        record["seconds"] = round(time.perf_counter() - t0, 3)
        try:
            storage.write_json(record, storage.join(root, LOG_DIR, f"{rid}.json"), so)
        except Exception as e:  # the record is for people; failing to write it must not hide the run's outcome
            log.error("could not write the reindex log record: %s", e)
        if locked:
            lock.release()
    result = ReindexResult(exit_code, record)
    log.info("%s", result.line())
    return result


@contextmanager
def _timed(record: dict, name: str):
    """Time the phase ``name`` of a run into record["phases"] and log it."""
    t = time.perf_counter()
    log.info("%s ...", name)
    try:
        yield
    finally:
        record["phases"][name] = round(time.perf_counter() - t, 3)
        log.info("%s took %.1fs", name, record["phases"][name])


def forget_listings(url: str, storage_options: dict | None) -> None:
    """Drop every directory listing this process's filesystem object for ``url`` has cached."""
    fs, _ = storage.filesystem(url, storage_options)
    fs.invalidate_cache()


def _run_locked(cfg: JobConfig, root: str, rid: str, lock: RootLock, record: dict) -> int:
    """Do the run's work while holding the lock; return the exit code (raise ReindexError to stop)."""
    from pipeline.io.readers import InputError, expand_inputs
    from pipeline.io.shards import Manifest

    so = cfg.storage_options
    phase = functools.partial(_timed, record)
    record["config_summary"] = config_summary(cfg)
    gen = current_generation(root, so)
    if gen is None:
        gen = start_generation(root, cfg, "first run of this root")
        record["new_generation"] = True
    record["generation"] = gen

    with phase("recover"):
        record["recovered_retirements"] = complete_retirements(root, gen, so)

    with phase("list_inputs"):
        run = run_dir(root, gen)
        rows = Manifest(run, so).rows
        try:
            shards = expand_inputs(cfg.inputs, so)
        except InputError as e:
            if rows:
                raise SafetyStop(f"the inputs match nothing now ({e}) but {len(rows)} inputs are committed: an outage "
                                 f"or a wrong glob; nothing was retired (fix the inputs, or move the root aside to "
                                 f"start over)") from e
            raise
        plan = plan_inputs(shards, rows)
        record["inputs"] = plan.to_dict()
        gone = len(plan.disappeared) / len(rows) if rows else 0.0
        log.info("inputs: %d listed, %d new, %d changed, %d unchanged, %d disappeared", plan.listed,
                 len(plan.new), len(plan.changed), plan.unchanged, len(plan.disappeared))
        if gone > cfg.max_retire_fraction:
            raise SafetyStop(f"{len(plan.disappeared)} of {len(rows)} committed inputs disappeared ({gone:.0%}), more "
                             f"than max_retire_fraction {cfg.max_retire_fraction:.0%}: nothing was retired. If they "
                             f"are really gone, raise max_retire_fraction for one run; first gone: "
                             f"{[r['source'] for r in plan.disappeared[:3]]}")

    run_json = _read_run_json(run, so)
    differs = spec_differences(run_json, cfg.model)
    record["model_spec_differs"] = differs
    embed_summary = None
    if plan.new or plan.changed or differs:
        embed_summary, gen, run, plan = _embed(cfg, root, gen, run, plan, shards, differs, record, phase)
    else:
        log.info("nothing new or changed and the model spec is unchanged: no embedding (no model actors started)")
    record["generation"] = gen
    if embed_summary is not None:
        record["embed"] = {"images": embed_summary.images, "errors": embed_summary.errors,
                           "shards_committed": embed_summary.shards_committed,
                           "shards_skipped": embed_summary.shards_skipped,
                           "shards_failed": [{"source": s, "message": m} for s, m in embed_summary.shards_failed],
                           "gflops": embed_summary.gflops, "seconds": round(embed_summary.seconds, 3)}
    exit_code = EXIT_SHARDS_FAILED if embed_summary is not None and embed_summary.shards_failed else EXIT_OK

    lock.check()
    with phase("retire"):
        record["retired"] = retire_inputs(run, generation_dir(root, gen), plan.disappeared, rid, so)
    # Shards were committed by Ray workers (other processes): listings this process cached before (s3fs caches
    # directory listings) would hide them from the index build's reads.
    forget_listings(root, so)

    manifest = Manifest(run, so)
    total_rows = sum(int(r["rows"]) for r in manifest.rows)
    digest = manifest_digest(manifest.rows)
    latest = read_latest(root, so)
    record["latest"] = {"before": latest["version"] if latest else None,
                        "after": latest["version"] if latest else None}
    if total_rows == 0:
        record["index"] = {"skipped": "no rows are committed yet: nothing to index"}
        record["status"] = "nothing to index"
        return max(exit_code, EXIT_SHARDS_FAILED) if plan.listed else exit_code
    if (latest and latest.get("generation") == gen and latest.get("manifest_digest") == digest
            and not cfg.index.force):
        record["index"] = {"skipped": f"unchanged since {latest['version']} (same committed shards)"}
        log.info("index: LATEST %s already indexes exactly these shards; no new version", latest["version"])
    else:
        lock.check()
        _publish(cfg, root, gen, run, rid, digest, total_rows, latest, lock, record, phase)

    with phase("retention"):
        record["retention"] = apply_retention(root, cfg.retention.keep_versions, so,
                                              cfg.retention.delete_old_generations, gen)
    record["status"] = "ok" if exit_code == EXIT_OK else "some shards failed"
    return exit_code


def _embed(cfg: JobConfig, root: str, gen: str, run: str, plan: InputPlan, shards: list, differs: list[str],
           record: dict, phase):
    """Embed new and changed inputs into ``gen`` (or a new generation); return (summary, gen, run, plan)."""
    from pipeline.embed.execution import run_embed
    from pipeline.io.shards import RunStateError

    def switch_generation(e: Exception):
        # Another model, exits, heads, router or scorer than the generation's shards: never mixed.
        if cfg.on_model_change == "refuse":
            raise ModelChangedError(
                f"generation {gen} was embedded with another configuration ({e}); on_model_change is refuse. "
                f"Set on_model_change: new_generation to re-embed every input with the new model into a "
                f"new generation (the current LATEST keeps serving until its index is published)") from e
        record["previous_generation"] = gen
        new_gen = start_generation(root, cfg, f"model changed: {e}")
        record["new_generation"] = True
        # The new generation starts empty: every listed input is new there and nothing is retired.
        new_plan = InputPlan(listed=len(shards), new=[s.uri for s in shards])
        record["inputs_new_generation"] = new_plan.to_dict()
        return new_gen, run_dir(root, new_gen), new_plan

    if differs and _read_run_json(run, cfg.storage_options) is not None:
        log.info("model spec differs from generation %s in %s: checking the model identity", gen, ", ".join(differs))
        with phase("check_model"):
            try:
                check_identity(cfg, run)
            except RunStateError as e:
                gen, run, plan = switch_generation(e)
    with phase("embed"):
        try:
            return run_embed(cfg.embed_config(run)), gen, run, plan
        except RunStateError as e:
            # Same spec, other identity (e.g. a checkpoint file replaced in place): run_embed's own check.
            if record.get("new_generation"):
                raise
            gen, run, plan = switch_generation(e)
            return run_embed(cfg.embed_config(run)), gen, run, plan


def describe_model(spec, secrets: dict[str, str] | None = None) -> dict:
    """Return the identity description of the model ``spec`` asks for (what run.json records); a Ray task."""
    from pipeline.runtime import apply_secrets
    from pipeline.model.worker import ModelWorker

    apply_secrets(secrets)  # checkpoints may live on S3
    return ModelWorker(spec).describe()


def check_identity(cfg: JobConfig, run: str) -> None:
    """Raise RunStateError when the configured model's identity differs from run directory ``run``'s.

    The model, heads, scorer and router are loaded once in a CPU Ray task (the weights hash is the identity)
    and compared exactly as `icar embed` compares them, before any model actor is started.
    """
    from pipeline.io.rundir import check_run_identity
    from pipeline.runtime import forwarded_env, forwarded_secrets, init_ray

    ray = init_ray(cfg.ray.address or os.environ.get("RAY_ADDRESS") or None)
    env = forwarded_env()
    task = ray.remote(describe_model).options(num_cpus=1, runtime_env={"env_vars": env} if env else None)
    spec = dataclasses.replace(cfg.model, device="cpu")  # the identity does not depend on the device
    # Credentials as an argument, never in runtime_env (Ray writes that to its logs).
    description = ray.get(task.remote(spec, forwarded_secrets()), timeout=cfg.embed.actor_start_timeout_s)
    check_run_identity(run, description, cfg.storage_options)


def _publish(cfg: JobConfig, root: str, gen: str, run: str, rid: str, digest: str, total_rows: int,
             latest: dict | None, lock: RootLock, record: dict, phase) -> None:
    """Build the next version, verify it, record it and move LATEST to it (raise VerificationError instead)."""
    from pipeline.index.build import build_index, model_key, plan_runs

    so = cfg.storage_options
    version = version_name((list_versions(root, so) or [0])[-1] + 1)
    vdir = version_dir(root, version)
    idx: dict = {"version": version, "path": vdir, "published": False}
    record["index"] = idx
    run_plan = plan_runs([run], so)
    prev = previous_version(root, latest, gen, so)
    decision = decide_index_build(run_plan.ntotal, run_plan.dim, prev, cfg.index, reuse_supported())
    idx["decision"] = decision.to_dict()
    log.info("index %s: %s (%s)", version, decision.mode, "; ".join(decision.reasons))
    with phase("build_index"):
        try:
            if decision.mode == "reuse":
                summary = build_index(cfg.index_config(run, vdir, factory=decision.factory,
                                                       trained_index=decision.trained_from))
                got = recall_min(summary.info)
                if got is not None and got < cfg.index.target_recall:
                    why = (f"the build into the reused trained index measured recall {got:.3f} < target "
                           f"{cfg.index.target_recall}: retrained and rebuilt")
                    log.warning("index %s: %s", version, why)
                    idx["decision"]["retry"] = {"reason": why, "recall": got}
                    idx["decision"]["mode"] = "train"
                    summary = build_index(cfg.index_config(run, vdir, overwrite=True))
            else:
                summary = build_index(cfg.index_config(run, vdir))
        except BaseException:
            _remove_quietly(vdir, so)  # a partial version is never useful; it was never LATEST
            raise
    info = summary.info
    mode = idx["decision"]["mode"]
    if mode == "train":
        trained = {"version": version, "ntotal": info["ntotal"], "train_size": info.get("train_size"),
                   "nprobe": info.get("nprobe"), "nlist": info.get("nlist")}
    else:
        trained = dict(prev["trained"])
    idx.update(ntotal=info["ntotal"], factory=info["factory"], nprobe=info.get("nprobe"),
               recall=info.get("recall"), build_seconds=(info.get("build_seconds") or {}).get("total"),
               trained=trained)
    version_record = {"version": version, "generation": gen, "run": run, "reindex_id": rid, "created": _now(),
                      "manifest_digest": digest, "ntotal": info["ntotal"], "decision": idx["decision"],
                      "trained": trained, "index_settings": {"max_memory": cfg.index.max_memory,
                                                             "factory": cfg.index.factory,
                                                             "flat_below": cfg.index.flat_below},
                      "verified": False}
    # The decision travels with the index: index.json (rewritten atomically, before it is verified) says how it
    # was built, for whoever opens the directory without the reindex log.
    info["reindex"] = {"version": version, "generation": gen, "reindex_id": rid, "decision": idx["decision"],
                       "trained": trained}
    info.setdefault("reasons", []).append(
        f"reindex {version}: {idx['decision']['mode']} (" + "; ".join(idx["decision"]["reasons"]) + ")")
    storage.write_json(info, storage.join(vdir, "index.json"), so)
    with phase("verify"):
        expected_key = model_key(run_plan.model)
        try:
            checks = verify_index(vdir, total_rows, expected_key, cfg.index.target_recall, cfg.index.verify_open, so)
        except VerificationError as e:
            idx["verification"] = e.checks | {"problems": e.problems}
            version_record["verification"] = idx["verification"]
            storage.write_json(version_record, storage.join(vdir, VERSION_RECORD), so)
            raise
        idx["verification"] = checks
        version_record["verification"] = checks
        version_record["verified"] = True
        storage.write_json(version_record, storage.join(vdir, VERSION_RECORD), so)
    lock.check()
    with phase("switch"):
        pointer = {"version": version, "path": vdir, "generation": gen, "created": _now(), "ntotal": info["ntotal"],
                   "model_key": expected_key, "manifest_digest": digest, "reindex_id": rid,
                   "previous": latest["version"] if latest else None}
        storage.write_json(pointer, storage.join(root, INDEXES, LATEST), so)
    idx["published"] = True
    record["latest"]["after"] = version
    log.info("LATEST -> %s (%d vectors, %s)", version, info["ntotal"], info["factory"])


def _remove_quietly(url: str, storage_options: dict | None) -> None:
    try:
        fs, path = storage.filesystem(url, storage_options)
        if fs.exists(path):
            fs.rm(path, recursive=True)
    except Exception as e:  # cleanup of a failed build; the failure itself is what gets reported
        log.warning("could not remove the partial index %s: %s", url, e)


def reindex_status(root: str, storage_options: dict | None = None, last: int = 5) -> dict:
    """Return LATEST, the versions present and the last ``last`` reindex-log records of ``root`` (--status)."""
    fs, path = storage.filesystem(storage.join(root, LOG_DIR), storage_options)
    fs.invalidate_cache(path)
    try:
        names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False) if p.endswith(".json"))
    except FileNotFoundError:
        names = []
    records = []
    for name in names[-last:]:
        r = storage.read_json(storage.join(root, LOG_DIR, name), storage_options)
        records.append({k: r.get(k) for k in ("reindex_id", "started", "seconds", "status", "exit_code",
                                              "generation", "latest", "error")})
    lock = None
    try:
        lock = storage.read_json(storage.join(root, LOCK_FILE), storage_options)
    except (FileNotFoundError, ValueError):
        pass
    return {"root": root, "latest": read_latest(root, storage_options), "lock": lock,
            "versions": [version_name(v) for v in list_versions(root, storage_options)],
            "generations": [gen_name(g) for g in list_generations(root, storage_options)], "recent_runs": records}
