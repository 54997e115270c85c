"""Step 12: the ModernBERT encoder: key map, parity with transformers' ModernBertForMaskedLM (local and global
layers, padding, both directions), document masking, the training trajectory, export and import, continued
pre-training from a transformers folder with its own (BPE) tokenizer, exact resume and the length schedule."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from maskedlm import Config, ModelConfig, Tokenizer, UserError, load, pretrain  # noqa: E402
from maskedlm.hf import export_model, load_hf, modernbert_key_map  # noqa: E402
from maskedlm.modernbert import ModernBertForPreTraining, build_model  # noqa: E402

from .conftest import scenes, tiny_config  # noqa: E402
from .test_reliability import losses, pretrain_until, quiet, small_run_config  # noqa: E402


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def config(vocab=97, layers=4, window=16, every=3, **kw) -> ModelConfig:
    return ModelConfig(arch="modernbert", preset=None, num_layers=layers, hidden_size=64, num_heads=4,
                       intermediate_size=96, layer_norm_eps=1e-5, local_attention=window, global_every=every,
                       vocab_size=vocab, pad_token_id=0, **kw)


def hf_config(cfg: ModelConfig) -> "transformers.ModernBertConfig":
    return transformers.ModernBertConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, local_attention=cfg.local_attention,
        global_attn_every_n_layers=cfg.global_every, norm_eps=cfg.layer_norm_eps, pad_token_id=0, cls_token_id=2,
        sep_token_id=3, bos_token_id=2, eos_token_id=3, max_position_embeddings=cfg.max_position,
        global_rope_theta=cfg.global_rope_theta, local_rope_theta=cfg.local_rope_theta, attn_implementation="sdpa")


def ours_with_noise(cfg: ModelConfig, seed=0) -> ModernBertForPreTraining:
    torch.manual_seed(seed)
    model = ModernBertForPreTraining(cfg).eval()
    with torch.no_grad():  # non-trivial norms and bias, so a wrong map cannot pass
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def to_hf(model: ModernBertForPreTraining) -> "transformers.ModernBertForMaskedLM":
    hf = transformers.ModernBertForMaskedLM(hf_config(model.config)).eval()
    names = modernbert_key_map(model.config.num_layers)
    missing, unexpected = hf.load_state_dict({names[k]: v.clone() for k, v in model.state_dict().items()}, strict=False)
    assert missing == ["decoder.weight"] and not unexpected
    hf.tie_weights()
    return hf


def padded_batch(vocab: int, B=3, T=40):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, vocab, (B, T), generator=g)
    ids[:, 0] = 2
    attn = torch.ones_like(ids)
    attn[1, T - 9:] = 0
    return ids, attn


def test_every_parameter_maps_to_one_transformers_parameter():
    for layers in (1, 4):
        cfg = config(layers=layers)
        ours = ModernBertForPreTraining(cfg).state_dict()
        theirs = transformers.ModernBertForMaskedLM(hf_config(cfg)).state_dict()
        names = modernbert_key_map(layers)
        assert set(names) == set(ours) and len(set(names.values())) == len(names)
        assert set(names.values()) == set(theirs) - {"decoder.weight"}  # tied to the token embeddings
        assert all(theirs[names[k]].shape == v.shape for k, v in ours.items())


@pytest.mark.parametrize("every,window", [(3, 16), (1, 16), (2, 8), (3, 24), (3, 128)],
                         ids=["global-every-3", "all-global", "global-every-2", "band-mask", "window-covers-all"])
def test_logits_equal_transformers_with_local_layers_and_padding(every, window):
    """T = 40 > the window's half (12, 8 or 4 tokens each side): local layers differ from global ones here.
    Windows of 16 and 8 run local layers in blocks (`windowed`, T >= 2 windows); 24 as a band-masked full
    attention."""
    model = ours_with_noise(config(window=window, every=every))
    hf = to_hf(model)
    ids, attn = padded_batch(97)
    with torch.no_grad():
        a = model(ids, attention_mask=attn).logits
        b = hf(input_ids=ids, attention_mask=attn).logits
    keep = attn.bool()
    assert float((a - b)[keep].norm() / b[keep].norm()) < 1e-4


def test_the_local_window_is_exercised():
    """The same weights with a window that covers everything give different logits: the test above can fail."""
    model = ours_with_noise(config(window=16, every=3))
    hf = to_hf(model)
    ids, attn = padded_batch(97)
    model.bert.config.local_attention = 1024
    with torch.no_grad():
        a, b = model(ids, attention_mask=attn).logits, hf(input_ids=ids, attention_mask=attn).logits
    assert float((a - b).norm() / b.norm()) > 1e-3


def test_import_of_a_transformers_folder_equals_it(tmp_path):
    """The other direction: transformers' own initialisation, saved with save_pretrained, loaded here."""
    cfg = config(window=16, every=3)
    torch.manual_seed(3)
    hf = transformers.ModernBertForMaskedLM(hf_config(cfg)).eval()
    tok = Tokenizer.train_wordpiece(scenes(5), vocab_size=97)
    hf.save_pretrained(tmp_path / "hf")
    tok.save(tmp_path / "hf")
    model, _, report = load_hf(tmp_path / "hf")
    assert report.architecture == "ModernBertForMaskedLM" and not report.initialised
    assert model.config.global_every == 3 and model.config.local_attention == 16
    ids, attn = padded_batch(97)
    with torch.no_grad():
        a, b = model(ids, attention_mask=attn).logits, hf(input_ids=ids, attention_mask=attn).logits
    keep = attn.bool()
    assert float((a - b)[keep].norm() / b[keep].norm()) < 1e-4


def test_document_masking_keeps_each_token_inside_its_document():
    from maskedlm.masking import document_attention_mask

    model = ours_with_noise(config(window=16, every=2))
    ids = torch.randint(5, 97, (1, 40))
    ids[0, 0], ids[0, 17], ids[0, 39] = 2, 3, 3  # two packed documents: [CLS] ... [SEP] | ... [SEP]
    other = ids.clone()
    other[0, 20:39] = torch.randint(5, 97, (19,))  # change the second document only
    with torch.no_grad():
        h = lambda x, masked: model.bert(x, document_attention_mask(x, 3) if masked else None)  # noqa: E731
        assert torch.equal(h(ids, True)[0, :18], h(other, True)[0, :18])  # the first cannot see the second
        assert not torch.allclose(h(ids, False)[0, :18], h(other, False)[0, :18])


def test_training_trajectory_equals_transformers():
    """Same initial weights, batches, masks and AdamW: 15 per-step losses agree with transformers'."""
    from .test_model import assert_same_trajectory

    cfg = config(vocab=50, layers=3, window=16)
    torch.manual_seed(0)
    ours = ModernBertForPreTraining(cfg)
    assert_same_trajectory(ours, to_hf(ours).train(), vocab=50, seq=40)  # 40 tokens: the window is exercised


def test_presets_and_the_arch_flag():
    c = Config.from_dict({"model": {"preset": "modernbert-base"}}).model
    assert (c.arch, c.num_layers, c.hidden_size, c.num_heads, c.intermediate_size) == ("modernbert", 22, 768, 12, 1152)
    c = Config.from_dict({"model": {"arch": "modernbert", "preset": "mini"}}).model
    assert (c.num_layers, c.hidden_size, c.intermediate_size, c.layer_norm_eps) == (4, 256, 704, 1e-5)
    c = Config.from_dict({"model": {"arch": "modernbert", "intermediate_size": 512}}).model  # flags win over the preset
    assert (c.preset, c.intermediate_size) == ("mini", 512)
    assert Config.from_dict({"model": {"preset": "mini"}}).model.arch == "modernbert"  # the default
    c = Config.from_dict({"model": {"arch": "bert", "preset": "mini"}}).model
    assert (c.intermediate_size, c.layer_norm_eps) == (1024, 1e-12)  # BERT's shape, as before
    # A run folder saved before model.arch existed is a BERT's
    assert Config.from_dict({"model": {"preset": "mini", "intermediate_size": 1024}}, allow_derived=True).model.arch == "bert"
    bad = Config.from_dict({"model": {"arch": "modernbert"}, "train": {"objective": "mlm+nsp"}})
    with pytest.raises(UserError, match="ModernBERT has no pooler or next-sentence head"):
        bad.validate()


def test_a_run_exports_modernbert_that_transformers_and_fill_mask_load(tmp_path, corpus_dir):
    cfg = tiny_config(tmp_path, [str(corpus_dir)], max_steps=3)
    cfg.update({"model": {"arch": "modernbert", "local_attention": 16}})
    res = pretrain(cfg, log=quiet, progress_bar=False)
    config_json = json.loads((res.run_dir / "hf" / "config.json").read_text())
    assert config_json["architectures"] == ["ModernBertForMaskedLM"] and config_json["local_attention"] == 16
    hf = transformers.AutoModelForMaskedLM.from_pretrained(res.run_dir / "hf").eval()
    assert type(hf).__name__ == "ModernBertForMaskedLM"
    model, tok = load(res.run_dir)
    ids = torch.tensor([tok.encode("the king is [MASK] , long live the king , " * 3)])
    assert ids.shape[1] > 16
    with torch.no_grad():
        assert float((model(ids).logits - hf(input_ids=ids).logits).norm() / hf(input_ids=ids).logits.norm()) < 1e-4
    fill = transformers.pipeline("fill-mask", model=str(res.run_dir / "hf"), top_k=3)
    assert len(fill("the king is [MASK] .")) == 3
    again, _, report = load_hf(res.run_dir / "hf")
    assert report.architecture == "ModernBertForMaskedLM"
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))


def bpe_tokenizer() -> Tokenizer:
    """A byte-level BPE tokenizer with ModernBERT's special tokens (its tokenizer's type), as transformers saves it."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE(unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    hf.train_from_iterator(scenes(20), trainer=trainer)
    return Tokenizer(hf)


def test_continued_pretraining_from_a_transformers_modernbert_folder_with_its_bpe_tokenizer(tmp_path, corpus_dir):
    tok = bpe_tokenizer()
    assert tok.kind == "bpe" and tok.special.pad == 3
    cfg = config(vocab=320, layers=2, window=16)  # 20 embeddings beyond the tokenizer, as ModernBERT pads its 50,280 to 50,368
    cfg.pad_token_id = tok.special.pad
    hf = transformers.ModernBertForMaskedLM(transformers.ModernBertConfig(
        **{**hf_config(cfg).to_dict(), "pad_token_id": tok.special.pad})).eval()
    folder = tmp_path / "downloaded"
    hf.save_pretrained(folder)
    export_tok = tmp_path / "tok"
    export_model(build_model(cfg), tok, export_tok)  # writes tokenizer.json + transformers' tokenizer files
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).write_bytes((export_tok / name).read_bytes())
    run_cfg = tiny_config(tmp_path, [str(corpus_dir)], max_steps=4)
    run_cfg.train.init_from = str(folder)
    lines = []
    res = pretrain(run_cfg, log=lines.append, progress_bar=False)
    assert any("loaded ModernBertForMaskedLM weights" in line for line in lines), lines[:5]
    saved = json.loads((res.run_dir / "config.json").read_text())["model"]
    assert (saved["arch"], saved["vocab_size"], saved["local_attention"]) == ("modernbert", 320, 16)
    assert Tokenizer.from_file(res.run_dir).hash == Tokenizer.from_file(folder).hash
    start = load_file_state(folder)
    after = transformers.AutoModelForMaskedLM.from_pretrained(res.run_dir / "hf").state_dict()
    moved = [k for k in start if not torch.equal(start[k], after[k])]
    assert "model.layers.1.mlp.Wo.weight" in moved  # trained, from the downloaded weights
    model, _ = load(res.run_dir)
    assert model.bert.embeddings.word.weight.shape == (320, 64)


def load_file_state(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_modernbert_run_resumed_after_a_crash_repeats_the_uninterrupted_losses(tmp_path, corpus_dir):
    corpus = corpus_dir / "more.jsonl"

    def cfg(name):
        c = small_run_config(tmp_path, corpus, name)
        c.update({"model": {"arch": "modernbert", "local_attention": 16}})
        return c

    full = pretrain(cfg("full"), log=quiet, progress_bar=False)
    assert pretrain_until(cfg("part"), stop_after=33) == 33
    resumed = cfg("part")
    resumed.train.resume = str(tmp_path / "part")
    res = pretrain(resumed, log=quiet, progress_bar=False)
    a, b = losses(full.run_dir), losses(res.run_dir)
    assert set(a) == set(b) == set(range(1, 61))
    assert all(a[s] == b[s] for s in range(31, 61))


def test_long_context_schedule_switches_rotary_base_and_resumes_inside_the_short_phase(tmp_path, corpus_dir):
    """Short sequences with a short rotary base first, then the full length with --global-rope-theta (ModernBERT's
    context extension, scaled down), in bf16 (a compute copy beside the master weights): a crash in the short
    phase resumes from its step-15 checkpoint to the same losses on both sides of the switch (step 20)."""
    corpus = corpus_dir / "more.jsonl"

    def cfg(name, short_theta=1000.0):
        c = small_run_config(tmp_path, corpus, name, max_steps=40, checkpoint_every=5, precision="bf16")
        c.update({"model": {"arch": "modernbert", "local_attention": 16, "global_every": 2}, "data": {"seq_len": 64},
                  "train": {"seq_len_schedule": "32:0.5,64:0.5", "short_rope_theta": short_theta}})
        return c

    lines = []
    full = pretrain(cfg("full"), log=lines.append, progress_bar=False)
    assert any("step 20: sequence length 64" in line for line in lines), lines
    plain = pretrain(cfg("plain", short_theta=None), log=quiet, progress_bar=False)
    a, p = losses(full.run_dir), losses(plain.run_dir)
    assert a[1] != p[1]  # the short phase runs with the short base
    assert pretrain_until(cfg("part"), stop_after=17) == 17
    ckpt = tmp_path / "part" / "checkpoints" / "step-00000015"
    assert load(ckpt)[0].bert.global_theta == 1000.0  # a checkpoint from the short phase loads with its base
    resumed = cfg("part")
    resumed.train.resume = str(tmp_path / "part")
    b = losses(pretrain(resumed, log=quiet, progress_bar=False).run_dir)
    assert all(a[s] == b[s] for s in range(16, 41)), [(s, a[s], b[s]) for s in range(16, 41) if a[s] != b[s]][:3]
    exported = json.loads((full.run_dir / "hf" / "config.json").read_text())
    assert exported["global_rope_theta"] == 160_000.0 == exported["rope_parameters"]["full_attention"]["rope_theta"]
    assert load(full.run_dir)[0].bert.global_theta == 160_000.0
    with pytest.raises(UserError, match="short_rope_theta needs --arch modernbert"):
        bad = cfg("bad")
        bad.train.seq_len_schedule = None
        bad.validate()


def test_finetuning_a_modernbert_run_exports_a_transformers_classifier(tmp_path, corpus_dir):
    from maskedlm.config import FinetuneConfig
    from maskedlm.finetune import finetune

    from .test_finetune import synthetic, write

    cfg = tiny_config(tmp_path, [str(corpus_dir)], max_steps=3)
    cfg.update({"model": {"arch": "modernbert", "num_layers": 2, "hidden_size": 64, "num_heads": 2,
                          "intermediate_size": 96, "local_attention": 8}})
    base = pretrain(cfg, log=quiet, progress_bar=False).run_dir
    write(tmp_path / "train.jsonl", synthetic(400, 0))
    write(tmp_path / "valid.jsonl", synthetic(100, 1))
    ft = FinetuneConfig(train=str(tmp_path / "train.jsonl"), valid=str(tmp_path / "valid.jsonl"), epochs=6, lr=2e-3,
                        batch_size=16, out=str(tmp_path / "clf"))
    res = finetune(base, ft, log=quiet)
    assert res.accuracy > 0.9
    from maskedlm.loading import export_folder

    export_folder(tmp_path / "clf", tmp_path / "hf")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == "ModernBertForSequenceClassification"
    model, tok = load(tmp_path / "clf")
    ids = torch.tensor([tok.encode("king crown throne lord , love sweet heart kiss and night")])
    assert ids.shape[1] > 8  # past the local window
    with torch.no_grad():
        assert (model(ids) - hf(input_ids=ids).logits).abs().max() < 1e-4


def test_fill_and_evaluate_read_a_transformers_modernbert_folder(tmp_path, corpus_dir, capsys):
    from maskedlm import fill_mask
    from maskedlm.cli import main

    cfg = config(vocab=400, layers=2, window=16)
    tok = Tokenizer.train_wordpiece(scenes(20), vocab_size=400)
    cfg.vocab_size = tok.vocab_size
    hf = transformers.ModernBertForMaskedLM(hf_config(cfg)).eval()
    hf.save_pretrained(tmp_path / "hf")
    export_model(build_model(cfg), tok, tmp_path / "tok")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (tmp_path / "hf" / name).write_bytes((tmp_path / "tok" / name).read_bytes())
    model, tok2 = load(tmp_path / "hf")
    assert len(fill_mask(model, tok2, "my lord , the [MASK] is dead", top_k=3)[0]) == 3
    assert main(["evaluate", str(tmp_path / "hf"), "--valid", str(corpus_dir / "more.jsonl")]) == 0
    assert "accuracy" in capsys.readouterr().out
    assert main(["evaluate", str(tmp_path / "hf")]) == 2
    assert "or a transformers folder with --valid FILES" in capsys.readouterr().err


@pytest.mark.parametrize("T, half, keep", [(50, 4, "none"), (64, 8, "keys"), (37, 5, "docs"), (16, 4, "docs"),
                                           (130, 16, "keys"), (9, 2, "none")])
def test_windowed_attention_equals_the_band_masked_full_attention(T, half, keep):
    """Local attention in blocks of `half` against each block and its neighbours = full attention under the
    (T, T) band mask that Encoder.masks builds, with padding and documents (and T not a multiple of the block)."""
    import torch.nn.functional as F

    from maskedlm.modernbert import Window, windowed

    g = torch.Generator().manual_seed(T)
    q, k, v = (torch.randn(2, 3, T, 8, generator=g) for _ in range(3))
    if keep == "none":
        full = None
    elif keep == "keys":
        real = torch.ones(2, T, dtype=torch.bool)
        real[1, T - T // 3:] = False  # padding
        full = real[:, None, None, :]
    else:
        doc = torch.tensor([[i * 4 // T for i in range(T)], [0 if i < T // 5 else 1 for i in range(T)]])
        real = torch.ones(2, T, dtype=torch.bool)
        real[0, T - 3:] = False
        full = ((doc[:, :, None] == doc[:, None, :]) & real[:, None, :])[:, None]  # (B, 1, T, T)
    pos = torch.arange(T)
    band = (pos[:, None] - pos[None, :]).abs() <= half
    dense = band if full is None else (full & band) | torch.eye(T, dtype=torch.bool)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    got = windowed(q, k, v, Window(half, full), 0.0)
    assert got.shape == expected.shape and torch.allclose(got, expected, atol=1e-5)


def test_rotary_qkv_and_geglu_backwards_equal_autograd_of_the_plain_ops():
    """RotaryQKV and GeGLU (their own backward passes, used eagerly) against autograd of the plain ops that
    torch.compile sees (`rotated`, GELU(a) * gate): values and gradients in fp64, plus torch's gradcheck."""
    import torch.nn.functional as F

    from maskedlm.modernbert import GeGLU, RotaryQKV, rotary, rotated

    B, T, nh, hd = 2, 7, 3, 8
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(B, T, 3 * nh * hd, dtype=torch.float64, generator=g, requires_grad=True)
    cos, sin = (t.double() for t in rotary(T, hd, 10_000.0, torch.device("cpu")))
    ours = RotaryQKV.apply(qkv, cos, sin, nh)
    assert all(t.shape == (B, nh, T, hd) and t.is_contiguous() for t in ours)
    q, k, v = qkv.view(B, T, 3, nh, hd).permute(2, 0, 3, 1, 4)
    plain = (rotated(q, cos, sin), rotated(k, cos, sin), v)
    weights = [torch.randn(B, nh, T, hd, dtype=torch.float64, generator=g) for _ in range(3)]
    grads = [torch.autograd.grad(sum((w * t).sum() for w, t in zip(weights, out)), qkv)[0] for out in (ours, plain)]
    for a, b in zip(ours, plain):
        assert torch.allclose(a, b, atol=1e-12)
    assert torch.allclose(grads[0], grads[1], atol=1e-12)
    # position 0 is not turned; a turn keeps each feature pair's length
    assert torch.equal(ours[0][:, :, 0], q[:, :, 0])
    pair = lambda t: t[..., : hd // 2] ** 2 + t[..., hd // 2:] ** 2  # noqa: E731
    assert torch.allclose(pair(ours[1]), pair(k), atol=1e-12)
    assert torch.autograd.gradcheck(lambda x: RotaryQKV.apply(x, cos, sin, nh), (qkv,))

    h = torch.randn(B, T, 2 * 5, dtype=torch.float64, generator=g, requires_grad=True)
    a, gate = h.chunk(2, dim=-1)
    assert torch.allclose(GeGLU.apply(h), F.gelu(a) * gate, atol=1e-12)
    assert torch.autograd.gradcheck(GeGLU.apply, (h,))


@pytest.mark.slow
def test_the_compiled_encoder_equals_the_eager_one():
    """Under torch.compile the blocks take the plain ops (the compiler fuses them; it cannot see into
    RotaryQKV and GeGLU): the same function, so outputs and gradients equal the eager encoder's."""
    cfg = config(window=8)
    eager = ours_with_noise(cfg).train()
    compiled = ours_with_noise(cfg).train()
    compiled.bert.compile(dynamic=False)
    ids, mask = padded_batch(cfg.vocab_size, T=24)  # T = 3 windows: local layers in blocks (`windowed`)
    outs = []
    for model in (eager, compiled):
        hidden = model.bert(ids, mask)
        hidden.pow(2).mean().backward()
        outs.append((hidden.detach(), model.bert.layers[1].qkv.weight.grad, model.bert.embeddings.word.weight.grad))
    for a, b in zip(*outs):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_bf16_compute_follows_fp32():
    """The bf16 path (rotary turns and GeGLU in bf16, CPU matmul attention in query chunks at T > 128) stays
    within bf16 rounding of the fp32 model: logits and their argmax."""
    from maskedlm import model as model_mod

    cfg = config(window=16, max_position=512)
    fp32 = ours_with_noise(cfg)
    bf16 = ours_with_noise(cfg).to(torch.bfloat16)
    ids, mask = padded_batch(cfg.vocab_size, T=300)  # > ATTENTION_QUERY_CHUNK: the global layers attend in chunks
    assert ids.shape[1] > model_mod.ATTENTION_QUERY_CHUNK
    with torch.no_grad():
        a = fp32(ids, mask).logits
        b = bf16(ids, mask).logits.float()
    real = mask.bool()
    err = (a - b)[real].abs().max() / a[real].abs().max()
    assert err < 0.05
    assert (a.argmax(-1) == b.argmax(-1))[real].float().mean() > 0.9
