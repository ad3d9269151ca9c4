"""The run directory's lifecycle, apart from writing shards: is this the same model, which parts are left over
from a dead run, which input gets which part number, and what each invocation records.

Plain storage operations (no Ray, no model), called by the embed driver while it holds the output's lock.
"""

from __future__ import annotations

import datetime as dt
import logging

from pipeline.io import storage
from pipeline.io.lock import OUTPUT_LOCK, RootLock
from pipeline.io.repair import rederive_run_json, run_json_damaged
from pipeline.io.schema import ERROR_DIR, RUN_JSON, SHARD_DIR
from pipeline.io.shards import Manifest, RunStateError, read_run_json

log = logging.getLogger(__name__)


# Fields of run.json that must match for a resumed run to add shards to an existing run directory.
IDENTITY_FIELDS = ("model", "exits", "heads", "router", "scorer", "image_size")


def check_run_identity(run: str, description: dict, storage_options: dict, rows: list[dict] | None = None,
                       repair: bool = False) -> None:
    """Refuse to add shards to a run directory made with another model, exits, heads, router or scorer.

    With ``repair``, a damaged run.json is moved aside (for the caller to write anew from ``description``) once
    the committed shards (manifest ``rows``) fit the model described; see pipeline/io/repair.py.
    """
    url = storage.join(run, RUN_JSON)
    if not storage.exists(url, storage_options):
        return
    if repair and run_json_damaged(run, storage_options):
        rederive_run_json(run, description, rows or [], storage_options)
        return
    old = read_run_json(run, storage_options)
    diffs = [f for f in IDENTITY_FIELDS if old.get(f) != description.get(f)]
    if diffs:
        raise RunStateError(
            f"{run} was embedded with a different {', '.join(diffs)} "
            f"(was {', '.join(repr(old.get(f)) for f in diffs)[:400]}); shards of different configurations must "
            f"never mix: write to a new --output, or delete {run} to start over")


def remove_orphans(run: str, manifest: Manifest, storage_options: dict, lock: RootLock) -> None:
    """Delete output shards that a crash left committed but unrecorded (their inputs are embedded again), and
    the hidden temporaries of atomic writes that a killed writer left behind.

    Only the holder of the run directory's ``lock`` may call this (LockLost otherwise): an unrecorded shard is
    only a dead run's leftover when no other run can be writing, and another live run's shards look the same.
    """
    if lock.url != storage.join(run, OUTPUT_LOCK):
        raise ValueError(f"remove_orphans({run!r}) needs that run directory's own lock, not {lock.url}")
    lock.check()
    recorded = {r["output"].rsplit("/", 1)[-1] for r in manifest.rows}
    for folder in ("", SHARD_DIR, ERROR_DIR):  # one listing per folder
        fs, path = storage.filesystem(storage.join(run, folder) if folder else run, storage_options)
        fs.invalidate_cache(path)  # object-store listings are cached per instance: list what is there now
        if not fs.exists(path):
            continue
        for f in fs.ls(path, detail=False):
            name = f.rstrip("/").rsplit("/", 1)[-1]
            if folder == SHARD_DIR and name.startswith("part-") and name.endswith(".parquet") and name not in recorded:
                log.warning("removing %s: committed by an interrupted run but not in the manifest; it is redone", name)
                fs.rm(f)
            elif name.startswith(".") and ".tmp-" in name:
                log.info("removing %s/%s: a temporary file of a write that was interrupted", folder or ".", name)
                fs.rm(f)


def changed_since_commit(shard, row: dict) -> bool:
    """Return True when the input's fingerprint (ETag, else size + mtime) differs from when it was embedded."""
    if shard.etag and row.get("source_etag"):
        return shard.etag != row["source_etag"]
    return (shard.size, shard.mtime) != (row.get("source_size"), row.get("source_mtime"))


def assign_parts(shards: list, manifest: Manifest, reembed_changed: bool = False) -> list[tuple[object, int]]:
    """Return (shard, part) for every input shard to embed, with stable part numbers.

    A shard keeps its position in the sorted input list as its part number, so a resumed run writes the same
    files as the run it resumes; where that number is taken by another committed input, it gets a fresh one.
    With ``reembed_changed``, a committed input whose content changed is embedded again into its own part.
    """
    committed = manifest.committed
    used = {r["part"] for r in manifest.rows}
    fresh = max(manifest.next_part(), len(shards))
    plan = []
    changed = []
    for i, shard in enumerate(shards):
        row = committed.get(shard.uri)
        if row is not None:
            if changed_since_commit(shard, row):
                changed.append(shard.uri)
                if reembed_changed:
                    log.info("input %s changed since it was embedded: embedding it again", shard.uri)
                    plan.append((shard, row["part"]))
            continue
        part = i if i not in used else None
        if part is None:
            part = fresh
            fresh += 1
        used.add(part)
        plan.append((shard, part))
    if changed and not reembed_changed:  # a file replaced in place, or a folder's files added or removed
        log.warning("%d committed input shard(s) changed since they were embedded (e.g. %s): their rows are from "
                    "the old content; pass --reembed-changed to embed them again", len(changed), changed[0])
    return plan


def record_invocation(run: str, storage_options: dict, started: str, figures: dict) -> None:
    """Append one invocation's measured ``figures`` to run.json (the report's throughput comes from these)."""
    run_json = read_run_json(run, storage_options)
    run_json.setdefault("invocations", []).append({
        "started": started,
        "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        **figures,
    })
    storage.write_json(run_json, storage.join(run, RUN_JSON), storage_options)
