"""The Flower App's settings and server rule without flwr: the run config is checked as a clues training job is,
the shipped project's run config is `RUN_CONFIG`, the node config names its keys, and `RoundAggregation` is the
coordinator's guard and rule in the coordinator's order."""

from __future__ import annotations

import tomllib

import numpy as np
import pytest

from agent.loop import AgentError
from flower_app.config import RUN_CONFIG, RunSettings, run_config_from_spec
from flower_app.server import RoundAggregation
from flower_app.silo import NodeSettings, load_selection
from scoring.config import round_lr
from scoring.errors import ConfigError
from scoring.federated.aggregation import Known, RoundGuard, SiloUpdate, apply_rule, guard_round
from tests.flower_deployment import APP_DIR


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out |= flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
    return out


def test_the_shipped_project_carries_every_key_with_its_default():
    project = tomllib.loads((APP_DIR / "pyproject.toml").read_text())
    assert flatten(project["tool"]["flwr"]["app"]["config"]) == RUN_CONFIG
    components = project["tool"]["flwr"]["app"]["components"]
    assert components == {"serverapp": "flower_app.server_app:app", "clientapp": "flower_app.client_app:app"}


def test_defaults_are_a_clues_training_job():
    settings = RunSettings.from_run_config({"selection.source": "all"})
    assert settings.spec["model"] == "smollm2" and settings.rounds == 3
    guard = {"clip": "median", "clip_factor": 3.0, "max_count_ratio": 10.0}
    assert settings.spec["aggregation"] == {"rule": "fedavg", **guard}
    assert settings.lr(2) == round_lr(settings.local, 2, 3)
    assert settings.eval_path is None and settings.out_dir is None


def test_a_spec_round_trips_through_the_run_config():
    config = {"model": "tiny:0", "lora.target-modules": "q_proj, v_proj", "local.schedule": "cosine"}
    config |= {"aggregation.rule": "fedadam", "aggregation.eta": 0.01, "selection.scoring-job": "e" * 32}
    spec = RunSettings.from_run_config(config | {"evaluation.tasks": "loss,pubmedqa"}).spec
    assert spec["lora"]["target_modules"] == ["q_proj", "v_proj"]
    assert spec["evaluation"]["tasks"] == ["loss", "pubmedqa"]
    assert RunSettings.from_run_config(run_config_from_spec(spec)).spec == spec


def test_an_exact_aggregation_job_has_no_flower_twin_yet():
    spec = RunSettings.from_run_config({"selection.source": "all"}).spec
    for kind in ("stack", "shared-basis"):
        with pytest.raises(ConfigError, match=f"aggregation.kind: '{kind}' is not available in the Flower App"):
            run_config_from_spec({**spec, "aggregation": {**spec["aggregation"], "kind": kind}})
    fedavg = {**spec, "aggregation": {**spec["aggregation"], "kind": "fedavg"}}  # what a coordinator job carries
    assert RunSettings.from_run_config(run_config_from_spec(fedavg)).spec == spec


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"local.stepz": 2}, "unknown key.*local.stepz"),
        ({"local.steps": 0}, "local.*steps"),
        ({"lora.rank": -1}, "lora.*rank"),
        ({"aggregation.rule": "krum"}, "aggregation.rule"),
        ({"aggregation.rule": "fedavg", "aggregation.eta": 0.1}, "aggregation"),
        ({"selection.source": "selected"}, r"selection\.scoring-job"),
        ({"selection.source": "all", "aggregation.rule": "quality-fedavg"}, "selection.scoring-job"),
        ({"selection.source": "all", "aggregation.rule": "fedprox"}, "local.prox-mu"),
        ({"selection.source": "all", "coordinator.url": "http://x"}, "coordinator.token-file"),
        ({"selection.source": "all", "num-server-rounds": 0}, "num-server-rounds"),
        ({"selection.source": "all", "fraction-train": 1.5}, "fraction-train"),
        ({"selection.source": "all", "model": ""}, "model"),
    ],
)
def test_bad_run_configs_name_the_key(config, message):
    with pytest.raises(ConfigError, match=message):
        RunSettings.from_run_config({"selection.source": "all", **config})


def test_a_dp_job_has_no_flower_twin():
    spec = RunSettings.from_run_config({"selection.source": "all"}).spec
    with pytest.raises(ConfigError, match=r"local\.dp"):
        run_config_from_spec({**spec, "local": {**spec["local"], "dp": {"clip_norm": 1.0, "epsilon": 8.0}}})


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"data-path": "x.jsonl"}, "'silo' is required"),
        ({"silo": "a"}, "'data-path' is required"),
        ({"silo": "a", "data-path": "x", "coordinator": "http://x"}, "token-file"),
        ({"silo": "a", "data-path": "x", "dtype": "int8"}, "dtype"),
        ({"silo": "a", "data-path": "x", "scores": "y"}, "unknown key"),
    ],
)
def test_bad_node_configs_name_the_key(config, message):
    with pytest.raises(ConfigError, match=message):
        NodeSettings.from_node_config(config)


def test_the_selection_comes_from_the_scores_file(tiny_data, tmp_path):
    data = tiny_data.data_file("a", tmp_path)
    samples = tiny_data.samples["a"]
    scores = tmp_path / "a.scores.jsonl"
    scores.write_text("".join(f'{{"id": "{s.id}", "score": {i}, "selected": {str(i % 2 == 0).lower()}}}\n'
                              for i, s in enumerate(samples)))  # fmt: skip
    node = NodeSettings.from_node_config({"silo": "a", "data-path": str(data), "scores-path": str(scores)})
    settings = RunSettings.from_run_config({"selection.scoring-job": "e" * 32})
    chosen, mass = load_selection(node, settings)
    assert [s.id for s in chosen] == [s.id for s in samples[::2]]
    assert mass == sum(range(0, len(samples), 2))
    scores.write_text(scores.read_text().splitlines()[0] + "\n")
    with pytest.raises(AgentError, match=f"scores file {scores} has no scores for {len(samples) - 1}"):
        load_selection(node, settings)
    bare = NodeSettings.from_node_config({"silo": "a", "data-path": str(data)})
    with pytest.raises(ConfigError, match="scores-path"):
        load_selection(bare, settings)


def updates(rng, names, counts, masses):
    return [
        SiloUpdate(n, {"w": rng.normal(size=(3, 2)).astype(np.float32)}, c, m)
        for n, c, m in zip(names, counts, masses, strict=True)
    ]


def test_round_aggregation_is_the_coordinators_rule_in_its_order():
    rng = np.random.default_rng(0)
    start = {"w": np.zeros((3, 2), np.float32)}
    settings = RunSettings.from_run_config({"selection.scoring-job": "e" * 32, "aggregation.rule": "fedadam"})
    ups = updates(rng, ["b", "a", "c"], [5, 3, 4], [1.0, 2.0, 3.0])
    known = {u.silo: Known(u.num_samples, (u.score_mass, u.score_mass)) for u in ups}
    agg = RoundAggregation(settings, known)
    got = agg.aggregate(0, start, ups, [{"i": i} for i in range(3)])
    ordered = sorted(ups, key=lambda u: u.silo)
    guarded, _, _ = guard_round(start, ordered, known, RoundGuard.from_dict(settings.spec["aggregation"]))
    want, state = apply_rule(settings.spec["aggregation"], start, guarded, None)
    np.testing.assert_array_equal(got["w"], want["w"])
    assert [s["silo"] for s in agg.history[0]["silos"]] == ["a", "b", "c"]
    assert [s["i"] for s in agg.history[0]["silos"]] == [1, 0, 2]
    agg.aggregate(1, got, ups, [{}] * 3)  # the server optimizer's state carries over
    assert agg.state.round == state.round + 1


def test_round_aggregation_caps_and_refuses():
    rng = np.random.default_rng(1)
    start = {"w": np.zeros((3, 2), np.float32)}
    settings = RunSettings.from_run_config({"selection.scoring-job": "e" * 32})
    agg = RoundAggregation(settings, {"a": Known(2, (0.0, 1.0)), "b": Known(5, (0.0, 1.0))})
    agg.aggregate(0, start, updates(rng, ["a", "b"], [9, 5], [0.5, 9.0]), [{}, {}])
    kinds = {(f["silo"], f["kind"]) for f in agg.history[0]["flags"]}
    assert {("a", "count_capped"), ("b", "mass_clamped")} <= kinds
    with pytest.raises(Exception, match="same silo"):
        agg.aggregate(1, start, updates(rng, ["a", "a"], [1, 1], [0, 0]), [{}, {}])
