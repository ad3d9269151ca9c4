"""What a reindex run finds: which inputs are new, changed or gone against the manifest, whether the model spec
changed, and the crash-safe retirement of the shards of inputs that disappeared.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field

from pipeline.io import storage
from pipeline.io.rundir import changed_since_commit
from pipeline.io.schema import ERROR_DIR, part_name
from pipeline.io.shards import Manifest
from pipeline.reindex.root import RETIRED, generation_dir, run_dir, utc_now

log = logging.getLogger(__name__)

# ModelSpec fields that decide what is computed; device/precision/threads only decide how fast.
SPEC_IDENTITY = ("model", "pretrained", "seed", "exits", "heads", "router", "exit_at", "full_depth",
                 "route_fractions", "scorer", "scorer_checkpoint")


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
    intent = {"reindex_id": reindex_id, "retired_at": utc_now(), "complete": False, "run": run, "inputs": entries}
    storage.write_json(intent, storage.join(target, "retired.json"), storage_options)
    _finish_retirement(run, target, intent, storage_options)
    return entries


def _finish_retirement(run: str, target: str, intent: dict, storage_options: dict | None) -> None:
    """Do steps (2)-(4) of ``retire_inputs``; idempotent, so a crashed retirement is finished the same way."""
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
