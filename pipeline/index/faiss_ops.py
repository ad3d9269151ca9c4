"""FAISS operations of a build: empty indexes, the add task, merging partials (in memory or on disk), and
reading and writing index files with errors that name the file and the fix.

faiss is imported inside each function: it is a heavy C++ library, and the CLI and job configs import the
index package (for IndexConfig's defaults) without building anything.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.index.exact import TopK, exact_topk
from pipeline.index.layout import ID_COLUMNS, IDS_SCHEMA, IVFDATA_FILE
from pipeline.index.params import ADD_BATCH_ROWS
from pipeline.index.read import ShardRef, open_parquet, shard_vectors
from pipeline.io import storage
from pipeline.io.storage import CorruptFileError
from pipeline.logs import peak_rss_bytes


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


def is_ivf(index) -> bool:
    """Return True when ``index`` (possibly behind a pre-transform) has inverted lists."""
    import faiss  # lazy: see the module docstring

    try:
        faiss.extract_index_ivf(index)
        return True
    except RuntimeError:
        return False


def new_index(dim: int, factory: str, seed: int = 0, opq_train_points: int = 0, opq_iterations: int = 0):
    """Return an empty index for ``factory`` (inner product), seeded, without polysemous PQ training.

    index_factory turns on polysemous training for PQ codes; we never search with Hamming thresholds, and
    on 2 cores it costs minutes (12k x 32 dims: PQ8 trains in ~40 s with it, ~1 s without). An OPQ rotation
    is trained on at most ``opq_train_points`` vectors for ``opq_iterations`` iterations (0: FAISS's defaults,
    65,536 and 50, which cost most of the build on 2 cores).
    """
    import faiss  # lazy: see the module docstring

    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    inner = index
    while isinstance(inner, faiss.IndexPreTransform):
        for i in range(inner.chain.size()):
            vt = faiss.downcast_VectorTransform(inner.chain.at(i))
            if isinstance(vt, faiss.OPQMatrix):
                if opq_train_points:
                    vt.max_train_points = int(opq_train_points)
                if opq_iterations:
                    vt.niter = int(opq_iterations)
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
    import faiss  # lazy: see the module docstring

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
    import faiss  # lazy: see the module docstring

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
    over these rows (ids, scores), so tuning needs no second pass over the data.
    ``dim`` is the embeddings' dimension; the vectors added are ``shard_vectors``' (one wider with exit offsets, as
    the trained index and ``queries`` are). Idempotent (retries are safe).
    """
    import faiss  # lazy: see the module docstring

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
                for batch in pf.iter_batches(batch_size=batch_rows, columns=ID_COLUMNS + shard.columns):
                    x = shard_vectors(batch, shard, dim)  # scaled (and offset) by exit depth as the run records
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


def merge_in_memory(trained: bytes | np.ndarray, partials: list[str], scratch: str,
                    storage_options: dict | None = None):
    """Return the trained index with every partial merged in, in order (merge_from moves each partial's data)."""
    import faiss  # lazy: see the module docstring

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
                               f"build it with --add-tasks 1, or choose an IVF/Flat/PQ factory ({e})") from e
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
    import faiss  # lazy: see the module docstring
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
    import faiss  # lazy: see the module docstring

    ivf = faiss.extract_index_ivf(index)
    ivf.nprobe = int(nprobe)
    quantizer = faiss.downcast_index(ivf.quantizer)
    if hasattr(quantizer, "hnsw"):
        quantizer.hnsw.efSearch = max(16, 2 * int(nprobe))


def merge_to_disk(trained, partials: list[str], out: str, scratch: str, so):
    """Merge partials on disk: the .ivfdata file is built next to its final place (local) or in scratch."""
    fs, path = storage.filesystem(out, so)
    if storage.is_local(fs):
        os.makedirs(path, exist_ok=True)
        tmp = os.path.join(path, f".{IVFDATA_FILE}.tmp-{uuid.uuid4().hex}")
    else:
        tmp = os.path.join(scratch, IVFDATA_FILE)
    return merge_on_disk(trained, partials, tmp, scratch, so)


def point_ivfdata(index, out: str, so) -> None:
    """Move the merged .ivfdata to its final place and make the index refer to it (absolute path when local)."""
    import faiss  # lazy: see the module docstring

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


def ivfdata_size(out: str, so) -> int:
    """Return the size in bytes of the index.ivfdata written to ``out``."""
    fs, path = storage.filesystem(storage.join(out, IVFDATA_FILE), so)
    return int(fs.size(path))
