"""What every benchmark script shares: progress lines on stderr and the JSON result on stdout (and in ``--out``)."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path


def make_log(name: str) -> Callable[[str], None]:
    """``log(msg)`` printing ``[name HH:MM:SS] msg`` to stderr."""

    def log(msg: str) -> None:
        print(f"[{name} {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    return log


def emit(result: dict, out: Path | None = None) -> None:
    """Print ``result`` as indented JSON on stdout, and write it to ``out`` too when given."""
    text = json.dumps(result, indent=2)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    print(text)
