"""Recipe screen by optimizer steps, many runs at once on one GPU (a fast proxy for benchmarks/recipes.py).

On 2 CPU cores the default 300 s run gets ~1,700 steps of the mini model at batch 32, so a recipe helps the
default run only if it leaves the MLM plateau within ~1,000 steps. This runs `maskedlm pretrain` for each
variant with the LR schedule over a fixed step count, several processes at once on the GPU, and reports
held-out accuracy (BERT's standard 15% masks, fixed) at each evaluation. Steps are not seconds: a variant
that changes the step's cost (batch size, model shape) is given the steps that match the CPU's time.

    python benchmarks/gpu_screen.py OUT.json [--steps 1500] [--parallel 8]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMMON = ["--eval-every", "250", "--log-every", "50", "--checkpoint-every", "0", "--no-sample", "--device", os.environ.get("SCREEN_DEVICE", "cuda")]
UNI = ["--mlm-bias-init", "unigram"]
# name -> (extra flags, step multiplier for equal CPU time)
VARIANTS = {
    "base": ([], 1),
    "uni": (UNI, 1),
    "uni-lr2e-3": (UNI + ["--lr", "2e-3"], 1),
    "uni-lr3e-3": (UNI + ["--lr", "3e-3"], 1),
    "uni-lr5e-3-w0.2": (UNI + ["--lr", "5e-3", "--warmup-frac", "0.2"], 1),
    "mask0.3": (["--mask-prob", "0.3"], 1),
    "uni-lr2e-3-mask0.4": (UNI + ["--lr", "2e-3", "--mask-prob", "0.4"], 1),
    "uni-lr2e-3-sinus": (UNI + ["--lr", "2e-3", "--position-init", "sinusoidal"], 1),
    "uni-lr2e-3-wsd": (UNI + ["--lr", "2e-3", "--schedule", "wsd"], 1),
    "uni-lr3e-3-mask0.3-sinus": (UNI + ["--lr", "3e-3", "--mask-prob", "0.3", "--position-init", "sinusoidal"], 1),
    "b16": (["--batch-size", "16"], 2),
    "b16-uni-lr2e-3": (UNI + ["--batch-size", "16", "--lr", "2e-3"], 2),
    "tiny": (["--model", "tiny"], 3),
    "tiny-uni-lr3e-3": (UNI + ["--model", "tiny", "--lr", "3e-3"], 3),
    "uni-lr2e-3-beta2-0.95": (UNI + ["--lr", "2e-3", "--adam-beta2", "0.95"], 1),
    "uni-lr2e-3-seq64": (UNI + ["--lr", "2e-3", "--seq-len", "64", "--batch-size", "64"], 1),
}


def accuracies(run: Path) -> dict[int, float]:
    out = {}
    if (run / "metrics.jsonl").exists():
        for line in (run / "metrics.jsonl").read_text().splitlines():
            r = json.loads(line)
            if r.get("split") == "valid":
                out[r["step"]] = r["accuracy"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--parallel", type=int, default=8)
    ap.add_argument("--only", nargs="*", help="variant names (default: all)")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="gpu-screen-"))
    env = {**os.environ, "OMP_NUM_THREADS": "2", "MASKEDLM_CACHE": str(work / "cache")}
    base = [sys.executable, "-m", "maskedlm", "pretrain", *COMMON]
    # Prepare the embedded corpus once, so the parallel runs only read the cache.
    subprocess.run(base + ["--max-steps", "1", "--out", str(work / "prep")], env=env, check=True, capture_output=True)
    todo = [n for n in VARIANTS if not args.only or n in args.only]
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    done: dict[str, dict] = {}
    while todo or running:
        while todo and len(running) < args.parallel:
            name = todo.pop(0)
            flags, mult = VARIANTS[name]
            cmd = base + ["--max-steps", str(args.steps * mult), "--out", str(work / name), *flags]
            running[name] = (subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True),
                             time.time())
        for name, (proc, t0) in list(running.items()):
            if proc.poll() is not None:
                err = proc.stderr.read()[-500:] if proc.returncode else ""
                done[name] = {"flags": VARIANTS[name][0], "steps": args.steps * VARIANTS[name][1],
                              "returncode": proc.returncode, "error": err, "wall_s": time.time() - t0,
                              "accuracy_by_step": accuracies(work / name)}
                del running[name]
        time.sleep(0.5)
    args.out.write_text(json.dumps({"steps": args.steps, "variants": done}, indent=2))
    print(f"{'variant':28s} " + " ".join(f"{f'{q}%':>6s}" for q in (25, 50, 75, 100)) + "  (held-out accuracy at that % of the run)")
    for name, r in done.items():
        acc = r["accuracy_by_step"]
        steps = sorted(acc)
        cells = []
        for q in (25, 50, 75, 100):
            s = min(steps, key=lambda x: abs(x - r["steps"] * q / 100)) if steps else None
            cells.append(f"{100 * acc[s]:6.2f}" if s is not None and acc[s] is not None else "     -")
        print(f"{name:28s} " + " ".join(cells) + (f"  FAILED {r['error'][-120:]!r}" if r["returncode"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
