"""Attention alone on CPU in bf16, forward + backward: PyTorch's SDPA against explicit matmul attention,
whole and in chunks of queries (what maskedlm.model._matmul_attention does past ATTENTION_CHUNK_SCORES).

    python benchmarks/attention.py --seq 512 1024 2048 --out benchmarks/results/attention_cpu.json

Interleaved repetitions, medians. Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from maskedlm.flops import device_name
from maskedlm.model import _attend


def chunked(c: int):
    def run(q, k, v):
        return torch.cat([_attend(q[..., i:i + c, :], k, v, None, 0.0) for i in range(0, q.shape[-2], c)], dim=-2)
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, nargs="+", default=[512, 1024, 2048])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    systems = {"sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
               "matmul whole": lambda q, k, v: _attend(q, k, v, None, 0.0),
               "matmul, 256-query chunks": chunked(256), "matmul, 128-query chunks": chunked(128),
               "matmul, 64-query chunks": chunked(64)}
    rows = []
    for T in args.seq:
        torch.manual_seed(0)
        q, k, v = (torch.randn(args.batch, args.heads, T, args.head_dim, dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        g = torch.randn_like(q)
        times: dict[str, list[float]] = {name: [] for name in systems}
        for r in range(args.reps + 1):  # the first round warms up
            for name in (list(systems) if r % 2 else list(systems)[::-1]):
                t0 = time.perf_counter()
                systems[name](q, k, v).backward(g)
                if r:
                    times[name].append(time.perf_counter() - t0)
        row = {"seq": T, "ms": {name: round(1e3 * statistics.median(t), 2) for name, t in times.items()}}
        rows.append(row)
        print(f"T={T}: " + ", ".join(f"{name} {ms:.1f} ms" for name, ms in row["ms"].items()), flush=True)
    result = {"cpu": device_name("cpu"), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "date": datetime.date.today().isoformat(), "shape": [args.batch, args.heads, "T", args.head_dim],
              "what": "forward + backward, bf16, no mask", "rows": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
