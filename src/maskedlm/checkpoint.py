"""Weights and training checkpoints on disk: safetensors for tensors, JSON for everything else. No pickles.

A training checkpoint (`paths.CheckpointDir`):

    RUN/checkpoints/step-00001000/
        model.safetensors       fp32 master weights
        optimizer.safetensors   optimizer state tensors ("state.<param index>.<name>")
        rng.safetensors         torch CPU / CUDA generator states per rank, and the masking generator's
        state.json              `CheckpointState`: step, run position, full config, tokenizer hash, world
                                size, optimizer hyper-parameters, Python and NumPy RNG states
        manifest.json           sha256 of each file above, verified on load
    RUN/checkpoints/latest      name of the newest complete checkpoint, replaced last

A checkpoint is written into a temporary folder, every file fsynced, then renamed into place; only then is
`latest` replaced (atomically). A crash at any moment leaves either the old `latest` pointing to an intact
checkpoint, or the new one complete.

This module knows tensors and files, not models: `loading.py` builds models from folders.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import distributed
from .config import Config
from .distributed import Dist
from .errors import UserError
from .paths import CheckpointDir, RunDir, atomic_path, atomic_write, fsync, replace_folder
from .schedules import TrainState

FORMAT = 1


# -- weights and config of a finished run -----------------------------------------------------------------


def save_weights(model: torch.nn.Module | dict[str, torch.Tensor], path: Path) -> None:
    """A model's (or a state dict's) tensors as safetensors, atomically."""
    state = model.state_dict() if isinstance(model, torch.nn.Module) else model
    with atomic_path(path) as tmp:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in state.items()}, str(tmp), metadata={"format": "pt"})


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Load safetensors weights into `model`; every key and shape must match, or the error names them."""
    if not path.is_file():
        raise UserError(f"{path.parent}: no weights ({path.name}); did the run finish?")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path}: cannot read weights ({e})") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''}")
        if wrong:
            k = wrong[0]
            parts.append(f"shape of {k} is {tuple(state[k].shape)}, config says {tuple(expected[k].shape)}")
        raise UserError(f"{path}: weights do not match config.json: {'; '.join(parts)}")
    model.load_state_dict(state)


def save_config(cfg: Config, path: Path) -> None:
    atomic_write(path, json.dumps(cfg.to_dict(), indent=2) + "\n")


def read_json(path: Path, what: str) -> Any:
    """A JSON file, or a one-line UserError saying why it cannot be read."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: missing ({what})") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read {what} ({e})") from None


def read_config(run: Path) -> Config:
    """The resolved config of a run folder."""
    run_dir = RunDir(Path(run))
    if not run_dir.path.is_dir():
        raise UserError(f"no such run folder: {run_dir.path}")
    if not run_dir.config.is_file():
        raise UserError(f"{run_dir.path}: not a maskedlm run folder (no {run_dir.config.name})")
    return Config.from_dict(read_json(run_dir.config, "a run's config"), allow_derived=True)


# -- the state of a training run --------------------------------------------------------------------------


@dataclass
class CheckpointState:
    """state.json: what a checkpoint holds besides tensors."""

    step: int
    train_state: TrainState
    config: Config
    tokenizer_hash: str
    world_size: int
    rng: dict  # {"python": random.getstate() as lists, "numpy": np.random.get_state() as lists}
    optimizer_param_groups: list[dict]  # the optimizer's hyper-parameters, parameters by index
    format: int = FORMAT

    def to_json(self) -> str:
        return json.dumps({"format": self.format, "step": self.step, "train_state": asdict(self.train_state),
                           "config": self.config.to_dict(), "tokenizer_hash": self.tokenizer_hash,
                           "world_size": self.world_size, "rng": self.rng,
                           "optimizer_param_groups": self.optimizer_param_groups}, indent=1)

    @classmethod
    def from_json(cls, raw: Any, where: Path) -> "CheckpointState":
        names = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(names - {"format"} - set(raw)) if isinstance(raw, dict) else ["everything"]
        if missing:
            raise UserError(f"{where}: not a maskedlm checkpoint state (missing {', '.join(missing)})")
        if raw.get("format", FORMAT) != FORMAT:
            raise UserError(f"{where}: checkpoint format {raw['format']}; this maskedlm reads format {FORMAT}")
        try:
            values = {k: v for k, v in raw.items() if k in names}
            values["train_state"] = TrainState(**raw["train_state"])
            values["config"] = Config.from_dict(raw["config"], allow_derived=True)
            return cls(**values)
        except TypeError as e:
            raise UserError(f"{where}: malformed checkpoint state ({e})") from None


# -- RNG states: every generator a resumed run needs to continue bit for bit ------------------------------


def capture_rng(mask_gen: torch.Generator) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, plain): torch CPU / CUDA and masking generator states; Python and NumPy states as lists."""
    tensors = {"torch_cpu": torch.get_rng_state(), "mask": mask_gen.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    py = random.getstate()
    np_state = np.random.get_state()
    plain = {"python": [py[0], list(py[1]), py[2]],
             "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    return tensors, plain


def restore_rng(tensors: dict[str, torch.Tensor], plain: dict, mask_gen: torch.Generator, rank: int = 0) -> None:
    """Each rank takes back its own generator states (rank 0's when the world size changed)."""
    def of(r: int) -> dict[str, torch.Tensor]:
        return {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(f"rank{r}.")}

    states = of(rank) or of(0)
    torch.set_rng_state(states["torch_cpu"])
    mask_gen.set_state(tensors["mask"])
    cuda = [states[k] for k in sorted(k for k in states if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    py = plain["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = plain["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))


# -- training checkpoints ---------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _nonfinite(tensors: dict[str, torch.Tensor]) -> str | None:
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def save_checkpoint(run: RunDir, *, state: CheckpointState, weights: dict[str, torch.Tensor], opt_state: dict,
                    rng_tensors: dict[str, torch.Tensor], keep: int, protect: str | None = None) -> CheckpointDir:
    """Write a checkpoint atomically, point `latest` at it, then drop old ones beyond `keep` (never
    `protect`, the one this run resumed from). `weights` is a full state dict, `opt_state` an optimizer
    state dict in torch's format (parameters by index). Raises UserError when a value is not finite;
    OSError when the disk refuses (the previous checkpoint is then untouched)."""
    run.checkpoints.mkdir(parents=True, exist_ok=True)
    final = run.checkpoint(state.step)
    weights = _cpu(weights)
    opt_tensors = _cpu({f"state.{i}.{k}": v for i, s in opt_state["state"].items() for k, v in s.items()
                        if torch.is_tensor(v)})
    bad = _nonfinite(weights) or _nonfinite(opt_tensors)
    if bad:
        raise UserError(f"refusing to save a checkpoint at step {state.step}: {bad} holds non-finite values")
    state = dataclasses.replace(state, optimizer_param_groups=[dict(g) for g in opt_state["param_groups"]])
    # A killed writer's half-written checkpoint, or one it was replacing (one writer: RunLock), a full
    # checkpoint's worth of disk each.
    for stale in [*run.checkpoints.glob(".tmp-step-*"), *run.checkpoints.glob(".step-*.old*")]:
        shutil.rmtree(stale, ignore_errors=True)
    tmp = CheckpointDir(run.checkpoints / f".tmp-{final.name}-{os.getpid()}")
    tmp.path.mkdir()
    try:
        save_file(weights, str(tmp / tmp.WEIGHTS), metadata={"format": "pt"})
        save_file(opt_tensors, str(tmp / tmp.OPTIMIZER))
        save_file(_cpu(rng_tensors), str(tmp / tmp.RNG))
        (tmp / tmp.STATE).write_text(state.to_json())
        (tmp / tmp.MANIFEST).write_text(json.dumps({f: _sha256(tmp / f) for f in tmp.FILES}, indent=1))
        for f in (*tmp.FILES, tmp.MANIFEST):
            fsync(tmp / f)
        fsync(tmp.path)
        replace_folder(tmp.path, final.path)  # over a checkpoint of this step from an earlier, interrupted attempt
        atomic_write(run.latest, final.name + "\n")
        fsync(run.checkpoints)
    except BaseException:
        shutil.rmtree(tmp.path, ignore_errors=True)
        raise
    existing = sorted(p.name for p in run.checkpoints.iterdir() if p.is_dir() and p.name.startswith("step-"))
    for old in existing[: max(0, len(existing) - keep)]:
        if old not in (final.name, protect):
            shutil.rmtree(run.checkpoints / old, ignore_errors=True)
    return final


def find_checkpoint(path: str | Path) -> CheckpointDir:
    """The checkpoint folder for `--resume PATH`: a run folder (its latest) or a checkpoint folder."""
    p = Path(path)
    if (p / CheckpointDir.MANIFEST).is_file():
        return CheckpointDir(p)
    run = RunDir(p)
    if not p.is_dir():
        raise UserError(f"--resume: no such folder: {p}")
    if not run.latest.is_file():
        raise UserError(f"--resume: {p} has no checkpoint to resume from (no {run.latest.relative_to(p)})")
    try:
        name = run.latest.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        name = ""
    if not re.fullmatch(r"step-\d{8}", name):
        raise UserError(f"{run.latest} is damaged (it should name a checkpoint such as step-00001000); resume from "
                        f"a checkpoint folder instead: --resume {run.checkpoints}/step-...")
    ckpt = CheckpointDir(run.checkpoints / name)
    if not ckpt.path.is_dir():
        raise UserError(f"{run.latest} names {ckpt.name}, which does not exist")
    return ckpt


def verify_checkpoint(ckpt: CheckpointDir, files: tuple[str, ...] = CheckpointDir.FILES) -> None:
    """Check `files` (all by default) against manifest.json; a missing file or a changed byte is an error
    naming it."""
    try:
        manifest = json.loads((ckpt / ckpt.MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError: bad JSON or bad UTF-8
        raise UserError(f"{ckpt.path}: unreadable manifest.json ({' '.join(str(e).split())[:160]})") from None
    if not isinstance(manifest, dict):
        raise UserError(f"{ckpt.path}: manifest.json is damaged (not a mapping of file names to checksums)")
    for f in files:
        if f not in manifest or not (ckpt / f).is_file():
            raise UserError(f"{ckpt.path}: {f} is missing; the checkpoint is incomplete")
        if _sha256(ckpt / f) != manifest[f]:
            raise UserError(f"{ckpt / f}: sha256 does not match manifest.json; the file is corrupted "
                            f"(resume from an older checkpoint: --resume {ckpt.path.parent}/step-...)")


def read_state(ckpt: CheckpointDir) -> CheckpointState:
    """A checkpoint's state.json, typed (without reading its tensors)."""
    return CheckpointState.from_json(read_json(ckpt / ckpt.STATE, "a checkpoint's state"), ckpt / ckpt.STATE)


@dataclass
class Checkpoint:
    path: CheckpointDir
    state: CheckpointState
    weights: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor]
    rng: dict[str, torch.Tensor]

    def optimizer_state(self) -> dict:
        """The optimizer state dict, in torch's format (parameters by index)."""
        state: dict[int, dict] = {}
        for key, tensor in self.optimizer.items():
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = tensor
        groups = [dict(g) for g in self.state.optimizer_param_groups]
        for g in groups:
            if "betas" in g:
                g["betas"] = tuple(g["betas"])
        return {"state": state, "param_groups": groups}


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Find (see `find_checkpoint`), verify and read a training checkpoint."""
    ckpt = find_checkpoint(path)
    verify_checkpoint(ckpt)
    return Checkpoint(ckpt, read_state(ckpt), load_file(str(ckpt / ckpt.WEIGHTS)),
                      load_file(str(ckpt / ckpt.OPTIMIZER)), load_file(str(ckpt / ckpt.RNG)))


class Checkpointer:
    """Saves a run's checkpoints: rank 0 writes, every rank contributes its own RNG state (and, under FSDP,
    its shards of the weights and optimizer state)."""

    def __init__(self, run: RunDir, dist: Dist, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 mask_gen: torch.Generator, cfg: Config, tokenizer_hash: str, *, fsdp: bool,
                 resumed_from: CheckpointDir | None = None, log=print):
        self.run, self.dist, self.model, self.optimizer, self.mask_gen = run, dist, model, optimizer, mask_gen
        self.cfg, self.tokenizer_hash, self.fsdp, self.log = cfg, tokenizer_hash, fsdp, log
        self.last: CheckpointDir | None = resumed_from
        self.protect = resumed_from.name if resumed_from is not None else None

    def save(self, train_state: TrainState, final: bool = False) -> None:
        """A failed save mid-run is a warning (training goes on; the previous checkpoint is intact); a
        failed final save is an error naming the last good one."""
        tensors, plain = capture_rng(self.mask_gen)
        per_rank = self.dist.all_gather_object({k: v for k, v in tensors.items() if k != "mask"})
        weights = distributed.full_model_state(self.model, self.fsdp)  # collectives under FSDP
        opt_state = distributed.full_optimizer_state(self.model, self.optimizer, self.fsdp)
        if not self.dist.is_main:
            self.dist.barrier()
            return
        rng = {"mask": tensors["mask"]}  # the masking generator is the same on every rank
        for r, states in enumerate(per_rank):
            rng.update({f"rank{r}.{k}": v.clone() for k, v in states.items()})
        state = CheckpointState(train_state.step, dataclasses.replace(train_state), self.cfg, self.tokenizer_hash,
                                self.dist.world, plain, [])
        try:
            self.last = save_checkpoint(self.run, state=state, weights=weights, opt_state=opt_state,
                                        rng_tensors=rng, keep=self.cfg.train.keep_checkpoints, protect=self.protect)
        except (OSError, SafetensorError) as e:  # safetensors reports a full disk as its own error
            reason = getattr(e, "strerror", None) or e
            last = self.last.path if self.last else "none"
            if final:
                raise UserError(f"could not write the final checkpoint ({reason}); "
                                f"the last good one is {last}") from None
            self.log(f"warning: checkpoint at step {train_state.step} failed ({reason}); the previous one "
                     f"({self.last.name if self.last else 'none'}) is intact; training goes on")
        finally:
            self.dist.barrier()
