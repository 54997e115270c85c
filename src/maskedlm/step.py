"""One optimizer step of pre-training, as `pretrain` and the benchmarks run it.

Take the step's packed sequences, mask them on the training device with the run's generator, run forward
and backward over `grad_accum` micro-batches with the loss normalised by the step's total number of
predicted tokens (and of sequences, for NSP / SOP), clip, update.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .batches import Batch
from .distributed import Parallel
from .masking import MaskSpec, document_attention_mask
from .model import Output
from .optim import clip_gradients, set_lr


@dataclass
class StepStats:
    """One step's sums, as tensors on the training device: reading them syncs with the device, so the loop
    reads them only when it logs. `skipped` is the one value decided (and synced) every step."""

    loss_sum: torch.Tensor  # summed MLM cross-entropy
    predicted: torch.Tensor
    correct: torch.Tensor
    grad_norm: torch.Tensor
    skipped: bool = False  # the loss or gradient was not finite: no update was made
    nsp_loss_sum: torch.Tensor | None = None  # summed NSP / SOP cross-entropy over the batch's sequences
    nsp_correct: torch.Tensor | None = None
    sequences: int = 0


class TrainStep:
    """One optimizer step on a `distributed.Parallel` model (see `parallelize`).

    Mixed precision: with a bf16 compute copy, forward and backward run on the copy while the master model
    keeps the fp32 weights that the optimizer updates and checkpoints save; after each update the copy is
    refreshed. Unlike autocast, which re-casts weights and activations around every operation, activations
    stay bf16 end to end (norms and softmaxes still accumulate in fp32).

    Data parallelism: each rank holds its rows of the global batch; masks are drawn for the whole global
    batch from the shared generator and each rank keeps its rows, so N ranks with batch b see exactly the
    masks one process with batch N*b would. Losses are divided by the all-reduced global counts, so the
    gradient is the same too.
    """

    def __init__(self, parallel: Parallel, optimizer: torch.optim.Optimizer, mask: MaskSpec,
                 generator: torch.Generator, *, grad_accum: int = 1, clip_grad: float = 1.0,
                 doc_sep_id: int | None = None):
        self.model, self.compute, self.runner = parallel.model, parallel.compute, parallel.runner
        self.dist, self.fsdp = parallel.dist, parallel.fsdp
        self.optimizer, self.mask, self.generator = optimizer, mask, generator
        self.grad_accum, self.clip_grad = grad_accum, clip_grad
        self.doc_sep_id = doc_sep_id  # document masking of packed sequences: documents end at this id
        self.device = next(self.model.parameters()).device
        self.encoder = self.compute.bert
        self.params = list(self.model.parameters())
        self.compute_params = list(self.compute.parameters())

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
            set_lr(self.optimizer, lr)
        self.compute.train(self.model.training)
        world = self.dist.world
        inputs, labels = self._mask(batch.input_ids)  # (b, T) each: this rank's rows
        n_seq = inputs.shape[0] * world  # global
        n_pred = self.dist.all_reduce((labels != -100).sum()).clamp(min=1)  # global
        nsp = batch.nsp_labels is not None
        attention_mask = batch.attention_mask
        if attention_mask is None and self.doc_sep_id is not None:
            attention_mask = document_attention_mask(batch.input_ids, self.doc_sep_id)  # (b, T, T)
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
                out = self.forward(part(inputs, i), part(labels, i), part(attention_mask, i),
                                   part(batch.token_type_ids, i), nsp=nsp)
                loss = out.loss_sum / n_pred
                if nsp:
                    logits, targets = out.nsp_logits.float(), part(batch.nsp_labels, i)
                    nsp_loss = F.cross_entropy(logits, targets, reduction="sum")
                    loss = loss + nsp_loss / n_seq  # both are means over the whole step's global counts
                    sums[2] += nsp_loss.detach().double()
                    sums[3] += (logits.argmax(-1) == targets).sum()
                # DDP averages gradients over ranks; the losses above are already global means.
                (loss * world).backward()
            self._accumulate_grads(first=i == 0)
            sums[0] += out.loss_sum.detach().double()
            sums[1] += out.correct
        self.dist.all_reduce(sums)
        grad_norm = clip_gradients(self.params, self.clip_grad)
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
