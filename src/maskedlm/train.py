"""Pre-training: the loop.

`build_run` (run.py) assembles the run; each iteration takes the next batch (feed.py), runs one optimizer
step (step.py) at the scheduled learning rate (schedules.py), and logs (metrics.py), evaluates on the
fixed held-out masks and checkpoints (checkpoint.py) when due. At the end the run writes its artifacts
(artifacts.py). SIGTERM / SIGINT finish the current step, checkpoint and stop.
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import distributed
from .artifacts import write_artifacts
from .config import Config
from .errors import UserError
from .evaluate import EvalResult
from .data import cache_root
from .flops import remembered_peak
from .metrics import MetricsLog, Window
from .progress import Progress
from .run import Run, build_run
from .runtime import Threads, resolve_device
from .schedules import progress, train_lr


@dataclass
class RunResult:
    run_dir: Path
    eval: EvalResult | None  # None when stopped by a signal
    steps: int
    elapsed: float
    tokens_per_second: float
    stopped_by: str | None = None  # 'SIGTERM' or 'SIGINT' when a signal ended the run early
    checkpoint: Path | None = None


def pretrain(cfg: Config, log=print, progress_bar: bool | None = None) -> RunResult:
    """Pre-train a model as configured (or resume one); returns the run folder and final held-out metrics.

    Under torchrun every rank calls this; rank 0 logs and writes the run folder."""
    cfg = cfg.resolved()
    device = resolve_device(cfg.train.device)
    started_group = not torch.distributed.is_initialized()
    d = distributed.init(device.type, cfg.train.dist_timeout)
    try:
        if device.type == "cuda" and d.active:
            device = torch.device("cuda", d.local_rank)
        run = build_run(cfg, device, d, log if d.is_main else (lambda *a, **k: None))
        try:
            return train(run, progress_bar if d.is_main else False)
        finally:
            run.lock.release()  # the run folder's one writer is done
    finally:
        if started_group:
            distributed.shutdown()


def train(run: Run, progress_bar: bool | None = None) -> RunResult:
    run.log(run.describe())
    threads = Threads(run.cfg.train.threads, run.device, run.log, local_world=run.dist.local_world)
    threads.start()
    try:
        return _train(run, threads, progress_bar)
    finally:
        threads.restore()


def _train(run: Run, threads: Threads, progress_bar: bool | None) -> RunResult:
    t, state, d = run.cfg.train, run.state, run.dist
    if t.compile:
        secs = 0.0
        for i, (n, _) in enumerate(run.feed.phases):  # each phase as it will run (its rotary base too)
            run.set_phase(i)
            secs += run.step.compile_now(run.feed.phase_batch(n), n)
        run.set_phase(state.phase)
        run.log(f"compiled the encoder in {secs:.1f}s (not counted as training time)")
    with threads.every_cpu():  # for MFU (flops.py): the machine's peak, whatever this run may use of it
        peak, remembered = remembered_peak(run.device.type, run.amp_dtype or torch.float32, cache_root(run.cfg.data))
    peak *= d.world
    if threads.loaded_at_start and not remembered:
        run.log("note: the matmul peak was measured while other processes were busy; MFU reads high")
    metrics = MetricsLog(run.dir, d.is_main, t.tensorboard, from_step=state.step, reevaluate=progress(state, t) >= 1.0)
    window = Window(run.cfg.model)
    bar = Progress(1000, "training", enabled=progress_bar)
    failed, last_save, evaluated_at = 0, time.time(), state.elapsed
    try:
        with StopSignals() as stop:
            stopping = lambda: stop.agreed(d, run.device)  # noqa: E731 - asked between evaluation batches too
            while progress(state, t) < 1.0 and not stopping():
                threads.check()
                t0 = time.perf_counter()
                lr = train_lr(state, t)
                batch, position = run.feed.next(state, run.log)
                run.set_phase(state.phase)
                t_data = time.perf_counter() - t0
                stats = run.step(batch.to(run.device, non_blocking=True), lr)
                B, T = batch.input_ids.shape
                state.step, state.tokens, state.data_position = state.step + 1, state.tokens + B * T * d.world, position
                state.elapsed += time.perf_counter() - t0
                if stats.skipped:
                    failed = _skipped_step(run, failed + 1)
                    continue
                failed = 0
                window.add(stats, time.perf_counter() - t0, t_data, B, T, d.world)
                done = progress(state, t) >= 1.0
                if state.step % t.log_every == 0 or done:
                    entry = window.record(state, lr, stats, peak, run.feed.epoch, T)
                    metrics.write(entry)
                    bar.set(int(1000 * min(progress(state, t), 1.0)), _progress_line(entry, state, t))
                    window = Window(run.cfg.model)
                if done:
                    break
                if ((t.eval_every and state.step % t.eval_every == 0)
                        or (t.eval_seconds and state.elapsed - evaluated_at >= t.eval_seconds)):
                    if (result := run.evaluate(stop=stopping)) is None:
                        break  # a signal during the evaluation: checkpoint and stop without its numbers
                    metrics.write_eval(state, result)
                    evaluated_at = state.elapsed
                if _checkpoint_due(state, t, last_save):
                    run.checkpointer.save(state)
                    last_save = time.time()
            bar.close()
            if stop.signal is None:  # the final checkpoint first: a kill during the final evaluation loses nothing
                _save_final(run)
                evaluating = Progress(len(run.evaluator.batches) + len(run.evaluator.pair_batches), "final evaluation",
                                      unit="batch", enabled=progress_bar)
                last_eval = run.evaluate(stop=stopping, progress=evaluating)
                evaluating.close()
                if last_eval is not None:
                    metrics.write_eval(state, last_eval)
    finally:
        run.feed.close()
        bar.close()
        metrics.close()
    if stop.signal is not None:
        return _stopped(run, signal.Signals(stop.signal).name)
    write_artifacts(run, last_eval)
    d.barrier()
    return _result(run, last_eval)


def _skipped_step(run: Run, failed: int) -> int:
    """Count a step whose update was skipped (non-finite loss or gradient); abort after too many in a row."""
    run.state.skipped_steps += 1
    run.log(f"warning: step {run.state.step}: non-finite loss or gradient norm; update skipped")
    if failed >= run.cfg.train.max_nonfinite:
        last = run.checkpointer.last.path if run.checkpointer.last else "none"
        raise UserError(f"{failed} consecutive steps had a non-finite loss or gradient (last: step {run.state.step}); "
                        f"stopped. Last good checkpoint: {last} (lower --lr, or check the data)")
    return failed


def _checkpoint_due(state, t, last_save: float) -> bool:
    return bool((t.checkpoint_every and state.step % t.checkpoint_every == 0)
                or (t.checkpoint_minutes and time.time() - last_save >= 60 * t.checkpoint_minutes))


def _progress_line(entry: dict, state, t) -> str:
    p = progress(state, t)
    eta = state.elapsed * (1 - p) / max(p, 1e-9)
    return (f"step {state.step} loss {entry['loss']:.3f} {entry['tokens_per_s'] / 1e3:.1f}k tok/s "
            f"MFU {entry['mfu']:.0%} ETA {eta:.0f}s")


def _save_final(run: Run) -> None:
    """The last checkpoint, unless this step has one (a run resumed at its end, or stopped during its final
    evaluation): rewriting it would only put the checkpoint a resume reads at risk. Rank 0 knows what it
    wrote; every rank follows its answer (saving is a collective)."""
    last = run.checkpointer.last
    if not run.dist.broadcast_object(last is not None and last.name == run.dir.checkpoint(run.state.step).name):
        run.checkpointer.save(run.state, final=True)


def _stopped(run: Run, name: str) -> RunResult:
    _save_final(run)
    last = run.checkpointer.last  # rank 0's: the other ranks do not write (and do not log)
    run.log(f"stopped by {name} at step {run.state.step}; checkpoint {last.path if last else 'none'}; "
            f"resume with: maskedlm pretrain --resume {run.dir.path}")
    return _result(run, None, stopped_by=name)


def _result(run: Run, last_eval: EvalResult | None, stopped_by: str | None = None) -> RunResult:
    s, last = run.state, run.checkpointer.last
    return RunResult(run.dir.path, last_eval, s.step, s.elapsed, s.tokens_per_second, stopped_by,
                     last.path if last else None)


class StopSignals:
    """SIGTERM / SIGINT set `signal`; the loop finishes its step, checkpoints and stops. A second signal
    interrupts at once. Handlers are installed from the main thread only (elsewhere this is inert)."""

    def __init__(self):
        self.signal: int | None = None
        self._old: dict = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def _handle(self, signum, _frame) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum

    def agreed(self, d: distributed.Dist, device: torch.device) -> bool:
        """True when any rank got a signal (every rank then stops at the same step)."""
        if d.active and d.all_reduce(torch.tensor(int(self.signal or 0), device=device), "max").item():
            self.signal = self.signal or signal.SIGTERM
        return self.signal is not None

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
