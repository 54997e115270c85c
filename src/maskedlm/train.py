"""Pre-training: the loop, the learning-rate schedule and the run folder.

One optimizer step: take the next `batch_size` packed sequences (their indices come from the epoch sampler,
whose state is a single integer), mask them on the training device with the run's generator, run forward
and backward over `grad_accum` micro-batches with the loss normalised by the step's total number of
predicted tokens, clip, step. The schedule is a function of progress in [0, 1] — steps done over
`max_steps`, or training seconds over `time_budget`, whichever is further — so a time-budgeted run always
completes its warmup and decay.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from . import checkpoint
from .config import Config, TrainConfig
from .data import EpochSampler, PackedSequences, prepare
from .errors import UserError
from .evaluate import EvalResult, Evaluator
from .fill_mask import sample_view
from .masking import mask_tokens
from .model import BertForPreTraining
from .runtime import autocast, resolve_device, resolve_precision


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

    data = prepare(cfg.data, log=log)
    tok = data.tokenizer
    cfg.model.vocab_size, cfg.model.pad_token_id = tok.vocab_size, tok.special.pad
    if data.meta["max_token_id"] >= tok.vocab_size:
        raise UserError(f"{data.folder}: token id {data.meta['max_token_id']} >= vocabulary size {tok.vocab_size}")
    seq_len = cfg.data.seq_len
    train_seqs = PackedSequences(data.train, seq_len, tok.special)
    valid_seqs = PackedSequences(data.valid, seq_len, tok.special, pad_last=True, what="held-out")
    evaluator = Evaluator(valid_seqs, tok, cfg.mask, t.eval_sequences, t.eval_seed)

    torch.manual_seed(t.seed)
    model = BertForPreTraining(cfg.model).to(device)
    model.train()
    opt = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=(t.adam_beta1, t.adam_beta2),
                            eps=t.adam_eps)
    sampler = EpochSampler(len(train_seqs), t.seed)
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
        f"batch {t.batch_size}, on {device} ({'bf16 autocast' if amp_dtype else 'fp32'}); "
        f"{len(train_seqs):,} training sequences; stop at {stop}; run folder {run_dir}")

    bar = _Progress(progress_bar)
    special = tok.special.all()
    tokens_per_step = t.batch_size * seq_len
    window = {"loss_sum": 0.0, "predicted": 0, "correct": 0, "steps": 0, "time": 0.0}
    last_eval: EvalResult | None = None
    try:
        while progress(state, t) < 1.0:
            t0 = time.perf_counter()
            lr = t.lr * lr_factor(progress(state, t, ahead=1), t)
            for group in opt.param_groups:
                group["lr"] = lr
            ids, _ = train_seqs.get(sampler.take(t.batch_size))
            ids_t = torch.from_numpy(ids).to(device, non_blocking=True)  # (B, T)
            inputs, labels = mask_tokens(ids_t, mask_token_id=tok.special.mask, vocab_size=tok.vocab_size,
                                         special_ids=special, mask_prob=cfg.mask.mask_prob,
                                         mask_token_frac=cfg.mask.mask_token_frac,
                                         random_token_frac=cfg.mask.random_token_frac, generator=mask_gen)
            # Normalise by the whole step's predicted-token count, so accumulation changes nothing.
            n_pred = (labels != -100).sum().clamp(min=1)
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), dtype=torch.long, device=device)
            for inp, lab in zip(inputs.chunk(t.grad_accum), labels.chunk(t.grad_accum)):
                with autocast(device, amp_dtype):
                    out = model(inp, labels=lab)
                (out.loss_sum / n_pred).backward()
                loss_sum += out.loss_sum.detach()
                correct += out.correct
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip_grad if t.clip_grad > 0 else math.inf)
            opt.step()
            opt.zero_grad(set_to_none=True)

            state.step += 1
            state.tokens += tokens_per_step
            state.data_position = sampler.position
            state.elapsed += time.perf_counter() - t0
            window["loss_sum"] += float(loss_sum)
            window["predicted"] += int(n_pred)
            window["correct"] += int(correct)
            window["steps"] += 1
            window["time"] += time.perf_counter() - t0

            done = progress(state, t) >= 1.0
            if state.step % t.log_every == 0 or done:
                loss = window["loss_sum"] / max(window["predicted"], 1)
                tps = window["steps"] * tokens_per_step / max(window["time"], 1e-9)
                record({"step": state.step, "loss": loss, "accuracy": window["correct"] / max(window["predicted"], 1),
                        "lr": lr, "grad_norm": float(grad_norm), "tokens_per_s": tps, "elapsed": state.elapsed,
                        "tokens": state.tokens, "epoch": sampler.epoch})
                p = progress(state, t)
                eta = state.elapsed * (1 - p) / max(p, 1e-9)
                bar.update(p, f"step {state.step} loss {loss:.3f} {tps / 1e3:.1f}k tok/s ETA {eta:.0f}s")
                window = dict.fromkeys(window, 0)
            if (t.eval_every and state.step % t.eval_every == 0) or done:
                last_eval = evaluator(model, device, amp_dtype)
                record({"step": state.step, "split": "valid", **last_eval.as_dict(), "elapsed": state.elapsed})
    finally:
        bar.close()
        metrics.close()

    assert last_eval is not None
    checkpoint.save_weights(model, run_dir / checkpoint.WEIGHTS)
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
