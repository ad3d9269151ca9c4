"""The `icar` command: dispatches `icar <job> ...` to the job module jobs/<job>.py, which parses and calls pipeline/."""

from __future__ import annotations

import importlib
import logging
import os
import sys

# job name -> (module, one-line help). Every job is also `python -m jobs.<module>` (and `ray job submit -- ...`).
JOBS = {
    "embed": ("jobs.embed", "embed image shards into a run directory (scorer, router, early-exit CLIP) on Ray"),
    "index": ("jobs.index", "build a FAISS IVF-PQ index directory from one or more runs"),
    "search": ("jobs.search", "query an index with text or an image"),
    "report": ("jobs.report", "cost report: GFLOPs spent vs full depth, exit mix, throughput, cost"),
    "reindex": ("jobs.reindex", "scheduled incremental embed + versioned index from a YAML job config"),
    "calibrate": ("jobs.calibrate", "pick router thresholds for a GFLOP budget or a recall floor"),
    "train-exits": ("jobs.train_exits", "train early-exit heads (dual-path: contrastive + distillation)"),
    "train-complexity": ("jobs.train_complexity", "train a ConvNeXt-IC complexity scorer on IC9600-layout data"),
    "eval-complexity": ("jobs.eval_complexity", "evaluate a complexity scorer: PLCC, SRCC, RMSE, MAE, images/s"),
    "train-scorer": ("jobs.train_scorer", "retrain the shipped default complexity scorer from SAVOIAS (ImageNet MobileNetV2)"),
    "make-demo-corpus": ("jobs.make_demo_corpus", "write the seeded synthetic demo corpus (WebDataset shards)"),
    "train-demo": ("jobs.train_demo", "retrain the shipped demo CLIP from the demo corpus"),
}


def usage() -> str:
    """Return the top-level help text."""
    width = max(map(len, JOBS))
    lines = ["usage: icar <job> [options]   (icar <job> --help for a job's options)", "", "jobs:"]
    for name, (module, text) in JOBS.items():
        available = importlib.util.find_spec(module) is not None
        lines.append(f"  {name:<{width}}  {text}" + ("" if available else "  [not in this build]"))
    return "\n".join(lines)


class _StderrHandler(logging.StreamHandler):
    """A handler that writes to whatever ``sys.stderr`` is when a record is emitted, not when it was made.

    A process that swaps ``sys.stderr`` (a test harness capturing output, a daemon redirecting it) would
    otherwise leave the handler writing to a closed stream, and every later record would print a
    '--- Logging error ---' traceback instead of the message.
    """

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ assigns it; the current sys.stderr always wins
        pass


def setup_logging() -> None:
    """Configure logging: plain lines for people, JSON lines when ICAR_LOG_FORMAT=json (schedulers).

    Idempotent: a second call replaces the handler the first one added and leaves other handlers (a test
    harness's, an embedding application's) alone.
    """
    level = os.environ.get("ICAR_LOG_LEVEL", "INFO").upper()
    handler = _StderrHandler()
    if os.environ.get("ICAR_LOG_FORMAT", "").lower() == "json":
        import json

        class JsonFormatter(logging.Formatter):
            def format(self, record):
                return json.dumps({"ts": self.formatTime(record), "level": record.levelname,
                                   "logger": record.name, "message": record.getMessage()})

        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    # Our own loggers at the asked level; libraries (open_clip logs to the root logger) only warn.
    for ours in ("pipeline", "jobs", "icar"):
        logging.getLogger(ours).setLevel(level)
    for noisy in ("botocore", "s3fs", "aiobotocore", "urllib3", "fsspec", "werkzeug", "PIL", "faiss"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    """Run `icar <job> ...`; return the job's exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(f"icar {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in JOBS:
        print(f"icar: unknown job {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    setup_logging()
    module = importlib.import_module(JOBS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
