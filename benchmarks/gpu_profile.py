"""Where a BERT-base training step spends its time on a GPU (why MFU is what it is).

For our step (eager, bf16 compute copy, fused AdamW) at a few batch shapes: wall time per step, the sum of
GPU kernel time per step (busy fraction = kernels / wall: below 1, the GPU waits for the host), and kernel
time by kind (matmul, attention, optimizer, normalisation/elementwise, loss/gather), from torch.profiler.

    python benchmarks/gpu_profile.py OUT.json [--shapes 128x128 256x128 32x512]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from maskedlm.config import ModelConfig
from maskedlm.distributed import parallelize
from maskedlm.flops import train_flops
from maskedlm.masking import MaskSpec
from maskedlm.model import BertForPreTraining
from maskedlm.config import TrainConfig
from maskedlm.optim import make_optimizer
from maskedlm.step import TrainStep

KINDS = [("matmul", ("gemm", "cutlass", "sm90_xmma", "nvjet", "cublas", "wgmma")),
         ("attention", ("flash", "fmha", "attention", "efficient")),
         ("optimizer", ("adam", "multi_tensor", "foreach", "clip", "norm_kernel", "lpnorm")),
         ("layernorm", ("layer_norm", "layernorm")),
         ("loss/gather", ("cross_entropy", "nll", "log_softmax", "softmax", "gather", "index", "scatter", "nonzero")),
         ("elementwise", ("elementwise", "vectorized", "unrolled", "reduce", "gelu", "copy", "fill", "cat"))]


def kind(name: str) -> str:
    low = name.lower()
    for k, keys in KINDS:
        if any(x in low for x in keys):
            return k
    return "other"


def profile(batch: int, seq: int, variant: str = "eager", steps: int = 6) -> dict:
    """variant: 'eager', 'compile', 'no-bias' (Q/K/V/output/FFN linears without biases) or 'compile+no-bias'."""
    cfg = ModelConfig(arch="bert", vocab_size=30522, hidden_dropout=0.0, attention_dropout=0.0)
    cfg.apply_preset("base")
    cfg.linear_bias = "no-bias" not in variant
    torch.manual_seed(0)
    model = BertForPreTraining(cfg).cuda().train()
    spec = MaskSpec(4, cfg.vocab_size, (0, 1, 2, 3, 4))
    step = TrainStep(parallelize(model, amp_dtype=torch.bfloat16, compile="compile" in variant),
                     make_optimizer(model, TrainConfig()), spec, torch.Generator(device="cuda").manual_seed(0))
    ids = torch.randint(5, cfg.vocab_size, (batch, seq), device="cuda")
    ids[:, 0], ids[:, -1] = 2, 3
    for _ in range(5):
        step(ids)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        predicted = step(ids).predicted
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / steps
    flops = train_flops(cfg, batch, seq, float(predicted))
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(steps):
            step(ids)
        torch.cuda.synchronize()
    by_kind: dict[str, float] = {}
    top = []
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", None)
        if t is None:
            t = getattr(e, "self_cuda_time_total", 0.0)
        if t <= 0 or getattr(e, "device_type", None) not in (None, torch.autograd.DeviceType.CUDA):
            continue
        if e.key.startswith(("aten::", "autograd::", "Optimizer.", "cuda")):  # CPU-side ops carrying child time
            continue
        by_kind[kind(e.key)] = by_kind.get(kind(e.key), 0.0) + t / steps / 1e3  # ms per step
        top.append((t / steps / 1e3, e.count // steps, e.key[:90]))
    top.sort(reverse=True)
    kernels = sum(by_kind.values())
    return {"batch": batch, "seq": seq, "variant": variant, "wall_ms": wall * 1e3, "kernel_ms": kernels, "busy": kernels / (wall * 1e3),
            "tflops": flops / wall / 1e12, "by_kind_ms": dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
            "top_kernels": [{"ms": ms, "calls": n, "name": k} for ms, n, k in top[:25]]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--shapes", nargs="+", default=["128x128", "256x128", "32x512"], help="BATCHxSEQ")
    ap.add_argument("--variants", nargs="+", default=["eager"], choices=["eager", "compile", "no-bias", "compile+no-bias"])
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_profile: error: needs a CUDA GPU", file=sys.stderr)
        return 3
    rows = []
    for shape, variant in [(sh, v) for sh in args.shapes for v in args.variants]:
        b, s = map(int, shape.split("x"))
        rows.append(profile(b, s, variant))
        r = rows[-1]
        print(f"\n{variant}, batch {b} seq {s}: {r['wall_ms']:.1f} ms/step, kernels {r['kernel_ms']:.1f} ms "
              f"(busy {r['busy']:.0%}), {r['tflops']:.0f} TFLOP/s")
        print("  " + ", ".join(f"{k} {v:.1f}" for k, v in r["by_kind_ms"].items()))
        for t in r["top_kernels"][:8]:
            print(f"    {t['ms']:6.2f} ms x{t['calls']:<4d} {t['name']}")
        torch.cuda.empty_cache()
    args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows},
                                   indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
