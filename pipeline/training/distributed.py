"""Data-parallel plumbing for training jobs: the process group, gathers of ragged per-rank rows, local workers.

Plain ``torch.distributed``: backend ``nccl`` when the job trains on CUDA (one GPU per process, picked by
``LOCAL_RANK``), ``gloo`` on CPU. The group comes from the standard environment that ``torchrun`` sets
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), or from ``spawn``, which starts N
local processes with that environment itself (what ``--workers N`` does). Without that environment everything
here is a no-op for one process, so the same training code runs single-process, under torchrun and spawned.

Per-rank batches may differ in size (a global batch that does not split evenly, samples that fail to decode),
so the gathers here pad to the largest rank, gather, and trim. ``all_gather_rows_with_grad`` keeps the autograd
graph across ranks (its backward sums the gradients every rank's loss puts on each rank's rows, as open_clip's
``gather_with_grad``): a contrastive loss over the gathered batch then has the gradients of the single-process
loss.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import socket
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from pipeline.logs import setup_logging

log = logging.getLogger(__name__)

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
TIMEOUT = datetime.timedelta(minutes=30)  # a rank that waits longer for the others than this fails, naming the op


class DistributedError(RuntimeError):
    """The process group cannot be set up as asked; the message says why and what to do."""


@dataclass(frozen=True)
class Dist:
    """Where this process stands in the data-parallel group (rank 0 of 1 when there is no group)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Return True on the one process that writes outputs, logs progress and prints."""
        return self.rank == 0


def current() -> Dist:
    """Return this process's place in the initialised default group, or Dist() without one."""
    if not (dist.is_available() and dist.is_initialized()):
        return Dist()
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))


def env_world_size() -> int:
    """Return WORLD_SIZE from the environment (torchrun sets it), 1 when unset."""
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"WORLD_SIZE={value!r} in the environment is not an integer") from None


def backend_for(device: str) -> str:
    return "nccl" if device.startswith("cuda") else "gloo"


@contextlib.contextmanager
def process_group(device: str) -> Iterator[tuple[Dist, str]]:
    """Yield (Dist, this process's device) inside the group the environment describes; tear it down after.

    ``device`` is "cpu" or "cuda"; under a group on CUDA each process takes GPU ``LOCAL_RANK``. With no
    WORLD_SIZE (or 1) in the environment, or a group already initialised by the caller, nothing is set up.
    """
    world = env_world_size()
    if world <= 1 or dist.is_initialized():
        d = current()
        yield d, device_of_rank(device, d)
        return
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise DistributedError(f"WORLD_SIZE={world} but {', '.join(missing)} not set: start the job with "
                               f"`torchrun --nproc-per-node N -m jobs.<job> ...` or use its --workers option")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    d = Dist(rank, world, local_rank)
    device = device_of_rank(device, d)
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    dist.init_process_group(backend_for(device), timeout=TIMEOUT,
                            **({"device_id": torch.device(device)} if device.startswith("cuda") else {}))
    if rank != 0:  # one voice: the other ranks only warn
        for ours in ("pipeline", "jobs", "icar"):
            logging.getLogger(ours).setLevel(max(logging.WARNING, logging.getLogger(ours).getEffectiveLevel()))
    log.info("process group: %d processes, backend %s, rank 0 on %s", world, backend_for(device), device)
    try:
        yield d, device
    finally:
        dist.destroy_process_group()


def device_of_rank(device: str, d: Dist) -> str:
    """Return the device of process ``d`` for a job on ``device``: GPU LOCAL_RANK under a group on CUDA."""
    if not device.startswith("cuda") or not d.enabled:
        return device
    n = torch.cuda.device_count()
    if d.local_rank >= n:
        raise DistributedError(f"local rank {d.local_rank} has no GPU: this node has {n}; start at most {n} "
                               f"processes per node (torchrun --nproc-per-node {n})")
    return f"cuda:{d.local_rank}"


# ----------------------------------------------------------------------------------------------- collectives

def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def broadcast_object(d: Dist, obj: Any) -> Any:
    """Return rank 0's ``obj`` on every rank."""
    if not d.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_objects(d: Dist, obj: Any) -> list:
    """Return every rank's ``obj`` (picklable), in rank order."""
    if not d.enabled:
        return [obj]
    out = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


def all_sum(d: Dist, t: torch.Tensor) -> torch.Tensor:
    """Return the element-wise sum of ``t`` over ranks (a new tensor; ``t`` is left alone)."""
    t = t.detach().clone()
    if d.enabled:
        dist.all_reduce(t)
    return t


def gather_sizes(d: Dist, n: int, device: str | torch.device = "cpu") -> list[int]:
    """Return every rank's row count ``n``, in rank order."""
    if not d.enabled:
        return [n]
    local = torch.tensor([n], dtype=torch.int64, device=device)
    out = [torch.zeros_like(local) for _ in range(d.world_size)]
    dist.all_gather(out, local)
    return [int(x) for x in out]


def _padded(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_zeros((rows - t.shape[0],) + tuple(t.shape[1:]))])


def all_gather_rows(d: Dist, t: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
    """Return the rows of ``t`` of every rank concatenated in rank order (no gradient); rows may differ per rank.

    ``sizes``: every rank's row count when known already (saves a collective). The tensors travel on ``t``'s
    device (a CUDA device under nccl).
    """
    if not d.enabled:
        return t
    sizes = sizes if sizes is not None else gather_sizes(d, t.shape[0], t.device)
    rows = max(sizes)
    if rows == 0:
        return t.new_zeros((0,) + tuple(t.shape[1:]))
    out = [t.new_empty((rows,) + tuple(t.shape[1:])) for _ in range(d.world_size)]
    dist.all_gather(out, _padded(t.detach().contiguous(), rows))
    return torch.cat([o[:n] for o, n in zip(out, sizes)])


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward hands each rank the sum over ranks of the gradients of its rows."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(out, t.contiguous())
        return torch.stack(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)  # every rank's loss touches every rank's rows (embeddings: small, so no reduce-scatter)
        return grad[dist.get_rank()]


def all_gather_rows_with_grad(d: Dist, t: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Return the rows of every rank concatenated in rank order, differentiable with respect to every rank's ``t``.

    Every rank must call backward through the result (the backward is a collective too).
    """
    if not d.enabled:
        return t
    parts = _AllGatherWithGrad.apply(_padded(t, max(sizes)))
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


def split_sizes(n: int, world_size: int) -> list[int]:
    """Return how ``n`` rows split over ranks: contiguous blocks, the first ``n % world_size`` one row longer."""
    q, r = divmod(n, world_size)
    return [q + (1 if i < r else 0) for i in range(world_size)]


# ----------------------------------------------------------------------------------------------- local workers

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, threads: int, fn: Callable, args: tuple) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if threads:
        torch.set_num_threads(threads)
    setup_logging()
    fn(*args)
    # Done, and the group (``process_group``) destroyed: leave without the interpreter's teardown. Under load a
    # spawned rank sometimes aborted there ("terminate called without an active exception": a native thread
    # object destroyed while joinable), turning a finished job into SIGABRT. Errors never reach this line: they
    # propagate to mp.spawn as before.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(fn: Callable, args: tuple, nprocs: int, device: str) -> None:
    """Run ``fn(*args)`` in ``nprocs`` new local processes forming one group (what torchrun does on one node).

    ``fn`` must be importable by name (a module-level function). On CPU each process gets an equal share of
    the cores as torch threads. When any process fails the others are stopped and the failure is raised here.
    """
    if nprocs < 1:
        raise DistributedError(f"workers must be >= 1, got {nprocs}")
    if env_world_size() > 1:
        raise DistributedError(f"already one of {env_world_size()} processes (WORLD_SIZE is set, e.g. by "
                               f"torchrun): use torchrun's --nproc-per-node or --workers, not both")
    if device.startswith("cuda") and nprocs > torch.cuda.device_count():
        raise DistributedError(f"{nprocs} workers on CUDA need {nprocs} GPUs, this node has "
                               f"{torch.cuda.device_count()}")
    threads = 0 if device.startswith("cuda") else max(1, (os.cpu_count() or 1) // nprocs)
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(nprocs, free_port(), threads, fn, args), nprocs=nprocs, join=True)
