"""Fine-tuning a pre-trained encoder for sequence classification, so users judge it on their own task.

`maskedlm finetune RUN --train train.csv --valid valid.csv` reads labelled examples (CSV with a header, or
JSONL; one text or a pair of texts per example), puts a classifier on the pooled [CLS] of the encoder
(Hugging Face's `BertForSequenceClassification`, parameter for parameter), trains with AdamW and a linear
warmup/decay, stops early on validation accuracy, and reports accuracy and macro-F1. The output folder
loads with `maskedlm.load` and exports (`maskedlm export`) to a transformers folder.
"""

from __future__ import annotations

import csv
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import FinetuneConfig
from .errors import UserError
from .loading import open_folder, save_classifier
from .paths import CheckpointDir
from .model import BertForSequenceClassification
from .modernbert import classifier_from
from .optim import build_optimizer, clip_gradients, set_lr
from .progress import Progress
from .runtime import autocast, resolve_device, resolve_precision
from .schedules import lr_factor
from .tokenizer import Tokenizer


@dataclass
class Examples:
    texts: list[str]
    pairs: list[str] | None
    labels: list[str]


def read_examples(path: str | Path, cfg: FinetuneConfig) -> Examples:
    """Labelled examples from a .csv (header row) or .jsonl file; errors name the file, line and column."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"no such file: {p}")
    rows: list[tuple[int, dict]] = []
    try:
        if p.suffix == ".jsonl":
            with open(p, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            obj = json.loads(line)
                        except json.JSONDecodeError as e:
                            raise UserError(f"{p}:{n}: not valid JSON ({e.msg})") from None
                        if not isinstance(obj, dict):
                            raise UserError(f"{p}:{n}: expected a JSON object")
                        rows.append((n, obj))
        elif p.suffix in (".csv", ".tsv"):
            with open(p, encoding="utf-8", newline="") as f:
                reader = csv.DictReader(f, delimiter="\t" if p.suffix == ".tsv" else ",")
                rows = [(n, r) for n, r in enumerate(reader, 2)]
                columns = reader.fieldnames or []
                for col in filter(None, (cfg.text_col, cfg.text_pair_col, cfg.label_col)):
                    if col not in columns:
                        raise UserError(f"{p}: no column {col!r} (columns: {', '.join(columns)})")
        else:
            raise UserError(f"{p}: labelled data must be .csv, .tsv or .jsonl")
    except UnicodeDecodeError:
        raise UserError(f"{p}: not UTF-8 text") from None
    if not rows:
        raise UserError(f"{p}: no examples")
    out = Examples([], [] if cfg.text_pair_col else None, [])
    for n, r in rows:
        for col in filter(None, (cfg.text_col, cfg.text_pair_col, cfg.label_col)):
            if r.get(col) is None:
                raise UserError(f"{p}:{n}: missing column {col!r}")
        out.texts.append(str(r[cfg.text_col]))
        if out.pairs is not None:
            out.pairs.append(str(r[cfg.text_pair_col]))
        out.labels.append(str(r[cfg.label_col]))
    return out


def encode(tok: Tokenizer, ex: Examples, max_len: int) -> list[tuple[list[int], list[int]]]:
    """(ids, token types) per example: [CLS] text [SEP] (pair [SEP]), truncated longest-first to max_len."""
    hf = Tokenizer.from_str(tok.hf.to_str()).hf
    hf.enable_truncation(max_len)
    inputs = list(zip(ex.texts, ex.pairs)) if ex.pairs is not None else ex.texts
    return [(e.ids, e.type_ids) for e in hf.encode_batch(inputs)]


def _batches(encoded: list[tuple[list[int], list[int]]], labels: list[int], batch: int, pad: int,
             order: list[int]):
    for start in range(0, len(order), batch):
        idx = order[start:start + batch]
        T = max(len(encoded[i][0]) for i in idx)
        ids = torch.full((len(idx), T), pad, dtype=torch.long)
        types = torch.zeros((len(idx), T), dtype=torch.long)
        mask = torch.zeros((len(idx), T), dtype=torch.long)
        for r, i in enumerate(idx):
            n = len(encoded[i][0])
            ids[r, :n] = torch.tensor(encoded[i][0])
            types[r, :n] = torch.tensor(encoded[i][1])
            mask[r, :n] = 1
        yield ids, types, mask, torch.tensor([labels[i] for i in idx])


def classification_metrics(pred: list[int], gold: list[int], num_labels: int) -> tuple[float, float]:
    """Accuracy and macro-F1 (the mean over classes of F1; a class never predicted nor present counts 0)."""
    acc = sum(p == g for p, g in zip(pred, gold)) / max(len(gold), 1)
    f1s = []
    for c in range(num_labels):
        tp = sum(p == c and g == c for p, g in zip(pred, gold))
        fp = sum(p == c and g != c for p, g in zip(pred, gold))
        fn = sum(p != c and g == c for p, g in zip(pred, gold))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return acc, sum(f1s) / num_labels


@torch.no_grad()
def predict(model: BertForSequenceClassification, encoded, batch: int, pad: int, device, amp) -> list[int]:
    model.eval()
    out: list[int] = []
    for ids, types, mask, _ in _batches(encoded, [0] * len(encoded), batch, pad, list(range(len(encoded)))):
        with autocast(device, amp):
            logits = model(ids.to(device), mask.to(device), types.to(device))
        out.extend(logits.float().argmax(-1).tolist())
    return out


@dataclass
class FinetuneResult:
    accuracy: float
    macro_f1: float
    epochs: int
    out_dir: Path | None
    history: list[dict] = field(default_factory=list)


def train_classifier(model: BertForSequenceClassification, tok: Tokenizer, train: tuple[list, list[int]],
                     valid: tuple[list, list[int]], cfg: FinetuneConfig, device, log=print,
                     progress: bool | None | Progress = None) -> FinetuneResult:
    """Fine-tune `model` in place on encoded (examples, label ids); keeps the best epoch's weights.
    The optimizer, learning-rate schedule (linear warmup and decay) and clipping are pre-training's.
    `progress`: a bar of its own (True / False / None: on a terminal), or a caller's bar to advance."""
    amp = resolve_precision("auto", device)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    model.to(device)
    opt = build_optimizer(model, "adamw", lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = math.ceil(len(train[1]) / cfg.batch_size) * cfg.epochs
    step = 0
    pad = tok.special.pad
    best, best_state, history, stale = -1.0, None, [], 0
    bar = progress if isinstance(progress, Progress) else Progress(total, "fine-tuning", unit="step", enabled=progress)
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        order = list(range(len(train[1])))
        rng.shuffle(order)
        loss_sum = 0.0
        for ids, types, mask, y in _batches(train[0], train[1], cfg.batch_size, pad, order):
            set_lr(opt, cfg.lr * lr_factor((step + 0.5) / total, cfg.warmup_frac))  # mid-step: none gets LR 0
            step += 1
            with autocast(device, amp):
                logits = model(ids.to(device), mask.to(device), types.to(device))
            loss = F.cross_entropy(logits.float(), y.to(device))
            loss.backward()
            clip_gradients(list(model.parameters()), cfg.clip_grad)
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss_sum += float(loss.detach()) * len(y)
            bar.update(1, f"epoch {epoch} loss {float(loss.detach()):.4f}" if bar is not progress else None)
        pred = predict(model, valid[0], cfg.batch_size, pad, device, amp)
        acc, f1 = classification_metrics(pred, valid[1], model.num_labels)
        history.append({"epoch": epoch, "train_loss": loss_sum / len(train[1]), "valid_accuracy": acc, "valid_macro_f1": f1})
        log(f"epoch {epoch}: train loss {loss_sum / len(train[1]):.4f}, valid accuracy {acc:.1%}, macro-F1 {f1:.3f}")
        if acc > best:
            best, stale = acc, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            stale += 1
            if stale >= cfg.patience:
                break
    if bar is not progress:
        bar.close()
    model.load_state_dict(best_state)
    best_epoch = max(history, key=lambda h: h["valid_accuracy"])
    return FinetuneResult(best_epoch["valid_accuracy"], best_epoch["valid_macro_f1"], len(history), None, history)


def finetune(run: str | Path, cfg: FinetuneConfig, log=print) -> FinetuneResult:
    """Fine-tune the encoder of a run (or Hugging Face BERT folder) on labelled data; save the classifier."""
    cfg.validate()
    device = resolve_device(cfg.device)
    loaded = open_folder(run)  # a run, a checkpoint, a transformers BERT, or an earlier classifier: its encoder
    base, tok = loaded.model, loaded.tokenizer
    train_ex, valid_ex = read_examples(cfg.train, cfg), read_examples(cfg.valid, cfg)
    labels = sorted(set(train_ex.labels), key=lambda x: (len(x), x))
    if len(labels) < 2:
        raise UserError(f"{cfg.train}: only one class ({labels[0]!r}); classification needs at least two")
    index = {label: i for i, label in enumerate(labels)}
    unknown = sorted(set(valid_ex.labels) - set(labels))
    if unknown:
        raise UserError(f"{cfg.valid}: label(s) {', '.join(map(repr, unknown[:5]))} never occur in {cfg.train}")
    if cfg.max_len > base.config.max_position:
        raise UserError(f"--max-len {cfg.max_len} exceeds the model's {base.config.max_position} positions")
    model = classifier_from(base, len(labels), cfg.dropout)
    train = (encode(tok, train_ex, cfg.max_len), [index[x] for x in train_ex.labels])
    valid = (encode(tok, valid_ex, cfg.max_len), [index[x] for x in valid_ex.labels])
    log(f"fine-tuning on {len(train[1])} examples ({len(labels)} classes), validating on {len(valid[1])}")
    result = train_classifier(model, tok, train, valid, cfg, device, log)
    home = CheckpointDir(Path(run)).run.path if loaded.kind == "checkpoint" else Path(run)  # not where rotation deletes
    out = Path(cfg.out) if cfg.out else home / f"finetuned-{Path(cfg.train).stem}"
    save_classifier(model.cpu(), tok, labels, cfg, out, {"accuracy": result.accuracy, "macro_f1": result.macro_f1,
                                                          "history": result.history})
    result.out_dir = out
    log(f"validation: accuracy {result.accuracy:.1%}, macro-F1 {result.macro_f1:.3f}; saved to {out}")
    return result
