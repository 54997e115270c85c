"""Tokenizers: WordPiece trained on the corpus, character-level (labml.ai's annotated MLM experiment), or
loaded from a file.

All kinds are Hugging Face `tokenizers` objects underneath, so tokenisation runs in Rust on all cores
(`encode_batch`), the same `tokenizer.json` is what `transformers` loads, and there is one code path for
every kind. The special tokens are defined here and nowhere else.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

from .errors import UserError
from .paths import TOKENIZER, VOCAB, atomic_write

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIAL_TOKENS = (PAD, UNK, CLS, SEP, MASK)  # ids 0..4 in the tokenizers we train


@dataclass(frozen=True)
class SpecialIds:
    pad: int
    unk: int
    cls: int
    sep: int
    mask: int

    def all(self) -> tuple[int, ...]:
        return (self.pad, self.unk, self.cls, self.sep, self.mask)


class Tokenizer:
    """A Hugging Face tokenizer plus what masking and packing need: special ids, a content hash."""

    def __init__(self, hf: HFTokenizer):
        hf.no_truncation()
        hf.no_padding()
        missing = [t for t in SPECIAL_TOKENS if hf.token_to_id(t) is None]
        if missing:
            raise UserError(f"tokenizer lacks the special token(s) {' '.join(missing)}; a BERT tokenizer needs all of {' '.join(SPECIAL_TOKENS)}")
        ids = [hf.token_to_id(t) for t in SPECIAL_TOKENS]
        if hf.post_processor is None:
            cls_id, sep_id = ids[2], ids[3]
            hf.post_processor = processors.TemplateProcessing(
                single=f"{CLS} $A {SEP}", pair=f"{CLS} $A {SEP} $B:1 {SEP}:1",
                special_tokens=[(CLS, cls_id), (SEP, sep_id)])
        self.hf = hf
        self.special = SpecialIds(*ids)
        self.vocab_size = hf.get_vocab_size(with_added_tokens=True)
        self.kind = json.loads(hf.to_str())["model"]["type"].lower()  # 'wordpiece', 'wordlevel' (char), ...
        self.hash = hashlib.sha256(hf.to_str().encode()).hexdigest()

    # -- construction -------------------------------------------------------------------------------------

    @classmethod
    def train_wordpiece(cls, texts: Iterable[str], vocab_size: int, lowercase: bool = True) -> "Tokenizer":
        """Train a BERT WordPiece vocabulary (BERT normaliser and pre-tokeniser, `##` continuations)."""
        hf = HFTokenizer(models.WordPiece(unk_token=UNK))
        hf.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                   strip_accents=None, lowercase=lowercase)
        hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        hf.decoder = decoders.WordPiece(prefix="##")
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                            special_tokens=list(SPECIAL_TOKENS), continuing_subword_prefix="##")
        hf.train_from_iterator(texts, trainer=trainer)
        return cls(hf)

    @classmethod
    def train_char(cls, texts: Iterable[str], lowercase: bool = False) -> "Tokenizer":
        """One token per character seen in the training text (spaces and newlines included)."""
        chars: set[str] = set()
        for t in texts:
            chars.update(t.lower() if lowercase else t)
        vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
        for c in sorted(chars):
            vocab.setdefault(c, len(vocab))
        hf = HFTokenizer(models.WordLevel(vocab, unk_token=UNK))
        if lowercase:
            hf.normalizer = normalizers.Lowercase()
        # Oniguruma's (?m) makes '.' match newlines too: every character becomes its own piece.
        hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"(?m)."), behavior="isolated")
        hf.decoder = decoders.Fuse()
        hf.add_special_tokens(list(SPECIAL_TOKENS))
        return cls(hf)

    @classmethod
    def from_file(cls, path: str | Path) -> "Tokenizer":
        """Load a `tokenizer.json`, a BERT `vocab.txt`, or a folder holding one of them."""
        p = Path(path)
        if p.is_dir():
            for name in (TOKENIZER, VOCAB):
                if (p / name).is_file():
                    return cls.from_file(p / name)
            raise UserError(f"{p}: no tokenizer.json or vocab.txt in this folder")
        if not p.is_file():
            raise UserError(f"tokenizer file not found: {p}")
        if p.suffix == ".json":
            try:
                return cls(HFTokenizer.from_file(str(p)))
            except UserError:
                raise
            except Exception as e:
                raise UserError(f"{p}: not a Hugging Face tokenizer.json ({' '.join(str(e).split())[:200]})") from None
        return cls._from_vocab_txt(p)

    @classmethod
    def _from_vocab_txt(cls, p: Path) -> "Tokenizer":
        try:
            tokens = p.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise UserError(f"{p}: a vocab.txt must be UTF-8 text, one token per line") from None
        vocab: dict[str, int] = {}
        for tok in tokens:
            vocab.setdefault(tok, len(vocab))
        if len(vocab) < len(SPECIAL_TOKENS) + 1:
            raise UserError(f"{p}: vocabulary too small ({len(vocab)} tokens)")
        # A vocab.txt does not say whether it is cased; Google's uncased vocabularies have no capitals
        # outside the bracketed special tokens.
        lowercase = not any(any(c.isupper() for c in t) for t in vocab if not (t.startswith("[") and t.endswith("]")))
        hf = HFTokenizer(models.WordPiece(vocab, unk_token=UNK, continuing_subword_prefix="##"))
        hf.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                   strip_accents=None, lowercase=lowercase)
        hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        hf.decoder = decoders.WordPiece(prefix="##")
        hf.add_special_tokens([t for t in SPECIAL_TOKENS if t in vocab])
        return cls(hf)

    @classmethod
    def from_str(cls, s: str) -> "Tokenizer":
        return cls(HFTokenizer.from_str(s))

    # -- use ----------------------------------------------------------------------------------------------

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids without special tokens, for many texts at once (parallel, in Rust)."""
        return [e.ids for e in self.hf.encode_batch_fast(texts, add_special_tokens=False)]

    def encode(self, text: str, pair: str | None = None, special_tokens: bool = True) -> list[int]:
        return self.hf.encode(text, pair, add_special_tokens=special_tokens).ids

    def id_to_token(self, i: int) -> str:
        return self.hf.id_to_token(i) or UNK

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=False)

    def word_tables(self):
        """(joins, breaks): (V,) bool tensors for whole-word masking (see masking.word_starts).

        WordPiece: '##' pieces join the previous token. Characters: non-space characters join, whitespace
        breaks. Other tokenizers cannot say where words start from their tokens alone."""
        import torch

        vocab = self.hf.get_vocab(with_added_tokens=True)
        joins = torch.zeros(self.vocab_size, dtype=torch.bool)
        breaks = torch.zeros(self.vocab_size, dtype=torch.bool)
        if self.kind == "wordpiece":
            for tok, i in vocab.items():
                joins[i] = tok.startswith("##")
        elif self.kind == "wordlevel":
            special = set(SPECIAL_TOKENS)
            for tok, i in vocab.items():
                if tok not in special:
                    breaks[i] = tok.isspace()
                    joins[i] = not tok.isspace()
        else:
            raise UserError(f"whole-word masking needs a WordPiece or character tokenizer, not {self.kind!r}")
        return joins, breaks

    def save(self, folder: str | Path) -> None:
        """Write tokenizer.json (and vocab.txt for WordPiece, as BERT tooling expects)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / TOKENIZER, self.hf.to_str())
        if self.kind == "wordpiece":
            vocab = self.hf.get_vocab(with_added_tokens=True)
            by_id = sorted(vocab.items(), key=lambda kv: kv[1])
            atomic_write(folder / VOCAB, "".join(t + "\n" for t, _ in by_id))
