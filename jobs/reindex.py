"""`icar reindex --config JOB.yaml`: scheduled incremental embed and a verified, versioned index behind LATEST."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from pipeline.io.readers import InputError
from pipeline.logs import setup_logging
from pipeline.reindex.jobconfig import ConfigError, load_job_config
from pipeline.reindex.errors import EXIT_CODES, EXIT_CONFIG
from pipeline.reindex.root import reindex_status
from pipeline.reindex.run import plan_reindex, run_reindex

from jobs.common import HelpFormatter, add_logging_args, add_runtime_args, apply_logging

log = logging.getLogger("icar.reindex")


def _epilog() -> str:
    codes = "\n".join(f"  {code}  {text}" for code, text in sorted(EXIT_CODES.items()))
    return f"""
Each run, under a lock on ROOT: embeds the inputs not yet committed (and those whose size/mtime/ETag changed),
retires inputs that disappeared (their keys leave the next index), builds ROOT/indexes/vNNNN, verifies it
(opens, row counts, model, recall >= target) and only then moves ROOT/indexes/LATEST to it. A record of every
run is written to ROOT/reindex-log/. Readers: pipeline.reindex.root.resolve_latest(ROOT) gives the index directory.

exit codes (for schedulers):
{codes}

examples:
  icar reindex --config jobs/examples/local-demo.yaml                # embedded Ray on this machine
  icar reindex --config jobs/examples/s3-cluster.yaml --log-format json
  ray job submit --address http://HEAD:8265 -- python -m jobs.reindex --config jobs/examples/s3-cluster.yaml
  icar reindex --config JOB.yaml --dry-run                            # what would be embedded/retired, no writes
  icar reindex --config JOB.yaml --status                             # LATEST, lock holder, last runs
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="icar reindex", description=__doc__, epilog=_epilog(),
                                formatter_class=HelpFormatter)
    p.add_argument("--config", "-c", required=True, help="job config (YAML); see jobs/examples/")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--check-config", action="store_true", help="validate the config and exit (0 ok, 2 invalid)")
    mode.add_argument("--dry-run", action="store_true",
                      help="list what would be embedded, re-embedded and retired; write nothing, start no Ray")
    mode.add_argument("--status", action="store_true", help="print LATEST, the lock holder and the last runs as JSON")
    p.add_argument("--break-lock", action="store_true",
                   help="take the root's lock even if its holder looks alive (only when you know it is dead)")
    p.add_argument("--json", action="store_true", help="print the run's full record as JSON on stdout at the end")
    add_runtime_args(p, address_help="Ray cluster to join, overriding the config's ray.address (default: the "
                                     "config's, else $RAY_ADDRESS, else an embedded local Ray)",
                     device_help="model device, overriding the config's model.device", device_default=None,
                     threads_help="torch threads of a CPU model actor, overriding the config's model.torch_threads")
    add_logging_args(p, progress_help="no progress bars, whatever the config's progress says")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the reindex job; return its exit code (see --help)."""
    args = build_parser().parse_args(argv)
    apply_logging(args)
    try:
        cfg = load_job_config(args.config)
    except ConfigError as e:
        print(f"icar reindex: error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    if args.address is not None:
        cfg.ray.address = args.address
    if args.device is not None:
        cfg.model.device = args.device
    if args.threads is not None:
        cfg.model.torch_threads = args.threads
    if args.no_progress:
        cfg.progress = False
    if args.check_config:
        print(f"{args.config}: ok (job {cfg.name}, root {cfg.root}, {len(cfg.inputs)} input pattern(s))")
        return 0
    if args.dry_run or args.status:
        try:
            out = plan_reindex(cfg) if args.dry_run else reindex_status(cfg.root.rstrip("/"), cfg.storage_options)
        except InputError as e:
            print(f"icar reindex: error: {e}", file=sys.stderr)
            return EXIT_CONFIG
        print(json.dumps(out, indent=2, default=str))
        return 0

    result = run_reindex(cfg, break_lock=args.break_lock)
    if args.json:
        print(json.dumps(result.record, indent=2, default=str))
    print(result.line())
    if result.exit_code and result.record.get("error"):
        print(f"icar reindex: {result.record['error']}", file=sys.stderr)
    return result.exit_code


if __name__ == "__main__":
    setup_logging()
    raise SystemExit(main())
