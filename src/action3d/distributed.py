"""torchrun / DDP helpers: one process by default, a process group when launched by torchrun.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE. `init_distributed()` reads them and joins the group (gloo on CPU,
nccl on CUDA); without them every helper here answers as the single process of a world of one, so the engine calls
them unconditionally.

Many machines: each runs the same stage command; `run_under_torchrun` starts torchrun with `--nnodes N` and a c10d
rendezvous, and the ranks of every node meet there. One node owns the stage's outputs (it runs the stage inside
`dvc repro`, the others join as participants: `OWNER_ENV`); its first process is the *writer*, the one rank that
writes checkpoints and outputs and logs to MLflow (`is_main_process`), whatever rank number the rendezvous gave it.
On one machine the writer is rank 0, as before.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch.utils.data import Sampler


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    writer: int = 0  # the rank that writes checkpoints and outputs and logs

    @property
    def is_main(self) -> bool:
        return self.rank == self.writer


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def resolve_nproc(value: int | str) -> int:
    """A training stage's `nproc` knob as a number of processes: "auto" = every visible CUDA GPU, 1 on the CPU."""
    if value == "auto":
        return max(1, torch.cuda.device_count())
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"nproc must be 'auto' or an integer >= 1, not {value!r}")
    return value


OWNER_ENV = "ACTION3D_NODE_OWNER"  # "1" on the node that owns a multi-node stage's outputs (runs it inside DVC)


@dataclass(frozen=True)
class Rendezvous:
    """How the nodes of a multi-node stage meet: torchrun's c10d rendezvous at `endpoint` (HOST:PORT on one of
    them), one job id for every node, and how many times torchrun restarts the ranks when one fails."""

    nnodes: int
    endpoint: str
    job_id: str
    max_restarts: int = 3


def torchrun_args(nproc: int, rendezvous: Rendezvous | None = None) -> list[str]:
    """torchrun's options: this machine alone (`--standalone`), or one node of `rendezvous.nnodes`."""
    if rendezvous is None or rendezvous.nnodes == 1:
        return ["--standalone", "--nproc-per-node", str(nproc)]
    return ["--nnodes", str(rendezvous.nnodes), "--nproc-per-node", str(nproc), "--rdzv-backend", "c10d",
            "--rdzv-endpoint", rendezvous.endpoint, "--rdzv-id", rendezvous.job_id,
            "--max-restarts", str(rendezvous.max_restarts)]


def run_under_torchrun(nproc: int, argv: list[str], rendezvous: Rendezvous | None = None) -> int:
    """Run `python -m action3d.cli *argv` as `nproc` ranks under torchrun on this machine, alone or as one node of
    a multi-node job (`rendezvous`); its exit code.

    SIGTERM and SIGINT sent to this process go on to torchrun, which stops its ranks: killing the stage (a stopped
    `dvc repro`, a cancelled flow) leaves no rank training behind.
    """
    import signal
    import subprocess
    import sys
    import threading

    command = [sys.executable, "-m", "torch.distributed.run", *torchrun_args(nproc, rendezvous),
               "-m", "action3d.cli", *argv]
    env = dict(os.environ)
    if rendezvous is not None and rendezvous.nnodes > 1:
        # By default torchrun's agents keep one store for the ranks across restarts, and the keys of a failed attempt
        # stay there: a restarted rank can read its peer's dead address and wait on it for gloo's 30 minutes (seen
        # in 3 of 4 trials: two agents on loopback, one rank killed). Opting out gives every attempt a fresh store
        # on a fresh port, agreed at the rendezvous.
        env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    child: subprocess.Popen | None = None
    pending: list[int] = []  # a signal that came before torchrun started

    def forward(signum, _frame) -> None:
        if child is None:
            pending.append(signum)
        else:
            child.send_signal(signum)

    forwarded = (signal.SIGTERM, signal.SIGINT)
    in_main_thread = threading.current_thread() is threading.main_thread()  # only it may set handlers
    previous = {sig: signal.signal(sig, forward) for sig in forwarded} if in_main_thread else {}
    try:
        child = subprocess.Popen(command, env=env)
        for signum in pending:
            child.send_signal(signum)
        code = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return code if code >= 0 else 128 - code  # killed by signal N: 128 + N, as a shell reports it


def init_distributed(backend: str | None = None) -> DistInfo:
    """Join the process group when launched by torchrun; otherwise describe the single process.

    The device is `cuda:LOCAL_RANK` when CUDA is available, else the CPU. The backend defaults to nccl on CUDA and
    gloo on the CPU. Calling it twice is harmless.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if not launched_by_torchrun():
        return DistInfo(0, 1, 0, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # nccl collectives and all_gather_object use the current device
    global _writer
    if not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if device.type == "cuda" else "gloo"))
        owners = all_gather_objects(os.environ.get(OWNER_ENV) == "1" and local_rank == 0)
        _writer = owners.index(True) if any(owners) else 0
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, _writer)


def pick_device(name: str) -> torch.device:
    """A stage's `device` knob: 'auto' = CUDA when present (the local rank's GPU under torchrun), else the CPU."""
    return init_distributed().device if name == "auto" else torch.device(name)


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES names them (indices or UUIDs); [] on a CPU."""
    count = torch.cuda.device_count()
    if not count:
        return []
    return [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d] or [str(i) for i in range(count)]


def cleanup() -> None:
    """Leave the process group (no-op in one process)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


_writer = 0  # set when the process group starts: the owning node's first process, else rank 0


def writer_rank() -> int:
    return _writer if is_distributed() else 0


def is_main_process() -> bool:
    """True on the writer (rank 0 on one machine; a multi-node job's owning node's first process) and in a single
    process: the one process that writes files and logs."""
    return get_rank() == writer_rank()


def from_writer(make: Any) -> Any:
    """`make()` evaluated on the writer alone and its (picklable) result given to every rank: what only the writer's
    disk holds, such as the checkpoint a multi-node job resumes from. One process: `make()`."""
    if not is_distributed():
        return make()
    box = [make() if is_main_process() else None]
    dist.broadcast_object_list(box, src=writer_rank())
    return box[0]


def share_buffers(model: torch.nn.Module) -> None:
    """Every rank takes rank 0's buffers (BatchNorm's running statistics). After an epoch each rank holds its own,
    moved by its last batch after DDP's broadcast from rank 0; shared, validation scores one model and the checkpoint
    holds it whichever rank writes, so a job resumed on a new world steps on exactly as it would have. One process:
    nothing to do."""
    if is_distributed():
        for buffer in model.buffers():
            dist.broadcast(buffer.data, src=0)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few scalars over ranks (float64, so counts stay exact). One process: returned as given."""
    if not is_distributed():
        return [float(v) for v in values]
    # nccl reduces CUDA tensors only; gloo reduces CPU tensors
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True when `flag` is true on any rank, so every rank takes the same branch (no rank left waiting)."""
    return all_reduce_sum([float(flag)], device)[0] > 0


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj` (picklable), in rank order. One process: `[obj]`."""
    if not is_distributed():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


class ShardSampler(Sampler[int]):
    """Rank r of w takes indices r, r + w, r + 2w, ... of a dataset of `length`, in order, without padding.

    For evaluation under DDP: torch's DistributedSampler pads the last shard with repeated samples so that every
    rank runs the same number of steps, which would count some clips twice. Evaluation gathers the scores of every
    rank instead, so unequal shards are fine and each clip counts once.
    """

    def __init__(self, length: int, *, rank: int | None = None, world_size: int | None = None):
        self.length = length
        self.rank = get_rank() if rank is None else rank
        self.world_size = get_world_size() if world_size is None else world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world_size))
