"""Training-step throughput: maskedlm vs transformers.BertForMaskedLM, same shapes, same batches.

One step = masking (ours, on the device) + forward + backward + gradient clipping + AdamW update.
The peer gets its best settings: bf16 autocast, fused AdamW, and whichever of its attention
implementations ('sdpa', 'eager') is faster on this machine (both are timed; the faster one is the peer).
Repetitions are interleaved (ours, peer, ours, ...), medians reported, with achieved model FLOP/s and MFU
against the bf16 matmul peak measured at the start (formula in maskedlm/flops.py).

    python benchmarks/throughput.py                      # the three shapes of the speed targets
    python benchmarks/throughput.py --ablations          # also our step with each technique switched off
    python benchmarks/throughput.py --device cuda --shapes base-30522 --batch 64 --seq 128 512
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import maskedlm.model as model_mod
from maskedlm.config import PRESETS, DataConfig, ModelConfig, TrainConfig
from maskedlm.data import cache_root
from maskedlm.flops import matmul_peak, remembered_peak, train_flops
from maskedlm.masking import IGNORE_INDEX, MaskSpec
from maskedlm.model import Output
from maskedlm.modernbert import build_model
from maskedlm.runtime import autocast
from maskedlm.distributed import parallelize
from maskedlm.optim import make_optimizer, param_groups
from maskedlm.step import TrainStep


def model_config(shape: str, dropout: float, arch: str = "bert") -> ModelConfig:
    preset, vocab = shape.split("-")
    cfg = ModelConfig(arch=arch, vocab_size=int(vocab), hidden_dropout=dropout, attention_dropout=dropout)
    cfg.apply_preset(preset)
    return cfg


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- our step and its ablations ---------------------------------------------------------------------------


class DenseHeadStep(TrainStep):
    """Ablation: the MLM head on every position, then cross-entropy with ignore_index (the plain dense path)."""

    def forward(self, inputs, labels, attention_mask=None, token_type_ids=None, nsp=False):
        hidden = self.encoder(inputs, attention_mask, token_type_ids)
        logits = self.compute.mlm(hidden, self.compute.bert.embeddings.word.weight)  # (B, T, V)
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
        keep = labels != IGNORE_INDEX
        return Output(hidden, None, loss, keep.sum(), (logits.argmax(-1)[keep] == labels[keep]).sum())


class SparseUnfusedStep(TrainStep):
    """Ablation: the head on the predicted positions only, but logits -> float -> cross_entropy (not fused)."""

    def forward(self, inputs, labels, attention_mask=None, token_type_ids=None, nsp=False):
        hidden = self.encoder(inputs, attention_mask, token_type_ids)
        flat = labels.reshape(-1)
        keep = flat != IGNORE_INDEX
        logits = self.compute.mlm(hidden.reshape(-1, hidden.shape[-1])[keep], self.compute.bert.embeddings.word.weight)
        targets = flat[keep]
        loss = F.cross_entropy(logits.float(), targets, reduction="sum")
        return Output(hidden, None, loss, keep.sum(), (logits.argmax(-1) == targets).sum())


class AutocastStep(TrainStep):
    """Ablation: fp32 weights with bf16 autocast around forward and backward (instead of a bf16 copy)."""

    def forward(self, inputs, labels, attention_mask=None, token_type_ids=None, nsp=False):
        with autocast(self.device, torch.bfloat16):
            return super().forward(inputs, labels, attention_mask, token_type_ids, nsp)


@contextlib.contextmanager
def sdpa_everywhere():
    """Ablation: SDPA for attention even where maskedlm uses explicit matmuls (short bf16 sequences on CPU)."""
    old = model_mod.MATMUL_ATTENTION_MAX_LEN
    model_mod.MATMUL_ATTENTION_MAX_LEN = 0
    try:
        yield
    finally:
        model_mod.MATMUL_ATTENTION_MAX_LEN = old


@contextlib.contextmanager
def band_masked():
    """Ablation (ModernBERT): local layers as full attention under a (T, T) band mask, not in blocks."""
    import maskedlm.modernbert as mb

    old = mb.WINDOWED_FROM
    mb.WINDOWED_FROM = 1 << 30
    try:
        yield
    finally:
        mb.WINDOWED_FROM = old


# Each ablation switches one technique off (the name says what runs instead).
ABLATIONS = ["dense-head", "unfused-ce", "sdpa-attention", "autocast", "foreach-adamw", "fp32"]


def make_ours(cfg: ModelConfig, device: torch.device, amp, *, variant: str = "full"):
    if variant == "no-bias":  # --no-linear-bias: Q/K/V/output and FFN linears without biases
        cfg = dataclasses.replace(cfg, linear_bias=False)
    torch.manual_seed(0)
    model = build_model(cfg).to(device).train()
    t = TrainConfig()
    if variant == "foreach-adamw":
        opt = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=1e-4, foreach=True)
    else:
        opt = make_optimizer(model, t)
    spec = MaskSpec(4, cfg.vocab_size, (0, 1, 2, 3, 4))
    gen = torch.Generator(device=device).manual_seed(0)
    cls = {"dense-head": DenseHeadStep, "unfused-ce": SparseUnfusedStep, "autocast": AutocastStep}.get(variant, TrainStep)
    dtype = None if variant in ("fp32", "autocast") else amp
    step = cls(parallelize(model, amp_dtype=dtype, compile=variant == "compile"), opt, spec, gen)
    ctx = {"sdpa-attention": sdpa_everywhere, "band-mask": band_masked}.get(variant, contextlib.nullcontext)

    def run(ids, _masked):
        with ctx():
            stats = step(ids)
        return stats.predicted

    return run


def make_peer(cfg: ModelConfig, device: torch.device, amp, attn: str, compile: bool = False):
    import transformers

    torch.manual_seed(0)
    if cfg.arch == "modernbert":  # transformers' ModernBertForMaskedLM on the same shape (ModernBERT's sparse
        # prediction on: its head then runs on the masked positions only, as ours does)
        hf_cfg = transformers.ModernBertConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, local_attention=cfg.local_attention,
            global_attn_every_n_layers=cfg.global_every, max_position_embeddings=max(cfg.max_position, 8192),
            norm_eps=cfg.layer_norm_eps, pad_token_id=0, bos_token_id=2, cls_token_id=2, eos_token_id=3, sep_token_id=3,
            sparse_prediction=True, attn_implementation=attn)
        model = transformers.ModernBertForMaskedLM(hf_cfg).to(device).train()
    else:
        model = None
    hf_cfg = transformers.BertConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
        hidden_dropout_prob=cfg.hidden_dropout, attention_probs_dropout_prob=cfg.attention_dropout,
        max_position_embeddings=cfg.max_position, attn_implementation=attn)
    model = model or transformers.BertForMaskedLM(hf_cfg).to(device).train()
    opt = torch.optim.AdamW(param_groups(model, 0.01), lr=1e-4, fused=device.type in ("cpu", "cuda"))
    forward = torch.compile(model) if compile else model  # the peer at its best: compiled, as ours can be

    def run(_ids, masked):
        inputs, labels = masked
        with autocast(device, amp):
            out = forward(input_ids=inputs, labels=labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return (labels != IGNORE_INDEX).sum()

    return run


# -- the pretrain command itself ---------------------------------------------------------------------------


def pretrain_tokens_per_s(shape: str, seq: int, batch: int, steps: int, device: str, workdir: Path) -> float:
    """Steady-state tokens/s that `maskedlm pretrain` logs on this shape (embedded corpus; the trained
    WordPiece vocabulary is padded with [unusedN] entries to the shape's size, as BERT's vocab.txt is)."""
    import subprocess

    from maskedlm.data import build_tokenizer

    preset, vocab = shape.split("-")
    tok = build_tokenizer(DataConfig(vocab_size=int(vocab)), log=lambda *a: None)
    tokens = [t for t, _ in sorted(tok.hf.get_vocab().items(), key=lambda kv: kv[1])]
    tokens += [f"[unused{i}]" for i in range(int(vocab) - len(tokens))]
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "vocab.txt").write_text("\n".join(tokens) + "\n")
    out = workdir / f"run-{shape}-{seq}"
    cmd = [sys.executable, "-m", "maskedlm", "pretrain", "--tokenizer", str(workdir / "vocab.txt"), "--model", preset,
           "--seq-len", str(seq), "--batch-size", str(batch), "--max-steps", str(steps), "--log-every", "5",
           "--eval-every", "0", "--eval-sequences", "64", "--checkpoint-every", "0", "--no-sample",
           "--device", device, "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][2:]  # skip warm-up windows
    return statistics.median(rates)


# -- the allocator ---------------------------------------------------------------------------------------


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory for reuse (no mmap for large blocks, no trimming), as jemalloc or
    tcmalloc (LD_PRELOAD, Intel's advice for PyTorch on CPUs) would: otherwise every large activation is a fresh
    mmap whose pages fault in on first touch, each step. It applies to the whole process, so to both systems
    compared; transformers' eager ModernBERT step at seq 1024 ran 2.1x faster with it (BENCHMARKS.md), ours no
    faster. Returns False where the C library is not glibc (nothing changed)."""
    import ctypes

    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL("libc.so.6")
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
    return all(libc.mallopt(opt, value) == 1 for opt, value in
               ((M_MMAP_THRESHOLD, 1 << 30), (M_TRIM_THRESHOLD, (1 << 31) - 1), (M_TOP_PAD, 64 << 20)))


# -- timing -----------------------------------------------------------------------------------------------


def batches(cfg: ModelConfig, batch: int, seq: int, device: torch.device, n: int = 4):
    """A few fixed batches of random token ids with [CLS]/[SEP], and their masked versions for the peer."""
    g = torch.Generator().manual_seed(1)
    spec = MaskSpec(4, cfg.vocab_size, (0, 1, 2, 3, 4))
    out = []
    for _ in range(n):
        ids = torch.randint(5, cfg.vocab_size, (batch, seq), generator=g)
        ids[:, 0], ids[:, -1] = 2, 3
        masked = spec(ids, g)
        out.append((ids.to(device), tuple(x.to(device) for x in masked)))
    return out


def bench(fns: dict, data, device, reps: int, warmup: int) -> dict[str, dict]:
    times = {k: [] for k in fns}
    preds = {k: [] for k in fns}
    for k, fn in fns.items():  # warm-up (and compilation) outside the timed loop
        t0 = time.perf_counter()
        for i in range(warmup):
            fn(*data[i % len(data)])
        sync(device)
        times[k + ":warmup_s"] = time.perf_counter() - t0
    names = list(fns)
    for r in range(reps):
        order = names if r % 2 == 0 else names[::-1]
        for k in order:
            ids, masked = data[r % len(data)]
            sync(device)
            t0 = time.perf_counter()
            n = fns[k](ids, masked)
            sync(device)
            times[k].append(time.perf_counter() - t0)
            preds[k].append(float(n))
    return {k: {"median_s": statistics.median(times[k]), "min_s": min(times[k]), "warmup_s": times[k + ":warmup_s"],
                "predicted": statistics.mean(preds[k])} for k in fns}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["mini-30522", "mini-8192", "small-30522"],
                    help="PRESET-VOCAB, presets: " + ", ".join(PRESETS))
    ap.add_argument("--arch", choices=["bert", "modernbert"], default="bert",
                    help="the architecture of both systems (modernbert: the peer is transformers' ModernBertForMaskedLM)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, nargs="+", default=[128])
    ap.add_argument("--dropout", type=float, default=0.0, help="for both systems (maskedlm's default is 0)")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--ablations", action="store_true", help="also time our step with each technique off")
    ap.add_argument("--with-compile", action="store_true", help="also time our step with --compile")
    ap.add_argument("--no-bias", action="store_true",
                    help="also time our step with --no-linear-bias (the blocks' linear layers bias-free)")
    ap.add_argument("--pretrain-steps", type=int, default=0,
                    help="also run `maskedlm pretrain` for this many steps per shape and report its logged tokens/s")
    ap.add_argument("--band-mask", action="store_true",
                    help="modernbert: also time our step with local layers as band-masked full attention (not in blocks)")
    ap.add_argument("--peer-attn", nargs="+", default=["sdpa", "eager"])
    ap.add_argument("--peer-compile", action="store_true", help="also time the peer under torch.compile (its first attention kind)")
    ap.add_argument("--keep-freed-memory", action="store_true",
                    help="glibc malloc keeps freed memory (no page faults on every step's large tensors), for both systems")
    ap.add_argument("--json", type=Path, help="write results here")
    args = ap.parse_args(argv)

    malloc = "kept freed memory (mallopt)" if args.keep_freed_memory and keep_freed_memory() else "glibc default"
    device = torch.device(args.device)
    amp = torch.bfloat16
    # MFU against the highest bf16 peak measured on this machine (as `pretrain` reports it): on a shared VM one
    # measurement can read low (0.77 against 0.87-0.90 TFLOP/s on the same day) and inflate every MFU of a run.
    peak, _ = remembered_peak(device.type, torch.bfloat16, cache_root(DataConfig()))
    peak_now = matmul_peak(device.type, torch.bfloat16)  # cached: the measurement remembered_peak just took
    peak32 = matmul_peak(device.type, torch.float32)
    host = {"machine": platform.node(), "processor": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "date": datetime.date.today().isoformat(), "bf16_matmul_peak_tflops": peak / 1e12,
            "bf16_matmul_peak_measured_this_run_tflops": peak_now / 1e12,
            "fp32_matmul_peak_tflops": peak32 / 1e12, "malloc": malloc}
    print(f"# {host['date']} {host['device']} ({host['processor']}, {host['threads']} threads), torch {host['torch']}; "
          f"matmul peak: bf16 {peak / 1e12:.2f} TFLOP/s (highest measured here; this run {peak_now / 1e12:.2f}), "
          f"fp32 {peak32 / 1e12:.2f} TFLOP/s; malloc: {malloc}", flush=True)
    results = []
    for shape in args.shapes:
        for seq in args.seq:
            cfg = model_config(shape, args.dropout, args.arch)
            data = batches(cfg, args.batch, seq, device)
            fns = {"maskedlm": make_ours(cfg, device, amp)}
            for attn in args.peer_attn:
                fns[f"transformers-{attn}"] = make_peer(cfg, device, amp, attn)
            if args.peer_compile:
                fns[f"transformers-{args.peer_attn[0]} +compile"] = make_peer(cfg, device, amp, args.peer_attn[0], compile=True)
            if args.ablations:
                for v in ABLATIONS:
                    fns[f"maskedlm {v}"] = make_ours(cfg, device, amp, variant=v)
            if args.with_compile or args.ablations:
                fns["maskedlm +compile"] = make_ours(cfg, device, amp, variant="compile")
            if args.arch == "modernbert" and (args.ablations or args.band_mask):
                fns["maskedlm band-mask"] = make_ours(cfg, device, amp, variant="band-mask")
            if args.no_bias:
                fns["maskedlm +no-bias"] = make_ours(cfg, device, amp, variant="no-bias")
            res = bench(fns, data, device, args.reps, args.warmup)
            tokens = args.batch * seq
            peer = min((k for k in res if k.startswith("transformers")), key=lambda k: res[k]["median_s"])
            row = {"shape": shape, "seq": seq, "batch": args.batch, "peer": peer, "systems": {}}
            for k, r in res.items():
                flops = train_flops(cfg, args.batch, seq, r["predicted"])
                tps = tokens / r["median_s"]
                row["systems"][k] = {"tokens_per_s": tps, "step_ms": 1e3 * r["median_s"], "warmup_s": r["warmup_s"],
                                     "tflops": flops / r["median_s"] / 1e12,
                                     "mfu": flops / r["median_s"] / peak,
                                     "vs_peer": res[peer]["median_s"] / r["median_s"]}
            if args.pretrain_steps:
                import tempfile

                tps = pretrain_tokens_per_s(shape, seq, args.batch, args.pretrain_steps, args.device,
                                            Path(tempfile.mkdtemp(prefix="maskedlm-bench-")))
                row["pretrain_logged"] = {"tokens_per_s": tps, "vs_peer": tps / row["systems"][peer]["tokens_per_s"]}
            results.append(row)
            print(f"\n{shape} seq {seq} batch {args.batch} (peer: {peer})")
            print(f"  {'system':30s} {'tokens/s':>10s} {'step ms':>9s} {'TFLOP/s':>8s} {'MFU':>6s} {'x peer':>7s}")
            for k, r in row["systems"].items():
                print(f"  {k:30s} {r['tokens_per_s']:10.0f} {r['step_ms']:9.1f} {r['tflops']:8.3f} "
                      f"{r['mfu']:6.1%} {r['vs_peer']:7.2f}", flush=True)
            if "pretrain_logged" in row:
                pl = row["pretrain_logged"]
                print(f"  {'maskedlm pretrain (logged)':30s} {pl['tokens_per_s']:10.0f} {'':9s} {'':8s} {'':6s} "
                      f"{pl['vs_peer']:7.2f}", flush=True)
    out = {"host": host, "args": {k: str(v) for k, v in vars(args).items()}, "results": results}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
