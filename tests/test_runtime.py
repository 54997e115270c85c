"""Step 13: training under load. PyTorch's OpenMP workers spin-wait, so more threads than free CPUs made
training steps 17x slower instead of 2x (benchmarks/under_load.py); a run follows the CPUs other processes
leave free."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from maskedlm import pretrain
from maskedlm.runtime import CpuLoad, Threads, available_cpus, threads_for

from .conftest import tiny_config


@pytest.mark.parametrize("available, others, threads", [
    (2, 0.0, 2), (2, 0.4, 2), (2, 0.6, 1), (2, 1.0, 1), (2, 1.9, 1), (2, 7.0, 1), (16, 3.2, 13), (16, 0.0, 16)])
def test_threads_follow_the_cpus_others_leave_free(available, others, threads):
    assert threads_for(available, others) == threads


def test_a_container_quota_is_the_limit_and_the_hosts_free_cpus_the_bound():
    assert threads_for(4, 40.0, cpus=64) == 4  # other containers' load on a big host leaves room for the quota
    assert threads_for(4, 62.2, cpus=64) == 2
    assert threads_for(4, 64.0, cpus=64) == 1


def test_available_cpus_is_what_this_process_may_use():
    n = available_cpus()
    assert 1 <= n <= len(os.sched_getaffinity(0))


def spin(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="reads /proc/stat")
def test_cpu_load_counts_other_processes_and_not_this_one():
    load = CpuLoad()
    spin(0.6)  # this process's own work is not load
    assert load.others() < 0.5
    busy = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 3: pass"])
    try:
        time.sleep(0.5)
        load.others()
        time.sleep(1.0)
        assert load.others() > 0.6  # another process spinning on one CPU
    finally:
        busy.kill()
        busy.wait()


class FakeLoad:
    def __init__(self, readings):
        self.readings = list(readings)

    def others(self):
        return self.readings.pop(0)


@pytest.fixture
def set_threads(monkeypatch):
    """torch.set_num_threads recorded, not applied (the test process keeps its threads)."""
    calls, count = [], [torch.get_num_threads()]
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (calls.append(n), count.__setitem__(0, n)))
    monkeypatch.setattr(torch, "get_num_threads", lambda: count[0])
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    return calls


def test_a_run_steps_down_under_load_and_back_up_after_two_readings(set_threads):
    logs = []
    g = Threads(None, torch.device("cpu"), log=logs.append, every=0)
    g.available = g.cpus = g.count = 4
    g.load = FakeLoad([3.1, 0.2, 3.0, 3.2, 0.1, 0.0])
    g.check()  # one busy reading: wait for a second
    g.check()  # the load went away: nothing to confirm
    g.check()
    assert set_threads == [] and g.count == 4
    g.check()  # two in a row: 4 -> 1
    assert set_threads == [1] and g.count == 1 and "4 -> 1 thread(s)" in logs[-1]
    g.check()
    g.check()  # quiet twice: back to 4
    assert set_threads == [1, 4] and g.count == 4


def test_a_fixed_count_is_applied_and_not_governed(set_threads):
    logs = []
    g = Threads(3, torch.device("cpu"), log=logs.append, every=0)
    g.start(sample=0.05)
    assert set_threads == [3] and g.load is None
    g.check()
    assert set_threads == [3]
    g.restore()
    assert set_threads[-1] == g.initial


def test_omp_num_threads_in_the_environment_is_a_fixed_count(set_threads, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # torchrun's default for several ranks, or the user's
    g = Threads(None, torch.device("cpu"), every=0)
    assert g.fixed == 1 and g.load is None


def test_an_oversubscribed_fixed_count_is_warned_about(set_threads, monkeypatch):
    import maskedlm.runtime as rt

    monkeypatch.setattr(rt, "CpuLoad", lambda: FakeLoad([None, 2.0]))
    logs = []
    g = Threads(2, torch.device("cpu"), log=logs.append, every=0)
    g.available = g.cpus = 2
    g.start(sample=0.01)
    assert len(logs) == 1 and "expect training many times slower" in logs[0]


def test_a_run_started_under_load_takes_the_free_cpus_and_says_so(set_threads, monkeypatch):
    import maskedlm.runtime as rt

    monkeypatch.setattr(rt, "CpuLoad", lambda: FakeLoad([None, 1.0]))
    logs = []
    g = Threads(None, torch.device("cpu"), log=logs.append, every=0)
    g.available = g.cpus = 2
    assert g.start(sample=0.01) == 1 and g.loaded_at_start
    assert set_threads == [1] and "training on 1 thread(s)" in logs[0]


def test_a_run_sets_its_thread_count_and_gives_the_callers_back(tmp_path, corpus_dir):
    before = torch.get_num_threads()
    seen = []
    cfg = tiny_config(tmp_path, [str(corpus_dir)], max_steps=2, threads=1, eval_every=0)
    pretrain(cfg, log=lambda *a: seen.append(torch.get_num_threads()), progress_bar=False)
    assert 1 in seen and torch.get_num_threads() == before


def test_the_matmul_peak_is_the_highest_measured_on_this_machine(tmp_path):
    """A peak measured while the machine was busy reads low (a run's MFU read 154%): the highest one is kept."""
    import json

    from maskedlm.flops import remembered_peak

    measured, earlier = remembered_peak("cpu", torch.float32, tmp_path)
    assert measured > 1e8 and not earlier
    (key, value), = json.loads((tmp_path / "matmul_peak.json").read_text()).items()
    assert value == measured and "threads" in key
    (tmp_path / "matmul_peak.json").write_text(json.dumps({key: 10 * measured}))
    assert remembered_peak("cpu", torch.float32, tmp_path) == (10 * measured, True)
    (tmp_path / "matmul_peak.json").write_text("not json")  # a damaged cache is measured over
    assert remembered_peak("cpu", torch.float32, tmp_path) == (measured, False)


@pytest.mark.parametrize("files, cpus", [
    ({"cpu.max": "100000 100000\n"}, 1),  # cgroup v2: one CPU
    ({"cpu.max": "40000 100000\n"}, 1),  # 0.4 of a CPU: still one thread
    ({"cpu.max": "max 100000\n"}, None),  # no quota
    ({"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1),  # cgroup v1
    ({"cpu,cpuacct/cpu.cfs_quota_us": "-1\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}, None),
    ({}, None),
])
def test_a_containers_cpu_quota_caps_the_cpus(tmp_path, files, cpus):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    mine = len(os.sched_getaffinity(0))
    assert available_cpus(str(tmp_path)) == (mine if cpus is None else min(mine, cpus))
