"""torchrun integration: process-group setup and teardown, rank helpers, all-reduces, and the one place
where data parallelism (DDP or FSDP2) and the bf16 compute copy are applied to a model, from outside it.

`maskedlm pretrain` under `torchrun --nproc_per_node=N -m maskedlm pretrain ...` reads the environment
torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) and joins the group: NCCL when training on
CUDA, gloo on CPU. Without those variables it is a single process and everything here is a no-op. Every
rank runs the same code; logging and saving go through `is_main`.
"""

from __future__ import annotations

import copy
import datetime
import os
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist

from .errors import UserError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1  # ranks on this machine

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
    return Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")),
                int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


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


# -- parallelism, applied from outside the model ----------------------------------------------------------


@dataclass
class Parallel:
    """A model as training runs it.

    model:   the fp32 master weights the optimizer updates and checkpoints save (FSDP shards them in place)
    compute: what forward and backward run on: a bf16 copy of `model` (refreshed after every update by the
             training step), or `model` itself
    runner:  `compute` as called, wrapped in DistributedDataParallel under torchrun (DDP)
    """

    model: torch.nn.Module
    compute: torch.nn.Module
    runner: torch.nn.Module
    dist: "Dist"
    fsdp: bool


def parallelize(model: torch.nn.Module, dist: "Dist | None" = None, *, mode: Literal["ddp", "fsdp"] = "ddp",
                amp_dtype: torch.dtype | None = None, compile: bool = False, nsp: bool = False) -> Parallel:
    """Apply precision, compilation and data parallelism to `model` (before its optimizer is built: FSDP
    replaces the parameters with shards).

    DDP (the default under torchrun): the compute copy is replicated and its gradients all-reduced.
    FSDP2: `model` is sharded, with its own mixed precision (no separate compute copy). Without torchrun
    both are a single process. With `compile`, the encoder (fixed batch and sequence shapes) is compiled
    in place; the MLM head, whose row count varies with the mask, stays eager. Without `nsp`, the pooler
    and NSP head never get a gradient: they are frozen in the compute copy so that DDP does not wait for
    them."""
    dist = dist or Dist()
    fsdp = mode == "fsdp" and dist.active
    if fsdp:
        apply_fsdp(model, amp_dtype)
        compute = model
    else:
        compute = copy.deepcopy(model).to(amp_dtype) if amp_dtype is not None else model
        if not nsp:
            for p in compute.pair_head_parameters():
                p.requires_grad_(False)
    if compile:
        compute.bert.compile(dynamic=False)
    runner = compute
    if dist.active and not fsdp:
        from torch.nn.parallel import DistributedDataParallel

        device = next(model.parameters()).device
        runner = DistributedDataParallel(compute, device_ids=[device.index] if device.type == "cuda" else None)
    return Parallel(model, compute, runner, dist, fsdp)


# -- FSDP (fully_shard) -----------------------------------------------------------------------------------


def apply_fsdp(model: torch.nn.Module, param_dtype: torch.dtype | None) -> None:
    """Shard `model` with FSDP2 (torch.distributed.fsdp.fully_shard): each transformer block is a unit,
    the rest (embeddings, pooler, heads, which share the word embeddings) the root unit. Parameters stay
    fp32 shards; compute runs in `param_dtype` and gradients are reduced in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else MixedPrecisionPolicy()
    for block in model.bert.layers:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)


def _param_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    ids = {id(p): n for n, p in model.named_parameters()}
    return [ids[id(p)] for g in optimizer.param_groups for p in g["params"]]


def full_model_state(model: torch.nn.Module, fsdp: bool) -> dict[str, torch.Tensor]:
    """The whole state dict (gathered from the shards under FSDP: a collective, every rank calls it)."""
    if not fsdp:
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, fsdp: bool) -> dict:
    """The optimizer state dict in torch's index format (gathered under FSDP: a collective)."""
    if not fsdp:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    by_name = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    names = _param_names(model, optimizer)
    index = {n: i for i, n in enumerate(names)}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [index[n] for n in g["params"]]}
              for g in by_name.get("param_groups", [])]
    return {"state": {index[n]: s for n, s in by_name.get("state", {}).items()}, "param_groups": groups}


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict, fsdp: bool) -> None:
    """Load an optimizer state dict in torch's index format (sharding it under FSDP)."""
    if not fsdp:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = _param_names(model, optimizer)
    by_name = {"state": {names[i]: s for i, s in state["state"].items()},
               "param_groups": [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[i] for i in g["params"]]}
                                for g in state["param_groups"]]}
    # strict=False: parameters that never got a gradient (pooler and NSP head without NSP) have no state.
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True, strict=False))
