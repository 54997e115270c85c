"""A claim of labml.ai's annotated MLM page, tested: does a short-to-long sequence-length curriculum train
an MLM faster?

Same model (mini), data (the embedded corpus, fixed held-out split) and wall-clock budget for every run;
the only difference is the schedule of sequence lengths (the batch keeps a constant number of tokens).
Held-out masked loss and accuracy are measured at the final length (128) on the same fixed masks as the
run goes. Several seeds per schedule; mean and spread reported. Also: next-sentence prediction on vs off
at the same budget (held-out MLM accuracy, and NSP accuracy).

Every run is a real `maskedlm.pretrain`. Plots and a JSON summary go to --out.

    python benchmarks/curriculum.py --budget 180 --seeds 0 1 2 --out benchmarks/results/curriculum
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import tempfile
from pathlib import Path

from maskedlm import Config, pretrain

SCHEDULES = {"fixed 128": None, "64:0.9,128:0.1": "64:0.9,128:0.1", "ramp 32->128": "ramp:32:128:32"}


def run(budget: float, seed: int, schedule: str | None, objective: str, eval_every: int, workdir: Path) -> dict:
    cfg = Config.from_dict({"model": {"arch": "bert"}})  # the numbers in BENCHMARKS.md are BERT-mini's
    cfg.train.time_budget = budget
    cfg.train.seed = seed
    cfg.train.seq_len_schedule = schedule
    cfg.train.objective = objective
    cfg.train.eval_every = eval_every
    cfg.train.checkpoint_every = 0
    cfg.train.checkpoint_minutes = 0
    cfg.train.sample = False
    cfg.train.probe = False  # the genre probe is not what is measured here
    run_dir = workdir / f"{objective}-{schedule or 'fixed'}-{seed}".replace(":", "_").replace(",", "_")
    # A finished run in --workdir (same settings, same folder name) is read back instead of trained again:
    # the mlm baseline of the NSP comparison is the fixed-128 run, and an interrupted benchmark continues.
    if not (run_dir / "eval.json").is_file():
        cfg.train.out = str(run_dir)
        pretrain(cfg, log=lambda *a: None, progress_bar=False)
    final = json.loads((run_dir / "eval.json").read_text())
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"split"' in line]
    return {"seed": seed, "schedule": schedule, "objective": objective, "steps": final["step"],
            "final": {k: v for k, v in final.items() if k not in ("train_state", "probe")},
            "curve": [{k: e[k] for k in ("elapsed", "step", "loss", "accuracy", "nsp_accuracy") if k in e}
                      for e in evals]}


def summarise(runs: list[dict], key: str) -> dict:
    vals = [r["final"][key] for r in runs]
    return {"mean": statistics.mean(vals), "stdev": statistics.stdev(vals) if len(vals) > 1 else 0.0, "values": vals}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=float, default=180.0, help="training seconds per run")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--nsp-seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--eval-every", type=int, default=100, help="steps between held-out evaluations")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/curriculum"))
    ap.add_argument("--workdir", type=Path, help="run folders; finished runs found here are reused (default: a new temporary folder)")
    args = ap.parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="maskedlm-curriculum-"))
    work.mkdir(parents=True, exist_ok=True)
    out = {"date": datetime.date.today().isoformat(), "machine": platform.node(), "budget_s": args.budget,
           "schedules": {}, "nsp": {}}
    for name, schedule in SCHEDULES.items():
        runs = []
        for seed in args.seeds:
            r = run(args.budget, seed, schedule, "mlm", args.eval_every, work)
            print(f"{name:16s} seed {seed}: {r['steps']} steps, held-out loss {r['final']['loss']:.4f} "
                  f"accuracy {r['final']['accuracy']:.4f}", flush=True)
            runs.append(r)
        out["schedules"][name] = {"runs": runs, "loss": summarise(runs, "loss"), "accuracy": summarise(runs, "accuracy")}
    for objective in ["mlm", "mlm+nsp"]:
        runs = []
        for seed in args.nsp_seeds:
            r = run(args.budget, seed, None, objective, args.eval_every, work)
            print(f"{objective:16s} seed {seed}: {r['steps']} steps, held-out accuracy {r['final']['accuracy']:.4f}"
                  + (f", NSP accuracy {r['final']['nsp_accuracy']:.4f}" if "nsp_accuracy" in r["final"] else ""),
                  flush=True)
            runs.append(r)
        entry = {"runs": runs, "accuracy": summarise(runs, "accuracy")}
        if objective != "mlm":
            entry["nsp_accuracy"] = summarise(runs, "nsp_accuracy")
        out["nsp"][objective] = entry
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "curriculum.json").write_text(json.dumps(out, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        colors = dict(zip(SCHEDULES, ["tab:blue", "tab:orange", "tab:green"]))
        for name, entry in out["schedules"].items():
            for i, r in enumerate(entry["runs"]):
                xs = [c["elapsed"] for c in r["curve"]]
                for ax, key in zip(axes, ("loss", "accuracy")):
                    ax.plot(xs, [c[key] for c in r["curve"]], color=colors[name], alpha=0.8, lw=1,
                            label=name if i == 0 else None)
        for ax, key in zip(axes, ("held-out masked loss (at 128)", "held-out masked accuracy (at 128)")):
            ax.set_xlabel("training time (s)")
            ax.set_ylabel(key)
            ax.legend()
        fig.suptitle(f"Sequence-length curriculum, BERT-mini on Shakespeare, {len(args.seeds)} seeds, {args.budget:g}s each")
        fig.tight_layout()
        fig.savefig(args.out / "curriculum.png", dpi=120)
    except ImportError:
        print("matplotlib is not installed: no plot")
    print("\nschedule          held-out loss (mean ± sd)   accuracy (mean ± sd)")
    for name, e in out["schedules"].items():
        print(f"{name:16s}  {e['loss']['mean']:.4f} ± {e['loss']['stdev']:.4f}        "
              f"{e['accuracy']['mean']:.4f} ± {e['accuracy']['stdev']:.4f}")
    for name, e in out["nsp"].items():
        nsp = f"   NSP accuracy {e['nsp_accuracy']['mean']:.4f}" if "nsp_accuracy" in e else ""
        print(f"{name:16s}  MLM accuracy {e['accuracy']['mean']:.4f} ± {e['accuracy']['stdev']:.4f}{nsp}")
    return out


if __name__ == "__main__":
    main()
