"""Model FLOPs and the machine's measured matmul peak, for model-FLOPs utilisation (MFU).

FLOPs of one training step (forward + backward = 3x forward; a multiply-add counts as 2):

    3 * [ B*T * L * (8*H^2 + 4*H*I + 4*T*H)      per token: Q, K, V, output projections; FFN; scores and AV
          + N_pred * (2*H^2 + 2*H*V) ]            the MLM head on the predicted positions only

ModernBERT: the GeGLU feed-forward is 6*H*I (its input projection is 2I wide), and a local layer's scores
and AV count the keys in its window, min(T, local_attention + 1), not T.

This is "6 x parameters x tokens" for the encoder's matrices, plus attention, plus the masked-only head:
the useful work of a step. Embedding lookups, norms and activations are not counted. The same formula is
used for every system compared, so MFU ratios equal throughput ratios.
"""

from __future__ import annotations

import functools
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from .config import ModelConfig
from .paths import atomic_write


def train_flops(cfg: ModelConfig, batch: int, seq_len: int, predicted: float) -> float:
    """FLOPs of one optimizer step over `batch` sequences of `seq_len` with `predicted` MLM positions."""
    H, I, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.vocab_size
    if cfg.arch == "modernbert":
        keys = sum(seq_len if i % cfg.global_every == 0 else min(seq_len, cfg.local_attention + 1) for i in range(L))
        per_token = L * (8 * H * H + 6 * H * I) + 4 * keys * H
    else:
        per_token = L * (8 * H * H + 4 * H * I + 4 * seq_len * H)
    head = predicted * (2 * H * H + 2 * H * V)
    return 3.0 * (batch * seq_len * per_token + head)


@functools.cache
def matmul_peak(device_type: str, dtype: torch.dtype = torch.bfloat16, size: int | None = None) -> float:
    """Measured FLOP/s of a large square matrix product on this device (median of several runs).

    Random inputs (zeros run faster than real data on some hardware). A few seconds on a CPU.
    """
    n = size or (8192 if device_type == "cuda" else 2048)
    device = torch.device(device_type)
    g = torch.Generator(device=device).manual_seed(0)  # its own generator: the run's RNG streams stay untouched
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    sync = torch.cuda.synchronize if device_type == "cuda" else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    reps = 10 if device_type == "cuda" else 5
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        sync()
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)


def device_name(device_type: str) -> str:
    if device_type == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def remembered_peak(device_type: str, dtype: torch.dtype, cache_dir: Path) -> tuple[float, bool]:
    """`matmul_peak` (at the current thread count), remembered per machine in CACHE/matmul_peak.json as the
    highest measurement so far: one taken while other processes keep the machine busy reads low, and an
    MFU against it high (a run measured 154%). Returns the peak and whether an earlier measurement set it."""
    key = f"{device_name(device_type)} | {dtype} | {torch.get_num_threads()} threads | torch {torch.__version__}"
    path = Path(cache_dir) / "matmul_peak.json"
    try:
        known = json.loads(path.read_text(encoding="utf-8"))
        known = known if isinstance(known, dict) else {}
        before = float(known.get(key, 0.0))
    except (OSError, ValueError, TypeError):
        known, before = {}, 0.0
    measured = matmul_peak(device_type, dtype)
    if measured > before:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, json.dumps({**known, key: measured}, indent=1) + "\n")
        except OSError:
            pass  # a read-only cache: the MFU is then against this run's own measurement
    return max(measured, before), before > measured
