"""Logging shared by every job: plain lines for people, JSON lines for schedulers, and timed phases.

A leaf of the package, so library code that starts processes of its own (multi-process training) sets up
logging the same way as the `icar` command without importing the command, and every stage times its
phases with one helper (``timed_phase``).
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


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
    plain_worker_prefixes()
    # Our own loggers at the asked level; libraries (open_clip logs to the root logger) only warn.
    for ours in ("pipeline", "jobs", "icar"):
        logging.getLogger(ours).setLevel(level)
    for noisy in ("botocore", "s3fs", "aiobotocore", "urllib3", "fsspec", "werkzeug", "PIL", "faiss"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def plain_worker_prefixes() -> None:
    """Keep colour codes out of Ray's worker-log prefixes ("(ModelActor pid=...)") when stdout or stderr is a file
    or a pipe: Ray reads $RAY_COLOR_PREFIX each time it prints a worker's line in the driver. A terminal keeps
    the colours, and a value the user set wins."""
    if not (_is_terminal(sys.stderr) and _is_terminal(sys.stdout)):
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no stream, or a closed one
        return False


class Phase:
    """One timed phase: ``seconds`` (unrounded) is set when the phase ends, also when it raised."""

    def __init__(self, name: str):
        self.name = name
        self.seconds: float | None = None


@contextmanager
def timed_phase(name: str, into: dict | None = None, logger: logging.Logger | None = None,
                note: Callable[[], str] | None = None) -> Iterator[Phase]:
    """Yield a Phase that holds the duration of the ``with`` block once it ends (also when it raises).

    ``into``: the caller's record (index.json's build_seconds, a reindex record's phases) gets
    ``into[name] = seconds`` rounded to milliseconds. ``logger``: logs "<name> ..." at the start and
    "<name> took 1.2s" at the end, with " (<note()>)" appended when ``note`` is given (e.g. the peak RSS).
    Without a logger nothing is logged: the caller words its own line from ``Phase.seconds``.
    """
    phase = Phase(name)
    t0 = time.perf_counter()
    if logger is not None:
        logger.info("%s ...", name)
    try:
        yield phase
    finally:
        phase.seconds = time.perf_counter() - t0
        rounded = round(phase.seconds, 3)
        if into is not None:
            into[name] = rounded
        if logger is not None:
            if note is not None:
                logger.info("%s took %.1fs (%s)", name, rounded, note())
            else:
                logger.info("%s took %.1fs", name, rounded)


def peak_rss_bytes() -> int:
    """Return this process's peak resident set size in bytes.

    Linux: VmHWM, which starts afresh at exec (ru_maxrss keeps the parent's peak across fork+exec, so a
    job started by a big process would report the parent's memory).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(kb * (1 if sys.platform == "darwin" else 1024))
