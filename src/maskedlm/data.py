"""Prepared data: text -> token streams on disk, cached, sharded by input, streamed with bounded memory.

Every input (a file, a Parquet file, a Hugging Face `datasets` folder, or the embedded corpus) is tokenised
once into a shard named by a hash of everything that decides its content — the input's bytes, the
tokenizer's hash, the reading settings (Cramming's idea, per input):

    <cache>/shards/<key>/train.bin    flat token stream, uint16 (vocab <= 65,535) or uint32; every
    <cache>/shards/<key>/valid.bin    document is followed by [SEP], so packed sequences see its end
    <cache>/shards/<key>/*.idx        int64 document start offsets (n_docs + 1 of them)
    <cache>/shards/<key>/*.sent       int64 sentence start offsets (for next-sentence / sentence-order pairs)
    <cache>/shards/<key>/meta.json    counts, largest token id, replaced UTF-8

A dataset is a list of shards (<cache>/data/<key>/meta.json, plus its concatenated document and sentence
offsets); the token streams stay in their shards and are read as one virtual stream. So a preparation
that is interrupted keeps its finished shards, and a corpus that grows by new files tokenises only those.
Inputs are read in pieces (corpus.py) and written as they are tokenised: memory stays bounded whatever
the corpus size. Several inputs are tokenised in parallel processes (`--workers`), one input on all cores
(the tokenizer's own threads). Validation text is held out by document, by a hash of its text.

The streams do not depend on the sequence length, so one preparation serves every length.
"""

from __future__ import annotations

import hashlib
import itertools
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
from .paths import atomic_write
from .progress import Progress
from .tokenizer import Tokenizer

FORMAT_VERSION = 3
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


# -- streams and splits -----------------------------------------------------------------------------------


class TokenStream:
    """Several memory-mapped token arrays (or ranges of them) read as one: `stream[a:b]` copies just that
    range, crossing shard boundaries as needed."""

    def __init__(self, parts: list[np.ndarray], dtype: np.dtype):
        self.parts = [p for p in parts if len(p)]
        self.dtype = np.dtype(dtype)
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            k = int(key) + (len(self) if key < 0 else 0)
            i = int(np.searchsorted(self.starts, k, side="right") - 1)
            return self.parts[i][k - self.starts[i]]
        start, stop, step = key.indices(len(self))
        if step != 1:
            raise ValueError("TokenStream supports contiguous slices only")
        out, pos = [], start
        while pos < stop:
            i = int(np.searchsorted(self.starts, pos, side="right") - 1)
            end = min(stop, int(self.starts[i + 1]))
            out.append(np.asarray(self.parts[i][pos - self.starts[i]:end - self.starts[i]]))
            pos = end
        return np.concatenate(out) if len(out) != 1 else out[0]

    def __array__(self, dtype=None, copy=None):
        arr = self[0:len(self)] if len(self) else np.zeros(0, dtype=self.dtype)
        return arr.astype(dtype) if dtype is not None else arr


@dataclass
class Split:
    """One split: its token stream (virtual, over the shards), document and sentence start offsets."""

    tokens: TokenStream | np.ndarray  # (n_tokens,) uint16/uint32
    doc_offsets: np.ndarray  # (n_docs + 1,) int64
    sentences: np.ndarray | None = None  # (n_sentences,) int64 start offsets, ascending

    @property
    def num_tokens(self) -> int:
        return int(len(self.tokens))


@dataclass
class Prepared:
    folder: Path
    tokenizer: Tokenizer
    train: Split
    valid: Split
    meta: dict


# -- inputs -----------------------------------------------------------------------------------------------


@dataclass
class _Inputs:
    train: list[corpus.Unit]
    valid: list[corpus.Unit]  # given held-out inputs (else documents are drawn from train by hash)
    description: str

    @property
    def fingerprint(self) -> str:
        return _hash([u.fingerprint for u in self.train], [u.fingerprint for u in self.valid])


def _inputs(cfg: DataConfig) -> _Inputs:
    fps = corpus.FingerprintCache(cache_root(cfg) / "fingerprints.json")
    valid = corpus.units(cfg.valid, fps) if cfg.valid else []
    if cfg.train:
        train = corpus.units(cfg.train, fps)
        desc = f"{len(train)} input(s)"
    elif cfg.corpus:
        train, desc = [corpus.embedded_unit(cfg.corpus)], f"the embedded corpus '{cfg.corpus}'"
    else:
        raise UserError("no training text: give --train PATH... or --corpus shakespeare")
    fps.save()
    return _Inputs(train, valid, desc)


def _unit_hash(text: str) -> float:
    """A number in [0, 1) fixed by the text: decides hold-out by content, wherever the corpus lives."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") / 2**64


def _labelled(pieces: Iterator[corpus.Piece], split: float | str) -> Iterator[tuple[str, corpus.Piece]]:
    """Pieces with their split: all 'train', all 'valid', or (a fraction) documents held out by the hash of
    their first piece. The first document always trains, so an input's training split is never empty."""
    if isinstance(split, str):
        for p in pieces:
            yield split, p
        return
    label, new_doc, first = "train", True, True
    for piece in pieces:
        if new_doc and not first:
            label = "valid" if _unit_hash(piece.text) < split else "train"
        yield label, piece
        new_doc, first = piece.final, False


# -- the tokenizer ----------------------------------------------------------------------------------------


def build_tokenizer(cfg: DataConfig, inp: _Inputs | None = None, log=print) -> Tokenizer:
    """The tokenizer the config asks for: loaded from a file, or trained on (up to `tokenizer_train_bytes`
    of) the training split, and cached."""
    if cfg.tokenizer not in ("wordpiece", "char"):
        return Tokenizer.from_file(cfg.tokenizer)
    inp = inp or _inputs(cfg)
    key = _hash("tokenizer", FORMAT_VERSION, inp.fingerprint, cfg.tokenizer, cfg.vocab_size, cfg.lowercase,
                cfg.valid_fraction, cfg.doc_boundary, cfg.text_field, cfg.strict_utf8, cfg.tokenizer_train_bytes)
    path = cache_root(cfg) / "tokenizers" / f"{key[:24]}.json"
    if path.is_file():
        return Tokenizer.from_file(path)
    t0 = time.time()

    def texts() -> Iterator[str]:
        budget = cfg.tokenizer_train_bytes
        for unit in inp.train:
            pieces = corpus.unit_pieces(unit, cfg, corpus.ReadStats())
            for split, piece in _labelled(pieces, "train" if inp.valid else cfg.valid_fraction):
                if split == "train":
                    yield piece.text
                    budget -= len(piece.text)
                    if budget <= 0:
                        return

    if cfg.tokenizer == "wordpiece":
        tok = Tokenizer.train_wordpiece(texts(), cfg.vocab_size, lowercase=cfg.lowercase)
    else:
        tok = Tokenizer.train_char(texts(), lowercase=cfg.lowercase)
    if tok.vocab_size <= len(tok.special.all()):
        raise UserError(f"the training text of {inp.description} is empty (no tokens to learn a vocabulary from)")
    log(f"trained a {cfg.tokenizer} tokenizer ({tok.vocab_size} tokens) on {inp.description} in {time.time() - t0:.1f}s")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, tok.hf.to_str())
    return tok


# -- shards -----------------------------------------------------------------------------------------------


class _SplitWriter:
    """Appends one split of a shard: tokens, document and sentence offsets, each straight to its file."""

    def __init__(self, path: Path, dtype: np.dtype, sep_id: int):
        self.dtype, self.sep_id = dtype, sep_id
        self.file = open(path, "wb")
        self.idx_file = open(path.with_suffix(".idx"), "wb")
        self.sent_file = open(path.with_suffix(".sent"), "wb")
        np.zeros(1, dtype=np.int64).tofile(self.idx_file)
        self.num_tokens = self.num_docs = 0
        self.max_id = -1

    def add(self, sentences: list[list[int]], final: bool) -> None:
        """Append a piece of a document, as token ids per sentence; `final` closes the document with [SEP]."""
        lengths = np.fromiter(map(len, sentences), dtype=np.int64, count=len(sentences))
        ends = np.cumsum(lengths)
        starts = (self.num_tokens + ends - lengths)[lengths > 0]  # empty sentences start nothing
        arr = np.fromiter(itertools.chain.from_iterable(sentences), dtype=np.int64, count=int(ends[-1]) if len(ends) else 0)
        if final:
            arr = np.append(arr, self.sep_id)
        if arr.size:
            self.max_id = max(self.max_id, int(arr.max()))
            arr.astype(self.dtype).tofile(self.file)
            self.num_tokens += arr.size
        starts.tofile(self.sent_file)
        if final:
            np.asarray([self.num_tokens], dtype=np.int64).tofile(self.idx_file)
            self.num_docs += 1

    def close(self) -> None:
        for f in (self.file, self.idx_file, self.sent_file):
            f.close()


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
            except OSError:  # another process finished the same shard first
                pass
        shutil.rmtree(self.tmp, ignore_errors=True)


def _shard_key(unit: corpus.Unit, tok: Tokenizer, cfg: DataConfig, split: float | str) -> str:
    return _hash("shard", FORMAT_VERSION, unit.fingerprint, tok.hash, cfg.doc_boundary, cfg.text_field,
                 cfg.strict_utf8, split)[:24]


def _write_shard(folder: Path, unit: corpus.Unit, tok: Tokenizer, cfg: DataConfig, split: float | str,
                 progress=None) -> dict:
    """Tokenise one input into a shard folder (atomically). Returns its meta."""
    t0 = time.time()
    dtype = token_dtype(tok.vocab_size)
    stats = corpus.ReadStats()
    with _Staging(folder) as tmp:
        writers = {s: _SplitWriter(tmp / f"{s}.bin", dtype, tok.special.sep) for s in ("train", "valid")}
        batch: list[tuple[str, corpus.Piece]] = []
        chars, seen_bytes, seen_tokens = 0, 0, 0

        def flush() -> None:
            nonlocal batch, chars, seen_bytes, seen_tokens
            split_texts = [corpus.split_sentences(p.text) for _, p in batch]
            encoded = iter(tok.encode_batch([t for texts in split_texts for t in texts]))
            for (label, piece), texts in zip(batch, split_texts):
                writers[label].add([next(encoded) for _ in texts], piece.final)
            batch, chars = [], 0
            if progress is not None:
                tokens = sum(w.num_tokens for w in writers.values())
                progress(stats.bytes - seen_bytes, tokens - seen_tokens)
                seen_bytes, seen_tokens = stats.bytes, tokens

        try:
            for label, piece in _labelled(corpus.unit_pieces(unit, cfg, stats), split):
                batch.append((label, piece))
                chars += len(piece.text)
                if chars >= _BATCH_CHARS:
                    flush()
            flush()
        finally:
            for w in writers.values():
                w.close()
        meta = {"format": FORMAT_VERSION, "input": unit.name, "tokenizer_hash": tok.hash, "dtype": dtype.name,
                "max_token_id": max(w.max_id for w in writers.values()),
                "train": {"tokens": writers["train"].num_tokens, "documents": writers["train"].num_docs},
                "valid": {"tokens": writers["valid"].num_tokens, "documents": writers["valid"].num_docs},
                "bytes_read": stats.bytes, "replaced_chars": stats.replaced_chars,
                "replaced_where": stats.replaced_where, "seconds": round(time.time() - t0, 2)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


def _shard_worker(args) -> tuple[int, dict]:
    """A worker process: tokenise one input (single-threaded: the processes are the parallelism)."""
    i, folder, unit, tok_json, cfg, split = args
    try:
        return i, _write_shard(Path(folder), unit, Tokenizer.from_str(tok_json), cfg, split)
    except UserError as e:
        return i, {"error": str(e)}


def _load_shard_split(folder: Path, split: str, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    path = folder / f"{split}.bin"
    n = path.stat().st_size // dtype.itemsize
    tokens = np.memmap(path, dtype=dtype, mode="r", shape=(n,)) if n else np.zeros(0, dtype=dtype)
    return tokens, np.fromfile(folder / f"{split}.idx", dtype=np.int64), np.fromfile(folder / f"{split}.sent", dtype=np.int64)


def _make_shards(units: list[corpus.Unit], tok: Tokenizer, cfg: DataConfig, split: float | str,
                 log) -> list[Path]:
    """The shard of every input, tokenising those not in the cache (in parallel where there are several)."""
    root = cache_root(cfg) / "shards"
    folders = [root / _shard_key(u, tok, cfg, split) for u in units]
    todo = [i for i, f in enumerate(folders) if not (f / "meta.json").is_file()]
    if not todo:
        return folders
    total = sum(units[i].size for i in todo)
    bar = _PrepareProgress(total, len(todo), log)
    workers = min(cfg.workers or os.cpu_count() or 1, len(todo))
    try:
        if workers <= 1:
            for i in todo:
                _write_shard(folders[i], units[i], tok, cfg, split, progress=bar.add)
                bar.shard_done()
        else:
            import multiprocessing as mp

            ctx = mp.get_context("spawn")
            env = {"TOKENIZERS_PARALLELISM": "false", "RAYON_NUM_THREADS": "1"}
            old = {k: os.environ.get(k) for k in env}
            os.environ.update(env)  # inherited by the spawned workers
            try:
                with ctx.Pool(workers) as pool:
                    jobs = [(i, str(folders[i]), units[i], tok.hf.to_str(), cfg, split) for i in todo]
                    for i, meta in pool.imap_unordered(_shard_worker, jobs):
                        if "error" in meta:
                            raise UserError(meta["error"])
                        bar.add(meta["bytes_read"], meta["train"]["tokens"] + meta["valid"]["tokens"])
                        bar.shard_done()
            finally:
                for k, v in old.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
    finally:
        bar.close()
    return folders


class _PrepareProgress:
    """Bytes and tokens per second while tokenising (a bar on a terminal, a line every 30 s otherwise)."""

    def __init__(self, total_bytes: int, shards: int, log):
        self.bar = Progress(total_bytes or None, "tokenising", unit="B", unit_scale=True)
        self.t0 = time.time()
        self.bytes = self.tokens = self.done = 0
        self.shards = shards

    def add(self, nbytes: int, tokens: int) -> None:
        self.bytes += nbytes
        self.tokens += tokens
        secs = max(time.time() - self.t0, 1e-9)
        self.bar.update(nbytes, f"{self.bytes / secs / 1e6:.1f} MB/s, {self.tokens / secs / 1e6:.2f}M tokens/s, "
                                f"input {self.done}/{self.shards}")

    def shard_done(self) -> None:
        self.done += 1

    def close(self) -> None:
        self.bar.close()


# -- datasets ---------------------------------------------------------------------------------------------


def _assemble(folder: Path, shards: list[Path], tok: Tokenizer, description: str, cfg: DataConfig, t0: float) -> dict:
    """The dataset folder: shard list, concatenated document and sentence offsets (streamed, bounded),
    and when no document fell into the held-out split, the last training document moved there."""
    dtype = token_dtype(tok.vocab_size)
    metas = [json.loads((s / "meta.json").read_text()) for s in shards]
    for s, m in zip(shards, metas):
        if m["tokenizer_hash"] != tok.hash:
            raise UserError(f"{s}: prepared with tokenizer {m['tokenizer_hash'][:12]}, not {tok.hash[:12]}; delete the folder")
    n_train = sum(m["train"]["tokens"] for m in metas)
    n_valid = sum(m["valid"]["tokens"] for m in metas)
    if n_train == 0:
        what = "the training documents" if n_valid else "it"
        raise UserError(f"the corpus ({description}) is empty: {what} hold no text")
    # Held-out fallback: a range [cut, end) of the last shard with training text.
    moved = None
    note = None
    if n_valid == 0:
        last = max(i for i, m in enumerate(metas) if m["train"]["tokens"])
        _, offs, _ = _load_shard_split(shards[last], "train", dtype)
        if sum(m["train"]["documents"] for m in metas) >= 2 and len(offs) >= 3:
            cut = int(offs[-2])
            note = "no document was drawn for validation; held out the last training document"
        else:
            cut = int(offs[-1] * (1 - cfg.valid_fraction))
            note = f"the corpus is a single document; held out its last {cfg.valid_fraction:.0%} of tokens for validation"
        moved = {"shard": last, "cut": cut}
    with _Staging(folder) as tmp:
        counts = _write_dataset_offsets(tmp, shards, dtype, moved)
        meta = {**_dataset_meta(tok, shards, metas, moved, t0), "tokenizer_kind": tok.kind, "vocab_size": tok.vocab_size,
                "dtype": dtype.name, "inputs": description, "bytes_read": sum(m["bytes_read"] for m in metas),
                "settings": {"valid_fraction": cfg.valid_fraction, "doc_boundary": cfg.doc_boundary,
                             "text_field": cfg.text_field, "strict_utf8": cfg.strict_utf8}, "note": note, **counts}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    return meta


def _write_dataset_offsets(tmp: Path, shards: list[Path], dtype: np.dtype, moved: dict | None) -> dict:
    """Each split's document and sentence offsets over all shards, as one virtual stream (train.idx,
    train.sent, valid.idx, valid.sent); with `moved`, the range [cut, end) of that shard's training text
    goes to the end of the held-out split. Returns the splits' token and document counts."""
    counts = {}
    for split in ("train", "valid"):
        with open(tmp / f"{split}.idx", "wb") as fi, open(tmp / f"{split}.sent", "wb") as fs:
            base = 0
            np.zeros(1, dtype=np.int64).tofile(fi)
            for i, s in enumerate(shards):
                _, offs, sent = _load_shard_split(s, split, dtype)
                lo, hi = 0, int(offs[-1])
                if moved and i == moved["shard"]:
                    if split == "train":
                        hi = moved["cut"]
                    else:  # the moved range comes after any held-out text (there is none)
                        continue
                _write_offsets(fi, fs, offs, sent, lo, hi, base)
                base += hi - lo
            if moved and split == "valid":
                _, offs, sent = _load_shard_split(shards[moved["shard"]], "train", dtype)
                _write_offsets(fi, fs, offs, sent, moved["cut"], int(offs[-1]), base, force_start=True)
        offs = np.fromfile(tmp / f"{split}.idx", dtype=np.int64)
        counts[split] = {"tokens": int(offs[-1]), "documents": len(offs) - 1}
    return counts


def _dataset_meta(tok: Tokenizer, shards: list[Path], metas: list[dict], moved: dict | None, t0: float) -> dict:
    return {"format": FORMAT_VERSION, "tokenizer_hash": tok.hash, "shards": [s.name for s in shards],
            "max_token_id": max(m["max_token_id"] for m in metas), "moved_to_valid": moved,
            "replaced_chars": sum(m["replaced_chars"] for m in metas),
            "replaced_where": [w for m in metas for w in m["replaced_where"]][:5], "seconds": round(time.time() - t0, 2)}


def _write_offsets(fi, fs, offs: np.ndarray, sent: np.ndarray, lo: int, hi: int, base: int, force_start: bool = False) -> None:
    """Append the document and sentence starts of range [lo, hi) of a shard split, shifted to `base`."""
    if hi <= lo:
        return
    d = offs[(offs > lo) & (offs <= hi)]
    if len(d) == 0 or d[-1] != hi:
        d = np.append(d, hi)  # a cut inside a document ends it
    (d - lo + base).astype(np.int64).tofile(fi)
    s = sent[(sent >= lo) & (sent < hi)]
    if force_start and (len(s) == 0 or s[0] != lo):
        s = np.concatenate([[lo], s])
    (s - lo + base).astype(np.int64).tofile(fs)


def _load(folder: Path, shards_root: Path, tok: Tokenizer, meta: dict) -> tuple[Split, Split]:
    dtype = token_dtype(tok.vocab_size)
    train_parts, valid_parts = [], []
    moved = meta.get("moved_to_valid")
    for i, name in enumerate(meta["shards"]):
        tr, _, _ = _load_shard_split(shards_root / name, "train", dtype)
        va, _, _ = _load_shard_split(shards_root / name, "valid", dtype)
        if moved and i == moved["shard"]:
            train_parts.append(tr[: moved["cut"]])
            valid_parts.append(va)
            moved_part = tr[moved["cut"]:]
        else:
            train_parts.append(tr)
            valid_parts.append(va)
    if moved:
        valid_parts.append(moved_part)

    def split(name: str, parts) -> Split:
        return Split(TokenStream(parts, dtype), np.fromfile(folder / f"{name}.idx", dtype=np.int64),
                     np.fromfile(folder / f"{name}.sent", dtype=np.int64))

    return split("train", train_parts), split("valid", valid_parts)


def prepare(cfg: DataConfig, tokenizer: Tokenizer | None = None, log=print) -> Prepared:
    """Tokenise the configured corpus into the cache (or reuse it) and return memory-mapped splits."""
    t0 = time.time()
    inp = _inputs(cfg)
    tok = tokenizer or build_tokenizer(cfg, inp, log)
    shards = _make_shards(inp.train, tok, cfg, "train" if inp.valid else cfg.valid_fraction, log)
    shards += _make_shards(inp.valid, tok, cfg, "valid", log)
    key = _hash("data", FORMAT_VERSION, [s.name for s in shards], cfg.valid_fraction)
    folder = cache_root(cfg) / "data" / key[:24]
    if not (folder / "meta.json").is_file():
        meta = _assemble(folder, shards, tok, inp.description, cfg, t0)
        if meta["note"]:
            log(f"note: {meta['note']}")
        log(f"prepared {meta['train']['tokens']:,} training and {meta['valid']['tokens']:,} held-out tokens "
            f"({meta['train']['documents']} + {meta['valid']['documents']} documents) in {meta['seconds']:.1f}s -> {folder}")
    meta = _read_meta(folder, tok, log)
    train, valid = _load(folder, cache_root(cfg) / "shards", tok, meta)
    return Prepared(folder, tok, train, valid, meta)


def prepare_eval(paths: list[str], cfg: DataConfig, tokenizer: Tokenizer, log=print) -> Split:
    """Tokenise evaluation files with a given tokenizer (cached like `prepare`); all of it is held out."""
    t0 = time.time()
    fps = corpus.FingerprintCache(cache_root(cfg) / "fingerprints.json")
    units = corpus.units(paths, fps)
    fps.save()
    shards = _make_shards(units, tokenizer, cfg, "valid", log)
    folder = cache_root(cfg) / "data" / _hash("eval", FORMAT_VERSION, [s.name for s in shards])[:24]
    if not (folder / "meta.json").is_file():
        metas = [json.loads((s / "meta.json").read_text()) for s in shards]
        if sum(m["valid"]["tokens"] for m in metas) == 0:
            raise UserError(f"the evaluation text ({', '.join(paths)}) is empty")
        with _Staging(folder) as tmp:
            _write_dataset_offsets(tmp, shards, token_dtype(tokenizer.vocab_size), None)
            meta = _dataset_meta(tokenizer, shards, metas, None, t0)
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    meta = _read_meta(folder, tokenizer, log)
    return _load(folder, cache_root(cfg) / "shards", tokenizer, meta)[1]


def _read_meta(folder: Path, tok: Tokenizer, log) -> dict:
    meta = json.loads((folder / "meta.json").read_text())
    if meta["tokenizer_hash"] != tok.hash:  # a hash collision or a hand-edited cache
        raise UserError(f"{folder}: prepared with tokenizer {meta['tokenizer_hash'][:12]}, not {tok.hash[:12]}; delete the folder")
    if meta["replaced_chars"]:
        log(f"note: {meta['replaced_chars']} invalid UTF-8 sequence(s) were replaced by U+FFFD "
            f"(first at {', '.join(meta['replaced_where'])}); --strict-utf8 refuses them instead")
    return meta
