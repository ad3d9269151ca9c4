"""Build an index directory (DESIGN.md: index.faiss, ids.parquet, index.json) from the shards of one or more runs.

Phases, each timed and recorded in index.json:

1. plan    read run.json and manifest.parquet of every run; refuse runs of different models; choose the
           index (pipeline/index/params.py) and estimate its memory before any work starts.
2. sample  a seeded uniform sample of row ids, read straight from the shards (only the row groups that
           hold sampled rows): training vectors, and held-out query vectors with their captions.
3. train   the empty index on the training sample (driver), serialised once for every add task.
4. add     groups of consecutive shards, one task each (Ray tasks, or in this process for one worker):
           a task adds its shards to a copy of the trained index with sequential row ids, writes the partial
           index and its ids, and computes the exact top-k of the queries over its rows (one pass over the data).
5. merge   partials in order: in memory with merge_from (which moves the data), or on disk into an
           .ivfdata file with faiss.contrib.ondisk.merge_ondisk when the build budget cannot hold the index.
6. tune    the smallest nprobe reaching the target recall@k against the exact top-k, for image queries and
           (where captions and the text encoder exist) text queries; recorded per nprobe tried.
7. write   index.faiss, ids.parquet, and index.json last (its presence marks a complete index).

One task or many, the index is the same: codes depend only on the trained index and the vector, row ids
follow shard order, and partials are merged in that order.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import resource
import shutil
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.io import storage
from pipeline.index.params import (
    ADD_BATCH_ROWS,
    BudgetError,
    IndexParams,
    choose_index_params,
    format_size,
    group_shards,
    max_group_vectors,
    nprobe_candidates,
    parse_size,
)
from pipeline.io.lock import RootLock, output_lock
from pipeline.io.schema import MANIFEST, RUN_JSON, model_key  # torch-free; search imports it from here
from pipeline.io.shards import open_part, read_manifest_rows, read_run_json
from pipeline.io.storage import CorruptFileError

log = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
IDS_FILE = "ids.parquet"
INDEX_JSON = "index.json"
IVFDATA_FILE = "index.ivfdata"
TRAINED_FILE = "trained.faiss"  # the trained, empty index: a later build can add into it instead of training
INDEX_FORMAT = 1
ID_COLUMNS = ["key", "source", "caption", "url"]
IDS_SCHEMA = pa.schema(
    [
        pa.field("row_id", pa.int64(), nullable=False),  # the FAISS id of the vector
        pa.field("key", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("caption", pa.string()),
        pa.field("url", pa.string()),
    ]
)


class RunMismatchError(ValueError):
    """Runs given together cannot share one index (different models or dimensions)."""


@dataclass
class IndexConfig:
    """Everything `icar index` needs; see `icar index --help` for the user's view."""

    runs: list[str]  # run directories (local paths or URLs) written by `icar embed`
    output: str  # index directory to write (local path or URL)
    max_index_memory: str = "4G"  # budget of the built index (what a search server holds); 1024-based K/M/G/T
    max_build_memory: str | None = None  # peak build memory on one machine; None: 75% of this machine's RAM
    factory: str | None = None  # FAISS factory string overriding the automatic choice (e.g. "OPQ32,IVF4096,PQ32")
    target_recall: float = 0.9  # recall@k vs exact search that the chosen nprobe must reach
    k: int = 10  # the k of recall@k
    queries: int = 1000  # held-out image queries (and as many caption queries) for tuning
    text_queries: bool | None = None  # tune on caption queries too; None: when captions and the text encoder exist
    workers: int | None = None  # concurrent add tasks; None: the cluster's CPUs; 1 without --address: no Ray
    address: str | None = None  # Ray cluster to join; None: $RAY_ADDRESS, else an embedded local Ray
    work_dir: str | None = None  # partial indexes (shared storage on a multi-node cluster); None: OUTPUT/_build-*
    seed: int = 0  # sampling and k-means seed
    overwrite: bool = False  # replace an existing index in OUTPUT
    trained_index: str | None = None  # trained empty index (an earlier build's trained.faiss) to add into; needs factory
    flat_below: int = 50_000  # exact search (Flat) below this many vectors when it fits the budget
    max_nprobe: int = 4096  # largest nprobe tried while tuning
    task_timeout_s: float = 6 * 3600.0  # an add task that takes longer fails the build with a message
    task_retries: int = 2  # retries of a failed add task (tasks are idempotent)
    device: str = "cpu"  # device of the text encoder used for caption queries
    threads: int | None = None  # FAISS threads on the driver (train, merge, tune); None: all cores
    merge: str = "auto"  # auto (in memory unless --max-build-memory cannot hold it) | memory | disk (.ivfdata)
    storage_options: dict = field(default_factory=dict)  # fsspec options for runs and output; never logged
    progress: bool = True  # progress bars on stderr
    # One writer per index directory (OUTPUT/icar.lock, pipeline/io/lock.py): a second build is refused at once.
    break_lock: bool = False  # take the lock over even from a live-looking holder (only when sure it is dead)
    lock_stale_after_s: float = 1800.0  # a lock not refreshed for this long is taken over (its holder is dead)
    lock_heartbeat_s: float = 60.0  # the holder refreshes the lock this often (well below lock_stale_after_s)

    def resolved_address(self) -> str | None:
        """Return the Ray address to join, or None for an embedded local instance."""
        return self.address or os.environ.get("RAY_ADDRESS") or None


@dataclass(frozen=True)
class ShardRef:
    """One committed shard: where it is, how many rows, and the row id of its first row."""

    url: str
    rows: int
    first_id: int
    run: int  # position of its run in the runs list


@dataclass
class RunPlan:
    """The runs to index, read from their run.json and manifest."""

    runs: list[str]
    shards: list[ShardRef]
    model: dict  # run.json "model" identity of every run (they match)
    model_key: str
    dim: int
    run_infos: list[dict]  # per run: path, shards, rows

    @property
    def ntotal(self) -> int:
        return sum(s.rows for s in self.shards)


@dataclass
class IndexSummary:
    """What `icar index` did, for the one-line summary and the caller."""

    output: str
    info: dict  # the index.json document

    def line(self) -> str:
        """Return the one-line summary."""
        i = self.info
        rec = i["recall"]
        parts = [f"{kind} {r['at_nprobe']:.3f}" for kind, r in rec.items() if "at_nprobe" in r]
        return (f"icar index: {i['ntotal']:,} vectors -> {self.output} ({i['factory']}, nprobe {i['nprobe']}, "
                f"recall@{i['k']} {', '.join(parts) or '-'}, {i['bytes_per_vector']:.1f} bytes/vector, "
                f"{format_size(i['memory']['index_file_bytes'])}, built in {i['build_seconds']['total']:.1f}s, "
                f"peak RSS {format_size(i['memory']['peak_rss_driver_bytes'])})")


# ----------------------------------------------------------------------------------------------- helpers

def peak_rss_bytes() -> int:
    """Return this process's peak resident set size in bytes.

    Linux: VmHWM, which starts afresh at exec (ru_maxrss keeps the parent's peak across fork+exec, so a
    job started by a big process would report the parent's memory).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(kb * (1 if sys.platform == "darwin" else 1024))


class PhaseTimer:
    """Times named phases, logs each one, and keeps their durations for index.json."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.start = time.perf_counter()

    @contextmanager
    def phase(self, name: str):
        t0 = time.perf_counter()
        log.info("%s ...", name)
        try:
            yield
        finally:
            self.seconds[name] = round(time.perf_counter() - t0, 3)
            log.info("%s took %.1fs (peak RSS %s)", name, self.seconds[name], format_size(peak_rss_bytes()))

    def total(self) -> float:
        return round(time.perf_counter() - self.start, 3)


@contextmanager
def c_stdout_to_stderr():
    """Send what C++ code prints to stdout (FAISS's on-disk messages) to stderr, so stdout stays machine-readable."""
    import ctypes

    libc = ctypes.CDLL(None)
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        libc.fflush(None)
        os.dup2(saved, 1)
        os.close(saved)


def default_build_memory() -> int:
    """Return 75% of this machine's physical memory (the default --max-build-memory)."""
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(pages * 0.75)


def embeddings_to_float32(column, dim: int, where: str) -> np.ndarray:
    """Return a (rows, dim) float32 array from a fixed_size_list<float16>[dim] Arrow column."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if not pa.types.is_fixed_size_list(column.type) or column.type.list_size != dim:
        raise ValueError(f"{where}: embedding column is {column.type}, expected fixed_size_list<float16>[{dim}]")
    values = column.flatten().to_numpy(zero_copy_only=False)
    return np.ascontiguousarray(values.reshape(-1, dim), dtype=np.float32)


def open_parquet(url: str, storage_options: dict | None):
    """Return (file object, ParquetFile) for a shard; the caller closes the file. A damaged shard raises
    CorruptFileError naming it and `icar embed --repair`."""
    return open_part(url, storage_options)


# ------------------------------------------------------------------------------------------------ plan

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
        identity = read_run_json(run, storage_options).get("model")
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
        rows = read_manifest_rows(run, storage_options, columns=["output", "part", "rows"])
        rows.sort(key=lambda row: row["part"])
        count = 0
        for row in rows:
            if row["rows"] <= 0:
                continue  # a shard whose every sample failed holds no vectors
            shards.append(ShardRef(storage.join(run, row["output"]), int(row["rows"]), first_id, r))
            first_id += int(row["rows"])
            count += int(row["rows"])
        infos.append({"path": run, "shards": len(rows), "rows": count})
    dim = int(model["embed_dim"])
    if not shards:
        raise ValueError(f"the runs {runs} hold no rows: nothing to index")
    return RunPlan(runs=list(runs), shards=shards, model=model, model_key=key, dim=dim, run_infos=infos)


# ---------------------------------------------------------------------------------------------- sample

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


def read_rows(shard: ShardRef, local_rows: np.ndarray, dim: int, captions: bool,
              storage_options: dict | None) -> tuple[np.ndarray, list]:
    """Return (float32 embeddings, captions or []) of the given rows of one shard, reading only their row groups."""
    f, pf = open_parquet(shard.url, storage_options)
    with f:
        if pf.metadata.num_rows != shard.rows:
            raise ValueError(f"{shard.url} holds {pf.metadata.num_rows} rows but its manifest says {shard.rows}: "
                             f"the run directory is inconsistent (re-run `icar embed` on it)")
        sizes = [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)]
        starts = np.concatenate([[0], np.cumsum(sizes)])
        groups = sorted(set(np.searchsorted(starts, local_rows, side="right") - 1))
        columns = ["embedding"] + (["caption"] if captions else [])
        table = pf.read_row_groups(groups, columns=columns)
        offsets = np.concatenate([[0], np.cumsum([sizes[g] for g in groups])])
        base = {g: offsets[i] - starts[g] for i, g in enumerate(groups)}
        take = np.array([r + base[np.searchsorted(starts, r, side="right") - 1] for r in local_rows], np.int64)
        table = table.take(pa.array(take))
    emb = embeddings_to_float32(table.column("embedding"), dim, shard.url)
    return emb, (table.column("caption").to_pylist() if captions else [])


def read_sample_group(shards: list[ShardRef], train_rows: list[np.ndarray], query_rows: list[np.ndarray],
                      dim: int, storage_options: dict | None) -> dict:
    """Return the training and query vectors (and query captions) that lie in ``shards``, in row order."""
    xt, xq, caps = [], [], []
    for shard, tr, qr in zip(shards, train_rows, query_rows):
        if len(tr) + len(qr) == 0:
            continue
        both = np.concatenate([tr, qr])
        order = np.argsort(both, kind="stable")
        emb, cap = read_rows(shard, both[order], dim, captions=len(qr) > 0, storage_options=storage_options)
        back = np.empty_like(order)
        back[order] = np.arange(len(order))
        emb = emb[back]
        xt.append(emb[: len(tr)].astype(np.float16))  # exact: the shards hold float16; half the transfer
        xq.append(emb[len(tr):])
        if len(qr):
            caps.extend(cap[i] for i in back[len(tr):])
    cat = (lambda parts, dtype: np.concatenate(parts) if parts else np.zeros((0, dim), dtype))
    return {"train": cat(xt, np.float16), "queries": cat(xq, np.float32), "captions": caps}


# ----------------------------------------------------------------------------------------------- exact

class TopK:
    """The running exact top-k (by inner product) of a set of queries over streamed vectors."""

    def __init__(self, nq: int, k: int):
        self.k = k
        self.scores = np.full((nq, k), -np.inf, np.float32)
        self.ids = np.full((nq, k), -1, np.int64)

    def update(self, scores: np.ndarray, ids: np.ndarray) -> None:
        """Fold in ``scores`` (nq, b) of vectors with row ids ``ids`` (b,)."""
        if scores.shape[1] > self.k:
            part = np.argpartition(-scores, self.k - 1, axis=1)[:, : self.k]
            scores = np.take_along_axis(scores, part, axis=1)
            cand = ids[part]
        else:
            cand = np.broadcast_to(ids, scores.shape)
        self._fold(scores, cand)

    def merge(self, other: "TopK") -> None:
        """Fold in another TopK over other vectors."""
        self._fold(other.scores, other.ids)

    def _fold(self, scores: np.ndarray, ids: np.ndarray) -> None:
        s = np.concatenate([self.scores, scores], axis=1)
        i = np.concatenate([self.ids, ids], axis=1)
        # Ties broken by row id, so the result does not depend on the order vectors arrived in.
        order = np.lexsort((i, -s), axis=1)[:, : self.k]
        self.scores = np.take_along_axis(s, order, axis=1)
        self.ids = np.take_along_axis(i, order, axis=1)


def exact_topk(queries: np.ndarray, vectors: np.ndarray, first_id: int, k: int, chunk: int = 4096) -> TopK:
    """Return the exact top-k of ``queries`` over ``vectors`` (ids from ``first_id``), chunk by chunk."""
    top = TopK(len(queries), k)
    for s in range(0, len(vectors), chunk):
        x = vectors[s: s + chunk]
        top.update(queries @ x.T, np.arange(first_id + s, first_id + s + len(x), dtype=np.int64))
    return top


# ------------------------------------------------------------------------------------------------- add

def is_ivf(index) -> bool:
    """Return True when ``index`` (possibly behind a pre-transform) has inverted lists."""
    import faiss

    try:
        faiss.extract_index_ivf(index)
        return True
    except RuntimeError:
        return False


def new_index(dim: int, factory: str, seed: int = 0):
    """Return an empty index for ``factory`` (inner product), seeded, without polysemous PQ training.

    index_factory turns on polysemous training for PQ codes; we never search with Hamming thresholds, and
    on 2 cores it costs minutes (12k x 32 dims: PQ8 trains in ~40 s with it, ~1 s without).
    """
    import faiss

    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    inner = index
    while isinstance(inner, faiss.IndexPreTransform):
        inner = faiss.downcast_index(inner.index)
    if is_ivf(inner):
        ivf = faiss.downcast_index(faiss.extract_index_ivf(inner))
        ivf.cp.seed = seed
        inner = ivf
    if hasattr(inner, "do_polysemous_training"):
        inner.do_polysemous_training = False
    return index


def read_index_file(path: str, flags: int = 0, url: str | None = None, fix: str | None = None):
    """Return the FAISS index in local file ``path``; raise CorruptFileError naming ``url`` (default: ``path``)
    and ``fix`` when FAISS cannot read it (truncated, overwritten, not an index)."""
    import faiss

    try:
        return faiss.read_index(path, flags)
    except RuntimeError as e:
        url = url or path
        raise CorruptFileError(url, faiss_problem(e), fix or (
            f"rebuild it with `icar index RUN... --output {url.rpartition('/')[0] or '.'} --overwrite` (or, for an "
            f"`icar reindex` root, run the reindex again)")) from None


def faiss_problem(e: BaseException) -> str:
    """Return FAISS's complaint about a file without its C++ source location."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    text = re.sub(r"^Error in .*? at \S+:\d+: (Error: )?", "", text)
    if "read error" in text:
        return f"truncated FAISS index: {text}"
    return f"not a FAISS index FAISS can read: {text}"[:300]


def write_index_file(index, url: str, storage_options: dict | None = None) -> int:
    """Write ``index`` to ``url`` atomically (local: temp file + rename; object store: one upload); return bytes."""
    import faiss

    fs, path = storage.filesystem(url, storage_options)
    if storage.is_local(fs):
        directory = os.path.dirname(path) or "."
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex}")
        try:
            faiss.write_index(index, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        return os.path.getsize(path)
    with tempfile.TemporaryDirectory(prefix="icar-index-") as d:
        local = os.path.join(d, os.path.basename(path))
        faiss.write_index(index, local)
        fs.put_file(local, path)
        return os.path.getsize(local)


def fetch_local(url: str, directory: str, storage_options: dict | None = None) -> str:
    """Return a local path for ``url``: itself when local, else a copy downloaded into ``directory``."""
    fs, path = storage.filesystem(url, storage_options)
    if storage.is_local(fs):
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"{url} does not exist on this machine: on a multi-node Ray cluster pass --work-dir on storage "
                f"every node shares (e.g. s3://bucket/tmp)")
        return path
    local = os.path.join(directory, f"{uuid.uuid4().hex}-{os.path.basename(path)}")
    fs.get_file(path, local)
    return local


def add_group(trained: bytes | np.ndarray, shards: list[ShardRef], dim: int, partial_url: str, ids_url: str,
              queries: np.ndarray | None, k: int, storage_options: dict | None = None, threads: int = 1,
              batch_rows: int = ADD_BATCH_ROWS) -> dict:
    """Add ``shards`` to a copy of the trained index; write the partial index and its ids; return a summary.

    Row ids are ``shards[0].first_id`` onwards, in shard order. Also returns the exact top-k of ``queries``
    over these rows (ids, scores), so tuning needs no second pass over the data. Idempotent (retries are safe).
    """
    import faiss

    t0 = time.perf_counter()
    faiss.omp_set_num_threads(max(1, threads))
    index = faiss.deserialize_index(np.frombuffer(trained, dtype=np.uint8) if isinstance(trained, bytes)
                                    else trained)
    with_ids = is_ivf(index)
    top = TopK(len(queries), k) if queries is not None and len(queries) else None
    writer = None
    ids_fs, ids_path = storage.filesystem(ids_url, storage_options)
    local_ids = storage.is_local(ids_fs)
    tmp_dir = tempfile.mkdtemp(prefix="icar-ids-")
    ids_tmp = os.path.join(os.path.dirname(ids_path) if local_ids else tmp_dir,
                           f".{os.path.basename(ids_path)}.tmp-{uuid.uuid4().hex}")
    if local_ids:
        os.makedirs(os.path.dirname(ids_path), exist_ok=True)
    rows = 0
    try:
        writer = pq.ParquetWriter(ids_tmp, IDS_SCHEMA, compression="zstd")
        for shard in shards:
            f, pf = open_parquet(shard.url, storage_options)
            with f:
                if pf.metadata.num_rows != shard.rows:
                    raise ValueError(f"{shard.url} holds {pf.metadata.num_rows} rows but its manifest says "
                                     f"{shard.rows}: the run directory is inconsistent (re-run `icar embed` on it)")
                next_id = shard.first_id
                for batch in pf.iter_batches(batch_size=batch_rows, columns=ID_COLUMNS + ["embedding"]):
                    x = embeddings_to_float32(batch.column("embedding"), dim, shard.url)
                    ids = np.arange(next_id, next_id + len(x), dtype=np.int64)
                    if with_ids:
                        index.add_with_ids(x, ids)
                    else:
                        index.add(x)
                    if top is not None:
                        top.merge(exact_topk(queries, x, next_id, k))
                    writer.write_table(pa.Table.from_arrays(
                        [pa.array(ids)] + [batch.column(c) for c in ID_COLUMNS], schema=IDS_SCHEMA))
                    next_id += len(x)
                    rows += len(x)
        writer.close()
        writer = None
        if local_ids:
            os.replace(ids_tmp, ids_path)
        else:
            ids_fs.put_file(ids_tmp, ids_path)
        nbytes = write_index_file(index, partial_url, storage_options)
    finally:
        if writer is not None:
            writer.close()
        if os.path.exists(ids_tmp):
            os.remove(ids_tmp)
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return {"partial": partial_url, "ids": ids_url, "ntotal": int(index.ntotal), "rows": rows,
            "first_id": shards[0].first_id, "partial_bytes": nbytes,
            "topk_ids": top.ids if top else None, "topk_scores": top.scores if top else None,
            "peak_rss": peak_rss_bytes(), "seconds": time.perf_counter() - t0}


# ----------------------------------------------------------------------------------------------- merge

def merge_in_memory(trained: bytes | np.ndarray, partials: list[str], scratch: str,
                    storage_options: dict | None = None):
    """Return the trained index with every partial merged in, in order (merge_from moves each partial's data)."""
    import faiss

    if len(partials) == 1:
        return faiss.read_index(fetch_local(partials[0], scratch, storage_options))
    index = faiss.deserialize_index(np.frombuffer(trained, dtype=np.uint8) if isinstance(trained, bytes)
                                    else trained)
    for url in partials:
        local = fetch_local(url, scratch, storage_options)
        part = faiss.read_index(local)
        try:
            index.merge_from(part, 0)
        except RuntimeError as e:
            raise RuntimeError(f"FAISS cannot merge partial indexes of this type ({type(part).__name__}): "
                               f"build it with --workers 1, or choose an IVF/Flat/PQ factory ({e})") from e
        if local.startswith(scratch):
            os.remove(local)
        del part
    return index


def merge_on_disk(trained: bytes | np.ndarray, partials: list[str], ivfdata_path: str, scratch: str,
                  storage_options: dict | None = None):
    """Return the trained index whose inverted lists are the partials merged into ``ivfdata_path`` (on disk).

    Partials are memory-mapped while merged, so the index may exceed RAM. The returned index reads its
    lists from ``ivfdata_path``; reopen a written one with IO_FLAG_ONDISK_SAME_DIR (never IO_FLAG_MMAP, which
    segfaults on search with faiss 1.15).
    """
    import faiss
    from faiss.contrib.ondisk import merge_ondisk

    index = faiss.deserialize_index(np.frombuffer(trained, dtype=np.uint8) if isinstance(trained, bytes)
                                    else trained)
    if not is_ivf(index):
        raise ValueError(f"{type(index).__name__} has no inverted lists: it can only be merged in memory")
    locals_ = [fetch_local(u, scratch, storage_options) for u in partials]
    with c_stdout_to_stderr():
        merge_ondisk(index, locals_, ivfdata_path)
    return index


def set_search_params(index, nprobe: int) -> None:
    """Set nprobe (and the HNSW coarse quantizer's efSearch = 2*nprobe, at least 16) on an IVF index."""
    import faiss

    ivf = faiss.extract_index_ivf(index)
    ivf.nprobe = int(nprobe)
    quantizer = faiss.downcast_index(ivf.quantizer)
    if hasattr(quantizer, "hnsw"):
        quantizer.hnsw.efSearch = max(16, 2 * int(nprobe))


# ------------------------------------------------------------------------------------------------ tune

def neighbour_recall(found: np.ndarray, exact: np.ndarray, k: int, self_ids: np.ndarray | None = None) -> float:
    """Return mean |found top-k ∩ exact top-k| / k, leaving out each query's own row id where given.

    Both arrays hold k+1 ids per query (-1 = none) so that dropping the query itself still leaves k.
    """
    total, denom = 0, 0
    for i in range(len(found)):
        f, e = found[i], exact[i]
        if self_ids is not None:
            f, e = f[f != self_ids[i]], e[e != self_ids[i]]
        f, e = f[f >= 0][:k], e[e >= 0][:k]
        total += len(np.intersect1d(f, e))
        denom += len(e)
    return total / denom if denom else 1.0


@dataclass
class QuerySet:
    """Queries for tuning: vectors, their exact top-(k+1) ids, and (image queries) their own row ids."""

    kind: str  # "image" | "text"
    vectors: np.ndarray
    exact: np.ndarray
    self_ids: np.ndarray | None


def tune_nprobe(index, query_sets: list[QuerySet], k: int, target: float, max_nprobe: int,
                reasons: list[str]) -> tuple[int | None, list[dict]]:
    """Return (nprobe, table): the smallest nprobe whose recall@k reaches ``target`` for every query kind.

    Tries powers of two upward (stopping once the target is met, or when recall stops improving because the
    codes, not nprobe, limit it), then bisects below the first passing value. Without the target, returns the
    smallest nprobe within 0.01 of the best recall seen, and says so in ``reasons``.
    """
    rows: dict[int, dict] = {}

    def measure(nprobe: int | None) -> dict:
        if nprobe is not None:
            set_search_params(index, nprobe)
        row: dict = {"nprobe": nprobe}
        elapsed, count = 0.0, 0
        for qs in query_sets:
            t0 = time.perf_counter()
            _, found = index.search(qs.vectors, k + 1)
            elapsed += time.perf_counter() - t0
            count += len(qs.vectors)
            row[qs.kind] = round(neighbour_recall(found, qs.exact, k, qs.self_ids), 4)
        row["ms_per_query"] = round(1000 * elapsed / max(count, 1), 4)
        return row

    def worst(row: dict) -> float:
        return min(row[qs.kind] for qs in query_sets)

    if not is_ivf(index):
        row = measure(None)
        if worst(row) < target:
            reasons.append(f"recall@{k} {worst(row):.3f} is below the target {target}: this index has no nprobe to "
                           f"raise; give it a larger code (--max-index-memory or --factory)")
        return None, [row]
    import faiss

    nlist = faiss.extract_index_ivf(index).nlist
    passing = None
    previous = None
    for p in nprobe_candidates(nlist, max_nprobe):
        rows[p] = measure(p)
        if worst(rows[p]) >= target:
            passing = p
            break
        if previous is not None and worst(rows[p]) - worst(rows[previous]) < 0.002 and p >= 8:
            break  # the codes limit recall; more lists cannot help
        previous = p
    if passing is not None and previous is not None:
        lo, hi = previous, passing
        while hi - lo > 1:
            mid = (lo + hi) // 2
            rows[mid] = measure(mid)
            if worst(rows[mid]) >= target:
                hi = mid
            else:
                lo = mid
        passing = hi
    table = [rows[p] for p in sorted(rows)]
    if passing is None:
        best = max(worst(r) for r in table)
        passing = min(r["nprobe"] for r in table if worst(r) >= best - 0.01)
        reasons.append(f"target recall@{k} {target} not reached (best {best:.3f}); nprobe {passing} is the smallest "
                       f"within 0.01 of the best: the PQ code limits recall, raise --max-index-memory for a larger one")
    else:
        reasons.append(f"nprobe {passing}: the smallest reaching recall@{k} >= {target} for "
                       + " and ".join(qs.kind for qs in query_sets) + " queries")
    set_search_params(index, passing)
    return passing, table


def encode_caption_queries(identity: dict, captions: list[str], device: str) -> np.ndarray:
    """Return L2-normalised text embeddings of ``captions`` with the runs' model (its text tower)."""
    from pipeline.model import models

    bundle = models.load_clip_from_identity(identity, device=device)
    return models.encode_text(bundle, captions)


# ----------------------------------------------------------------------------------------------- build

def _with_secrets(secrets: dict[str, str], fn, *args):
    """Ray task: put the driver's credentials into this worker's environment, then return ``fn(*args)``."""
    from pipeline.runtime import apply_secrets

    apply_secrets(secrets)
    return fn(*args)


class _Runner:
    """Runs add/sample work in this process (one worker) or as Ray tasks; the same functions either way."""

    def __init__(self, cfg: IndexConfig):
        self.cfg = cfg
        self.ray = None
        self.started_ray = False
        self.workers = 1  # add groups to form (at least)
        self.concurrency = 1  # tasks in flight at once
        self.runtime_env = None
        self.secrets: dict[str, str] = {}
        if cfg.workers == 1 and not cfg.resolved_address():
            return
        import ray

        from pipeline.runtime import forwarded_env, forwarded_secrets

        self.ray = ray
        if not ray.is_initialized():
            address = cfg.resolved_address()
            if address:
                log.info("joining Ray cluster at %s", address)
                ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
            else:
                cpus = os.cpu_count() or 1
                log.info("starting an embedded local Ray (%d CPUs)", cpus)
                os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
                # address="local": never attach to some other Ray that happens to run on this machine.
                ray.init(address="local", num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING,
                         log_to_driver=True)
            self.started_ray = True
        cluster_cpus = int(ray.cluster_resources().get("CPU", 1))
        if not cfg.resolved_address():
            cluster_cpus = min(cluster_cpus, os.cpu_count() or 1)  # never more tasks than this machine has cores
        wanted = cfg.workers or cluster_cpus
        if wanted > cluster_cpus:
            log.warning("--workers %d but the cluster has %d CPUs: running %d add tasks at a time",
                        wanted, cluster_cpus, cluster_cpus)
        self.workers = max(1, wanted)
        self.concurrency = max(1, min(wanted, cluster_cpus))
        env = forwarded_env()
        self.runtime_env = {"env_vars": env} if env else None
        # Credentials travel as a task argument, never in runtime_env (Ray writes that to its logs).
        self.secrets = forwarded_secrets()

    def map(self, fn, calls: list[tuple], desc: str, unit_sizes: list[int] | None = None) -> list:
        """Return fn(*args) for each args tuple in ``calls``, in order; tasks when on Ray."""
        bar = None
        if self.cfg.progress and len(calls) > 0:
            from tqdm.auto import tqdm

            bar = tqdm(total=sum(unit_sizes) if unit_sizes else len(calls), desc=desc, unit="vec" if unit_sizes
                       else "task", file=sys.stderr, dynamic_ncols=True, unit_scale=True, leave=False)
        results: list = [None] * len(calls)
        try:
            if self.ray is None:
                for i, args in enumerate(calls):
                    results[i] = fn(*args)
                    if bar:
                        bar.update(unit_sizes[i] if unit_sizes else 1)
                return results
            ray = self.ray
            # Named after fn: the dashboard, `ray list tasks` and the worker's process title show ray::add_group.
            remote = ray.remote(_with_secrets).options(name=fn.__name__, num_cpus=1, retry_exceptions=True,
                                                       max_retries=self.cfg.task_retries, runtime_env=self.runtime_env)
            pending = {}
            queue = list(enumerate(calls))
            # At most `concurrency` tasks in flight: bounded memory on every node, and no task waits holding args.
            while queue or pending:
                while queue and len(pending) < self.concurrency:
                    i, args = queue.pop(0)
                    pending[remote.remote(self.secrets, fn, *args)] = i
                done, _ = ray.wait(list(pending), num_returns=1, timeout=self.cfg.task_timeout_s)
                if not done:
                    raise TimeoutError(f"{desc}: no task finished within {self.cfg.task_timeout_s:.0f}s "
                                       f"(--task-timeout); {len(pending)} still running")
                for ref in done:
                    i = pending.pop(ref)
                    results[i] = ray.get(ref)
                    if bar:
                        bar.update(unit_sizes[i] if unit_sizes else 1)
            return results
        finally:
            if bar:
                bar.close()

    def put(self, value):
        """Return a handle to ``value`` for task arguments (an object-store ref on Ray: shipped once)."""
        return self.ray.put(value) if self.ray is not None else value

    def close(self) -> None:
        if self.started_ray:
            self.ray.shutdown()


def build_index(cfg: IndexConfig) -> IndexSummary:
    """Build the index directory ``cfg.output`` from ``cfg.runs``; return its summary (index.json inside).

    The build holds the directory's lock (``OUTPUT/icar.lock``) from before anything is read or written until it
    ends: a second build of the same output is refused at once with LockHeld naming the holder, never left to
    remove the first one's partials and index.json. The index is written in place (no build elsewhere that is
    swapped in), so a lock file inside the directory stays put.
    """
    from pipeline.runtime import sigterm_as_interrupt

    out = cfg.output.rstrip("/")
    fs, path = storage.filesystem(out, cfg.storage_options or None)
    new_dir = storage.is_local(fs) and not os.path.exists(path)  # the lock file creates it
    lock = output_lock(out, "index", cfg.lock_stale_after_s, cfg.lock_heartbeat_s, cfg.storage_options or None)
    lock.acquire(break_lock=cfg.break_lock)
    restore_sigterm = sigterm_as_interrupt()  # a SIGTERM unwinds (releasing the lock) instead of killing
    try:
        return _build_index_locked(cfg, lock)
    finally:
        restore_sigterm()
        lock.release()
        if new_dir and os.path.isdir(path) and not os.listdir(path):
            os.rmdir(path)  # a build refused before writing anything leaves no empty output behind


def _build_index_locked(cfg: IndexConfig, lock: RootLock) -> IndexSummary:
    """Do build_index's work while holding the output's ``lock``; return the summary."""
    import faiss

    timer = PhaseTimer()
    if cfg.threads:
        faiss.omp_set_num_threads(cfg.threads)
    so = cfg.storage_options or None
    out = cfg.output.rstrip("/")
    if storage.exists(storage.join(out, INDEX_JSON), so) and not cfg.overwrite:
        raise FileExistsError(f"{out} already holds an index ({INDEX_JSON}): pass --overwrite to replace it, "
                              f"or choose another --output")
    max_index = parse_size(cfg.max_index_memory)
    max_build = parse_size(cfg.max_build_memory) if cfg.max_build_memory else default_build_memory()
    reasons: list[str] = []

    with timer.phase("plan"):
        plan = plan_runs(cfg.runs, so)
        n, dim = plan.ntotal, plan.dim
        log.info("%d runs, %d shards, %s vectors of dimension %d (model %s)", len(plan.runs), len(plan.shards),
                 f"{n:,}", dim, plan.model_key)
        code_bytes = None
        if cfg.factory:
            try:
                probe = faiss.index_factory(dim, cfg.factory, faiss.METRIC_INNER_PRODUCT)
            except RuntimeError as e:
                raise ValueError(f"--factory {cfg.factory!r} is not a FAISS factory string for dim {dim}: {e}") from e
            # Bytes stored per vector: an IVF's list entries hold the code without the list number.
            code_bytes = faiss.extract_index_ivf(probe).code_size if is_ivf(probe) else probe.sa_code_size()
            del probe
        trained_bytes = _read_trained(cfg, dim, so) if cfg.trained_index else None
        # Memory is estimated (and an impossible budget refused) before Ray starts or any data is read.
        largest = min(max(s.rows for s in plan.shards), 16384)
        workers = cfg.workers or os.cpu_count() or 1
        params = choose_index_params(n, dim, max_index, max_build, factory=cfg.factory, code_bytes=code_bytes,
                                     workers=workers, shard_rows=largest, flat_below=cfg.flat_below,
                                     merge=cfg.merge)
        if trained_bytes is not None:
            params.train_size = 0  # only queries are sampled: the given trained index is added into as it is
            params.reasons.append(f"no training: vectors are added into the trained index {cfg.trained_index}")
        for r in params.reasons:
            log.info("index choice: %s", r)
        reasons.extend(params.reasons)
    with timer.phase("start_workers"):
        runner = _Runner(cfg)
    try:
        summary = _build(cfg, plan, params, runner, timer, max_index, max_build, reasons, lock, trained_bytes)
    finally:
        runner.close()
    return summary


def _read_trained(cfg: IndexConfig, dim: int, so) -> bytes:
    """Return the serialised trained index at ``cfg.trained_index`` after checking it fits this build."""
    import faiss

    if not cfg.factory:
        raise ValueError(f"--trained-index {cfg.trained_index} needs --factory: the factory string it was built "
                         f"with (its index.json 'factory')")
    fs, path = storage.filesystem(cfg.trained_index, so)
    with fs.open(path, "rb") as f:
        data = f.read()
    try:
        index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
    except RuntimeError as e:
        raise CorruptFileError(cfg.trained_index, faiss_problem(e),
                               "pass the trained.faiss of an index directory written by `icar index`, or leave out "
                               "--trained-index to train anew") from None
    if index.d != dim or not index.is_trained or index.ntotal != 0:
        raise ValueError(f"{cfg.trained_index} cannot be added into: dimension {index.d} (the runs have {dim}), "
                         f"trained {index.is_trained}, {index.ntotal} vectors (it must be a trained, empty index)")
    return data


def _build(cfg: IndexConfig, plan: RunPlan, params: IndexParams, runner: _Runner, timer: PhaseTimer,
           max_index: int, max_build: int, reasons: list[str], lock: RootLock,
           trained_bytes: bytes | None = None) -> IndexSummary:
    """Run the phases after planning; partials and scratch files are removed whatever happens."""
    so = cfg.storage_options or None
    out = cfg.output.rstrip("/")
    work = (cfg.work_dir.rstrip("/") if cfg.work_dir else storage.join(out, "_build")) + f"/{uuid.uuid4().hex[:12]}"
    if not cfg.work_dir and storage.exists(storage.join(out, "_build"), so):
        # Partial indexes of an earlier build of this output that was killed (SIGKILL, a preempted driver) are
        # never reused and can be as large as the index: remove them before writing new ones.
        log.warning("removing %s: partial indexes left by an interrupted build", storage.join(out, "_build"))
        _remove_tree(storage.join(out, "_build"), so)
    scratch = tempfile.mkdtemp(prefix="icar-index-")
    storage.makedirs(out, so)
    marker = storage.join(out, INDEX_JSON)
    if cfg.overwrite and storage.exists(marker, so):
        # Unmark the old index before anything in OUTPUT is replaced: a build killed halfway must never leave the
        # old index.json describing a new ids.parquet or index.faiss (a searcher would name the wrong images).
        # The plan and the budgets were accepted above, so a refused build never gets this far.
        storage.remove(marker, so)
        log.info("--overwrite: removed the old %s; %s is incomplete until this build writes its own", INDEX_JSON, out)
    b = _Build(cfg, plan, params, runner, out, work, scratch, so, reasons, max_index, max_build)
    b.reused = trained_bytes
    try:
        with timer.phase("sample"):
            b.sample()
        with timer.phase("train"):
            b.train()
        with timer.phase("encode_text_queries"):
            b.encode_text_queries()
        with timer.phase("add"):
            b.add()
        with timer.phase("merge"):
            b.merge()
        with timer.phase("ids"):
            _concat_ids([r["ids"] for r in b.results], storage.join(out, IDS_FILE), scratch, so)
        with timer.phase("tune"):
            b.tune()
        with timer.phase("write"):
            b.write_index()
        info = b.index_json()
        info["build_seconds"] = dict(timer.seconds)
        info["build_seconds"]["total"] = timer.total()
        lock.check()  # LockLost: another build took this output over; never mark its files as this index
        storage.write_json(info, storage.join(out, INDEX_JSON), so)  # last: marks the index complete
        return IndexSummary(output=out, info=info)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        _remove_tree(work, so)


class _Build:
    """The state one build carries from phase to phase (see the module docstring for the phases)."""

    def __init__(self, cfg: IndexConfig, plan: RunPlan, params: IndexParams, runner: _Runner, out: str,
                 work: str, scratch: str, so: dict | None, reasons: list[str], max_index: int, max_build: int):
        self.cfg, self.plan, self.params, self.runner = cfg, plan, params, runner
        self.max_index, self.max_build = max_index, max_build  # bytes
        self.out, self.work, self.scratch, self.so, self.reasons = out, work, scratch, so, reasons
        self.n, self.dim, self.k = plan.ntotal, plan.dim, cfg.k
        self.shard_rows = [s.rows for s in plan.shards]
        self.starts = np.array([s.first_id for s in plan.shards] + [self.n], np.int64)
        self.text_info: dict = {}
        self.text_vectors: np.ndarray | None = None
        self.ivfdata: str | None = None
        self.reused: bytes | None = None  # a trained empty index given by --trained-index: no training

    def _groups(self, max_vectors: int | None = None) -> list[list[int]]:
        return group_shards(self.shard_rows, self.runner.workers, max_vectors)

    def sample(self) -> None:
        """Read the training sample and the held-out query vectors (with captions) from the shards."""
        n = self.n
        n_queries = min(self.cfg.queries, max(1, n // 2))
        train_ids, self.query_ids, self.held_out = sample_rows(n, self.params.train_size, n_queries, self.cfg.seed)
        per_train = split_by_shard(train_ids, self.starts)
        per_query = split_by_shard(self.query_ids, self.starts)
        shards = self.plan.shards
        groups = self._groups()
        calls = [([shards[i] for i in g], [per_train[i] for i in g], [per_query[i] for i in g], self.dim, self.so)
                 for g in groups]
        parts = self.runner.map(read_sample_group, calls, "sample", [sum(self.shard_rows[i] for i in g) for g in groups])
        self.xt = np.empty((sum(len(p["train"]) for p in parts), self.dim), np.float32)
        filled = 0
        for p in parts:  # widened straight into one float32 array: no float16 concatenation copy
            self.xt[filled: filled + len(p["train"])] = p["train"]
            filled += len(p["train"])
        self.xq = np.concatenate([p["queries"] for p in parts])
        self.captions = [c for p in parts for c in p["captions"]]
        log.info("sampled %s training and %d query vectors (%s)", f"{len(self.xt):,}", len(self.xq),
                 "held out of training" if self.held_out else "drawn from the training set: small corpus")

    def train(self) -> None:
        """Train the empty index on the sample (or take the given trained one) and serialise it for the add tasks."""
        import faiss

        if self.reused is not None:
            self.trained = np.frombuffer(self.reused, dtype=np.uint8)
            del self.xt
            log.info("reusing the trained %s from %s", self.params.factory, self.cfg.trained_index)
        else:
            index = new_index(self.dim, self.params.factory, self.cfg.seed)
            if not index.is_trained:
                index.train(self.xt)
            self.trained = faiss.serialize_index(index)
            del self.xt
            log.info("trained %s: %s serialised", self.params.factory, format_size(self.trained.nbytes))
        # Kept beside the index (small: centroids and codebooks) so a build over a grown corpus can skip training.
        self.trained_file = TRAINED_FILE if (self.params.train_size or self.reused is not None) else None
        if self.trained_file:
            storage.atomic_write_bytes(storage.join(self.out, TRAINED_FILE), self.trained.tobytes(), self.so)

    def encode_text_queries(self) -> None:
        """Encode the sampled captions with the runs' text tower, where --text-queries allows."""
        self.text_vectors, self.text_info = _text_queries(self.cfg, self.plan, self.captions)

    def query_sets(self) -> list[tuple[str, np.ndarray, np.ndarray | None]]:
        """Return (kind, vectors, own row ids or None) per query kind, in the order their exact top-k is kept."""
        sets = [("image", self.xq, self.query_ids)]
        if self.text_vectors is not None:
            sets.append(("text", self.text_vectors, None))
        return sets

    def add(self) -> None:
        """Add every shard, group by group, and keep the exact top-(k+1) of all queries over the corpus."""
        runner, shards, k = self.runner, self.plan.shards, self.k
        queries = np.concatenate([v for _, v, _ in self.query_sets()]).astype(np.float32)
        cap = max_group_vectors(self.params, self.dim, self.max_build, runner.concurrency,
                                min(max(self.shard_rows), 16384))
        self.groups = self._groups(cap)
        trained_ref, queries_ref = runner.put(self.trained), runner.put(queries)
        calls = [(trained_ref, [shards[i] for i in g], self.dim, f"{self.work}/part-{j:05d}.faiss",
                  f"{self.work}/ids-{j:05d}.parquet", queries_ref, k + 1, self.so, 1)
                 for j, g in enumerate(self.groups)]
        self.results = runner.map(add_group, calls, "add", [sum(self.shard_rows[i] for i in g) for g in self.groups])
        total = sum(r["ntotal"] for r in self.results)
        if total != self.n:
            raise RuntimeError(f"added {total} vectors but the manifests list {self.n}: a shard changed during "
                               f"the build; run it again")
        self.top = TopK(len(queries), k + 1)
        for r in self.results:
            if r["topk_ids"] is not None:
                self.top.merge(_topk_from(r, k + 1))
        log.info("added %s vectors in %d group(s), %d at a time", f"{self.n:,}", len(self.groups),
                 runner.concurrency)

    def merge(self) -> None:
        """Merge the partial indexes in order: in memory, or on disk into index.ivfdata."""
        partials = [r["partial"] for r in self.results]
        if self.params.merge == "disk":
            self.ivfdata = IVFDATA_FILE
            self.index = _merge_to_disk(self.trained, partials, self.out, self.scratch, self.so)
        else:
            self.index = merge_in_memory(self.trained, partials, self.scratch, self.so)
        del self.trained
        if self.index.ntotal != self.n:
            raise RuntimeError(f"merged index holds {self.index.ntotal} vectors, expected {self.n}")

    def tune(self) -> None:
        """Pick nprobe against the exact top-k of the held-out queries (and caption queries)."""
        sets, offset = [], 0
        for kind, vectors, self_ids in self.query_sets():
            sets.append(QuerySet(kind, vectors, self.top.ids[offset: offset + len(vectors)], self_ids))
            offset += len(vectors)
        self.sets = sets
        self.nprobe, self.table = tune_nprobe(self.index, sets, self.k, self.cfg.target_recall, self.cfg.max_nprobe,
                                              self.reasons)
        for row in self.table:
            log.info("nprobe %s: %s", row["nprobe"],
                     ", ".join(f"{s.kind} recall@{self.k} {row[s.kind]:.3f}" for s in sets))

    def write_index(self) -> None:
        """Write index.faiss (and place index.ivfdata for an on-disk index)."""
        if self.ivfdata:
            _point_ivfdata(self.index, self.out, self.so)
        self.file_bytes = write_index_file(self.index, storage.join(self.out, INDEX_FILE), self.so)
        if self.ivfdata:
            self.file_bytes += _ivfdata_size(self.out, self.so)

    def index_json(self) -> dict:
        """Return the index.json document (DESIGN.md: the index directory contract)."""
        import faiss

        p, index = self.params, self.index
        efsearch = None
        if is_ivf(index):
            q = faiss.downcast_index(faiss.extract_index_ivf(index).quantizer)
            efsearch = int(q.hnsw.efSearch) if hasattr(q, "hnsw") else None
        chosen = next(r for r in self.table if r["nprobe"] == self.nprobe)
        recall = {s.kind: {"queries": len(s.vectors), "at_nprobe": chosen[s.kind],
                           "by_nprobe": {str(r["nprobe"]): r[s.kind] for r in self.table}} for s in self.sets}
        recall.setdefault("text", self.text_info)
        return {
            "format": INDEX_FORMAT,
            "factory": p.factory,
            "metric": "inner_product",
            "dim": self.dim,
            "ntotal": int(index.ntotal),
            "kind": p.kind,
            "nlist": p.nlist,
            "coarse_quantizer": p.coarse or None,
            "pq_m": p.m,
            "pq_nbits": p.nbits if p.m else None,
            "opq": p.opq,
            "opq_dim": p.opq_dim or None,
            "nprobe": self.nprobe,
            "quantizer_efsearch": efsearch,
            "k": self.k,
            "target_recall": self.cfg.target_recall,
            "recall": recall,
            "tuning": self.table,
            "queries": {"image": len(self.xq), "text": 0 if self.text_vectors is None else len(self.text_vectors),
                        "held_out_of_training": self.held_out, "self_match_excluded": True},
            "train_size": p.train_size,
            "trained": {"file": self.trained_file, "reused_from": self.cfg.trained_index},
            "merge": p.merge,
            "ivfdata": self.ivfdata,
            "open_with": ("faiss.read_index(path, faiss.IO_FLAG_ONDISK_SAME_DIR)" if self.ivfdata
                          else "faiss.read_index(path)"),
            "bytes_per_vector": round(self.file_bytes / max(1, index.ntotal), 3),
            "code_bytes_per_vector": p.code_bytes,
            "memory": {
                "max_index_bytes": self.max_index,
                "max_build_bytes": self.max_build,
                "estimated_index_bytes": p.estimated_bytes,
                "estimated_build_bytes": p.estimated_build_bytes,
                "estimated_task_bytes": p.estimated_task_bytes,
                "estimated_phase_bytes": p.build_phases,
                "index_file_bytes": self.file_bytes,
                "peak_rss_driver_bytes": peak_rss_bytes(),
                "peak_rss_task_bytes": max(r["peak_rss"] for r in self.results),
            },
            "model": self.plan.model,
            "model_key": self.plan.model_key,
            "runs": self.plan.run_infos,
            "shards": len(self.plan.shards),
            "add_groups": len(self.groups),
            "workers": self.runner.concurrency,
            "seed": self.cfg.seed,
            "reasons": self.reasons,
            "versions": _versions(),
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }


def _topk_from(result: dict, k: int) -> TopK:
    t = TopK(len(result["topk_ids"]), k)
    t.ids, t.scores = result["topk_ids"], result["topk_scores"]
    return t


def _text_queries(cfg: IndexConfig, plan: RunPlan, captions: list) -> tuple[np.ndarray | None, dict]:
    """Return (caption query vectors or None, what happened) per --text-queries (None: auto)."""
    if cfg.text_queries is False:
        return None, {"skipped": "--no-text-queries"}
    texts = list(dict.fromkeys(c.strip() for c in captions if c and c.strip()))
    if not texts:
        if cfg.text_queries:
            raise ValueError("--text-queries: the sampled rows have no captions; pass --no-text-queries")
        return None, {"skipped": "the sampled rows have no captions"}
    try:
        q = encode_caption_queries(plan.model, texts, cfg.device)
    except Exception as e:  # auto mode: any failure to load or run the encoder skips text tuning, recorded
        if cfg.text_queries:
            raise
        why = f"text encoder unavailable ({type(e).__name__}: {e})"
        log.warning("caption queries skipped: %s; pass --text-queries to make this an error", why)
        return None, {"skipped": why}
    log.info("encoded %d caption queries", len(q))
    return q, {}


def _merge_to_disk(trained, partials: list[str], out: str, scratch: str, so):
    """Merge partials on disk: the .ivfdata file is built next to its final place (local) or in scratch."""
    fs, path = storage.filesystem(out, so)
    if storage.is_local(fs):
        os.makedirs(path, exist_ok=True)
        tmp = os.path.join(path, f".{IVFDATA_FILE}.tmp-{uuid.uuid4().hex}")
    else:
        tmp = os.path.join(scratch, IVFDATA_FILE)
    return merge_on_disk(trained, partials, tmp, scratch, so)


def _point_ivfdata(index, out: str, so) -> None:
    """Move the merged .ivfdata to its final place and make the index refer to it (absolute path when local)."""
    import faiss

    invlists = faiss.extract_index_ivf(index).invlists
    ondisk = faiss.downcast_InvertedLists(invlists)
    current = ondisk.filename
    fs, path = storage.filesystem(out, so)
    if storage.is_local(fs):
        final = os.path.abspath(os.path.join(path, IVFDATA_FILE))
        os.replace(current, final)  # the mapping stays valid across the rename
        ondisk.filename = final
    else:
        fs.put_file(current, storage.join(path, IVFDATA_FILE))
        # Readers download both files into one directory and open with IO_FLAG_ONDISK_SAME_DIR.
        ondisk.filename = IVFDATA_FILE


def _ivfdata_size(out: str, so) -> int:
    fs, path = storage.filesystem(storage.join(out, IVFDATA_FILE), so)
    return int(fs.size(path))


def _concat_ids(parts: list[str], url: str, scratch: str, so) -> None:
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


def _remove_tree(url: str, so) -> None:
    """Remove the build's partials (and the parent _build folder when it is left empty)."""
    fs, path = storage.filesystem(url, so)
    if fs.exists(path):
        fs.rm(path, recursive=True)
    parent = path.rsplit("/", 1)[0]
    if storage.is_local(fs) and os.path.isdir(parent) and not os.listdir(parent):
        os.rmdir(parent)


def _versions() -> dict:
    import faiss

    from pipeline import __version__ as icar_version

    return {"faiss": faiss.__version__, "numpy": np.__version__, "pyarrow": pa.__version__,
            "icar": icar_version}
