"""`icar report RUN... [--output DIR]`: audited cost report of one or more runs: GFLOPs and cost vs full depth."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from pipeline.io import storage
from pipeline.io.shards import RunStateError
from pipeline.io.storage import CorruptFileError
from pipeline.logs import setup_logging
from pipeline.report.build import AuditError, ReportConfig, build_report, render_text, write_report

from jobs.common import HelpFormatter, add_logging_args, add_storage_args, apply_logging

log = logging.getLogger("icar.report")

EXAMPLES = """
what it reads: only the run directories' own files (run.json, manifest.parquet, shards/, errors/), local or s3://.
Before reporting, every run is audited: the rows' gflops, the manifest's sums and the per-depth image counts x
run.json's gflops_per_exit (+ scorer) must agree, and every shard listed in the manifest must exist and match it.
A run that fails the audit is refused (exit code 3) with the list of disagreements.

the full-depth baseline: the same images through every block (the last exit), no scorer. Its GPU time is MEASURED
on a full-depth run of the same model and device when one is given (--compare, or a run embedded with
--full-depth among RUN...), otherwise an ESTIMATE scaled by the GFLOP ratio, and labelled so.

examples:
  icar report runs/demo                                       # print the summary
  icar report runs/demo --output reports/demo                 # + report.json, report.csv, report.html
  icar report runs/demo --compare runs/demo-full --output r   # measured baseline, runs side by side
  icar report s3://bucket/runs/2026-01-* --since 2026-01-01 --until 2026-02-01 --gpu-hour-price 3.9 -o jan
                                                              # "what did ICAR save us last month"

exit codes: 0 report made; 2 bad arguments or unreadable run; 3 refused by the audit.
"""


def build_parser() -> argparse.ArgumentParser:
    d = ReportConfig()
    p = argparse.ArgumentParser(prog="icar report", description=__doc__, epilog=EXAMPLES, formatter_class=HelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN",
                   help="run directories written by `icar embed` (paths, URLs, or globs such as 'runs/2026-01-*')")
    p.add_argument("--output", "-o", default=None,
                   help="directory to write report.json, report.csv and report.html into "
                        "(omit to only print the summary)")
    p.add_argument("--gpu-hour-price", type=float, default=d.gpu_hour_price,
                   help="price of one accelerator-hour (GPU-hour), in --currency")
    p.add_argument("--currency", default=d.currency, help="currency of --gpu-hour-price")
    p.add_argument("--compare", default=d.compare, metavar="RUN_B",
                   help="a run shown side by side; a full-depth run of the same images and model is the "
                        "measured baseline")
    p.add_argument("--since", default=d.since, help="only shards committed at or after this date/time (ISO-8601, UTC)")
    p.add_argument("--until", default=d.until, help="only shards committed before this date/time (ISO-8601, UTC)")
    p.add_argument("--allow-gflops-mismatch", action="store_true",
                   help="report rows whose gflops disagree with run.json's per-depth figures (marked AUDIT FAILED) "
                        "instead of refusing the run")
    p.add_argument("--json", action="store_true", help="print report.json to stdout instead of the readable summary")
    add_storage_args(p)
    add_logging_args(p, progress_help="no progress bars (report draws none; accepted like every job's)")
    return p


def expand_runs(patterns: list[str], storage_options: dict) -> list[str]:
    """Return the run directories named by ``patterns``, globs expanded (sorted), each must hold a run.json."""
    runs: list[str] = []
    for pattern in patterns:
        if any(ch in pattern for ch in "*?["):
            fs, path = storage.filesystem(pattern, storage_options)
            found = sorted(storage.unstrip(fs, m) for m in fs.glob(path.rstrip("/")) if fs.isdir(m))
            if not found:
                raise FileNotFoundError(f"no run directory matches {pattern!r}")
            runs += found
        else:
            runs.append(pattern)
    return runs


def main(argv: list[str] | None = None) -> int:
    """Run the report job; return 0 on success, 2 on bad input, 3 when a run fails the audit."""
    args = build_parser().parse_args(argv)
    apply_logging(args)
    cfg = ReportConfig(gpu_hour_price=args.gpu_hour_price, currency=args.currency, compare=args.compare,
                       since=args.since, until=args.until, strict=not args.allow_gflops_mismatch,
                       storage_options=args.storage_options)
    try:
        report = build_report(expand_runs(args.runs, args.storage_options), cfg)
    except AuditError as e:
        print(f"icar report: REFUSED: {e}", file=sys.stderr)
        return 3
    except (CorruptFileError, RunStateError, ValueError, FileNotFoundError) as e:  # a damaged file names itself
        print(f"icar report: error: {e}", file=sys.stderr)
        return 2
    if args.output:
        urls = write_report(report, args.output, args.storage_options)
        log.info("wrote %s", ", ".join(urls.values()))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(render_text(report))
        print("\n" + (f"wrote {args.output}/report.json, report.csv, report.html" if args.output
                      else "(pass --output DIR to write report.json, report.csv and report.html)"))
    return 0


if __name__ == "__main__":
    setup_logging()
    raise SystemExit(main())
