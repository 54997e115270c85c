"""Optimizer construction and gradient clipping, shared by pre-training and fine-tuning; LAMB.

AdamW is PyTorch's (fused where the device has the kernel). LAMB, for large global batches (NVIDIA's BERT
recipe), is written here: no maintained LAMB runs on every device (apex's FusedLAMB is CUDA-only and
`torch-optimizer` is unmaintained), so it is plain PyTorch over lists of tensors.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from .config import TrainConfig


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (linear and embedding weights) only, not on biases and LayerNorms. Every
    parameter is in a group (one that never gets a gradient, e.g. an unused head, is simply not updated),
    so a checkpoint's optimizer state lines up with the model whatever was frozen."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, kind: Literal["adamw", "lamb"] = "adamw", *, lr: float,
                    weight_decay: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8
                    ) -> torch.optim.Optimizer:
    """AdamW, fused (one kernel over all parameters) on CPU and CUDA, foreach elsewhere and on FSDP's
    sharded parameters; or LAMB. Weight decay on matrices only (`param_groups`)."""
    groups = param_groups(model, weight_decay)
    if kind == "lamb":
        return Lamb(groups, lr=lr, betas=betas, eps=eps)
    device = next(model.parameters()).device
    sharded = any(hasattr(p, "full_tensor") for p in model.parameters())  # FSDP's DTensors: foreach
    fused = device.type in ("cpu", "cuda") and not sharded
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused, foreach=None if fused else True)


def make_optimizer(model: torch.nn.Module, t: TrainConfig) -> torch.optim.Optimizer:
    """The pre-training optimizer that `t` describes."""
    return build_optimizer(model, t.optimizer, lr=t.lr, weight_decay=t.weight_decay,
                           betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps)


def apply_hyperparameters(optimizer: torch.optim.Optimizer, t: TrainConfig) -> None:
    """Make `t` decide the optimizer's hyper-parameters after a checkpoint's optimizer state (which carries
    the ones it was saved with) is loaded: weight decay on the matrices' group, betas, epsilon. (The LR is
    set at every step.)"""
    for i, group in enumerate(optimizer.param_groups):
        group["weight_decay"] = t.weight_decay if i == 0 else 0.0  # groups as param_groups() builds them
        group["betas"], group["eps"] = (t.adam_beta1, t.adam_beta2), t.adam_eps


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def clip_gradients(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm to `max_norm` (0: no clipping); returns the norm before clipping
    (a plain tensor, gathered from FSDP's shards)."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf, foreach=True)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


class Lamb(torch.optim.Optimizer):
    """LAMB (You et al., 2019, "Large Batch Optimization for Deep Learning").

    Per parameter tensor w with gradient g, at step t:
        m = b1 m + (1 - b1) g            v = b2 v + (1 - b2) g^2
        u = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) + weight_decay * w
        r = ||w|| / ||u||   (1 when either norm is 0: fresh biases and norms move like Adam)
        w = w - lr * r * u
    Gradients are clipped globally before this (as NVIDIA's recipe does), by the training step.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.01):
        if lr <= 0 or eps < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1) or weight_decay < 0:
            raise ValueError("invalid LAMB hyper-parameters")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = float(state["step"])
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                update = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt_().add_(group["eps"]))
                if group["weight_decay"]:
                    update.add_(p, alpha=group["weight_decay"])
                w_norm, u_norm = p.norm(), update.norm()
                trust = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
                p.add_(update * (-group["lr"] * trust))
        return loss
