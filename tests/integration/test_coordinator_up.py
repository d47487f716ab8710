"""``clues coordinator up`` never leaves its worker behind: stopped with SIGTERM (a service manager, ``kill``) it stops
the worker first; killed outright (SIGKILL) the worker gets SIGTERM from the kernel (parent-death signal)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.integration.conftest import Service

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL])
def test_the_worker_stops_with_the_coordinator(tmp_path: Path, how: signal.Signals):
    port = Service.free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLUES_")}
    env |= {
        "CLUES_DATA_DIR": str(tmp_path / "data"),
        "CLUES_ADMIN_TOKEN": "admin-secret-for-tests-0123456789abcdef",
        "HF_HUB_OFFLINE": "1",
    }
    log_path = tmp_path / "up.log"
    with open(log_path, "w") as log:
        up = subprocess.Popen(
            [sys.executable, "-m", "clues", "coordinator", "up", "--port", str(port)], env=env, stdout=log, stderr=log
        )
        try:
            Service.wait_healthy(f"http://127.0.0.1:{port}", up, log_path)
            workers = [c for c in psutil.Process(up.pid).children() if "worker" in " ".join(c.cmdline())]
            assert len(workers) == 1, [c.cmdline() for c in psutil.Process(up.pid).children()]
            up.send_signal(how)
            up.wait(60)
            _, alive = psutil.wait_procs(workers, timeout=60)
            assert not alive, f"worker {alive[0].pid} outlived the coordinator ({how.name})"
        finally:
            if up.poll() is None:
                up.kill()
            for child in psutil.Process().children(recursive=True):
                if "clues" in " ".join(child.cmdline()):
                    child.kill()
