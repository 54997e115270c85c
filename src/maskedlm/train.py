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
from .data import Batch, BatchLoader, PackedSequences, PackedSource, PairSource, prepare
from .errors import UserError
from .evaluate import EvalResult, Evaluator
from .flops import matmul_peak, train_flops
from .hf import export_model
from .fill_mask import sample_view
from .masking import MaskSpec
from .model import BertForPreTraining
from .runtime import resolve_device, resolve_precision
from .tokenizer import Tokenizer


@dataclass
class TrainState:
    """Everything about the run's position that is not in the weights and optimizer (plain values)."""

    step: int = 0
    tokens: int = 0  # training tokens consumed
    elapsed: float = 0.0  # seconds spent training (evaluations excluded)
    data_position: int | list[int] | None = 0  # the data source's position in its phase (see data.py)
    phase: int = 0  # index in the sequence-length schedule
    skipped_steps: int = 0  # steps whose update was skipped (non-finite loss or gradient)


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

    loss_sum: torch.Tensor  # summed MLM cross-entropy
    predicted: torch.Tensor
    correct: torch.Tensor
    grad_norm: torch.Tensor
    skipped: bool = False  # the loss or gradient was not finite: no update was made
    nsp_loss_sum: torch.Tensor | None = None  # summed NSP / SOP cross-entropy over the batch's sequences
    nsp_correct: torch.Tensor | None = None
    sequences: int = 0


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

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One micro-batch on the compute copy: (summed MLM loss, correct count, hidden states)."""
        hidden = self.encoder(inputs, attention_mask, token_type_ids)
        loss, correct = self.compute.mlm_loss(hidden, labels)
        return loss, correct, hidden

    def __call__(self, batch: Batch | torch.Tensor, lr: float | None = None) -> StepStats:
        if isinstance(batch, torch.Tensor):
            batch = Batch(batch)
        if lr is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        self.compute.train(self.model.training)
        inputs, labels = self.mask(batch.input_ids, self.generator)  # (B, T) each
        n_seq = inputs.shape[0]
        n_pred = (labels != -100).sum().clamp(min=1)
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), dtype=torch.long, device=self.device)
        nsp = batch.nsp_labels is not None
        nsp_sum = torch.zeros((), device=self.device) if nsp else None
        nsp_correct = torch.zeros((), dtype=torch.long, device=self.device) if nsp else None

        def part(t: torch.Tensor | None, i: int) -> torch.Tensor | None:
            return None if t is None else t.chunk(self.grad_accum)[i]

        for i in range(self.grad_accum):
            out_loss, out_correct, hidden = self.forward(part(inputs, i), part(labels, i),
                                                         part(batch.attention_mask, i), part(batch.token_type_ids, i))
            loss = out_loss / n_pred
            if nsp:
                logits = self.compute.nsp(self.compute.bert.pool(hidden)).float()  # (b, 2)
                targets = part(batch.nsp_labels, i)
                s = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
                loss = loss + s / n_seq  # both means are over the whole step's counts
                nsp_sum += s.detach()
                nsp_correct += (logits.argmax(-1) == targets).sum()
            loss.backward()
            self._accumulate_grads(first=i == 0)
            loss_sum += out_loss.detach().float()
            correct += out_correct
        clip = self.clip_grad if self.clip_grad > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, clip, foreach=True)
        # A non-finite loss or gradient skips the update (weights and optimizer state stay as they were).
        finite = torch.isfinite(loss_sum) & torch.isfinite(grad_norm)
        if nsp:
            finite &= torch.isfinite(nsp_sum)
        finite = bool(finite)
        if finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if finite and self.compute is not self.model:
            with torch.no_grad():
                torch._foreach_copy_(self.compute_params, self.params)
        return StepStats(loss_sum, n_pred, correct, grad_norm, not finite, nsp_sum, nsp_correct, n_seq)

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


# Settings that change what a run computes: a resume that changes them is refused unless allowed.
RESUME_FIXED = {
    "model": ["num_layers", "hidden_size", "num_heads", "intermediate_size", "max_position", "type_vocab_size",
              "vocab_size"],
    "data": ["corpus", "train", "valid", "valid_fraction", "doc_boundary", "text_field", "tokenizer", "vocab_size",
             "lowercase", "seq_len"],
    "mask": ["mask_prob", "mask_token_frac", "random_token_frac"],
    "train": ["batch_size", "seed", "init_from"],
}


def resume_differences(saved: Config, new: Config) -> list[str]:
    """'section.field: old -> new' for every RESUME_FIXED setting that differs."""
    out = []
    for section, names in RESUME_FIXED.items():
        for name in names:
            a, b = getattr(getattr(saved, section), name), getattr(getattr(new, section), name)
            if a != b:
                out.append(f"{section}.{name}: {a!r} -> {b!r}")
    return out


def _rng_snapshot(mask_gen: torch.Generator) -> tuple[dict[str, torch.Tensor], dict]:
    import random

    import numpy as np

    tensors = {"torch_cpu": torch.get_rng_state(), "mask": mask_gen.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    py = random.getstate()
    np_state = np.random.get_state()
    plain = {"python": [py[0], list(py[1]), py[2]],
             "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    return tensors, plain


def _rng_restore(tensors: dict[str, torch.Tensor], plain: dict, mask_gen: torch.Generator) -> None:
    import random

    import numpy as np

    torch.set_rng_state(tensors["torch_cpu"])
    mask_gen.set_state(tensors["mask"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    py = plain["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = plain["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))


def _install_signal_handlers(flag: dict):
    """SIGTERM / SIGINT set flag['signal']; the loop finishes its step, checkpoints and exits. A second
    signal interrupts at once. Only possible from the main thread (returns {} elsewhere)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}

    def handler(signum, _frame):
        if flag["signal"] is not None:
            raise KeyboardInterrupt
        flag["signal"] = signum

    return {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}


@dataclass
class RunResult:
    run_dir: Path
    eval: EvalResult | None  # None when stopped by a signal
    steps: int
    elapsed: float
    tokens_per_second: float
    stopped_by: str | None = None  # 'SIGTERM' or 'SIGINT' when a signal ended the run early
    checkpoint: Path | None = None


def pretrain(cfg: Config, log=print, progress_bar: bool | None = None) -> RunResult:
    """Pre-train a model as configured (or resume one); returns the run folder and final held-out metrics."""
    import signal

    cfg = cfg.resolved()
    t = cfg.train
    device = resolve_device(t.device)
    amp_dtype = resolve_precision(t.precision, device)

    ckpt = checkpoint.read_checkpoint(t.resume) if t.resume else None
    init_model = init_tok = None
    if ckpt is not None:
        saved = Config.from_dict(ckpt.state["config"], allow_derived=True)
        # The shape comes from the run; only then compare what the user asked for with what it was.
        cfg.model.vocab_size, cfg.model.pad_token_id = saved.model.vocab_size, saved.model.pad_token_id
        diffs = resume_differences(saved, cfg)
        if diffs and not t.allow_config_change:
            raise UserError(f"--resume would change the run: {'; '.join(diffs)} (pass --allow-config-change to accept)")
        run_dir = ckpt.path.parent.parent
        t.out = str(run_dir)
        init_tok = Tokenizer.from_file(run_dir / checkpoint.TOKENIZER)
        if init_tok.hash != ckpt.state["tokenizer_hash"]:
            raise UserError(f"{run_dir}: tokenizer.json has hash {init_tok.hash[:12]}, the checkpoint was trained "
                            f"with {ckpt.state['tokenizer_hash'][:12]}")
        log(f"resuming {run_dir} from {ckpt.path.name} (step {ckpt.state['step']})"
            + (f"; changed: {'; '.join(diffs)}" if diffs else ""))
    else:
        run_dir = new_run_dir(t.out)
        t.out = str(run_dir)
        if t.init_from:
            # Continued pre-training: the checkpoint's shape, weights and tokenizer; this run's dropout.
            init_model, init_tok, note = checkpoint.load_for_init(t.init_from)
            dropout = cfg.model.hidden_dropout, cfg.model.attention_dropout
            cfg.model = dataclasses.replace(init_model.config, preset=None)
            cfg.model.hidden_dropout, cfg.model.attention_dropout = dropout
            log(f"{t.init_from}: {note}")

    data = prepare(cfg.data, tokenizer=init_tok, log=log)
    tok = data.tokenizer
    if init_tok is None:
        cfg.model.vocab_size, cfg.model.pad_token_id = tok.vocab_size, tok.special.pad
    if data.meta["max_token_id"] >= cfg.model.vocab_size:
        raise UserError(f"{data.folder}: token id {data.meta['max_token_id']} >= the model's vocabulary of {cfg.model.vocab_size}")
    if cfg.data.seq_len > cfg.model.max_position:
        raise UserError(f"--seq-len {cfg.data.seq_len} exceeds the model's {cfg.model.max_position} positions")
    seq_len = cfg.data.seq_len
    phases = cfg.seq_len_phases()  # [(length, end of phase in progress)]
    pair_objective = {"mlm": None, "mlm+nsp": "nsp", "mlm+sop": "sop"}[t.objective]

    def phase_batch(length: int) -> int:
        """Sequences per step in a phase: the same number of tokens as at the final length, if asked."""
        if not t.schedule_keep_tokens or length == seq_len:
            return t.batch_size
        return max(t.grad_accum, round(t.batch_size * seq_len / length / t.grad_accum) * t.grad_accum)

    def make_source(phase: int, position):
        length = phases[phase][0]
        if pair_objective:
            return PairSource(data.train, length, tok.special, pair_objective, t.seed, position or (0, 0),
                              cfg.data.short_seq_prob, stream=phase)
        return PackedSource(PackedSequences(data.train, length, tok.special), t.seed, position or 0, stream=phase)

    valid_seqs = PackedSequences(data.valid, seq_len, tok.special, pad_last=True, what="held-out")
    valid_pairs = (PairSource(data.valid, seq_len, tok.special, pair_objective, t.eval_seed,
                              short_seq_prob=cfg.data.short_seq_prob) if pair_objective else None)
    evaluator = Evaluator(valid_seqs, tok, cfg.mask, t.eval_sequences, t.eval_seed, pairs=valid_pairs)

    torch.manual_seed(t.seed)
    model = BertForPreTraining(cfg.model)
    if init_model is not None:
        model.load_state_dict(init_model.state_dict())
    if ckpt is not None:
        model.load_state_dict(ckpt.weights)
    model.to(device).train()
    opt = make_optimizer(model, t)
    mask_gen = torch.Generator(device=device).manual_seed(t.seed)
    state = TrainState()
    if ckpt is not None:
        checkpoint.restore_optimizer(opt, ckpt)
        state = TrainState(**ckpt.state["train_state"])
        _rng_restore(ckpt.rng, ckpt.state["rng"], mask_gen)
    def phase_at(p: float) -> int:
        return next(i for i, (_, end) in enumerate(phases) if p < end or i == len(phases) - 1)

    def open_loader(phase: int, position) -> BatchLoader:
        return BatchLoader(make_source(phase, position), phase_batch(phases[phase][0]), pin=device.type == "cuda",
                           max_id=cfg.model.vocab_size)

    phase = phase_at(progress(state, t))
    loader = open_loader(phase, state.data_position if phase == state.phase else None)
    state.phase = phase
    train_sequences = len(PackedSequences(data.train, seq_len, tok.special)) if not pair_objective else len(
        loader.source.instances(0))

    checkpoint.save_config(cfg, run_dir / checkpoint.CONFIG)
    tok.save(run_dir)
    metrics = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")

    def record(entry: dict) -> None:
        metrics.write(json.dumps(entry) + "\n")
        metrics.flush()

    last_ckpt: Path | None = ckpt.path if ckpt is not None else None
    protect = ckpt.path.name if ckpt is not None else None

    def save(final: bool = False) -> None:
        nonlocal last_ckpt
        tensors, plain = _rng_snapshot(mask_gen)
        payload = {"format": 1, "step": state.step, "train_state": asdict(state), "config": cfg.to_dict(),
                   "tokenizer_hash": tok.hash, "world_size": 1, "rng": plain}
        try:
            last_ckpt = checkpoint.save_checkpoint(run_dir, step=state.step, model=model, optimizer=opt,
                                                   state=payload, rng_tensors=tensors, keep=t.keep_checkpoints,
                                                   protect=protect)
        except OSError as e:
            if final:
                raise UserError(f"could not write the final checkpoint ({e.strerror or e}); "
                                f"the last good one is {last_ckpt or 'none'}") from None
            log(f"warning: checkpoint at step {state.step} failed ({e.strerror or e}); "
                f"the previous one ({last_ckpt.name if last_ckpt else 'none'}) is intact; training goes on")

    stop = f"{t.max_steps} steps" if t.max_steps else ""
    if t.time_budget:
        stop += (" or " if stop else "") + f"{t.time_budget:g}s"
    log(f"model: {cfg.model.preset or 'custom'} ({cfg.model.num_layers}L/{cfg.model.hidden_size}H, "
        f"{model.num_parameters() / 1e6:.1f}M parameters), vocab {cfg.model.vocab_size}, seq {seq_len}, "
        f"batch {t.batch_size}, on {device} ({'bf16 mixed precision' if amp_dtype else 'fp32'}); "
        f"{train_sequences:,} training {'pairs' if pair_objective else 'sequences'}"
        + (f" (length schedule {t.seq_len_schedule})" if t.seq_len_schedule else "")
        + (f"; objective {t.objective}" if pair_objective else "") + f"; stop at {stop}; run folder {run_dir}")

    step_fn = TrainStep(model, opt, MaskSpec.from_tokenizer(tok, cfg.mask), mask_gen, grad_accum=t.grad_accum,
                        clip_grad=t.clip_grad, amp_dtype=amp_dtype, compile=t.compile)
    if t.compile:
        secs = sum(step_fn.compile_now(phase_batch(length), length) for length, _ in phases)
        log(f"compiled the encoder in {secs:.1f}s (not counted as training time)")
    # MFU against this machine's measured matmul peak in the training precision (maskedlm/flops.py).
    peak = matmul_peak(device.type, amp_dtype or torch.float32)
    bar = _Progress(progress_bar)
    window = dict.fromkeys(["loss_sum", "predicted", "correct", "steps", "time", "data_time", "tokens", "flops",
                            "nsp_sum", "nsp_correct", "sequences"], 0.0)
    last_eval: EvalResult | None = None
    last_save_time = time.time()
    nonfinite_run = 0
    flag: dict = {"signal": None}
    old_handlers = _install_signal_handlers(flag)
    try:
        while progress(state, t) < 1.0 and flag["signal"] is None:
            t0 = time.perf_counter()
            p_next = progress(state, t, ahead=1)
            if (new_phase := phase_at(progress(state, t))) != state.phase:  # the next length of the curriculum
                loader.close()
                loader = open_loader(new_phase, None)
                state.phase, state.data_position = new_phase, None
                log(f"step {state.step}: sequence length {phases[new_phase][0]}, batch {loader.batch_size}")
            lr = t.lr * lr_factor(p_next, t)
            batch, position = loader.next()
            t_data = time.perf_counter() - t0
            stats = step_fn(batch.to(device, non_blocking=True), lr)

            step_tokens = batch.input_ids.numel()
            state.step += 1
            state.tokens += step_tokens
            state.data_position = position
            state.elapsed += time.perf_counter() - t0
            if stats.skipped:
                state.skipped_steps += 1
                nonfinite_run += 1
                log(f"warning: step {state.step}: non-finite loss or gradient norm; update skipped")
                if nonfinite_run >= t.max_nonfinite:
                    raise UserError(f"{nonfinite_run} consecutive steps had a non-finite loss or gradient (last: step "
                                    f"{state.step}); stopped. Last good checkpoint: {last_ckpt or 'none'} "
                                    "(lower --lr, or check the data)")
                continue
            nonfinite_run = 0
            window["loss_sum"] += float(stats.loss_sum)
            window["predicted"] += int(stats.predicted)
            window["correct"] += int(stats.correct)
            window["steps"] += 1
            window["time"] += time.perf_counter() - t0
            window["data_time"] += t_data
            window["tokens"] += step_tokens
            window["flops"] += train_flops(cfg.model, batch.input_ids.shape[0], batch.input_ids.shape[1], int(stats.predicted))
            if stats.nsp_loss_sum is not None:
                window["nsp_sum"] += float(stats.nsp_loss_sum)
                window["nsp_correct"] += int(stats.nsp_correct)
                window["sequences"] += stats.sequences

            done = progress(state, t) >= 1.0
            if state.step % t.log_every == 0 or done:
                n = max(window["steps"], 1)
                loss = window["loss_sum"] / max(window["predicted"], 1)
                tps = window["tokens"] / max(window["time"], 1e-9)
                mfu = window["flops"] / max(window["time"], 1e-9) / peak
                entry = {"step": state.step, "loss": loss, "accuracy": window["correct"] / max(window["predicted"], 1),
                         "lr": lr, "grad_norm": float(stats.grad_norm), "tokens_per_s": tps, "mfu": mfu,
                         "elapsed": state.elapsed, "tokens": state.tokens, "epoch": loader.source.epoch,
                         "seq_len": batch.input_ids.shape[1], "step_ms": 1e3 * window["time"] / n,
                         "data_ms": 1e3 * window["data_time"] / n, "skipped_steps": state.skipped_steps}
                if window["sequences"]:
                    entry["nsp_loss"] = window["nsp_sum"] / window["sequences"]
                    entry["nsp_accuracy"] = window["nsp_correct"] / window["sequences"]
                record(entry)
                p = progress(state, t)
                eta = state.elapsed * (1 - p) / max(p, 1e-9)
                bar.update(p, f"step {state.step} loss {loss:.3f} {tps / 1e3:.1f}k tok/s MFU {mfu:.0%} ETA {eta:.0f}s")
                window = dict.fromkeys(window, 0.0)
            if (t.eval_every and state.step % t.eval_every == 0) or done:
                last_eval = evaluator(model, device, amp_dtype)
                record({"step": state.step, "split": "valid", **last_eval.as_dict(), "elapsed": state.elapsed})
            if not done and ((t.checkpoint_every and state.step % t.checkpoint_every == 0)
                             or (t.checkpoint_minutes and time.time() - last_save_time >= 60 * t.checkpoint_minutes)):
                save()
                last_save_time = time.time()
        if flag["signal"] is not None:
            save(final=True)
            name = signal.Signals(flag["signal"]).name
            log(f"stopped by {name} at step {state.step}; checkpoint {last_ckpt}; "
                f"resume with: maskedlm pretrain --resume {run_dir}")
            return RunResult(run_dir, None, state.step, state.elapsed, state.tokens / max(state.elapsed, 1e-9),
                             stopped_by=name, checkpoint=last_ckpt)
    finally:
        import signal as _signal

        for s, h in old_handlers.items():
            _signal.signal(s, h)
        loader.close()
        bar.close()
        metrics.close()

    if last_eval is None:  # resumed a run that had already finished
        last_eval = evaluator(model, device, amp_dtype)
    save(final=True)
    checkpoint.save_weights(model, run_dir / checkpoint.WEIGHTS)
    export_model(model, tok, run_dir / "hf", nsp=pair_objective is not None,
                 lowercase=cfg.data.lowercase if cfg.data.tokenizer == "wordpiece" else None)
    checkpoint.atomic_write_text(run_dir / "eval.json", json.dumps(
        {"step": state.step, **last_eval.as_dict(), "train_state": asdict(state)}, indent=2) + "\n")
    tps = state.tokens / max(state.elapsed, 1e-9)
    log(f"done: {state.step} steps, {state.tokens:,} tokens in {state.elapsed:.0f}s ({tps / 1e3:.1f}k tokens/s)"
        + (f"; {state.skipped_steps} step(s) skipped (non-finite)" if state.skipped_steps else ""))
    log(f"held-out: loss {last_eval.loss:.3f}, masked-token accuracy {last_eval.accuracy:.1%}, "
        f"perplexity {last_eval.perplexity:.1f} ({last_eval.predicted:,} predictions)")
    if t.sample:
        model.eval()
        log(sample_view(model, tok, data.valid.tokens, mask_prob=cfg.mask.mask_prob, seed=t.eval_seed,
                        color=sys.stdout.isatty(), amp_dtype=amp_dtype))
    log(f"saved to {run_dir}")
    return RunResult(run_dir, last_eval, state.step, state.elapsed, tps, checkpoint=last_ckpt)
