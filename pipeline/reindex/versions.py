"""Index versions of a reindex root: what the previous one was built from, verifying a new one before LATEST
moves to it, and retention of old versions and generations.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile

import pyarrow.parquet as pq

from pipeline.index.build import IndexConfig
from pipeline.index.faiss_ops import read_index_file
from pipeline.index.layout import (
    IDS_FILE,
    INDEX_FILE,
    INDEX_JSON,
    IVFDATA_FILE,
    TRAINED_FILE,
)
from pipeline.index.reuse import recall_min
from pipeline.io import storage
from pipeline.reindex.errors import VerificationError
from pipeline.reindex.root import (
    VERSION_RECORD,
    gen_name,
    generation_dir,
    list_generations,
    list_versions,
    read_latest,
    version_dir,
    version_name,
)

log = logging.getLogger(__name__)

def reuse_supported() -> bool:
    """Return True when pipeline.index.build can add into a given trained index (IndexConfig.trained_index)."""
    return "trained_index" in {f.name for f in dataclasses.fields(IndexConfig)}


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
        "dim": info.get("index_dim", info.get("dim")),  # the index's own (one more than "dim" with exit offsets)
        "ntotal": info.get("ntotal"), "nprobe": info.get("nprobe"), "k": info.get("k"),
        "recall_min": recall_min(info), "settings": record.get("index_settings"), "trained": record.get("trained"),
        "trained_file": trained_file if storage.exists(trained_file, storage_options) else None,
    }


def verify_index(index_dir: str, expected_rows: int, expected_model_key: str, target_recall: float,
                 open_index: bool = True, storage_options: dict | None = None) -> dict:
    """Return the checks of a built index directory; raise VerificationError listing every failed check.

    Checks: index.json is there; its ntotal, the rows of ids.parquet and (``open_index``) the ntotal of
    the index read back with faiss.read_index all equal ``expected_rows`` (the manifest's rows after
    retirement); the model key matches the run's; the recall measured at the chosen nprobe reaches
    ``target_recall`` for every query kind measured.
    """
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
    import faiss  # lazy: a heavy C++ library, needed only when the index is opened

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
