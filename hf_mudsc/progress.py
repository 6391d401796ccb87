"""Progress of the long stages (calibration, solve sweeps, refit): a tqdm bar on a terminal, log lines elsewhere.

A bar written into a log file or a CI console is a wall of carriage returns, and a job that prints nothing for
minutes looks hung. So `Progress` shows tqdm's bar only when stderr is a terminal (or a notebook, where
`tqdm.auto` draws a widget) and Hugging Face's bar switch is on (`HF_HUB_DISABLE_PROGRESS_BARS=1`,
`huggingface_hub.utils.disable_progress_bars()` and transformers' `disable_progress_bar()` turn it off), and
otherwise logs one INFO line every `LOG_EVERY_FRACTION` of the total (when the total is known) or every
`LOG_EVERY_SECONDS`, whichever comes first, plus a last line at the end. `enabled=False` (`progress=False`,
`hf-mudsc -q`) shows neither.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator
from typing import Any

from tqdm import autonotebook
from tqdm.auto import tqdm
from tqdm.std import tqdm as plain_tqdm

from hf_mudsc.errors import escaped

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def library_bars(enabled: bool) -> Iterator[None]:
    """With `enabled` False, transformers' and huggingface_hub's own bars (a 'Loading weights' bar per parent,
    download bars) are off inside the block and switched back on after it if they were on: `progress=False` means
    no bar at all, and the user's settings outlive the merge."""
    if enabled:
        yield
        return
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as transformers_logging

    transformers_on = transformers_logging.is_progress_bar_enabled()
    hub_on = not hub_utils.are_progress_bars_disabled()
    transformers_logging.disable_progress_bar()
    hub_utils.disable_progress_bars()
    try:
        yield
    finally:
        if transformers_on:
            transformers_logging.enable_progress_bar()
        if hub_on:
            hub_utils.enable_progress_bars()

# A log line at least every tenth of the total, and at least every 30 s (unknown totals, slow stages).
LOG_EVERY_FRACTION = 0.1
LOG_EVERY_SECONDS = 30.0


def bars_switched_off() -> bool:
    """Whether the user turned Hugging Face's progress bars off (`HF_HUB_DISABLE_PROGRESS_BARS=1`,
    `huggingface_hub.utils.disable_progress_bars()`, transformers' `logging.disable_progress_bar()`, which calls it):
    the switch a Hugging Face user knows, so it covers hf_mudsc's bars too (the command line puts it back as it found
    it when it returns, `cli.main.library_bars_restored`)."""
    from huggingface_hub import utils as hub_utils

    return hub_utils.are_progress_bars_disabled()


def interactive() -> bool:
    """Whether a bar can be drawn: stderr is a terminal, or `tqdm.auto` picked a notebook widget."""
    if autonotebook.tqdm is not plain_tqdm:  # tqdm.auto found a notebook kernel: it draws a widget
        return True
    stream = sys.stderr
    return bool(getattr(stream, "isatty", None) and stream.isatty())


class Progress:
    """One stage's progress: `update(n)` / `set_postfix(**values)` / `close()` (also a context manager).

    `total` may change while running (`set_total`): the solve's bar starts at the sweep limit and is cut to the
    sweeps run when it converges early, so the bar ends full and the last line says how many ran."""

    def __init__(self, *, desc: str, unit: str, total: int | None = None, enabled: bool = True,
                 rate: bool = False, clock: Any = time.monotonic) -> None:
        # a task's or model's name in the title, from a config: its control characters would act on the terminal
        self.desc, self.unit, self.total, self.rate = escaped(desc), unit, total, rate
        self.n = 0
        self.postfix: dict[str, Any] = {}
        self._clock = clock
        self._start = self._last_time = clock()
        self._last_logged = 0
        self._bar = None
        self._log = enabled and not (interactive() and not bars_switched_off())
        if enabled and not self._log:
            self._bar = tqdm(desc=self.desc, unit=unit, total=total, dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif self._log and self._due():
            self._emit()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = values
        if self._bar is not None:
            self._bar.set_postfix(**values)

    def set_total(self, total: int) -> None:
        self.total = total
        if self._bar is not None:
            self._bar.total = total
            self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self._log and self.n != self._last_logged:
            self._emit()
        self._log = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _due(self) -> bool:
        if self._clock() - self._last_time >= LOG_EVERY_SECONDS:
            return True
        if self.total:
            step = max(1, round(self.total * LOG_EVERY_FRACTION))
            return self.n // step > self._last_logged // step
        return False

    def line(self) -> str:
        """The text of one progress line: `calibration: 64/128 samples (50%), 210.3 samples/s, objective=0.5`."""
        done = f"{self.n}/{self.total}" if self.total else str(self.n)
        text = f"{self.desc}: {done} {self.unit}"
        if self.total:
            text += f" ({100 * self.n / self.total:.0f}%)"
        elapsed = self._clock() - self._start
        if self.rate and elapsed > 0:
            text += f", {self.n / elapsed:.1f} {self.unit}/s"
        if self.postfix:
            text += ", " + ", ".join(f"{key}={value}" for key, value in self.postfix.items())
        return text

    def _emit(self) -> None:
        logger.info("%s", self.line())
        self._last_logged = self.n
        self._last_time = self._clock()
