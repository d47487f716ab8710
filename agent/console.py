"""What every `clues` command shares: the offline environment, the model cache, the model options, exit statuses,
the one error type a command prints, and one progress display.

Every command exits `EXIT_OK` or, on an error it explains in one line naming the option or field (`fail`),
`EXIT_ERROR`. `clues` and `clues agent` both build on this module; the agent sits below `clues` in the layers, so it
lives here.

`Progress` draws a tqdm bar on stderr when stderr is a terminal. When it is not (a log file, a pipe, CI), a bar's
carriage-return redraws would become thousands of lines, so it writes one plain line when a phase starts, at each
quarter, and when it ends. Both `clues` (warmup, project, the demo's phases) and `clues agent` (one phase per stage
of the silo's loop) use it; the agent sits below `clues` in the layers, so it lives here.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import TextIO

EXIT_OK = 0
EXIT_ERROR = 2
"""The exit status of a command that stopped on an error it printed (as argparse's own usage errors)."""

DTYPES = ("float32", "bfloat16", "float16")


class CliError(Exception):
    """A missing or invalid option or setting, or a failed step the user can fix (the message names the option)."""


def offline_environment() -> None:
    """Nothing downloads weights or datasets at run time: set the Hugging Face offline switches unless given."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def fail(prog: str, exc: BaseException | str) -> int:
    """Print ``prog: error: …`` on stderr and return `EXIT_ERROR`."""
    print(f"{prog}: error: {exc}", file=sys.stderr)
    return EXIT_ERROR


def add_model_args(p: argparse.ArgumentParser) -> None:
    """``--device`` and ``--dtype``: where and in what precision the model runs."""
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="model dtype (default: float32)")


def add_projection_args(p: argparse.ArgumentParser) -> None:
    """``--proj-dim`` and ``--proj-seed``: the shared projection every party derives (warmup, job-from-warmup)."""
    from scoring.config import DEFAULT_PROJECTION_DIM

    p.add_argument(
        "--proj-dim",
        type=int,
        default=DEFAULT_PROJECTION_DIM,
        help=f"projection dimension k (default {DEFAULT_PROJECTION_DIM})",
    )
    p.add_argument("--proj-seed", type=int, default=0, help="seed every party derives the projection from")


def cache_dir() -> Path | None:
    """The model cache, ``$CLUES_CACHE_DIR/models``, when ``CLUES_CACHE_DIR`` is set."""
    value = os.environ.get("CLUES_CACHE_DIR")
    return Path(value) / "models" if value else None


def model_options(args: argparse.Namespace):
    """`scoring.workflow.ModelOptions` from `add_model_args`' options and the model cache."""
    from scoring.workflow import ModelOptions

    return ModelOptions(device=args.device, dtype=args.dtype, cache_dir=cache_dir())


class Progress:
    """Progress of one phase at a time on ``stream`` (stderr): a bar on a terminal, a line per quarter elsewhere.

    ``update(done, total, note)`` moves the current phase; ``phase(name)`` ends the current one and starts the next
    (each phase's display opens on its first update, so an error before any work prints cleanly); ``close()`` ends
    it. ``units`` names the unit of each phase (``"it"`` otherwise).
    """

    def __init__(
        self,
        phase: str | None = None,
        *,
        units: dict[str, str] | None = None,
        stream: TextIO | None = None,
        width: int = 0,
    ):
        self.stream = stream or sys.stderr
        self.units = units or {}
        self.width = width
        self.name = phase
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._open = False
        self._bar = None
        self._quarter = -1
        self._started = 0.0

    def phase(self, name: str) -> None:
        """End the current phase and make ``name`` the next one."""
        if name != self.name:
            self.close()
            self.name = name

    def update(self, done: float, total: float, note: str = "") -> None:
        """``done`` of ``total`` (any unit) in the current phase; ``note`` is shown beside it."""
        total = max(total, 1e-12)
        if not self._open:
            self._start(total)
        if self._bar is not None:
            self._bar.total = total
            self._bar.update(done - self._bar.n)
            if note:
                self._bar.set_postfix_str(note)
        else:
            quarter = min(4, int(4 * done / total))
            if quarter > self._quarter:
                self._quarter = quarter
                self._line(done, total, note)
        if done >= total:
            self.close()

    def _start(self, total: float) -> None:
        self._open, self._quarter, self._started = True, -1, time.monotonic()
        if self.tty:
            from tqdm import tqdm

            fmt = (
                f"{{desc:<{self.width}}}{{percentage:3.0f}}%|{{bar:30}}| {{elapsed}} {{postfix}}"
                if self.width
                else None
            )
            unit = self.units.get(self.name or "", "it")
            self._bar = tqdm(
                total=total, desc=self.name, unit=unit, dynamic_ncols=True, file=self.stream, bar_format=fmt
            )

    def _line(self, done: float, total: float, note: str) -> None:
        unit = self.units.get(self.name or "")
        count = f" ({done:g}/{total:g} {unit})" if unit else ""
        tail = f" {note}" if note else ""
        elapsed = time.monotonic() - self._started
        print(f"{self.name}: {100 * done / total:3.0f}%{count} {elapsed:.0f} s{tail}", file=self.stream, flush=True)

    def stage(self, name: str, done: float, total: float) -> None:
        """The silo loop's callback (`agent.loop.run_agent`): ``done`` of ``total`` in stage ``name``."""
        self.phase(name)
        self.update(done, total)

    def steps(self, done: int, total: int, loss: float | None = None) -> None:
        """The training and projection callback: ``done`` of ``total`` steps, with the last loss when known."""
        self.update(done, total, f"loss={loss:.3f}" if loss is not None else "")

    def close(self) -> None:
        """End the current phase (a no-op when none is open)."""
        if self._bar is not None:
            self._bar.close()
        self._open, self._bar = False, None
