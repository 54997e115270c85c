"""Held-out evaluation: masked-token loss, accuracy and perplexity over all selected positions.

The masks are drawn once from a fixed seed and reused at every evaluation, so numbers from different
steps (and different runs on the same data) are measured on exactly the same predictions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .batches import PackedSequences, PairSource
from .config import Config, MaskConfig
from .data import Split, prepare, prepare_eval
from .distributed import Dist
from .errors import UserError
from .loading import folder_kind, open_folder
from .masking import MaskSpec
from .progress import Progress
from .runtime import autocast, resolve_device, resolve_precision
from .tokenizer import Tokenizer

EVAL_BATCH = 64
# Held-out masks are BERT's standard ones whatever a run trains with (its rate, strategy), so that numbers
# from different recipes are measured on the same predictions.
STANDARD_MASK = MaskConfig(mask_prob=0.15, mask_token_frac=0.8, random_token_frac=0.1, strategy="token")


@dataclass
class EvalResult:
    loss: float  # mean cross-entropy over predicted positions (nats)
    accuracy: float  # top-1 accuracy over predicted positions
    perplexity: float  # exp(loss)
    predicted: int  # positions predicted
    sequences: int
    nsp_accuracy: float | None = None  # next-sentence / sentence-order accuracy on held-out pairs
    nsp_loss: float | None = None
    pairs: int = 0

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None and not (k == "pairs" and v == 0)}


class Evaluator:
    """Fixed masked batches from held-out sequences, evaluated on demand."""

    def __init__(self, seqs: PackedSequences, tokenizer: Tokenizer, mask: MaskConfig, max_sequences: int, seed: int,
                 pairs: PairSource | None = None, dist: Dist = Dist()):
        self.dist = dist
        gen = torch.Generator().manual_seed(seed)
        spec = MaskSpec.from_tokenizer(tokenizer, mask)
        n = min(len(seqs), max_sequences)
        self.batches = []
        for start in range(0, n, EVAL_BATCH):
            ids, attn = seqs.get(torch.arange(start, min(n, start + EVAL_BATCH)).numpy())
            inputs, labels = spec(torch.from_numpy(ids), gen)
            self.batches.append((inputs, labels, None if attn is None else torch.from_numpy(attn)))
        self.sequences = n
        # Held-out sentence pairs (masked as in training) for next-sentence / sentence-order accuracy.
        self.pair_batches = []
        if pairs is not None:
            rows = pairs.instances(0)[:max_sequences]
            for start in range(0, len(rows), EVAL_BATCH):
                b = {k: torch.from_numpy(v) for k, v in pairs.build(rows[start:start + EVAL_BATCH]).items()}
                b["input_ids"], _ = spec(b["input_ids"], gen)
                self.pair_batches.append(b)
            self.pairs = len(rows)

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module, device: torch.device, amp_dtype: torch.dtype | None,
                 progress: Progress | None = None, stop: Callable[[], bool] | None = None) -> EvalResult | None:
        """The held-out metrics; None when `stop()` (asked before each batch, on every rank) says to give up."""
        was_training = model.training
        model.eval()
        try:
            return self._evaluate(model, device, amp_dtype, progress, stop or (lambda: False))
        finally:
            model.train(was_training)

    def _evaluate(self, model, device, amp_dtype, progress, stop) -> EvalResult | None:
        # Under torchrun each rank takes every world-th batch; the sums are all-reduced.
        rank, world = self.dist.rank, self.dist.world
        sums = torch.zeros(5, dtype=torch.float64, device=device)  # loss, count, correct, nsp loss, nsp correct
        # Batch i goes to rank i % world. Every rank asks `stop` once per round (it may be a collective).
        mlm_rounds, pair_rounds = -(-len(self.batches) // world), -(-len(self.pair_batches) // world)
        for r in range(mlm_rounds + pair_rounds):
            if stop():
                return None
            if r < mlm_rounds:
                if (i := r * world + rank) < len(self.batches):
                    inputs, labels, attn = self.batches[i]
                    with autocast(device, amp_dtype):
                        out = model(inputs.to(device), attention_mask=None if attn is None else attn.to(device),
                                    labels=labels.to(device))
                    sums[0] += out.loss_sum.double()
                    sums[1] += out.num_predicted
                    sums[2] += out.correct
            elif (i := (r - mlm_rounds) * world + rank) < len(self.pair_batches):
                b = self.pair_batches[i]
                with autocast(device, amp_dtype):
                    out = model(b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device),
                                token_type_ids=b["token_type_ids"].to(device), nsp=True)
                logits, target = out.nsp_logits.float(), b["nsp_labels"].to(device)
                sums[3] += torch.nn.functional.cross_entropy(logits, target, reduction="sum").double()
                sums[4] += (logits.argmax(-1) == target).sum()
            if progress:
                progress.update(1)
        loss_sum, count, correct, nsp_sum, nsp_correct = self.dist.all_reduce(sums).tolist()
        n = max(int(count), 1)
        loss = loss_sum / n
        result = EvalResult(loss, int(correct) / n, math.exp(min(loss, 700.0)), int(count), self.sequences)
        if self.pair_batches:
            result.nsp_loss, result.nsp_accuracy, result.pairs = nsp_sum / self.pairs, nsp_correct / self.pairs, self.pairs
        return result


def make_evaluator(cfg: Config, split: Split, tokenizer: Tokenizer, dist: Dist, log=print) -> Evaluator:
    """The fixed held-out batches of a run's config: standard masks on the packed held-out sequences, and
    held-out sentence pairs for NSP / SOP (when the held-out text allows them)."""
    seq_len, special, task = cfg.data.seq_len, tokenizer.special, cfg.train.pair_task
    pairs = None
    if task:
        try:
            pairs = PairSource(split, seq_len, special, task, cfg.train.eval_seed, short_seq_prob=cfg.data.short_seq_prob)
        except UserError as e:  # e.g. one held-out document: no random B for NSP
            log(f"note: no held-out {task.upper()} accuracy ({e})")
    return Evaluator(PackedSequences(split, seq_len, special, pad_last=True, what="held-out"), tokenizer,
                     STANDARD_MASK, cfg.train.eval_sequences, cfg.train.eval_seed, pairs=pairs, dist=dist)


def evaluate_run(run: str | Path, valid: list[str] | None = None, device: str = "auto",
                 precision: str = "auto", log=print) -> EvalResult:
    """Evaluate a run folder (or one of its checkpoints) on its own held-out split, or on the given files; a
    transformers BERT or ModernBERT folder on the given files (with the default data settings)."""
    kind = folder_kind(run)
    if kind not in ("run", "checkpoint") and not (kind == "transformers" and valid):
        raise UserError(f"{run}: a {kind} folder; evaluate takes a maskedlm run folder or checkpoint (it needs the "
                        f"run's data settings){', or a transformers folder with --valid FILES' if kind == 'transformers' else ''}")
    dev = resolve_device(device)
    loaded = open_folder(run, dev)
    model, tokenizer = loaded.model, loaded.tokenizer
    cfg = loaded.config if loaded.config is not None else Config.from_dict({"model": asdict(model.config)},
                                                                           allow_derived=True)
    if valid:
        split = prepare_eval(valid, cfg.data, tokenizer, log=log)
    else:
        split = prepare(cfg.data, tokenizer=tokenizer, log=log).valid
    evaluator = make_evaluator(cfg, split, tokenizer, Dist(), log)
    bar = Progress(len(evaluator.batches) + len(evaluator.pair_batches), "evaluating", unit="batch")
    try:
        return evaluator(model, dev, resolve_precision(precision, dev), progress=bar)
    finally:
        bar.close()
