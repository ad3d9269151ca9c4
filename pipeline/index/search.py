"""Query an index directory: load it once, answer many text, image or vector queries.

The query encoder is the model named in index.json ("model"), re-created with
``pipeline.model.models.load_clip_from_identity``, which verifies the weights hash: an index is never searched
with embeddings from another model. Images go through the same decoding as `icar embed`
(``pipeline.io.decode``) and the full-depth image tower (``model.encode_image``).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.index.faiss_ops import (
    c_stdout_to_stderr,
    read_index_file,
    set_search_params,
)
from pipeline.index.layout import IDS_FILE, INDEX_FILE, INDEX_JSON
from pipeline.index.read import append_column, open_parquet, plan_runs
from pipeline.io import storage
from pipeline.io.decode import DecodeConfig, decode_image
from pipeline.io.schema import model_key
from pipeline.io.storage import CorruptFileError, parquet_problem

log = logging.getLogger(__name__)


# Bytes of FAISS results one batch of queries may take: queries x k x (distance + id), 8 + 8 bytes counted.
QUERY_BATCH_BYTES = 256 * 2**20


def query_batch(k: int) -> int:
    """Return how many queries to search at once with ``k`` results each, keeping their results within
    QUERY_BATCH_BYTES."""
    return max(1, QUERY_BATCH_BYTES // (16 * max(1, k)))


class IndexModelMismatchError(ValueError):
    """The query encoder is not the model the index was built with."""


@dataclass
class Hit:
    """One search result."""

    key: str  # sample key (unique within the corpus)
    # Inner product of the L2-normalised query and the indexed vector: the cosine for full-depth rows and rows of runs
    # without exit calibration; scale x cosine + offset for an early-exit row whose run records exit_scales and
    # exit_offsets (the scale and offset of the row's exit depth; scale 1 and offset 0 where it records none).
    score: float
    caption: str | None  # caption / alt text, if the corpus had one
    url: str | None  # original URL, if known
    source: str  # input shard URI the image came from
    row_id: int  # the vector's id in index.faiss (row of ids.parquet)

    def to_dict(self) -> dict:
        """Return the hit as a JSON-ready dict."""
        return dict(self.__dict__)


class IdTable:
    """Row id -> (key, source, caption, url) from ids.parquet, reading only the row groups hits fall in."""

    def __init__(self, path: str, cache_groups: int = 16):
        try:
            self.file = pq.ParquetFile(path)
        except pa.ArrowException as e:
            raise CorruptFileError(path, parquet_problem(e), "rebuild the index directory with `icar index`") from e
        sizes = [self.file.metadata.row_group(i).num_rows for i in range(self.file.num_row_groups)]
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.num_rows = int(self.starts[-1])
        self.cache: OrderedDict[int, dict] = OrderedDict()
        self.cache_groups = cache_groups

    def _group(self, g: int) -> dict:
        if g in self.cache:
            self.cache.move_to_end(g)
            return self.cache[g]
        table = self.file.read_row_group(g, columns=["key", "source", "caption", "url"])
        cols = {name: table.column(name).to_pylist() for name in table.column_names}
        self.cache[g] = cols
        if len(self.cache) > self.cache_groups:
            self.cache.popitem(last=False)
        return cols

    def rows(self, row_ids) -> list[dict]:
        """Return the id row of each row id, in order."""
        out = []
        for rid in row_ids:
            rid = int(rid)
            if not 0 <= rid < self.num_rows:
                raise IndexError(f"row id {rid} is outside ids.parquet (0..{self.num_rows - 1}): index and ids "
                                 f"do not belong together")
            g = int(np.searchsorted(self.starts, rid, side="right") - 1)
            cols = self._group(g)
            i = rid - int(self.starts[g])
            out.append({name: values[i] for name, values in cols.items()})
        return out


class Searcher:
    """An index directory loaded once: ``search_text``, ``search_image`` and ``search_vectors`` answer queries.

    ``index_dir``: local path or URL (object stores are downloaded once into ``cache_dir``, a temporary
    directory by default). ``nprobe`` overrides the tuned value from index.json. ``bundle``: an already loaded
    query model (its model_key must match the index's); by default the model is loaded from index.json's
    identity on first text or image query.
    """

    def __init__(self, index_dir: str, device: str = "cpu", nprobe: int | None = None,
                 storage_options: dict | None = None, bundle=None, cache_dir: str | None = None):
        import faiss  # lazy: a heavy C++ library (see faiss_ops)

        self.index_dir = index_dir.rstrip("/")
        self.device = device
        so = storage_options or None
        self.storage_options = so
        json_url = storage.join(self.index_dir, INDEX_JSON)
        if not storage.exists(json_url, so):
            raise FileNotFoundError(f"{self.index_dir} has no {INDEX_JSON}: not an index directory, or its build did "
                                    f"not finish (run `icar index RUN... --output {self.index_dir}`)")
        try:
            self.info: dict = storage.read_json(json_url, so)
        except CorruptFileError as e:
            raise e.with_fix(f"rebuild the index directory with `icar index RUN... --output {self.index_dir} "
                             f"--overwrite`") from None
        self._tmp = None
        local = self._local_dir(so, cache_dir)
        ivfdata = self.info.get("ivfdata")
        # On-disk lists: IO_FLAG_ONDISK_SAME_DIR finds the .ivfdata beside index.faiss wherever it was moved.
        # Never IO_FLAG_MMAP: searching an index read with it segfaults (faiss 1.15).
        flags = faiss.IO_FLAG_ONDISK_SAME_DIR if ivfdata else 0
        index_url = storage.join(self.index_dir, INDEX_FILE)
        with c_stdout_to_stderr():  # FAISS prints the .ivfdata path it settles on
            self.index = read_index_file(os.path.join(local, INDEX_FILE), flags, url=index_url)
        if self.index.ntotal != self.info["ntotal"]:
            raise ValueError(f"{INDEX_FILE} holds {self.index.ntotal} vectors but {INDEX_JSON} says "
                             f"{self.info['ntotal']}: the directory mixes two builds; rebuild it")
        # An index with exit offsets holds one dimension more than the queries: each gets query_constant appended.
        self.query_constant = self.info.get("query_constant")
        index_dim = self.info.get("index_dim", self.info["dim"])
        if self.index.d != index_dim:
            raise ValueError(f"{INDEX_FILE} holds vectors of dimension {self.index.d} but {INDEX_JSON} says "
                             f"{index_dim}: the directory mixes two builds; rebuild it")
        self.ids = IdTable(os.path.join(local, IDS_FILE))
        if self.ids.num_rows != self.index.ntotal:
            raise ValueError(f"{IDS_FILE} has {self.ids.num_rows} rows for {self.index.ntotal} vectors: rebuild the index")
        self.nprobe = nprobe or self.info.get("nprobe")
        if nprobe is not None:
            if not self.info.get("nlist"):
                raise ValueError(f"--nprobe applies to IVF indexes; this one is {self.info['factory']}")
            set_search_params(self.index, nprobe)
        self._bundle = None
        if bundle is not None:
            self._check_model(bundle)
            self._bundle = bundle

    def _local_dir(self, so, cache_dir: str | None) -> str:
        fs, path = storage.filesystem(self.index_dir, so)
        if storage.is_local(fs):
            return path
        self._tmp = cache_dir or tempfile.mkdtemp(prefix="icar-search-")
        names = [INDEX_FILE, IDS_FILE] + ([self.info["ivfdata"]] if self.info.get("ivfdata") else [])
        for name in names:
            fs.get_file(storage.join(path, name), os.path.join(self._tmp, name))
        log.info("downloaded %s into %s", self.index_dir, self._tmp)
        return self._tmp

    def close(self) -> None:
        """Drop the temporary copy of a remote index (if any)."""
        if self._tmp and self._tmp.startswith(tempfile.gettempdir()):
            shutil.rmtree(self._tmp, ignore_errors=True)
        self._tmp = None

    def __enter__(self) -> "Searcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------- model

    def _check_model(self, bundle) -> None:
        want, got = self.info["model_key"], model_key(bundle.identity)
        if want != got:
            raise IndexModelMismatchError(
                f"the query model {got} is not the model the index was built with ({want}): text and image "
                f"queries must be embedded by the same weights; load the index's own model (leave bundle unset)")

    @property
    def model(self):
        """Return the query model (a pipeline.model.models.ClipBundle), loading it from index.json on first use."""
        if self._bundle is None:
            # lazy: torch, only for text/image queries
            from pipeline.model.models import load_clip_from_identity

            bundle = load_clip_from_identity(self.info["model"], device=self.device)
            self._check_model(bundle)
            self._bundle = bundle
        return self._bundle

    # ------------------------------------------------------------------------------------------ search

    def search_vectors(self, queries, k: int = 10) -> list[list[Hit]]:
        """Return the top-``k`` hits for each query embedding (rows of a (N, D) array, or one (D,) vector)."""
        q = np.asarray(queries, dtype=np.float32)
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2 or q.shape[1] != self.info["dim"]:
            raise ValueError(f"query embeddings have shape {q.shape}, the index holds dimension {self.info['dim']}")
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        # FAISS allocates queries x k results up front whatever the index holds (k = 10^9 asked for 22 GB on 192
        # vectors): no query has more hits than the index has vectors, and queries go in batches of bounded size.
        k = min(int(k), max(1, int(self.index.ntotal)))
        # The index holds L2-normalised embeddings (early-exit rows times their run's exit scale, and, with exit
        # offsets, followed by the row's offset: read.py); normalising queries makes scores cosines (times that scale),
        # and appending query_constant adds the row's offset.
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        if self.query_constant is not None:
            q = append_column(q.astype(np.float32), float(self.query_constant))
        out = []
        step = query_batch(k)
        for start in range(0, len(q), step):
            batch = np.ascontiguousarray(q[start:start + step])
            scores, ids = self.index.search(batch, k)
            for srow, irow in zip(scores, ids):
                keep = irow >= 0
                rows = self.ids.rows(irow[keep])
                out.append([Hit(key=r["key"], score=float(s), caption=r["caption"], url=r["url"],
                                source=r["source"], row_id=int(i)) for r, s, i in zip(rows, srow[keep], irow[keep])])
        return out

    def row_details(self, hits: list[Hit],
                    columns: tuple[str, ...] = ("exit_layer", "complexity")) -> list[dict | None]:
        """Return, per hit, ``columns`` of its row in the run shards the index was built from; None where unknown.

        Row ids number the runs' committed rows in build order (index.json "runs", part by part), so a hit's row
        is found without a scan; its key is checked, and a run that moved, changed or cannot be read since the
        build gives None (with a warning) rather than another image's numbers.
        """
        out: list[dict | None] = [None] * len(hits)
        runs = [r["path"] for r in self.info.get("runs", []) if isinstance(r, dict) and r.get("path")]
        if not hits or not runs:
            return out
        try:
            plan = plan_runs(runs, self.storage_options)
        except (OSError, ValueError) as e:
            log.warning("exit depth and complexity not shown: the runs this index was built from cannot be read "
                        "(%s: %s)", type(e).__name__, e)
            return out
        firsts = np.array([sh.first_id for sh in plan.shards], dtype=np.int64)
        per_shard: dict[int, list[int]] = {}
        for i, h in enumerate(hits):
            if 0 <= h.row_id < plan.ntotal:
                per_shard.setdefault(int(np.searchsorted(firsts, h.row_id, side="right") - 1), []).append(i)
        stale = 0
        for s, idx in per_shard.items():
            shard = plan.shards[s]
            try:
                f, pf = open_parquet(shard.url, self.storage_options)
                with f:
                    sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]
                    starts = np.concatenate([[0], np.cumsum(sizes)])
                    groups: dict[int, dict] = {}
                    for i in idx:
                        local = hits[i].row_id - shard.first_id
                        g = int(np.searchsorted(starts, local, side="right") - 1)
                        if g not in groups:
                            table = pf.read_row_group(g, columns=["key", *columns])
                            groups[g] = {c: table.column(c).to_pylist() for c in table.column_names}
                        row = {c: v[local - int(starts[g])] for c, v in groups[g].items()}
                        if row.pop("key") == hits[i].key:
                            out[i] = row
                        else:
                            stale += 1
            except (OSError, ValueError, pa.ArrowException) as e:
                log.warning("exit depth and complexity not shown for rows of %s (%s: %s)", shard.url,
                            type(e).__name__, e)
        if stale:
            log.warning("exit depth and complexity not shown for %d result(s): their runs changed since the index was "
                        "built (rebuild it with `icar index`)", stale)
        return out

    def encode_text(self, texts: list[str]) -> np.ndarray:
        """Return the L2-normalised text embeddings of ``texts`` with the index's model."""
        from pipeline.model.models import encode_text  # lazy: torch (see model)

        return encode_text(self.model, list(texts))

    def search_text(self, texts: str | list[str], k: int = 10) -> list[list[Hit]]:
        """Return the top-``k`` hits for each text query."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        return self.search_vectors(self.encode_text(texts), k)

    def encode_images(self, images: list) -> np.ndarray:
        """Return L2-normalised full-depth image embeddings of ``images`` (paths/URLs or encoded bytes)."""
        import torch  # lazy: vector-only searches never load it

        from pipeline.model.models import pixels_to_tensor  # lazy: torch (see model)

        bundle = self.model
        cfg = DecodeConfig(image_size=bundle.image_size)
        pixels = np.stack([decode_image(_image_bytes(img), cfg).pixels for img in images])
        x = pixels_to_tensor(bundle, pixels, device=bundle.device, dtype=bundle.dtype)
        with torch.no_grad():
            emb = bundle.model.encode_image(x).float()
        return torch.nn.functional.normalize(emb, dim=-1).cpu().numpy()

    def search_image(self, images, k: int = 10) -> list[list[Hit]]:
        """Return the top-``k`` hits for each image query (a path/URL, bytes, or a list of them)."""
        images = [images] if isinstance(images, (str, bytes, os.PathLike)) else list(images)
        return self.search_vectors(self.encode_images(images), k)


def _image_bytes(image) -> bytes:
    """Return the encoded bytes of an image given as bytes or a local path / fsspec URL."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    url = os.fspath(image)
    fs, path = storage.filesystem(url)
    if not fs.exists(path):
        raise FileNotFoundError(f"query image {url} does not exist")
    with fs.open(path, "rb") as f:
        return f.read()
