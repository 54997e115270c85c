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
from dataclasses import dataclass
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
    """`model, tokenizer = maskedlm.load(PATH)`: a maskedlm run folder, a Hugging Face BERT folder
    (BertModel / BertForMaskedLM / BertForPreTraining weights and its tokenizer), or a fine-tuned
    classifier folder (then the model is a BertForSequenceClassification). Eval mode."""
    from .finetune import is_classifier_folder, load_classifier
    from .hf import is_hf_folder, load_hf

    run = Path(run)
    if is_hf_folder(run):
        model, tokenizer, _ = load_hf(run)
        return model.to(device), tokenizer
    if is_classifier_folder(run):  # a fine-tuned classifier (maskedlm finetune)
        model, tokenizer, _ = load_classifier(run)
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


# -- training checkpoints ---------------------------------------------------------------------------------
#
# RUN/checkpoints/step-00001000/
#     model.safetensors       fp32 master weights
#     optimizer.safetensors   optimizer state tensors ("state.<param index>.<name>")
#     rng.safetensors         torch CPU / CUDA generator states and the masking generator's
#     state.json              step, tokens, elapsed, data position, full config, tokenizer hash, world size,
#                             optimizer hyper-parameters, Python and NumPy RNG states
#     manifest.json           sha256 of each file above, verified on load
# RUN/checkpoints/latest      name of the newest complete checkpoint, replaced last
#
# A checkpoint is written into a temporary folder, every file fsynced, then renamed into place; only then is
# `latest` replaced (itself via a temporary file and a rename). A crash at any moment leaves either the old
# `latest` pointing to an intact checkpoint, or the new one complete.

CHECKPOINTS, LATEST = "checkpoints", "latest"
FILES = ("model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json")


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # directories cannot be opened on some platforms
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _nonfinite(tensors: dict[str, torch.Tensor]) -> str | None:
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def save_checkpoint(run_dir: Path, *, step: int, weights: dict[str, torch.Tensor], opt_state: dict,
                    state: dict, rng_tensors: dict[str, torch.Tensor], keep: int,
                    protect: str | None = None) -> Path:
    """Write a checkpoint atomically, point `latest` at it, then drop old ones beyond `keep` (never
    `protect`, the one this run resumed from). `weights` is a full state dict, `opt_state` an optimizer
    state dict in torch's format (parameters by index). Raises UserError when a value is not finite;
    OSError when the disk refuses (the previous checkpoint is then untouched)."""
    import shutil

    root = run_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}"
    weights = {k: v.detach().to("cpu").contiguous() for k, v in weights.items()}
    opt_tensors = {f"state.{i}.{k}": v.detach().to("cpu").contiguous()
                   for i, s in opt_state["state"].items() for k, v in s.items() if torch.is_tensor(v)}
    bad = _nonfinite(weights) or _nonfinite(opt_tensors)
    if bad:
        raise UserError(f"refusing to save a checkpoint at step {step}: {bad} holds non-finite values")
    groups = [{k: v for k, v in g.items()} for g in opt_state["param_groups"]]
    tmp = root / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        save_file({k: v.detach().to("cpu").contiguous() for k, v in rng_tensors.items()}, str(tmp / "rng.safetensors"))
        (tmp / "state.json").write_text(json.dumps({**state, "optimizer_param_groups": groups}, indent=1))
        manifest = {f: _sha256(tmp / f) for f in FILES}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        for f in (*FILES, "manifest.json"):
            _fsync(tmp / f)
        _fsync(tmp)
        final = root / name
        if final.exists():  # a checkpoint of this step from an earlier, interrupted attempt
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(root)
        pointer = root / f".{LATEST}.tmp"
        pointer.write_text(name + "\n")
        _fsync(pointer)
        os.replace(pointer, root / LATEST)
        _fsync(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    existing = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))
    for old in existing[: max(0, len(existing) - keep)]:
        if old not in (name, protect):
            shutil.rmtree(root / old, ignore_errors=True)
    return final


def find_checkpoint(path: str | Path) -> Path:
    """The checkpoint folder for `--resume PATH`: a run folder (its latest) or a checkpoint folder."""
    p = Path(path)
    if (p / "manifest.json").is_file():
        return p
    pointer = p / CHECKPOINTS / LATEST
    if not p.is_dir():
        raise UserError(f"--resume: no such folder: {p}")
    if not pointer.is_file():
        raise UserError(f"--resume: {p} has no checkpoint to resume from (no {CHECKPOINTS}/{LATEST})")
    ckpt = p / CHECKPOINTS / pointer.read_text().strip()
    if not ckpt.is_dir():
        raise UserError(f"{pointer} names {ckpt.name}, which does not exist")
    return ckpt


def verify_checkpoint(ckpt: Path) -> None:
    """Check every file against manifest.json; a missing file or a changed byte is an error naming it."""
    try:
        manifest = json.loads((ckpt / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{ckpt}: unreadable manifest.json ({e})") from None
    for f in FILES:
        if f not in manifest or not (ckpt / f).is_file():
            raise UserError(f"{ckpt}: {f} is missing; the checkpoint is incomplete")
        if _sha256(ckpt / f) != manifest[f]:
            raise UserError(f"{ckpt / f}: sha256 does not match manifest.json; the file is corrupted "
                            f"(resume from an older checkpoint: --resume {ckpt.parent}/step-...)")


@dataclass
class Checkpoint:
    path: Path
    state: dict  # state.json
    weights: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor]
    rng: dict[str, torch.Tensor]


def read_checkpoint(path: str | Path) -> Checkpoint:
    ckpt = find_checkpoint(path)
    verify_checkpoint(ckpt)
    return Checkpoint(ckpt, json.loads((ckpt / "state.json").read_text()), load_file(str(ckpt / "model.safetensors")),
                      load_file(str(ckpt / "optimizer.safetensors")), load_file(str(ckpt / "rng.safetensors")))


def optimizer_state(ckpt: Checkpoint) -> dict:
    """The checkpoint's optimizer state dict, in torch's format (parameters by index)."""
    state: dict[int, dict] = {}
    for key, tensor in ckpt.optimizer.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = tensor
    groups = ckpt.state["optimizer_param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    return {"state": state, "param_groups": groups}
