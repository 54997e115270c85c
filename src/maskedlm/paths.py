"""Where things live on disk, described once, and the one way maskedlm writes a file: atomically.

A run folder (`RunDir`):

    RUN/config.json          the full resolved config (every field, tokenizer vocabulary filled in)
    RUN/tokenizer.json       the tokenizer (and vocab.txt for WordPiece)
    RUN/model.safetensors    the final weights (parameter names as in model.py)
    RUN/metrics.jsonl        one record per logged step and per evaluation
    RUN/eval.json            the final held-out metrics (and the probe's)
    RUN/metrics.png          the curves (when matplotlib is installed)
    RUN/hf/                  the run as a `transformers` folder
    RUN/tensorboard/         TensorBoard events (--tensorboard)
    RUN/checkpoints/step-NNNNNNNN/   training checkpoints (`CheckpointDir`)
    RUN/checkpoints/latest           the name of the newest complete checkpoint

A fine-tuned classifier folder has config.json (with "task"), model.safetensors, tokenizer.json and
metrics.json. Every module names these files through this one description.

Writes go to a temporary file in the same folder, are fsynced, and are renamed over the target: a reader
(or a crash) sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
VOCAB = "vocab.txt"


def _file(*parts: str) -> property:
    """A path inside the folder, as a read-only attribute."""
    return property(lambda self: self.path.joinpath(*parts), doc="/".join(("RUN",) + parts))


@dataclass(frozen=True)
class RunDir:
    """The files of one run folder."""

    path: Path

    config = _file(CONFIG)
    tokenizer = _file(TOKENIZER)
    weights = _file(WEIGHTS)
    metrics = _file("metrics.jsonl")
    eval = _file("eval.json")
    plot = _file("metrics.png")
    hf = _file("hf")
    tensorboard = _file("tensorboard")
    checkpoints = _file("checkpoints")
    latest = _file("checkpoints", "latest")  # the pointer file naming the newest complete checkpoint
    lock = _file(".lock")  # held by the one process writing the run (RunLock)

    @property
    def name(self) -> str:
        return self.path.name

    def checkpoint(self, step: int) -> "CheckpointDir":
        return CheckpointDir(self.checkpoints / f"step-{step:08d}")


@dataclass(frozen=True)
class CheckpointDir:
    """The files of one training checkpoint (see checkpoint.py for what each holds)."""

    path: Path

    WEIGHTS = WEIGHTS
    OPTIMIZER = "optimizer.safetensors"
    RNG = "rng.safetensors"
    STATE = "state.json"
    MANIFEST = "manifest.json"
    FILES = (WEIGHTS, OPTIMIZER, RNG, STATE)  # listed in the manifest, with their sha256

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def run(self) -> RunDir:
        return RunDir(self.path.parent.parent)

    def __truediv__(self, name: str) -> Path:
        return self.path / name


def new_run_dir(out: str | None) -> Path:
    """Create the folder of a new run: `out` (which must be empty or absent) or runs/<date>-<time>."""
    if out:
        path = Path(out)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise UserError(f"run folder {path} already exists and is not empty; choose another --out")
    else:
        base = Path("runs") / time.strftime("%Y%m%d-%H%M%S")
        path, n = base, 1
        while path.exists():
            path, n = base.with_name(f"{base.name}-{n}"), n + 1
    path.mkdir(parents=True, exist_ok=True)
    return path


class RunLock:
    """One writer per run folder: an exclusive lock on RUN/.lock, held while a run trains. The file names
    the holder (PID and host) for the error a second writer gets. The operating system releases the lock
    when its holder exits or is killed, so a crashed run never blocks the next one (POSIX flock; on
    systems without it there is no lock)."""

    def __init__(self, run: RunDir):
        self.run, self.file = run, None

    def acquire(self) -> "RunLock":
        try:
            import fcntl
        except ImportError:  # not POSIX
            return self
        f = open(self.run.lock, "a+", encoding="utf-8")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise UserError(f"{self.run.path} is in use by another maskedlm run ({holder}); wait for it to finish "
                            f"or stop it first") from None
        f.seek(0)
        f.truncate()
        f.write(f"PID {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        self.file = f
        return self

    def release(self) -> None:
        if self.file is not None:
            self.file.close()  # closing the file releases the lock
            self.file = None

    def holder(self) -> str | None:
        """Who holds the run folder now ('PID 123 on host'), or None when no process is writing it."""
        try:
            import fcntl
            f = open(self.run.lock, encoding="utf-8")
        except (ImportError, OSError):
            return None
        with f:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                return f.read().strip() or "unknown"
            fcntl.flock(f, fcntl.LOCK_UN)
            return None


# -- atomic writes ----------------------------------------------------------------------------------------


def fsync(path: Path) -> None:
    """Flush a file or folder to disk (folders: where the platform allows opening them)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` for a writer that takes a file name (e.g. safetensors' save_file);
    on success it is fsynced and renamed to `path`, on failure removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        fsync(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def replace_folder(tmp: Path, path: Path) -> None:
    """Put the finished folder `tmp` at `path`, replacing what was there: a reader sees the old folder or the
    new one, never a half-written one (the old one is renamed away first; it is gone a moment later)."""
    old = path.with_name(f".{path.name}.old{os.getpid()}")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    fsync(path.parent)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write text (UTF-8) or bytes to `path` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
