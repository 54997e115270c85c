"""Pre-training: the loop, the learning-rate schedule and the run folder.

One optimizer step: take the next `batch_size` packed sequences (their indices come from the epoch sampler,
whose state is a single integer), mask them on the training device with the run's generator, run forward
and backward over `grad_accum` micro-batches with the loss normalised by the step's total number of
predicted tokens, clip, step. The schedule is a function of progress in [0, 1] — steps done over
`max_steps`, or training seconds over `time_budget`, whichever is further — so a time-budgeted run always
completes its warmup and decay.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import checkpoint
from .config import Config, MaskConfig, TrainConfig, parse_batch_ramp
from .batches import Batch, BatchLoader, PackedSequences, PackedSource, PairSource
from .data import prepare
from .errors import UserError
from .evaluate import EvalResult, Evaluator
from .flops import matmul_peak, train_flops
from .hf import export_model
from .fill import sample_view
from .masking import MaskSpec
from . import distributed
from .distributed import Dist
from .model import BertForPreTraining, Output
from .optim import Lamb, param_groups
from .progress import Progress
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


def make_optimizer(model: torch.nn.Module, t: TrainConfig) -> torch.optim.Optimizer:
    """AdamW, fused (one kernel over all parameters) on CPU and CUDA, foreach elsewhere; or LAMB."""
    groups = param_groups(model, t.weight_decay)
    if t.optimizer == "lamb":
        return Lamb(groups, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps)
    device = next(model.parameters()).device
    sharded = any(hasattr(p, "full_tensor") for p in model.parameters())  # FSDP's DTensors: foreach
    fused = device.type in ("cpu", "cuda") and not sharded
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps, fused=fused,
                             foreach=None if fused else True)


def batch_at(progress: float, full: int, ramp: str | None, unit: int) -> int:
    """Sequences in the step at `progress`: the batch-size ramp (linear from START to `full` over FRACTION of
    the run), rounded down to a multiple of `unit` (ranks x micro-batches), at least one unit."""
    if not ramp:
        return full
    start, frac = parse_batch_ramp(ramp)
    b = start + (full - start) * min(1.0, max(progress, 0.0) / frac) if start < full else full
    return max(unit, int(b) // unit * unit)


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
    """One optimizer step: mask on the device, forward and backward over the micro-batches with the loss
    normalised by the step's global count of predicted tokens (and of sequences, for NSP), clip, update.

    `pretrain` and the benchmarks both call this, so the benchmarks measure the real step.

    Mixed precision: with `amp_dtype` (bf16), forward and backward run on a bf16 copy of the model while
    `model` keeps the fp32 master weights that the optimizer updates and that checkpoints save; after each
    step the copy is refreshed. Unlike autocast, which re-casts weights and activations around every
    operation, activations stay bf16 end to end (norms and softmaxes still accumulate in fp32).

    Data parallelism is applied here, from outside the model: under torchrun the compute copy is wrapped in
    DistributedDataParallel (gradients all-reduced; `no_sync` during accumulation). Each rank holds its
    rows of the global batch; masks are drawn for the whole global batch from the shared generator and
    each rank keeps its rows, so N ranks with batch b see exactly the masks one process with batch N*b
    would. Losses are divided by the all-reduced global counts, so the gradient is the same too.

    With `compile`, the encoder (fixed batch and sequence shapes) is compiled in place; the MLM head, whose
    number of rows varies with the mask, stays eager, so nothing recompiles from step to step.
    """

    def __init__(self, model: BertForPreTraining, optimizer: torch.optim.Optimizer, mask: MaskSpec,
                 generator: torch.Generator, *, grad_accum: int = 1, clip_grad: float = 1.0,
                 amp_dtype: torch.dtype | None = None, compile: bool = False, nsp: bool = False,
                 dist: Dist = Dist(), fsdp: bool = False):
        self.model, self.optimizer, self.mask, self.generator = model, optimizer, mask, generator
        self.grad_accum, self.clip_grad, self.dist = grad_accum, clip_grad, dist
        self.device = next(model.parameters()).device
        self.fsdp = fsdp  # the model is already sharded, with its own mixed precision (distributed.apply_fsdp)
        self.compute = copy.deepcopy(model).to(amp_dtype) if amp_dtype is not None else model
        if not nsp and not fsdp:  # no gradient ever reaches these: DDP must not wait for them
            for p in [*self.compute.bert.pooler.parameters(), *self.compute.nsp.parameters()]:
                p.requires_grad_(False)
        self.params = list(model.parameters())
        self.compute_params = list(self.compute.parameters())
        if compile:
            self.compute.bert.compile(dynamic=False)
        self.encoder = self.compute.bert
        self.runner: torch.nn.Module = self.compute
        if dist.active and not fsdp:
            from torch.nn.parallel import DistributedDataParallel

            self.runner = DistributedDataParallel(self.compute, device_ids=[self.device.index]
                                                  if self.device.type == "cuda" else None)

    def compile_now(self, batch_size: int, seq_len: int) -> float:
        """Compile the encoder before training (forward and backward on a throwaway batch), so compilation
        time is reported on its own. Weights, optimizer state and generators are left untouched.
        Returns the seconds it took."""
        t0 = time.perf_counter()
        rows = batch_size // self.grad_accum // self.dist.world
        ids = torch.randint(0, self.mask.vocab_size, (rows, seq_len), device=self.device)
        self.encoder(ids).float().sum().backward()
        for p in self.compute_params:
            p.grad = None
        return time.perf_counter() - t0

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, nsp: bool = False) -> Output:
        """One micro-batch through the compute copy (and DDP): summed MLM loss, correct count, NSP logits."""
        return self.runner(inputs, attention_mask=attention_mask, token_type_ids=token_type_ids, labels=labels, nsp=nsp)

    def _mask(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks for this rank's rows, equal to those one process would draw for the global batch."""
        if not self.dist.active:
            return self.mask(ids, self.generator)
        rows, r = ids.shape[0], self.dist.rank
        full = torch.full((rows * self.dist.world, ids.shape[1]), self.mask.special_ids[0], dtype=ids.dtype,
                          device=ids.device)  # other ranks' rows: padding, never selected
        full[r * rows:(r + 1) * rows] = ids
        inputs, labels = self.mask(full, self.generator)
        return inputs[r * rows:(r + 1) * rows], labels[r * rows:(r + 1) * rows]

    def __call__(self, batch: Batch | torch.Tensor, lr: float | None = None) -> StepStats:
        if isinstance(batch, torch.Tensor):
            batch = Batch(batch)
        if lr is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        self.compute.train(self.model.training)
        world = self.dist.world
        inputs, labels = self._mask(batch.input_ids)  # (b, T) each: this rank's rows
        n_seq = inputs.shape[0] * world  # global
        n_pred = self.dist.all_reduce((labels != -100).sum()).clamp(min=1)  # global
        nsp = batch.nsp_labels is not None
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)  # mlm loss, correct, nsp loss, nsp correct

        def part(t: torch.Tensor | None, i: int) -> torch.Tensor | None:
            return None if t is None else t.chunk(self.grad_accum)[i]

        for i in range(self.grad_accum):
            # no_sync() only where the gradients stay in place until the last micro-batch: a bf16 compute
            # copy's are moved into the fp32 master gradients after each one, so each must be all-reduced.
            sync = i == self.grad_accum - 1 or not self.dist.active or self.compute is not self.model
            if self.fsdp:
                self.runner.set_requires_gradient_sync(sync)
            with contextlib.nullcontext() if sync or self.fsdp else self.runner.no_sync():
                out = self.forward(part(inputs, i), part(labels, i), part(batch.attention_mask, i),
                                   part(batch.token_type_ids, i), nsp=nsp)
                loss = out.loss_sum / n_pred
                if nsp:
                    logits, targets = out.nsp_logits.float(), part(batch.nsp_labels, i)
                    nsp_loss = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
                    loss = loss + nsp_loss / n_seq  # both are means over the whole step's global counts
                    sums[2] += nsp_loss.detach().double()
                    sums[3] += (logits.argmax(-1) == targets).sum()
                # DDP averages gradients over ranks; the losses above are already global means.
                (loss * world).backward()
            self._accumulate_grads(first=i == 0)
            sums[0] += out.loss_sum.detach().double()
            sums[1] += out.correct
        self.dist.all_reduce(sums)
        clip = self.clip_grad if self.clip_grad > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, clip, foreach=True)
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
            grad_norm = grad_norm.full_tensor()
        # A non-finite loss or gradient skips the update (weights and optimizer state stay as they were).
        # Every rank sees the same all-reduced values, so all of them skip together.
        finite = bool(torch.isfinite(sums).all() & torch.isfinite(grad_norm))
        if finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if finite and self.compute is not self.model:
            with torch.no_grad():
                torch._foreach_copy_(self.compute_params, self.params)
        return StepStats(sums[0], n_pred, sums[1], grad_norm, not finite, sums[2] if nsp else None,
                         sums[3] if nsp else None, n_seq)

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


# Settings that change what a run computes: a resume that changes them is refused unless allowed.
RESUME_FIXED = {
    "model": ["num_layers", "hidden_size", "num_heads", "intermediate_size", "max_position", "type_vocab_size",
              "vocab_size", "linear_bias"],
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


def _rng_restore(tensors: dict[str, torch.Tensor], plain: dict, mask_gen: torch.Generator, rank: int = 0) -> None:
    """Each rank takes back its own generator states (rank 0's when the world size changed)."""
    import random

    import numpy as np

    def of(r: int) -> dict[str, torch.Tensor]:
        return {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(f"rank{r}.")}

    states = of(rank) or of(0)
    torch.set_rng_state(states["torch_cpu"])
    mask_gen.set_state(tensors["mask"])
    cuda = [states[k] for k in sorted(k for k in states if k.startswith("cuda."))]
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
    """Pre-train a model as configured (or resume one); returns the run folder and final held-out metrics.

    Under torchrun every rank calls this; rank 0 logs and writes the run folder."""
    cfg = cfg.resolved()
    device = resolve_device(cfg.train.device)
    started_group = not torch.distributed.is_initialized()
    d = distributed.init(device.type, cfg.train.dist_timeout)
    try:
        if device.type == "cuda" and d.active:
            device = torch.device("cuda", d.local_rank)
        run = _Run(cfg, device, d, log if d.is_main else (lambda *a, **k: None), progress_bar if d.is_main else False)
        return run.train()
    finally:
        if started_group:
            distributed.shutdown()


class _Run:
    """One pre-training run: set up from a config (or a checkpoint), the loop, checkpoints, the end."""

    def __init__(self, cfg: Config, device: torch.device, d: Dist, log, progress_bar):
        t = cfg.train
        self.cfg, self.t, self.device, self.dist, self.log, self.progress_bar = cfg, t, device, d, log, progress_bar
        self.amp_dtype = resolve_precision(t.precision, device)
        if t.batch_size % (d.world * t.grad_accum):
            raise UserError(f"--batch-size {t.batch_size} must divide by world size x --grad-accum ({d.world} x {t.grad_accum})")

        ckpt = checkpoint.read_checkpoint(t.resume) if t.resume else None
        init_model = init_tok = None
        if ckpt is not None:
            saved = Config.from_dict(ckpt.state["config"], allow_derived=True)
            # The shape comes from the run; only then compare what the user asked for with what it was.
            cfg.model.vocab_size, cfg.model.pad_token_id = saved.model.vocab_size, saved.model.pad_token_id
            diffs = resume_differences(saved, cfg)
            if ckpt.state.get("world_size", 1) != d.world:
                diffs.append(f"world size: {ckpt.state.get('world_size', 1)} -> {d.world}")
            if diffs and not t.allow_config_change:
                raise UserError(f"--resume would change the run: {'; '.join(diffs)} (pass --allow-config-change to accept)")
            self.run_dir = ckpt.path.parent.parent
            init_tok = Tokenizer.from_file(self.run_dir / checkpoint.TOKENIZER)
            if init_tok.hash != ckpt.state["tokenizer_hash"]:
                raise UserError(f"{self.run_dir}: tokenizer.json has hash {init_tok.hash[:12]}, the checkpoint was "
                                f"trained with {ckpt.state['tokenizer_hash'][:12]}")
            log(f"resuming {self.run_dir} from {ckpt.path.name} (step {ckpt.state['step']})"
                + (f"; changed: {'; '.join(diffs)}" if diffs else ""))
        else:
            self.run_dir = Path(d.broadcast_object(str(new_run_dir(t.out)) if d.is_main else None))
            if t.init_from:
                # Continued pre-training: the checkpoint's shape, weights and tokenizer; this run's dropout.
                init_model, init_tok, note = checkpoint.load_for_init(t.init_from)
                dropout = cfg.model.hidden_dropout, cfg.model.attention_dropout
                cfg.model = dataclasses.replace(init_model.config, preset=None)
                cfg.model.hidden_dropout, cfg.model.attention_dropout = dropout
                log(f"{t.init_from}: {note}")
        t.out = str(self.run_dir)

        # Rank 0 prepares (or finds) the data; the others then read the same cache.
        if not d.is_main:
            d.barrier()
        data = prepare(cfg.data, tokenizer=init_tok, log=log)
        if d.is_main:
            d.barrier()
        self.data, self.tok = data, data.tokenizer
        if init_tok is None:
            cfg.model.vocab_size, cfg.model.pad_token_id = self.tok.vocab_size, self.tok.special.pad
        if data.meta["max_token_id"] >= cfg.model.vocab_size:
            raise UserError(f"{data.folder}: token id {data.meta['max_token_id']} >= the model's vocabulary of "
                            f"{cfg.model.vocab_size}")
        if cfg.data.seq_len > cfg.model.max_position:
            raise UserError(f"--seq-len {cfg.data.seq_len} exceeds the model's {cfg.model.max_position} positions")
        self.phases = cfg.seq_len_phases()  # [(length, end of the phase in progress)]
        self.pairs = {"mlm": None, "mlm+nsp": "nsp", "mlm+sop": "sop"}[t.objective]
        seq_len, special = cfg.data.seq_len, self.tok.special
        valid_pairs = None
        if self.pairs:
            try:
                valid_pairs = PairSource(data.valid, seq_len, special, self.pairs, t.eval_seed,
                                         short_seq_prob=cfg.data.short_seq_prob)
            except UserError as e:  # e.g. one held-out document: no random B for NSP
                log(f"note: no held-out {self.pairs.upper()} accuracy ({e})")
        # FSDP shards the model: evaluation then needs every rank in every forward (no sharding of batches).
        self.fsdp = t.parallel == "fsdp" and d.active
        self.evaluator = Evaluator(PackedSequences(data.valid, seq_len, special, pad_last=True, what="held-out"),
                                   self.tok, cfg.mask, t.eval_sequences, t.eval_seed, pairs=valid_pairs,
                                   dist=Dist() if self.fsdp else d)

        torch.manual_seed(t.seed)
        model = BertForPreTraining(cfg.model)
        if init_model is not None:
            model.load_state_dict(init_model.state_dict())
        if ckpt is not None:
            model.load_state_dict(ckpt.weights)
        self.model = model.to(device).train()
        if self.fsdp:  # parallelism from outside the model, before the optimizer sees the (sharded) parameters
            distributed.apply_fsdp(model, self.amp_dtype)
        self.opt = make_optimizer(model, t)
        self.mask_gen = torch.Generator(device=device).manual_seed(t.seed)
        self.state = TrainState()
        if ckpt is not None:
            distributed.load_optimizer_state(model, self.opt, checkpoint.optimizer_state(ckpt), self.fsdp)
            self.state = TrainState(**ckpt.state["train_state"])
            _rng_restore(ckpt.rng, ckpt.state["rng"], self.mask_gen, d.rank)
        self.last_ckpt: Path | None = ckpt.path if ckpt is not None else None
        self.protect = ckpt.path.name if ckpt is not None else None

        phase = self.phase_at(progress(self.state, t))
        self.loader = self.open_loader(phase, self.state.data_position if phase == self.state.phase else None)
        self.state.phase = phase
        self.step_fn = TrainStep(model, self.opt, MaskSpec.from_tokenizer(self.tok, cfg.mask), self.mask_gen,
                                 grad_accum=t.grad_accum, clip_grad=t.clip_grad,
                                 amp_dtype=None if self.fsdp else self.amp_dtype, compile=t.compile,
                                 nsp=self.pairs is not None, dist=d, fsdp=self.fsdp)
        if d.is_main:
            checkpoint.save_config(cfg, self.run_dir / checkpoint.CONFIG)
            self.tok.save(self.run_dir)

    # -- data -------------------------------------------------------------------------------------------------

    def phase_at(self, p: float) -> int:
        return next(i for i, (_, end) in enumerate(self.phases) if p < end or i == len(self.phases) - 1)

    def phase_batch(self, length: int) -> int:
        """Sequences per step in a phase (global): the same number of tokens as at the final length, if asked."""
        t, seq_len, unit = self.t, self.cfg.data.seq_len, self.t.grad_accum * self.dist.world
        if not t.schedule_keep_tokens or length == seq_len:
            return t.batch_size
        return max(unit, round(t.batch_size * seq_len / length / unit) * unit)

    def batch_now(self, phase: int) -> int:
        """Global sequences in the next step: the phase's batch, under the batch-size ramp if any."""
        full = self.phase_batch(self.phases[phase][0])
        return batch_at(progress(self.state, self.t), full, self.t.batch_ramp, self.t.grad_accum * self.dist.world)

    def open_loader(self, phase: int, position) -> BatchLoader:
        t, length, special = self.t, self.phases[phase][0], self.tok.special
        if self.pairs:
            source = PairSource(self.data.train, length, special, self.pairs, t.seed, position or (0, 0),
                                self.cfg.data.short_seq_prob, stream=phase)
        else:
            source = PackedSource(PackedSequences(self.data.train, length, special), t.seed, position or 0, stream=phase)
        return BatchLoader(source, self.batch_now(phase), pin=self.device.type == "cuda",
                           max_id=self.cfg.model.vocab_size, shard=(self.dist.rank, self.dist.world))

    # -- checkpoints ------------------------------------------------------------------------------------------

    def save(self, final: bool = False) -> None:
        """Rank 0 writes the checkpoint; every rank contributes its own RNG state."""
        tensors, plain = _rng_snapshot(self.mask_gen)
        per_rank = self.dist.all_gather_object({k: v for k, v in tensors.items() if k != "mask"})
        weights = distributed.full_model_state(self.model, self.fsdp)  # collectives under FSDP
        opt_state = distributed.full_optimizer_state(self.model, self.opt, self.fsdp)
        if not self.dist.is_main:
            self.dist.barrier()
            return
        tensors = {"mask": tensors["mask"]}  # the masking generator is the same on every rank
        for r, states in enumerate(per_rank):
            tensors.update({f"rank{r}.{k}": v.clone() for k, v in states.items()})
        payload = {"format": 1, "step": self.state.step, "train_state": asdict(self.state), "config": self.cfg.to_dict(),
                   "tokenizer_hash": self.tok.hash, "world_size": self.dist.world, "rng": plain}
        try:
            self.last_ckpt = checkpoint.save_checkpoint(self.run_dir, step=self.state.step, weights=weights,
                                                        opt_state=opt_state, state=payload, rng_tensors=tensors,
                                                        keep=self.t.keep_checkpoints, protect=self.protect)
        except OSError as e:
            if final:
                raise UserError(f"could not write the final checkpoint ({e.strerror or e}); "
                                f"the last good one is {self.last_ckpt or 'none'}") from None
            self.log(f"warning: checkpoint at step {self.state.step} failed ({e.strerror or e}); the previous one "
                     f"({self.last_ckpt.name if self.last_ckpt else 'none'}) is intact; training goes on")
        finally:
            self.dist.barrier()

    # -- the loop ---------------------------------------------------------------------------------------------

    def train(self) -> RunResult:
        import signal

        t, state, cfg, d = self.t, self.state, self.cfg, self.dist
        stop = f"{t.max_steps} steps" if t.max_steps else ""
        if t.time_budget:
            stop += (" or " if stop else "") + f"{t.time_budget:g}s"
        src = self.loader.source
        count = len(src.instances(0)) if self.pairs else len(src.seqs)
        self.log(f"model: {cfg.model.preset or 'custom'} ({cfg.model.num_layers}L/{cfg.model.hidden_size}H, "
                 f"{self.model.num_parameters() / 1e6:.1f}M parameters), vocab {cfg.model.vocab_size}, "
                 f"seq {cfg.data.seq_len}, batch {t.batch_size}, on {self.device}"
                 f"{f' x {d.world} ranks' if d.active else ''} ({'bf16 mixed precision' if self.amp_dtype else 'fp32'}); "
                 f"{count:,} training {'pairs' if self.pairs else 'sequences'}"
                 + (f" (length schedule {t.seq_len_schedule})" if t.seq_len_schedule else "")
                 + (f"; objective {t.objective}" if self.pairs else "") + f"; stop at {stop}; run folder {self.run_dir}")
        if t.compile:
            secs = sum(self.step_fn.compile_now(self.phase_batch(n), n) for n, _ in self.phases)
            self.log(f"compiled the encoder in {secs:.1f}s (not counted as training time)")
        # MFU against this machine's measured matmul peak in the training precision (maskedlm/flops.py).
        self.peak = matmul_peak(self.device.type, self.amp_dtype or torch.float32) * d.world
        self.metrics = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") if d.is_main else None
        self.tb = None
        if t.tensorboard and d.is_main:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError("--tensorboard needs the tensorboard package (pip install tensorboard)") from None
            self.tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        bar = Progress(1000, "training", enabled=self.progress_bar)
        window = _Window()
        last_eval: EvalResult | None = None
        last_save_time = time.time()
        nonfinite_run = 0
        flag: dict = {"signal": None}
        old_handlers = _install_signal_handlers(flag)
        try:
            while progress(state, t) < 1.0:
                # Every rank stops at the same step when any of them got a signal.
                if d.all_reduce(torch.tensor(int(flag["signal"] or 0), device=self.device), "max").item():
                    flag["signal"] = flag["signal"] or signal.SIGTERM
                    break
                t0 = time.perf_counter()
                if (new_phase := self.phase_at(progress(state, t))) != state.phase:  # the curriculum's next length
                    self.loader.close()
                    self.loader = self.open_loader(new_phase, None)
                    state.phase, state.data_position = new_phase, None
                    self.log(f"step {state.step}: sequence length {self.phases[new_phase][0]}, "
                             f"batch {self.loader.batch_size}")
                elif self.t.batch_ramp and self.batch_now(state.phase) != self.loader.batch_size:
                    self.loader.close()  # the batch-size ramp moved on: continue from the data consumed so far
                    self.loader = self.open_loader(state.phase, state.data_position)
                lr = t.lr * lr_factor(progress(state, t, ahead=1), t)
                batch, position = self.loader.next()
                t_data = time.perf_counter() - t0
                stats = self.step_fn(batch.to(self.device, non_blocking=True), lr)
                step_tokens = batch.input_ids.numel() * d.world
                state.step += 1
                state.tokens += step_tokens
                state.data_position = position
                state.elapsed += time.perf_counter() - t0
                if stats.skipped:
                    state.skipped_steps += 1
                    nonfinite_run += 1
                    self.log(f"warning: step {state.step}: non-finite loss or gradient norm; update skipped")
                    if nonfinite_run >= t.max_nonfinite:
                        raise UserError(f"{nonfinite_run} consecutive steps had a non-finite loss or gradient (last: "
                                        f"step {state.step}); stopped. Last good checkpoint: {self.last_ckpt or 'none'} "
                                        "(lower --lr, or check the data)")
                    continue
                nonfinite_run = 0
                window.add(stats, time.perf_counter() - t0, t_data, step_tokens,
                           train_flops(cfg.model, batch.input_ids.shape[0] * d.world, batch.input_ids.shape[1],
                                       int(stats.predicted)))
                done = progress(state, t) >= 1.0
                if state.step % t.log_every == 0 or done:
                    entry = window.record(state, lr, stats, self.peak, self.loader.source.epoch, batch.input_ids.shape[1])
                    self.record(entry)
                    p = progress(state, t)
                    eta = state.elapsed * (1 - p) / max(p, 1e-9)
                    bar.set(int(1000 * min(p, 1.0)), f"step {state.step} loss {entry['loss']:.3f} "
                                                     f"{entry['tokens_per_s'] / 1e3:.1f}k tok/s MFU {entry['mfu']:.0%} ETA {eta:.0f}s")
                    window = _Window()
                if (t.eval_every and state.step % t.eval_every == 0) or done:
                    last_eval = self.evaluator(self.model, self.device, self.amp_dtype)
                    self.record({"step": state.step, "split": "valid", **last_eval.as_dict(), "elapsed": state.elapsed})
                if not done and ((t.checkpoint_every and state.step % t.checkpoint_every == 0)
                                 or (t.checkpoint_minutes and time.time() - last_save_time >= 60 * t.checkpoint_minutes)):
                    self.save()
                    last_save_time = time.time()
            if flag["signal"] is not None:
                self.save(final=True)
                name = signal.Signals(flag["signal"]).name
                self.log(f"stopped by {name} at step {state.step}; checkpoint {self.last_ckpt}; "
                         f"resume with: maskedlm pretrain --resume {self.run_dir}")
                return RunResult(self.run_dir, None, state.step, state.elapsed, state.tokens / max(state.elapsed, 1e-9),
                                 stopped_by=name, checkpoint=self.last_ckpt)
        finally:
            for s, h in old_handlers.items():
                signal.signal(s, h)
            self.loader.close()
            bar.close()
            if self.metrics:
                self.metrics.close()
            if self.tb is not None:
                self.tb.close()
        if last_eval is None:  # resumed a run that had already finished
            last_eval = self.evaluator(self.model, self.device, self.amp_dtype)
        return self.finish(last_eval)

    def record(self, entry: dict) -> None:
        if self.metrics:
            self.metrics.write(json.dumps(entry) + "\n")
            self.metrics.flush()
        if self.tb is not None:
            prefix = "valid/" if entry.get("split") == "valid" else "train/"
            for k, v in entry.items():
                if k not in ("step", "split") and isinstance(v, (int, float)):
                    self.tb.add_scalar(prefix + k, v, entry["step"])
            self.tb.flush()

    def finish(self, last_eval: EvalResult) -> RunResult:
        state, t, cfg = self.state, self.t, self.cfg
        self.save(final=True)
        tps = state.tokens / max(state.elapsed, 1e-9)
        model = self.model
        if self.fsdp:  # an unsharded copy for saving, export and the sample (rank 0 alone runs those)
            weights = distributed.full_model_state(self.model, True)
            model = BertForPreTraining(cfg.model)
            if self.dist.is_main:
                model.load_state_dict(weights)
        probe = None
        if self.dist.is_main:
            checkpoint.save_weights(model, self.run_dir / checkpoint.WEIGHTS)
            export_model(model, self.tok, self.run_dir / "hf", nsp=self.pairs is not None,
                         lowercase=cfg.data.lowercase if cfg.data.tokenizer == "wordpiece" else None)
            if t.probe or (t.probe is None and not cfg.data.train and cfg.data.corpus == "shakespeare"):
                from .probe import genre_probe

                plain = model if next(model.parameters()).device == self.device else model.to(self.device)
                probe = genre_probe(plain, self.tok, self.device, seed=t.seed, log=self.log)
            checkpoint.atomic_write_text(self.run_dir / "eval.json", json.dumps(
                {"step": state.step, **last_eval.as_dict(), "train_state": asdict(state),
                 **({"probe": probe} if probe else {})}, indent=2) + "\n")
        self.log(f"done: {state.step} steps, {state.tokens:,} tokens in {state.elapsed:.0f}s ({tps / 1e3:.1f}k tokens/s)"
                 + (f"; {state.skipped_steps} step(s) skipped (non-finite)" if state.skipped_steps else ""))
        nsp = f", {t.objective[4:].upper()} accuracy {last_eval.nsp_accuracy:.1%}" if last_eval.nsp_accuracy is not None else ""
        self.log(f"held-out: loss {last_eval.loss:.3f}, masked-token accuracy {last_eval.accuracy:.1%}, "
                 f"perplexity {last_eval.perplexity:.1f} ({last_eval.predicted:,} predictions){nsp}")
        if t.plot and self.dist.is_main:
            from .plots import plot_metrics

            try:
                self.log(f"curves: {plot_metrics(self.run_dir)}")
            except UserError as e:
                self.log(f"note: no plot ({e})")
        if t.sample and self.dist.is_main:
            model.eval()
            self.log(sample_view(model, self.tok, self.data.valid.tokens, mask_prob=cfg.mask.mask_prob,
                                 seed=t.eval_seed, color=sys.stdout.isatty(),
                                 amp_dtype=self.amp_dtype if next(model.parameters()).device == self.device else None))
        self.log(f"saved to {self.run_dir}")
        self.dist.barrier()
        return RunResult(self.run_dir, last_eval, state.step, state.elapsed, tps, checkpoint=self.last_ckpt)


class _Window:
    """Sums over the steps since the last metrics record."""

    def __init__(self):
        self.steps, self.time, self.data_time, self.tokens, self.flops = 0, 0.0, 0.0, 0, 0.0
        self.loss_sum, self.predicted, self.correct = 0.0, 0, 0
        self.nsp_sum, self.nsp_correct, self.sequences = 0.0, 0, 0

    def add(self, stats: StepStats, seconds: float, data_seconds: float, tokens: int, flops: float) -> None:
        self.steps += 1
        self.time += seconds
        self.data_time += data_seconds
        self.tokens += tokens
        self.flops += flops
        self.loss_sum += float(stats.loss_sum)
        self.predicted += int(stats.predicted)
        self.correct += int(stats.correct)
        if stats.nsp_loss_sum is not None:
            self.nsp_sum += float(stats.nsp_loss_sum)
            self.nsp_correct += int(stats.nsp_correct)
            self.sequences += stats.sequences

    def record(self, state: TrainState, lr: float, stats: StepStats, peak: float, epoch: float, seq_len: int) -> dict:
        n, secs = max(self.steps, 1), max(self.time, 1e-9)
        entry = {"step": state.step, "loss": self.loss_sum / max(self.predicted, 1),
                 "accuracy": self.correct / max(self.predicted, 1), "lr": lr, "grad_norm": float(stats.grad_norm),
                 "tokens_per_s": self.tokens / secs, "mfu": self.flops / secs / peak, "elapsed": state.elapsed,
                 "tokens": state.tokens, "epoch": epoch, "seq_len": seq_len, "step_ms": 1e3 * self.time / n,
                 "data_ms": 1e3 * self.data_time / n, "skipped_steps": state.skipped_steps}
        if self.sequences:
            entry["nsp_loss"] = self.nsp_sum / self.sequences
            entry["nsp_accuracy"] = self.nsp_correct / self.sequences
        return entry
