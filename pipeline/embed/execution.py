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
import time
from collections import deque
from dataclasses import asdict, dataclass, field

import numpy as np

from pipeline.embed.config import EmbedConfig
from pipeline.embed.progress import Progress, SampleTotals
from pipeline.embed.validate import image_size as predicted_image_size
from pipeline.embed.validate import routes_by_score, spec_files
from pipeline.io import storage
from pipeline.io.decode import DecodeConfig, DecodeError, EncodedBatch, decode_image, probe_jpeg
from pipeline.io.lock import RootLock, output_lock
from pipeline.io.readers import expand_inputs, iter_samples
from pipeline.io.schema import RUN_JSON
from pipeline.io.rundir import assign_parts, check_run_identity, record_invocation, remove_orphans
from pipeline.io.repair import repair_run
from pipeline.io.shards import (Manifest, ShardRows, commit_shard, manifest_row, read_run_json,
                     record_duplicate_keys, write_shard_failure)
from pipeline.logs import plain_worker_prefixes, timed_phase
from pipeline.model.spec import ModelSpec
from pipeline.runtime import apply_secrets, forwarded_env, forwarded_secrets, init_ray, sigterm_as_interrupt

log = logging.getLogger(__name__)


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
    scored_not_routed: bool = False  # a scorer ran on every image but the router did not use its scores
    random_weights: bool = False  # the model is a seeded random init: the embeddings carry no meaning
    # Seconds of each start-up phase (plan: listing + manifest; ray: joining/starting Ray; model: until the model
    # actors described themselves), as run.json's invocation records them: what the driver waited for.
    startup: dict[str, float] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        """Return 0 when every input shard was committed, 1 when any failed."""
        return 1 if self.shards_failed else 0

    def line(self) -> str:
        """Return the one-line summary of the run."""
        saved = (1 - self.gflops / self.full_depth_gflops) * 100 if self.full_depth_gflops else 0.0
        mix = ", ".join(f"{d}:{c}" for d, c in sorted(self.exit_counts.items())) or "-"
        rate = self.images / self.seconds if self.seconds else 0.0
        if self.scored_not_routed and saved < 0:  # the scorer's cost bought nothing here but scores to calibrate on
            cost = f"scored but not routed: {-saved:.1f}% more than full depth, for calibration"
        else:
            cost = f"{saved:.1f}% below full depth" if saved >= 0 else f"{-saved:.1f}% more than full depth"
        return (f"icar embed: {self.images} images, {self.errors} errors, {self.shards_committed} shards committed "
                f"({self.shards_skipped} already done, {len(self.shards_failed)} failed), "
                f"{self.gflops:.1f} GFLOPs ({cost}), exits {mix}, "
                f"{self.seconds:.1f}s wall, {rate:.1f} images/s"
                + (f"; {self.duplicate_keys} duplicate keys across shards (duplicates.parquet)"
                   if self.duplicate_keys else "")
                + ("; random weights: embeddings carry no meaning" if self.random_weights else ""))


def process_shard(shard, part: int, cfg: EmbedConfig, facts: ModelFacts, submit, fetch, on_batch=None) -> dict:
    """Embed one input shard and commit it; return its manifest row.

    ``submit(pixels, keys)`` queues a batch at a model and returns a handle; ``fetch(handle)`` returns the
    model's result dict. At most ``cfg.batches_in_flight`` batches are queued, so decoding the next batch
    overlaps with the model working on the previous ones, and memory stays bounded by configuration.
    With ``cfg.decode_device`` "cuda", JPEGs are not decoded here: ``submit(EncodedBatch, keys)`` ships their
    bytes (the model's ``embed_encoded``), and the samples its device could not decode come back as errors.
    """
    t0 = time.perf_counter()
    dcfg = DecodeConfig(image_size=facts.image_size, max_pixels=cfg.max_pixels)
    rows = ShardRows(source=shard.uri)
    seen: set[str] = set()
    in_flight: deque = deque()
    model_seconds = 0.0
    batch_meta: list = []
    batch_pixels: list[np.ndarray] = []
    batch_jpegs: list[tuple[int, bytes, object]] = []  # (batch position, bytes, JpegHeader): decoded by the model
    ship_jpegs = cfg.decode_device != "cpu"
    dim = None

    def collect(entry):
        nonlocal model_seconds, dim
        meta, handle = entry
        result = fetch(handle)
        model_seconds += float(result["seconds"])
        dim = result["embedding"].shape[1]
        if "index" in result:  # decoded by the model: only the rows at "index" were embedded
            for at, message in result["errors"]:
                rows.add_error(meta[at][0], "decode", message)
            meta = [meta[at] for at in result["index"]]
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
        if ship_jpegs:
            jpeg_at = [j[0] for j in batch_jpegs]
            shipped = set(jpeg_at)
            pixels_at = [i for i in range(len(keys)) if i not in shipped]
            pixels = np.stack(batch_pixels) if batch_pixels else np.zeros((0, dcfg.image_size, dcfg.image_size, 3),
                                                                             np.uint8)
            batch = EncodedBatch(size=len(keys), max_pixels=dcfg.max_pixels, jpeg_at=jpeg_at,
                                 jpegs=[j[1] for j in batch_jpegs], headers=[j[2] for j in batch_jpegs],
                                 pixels_at=pixels_at, pixels=pixels)
            in_flight.append((list(batch_meta), submit(batch, keys)))
        else:
            in_flight.append((list(batch_meta), submit(np.stack(batch_pixels), keys)))
        batch_meta.clear()
        batch_pixels.clear()
        batch_jpegs.clear()
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
        header = probe_jpeg(sample.data, dcfg) if ship_jpegs else None
        if header is not None:  # the model decodes it; anything else takes the CPU path below, errors included
            batch_jpegs.append((len(batch_meta), sample.data, header))
            batch_meta.append((sample.key, sample.caption, sample.url, header.width, header.height))
            if len(batch_meta) >= cfg.batch_size:
                flush()
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


class StartingModelFacts:
    """ModelFacts of a model actor that may still be building its model: the image size comes from the model's
    config (read by the driver without torch), the rest from the actor's description when first needed, which is
    after the task's first batch came back from that actor, so waiting for it costs nothing then."""

    def __init__(self, image_size: int, description: list):
        self.image_size = image_size
        # [ObjectRef]: inside a list, so Ray starts the task at once instead of waiting for the description.
        self._description = description
        self._facts: ModelFacts | None = None

    def _resolved(self) -> ModelFacts:
        if self._facts is None:
            import ray  # lazy, as everywhere in this module: see init_ray (pipeline.runtime) for why

            facts = ModelFacts.from_description(ray.get(self._description[0], timeout=3600))
            if facts.image_size != self.image_size:  # pixels were decoded to the wrong size: never commit them
                raise RuntimeError(f"the model decodes images to {facts.image_size} px but its config says "
                                   f"{self.image_size} px; this shard was decoded for the config (a bug: report it)")
            self._facts = facts
        return self._facts

    @property
    def embed_dim(self) -> int:
        return self._resolved().embed_dim

    @property
    def scorer_gflops(self) -> float:
        return self._resolved().scorer_gflops


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


def run_embed(cfg: EmbedConfig) -> EmbedSummary:
    """Embed every input shard of ``cfg`` not yet committed in its run directory; return the summary."""
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
    startup: dict[str, float] = {}
    with timed_phase("plan", startup):
        shards = expand_inputs(cfg.inputs, cfg.storage_options, cfg.folder_shard_size, cfg.follow_symlinks)
        if cfg.repair:  # under the lock: no other run reads or writes the parts being moved aside
            repair_run(cfg.output, cfg.storage_options)
        elif storage.exists(storage.join(cfg.output, RUN_JSON), cfg.storage_options):
            read_run_json(cfg.output, cfg.storage_options)  # a damaged one fails here, before Ray and the models start
        manifest = Manifest(cfg.output, cfg.storage_options)
        plan = assign_parts(shards, manifest, cfg.reembed_changed)
    summary = EmbedSummary(run=cfg.output, shards_skipped=len(shards) - len(plan), startup=startup)
    if cfg.limit_shards is not None:
        plan = plan[: cfg.limit_shards]
    log.info("%d input shards: %d already committed, %d to embed", len(shards), summary.shards_skipped, len(plan))

    run_json = (read_run_json(cfg.output, cfg.storage_options)
                if not plan and storage.exists(storage.join(cfg.output, RUN_JSON), cfg.storage_options) else None)
    if run_json is not None and not same_model(run_json, cfg.spec):
        # Other model options or files than the run's: only the loaded model can tell whether they compute the
        # same (check_run_identity), and a run directory refuses another model even with nothing left to embed.
        log.info("nothing to embed, but the model options or files differ from the run's: loading the model to "
                 "compare")
        run_json = None
    if run_json is not None:
        # Nothing to embed: neither Ray nor a model starts (they cost 10-20 s); the run directory alone says the rest.
        log.info("nothing to embed: every input shard is committed in %s", cfg.output)
        remove_orphans(cfg.output, manifest, cfg.storage_options, lock)
        summary.scored_not_routed = scored_not_routed(run_json)
        summary.random_weights = bool(run_json.get("random_weights"))
        full_gflops = 0.0  # no image embedded by this invocation
    else:
        totals = SampleTotals([shard for shard, _ in plan], cfg.storage_options)  # counted while Ray starts
        plain_worker_prefixes()  # also for drivers that did not set logging up through pipeline.logs
        with timed_phase("ray", startup):
            ray = init_ray(cfg.resolved_address())
        restore_sigterm = sigterm_as_interrupt()  # after ray.init, which installs a SIGTERM handler of its own
        try:
            full_gflops = _embed_plan(ray, cfg, plan, manifest, summary, t_start, lock, totals)
        finally:
            restore_sigterm()

    lock.check()
    if manifest.rows:
        # Every invocation checks the whole run: one killed before its check leaves no trace of what it committed.
        summary.duplicate_keys = record_duplicate_keys(cfg.output, manifest.rows, cfg.storage_options)
    summary.full_depth_gflops = full_gflops * summary.images
    summary.seconds = time.perf_counter() - t_start
    record_invocation(cfg.output, cfg.storage_options, started, invocation_figures(summary))
    return summary


def _embed_plan(ray, cfg: EmbedConfig, plan: list, manifest: Manifest, summary: EmbedSummary,
                t_start: float, lock: RootLock, totals: SampleTotals | None = None) -> float:
    """Embed ``plan``'s (shard, part) pairs on model actors, recording commits in ``manifest`` and ``summary``.

    Return the full-depth GFLOPs per image. The actors are stopped and the manifest flushed however it ends,
    unless the run directory's ``lock`` was lost: the run that took it over owns the manifest then. ``totals``
    counts the plan's samples for the progress line.

    Start-up is kept off the critical path: in a new run directory the shard tasks start reading and decoding as
    soon as the model actors are asked for, and their first batches wait queued at the actors while those import
    torch, build the model and count its GFLOPs. A run directory that already holds shards waits for the actors'
    description first, since a shard may only be added once the model is known to be the one it was made with.
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
    described = [a.describe.remote() for a in actors]
    counter = ray.remote(ProgressCounter).options(num_cpus=0).remote()
    task = ray.remote(shard_task).options(num_cpus=1, max_retries=cfg.shard_retries, retry_exceptions=True,
                                          runtime_env=runtime_env)
    pending = deque(plan)
    in_flight: dict = {}
    next_actor = 0

    def launch(facts_of) -> None:
        """Start shard tasks until ``decode_tasks`` run; ``facts_of(i)`` gives the facts of actor i."""
        nonlocal next_actor
        while pending and len(in_flight) < resources["decode_tasks"]:
            shard, part = pending.popleft()
            i = next_actor % len(actors)
            ref = task.remote(shard, part, cfg, facts_of(i), actors[i], counter, secrets)
            next_actor += 1
            in_flight[ref] = (shard, part, time.monotonic())

    asked = time.perf_counter()
    size = predicted_image_size(cfg.spec)
    early = size is not None and not cfg.repair and not storage.exists(storage.join(cfg.output, RUN_JSON),
                                                                       cfg.storage_options)
    try:
        try:
            if early:
                # Before any task can commit: from now on an unrecorded part may be one of this run's.
                remove_orphans(cfg.output, manifest, cfg.storage_options, lock)
                launch(lambda i: StartingModelFacts(size, [described[i]]))
            descriptions = ray.get(described, timeout=cfg.actor_start_timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise RuntimeError(
                f"model actors did not start within {cfg.actor_start_timeout_s:.0f}s; each asks for "
                f"{resources['cpus_per_actor']:g} CPU and {resources['gpus_per_actor']:g} GPU and the cluster has "
                f"{resources['cluster_cpus']:g} CPUs, {resources['cluster_gpus']:g} GPUs "
                f"(see `ray status`; raise --actor-start-timeout for slow model downloads)") from None
        description = descriptions[0]
        summary.startup["model"] = round(time.perf_counter() - asked, 3)
        log.info("model actors ready %.1fs after they were asked for (Ray took %.1fs)%s", summary.startup["model"],
                 summary.startup.get("ray", 0.0), f"; {len(in_flight)} shard task(s) already reading and decoding"
                 if early else "")
        if cfg.decode_device != "cpu" and not str(description["device"]).startswith("cuda"):
            raise RuntimeError(f"--decode-device {cfg.decode_device} decodes JPEGs on the model actors' GPU, but they "
                               f"run on {description['device']} (the cluster has {resources['cluster_gpus']:g} GPUs); "
                               f"drop --decode-device, or run where the actors get a GPU")
        if early and int(description["image_size"]) != size:
            raise RuntimeError(f"{cfg.spec.model} decodes images to {description['image_size']} px but its config "
                               f"says {size} px (a bug: report it); nothing was committed")
        check_run_identity(cfg.output, description, cfg.storage_options, manifest.rows, cfg.repair)
        run_json = dict(description, inputs=list(cfg.inputs), resources=resources)
        run_json["spec"] = asdict(cfg.spec)
        run_json.update(run_json_notes(description))
        run_json["spec_files"] = spec_files(cfg.spec)  # what a resume with nothing to do compares, with "spec"
        if not storage.exists(storage.join(cfg.output, RUN_JSON), cfg.storage_options):
            storage.write_json(run_json, storage.join(cfg.output, RUN_JSON), cfg.storage_options)
        if not early:
            remove_orphans(cfg.output, manifest, cfg.storage_options, lock)
    except BaseException:
        # A refused run (another model's run directory, actors that never started) must not leave its model
        # actors holding CPUs/GPUs in a Ray that lives on (a cluster, a test session, a retry in the same driver),
        # nor shard tasks started early waiting on them.
        for ref in in_flight:
            ray.cancel(ref, force=True)
        for a in actors:
            ray.kill(a)
        ray.kill(counter)
        raise

    facts = ModelFacts.from_description(description)
    full_gflops = float(description["gflops_per_exit"][str(description["exits"][-1])])
    notes = run_json_notes(description)
    summary.scored_not_routed = scored_not_routed(dict(description, **notes))
    summary.random_weights = notes["random_weights"]

    progress = Progress(totals, cfg.progress)
    last_poll = 0.0
    try:
        while pending or in_flight:
            lock.check()  # LockLost: stop before writing the manifest another run may be using now
            manifest.flush_if_due()  # commits of a quiet spell reach the file, not only those before the next
            launch(lambda i: facts)
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
            now = time.monotonic()
            for ref, (shard, part, submitted) in list(in_flight.items()):
                if now - submitted > cfg.shard_timeout_s:
                    ray.cancel(ref, force=True)
                    in_flight.pop(ref)
                    message = f"timed out after {cfg.shard_timeout_s:.0f}s (--shard-timeout)"
                    write_shard_failure(cfg.output, part, shard.uri, message, cfg.storage_options)
                    summary.shards_failed.append((shard.uri, message))
            if progress.enabled and now - last_poll > 1.0:
                last_poll = now
                images, errors = ray.get(counter.totals.remote(), timeout=60)
                progress.update(images + errors, errors)
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
        progress.close(summary.images + summary.errors, summary.errors)
        for a in actors:
            ray.kill(a)
        ray.kill(counter)
    return full_gflops


def invocation_figures(summary: EmbedSummary) -> dict:
    """Return the figures of one invocation that run.json records (the report's throughput comes from these)."""
    return {
        "wall_seconds": round(summary.seconds, 3),
        "images": summary.images,
        "errors": summary.errors,
        "shards_committed": summary.shards_committed,
        "shards_skipped": summary.shards_skipped,
        "shards_failed": len(summary.shards_failed),
        "duplicate_keys": summary.duplicate_keys,
        "gflops": summary.gflops,
        "model_seconds": round(summary.model_seconds, 3),
        "startup_seconds": dict(summary.startup),
    }


def failure_message(e: Exception) -> str:
    """Return the message of the error that failed a shard task, without Ray's traceback wrapping."""
    cause = getattr(e, "cause", None)
    if cause is not None:
        return f"{type(cause).__name__}: {cause}"
    text = str(e).strip().splitlines()
    return text[-1] if text else type(e).__name__


def run_json_notes(description: dict) -> dict:
    """Return what run.json says of a run beside the model's description, for people and for `icar search`:
    ``random_weights`` (a seeded random init: the embeddings carry no meaning) and ``routes_by_score`` (whether
    the router used the scorer's scores; a scorer that ran while it did not was spent for calibration only)."""
    model = description.get("model") or {}
    # A random init is the one identity whose pretrained is "none" (pipeline.model.models: open_clip names and
    # model configs alike); the demo says "shipped", a checkpoint its path.
    return {"random_weights": str(model.get("pretrained", "")).lower() == "none",
            "routes_by_score": routes_by_score(description.get("router"))}


# ModelSpec fields that change where and how fast a run computes, not what: a resume may change them.
RUNTIME_SPEC_FIELDS = ("device", "precision", "torch_threads")


def same_model(run_json: dict, spec: ModelSpec) -> bool:
    """Return True when run.json's recorded "spec" asks for what ``spec`` asks for (runtime fields aside) and the
    local files it loads are unchanged since the run began ("spec_files": size and mtime), so the model needs no
    loading to know it is the run's; False when either cannot be told (older run.json, files behind URLs)."""
    recorded, files = run_json.get("spec"), run_json.get("spec_files")
    if not isinstance(recorded, dict) or not isinstance(files, dict):
        return False
    if any(recorded.get(k) != v for k, v in asdict(spec).items() if k not in RUNTIME_SPEC_FIELDS):
        return False
    return files == spec_files(spec)


def scored_not_routed(run_json: dict) -> bool:
    """Return True when a scorer ran on every image of a run whose router did not use the scores."""
    return bool(run_json.get("scorer", True)) and run_json.get("routes_by_score") is False


class ModelActor:
    """A model worker on a Ray actor (one per GPU, or a CPU actor on CPU-only clusters)."""

    def __init__(self, spec: ModelSpec, secrets: dict[str, str] | None = None):
        # Lazy, and the one import of our own package kept inside a function: the model stage imports torch
        # (~1.3 s, ~550 MiB of RSS), and this module is the driver's. The driver only names this class (Ray
        # pickles it by reference); the body runs in the actor process, the only one that loads a model
        # (tests/faults/test_memory.py::test_embed_driver_never_imports_torch).
        from pipeline.model.worker import ModelWorker

        apply_secrets(secrets)  # checkpoints may live on S3
        logging.basicConfig(level=logging.WARNING)
        logging.getLogger("pipeline").setLevel(logging.INFO)
        self.worker = ModelWorker(spec)

    def describe(self) -> dict:
        return self.worker.describe()

    def embed(self, pixels: np.ndarray, keys: list[str]) -> dict:
        return self.worker.embed(pixels, keys)

    def embed_encoded(self, batch: EncodedBatch, keys: list[str]) -> dict:
        return self.worker.embed_encoded(batch, keys)


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
    import ray  # lazy, as everywhere in this module: see init_ray (pipeline.runtime) for why

    apply_secrets(secrets)

    def fetch(ref):
        # A batch that takes this long means a hung actor: fail the shard (it is retried) instead of waiting.
        return ray.get(ref, timeout=max(600.0, cfg.shard_timeout_s / 4))

    method = actor.embed if cfg.decode_device == "cpu" else actor.embed_encoded
    row = process_shard(shard, part, cfg, facts, submit=lambda batch, keys: method.remote(batch, keys), fetch=fetch,
                        on_batch=lambda n: counter.add.remote(n))
    counter.add.remote(0, row["errors"])
    return row


def embed_gflops_ratio(summary: EmbedSummary) -> float:
    """Return GFLOPs spent divided by the full-depth cost of the same images (nan for an empty run)."""
    return summary.gflops / summary.full_depth_gflops if summary.full_depth_gflops else math.nan
