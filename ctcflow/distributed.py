"""Distributed data parallel plumbing: launch through torchrun's launcher, join, and a few collectives.

A process started by torchrun (or by `launch` below) finds RANK, LOCAL_RANK and WORLD_SIZE in
its environment; a plain process has none of them and is rank 0 of a world of 1, where every
helper here does nothing.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ctcflow.errors import CtcflowError


class DistributedError(CtcflowError):
    """A rank of a distributed run failed; the message is that rank's own error."""


def launched() -> bool:
    """True inside a process that torchrun (or `launch`) started."""
    return "LOCAL_RANK" in os.environ


def launch(nproc: int, entrypoint: Callable, *args):
    """Run `entrypoint(*args)` in `nproc` local processes through torchrun's own launcher
    (`torch.distributed.run --standalone` does the same with a command line); return rank 0's result."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1)
    try:
        return elastic_launch(config, entrypoint)(*args)[0]
    except ChildFailedError as err:
        # Every rank raises the same error; report the first one's message, without torch's wrapping.
        rank, failure = min(err.failures.items())
        message = failure.message.get("message", "") if isinstance(failure.message, dict) else str(failure.message)
        name, _, text = message.partition(": ")  # torch records "ErrorClass: message"
        raise DistributedError((text if name.endswith("Error") else message)
                               or f"rank {rank} failed (exit code {failure.exitcode})") from err


@dataclass(frozen=True)
class World:
    rank: int
    world_size: int
    device: torch.device

    @property
    def master(self) -> bool:
        """Rank 0, the one process that writes metrics and checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def join(device: str) -> World:
    """Join the process group torchrun set up (gloo on CPU, NCCL on GPU), or stand alone."""
    if not launched():
        return World(0, 1, torch.device(device))
    local_rank = int(os.environ["LOCAL_RANK"])
    if device == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size(),
                 torch.device(f"cuda:{local_rank}") if device == "cuda" else torch.device("cpu"))


def leave(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def all_sum(world: World, values: list[float]) -> list[float]:
    """Element-wise sum over ranks (float64)."""
    if not world.distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=world.device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def all_true(world: World, flag: bool) -> bool:
    """True only when `flag` is true on every rank, so all ranks take the same branch."""
    if not world.distributed:
        return flag
    tensor = torch.tensor([int(flag)], device=world.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return bool(tensor.item())


def all_gather(world: World, obj) -> list:
    """Every rank's `obj`, in rank order."""
    if not world.distributed:
        return [obj]
    gathered = [None] * world.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast(world: World, obj):
    """Rank 0's `obj` on every rank."""
    if not world.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
