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

This module holds the configuration and the phases' order; the work is in the package's role modules:
``read`` (runs, samples, ids), ``params`` (the index choice), ``faiss_ops`` (train, add, merge, files),
``exact`` and ``tune`` (ground truth, nprobe), ``runner`` (in this process or on Ray), ``layout`` (file names).
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from pipeline import __version__ as icar_version
from pipeline.index.exact import TopK, topk_from
from pipeline.index.faiss_ops import (
    add_group,
    faiss_problem,
    is_ivf,
    ivfdata_size,
    merge_in_memory,
    merge_to_disk,
    new_index,
    point_ivfdata,
    write_index_file,
)
from pipeline.index.layout import (
    IDS_FILE,
    INDEX_FILE,
    INDEX_FORMAT,
    INDEX_JSON,
    IVFDATA_FILE,
    TRAINED_FILE,
)
from pipeline.index.params import (
    IndexParams,
    choose_index_params,
    format_size,
    group_shards,
    max_group_vectors,
    parse_size,
)
from pipeline.index.read import (
    QUERY_CONSTANT,
    RunPlan,
    append_query_constant,
    concat_ids,
    plan_runs,
    read_sample_group,
    sample_rows,
    scale_reasons,
    split_by_shard,
)
from pipeline.index.runner import Runner
from pipeline.index.tune import QuerySet, caption_queries, tune_nprobe
from pipeline.io import storage
from pipeline.io.lock import RootLock, output_lock
from pipeline.io.storage import CorruptFileError
from pipeline.logs import peak_rss_bytes, timed_phase
from pipeline.runtime import sigterm_as_interrupt

log = logging.getLogger(__name__)


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


def default_build_memory() -> int:
    """Return 75% of this machine's physical memory (the default --max-build-memory)."""
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(pages * 0.75)


def build_index(cfg: IndexConfig) -> IndexSummary:
    """Build the index directory ``cfg.output`` from ``cfg.runs``; return its summary (index.json inside).

    The build holds the directory's lock (``OUTPUT/icar.lock``) from before anything is read or written until it
    ends: a second build of the same output is refused at once with LockHeld naming the holder, never left to
    remove the first one's partials and index.json. The index is written in place (no build elsewhere that is
    swapped in), so a lock file inside the directory stays put.
    """
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
    import faiss  # lazy here and below: a heavy C++ library that importing IndexConfig (CLI defaults) must not load

    seconds: dict[str, float] = {}  # index.json's build_seconds, phase by phase
    started = time.perf_counter()
    phase = functools.partial(timed_phase, into=seconds, logger=log,
                              note=lambda: f"peak RSS {format_size(peak_rss_bytes())}")
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

    with phase("plan"):
        plan = plan_runs(cfg.runs, so)
        # The index's dimension: the embeddings', plus one for exit offsets where a run records them (read.py).
        n, dim = plan.ntotal, plan.index_dim
        log.info("%d runs, %d shards, %s vectors of dimension %d (model %s)", len(plan.runs), len(plan.shards),
                 f"{n:,}", dim, plan.model_key)
        code_bytes = None
        if cfg.factory:
            try:
                probe = faiss.index_factory(dim, cfg.factory, faiss.METRIC_INNER_PRODUCT)
            except RuntimeError as e:
                raise ValueError(f"--factory {cfg.factory!r} is not a FAISS factory string for dim {dim} "
                                 f"({plan.index_dim_reason()}): {e}") from e
            # Bytes stored per vector: an IVF's list entries hold the code without the list number.
            code_bytes = faiss.extract_index_ivf(probe).code_size if is_ivf(probe) else probe.sa_code_size()
            del probe
        trained_bytes = _read_trained(cfg, plan, so) if cfg.trained_index else None
        # Memory is estimated (and an impossible budget refused) before Ray starts or any data is read.
        largest = min(max(s.rows for s in plan.shards), 16384)
        workers = cfg.workers or os.cpu_count() or 1
        params = choose_index_params(n, dim, max_index, max_build, factory=cfg.factory, code_bytes=code_bytes,
                                     workers=workers, shard_rows=largest, flat_below=cfg.flat_below,
                                     merge=cfg.merge, offset_dim=plan.offset_column)
        if trained_bytes is not None:
            params.train_size = 0  # only queries are sampled: the given trained index is added into as it is
            params.reasons.append(f"no training: vectors are added into the trained index {cfg.trained_index}")
        params.reasons.extend(scale_reasons(plan, params.factory))
        for r in params.reasons:
            log.info("index choice: %s", r)
        reasons.extend(params.reasons)
    with phase("start_workers"):
        runner = Runner(cfg)
    try:
        summary = _build(cfg, plan, params, runner, phase, seconds, started, max_index, max_build, reasons, lock,
                         trained_bytes)
    finally:
        runner.close()
    return summary


def _read_trained(cfg: IndexConfig, plan: RunPlan, so) -> bytes:
    """Return the serialised trained index at ``cfg.trained_index`` after checking it fits this build (its
    dimension must be the plan's index dimension: with exit offsets, one more than the embeddings')."""
    import faiss  # lazy: see _build_index_locked

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
    dim = plan.index_dim
    if index.d != dim:
        raise ValueError(f"{cfg.trained_index} cannot be added into: dimension {index.d} (the runs have {dim}), and "
                         f"the index must have the runs' dimension: {plan.index_dim_reason()}; pass a trained.faiss "
                         f"built from runs like these, or leave out --trained-index to train anew")
    if not index.is_trained or index.ntotal != 0:
        raise ValueError(f"{cfg.trained_index} cannot be added into: dimension {index.d} (the runs have {dim}), "
                         f"trained {index.is_trained}, {index.ntotal} vectors (it must be a trained, empty index)")
    return data


def _build(cfg: IndexConfig, plan: RunPlan, params: IndexParams, runner: Runner, phase, seconds: dict[str, float],
           started: float, max_index: int, max_build: int, reasons: list[str], lock: RootLock,
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
        with phase("sample"):
            b.sample()
        with phase("train"):
            b.train()
        with phase("encode_text_queries"):
            b.encode_text_queries()
        with phase("add"):
            b.add()
        with phase("merge"):
            b.merge()
        with phase("ids"):
            concat_ids([r["ids"] for r in b.results], storage.join(out, IDS_FILE), scratch, so)
        with phase("tune"):
            b.tune()
        with phase("write"):
            b.write_index()
        info = b.index_json()
        info["build_seconds"] = dict(seconds)
        info["build_seconds"]["total"] = round(time.perf_counter() - started, 3)
        lock.check()  # LockLost: another build took this output over; never mark its files as this index
        storage.write_json(info, storage.join(out, INDEX_JSON), so)  # last: marks the index complete
        return IndexSummary(output=out, info=info)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        _remove_tree(work, so)


class _Build:
    """The state one build carries from phase to phase (see the module docstring for the phases)."""

    def __init__(self, cfg: IndexConfig, plan: RunPlan, params: IndexParams, runner: Runner, out: str,
                 work: str, scratch: str, so: dict | None, reasons: list[str], max_index: int, max_build: int):
        self.cfg, self.plan, self.params, self.runner = cfg, plan, params, runner
        self.max_index, self.max_build = max_index, max_build  # bytes
        self.out, self.work, self.scratch, self.so, self.reasons = out, work, scratch, so, reasons
        # dim: the embeddings' (what queries have, and the shards); index_dim: the index's vectors (read.py: one more
        # for the exit offsets where a run records them).
        self.n, self.dim, self.index_dim, self.k = plan.ntotal, plan.dim, plan.index_dim, cfg.k
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
        self.xt = np.empty((sum(len(p["train"]) for p in parts), self.index_dim), np.float32)
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
        import faiss  # lazy: see _build_index_locked

        if self.reused is not None:
            self.trained = np.frombuffer(self.reused, dtype=np.uint8)
            del self.xt
            log.info("reusing the trained %s from %s", self.params.factory, self.cfg.trained_index)
        else:
            index = new_index(self.index_dim, self.params.factory, self.cfg.seed, self.params.opq_train_points,
                              self.params.opq_iterations)
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
        """Encode the sampled captions with the runs' text tower, where --text-queries allows (ending with the
        query constant where the index holds the offset dimension, as image queries and searches do)."""
        self.text_vectors, self.text_info = caption_queries(self.cfg.text_queries, self.plan.model, self.captions,
                                                            self.cfg.device)
        if self.text_vectors is not None and self.plan.offset_column:
            self.text_vectors = append_query_constant(self.text_vectors)

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
        cap = max_group_vectors(self.params, self.index_dim, self.max_build, runner.concurrency,
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
                self.top.merge(topk_from(r, k + 1))
        log.info("added %s vectors in %d group(s), %d at a time", f"{self.n:,}", len(self.groups),
                 runner.concurrency)

    def merge(self) -> None:
        """Merge the partial indexes in order: in memory, or on disk into index.ivfdata."""
        partials = [r["partial"] for r in self.results]
        if self.params.merge == "disk":
            self.ivfdata = IVFDATA_FILE
            self.index = merge_to_disk(self.trained, partials, self.out, self.scratch, self.so)
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
            point_ivfdata(self.index, self.out, self.so)
        self.file_bytes = write_index_file(self.index, storage.join(self.out, INDEX_FILE), self.so)
        if self.ivfdata:
            self.file_bytes += ivfdata_size(self.out, self.so)

    def index_json(self) -> dict:
        """Return the index.json document (DESIGN.md: the index directory contract)."""
        import faiss  # lazy: see _build_index_locked

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
            # With exit offsets: index.faiss holds dim + 1 dimensions, and a reader appends query_constant to each
            # L2-normalised query of dimension "dim" (read.append_query_constant). Absent otherwise.
            **({"index_dim": self.index_dim, "query_constant": QUERY_CONSTANT} if self.plan.offset_column else {}),
            "ntotal": int(index.ntotal),
            "kind": p.kind,
            "nlist": p.nlist,
            "coarse_quantizer": p.coarse or None,
            "pq_m": p.m,
            "pq_nbits": p.nbits if p.m else None,
            "opq": p.opq,
            "opq_dim": p.opq_dim or None,
            "opq_training": {"points": p.opq_train_points, "iterations": p.opq_iterations} if p.opq else None,
            "estimated_recall": p.estimated_recall or None,
            "candidates": p.candidates,
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


def _remove_tree(url: str, so) -> None:
    """Remove the build's partials (and the parent _build folder when it is left empty)."""
    fs, path = storage.filesystem(url, so)
    if fs.exists(path):
        fs.rm(path, recursive=True)
    parent = path.rsplit("/", 1)[0]
    if storage.is_local(fs) and os.path.isdir(parent) and not os.listdir(parent):
        os.rmdir(parent)


def _versions() -> dict:
    import faiss  # lazy: see _build_index_locked

    return {"faiss": faiss.__version__, "numpy": np.__version__, "pyarrow": pa.__version__,
            "icar": icar_version}
