"""Hugging Face interop: export loads in transformers with equal logits; imports equal transformers'."""

import json

import pytest
import torch
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")

from maskedlm import BertForPreTraining, ModelConfig, Tokenizer, UserError, fill_mask, load, pretrain  # noqa: E402
from maskedlm.hf import export_model, load_hf  # noqa: E402

from .conftest import scenes, tiny_config  # noqa: E402


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def wordpiece():
    return Tokenizer.train_wordpiece(scenes(30), vocab_size=400)


@pytest.fixture(scope="module")
def chars():
    return Tokenizer.train_char(scenes(30))


def our_model(tok: Tokenizer, seed=0, linear_bias=True) -> BertForPreTraining:
    torch.manual_seed(seed)
    cfg = ModelConfig(arch="bert", preset=None, num_layers=2, hidden_size=64, num_heads=4, intermediate_size=128,
                      vocab_size=tok.vocab_size, pad_token_id=tok.special.pad, hidden_dropout=0.0,
                      attention_dropout=0.0, linear_bias=linear_bias)
    model = BertForPreTraining(cfg).eval()
    with torch.no_grad():  # non-trivial biases and norms, so a wrong map cannot pass
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def random_batch(vocab: int, B=3, T=20):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, vocab, (B, T), generator=g)
    ids[:, 0] = 2
    types = torch.zeros_like(ids)
    types[:, T // 2:] = 1
    attn = torch.ones_like(ids)
    attn[1, T - 5:] = 0
    return ids, types, attn


@pytest.mark.parametrize("nsp,linear_bias", [(False, True), (True, True), (False, False)])
def test_export_loads_in_transformers_with_equal_logits(tmp_path, wordpiece, nsp, linear_bias):
    model = our_model(wordpiece, linear_bias=linear_bias)
    export_model(model, wordpiece, tmp_path, nsp=nsp, lowercase=True)
    if not linear_bias:  # a bias-free model exports with explicit zero biases in BERT's layout
        assert model.bert.layers[1].ffn_in.bias is None and model.bert.layers[1].attn.query.bias is None
        exported = load_file(str(tmp_path / "model.safetensors"))
        assert torch.equal(exported["bert.encoder.layer.1.intermediate.dense.bias"], torch.zeros(128))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["BertForPreTraining" if nsp else "BertForMaskedLM"]
    ids, types, attn = random_batch(wordpiece.vocab_size)
    with torch.no_grad():
        ours = model(ids, attention_mask=attn, token_type_ids=types, nsp=True)
        mlm = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
        theirs = mlm(input_ids=ids, attention_mask=attn, token_type_ids=types).logits
    keep = attn.bool()
    assert (ours.logits[keep] - theirs[keep]).abs().max() < 1e-4
    base = transformers.AutoModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        hidden = base(input_ids=ids, attention_mask=attn, token_type_ids=types).last_hidden_state
    assert (ours.hidden_states[keep] - hidden[keep]).abs().max() < 1e-4
    if nsp:
        pre = transformers.AutoModelForPreTraining.from_pretrained(tmp_path).eval()
        with torch.no_grad():
            out = pre(input_ids=ids, attention_mask=attn, token_type_ids=types)
        assert (out.seq_relationship_logits - ours.nsp_logits).abs().max() < 1e-4


@pytest.mark.parametrize("kind", ["wordpiece", "chars"])
def test_exported_tokenizer_and_fill_mask_pipeline_agree_with_maskedlm(tmp_path, kind, request):
    tok = request.getfixturevalue(kind)
    model = our_model(tok, seed=3)
    export_model(model, tok, tmp_path, lowercase=True if kind == "wordpiece" else None)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in ["To be, or not to be: that is the question.", "O Romeo, Romeo! wherefore art thou Romeo?"]:
        assert hf_tok(text)["input_ids"] == tok.encode(text)
    assert hf_tok.mask_token == "[MASK]" and hf_tok.mask_token_id == tok.special.mask
    fill = transformers.pipeline("fill-mask", model=str(tmp_path), tokenizer=str(tmp_path), top_k=5)
    text = "my lord, the [MASK] is dead" if kind == "wordpiece" else "my lord, the k[MASK]ng is dead"
    theirs = [p["token"] for p in fill(text)]
    ours = [p.token_id for p in fill_mask(model, tok, text, top_k=5)[0]]
    assert theirs == ours


def hf_checkpoint(tmp_path, cls, tok: Tokenizer):
    cfg = transformers.BertConfig(vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=96, max_position_embeddings=64,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = cls(cfg).eval()
    folder = tmp_path / cls.__name__
    model.save_pretrained(folder)
    tok.save(folder)
    return model, folder


@pytest.mark.parametrize("cls, fresh", [
    ("BertModel", ["MLM head", "NSP head"]),
    ("BertForMaskedLM", ["pooler", "NSP head"]),
    ("BertForPreTraining", []),
])
def test_import_equals_transformers_hidden_states(tmp_path, wordpiece, cls, fresh):
    theirs, folder = hf_checkpoint(tmp_path, getattr(transformers, cls), wordpiece)
    model, tok, report = load_hf(folder)
    assert report.architecture == cls and report.initialised == fresh
    assert tok.hash == Tokenizer.from_file(folder / "tokenizer.json").hash
    assert (model.config.intermediate_size, model.config.max_position) == (96, 64)
    ids, types, attn = random_batch(wordpiece.vocab_size)
    with torch.no_grad():
        ours = model(ids, attention_mask=attn, token_type_ids=types)
        ref = theirs(input_ids=ids, attention_mask=attn, token_type_ids=types, output_hidden_states=True)
    keep = attn.bool()
    assert (ours.hidden_states[keep] - ref.hidden_states[-1][keep]).abs().max() < 1e-5
    if cls != "BertModel":
        logits = ref.logits if cls == "BertForMaskedLM" else ref.prediction_logits
        assert (ours.logits[keep] - logits[keep]).abs().max() < 1e-5
    # maskedlm.load accepts the same folder
    loaded, _ = load(folder)
    assert torch.equal(loaded.bert.embeddings.word.weight, model.bert.embeddings.word.weight)


def test_import_legacy_bin_only_with_weights_only(tmp_path, wordpiece):
    theirs, folder = hf_checkpoint(tmp_path, transformers.BertForMaskedLM, wordpiece)
    (folder / "model.safetensors").unlink()
    torch.save(theirs.state_dict(), folder / "pytorch_model.bin")
    model, _, report = load_hf(folder)
    assert report.architecture == "BertForMaskedLM"

    class Evil:
        def __reduce__(self):
            return (print, ("this would run",))

    torch.save({"x": Evil()}, folder / "pytorch_model.bin")
    with pytest.raises(UserError, match="weights_only=True"):
        load_hf(folder)


def test_non_bert_checkpoints_are_refused_with_the_reason(tmp_path, wordpiece):
    _, folder = hf_checkpoint(tmp_path, transformers.BertForMaskedLM, wordpiece)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "roberta"}))
    with pytest.raises(UserError, match="model_type is 'roberta'"):
        load_hf(folder)
    (folder / "config.json").write_text(json.dumps({**cfg, "hidden_act": "gelu_new"}))
    with pytest.raises(UserError, match="hidden_act 'gelu_new'"):
        load_hf(folder)
    (folder / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 128}))
    with pytest.raises(UserError, match=r"intermediate.dense.weight has shape \(96, 64\), config.json implies \(128, 64\)"):
        load_hf(folder)
    (folder / "config.json").write_text(json.dumps(cfg))
    from safetensors.torch import load_file, save_file

    state = load_file(folder / "model.safetensors")
    del state["bert.encoder.layer.1.output.dense.weight"]
    save_file(state, folder / "model.safetensors")
    with pytest.raises(UserError, match="missing bert.encoder.layer.1.output.dense.weight"):
        load_hf(folder)


def test_continued_pretraining_from_a_bert_folder(tmp_path, corpus_dir, wordpiece):
    _, folder = hf_checkpoint(tmp_path, transformers.BertModel, wordpiece)
    cfg = tiny_config(tmp_path, [str(corpus_dir)], max_steps=3)
    cfg.data.seq_len = 32
    cfg.train.init_from = str(folder)
    lines = []
    res = pretrain(cfg, log=lines.append, progress_bar=False)
    assert any("loaded BertModel weights; newly initialised: MLM head, NSP head" in line for line in lines)
    saved = json.loads((res.run_dir / "config.json").read_text())
    assert saved["model"]["hidden_size"] == 64 and saved["model"]["intermediate_size"] == 96
    assert Tokenizer.from_file(res.run_dir).hash == wordpiece.hash
    # ... and the run ends with a folder transformers loads
    hf = transformers.AutoModelForMaskedLM.from_pretrained(res.run_dir / "hf")
    assert hf.config.intermediate_size == 96


def test_every_run_leaves_a_transformers_folder_with_equal_logits(tmp_path, corpus_dir):
    res = pretrain(tiny_config(tmp_path, [str(corpus_dir)], max_steps=2), log=lambda *a: None, progress_bar=False)
    model, tok = load(res.run_dir)
    hf = transformers.AutoModelForMaskedLM.from_pretrained(res.run_dir / "hf").eval()
    ids = torch.tensor([tok.encode("the king is [MASK] , long live the king")])
    with torch.no_grad():
        assert (model(ids).logits - hf(input_ids=ids).logits).abs().max() < 1e-4


def test_cli_export(tmp_path, corpus_dir):
    import subprocess
    import sys

    res = pretrain(tiny_config(tmp_path, [str(corpus_dir)], max_steps=2), log=lambda *a: None, progress_bar=False)
    out = subprocess.run([sys.executable, "-m", "maskedlm", "export", str(res.run_dir), "--out", str(tmp_path / "exp")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert {"config.json", "model.safetensors", "tokenizer.json", "vocab.txt", "tokenizer_config.json"} <= {
        p.name for p in (tmp_path / "exp").iterdir()}
