"""A run's training batches across its sequence-length schedule and batch-size ramp.

Each phase of the length schedule has its own order of sequences (its own `stream` of the seed); the
batch-size ramp continues the current order with a bigger batch. The feed's position is the run state's
`phase` and `data_position`, so a resumed run continues in the same phase at the same sequence.
"""

from __future__ import annotations

import torch

from .batches import Batch, BatchLoader, PackedSequences, PackedSource, PairSource
from .config import Config
from .data import Split
from .distributed import Dist
from .schedules import TrainState, batch_at, phase_at, phase_batch, progress
from .tokenizer import SpecialIds


class DataFeed:
    def __init__(self, cfg: Config, split: Split, special: SpecialIds, dist: Dist, device: torch.device,
                 state: TrainState):
        self.cfg, self.t, self.split, self.special, self.dist, self.device = cfg, cfg.train, split, special, dist, device
        self.phases = cfg.seq_len_phases()  # [(length, end of the phase in progress)]
        self.unit = self.t.grad_accum * dist.world  # a batch is a whole number of micro-batches on every rank
        phase = phase_at(self.phases, progress(state, self.t))
        self.loader = self._open(phase, state.data_position if phase == state.phase else None, state)
        state.phase = phase

    def phase_batch(self, length: int) -> int:
        """Global sequences per step in a phase of `length` tokens (before the ramp)."""
        return phase_batch(self.t, self.cfg.data.seq_len, length, self.unit)

    def _batch_now(self, phase: int, state: TrainState) -> int:
        full = self.phase_batch(self.phases[phase][0])
        return batch_at(progress(state, self.t), full, self.t.batch_ramp, self.unit)

    def _open(self, phase: int, position, state: TrainState) -> BatchLoader:
        t, length = self.t, self.phases[phase][0]
        if t.pair_task:
            source = PairSource(self.split, length, self.special, t.pair_task, t.seed, position or (0, 0),
                                self.cfg.data.short_seq_prob, stream=phase)
        else:
            source = PackedSource(PackedSequences(self.split, length, self.special), t.seed, position or 0, stream=phase)
        return BatchLoader(source, self._batch_now(phase, state), pin=self.device.type == "cuda",
                           max_id=self.cfg.model.vocab_size, shard=(self.dist.rank, self.dist.world))

    def next(self, state: TrainState, log) -> tuple[Batch, int | list[int]]:
        """The next step's batch and the data position after it. Moves to the next length phase (from the
        start of its own order) or to the ramp's next batch size (from the data consumed so far) first."""
        if (phase := phase_at(self.phases, progress(state, self.t))) != state.phase:
            self.loader.close()
            self.loader = self._open(phase, None, state)
            state.phase, state.data_position = phase, None
            log(f"step {state.step}: sequence length {self.phases[phase][0]}, batch {self.loader.batch_size}")
        elif self.t.batch_ramp and self._batch_now(state.phase, state) != self.loader.batch_size:
            self.loader.close()
            self.loader = self._open(state.phase, state.data_position, state)
        return self.loader.next()

    @property
    def epoch(self) -> float:
        return self.loader.source.epoch

    def size(self) -> int:
        """Training sequences (or sentence pairs) in an epoch of the current phase."""
        src = self.loader.source
        return len(src.instances(0)) if isinstance(src, PairSource) else len(src.seqs)

    def close(self) -> None:
        self.loader.close()
