"""What every `clues` command shares (`agent.console`): progress (a bar on a terminal, a few plain lines anywhere else),
the model options and the one-line error with exit status 2."""

from __future__ import annotations

import io

from agent.console import Progress, cache_dir


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_redirected_run_writes_a_line_per_quarter_not_a_line_per_update():
    out = io.StringIO()
    progress = Progress(units={"gradients": "grad"}, stream=out)
    for done in range(1, 1001):
        progress.stage("gradients", done, 1000)
    for done in range(1, 11):
        progress.stage("shards", done, 10)
    lines = out.getvalue().splitlines()
    assert [line.split(":")[0] for line in lines] == ["gradients"] * 5 + ["shards"] * 5  # start, 25 %, ..., end
    assert lines[0].startswith("gradients:   0% (1/1000 grad)") and "\r" not in out.getvalue()
    assert lines[4].startswith("gradients: 100% (1000/1000 grad)")
    assert lines[5].startswith("shards:  10%") and lines[-1].startswith("shards: 100%")


def test_nothing_is_written_before_the_first_update_and_a_note_is_kept():
    out = io.StringIO()
    progress = Progress("warmup", units={"warmup": "step"}, stream=out)
    progress.close()
    assert out.getvalue() == ""
    progress.steps(1, 4, loss=2.5)
    assert out.getvalue().splitlines() == ["warmup:  25% (1/4 step) 0 s loss=2.500"]


def test_a_terminal_gets_a_redrawn_bar():
    out = Terminal()
    progress = Progress("project", stream=out)
    for done in range(1, 51):
        progress.steps(done, 50)
    text = out.getvalue()
    assert "\r" in text and "project" in text and "50/50" in text


def test_the_model_cache_comes_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("CLUES_CACHE_DIR", raising=False)
    assert cache_dir() is None
    monkeypatch.setenv("CLUES_CACHE_DIR", str(tmp_path))
    assert cache_dir() == tmp_path / "models"


def _dtype_choices(parser) -> dict[str, tuple]:
    """``{command path: --dtype choices}`` of every (sub)command of ``parser`` that takes ``--dtype``."""
    import argparse

    found = {}
    for action in parser._actions:
        if "--dtype" in getattr(action, "option_strings", ()):
            found[parser.prog] = tuple(action.choices)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found |= _dtype_choices(sub)
    return found


def test_every_command_that_loads_a_model_takes_the_same_model_options():
    from agent.console import DTYPES
    from clues.cli import build_parser

    choices = _dtype_choices(build_parser())
    assert {"clues warmup", "clues project", "clues agent run", "clues agent train"} <= set(choices)
    assert set(choices.values()) == {DTYPES}


def test_an_error_is_one_line_naming_the_command_and_exits_2(capsys):
    from agent.console import EXIT_ERROR, CliError, fail
    from clues.cli import main

    assert fail("clues x", CliError("--y: bad")) == EXIT_ERROR == 2
    assert capsys.readouterr().err == "clues x: error: --y: bad\n"
    assert main(["select", "--scores", "/nonexistent/scores", "--out", "/nonexistent/out"]) == EXIT_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("clues select: error:"), err
