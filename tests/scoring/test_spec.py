"""The typed job spec: the wire form round-trips, a stored job gives the same spec the API used to build by hand, and
a coordinator that predates a field is read with its defaults."""

from __future__ import annotations

from types import SimpleNamespace

from scoring.config import DEFAULT_MAX_LEN
from scoring.spec import JobSpec, RunSpec, manifest_has_moments

LORA = {"r": 8, "alpha": 16}
PROJECTION = {"kind": "sjlt", "dim": 256, "seed": 0}


def stored(**options):
    checkpoints = [
        SimpleNamespace(index=1, step=20, lr=1e-4, lr_last=5e-5, adam={"beta1": 0.9}, blob_key=None),
        SimpleNamespace(index=0, step=10, lr=2e-4, lr_last=1e-4, adam={"beta1": 0.9}, blob_key="ab" * 32),
    ]
    return SimpleNamespace(
        model="tiny:0",
        lora=LORA,
        projection=PROJECTION,
        options=options,
        precondition=True,
        similarity="cosine",
        threshold={"kind": "mean-anchor"},
        checkpoints=checkpoints,
    )


def test_a_stored_job_from_before_score_kinds_is_a_pure_trace_job_at_the_last_checkpoint():
    spec = JobSpec.of(stored())
    wire = spec.to_dict()
    assert [c["index"] for c in wire["checkpoints"]] == [0, 1]  # sorted, whatever the rows' order
    assert wire["checkpoints"][0]["sha256"] == "ab" * 32 and wire["checkpoints"][1]["sha256"] is None
    assert (wire["score"], wire["signals"], wire["fusion"], wire["signal_checkpoint"]) == ("trace", [], None, 1)
    assert (wire["max_len"], wire["template"], wire["lora_init_seed"], wire["auto_score"]) == (
        DEFAULT_MAX_LEN,
        "auto",
        0,
        True,
    )
    assert not spec.keeps_values


def test_the_wire_form_round_trips_and_an_older_coordinator_s_spec_takes_defaults():
    spec = JobSpec.of(
        stored(score="calibrated", signals=["uncond_loss"], fusion="max", max_len=512, signal_checkpoint=0)
    )
    assert spec.keeps_values and spec.signal_index == 0
    assert JobSpec.from_dict(spec.to_dict()) == spec.__class__(**{**spec.__dict__, "signal_checkpoint": 0})
    old = {k: v for k, v in spec.to_dict().items() if k not in ("score", "signals", "fusion", "signal_checkpoint")}
    legacy = JobSpec.from_dict(old)
    assert (legacy.score, legacy.signals, legacy.signal_index) == ("trace", (), 1)


def test_the_run_manifest_is_the_run_part_of_the_spec():
    spec = JobSpec.of(stored(max_len=256, template="plain", lora_init_seed=3))
    manifest = spec.run.manifest()
    assert set(manifest) == {"model", "lora", "lora_init_seed", "max_len", "template", "projection"}
    assert RunSpec.from_manifest({**manifest, "checkpoints": []}) == spec.run
    assert manifest_has_moments({"checkpoints": [{"has_moments": True}, {}]})
    assert not manifest_has_moments({"checkpoints": [{"has_moments": True}, {"has_moments": False}]})
