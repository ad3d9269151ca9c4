"""The process and cluster runtime every job shares: the device and precision a job computes in, joining Ray, forwarding
storage settings to workers, and turning SIGTERM into an orderly stop with the exit code a shell expects.

A leaf of the package (it imports nothing else of ``pipeline``), so embed, index and reindex use one copy.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)


# Standard AWS settings forwarded from the driver to tasks and actors in their runtime environment, so workers
# reach the same endpoint however the Ray instance was started. Ray writes every runtime_env to its own logs
# (runtime_env_agent.log) and shows it in the dashboard, so no secret may be among these.
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE",
                 "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "ICAR_CACHE_DIR", "ICAR_TORCH_THREADS",
                 "ICAR_CPU_KERNELS")


# Credentials travel as task and actor arguments instead (held in the object store, never logged); each worker
# puts them into its own environment before it touches storage. Nodes with their own credentials (instance
# roles, IRSA) need none of this: with no such variable set on the driver, nothing is sent.
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def forwarded_env() -> dict[str, str]:
    """Return the driver's environment variables that workers must share (storage, cache, model actor settings;
    no secrets): a local Ray's workers inherit the driver's environment, a cluster's do not."""
    return {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}


def forwarded_secrets() -> dict[str, str]:
    """Return the driver's credentials from the environment, for workers (as arguments, never in runtime_env)."""
    return {k: os.environ[k] for k in SECRET_ENV if os.environ.get(k)}


def apply_secrets(secrets: dict[str, str] | None) -> None:
    """Put the driver's credentials into this worker process's environment, where S3 clients look for them."""
    for k, v in (secrets or {}).items():
        os.environ[k] = v


DEVICES = "auto, cpu, cuda or cuda:N"  # what --device accepts, in every job
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


class DeviceUnavailableError(ValueError):
    """The --device asked for does not exist on this machine (no CUDA, or no GPU of that number)."""


def parse_device(device: str) -> str:
    """Return ``device`` in its canonical form (auto, cpu, cuda or cuda:N) without asking torch; raise ValueError
    naming the accepted forms for anything else (what the CLI checks before a job starts)."""
    name = str(device).strip().lower()
    if not _DEVICE.match(name):
        raise ValueError(f"--device {device!r} is not a device ICAR computes on; use {DEVICES} (e.g. cuda:1)")
    return name


def resolve_device(device: str) -> str:
    """Return the torch device that ``device`` (auto, cpu, cuda or cuda:N) stands for on this machine.

    "auto" is CUDA when torch sees a GPU, else the CPU. Raises ValueError for anything else than those four
    forms, and DeviceUnavailableError (a ValueError) for a CUDA device this machine does not have.
    """
    name = parse_device(device)
    if name == "cpu":
        return name
    # Lazy: this module is imported by every job's driver, and drivers that never compute (embed's, --help,
    # refusals) must not pay torch's import (~1.3 s, ~550 MiB of RSS).
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available():
        raise DeviceUnavailableError(f"--device {name} was asked for but torch sees no CUDA device here; "
                                     "use --device cpu (or auto)")
    count = torch.cuda.device_count()
    if ":" in name and int(name.split(":", 1)[1]) >= count:
        raise DeviceUnavailableError(f"--device {name} was asked for but torch sees {count} CUDA device(s) here "
                                     f"(cuda:0..cuda:{count - 1}); pick one of them, or --device cpu")
    return name


PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # what --precision accepts, in every job that computes embeddings

# /proc/cpuinfo flags of x86 CPUs that compute bfloat16 dot products in hardware (AVX512_BF16: AMD Zen 4+, Intel
# Cooper Lake and Sapphire Rapids+; AMX_BF16: Intel Sapphire Rapids+). Without them oneDNN emulates bfloat16 with
# fp32 arithmetic plus conversions, slower than fp32 itself.
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclass(frozen=True)
class PrecisionChoice:
    """The precision a model computes in, and why (what run.json records and the worker logs once)."""

    precision: str  # fp32 | bf16 | fp16: what the model computes in
    requested: str  # what was asked for (auto or one of the above)
    reason: str  # one line: why this precision


def native_bf16_flags(cpuinfo: str) -> list[str]:
    """Return the flags among NATIVE_BF16_FLAGS that /proc/cpuinfo text ``cpuinfo`` lists (its first "flags" line)."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            flags = set(value.split())
            return [f for f in NATIVE_BF16_FLAGS if f in flags]
    return []


def read_cpuinfo() -> str:
    """Return this machine's /proc/cpuinfo text, or "" where there is none (not Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def resolve_precision(precision: str, device: str, cpuinfo: str | None = None,
                      cuda_bf16: bool | None = None) -> PrecisionChoice:
    """Return the precision a model on torch device ``device`` computes in for ``--precision precision``.

    "auto" is bf16 where the hardware computes it natively, else fp32: on a CPU, when ``cpuinfo`` (this machine's
    /proc/cpuinfo when None) lists avx512_bf16 or amx_bf16; on CUDA, when the GPU supports bf16 (``cuda_bf16``;
    torch is asked when None). fp32, bf16 and fp16 are taken as given. Raises ValueError naming the choices.
    """
    name = str(precision).strip().lower()
    if name not in PRECISIONS:
        raise ValueError(f"--precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if name != "auto":
        return PrecisionChoice(name, name, "asked for")
    if str(device).startswith("cuda"):
        if cuda_bf16 is None:
            import torch  # lazy: see resolve_device

            cuda_bf16 = bool(torch.cuda.is_bf16_supported())
        if cuda_bf16:
            return PrecisionChoice("bf16", name, f"{device} supports bfloat16")
        return PrecisionChoice("fp32", name, f"{device} lacks bfloat16 support")
    flags = native_bf16_flags(read_cpuinfo() if cpuinfo is None else cpuinfo)
    if flags:
        return PrecisionChoice("bf16", name, f"the CPU computes bfloat16 natively ({', '.join(flags)})")
    return PrecisionChoice("fp32", name, f"the CPU has no native bfloat16 ({' or '.join(NATIVE_BF16_FLAGS)} absent "
                                         f"from /proc/cpuinfo): bfloat16 would be emulated, slower than fp32")


def init_ray(address: str | None):
    """Join the cluster at ``address``, or start an embedded local Ray sized to this machine; return ray."""
    # Lazy: Ray takes ~0.3 s to import and sets up its own logging; jobs pay it only when they start a run,
    # not for --help, argument refusals or the jobs that never use a cluster.
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return ray
    if address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
    else:
        # One CPU beyond the cores, so the model actor's reservation never leaves read/decode tasks without
        # a slot on a 2-core machine (Ray would otherwise wait forever; seen with Ray 2.60).
        cpus = (os.cpu_count() or 2) + 1
        log.info("starting an embedded local Ray (%d CPUs)", cpus)
        # address="local": never attach to some other Ray that happens to run on this machine.
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING,
                 log_to_driver=True)
    return ray


EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), as shells report it


EXIT_TERMINATED = 143  # SIGTERM (128 + SIGTERM): a scheduler's stop


# Set by the SIGTERM handler below. The handler's Terminated does not always reach the caller as itself: raised
# while the driver waits inside Ray (ray.wait, ray.get), Ray turns it into a plain KeyboardInterrupt, so the
# signal that arrived is kept here and read by ``stop_reason``.
_sigterm_received = False


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's stop, `kill`) received by the driver during a run: it stops like Ctrl-C does."""


@dataclass(frozen=True)
class StopReason:
    """How a run was stopped from outside: the exit code a shell reports and the words for it."""

    exit_code: int  # EXIT_TERMINATED or EXIT_INTERRUPTED
    status: str  # "terminated" | "interrupted"
    signal: str  # "SIGTERM" | "Ctrl-C"

    @property
    def terminated(self) -> bool:
        return self.exit_code == EXIT_TERMINATED

    @property
    def words(self) -> str:
        """Return how a job's last line says it stopped: "terminated (SIGTERM)" or "interrupted"."""
        return f"{self.status} ({self.signal})" if self.terminated else self.status


def stop_reason(e: KeyboardInterrupt) -> StopReason:
    """Return how the run that ``e`` stopped was stopped: terminated (143) when SIGTERM reached the driver's
    handler, whatever exception type came out of Ray, else interrupted (130, Ctrl-C). Reading it forgets the
    SIGTERM, so a later run in the same process starts clean."""
    global _sigterm_received
    terminated = isinstance(e, Terminated) or _sigterm_received
    _sigterm_received = False
    if terminated:
        return StopReason(EXIT_TERMINATED, "terminated", "SIGTERM")
    return StopReason(EXIT_INTERRUPTED, "interrupted", "Ctrl-C")


def sigterm_as_interrupt() -> Callable[[], None]:
    """Make SIGTERM raise ``Terminated`` in the main thread; return the function that restores the old handler.

    Python's default SIGTERM exits without unwinding and Ray's driver handler logs and exits, so the commit loop's
    ``finally`` would neither record the commits the manifest holds back (they would be redone as orphans) nor
    stop the actors, nor release the output's lock. The restore function puts the old handler back only while
    this one is still installed: a handler installed meanwhile (ray.init's) is left in place. Off the main thread
    (where signals cannot be handled) this does nothing.
    """
    global _sigterm_received
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    _sigterm_received = False

    def handler(signum, frame):
        global _sigterm_received
        _sigterm_received = True
        raise Terminated(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)

    def restore() -> None:
        if signal.getsignal(signal.SIGTERM) is handler:
            signal.signal(signal.SIGTERM, previous)

    return restore
