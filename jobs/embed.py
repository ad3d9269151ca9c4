"""`icar embed INPUT... --output RUN`: score, route and embed image shards into a run directory on Ray."""

from __future__ import annotations

import argparse
import logging
import sys

from pipeline.embed.config import EmbedConfig
from pipeline.embed import execution
from pipeline.embed.validate import ArgumentProblem, check_embed
from pipeline.io.lock import LockHeld, LockLost
from pipeline.io.readers import InputError
from pipeline.io.shards import RunStateError
from pipeline.io.storage import CorruptFileError, StorageError, StorageFullError
from pipeline.logs import setup_logging
from pipeline.model.spec import ModelSpec
from pipeline.report.build import AuditError, ReportConfig, build_report, summary_line
from pipeline.runtime import stop_reason

from jobs.common import (HelpFormatter, add_deprecated_alias, add_logging_args, add_model_args, add_runtime_args,
                     add_storage_args, apply_logging, float_list, nonnegative_int, positive_float, positive_int)

log = logging.getLogger("icar.embed")

EXAMPLES = """
inputs: WebDataset .tar shards (img2dataset layout), Parquet files with an image-bytes column, or folders of
images; local paths, globs or s3:// URLs (credentials and endpoint from the standard AWS environment or
--storage-options). One output shard per input shard; re-running the same command resumes.

examples:
  icar embed demo-corpus/test/*.tar --output runs/demo                     # shipped demo model + router
  icar embed 's3://bucket/laion/{00000..00099}.tar' --output s3://bucket/runs/l14 \\
      --model ViT-L-14 --pretrained laion2b_s32b_b82k --router router.json --address auto
  icar embed imgs/ --output runs/b32 --model ViT-B-32 --pretrained none --full-depth   # seeded random weights
"""


def build_parser() -> argparse.ArgumentParser:
    d, m = EmbedConfig(inputs=[], output=""), ModelSpec()
    p = argparse.ArgumentParser(prog="icar embed", description=__doc__, epilog=EXAMPLES, formatter_class=HelpFormatter)
    p.add_argument("inputs", nargs="+", help="input shards: files, globs, directories or URLs")
    p.add_argument("--output", "-o", required=True, help="run directory (local path or URL)")
    g = add_model_args(p, m, merge="token-merging schedule applied to every image, at --exit-at or full depth, "
                                  "e.g. r2 or keep0.8 (pipeline/model/merging.py); run.json records it as a "
                                  "one-profile router. Not with --router or --route-fractions: calibrate "
                                  "profiles with `icar calibrate --profiles` instead")
    r = p.add_argument_group("routing (choose one; default: the demo's calibrated router, else full depth)")
    r.add_argument("--router", default=m.router, help="router JSON written by `icar calibrate`")
    r.add_argument("--exit-at", type=int, default=m.exit_at, help="send every image to this exit depth")
    r.add_argument("--full-depth", action="store_true", help="send every image through all blocks (baseline)")
    r.add_argument("--route-fractions", type=float_list, default=m.route_fractions,
                   help="fixed share of images per exit, e.g. 0.3,0.3,0.4 (by a hash of the key; benchmarks)")
    s = p.add_argument_group("complexity scorer")
    s.add_argument("--scorer", default=m.scorer, choices=["default", "heuristic", "convnext", "none"],
                   help="default = the shipped scorer, which also scores every image of a run that routes without "
                        "scores (--full-depth, --exit-at, no router), for calibrating one later; none = no scorer "
                        "(complexity is null, no scorer GFLOPs: the baseline to compare a routed run with)")
    s.add_argument("--checkpoint", dest="scorer_checkpoint", default=m.scorer_checkpoint,
                   help="ConvNeXt-IC checkpoint for --scorer convnext")
    x = add_runtime_args(p, device_help="model device",
                         threads_help="intra-op threads of a CPU model actor (default: $ICAR_TORCH_THREADS, else the "
                                      "CPUs reserved per actor)", threads_dest="torch_threads",
                         threads_default=m.torch_threads, precision_default=m.precision,
                         address_help="Ray cluster to join (default: $RAY_ADDRESS, else embedded local Ray)",
                         title="runtime and execution")
    add_deprecated_alias(x, "--torch-threads", "--threads", dest="torch_threads", type=positive_int)
    x.add_argument("--batch-size", type=positive_int, default=d.batch_size, help="images per model call")
    x.add_argument("--decode-device", default=d.decode_device, choices=["cpu", "cuda"],
                   help="where JPEGs are decoded and resized: cpu (the shard tasks, default) or cuda (nvJPEG on the "
                        "model actor's GPU; other formats and JPEGs it refuses still decode on CPU)")
    x.add_argument("--image-column", default=d.image_column, help="Parquet column with image bytes (default: auto)")
    x.add_argument("--max-pixels", type=positive_int, default=d.max_pixels, help="larger images are refused as decompression bombs")
    x.add_argument("--max-sample-bytes", type=positive_int, default=d.max_sample_bytes,
                   help="a larger sample (tar member, image file, Parquet cell) is an error row, skipped unread")
    x.add_argument("--folder-shard-size", type=positive_int, default=d.folder_shard_size,
                   help="image files per input shard of a folder (its sorted listing, cut into committed pieces)")
    x.add_argument("--follow-symlinks", action="store_true",
                   help="read folder files reached through symbolic links that leave the input root (default: an "
                        "error row names each such link, and nothing is read through it)")
    x.add_argument("--num-actors", type=positive_int, default=d.num_actors, help="model actors (default: one per GPU, 1 on CPU)")
    x.add_argument("--gpus-per-actor", type=float, default=d.gpus_per_actor, help="GPU share per model actor")
    x.add_argument("--cpus-per-actor", type=float, default=d.cpus_per_actor, help="CPUs reserved per model actor")
    x.add_argument("--decode-tasks", type=positive_int, default=d.decode_tasks, help="input shards read+decoded at once (default: free CPUs)")
    x.add_argument("--shard-retries", type=nonnegative_int, default=d.shard_retries, help="retries of a failing input shard")
    x.add_argument("--shard-timeout", type=positive_float, default=d.shard_timeout_s, help="seconds before a shard task is cancelled")
    x.add_argument("--limit-shards", type=int, default=None, help="embed at most this many pending shards")
    x.add_argument("--repair", action="store_true",
                   help="move unreadable parts, manifest or run.json of OUTPUT into OUTPUT/quarantine/ (nothing is "
                        "deleted) and embed their inputs again; a damaged run.json is written anew only when the "
                        "committed shards fit the model given")
    x.add_argument("--reembed-changed", action="store_true",
                   help="embed again committed inputs whose size, mtime or ETag changed since they were embedded")
    x.add_argument("--break-lock", action="store_true",
                   help="take over the output's lock (OUTPUT/icar.lock) from another run; only once you are sure it "
                        f"is dead (a lock is taken over by itself when its holder's process on this host is gone, "
                        f"or after {d.lock_stale_after_s:.0f}s without a heartbeat)")
    add_storage_args(p)
    add_logging_args(p, progress_help="no progress bar")
    return p


def config_from_args(a: argparse.Namespace) -> EmbedConfig:
    """Return the EmbedConfig described by parsed arguments."""
    spec = ModelSpec(model=a.model, pretrained=a.pretrained, seed=a.seed, exits=a.exits, heads=a.heads,
                     router=a.router, exit_at=a.exit_at, full_depth=a.full_depth, route_fractions=a.route_fractions,
                     scorer=a.scorer, scorer_checkpoint=a.scorer_checkpoint, device=a.device,
                     precision=a.precision, torch_threads=a.torch_threads, merge=a.merge)
    return EmbedConfig(inputs=a.inputs, output=a.output, spec=spec, batch_size=a.batch_size,
                       decode_device=a.decode_device,
                       image_column=a.image_column, max_pixels=a.max_pixels, address=a.address,
                       num_actors=a.num_actors, gpus_per_actor=a.gpus_per_actor, cpus_per_actor=a.cpus_per_actor,
                       decode_tasks=a.decode_tasks, shard_retries=a.shard_retries, shard_timeout_s=a.shard_timeout,
                       storage_options=a.storage_options, progress=not a.no_progress, limit_shards=a.limit_shards,
                       reembed_changed=a.reembed_changed, break_lock=a.break_lock, repair=a.repair,
                       max_sample_bytes=a.max_sample_bytes, folder_shard_size=a.folder_shard_size,
                       follow_symlinks=a.follow_symlinks)


def main(argv: list[str] | None = None) -> int:
    """Run the embed job; return 0 when every input shard was committed, 1 when any failed (or the output ran out
    of space, or the store kept failing, or another run took the output's lock over), 2 on bad input (a missing
    bucket and denied access included) or when another run holds the output's lock, 130 when
    interrupted (Ctrl-C) and 143 when terminated (SIGTERM); committed shards are kept and a re-run resumes."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.merge is not None and (args.router is not None or args.route_fractions is not None):
        parser.error("--merge applies one schedule to every image; a router with merge schedules comes from "
                     "`icar calibrate --profiles ...`: drop --merge, or drop --router/--route-fractions")
    apply_logging(args)
    cfg = config_from_args(args)
    try:  # values that would fail on the model actors are refused here, before Ray and a model start
        surprises = check_embed(cfg)
    except ArgumentProblem as e:
        print(f"icar embed: error: {e}", file=sys.stderr)
        return 2
    for warning in surprises:  # the first lines a user sees, not a line deep in a model actor's log
        log.warning("%s", warning)
    try:
        summary = execution.run_embed(cfg)  # looked up at call time: tests stand in for the Ray part
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (which Ray may hand back as a plain KeyboardInterrupt)
        stop = stop_reason(e)
        print(f"icar embed: {stop.words}; the shards committed so far are recorded in {cfg.output}: run the same command "
              f"to resume", file=sys.stderr)
        return stop.exit_code
    except LockHeld as e:  # another run writes this output: refused before Ray or a model started
        print(f"icar embed: error: {e}", file=sys.stderr)
        return 2
    except LockLost as e:  # another run took the output over mid-run: this one stopped writing
        print(f"icar embed: error: {e}; this run stopped writing {cfg.output}", file=sys.stderr)
        return 1
    except StorageError as e:  # the message names the URL, the cause and the fix; committed work is kept
        print(f"icar embed: error: {e}", file=sys.stderr)
        return 2 if e.permanent and not isinstance(e, StorageFullError) else 1
    except CorruptFileError as e:  # names the file, what is wrong and the way out (--repair)
        print(f"icar embed: error: {e}", file=sys.stderr)
        return 2
    except (InputError, RunStateError, ValueError, FileNotFoundError) as e:
        print(f"icar embed: error: {e}", file=sys.stderr)
        return 2
    for source, message in summary.shards_failed:
        print(f"FAILED {source}: {message}", file=sys.stderr)
    print(summary.line())
    if not (summary.shards_committed or summary.shards_skipped):
        return summary.exit_code  # nothing committed (every shard failed): no report to audit, exit 1 says why
    return max(summary.exit_code, print_report_summary(cfg))


def print_report_summary(cfg: EmbedConfig) -> int:
    """Print the cost report's one-line summary of the whole run directory; return 3 if the audit refuses it."""
    try:
        report = build_report([cfg.output], ReportConfig(storage_options=cfg.storage_options))
    except AuditError as e:
        print(f"icar embed: the cost report refuses this run directory: {e}", file=sys.stderr)
        return 3
    except RunStateError as e:  # nothing committed yet: there is nothing to report
        print(f"report: {e}")
        return 0
    except CorruptFileError as e:  # a part that cannot be read: it names the file and `--repair`
        print(f"icar embed: error: the cost report cannot read this run directory: {e}", file=sys.stderr)
        return 2
    print(f"report: {summary_line(report)}")
    return 0


if __name__ == "__main__":
    setup_logging()
    raise SystemExit(main())
