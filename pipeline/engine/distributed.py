"""Process-group set-up and the few collectives the training loop needs.

The accelerator is chosen once, before DeepSpeed is imported: CUDA + NCCL when a GPU is there,
DeepSpeed's CPU accelerator + gloo otherwise. A plain ``pipeline train`` (no torchrun) is a
world of one.
"""
from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _skip_shm_comm_op() -> None:
    """DeepSpeed's CPU accelerator JIT-builds a shared-memory collective op when its process
    group starts, for its inference all-reduce only: training collectives go through
    torch.distributed (gloo). Marking the op unavailable skips a 1.5–2 minute rebuild whenever
    the compiler environment (PATH) differs from the last build's, and the line it printed on
    stdout."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _clear_stale_extension_locks(max_age_minutes: float = 10.0) -> None:
    """The methods' fused CPU kernels (and DeepSpeed's ops) load JIT-compiled ops
    under a lock file in the torch extensions directory; a process killed while holding it
    leaves the lock behind and every later start waits on it forever. A build takes about a
    minute, so a lock older than ``max_age_minutes`` is stale."""
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR",
                               Path.home() / ".cache" / "torch_extensions"))
    for lock in [*root.glob("*/deepspeed_*/lock"), *root.glob("*/pipeline_*/lock")]:
        try:
            if time.time() - lock.stat().st_mtime > max_age_minutes * 60:
                lock.unlink()
        except FileNotFoundError:
            pass


def place() -> Dist:
    """This process's rank, world and device, from the launcher's environment (torchrun,
    SLURM via torchrun; none: a world of one), before any process group exists."""
    cuda = torch.cuda.is_available()
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cuda else "cpu")
    if "RANK" not in os.environ:  # launched without torchrun: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return Dist(int(os.environ["RANK"]), local_rank, int(os.environ["WORLD_SIZE"]), device)


def setup(timeout_minutes: float = 30.0) -> Dist:
    """Initialise torch.distributed through DeepSpeed and return this process's place."""
    where = place()
    if where.device.type != "cuda":
        _clear_stale_extension_locks()
        _skip_shm_comm_op()
    import deepspeed

    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if where.device.type == "cuda" else "gloo",
                                   verbose=False, auto_mpi_discovery=False,
                                   timeout=timedelta(minutes=timeout_minutes))
    return Dist(dist.get_rank(), where.local_rank, dist.get_world_size(), where.device)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensors: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Element-wise sums over ranks of a dict of tensors (one collective for all of them),
    returned on the host: the loop calls it only where it reads values back anyway."""
    if not tensors:
        return {}
    keys = sorted(tensors)
    flat = torch.cat([tensors[k].detach().double().reshape(-1).to(device) for k in keys])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flat)
    out, offset = {}, 0
    for k in keys:
        n = tensors[k].numel()
        out[k] = flat[offset:offset + n].reshape(tensors[k].shape).cpu()
        offset += n
    return out


@torch.no_grad()
def average_buffers(module: torch.nn.Module) -> None:
    """Average every floating-point buffer (BN running statistics, a method's running
    estimates) over ranks: DeepSpeed keeps them per rank, and they drift apart."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    buffers = [b for b in module.buffers() if b.is_floating_point()]
    if not buffers:
        return
    flat = torch.cat([b.reshape(-1).float() for b in buffers])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for b in buffers:
        b.copy_(flat[offset:offset + b.numel()].view_as(b))
        offset += b.numel()


def any_rank(flags: list[bool], device: torch.device) -> list[bool]:
    """For each flag: is it set on any rank? (so that every rank takes the same branch)"""
    t = torch.tensor([float(f) for f in flags], device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def union_over_ranks(items: set) -> set:
    """The union of every rank's ``items`` (small sets of picklable values, e.g. file names)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return set(items)
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, items)
    return set().union(*gathered)


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
