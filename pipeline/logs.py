"""Logging set-up shared by every job: plain lines for people, JSON lines for schedulers.

A leaf of the package, so library code that starts processes of its own (multi-process training) sets up
logging the same way as the `icar` command without importing the command.
"""

from __future__ import annotations

import logging
import os
import sys


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
