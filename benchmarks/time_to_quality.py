"""Time to quality: maskedlm vs transformers.BertForMaskedLM on the embedded corpus, same wall-clock budget.

Both systems train the same mini shape from the same initial weights on the same batches (the same
packed sequences in the same order, the same masks) with the same optimizer and learning-rate schedule
(warmup and decay over the time budget). Held-out masked-token accuracy is measured every --eval-every
seconds of training time on the same fixed held-out masks (evaluation time is not training time).
The peer runs with its best settings: bf16 autocast, fused AdamW, and whichever attention implementation
benchmarks/throughput.py found faster (--peer-attn). Reported: accuracy vs time for both, the time each
needs to reach the peer's final accuracy, and a PNG plot.

    python benchmarks/time_to_quality.py --budget 600 --out benchmarks/results/ttq
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import torch

from maskedlm.config import Config
from maskedlm.batches import EpochSampler, PackedSequences
from maskedlm.data import prepare
from maskedlm.evaluate import Evaluator
from maskedlm.hf import key_map
from maskedlm.masking import MaskSpec
from maskedlm.model import BertForPreTraining
from maskedlm.modernbert import build_model
from maskedlm.runtime import autocast
from maskedlm.distributed import parallelize
from maskedlm.optim import make_optimizer, param_groups
from maskedlm.schedules import lr_factor
from maskedlm.step import TrainStep


class PeerEvalAdapter(torch.nn.Module):
    """Lets our Evaluator (fixed masks, same accounting) score a transformers model."""

    def __init__(self, hf):
        super().__init__()
        self.hf = hf

    def forward(self, input_ids, attention_mask=None, labels=None):
        from maskedlm.model import Output

        logits = self.hf(input_ids=input_ids, attention_mask=attention_mask).logits.float()  # (B, T, V)
        keep = labels != -100
        lsum = torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum")
        return Output(None, None, lsum, keep.sum(), (logits[keep].argmax(-1) == labels[keep]).sum())


def build(cfg: Config, device, peer_attn: str):
    prep = prepare(cfg.data, log=lambda *a: None)
    tok = prep.tokenizer
    cfg.model.vocab_size, cfg.model.pad_token_id = tok.vocab_size, tok.special.pad
    train = PackedSequences(prep.train, cfg.data.seq_len, tok.special)
    valid = PackedSequences(prep.valid, cfg.data.seq_len, tok.special, pad_last=True, what="held-out")
    evaluator = Evaluator(valid, tok, cfg.mask, cfg.train.eval_sequences, cfg.train.eval_seed)
    spec = MaskSpec.from_tokenizer(tok, cfg.mask)

    torch.manual_seed(cfg.train.seed)
    ours = BertForPreTraining(cfg.model).to(device).train()
    import transformers

    m = cfg.model
    hf = transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=m.vocab_size, hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_heads, intermediate_size=m.intermediate_size, max_position_embeddings=m.max_position,
        hidden_dropout_prob=m.hidden_dropout, attention_probs_dropout_prob=m.attention_dropout,
        layer_norm_eps=m.layer_norm_eps, pad_token_id=m.pad_token_id, attn_implementation=peer_attn)).to(device)
    names = key_map(m.num_layers)
    hf.load_state_dict({names[k]: v.clone() for k, v in ours.state_dict().items()
                        if not k.startswith(("nsp", "bert.pooler"))}, strict=False)
    hf.tie_weights()
    hf.train()
    return train, evaluator, spec, ours, hf


def train_for(name, step, model_for_eval, evaluator, train, cfg, device, amp, budget, eval_every):
    sampler = EpochSampler(len(train), cfg.train.seed)
    curve, elapsed, steps, next_eval = [], 0.0, 0, 0.0
    while True:
        if elapsed >= next_eval or elapsed >= budget:
            res = evaluator(model_for_eval, device, amp)
            curve.append({"time": elapsed, "step": steps, "accuracy": res.accuracy, "loss": res.loss})
            print(f"  {name:12s} t={elapsed:6.1f}s step {steps:5d} held-out acc {res.accuracy:.4f} loss {res.loss:.4f}",
                  flush=True)
            next_eval += eval_every
            if elapsed >= budget:
                return curve
        ids, _ = train.get(sampler.take(cfg.train.batch_size))
        ids = torch.from_numpy(ids).to(device)
        t0 = time.perf_counter()
        step(ids, cfg.train.lr * lr_factor(elapsed / budget, cfg.train.warmup_frac, cfg.train.schedule,
                                                  cfg.train.min_lr_frac))
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed += time.perf_counter() - t0
        steps += 1


def time_to_reach(curve, target):
    for prev, cur in zip(curve, curve[1:]):
        if cur["accuracy"] >= target:
            if prev["accuracy"] >= target:
                return prev["time"]
            f = (target - prev["accuracy"]) / (cur["accuracy"] - prev["accuracy"])
            return prev["time"] + f * (cur["time"] - prev["time"])
    return None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=float, default=600.0, help="training seconds per system")
    ap.add_argument("--eval-every", type=float, default=30.0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--peer-attn", default="eager")
    ap.add_argument("--lr", type=float, default=1e-3, help="both systems' peak LR (--ours bert) or the peer's")
    ap.add_argument("--ours", choices=["bert", "default"], default="bert",
                    help="bert: our BERT from the peer's initial weights (step speed only); default: maskedlm's default "
                         "recipe (ModernBERT, its own initialisation and LR) on the same data, batches and masks")
    ap.add_argument("--our-budget", type=float, help="training seconds for ours (default: --budget)")
    ap.add_argument("--vocab-size", type=int, default=8192, help="WordPiece vocabulary (maskedlm's default 8192; BERT's 30522)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/time_to_quality"))
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    cfg = Config.from_dict({"model": {"arch": "bert"}})  # the peer is a BertForMaskedLM: the same architecture
    cfg.model.hidden_dropout = cfg.model.attention_dropout = 0.0
    cfg.train.lr = args.lr
    cfg.data.vocab_size = args.vocab_size
    amp = torch.bfloat16
    train, evaluator, spec, ours, hf = build(cfg, device, args.peer_attn)
    print(f"# {datetime.date.today()} {platform.node()} {device}: mini, vocab {cfg.model.vocab_size}, seq {cfg.data.seq_len}, "
          f"batch {cfg.train.batch_size}, lr {cfg.train.lr}, budget {args.budget:g}s each", flush=True)

    t = cfg.train
    our_cfg = cfg
    if args.ours == "default":
        our_cfg = Config.from_dict({"model": {"preset": cfg.model.preset}, "data": {"vocab_size": args.vocab_size}})
        our_cfg.model.vocab_size, our_cfg.model.pad_token_id = cfg.model.vocab_size, cfg.model.pad_token_id
        torch.manual_seed(our_cfg.train.seed)
        ours = build_model(our_cfg.model).to(device).train()
    gen = torch.Generator(device=device).manual_seed(t.seed)
    our_par = parallelize(ours, amp_dtype=amp)
    our_step = TrainStep(our_par, make_optimizer(ours, our_cfg.train), spec, gen, clip_grad=our_cfg.train.clip_grad)
    curve_ours = train_for("maskedlm", lambda ids, lr: our_step(ids, lr), ours, evaluator, train, our_cfg, device, amp,
                           args.our_budget or args.budget, args.eval_every)

    peer_opt = torch.optim.AdamW(param_groups(hf, t.weight_decay), lr=t.lr, betas=(t.adam_beta1, t.adam_beta2),
                                 eps=t.adam_eps, fused=device.type in ("cpu", "cuda"))
    peer_gen = torch.Generator(device=device).manual_seed(t.seed)

    def peer_step(ids, lr):
        for g in peer_opt.param_groups:
            g["lr"] = lr
        inputs, labels = spec(ids, peer_gen)  # the same masks as ours (same generator seed and order)
        with autocast(device, amp):
            out = hf(input_ids=inputs, labels=labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), t.clip_grad)
        peer_opt.step()
        peer_opt.zero_grad(set_to_none=True)

    curve_peer = train_for("transformers", peer_step, PeerEvalAdapter(hf), evaluator, train, cfg, device, amp,
                           args.budget, args.eval_every)

    target = curve_peer[-1]["accuracy"]
    t_ours, t_peer = time_to_reach(curve_ours, target), time_to_reach(curve_peer, target)
    summary = {"date": datetime.date.today().isoformat(), "machine": platform.node(), "device": str(device),
               "budget_s": args.budget, "our_budget_s": args.our_budget or args.budget, "ours": args.ours,
               "ours_arch": our_cfg.model.arch, "lr": {"ours": our_cfg.train.lr, "peer": cfg.train.lr}, "peer_final_accuracy": target, "ours_final_accuracy": curve_ours[-1]["accuracy"],
               "ours_time_to_peer_final_s": t_ours, "peer_time_to_peer_final_s": t_peer,
               "ratio": (t_ours / t_peer) if t_ours and t_peer else None,
               "steps": {"maskedlm": curve_ours[-1]["step"], "transformers": curve_peer[-1]["step"]},
               "curves": {"maskedlm": curve_ours, "transformers": curve_peer}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "time_to_quality.json").write_text(json.dumps(summary, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.2))
        for name, curve in summary["curves"].items():
            ax.plot([c["time"] for c in curve], [c["accuracy"] for c in curve], marker="o", ms=3, label=name)
        ax.axhline(target, color="grey", ls=":", lw=1, label=f"transformers' final accuracy ({target:.3f})")
        ax.set_xlabel("training time (s)")
        ax.set_ylabel("held-out masked-token accuracy")
        ax.set_title(f"mini on Shakespeare, {device}: maskedlm {our_cfg.model.arch} vs transformers BERT")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.out / "time_to_quality.png", dpi=120)
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
    print(f"\npeer final accuracy {target:.4f}; maskedlm final {curve_ours[-1]['accuracy']:.4f}")
    print(f"time to reach it: maskedlm {t_ours if t_ours is None else round(t_ours, 1)}s, "
          f"transformers {t_peer if t_peer is None else round(t_peer, 1)}s; ratio {summary['ratio']}")
    return summary


if __name__ == "__main__":
    main()
