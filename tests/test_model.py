"""The model: shapes, presets, the sparse MLM head against the dense one, padding, and the HF name map."""

import pytest
import torch
import torch.nn.functional as F

from maskedlm import BertForPreTraining, ModelConfig
from maskedlm.config import PRESETS
from maskedlm.hf import key_map
from maskedlm.masking import IGNORE_INDEX


def small_config(**kw) -> ModelConfig:
    cfg = ModelConfig(arch="bert", layer_norm_eps=1e-12, num_layers=2, hidden_size=64, num_heads=4, intermediate_size=128, vocab_size=97,
                      hidden_dropout=0.0, attention_dropout=0.0)
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def test_output_shapes():
    torch.manual_seed(0)
    model = BertForPreTraining(small_config()).eval()
    ids = torch.randint(5, 97, (3, 20))
    out = model(ids, nsp=True)
    assert out.hidden_states.shape == (3, 20, 64)
    assert out.logits.shape == (3, 20, 97)
    assert out.nsp_logits.shape == (3, 2)
    assert out.loss_sum is None


def test_linear_bias_off_drops_exactly_the_block_linear_biases():
    with_bias = BertForPreTraining(small_config())
    without = BertForPreTraining(small_config(linear_bias=False))
    gone = set(with_bias.state_dict()) - set(without.state_dict())
    linears = ("attn.query", "attn.key", "attn.value", "attn.out", "ffn_in", "ffn_out")
    assert gone == {f"bert.layers.{i}.{n}.bias" for i in range(2) for n in linears}
    assert set(without.state_dict()) < set(with_bias.state_dict())
    assert with_bias.num_parameters() - without.num_parameters() == 2 * (4 * 64 + 128 + 64)
    out = without(torch.randint(5, 97, (2, 16)), nsp=True)
    assert out.logits.shape == (2, 16, 97) and torch.isfinite(out.logits).all()


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_have_google_shapes(name):
    cfg = ModelConfig(arch="bert")
    cfg.apply_preset(name)
    layers, hidden = PRESETS[name]
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.intermediate_size) == (layers, hidden, hidden // 64, 4 * hidden)


def test_sparse_loss_equals_dense_loss():
    torch.manual_seed(0)
    model = BertForPreTraining(small_config()).eval()
    ids = torch.randint(5, 97, (4, 32))
    labels = torch.full_like(ids, IGNORE_INDEX)
    pick = torch.rand(ids.shape) < 0.15
    labels[pick] = ids[pick]
    sparse = model(ids, labels=labels)
    dense_logits = model(ids).logits
    dense_sum = F.cross_entropy(dense_logits.reshape(-1, 97), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                                reduction="sum")
    assert int(sparse.num_predicted) == int(pick.sum())
    torch.testing.assert_close(sparse.loss_sum, dense_sum, rtol=1e-5, atol=1e-5)
    assert sparse.logits is None  # fused into the loss
    dense_correct = (dense_logits[pick].argmax(-1) == ids[pick]).sum()
    assert int(sparse.correct) == int(dense_correct)


def test_sparse_gradients_equal_dense_gradients():
    torch.manual_seed(0)
    cfg = small_config()
    a, b = BertForPreTraining(cfg), BertForPreTraining(cfg)
    b.load_state_dict(a.state_dict())
    ids = torch.randint(5, 97, (2, 16))
    labels = torch.where(torch.rand(ids.shape) < 0.3, ids, torch.full_like(ids, IGNORE_INDEX))
    out = a(ids, labels=labels)
    out.loss.backward()
    F.cross_entropy(b(ids).logits.reshape(-1, 97), labels.reshape(-1), ignore_index=IGNORE_INDEX).backward()
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_padding_does_not_change_real_tokens():
    torch.manual_seed(0)
    model = BertForPreTraining(small_config()).eval()
    ids = torch.randint(5, 97, (1, 10))
    padded = torch.cat([ids, torch.zeros(1, 6, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 10), torch.zeros(1, 6)], dim=1).long()
    h_short = model(ids).hidden_states
    h_padded = model(padded, attention_mask=mask).hidden_states
    torch.testing.assert_close(h_padded[:, :10], h_short, rtol=1e-5, atol=1e-5)
    # Without the mask, padding would leak into the real tokens.
    assert not torch.allclose(model(padded).hidden_states[:, :10], h_short, atol=1e-4)


def test_decoder_is_tied_to_word_embeddings():
    model = BertForPreTraining(small_config())
    names = [n for n, _ in model.named_parameters()]
    assert not any("decoder" in n for n in names)
    with torch.no_grad():
        model.bert.embeddings.word.weight[7].zero_()
        model.mlm.bias.zero_()
    h = torch.randn(3, 64)
    logits = model.mlm(h, model.bert.embeddings.word.weight)
    assert torch.all(logits[:, 7] == 0)


def test_every_parameter_maps_to_one_huggingface_parameter():
    transformers = pytest.importorskip("transformers")
    cfg = small_config()
    ours = BertForPreTraining(cfg).state_dict()
    hf = transformers.BertForPreTraining(transformers.BertConfig(
        vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128))
    theirs = hf.state_dict()
    mapping = key_map(cfg.num_layers)
    assert set(mapping) == set(ours)
    assert len(set(mapping.values())) == len(mapping)  # one-to-one
    tied = {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}
    assert set(mapping.values()) == set(theirs) - tied
    for k, v in ours.items():
        assert theirs[mapping[k]].shape == v.shape, k


def test_logits_equal_huggingface_with_mapped_weights():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = small_config()
    ours = BertForPreTraining(cfg).eval()
    hf = transformers.BertForPreTraining(transformers.BertConfig(
        vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        layer_norm_eps=1e-12, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).eval()
    mapping = key_map(cfg.num_layers)
    hf.load_state_dict({mapping[k]: v for k, v in ours.state_dict().items()}, strict=False)
    hf.tie_weights()
    ids = torch.randint(5, 97, (2, 24))
    ids[:, 0] = 2
    types = torch.zeros_like(ids)
    types[:, 12:] = 1
    attn = torch.ones_like(ids)
    attn[1, 18:] = 0
    with torch.no_grad():
        a = ours(ids, attention_mask=attn, token_type_ids=types, nsp=True)
        b = hf(input_ids=ids, attention_mask=attn, token_type_ids=types)
    keep = attn.bool()
    torch.testing.assert_close(a.logits[keep], b.prediction_logits[keep], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a.nsp_logits, b.seq_relationship_logits, rtol=1e-4, atol=1e-4)


def test_training_trajectory_equals_huggingface():
    """Same initial weights, batches, masks and AdamW: the per-step losses agree with transformers'."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = small_config(vocab_size=50)
    ours = BertForPreTraining(cfg)
    hf = transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=50, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    mapping = key_map(cfg.num_layers)
    hf.load_state_dict({mapping[k]: v.clone() for k, v in ours.state_dict().items()
                        if not k.startswith(("nsp", "bert.pooler"))}, strict=False)
    hf.tie_weights()
    assert_same_trajectory(ours, hf, vocab=50, seq=24)


def assert_same_trajectory(ours, hf, vocab: int, seq: int, steps: int = 15) -> None:
    """Both models from the same weights, on the same batches and masks, with AdamW: every step's loss agrees."""
    from maskedlm import mask_tokens
    from maskedlm.optim import param_groups

    opt_a = torch.optim.AdamW(param_groups(ours, 0.01), lr=2e-3)
    opt_b = torch.optim.AdamW(param_groups(hf, 0.01), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids = torch.randint(5, vocab, (4, seq), generator=g)
        inp, lab = mask_tokens(ids, mask_token_id=4, vocab_size=vocab, special_ids=(0, 1, 2, 3, 4), generator=g)
        la = ours(inp, labels=lab).loss
        la.backward()
        opt_a.step()
        opt_a.zero_grad()
        lb = hf(input_ids=inp, labels=lab).loss
        lb.backward()
        opt_b.step()
        opt_b.zero_grad()
        assert abs(la.item() - lb.item()) < 1e-4


@pytest.mark.parametrize("n", [1, 63, 64, 65, 200])
def test_fused_linear_cross_entropy_matches_plain_computation(n):
    """Loss, correct count and all three gradients, across chunk boundaries, with ignored rows."""
    from maskedlm.model import linear_cross_entropy

    torch.manual_seed(n)
    V, H = 300, 16
    h = torch.randn(n, H, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, H, dtype=torch.float64, requires_grad=True)
    b = torch.randn(V, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, V, (n,))
    t[torch.rand(n) < 0.2] = IGNORE_INDEX
    loss, correct = linear_cross_entropy(h, w, b, t)
    (0.5 * loss).backward()  # the incoming gradient scales all three
    grads = [x.grad.clone() for x in (h, w, b)]
    for x in (h, w, b):
        x.grad = None
    logits = h @ w.T + b
    ref = F.cross_entropy(logits, t, ignore_index=IGNORE_INDEX, reduction="sum")
    (0.5 * ref).backward()
    keep = t != IGNORE_INDEX
    assert torch.allclose(loss.double(), ref, rtol=1e-6)
    assert int(correct) == int((logits.argmax(-1)[keep] == t[keep]).sum())
    for g, x in zip(grads, (h, w, b)):
        torch.testing.assert_close(g, x.grad, rtol=1e-6, atol=1e-9)


def test_fused_loss_in_bf16_is_close_to_fp32():
    from maskedlm.model import linear_cross_entropy

    torch.manual_seed(0)
    h, w, b = torch.randn(150, 64), torch.randn(1000, 64) * 0.1, torch.zeros(1000)
    t = torch.randint(0, 1000, (150,))
    ref, _ = linear_cross_entropy(h, w, b, t)
    got, _ = linear_cross_entropy(h.bfloat16(), w.bfloat16(), b.bfloat16(), t)
    assert got.dtype == torch.float32 and abs(got.item() - ref.item()) / ref.item() < 1e-2


def test_bf16_matmul_attention_equals_sdpa():
    from maskedlm.model import _matmul_attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 50, 16) for _ in range(3))
    mask = torch.ones(2, 1, 1, 50, dtype=torch.bool)
    mask[1, ..., 40:] = False
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(_matmul_attention(q, k, v, mask, 0.0), ref, rtol=1e-5, atol=1e-5)
    got = _matmul_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask, 0.0).float()
    assert ((got - ref).norm() / ref.norm()).item() < 1e-2


@pytest.mark.parametrize("mask_kind", ["none", "keys", "per-query"])
def test_matmul_attention_in_query_chunks_equals_sdpa(mask_kind, monkeypatch):
    """Long sequences go in chunks of queries (ATTENTION_QUERY_CHUNK; here 64, so 150 queries make two chunks
    of 64 and one of 22); with key masks and per-query (document) masks. Gradients too."""
    import maskedlm.model as m

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 150, 16, requires_grad=True) for _ in range(3))
    T = q.shape[-2]
    monkeypatch.setattr(m, "ATTENTION_QUERY_CHUNK", 64)
    mask = None
    if mask_kind == "keys":
        mask = torch.ones(2, 1, 1, T, dtype=torch.bool)
        mask[1, ..., 120:] = False
    elif mask_kind == "per-query":
        doc = (torch.arange(T) >= 70).long()
        mask = (doc[:, None] == doc[None, :])[None, None].expand(2, 1, T, T)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    got = m._matmul_attention(q, k, v, mask, 0.0)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(got, (q, k, v), g)
    for a, b in zip(grads, torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_padding_predictions_to_a_bucket_changes_nothing():
    """mlm_loss pads the predicted rows to a multiple of PREDICTION_BUCKET; the result equals the dense loss."""
    from maskedlm.model import PREDICTION_BUCKET

    torch.manual_seed(0)
    model = BertForPreTraining(small_config()).eval()
    ids = torch.randint(5, 97, (3, 40))
    for n_pred in [1, PREDICTION_BUCKET - 1, PREDICTION_BUCKET, PREDICTION_BUCKET + 1]:
        labels = torch.full_like(ids, IGNORE_INDEX)
        pos = torch.randperm(ids.numel())[:n_pred]
        labels.view(-1)[pos] = ids.view(-1)[pos]
        out = model(ids, labels=labels)
        dense = F.cross_entropy(model(ids).logits.reshape(-1, 97), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                                reduction="sum")
        assert int(out.num_predicted) == n_pred
        torch.testing.assert_close(out.loss_sum, dense, rtol=1e-5, atol=1e-4)
