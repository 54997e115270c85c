"""Prepared data: text -> token arrays on disk, and training batches cut from them.

`prepare` tokenises the corpus once into a cache folder named by a hash of everything that determines its
content (the inputs' bytes, the tokenizer's hash, the reading settings), in the manner of Cramming:

    <cache>/data/<key>/train.bin    flat token stream, uint16 (vocab <= 65,535) or uint32; every document
    <cache>/data/<key>/valid.bin    is followed by [SEP], so packed sequences see document boundaries
    <cache>/data/<key>/train.idx    int64 document start offsets into the stream (n_docs + 1 of them)
    <cache>/data/<key>/train.sent   int64 sentence start offsets (for next-sentence and sentence-order pairs)
    <cache>/data/<key>/meta.json    tokenizer hash, vocab size, dtype, counts

The stream does not depend on the sequence length, so one preparation serves every length (and a
sequence-length schedule). Training sequences are packed: `[CLS] stream[i*L:(i+1)*L] [SEP]` with
L = seq_len - 2 — full length, no padding. The order of sequences is a fresh permutation per epoch drawn
from (seed, epoch), so the loader's whole state is one integer, `position` (sequences served so far):
a checkpoint stores it and a resume continues at once, without replaying data.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import corpus
from .config import DataConfig
from .errors import UserError
from .tokenizer import SpecialIds, Tokenizer

FORMAT_VERSION = 2
_BATCH_CHARS = 4 << 20  # text handed to the tokenizer at once


def cache_root(cfg: DataConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir)
    if env := os.environ.get("MASKEDLM_CACHE"):
        return Path(env)
    return Path.home() / ".cache" / "maskedlm"


def _hash(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


@dataclass
class Split:
    """One split's token stream (memory-mapped) and document offsets."""

    tokens: np.ndarray  # (n_tokens,) uint16/uint32
    doc_offsets: np.ndarray  # (n_docs + 1,) int64
    sentences: np.ndarray | None = None  # (n_sentences,) int64 start offsets, ascending

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])


@dataclass
class Prepared:
    folder: Path
    tokenizer: Tokenizer
    train: Split
    valid: Split
    meta: dict


# -- reading the inputs -----------------------------------------------------------------------------------


@dataclass
class _Inputs:
    train_files: list[Path]
    valid_files: list[Path]
    fingerprint: str  # content hash of every input
    description: str


def _inputs(cfg: DataConfig) -> _Inputs:
    valid_files = corpus.expand_paths(cfg.valid) if cfg.valid else []
    if cfg.train:
        train_files = corpus.expand_paths(cfg.train)
        train_fp, desc = corpus.files_fingerprint(train_files), f"{len(train_files)} file(s)"
    elif cfg.corpus:
        train_files, train_fp, desc = [], corpus.corpus_fingerprint(cfg.corpus), f"the embedded corpus '{cfg.corpus}'"
    else:
        raise UserError("no training text: give --train PATH... or --corpus shakespeare")
    valid_fp = corpus.files_fingerprint(valid_files) if valid_files else None
    return _Inputs(train_files, valid_files, _hash(train_fp, valid_fp), desc)


def _unit_hash(text: str) -> float:
    """A number in [0, 1) fixed by the text: decides hold-out by content, wherever the corpus lives."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") / 2**64


def _labelled_pieces(cfg: DataConfig, inp: _Inputs, stats: corpus.ReadStats) -> Iterator[tuple[str, corpus.Piece]]:
    """Every piece of text with its split ('train' or 'valid'), decided per document."""
    if inp.train_files:
        train = corpus.file_pieces(inp.train_files, cfg.doc_boundary, cfg.text_field, cfg.strict_utf8, stats)
    else:
        train = corpus.shakespeare_pieces(stats)
    # The first document always trains (so the training split is never empty); the others are held out
    # when the hash of their first piece falls under valid_fraction.
    split, new_doc, first = "train", True, True
    for piece in train:
        if new_doc and not inp.valid_files and not first:
            split = "valid" if _unit_hash(piece.text) < cfg.valid_fraction else "train"
        yield split, piece
        new_doc, first = piece.final, False
    if inp.valid_files:
        for piece in corpus.file_pieces(inp.valid_files, cfg.doc_boundary, cfg.text_field, cfg.strict_utf8, stats):
            yield "valid", piece


# -- preparing --------------------------------------------------------------------------------------------


def build_tokenizer(cfg: DataConfig, inp: _Inputs | None = None, log=print) -> Tokenizer:
    """The tokenizer the config asks for: loaded from a file, or trained on the training split (cached)."""
    if cfg.tokenizer not in ("wordpiece", "char"):
        return Tokenizer.from_file(cfg.tokenizer)
    inp = inp or _inputs(cfg)
    key = _hash("tokenizer", FORMAT_VERSION, inp.fingerprint, cfg.tokenizer, cfg.vocab_size, cfg.lowercase,
                cfg.valid_fraction, cfg.doc_boundary, cfg.text_field, cfg.strict_utf8)
    path = cache_root(cfg) / "tokenizers" / f"{key[:24]}.json"
    if path.is_file():
        return Tokenizer.from_file(path)
    t0 = time.time()
    stats = corpus.ReadStats()
    texts = (p.text for split, p in _labelled_pieces(cfg, inp, stats) if split == "train")
    if cfg.tokenizer == "wordpiece":
        tok = Tokenizer.train_wordpiece(texts, cfg.vocab_size, lowercase=cfg.lowercase)
    else:
        tok = Tokenizer.train_char(texts, lowercase=cfg.lowercase)
    if tok.vocab_size <= len(tok.special.all()):
        raise UserError(f"the training text of {inp.description} is empty (no tokens to learn a vocabulary from)")
    log(f"trained a {cfg.tokenizer} tokenizer ({tok.vocab_size} tokens) on {inp.description} in {time.time() - t0:.1f}s")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(tok.hf.to_str(), encoding="utf-8")
    os.replace(tmp, path)
    return tok


class _SplitWriter:
    def __init__(self, path: Path, dtype: np.dtype, sep_id: int):
        self.path, self.dtype, self.sep_id = path, dtype, sep_id
        self.file = open(path, "wb")
        self.sent_file = open(path.with_suffix(".sent"), "wb")
        self.num_tokens = 0
        self.offsets = [0]
        self.max_id = -1

    def add(self, sentences: list[list[int]], final: bool) -> None:
        """Append a piece of a document, as token ids per sentence; `final` closes the document with [SEP]."""
        starts, pos = [], self.num_tokens
        for ids in sentences:
            if ids:
                starts.append(pos)
                pos += len(ids)
        flat = [i for ids in sentences for i in ids]
        arr = np.asarray(flat + [self.sep_id] if final else flat, dtype=np.int64)
        if arr.size:
            self.max_id = max(self.max_id, int(arr.max()))
            arr.astype(self.dtype).tofile(self.file)
            self.num_tokens += arr.size
        np.asarray(starts, dtype=np.int64).tofile(self.sent_file)
        if final:
            self.offsets.append(self.num_tokens)

    def close(self) -> None:
        self.file.close()
        self.sent_file.close()


def _load_split(folder: Path, name: str, dtype: np.dtype) -> Split:
    path = folder / f"{name}.bin"
    n = path.stat().st_size // dtype.itemsize
    tokens = np.memmap(path, dtype=dtype, mode="r", shape=(n,)) if n else np.zeros(0, dtype=dtype)
    offsets = np.fromfile(folder / f"{name}.idx", dtype=np.int64)
    sentences = np.fromfile(folder / f"{name}.sent", dtype=np.int64)
    return Split(tokens, offsets, sentences)


def prepare(cfg: DataConfig, tokenizer: Tokenizer | None = None, log=print) -> Prepared:
    """Tokenise the configured corpus into the cache (or reuse it) and return memory-mapped splits."""
    inp = _inputs(cfg)
    tok = tokenizer or build_tokenizer(cfg, inp, log)
    key = _hash("data", FORMAT_VERSION, inp.fingerprint, tok.hash, cfg.valid_fraction, cfg.doc_boundary,
                cfg.text_field, cfg.strict_utf8)
    folder = cache_root(cfg) / "data" / key[:24]
    dtype = token_dtype(tok.vocab_size)
    if not (folder / "meta.json").is_file():
        t0 = time.time()
        stats = corpus.ReadStats()
        with _Staging(folder) as tmp:
            writers = _tokenize_into(tmp, _labelled_pieces(cfg, inp, stats), tok, dtype)
            train, valid = writers["train"], writers["valid"]
            if train.num_tokens == 0:
                what = "the training documents" if valid.num_tokens else "it"
                raise UserError(f"the corpus ({inp.description}) is empty: {what} hold no text")
            if valid.num_tokens == 0:
                log("note: " + _hold_out_tail(tmp, train, valid, cfg.valid_fraction, dtype))
            meta = _finish(tmp, writers, tok, dtype, inp.description, cfg, stats, t0)
        log(f"prepared {meta['train']['tokens']:,} training and {meta['valid']['tokens']:,} held-out tokens "
            f"({meta['train']['documents']} + {meta['valid']['documents']} documents) in {meta['seconds']:.1f}s -> {folder}")
    meta = _read_meta(folder, tok, log)
    return Prepared(folder, tok, _load_split(folder, "train", dtype), _load_split(folder, "valid", dtype), meta)


def prepare_eval(paths: list[str], cfg: DataConfig, tokenizer: Tokenizer, log=print) -> Split:
    """Tokenise evaluation files with a given tokenizer (cached like `prepare`); all of it is held out."""
    files = corpus.expand_paths(paths)
    key = _hash("eval", FORMAT_VERSION, corpus.files_fingerprint(files), tokenizer.hash, cfg.doc_boundary,
                cfg.text_field, cfg.strict_utf8)
    folder = cache_root(cfg) / "eval" / key[:24]
    dtype = token_dtype(tokenizer.vocab_size)
    if not (folder / "meta.json").is_file():
        t0 = time.time()
        stats = corpus.ReadStats()
        pieces = (("valid", p) for p in corpus.file_pieces(files, cfg.doc_boundary, cfg.text_field, cfg.strict_utf8, stats))
        with _Staging(folder) as tmp:
            writers = _tokenize_into(tmp, pieces, tokenizer, dtype)
            if writers["valid"].num_tokens == 0:
                raise UserError(f"the evaluation text ({', '.join(paths)}) is empty")
            _finish(tmp, writers, tokenizer, dtype, f"{len(files)} file(s)", cfg, stats, t0)
    _read_meta(folder, tokenizer, log)
    return _load_split(folder, "valid", dtype)


class _Staging:
    """A temporary folder renamed into place on success (a reader sees a complete folder or none)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")

    def __enter__(self) -> Path:
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                os.replace(self.tmp, self.folder)
                return
            except OSError:  # another process finished the same preparation first
                pass
        shutil.rmtree(self.tmp, ignore_errors=True)


def _tokenize_into(tmp: Path, pieces: Iterator[tuple[str, corpus.Piece]], tok: Tokenizer,
                   dtype: np.dtype) -> dict[str, _SplitWriter]:
    writers = {s: _SplitWriter(tmp / f"{s}.bin", dtype, tok.special.sep) for s in ("train", "valid")}
    batch: list[tuple[str, corpus.Piece]] = []
    chars = 0

    def flush() -> None:
        nonlocal batch, chars
        split_texts = [corpus.split_sentences(p.text) for _, p in batch]
        encoded = iter(tok.encode_batch([t for texts in split_texts for t in texts]))
        for (split, piece), texts in zip(batch, split_texts):
            writers[split].add([next(encoded) for _ in texts], piece.final)
        batch, chars = [], 0

    try:
        for split, piece in pieces:
            batch.append((split, piece))
            chars += len(piece.text)
            if chars >= _BATCH_CHARS:
                flush()
        flush()
    finally:
        for w in writers.values():
            w.close()
    return writers


def _finish(tmp: Path, writers: dict[str, _SplitWriter], tok: Tokenizer, dtype: np.dtype, inputs: str,
            cfg: DataConfig, stats: corpus.ReadStats, t0: float) -> dict:
    for name, w in writers.items():
        np.asarray(w.offsets, dtype=np.int64).tofile(tmp / f"{name}.idx")
    train, valid = writers["train"], writers["valid"]
    meta = {
        "format": FORMAT_VERSION,
        "tokenizer_hash": tok.hash,
        "tokenizer_kind": tok.kind,
        "vocab_size": tok.vocab_size,
        "dtype": dtype.name,
        "max_token_id": max(train.max_id, valid.max_id),
        "inputs": inputs,
        "settings": {"valid_fraction": cfg.valid_fraction, "doc_boundary": cfg.doc_boundary,
                     "text_field": cfg.text_field, "strict_utf8": cfg.strict_utf8},
        "train": {"tokens": train.num_tokens, "documents": len(train.offsets) - 1},
        "valid": {"tokens": valid.num_tokens, "documents": len(valid.offsets) - 1},
        "bytes_read": stats.bytes,
        "replaced_chars": stats.replaced_chars,
        "replaced_where": stats.replaced_where,
        "seconds": round(time.time() - t0, 2),
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    return meta


def _read_meta(folder: Path, tok: Tokenizer, log) -> dict:
    meta = json.loads((folder / "meta.json").read_text())
    if meta["tokenizer_hash"] != tok.hash:  # a hash collision or a hand-edited cache
        raise UserError(f"{folder}: prepared with tokenizer {meta['tokenizer_hash'][:12]}, not {tok.hash[:12]}; delete the folder")
    if meta["replaced_chars"]:
        log(f"note: {meta['replaced_chars']} invalid UTF-8 sequence(s) were replaced by U+FFFD "
            f"(first at {', '.join(meta['replaced_where'])}); --strict-utf8 refuses them instead")
    return meta


def _hold_out_tail(tmp: Path, train: _SplitWriter, valid: _SplitWriter, fraction: float, dtype: np.dtype) -> str:
    """No document fell into the held-out split: move the last training document (or, with a single
    document, its last `fraction` of tokens) there, so evaluation always has data. Copies in bounded
    chunks, whatever the size of the stream."""
    n_docs = len(train.offsets) - 1
    if n_docs >= 2:
        cut = train.offsets[-2]
        note = "no document was drawn for validation; held out the last training document"
        train.offsets.pop()
    else:
        cut = int(train.num_tokens * (1 - fraction))
        note = f"the corpus is a single document; held out its last {fraction:.0%} of tokens for validation"
        train.offsets[-1] = cut
    stream = np.memmap(tmp / "train.bin", dtype=dtype, mode="r", shape=(train.num_tokens,))
    with open(tmp / "valid.bin", "wb") as f:
        for start in range(cut, train.num_tokens, 1 << 24):
            np.asarray(stream[start:min(train.num_tokens, start + (1 << 24))]).tofile(f)
    del stream
    os.truncate(tmp / "train.bin", cut * dtype.itemsize)
    sent = np.fromfile(tmp / "train.sent", dtype=np.int64)  # one int per sentence: small next to the stream
    keep = int(np.searchsorted(sent, cut))
    moved = sent[keep:] - cut
    if not len(moved) or moved[0] != 0:
        moved = np.concatenate([[0], moved])  # the held-out stream starts a sentence
    moved.astype(np.int64).tofile(tmp / "valid.sent")
    sent[:keep].tofile(tmp / "train.sent")
    valid.num_tokens = train.num_tokens - cut
    valid.offsets = [0, valid.num_tokens]
    train.num_tokens = cut
    return note


# -- batches ----------------------------------------------------------------------------------------------


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
        body = self.tokens[: self.num_full * self.body].reshape(self.num_full, self.body)
        out[full, 1:-1] = body[idx[full]]
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
