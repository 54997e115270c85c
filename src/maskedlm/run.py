"""A pre-training run assembled from its config: where it starts (fresh, `--resume`, `--init-from`), its
data and evaluator, the model with precision and parallelism applied, the optimizer, the generators, the
batch feed and the checkpointer. `train.py` runs the loop over what `build_run` returns.

Under torchrun every rank builds the same run; rank 0 prepares the data first and writes the run folder.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .checkpoint import Checkpoint, Checkpointer, find_checkpoint, read_checkpoint, restore_rng, save_config
from .config import Config
from .data import Prepared, Split, prepare
from .distributed import Dist, Parallel, load_optimizer_state, parallelize
from .errors import UserError
from .evaluate import EvalResult, Evaluator, make_evaluator
from .feed import DataFeed
from .loading import load_for_init
from .masking import MaskSpec
from .model import BertForPreTraining
from .modernbert import build_model, use_phase
from .optim import apply_hyperparameters, make_optimizer
from .paths import RunDir, RunLock, new_run_dir
from .runtime import resolve_precision
from .schedules import TrainState
from .step import TrainStep
from .tokenizer import Tokenizer


@dataclass
class Run:
    cfg: Config
    dir: RunDir
    device: torch.device
    dist: Dist
    amp_dtype: torch.dtype | None
    tok: Tokenizer
    data: Prepared
    evaluator: Evaluator
    parallel: Parallel
    step: TrainStep
    state: TrainState
    feed: DataFeed
    checkpointer: Checkpointer
    lock: RunLock  # this process is the run folder's one writer (rank 0; the other ranks hold none)
    log: Callable[..., None]

    @property
    def model(self) -> torch.nn.Module:
        """The fp32 master model (sharded under FSDP)."""
        return self.parallel.model

    def set_phase(self, phase: int) -> None:
        """What the model computes in a length phase: ModernBERT's global rotary base (the short phases'
        --short-rope-theta, the last phase's --global-rope-theta), on the master model and its compute copy."""
        for m in (self.parallel.model, self.parallel.compute):  # the same model twice without a compute copy
            use_phase(m, self.cfg, phase)

    def evaluate(self, stop: Callable[[], bool] | None = None, progress=None) -> EvalResult | None:
        """Held-out metrics; None when `stop()` turned true before the end (a signal: stop without them)."""
        return self.evaluator(self.model, self.device, self.amp_dtype, progress=progress, stop=stop)

    def describe(self) -> str:
        m, t, d = self.cfg.model, self.cfg.train, self.dist
        stop = " or ".join(([f"{t.max_steps} steps"] if t.max_steps else []) + ([f"{t.time_budget:g}s"] if t.time_budget else []))
        return (f"model: {'ModernBERT' if m.arch == 'modernbert' else 'BERT'} {m.preset or 'custom'} ({m.num_layers}L/{m.hidden_size}H, "
                f"{self.model.num_parameters() / 1e6:.1f}M parameters), vocab {m.vocab_size}, "
                f"seq {self.cfg.data.seq_len}, batch {t.batch_size}, on {self.device}"
                f"{f' x {d.world} ranks' if d.active else ''} ({'bf16 mixed precision' if self.amp_dtype else 'fp32'}); "
                f"{self.feed.size():,} training {'pairs' if t.pair_task else 'sequences'}"
                + (f" (length schedule {t.seq_len_schedule})" if t.seq_len_schedule else "")
                + (f"; objective {t.objective}" if t.pair_task else "") + f"; stop at {stop}; run folder {self.dir.path}")


@dataclass
class _Start:
    """Where a run starts: its folder, and a checkpoint to resume or a model to continue from."""

    dir: RunDir
    lock: RunLock
    checkpoint: Checkpoint | None = None
    model: BertForPreTraining | None = None
    tokenizer: Tokenizer | None = None


def build_run(cfg: Config, device: torch.device, dist: Dist, log) -> Run:
    t = cfg.train
    amp_dtype = resolve_precision(t.precision, device)  # before anything slow: an impossible precision fails at once
    if t.batch_size % (dist.world * t.grad_accum):
        raise UserError(f"--batch-size {t.batch_size} must divide by world size x --grad-accum ({dist.world} x {t.grad_accum})")
    start = _resume(cfg, dist, log) if t.resume else _fresh(cfg, dist, log)
    try:
        return _build(cfg, start, device, dist, amp_dtype, log)
    except BaseException:
        start.lock.release()
        raise


def _build(cfg: Config, start: "_Start", device: torch.device, dist: Dist, amp_dtype: torch.dtype | None, log) -> Run:
    t = cfg.train
    t.out = str(start.dir.path)
    data = _prepare(cfg, start.tokenizer, dist, log)
    tok = data.tokenizer
    fsdp = t.parallel == "fsdp" and dist.active
    evaluator = make_evaluator(cfg, data.valid, tok, Dist() if fsdp else dist, log)  # FSDP: every rank, every forward

    torch.manual_seed(t.seed)
    model = build_model(cfg.model)
    if start.model is not None:
        model.load_state_dict(start.model.state_dict())
    elif cfg.model.mlm_bias_init == "unigram" and start.checkpoint is None:
        model.init_mlm_bias(unigram_counts(data.train, cfg.model.vocab_size))
    if start.checkpoint is not None:
        model.load_state_dict(start.checkpoint.weights)
    model = model.to(device).train()
    parallel = parallelize(model, dist, mode=t.parallel, amp_dtype=amp_dtype, compile=t.compile,
                           nsp=t.pair_task is not None)  # before the optimizer: FSDP shards the parameters
    optimizer = make_optimizer(model, t)
    mask_gen = torch.Generator(device=device).manual_seed(t.seed)
    state = TrainState()
    if (ckpt := start.checkpoint) is not None:
        load_optimizer_state(model, optimizer, ckpt.optimizer_state(), parallel.fsdp)
        apply_hyperparameters(optimizer, t)  # a resume with --allow-config-change may have changed them
        state = dataclasses.replace(ckpt.state.train_state)
        restore_rng(ckpt.rng, ckpt.state.rng, mask_gen, dist.rank)
        if state.data and state.data != data.folder.name:  # same paths and settings, other content
            if not t.allow_config_change:
                raise UserError(f"--resume: the training data changed since {ckpt.path.name} (the same files, other "
                                f"content: edited in place?); its position in the data means nothing now (pass "
                                f"--allow-config-change to accept)")
            log("changed: the training data's content (--allow-config-change)")
    state.data = data.folder.name
    feed = DataFeed(cfg, data.train, tok.special, dist, device, state)
    step = TrainStep(parallel, optimizer, MaskSpec.from_tokenizer(tok, cfg.mask), mask_gen, grad_accum=t.grad_accum,
                     clip_grad=t.clip_grad, doc_sep_id=tok.special.sep if t.doc_masking else None)
    checkpointer = Checkpointer(start.dir, dist, model, optimizer, mask_gen, cfg, tok.hash, fsdp=parallel.fsdp,
                                resumed_from=ckpt.path if ckpt else None, log=log)
    if dist.is_main:
        save_config(cfg, start.dir.config)
        tok.save(start.dir.path)
    return Run(cfg, start.dir, device, dist, amp_dtype, tok, data, evaluator, parallel, step, state, feed,
               checkpointer, start.lock, log)


def unigram_counts(split: Split, vocab_size: int, limit: int = 50_000_000) -> torch.Tensor:
    """How often each token id occurs in (the first `limit` tokens of) a split. (V,) int64."""
    tokens = np.asarray(split.tokens[: min(limit, split.num_tokens)], dtype=np.int64)
    return torch.from_numpy(np.bincount(tokens, minlength=vocab_size)[:vocab_size])


def _resume(cfg: Config, dist: Dist, log) -> _Start:
    """Continue a run exactly from a checkpoint; refuse settings that would change what it computes."""
    t = cfg.train
    found = find_checkpoint(t.resume)
    lock = _lock(found.run, dist)  # before reading: the checkpoint may be the one another process is writing
    try:
        return _resume_from(cfg, read_checkpoint(found.path), lock, dist, log)
    except BaseException:
        lock.release()
        raise


def _resume_from(cfg: Config, ckpt: Checkpoint, lock: RunLock, dist: Dist, log) -> _Start:
    t = cfg.train
    saved = ckpt.state.config
    # The shape comes from the run; only then compare what the user asked for with what it was.
    cfg.model.vocab_size, cfg.model.pad_token_id = saved.model.vocab_size, saved.model.pad_token_id
    changes = saved.resume_changes(cfg)
    if changes["never"]:
        raise UserError(f"--resume cannot change {'; '.join(changes['never'])} (the checkpoint decides it; start a new "
                        f"run, or continue from it with --init-from)")
    if ckpt.state.world_size != dist.world:
        changes["fixed"].append(f"world size: {ckpt.state.world_size} -> {dist.world}")
    if changes["fixed"] and not t.allow_config_change:
        raise UserError(f"--resume would change the run: {'; '.join(changes['fixed'])} "
                        f"(pass --allow-config-change to accept)")
    diffs = changes["fixed"] + changes["free"]
    run = ckpt.path.run
    tok = Tokenizer.from_file(run.tokenizer)
    if tok.hash != ckpt.state.tokenizer_hash:
        raise UserError(f"{run.path}: tokenizer.json has hash {tok.hash[:12]}, the checkpoint was "
                        f"trained with {ckpt.state.tokenizer_hash[:12]}")
    log(f"resuming {run.path} from {ckpt.path.name} (step {ckpt.state.step})"
        + (f"; changed: {'; '.join(diffs)}" if diffs else ""))
    return _Start(run, lock, checkpoint=ckpt, tokenizer=tok)


def _fresh(cfg: Config, dist: Dist, log) -> _Start:
    """A new run folder; with --init-from, the given model's shape, weights and tokenizer (this run's dropout)."""
    run = RunDir(Path(dist.broadcast_object(str(new_run_dir(cfg.train.out)) if dist.is_main else None)))
    lock = _lock(run, dist)
    if not cfg.train.init_from:
        return _Start(run, lock)
    try:
        model, tok, note = load_for_init(cfg.train.init_from)
    except BaseException:
        lock.release()
        raise
    dropout = cfg.model.hidden_dropout, cfg.model.attention_dropout
    cfg.model = dataclasses.replace(model.config, preset=None)
    cfg.model.hidden_dropout, cfg.model.attention_dropout = dropout
    try:
        cfg.validate()  # again: the architecture is the loaded model's now (e.g. no NSP head on a ModernBERT)
    except BaseException:
        lock.release()
        raise
    log(f"{cfg.train.init_from}: {note}")
    return _Start(run, lock, model=model, tokenizer=tok)


def _lock(run: RunDir, dist: Dist) -> RunLock:
    """Rank 0 holds the run folder's lock (the others write nothing there)."""
    return RunLock(run).acquire() if dist.is_main else RunLock(run)


def _prepare(cfg: Config, tokenizer: Tokenizer | None, dist: Dist, log) -> Prepared:
    """Rank 0 prepares (or finds) the data, then the others read the same cache; the model's vocabulary
    follows the tokenizer unless it came with the model (resume, init-from)."""
    if not dist.is_main:
        dist.barrier()
    data = prepare(cfg.data, tokenizer=tokenizer, log=log)
    if dist.is_main:
        dist.barrier()
    if tokenizer is None:
        cfg.model.vocab_size, cfg.model.pad_token_id = data.tokenizer.vocab_size, data.tokenizer.special.pad
    if data.meta["max_token_id"] >= cfg.model.vocab_size:
        raise UserError(f"{data.folder}: token id {data.meta['max_token_id']} >= the model's vocabulary of "
                        f"{cfg.model.vocab_size}")
    if cfg.data.seq_len > cfg.model.max_position:
        raise UserError(f"--seq-len {cfg.data.seq_len} exceeds the model's {cfg.model.max_position} positions")
    return data
