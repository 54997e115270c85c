"""Training under load: why two PyTorch processes on a small machine ran far slower than 2x, and what helps.

Each scenario starts real `maskedlm pretrain` runs at once (the default model and data, no evaluation, no
checkpoints) and reads the step times from their metrics.jsonl (the first records, which include the
start-up skew between the runs, are dropped). What varies is each run's environment and --threads:

    alone           one run, default threads (one per free CPU)
    alone-passive   one run, OMP_WAIT_POLICY=PASSIVE (OpenMP workers sleep at once instead of spinning)
    two-fixed       two runs, --threads 2 each (PyTorch's default: one thread per CPU): 2x oversubscribed
    two-passive     two runs, --threads 2 and OMP_WAIT_POLICY=PASSIVE
    two-spin10k     two runs, --threads 2 and GOMP_SPINCOUNT=10000 (shorter spinning)
    two-1thread     two runs, --threads 1 each
    two-auto        two runs, default threads (maskedlm follows the load: each steps down to one thread)
    mixed           a run with --threads 2 (as any other PyTorch job) beside one with default threads

    python benchmarks/under_load.py --out benchmarks/results/under_load.json

Run it alone on the machine: it *is* the load. On a machine with more CPUs, 2 becomes the CPU count.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from maskedlm.flops import device_name
from maskedlm.runtime import available_cpus

# name -> one (extra environment, extra flags) per concurrent run
ALL = str(len(os.sched_getaffinity(0)))
PASSIVE = {"OMP_WAIT_POLICY": "PASSIVE"}
SCENARIOS = {
    "alone": [({}, [])],
    "alone-passive": [(PASSIVE, [])],
    "two-fixed": [({}, ["--threads", ALL])] * 2,
    "two-passive": [(PASSIVE, ["--threads", ALL])] * 2,
    "two-spin10k": [({"GOMP_SPINCOUNT": "10000"}, ["--threads", ALL])] * 2,
    "two-1thread": [({}, ["--threads", "1"])] * 2,
    "two-auto": [({}, [])] * 2,
    "mixed": [({}, ["--threads", ALL]), ({}, [])],
}


def run_scenario(name: str, steps: int, skip: int, work: Path) -> dict:
    procs, outs = [], []
    for i, (env_extra, flags) in enumerate(SCENARIOS[name]):
        env = {**os.environ, **env_extra}
        out = work / f"{name}-{i}-{time.time_ns()}"
        outs.append(out)
        cmd = [sys.executable, "-m", "maskedlm", "pretrain", "--out", str(out), "--max-steps", str(steps),
               "--log-every", "5", "--eval-every", "0", "--eval-seconds", "0", "--checkpoint-every", "0",
               "--checkpoint-minutes", "0", "--no-sample", "--no-probe", "--no-plot", "--cache-dir", str(work / "cache"),
               *flags]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    t0 = time.time()
    errs = [p.communicate()[1] for p in procs]
    wall = time.time() - t0
    step_ms, mfu = [], []
    for out, p, err in zip(outs, procs, errs):
        if p.returncode != 0:
            raise SystemExit(f"{name}: a run failed:\n{err[-2000:]}")
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in records if "split" not in r and r["step"] > skip]
        step_ms.append(statistics.median(r["step_ms"] for r in train))
        mfu.append(statistics.median(r["mfu"] for r in train))
    return {"scenario": name, "runs": [{"env": e, "flags": f} for e, f in SCENARIOS[name]], "wall_s": round(wall, 1),
            "step_ms_per_run": [round(x, 1) for x in step_ms], "step_ms": round(statistics.mean(step_ms), 1),
            "live_mfu": [round(x, 3) for x in mfu]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--skip", type=int, default=15, help="steps dropped at the start of each run")
    ap.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        # Warm the token cache once, so no scenario pays for tokenising.
        subprocess.run([sys.executable, "-m", "maskedlm", "prepare", "--cache-dir", str(work / "cache")],
                       check=True, stdout=subprocess.DEVNULL)
        rows = []
        for name in args.scenarios:
            row = run_scenario(name, args.steps, args.skip, work)
            print(json.dumps(row), flush=True)
            rows.append(row)
    alone = next((r["step_ms"] for r in rows if r["scenario"] == "alone"), None)
    if alone:
        for r in rows:
            r["slowdown_vs_alone"] = round(r["step_ms"] / alone, 2)
            print(f"{r['scenario']:12s} {r['step_ms']:8.1f} ms/step  {r['slowdown_vs_alone']:5.2f}x alone")
    result = {"cpu": device_name("cpu"), "cpus_available": available_cpus(), "date": datetime.date.today().isoformat(),
              "steps": args.steps, "rows": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
