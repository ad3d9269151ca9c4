"""Reading runs for an index: their committed shards in row-id order, seeded samples of rows, and the ids table.

A build numbers the vectors of its runs 0..N-1, run by run and part by part (``plan_runs``); everything else
here reads those rows back from the shards' Parquet files: only the row groups that hold sampled rows for
training and tuning (``read_sample_group``), and the per-group id files concatenated into ids.parquet.

Vectors go into the index as their run asks: a run whose run.json records ``exit_scales`` (the exit heads'
per-exit similarity scales) has each row multiplied by the scale of the exit that wrote it (``exit_layer``), so
that early-exit rows rank fairly against full-depth rows under inner product; shards themselves stay unit-length.
A run whose run.json also records nonzero ``exit_offsets`` makes the score affine, scale x cosine + offset: the
index then has one dimension more than the embeddings (``RunPlan.index_dim``), each row ends with its exit's offset
(0 at full depth, for a depth without one, and for every row of a run without offsets), and each L2-normalised query
ends with QUERY_CONSTANT (``append_query_constant``; index.json "query_constant" tells readers to do the same).
``shard_vectors`` is the one place that turns a shard's rows into index vectors (add tasks, training sample).
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.index.layout import IDS_FILE, IDS_SCHEMA
from pipeline.io import storage
from pipeline.io.schema import (
    EXIT_OFFSETS,
    EXIT_SCALES,
    MANIFEST,
    RUN_JSON,
    model_key,
    parse_exit_offsets,
    parse_exit_scales,
)
from pipeline.io.shards import open_part, read_manifest_rows, read_run_json

# What every query gets appended (after L2-normalising) when the index holds the exit-offset dimension: its inner
# product with a row's last value adds that row's offset to the score. index.json records it as "query_constant".
QUERY_CONSTANT = 1.0


class RunMismatchError(ValueError):
    """Runs given together cannot share one index (different models or dimensions)."""


@dataclass(frozen=True)
class ShardRef:
    """One committed shard: where it is, how many rows, and the row id of its first row."""

    url: str
    rows: int
    first_id: int
    run: int  # position of its run in the runs list
    # (exit depth, scale) pairs of its run's exit_scales, sorted; () when the run records none (rows added as read)
    exit_scales: tuple[tuple[int, float], ...] = ()
    # (exit depth, offset) pairs of its run's nonzero exit_offsets, sorted; () when the run records none
    exit_offsets: tuple[tuple[int, float], ...] = ()
    # True when the plan's index holds the offset dimension (some run records offsets): every row gets one more value
    offset_column: bool = False

    @property
    def columns(self) -> list[str]:
        """Return the shard columns ``shard_vectors`` reads: the embedding, and exit_layer where rows are scaled or
        carry an offset."""
        return ["embedding", "exit_layer"] if self.exit_scales or self.exit_offsets else ["embedding"]

    def index_dim(self, dim: int) -> int:
        """Return the width of this shard's index vectors for ``dim``-dimensional embeddings."""
        return dim + 1 if self.offset_column else dim


@dataclass
class RunPlan:
    """The runs to index, read from their run.json and manifest."""

    runs: list[str]
    shards: list[ShardRef]
    model: dict  # run.json "model" identity of every run (they match)
    model_key: str
    dim: int
    run_infos: list[dict]  # per run: path, shards, rows (and exit_scales, exit_offsets where the run records them)
    offset_column: bool = False  # some run records nonzero exit_offsets: the index has dim + 1 dimensions

    @property
    def ntotal(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def index_dim(self) -> int:
        """Return the dimension of the index's vectors: ``dim``, plus one for the exit offsets where runs have any."""
        return self.dim + 1 if self.offset_column else self.dim

    def index_dim_reason(self) -> str:
        """Return why the index has ``index_dim`` dimensions, in words for messages."""
        if not self.offset_column:
            return f"embed_dim {self.dim}, and no run records {EXIT_OFFSETS}"
        runs = [i["path"] for i in self.run_infos if i.get(EXIT_OFFSETS)]
        return (f"embed_dim {self.dim} + 1 for the exit offsets that {', '.join(runs)} record"
                f"{'s' if len(runs) == 1 else ''} (run.json {EXIT_OFFSETS}; each row holds scale x embedding, offset)")


def embeddings_to_float32(column, dim: int, where: str) -> np.ndarray:
    """Return a (rows, dim) float32 array from a fixed_size_list<float16>[dim] Arrow column."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if not pa.types.is_fixed_size_list(column.type) or column.type.list_size != dim:
        raise ValueError(f"{where}: embedding column is {column.type}, expected fixed_size_list<float16>[{dim}]")
    values = column.flatten().to_numpy(zero_copy_only=False)
    return np.ascontiguousarray(values.reshape(-1, dim), dtype=np.float32)


def scale_rows(x: np.ndarray, exit_layer, scales: tuple[tuple[int, float], ...]) -> np.ndarray:
    """Return ``x`` (float32, rows x dim) with each row multiplied in place by the scale of its ``exit_layer`` (1.0
    for a depth without one, as the full depth); ``x`` untouched when ``scales`` is empty."""
    if not scales or not len(x):
        return x
    x *= per_depth(exit_layer, scales, len(x), 1.0)[:, None]
    return x


def per_depth(exit_layer, values: tuple[tuple[int, float], ...], rows: int, default: float) -> np.ndarray:
    """Return (float32, ``rows``) each row's value from ``values`` ((exit depth, value) pairs) by its ``exit_layer``
    (an Arrow column or array), ``default`` for a depth without one."""
    out = np.full(rows, default, np.float32)
    if values and rows:
        depth = np.asarray(exit_layer.to_numpy(zero_copy_only=False) if hasattr(exit_layer, "to_numpy")
                           else exit_layer, np.int64)
        for e, v in values:
            out[depth == e] = v
    return out


def offset_values(exit_layer, offsets: tuple[tuple[int, float], ...], rows: int) -> np.ndarray:
    """Return the offset column (float32, ``rows``) for rows at depths ``exit_layer``: each depth's offset, 0 for a
    depth without one (the full depth); all zeros when ``offsets`` is empty."""
    return per_depth(exit_layer, offsets, rows, 0.0)


def append_column(x: np.ndarray, values) -> np.ndarray:
    """Return ``x`` (float32, rows x d) with ``values`` (a scalar or one per row) as an extra last column."""
    out = np.empty((x.shape[0], x.shape[1] + 1), np.float32)
    out[:, :-1] = x
    out[:, -1] = values
    return out


def append_query_constant(q: np.ndarray) -> np.ndarray:
    """Return L2-normalised queries ``q`` (rows x dim) as an index with the offset dimension takes them: each ends
    with QUERY_CONSTANT, so its inner product with a row [scale x e, offset] is scale x cosine + offset."""
    return append_column(np.asarray(q, np.float32), QUERY_CONSTANT)


def shard_vectors(table, shard: ShardRef, dim: int) -> np.ndarray:
    """Return the index vectors (float32, rows x ``shard.index_dim(dim)``) of ``table``'s rows of ``shard`` (a Table
    or RecordBatch with ``shard.columns``): the embeddings, scaled by exit depth where the shard's run records
    exit_scales, followed by each row's exit offset where the plan's index holds the offset dimension."""
    x = embeddings_to_float32(table.column("embedding"), dim, shard.url)
    if shard.exit_scales:
        x = scale_rows(x, table.column("exit_layer"), shard.exit_scales)
    if shard.offset_column:
        depth = table.column("exit_layer") if shard.exit_offsets else None
        x = append_column(x, offset_values(depth, shard.exit_offsets, len(x)))
    return x


def run_exit_scales(run_json: dict, where: str) -> tuple[tuple[int, float], ...]:
    """Return the sorted (exit depth, scale) pairs a run.json records under ``exit_scales``; () when it records none
    or every scale is 1.0 (rows are then added exactly as read)."""
    scales = parse_exit_scales(run_json.get(EXIT_SCALES), where)
    return tuple(sorted(scales.items())) if any(s != 1.0 for s in scales.values()) else ()


def run_exit_offsets(run_json: dict, where: str) -> tuple[tuple[int, float], ...]:
    """Return the sorted (exit depth, offset) pairs of the nonzero offsets a run.json records under
    ``exit_offsets``; () when it records none or every offset is 0. Raises ValueError naming ``where`` for bad ones."""
    offsets = parse_exit_offsets(run_json.get(EXIT_OFFSETS), where)
    return tuple(sorted((e, o) for e, o in offsets.items() if o != 0.0))


def scale_reasons(plan: "RunPlan", factory: str) -> list[str]:
    """Return index.json reasons saying which runs' rows are scaled by exit depth and which carry exit offsets in
    the extra dimension (none when no run records either).

    Raises ValueError for a ``factory`` that L2-normalises vectors (``L2norm``): it would undo the scales and offsets.
    """
    reasons = []
    for info in plan.run_infos:
        scales = info.get(EXIT_SCALES)
        if scales:
            reasons.append(f"rows of {info['path']} scaled by exit depth (run.json {EXIT_SCALES}: "
                           + ", ".join(f"exit {e} x{s:g}" for e, s in scales.items())
                           + "): inner product scores them as scale x cosine, so early-exit rows rank fairly "
                             "against full-depth rows")
        offsets = info.get(EXIT_OFFSETS)
        if offsets:
            reasons.append(f"rows of {info['path']} end with their exit offset (run.json {EXIT_OFFSETS}: "
                           + ", ".join(f"exit {e} {o:+g}" for e, o in offsets.items())
                           + "): queries end with 1, so inner product scores them scale x cosine + offset")
    if plan.offset_column:
        reasons.append(f"index dimension {plan.index_dim}: {plan.index_dim_reason()}; full-depth rows and rows of "
                       f"runs without offsets hold 0 there; searchers append {QUERY_CONSTANT:g} to each normalised "
                       f"query (index.json query_constant)")
    calibrated = [i["path"] for i in plan.run_infos if i.get(EXIT_SCALES) or i.get(EXIT_OFFSETS)]
    if calibrated and "L2norm" in factory:
        what = " and ".join(w for w, key in (("scales", EXIT_SCALES), ("offsets", EXIT_OFFSETS))
                            if any(i.get(key) for i in plan.run_infos))
        raise ValueError(f"--factory {factory!r} L2-normalises the vectors it adds, which undoes the exit {what} that "
                         f"{', '.join(calibrated)} record (run.json {EXIT_SCALES}, {EXIT_OFFSETS}); leave L2norm out "
                         f"(the shards are already unit-length)")
    return reasons


def open_parquet(url: str, storage_options: dict | None):
    """Return (file object, ParquetFile) for a shard; the caller closes the file. A damaged shard raises
    CorruptFileError naming it and `icar embed --repair`."""
    return open_part(url, storage_options)


def plan_runs(runs: list[str], storage_options: dict | None = None) -> RunPlan:
    """Return the committed shards of ``runs`` in order (run by run, part by part) and their shared model.

    Raises RunMismatchError when the runs were embedded with different models or dimensions.
    """
    if not runs:
        raise ValueError("no runs given: pass one or more run directories written by `icar embed`")
    shards: list[ShardRef] = []
    infos: list[dict] = []
    model: dict | None = None
    key: str | None = None
    first_id = 0
    for r, run in enumerate(runs):
        run_json = storage.join(run, RUN_JSON)
        if not storage.exists(run_json, storage_options):
            raise FileNotFoundError(f"{run} has no {RUN_JSON}: is it a run directory written by `icar embed`?")
        doc = read_run_json(run, storage_options)
        identity = doc.get("model")
        if not isinstance(identity, dict) or "embed_dim" not in identity:
            raise ValueError(f"{run_json} has no model identity with embed_dim: it was not written by `icar embed`")
        this_key = model_key(identity)
        if model is None:
            model, key = identity, this_key
        elif this_key != key or int(identity["embed_dim"]) != int(model["embed_dim"]):
            raise RunMismatchError(
                f"runs embedded with different models cannot share an index: {runs[0]} used {key} "
                f"(dim {model['embed_dim']}) and {run} used {this_key} (dim {identity['embed_dim']}); "
                f"index them separately or re-embed one with the other's model")
        manifest_url = storage.join(run, MANIFEST)
        if not storage.exists(manifest_url, storage_options):
            raise FileNotFoundError(f"{run} has no {MANIFEST}: no shard was committed yet (run `icar embed`)")
        scales = run_exit_scales(doc, run_json)
        offsets = run_exit_offsets(doc, run_json)
        rows = read_manifest_rows(run, storage_options, columns=["output", "part", "rows"])
        rows.sort(key=lambda row: row["part"])
        count = 0
        for row in rows:
            if row["rows"] <= 0:
                continue  # a shard whose every sample failed holds no vectors
            shards.append(ShardRef(storage.join(run, row["output"]), int(row["rows"]), first_id, r, scales, offsets))
            first_id += int(row["rows"])
            count += int(row["rows"])
        infos.append({"path": run, "shards": len(rows), "rows": count,
                      **({EXIT_SCALES: {str(e): s for e, s in scales}} if scales else {}),
                      **({EXIT_OFFSETS: {str(e): o for e, o in offsets}} if offsets else {})})
    dim = int(model["embed_dim"])
    if not shards:
        raise ValueError(f"the runs {runs} hold no rows: nothing to index")
    # One run with offsets gives every row the offset dimension (0 where its run has none): one index, one width.
    offset_column = any(s.exit_offsets for s in shards)
    if offset_column:
        shards = [replace(s, offset_column=True) for s in shards]
    return RunPlan(runs=list(runs), shards=shards, model=model, model_key=key, dim=dim, run_infos=infos,
                   offset_column=offset_column)


def sample_rows(n: int, train: int, queries: int, seed: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """Return (train row ids, query row ids, held_out): sorted, seeded, uniform over ``n`` rows.

    Queries are held out of the training sample when N leaves room for both; otherwise (small corpora,
    where training uses every vector) they are drawn independently and held_out is False.
    """
    rng = np.random.default_rng(seed)
    queries = min(queries, n)
    if train + queries <= n:
        picked = rng.choice(n, size=train + queries, replace=False)
        return np.sort(picked[:train]), np.sort(picked[train:]), True
    q = np.sort(rng.choice(n, size=queries, replace=False))
    t = np.arange(n) if train >= n else np.sort(rng.choice(n, size=train, replace=False))
    return t, q, False


def split_by_shard(row_ids: np.ndarray, starts: np.ndarray) -> list[np.ndarray]:
    """Return, per shard, the sorted global ``row_ids`` inside it as local row numbers (starts: first ids + N)."""
    bounds = np.searchsorted(row_ids, starts)
    return [row_ids[bounds[i]: bounds[i + 1]] - starts[i] for i in range(len(starts) - 1)]


def read_row_table(shard: ShardRef, local_rows: np.ndarray, columns: list[str],
                   storage_options: dict | None) -> pa.Table:
    """Return ``columns`` of the given rows of one shard, in ``local_rows`` order, reading only their row groups."""
    f, pf = open_parquet(shard.url, storage_options)
    with f:
        if pf.metadata.num_rows != shard.rows:
            raise ValueError(f"{shard.url} holds {pf.metadata.num_rows} rows but its manifest says {shard.rows}: "
                             f"the run directory is inconsistent (re-run `icar embed` on it)")
        sizes = [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)]
        starts = np.concatenate([[0], np.cumsum(sizes)])
        groups = sorted(set(np.searchsorted(starts, local_rows, side="right") - 1))
        table = pf.read_row_groups(groups, columns=columns)
        offsets = np.concatenate([[0], np.cumsum([sizes[g] for g in groups])])
        base = {g: offsets[i] - starts[g] for i, g in enumerate(groups)}
        take = np.array([r + base[np.searchsorted(starts, r, side="right") - 1] for r in local_rows], np.int64)
        return table.take(pa.array(take))


def read_sample_group(shards: list[ShardRef], train_rows: list[np.ndarray], query_rows: list[np.ndarray],
                      dim: int, storage_options: dict | None) -> dict:
    """Return the training and query vectors (and query captions) that lie in ``shards``, in row order.

    Training vectors are index vectors (``shard_vectors``: scaled by exit depth where the run records exit_scales,
    with the offset column where the plan has one); query vectors are the stored unit-length embeddings, as
    `icar search` sends image queries (ending with QUERY_CONSTANT where the index has the offset column).
    """
    xt, xq, caps = [], [], []
    for shard, tr, qr in zip(shards, train_rows, query_rows):
        if len(tr) + len(qr) == 0:
            continue
        both = np.concatenate([tr, qr])
        order = np.argsort(both, kind="stable")
        columns = shard.columns + (["caption"] if len(qr) else [])
        table = read_row_table(shard, both[order], columns, storage_options)
        back = np.empty_like(order)
        back[order] = np.arange(len(order))
        table = table.take(pa.array(back))  # back to (train rows, query rows) order
        # float16: exact when unscaled (the shards hold float16); half the transfer
        xt.append(shard_vectors(table.slice(0, len(tr)), shard, dim).astype(np.float16))
        q = embeddings_to_float32(table.slice(len(tr)).column("embedding"), dim, shard.url)
        xq.append(append_query_constant(q) if shard.offset_column else q)
        if len(qr):
            caps.extend(table.slice(len(tr)).column("caption").to_pylist())
    width = shards[0].index_dim(dim) if shards else dim
    cat = (lambda parts, dtype: np.concatenate(parts) if parts else np.zeros((0, width), dtype))
    return {"train": cat(xt, np.float16), "queries": cat(xq, np.float32), "captions": caps}


def concat_ids(parts: list[str], url: str, scratch: str, so) -> None:
    """Write ids.parquet from the per-group id files, in order, streaming one row group at a time."""
    fs, path = storage.filesystem(url, so)
    local = storage.is_local(fs)
    tmp = (os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex}") if local
           else os.path.join(scratch, IDS_FILE))
    writer = pq.ParquetWriter(tmp, IDS_SCHEMA, compression="zstd")
    try:
        for part in parts:
            f, pf = open_parquet(part, so)
            with f:
                for i in range(pf.num_row_groups):
                    writer.write_table(pf.read_row_group(i))
        writer.close()
        writer = None
        if local:
            os.replace(tmp, path)
        else:
            fs.put_file(tmp, path)
    finally:
        if writer is not None:
            writer.close()
        if os.path.exists(tmp):
            os.remove(tmp)
