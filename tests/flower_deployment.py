"""A real Flower deployment on loopback for the tests: a ``flower-superlink`` and one ``flower-supernode`` per silo,
started from the Flower environment (``make flower`` builds ``.venv-flower``), with TLS from a throw-away CA made by
``openssl``; ``flwr run`` submits the app, ``flwr ls`` polls it. Each process runs in its own session and is
stopped with its process group."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLOWER_BIN = Path(os.environ.get("CLUES_FLOWER_BIN", ROOT / ".venv-flower" / "bin"))
APP_DIR = ROOT / "flower_app" / "project"
NODE_OPTIONS = {"silo": "--silo", "data-path": "--data", "scores-path": "--scores", "coordinator": "--coordinator",
                "token-file": "--token-file", "work-dir": "--work-dir"}  # fmt: skip
"""Node config key -> `clues flower supernode` option."""


def require_flower() -> None:
    """Skip (fail under CI=true) when the Flower environment is not installed."""
    if (FLOWER_BIN / "flower-superlink").is_file():
        return
    why = f"no Flower environment at {FLOWER_BIN} (run `make flower`)"
    if os.environ.get("CI") == "true":
        pytest.fail(why)
    pytest.skip(why)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_certificates(where: Path) -> dict[str, Path]:
    """A CA and a server certificate for 127.0.0.1, made offline with openssl."""
    where.mkdir(parents=True, exist_ok=True)
    ext = where / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=where, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=clues-test-ca",
        "-keyout", "ca.key", "-out", "ca.crt")  # fmt: skip
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", "server.key",
        "-out", "server.csr")  # fmt: skip
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-days", "1",
        "-extfile", "san.ext", "-out", "server.pem")  # fmt: skip
    return {"ca": where / "ca.crt", "cert": where / "server.pem", "key": where / "server.key"}


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


class Deployment:
    """SuperLink + SuperNodes under ``root`` (logs in ``root/logs``); use as a context manager."""

    def __init__(self, root: Path, nodes: Mapping[str, Mapping[str, Any]]):
        self.root, self.nodes = root, nodes
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.certs = make_certificates(root / "certs")
        self.procs: list[subprocess.Popen] = []
        self.home = root / "flwr-home"
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "{self.address}"\n'
            f'root-certificates = "{self.certs["ca"]}"\n'
        )
        (root / "logs").mkdir(exist_ok=True)

    def env(self, home: Path | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env["PATH"] = f"{FLOWER_BIN}{os.pathsep}{env.get('PATH', '')}"  # the components spawn flower-superexec
        env |= {"FLWR_HOME": str(home or self.home), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
        env |= {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        return env

    def start(self, name: str, argv: list[str], home: Path) -> None:
        log = open(self.root / "logs" / f"{name}.log", "wb")  # noqa: SIM115 (closed with the process)
        home.mkdir(parents=True, exist_ok=True)
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env=self.env(home), cwd=home, start_new_session=True
        )
        self.procs.append(proc)

    def __enter__(self) -> Deployment:
        """The SuperLink and the SuperNodes, started with `clues flower superlink` / `clues flower supernode` (the
        commands docker/compose.flower.yml runs)."""
        c = self.certs
        clues = str(FLOWER_BIN / "clues")
        self.start(
            "superlink",
            [clues, "flower", "superlink", "--port", str(self.port), "--ssl-ca-certfile", str(c["ca"]),
             "--ssl-certfile", str(c["cert"]), "--ssl-keyfile", str(c["key"]),
             "--database", str(self.root / "superlink.db")],
            self.root / "superlink",
        )  # fmt: skip
        for silo, config in self.nodes.items():
            options = [token for key, value in config.items() for token in (NODE_OPTIONS[key], str(value))]
            self.start(
                f"supernode-{silo}",
                [clues, "flower", "supernode", "--superlink", self.address, "--root-certificates", str(c["ca"]),
                 "--port", str(free_port()), *options],
                self.root / f"supernode-{silo}",
            )  # fmt: skip
        self.wait_started()
        return self

    def wait_started(self, timeout: float = 60) -> None:
        """Until every `clues flower ...` has checked its options and become Flower's component (it execs it)."""
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            while True:
                if proc.poll() is not None:
                    raise AssertionError(f"{proc.args[:4]} exited with {proc.returncode}\n{self.logs()}")
                cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
                if b"flower-superlink" in cmdline or b"flower-supernode" in cmdline:
                    break
                if time.monotonic() > deadline:
                    raise AssertionError(f"{proc.args[:4]} did not start in {timeout} s\n{self.logs()}")
                time.sleep(0.1)

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(FLOWER_BIN / "flwr"), *args], env=self.env(), capture_output=True, text=True, timeout=timeout
        )

    def run_log(self, run_id: int) -> str:
        """The run's own log (the ServerApp's output), as ``flwr log --show`` prints it."""
        return self.flwr("log", str(run_id), "loopback", "--show").stdout

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}" for p in (self.root / "logs").iterdir()
        )

    def run(
        self, app_dir: Path, run_config: Mapping[str, Any], timeout: float = 600, expect: str = "finished:completed"
    ) -> dict:
        """``flwr run`` the app with ``run_config`` (a TOML file of overrides); wait for it to finish and return its
        ``flwr ls`` entry. Fails with every component's log tail when it does not finish as ``expect``."""
        overrides = self.root / "run-config.toml"
        overrides.write_text("".join(f"{json.dumps(k)} = {toml_value(v)}\n" for k, v in run_config.items()))
        deadline = time.monotonic() + timeout
        listening = time.monotonic() + 60  # the SuperLink takes a moment to listen
        while True:
            answer = self.flwr("run", str(app_dir), "loopback", "--run-config", str(overrides), "--format", "json")
            reply = json.loads(answer.stdout) if answer.stdout.strip().startswith("{") else {}
            if reply.get("success") or time.monotonic() > listening:
                break
            time.sleep(1)
        assert reply.get("success"), f"flwr run: {answer.stdout}\n{answer.stderr}\n{self.logs()}"
        run_id = str(reply["run-id"])
        while time.monotonic() < deadline:
            listed = self.flwr("ls", "loopback", "--run-id", run_id, "--format", "json")
            if listed.returncode == 0:
                runs = json.loads(listed.stdout).get("runs", [])
                status = runs[0]["status"] if runs else ""
                if status.startswith("finished"):
                    assert status == expect, f"run {run_id}: {status}\n{self.logs()}"
                    return {"run_id": int(run_id), **runs[0]}
            time.sleep(1)
        raise AssertionError(f"run {run_id} not finished after {timeout} s\n{self.logs()}")
