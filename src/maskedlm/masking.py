"""Masked-language-model masking, as pure functions.

BERT's procedure (Devlin et al. 2019, as labml.ai's annotated MLM page presents it): select each
non-special token with probability `mask_prob` (15%); the model is trained to predict the original token
at the selected positions only. Of the selected positions, 80% are replaced by `[MASK]`, 10% by a random
token and 10% are left unchanged, so that the model must keep a useful representation of every input
token (there is no `[MASK]` at fine-tuning time) and must use the context to repair the random ones.

Everything here is vectorised and runs on the device of the batch; randomness comes only from the
`torch.Generator` passed in (which must live on the same device), so a mask is reproducible from the
generator's state, which a checkpoint can store. Inputs are never modified. Labels use -100 (PyTorch's
`ignore_index`) at positions that are not predicted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .config import MaskConfig

IGNORE_INDEX = -100


def special_mask(input_ids: torch.Tensor, special_ids: Sequence[int]) -> torch.Tensor:
    """True where `input_ids` holds a special token ([PAD], [CLS], [SEP], ...). Same shape, bool."""
    specials = torch.as_tensor(list(special_ids), dtype=input_ids.dtype, device=input_ids.device)
    return torch.isin(input_ids, specials)


def document_attention_mask(input_ids: torch.Tensor, sep_id: int) -> torch.Tensor:
    """Which keys each query may attend in a packed sequence: only those of its own document. A document
    ends with its [SEP] (which belongs to it). (B, T) ids -> (B, T, T) bool, True where attention is allowed.

    [SEP] is special, so masking never replaces one: the mask is the same before and after masking."""
    is_sep = (input_ids == sep_id).long()
    segment = is_sep.cumsum(-1) - is_sep  # (B, T): how many documents ended before each position
    return segment[..., :, None] == segment[..., None, :]


def select_positions(input_ids: torch.Tensor, *, special_ids: Sequence[int], mask_prob: float,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Choose the positions to predict: each non-special token independently with probability `mask_prob`.

    Returns a bool tensor shaped like `input_ids`. Special tokens (padding included) are never chosen.
    """
    u = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)
    return (u < mask_prob) & ~special_mask(input_ids, special_ids)


def word_starts(input_ids: torch.Tensor, *, joins: torch.Tensor, breaks: torch.Tensor,
                special_ids: Sequence[int]) -> torch.Tensor:
    """True where a token begins a word. (B, T) bool.

    A token continues the previous token's word when it `joins` (WordPiece: a '##' piece; characters: any
    non-space character) and the previous token neither `breaks` (characters: whitespace) nor is special.
    joins / breaks: (V,) bool tables indexed by token id.
    """
    ids = input_ids.long()
    prev = torch.nn.functional.pad(ids[..., :-1], (1, 0), value=int(special_ids[0]))
    cont = joins[ids] & ~breaks[prev] & ~special_mask(prev, special_ids)
    return ~cont


def select_whole_words(input_ids: torch.Tensor, starts: torch.Tensor, *, special_ids: Sequence[int],
                       mask_prob: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Whole-word masking: each word is selected with probability `mask_prob`, all of its tokens together.

    The expected fraction of selected tokens is still `mask_prob` (each token is selected exactly when its
    word is). starts: (B, T) bool from `word_starts`. Returns (B, T) bool; special tokens never selected.
    """
    T = input_ids.shape[-1]
    u = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)
    chosen = (u < mask_prob) & starts  # decided at each word's first token
    pos = torch.arange(T, device=input_ids.device).expand_as(starts)
    first = torch.where(starts, pos, torch.zeros_like(pos)).cummax(-1).values  # index of each token's word start
    return chosen.gather(-1, first) & ~special_mask(input_ids, special_ids)


def span_length_probs(p: float, max_len: int) -> torch.Tensor:
    """SpanBERT's span lengths: Geometric(p) clipped to 1..max_len (renormalised). (max_len,) float64."""
    k = torch.arange(1, max_len + 1, dtype=torch.float64)
    probs = p * (1 - p) ** (k - 1)
    return probs / probs.sum()


def select_spans(input_ids: torch.Tensor, *, special_ids: Sequence[int], mask_prob: float, p: float = 0.2,
                 max_len: int = 10, generator: torch.Generator | None = None) -> torch.Tensor:
    """Span masking (SpanBERT): contiguous spans with Geometric(p) lengths clipped at `max_len`.

    Spans start at each maskable token with rate q = -ln(1 - mask_prob) / E[length], so that with
    independent, possibly overlapping spans a token stays uncovered with probability ~exp(-q E[L]) =
    1 - mask_prob: the expected fraction of selected tokens is ~mask_prob, as for token masking.
    Vectorised over the batch; the only loop is over span offsets (max_len of them).
    """
    probs = span_length_probs(p, max_len)
    mean = float((probs * torch.arange(1, max_len + 1, dtype=torch.float64)).sum())
    q = -math.log(1 - mask_prob) / mean
    maskable = ~special_mask(input_ids, special_ids)
    starts = (torch.rand(input_ids.shape, generator=generator, device=input_ids.device) < q) & maskable
    cdf = probs.cumsum(0).to(torch.float32).to(input_ids.device)
    u = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)
    lengths = torch.searchsorted(cdf, u.contiguous(), right=True).clamp(max=max_len - 1) + 1  # (B, T) in 1..max_len
    covered = torch.zeros_like(starts)
    T = input_ids.shape[-1]
    for d in range(min(max_len, T)):
        covered[..., d:] |= (starts & (lengths > d))[..., : T - d]
    return covered & maskable


def random_tokens(shape: torch.Size | tuple[int, ...], *, vocab_size: int, special_ids: Sequence[int],
                  generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
    """Token ids drawn uniformly from the vocabulary without its special tokens. int64, `shape`."""
    specials = sorted({s for s in special_ids if 0 <= s < vocab_size})
    n = vocab_size - len(specials)
    if n <= 0:
        raise ValueError("the vocabulary has no non-special tokens to draw from")
    ids = torch.randint(0, n, shape, generator=generator, device=device)
    # Map rank r among non-special ids to the id itself: step over each special id at or below it.
    # A loop over the (few) special ids, not over tokens.
    for s in specials:
        ids = ids + (ids >= s).long()
    return ids


def apply_mask(input_ids: torch.Tensor, selected: torch.Tensor, *, mask_token_id: int, vocab_size: int,
               special_ids: Sequence[int], mask_token_frac: float = 0.8, random_token_frac: float = 0.1,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Corrupt the selected positions with the 80/10/10 rule. Returns new `(inputs, labels)`.

    Each selected position gets exactly one outcome: `[MASK]` with probability `mask_token_frac`, a random
    non-special token with probability `random_token_frac`, otherwise its own token. `labels` holds the
    original id at selected positions and -100 elsewhere.
    """
    u = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)
    to_mask = selected & (u < mask_token_frac)
    to_random = selected & (u >= mask_token_frac) & (u < mask_token_frac + random_token_frac)
    rand = random_tokens(input_ids.shape, vocab_size=vocab_size, special_ids=special_ids,
                         generator=generator, device=input_ids.device).to(input_ids.dtype)
    inputs = torch.where(to_mask, torch.full_like(input_ids, mask_token_id), input_ids)
    inputs = torch.where(to_random, rand, inputs)
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX)).long()
    return inputs, labels


def mask_tokens(input_ids: torch.Tensor, *, mask_token_id: int, vocab_size: int, special_ids: Sequence[int],
                mask_prob: float = 0.15, mask_token_frac: float = 0.8, random_token_frac: float = 0.1,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking of a batch of token ids. Returns `(inputs, labels)`; `input_ids` is left untouched.

    input_ids: (..., T) integer tensor. special_ids: ids never selected ([PAD], [UNK], [CLS], [SEP], [MASK]).
    """
    selected = select_positions(input_ids, special_ids=special_ids, mask_prob=mask_prob, generator=generator)
    return apply_mask(input_ids, selected, mask_token_id=mask_token_id, vocab_size=vocab_size,
                      special_ids=special_ids, mask_token_frac=mask_token_frac,
                      random_token_frac=random_token_frac, generator=generator)


@dataclass(frozen=True)
class MaskSpec:
    """Masking as a run applies it: the tokenizer's ids and the run's `MaskConfig`.

    config.strategy: 'token' (BERT), 'whole_word' or 'span' (SpanBERT); each selects ~mask_prob of the
    tokens and then applies the same 80/10/10 rule. Whole-word masking needs `joins` / `breaks` tables
    (see `word_starts`).
    """

    mask_token_id: int
    vocab_size: int
    special_ids: tuple[int, ...]
    config: MaskConfig = field(default_factory=MaskConfig)
    joins: torch.Tensor | None = field(default=None, compare=False, repr=False)
    breaks: torch.Tensor | None = field(default=None, compare=False, repr=False)

    @classmethod
    def from_tokenizer(cls, tokenizer, config: MaskConfig) -> "MaskSpec":
        """From a `Tokenizer` and a `MaskConfig`."""
        joins = breaks = None
        if config.strategy == "whole_word":
            joins, breaks = tokenizer.word_tables()
        return cls(tokenizer.special.mask, tokenizer.vocab_size, tokenizer.special.all(), config, joins, breaks)

    def select(self, input_ids: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The positions to predict, (B, T) bool."""
        c = self.config
        if c.strategy == "whole_word":
            dev = input_ids.device
            starts = word_starts(input_ids, joins=self.joins.to(dev), breaks=self.breaks.to(dev),
                                 special_ids=self.special_ids)
            return select_whole_words(input_ids, starts, special_ids=self.special_ids, mask_prob=c.mask_prob,
                                      generator=generator)
        if c.strategy == "span":
            return select_spans(input_ids, special_ids=self.special_ids, mask_prob=c.mask_prob, p=c.span_p,
                                max_len=c.span_max, generator=generator)
        return select_positions(input_ids, special_ids=self.special_ids, mask_prob=c.mask_prob, generator=generator)

    def __call__(self, input_ids: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        selected = self.select(input_ids, generator)
        return apply_mask(input_ids, selected, mask_token_id=self.mask_token_id, vocab_size=self.vocab_size,
                          special_ids=self.special_ids, mask_token_frac=self.config.mask_token_frac,
                          random_token_frac=self.config.random_token_frac, generator=generator)
