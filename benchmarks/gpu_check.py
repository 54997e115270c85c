"""GPU correctness check and BERT-base benchmark (what benchmarks/gpu.sh runs).

1. Correctness: the same weights, batch and masks on the CPU in fp32 and on the GPU through the real
   training step in bf16: the masked-token loss must agree within bf16 tolerance, before and after one
   optimizer step; the GPU model's logits must match transformers' on the same card.
2. Speed: BERT-base (12L/768H, vocab 30522) at seq 128 and 512, bf16, maskedlm (eager and compiled) vs
   transformers.BertForMaskedLM (SDPA, bf16 autocast, fused AdamW) on the same card, interleaved;
   MFU against the datasheet dense bf16 peak and against a matmul measured on the spot.

Refuses (exit 3, one line) when no CUDA device is present, unless --allow-cpu (for testing the script).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent  # on sys.path as the script's folder: `throughput` imports from it

# Dense bf16 tensor-core peaks from NVIDIA's datasheets (without sparsity), TFLOP/s.
DATASHEET_BF16 = {"H200": 989.4, "H100 NVL": 835.5, "H100 PCIe": 756.5, "H100": 989.4, "A100": 312.0,
                  "L40S": 362.1, "A10G": 70.0, "L4": 121.0}


def datasheet_peak(name: str) -> float | None:
    for key, tflops in DATASHEET_BF16.items():
        if key in name:
            return tflops * 1e12
    return None


def check_correctness(device: torch.device, vocab: int = 30522, preset: str = "mini") -> dict:
    from maskedlm.config import ModelConfig
    from maskedlm.hf import key_map
    from maskedlm.masking import MaskSpec
    from maskedlm.model import BertForPreTraining
    from maskedlm.config import TrainConfig
    from maskedlm.distributed import parallelize
    from maskedlm.optim import make_optimizer
    from maskedlm.step import TrainStep

    cfg = ModelConfig(arch="bert", vocab_size=vocab, hidden_dropout=0.0, attention_dropout=0.0)
    cfg.apply_preset(preset)
    torch.manual_seed(0)
    cpu_model = BertForPreTraining(cfg).train()
    gpu_model = BertForPreTraining(cfg).to(device).train()
    gpu_model.load_state_dict(cpu_model.state_dict())
    spec = MaskSpec(4, vocab, (0, 1, 2, 3, 4))
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(2):
        ids = torch.randint(5, vocab, (16, 128), generator=g)
        ids[:, 0], ids[:, -1] = 2, 3
        batches.append(spec(ids, g))

    t = TrainConfig()
    cpu_opt, gpu_opt = make_optimizer(cpu_model, t), make_optimizer(gpu_model, t)
    gpu_step = TrainStep(parallelize(gpu_model, amp_dtype=torch.bfloat16), gpu_opt, spec, torch.Generator(device=device))
    losses = []
    for inputs, labels in batches:
        out = cpu_model(inputs, labels=labels)  # fp32 reference
        cpu_loss = out.loss
        cpu_loss.backward()
        cpu_opt.step()
        cpu_opt.zero_grad()
        # The GPU side runs the real step's forward (bf16 copy, fused loss), then the real update.
        with torch.no_grad():
            gl = gpu_step.forward(inputs.to(device), labels.to(device)).loss_sum
            gpu_loss = gl / (labels != -100).sum()
        gpu_step.mask = lambda ids, gen, _i=inputs, _l=labels: (_i.to(device), _l.to(device))
        gpu_step(inputs.to(device))
        losses.append((float(cpu_loss), float(gpu_loss)))
    rel = [abs(a - b) / a for a, b in losses]

    parity = None
    try:
        import transformers

        hf = transformers.BertForMaskedLM(transformers.BertConfig(
            vocab_size=vocab, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation="sdpa")).to(device).eval()
        names = key_map(cfg.num_layers)
        hf.load_state_dict({names[k]: v for k, v in gpu_model.state_dict().items()
                            if not k.startswith(("nsp", "bert.pooler"))}, strict=False)
        hf.tie_weights()
        gpu_model.eval()
        ids = batches[0][0][:4].to(device)
        with torch.no_grad():
            ours = gpu_model(ids).logits.double()
            theirs = hf(input_ids=ids).logits.double()
        parity = float((ours - theirs).norm() / theirs.norm())
    except ImportError:
        pass
    ok = all(r < 2e-2 for r in rel) and (parity is None or parity < 1e-4)
    return {"losses_cpu_fp32_vs_gpu_bf16": losses, "relative_differences": rel,
            "fp32_logits_rel_diff_vs_transformers": parity, "ok": ok}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", nargs="?", default="gpu-results", type=Path)
    ap.add_argument("--allow-cpu", action="store_true", help="run on the CPU with tiny shapes (tests the script)")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args(argv)

    if not torch.cuda.is_available() and not args.allow_cpu:
        print("gpu_check: error: no CUDA device visible to PyTorch; this check needs a GPU", file=sys.stderr)
        return 3
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    t0 = time.time()
    correctness = check_correctness(device, vocab=30522 if device.type == "cuda" else 1000,
                                    preset="mini" if device.type == "cuda" else "tiny")
    (args.out / "correctness.json").write_text(json.dumps(correctness, indent=2))
    print(f"correctness ({time.time() - t0:.0f}s): {correctness}", flush=True)

    import throughput

    rows = []
    cuda = device.type == "cuda"
    # seq 128 (the Step 2 target shape): both systems eager and compiled; seq 512: ours compiled, the peer
    # eager (a fourth compilation would not fit the device time this script is written for).
    plans = [(128, 128 if cuda else 4, ["--with-compile", "--peer-compile"]),
             (512, 32 if cuda else 2, ["--with-compile"])]
    for seq, batch, compile_flags in plans:
        argv_tp = ["--device", str(device.type), "--shapes", "base-30522" if cuda else "tiny-1000", "--batch", str(batch),
                   "--seq", str(seq), "--reps", str(args.reps if cuda else 2), "--warmup", "5" if cuda else "1",
                   "--peer-attn", "sdpa", "--json", str(args.out / f"throughput_seq{seq}.json")]
        if not args.no_compile:
            argv_tp += compile_flags
        res = throughput.main(argv_tp)
        rows.extend(res["results"])
        peak_meas = res["host"]["bf16_matmul_peak_tflops"] * 1e12
    sheet = datasheet_peak(name)
    summary = {"device": name, "datasheet_bf16_peak_tflops": sheet / 1e12 if sheet else None,
               "measured_bf16_matmul_tflops": peak_meas / 1e12, "correctness_ok": correctness["ok"], "rows": []}
    for row in rows:
        for system, r in row["systems"].items():
            achieved = r["tflops"] * 1e12
            summary["rows"].append({"seq": row["seq"], "batch": row["batch"], "system": system,
                                    "tokens_per_s": r["tokens_per_s"], "vs_transformers": r["vs_peer"],
                                    "mfu_datasheet": achieved / sheet if sheet else None,
                                    "mfu_measured": achieved / peak_meas, "warmup_s": r["warmup_s"]})
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))

    print(f"\n== {name}: datasheet bf16 {summary['datasheet_bf16_peak_tflops']} TFLOP/s, "
          f"measured matmul {summary['measured_bf16_matmul_tflops']:.0f} TFLOP/s; correctness "
          f"{'OK' if correctness['ok'] else 'FAILED'} (max rel. loss diff {max(correctness['relative_differences']):.2e})")
    print(f"{'seq':>4} {'batch':>5} {'system':22s} {'tokens/s':>10} {'x tf':>6} {'MFU sheet':>9} {'MFU meas':>9}")
    for r in summary["rows"]:
        ms = f"{r['mfu_datasheet']:.1%}" if r["mfu_datasheet"] is not None else "-"
        print(f"{r['seq']:>4} {r['batch']:>5} {r['system']:22s} {r['tokens_per_s']:10.0f} {r['vs_transformers']:6.2f} "
              f"{ms:>9} {r['mfu_measured']:9.1%}")
    return 0 if correctness["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
