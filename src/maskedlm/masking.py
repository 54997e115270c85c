"""Masked-language-model masking, as pure functions.

BERT's procedure (the seed's): select each non-special token with probability `mask_prob` (15%); the model
is trained to predict the original token at the selected positions only. Of the selected positions, 80%
are replaced by `[MASK]`, 10% by a random token and 10% are left unchanged, so that the model must keep a
useful representation of every input token (there is no `[MASK]` at fine-tuning time) and must use the
context to repair the random ones.

Everything here is vectorised and runs on the device of the batch; randomness comes only from the
`torch.Generator` passed in (which must live on the same device), so a mask is reproducible from the
generator's state, which a checkpoint can store. Inputs are never modified. Labels use -100 (PyTorch's
`ignore_index`) at positions that are not predicted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

IGNORE_INDEX = -100


def special_mask(input_ids: torch.Tensor, special_ids: Sequence[int]) -> torch.Tensor:
    """True where `input_ids` holds a special token ([PAD], [CLS], [SEP], ...). Same shape, bool."""
    specials = torch.as_tensor(list(special_ids), dtype=input_ids.dtype, device=input_ids.device)
    return torch.isin(input_ids, specials)


def select_positions(input_ids: torch.Tensor, *, special_ids: Sequence[int], mask_prob: float,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Choose the positions to predict: each non-special token independently with probability `mask_prob`.

    Returns a bool tensor shaped like `input_ids`. Special tokens (padding included) are never chosen.
    """
    u = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)
    return (u < mask_prob) & ~special_mask(input_ids, special_ids)


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
    """The arguments of `mask_tokens` that are fixed for a run (the tokenizer's ids and the mask config)."""

    mask_token_id: int
    vocab_size: int
    special_ids: tuple[int, ...]
    mask_prob: float = 0.15
    mask_token_frac: float = 0.8
    random_token_frac: float = 0.1

    @classmethod
    def from_tokenizer(cls, tokenizer, mask_config) -> "MaskSpec":
        """From a `Tokenizer` and a `MaskConfig`."""
        return cls(tokenizer.special.mask, tokenizer.vocab_size, tokenizer.special.all(), mask_config.mask_prob,
                   mask_config.mask_token_frac, mask_config.random_token_frac)

    def __call__(self, input_ids: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return mask_tokens(input_ids, generator=generator, **asdict(self))
