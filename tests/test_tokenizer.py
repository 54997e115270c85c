"""Tokenizers: trained WordPiece, character-level, loading files; special tokens in one place."""

import pytest

from maskedlm import Tokenizer, UserError
from maskedlm.tokenizer import SPECIAL_TOKENS

from .conftest import scenes

TEXTS = scenes(30)


def test_wordpiece_trains_to_the_requested_size_with_specials_first():
    tok = Tokenizer.train_wordpiece(TEXTS, vocab_size=500)
    assert tok.vocab_size == 500
    assert [tok.hf.id_to_token(i) for i in range(5)] == list(SPECIAL_TOKENS)
    assert tok.special.all() == (0, 1, 2, 3, 4)
    assert tok.kind == "wordpiece"
    ids = tok.encode("To be, or not to be", special_tokens=True)
    assert ids[0] == tok.special.cls and ids[-1] == tok.special.sep
    assert tok.special.unk not in ids


def test_mask_token_in_text_is_recognised_and_lowercasing_keeps_it():
    tok = Tokenizer.train_wordpiece(TEXTS, vocab_size=500, lowercase=True)
    ids = tok.encode("The KING is [MASK] .")
    assert ids.count(tok.special.mask) == 1
    assert tok.encode("the king") == tok.encode("THE KING")


def test_char_tokenizer_round_trips_text():
    tok = Tokenizer.train_char(TEXTS)
    assert tok.kind == "wordlevel"
    text = "Who's there?\nNay, answer me."
    ids = tok.encode_batch([text])[0]
    assert len(ids) == len(text)
    assert tok.decode(ids) == text
    ids = tok.encode("ab[MASK]c", special_tokens=False)
    assert ids == [tok.hf.token_to_id("a"), tok.hf.token_to_id("b"), tok.special.mask, tok.hf.token_to_id("c")]


def test_save_load_round_trip_keeps_hash_and_ids(tmp_path):
    tok = Tokenizer.train_wordpiece(TEXTS, vocab_size=400)
    tok.save(tmp_path)
    again = Tokenizer.from_file(tmp_path / "tokenizer.json")
    assert again.hash == tok.hash
    assert again.encode_batch(TEXTS[:3]) == tok.encode_batch(TEXTS[:3])
    vocab_lines = (tmp_path / "vocab.txt").read_text().splitlines()
    assert len(vocab_lines) == 400 and vocab_lines[:5] == list(SPECIAL_TOKENS)
    from_vocab = Tokenizer.from_file(tmp_path / "vocab.txt")
    assert from_vocab.encode_batch(TEXTS[:3]) == tok.encode_batch(TEXTS[:3])
    assert Tokenizer.from_file(tmp_path).hash == tok.hash  # a folder works too


def test_bert_style_vocab_txt_with_scattered_specials(tmp_path):
    words = ["the", "king", "queen", "##s", "is", "dead", "."]
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(3)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = Tokenizer.from_file(tmp_path / "vocab.txt")
    assert tok.special.all() == (0, 4, 5, 6, 7)
    assert tok.encode("The kings is dead.") == [5, 8, 9, 11, 12, 13, 14, 6]


def test_tokenizer_without_specials_is_refused(tmp_path):
    (tmp_path / "vocab.txt").write_text("a\nb\nc\nd\ne\nf\n")
    with pytest.raises(UserError, match=r"lacks the special token"):
        Tokenizer.from_file(tmp_path / "vocab.txt")


def test_missing_and_bad_tokenizer_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        Tokenizer.from_file(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="not a Hugging Face tokenizer.json"):
        Tokenizer.from_file(tmp_path / "bad.json")
    with pytest.raises(UserError, match="no tokenizer.json or vocab.txt"):
        Tokenizer.from_file(tmp_path)
