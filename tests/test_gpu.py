"""Step 9: the CUDA path. Skipped without a CUDA GPU; benchmarks/gpu.sh runs them (`pytest -m gpu`) on a GPU.

What only a GPU exercises: SDPA's flash / memory-efficient kernels, fused AdamW on CUDA, the CUDA mask
generator and RNG state in checkpoints, pinned-memory batches, torch.compile through Triton and the bf16
compute copy on a real card. NCCL needs two GPUs (it refuses two ranks on one device); one GPU cannot test it.
"""

import json
import subprocess
import sys

import pytest
import torch

from maskedlm import pretrain

from .test_distributed import base_args, env, losses as rank_losses, single
from .test_reliability import losses, pretrain_until, quiet, small_run_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def corpus(corpus_dir):
    return corpus_dir / "more.jsonl"


def _pair(num_layers=2, hidden=256, heads=4, vocab=1000):
    transformers = pytest.importorskip("transformers")
    from maskedlm.config import ModelConfig
    from maskedlm.hf import key_map
    from maskedlm.model import BertForPreTraining

    cfg = ModelConfig(arch="bert", layer_norm_eps=1e-12, vocab_size=vocab, num_layers=num_layers, hidden_size=hidden, num_heads=heads,
                      intermediate_size=4 * hidden, hidden_dropout=0.0, attention_dropout=0.0)
    cfg.preset = None
    torch.manual_seed(0)
    ours = BertForPreTraining(cfg).cuda().eval()
    theirs = transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=num_layers, num_attention_heads=heads,
        intermediate_size=4 * hidden, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        attn_implementation="sdpa")).cuda().eval()
    names = key_map(num_layers)
    missing, _ = theirs.load_state_dict({names[k]: v for k, v in ours.state_dict().items()
                                         if not k.startswith(("nsp", "bert.pooler"))}, strict=False)
    theirs.tie_weights()
    assert not [k for k in missing if "position_ids" not in k and "decoder" not in k], missing
    return ours, theirs


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16-autocast"])
def test_cuda_logits_match_transformers_with_padding(dtype):
    ours, theirs = _pair()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 1000, (4, 96), generator=g).cuda()
    mask = torch.ones_like(ids)
    mask[1, 60:], mask[3, 10:] = 0, 0  # padded rows: SDPA takes the masked (memory-efficient / math) kernel
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        a = ours(ids, attention_mask=mask).logits.float()
        b = theirs(input_ids=ids, attention_mask=mask).logits.float()
    keep = mask.bool()
    # fp32: the same kernels on the same card (TF32 off, PyTorch's default for matmuls); bf16: rounding only.
    assert rel(a[keep], b[keep]) < (1e-4 if dtype == torch.float32 else 2e-2)


def test_cuda_run_resumed_after_a_crash_repeats_the_uninterrupted_losses(tmp_path, corpus):
    """60 bf16 steps on the GPU; a crash after step 33 resumes from the step-30 checkpoint. Reported: how far
    a second uninterrupted run lands from the first (CUDA kernel determinism) and how far the resumed one does."""
    gpu = {"device": "cuda", "precision": "bf16"}
    full = pretrain(small_run_config(tmp_path, corpus, "full", **gpu), log=quiet, progress_bar=False)
    again = pretrain(small_run_config(tmp_path, corpus, "again", **gpu), log=quiet, progress_bar=False)
    assert pretrain_until(small_run_config(tmp_path, corpus, "part", **gpu), stop_after=33) == 33
    cfg = small_run_config(tmp_path, corpus, "part", **gpu)
    cfg.train.resume = str(tmp_path / "part")
    lines = []
    res = pretrain(cfg, log=lines.append, progress_bar=False)
    assert any("resuming" in line and "step-00000030" in line for line in lines)
    a, a2, b = losses(full.run_dir), losses(again.run_dir), losses(res.run_dir)
    assert set(a) == set(b) == set(range(1, 61))
    rerun = max(abs(a[s] - a2[s]) for s in a)
    resumed = max(abs(a[s] - b[s]) for s in range(31, 61))
    print(f"\nCUDA bf16, 60 steps: max |loss diff| rerun {rerun:.3g}, resumed at 30 {resumed:.3g}")
    assert rerun == 0.0 and resumed == 0.0, (rerun, resumed)
    from safetensors.torch import load_file

    wa, wb = load_file(str(full.run_dir / "model.safetensors")), load_file(str(res.run_dir / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_cuda_compiled_step_trains_like_the_eager_one(tmp_path, corpus):
    gpu = ["--device", "cuda", "--precision", "bf16", "--max-steps", "30"]  # after base_args' fp32: the last wins
    eager = single(base_args(corpus, tmp_path / "eager", *gpu))
    assert eager.returncode == 0, eager.stderr[-3000:]
    comp = single(base_args(corpus, tmp_path / "comp", *gpu, "--compile"))
    assert comp.returncode == 0, comp.stderr[-3000:]
    a, b = rank_losses(tmp_path / "eager"), rank_losses(tmp_path / "comp")
    assert sorted(a) == sorted(b) == list(range(1, 31))
    # Triton's fused kernels round differently from eager bf16: close, not bitwise.
    assert max(abs(a[s] - b[s]) / a[s] for s in a) < 3e-2
    assert b[30] < b[1] - 0.05 and a[30] < a[1] - 0.05


def test_cuda_pretrain_on_the_embedded_corpus_exports_a_transformers_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    from maskedlm import load

    run = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "maskedlm", "pretrain", "--out", str(run), "--device", "cuda",
                          "--model", "mini", "--max-steps", "300", "--batch-size", "64", "--log-every", "10",
                          "--eval-every", "0", "--no-sample"], env=env(), capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "cuda" in res.stdout, res.stdout[-2000:]
    steps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r["loss"] for r in steps if "split" not in r]
    assert len(train) == 30 and sum(train[-3:]) / 3 < sum(train[:3]) / 3 - 1.0, train
    rate = sorted(r["tokens_per_s"] for r in steps if "tokens_per_s" in r)[len(train) // 2]
    print(f"\nCUDA pretrain, mini, batch 64, 300 steps: loss {train[0]:.2f} -> {train[-1]:.2f}, "
          f"median {rate:,.0f} tokens/s")
    hf = transformers.AutoModelForMaskedLM.from_pretrained(run / "hf").cuda().eval()
    model, tok = load(run)
    model = model.cuda().eval()
    ids = torch.tensor([tok.encode("To be, or not to be, that is the question.")], device="cuda")
    with torch.no_grad():
        assert rel(model(ids).logits, hf(input_ids=ids).logits) < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16-autocast"])
def test_cuda_modernbert_logits_match_transformers_with_windows_and_padding(dtype):
    """ModernBERT on the card: local layers in blocks (T = 512 >= 2 windows of 128), global layers over all
    of T, padding; against transformers' ModernBertForMaskedLM (SDPA) on the same weights."""
    from .test_modernbert import config, ours_with_noise, to_hf

    cfg = config(vocab=1000, layers=4, window=128, every=3)
    ours = ours_with_noise(cfg)
    theirs = to_hf(ours).cuda().eval()
    ours = ours.cuda().eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 1000, (3, 512), generator=g).cuda()
    mask = torch.ones_like(ids)
    mask[1, 300:] = 0
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        a = ours(ids, attention_mask=mask).logits.float()
        b = theirs(input_ids=ids, attention_mask=mask).logits.float()
    keep = mask.bool()
    assert rel(a[keep], b[keep]) < (1e-4 if dtype == torch.float32 else 3e-2)
