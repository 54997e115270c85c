"""Where a run stands (`TrainState`), and what it does at each point of its progress: the learning rate,
the batch size, the sequence length.

Progress is a fraction in [0, 1]: steps done over `max_steps`, or training seconds over `time_budget`,
whichever is further, so a time-budgeted run always completes its warmup and decay. Every schedule here is
a pure function of progress, so a resumed run continues each of them exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import BatchRamp, TrainConfig


@dataclass
class TrainState:
    """Everything about the run's position that is not in the weights and optimizer (plain values)."""

    step: int = 0
    tokens: int = 0  # training tokens consumed
    elapsed: float = 0.0  # seconds spent training (evaluations excluded)
    data_position: int | list[int] | None = 0  # the data source's position in its phase (see batches.py)
    phase: int = 0  # index in the sequence-length schedule
    skipped_steps: int = 0  # steps whose update was skipped (non-finite loss or gradient)
    data: str = ""  # the prepared training data's content key (data.py's cache folder name); "" in older runs

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(self.elapsed, 1e-9)


def progress(state: TrainState, t: TrainConfig, ahead: int = 0) -> float:
    """Fraction of the run done: the further of steps and time. `ahead` counts the step about to run."""
    p = 0.0
    if t.max_steps:
        p = max(p, (state.step + ahead) / t.max_steps)
    if t.time_budget:
        p = max(p, state.elapsed / t.time_budget)
    return p


def lr_factor(progress: float, warmup_frac: float, schedule: str = "linear", min_lr_frac: float = 0.0,
              decay_frac: float = 1.0) -> float:
    """Multiplier of the peak LR at `progress` in [0, 1]: linear warmup over `warmup_frac` of the run, then
    linear or cosine decay to `min_lr_frac`; or, for 'wsd' (warmup-stable-decay), the peak until the last
    `decay_frac` of the run and a linear decay over it."""
    p = min(max(progress, 0.0), 1.0)
    if p < warmup_frac:
        return p / warmup_frac
    if schedule == "wsd":
        decay = min(1.0, (1.0 - p) / decay_frac)
    else:
        q = (p - warmup_frac) / (1.0 - warmup_frac)
        decay = 1.0 - q if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * q))
    return min_lr_frac + (1.0 - min_lr_frac) * decay


def train_lr(state: TrainState, t: TrainConfig) -> float:
    """The learning rate of the step about to run."""
    return t.lr * lr_factor(progress(state, t, ahead=1), t.warmup_frac, t.schedule, t.min_lr_frac, t.decay_frac)


def batch_at(progress: float, full: int, ramp: BatchRamp | None, unit: int) -> int:
    """Sequences in the step at `progress`: the batch-size ramp (linear from its start to `full` over its
    fraction of the run), rounded down to a multiple of `unit` (ranks x micro-batches), at least one unit."""
    if ramp is None:
        return full
    b = ramp.start + (full - ramp.start) * min(1.0, max(progress, 0.0) / ramp.frac) if ramp.start < full else full
    return max(unit, int(b) // unit * unit)


def phase_at(phases: list[tuple[int, float]], progress: float) -> int:
    """Index of the sequence-length phase at `progress` (phases: (length, end) pairs, see config)."""
    return next(i for i, (_, end) in enumerate(phases) if progress < end or i == len(phases) - 1)


def phase_batch(t: TrainConfig, final_len: int, length: int, unit: int) -> int:
    """Sequences per step (global) in a phase of `length` tokens: with `schedule_keep_tokens`, as many
    tokens per step as at the final length."""
    if not t.schedule_keep_tokens or length == final_len:
        return t.batch_size
    return max(unit, round(t.batch_size * final_len / length / unit) * unit)
