"""Predictions for [MASK] tokens, and the seed's sample view: held-out text with masked positions shown as
the model's guesses, coloured right/wrong."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .errors import UserError
from .masking import select_positions
from .model import BertForPreTraining
from .runtime import autocast
from .tokenizer import MASK, Tokenizer


@dataclass
class Prediction:
    token: str
    token_id: int
    prob: float


@torch.no_grad()
def mask_logits(model: BertForPreTraining, input_ids: torch.Tensor, positions: torch.Tensor,
                amp_dtype: torch.dtype | None = None) -> torch.Tensor:
    """MLM logits at `positions` of a single sequence. input_ids: (T,); positions: (M,). Returns (M, V) fp32."""
    device = next(model.parameters()).device
    with autocast(device, amp_dtype):
        hidden = model.bert(input_ids[None].to(device))[0]  # (T, H)
        logits = model.mlm(hidden[positions.to(device)], model.bert.embeddings.word.weight)  # (M, V)
    return logits.float()


def fill_mask(model: BertForPreTraining, tokenizer: Tokenizer, text: str, top_k: int = 5) -> list[list[Prediction]]:
    """Top-k predictions for each [MASK] in `text`, in order of appearance."""
    if top_k < 1:
        raise UserError("--top-k must be >= 1")
    ids = tokenizer.encode(text)
    positions = [i for i, t in enumerate(ids) if t == tokenizer.special.mask]
    if not positions:
        raise UserError(f"the text has no {MASK} token to fill")
    if len(ids) > model.config.max_position:
        raise UserError(f"the text is {len(ids)} tokens long; the model takes at most {model.config.max_position}")
    probs = F.softmax(mask_logits(model, torch.tensor(ids), torch.tensor(positions)), dim=-1)  # (M, V)
    top = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
    return [[Prediction(tokenizer.id_to_token(int(i)), int(i), float(p)) for p, i in zip(ps, is_)]
            for ps, is_ in zip(top.values, top.indices)]


# -- the sample view --------------------------------------------------------------------------------------

GREEN, RED, DIM, RESET = "\033[32m", "\033[31m", "\033[2m", "\033[0m"


def _join(tokens: list[str], kind: str) -> str:
    if kind != "wordpiece":
        return "".join(tokens).replace("\n", " / ")
    out = ""
    for t in tokens:
        out += t[2:] if t.startswith("##") else (" " + t if out else t)
    return out


def sample_view(model: BertForPreTraining, tokenizer: Tokenizer, stream: np.ndarray, *, lines: int = 3,
                window: int = 48, mask_prob: float = 0.15, seed: int = 0, color: bool = True,
                amp_dtype: torch.dtype | None = None) -> str:
    """Windows of held-out tokens with ~mask_prob of them replaced by [MASK], rendered as the model's
    predictions: green if right, red if wrong (plain text: [guess] if right, [guess|truth] if wrong)."""
    if len(stream) == 0:
        return ""
    gen = torch.Generator().manual_seed(seed)
    window = min(window, len(stream))
    starts = np.linspace(0, len(stream) - window, num=lines).astype(int)
    out, right, total = [], 0, 0
    special = tokenizer.special
    for start in dict.fromkeys(starts):  # unique, in order
        body = torch.as_tensor(np.asarray(stream[start:start + window], dtype=np.int64))
        ids = torch.cat([torch.tensor([special.cls]), body, torch.tensor([special.sep])])
        chosen = select_positions(ids, special_ids=special.all(), mask_prob=mask_prob, generator=gen)
        if not chosen.any():
            continue
        positions = chosen.nonzero().squeeze(1)
        masked = torch.where(chosen, torch.full_like(ids, special.mask), ids)
        guesses = mask_logits(model, masked, positions, amp_dtype).argmax(-1).tolist()
        guess_at = dict(zip(positions.tolist(), guesses))
        pieces: list[str] = []
        for pos in range(1, len(ids) - 1):
            truth = tokenizer.id_to_token(int(ids[pos]))
            if pos not in guess_at:
                pieces.append(truth)
                continue
            guess = tokenizer.id_to_token(guess_at[pos])
            ok = guess_at[pos] == int(ids[pos])
            right, total = right + ok, total + 1
            pieces.append(_mark(guess, truth, ok, color, tokenizer.kind))
        out.append(_join(pieces, tokenizer.kind))
    header = f"masked predictions on held-out text: {right}/{total} right"
    return "\n".join([header] + ["  " + line for line in out])


def _mark(guess: str, truth: str, ok: bool, color: bool, kind: str) -> str:
    # Keep a '##' prefix outside the marks so WordPiece joining still works.
    prefix = "##" if kind == "wordpiece" and truth.startswith("##") else ""
    g = guess[2:] if guess.startswith("##") else guess
    t = truth[len(prefix):]
    if kind != "wordpiece":
        g, t = g.replace("\n", "⏎"), t.replace("\n", "⏎")
    if color:
        return prefix + (f"{GREEN}{g}{RESET}" if ok else f"{RED}{g}{RESET}{DIM}({t}){RESET}")
    return prefix + (f"[{g}]" if ok else f"[{g}|{t}]")
