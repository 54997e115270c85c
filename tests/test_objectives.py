"""Step 5: sentence pairs (NSP / SOP), whole-word and span masking, the sequence-length curriculum."""

import json

import numpy as np
import pytest
import torch

from maskedlm import Config, DataConfig, Tokenizer, UserError, pretrain
from maskedlm.config import MaskConfig, parse_seq_len_schedule
from maskedlm.corpus import split_sentences
from maskedlm.batches import PairSource
from maskedlm.data import prepare
from maskedlm.masking import IGNORE_INDEX, MaskSpec, select_spans, select_whole_words, span_length_probs, word_starts

from .conftest import scenes, tiny_config


def quiet(*_):
    pass


# -- sentences --------------------------------------------------------------------------------------------


def test_sentence_split_keeps_every_character():
    text = 'HAMLET:\nTo be, or not to be. That is the question!  Whether "tis nobler?" In the mind\n\nTo suffer.'
    parts = split_sentences(text)
    assert "".join(parts) == text
    assert parts == ['HAMLET:\nTo be, or not to be.', ' That is the question!', '  Whether "tis nobler?"',
                     ' In the mind', '\n\nTo suffer.']
    for t in scenes(5):
        assert "".join(split_sentences(t)) == t


@pytest.mark.parametrize("kind", ["wordpiece", "char"])
def test_sentence_splitting_does_not_change_the_token_stream(tmp_path, kind):
    docs = [" ".join(t.split()) for t in scenes(6)]
    (tmp_path / "c.txt").write_text("\n\n".join(docs) + "\n")
    tok = Tokenizer.train_wordpiece(docs, 300) if kind == "wordpiece" else Tokenizer.train_char(docs)
    prep = prepare(DataConfig(train=[str(tmp_path / "c.txt")], valid=[str(tmp_path / "c.txt")]), tokenizer=tok,
                   log=quiet)
    expected = []
    for ids in tok.encode_batch([d + "\n" for d in docs]):  # a document's lines keep their newlines
        expected += ids + [tok.special.sep]
    assert np.asarray(prep.train.tokens).tolist() == expected
    sent = prep.train.sentences
    assert sent[0] == 0 and np.all(np.diff(sent) > 0) and sent[-1] < len(expected)
    assert len(sent) > 3 * len(docs)  # several sentences per scene


# -- sentence pairs ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    d = tmp_path_factory.mktemp("pairs")
    docs = [" ".join(t.split()) for t in scenes(60)]
    (d / "c.txt").write_text("\n\n".join(docs) + "\n")
    return prepare(DataConfig(train=[str(d / "c.txt")], vocab_size=500), log=quiet)


def doc_of(split, offset):
    return int(np.searchsorted(split.doc_offsets, offset, side="right") - 1)


def test_nsp_pairs_are_balanced_and_random_b_is_from_another_document(prepared):
    src = PairSource(prepared.train, 64, prepared.tokenizer.special, "nsp", seed=0)
    rows = np.concatenate([src.instances(e) for e in range(4)])
    assert len(rows) > 2000
    labels = rows[:, 4]
    assert abs(labels.mean() - 0.5) < 0.03, labels.mean()  # ~11k instances: sd 0.005
    split = prepared.train
    for a0, a1, b0, b1, label in rows:
        assert a0 < a1 and b0 < b1
        if label == 1:
            assert doc_of(split, a0) != doc_of(split, b0)
        else:
            assert b0 == a1 and doc_of(split, a0) == doc_of(split, b1 - 1)  # B continues A in the same document
    # short_seq_prob draws shorter targets (BERT's 10%); sentences overshoot targets, so compare 0 with 0.5.
    def short_fraction(prob):
        r = PairSource(prepared.train, 64, prepared.tokenizer.special, "nsp", seed=0, short_seq_prob=prob).instances(0)
        return ((r[:, 1] - r[:, 0]) + (r[:, 3] - r[:, 2]) < 40).mean()

    assert short_fraction(0.5) > short_fraction(0.0) + 0.07  # 12% vs 2% here (seeded, deterministic)


def test_sop_pairs_are_consecutive_and_swapped_half_the_time(prepared):
    src = PairSource(prepared.train, 64, prepared.tokenizer.special, "sop", seed=1)
    rows = np.concatenate([src.instances(e) for e in range(3)])
    assert abs(rows[:, 4].mean() - 0.5) < 0.05
    for a0, a1, b0, b1, label in rows:
        if label == 0:
            assert b0 == a1  # in order
        else:
            assert a0 == b1  # swapped: A is the later segment
        assert doc_of(prepared.train, min(a0, b0)) == doc_of(prepared.train, max(a1, b1) - 1)


def test_pair_sequences_have_segment_ids_padding_without_labels_or_attention(prepared):
    tok = prepared.tokenizer
    src = PairSource(prepared.train, 64, tok.special, "nsp", seed=0)
    b = src.take(64)
    ids, types, attn = b["input_ids"], b["token_type_ids"], b["attention_mask"]
    sp = tok.special
    for r in range(len(ids)):
        n = int(attn[r].sum())
        seq = ids[r, :n]
        seps = np.flatnonzero(seq == sp.sep)
        assert seq[0] == sp.cls and len(seps) == 2 and seps[1] == n - 1
        assert (types[r, :seps[0] + 1] == 0).all() and (types[r, seps[0] + 1:n] == 1).all()
        assert (ids[r, n:] == sp.pad).all() and (types[r, n:] == 0).all() and (attn[r, n:] == 0).all()
    assert (attn == 0).any()  # some pairs are short
    spec = MaskSpec(sp.mask, tok.vocab_size, sp.all(), MaskConfig(mask_prob=0.9))
    _, labels = spec(torch.from_numpy(ids), torch.Generator().manual_seed(0))
    assert (labels[torch.from_numpy(attn) == 0] == IGNORE_INDEX).all()


def test_nsp_needs_two_documents(tmp_path):
    (tmp_path / "one.txt").write_text(" ".join(scenes(1)[0].split()))
    prep = prepare(DataConfig(train=[str(tmp_path / "one.txt")], valid=[str(tmp_path / "one.txt")], vocab_size=200),
                   log=quiet)
    with pytest.raises(UserError, match="at least two documents"):
        PairSource(prep.train, 64, prep.tokenizer.special, "nsp", seed=0)


# -- masking variants -------------------------------------------------------------------------------------


def wordpiece_batch(tok, n_rows=2048, T=128):
    texts = [" ".join(t.split()) for t in scenes(40)]
    stream = np.asarray([i for ids in tok.encode_batch(texts) for i in ids])
    stream = np.resize(stream, n_rows * (T - 2)).reshape(-1, T - 2)  # repeats the text as needed
    sp = tok.special
    ids = np.concatenate([np.full((len(stream), 1), sp.cls), stream, np.full((len(stream), 1), sp.sep)], 1)
    return torch.from_numpy(ids)


def test_whole_word_masking_selects_all_pieces_together_at_the_target_rate():
    tok = Tokenizer.train_wordpiece(scenes(40), 600)
    ids = wordpiece_batch(tok)
    joins, breaks = tok.word_tables()
    starts = word_starts(ids, joins=joins, breaks=breaks, special_ids=tok.special.all())
    sel = select_whole_words(ids, starts, special_ids=tok.special.all(), mask_prob=0.15,
                             generator=torch.Generator().manual_seed(0))
    cont = ~starts
    # every continuation piece shares its word's fate
    prev_sel = torch.nn.functional.pad(sel[:, :-1], (1, 0))
    assert torch.equal(sel[cont], prev_sel[cont])
    assert cont.float().mean() > 0.05  # the vocabulary is small: many words are several pieces
    maskable = ~torch.isin(ids, torch.tensor(tok.special.all()))
    rate = sel.sum().item() / maskable.sum().item()
    assert abs(rate - 0.15) < 0.01, rate  # words are selected with p, so tokens too (in expectation)


def test_whole_word_masking_for_characters_uses_spaces():
    tok = Tokenizer.train_char(["ab cd"])
    ids = torch.tensor([tok.encode("ab cd ab")])
    joins, breaks = tok.word_tables()
    starts = word_starts(ids, joins=joins, breaks=breaks, special_ids=tok.special.all())
    # [CLS] a b ' ' c d ' ' a b [SEP]: words start at a, ' ', c, ' ', a (and specials)
    assert starts[0].tolist() == [True, True, False, True, True, False, True, True, False, True]


@pytest.mark.parametrize("mask_prob", [0.15, 0.3])
def test_span_masking_rate_and_span_lengths(mask_prob):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 1000, (4096, 256), generator=g)
    ids[:, 0], ids[:, -1] = 2, 3
    sel = select_spans(ids, special_ids=(0, 1, 2, 3, 4), mask_prob=mask_prob, generator=g)
    rate = sel[:, 1:-1].float().mean().item()
    assert abs(rate - mask_prob) < 0.015, rate
    assert not sel[:, 0].any() and not sel[:, -1].any()
    # Runs of selected tokens are spans (merged when they overlap): mean run length well above 1.
    x = sel[:, 1:-1].to(torch.int8)
    starts = ((x[:, 1:] == 1) & (x[:, :-1] == 0)).sum() + x[:, 0].sum()
    mean_run = x.sum().item() / starts.item()
    expected_mean = float((span_length_probs(0.2, 10) * torch.arange(1, 11, dtype=torch.float64)).sum())
    assert expected_mean * 0.9 < mean_run < expected_mean * 1.6, (mean_run, expected_mean)


@pytest.mark.parametrize("strategy", ["token", "whole_word", "span"])
def test_each_strategy_keeps_the_80_10_10_rule(strategy):
    tok = Tokenizer.train_wordpiece(scenes(40), 600)
    ids = wordpiece_batch(tok, n_rows=1024)
    cfg = Config().mask
    cfg.strategy = strategy
    spec = MaskSpec.from_tokenizer(tok, cfg)
    inputs, labels = spec(ids, torch.Generator().manual_seed(3))
    sel = labels != IGNORE_INDEX
    frac_mask = ((inputs == tok.special.mask) & sel).sum().item() / sel.sum().item()
    frac_same = ((inputs == ids) & sel).sum().item() / sel.sum().item()
    assert abs(frac_mask - 0.8) < 0.01 and abs(frac_same - 0.1) < 0.01


# -- curriculum -------------------------------------------------------------------------------------------


def test_schedule_parsing():
    assert parse_seq_len_schedule(None, 128) == [(128, 1.0)]
    assert parse_seq_len_schedule("64:0.9,128:0.1", 128) == [(64, 0.9), (128, 1.0)]
    assert parse_seq_len_schedule("ramp:32:128:32", 128) == [(32, 0.25), (64, 0.5), (96, 0.75), (128, 1.0)]
    for bad, msg in [("64:0.5,128:0.4", "add up to 0.9"), ("128:0.5,64:0.5", "it must be --seq-len"),
                     ("64-128", "expected"), ("4:0.5,128:0.5", ">= 8")]:
        with pytest.raises(UserError, match=msg):
            parse_seq_len_schedule(bad, 128)


def records(run):
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]


def test_curriculum_switches_length_at_constant_tokens_and_resumes_exactly(tmp_path, corpus_dir):
    def cfg(name, **kw):
        c = tiny_config(tmp_path / name, [str(corpus_dir)], max_steps=40, log_every=1, eval_every=0,
                        checkpoint_every=10, precision="fp32", **kw)
        c.data.seq_len = 64
        c.train.out = str(tmp_path / name)
        c.train.seq_len_schedule = "16:0.5,64:0.5"
        return c

    full = pretrain(cfg("full"), log=quiet, progress_bar=False)
    recs = [r for r in records(full.run_dir) if "split" not in r]
    assert [r["seq_len"] for r in recs] == [16] * 20 + [64] * 20
    assert {r["tokens"] - p["tokens"] for r, p in zip(recs[1:], recs)} == {8 * 64}  # 32 x 16 = 8 x 64 tokens
    assert json.loads((full.run_dir / "eval.json").read_text())["train_state"]["phase"] == 1
    # crash in the first phase, resume from its step-10 checkpoint: identical losses across the switch
    from .test_reliability import pretrain_until

    pretrain_until(cfg("part"), stop_after=14)
    again = cfg("part")
    again.train.resume = str(tmp_path / "part")
    res = pretrain(again, log=quiet, progress_bar=False)
    a = {r["step"]: r["loss"] for r in recs}
    b = {r["step"]: r["loss"] for r in records(res.run_dir) if "split" not in r}
    assert all(a[s] == b[s] for s in range(11, 41))


@pytest.mark.parametrize("objective", ["mlm+nsp", "mlm+sop"])
def test_sentence_pair_objectives_train_and_export(tmp_path, corpus_dir, objective):
    cfg = tiny_config(tmp_path, [str(corpus_dir)], max_steps=8, log_every=2, eval_every=4)
    cfg.train.objective = objective
    cfg.model.switch_arch("bert")  # the pooler and NSP head are BERT's
    res = pretrain(cfg, log=quiet, progress_bar=False)
    train = [r for r in records(res.run_dir) if "split" not in r]
    assert all(0 <= r["nsp_accuracy"] <= 1 and r["nsp_loss"] > 0 for r in train)
    final = json.loads((res.run_dir / "eval.json").read_text())
    assert final["pairs"] > 10 and 0 <= final["nsp_accuracy"] <= 1 and "accuracy" in final
    hf_config = json.loads((res.run_dir / "hf" / "config.json").read_text())
    assert hf_config["architectures"] == ["BertForPreTraining"]
