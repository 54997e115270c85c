"""Saving and loading a run folder: weights in safetensors, config and state in JSON. No pickles.

A finished run folder holds:
    model.safetensors   the weights (parameter names as in model.py)
    config.json         the full resolved config (every field, tokenizer vocabulary filled in)
    tokenizer.json      the tokenizer (and vocab.txt for WordPiece)
    metrics.jsonl       one record per logged step and per evaluation
    eval.json           the final held-out metrics
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import Config
from .errors import UserError
from .model import BertForPreTraining
from .tokenizer import Tokenizer

WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", "config.json", "tokenizer.json"


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_weights(model: torch.nn.Module, path: Path) -> None:
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)


def save_config(cfg: Config, path: Path) -> None:
    atomic_write_text(path, json.dumps(cfg.to_dict(), indent=2) + "\n")


def read_config(run: Path) -> Config:
    if not run.is_dir():
        raise UserError(f"no such run folder: {run}")
    path = run / CONFIG
    if not path.is_file():
        raise UserError(f"{run}: not a maskedlm run folder (no {CONFIG})")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    return Config.from_dict(raw, allow_derived=True)


def load_weights(model: torch.nn.Module, path: Path) -> None:
    if not path.is_file():
        raise UserError(f"{path.parent}: no weights ({path.name}); did the run finish?")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path}: cannot read weights ({e})") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''}")
        if wrong:
            k = wrong[0]
            parts.append(f"shape of {k} is {tuple(state[k].shape)}, config says {tuple(expected[k].shape)}")
        raise UserError(f"{path}: weights do not match config.json: {'; '.join(parts)}")
    model.load_state_dict(state)


def load(run: str | Path, device: str | torch.device = "cpu") -> tuple[BertForPreTraining, Tokenizer]:
    """`model, tokenizer = maskedlm.load(PATH)`: a maskedlm run folder, or a Hugging Face BERT folder
    (BertModel / BertForMaskedLM / BertForPreTraining weights and its tokenizer). Eval mode."""
    from .hf import is_hf_folder, load_hf

    run = Path(run)
    if is_hf_folder(run):
        model, tokenizer, _ = load_hf(run)
        return model.to(device), tokenizer
    cfg = read_config(run)
    tokenizer = Tokenizer.from_file(run / TOKENIZER)
    if tokenizer.vocab_size != cfg.model.vocab_size:
        raise UserError(f"{run}: tokenizer has {tokenizer.vocab_size} tokens, the model {cfg.model.vocab_size}")
    model = BertForPreTraining(cfg.model)
    load_weights(model, run / WEIGHTS)
    return model.to(device).eval(), tokenizer


def load_for_init(path: str | Path) -> tuple[BertForPreTraining, Tokenizer, str]:
    """The model and tokenizer to continue pre-training from, and a line saying what was loaded."""
    from .hf import is_hf_folder, load_hf

    path = Path(path)
    if not path.is_dir():
        raise UserError(f"--init-from: no such folder: {path}")
    if is_hf_folder(path):
        model, tokenizer, report = load_hf(path)
        return model, tokenizer, report.describe()
    model, tokenizer = load(path)
    return model, tokenizer, "loaded a maskedlm run"
