"""Time to quality beyond the MLM plateau: which training recipe learns fastest per second?

Each recipe is a set of config overrides on top of the default `maskedlm pretrain` (ModernBERT-mini since
Step 11, `NAME:model.arch=bert` for BERT-mini; WordPiece, seq 128, batch 32, the embedded corpus unless
--train is given). Every run is a real `maskedlm.pretrain`
with a wall-clock budget of training; held-out masked-token accuracy is measured on the fixed standard masks
(15%, 80/10/10, the same positions in every run) of the fixed held-out split every --eval-seconds of training
(evaluation time is not counted). Per run: the first evaluation at or above each threshold (20, 25, 30,
40%), so a crossing time is resolved to the evaluation interval. Per recipe: mean and spread over seeds.

Writes recipes.json (every curve) and recipes.png (held-out accuracy against training seconds).

    python benchmarks/recipes.py --budget 300 --seeds 0 1 2 --out benchmarks/results/recipes \
        --variant baseline --variant mask30:mask.mask_prob=0.3 --variant lr2e-3:train.lr=0.002,mask.mask_prob=0.3

Run it alone on the machine: another CPU-heavy process makes every step many times slower.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import tempfile
from pathlib import Path

import torch

from maskedlm import Config, pretrain

THRESHOLDS = (0.20, 0.25, 0.30, 0.40)

def parse_variant(spec: str) -> tuple[str, dict]:
    """'mask30:mask.mask_prob=0.3,train.lr=2e-3' -> ('mask30', {'mask': {'mask_prob': 0.3}, 'train': {'lr': 0.002}});
    a bare name is the default recipe."""
    name, _, sets = spec.partition(":")
    out: dict = {}
    for item in filter(None, sets.split(",")):
        key, _, raw = item.partition("=")
        section, _, field = key.partition(".")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out.setdefault(section, {})[field] = value
    return name, out


def merge(a: dict, b: dict) -> dict:
    out = {k: dict(v) for k, v in a.items()}
    for section, values in b.items():
        out.setdefault(section, {}).update(values)
    return out


def run(name: str, overrides: dict, seed: int, args, workdir: Path) -> dict:
    run_dir = workdir / f"{name}-seed{seed}"
    if not (run_dir / "eval.json").is_file():  # finished runs in --workdir are read back, not trained again
        cfg = Config.from_dict(merge(overrides, {
            "data": {"train": args.train, "vocab_size": args.vocab_size} if args.train else {"vocab_size": args.vocab_size},
            "train": {"time_budget": args.budget, "seed": seed, "eval_every": 0, "eval_seconds": args.eval_seconds,
                      "checkpoint_every": 0, "checkpoint_minutes": 0, "sample": False, "probe": False,
                      "plot": False, "out": str(run_dir)}}))
        pretrain(cfg, log=lambda *a: None, progress_bar=False)
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"split"' in line]
    curve = [{"elapsed": e["elapsed"], "step": e["step"], "loss": e["loss"], "accuracy": e["accuracy"]} for e in evals]
    crossings = {f"{t:.0%}": next((c["elapsed"] for c in curve if c["accuracy"] >= t), None) for t in THRESHOLDS}
    final = json.loads((run_dir / "eval.json").read_text())
    return {"recipe": name, "seed": seed, "steps": final["step"], "accuracy": final["accuracy"], "loss": final["loss"],
            "crossings": crossings, "curve": curve, "config": json.loads((run_dir / "config.json").read_text())}


def summary(runs: list[dict]) -> dict:
    acc = [r["accuracy"] for r in runs]
    out = {"accuracy_mean": statistics.mean(acc), "accuracy_sd": statistics.stdev(acc) if len(acc) > 1 else 0.0,
           "loss_mean": statistics.mean(r["loss"] for r in runs), "steps": [r["steps"] for r in runs], "crossings": {}}
    for t in runs[0]["crossings"]:
        times = [r["crossings"][t] for r in runs]
        out["crossings"][t] = statistics.mean(times) if all(x is not None for x in times) else None
    return out


def plot(results: dict, path: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(9, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, entry) in enumerate(results.items()):
        for j, r in enumerate(entry["runs"]):
            ax.plot([c["elapsed"] for c in r["curve"]], [100 * c["accuracy"] for c in r["curve"]],
                    color=colors[i % len(colors)], lw=1.2, alpha=0.85, label=name if j == 0 else None)
    for t in THRESHOLDS:
        ax.axhline(100 * t, color="grey", lw=0.5, ls=":")
    ax.set_xlabel("training time (s), evaluation excluded")
    ax.set_ylabel("held-out masked-token accuracy (%), fixed 15% masks")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=float, default=300.0, help="training seconds per run")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variant", action="append", default=[], metavar="NAME[:SECTION.FIELD=VALUE,...]",
                    help="a recipe: config overrides on top of the defaults (repeat; default: 'default' alone)")
    ap.add_argument("--eval-seconds", type=float, default=30.0, help="training seconds between held-out evaluations")
    ap.add_argument("--train", nargs="*", default=[], help="training text instead of the embedded corpus")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/recipes"))
    ap.add_argument("--workdir", type=Path, help="run folders; finished runs found here are reused")
    args = ap.parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="maskedlm-recipes-"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    for name, overrides in map(parse_variant, args.variant or ["default"]):
        runs = []
        for seed in args.seeds:
            r = run(name, overrides, seed, args, work)
            cross = ", ".join(f"{t} at {s:.0f}s" if s is not None else f"{t} never" for t, s in r["crossings"].items())
            print(f"{name:28s} seed {seed}: {r['steps']} steps, held-out accuracy {r['accuracy']:.2%} "
                  f"(loss {r['loss']:.3f}); {cross}", flush=True)
            runs.append(r)
        results[name] = {"overrides": overrides, "runs": runs, "summary": summary(runs)}
    args.out.mkdir(parents=True, exist_ok=True)
    out = {"date": datetime.date.today().isoformat(), "machine": platform.node(), "processor": platform.processor(),
           "torch": torch.__version__, "threads": torch.get_num_threads(), "budget_s": args.budget,
           "eval_seconds": args.eval_seconds, "train": args.train or "embedded corpus (shakespeare)",
           "vocab_size": args.vocab_size, "recipes": results}
    stem = args.out / "recipes"
    stem.with_suffix(".json").write_text(json.dumps(out, indent=1))
    plot(results, stem.with_suffix(".png"),
         f"mini, {args.budget:g}s of training per run, {len(args.seeds)} seed(s), vocab {args.vocab_size}")
    print("\nrecipe                        accuracy (mean ± sd)   first crossing (mean s): " + "  ".join(f"{t:.0%}" for t in THRESHOLDS))
    for name, e in results.items():
        s = e["summary"]
        cross = "  ".join(f"{v:5.0f}" if v is not None else "    -" for v in s["crossings"].values())
        print(f"{name:28s}  {s['accuracy_mean']:.2%} ± {s['accuracy_sd']:.2%}          {cross}")
    return out


if __name__ == "__main__":
    main()
