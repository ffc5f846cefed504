"""Running `extract` and `predict` across processes, GPUs and nodes under `torchrun` (docs/scale.md).

torchrun (one agent per node; on SLURM, `srun` starts one torchrun per node) starts one process per
device and tells each its place through the environment: `RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
`LOCAL_WORLD_SIZE` and the rendezvous address (`MASTER_ADDR`/`MASTER_PORT`). Without those
variables iipad is one process of a world of one, and nothing here talks to the network.

The process group is only a control plane: ranks agree on the ordered work list, report success or
their first error, and wait for one another. Images, features and maps travel through the shared
filesystem, each rank writing its own files, so no tensor is ever sent between ranks. Work is split
into contiguous runs of whole batches (`shard_range`), so every rank forms exactly the batches one
process would have formed, and the concatenation of the shards in rank order is the input order.

torch is imported only where a process group or a device is needed, so the CLI can check a command
against the launch (`check_command`) without importing it.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from iipad_cli.errors import IipadError, UsageError  # UsageError: a command started in a way it does not support

if TYPE_CHECKING:
    import torch

T = TypeVar("T")

# The commands that split their work across ranks; every other command refuses WORLD_SIZE > 1.
DISTRIBUTED_COMMANDS = frozenset({"extract", "predict"})

# How long a rank waits for the others at a collective. A crashed or killed peer is noticed at once
# (its connection closes), so this only bounds a peer that hangs; a rank whose shard is much slower
# (a shared node, a slow disk) must not trip it.
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=24)



@dataclass(frozen=True)
class Launch:
    """This process's place among the processes torchrun started (a world of one without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node: int = 0  # torchrun's GROUP_RANK: which node (agent) started this process; rank 0 is on node 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the shared outputs (the merged CSV, features.h5, the manifest)."""
        return self.rank == 0

    def __str__(self) -> str:
        return f"rank {self.rank} of {self.world_size}"


def _int_variable(environ: Mapping[str, str], name: str, default: int) -> int:
    text = environ.get(name)
    if text is None or text.strip() == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise IipadError(f"environment variable {name}={text!r} is not an integer (set by torchrun)") from None


def launch_from_env(environ: Mapping[str, str] | None = None) -> Launch:
    """The launch described by torchrun's variables; a world of one when WORLD_SIZE is unset.

    LOCAL_WORLD_SIZE defaults to WORLD_SIZE (one node), LOCAL_RANK to RANK, GROUP_RANK (the node)
    to RANK // LOCAL_WORLD_SIZE (torchrun numbers ranks node by node). Inconsistent values are a
    one-line error rather than a hang at the first collective.
    """
    environ = os.environ if environ is None else environ
    world_size = _int_variable(environ, "WORLD_SIZE", 1)
    rank = _int_variable(environ, "RANK", 0)
    local_rank = _int_variable(environ, "LOCAL_RANK", rank)
    local_world_size = _int_variable(environ, "LOCAL_WORLD_SIZE", world_size)
    if world_size < 1:
        raise IipadError(f"environment variable WORLD_SIZE={world_size}: must be at least 1")
    if not 0 <= rank < world_size:
        raise IipadError(f"environment variable RANK={rank}: must be between 0 and WORLD_SIZE-1={world_size - 1}")
    if not 1 <= local_world_size <= world_size:
        raise IipadError(
            f"environment variable LOCAL_WORLD_SIZE={local_world_size}: must be between 1 and WORLD_SIZE={world_size}"
        )
    if not 0 <= local_rank < local_world_size:
        raise IipadError(
            f"environment variable LOCAL_RANK={local_rank}: must be between 0 and LOCAL_WORLD_SIZE-1={local_world_size - 1}"
        )
    node = _int_variable(environ, "GROUP_RANK", rank // local_world_size)
    if node < 0:
        raise IipadError(f"environment variable GROUP_RANK={node}: must be 0 or more")
    return Launch(rank=rank, world_size=world_size, local_rank=local_rank, local_world_size=local_world_size, node=node)


def check_command(command: str, launch: Launch) -> None:
    """Refuse a command that runs in one process when torchrun started several.

    `train`, `bank`, `score` and `metrics` work on one run's cached features in seconds to minutes;
    N copies of them would race on the same run directory, so they refuse instead of guessing.
    """
    if launch.distributed and command not in DISTRIBUTED_COMMANDS:
        supported = " and ".join(f"iipad {name}" for name in sorted(DISTRIBUTED_COMMANDS))
        raise UsageError(
            f"iipad {command} runs in one process, not under torchrun (WORLD_SIZE={launch.world_size}); "
            f"across ranks: {supported}"
        )


def shard_range(count: int, batch_size: int, rank: int, world_size: int) -> range:
    """The positions rank `rank` of `world_size` processes of an ordered list of `count` items.

    The list is cut into batches of `batch_size` (the last one shorter) exactly as one process would
    cut it, and each rank takes a contiguous run of whole batches, the runs differing by at most one
    batch. So shards are disjoint, cover the list, depend only on (count, batch_size, rank,
    world_size), and concatenated in rank order give the list back in order. A rank may get none.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside a world of {world_size}")
    batches = -(-count // batch_size)
    first = batches * rank // world_size
    last = batches * (rank + 1) // world_size
    return range(min(first * batch_size, count), min(last * batch_size, count))


def rank_device(name: str, launch: Launch) -> torch.device:
    """`--device` for this rank: with several ranks, `auto`/`cuda` mean `cuda:LOCAL_RANK`.

    An explicit `cuda:N` is kept as given (every rank on that GPU).
    """
    import torch

    from iipad_cli.devices import resolve_device

    device = resolve_device(name)
    if device.type != "cuda" or device.index is not None or not launch.distributed:
        return device
    count = torch.cuda.device_count()
    if launch.local_rank >= count:
        raise IipadError(
            f"LOCAL_RANK={launch.local_rank} but this node has {count} CUDA device(s); "
            f"start at most {count} processes per node (--nproc-per-node)"
        )
    return torch.device("cuda", launch.local_rank)


def _backend(device: torch.device) -> str:
    """gloo on CPUs; on GPUs gloo for the control messages (Python objects in CPU memory, which
    then never wait on a GPU stream) and NCCL for any collective on a CUDA tensor."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


class Group:
    """The collectives iipad uses; every call is a no-op in a world of one.

    Each collective turns a lost peer (gloo reports "Connection closed by peer") into a one-line
    IipadError instead of a traceback.
    """

    def __init__(self, launch: Launch) -> None:
        self.launch = launch

    def _all_gather(self, value: Any) -> list[Any]:
        if not self.launch.distributed:
            return [value]
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.launch.world_size
        try:
            dist.all_gather_object(gathered, value)
        except RuntimeError as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise IipadError(f"{self.launch}: lost contact with another rank (crashed or killed?): {first_line}") from None
        return gathered

    def gather(self, value: T) -> list[T]:
        """Every rank's `value`, in rank order, on every rank (also a barrier)."""
        return self._all_gather(value)

    def barrier(self) -> None:
        self._all_gather(None)

    def collectively(self, step: Callable[[], T]) -> T:
        """Run `step` on every rank; when it raises an IipadError on any rank, raise on every rank.

        Without this, a rank whose step failed would exit while the others wait at the next
        collective. The error names the rank it came from.
        """
        result: T | None = None
        message: str | None = None
        try:
            result = step()
        except IipadError as error:
            message = str(error)
        self.raise_first(self._all_gather(message))
        return result  # type: ignore[return-value]

    def raise_first(self, messages: Sequence[str | None]) -> None:
        """Raise the first error of the ranks' gathered `messages` (None: no error), naming its rank.

        Every rank calls it with the same gathered list, so all of them raise, or none.
        """
        for rank, text in enumerate(messages):
            if text is not None:
                prefix = f"rank {rank} of {self.launch.world_size}: " if self.launch.distributed else ""
                raise IipadError(prefix + text)

    def from_main(self, step: Callable[[], T]) -> T:
        """`step` computed on rank 0 only and handed to every rank (e.g. one listing of the input
        folders, so all ranks shard the same list even while files appear)."""
        value: T | None = None
        message: str | None = None
        if self.launch.is_main:
            try:
                value = step()
            except IipadError as error:
                message = str(error)
        gathered = self._all_gather((value, message) if self.launch.is_main else None)
        value, message = gathered[0]
        if message is not None:
            raise IipadError(message)
        return value  # type: ignore[return-value]


class _Sigterm:
    """What SIGTERM does in a rank: torchrun stops the other workers with it when one fails (and
    SIGKILLs them 30 s later). Exiting through SystemExit instead of dying at once runs every
    `with`/`finally` on the way out, so a rank's finished batches are sealed into the feature store
    and its temporary files go. While `held`, the exit waits for the next batch boundary."""

    held = False
    arrived = False

    @classmethod
    def handle(cls, signum: int, frame: object) -> None:
        if cls.held:
            cls.arrived = True
            return
        raise SystemExit(128 + signum)

    @classmethod
    def check(cls) -> None:
        if cls.arrived:
            cls.arrived = False
            raise SystemExit(128 + signal.SIGTERM)


def _keep_going() -> None:
    """The check of a world of one, where SIGTERM keeps its default meaning."""


@contextlib.contextmanager
def stop_between_batches(launch: Launch) -> Iterator[Callable[[], None]]:
    """Under torchrun, hold SIGTERM while a rank works and yield the check to call between batches.

    SIGTERM handled at once could land inside a store write and cost the rank its open segment;
    held, it ends the rank at the next batch boundary (or when the block ends), with every
    finished batch sealed into the store. A batch takes seconds, well inside the 30 s torchrun
    waits before SIGKILL.
    """
    if not launch.distributed:
        yield _keep_going
        return
    _Sigterm.held = True
    try:
        yield _Sigterm.check
    finally:
        _Sigterm.held = False
    _Sigterm.check()


@contextlib.contextmanager
def process_group(launch: Launch, device: torch.device) -> Iterator[Group]:
    """Join the ranks torchrun started (env:// rendezvous), and leave cleanly on exit."""
    if not launch.distributed:
        yield Group(launch)
        return
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:
        raise IipadError(f"WORLD_SIZE={launch.world_size} but {' and '.join(missing)} unset; start iipad with torchrun")
    import torch
    import torch.distributed as dist

    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        dist.init_process_group(
            backend=_backend(device), rank=launch.rank, world_size=launch.world_size, timeout=COLLECTIVE_TIMEOUT
        )
    except (RuntimeError, ValueError) as error:
        raise IipadError(f"{launch}: could not join the process group: {str(error).strip().splitlines()[0]}") from None
    previous = signal.signal(signal.SIGTERM, _Sigterm.handle)
    try:
        yield Group(launch)
    finally:
        signal.signal(signal.SIGTERM, previous)
        dist.destroy_process_group()

