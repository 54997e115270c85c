"""The training-recipe knobs of Step 11: each changes what it claims; a run with all of them exports cleanly."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from maskedlm import BertForPreTraining, ModelConfig, pretrain
from maskedlm.distributed import Dist
from maskedlm.masking import IGNORE_INDEX, document_attention_mask
from maskedlm.run import build_run
from maskedlm.schedules import lr_factor

from .conftest import tiny_config


def quiet(*_):
    pass


def _tiny_run(tmp_path, corpus_dir, **train):
    return tiny_config(tmp_path, [str(corpus_dir)], **train)


def test_training_mask_rate_is_the_configured_one_and_evaluation_stays_at_15_percent(tmp_path, corpus_dir):
    cfg = _tiny_run(tmp_path, corpus_dir, eval_sequences=10_000)  # every held-out sequence
    cfg.mask.mask_prob = 0.3
    run = build_run(cfg.resolved(), torch.device("cpu"), Dist(), quiet)
    ids = torch.as_tensor(run.feed.loader.source.seqs.get(np.arange(200))[0])  # 200 training sequences
    _, labels = run.step.mask(ids, torch.Generator().manual_seed(0))
    maskable = ~torch.isin(ids, torch.tensor(run.tok.special.all()))
    train_rate = float((labels != IGNORE_INDEX).sum() / maskable.sum())
    eval_labels = torch.cat([lab.flatten() for _, lab, _ in run.evaluator.batches])
    eval_inputs = torch.cat([inp.flatten() for inp, _, _ in run.evaluator.batches])
    selected = eval_labels != IGNORE_INDEX
    # maskable = selected, or left unchanged and not special ([MASK] replaces only selected tokens)
    eval_maskable = selected | ~torch.isin(eval_inputs, torch.tensor(run.tok.special.all()))
    eval_rate, m = float(selected.sum() / eval_maskable.sum()), int(eval_maskable.sum())
    n = int(maskable.sum())
    assert abs(train_rate - 0.3) < 4 * math.sqrt(0.3 * 0.7 / n), (train_rate, n)
    assert abs(eval_rate - 0.15) < 4 * math.sqrt(0.15 * 0.85 / m), (eval_rate, m)
    run.feed.close()


def test_query_and_key_initialisation():
    cfg = ModelConfig(arch="bert", vocab_size=50, num_layers=2, hidden_size=64, num_heads=2, intermediate_size=64, qk_init_std=0.1)
    model = BertForPreTraining(cfg)
    for layer in model.bert.layers:
        assert abs(float(layer.attn.query.weight.detach().std()) - 0.1) < 0.01
        assert abs(float(layer.attn.key.weight.detach().std()) - 0.1) < 0.01
        assert abs(float(layer.attn.value.weight.detach().std()) - 0.02) < 0.003  # the rest as before


def test_sinusoidal_position_table_equals_the_formula():
    cfg = ModelConfig(arch="bert", vocab_size=50, num_layers=1, hidden_size=32, num_heads=2, intermediate_size=64, max_position=40,
                      position_init="sinusoidal")
    param = BertForPreTraining(cfg).bert.embeddings.position.weight
    table = param.detach()
    pos = torch.arange(40, dtype=torch.float64)[:, None]
    i = torch.arange(16, dtype=torch.float64)[None, :]
    angle = pos / 10000 ** (2 * i / 32)
    expected = torch.zeros(40, 32, dtype=torch.float64)
    expected[:, 0::2], expected[:, 1::2] = torch.sin(angle), torch.cos(angle)
    expected *= cfg.init_std * math.sqrt(2)  # the same RMS as the normal initialisation
    torch.testing.assert_close(table.double(), expected, rtol=0, atol=1e-7)
    assert param.requires_grad  # still a learned table
    normal = BertForPreTraining(ModelConfig(arch="bert", vocab_size=50, num_layers=1, hidden_size=32, num_heads=2,
                                            intermediate_size=64, max_position=40)).bert.embeddings.position.weight
    assert abs(float(normal.detach().std()) - cfg.init_std) < 0.003


def test_mlm_bias_starts_at_log_unigram_frequencies(tmp_path, corpus_dir):
    cfg = _tiny_run(tmp_path, corpus_dir)
    cfg.model.mlm_bias_init = "unigram"
    run = build_run(cfg.resolved(), torch.device("cpu"), Dist(), quiet)
    V = run.cfg.model.vocab_size
    counts = np.bincount(np.asarray(run.data.train.tokens, dtype=np.int64), minlength=V).astype(np.float64)
    expected = torch.from_numpy(np.log((counts + 1) / (counts.sum() + V))).float()
    torch.testing.assert_close(run.model.mlm.bias.detach(), expected, rtol=0, atol=1e-5)
    # Before any training the head then predicts the unigram distribution: the most frequent token everywhere.
    assert int(run.model.mlm.bias.argmax()) == int(counts.argmax())
    run.feed.close()


def test_warmup_stable_decay_schedule():
    f = [lr_factor(p, 0.1, "wsd", 0.0, 0.2) for p in (0.0, 0.05, 0.1, 0.5, 0.8, 0.9, 1.0)]
    assert f == pytest.approx([0.0, 0.5, 1.0, 1.0, 1.0, 0.5, 0.0])
    assert lr_factor(0.9, 0.0, "wsd", 0.1, 0.2) == pytest.approx(0.1 + 0.9 * 0.5)


def test_document_masking_keeps_each_token_inside_its_document():
    # [CLS] a a a [SEP] b b [SEP] c [SEP]: three documents packed in one window (SEP = 3)
    ids = torch.tensor([[2, 10, 11, 12, 3, 20, 21, 3, 30, 3]])
    mask = document_attention_mask(ids, sep_id=3)  # (B, T, T) bool, True where a query may attend a key
    seg = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 2, 2])
    assert torch.equal(mask[0], seg[:, None] == seg[None, :])
    torch.manual_seed(0)
    model = BertForPreTraining(ModelConfig(arch="bert", vocab_size=50, num_layers=2, hidden_size=32, num_heads=2,
                                           intermediate_size=64)).eval()
    other = ids.clone()
    other[0, 5:7] = torch.tensor([40, 41])  # change document b only
    h1, h2 = model.bert(ids, mask), model.bert(other, mask)
    torch.testing.assert_close(h1[0, :5], h2[0, :5], rtol=0, atol=0)  # document a cannot see b
    torch.testing.assert_close(h1[0, 8:], h2[0, 8:], rtol=0, atol=0)
    assert not torch.allclose(h1[0, 5:8], h2[0, 5:8])
    plain1, plain2 = model.bert(ids), model.bert(other)
    assert not torch.allclose(plain1[0, :5], plain2[0, :5])  # without the mask it can


def test_evaluations_every_n_training_seconds(tmp_path, corpus_dir):
    res = pretrain(_tiny_run(tmp_path, corpus_dir, max_steps=6, eval_every=0, eval_seconds=1e-9), log=quiet,
                   progress_bar=False)
    evals = [json.loads(line) for line in (res.run_dir / "metrics.jsonl").read_text().splitlines() if '"split"' in line]
    assert [e["step"] for e in evals] == [1, 2, 3, 4, 5, 6]
    assert all(b["elapsed"] > a["elapsed"] for a, b in zip(evals, evals[1:]))


def test_a_run_with_every_knob_on_exports_with_equal_logits(tmp_path, corpus_dir):
    transformers = pytest.importorskip("transformers")
    cfg = _tiny_run(tmp_path, corpus_dir, max_steps=8, doc_masking=True, schedule="wsd")
    cfg.model.switch_arch("bert")  # sinusoidal positions and the query/key init are BERT's knobs
    cfg.model.position_init, cfg.model.mlm_bias_init, cfg.model.qk_init_std = "sinusoidal", "unigram", 0.1
    cfg.mask.mask_prob = 0.3
    res = pretrain(cfg, log=quiet, progress_bar=False)
    from maskedlm import load

    ours, _ = load(res.run_dir)
    theirs = transformers.AutoModelForMaskedLM.from_pretrained(res.run_dir / "hf").eval()
    ids = torch.randint(5, ours.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
