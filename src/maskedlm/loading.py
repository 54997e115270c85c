"""Loading any folder maskedlm reads, and writing the classifier folders fine-tuning makes.

One entry point above the formats: `open_folder(PATH)` tells what PATH is and loads it:

    a run folder           config.json (maskedlm's) + tokenizer.json + model.safetensors; a run still
                           training (no final weights yet) serves its newest checkpoint when `live`
    a checkpoint folder    RUN/checkpoints/step-N: its weights, with the run's config and tokenizer
    a transformers folder  config.json with a model_type (see hf.py): BertModel / ForMaskedLM / ForPreTraining
    a classifier folder    `maskedlm finetune`'s output: config.json with "task", model.safetensors, tokenizer

`load(PATH)` is the public `maskedlm.load`: the model and tokenizer of any of them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch

from .checkpoint import (find_checkpoint, load_weights, read_config, read_json, read_state, save_weights,
                         verify_checkpoint)
from .config import Config, FinetuneConfig, ModelConfig
from .errors import UserError
from .hf import ImportReport, export_classifier, export_trained, is_hf_folder, load_hf
from .model import BertForPreTraining, BertForSequenceClassification
from .modernbert import build_classifier, build_model, use_phase
from .paths import CONFIG, TOKENIZER, WEIGHTS, CheckpointDir, RunDir, RunLock, atomic_write
from .tokenizer import Tokenizer

CLASSIFIER_TASK = "sequence-classification"

Kind = Literal["run", "checkpoint", "transformers", "classifier"]


@dataclass
class Loaded:
    """A model folder, loaded: the model (eval mode) and tokenizer, and what they came from."""

    model: BertForPreTraining | BertForSequenceClassification
    tokenizer: Tokenizer
    kind: Kind
    source: str  # which weights: 'model.safetensors', 'checkpoint step-00001000', 'BertForMaskedLM weights'
    config: Config | None = None  # a run's (run and checkpoint folders)
    labels: list[str] | None = None  # a classifier's
    report: ImportReport | None = None  # a transformers folder's


def folder_kind(path: str | Path) -> Kind:
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"no such run folder: {p}")
    if (p / CheckpointDir.MANIFEST).is_file():
        return "checkpoint"
    if is_hf_folder(p):
        return "transformers"
    if is_classifier_folder(p):
        return "classifier"
    return "run"


def open_folder(path: str | Path, device: str | torch.device = "cpu", *, live: bool = False) -> Loaded:
    """Load whatever model folder `path` is (see the module docstring)."""
    path = Path(path)
    kind = folder_kind(path)
    if kind == "transformers":
        model, tokenizer, report = load_hf(path)
        loaded = Loaded(model, tokenizer, kind, report.describe(), report=report)
    elif kind == "classifier":
        model, tokenizer, labels = load_classifier(path)
        loaded = Loaded(model, tokenizer, kind, WEIGHTS, labels=labels)
    elif kind == "checkpoint":
        loaded = _load_run(CheckpointDir(path).run, CheckpointDir(path))
    else:
        run = RunDir(path)
        # A run that is training (again, after --resume, if it has final weights from an earlier end): its
        # newest checkpoint for a live reader; the others are told, not handed stale or missing weights.
        holder = RunLock(run).holder()
        if live and run.latest.is_file() and (holder or not run.weights.is_file()):
            loaded = _load_live(run)
        elif holder:
            newest = f"; its newest checkpoint is {find_checkpoint(run.path).path}" if run.latest.is_file() else ""
            final = " (its model.safetensors is from an earlier end)" if run.weights.is_file() else ": no final weights yet"
            raise UserError(f"{run.path} is still training ({holder}){final}{newest}")
        else:
            loaded = _load_run(run, None)
    loaded.model = loaded.model.to(device).eval()
    return loaded


def _load_live(run: RunDir, tries: int = 3) -> Loaded:
    """The newest checkpoint of a run that may still be training. Its writer can drop the checkpoint that
    `latest` named while it is being read (rotation); then the new `latest` is read instead."""
    for attempt in range(tries):
        ckpt = find_checkpoint(run.path)
        try:
            return _load_run(run, ckpt)
        except UserError:
            if attempt == tries - 1 or find_checkpoint(run.path).name == ckpt.name:
                raise  # not a moving target: the checkpoint itself is damaged
    raise AssertionError("unreachable")


def _load_run(run: RunDir, ckpt: CheckpointDir | None) -> Loaded:
    """A run's model: its final weights, or only the weights of checkpoint `ckpt` (checked against its
    manifest; its optimizer state is not read), with the config and tokenizer they were trained with."""
    tokenizer = Tokenizer.from_file(run.tokenizer)
    if ckpt is None:
        cfg = read_config(run.path)
    else:
        verify_checkpoint(ckpt, files=(ckpt.WEIGHTS, ckpt.STATE))
        state = read_state(ckpt)
        if tokenizer.hash != state.tokenizer_hash:
            raise UserError(f"{run.tokenizer}: not the tokenizer {ckpt.path} was trained with (hash "
                            f"{tokenizer.hash[:12]}, the checkpoint's {state.tokenizer_hash[:12]})")
        cfg = state.config
    if tokenizer.vocab_size > cfg.model.vocab_size:  # fewer is fine: a padded embedding table (ModernBERT's)
        raise UserError(f"{run.path}: tokenizer has {tokenizer.vocab_size} tokens, the model {cfg.model.vocab_size}")
    model = build_model(cfg.model)
    load_weights(model, run.weights if ckpt is None else ckpt / ckpt.WEIGHTS)
    use_phase(model, cfg, _final_phase(run, cfg) if ckpt is None else state.train_state.phase)  # as last trained
    if ckpt is None:
        return Loaded(model, tokenizer, "run", WEIGHTS, config=cfg)
    return Loaded(model, tokenizer, "checkpoint", f"checkpoint {ckpt.name}", config=cfg)


def _final_phase(run: RunDir, cfg: Config) -> int:
    """The length phase a run's final weights come from (eval.json's train state; the last phase without one)."""
    try:
        return int(json.loads(run.eval.read_text(encoding="utf-8"))["train_state"]["phase"])
    except (OSError, ValueError, KeyError, TypeError):
        return len(cfg.seq_len_phases()) - 1


def load(path: str | Path, device: str | torch.device = "cpu") -> tuple[BertForPreTraining, Tokenizer]:
    """`model, tokenizer = maskedlm.load(PATH)`: a maskedlm run folder, one of its checkpoints, a Hugging Face
    BERT or ModernBERT folder (BertModel / BertForMaskedLM / BertForPreTraining / ModernBertModel /
    ModernBertForMaskedLM weights and its tokenizer), or a fine-tuned classifier folder (then the model is a
    BertForSequenceClassification or ModernBertForSequenceClassification). Eval mode."""
    loaded = open_folder(path, device)
    return loaded.model, loaded.tokenizer


def load_for_init(path: str | Path) -> tuple[BertForPreTraining, Tokenizer, str]:
    """The model and tokenizer to continue pre-training (or fine-tune) from, and a line saying what was
    loaded: a run folder, a checkpoint, or a transformers BERT or ModernBERT folder."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"--init-from: no such folder: {path}")
    loaded = open_folder(path)
    if loaded.kind == "classifier":
        raise UserError(f"{path}: a fine-tuned classifier; start from the run or transformers folder it came from")
    note = {"transformers": loaded.source, "checkpoint": f"loaded a maskedlm {loaded.source}"}.get(loaded.kind, "loaded a maskedlm run")
    return loaded.model, loaded.tokenizer, note


def export_folder(path: str | Path, out: str | Path) -> Path:
    """Write a run (or checkpoint, or fine-tuned classifier) folder as a transformers folder."""
    loaded = open_folder(path)
    if loaded.kind == "classifier":
        return export_classifier(loaded.model, loaded.tokenizer, loaded.labels, out)
    if loaded.kind == "transformers":
        raise UserError(f"{path}: already a transformers folder")
    return export_trained(loaded.model, loaded.tokenizer, loaded.config, out)


# -- classifier folders (maskedlm finetune) ---------------------------------------------------------------


def save_classifier(model: BertForSequenceClassification, tok: Tokenizer, labels: list[str], cfg: FinetuneConfig,
                    out: Path, metrics: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    save_weights(model, out / WEIGHTS)
    atomic_write(out / CONFIG, json.dumps({"task": CLASSIFIER_TASK, "model": asdict(model.config), "labels": labels,
                                           "finetune": asdict(cfg)}, indent=2) + "\n")
    tok.save(out)
    atomic_write(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")


def load_classifier(folder: str | Path) -> tuple[BertForSequenceClassification, Tokenizer, list[str]]:
    folder = Path(folder)
    raw = read_json(folder / CONFIG, "a classifier's config")
    try:
        model_cfg = ModelConfig(**{"arch": "bert", **raw["model"]})  # folders from before model.arch: BERT
        dropout, labels = raw["finetune"]["dropout"], raw["labels"]
    except (KeyError, TypeError) as e:
        raise UserError(f"{folder / CONFIG}: not a maskedlm classifier config ({e})") from None
    model = build_classifier(model_cfg, len(labels), dropout)
    load_weights(model, folder / WEIGHTS)
    return model.eval(), Tokenizer.from_file(folder / TOKENIZER), labels


def is_classifier_folder(folder: str | Path) -> bool:
    p = Path(folder) / CONFIG
    try:
        return p.is_file() and json.loads(p.read_text()).get("task") == CLASSIFIER_TASK
    except (ValueError, OSError, AttributeError):
        return False
