"""One recipe everywhere: the CLI, the REST schemas and the demo default to `scoring.config`'s LoRA targets and
projection dimension (the settings `bench/quality.py` measures)."""

from __future__ import annotations

from app.schemas import JobCreate, ScoringFromWarmup
from clues.cli import build_parser
from clues.demo import DEFAULT
from scoring.config import DEFAULT_LORA_TARGETS, DEFAULT_PROJECTION_DIM, LoraSettings


def test_lora_targets_default_to_every_linear_layer():
    assert LoraSettings().target_modules == DEFAULT_LORA_TARGETS
    lora_schema = JobCreate.model_json_schema()["$defs"]["LoraSettings"]["properties"]
    assert lora_schema["target_modules"]["default"] == list(DEFAULT_LORA_TARGETS)
    args = build_parser().parse_args(["warmup", "--data", "d.jsonl", "--out", "o"])
    assert tuple(args.lora_targets.split(",")) == DEFAULT_LORA_TARGETS


def test_projection_dimension_defaults_agree():
    parser = build_parser()
    assert parser.parse_args(["warmup", "--data", "d.jsonl", "--out", "o"]).proj_dim == DEFAULT_PROJECTION_DIM
    assert parser.parse_args(["admin", "job-from-warmup", "0" * 32, "--name", "n"]).proj_dim == DEFAULT_PROJECTION_DIM
    assert ScoringFromWarmup(name="n").projection["dim"] == DEFAULT_PROJECTION_DIM
    assert DEFAULT.proj_dim == DEFAULT_PROJECTION_DIM
    assert DEFAULT_PROJECTION_DIM % 4 == 0  # the SJLT default of 4 non-zeros per coordinate divides it


def test_job_create_sends_only_the_score_settings_given():
    from clues.admin import score_fields

    parser = build_parser()
    base = ["admin", "job-create", "--run", "r", "--anchors", "a.jsonl", "--silos", "a,b"]
    assert score_fields(parser.parse_args(base)) == {}  # the coordinator's defaults apply
    given = parser.parse_args([*base, "--scoring-mode", "local", "--score", "trace", "--signals", ""])
    assert score_fields(given) == {"scoring_mode": "local", "score": "trace", "signals": []}
