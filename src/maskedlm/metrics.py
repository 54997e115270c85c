"""Training metrics: sums over the steps since the last record, and the records' destinations
(RUN/metrics.jsonl, and TensorBoard with --tensorboard).

A record of training steps holds the mean masked-token loss and accuracy over its steps, the learning
rate, the last gradient norm, tokens per second, model-FLOPs utilisation (flops.py) and where the run
stands; an evaluation record has "split": "valid".
"""

from __future__ import annotations

import json

import torch

from .config import ModelConfig
from .errors import UserError
from .evaluate import EvalResult
from .flops import train_flops
from .paths import RunDir, atomic_write
from .schedules import TrainState
from .step import StepStats


class Window:
    """Sums over the steps since the last record. The step's tensors are summed on the training device, so
    nothing is read back (no sync with the device) until `record`."""

    def __init__(self, model: ModelConfig):
        self.model = model
        self.steps, self.time, self.data_time, self.tokens, self.encoder_flops, self.sequences = 0, 0.0, 0.0, 0, 0.0, 0
        self.sums: torch.Tensor | None = None  # (5,) float64: mlm loss, predicted, correct, nsp loss, nsp correct

    def add(self, stats: StepStats, seconds: float, data_seconds: float, batch: int, seq_len: int, world: int) -> None:
        zero = torch.zeros((), dtype=torch.float64, device=stats.loss_sum.device)
        step = torch.stack([stats.loss_sum.double(), stats.predicted.double(), stats.correct.double(),
                            zero if stats.nsp_loss_sum is None else stats.nsp_loss_sum.double(),
                            zero if stats.nsp_correct is None else stats.nsp_correct.double()])
        self.sums = step if self.sums is None else self.sums + step
        self.steps += 1
        self.time += seconds
        self.data_time += data_seconds
        self.tokens += batch * seq_len * world
        self.encoder_flops += train_flops(self.model, batch * world, seq_len, 0)  # + the head's, per prediction
        if stats.nsp_loss_sum is not None:
            self.sequences += stats.sequences

    def record(self, state: TrainState, lr: float, stats: StepStats, peak: float, epoch: float, seq_len: int) -> dict:
        loss_sum, predicted, correct, nsp_sum, nsp_correct = self.sums.tolist()
        n, secs, pred = max(self.steps, 1), max(self.time, 1e-9), max(predicted, 1)
        flops = self.encoder_flops + predicted * train_flops(self.model, 0, seq_len, 1)
        entry = {"step": state.step, "loss": loss_sum / pred, "accuracy": correct / pred, "lr": lr,
                 "grad_norm": float(stats.grad_norm), "tokens_per_s": self.tokens / secs, "mfu": flops / secs / peak,
                 "elapsed": state.elapsed, "tokens": state.tokens, "epoch": epoch, "seq_len": seq_len,
                 "step_ms": 1e3 * self.time / n, "data_ms": 1e3 * self.data_time / n,
                 "skipped_steps": state.skipped_steps}
        if self.sequences:
            entry["nsp_loss"] = nsp_sum / self.sequences
            entry["nsp_accuracy"] = nsp_correct / self.sequences
        return entry


class MetricsLog:
    """Appends records to RUN/metrics.jsonl (and TensorBoard); a no-op on ranks other than 0.

    A resumed run continues from step `from_step`: records of later steps (written before the run was
    interrupted, or by the run a resume rewinds) are dropped first, so every step is recorded once."""

    def __init__(self, run: RunDir, enabled: bool, tensorboard: bool, from_step: int = 0, reevaluate: bool = False):
        """`reevaluate`: the run resumes at its end and evaluates step `from_step` again (a run stopped or
        killed after its final checkpoint): that step's earlier evaluation record is dropped too."""
        if enabled and run.metrics.is_file():
            _drop_after(run.metrics, from_step, reevaluate)
        self.file = open(run.metrics, "a", encoding="utf-8") if enabled else None
        self.tb = None
        if tensorboard and enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError("--tensorboard needs the tensorboard package (pip install tensorboard)") from None
            self.tb = SummaryWriter(str(run.tensorboard))

    def write(self, entry: dict) -> None:
        if self.file:
            self.file.write(json.dumps(entry) + "\n")
            self.file.flush()
        if self.tb is not None:
            prefix = "valid/" if entry.get("split") == "valid" else "train/"
            for k, v in entry.items():
                if k not in ("step", "split") and isinstance(v, (int, float)):
                    self.tb.add_scalar(prefix + k, v, entry["step"])
            self.tb.flush()

    def write_eval(self, state: TrainState, result: EvalResult) -> None:
        self.write({"step": state.step, "split": "valid", **result.as_dict(), "elapsed": state.elapsed})

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def _drop_after(path, step: int, eval_too: bool = False) -> None:
    """Keep the records of steps <= `step` (and drop a last line cut short by a crash); with `eval_too`,
    not the evaluation records of `step` itself."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    keep = []
    for line in lines:
        try:
            r = json.loads(line)
            if line.endswith("\n") and r.get("step", 0) <= step and not (eval_too and r.get("step") == step
                                                                          and r.get("split") == "valid"):
                keep.append(line)
        except (json.JSONDecodeError, AttributeError):
            continue
    if len(keep) != len(lines):
        atomic_write(path, "".join(keep))
