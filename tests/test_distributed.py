"""Step 6: torchrun data parallelism on CPU (gloo), LAMB and the batch-size ramp."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env():
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}


def base_args(corpus: Path, out: Path, *extra: str) -> list[str]:
    return ["pretrain", "--train", str(corpus), "--out", str(out), "--model", "tiny", "--num-layers", "1",
            "--hidden-size", "32", "--num-heads", "2", "--intermediate-size", "64", "--vocab-size", "300",
            "--seq-len", "32", "--batch-size", "8", "--log-every", "1", "--eval-every", "10", "--eval-sequences", "16",
            "--precision", "fp32", "--no-sample", *extra]


def torchrun(n: int, args: list[str], **kw) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", f"--master-port={free_port()}",
           "-m", "maskedlm", *args]
    return subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=600, **kw)


def single(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "maskedlm", *args], env=env(), capture_output=True, text=True,
                          timeout=600)


def losses(run: Path, key: str = "loss") -> dict[int, float]:
    return {r["step"]: r[key] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "split" not in r}


@pytest.fixture(scope="module")
def corpus(corpus_dir):
    return corpus_dir  # 48 scenes in two files


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--grad-accum", "2"], ["--objective", "mlm+nsp", "--arch", "bert"], ["--parallel", "fsdp"],
                                   ["--parallel", "fsdp", "--grad-accum", "2"]],
                         ids=["ddp", "ddp-accumulation", "ddp-nsp", "fsdp", "fsdp-accumulation"])
def test_two_ranks_train_the_same_model_as_one_process_with_the_same_global_batch(tmp_path, corpus, extra):
    one = single(base_args(corpus, tmp_path / "one", "--max-steps", "20", *[e for e in extra if e not in ("--parallel", "fsdp")]))
    assert one.returncode == 0, one.stderr
    two = torchrun(2, base_args(corpus, tmp_path / "two", "--max-steps", "20", *extra))
    assert two.returncode == 0, two.stderr[-3000:]
    assert "x 2 ranks" in two.stdout
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == list(range(1, 21))
    assert max(abs(a[s] - b[s]) for s in a) < 1e-5
    if "--objective" in extra:
        na, nb = losses(tmp_path / "one", "nsp_loss"), losses(tmp_path / "two", "nsp_loss")
        assert max(abs(na[s] - nb[s]) for s in na) < 1e-5
    ea = json.loads((tmp_path / "one" / "eval.json").read_text())
    eb = json.loads((tmp_path / "two" / "eval.json").read_text())
    assert ea["predicted"] == eb["predicted"] and abs(ea["loss"] - eb["loss"]) < 1e-5


@pytest.mark.slow
def test_sigterm_to_torchrun_checkpoints_and_two_ranks_resume_exactly(tmp_path, corpus):
    """SIGTERM to the launcher mid-run: every rank stops at the same step and checkpoints; resuming on two
    ranks reproduces the uninterrupted run; resuming on one rank is refused unless allowed."""
    full = torchrun(2, base_args(corpus, tmp_path / "full", "--max-steps", "60"))
    assert full.returncode == 0, full.stderr[-2000:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master-port={free_port()}",
           "-m", "maskedlm", *base_args(corpus, tmp_path / "part", "--max-steps", "60", "--checkpoint-every", "0")]
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "part" / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 12):
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    # No rank crashes on its own way out (a rank other than 0 once did, logging rank 0's checkpoint). torchrun
    # itself may still SIGKILL a worker that outlives its shutdown grace period, which its peer then reports.
    assert "AttributeError" not in err and "NoneType" not in err, err[-3000:]
    stopped = max(losses(tmp_path / "part"))
    assert 12 <= stopped < 60, (stopped, err[-2000:])
    state = json.loads((tmp_path / "part" / "checkpoints" / f"step-{stopped:08d}" / "state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == stopped
    again = torchrun(2, ["pretrain", "--resume", str(tmp_path / "part")])
    assert again.returncode == 0, again.stderr[-2000:]
    a, b = losses(tmp_path / "full"), losses(tmp_path / "part")
    assert all(a[s] == b[s] for s in range(1, 61)), [(s, a[s], b[s]) for s in range(1, 61) if a[s] != b[s]][:3]
    refused = single(["pretrain", "--resume", str(tmp_path / "part"), "--max-steps", "80"])
    assert refused.returncode == 2 and "world size: 2 -> 1" in refused.stderr
    allowed = single(["pretrain", "--resume", str(tmp_path / "part"), "--max-steps", "80", "--allow-config-change"])
    assert allowed.returncode == 0, allowed.stderr
    assert max(losses(tmp_path / "part")) == 80


@pytest.mark.slow
def test_a_worker_that_dies_takes_the_job_down_and_the_run_resumes(tmp_path, corpus):
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master-port={port}",
           "-m", "maskedlm", *base_args(corpus, tmp_path / "r", "--max-steps", "100000", "--checkpoint-every", "20",
                                        "--dist-timeout", "30")]
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline and not (tmp_path / "r" / "checkpoints" / "latest").exists():
        time.sleep(0.1)
    assert (tmp_path / "r" / "checkpoints" / "latest").exists()
    workers = subprocess.run(["pgrep", "-f", "-P", str(proc.pid), "maskedlm"], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2, workers
    t0 = time.time()
    os.kill(int(workers[1]), signal.SIGKILL)
    try:
        proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the job hung after a worker died")
    assert proc.returncode != 0 and time.time() - t0 < 120
    last = max(losses(tmp_path / "r"))
    resumed = torchrun(2, ["pretrain", "--resume", str(tmp_path / "r"), "--max-steps", str(last + 20)])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming" in resumed.stdout


# -- LAMB and the batch-size ramp --------------------------------------------------------------------------


def test_lamb_update_rule_matches_a_reference_computation():
    import numpy as np

    from maskedlm.optim import Lamb

    torch.manual_seed(0)
    w0 = [torch.randn(5, 3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)]
    params = [w.clone().requires_grad_() for w in w0]
    opt = Lamb(params, lr=0.01, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1)
    ref_w = [w.numpy().copy() for w in w0]
    m = [np.zeros_like(w) for w in ref_w]
    v = [np.zeros_like(w) for w in ref_w]
    for t in range(1, 6):
        grads = [torch.randn_like(w) for w in w0]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        for i, g in enumerate(grads):
            g = g.numpy()
            m[i] = 0.9 * m[i] + 0.1 * g
            v[i] = 0.99 * v[i] + 0.01 * g * g
            u = (m[i] / (1 - 0.9**t)) / (np.sqrt(v[i] / (1 - 0.99**t)) + 1e-6) + 0.1 * ref_w[i]
            wn, un = np.linalg.norm(ref_w[i]), np.linalg.norm(u)
            trust = wn / un if wn > 0 and un > 0 else 1.0
            ref_w[i] = ref_w[i] - 0.01 * trust * u
        for p, r in zip(params, ref_w):
            np.testing.assert_allclose(p.detach().numpy(), r, rtol=1e-12, atol=1e-14)
    assert opt.state[params[0]]["step"] == 5


def test_batch_ramp_schedule():
    from maskedlm.config import BatchRamp
    from maskedlm.schedules import batch_at

    full, ramp = 64, BatchRamp.parse("8:0.5")
    assert (ramp.start, ramp.frac) == (8, 0.5)
    assert batch_at(0.0, full, None, 1) == 64
    assert [batch_at(p, full, ramp, 1) for p in (0.0, 0.25, 0.5, 0.9)] == [8, 36, 64, 64]
    # rounded down to whole units of ranks x micro-batches, never below one unit
    assert [batch_at(p, full, ramp, 16) for p in (0.0, 0.1, 0.25, 0.5)] == [16, 16, 32, 64]
    from maskedlm import UserError

    for bad in ["8", "0:0.1", "8:0", "8:1.5", "a:b"]:
        with pytest.raises(UserError, match="batch_ramp"):
            BatchRamp.parse(bad)


def test_training_with_lamb_and_a_batch_ramp(tmp_path, corpus):
    from maskedlm import pretrain

    from .conftest import tiny_config

    cfg = tiny_config(tmp_path, [str(corpus)], max_steps=20, log_every=1, eval_every=0, optimizer="lamb",
                      batch_ramp="2:0.5", precision="fp32")
    cfg.model.switch_arch("bert")
    res = pretrain(cfg, log=lambda *a: None, progress_bar=False)
    recs = [json.loads(line) for line in (res.run_dir / "metrics.jsonl").read_text().splitlines() if '"split"' not in line]
    tokens = [r["tokens"] for r in recs]
    per_step = [b - a for a, b in zip([0] + tokens, tokens)]
    assert per_step[0] == 2 * 32 and per_step[-1] == 8 * 32 and per_step == sorted(per_step)
    assert recs[-1]["loss"] < recs[0]["loss"]
    state = json.loads((res.run_dir / "eval.json").read_text())["train_state"]
    assert state["data_position"] == sum(per_step) // 32  # every sequence served once, none skipped


@pytest.mark.slow
def test_fsdp_checkpoint_resumes_exactly_and_loads_as_a_plain_model(tmp_path, corpus):
    from maskedlm import load

    full = torchrun(2, base_args(corpus, tmp_path / "full", "--max-steps", "30", "--parallel", "fsdp"))
    assert full.returncode == 0, full.stderr[-2000:]
    part = tmp_path / "part"
    cmd = base_args(corpus, part, "--max-steps", "30", "--parallel", "fsdp", "--checkpoint-every", "10")
    # stop after the step-20 checkpoint by resuming a run that was cut there: train 20 steps of the same schedule
    first = torchrun(2, [*cmd, "--time-budget", "1000000"])  # the same schedule (max_steps 30) ...
    assert first.returncode == 0, first.stderr[-2000:]
    import shutil

    shutil.rmtree(part / "checkpoints" / "step-00000030")  # ... as if it had died after step 20
    (part / "checkpoints" / "latest").write_text("step-00000020\n")
    again = torchrun(2, ["pretrain", "--resume", str(part)])
    assert again.returncode == 0, again.stderr[-2000:]
    a, b = losses(tmp_path / "full"), losses(part)
    assert all(a[s] == b[s] for s in range(1, 31))
    model, _ = load(part)  # the saved weights are whole, not shards
    assert model.bert.embeddings.word.weight.shape == (300, 32)


# Two ranks, bf16 compute copy, two micro-batches: every micro-batch's gradient must reach every rank (the
# compute copy's gradients are moved into the fp32 master gradients after each micro-batch, so a no_sync()
# micro-batch would leave its gradient local to its rank).
ACCUMULATION_SCRIPT = """
import sys, torch, torch.distributed as dist
from maskedlm.config import ModelConfig
from maskedlm.distributed import Dist, parallelize
from maskedlm.masking import MaskSpec
from maskedlm.model import BertForPreTraining
from maskedlm.step import TrainStep

def model_and_step(d):
    torch.manual_seed(0)
    cfg = ModelConfig(arch="bert", preset=None, num_layers=1, hidden_size=32, num_heads=2, intermediate_size=64, vocab_size=50,
                      hidden_dropout=0.0, attention_dropout=0.0)
    model = BertForPreTraining(cfg)
    # Plain SGD: the update is linear in the gradient, so a wrong gradient cannot hide behind Adam's scaling.
    par = parallelize(model, d, amp_dtype=torch.bfloat16)
    step = TrainStep(par, torch.optim.SGD(model.parameters(), lr=0.5), MaskSpec(4, 50, (0, 1, 2, 3, 4)),
                     torch.Generator().manual_seed(0), grad_accum=2)
    return model, step

def flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])

batches = [torch.randint(5, 50, (8, 16), generator=torch.Generator().manual_seed(s)) for s in range(3)]
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
model, step = model_and_step(Dist(rank, world))
for ids in batches:
    step(ids.chunk(world)[rank])
mine = flat(model)
gathered = [torch.empty_like(mine) for _ in range(world)]
dist.all_gather(gathered, mine)
assert torch.equal(gathered[0], gathered[1]), "the ranks' weights differ"
if rank == 0:
    torch.save(mine, sys.argv[1])
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_bf16_gradient_accumulation_reaches_every_rank(tmp_path):
    script = tmp_path / "accumulate.py"
    script.write_text(ACCUMULATION_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master-port={free_port()}",
           str(script), str(tmp_path / "two.pt")]
    res = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    two = torch.load(tmp_path / "two.pt", weights_only=True)
    # The same three steps in one process with the whole batch.
    from maskedlm.distributed import Dist

    namespace: dict = {}
    exec(ACCUMULATION_SCRIPT.split("batches = ")[0], namespace)
    model, step = namespace["model_and_step"](Dist())
    for s in range(3):
        step(torch.randint(5, 50, (8, 16), generator=torch.Generator().manual_seed(s)))
    one, start = namespace["flat"](model), namespace["flat"](namespace["model_and_step"](Dist())[0])
    # bf16 compute sums in another order, so not bit for bit: the two runs' difference is a small fraction of
    # what training changed (a micro-batch's gradient left on one rank makes it a large one).
    assert (one - two).norm() < 0.02 * (one - start).norm()
