"""How a reindex run ends: the exit codes a scheduler can act on, and the exceptions that carry them."""

from __future__ import annotations

from pipeline.runtime import (  # chosen by runtime.stop_reason, as for `icar embed`
    EXIT_INTERRUPTED,
    EXIT_TERMINATED,
)

# Exit codes a scheduler can act on (documented in `icar reindex --help` and the README).
EXIT_OK = 0
EXIT_SHARDS_FAILED = 1
EXIT_CONFIG = 2
EXIT_LOCKED = 4
EXIT_VERIFY = 5
EXIT_MODEL_CHANGED = 6
EXIT_SAFETY = 7
EXIT_ERROR = 8
EXIT_CODES = {
    EXIT_OK: "ok: LATEST is current (a new version was published, or nothing changed)",
    EXIT_SHARDS_FAILED: "some input shards failed after retries; the index was built from the rest and published",
    EXIT_CONFIG: "config or input error (bad field, inputs match nothing, index budget impossible): fix the config",
    EXIT_LOCKED: "another run holds the root's lock (or took it over from this run): nothing was written",
    EXIT_VERIFY: "the new index failed verification: LATEST was not moved; the version is kept for inspection",
    EXIT_MODEL_CHANGED: "the model/exits/heads/router/scorer differ from the root's generation and "
                        "on_model_change is refuse: nothing was written",
    EXIT_SAFETY: "more inputs disappeared than max_retire_fraction allows: nothing was retired or written",
    EXIT_ERROR: "unexpected error (see the log and the reindex-log record)",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C): the lock was released; committed shards are kept and the next run "
                      "resumes; LATEST was not moved unless the publish step had finished",
    EXIT_TERMINATED: "terminated (SIGTERM): the lock was released; committed shards are kept and the next run "
                     "resumes; LATEST was not moved unless the publish step had finished",
}


class ReindexError(RuntimeError):
    """A run stopped for a reason a scheduler can act on; ``exit_code`` says which (EXIT_CODES)."""

    exit_code = EXIT_ERROR


class VerificationError(ReindexError):
    """A built index did not pass verification; ``problems`` lists why, ``checks`` what was measured."""

    exit_code = EXIT_VERIFY

    def __init__(self, where: str, problems: list[str], checks: dict):
        super().__init__(f"{where} failed verification: " + "; ".join(problems))
        self.problems = problems
        self.checks = checks


class ModelChangedError(ReindexError):
    """The configured model differs from the generation's and the job is configured to refuse."""

    exit_code = EXIT_MODEL_CHANGED


class SafetyStop(ReindexError):
    """Too many inputs disappeared at once to retire them without a person looking."""

    exit_code = EXIT_SAFETY
