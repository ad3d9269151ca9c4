"""Wires the stages onto Ray: CPU shard tasks read and decode, model actors score, route and embed.

One input shard is the unit of work. A shard task streams its input, decodes batches on a CPU and keeps a
few of them queued at a model actor, then commits the output shard atomically and returns the manifest row;
the driver records it in the manifest. Everything Ray-specific lives here; the stages are plain Python.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from . import storage
from .config import EmbedConfig, ModelSpec
from .lock import RootLock, output_lock
from .schema import RUN_JSON, SHARD_DIR
from .repair import rederive_run_json, repair_run, run_json_damaged
from .shards import (Manifest, RunStateError, ShardRows, commit_shard, manifest_row, read_run_json,
                     record_duplicate_keys, write_shard_failure)

log = logging.getLogger(__name__)

# Standard AWS settings forwarded from the driver to tasks and actors in their runtime environment, so workers
# reach the same endpoint however the Ray instance was started. Ray writes every runtime_env to its own logs
# (runtime_env_agent.log) and shows it in the dashboard, so no secret may be among these.
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE",
                 "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "ICAR_CACHE_DIR")
# Credentials travel as task and actor arguments instead (held in the object store, never logged); each worker
# puts them into its own environment before it touches storage. Nodes with their own credentials (instance
# roles, IRSA) need none of this: with no such variable set on the driver, nothing is sent.
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")

# Fields of run.json that must match for a resumed run to add shards to an existing run directory.
IDENTITY_FIELDS = ("model", "exits", "heads", "router", "scorer", "image_size")


@dataclass
class EmbedSummary:
    """What an embed run did; `line()` is the one-line summary printed at the end."""

    run: str
    images: int = 0
    errors: int = 0
    shards_committed: int = 0
    shards_skipped: int = 0
    shards_failed: list[tuple[str, str]] = field(default_factory=list)  # (input shard, message)
    gflops: float = 0.0
    full_depth_gflops: float = 0.0  # the same images at full depth with no scorer
    seconds: float = 0.0
    model_seconds: float = 0.0
    exit_counts: dict[int, int] = field(default_factory=dict)
    duplicate_keys: int = 0  # rows whose key another input shard committed first (RUN/duplicates.parquet)

    @property
    def exit_code(self) -> int:
        """Return 0 when every input shard was committed, 1 when any failed."""
        return 1 if self.shards_failed else 0

    def line(self) -> str:
        """Return the one-line summary of the run."""
        saved = (1 - self.gflops / self.full_depth_gflops) * 100 if self.full_depth_gflops else 0.0
        mix = ", ".join(f"{d}:{c}" for d, c in sorted(self.exit_counts.items())) or "-"
        rate = self.images / self.seconds if self.seconds else 0.0
        return (f"icar embed: {self.images} images, {self.errors} errors, {self.shards_committed} shards committed "
                f"({self.shards_skipped} already done, {len(self.shards_failed)} failed), "
                f"{self.gflops:.1f} GFLOPs ({saved:.1f}% below full depth), exits {mix}, "
                f"{self.seconds:.1f}s wall, {rate:.1f} images/s"
                + (f"; {self.duplicate_keys} duplicate keys across shards (duplicates.parquet)"
                   if self.duplicate_keys else ""))


def forwarded_env() -> dict[str, str]:
    """Return the driver's storage-related environment variables that workers must share (no secrets)."""
    return {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}


def forwarded_secrets() -> dict[str, str]:
    """Return the driver's credentials from the environment, for workers (as arguments, never in runtime_env)."""
    return {k: os.environ[k] for k in SECRET_ENV if os.environ.get(k)}


def apply_secrets(secrets: dict[str, str] | None) -> None:
    """Put the driver's credentials into this worker process's environment, where S3 clients look for them."""
    for k, v in (secrets or {}).items():
        os.environ[k] = v


def process_shard(shard, part: int, cfg: EmbedConfig, facts: ModelFacts, submit, fetch, on_batch=None) -> dict:
    """Embed one input shard and commit it; return its manifest row.

    ``submit(pixels, keys)`` queues a batch at a model and returns a handle; ``fetch(handle)`` returns the
    model's result dict. At most ``cfg.batches_in_flight`` batches are queued, so decoding the next batch
    overlaps with the model working on the previous ones, and memory stays bounded by configuration.
    """
    from .decode import DecodeConfig, DecodeError, decode_image
    from .readers import iter_samples

    t0 = time.perf_counter()
    dcfg = DecodeConfig(image_size=facts.image_size, max_pixels=cfg.max_pixels)
    rows = ShardRows(source=shard.uri)
    seen: set[str] = set()
    in_flight: deque = deque()
    model_seconds = 0.0
    batch_meta: list = []
    batch_pixels: list[np.ndarray] = []
    dim = None

    def collect(entry):
        nonlocal model_seconds, dim
        meta, handle = entry
        result = fetch(handle)
        model_seconds += float(result["seconds"])
        dim = result["embedding"].shape[1]
        for key, caption, url, width, height in meta:
            rows.keys.append(key)
            rows.captions.append(caption)
            rows.urls.append(url)
            rows.widths.append(width)
            rows.heights.append(height)
        rows.complexity.append(result["complexity"])
        rows.exit_layer.append(result["exit_layer"])
        rows.gflops.append(result["gflops"])
        rows.embeddings.append(result["embedding"])
        if on_batch is not None:
            on_batch(len(meta))

    def flush():
        if not batch_meta:
            return
        keys = [m[0] for m in batch_meta]
        in_flight.append((list(batch_meta), submit(np.stack(batch_pixels), keys)))
        batch_meta.clear()
        batch_pixels.clear()
        while len(in_flight) > cfg.batches_in_flight:
            collect(in_flight.popleft())

    for sample in iter_samples(shard, cfg.storage_options, image_column=cfg.image_column,
                               max_sample_bytes=cfg.max_sample_bytes, follow_symlinks=cfg.follow_symlinks):
        if sample.key in seen:
            rows.add_error(sample.key, "read", f"duplicate key {sample.key!r} in {shard.uri}; the first one was kept")
            continue
        seen.add(sample.key)
        if sample.error is not None or sample.data is None:
            rows.add_error(sample.key, "read", sample.error or "no image data")
            continue
        try:
            decoded = decode_image(sample.data, dcfg)
        except DecodeError as e:
            rows.add_error(sample.key, "decode", str(e))
            continue
        batch_meta.append((sample.key, sample.caption, sample.url, decoded.width, decoded.height))
        batch_pixels.append(decoded.pixels)
        if len(batch_meta) >= cfg.batch_size:
            flush()
    flush()
    while in_flight:
        collect(in_flight.popleft())

    if dim is None:  # no image in this shard embedded: an empty shard still needs the schema's dimension
        dim = facts.embed_dim
    commit_shard(cfg.output, part, rows, dim, cfg.storage_options)
    fingerprint = {"size": shard.size, "mtime": shard.mtime, "etag": shard.etag}
    return manifest_row(shard.uri, part, rows, time.perf_counter() - t0, model_seconds,
                        facts.scorer_gflops, fingerprint)


@dataclass(frozen=True)
class ModelFacts:
    """What a shard task needs to know of the model, taken from the actors' description (no model loaded)."""

    image_size: int
    embed_dim: int
    scorer_gflops: float

    @classmethod
    def from_description(cls, d: dict) -> "ModelFacts":
        return cls(int(d["image_size"]), int(d["embed_dim"]), float(d["scorer_gflops"]))


def init_ray(address: str | None):
    """Join the cluster at ``address``, or start an embedded local Ray sized to this machine; return ray."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return ray
    if address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
    else:
        # One CPU beyond the cores, so the model actor's reservation never leaves read/decode tasks without
        # a slot on a 2-core machine (Ray would otherwise wait forever; seen with Ray 2.60).
        cpus = (os.cpu_count() or 2) + 1
        log.info("starting an embedded local Ray (%d CPUs)", cpus)
        # address="local": never attach to some other Ray that happens to run on this machine.
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING,
                 log_to_driver=True)
    return ray


EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), as shells report it
EXIT_TERMINATED = 143  # SIGTERM (128 + SIGTERM): a scheduler's stop

# Set by the SIGTERM handler below. The handler's Terminated does not always reach the caller as itself: raised
# while the driver waits inside Ray (ray.wait, ray.get), Ray turns it into a plain KeyboardInterrupt, so the
# signal that arrived is kept here and read by ``stop_reason``.
_sigterm_received = False


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's stop, `kill`) received by the driver during a run: it stops like Ctrl-C does."""


@dataclass(frozen=True)
class StopReason:
    """How a run was stopped from outside: the exit code a shell reports and the words for it."""

    exit_code: int  # EXIT_TERMINATED or EXIT_INTERRUPTED
    status: str  # "terminated" | "interrupted"
    signal: str  # "SIGTERM" | "Ctrl-C"

    @property
    def terminated(self) -> bool:
        return self.exit_code == EXIT_TERMINATED


def stop_reason(e: KeyboardInterrupt) -> StopReason:
    """Return how the run that ``e`` stopped was stopped: terminated (143) when SIGTERM reached the driver's
    handler, whatever exception type came out of Ray, else interrupted (130, Ctrl-C). Reading it forgets the
    SIGTERM, so a later run in the same process starts clean."""
    global _sigterm_received
    terminated = isinstance(e, Terminated) or _sigterm_received
    _sigterm_received = False
    if terminated:
        return StopReason(EXIT_TERMINATED, "terminated", "SIGTERM")
    return StopReason(EXIT_INTERRUPTED, "interrupted", "Ctrl-C")


def sigterm_as_interrupt() -> Callable[[], None]:
    """Make SIGTERM raise ``Terminated`` in the main thread; return the function that restores the old handler.

    Python's default SIGTERM exits without unwinding and Ray's driver handler logs and exits, so the commit loop's
    ``finally`` would neither record the commits the manifest holds back (they would be redone as orphans) nor
    stop the actors, nor release the output's lock. The restore function puts the old handler back only while
    this one is still installed: a handler installed meanwhile (ray.init's) is left in place. Off the main thread
    (where signals cannot be handled) this does nothing.
    """
    global _sigterm_received
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    _sigterm_received = False

    def handler(signum, frame):
        global _sigterm_received
        _sigterm_received = True
        raise Terminated(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)

    def restore() -> None:
        if signal.getsignal(signal.SIGTERM) is handler:
            signal.signal(signal.SIGTERM, previous)

    return restore


def plan_resources(ray, cfg: EmbedConfig) -> dict:
    """Return how many model actors and concurrent shard tasks fit the cluster, and what each reserves."""
    res = ray.cluster_resources()
    cpus, gpus = float(res.get("CPU", 0)), float(res.get("GPU", 0))
    use_gpu = gpus > 0 and cfg.spec.device in ("auto", "cuda")
    if cfg.num_actors is not None:
        actors = cfg.num_actors
    elif use_gpu:
        actors = max(1, int(gpus / cfg.gpus_per_actor))
    else:
        actors = 1
    actor_cpus = cfg.cpus_per_actor
    free_cpus = cpus - actors * actor_cpus
    if free_cpus < 1:
        raise RuntimeError(
            f"the Ray cluster has {cpus:g} CPUs; {actors} model actor(s) x {actor_cpus:g} CPUs leave {free_cpus:g} "
            f"for reading and decoding, and at least 1 is needed (fewer --num-actors or --cpus-per-actor)")
    decode = cfg.decode_tasks or max(1, int(free_cpus))
    return {"actors": actors, "gpus_per_actor": cfg.gpus_per_actor if use_gpu else 0.0,
            "cpus_per_actor": actor_cpus, "decode_tasks": decode, "cluster_cpus": cpus, "cluster_gpus": gpus}


def check_run_identity(run: str, description: dict, storage_options: dict, rows: list[dict] | None = None,
                       repair: bool = False) -> None:
    """Refuse to add shards to a run directory made with another model, exits, heads, router or scorer.

    With ``repair``, a damaged run.json is moved aside (for the caller to write anew from ``description``) once
    the committed shards (manifest ``rows``) fit the model described; see pipeline/repair.py.
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
    from .lock import OUTPUT_LOCK
    from .schema import ERROR_DIR

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


def run_embed(cfg: EmbedConfig) -> EmbedSummary:
    """Embed every input shard of ``cfg`` not yet committed in its run directory; return the summary."""
    from .readers import expand_inputs

    t_start = time.perf_counter()
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    # Before any cluster or model starts: a missing bucket, denied writes or a read-only or full disk end the
    # job here, in about a second, with nothing written (raises storage.StorageError).
    storage.check_writable(cfg.output, cfg.storage_options)
    # One writer per run directory, taken before the manifest is read: a second run would plan from a manifest
    # the first is rewriting and delete the first's unrecorded shards as orphans. Refused at once (LockHeld).
    lock = output_lock(cfg.output, "embed", cfg.lock_stale_after_s, cfg.lock_heartbeat_s, cfg.storage_options)
    lock.acquire(break_lock=cfg.break_lock)
    # From here a SIGTERM unwinds (releasing the lock) instead of killing the driver; installed again after
    # ray.init, which puts its own handler in place.
    restore_outer = sigterm_as_interrupt()
    try:
        return _run_embed_locked(cfg, lock, t_start, started)
    finally:
        restore_outer()
        lock.release()


def _run_embed_locked(cfg: EmbedConfig, lock: RootLock, t_start: float, started: str) -> EmbedSummary:
    """Do run_embed's work while holding the run directory's ``lock``; return the summary."""
    from .readers import expand_inputs

    shards = expand_inputs(cfg.inputs, cfg.storage_options, cfg.folder_shard_size, cfg.follow_symlinks)
    if cfg.repair:  # under the lock: no other run reads or writes the parts being moved aside
        repair_run(cfg.output, cfg.storage_options)
    elif storage.exists(storage.join(cfg.output, RUN_JSON), cfg.storage_options):
        read_run_json(cfg.output, cfg.storage_options)  # a damaged one fails here, before Ray and the models start
    manifest = Manifest(cfg.output, cfg.storage_options)
    plan = assign_parts(shards, manifest, cfg.reembed_changed)
    summary = EmbedSummary(run=cfg.output, shards_skipped=len(shards) - len(plan))
    if cfg.limit_shards is not None:
        plan = plan[: cfg.limit_shards]
    log.info("%d input shards: %d already committed, %d to embed", len(shards), summary.shards_skipped, len(plan))

    ray = init_ray(cfg.resolved_address())
    restore_sigterm = sigterm_as_interrupt()  # after ray.init, which installs a SIGTERM handler of its own
    try:
        full_gflops = _embed_plan(ray, cfg, plan, manifest, summary, t_start, lock)
    finally:
        restore_sigterm()

    lock.check()
    if manifest.rows:
        # Every invocation checks the whole run: one killed before its check leaves no trace of what it committed.
        summary.duplicate_keys = record_duplicate_keys(cfg.output, manifest.rows, cfg.storage_options)
    summary.full_depth_gflops = full_gflops * summary.images
    summary.seconds = time.perf_counter() - t_start
    record_invocation(cfg, summary, started)
    return summary


def _embed_plan(ray, cfg: EmbedConfig, plan: list, manifest: Manifest, summary: EmbedSummary,
                t_start: float, lock: RootLock) -> float:
    """Embed ``plan``'s (shard, part) pairs on model actors, recording commits in ``manifest`` and ``summary``.

    Return the full-depth GFLOPs per image. The actors are stopped and the manifest flushed however it ends,
    unless the run directory's ``lock`` was lost: the run that took it over owns the manifest then.
    """
    resources = plan_resources(ray, cfg)
    env = forwarded_env()
    runtime_env = {"env_vars": env} if env else None
    secrets = forwarded_secrets()
    actor_cls = ray.remote(ModelActor)
    actors = [
        actor_cls.options(num_cpus=resources["cpus_per_actor"], num_gpus=resources["gpus_per_actor"],
                          max_restarts=-1, max_task_retries=-1, runtime_env=runtime_env).remote(cfg.spec, secrets)
        for _ in range(resources["actors"])
    ]
    try:
        try:
            descriptions = ray.get([a.describe.remote() for a in actors], timeout=cfg.actor_start_timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise RuntimeError(
                f"model actors did not start within {cfg.actor_start_timeout_s:.0f}s; each asks for "
                f"{resources['cpus_per_actor']:g} CPU and {resources['gpus_per_actor']:g} GPU and the cluster has "
                f"{resources['cluster_cpus']:g} CPUs, {resources['cluster_gpus']:g} GPUs "
                f"(see `ray status`; raise --actor-start-timeout for slow model downloads)") from None
        description = descriptions[0]
        check_run_identity(cfg.output, description, cfg.storage_options, manifest.rows, cfg.repair)
        run_json = dict(description, inputs=list(cfg.inputs), resources=resources)
        run_json["spec"] = asdict(cfg.spec)
        if not storage.exists(storage.join(cfg.output, RUN_JSON), cfg.storage_options):
            storage.write_json(run_json, storage.join(cfg.output, RUN_JSON), cfg.storage_options)
        remove_orphans(cfg.output, manifest, cfg.storage_options, lock)
    except BaseException:
        # A refused run (another model's run directory, actors that never started) must not leave its model
        # actors holding CPUs/GPUs in a Ray that lives on (a cluster, a test session, a retry in the same driver).
        for a in actors:
            ray.kill(a)
        raise

    facts = ModelFacts.from_description(description)
    full_gflops = float(description["gflops_per_exit"][str(description["exits"][-1])])

    counter = ray.remote(ProgressCounter).options(num_cpus=0).remote()
    task = ray.remote(shard_task).options(num_cpus=1, max_retries=cfg.shard_retries, retry_exceptions=True,
                                          runtime_env=runtime_env)
    bar = progress_bar(len(plan), cfg.progress)
    pending = deque(plan)
    in_flight: dict = {}
    next_actor = 0
    last_poll = 0.0
    try:
        while pending or in_flight:
            lock.check()  # LockLost: stop before writing the manifest another run may be using now
            manifest.flush_if_due()  # commits of a quiet spell reach the file, not only those before the next
            while pending and len(in_flight) < resources["decode_tasks"]:
                shard, part = pending.popleft()
                ref = task.remote(shard, part, cfg, facts, actors[next_actor % len(actors)], counter, secrets)
                next_actor += 1
                in_flight[ref] = (shard, part, time.monotonic())
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=2.0)
            for ref in ready:
                shard, part, _ = in_flight.pop(ref)
                try:
                    row = ray.get(ref)
                except Exception as e:  # the shard failed after its retries: report it, finish the rest
                    message = failure_message(e)
                    log.error("input shard %s failed after %d retries: %s", shard.uri, cfg.shard_retries, message)
                    write_shard_failure(cfg.output, part, shard.uri, message, cfg.storage_options)
                    summary.shards_failed.append((shard.uri, message))
                else:
                    manifest.add(row)
                    summary.shards_committed += 1
                    summary.images += row["rows"]
                    summary.errors += row["errors"]
                    summary.gflops += row["gflops"]
                    summary.model_seconds += row["model_seconds"]
                    for depth, count in json.loads(row["exit_counts"]).items():
                        summary.exit_counts[int(depth)] = summary.exit_counts.get(int(depth), 0) + count
                if bar is not None:
                    bar.update(1)
            now = time.monotonic()
            for ref, (shard, part, submitted) in list(in_flight.items()):
                if now - submitted > cfg.shard_timeout_s:
                    ray.cancel(ref, force=True)
                    in_flight.pop(ref)
                    message = f"timed out after {cfg.shard_timeout_s:.0f}s (--shard-timeout)"
                    write_shard_failure(cfg.output, part, shard.uri, message, cfg.storage_options)
                    summary.shards_failed.append((shard.uri, message))
            if bar is not None and now - last_poll > 1.0:
                last_poll = now
                images, errors = ray.get(counter.totals.remote(), timeout=60)
                elapsed = time.perf_counter() - t_start
                bar.set_postfix_str(f"{images} images, {images / elapsed:.1f} img/s, {errors} errors")
    except BaseException:
        # A failing or interrupted loop (an exception, Ctrl-C) still records what it committed, so the next run
        # redoes only what was in flight; a flush that fails too must not hide why the loop stopped. A lost lock
        # (LockLost, raised again here) records nothing: the run that took it over owns the manifest now.
        try:
            lock.check()
            manifest.flush()
        except Exception as e:
            log.error("could not record the last commits in %s (%s: %s): their shards are removed and embedded "
                      "again by the next run", manifest.url, type(e).__name__, e)
        raise
    else:
        lock.check()
        manifest.flush()
    finally:
        if bar is not None:
            bar.close()
        for a in actors:
            ray.kill(a)
        ray.kill(counter)
    return full_gflops


def record_invocation(cfg: EmbedConfig, summary: EmbedSummary, started: str) -> None:
    """Append this invocation's measured figures to run.json (the report's throughput comes from these)."""
    url = storage.join(cfg.output, RUN_JSON)
    run_json = read_run_json(cfg.output, cfg.storage_options)
    run_json.setdefault("invocations", []).append({
        "started": started,
        "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "wall_seconds": round(summary.seconds, 3),
        "images": summary.images,
        "errors": summary.errors,
        "shards_committed": summary.shards_committed,
        "shards_skipped": summary.shards_skipped,
        "shards_failed": len(summary.shards_failed),
        "duplicate_keys": summary.duplicate_keys,
        "gflops": summary.gflops,
        "model_seconds": round(summary.model_seconds, 3),
    })
    storage.write_json(run_json, url, cfg.storage_options)


def failure_message(e: Exception) -> str:
    """Return the message of the error that failed a shard task, without Ray's traceback wrapping."""
    cause = getattr(e, "cause", None)
    if cause is not None:
        return f"{type(cause).__name__}: {cause}"
    text = str(e).strip().splitlines()
    return text[-1] if text else type(e).__name__


def progress_bar(total: int, enabled: bool):
    """Return a tqdm bar over shards, or None when progress is off or stderr is not for people."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="shard", desc="embed", file=sys.stderr, dynamic_ncols=True)


class ModelActor:
    """A model worker on a Ray actor (one per GPU, or a CPU actor on CPU-only clusters)."""

    def __init__(self, spec: ModelSpec, secrets: dict[str, str] | None = None):
        from .worker import ModelWorker

        apply_secrets(secrets)  # checkpoints may live on S3
        logging.basicConfig(level=logging.WARNING)
        logging.getLogger("pipeline").setLevel(logging.INFO)
        self.worker = ModelWorker(spec)

    def describe(self) -> dict:
        return self.worker.describe()

    def embed(self, pixels: np.ndarray, keys: list[str]) -> dict:
        return self.worker.embed(pixels, keys)


class ProgressCounter:
    """Counts images embedded and samples failed across all shard tasks, for the progress bar."""

    def __init__(self):
        self.images = 0
        self.errors = 0

    def add(self, images: int, errors: int = 0) -> None:
        self.images += images
        self.errors += errors

    def totals(self) -> tuple[int, int]:
        return self.images, self.errors


def shard_task(shard, part: int, cfg: EmbedConfig, facts: ModelFacts, actor, counter,
               secrets: dict[str, str] | None = None) -> dict:
    """Ray task: embed one input shard through ``actor`` and commit it; returns the manifest row."""
    import ray

    apply_secrets(secrets)

    def fetch(ref):
        # A batch that takes this long means a hung actor: fail the shard (it is retried) instead of waiting.
        return ray.get(ref, timeout=max(600.0, cfg.shard_timeout_s / 4))

    row = process_shard(shard, part, cfg, facts, submit=lambda px, keys: actor.embed.remote(px, keys), fetch=fetch,
                        on_batch=lambda n: counter.add.remote(n))
    counter.add.remote(0, row["errors"])
    return row


def embed_gflops_ratio(summary: EmbedSummary) -> float:
    """Return GFLOPs spent divided by the full-depth cost of the same images (nan for an empty run)."""
    return summary.gflops / summary.full_depth_gflops if summary.full_depth_gflops else math.nan
