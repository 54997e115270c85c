"""Device and precision choices, made once and in one place."""

from __future__ import annotations

import contextlib
import functools
import math
import os
import platform
import time
from pathlib import Path

import torch

from .errors import UserError


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda if present, else mps, else cpu. An explicit device that is absent is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for, but this PyTorch sees no CUDA GPU")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"device {name!r} asked for, but only {torch.cuda.device_count()} CUDA GPU(s) exist")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("device 'mps' asked for, but this PyTorch sees no Apple GPU")
    return dev


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """True on CPUs with bf16 matrix instructions (AMX or AVX512-BF16), where bf16 autocast pays off."""
    if platform.system() != "Linux":
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32."""
    if precision == "fp32":
        return None
    supported = (device.type == "cuda" and torch.cuda.is_bf16_supported()) or device.type == "cpu"
    if precision == "bf16":
        if not supported:
            raise UserError(f"bf16 autocast is not supported on {device}; use --precision fp32")
        return torch.bfloat16
    # auto: bf16 where it is fast, fp32 elsewhere (bf16 on a CPU without bf16 units is slower than fp32).
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if device.type == "cpu" and cpu_has_fast_bf16():
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# -- CPU threads ------------------------------------------------------------------------------------------
#
# PyTorch's CPU kernels run on an OpenMP pool (GNU libgomp in the Linux wheels) whose idle workers spin
# before they sleep. With more runnable threads than CPUs (one other PyTorch process on a 2-CPU machine),
# the spinning workers take turns burning the CPU their peers need: training steps were measured 17.7x
# slower, not 2x (benchmarks/under_load.py, BENCHMARKS.md "Training under load"). One thread per CPU that
# other processes leave free avoids that: two runs on 2 CPUs with one thread each take ~2x, as they should.


def available_cpus(cgroup: str = "/sys/fs/cgroup") -> int:
    """CPUs this process may use: its affinity mask, capped by a container's CPU quota (cgroup v2's cpu.max,
    or v1's cpu.cfs_quota_us / cpu.cfs_period_us), rounded to whole CPUs."""
    n = affinity_cpus()
    quota = _cgroup_quota(Path(cgroup))
    if quota is not None:
        n = min(n, max(1, round(quota)))
    return max(1, n)


def _cgroup_quota(root: Path) -> float | None:
    """The CPU quota in CPUs, or None when there is none (or no cgroup file says)."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]  # v2: "max 100000" or "200000 100000"
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    for v1 in (root / "cpu", root / "cpu,cpuacct"):
        try:
            quota, period = int((v1 / "cpu.cfs_quota_us").read_text()), int((v1 / "cpu.cfs_period_us").read_text())
            return None if quota <= 0 or period <= 0 else quota / period  # v1: -1 means no quota
        except (OSError, ValueError):
            continue
    return None


def threads_for(available: int, others_busy: float, cpus: int | None = None) -> int:
    """Threads for this process when other processes keep `others_busy` of the `cpus` it may run on busy
    (default: `available`, which a container's quota can make fewer than `cpus`): the CPUs left, rounded (a
    CPU half-used by others counts as taken), at most `available`, at least one."""
    free = (cpus or available) - others_busy
    return max(1, min(available, math.floor(free + 0.5)))


def affinity_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class CpuLoad:
    """How many CPUs (of those this process may run on) other processes kept busy since the last reading:
    busy time from /proc/stat minus this process's own CPU time. None where /proc/stat is absent."""

    def __init__(self):
        self.cpus = {f"cpu{i}" for i in os.sched_getaffinity(0)} if hasattr(os, "sched_getaffinity") else set()
        self.last = self._read()

    def _read(self) -> tuple[float, float, float] | None:
        try:
            with open("/proc/stat") as f:
                lines = [line.split() for line in f if line.startswith("cpu") and not line.startswith("cpu ")]
        except OSError:
            return None
        busy = 0
        for name, *fields in lines:
            if name in self.cpus:
                v = [int(x) for x in fields[:8]]  # user nice system idle iowait irq softirq steal
                busy += sum(v) - v[3] - v[4]
        own = sum(os.times()[:2])  # this process's user + system seconds, all its threads
        return time.monotonic(), busy / os.sysconf("SC_CLK_TCK"), own

    def others(self) -> float | None:
        now = self._read()
        if now is None or self.last is None or now[0] - self.last[0] < 0.05:
            return None
        (t0, busy0, own0), (t1, busy1, own1) = self.last, now
        self.last = now
        return max(0.0, ((busy1 - busy0) - (own1 - own0)) / (t1 - t0))


class Threads:
    """PyTorch's CPU thread count for a run: fixed by --threads, or (the default) one per available CPU that
    other processes leave free, re-checked every `every` seconds so that a run started on a quiet machine
    steps down when another job starts, and back up when it ends. A change waits for two readings in a row
    (one busy moment is not load). Inert on accelerators' hosts: only CPU training is governed."""

    def __init__(self, fixed: int | None, device: torch.device, log=print, every: float = 5.0, local_world: int = 1):
        self.log, self.every = log, every
        # An explicit OMP_NUM_THREADS (the user's, or torchrun's default of 1 for several ranks) is a fixed count.
        env = os.environ.get("OMP_NUM_THREADS", "")
        self.fixed = fixed if fixed is not None else (int(env) if env.isdigit() and int(env) > 0 else None)
        self.active = device.type == "cpu"
        self.available = max(1, available_cpus() // local_world)  # ranks on one machine share its CPUs
        self.cpus = affinity_cpus()  # where /proc/stat's load is read (a quota-limited container: the host's)
        self.load = CpuLoad() if self.active and self.fixed is None else None
        self.pending: int | None = None
        self.checked = time.monotonic()
        self.count = self.initial = torch.get_num_threads()
        self.loaded_at_start = False

    def start(self, sample: float = 0.3) -> int:
        """Choose the thread count now (watching the machine for `sample` seconds) and apply it."""
        if not self.active:
            return self.count
        if self.fixed is not None:
            self._apply(self.fixed)
            if self.fixed == 1:  # one thread cannot oversubscribe: nothing to warn about
                return self.count
            others = self._others_after(sample)
            if others is not None and self.fixed > threads_for(self.available, others, self.cpus):
                self.log(f"warning: other processes keep ~{others:.1f} of {self.available} CPUs busy and the thread "
                         f"count is fixed at {self.fixed} (--threads or OMP_NUM_THREADS): expect training many times "
                         f"slower than alone (OpenMP threads spin-wait for CPUs they do not get); leave both unset to "
                         f"follow the load")
            return self.count
        others = self._others_after(sample)
        target = self.available if others is None else threads_for(self.available, others, self.cpus)
        self.loaded_at_start = target < self.available
        self._apply(target)
        if self.loaded_at_start:
            self.log(f"warning: other processes keep ~{others:.1f} of {self.available} CPUs busy: training on "
                     f"{target} thread(s) until they finish (--threads N fixes the count)")
        return self.count

    def check(self) -> None:
        """Called every step; every `every` seconds, follow the load (auto mode only)."""
        if self.load is None or time.monotonic() - self.checked < self.every:
            return
        self.checked = time.monotonic()
        others = self.load.others()
        if others is None:
            return
        target = threads_for(self.available, others, self.cpus)
        if target == self.count:
            self.pending = None
        elif target != self.pending:
            self.pending = target  # confirm on the next reading
        else:
            self.pending = None
            old = self._apply(target)
            self.log(f"note: other processes keep ~{others:.1f} of {self.available} CPUs busy: {old} -> {target} "
                     f"thread(s)")

    def restore(self) -> None:
        """The process's thread count as it was before `start` (a library caller's setting stays theirs)."""
        if self.active:
            self._apply(self.initial)

    @contextlib.contextmanager
    def every_cpu(self):
        """All available CPUs for a moment (the machine's matmul peak is measured on all of them)."""
        old = self._apply(self.available) if self.active else None
        try:
            yield
        finally:
            if old is not None:
                self._apply(old)

    def _others_after(self, seconds: float) -> float | None:
        load = self.load or CpuLoad()
        load.others()
        time.sleep(seconds)
        return load.others()

    def _apply(self, n: int) -> int:
        old, self.count = self.count, n
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
        return old
