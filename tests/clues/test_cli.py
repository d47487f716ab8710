"""The clues CLI end to end on the tiny model: warmup -> project -> score -> select, and its error messages."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from clues.cli import main, read_scores
from scoring.config import TraceConfig
from scoring.data import load_pubmedqa, write_samples
from scoring.io import load_projection
from scoring.selection import MeanAnchorScore, apply_threshold
from scoring.traces import score_anchor_samples, score_projections
from scoring.workflow import load_projection_dir
from tests.scoring.test_data import PUBMEDQA


def run(command: str, **paths) -> int:
    """``main`` on a command line written as one string (paths hold no spaces)."""
    return main(command.format(**paths).split())


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """Run the four commands once on 3 small files (two silos, anchors)."""
    root = tmp_path_factory.mktemp("cli")
    items = load_pubmedqa(PUBMEDQA, limit=24)
    files = {"anchors": items[:6], "a": items[6:15], "b": items[15:24]}
    for name, samples in files.items():
        write_samples(root / f"{name}.jsonl", samples)
    assert (
        run(
            "warmup --model tiny --data {r}/a.jsonl --out {r}/run --checkpoints 2 --epochs 2 --batch-size 3 "
            "--lr 1e-2 --max-len 96 --proj-dim 64 --proj-seed 3",
            r=root,
        )
        == 0
    )
    assert run("project --run {r}/run --data {r}/anchors.jsonl --anchor --out {r}/p-anchors", r=root) == 0
    for silo in ("a", "b"):
        assert run("project --run {r}/run --data {r}/{s}.jsonl --out {r}/p-{s} --batch-size 4", r=root, s=silo) == 0
    assert run("score --anchors {r}/p-anchors --silo a={r}/p-a --silo b={r}/p-b --out {r}/scores.jsonl", r=root) == 0
    assert run("select --scores {r}/scores.jsonl --out {r}/masks", r=root) == 0
    return root, files


def test_projection_files_per_checkpoint_and_role(pipeline):
    root, files = pipeline
    assert sorted(p.name for p in (root / "p-anchors").iterdir()) == [
        "ckpt-000.anchor.safetensors",
        "ckpt-000.candidate.safetensors",
        "ckpt-001.anchor.safetensors",
        "ckpt-001.candidate.safetensors",
    ]
    proj, losses, _ = load_projection(root / "p-a" / "ckpt-001.candidate.safetensors")
    assert proj.ids == tuple(s.id for s in files["a"])  # input order, though batches were bucketed by length
    assert proj.matrix.shape == (9, 64) and proj.preconditioned and proj.checkpoint == 1
    assert proj.spec.seed == 3 and losses.shape == (9,)
    plain = load_projection(root / "p-anchors" / "ckpt-000.anchor.safetensors").proj
    assert not plain.preconditioned and plain.role == "anchor"


def test_no_text_in_projection_files(pipeline):
    root, files = pipeline
    blob = b"".join(p.read_bytes() for p in (root / "p-a").iterdir())
    for s in files["a"]:
        assert s.response[:40].encode() not in blob and s.prompt[-1][1][:40].encode() not in blob


def test_masks_equal_the_in_process_computation(pipeline):
    root, files = pipeline
    anchors, _ = load_projection_dir(root / "p-anchors", "anchor")
    as_candidates, _ = load_projection_dir(root / "p-anchors", "candidate")
    silos = {s: load_projection_dir(root / f"p-{s}", "candidate")[0] for s in ("a", "b")}
    table = score_projections(silos, anchors, TraceConfig())
    expected = apply_threshold(table, MeanAnchorScore(), score_anchor_samples(as_candidates, anchors, TraceConfig()))
    got_table, got_anchors = read_scores(root / "scores.jsonl")
    assert np.allclose(got_table.scores, table.scores) and len(got_anchors.ids) == 6
    for silo in ("a", "b"):
        rows = [json.loads(x) for x in (root / "masks" / f"{silo}.mask.jsonl").read_text().splitlines()]
        assert [r["id"] for r in rows] == [s.id for s in files[silo]]
        want = {i: bool(k) for i, k in zip(expected.ids, expected.selected, strict=True)}
        assert all(r["keep"] == want[r["id"]] for r in rows)


def test_top_fraction_threshold(pipeline, tmp_path):
    root, _ = pipeline
    assert (
        main(["select", "--scores", str(root / "scores.jsonl"), "--threshold", "top:0.5", "--out", str(tmp_path)]) == 0
    )
    kept = sum(json.loads(x)["keep"] for f in tmp_path.iterdir() for x in f.read_text().splitlines())
    assert kept == 9


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["select", "--scores", "{root}/scores.jsonl", "--threshold", "top:2", "--out", "{tmp}"], "fraction"),
        (["select", "--scores", "{root}/scores.jsonl", "--threshold", "bogus", "--out", "{tmp}"], "threshold"),
        (["score", "--anchors", "{root}/p-anchors", "--silo", "nameless", "--out", "{tmp}/s"], "NAME=DIR"),
        (["score", "--anchors", "{root}/p-a", "--silo", "a={root}/p-a", "--out", "{tmp}/s"], "anchor"),
        (["project", "--run", "{tmp}", "--data", "{root}/a.jsonl", "--out", "{tmp}/p"], "run.json"),
        (["project", "--run", "{root}/run", "--data", "{tmp}/missing.jsonl", "--out", "{tmp}/p"], "missing.jsonl"),
        (["warmup", "--model", "tiny", "--data", "{root}/a.jsonl", "--out", "{tmp}/r", "--lora-rank", "0"], "rank"),
        (["project", "--run", "{root}/run", "--data", "{root}/a.jsonl", "--limit", "0", "--out", "{tmp}/p"], "--limit"),
        (["select", "--scores", "{root}/a.jsonl", "--out", "{tmp}"], "not a score record"),
        (
            ["project", "--run", "{root}/run", "--data", "{root}/b.jsonl", "--out", "{tmp}/p", "--signals", "ppl"],
            "--signals",
        ),
        (
            [
                "project",
                "--run",
                "{root}/run",
                "--data",
                "{root}/b.jsonl",
                "--out",
                "{tmp}/p",
                "--signal-checkpoint",
                "7",
            ],
            "signal_checkpoint: the run has checkpoints [0, 1], not 7",
        ),
    ],
)
def test_errors_name_the_field(pipeline, tmp_path, capsys, argv, message):
    root, _ = pipeline
    argv = [a.format(root=root, tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"clues {argv[0]}: error:") and message in err


def test_project_writes_the_signals_asked_for_into_the_signal_checkpoint_files(pipeline, tmp_path):
    """``--signals`` at ``--signal-checkpoint 0``: those files carry ℓ(y|∅) and the response lengths, computed at that
    checkpoint's weights (as `scoring.signals.sample_signals` gives them); the other checkpoint's files carry none,
    and the projections and losses are those of a run without signals."""
    import torch

    from scoring.batching import tokenize_samples
    from scoring.signals import sample_signals
    from scoring.workflow import ModelOptions, load_run_model, use_checkpoint

    root, files = pipeline
    argv = "project --run {r}/run --data {r}/b.jsonl --out {t}/p --batch-size 4 --signals loss_uncond,n_tokens "
    assert run(argv + "--signal-checkpoint 0", r=root, t=tmp_path) == 0
    first = load_projection(tmp_path / "p" / "ckpt-000.candidate.safetensors")
    last = load_projection(tmp_path / "p" / "ckpt-001.candidate.safetensors")
    plain = load_projection(root / "p-b" / "ckpt-000.candidate.safetensors")
    assert sorted(first.signals) == ["loss_uncond", "n_tokens"] and last.signals == {}
    assert np.array_equal(first.proj.matrix, plain.proj.matrix) and np.array_equal(first.losses, plain.losses)
    model, tokenizer, manifest, checkpoints = load_run_model(root / "run", ModelOptions())
    use_checkpoint(model, checkpoints[0])
    tokenized = tokenize_samples(files["b"], tokenizer, manifest["max_len"], template=manifest["template"])
    with torch.no_grad():
        expected = sample_signals(model, tokenizer, files["b"], tokenized, template=manifest["template"])
    for name in ("loss_uncond", "n_tokens"):
        assert np.allclose(first.signals[name], expected[name], rtol=1e-5)
    assert (first.signals["n_tokens"] >= 1).all() and (first.signals["loss_uncond"] > 0).all()


def test_every_command_has_help():
    for command in ("warmup", "project", "score", "select", "demo"):
        out = subprocess.run([sys.executable, "-m", "clues", command, "--help"], capture_output=True, text=True)
        assert out.returncode == 0 and "usage: clues" in out.stdout


def test_no_train_run_has_one_checkpoint_and_refuses_preconditioning(pipeline, tmp_path, capsys):
    root, _ = pipeline
    assert (
        run(
            "warmup --model tiny --data {r}/a.jsonl --out {t}/run --no-train --max-len 96 --proj-dim 64",
            r=root,
            t=tmp_path,
        )
        == 0
    )
    manifest = json.loads((tmp_path / "run" / "run.json").read_text())
    assert manifest["training"] is None and [c["has_moments"] for c in manifest["checkpoints"]] == [False]
    assert manifest["checkpoints"][0]["lr"] == 1.0
    assert run("project --run {t}/run --data {r}/b.jsonl --out {t}/p", r=root, t=tmp_path) == 2
    assert "--no-precondition" in capsys.readouterr().err
    assert run("project --run {t}/run --data {r}/b.jsonl --out {t}/p --no-precondition", r=root, t=tmp_path) == 0
    proj = load_projection(tmp_path / "p" / "ckpt-000.candidate.safetensors").proj
    assert not proj.preconditioned and proj.lr == 1.0 and np.abs(proj.matrix).sum() > 0
