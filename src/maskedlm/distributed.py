"""torchrun integration: process-group setup and teardown, rank helpers, all-reduces.

`maskedlm pretrain` under `torchrun --nproc_per_node=N -m maskedlm pretrain ...` reads the environment
torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) and joins the group: NCCL when training on
CUDA, gloo on CPU. Without those variables it is a single process and everything here is a no-op. Every
rank runs the same code; logging and saving go through `is_main`.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import UserError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In place; returns `t`. A no-op in a single process."""
        if self.active:
            dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
        return t

    def all_gather_object(self, obj) -> list:
        if not self.active:
            return [obj]
        out: list = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj, src: int = 0):
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def from_environment() -> Dist:
    """The rank layout torchrun describes in the environment (a single process without it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    return Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def init(device_type: str, timeout_s: float = 600.0) -> Dist:
    """Join the process group if torchrun started this process (NCCL for CUDA, gloo otherwise).

    The timeout bounds how long a rank waits in a collective for a peer that died, so a failed worker
    takes the job down instead of hanging it."""
    d = from_environment()
    if not d.active or dist.is_initialized():
        return d
    if device_type == "cuda":
        if torch.cuda.device_count() <= d.local_rank:
            raise UserError(f"rank {d.rank} wants cuda:{d.local_rank}, but only {torch.cuda.device_count()} GPU(s) are visible")
        torch.cuda.set_device(d.local_rank)
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return d


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
