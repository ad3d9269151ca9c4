"""The layout of a reindex ROOT: generations, index versions, the LATEST pointer and the run log.

::

    ROOT/reindex.lock                      held while a run writes ROOT (pipeline/io/lock.py)
    ROOT/generations/g0001/run/            the run directory of one model generation (`icar embed` layout)
    ROOT/generations/g0001/generation.json when and why the generation started, with which model spec
    ROOT/generations/g0001/retired/<id>/   shards of inputs that disappeared, moved out of the run + retired.json
    ROOT/indexes/v0003/                    a complete index directory (index.faiss, ids.parquet, index.json)
    ROOT/indexes/v0003/reindex.json        how v0003 was built and verified (decision, numbers, checks)
    ROOT/indexes/LATEST                    {"version": "v0003", ...}: the one version readers use
    ROOT/reindex-log/<reindex id>.json     one record per run: what was embedded, retired, built, published

Readers call ``resolve_latest(ROOT)``; everything else here is for the run (pipeline/reindex/run.py).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import re
import uuid

from pipeline.index.layout import INDEX_JSON
from pipeline.io import storage
from pipeline.reindex.jobconfig import JobConfig

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
    if not storage.exists(storage.join(path, INDEX_JSON), storage_options):
        raise FileNotFoundError(f"{root}/{INDEXES}/{LATEST} points to {latest['version']}, which has no index.json: "
                                f"it was deleted by hand or by a retention of 1 while you read it; read LATEST again")
    return path


def utc_now() -> str:
    """Return the current UTC time as an ISO 8601 string to the second (the records' timestamps)."""
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
    storage.write_json({"generation": name, "created": utc_now(), "reason": reason, "job": cfg.name,
                        "spec": dataclasses.asdict(cfg.model)},
                       storage.join(generation_dir(root, name), GENERATION_JSON), cfg.storage_options)
    log.info("generation %s started: %s", name, reason)
    return name


def forget_listings(url: str, storage_options: dict | None) -> None:
    """Drop every directory listing this process's filesystem object for ``url`` has cached."""
    fs, _ = storage.filesystem(url, storage_options)
    fs.invalidate_cache()


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
