"""Predictions for [MASK] tokens, and the sample view of labml.ai's annotated MLM experiment: held-out
text with masked positions shown as the model's guesses, coloured right/wrong."""

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


@dataclass
class SampleToken:
    token: str  # the held-out token
    guess: str | None = None  # the model's prediction where the token was masked, else None
    correct: bool = False


def sample_rows(model: BertForPreTraining, tokenizer: Tokenizer, stream: np.ndarray, *, lines: int = 3,
                window: int = 48, mask_prob: float = 0.15, seed: int = 0,
                amp_dtype: torch.dtype | None = None) -> list[list[SampleToken]]:
    """Evenly spaced windows of held-out tokens with ~mask_prob of them replaced by [MASK], each token with
    the model's guess where it was masked. Windows where nothing was drawn are left out."""
    if len(stream) == 0:
        return []
    gen = torch.Generator().manual_seed(seed)
    window = min(window, len(stream))
    special = tokenizer.special
    rows = []
    for start in dict.fromkeys(np.linspace(0, len(stream) - window, num=lines).astype(int).tolist()):
        body = torch.as_tensor(np.asarray(stream[start:start + window], dtype=np.int64))
        ids = torch.cat([torch.tensor([special.cls]), body, torch.tensor([special.sep])])
        chosen = select_positions(ids, special_ids=special.all(), mask_prob=mask_prob, generator=gen)
        if not chosen.any():
            continue
        positions = chosen.nonzero().squeeze(1)
        masked = torch.where(chosen, torch.full_like(ids, special.mask), ids)
        guesses = dict(zip(positions.tolist(), mask_logits(model, masked, positions, amp_dtype).argmax(-1).tolist()))
        row = []
        for pos in range(1, len(ids) - 1):
            token = SampleToken(tokenizer.id_to_token(int(ids[pos])))
            if pos in guesses:
                token.guess, token.correct = tokenizer.id_to_token(guesses[pos]), guesses[pos] == int(ids[pos])
            row.append(token)
        rows.append(row)
    return rows


def sample_view(model: BertForPreTraining, tokenizer: Tokenizer, stream: np.ndarray, *, lines: int = 3,
                window: int = 48, mask_prob: float = 0.15, seed: int = 0, color: bool = True,
                amp_dtype: torch.dtype | None = None) -> str:
    """The sample rows as text: masked positions shown as the model's predictions, green if right, red if
    wrong (plain text: [guess] if right, [guess|truth] if wrong)."""
    rows = sample_rows(model, tokenizer, stream, lines=lines, window=window, mask_prob=mask_prob, seed=seed,
                       amp_dtype=amp_dtype)
    masked = [t for row in rows for t in row if t.guess is not None]
    out = [f"masked predictions on held-out text: {sum(t.correct for t in masked)}/{len(masked)} right"]
    for row in rows:
        pieces = [t.token if t.guess is None else _mark(t.guess, t.token, t.correct, color, tokenizer.kind) for t in row]
        out.append("  " + _join(pieces, tokenizer.kind))
    return "\n".join(out) if len(stream) else ""


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
