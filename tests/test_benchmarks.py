"""The benchmark scripts run (on tiny shapes), and the GPU script refuses cleanly without a GPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: gpu.sh would run for real")
def test_gpu_script_refuses_without_cuda(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), str(tmp_path / "out")], capture_output=True,
                         text=True, env=env, timeout=120)
    assert res.returncode == 3
    assert res.stderr.strip().splitlines() == [
        f"gpu.sh: error: no CUDA GPU visible to PyTorch ({sys.executable}); nothing was measured"]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_gpu_check_logic_runs_on_cpu(tmp_path):
    pytest.importorskip("transformers")
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), str(tmp_path), "--allow-cpu",
                          "--no-compile"], capture_output=True, text=True, timeout=900,
                         env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["correctness_ok"] is True
    systems = {(r["seq"], r["system"]) for r in summary["rows"]}
    assert {(128, "maskedlm"), (128, "transformers-sdpa"), (512, "maskedlm")} <= systems
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu_measured"] < 1 for r in summary["rows"])
    assert res.stdout.strip().splitlines()[-1].startswith(" 512")  # the table prints last
