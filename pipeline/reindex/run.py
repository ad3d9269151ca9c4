"""Scheduled incremental reindex: embed what is new or changed, retire what is gone, publish a verified index.

One job config (pipeline/reindex/jobconfig.py) owns one output ROOT, laid out as pipeline/reindex/root.py
describes (generations/gN/run, indexes/vN, indexes/LATEST, reindex-log/). The steps live in role modules:
``inputs`` (what changed, retirement), ``pipeline.index.reuse`` (train or reuse), ``versions`` (verify,
retention), ``errors`` (exit codes); this module runs them in order under the lock and records the run.

A run, under the lock:

1. finish any retirement a crash interrupted (see ``retire_inputs``);
2. list the inputs and compare them with the manifest (the source of truth): new, changed (size/mtime/ETag),
   unchanged, disappeared; stop (exit 7) before touching anything when more than ``max_retire_fraction``
   of the committed inputs disappeared at once (an outage or a wrong glob looks exactly like that);
3. embed new and changed inputs (`run_embed`, ``reembed_changed``). A different model, exits, heads, router
   or scorer never mixes with the generation's shards: the run stops (``on_model_change: refuse``, exit 6),
   or starts generation g+1 and embeds every input into it (``new_generation``). With nothing to embed and
   an unchanged model spec, no model actor is started at all;
4. retire disappeared inputs: their manifest rows are dropped and their shards moved to ``retired/``, so the
   next index (which indexes exactly the manifest's shards) no longer holds their keys;
5. when the manifest differs from the one LATEST was built from, build ``indexes/vNNNN`` (adding into the
   previous version's trained index, or training afresh: ``decide_index_build`` decides with numbers and
   the decision is recorded), verify it (opens with faiss.read_index, ntotal = ids = manifest rows, model
   key, measured recall >= target) and only then rewrite LATEST, atomically (a local rename or a single
   object PUT). Readers that follow LATEST (``resolve_latest``) never see a partial or unverified index;
6. keep ``retention.keep_versions`` verified versions (LATEST included), delete older ones;
7. write the run's record to ``reindex-log/`` (also when the run failed) and release the lock.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import socket
import time
from dataclasses import dataclass

from pipeline.embed.execution import run_embed
from pipeline.index.build import build_index
from pipeline.index.params import BudgetError
from pipeline.index.read import plan_runs
from pipeline.index.reuse import decide_index_build, recall_min
from pipeline.io import storage
from pipeline.io.lock import LockHeld, LockLost, RootLock
from pipeline.io.readers import InputError, expand_inputs
from pipeline.io.rundir import check_run_identity
from pipeline.io.schema import model_key
from pipeline.io.shards import Manifest, RunStateError, read_run_json
from pipeline.io.storage import CorruptFileError
from pipeline.logs import timed_phase
from pipeline.reindex.errors import (
    EXIT_CODES,
    EXIT_CONFIG,
    EXIT_ERROR,
    EXIT_LOCKED,
    EXIT_MODEL_CHANGED,
    EXIT_OK,
    EXIT_SAFETY,
    EXIT_SHARDS_FAILED,
    EXIT_VERIFY,
    ModelChangedError,
    ReindexError,
    SafetyStop,
    VerificationError,
)
from pipeline.reindex.inputs import (
    InputPlan,
    complete_retirements,
    manifest_digest,
    plan_inputs,
    retire_inputs,
    spec_differences,
)
from pipeline.reindex.jobconfig import ConfigError, JobConfig, config_summary
from pipeline.reindex.root import (
    INDEXES,
    LATEST,
    LOCK_FILE,
    LOG_DIR,
    VERSION_RECORD,
    current_generation,
    forget_listings,
    generation_dir,
    list_versions,
    new_reindex_id,
    read_latest,
    run_dir,
    start_generation,
    utc_now,
    version_dir,
    version_name,
)
from pipeline.reindex.versions import (
    apply_retention,
    previous_version,
    reuse_supported,
    verify_index,
)
from pipeline.runtime import (
    apply_secrets,
    forwarded_env,
    forwarded_secrets,
    init_ray,
    stop_reason,
)

log = logging.getLogger(__name__)


@dataclass
class ReindexResult:
    """What a reindex run did: its exit code and its record (also written to ROOT/reindex-log/)."""

    exit_code: int
    record: dict

    def line(self) -> str:
        """Return the one-line summary for people and schedulers."""
        r = self.record
        inputs = r.get("inputs") or {}
        idx = r.get("index") or {}
        embed = r.get("embed") or {}
        if idx.get("version"):
            published = (f"published {idx['version']} ({idx.get('ntotal', 0):,} vectors, {idx.get('factory')}, "
                         f"{idx.get('decision', {}).get('mode')})" if idx.get("published")
                         else f"built {idx['version']} NOT published")
        else:
            published = f"index: {idx.get('skipped', 'not built')}"
        return (f"icar reindex {r.get('job')}: exit {self.exit_code} ({r.get('status')}); generation "
                f"{r.get('generation')}; inputs {inputs.get('listed', 0)} listed, {len(inputs.get('new', []))} new, "
                f"{len(inputs.get('changed', []))} changed, {len(inputs.get('disappeared', []))} gone; "
                f"embedded {embed.get('images', 0)} images in {embed.get('shards_committed', 0)} shards "
                f"({len(embed.get('shards_failed', []))} failed); {published}; LATEST "
                f"{(r.get('latest') or {}).get('after')}")


def _read_run_json(run: str, storage_options: dict | None) -> dict | None:
    try:
        return read_run_json(run, storage_options)
    except FileNotFoundError:
        return None


def plan_reindex(cfg: JobConfig) -> dict:
    """Return what a run would do now (inputs new/changed/gone, generation, LATEST), writing nothing (--dry-run)."""
    so = cfg.storage_options
    root = cfg.root.rstrip("/")
    gen = current_generation(root, so)
    rows = Manifest(run_dir(root, gen), so).rows if gen else []
    plan = plan_inputs(expand_inputs(cfg.inputs, so), rows)
    run_json = _read_run_json(run_dir(root, gen), so) if gen else None
    gone = len(plan.disappeared) / len(rows) if rows else 0.0
    return {"root": root, "generation": gen, "inputs": plan.to_dict(), "committed_inputs": len(rows),
            "disappeared_fraction": round(gone, 4), "safety_stop": gone > cfg.max_retire_fraction,
            "model_spec_differs": spec_differences(run_json, cfg.model), "latest": read_latest(root, so),
            "next_version": version_name((list_versions(root, so) or [0])[-1] + 1)}


def run_reindex(cfg: JobConfig, break_lock: bool = False) -> ReindexResult:
    """Run one scheduled reindex of ``cfg`` (see the module docstring); return its exit code and record."""
    so = cfg.storage_options
    root = cfg.root.rstrip("/")
    t0 = time.perf_counter()
    rid = new_reindex_id()
    record: dict = {"job": cfg.name, "reindex_id": rid, "started": utc_now(), "host": socket.gethostname(),
                    "pid": os.getpid(), "config": cfg.source, "root": root,
                    "schedule": dataclasses.asdict(cfg.schedule),
                    "status": "running", "phases": {}}
    storage.makedirs(root, so)
    lock = RootLock(storage.join(root, LOCK_FILE), cfg.name, cfg.lock.stale_after_s, cfg.lock.heartbeat_s, so,
                    details={"reindex_id": rid, "config": cfg.source})
    exit_code = EXIT_ERROR
    locked = False
    try:
        lock.acquire(break_lock=break_lock)
        locked = True
        exit_code = _run_locked(cfg, root, rid, lock, record)
    except (LockHeld, LockLost) as e:
        exit_code, record["status"], record["error"] = EXIT_LOCKED, "locked", str(e)
        log.error("%s", e)
    except ReindexError as e:
        exit_code, record["error"] = e.exit_code, str(e)
        record["status"] = {EXIT_VERIFY: "verification failed", EXIT_MODEL_CHANGED: "model changed",
                            EXIT_SAFETY: "safety stop"}.get(e.exit_code, "failed")
        log.error("%s", e)
    except ConfigError as e:
        exit_code, record["status"], record["error"] = EXIT_CONFIG, "config error", str(e)
        log.error("%s", e)
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM during the embed step (however Ray hands it back)
        stop = stop_reason(e)
        exit_code, record["status"] = stop.exit_code, stop.status
        record["error"] = f"{stop.status} ({stop.signal}); run again to resume"
        log.error("reindex %s %s; the lock is released and the next run resumes", rid, record["status"])
    except Exception as e:
        # A damaged file (a run's shard, manifest or run.json, an index) names itself and the fix: no traceback.
        if isinstance(e, (InputError, BudgetError, CorruptFileError)):
            exit_code, record["status"] = EXIT_CONFIG, "config error"
            log.error("%s", e)
        else:
            exit_code, record["status"] = EXIT_ERROR, "error"
            log.exception("reindex %s failed", rid)
        record["error"] = f"{type(e).__name__}: {e}"
    finally:
        record["exit_code"] = exit_code
        record["exit_meaning"] = EXIT_CODES.get(exit_code)
        record["finished"] = utc_now()
        record["seconds"] = round(time.perf_counter() - t0, 3)
        try:
            storage.write_json(record, storage.join(root, LOG_DIR, f"{rid}.json"), so)
        except Exception as e:  # the record is for people; failing to write it must not hide the run's outcome
            log.error("could not write the reindex log record: %s", e)
        if locked:
            lock.release()
    result = ReindexResult(exit_code, record)
    log.info("%s", result.line())
    return result


def _run_locked(cfg: JobConfig, root: str, rid: str, lock: RootLock, record: dict) -> int:
    """Do the run's work while holding the lock; return the exit code (raise ReindexError to stop)."""
    so = cfg.storage_options
    phase = functools.partial(timed_phase, into=record["phases"], logger=log)
    record["config_summary"] = config_summary(cfg)
    gen = current_generation(root, so)
    if gen is None:
        gen = start_generation(root, cfg, "first run of this root")
        record["new_generation"] = True
    record["generation"] = gen

    with phase("recover"):
        record["recovered_retirements"] = complete_retirements(root, gen, so)

    with phase("list_inputs"):
        run = run_dir(root, gen)
        rows = Manifest(run, so).rows
        try:
            shards = expand_inputs(cfg.inputs, so)
        except InputError as e:
            if rows:
                raise SafetyStop(f"the inputs match nothing now ({e}) but {len(rows)} inputs are committed: an outage "
                                 f"or a wrong glob; nothing was retired (fix the inputs, or move the root aside to "
                                 f"start over)") from e
            raise
        plan = plan_inputs(shards, rows)
        record["inputs"] = plan.to_dict()
        gone = len(plan.disappeared) / len(rows) if rows else 0.0
        log.info("inputs: %d listed, %d new, %d changed, %d unchanged, %d disappeared", plan.listed,
                 len(plan.new), len(plan.changed), plan.unchanged, len(plan.disappeared))
        if gone > cfg.max_retire_fraction:
            raise SafetyStop(f"{len(plan.disappeared)} of {len(rows)} committed inputs disappeared ({gone:.0%}), more "
                             f"than max_retire_fraction {cfg.max_retire_fraction:.0%}: nothing was retired. If they "
                             f"are really gone, raise max_retire_fraction for one run; first gone: "
                             f"{[r['source'] for r in plan.disappeared[:3]]}")

    run_json = _read_run_json(run, so)
    differs = spec_differences(run_json, cfg.model)
    record["model_spec_differs"] = differs
    embed_summary = None
    if plan.new or plan.changed or differs:
        embed_summary, gen, run, plan = _embed(cfg, root, gen, run, plan, shards, differs, record, phase)
    else:
        log.info("nothing new or changed and the model spec is unchanged: no embedding (no model actors started)")
    record["generation"] = gen
    if embed_summary is not None:
        record["embed"] = {"images": embed_summary.images, "errors": embed_summary.errors,
                           "shards_committed": embed_summary.shards_committed,
                           "shards_skipped": embed_summary.shards_skipped,
                           "shards_failed": [{"source": s, "message": m} for s, m in embed_summary.shards_failed],
                           "gflops": embed_summary.gflops, "seconds": round(embed_summary.seconds, 3)}
    exit_code = EXIT_SHARDS_FAILED if embed_summary is not None and embed_summary.shards_failed else EXIT_OK

    lock.check()
    with phase("retire"):
        record["retired"] = retire_inputs(run, generation_dir(root, gen), plan.disappeared, rid, so)
    # Shards were committed by Ray workers (other processes): listings this process cached before (s3fs caches
    # directory listings) would hide them from the index build's reads.
    forget_listings(root, so)

    manifest = Manifest(run, so)
    total_rows = sum(int(r["rows"]) for r in manifest.rows)
    digest = manifest_digest(manifest.rows)
    latest = read_latest(root, so)
    record["latest"] = {"before": latest["version"] if latest else None,
                        "after": latest["version"] if latest else None}
    if total_rows == 0:
        record["index"] = {"skipped": "no rows are committed yet: nothing to index"}
        record["status"] = "nothing to index"
        return max(exit_code, EXIT_SHARDS_FAILED) if plan.listed else exit_code
    if (latest and latest.get("generation") == gen and latest.get("manifest_digest") == digest
            and not cfg.index.force):
        record["index"] = {"skipped": f"unchanged since {latest['version']} (same committed shards)"}
        log.info("index: LATEST %s already indexes exactly these shards; no new version", latest["version"])
    else:
        lock.check()
        _publish(cfg, root, gen, run, rid, digest, total_rows, latest, lock, record, phase)

    with phase("retention"):
        record["retention"] = apply_retention(root, cfg.retention.keep_versions, so,
                                              cfg.retention.delete_old_generations, gen)
    record["status"] = "ok" if exit_code == EXIT_OK else "some shards failed"
    return exit_code


def _embed(cfg: JobConfig, root: str, gen: str, run: str, plan: InputPlan, shards: list, differs: list[str],
           record: dict, phase):
    """Embed new and changed inputs into ``gen`` (or a new generation); return (summary, gen, run, plan)."""
    def switch_generation(e: Exception):
        # Another model, exits, heads, router or scorer than the generation's shards: never mixed.
        if cfg.on_model_change == "refuse":
            raise ModelChangedError(
                f"generation {gen} was embedded with another configuration ({e}); on_model_change is refuse. "
                f"Set on_model_change: new_generation to re-embed every input with the new model into a "
                f"new generation (the current LATEST keeps serving until its index is published)") from e
        record["previous_generation"] = gen
        new_gen = start_generation(root, cfg, f"model changed: {e}")
        record["new_generation"] = True
        # The new generation starts empty: every listed input is new there and nothing is retired.
        new_plan = InputPlan(listed=len(shards), new=[s.uri for s in shards])
        record["inputs_new_generation"] = new_plan.to_dict()
        return new_gen, run_dir(root, new_gen), new_plan

    if differs and _read_run_json(run, cfg.storage_options) is not None:
        log.info("model spec differs from generation %s in %s: checking the model identity", gen, ", ".join(differs))
        with phase("check_model"):
            try:
                check_identity(cfg, run)
            except RunStateError as e:
                gen, run, plan = switch_generation(e)
    with phase("embed"):
        try:
            return run_embed(cfg.embed_config(run)), gen, run, plan
        except RunStateError as e:
            # Same spec, other identity (e.g. a checkpoint file replaced in place): run_embed's own check.
            if record.get("new_generation"):
                raise
            gen, run, plan = switch_generation(e)
            return run_embed(cfg.embed_config(run)), gen, run, plan


def describe_model(spec, secrets: dict[str, str] | None = None) -> dict:
    """Return the identity description of the model ``spec`` asks for (what run.json records); a Ray task."""
    # lazy: torch; only this CPU Ray task loads the model
    from pipeline.model.worker import ModelWorker

    apply_secrets(secrets)  # checkpoints may live on S3
    return ModelWorker(spec).describe()


def check_identity(cfg: JobConfig, run: str) -> None:
    """Raise RunStateError when the configured model's identity differs from run directory ``run``'s.

    The model, heads, scorer and router are loaded once in a CPU Ray task (the weights hash is the identity)
    and compared exactly as `icar embed` compares them, before any model actor is started.
    """
    ray = init_ray(cfg.ray.address or os.environ.get("RAY_ADDRESS") or None)
    env = forwarded_env()
    task = ray.remote(describe_model).options(num_cpus=1, runtime_env={"env_vars": env} if env else None)
    spec = dataclasses.replace(cfg.model, device="cpu")  # the identity does not depend on the device
    # Credentials as an argument, never in runtime_env (Ray writes that to its logs).
    description = ray.get(task.remote(spec, forwarded_secrets()), timeout=cfg.embed.actor_start_timeout_s)
    check_run_identity(run, description, cfg.storage_options)


def _publish(cfg: JobConfig, root: str, gen: str, run: str, rid: str, digest: str, total_rows: int,
             latest: dict | None, lock: RootLock, record: dict, phase) -> None:
    """Build the next version, verify it, record it and move LATEST to it (raise VerificationError instead)."""
    so = cfg.storage_options
    version = version_name((list_versions(root, so) or [0])[-1] + 1)
    vdir = version_dir(root, version)
    idx: dict = {"version": version, "path": vdir, "published": False}
    record["index"] = idx
    run_plan = plan_runs([run], so)
    prev = previous_version(root, latest, gen, so)
    decision = decide_index_build(run_plan.ntotal, run_plan.index_dim, prev, cfg.index, reuse_supported(),
                                  offset_dim=run_plan.offset_column)
    idx["decision"] = decision.to_dict()
    log.info("index %s: %s (%s)", version, decision.mode, "; ".join(decision.reasons))
    with phase("build_index"):
        try:
            if decision.mode == "reuse":
                summary = build_index(cfg.index_config(run, vdir, factory=decision.factory,
                                                       trained_index=decision.trained_from))
                got = recall_min(summary.info)
                if got is not None and got < cfg.index.target_recall:
                    why = (f"the build into the reused trained index measured recall {got:.3f} < target "
                           f"{cfg.index.target_recall}: retrained and rebuilt")
                    log.warning("index %s: %s", version, why)
                    idx["decision"]["retry"] = {"reason": why, "recall": got}
                    idx["decision"]["mode"] = "train"
                    summary = build_index(cfg.index_config(run, vdir, overwrite=True))
            else:
                summary = build_index(cfg.index_config(run, vdir))
        except BaseException:
            _remove_quietly(vdir, so)  # a partial version is never useful; it was never LATEST
            raise
    info = summary.info
    mode = idx["decision"]["mode"]
    if mode == "train":
        trained = {"version": version, "ntotal": info["ntotal"], "train_size": info.get("train_size"),
                   "nprobe": info.get("nprobe"), "nlist": info.get("nlist")}
    else:
        trained = dict(prev["trained"])
    idx.update(ntotal=info["ntotal"], factory=info["factory"], nprobe=info.get("nprobe"),
               recall=info.get("recall"), build_seconds=(info.get("build_seconds") or {}).get("total"),
               trained=trained)
    version_record = {"version": version, "generation": gen, "run": run, "reindex_id": rid, "created": utc_now(),
                      "manifest_digest": digest, "ntotal": info["ntotal"], "decision": idx["decision"],
                      "trained": trained, "index_settings": {"max_memory": cfg.index.max_memory,
                                                             "factory": cfg.index.factory,
                                                             "flat_below": cfg.index.flat_below},
                      "verified": False}
    # The decision travels with the index: index.json (rewritten atomically, before it is verified) says how it
    # was built, for whoever opens the directory without the reindex log.
    info["reindex"] = {"version": version, "generation": gen, "reindex_id": rid, "decision": idx["decision"],
                       "trained": trained}
    info.setdefault("reasons", []).append(
        f"reindex {version}: {idx['decision']['mode']} (" + "; ".join(idx["decision"]["reasons"]) + ")")
    storage.write_json(info, storage.join(vdir, "index.json"), so)
    with phase("verify"):
        expected_key = model_key(run_plan.model)
        try:
            checks = verify_index(vdir, total_rows, expected_key, cfg.index.target_recall, cfg.index.verify_open, so)
        except VerificationError as e:
            idx["verification"] = e.checks | {"problems": e.problems}
            version_record["verification"] = idx["verification"]
            storage.write_json(version_record, storage.join(vdir, VERSION_RECORD), so)
            raise
        idx["verification"] = checks
        version_record["verification"] = checks
        version_record["verified"] = True
        storage.write_json(version_record, storage.join(vdir, VERSION_RECORD), so)
    lock.check()
    with phase("switch"):
        pointer = {"version": version, "path": vdir, "generation": gen, "created": utc_now(), "ntotal": info["ntotal"],
                   "model_key": expected_key, "manifest_digest": digest, "reindex_id": rid,
                   "previous": latest["version"] if latest else None}
        storage.write_json(pointer, storage.join(root, INDEXES, LATEST), so)
    idx["published"] = True
    record["latest"]["after"] = version
    log.info("LATEST -> %s (%d vectors, %s)", version, info["ntotal"], info["factory"])


def _remove_quietly(url: str, storage_options: dict | None) -> None:
    try:
        fs, path = storage.filesystem(url, storage_options)
        if fs.exists(path):
            fs.rm(path, recursive=True)
    except Exception as e:  # cleanup of a failed build; the failure itself is what gets reported
        log.warning("could not remove the partial index %s: %s", url, e)


