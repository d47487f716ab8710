"""The one way any part of clues writes a file or a directory that must never be seen half-written: into a temp
name beside the destination, then renamed into place (`os.replace`, atomic on POSIX within one filesystem). A crash
leaves the old file or nothing, plus at worst a dot-named temp that the next write's directory listing ignores.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


@contextmanager
def atomic_file(path: Path | str, mode: str = "wb", *, encoding: str | None = None) -> Iterator[IO[Any]]:
    """Open a temp file beside ``path`` (``mode`` ``"wb"`` or ``"w"``). On a clean exit it is flushed, fsynced and
    renamed to ``path``; if the block raises, it is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see `atomic_file`)."""
    with atomic_file(path) as handle:
        handle.write(data)


@contextmanager
def atomic_dir(dest: Path | str, *, complete: str | None = None) -> Iterator[Path]:
    """A temp directory beside ``dest`` for the block to fill; on a clean exit it replaces ``dest`` (an unfinished
    ``dest`` is removed first), and if the block raises it is removed.

    ``complete``: a file whose presence in ``dest`` means a finished directory. When a concurrent writer got there
    first (``dest/complete`` exists), its directory stands and this one is dropped.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))

    def finished() -> bool:
        return complete is not None and (dest / complete).exists()

    try:
        yield tmp
        if finished():
            return
        shutil.rmtree(dest, ignore_errors=True)
        try:
            os.replace(tmp, dest)
        except OSError:
            if not finished():  # not a concurrent writer's finished directory in the way
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
