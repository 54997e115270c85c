"""The command line: a tiny run, fill and evaluate on it, and one clear line for every bad input."""

import json
import subprocess
import sys

import pytest

from maskedlm import pretrain

from .conftest import tiny_config


def cli(*args, cwd=None, env=None):
    return subprocess.run([sys.executable, "-m", "maskedlm", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, corpus_dir):
    tmp = tmp_path_factory.mktemp("cli")
    cfg = tiny_config(tmp, [str(corpus_dir)], max_steps=20, precision="fp32")
    return pretrain(cfg, log=lambda *a: None, progress_bar=False).run_dir


def assert_one_line_error(res, pattern):
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("maskedlm: error: "), res.stderr
    assert pattern in lines[0], lines[0]


def test_fill_prints_top_k_for_each_mask(run_dir):
    res = cli("fill", run_dir, "the [MASK] is dead , long live the [MASK] .", "--top-k", "3", "--json")
    assert res.returncode == 0, res.stderr
    preds = json.loads(res.stdout)
    assert len(preds) == 2 and all(len(p) == 3 for p in preds)
    for p in preds:
        probs = [x["prob"] for x in p]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0 + 1e-6
    text = cli("fill", run_dir, "to be or not to [MASK]", "--top-k", "2")
    assert text.returncode == 0 and text.stdout.startswith("[MASK] #1:") and len(text.stdout.splitlines()) == 3


def test_evaluate_reproduces_the_final_evaluation(run_dir):
    res = cli("evaluate", run_dir, "--json", "--precision", "fp32")
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    final = json.loads((run_dir / "eval.json").read_text())
    assert got["predicted"] == final["predicted"]  # the same fixed masks
    assert got["loss"] == pytest.approx(final["loss"], rel=1e-5)
    assert got["accuracy"] == pytest.approx(final["accuracy"])


def test_evaluate_on_other_files(run_dir, corpus_dir):
    res = cli("evaluate", run_dir, "--valid", corpus_dir / "more.jsonl", "--json")
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    assert got["sequences"] == 16 and got["predicted"] > 30  # capped by train.eval_sequences of the run


@pytest.mark.parametrize("args, pattern", [
    (["pretrain", "--train", "no/such/file.txt"], "no such file or folder: no/such/file.txt"),
    (["pretrain", "--max-steps", "0"], "train.max_steps must be >= 1"),
    (["pretrain", "--tokenizer", "missing.json"], "tokenizer file not found"),
    (["fill", "no_run", "a [MASK]"], "no such run folder"),
    (["evaluate", "no_run"], "no such run folder"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, pattern):
    assert_one_line_error(cli(*args, cwd=tmp_path), pattern)


def test_fill_without_mask_and_bad_config(tmp_path, run_dir):
    assert_one_line_error(cli("fill", run_dir, "no blanks here"), "has no [MASK] token")
    (tmp_path / "c.yaml").write_text("train:\n  batchsize: 4\n")
    assert_one_line_error(cli("pretrain", "--config", tmp_path / "c.yaml"), "unknown key train.batchsize")


def test_non_text_training_file(tmp_path):
    (tmp_path / "data.bin").write_bytes(bytes(range(256)) * 64)
    assert_one_line_error(cli("pretrain", "--train", tmp_path / "data.bin", "--out", tmp_path / "r"),
                          "looks like a binary file")
