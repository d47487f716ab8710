"""``clues agent run``: options from flags or the environment, one-line errors naming the option, a summary."""

from __future__ import annotations

import pytest

from agent.cli import main
from tests.agent.conftest import make_job

JOB = "0" * 32


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv("CLUES_TOKEN", raising=False)
    monkeypatch.delenv("CLUES_COORDINATOR", raising=False)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--coordinator", "http://127.0.0.1:9"], "--token: missing; pass --token or set CLUES_TOKEN"),
        (["--token", "t"], "--coordinator: missing"),
        (["--coordinator", "http://127.0.0.1:9", "--token", "t", "--rows-per-shard", "0"], "--rows-per-shard"),
        (["--coordinator", "http://127.0.0.1:9", "--token", "t", "--timeout", "-1"], "--timeout"),
        (["--coordinator", "http://127.0.0.1:9", "--token", "t", "--data", "{tmp}/missing.jsonl"], "missing.jsonl"),
    ],
)
def test_errors_name_the_option(no_env, tmp_path, capsys, extra, message):
    data = tmp_path / "a.jsonl"
    data.write_text('{"instruction": "q", "output": "a"}\n')
    argv = ["agent", "run", "--job", JOB, "--data", str(data), *[a.format(tmp=tmp_path) for a in extra]]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("clues agent run: error:") and message in err and "\n" not in err


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["agent", "run", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert all(opt in out for opt in ("--coordinator", "--token", "--rows-per-shard", "--no-wait", "CLUES_TOKEN"))


def test_run_from_the_environment(world, tmp_path, monkeypatch, capsys):
    job_id = make_job(world, "cli")
    monkeypatch.setenv("CLUES_COORDINATOR", world.coordinator.url)
    monkeypatch.setenv("CLUES_TOKEN", world.tokens["b"])
    data = world.data_file("b", tmp_path)
    assert main(["agent", "run", "--job", job_id, "--data", str(data), "--rows-per-shard", "5", "--no-wait"]) == 0
    out = capsys.readouterr().out
    assert f"agent: job {job_id} is 'open': 9 samples, 4 shard(s) uploaded, 0 already held" in out
    assert (tmp_path / ".clues-agent" / job_id / "run" / "run.json").is_file()  # the default work dir


def test_a_draft_job_is_a_one_line_error(world, tmp_path, capsys, no_env):
    job_id = make_job(world, "cli-draft", open_it=False)
    data = world.data_file("a", tmp_path)
    argv = ["agent", "run", "--coordinator", world.coordinator.url, "--token", world.tokens["a"]]
    assert main([*argv, "--job", job_id, "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert err == f"clues agent run: error: the coordinator has not opened job {job_id} yet (status 'draft'); " + (
        "ask its admin to upload the checkpoints and anchors and open it\n"
    )


def test_a_foreign_job_is_not_found(world, tmp_path, capsys, no_env):
    job_id = make_job(world, "only-a", silos=("a",), open_it=False)
    argv = ["agent", "run", "--coordinator", world.coordinator.url, "--token", world.tokens["b"]]
    assert main([*argv, "--job", job_id, "--data", str(world.data_file("b", tmp_path))]) == 2
    assert capsys.readouterr().err == f"clues agent run: error: 404: job '{job_id}' does not exist\n"
