"""What a finished run leaves behind, besides its checkpoints: the final weights, the `transformers` folder,
the genre probe (on the embedded corpus), eval.json, the curves, and the sample view in the log.

Rank 0 writes them all; under FSDP it first gathers an unsharded copy of the model.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import asdict

from .checkpoint import save_weights
from .distributed import full_model_state
from .errors import UserError
from .evaluate import STANDARD_MASK, EvalResult
from .fill import sample_view
from .hf import export_trained
from .model import BertForPreTraining
from .modernbert import build_model, use_phase
from .paths import atomic_write, replace_folder
from .run import Run


def write_artifacts(run: Run, last_eval: EvalResult) -> None:
    cfg, state, t = run.cfg, run.state, run.cfg.train
    model = _unsharded(run)
    probe = None
    if run.dist.is_main:
        save_weights(model, run.dir.weights)
        tmp = run.dir.path / ".hf.tmp"  # written aside, then put in place: a reader never sees half a folder
        shutil.rmtree(tmp, ignore_errors=True)
        export_trained(model, run.tok, cfg, tmp)
        replace_folder(tmp, run.dir.hf)
        if t.probe or (t.probe is None and not cfg.data.train and cfg.data.corpus == "shakespeare"):
            from .probe import genre_probe

            probe = genre_probe(model.to(run.device), run.tok, run.device, seed=t.seed, log=run.log)
        atomic_write(run.dir.eval, json.dumps({"step": state.step, **last_eval.as_dict(), "train_state": asdict(state),
                                               **({"probe": probe} if probe else {})}, indent=2) + "\n")
    run.log(f"done: {state.step} steps, {state.tokens:,} tokens in {state.elapsed:.0f}s "
            f"({state.tokens_per_second / 1e3:.1f}k tokens/s)"
            + (f"; {state.skipped_steps} step(s) skipped (non-finite)" if state.skipped_steps else ""))
    pair = f", {t.pair_task.upper()} accuracy {last_eval.nsp_accuracy:.1%}" if last_eval.nsp_accuracy is not None else ""
    run.log(f"held-out: loss {last_eval.loss:.3f}, masked-token accuracy {last_eval.accuracy:.1%}, "
            f"perplexity {last_eval.perplexity:.1f} ({last_eval.predicted:,} predictions){pair}")
    if t.plot and run.dist.is_main:
        from .plots import plot_metrics

        try:
            run.log(f"curves: {plot_metrics(run.dir.path)}")
        except UserError as e:
            run.log(f"note: no plot ({e})")
    if t.sample and run.dist.is_main:
        on_device = next(model.parameters()).device == run.device  # an FSDP copy stays on the CPU unless probed
        model.eval()
        run.log(sample_view(model, run.tok, run.data.valid.tokens, mask_prob=STANDARD_MASK.mask_prob, seed=t.eval_seed,
                            color=sys.stdout.isatty(), amp_dtype=run.amp_dtype if on_device else None))
    run.log(f"saved to {run.dir.path}")


def _unsharded(run: Run) -> BertForPreTraining:
    """The model whole: itself, or under FSDP an unsharded CPU copy (gathered by every rank, kept by rank 0)."""
    if not run.parallel.fsdp:
        return run.model
    weights = full_model_state(run.model, True)
    model = build_model(run.cfg.model)
    use_phase(model, run.cfg, run.state.phase)
    if run.dist.is_main:
        model.load_state_dict(weights)
    return model
