"""Progress for long operations: a tqdm bar on a terminal, a plain line every 30 s otherwise (so logs of
jobs under a scheduler stay readable), nothing when disabled."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: float | None, desc: str, *, unit: str = "it", unit_scale: bool = False,
                 enabled: bool | None = None, every: float = 30.0):
        from tqdm import tqdm

        self.tty = sys.stderr.isatty() if enabled is None else enabled
        self.quiet = enabled is False
        self.desc, self.total, self.every = desc, total, every
        self.n, self.postfix, self.last = 0.0, "", time.time()
        self.bar = (tqdm(total=total, desc=desc, unit=unit, unit_scale=unit_scale, file=sys.stderr, leave=True,
                         bar_format="{desc}: {percentage:3.0f}%|{bar:24}| {postfix}" if total else None)
                    if self.tty and not self.quiet else None)

    def update(self, n: float = 1, postfix: str | None = None) -> None:
        self.set(self.n + n, postfix)

    def set(self, value: float, postfix: str | None = None) -> None:
        delta, self.n = value - self.n, value
        if postfix is not None:
            self.postfix = postfix
        if self.bar is not None:
            self.bar.update(delta)
            if postfix is not None:
                self.bar.set_postfix_str(postfix, refresh=False)
        elif not self.quiet and time.time() - self.last > self.every:
            pct = f"[{100 * self.n / self.total:3.0f}%] " if self.total else ""
            print(f"{self.desc}: {pct}{self.postfix}", file=sys.stderr, flush=True)
            self.last = time.time()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
