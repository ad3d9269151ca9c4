"""`icar embed --repair`: move a run directory's unreadable files into RUN/quarantine/ so the run can go on.

A committed part (shards/part-N.parquet and its errors/part-N.parquet) that cannot be read blocks resume, index
and report alike. Repair reads every part the manifest records, once (what `icar report` reads), moves each
unreadable one and the other file of its part into RUN/quarantine/<UTC time>/ (the evidence is kept, never
deleted) and drops its manifest row, so the embed that follows embeds that input shard again into the same part.

What is safe to repair, and how:
- a damaged part: quarantined, its input embedded again (the same rows as an undisturbed run);
- a damaged manifest.parquet: nothing says which parts were complete, so it and every part move to quarantine and
  every input is embedded again (a crash between commits is handled this way too: uncommitted parts are redone);
- a damaged run.json: the identity it held (model, exits, heads, router, scorer) cannot be read back, so it is
  re-derived from the model the repairing command loads, and only after the committed shards agree with that
  model (embedding dimension, exit depths, every row's GFLOPs = the model's per-exit figure + scorer); the
  damaged file is then quarantined and written again. Weights of the same architecture give the same GFLOPs, so
  the user must pass the run's own model arguments; the earlier invocations' record is lost.
"""

from __future__ import annotations

import datetime as dt
import logging
import os

import numpy as np

from pipeline.io import storage
from pipeline.io.schema import ERROR_DIR, MANIFEST, RUN_JSON, SHARD_DIR
from pipeline.io.shards import QUARANTINE_DIR, Manifest, RunStateError, read_manifest_rows, read_part, read_run_json
from pipeline.io.storage import CorruptFileError

log = logging.getLogger(__name__)


def quarantine_folder(run: str) -> str:
    """Return a fresh RUN/quarantine/<UTC time> folder URL for this repair's files."""
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    return storage.join(run, QUARANTINE_DIR, stamp)


def quarantine(run: str, relative: str, folder: str, storage_options: dict | None = None) -> str | None:
    """Move RUN/``relative`` to ``folder``/``relative``; return the new URL (None when there was no such file)."""
    src = storage.join(run, relative)
    if not storage.exists(src, storage_options):
        return None
    dst = storage.join(folder, relative)
    fs, src_path = storage.filesystem(src, storage_options)
    _, dst_path = storage.filesystem(dst, storage_options)
    if storage.is_local(fs):
        os.makedirs(os.path.dirname(dst_path), exist_ok=True)
        os.replace(src_path, dst_path)  # same filesystem: atomic, nothing half-moved
    else:
        fs.mv(src_path, dst_path)  # object stores: copy then delete; a crash in between leaves both, never none
    log.warning("moved %s to %s", src, dst)
    return dst


def _part_files(run: str, folder: str, storage_options: dict | None) -> list[str]:
    """Return the names of the part files in RUN/folder."""
    fs, path = storage.fresh_filesystem(storage.join(run, folder), storage_options)
    if not fs.exists(path):
        return []
    names = (f.rstrip("/").rsplit("/", 1)[-1] for f in fs.ls(path, detail=False))
    return sorted(n for n in names if n.startswith("part-") and n.endswith(".parquet"))


def repair_run(run: str, storage_options: dict | None = None) -> list[str]:
    """Quarantine the unreadable manifest and parts of ``run`` and drop their manifest rows; return the files moved.

    run.json is left for ``rederive_run_json``, which needs the model. Safe to run on a healthy run directory
    (it then only reads). The caller holds the run directory's lock.
    """
    so = storage_options
    if not storage.exists(storage.join(run, MANIFEST), so):
        return []
    folder = quarantine_folder(run)
    moved: list[str] = []
    try:
        rows = read_manifest_rows(run, so)
    except CorruptFileError as e:
        log.warning("%s; quarantining it and every part, all inputs are embedded again", e.problem)
        for sub in (SHARD_DIR, ERROR_DIR):
            moved += [u for name in _part_files(run, sub, so) if (u := quarantine(run, f"{sub}/{name}", folder, so))]
        return [quarantine(run, MANIFEST, folder, so)] + moved
    errors_present = set(_part_files(run, ERROR_DIR, so))
    kept: list[dict] = []
    for r in rows:
        name = r["output"].rsplit("/", 1)[-1]
        bad = None
        for sub in (SHARD_DIR, ERROR_DIR):
            if sub == ERROR_DIR and name not in errors_present:
                continue
            try:
                read_part(storage.join(run, sub, name), so)
            except FileNotFoundError:
                bad = f"{sub}/{name} is missing"
            except CorruptFileError as e:
                bad = f"{sub}/{name}: {e.problem}"
            if bad:
                break
        if bad is None:
            kept.append(r)
            continue
        log.warning("part %s of %s is damaged (%s): quarantined, its input is embedded again", r["part"],
                    r["source"], bad)
        moved += [u for sub in (SHARD_DIR, ERROR_DIR) if (u := quarantine(run, f"{sub}/{name}", folder, so))]
    # Error parts of parts that were never committed record input shards that failed as a whole; a damaged one
    # would block the report: keep the evidence aside (its input is not committed, so it is embedded again anyway).
    committed = {r["output"].rsplit("/", 1)[-1] for r in rows}
    for name in sorted(errors_present - committed):
        try:
            read_part(storage.join(run, ERROR_DIR, name), so)
        except CorruptFileError:
            moved += [u for u in [quarantine(run, f"{ERROR_DIR}/{name}", folder, so)] if u]
    if len(kept) != len(rows):
        manifest = Manifest(run, so)
        manifest.rows = kept
        manifest.write()
    return moved


def run_json_damaged(run: str, storage_options: dict | None = None) -> bool:
    """Return True when ``run`` has a run.json that cannot be read (a missing one is not damaged)."""
    try:
        read_run_json(run, storage_options)
    except FileNotFoundError:
        return False
    except CorruptFileError:
        return True
    return False


def check_shards_fit(run: str, rows: list[dict], description: dict, storage_options: dict | None = None) -> None:
    """Raise RunStateError unless every committed shard of ``run`` could have been made by the model described.

    Checks what shards record about the model: embedding dimension, exit depths among its exits, and each row's
    GFLOPs equal to its exit's counted figure (or one of its token-merging profiles) + the scorer's.
    """
    dim = int(description["embed_dim"])
    scorer = float(description.get("scorer_gflops") or 0.0)
    costs: dict[int, list[float]] = {int(d): [float(g) + scorer] for d, g in description["gflops_per_exit"].items()}
    for prof in description.get("profiles") or []:
        costs.setdefault(int(prof["exit"]), []).append(float(prof["gflops"]) + scorer)
    for r in rows:
        url = storage.join(run, r["output"])
        t = read_part(url, storage_options, ["exit_layer", "gflops", "embedding"])
        size = t.schema.field("embedding").type.list_size
        if size != dim:
            raise RunStateError(f"cannot rewrite {run}/{RUN_JSON}: {url} holds {size}-dimensional embeddings, the "
                                f"model given embeds in {dim}; pass the model arguments the run was made with")
        ex = t.column("exit_layer").to_numpy(zero_copy_only=False)
        g = t.column("gflops").to_numpy(zero_copy_only=False).astype(np.float32)
        for depth in np.unique(ex):
            expected = np.float32(costs.get(int(depth), []))
            if not expected.size:
                raise RunStateError(f"cannot rewrite {run}/{RUN_JSON}: {url} has rows that left at block {depth}, "
                                    f"not an exit of the model given ({sorted(costs)}); pass the run's own model, "
                                    f"exits and heads")
            at = g[ex == depth]
            if not np.isclose(at[:, None], expected[None, :], rtol=1e-4, atol=1e-6).any(axis=1).all():
                raise RunStateError(f"cannot rewrite {run}/{RUN_JSON}: rows of {url} at exit {depth} spent "
                                    f"{float(at[0]):.4f} GFLOPs, the model given spends {float(expected[0]):.4f} "
                                    f"there (scorer included); pass the run's own model, scorer and router")


def rederive_run_json(run: str, description: dict, rows: list[dict], storage_options: dict | None = None) -> None:
    """Quarantine ``run``'s damaged run.json once the committed shards fit ``description``; the caller then writes
    a new one from it. Raise RunStateError (the damaged file left in place) when they do not fit."""
    check_shards_fit(run, rows, description, storage_options)
    moved = quarantine(run, RUN_JSON, quarantine_folder(run), storage_options)
    log.warning("%s was unreadable; the committed shards fit the model given, so it is written again from that "
                "model (the damaged file is kept as %s; the record of earlier invocations is lost)",
                storage.join(run, RUN_JSON), moved)
