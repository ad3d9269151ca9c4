"""Where a build's sample and add work runs: in this process (one worker) or as Ray tasks, the same functions.

The build's only Ray code: it starts or joins Ray, keeps at most ``concurrency`` tasks in flight, and ships
the driver's credentials to each task as an argument (never in runtime_env, which Ray logs).
"""

from __future__ import annotations

import logging
import os
import sys

from pipeline.runtime import apply_secrets, forwarded_env, forwarded_secrets

log = logging.getLogger(__name__)


def _with_secrets(secrets: dict[str, str], fn, *args):
    """Ray task: put the driver's credentials into this worker's environment, then return ``fn(*args)``."""
    apply_secrets(secrets)
    return fn(*args)


class Runner:
    """Runs add/sample work in this process (one worker) or as Ray tasks; the same functions either way."""

    def __init__(self, cfg):  # an IndexConfig (build.py imports this module)
        self.cfg = cfg
        self.ray = None
        self.started_ray = False
        self.workers = 1  # add groups to form (at least)
        self.concurrency = 1  # tasks in flight at once
        self.runtime_env = None
        self.secrets: dict[str, str] = {}
        if cfg.workers == 1 and not cfg.resolved_address():
            return
        import ray  # lazy: a one-worker build never starts Ray, and importing it costs seconds

        self.ray = ray
        if not ray.is_initialized():
            address = cfg.resolved_address()
            if address:
                log.info("joining Ray cluster at %s", address)
                ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
            else:
                cpus = os.cpu_count() or 1
                log.info("starting an embedded local Ray (%d CPUs)", cpus)
                os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
                # address="local": never attach to some other Ray that happens to run on this machine.
                ray.init(address="local", num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING,
                         log_to_driver=True)
            self.started_ray = True
        cluster_cpus = int(ray.cluster_resources().get("CPU", 1))
        if not cfg.resolved_address():
            cluster_cpus = min(cluster_cpus, os.cpu_count() or 1)  # never more tasks than this machine has cores
        wanted = cfg.workers or cluster_cpus
        if wanted > cluster_cpus:
            log.warning("--add-tasks %d but the cluster has %d CPUs: running %d add tasks at a time",
                        wanted, cluster_cpus, cluster_cpus)
        self.workers = max(1, wanted)
        self.concurrency = max(1, min(wanted, cluster_cpus))
        env = forwarded_env()
        self.runtime_env = {"env_vars": env} if env else None
        # Credentials travel as a task argument, never in runtime_env (Ray writes that to its logs).
        self.secrets = forwarded_secrets()

    def map(self, fn, calls: list[tuple], desc: str, unit_sizes: list[int] | None = None) -> list:
        """Return fn(*args) for each args tuple in ``calls``, in order; tasks when on Ray."""
        bar = None
        if self.cfg.progress and len(calls) > 0:
            from tqdm.auto import tqdm  # lazy: only with progress bars

            bar = tqdm(total=sum(unit_sizes) if unit_sizes else len(calls), desc=desc, unit="vec" if unit_sizes
                       else "task", file=sys.stderr, dynamic_ncols=True, unit_scale=True, leave=False)
        results: list = [None] * len(calls)
        try:
            if self.ray is None:
                for i, args in enumerate(calls):
                    results[i] = fn(*args)
                    if bar:
                        bar.update(unit_sizes[i] if unit_sizes else 1)
                return results
            ray = self.ray
            # Named after fn: the dashboard, `ray list tasks` and the worker's process title show ray::add_group.
            remote = ray.remote(_with_secrets).options(name=fn.__name__, num_cpus=1, retry_exceptions=True,
                                                       max_retries=self.cfg.task_retries, runtime_env=self.runtime_env)
            pending = {}
            queue = list(enumerate(calls))
            # At most `concurrency` tasks in flight: bounded memory on every node, and no task waits holding args.
            while queue or pending:
                while queue and len(pending) < self.concurrency:
                    i, args = queue.pop(0)
                    pending[remote.remote(self.secrets, fn, *args)] = i
                done, _ = ray.wait(list(pending), num_returns=1, timeout=self.cfg.task_timeout_s)
                if not done:
                    raise TimeoutError(f"{desc}: no task finished within {self.cfg.task_timeout_s:.0f}s "
                                       f"(--task-timeout); {len(pending)} still running")
                for ref in done:
                    i = pending.pop(ref)
                    results[i] = ray.get(ref)
                    if bar:
                        bar.update(unit_sizes[i] if unit_sizes else 1)
            return results
        finally:
            if bar:
                bar.close()

    def put(self, value):
        """Return a handle to ``value`` for task arguments (an object-store ref on Ray: shipped once)."""
        return self.ray.put(value) if self.ray is not None else value

    def close(self) -> None:
        if self.started_ray:
            self.ray.shutdown()
