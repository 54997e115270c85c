"""Training batches from prepared token streams: packed MLM sequences, sentence pairs, the loader.

Training sequences are packed: `[CLS] stream[i*L:(i+1)*L] [SEP]` with L = seq_len - 2 — full length, no
padding. The order of sequences is a fresh permutation per epoch drawn from (seed, epoch), so a source's
whole state is its position (sequences served so far; (epoch, offset) for sentence pairs): a checkpoint
stores it and a resume continues at once, without replaying data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .data import Split
from .errors import UserError
from .tokenizer import SpecialIds

class PackedSequences:
    """Fixed-length sequences cut from a token stream: `[CLS] stream[i*L:(i+1)*L] [SEP]`, L = seq_len - 2.

    With `pad_last`, a final partial chunk becomes one more sequence, padded (for evaluation, so no
    held-out token is dropped); training uses full sequences only.
    """

    def __init__(self, split: Split, seq_len: int, special: SpecialIds, pad_last: bool = False, what: str = "training"):
        self.tokens, self.seq_len, self.special = split.tokens, seq_len, special
        self.body = seq_len - 2
        self.num_full = split.num_tokens // self.body
        self.has_partial = pad_last and split.num_tokens % self.body > 0
        if self.num_full + self.has_partial == 0:
            raise UserError(f"the {what} text has {split.num_tokens} tokens, fewer than one sequence of "
                            f"{seq_len} ({self.body} + [CLS] + [SEP]); give more text or a smaller --seq-len")

    def __len__(self) -> int:
        return self.num_full + int(self.has_partial)

    def get(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Rows `idx` as (input_ids (n, seq_len) int64, attention_mask (n, seq_len) int64 or None)."""
        idx = np.asarray(idx, dtype=np.int64)
        n = len(idx)
        out = np.full((n, self.seq_len), self.special.pad, dtype=np.int64)
        out[:, 0] = self.special.cls
        full = idx < self.num_full
        L = self.body
        for r in np.flatnonzero(full):  # rows of the (virtual, memory-mapped) stream: B reads, not a copy
            i = int(idx[r])
            out[r, 1:-1] = self.tokens[i * L:(i + 1) * L]
        out[full, -1] = self.special.sep
        if full.all():
            return out, None
        tail = np.asarray(self.tokens[self.num_full * self.body:], dtype=np.int64)
        out[~full, 1:1 + len(tail)] = tail
        out[~full, 1 + len(tail)] = self.special.sep
        mask = (out != self.special.pad).astype(np.int64)
        return out, mask


class EpochSampler:
    """Sequence indices in a fresh permutation per epoch; the state is one integer, `position`.
    `stream` separates independent orders drawn from one seed (the phases of a sequence-length schedule)."""

    def __init__(self, n: int, seed: int, position: int = 0, stream: int = 0):
        self.n, self.seed, self.position, self.stream = n, seed, position, stream
        self._epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            key = [self.seed, epoch] if self.stream == 0 else [self.seed, self.stream, epoch]
            self._epoch, self._perm = epoch, np.random.default_rng(key).permutation(self.n)
        return self._perm

    def take(self, k: int) -> np.ndarray:
        """The next `k` indices (crossing into the next epoch when this one runs out)."""
        out = np.empty(k, dtype=np.int64)
        filled = 0
        while filled < k:
            epoch, offset = divmod(self.position, self.n)
            chunk = self._permutation(epoch)[offset: offset + k - filled]
            out[filled: filled + len(chunk)] = chunk
            filled += len(chunk)
            self.position += len(chunk)
        return out

    @property
    def epoch(self) -> float:
        return self.position / self.n


@dataclass
class Batch:
    """A training batch. input_ids (B, T) int64; for sentence pairs also token types, an attention mask
    (pairs can be shorter than the sequence and are padded) and the NSP / SOP labels (B,)."""

    input_ids: "torch.Tensor"
    attention_mask: "torch.Tensor | None" = None
    token_type_ids: "torch.Tensor | None" = None
    nsp_labels: "torch.Tensor | None" = None

    def to(self, device, non_blocking: bool = False) -> "Batch":
        return Batch(*(None if t is None else t.to(device, non_blocking=non_blocking)
                       for t in (self.input_ids, self.attention_mask, self.token_type_ids, self.nsp_labels)))

    def pin(self) -> "Batch":
        return Batch(*(None if t is None else t.pin_memory()
                       for t in (self.input_ids, self.attention_mask, self.token_type_ids, self.nsp_labels)))


class PackedSource:
    """MLM batches: packed sequences, a fresh permutation per epoch. State: sequences served (an int)."""

    def __init__(self, seqs: PackedSequences, seed: int, position: int = 0, stream: int = 0):
        self.seqs = seqs
        self.sampler = EpochSampler(len(seqs), seed, position, stream)

    def take(self, k: int, shard: tuple[int, int] = (0, 1)) -> dict[str, np.ndarray]:
        """The next k sequences of the global order; with shard=(rank, world), only this rank's k/world."""
        idx = self.sampler.take(k)
        rank, world = shard
        ids, _ = self.seqs.get(np.array_split(idx, world)[rank])
        return {"input_ids": ids}

    @property
    def position(self) -> int:
        return self.sampler.position

    @property
    def epoch(self) -> float:
        return self.sampler.epoch


class PairSource:
    """Sentence-pair batches for next-sentence prediction ('nsp') or sentence-order prediction ('sop').

    Instances are built per epoch from the documents' sentences by BERT's procedure
    (create_pretraining_data.py): segments are filled from consecutive sentences up to a target length
    (seq_len - 3, or with probability `short_seq_prob` a shorter random target), split at a random sentence
    into A and B. NSP: half the time B is replaced by sentences from a different document (label 1), the
    unused sentences going back to the pool; SOP (ALBERT): B always follows A, and half the time the two are
    swapped (label 1). Unlike BERT's script, a chunk of one long sentence is cut in two at a random token
    when B should be the continuation, so the labels stay 50/50 (BERT's gives random B more often). A pair longer than the sequence is truncated from the end of its longer segment.
    Sequences are `[CLS] A [SEP] B [SEP]`, token type 0 then 1, padded to seq_len (attention mask 0).
    The instance list of an epoch is a pure function of (seed, epoch); the state is (epoch, offset).
    """

    def __init__(self, split: Split, seq_len: int, special: SpecialIds, objective: str, seed: int,
                 position: tuple[int, int] | list[int] = (0, 0), short_seq_prob: float = 0.1, stream: int = 0):
        if split.sentences is None:
            raise UserError("sentence-pair objectives need data prepared with sentence offsets; re-run prepare")
        self.split, self.seq_len, self.special, self.objective, self.seed = split, seq_len, special, objective, seed
        self.short_seq_prob, self.stream = short_seq_prob, stream
        self._epoch, self._offset = int(position[0]), int(position[1])
        self._cache: tuple[int, np.ndarray] | None = None
        if len(split.doc_offsets) - 1 < 2 and objective == "nsp":
            raise UserError("next-sentence prediction needs at least two documents (random B comes from another one)")
        if len(self.instances(self._epoch)) == 0:
            raise UserError(f"no sentence pairs can be built for {objective.upper()} from this text")

    def _documents(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per document: sentence start and end offsets (the document's closing [SEP] excluded)."""
        docs, sents = self.split.doc_offsets, self.split.sentences
        out = []
        for d in range(len(docs) - 1):
            lo, hi = int(docs[d]), int(docs[d + 1]) - 1  # hi: the [SEP]
            i, j = np.searchsorted(sents, lo), np.searchsorted(sents, hi)
            starts = sents[i:j]
            if not len(starts) or starts[0] != lo:
                starts = np.concatenate([[lo], starts]).astype(np.int64)
            ends = np.append(starts[1:], hi)
            keep = ends > starts
            out.append((starts[keep], ends[keep]))
        return out

    def instances(self, epoch: int) -> np.ndarray:
        """(n, 5) int64 rows: a_start, a_end, b_start, b_end, label — token ranges in the stream."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        rng = np.random.default_rng([self.seed, self.stream, epoch, 1])
        docs = self._documents()
        max_tokens = self.seq_len - 3
        rows: list[tuple[int, int, int, int, int]] = []
        for d, (starts, ends) in enumerate(docs):
            n = len(starts)
            target = self._target(rng, max_tokens)
            chunk: list[int] = []
            length, i = 0, 0
            while i < n:
                chunk.append(i)
                length += int(ends[i] - starts[i])
                if i == n - 1 or length >= target:
                    row = self._pair(rng, docs, d, chunk, starts, ends, target)
                    if row is not None:
                        rows.append(row[:5])
                        i -= row[5]  # sentences not used go back (NSP with a random B)
                    chunk, length = [], 0
                    target = self._target(rng, max_tokens)
                i += 1
        out = np.asarray(rows, dtype=np.int64).reshape(-1, 5)
        out = out[rng.permutation(len(out))]
        self._cache = (epoch, out)
        return out

    def _target(self, rng, max_tokens: int) -> int:
        return int(rng.integers(2, max_tokens + 1)) if rng.random() < self.short_seq_prob else max_tokens

    def _pair(self, rng, docs, d, chunk, starts, ends, target):
        if self.objective == "sop":
            if len(chunk) >= 2:
                a_end = int(rng.integers(1, len(chunk)))
                a = (starts[chunk[0]], ends[chunk[a_end - 1]])
                b = (starts[chunk[a_end]], ends[chunk[-1]])
            else:  # one long sentence: cut it in two
                lo, hi = int(starts[chunk[0]]), int(ends[chunk[0]])
                if hi - lo < 2:
                    return None
                cut = int(rng.integers(lo + 1, hi))
                a, b = (lo, cut), (cut, hi)
            if rng.random() < 0.5:
                return (*b, *a, 1, 0)
            return (*a, *b, 0, 0)
        lo, hi = int(starts[chunk[0]]), int(ends[chunk[-1]])
        if rng.random() >= 0.5 and (len(chunk) >= 2 or hi - lo >= 2):  # B is the actual continuation
            if len(chunk) >= 2:
                a_end = int(rng.integers(1, len(chunk)))
                return (lo, int(ends[chunk[a_end - 1]]), int(starts[chunk[a_end]]), hi, 0, 0)
            cut = int(rng.integers(lo + 1, hi))  # one long sentence: its two halves
            return (lo, cut, cut, hi, 0, 0)
        a_end = int(rng.integers(1, len(chunk))) if len(chunk) >= 2 else 1
        a = (starts[chunk[0]], ends[chunk[a_end - 1]])
        # Random next: B from another document, filled up to the remaining target length; the chunk's
        # unused sentences go back to the pool.
        other = int(rng.integers(len(docs) - 1))
        other += other >= d
        o_starts, o_ends = docs[other]
        if not len(o_starts):
            return None
        j = int(rng.integers(len(o_starts)))
        need = max(1, target - int(a[1] - a[0]))
        k = j
        while k < len(o_starts) - 1 and o_ends[k] - o_starts[j] < need:
            k += 1
        return (*a, int(o_starts[j]), int(o_ends[k]), 1, len(chunk) - a_end)

    def take(self, k: int, shard: tuple[int, int] = (0, 1)) -> dict[str, np.ndarray]:
        """The next k pairs of the epoch's order; with shard=(rank, world), only this rank's k/world."""
        rows = []
        while len(rows) < k:
            inst = self.instances(self._epoch)
            if self._offset >= len(inst):
                self._epoch, self._offset = self._epoch + 1, 0
                continue
            m = min(k - len(rows), len(inst) - self._offset)
            rows.extend(inst[self._offset:self._offset + m])
            self._offset += m
        rank, world = shard
        return self.build(np.array_split(np.asarray(rows), world)[rank])

    def build(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Sequences for instance rows: [CLS] A [SEP] B [SEP], padded."""
        B, T, sp = len(rows), self.seq_len, self.special
        ids = np.full((B, T), sp.pad, dtype=np.int64)
        types = np.zeros((B, T), dtype=np.int64)
        mask = np.zeros((B, T), dtype=np.int64)
        for r, (a0, a1, b0, b1, _) in enumerate(rows):
            la, lb = int(a1 - a0), int(b1 - b0)
            while la + lb > T - 3:  # truncate the longer segment from its end
                if la >= lb:
                    la -= 1
                else:
                    lb -= 1
            seq = np.concatenate([[sp.cls], self.split.tokens[a0:a0 + la], [sp.sep], self.split.tokens[b0:b0 + lb], [sp.sep]])
            ids[r, :len(seq)] = seq
            types[r, la + 2:len(seq)] = 1
            mask[r, :len(seq)] = 1
        return {"input_ids": ids, "token_type_ids": types, "attention_mask": mask,
                "nsp_labels": rows[:, 4].astype(np.int64)}

    @property
    def position(self) -> list[int]:
        return [self._epoch, self._offset]

    @property
    def epoch(self) -> float:
        return self._epoch + self._offset / max(1, len(self.instances(self._epoch)))


class BatchLoader:
    """Training batches cut from the memory-mapped stream in a background thread, `prefetch` batches ahead
    (pinned for fast copies when the model is on a GPU), so the step never waits for data.

    Deterministic: the batches are exactly the source's, in order. Each item comes with the source's
    position after it, which is what a checkpoint must store (not the position of prefetched batches).
    """

    def __init__(self, source: "PackedSource | PairSource", batch_size: int, *, pin: bool = False,
                 prefetch: int = 2, max_id: int | None = None, shard: tuple[int, int] = (0, 1)):
        import queue
        import threading

        self.source, self.batch_size, self.pin, self.max_id, self.shard = source, batch_size, pin, max_id, shard
        self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="maskedlm-loader", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        import torch

        try:
            while not self._stop.is_set():
                arrays = self.source.take(self.batch_size, self.shard)
                ids = arrays["input_ids"]
                if self.max_id is not None and ids.max() >= self.max_id:  # before any embedding lookup
                    raise UserError(f"training data holds token id {int(ids.max())}, outside the model's "
                                    f"vocabulary of {self.max_id}: the prepared data does not match the model")
                batch = Batch(**{k: torch.from_numpy(v) for k, v in arrays.items()})
                if self.pin:
                    batch = batch.pin()
                self._put((batch, self.source.position))
        except BaseException as e:  # hand the error to the consumer instead of dying silently
            self._put(e)

    def _put(self, item) -> None:
        import queue

        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def next(self) -> "tuple[Batch, int | list[int]]":
        """(the next Batch, the source's position after it)."""
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
