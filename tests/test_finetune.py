"""Step 7: fine-tuning for classification and the built-in genre probe."""

import csv
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from maskedlm import UserError, load, pretrain
from maskedlm.config import FinetuneConfig
from maskedlm.finetune import classification_metrics, finetune
from maskedlm.probe import genre_probe, split_plays

from .conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]
ROYAL = "king queen crown throne lord duke prince court".split()
LOVE = "love sweet heart kiss fair gentle dear night".split()


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, corpus_dir):
    tmp = tmp_path_factory.mktemp("ft")
    cfg = tiny_config(tmp, [str(corpus_dir)], max_steps=5)
    cfg.model.hidden_size, cfg.model.num_heads, cfg.model.intermediate_size, cfg.model.num_layers = 64, 2, 128, 2
    return pretrain(cfg, log=lambda *a: None, progress_bar=False).run_dir


def write(path: Path, rows: list[dict]):
    if path.suffix == ".csv":
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def synthetic(n: int, seed: int, pair: bool = False) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(["royal", "love"])
        words = ROYAL if label == "royal" else LOVE
        text = " ".join(rng.choice(words) for _ in range(8))
        if pair:
            same = rng.random() < 0.5
            other = words if same else (LOVE if label == "royal" else ROYAL)
            rows.append({"text": text, "second": " ".join(rng.choice(other) for _ in range(8)),
                         "label": "same" if same else "different"})
        else:
            rows.append({"text": text, "label": label})
    return rows


def test_metrics():
    acc, f1 = classification_metrics([0, 0, 1, 2], [0, 1, 1, 2], 3)
    assert acc == 0.75 and abs(f1 - (2 / 3 + 2 / 3 + 1) / 3) < 1e-12
    assert classification_metrics([0, 0], [0, 0], 2) == (1.0, 0.5)  # a class never seen scores 0 F1


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_finetuning_learns_a_synthetic_task_and_exports_to_transformers(tmp_path, base_run, suffix):
    write(tmp_path / f"train{suffix}", synthetic(400, 0))
    write(tmp_path / f"valid{suffix}", synthetic(100, 1))
    cfg = FinetuneConfig(train=str(tmp_path / f"train{suffix}"), valid=str(tmp_path / f"valid{suffix}"), epochs=6,
                         lr=2e-3, batch_size=16, out=str(tmp_path / "clf"))
    res = finetune(base_run, cfg, log=lambda *a: None)
    assert res.accuracy > 0.95 and res.macro_f1 > 0.95
    saved = json.loads((tmp_path / "clf" / "config.json").read_text())
    assert saved["task"] == "sequence-classification" and sorted(saved["labels"]) == ["love", "royal"]
    model, tok = load(tmp_path / "clf")
    transformers = pytest.importorskip("transformers")
    out = subprocess.run([sys.executable, "-m", "maskedlm", "export", str(tmp_path / "clf"), "--out", str(tmp_path / "hf")],
                         capture_output=True, text=True, env={"PYTHONPATH": str(ROOT / "src"), "PATH": ""})
    assert out.returncode == 0, out.stderr
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.id2label == dict(enumerate(saved["labels"]))
    for text in ["king crown throne lord", "love sweet heart kiss and night"]:
        ids = torch.tensor([tok.encode(text)])
        with torch.no_grad():
            assert (model(ids) - hf(input_ids=ids).logits).abs().max() < 1e-4


def test_sentence_pair_classification(tmp_path, base_run):
    write(tmp_path / "train.jsonl", synthetic(400, 0, pair=True))
    write(tmp_path / "valid.jsonl", synthetic(100, 1, pair=True))
    cfg = FinetuneConfig(train=str(tmp_path / "train.jsonl"), valid=str(tmp_path / "valid.jsonl"),
                         text_pair_col="second", epochs=8, lr=2e-3, batch_size=16, out=str(tmp_path / "pair"))
    res = finetune(base_run, cfg, log=lambda *a: None)
    assert res.accuracy > 0.8


@pytest.mark.parametrize("case, message", [
    ("missing_column", r"train.csv: no column 'label' \(columns: text, tag\)"),
    ("one_class", r"only one class \('royal'\); classification needs at least two"),
    ("unknown_label", r"valid.csv: label\(s\) 'maybe' never occur in"),
])
def test_bad_label_files_are_clear_errors(tmp_path, base_run, case, message):
    rows = synthetic(20, 0)
    valid = synthetic(10, 1)
    if case == "missing_column":
        rows = [{"text": r["text"], "tag": r["label"]} for r in rows]
    elif case == "one_class":
        rows = [{**r, "label": "royal"} for r in rows]
    else:
        valid[3]["label"] = "maybe"
    write(tmp_path / "train.csv", rows)
    write(tmp_path / "valid.csv", valid)
    cfg = FinetuneConfig(train=str(tmp_path / "train.csv"), valid=str(tmp_path / "valid.csv"), epochs=1)
    with pytest.raises(UserError, match=message):
        finetune(base_run, cfg, log=lambda *a: None)
    res = subprocess.run([sys.executable, "-m", "maskedlm", "finetune", str(base_run), "--train",
                          str(tmp_path / "train.csv"), "--valid", str(tmp_path / "valid.csv")],
                         capture_output=True, text=True, env={"PYTHONPATH": str(ROOT / "src"), "PATH": ""})
    assert res.returncode == 2 and res.stderr.startswith("maskedlm: error:") and "Traceback" not in res.stderr


def test_probe_split_is_by_play_and_covers_every_genre():
    train, test, genres = split_plays()
    assert genres == ["comedies", "histories", "problems", "roman", "romances", "tragedies"]
    assert len(train) + len(test) == 38 and not {n for _, n, _ in train} & {n for _, n, _ in test}
    assert {g for g, _, _ in test} == set(genres) == {g for g, _, _ in train}
    assert split_plays()[1] == test  # deterministic


@pytest.mark.slow
def test_genre_probe_reports_pretrained_and_random_baselines(base_run, capsys):
    model, tok = load(base_run)
    res = genre_probe(model, tok, torch.device("cpu"), per_play=6, length=64, finetune_epochs=1, log=lambda *a: None,
                      progress=True)
    # Minutes on a loaded CPU: its progress bar counts every batch it runs, to the end.
    assert "genre probe: 100%" in capsys.readouterr().err
    for name in ("pretrained", "random_init"):
        for kind in ("linear", "finetuned"):
            assert 0.0 <= res[name][kind]["accuracy"] <= 1.0 and 0.0 <= res[name][kind]["macro_f1"] <= 1.0
    assert res["test_passages"] == len(split_plays()[1]) * 6 and 0 < res["majority_class_accuracy"] < 1
