"""Pre-training: the loop, the learning-rate schedule and the run folder.

One optimizer step: take the next `batch_size` packed sequences (their indices come from the epoch sampler,
whose state is a single integer), mask them on the training device with the run's generator, run forward
and backward over `grad_accum` micro-batches with the loss normalised by the step's total number of
predicted tokens, clip, step. The schedule is a function of progress in [0, 1] — steps done over
`max_steps`, or training seconds over `time_budget`, whichever is further — so a time-budgeted run always
completes its warmup and decay.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from . import checkpoint
from .config import Config, MaskConfig, TrainConfig
from .data import BatchLoader, EpochSampler, PackedSequences, prepare
from .errors import UserError
from .evaluate import EvalResult, Evaluator
from .flops import matmul_peak, train_flops
from .hf import export_model
from .fill_mask import sample_view
from .masking import MaskSpec
from .model import BertForPreTraining
from .runtime import resolve_device, resolve_precision


@dataclass
class TrainState:
    """Everything about the run's position that is not in the weights and optimizer (plain values)."""

    step: int = 0
    tokens: int = 0  # training tokens consumed
    elapsed: float = 0.0  # seconds spent training (evaluations excluded)
    data_position: int = 0  # sequences served by the sampler


@dataclass
class RunResult:
    run_dir: Path
    eval: EvalResult
    steps: int
    elapsed: float
    tokens_per_second: float


def lr_factor(progress: float, t: TrainConfig) -> float:
    """Multiplier of the peak LR at `progress` in [0, 1]: linear warmup, then linear or cosine decay."""
    p = min(max(progress, 0.0), 1.0)
    if p < t.warmup_frac:
        return p / t.warmup_frac
    q = (p - t.warmup_frac) / (1.0 - t.warmup_frac)
    decay = 1.0 - q if t.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * q))
    return t.min_lr_frac + (1.0 - t.min_lr_frac) * decay


def progress(state: TrainState, t: TrainConfig, ahead: int = 0) -> float:
    """Fraction of the run done: the further of steps and time. `ahead` counts the step about to run."""
    p = 0.0
    if t.max_steps:
        p = max(p, (state.step + ahead) / t.max_steps)
    if t.time_budget:
        p = max(p, state.elapsed / t.time_budget)
    return p


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (linear and embedding weights) only, not on biases and LayerNorms."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, t: TrainConfig) -> torch.optim.Optimizer:
    """AdamW, fused (one kernel over all parameters) on CPU and CUDA, foreach elsewhere."""
    device = next(model.parameters()).device
    fused = device.type in ("cpu", "cuda")
    return torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=(t.adam_beta1, t.adam_beta2),
                             eps=t.adam_eps, fused=fused, foreach=None if fused else True)


@dataclass
class StepStats:
    """Tensors on the training device (reading them syncs; the loop reads them only when it logs)."""

    loss_sum: torch.Tensor
    predicted: torch.Tensor
    correct: torch.Tensor
    grad_norm: torch.Tensor


class TrainStep:
    """One optimizer step on a batch of token ids: mask on the device, forward and backward over the
    micro-batches with the loss normalised by the step's total count of predicted tokens, clip, update.

    `pretrain` and the benchmarks both call this, so the benchmarks measure the real step.

    Mixed precision: with `amp_dtype` (bf16), forward and backward run on a bf16 copy of the model while
    `model` keeps the fp32 master weights that the optimizer updates and that checkpoints save; after each
    step the copy is refreshed. Unlike autocast, which re-casts weights and activations around every
    operation, activations stay bf16 end to end (norms and softmaxes still accumulate in fp32), which
    measured faster on CPU and GPU alike (BENCHMARKS.md).

    With `compile`, the encoder (fixed batch and sequence shapes) is compiled; the MLM head, whose number
    of rows varies with the mask, stays eager, so nothing recompiles from step to step.
    """

    def __init__(self, model: BertForPreTraining, optimizer: torch.optim.Optimizer, mask: MaskSpec,
                 generator: torch.Generator, *, grad_accum: int = 1, clip_grad: float = 1.0,
                 amp_dtype: torch.dtype | None = None, compile: bool = False):
        self.model, self.optimizer, self.mask, self.generator = model, optimizer, mask, generator
        self.grad_accum, self.clip_grad = grad_accum, clip_grad
        self.device = next(model.parameters()).device
        self.compute = copy.deepcopy(model).to(amp_dtype) if amp_dtype is not None else model
        self.params = list(model.parameters())
        self.compute_params = list(self.compute.parameters())
        self.encoder = torch.compile(self.compute.bert, dynamic=False) if compile else self.compute.bert

    def compile_now(self, batch_size: int, seq_len: int) -> float:
        """Compile the encoder before training (forward and backward on a throwaway batch), so compilation
        time is reported on its own. Weights, optimizer state and generators are left untouched.
        Returns the seconds it took."""
        t0 = time.perf_counter()
        ids = torch.randint(0, self.mask.vocab_size, (batch_size // self.grad_accum, seq_len), device=self.device)
        self.encoder(ids).float().sum().backward()
        for p in self.compute_params:
            p.grad = None
        return time.perf_counter() - t0

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed MLM loss and correct count of one micro-batch, on the compute copy."""
        return self.compute.mlm_loss(self.encoder(inputs), labels)

    def __call__(self, ids: torch.Tensor, lr: float | None = None) -> StepStats:
        if lr is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        self.compute.train(self.model.training)
        inputs, labels = self.mask(ids, self.generator)  # (B, T) each
        n_pred = (labels != -100).sum().clamp(min=1)
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), dtype=torch.long, device=self.device)
        for i, (inp, lab) in enumerate(zip(inputs.chunk(self.grad_accum), labels.chunk(self.grad_accum))):
            out_loss, out_correct = self.forward(inp, lab)
            (out_loss / n_pred).backward()
            self._accumulate_grads(first=i == 0)
            loss_sum += out_loss.detach().float()
            correct += out_correct
        clip = self.clip_grad if self.clip_grad > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, clip, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.compute is not self.model:
            with torch.no_grad():
                torch._foreach_copy_(self.compute_params, self.params)
        return StepStats(loss_sum, n_pred, correct, grad_norm)

    def _accumulate_grads(self, first: bool) -> None:
        """Move the compute copy's (bf16) gradients into the fp32 master gradients, summing in fp32."""
        if self.compute is self.model:
            return
        pairs = [(p, c.grad) for p, c in zip(self.params, self.compute_params) if c.grad is not None]
        if first:  # the optimizer left the master gradients at None
            for p, _ in pairs:
                p.grad = torch.empty_like(p)
            torch._foreach_copy_([p.grad for p, _ in pairs], [g for _, g in pairs])  # casts to fp32
        else:
            torch._foreach_add_([p.grad for p, _ in pairs], [g.float() for _, g in pairs])
        for c in self.compute_params:
            c.grad = None


def new_run_dir(out: str | None) -> Path:
    if out:
        path = Path(out)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise UserError(f"run folder {path} already exists and is not empty; choose another --out")
    else:
        base = Path("runs") / time.strftime("%Y%m%d-%H%M%S")
        path, n = base, 1
        while path.exists():
            path, n = base.with_name(f"{base.name}-{n}"), n + 1
    path.mkdir(parents=True, exist_ok=True)
    return path


class _Progress:
    """A progress bar on a terminal; a plain line every 30 s otherwise (logs stay readable)."""

    def __init__(self, enabled: bool | None):
        self.tty = sys.stderr.isatty() if enabled is None else enabled
        self.bar = tqdm(total=1000, bar_format="{percentage:3.0f}%|{bar:24}| {postfix}", file=sys.stderr,
                        leave=True) if self.tty else None
        self.last_line = time.time()

    def update(self, p: float, text: str) -> None:
        if self.bar is not None:
            self.bar.n = int(1000 * min(p, 1.0))
            self.bar.set_postfix_str(text, refresh=True)
        elif time.time() - self.last_line > 30:
            print(f"[{100 * min(p, 1.0):3.0f}%] {text}", file=sys.stderr, flush=True)
            self.last_line = time.time()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def pretrain(cfg: Config, log=print, progress_bar: bool | None = None) -> RunResult:
    """Pre-train a model as configured; returns the run folder and final held-out metrics."""
    cfg = cfg.resolved()
    t = cfg.train
    device = resolve_device(t.device)
    amp_dtype = resolve_precision(t.precision, device)
    run_dir = new_run_dir(t.out)
    t.out = str(run_dir)

    init_model = None
    if t.init_from:
        # Continued pre-training: the checkpoint's shape, weights and tokenizer; this run's dropout.
        init_model, init_tok, note = checkpoint.load_for_init(t.init_from)
        dropout = cfg.model.hidden_dropout, cfg.model.attention_dropout
        cfg.model = dataclasses.replace(init_model.config, preset=None)
        cfg.model.hidden_dropout, cfg.model.attention_dropout = dropout
        cfg.data.tokenizer = str(t.init_from)
        log(f"{t.init_from}: {note}")
    data = prepare(cfg.data, tokenizer=init_tok if init_model is not None else None, log=log)
    tok = data.tokenizer
    if init_model is None:
        cfg.model.vocab_size, cfg.model.pad_token_id = tok.vocab_size, tok.special.pad
    if data.meta["max_token_id"] >= cfg.model.vocab_size:
        raise UserError(f"{data.folder}: token id {data.meta['max_token_id']} >= vocabulary size {cfg.model.vocab_size}")
    if cfg.data.seq_len > cfg.model.max_position:
        raise UserError(f"--seq-len {cfg.data.seq_len} exceeds the model's {cfg.model.max_position} positions")
    seq_len = cfg.data.seq_len
    train_seqs = PackedSequences(data.train, seq_len, tok.special)
    valid_seqs = PackedSequences(data.valid, seq_len, tok.special, pad_last=True, what="held-out")
    evaluator = Evaluator(valid_seqs, tok, cfg.mask, t.eval_sequences, t.eval_seed)

    torch.manual_seed(t.seed)
    model = BertForPreTraining(cfg.model)
    if init_model is not None:
        model.load_state_dict(init_model.state_dict())
    model.to(device).train()
    opt = make_optimizer(model, t)
    loader = BatchLoader(train_seqs, EpochSampler(len(train_seqs), t.seed), t.batch_size, pin=device.type == "cuda")
    mask_gen = torch.Generator(device=device).manual_seed(t.seed)
    state = TrainState()

    checkpoint.save_config(cfg, run_dir / checkpoint.CONFIG)
    tok.save(run_dir)
    metrics = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")

    def record(entry: dict) -> None:
        metrics.write(json.dumps(entry) + "\n")
        metrics.flush()

    stop = f"{t.max_steps} steps" if t.max_steps else ""
    if t.time_budget:
        stop += (" or " if stop else "") + f"{t.time_budget:g}s"
    log(f"model: {cfg.model.preset or 'custom'} ({cfg.model.num_layers}L/{cfg.model.hidden_size}H, "
        f"{model.num_parameters() / 1e6:.1f}M parameters), vocab {tok.vocab_size}, seq {seq_len}, "
        f"batch {t.batch_size}, on {device} ({'bf16 mixed precision' if amp_dtype else 'fp32'}); "
        f"{len(train_seqs):,} training sequences; stop at {stop}; run folder {run_dir}")

    step_fn = TrainStep(model, opt, MaskSpec.from_tokenizer(tok, cfg.mask), mask_gen, grad_accum=t.grad_accum,
                        clip_grad=t.clip_grad, amp_dtype=amp_dtype, compile=t.compile)
    if t.compile:
        log(f"compiled the encoder in {step_fn.compile_now(t.batch_size, seq_len):.1f}s (not counted as training time)")
    # MFU against this machine's measured matmul peak in the training precision (maskedlm/flops.py).
    peak = matmul_peak(device.type, amp_dtype or torch.float32)
    bar = _Progress(progress_bar)
    tokens_per_step = t.batch_size * seq_len
    window = {"loss_sum": 0.0, "predicted": 0, "correct": 0, "steps": 0, "time": 0.0, "data_time": 0.0}
    last_eval: EvalResult | None = None
    try:
        while progress(state, t) < 1.0:
            t0 = time.perf_counter()
            lr = t.lr * lr_factor(progress(state, t, ahead=1), t)
            ids, position = loader.next()
            t_data = time.perf_counter() - t0
            stats = step_fn(ids.to(device, non_blocking=True), lr)

            state.step += 1
            state.tokens += tokens_per_step
            state.data_position = position
            state.elapsed += time.perf_counter() - t0
            window["loss_sum"] += float(stats.loss_sum)
            window["predicted"] += int(stats.predicted)
            window["correct"] += int(stats.correct)
            window["steps"] += 1
            window["time"] += time.perf_counter() - t0
            window["data_time"] += t_data

            done = progress(state, t) >= 1.0
            if state.step % t.log_every == 0 or done:
                loss = window["loss_sum"] / max(window["predicted"], 1)
                tps = window["steps"] * tokens_per_step / max(window["time"], 1e-9)
                flops = train_flops(cfg.model, t.batch_size, seq_len, window["predicted"] / window["steps"])
                mfu = flops * window["steps"] / max(window["time"], 1e-9) / peak
                record({"step": state.step, "loss": loss, "accuracy": window["correct"] / max(window["predicted"], 1),
                        "lr": lr, "grad_norm": float(stats.grad_norm), "tokens_per_s": tps, "elapsed": state.elapsed,
                        "tokens": state.tokens, "epoch": position / len(train_seqs),
                        "mfu": mfu, "step_ms": 1e3 * window["time"] / window["steps"],
                        "data_ms": 1e3 * window["data_time"] / window["steps"]})
                p = progress(state, t)
                eta = state.elapsed * (1 - p) / max(p, 1e-9)
                bar.update(p, f"step {state.step} loss {loss:.3f} {tps / 1e3:.1f}k tok/s MFU {mfu:.0%} ETA {eta:.0f}s")
                window = dict.fromkeys(window, 0)
            if (t.eval_every and state.step % t.eval_every == 0) or done:
                last_eval = evaluator(model, device, amp_dtype)
                record({"step": state.step, "split": "valid", **last_eval.as_dict(), "elapsed": state.elapsed})
    finally:
        loader.close()
        bar.close()
        metrics.close()

    assert last_eval is not None
    checkpoint.save_weights(model, run_dir / checkpoint.WEIGHTS)
    export_model(model, tok, run_dir / "hf", nsp=False,
                 lowercase=cfg.data.lowercase if cfg.data.tokenizer == "wordpiece" else None)
    checkpoint.atomic_write_text(run_dir / "eval.json", json.dumps(
        {"step": state.step, **last_eval.as_dict(), "train_state": asdict(state)}, indent=2) + "\n")
    tps = state.tokens / max(state.elapsed, 1e-9)
    log(f"done: {state.step} steps, {state.tokens:,} tokens in {state.elapsed:.0f}s ({tps / 1e3:.1f}k tokens/s)")
    log(f"held-out: loss {last_eval.loss:.3f}, masked-token accuracy {last_eval.accuracy:.1%}, "
        f"perplexity {last_eval.perplexity:.1f} ({last_eval.predicted:,} predictions)")
    if t.sample:
        model.eval()
        log(sample_view(model, tok, data.valid.tokens, mask_prob=cfg.mask.mask_prob, seed=t.eval_seed,
                        color=sys.stdout.isatty(), amp_dtype=amp_dtype))
    log(f"saved to {run_dir}")
    return RunResult(run_dir, last_eval, state.step, state.elapsed, tps)
