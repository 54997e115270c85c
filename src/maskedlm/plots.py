"""A PNG of a run's curves (train and held-out loss and accuracy, learning rate, tokens/s) from
metrics.jsonl. matplotlib is an optional dependency; without it the message says how to get it."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import UserError
from .paths import RunDir


def read_metrics(run: str | Path, since: int = 0) -> tuple[list[dict], int]:
    """Records of metrics.jsonl from line `since` on (a line still being written is left for next time),
    and the line to continue from."""
    path = RunDir(Path(run)).metrics
    if not path.is_file():
        return [], since
    records, n = [], 0
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if n <= since:
                continue
            if not line.endswith("\n"):
                return records, n - 1
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records, max(n, since)


def plot_metrics(run: str | Path, out: str | Path | None = None) -> Path:
    """Draw metrics.png in the run folder (or `out`); returns its path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("plots need matplotlib (pip install 'maskedlm[plot]')") from None
    records, _ = read_metrics(run)
    train = [r for r in records if "split" not in r]
    valid = [r for r in records if r.get("split") == "valid"]
    if not train:
        raise UserError(f"{run}: no training metrics to plot yet")
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    (a_loss, a_acc), (a_lr, a_tps) = axes
    steps = [r["step"] for r in train]
    a_loss.plot(steps, [r["loss"] for r in train], lw=1, label="train")
    a_acc.plot(steps, [r["accuracy"] for r in train], lw=1, label="train")
    if valid:
        a_loss.plot([r["step"] for r in valid], [r["loss"] for r in valid], "o-", ms=3, label="held-out")
        a_acc.plot([r["step"] for r in valid], [r["accuracy"] for r in valid], "o-", ms=3, label="held-out")
    a_lr.plot(steps, [r["lr"] for r in train], lw=1, color="tab:green")
    a_tps.plot(steps, [r["tokens_per_s"] for r in train], lw=1, color="tab:purple")
    for ax, title in ((a_loss, "masked-token loss"), (a_acc, "masked-token accuracy"), (a_lr, "learning rate"),
                      (a_tps, "tokens / s")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    a_loss.legend()
    a_acc.legend()
    fig.suptitle(Path(run).name)
    fig.tight_layout()
    path = Path(out) if out else RunDir(Path(run)).plot
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
