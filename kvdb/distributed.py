"""torch.distributed for `kvdb build` and `kvdb train` under torchrun: who this process is, and the few collectives
they need. Outside torchrun (no ``WORLD_SIZE`` above 1) every helper is a no-op on one rank, so library code calls
them unconditionally and single-process behaviour is unchanged.

The process group carries CPU tensors over gloo always, and CUDA tensors over NCCL when every rank has a GPU of its
own (``cpu:gloo,cuda:nccl``): counts, plans and metrics are exchanged on the CPU, DDP's gradients on the device.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from kvdb.errors import ConfigError, DistributedError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rank:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a whole number; run under torchrun, or unset it") from None


def from_env() -> Rank:
    """This process's place as torchrun describes it (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE)."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} and WORLD_SIZE={world} do not fit (need 0 <= RANK < WORLD_SIZE); run under "
                          "torchrun, or unset them")
    local_world = _env_int("LOCAL_WORLD_SIZE", world)
    local_rank = _env_int("LOCAL_RANK", rank)
    return Rank(rank, world, local_rank, max(1, local_world))


def current() -> Rank:
    """The rank of this process in the active process group ((0, 1) when there is none)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        env = from_env()
        return Rank(dist.get_rank(), dist.get_world_size(), env.local_rank, env.local_world)
    return Rank()


def device_for(me: Rank, preference: str = "auto") -> str:
    """The device a rank should use: ``cuda:LOCAL_RANK`` when the preference is auto (or plain cuda) and CUDA is
    there; the preference itself otherwise (cpu, or an explicit cuda:N)."""
    if preference in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{me.local_rank % torch.cuda.device_count()}"
    return "cpu" if preference == "auto" else preference


def _threads_per_rank(me: Rank) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // me.local_world)


def _user_set_threads() -> bool:
    """Whether the user chose OMP_NUM_THREADS. torchrun sets it to 1 itself when it is unset (in its own process,
    after it started), so a value the launcher's start-up environment lacks is torchrun's default, not a choice."""
    if "OMP_NUM_THREADS" not in os.environ:
        return False
    try:
        with open(f"/proc/{os.getppid()}/environ", "rb") as f:
            return b"OMP_NUM_THREADS=" in f.read()
    except OSError:
        return True


@contextlib.contextmanager
def session(timeout_s: float = 1800.0) -> Iterator[Rank]:
    """Initialise the process group when WORLD_SIZE > 1 (torchrun), yield this rank, and tear the group down.

    Each rank gets ``cores // local world size`` threads unless OMP_NUM_THREADS says otherwise: N ranks with all
    cores each would fight over them."""
    import datetime

    import torch.distributed as dist

    me = from_env()
    if not me.distributed or (dist.is_available() and dist.is_initialized()):
        yield current() if me.distributed else me
        return
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE is above 1 but this torch build has no torch.distributed; run one process")
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if missing:
        raise ConfigError(f"WORLD_SIZE={me.world} but {' and '.join(missing)} not set; start ranks with "
                          "`torchrun --nproc-per-node N -m kvdb ...`")
    if not _user_set_threads():
        torch.set_num_threads(_threads_per_rank(me))
    backend = "cpu:gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(me.local_rank % torch.cuda.device_count())
        # NCCL refuses two ranks on one GPU; with fewer GPUs than ranks gloo carries the CUDA tensors too.
        backend = "cpu:gloo,cuda:nccl" if dist.is_nccl_available() and \
            me.local_world <= torch.cuda.device_count() else "gloo"
    dist.init_process_group(backend=backend, rank=me.rank, world_size=me.world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    log.info("rank %d of %d joined the process group (%s)", me.rank, me.world, backend)
    try:
        yield me
    except BaseException:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
        raise
    # Leave together. A rank that finished early (rank 1 of a build, while rank 0 rebuilds the index) and tore its
    # gloo group down and exited while its peer still held the connection died now and then in gloo's teardown
    # ("terminate called without an active exception", SIGABRT; 1 run in 5 of test_distributed_build_is_incremental).
    # A peer that crashed instead closes its sockets, so this barrier fails at once rather than hanging.
    with contextlib.suppress(Exception):
        dist.barrier()
    with contextlib.suppress(Exception):
        dist.destroy_process_group()


@contextlib.contextmanager
def collective(what: str) -> Iterator[None]:
    """A collective that fails because a peer is gone becomes one sentence pointing at that peer's error."""
    try:
        yield
    except RuntimeError as exc:  # gloo's "Connection closed by peer", NCCL's DistBackendError, timeouts
        raise DistributedError(f"rank {current().rank}: {what} failed because another rank stopped or cannot be "
                               f"reached; its own error says why [{str(exc).splitlines()[0][:120]}]") from None


def _active() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    """Wait for every rank (no-op on one process)."""
    import torch.distributed as dist

    if _active():
        with collective("waiting for the other ranks"):
            dist.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first and the others after it: for work whose result the others then reuse instead of
    repeating it at the same time (converting a model, hashing files into the home's cache, base-model answers)."""
    me = current()
    if not me.is_main:
        barrier()
    yield
    if me.is_main:
        barrier()


def _all_reduce(values: list[float] | list[int], op: str, what: str) -> list[float]:
    import torch.distributed as dist

    if not _active():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    with collective(what):
        dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
    return t.tolist()


def all_reduce_sum(values: list[float] | list[int]) -> list[float]:
    """Element-wise sum of ``values`` over ranks (float64 on the CPU, over gloo)."""
    return _all_reduce(values, "SUM", "summing counts over ranks")


def all_reduce_max(values: list[float]) -> list[float]:
    """Element-wise maximum of ``values`` over ranks."""
    return _all_reduce(values, "MAX", "the maximum over ranks")


def broadcast(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (pickled, over gloo)."""
    import torch.distributed as dist

    if not _active():
        return obj
    box = [obj]
    with collective(f"receiving rank {src}'s data"):
        dist.broadcast_object_list(box, src=src, device=torch.device("cpu"))
    return box[0]


def all_gather(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (pickled, over gloo)."""
    import torch.distributed as dist

    if not _active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    with collective("gathering results from every rank"):
        dist.all_gather_object(out, obj)
    return out


def assign(costs: list[float], world: int) -> list[int]:
    """Rank of each job for a balanced load: longest first, each to the least-loaded rank (ties: the lowest rank).
    Deterministic, so every rank computes the same assignment from the same costs."""
    load = [0.0] * world
    owner = [0] * len(costs)
    for j in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[j] = r
        load[r] += costs[j]
    return owner
