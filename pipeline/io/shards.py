"""Embedding shards, error rows and the manifest of a run directory: building, committing, reading back."""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.io import storage
from pipeline.io.schema import ERROR_DIR, ERROR_SCHEMA, MANIFEST, MANIFEST_SCHEMA, RUN_JSON, SHARD_DIR, part_name, shard_schema
from pipeline.io.storage import CorruptFileError

log = logging.getLogger(__name__)

# Where `icar embed --repair` moves the files it cannot read (RUN/quarantine/<UTC time>/<their path in RUN>).
QUARANTINE_DIR = "quarantine"


class RunStateError(RuntimeError):
    """The run directory is inconsistent or belongs to a different configuration."""


def explain_corrupt(e: CorruptFileError) -> CorruptFileError:
    """Return ``e`` with the way out for the run-directory file it names (unchanged for any other file).

    Every reader of a run directory goes through here, so a damaged file says the same thing to `icar embed`
    (resume), `icar index`, `icar report` and `icar reindex`.
    """
    url = e.url.rstrip("/")
    run, _, name = url.rpartition("/")
    folder = run.rpartition("/")[2]
    if folder in (SHARD_DIR, ERROR_DIR) and name.startswith("part-"):
        run = run.rpartition("/")[0]
        what = f"{folder}/{name} and the other file of its part"
        then = "drops the part's manifest row and embeds the input shard it came from again"
    elif name == MANIFEST:
        what = f"{MANIFEST} and every part"
        then = "embeds every input again (nothing records which parts were complete)"
    elif name == RUN_JSON:
        return e.with_fix(
            f"run `icar embed INPUT... --output {run} --repair` with the model arguments the run was made with: it "
            f"checks that the committed shards' dimension, exit depths and GFLOPs fit that model, keeps the damaged "
            f"file in {run}/{QUARANTINE_DIR}/ and writes {RUN_JSON} again (the record of earlier invocations is "
            f"lost); or start over with a new --output")
    else:
        return e
    return e.with_fix(f"run `icar embed INPUT... --output {run} --repair` with the run's own arguments: it moves "
                      f"{what} into {run}/{QUARANTINE_DIR}/ (nothing is deleted), then {then}")


def read_part(url: str, storage_options: dict | None = None, columns: list[str] | None = None) -> pa.Table:
    """Return the table of a run's shard or error part at ``url``; a damaged one raises CorruptFileError with
    the way out."""
    try:
        return storage.read_parquet(url, storage_options, columns)
    except CorruptFileError as e:
        raise explain_corrupt(e) from None


def open_part(url: str, storage_options: dict | None = None):
    """Return (open file object, ParquetFile) of a run's part at ``url`` (the caller closes the file); a damaged
    one raises CorruptFileError with the way out."""
    try:
        return storage.open_parquet(url, storage_options)
    except CorruptFileError as e:
        raise explain_corrupt(e) from None


def read_manifest_rows(run: str, storage_options: dict | None = None,
                       columns: list[str] | None = None) -> list[dict]:
    """Return the rows of ``run``'s manifest.parquet (in file order); a damaged one raises CorruptFileError."""
    return read_part(storage.join(run, MANIFEST), storage_options, columns).to_pylist()


def read_run_json(run: str, storage_options: dict | None = None) -> dict:
    """Return ``run``'s run.json; a damaged one (or one that is no JSON object) raises CorruptFileError."""
    url = storage.join(run, RUN_JSON)
    try:
        doc = storage.read_json(url, storage_options)
    except CorruptFileError as e:
        raise explain_corrupt(e) from None
    if not isinstance(doc, dict):
        raise explain_corrupt(CorruptFileError(url, f"a JSON {type(doc).__name__}, not the object `icar embed` "
                                                    f"writes"))
    return doc


@dataclass
class ShardRows:
    """Rows of one output shard, accumulated batch by batch in input order."""

    source: str
    keys: list[str] = field(default_factory=list)
    captions: list[str | None] = field(default_factory=list)
    urls: list[str | None] = field(default_factory=list)
    widths: list[int] = field(default_factory=list)
    heights: list[int] = field(default_factory=list)
    complexity: list[np.ndarray] = field(default_factory=list)
    exit_layer: list[np.ndarray] = field(default_factory=list)
    gflops: list[np.ndarray] = field(default_factory=list)
    embeddings: list[np.ndarray] = field(default_factory=list)
    error_keys: list[str | None] = field(default_factory=list)
    error_stages: list[str] = field(default_factory=list)
    error_messages: list[str] = field(default_factory=list)

    def add_error(self, key: str | None, stage: str, message: str) -> None:
        """Record one failed sample (or, with key None, a failure of the whole shard)."""
        self.error_keys.append(key)
        self.error_stages.append(stage)
        self.error_messages.append(message)

    def __len__(self) -> int:
        return len(self.keys)

    def table(self, dim: int) -> pa.Table:
        """Return the embedding rows as a table with the contract schema."""
        emb = np.concatenate(self.embeddings) if self.embeddings else np.zeros((0, dim), np.float16)
        emb = np.ascontiguousarray(emb, dtype=np.float16)
        if emb.shape[1:] != (dim,):
            raise ValueError(f"embedding dimension {emb.shape[1:]} does not match the model's {dim}")
        cat = (lambda parts, dtype: np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype))
        complexity = cat(self.complexity, np.float32)
        schema = shard_schema(dim)
        arrays = [
            pa.array(self.keys, pa.string()),
            pa.array([self.source] * len(self.keys), pa.string()),
            pa.array(self.captions, pa.string()),
            pa.array(self.urls, pa.string()),
            pa.array(self.widths, pa.int32()),
            pa.array(self.heights, pa.int32()),
            pa.array(complexity, pa.float32(), mask=np.isnan(complexity)),
            pa.array(cat(self.exit_layer, np.int16), pa.int16()),
            pa.array(cat(self.gflops, np.float32), pa.float32()),
            pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float16()), dim),
        ]
        return pa.Table.from_arrays(arrays, schema=schema)

    def error_table(self) -> pa.Table:
        """Return the failed samples as a table with the error schema."""
        return pa.Table.from_arrays(
            [
                pa.array(self.error_keys, pa.string()),
                pa.array([self.source] * len(self.error_keys), pa.string()),
                pa.array(self.error_stages, pa.string()),
                pa.array(self.error_messages, pa.string()),
            ],
            schema=ERROR_SCHEMA,
        )


def shard_url(run: str, part: int) -> str:
    """Return the URL of output shard ``part`` of ``run``."""
    return storage.join(run, SHARD_DIR, part_name(part))


def error_url(run: str, part: int) -> str:
    """Return the URL of the error rows of output shard ``part`` of ``run``."""
    return storage.join(run, ERROR_DIR, part_name(part))


def commit_shard(run: str, part: int, rows: ShardRows, dim: int, storage_options: dict | None = None) -> None:
    """Write the errors, then the shard, each atomically; the caller records the manifest row after this.

    Errors go first so that a shard visible under its final name always has its error rows beside it.
    A shard with no failed samples leaves no error file (and a stale one from an earlier attempt is removed).
    """
    eurl = error_url(run, part)
    if rows.error_keys:
        storage.write_parquet(rows.error_table(), eurl, storage_options)
    else:
        storage.remove(eurl, storage_options)
    storage.write_parquet(rows.table(dim), shard_url(run, part), storage_options)


def write_shard_failure(run: str, part: int, source: str, message: str, storage_options: dict | None = None) -> None:
    """Record that input shard ``source`` failed as a whole (stage "shard"); it stays out of the manifest."""
    rows = ShardRows(source=source)
    rows.add_error(None, "shard", message)
    storage.write_parquet(rows.error_table(), error_url(run, part), storage_options)


def manifest_row(source: str, part: int, rows: ShardRows, seconds: float, model_seconds: float,
                 scorer_gflops_per_image: float, fingerprint: dict) -> dict:
    """Return the manifest row describing committed shard ``part``."""
    exits = np.concatenate(rows.exit_layer) if rows.exit_layer else np.zeros(0, np.int16)
    gflops = np.concatenate(rows.gflops).astype(np.float64) if rows.gflops else np.zeros(0)
    cx = np.concatenate(rows.complexity).astype(np.float64) if rows.complexity else np.zeros(0)
    cx = cx[~np.isnan(cx)]
    depths, counts = np.unique(exits, return_counts=True)
    quant = (lambda q: float(np.quantile(cx, q)) if cx.size else None)
    return {
        "source": source,
        "output": f"{SHARD_DIR}/{part_name(part)}",
        "part": part,
        "rows": len(rows),
        "errors": len(rows.error_keys),
        "gflops": float(gflops.sum()),
        "scorer_gflops": float(scorer_gflops_per_image * len(rows)),
        "seconds": float(seconds),
        "model_seconds": float(model_seconds),
        "source_size": fingerprint.get("size"),
        "source_mtime": fingerprint.get("mtime"),
        "source_etag": fingerprint.get("etag"),
        "exit_counts": json.dumps({str(int(d)): int(c) for d, c in zip(depths, counts)}),
        "complexity_mean": float(cx.mean()) if cx.size else None,
        "complexity_p10": quant(0.1),
        "complexity_p50": quant(0.5),
        "complexity_p90": quant(0.9),
        "committed_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


# How often the driver rewrites the manifest while a run commits shards (Manifest's defaults). Rewriting the whole
# file costs O(rows) (~100 ms at 10,000 shards, bench/scaling.py), so a rewrite per commit makes a long run's
# bookkeeping O(n^2) and the driver its bottleneck. A crash forgets at most this many commits (or this many
# seconds of them): their shards are orphans that the next run deletes and embeds again.
FLUSH_SECONDS = 10.0
FLUSH_ROWS = 1000


def flush_due(pending: int, since_write: float | None, flush_seconds: float, flush_rows: int) -> bool:
    """Return whether a manifest holding ``pending`` unwritten changes should be rewritten now.

    ``since_write`` is the seconds since this process last wrote it (None: not yet, so the first commit of a
    run reaches the file at once and a monitor sees the run start). Due after ``flush_seconds`` or once
    ``flush_rows`` changes wait, whichever comes first.
    """
    if pending <= 0:
        return False
    return since_write is None or since_write >= flush_seconds or pending >= flush_rows


class Manifest:
    """The committed shards of a run: loaded once, appended to in memory, rewritten atomically now and then.

    ``add`` records a row and rewrites the file only when ``flush_due`` says so (at most every ``flush_seconds``
    or every ``flush_rows`` commits); whoever commits must call ``flush`` when done, also when failing. A shard
    whose file is in place but whose row never reached the manifest is an orphan: the next run's
    ``rundir.remove_orphans`` deletes it and its input is embedded again, so a driver that dies between
    flushes loses time, never rows. ``flush_seconds=0, flush_rows=1`` rewrites on every ``add``.
    """

    def __init__(self, run: str, storage_options: dict | None = None, flush_seconds: float = FLUSH_SECONDS,
                 flush_rows: int = FLUSH_ROWS):
        if flush_seconds < 0 or flush_rows < 1:
            raise ValueError(f"manifest flush_seconds must be >= 0 and flush_rows >= 1, got {flush_seconds!r} "
                             f"and {flush_rows!r}")
        self.run = run
        self.url = storage.join(run, MANIFEST)
        self.storage_options = storage_options
        self.flush_seconds = float(flush_seconds)
        self.flush_rows = int(flush_rows)
        self.writes = 0  # rewrites of the file by this object
        self.pending = 0  # changes held here and not yet in the file
        self._written_at: float | None = None  # time.monotonic() of this object's last write
        self._rows: list[dict] = []
        self._sources: set[str] = set()
        self._sorted = True
        if storage.exists(self.url, storage_options):
            self._set_rows(read_manifest_rows(run, storage_options))

    def _set_rows(self, rows: list[dict]) -> None:
        self._rows = list(rows)
        self._sources = {r["source"] for r in self._rows}
        self._sorted = False

    @property
    def rows(self) -> list[dict]:
        """Return the rows held (written or not), in part order."""
        if not self._sorted:  # commits arrive roughly in part order: sort once when read, not on every add
            self._rows.sort(key=lambda r: r["part"])
            self._sorted = True
        return self._rows

    @rows.setter
    def rows(self, rows: list[dict]) -> None:
        self._set_rows(rows)
        self.pending += 1

    @property
    def committed(self) -> dict[str, dict]:
        """Return the manifest rows by input shard URI."""
        return {r["source"]: r for r in self._rows}

    def next_part(self) -> int:
        """Return the first part number no committed shard uses."""
        return max((r["part"] for r in self._rows), default=-1) + 1

    def add(self, row: dict) -> None:
        """Record a committed shard (replacing an earlier row of the same source); rewrite the file when due.

        A replacing row is written at once: its shard was rewritten in place under the same part, so until then
        the file's row would describe another shard's content (fingerprint, row count).
        """
        replaces = row["source"] in self._sources
        if replaces:
            self._rows = [r for r in self._rows if r["source"] != row["source"]]
        if self._rows and row["part"] < self._rows[-1]["part"]:
            self._sorted = False
        self._rows.append(row)
        self._sources.add(row["source"])
        self.pending += 1
        if replaces:
            self.write()
        else:
            self.flush_if_due()

    def flush_if_due(self) -> bool:
        """Rewrite the file if ``flush_due`` says so (the driver also asks between commits); return whether it did."""
        since = None if self._written_at is None else time.monotonic() - self._written_at
        if flush_due(self.pending, since, self.flush_seconds, self.flush_rows):
            self.write()
            return True
        return False

    def flush(self) -> bool:
        """Rewrite the file if it lacks any change held here; return whether it did."""
        if self.pending:
            self.write()
            return True
        return False

    def write(self) -> None:
        """Rewrite manifest.parquet atomically from the rows held (readers see the old file or the new one)."""
        table = pa.Table.from_pylist(self.rows, schema=MANIFEST_SCHEMA)
        storage.write_parquet(table, self.url, self.storage_options)
        self.pending = 0
        self.writes += 1
        self._written_at = time.monotonic()


# Keys committed by more than one input shard, as error rows (stage "dedup"), beside the manifest. Not under
# errors/, whose files are named after parts.
DUPLICATES = "duplicates.parquet"


def find_duplicate_keys(run: str, rows: list[dict], storage_options: dict | None = None) -> pa.Table:
    """Return an error row (stage "dedup") for each key that a shard earlier in part order already committed.

    Shard tasks drop repeated keys within their own shard; across shards only this check can see them. It reads
    the key column of every committed shard, so the driver holds all keys at once (~60 bytes per key with Arrow's
    hash table): fine to ~100M keys; beyond that, check at index time, where the ids are materialised anyway.
    """
    pieces = []
    for r in sorted(rows, key=lambda r: r["part"]):
        keys = read_part(storage.join(run, r["output"]), storage_options, ["key"]).column("key")
        pieces.append(pa.table({"key": keys, "source": pa.array([r["source"]] * len(keys), pa.string())}))
    empty = pa.Table.from_pylist([], schema=ERROR_SCHEMA)
    if not pieces:
        return empty
    table = pa.concat_tables(pieces)
    counts = pc.value_counts(table.column("key"))
    repeated = counts.field("values").filter(pc.greater(counts.field("counts"), 1))
    if len(repeated) == 0:
        return empty
    first: dict[str, str] = {}
    out: list[dict] = []
    for row in table.filter(pc.is_in(table.column("key"), value_set=repeated)).to_pylist():
        if row["key"] not in first:
            first[row["key"]] = row["source"]
            continue
        out.append({"key": row["key"], "source": row["source"], "stage": "dedup",
                    "error": f"duplicate key {row['key']!r}: {first[row['key']]} committed it first; keys must be "
                             "unique across the corpus (search results name images by key and an index holds both "
                             "rows): rename or drop one of them in the inputs"})
    return pa.Table.from_pylist(out, schema=ERROR_SCHEMA)


def record_duplicate_keys(run: str, rows: list[dict], storage_options: dict | None = None) -> int:
    """Write RUN/duplicates.parquet (or remove a stale one); return how many rows repeat an earlier key."""
    dups = find_duplicate_keys(run, rows, storage_options)
    url = storage.join(run, DUPLICATES)
    if dups.num_rows:
        storage.write_parquet(dups, url, storage_options)
        first = dups.slice(0, 1).to_pylist()[0]
        log.warning("%d keys were committed by more than one input shard, e.g. %s; listed in %s", dups.num_rows,
                    first["error"], url)
    else:
        storage.remove(url, storage_options)
    return dups.num_rows


def read_run_table(run: str, columns: list[str] | None = None, storage_options: dict | None = None) -> pa.Table:
    """Return all committed rows of ``run`` (shards listed in its manifest, in part order)."""
    manifest = Manifest(run, storage_options)
    if not manifest.rows:
        raise RunStateError(f"{run} has no committed shards (no {MANIFEST} or it is empty): run `icar embed` first")
    tables = [read_part(storage.join(run, r["output"]), storage_options, columns) for r in manifest.rows]
    return pa.concat_tables(tables)


def exit_mix(table: pa.Table) -> dict[int, int]:
    """Return image counts per exit depth of a shard table."""
    vc = pc.value_counts(table.column("exit_layer")).to_pylist()
    return {int(v["values"]): int(v["counts"]) for v in sorted(vc, key=lambda v: v["values"])}
