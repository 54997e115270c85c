"""The training loop: schedule, run folder, determinism, accumulation, budgets, learning."""

import json
import math

import pytest
import torch

from maskedlm import Config, load, pretrain
from maskedlm.config import TrainConfig
from maskedlm.errors import UserError
from maskedlm.schedules import lr_factor

from .conftest import tiny_config


def quiet(*_):
    pass


def test_lr_schedule_shapes():
    t = TrainConfig(warmup_frac=0.1, schedule="linear", min_lr_frac=0.0)
    def f(p, t):
        return lr_factor(p, t.warmup_frac, t.schedule, t.min_lr_frac)

    assert f(0.0, t) == 0.0
    assert f(0.05, t) == pytest.approx(0.5)
    assert f(0.1, t) == pytest.approx(1.0)
    assert f(0.55, t) == pytest.approx(0.5)
    assert f(1.0, t) == pytest.approx(0.0)
    c = TrainConfig(warmup_frac=0.0, schedule="cosine", min_lr_frac=0.1)
    assert f(0.0, c) == pytest.approx(1.0)
    assert f(0.5, c) == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(1.0, c) == pytest.approx(0.1)
    assert f(1.7, c) == pytest.approx(0.1)  # clamped


def test_run_folder_contents(tmp_path, corpus_dir):
    cfg = tiny_config(tmp_path, [str(corpus_dir)], max_steps=6, log_every=2, eval_every=3)
    res = pretrain(cfg, log=quiet, progress_bar=False)
    run = res.run_dir
    for name in ["model.safetensors", "config.json", "tokenizer.json", "vocab.txt", "metrics.jsonl", "eval.json"]:
        assert (run / name).is_file(), name
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "split" not in r]
    evals = [r for r in records if r.get("split") == "valid"]
    assert [r["step"] for r in train] == [2, 4, 6]
    assert [r["step"] for r in evals] == [3, 6]
    assert all(set(r) >= {"loss", "accuracy", "lr", "grad_norm", "tokens_per_s", "elapsed"} for r in train)
    final = json.loads((run / "eval.json").read_text())
    assert final["step"] == 6 and final["loss"] == pytest.approx(evals[-1]["loss"])
    assert final["train_state"]["data_position"] == 6 * cfg.train.batch_size
    assert math.exp(final["loss"]) == pytest.approx(final["perplexity"])
    saved = Config.from_dict(json.loads((run / "config.json").read_text()), allow_derived=True)
    assert saved.model.vocab_size == 300 and saved.train.out == str(run)
    model, tok = load(run)
    assert not model.training and tok.vocab_size == 300


def test_a_bias_free_model_trains_saves_and_loads(tmp_path, corpus_dir):
    cfg = tiny_config(tmp_path, [str(corpus_dir)], max_steps=4)
    cfg.model.switch_arch("bert")
    cfg.model.linear_bias = False  # (ModernBERT has no linear biases anyway)
    res = pretrain(cfg, log=quiet, progress_bar=False)
    saved = json.loads((res.run_dir / "config.json").read_text())
    assert saved["model"]["linear_bias"] is False
    model, _ = load(res.run_dir)
    assert model.bert.layers[0].ffn_in.bias is None
    assert math.isfinite(res.eval.loss)


def test_same_seed_same_losses_and_different_seed_differs(tmp_path, corpus_dir):
    def losses(name, seed):
        cfg = tiny_config(tmp_path / name, [str(corpus_dir)], max_steps=4, log_every=1, seed=seed, precision="fp32")
        run = pretrain(cfg, log=quiet, progress_bar=False).run_dir
        return [json.loads(l)["loss"] for l in (run / "metrics.jsonl").read_text().splitlines() if '"split"' not in l]

    a, b, c = losses("a", 0), losses("b", 0), losses("c", 1)
    assert a == b
    assert a != c


def test_gradient_accumulation_matches_one_big_batch(tmp_path, corpus_dir):
    from safetensors.torch import load_file

    def weights(name, accum):
        cfg = tiny_config(tmp_path / name, [str(corpus_dir)], max_steps=3, grad_accum=accum, precision="fp32",
                          eval_every=0)
        return load_file(str(pretrain(cfg, log=quiet, progress_bar=False).run_dir / "model.safetensors"))

    one, two = weights("one", 1), weights("two", 4)
    for k in one:
        torch.testing.assert_close(one[k], two[k], rtol=1e-4, atol=1e-5, msg=k)


def test_time_budget_stops_and_finishes_the_decay(tmp_path, corpus_dir):
    cfg = tiny_config(tmp_path, [str(corpus_dir)], max_steps=None, time_budget=1.5, log_every=1, eval_every=0)
    res = pretrain(cfg, log=quiet, progress_bar=False)
    records = [json.loads(l) for l in (res.run_dir / "metrics.jsonl").read_text().splitlines() if '"split"' not in l]
    assert res.elapsed >= 1.5 and res.steps == len(records) > 5
    assert records[-1]["lr"] < 0.1 * cfg.train.lr  # the last steps ran at the end of the decay
    assert max(r["lr"] for r in records) > 0.5 * cfg.train.lr


def test_existing_run_folder_is_not_overwritten(tmp_path, corpus_dir):
    cfg = tiny_config(tmp_path, [str(corpus_dir)])
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="already exists and is not empty"):
        pretrain(cfg, log=quiet, progress_bar=False)
    assert (tmp_path / "run" / "keep.txt").read_text() == "mine"


@pytest.mark.slow
def test_training_learns(tmp_path):
    """On text where every masked character follows from its neighbours, a small model learns to get nearly
    all of them right (after the usual MLM plateau at the unigram guess: ~500 steps here)."""
    import string

    docs = [(string.ascii_lowercase[i:] + string.ascii_lowercase[:i]) * 8 for i in range(26)]
    (tmp_path / "abc.txt").write_text("\n\n".join(docs) + "\n")
    cfg = tiny_config(tmp_path, [str(tmp_path / "abc.txt")], max_steps=1000, lr=4e-3, eval_every=0,
                      precision="fp32", eval_sequences=64, batch_size=16)
    cfg.model.num_layers, cfg.model.hidden_size, cfg.model.intermediate_size = 2, 64, 128
    cfg.data.tokenizer = "char"
    cfg.data.valid_fraction = 0.2
    res = pretrain(cfg, log=quiet, progress_bar=False)
    records = [json.loads(l) for l in (res.run_dir / "metrics.jsonl").read_text().splitlines() if '"split"' not in l]
    assert records[0]["accuracy"] < 0.2  # chance is 1/26
    assert res.eval.accuracy > 0.85 and res.eval.predicted > 100


def _step_setup(precision, grad_accum=1):
    from maskedlm import BertForPreTraining, ModelConfig
    from maskedlm.masking import MaskSpec
    from maskedlm.distributed import parallelize
    from maskedlm.optim import make_optimizer
    from maskedlm.step import TrainStep

    torch.manual_seed(0)
    cfg = ModelConfig(arch="bert", layer_norm_eps=1e-12, num_layers=2, hidden_size=64, num_heads=4, intermediate_size=128, vocab_size=500,
                      hidden_dropout=0.0, attention_dropout=0.0)
    model = BertForPreTraining(cfg)
    spec = MaskSpec(4, 500, (0, 1, 2, 3, 4))
    par = parallelize(model, amp_dtype=precision)
    step = TrainStep(par, make_optimizer(model, TrainConfig()), spec, torch.Generator().manual_seed(5),
                     grad_accum=grad_accum)
    ids = torch.randint(5, 500, (8, 64), generator=torch.Generator().manual_seed(2))
    return model, spec, step, ids


@pytest.mark.parametrize("precision", [None, torch.bfloat16])
def test_train_step_loss_equals_plain_dense_loss(precision):
    """The fast path (bf16 copy, sparse fused head, bucketed rows) computes the plain dense masked loss."""
    import torch.nn.functional as F

    model, spec, step, ids = _step_setup(precision)
    inputs, labels = spec(ids, torch.Generator().manual_seed(5))  # the masks the step will draw
    with torch.no_grad():
        dense = F.cross_entropy(model(inputs).logits.reshape(-1, 500), labels.reshape(-1), ignore_index=-100)
    stats = step(ids)
    got = float(stats.loss_sum / stats.predicted)
    assert int(stats.predicted) == int((labels != -100).sum())
    assert got == pytest.approx(float(dense), rel=1e-5 if precision is None else 1e-2)


def test_bf16_step_keeps_fp32_master_weights_and_syncs_the_copy():
    model, spec, step, ids = _step_setup(torch.bfloat16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    step(ids)
    for (name, p), c in zip(model.named_parameters(), step.compute.parameters()):
        assert p.dtype == torch.float32 and c.dtype == torch.bfloat16
        assert torch.equal(c, p.to(torch.bfloat16)), name
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert "bert.embeddings.word.weight" in changed and "bert.layers.0.ffn_in.weight" in changed
    assert "nsp.weight" not in changed  # no NSP loss: its gradient is None and AdamW leaves it alone


def test_bf16_gradient_accumulation_sums_in_fp32():
    one = _step_setup(torch.bfloat16, grad_accum=1)
    four = _step_setup(torch.bfloat16, grad_accum=4)
    a, b = one[2](one[3]), four[2](four[3])
    assert float(a.loss_sum) == pytest.approx(float(b.loss_sum), rel=1e-2)
    assert float(a.grad_norm) == pytest.approx(float(b.grad_norm), rel=2e-2)
