"""The import contracts of pyproject.toml (`lint-imports`, run by `make lint`) hold on the tree, and they bite: an
indirect path from the API to torch, through a scoring module the API may import, breaks the API's torch ban."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("clues", "scoring", "storage", "workers", "app", "agent", "webui", "wire")
TORCH_BAN = "the API image stays slim"


def _tree(dest: Path) -> Path:
    """The packages' Python sources and pyproject.toml copied under ``dest`` (what `lint-imports` reads)."""
    for name in PACKAGES:
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.html", "*.js"))
    shutil.copy(ROOT / "pyproject.toml", dest / "pyproject.toml")
    return dest


def _lint(root: Path) -> subprocess.CompletedProcess:
    """`lint-imports` on the tree at ``root``: its packages come first on the path, ahead of the installed ones."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    command = [str(Path(sys.executable).parent / "lint-imports"), "--no-cache"]
    return subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=300)


def test_the_contracts_hold_and_an_indirect_torch_import_breaks_the_api_ban(tmp_path):
    clean = _lint(_tree(tmp_path / "clean"))
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "0 broken" in clean.stdout

    probed = _tree(tmp_path / "probed")
    selection = probed / "scoring" / "selection.py"  # torch-free, and one of the modules the API may import
    source = selection.read_text()
    selection.write_text(
        source.replace("import numpy as np\n", "import numpy as np\n\nfrom scoring import signals\n", 1)
    )
    broken = _lint(probed)
    assert broken.returncode != 0
    report = broken.stdout.replace("\n", " ")
    assert f"{TORCH_BAN}: app never reaches torch" in report and "1 broken" in report  # only the ban broke
    assert "app is not allowed to import torch" in broken.stdout
    assert "scoring.selection -> scoring.signals" in broken.stdout  # the indirect chain is named
