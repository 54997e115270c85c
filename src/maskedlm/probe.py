"""A built-in downstream probe on the embedded corpus: which genre is a passage from?

The plays of the embedded corpus sit in genre folders (comedies, histories, problems, roman, romances,
tragedies). Passages of `length` tokens are cut from each play; a third of each genre's plays (at least
one) is the test set, so no passage of a test play is seen by the classifiers. Two classifiers per model:

* linear: multinomial logistic regression on frozen, mean-pooled hidden states (a measure of what the
  representation holds, independent of fine-tuning);
* fine-tuned: the whole encoder with a classifier on [CLS] (`finetune.train_classifier`), a few epochs.

Both are also run on a randomly initialised model of the same shape, so the value of pre-training shows.
Note: pre-training saw the test plays' text (it holds out scenes, not plays); the probe's split is about
the classifiers, which never see a test play.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch

from .config import FinetuneConfig
from .corpus import clean_play, shakespeare_plays
from .finetune import classification_metrics, predict, train_classifier
from .model import BertForPreTraining
from .modernbert import build_model, classifier_from
from .progress import Progress
from .runtime import autocast, resolve_precision
from .tokenizer import Tokenizer


def split_plays() -> tuple[list[tuple[str, str, str]], list[tuple[str, str, str]], list[str]]:
    """(train plays, test plays, genres); a play is (genre, name, cleaned text). Deterministic."""
    by_genre: dict[str, list[tuple[str, str]]] = {}
    for name, md in shakespeare_plays():
        genre = name.split("/")[0]
        by_genre.setdefault(genre, []).append((name, clean_play(md)))
    train, test = [], []
    for genre, plays in sorted(by_genre.items()):
        plays.sort(key=lambda p: hashlib.sha256(p[0].encode()).hexdigest())
        k = max(1, math.ceil(len(plays) / 3))
        test += [(genre, n, t) for n, t in plays[:k]]
        train += [(genre, n, t) for n, t in plays[k:]]
    return train, test, sorted(by_genre)


def passages(tok: Tokenizer, plays, genres: list[str], per_play: int, length: int) -> tuple[list, list[int]]:
    """Evenly spaced passages of length - 2 tokens from each play: ([CLS] ... [SEP] ids, type ids), labels."""
    sp = tok.special
    encoded, labels = [], []
    for (genre, _, text), ids in zip(plays, tok.encode_batch([t for _, _, t in plays])):
        body = length - 2
        starts = np.linspace(0, max(0, len(ids) - body), num=per_play).astype(int)
        for s in dict.fromkeys(starts.tolist()):
            seq = [sp.cls, *ids[s:s + body], sp.sep]
            encoded.append((seq, [0] * len(seq)))
            labels.append(genres.index(genre))
    return encoded, labels


@torch.no_grad()
def pooled_features(model: BertForPreTraining, encoded, pad: int, device, amp, batch: int = 64,
                    progress: Progress | None = None) -> torch.Tensor:
    """Mean of the final hidden states over each passage's tokens (specials excluded). (N, H) fp32."""
    model.eval()
    feats = []
    for start in range(0, len(encoded), batch):
        rows = encoded[start:start + batch]
        T = max(len(r[0]) for r in rows)
        ids = torch.full((len(rows), T), pad, dtype=torch.long)
        for i, (seq, _) in enumerate(rows):
            ids[i, :len(seq)] = torch.tensor(seq)
        mask = (ids != pad).long()
        with autocast(device, amp):
            h = model.bert(ids.to(device), mask.to(device)).float()  # (b, T, H)
        keep = mask.to(device).clone()
        keep[:, 0] = 0  # [CLS]
        keep[torch.arange(len(rows)), mask.sum(1) - 1] = 0  # [SEP]
        feats.append((h * keep[..., None]).sum(1) / keep.sum(1, keepdim=True).clamp(min=1))
        if progress:
            progress.update(1)
    return torch.cat(feats).cpu()


def linear_probe(x_train: torch.Tensor, y_train: list[int], x_test: torch.Tensor, y_test: list[int],
                 num_labels: int, l2: float = 1e-3) -> tuple[float, float]:
    """Multinomial logistic regression (standardised features, L2, full-batch L-BFGS): test accuracy, macro-F1."""
    mean, std = x_train.mean(0), x_train.std(0).clamp(min=1e-6)
    xtr, xte = (x_train - mean) / std, (x_test - mean) / std
    ytr = torch.tensor(y_train)
    torch.manual_seed(0)
    w = torch.zeros(xtr.shape[1], num_labels, requires_grad=True)
    b = torch.zeros(num_labels, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=300, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xtr @ w + b, ytr) + l2 * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    pred = (xte @ w + b).argmax(-1).tolist()
    return classification_metrics(pred, y_test, num_labels)


def genre_probe(model: BertForPreTraining, tok: Tokenizer, device: torch.device, *, per_play: int = 40,
                length: int = 128, finetune_epochs: int = 3, seed: int = 0, log=print,
                progress: bool | None = None) -> dict:
    """The probe on `model` and on a random model of the same shape. Returns a JSON-able dict.
    Minutes on a small CPU: a progress bar (a line every 30 s off a terminal) counts its batches."""
    train_plays, test_plays, genres = split_plays()
    length = min(length, model.config.max_position)
    train = passages(tok, train_plays, genres, per_play, length)
    test = passages(tok, test_plays, genres, per_play, length)
    amp = resolve_precision("auto", device)
    pad = tok.special.pad
    counts = np.bincount(test[1], minlength=len(genres))
    out = {"genres": genres, "test_plays": [n for _, n, _ in test_plays], "train_passages": len(train[1]),
           "test_passages": len(test[1]), "majority_class_accuracy": float(counts.max() / counts.sum())}
    torch.manual_seed(seed)
    random_model = build_model(model.config)
    batches = lambda n, size=64: -(-n // size)  # noqa: E731
    fit = len(train[1]) - len(train[1]) // 5
    per_model = (batches(len(train[1])) + batches(len(test[1]))
                 + (finetune_epochs * batches(fit, 32) if finetune_epochs else 0))
    bar = Progress(2 * per_model, "genre probe", unit="batch", enabled=progress)
    for name, m in (("pretrained", model), ("random_init", random_model)):
        m = m.to(device)
        bar.update(0, f"{name}: features")
        acc, f1 = linear_probe(pooled_features(m, train[0], pad, device, amp, progress=bar), train[1],
                               pooled_features(m, test[0], pad, device, amp, progress=bar), test[1], len(genres))
        entry = {"linear": {"accuracy": acc, "macro_f1": f1}}
        if finetune_epochs:
            clf = classifier_from(m, len(genres))
            # Early stopping on a fifth of the training passages (never on the test plays).
            rng = np.random.default_rng(seed)
            order = rng.permutation(len(train[1]))
            cut = len(order) // 5
            va, tr = order[:cut], order[cut:]
            cfg = FinetuneConfig(epochs=finetune_epochs, patience=finetune_epochs, lr=5e-5, batch_size=32, seed=seed)
            bar.update(0, f"{name}: fine-tuning")
            train_classifier(clf, tok, ([train[0][i] for i in tr], [train[1][i] for i in tr]),
                             ([train[0][i] for i in va], [train[1][i] for i in va]), cfg, device, log=lambda *a: None,
                             progress=bar)
            pred = predict(clf, test[0], 64, pad, device, amp)
            acc_ft, f1_ft = classification_metrics(pred, test[1], len(genres))
            entry["finetuned"] = {"accuracy": acc_ft, "macro_f1": f1_ft, "epochs": finetune_epochs}
        out[name] = entry
    bar.close()
    log(format_probe(out))
    return out


def format_probe(res: dict) -> str:
    rows = [f"genre probe ({res['test_passages']} passages of {len(res['test_plays'])} held-out plays, "
            f"{len(res['genres'])} genres; majority class {res['majority_class_accuracy']:.1%}):"]
    for kind in ("linear", "finetuned"):
        if kind in res["pretrained"]:
            p, r = res["pretrained"][kind], res["random_init"][kind]
            rows.append(f"  {kind:10s} pre-trained: accuracy {p['accuracy']:.1%}, macro-F1 {p['macro_f1']:.3f}   "
                        f"random init: accuracy {r['accuracy']:.1%}, macro-F1 {r['macro_f1']:.3f}")
    return "\n".join(rows)

