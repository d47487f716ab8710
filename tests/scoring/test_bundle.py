"""Checkpoint bundles (``clues.checkpoint/1``): a run rebuilt from its bundles projects byte for byte like the
original, the bundle bytes are canonical, and every malformed field is refused with a DataError that names it."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.numpy import load, save
from safetensors.torch import load_file
from safetensors.torch import save_file as torch_save_file

from scoring.config import LoraSettings, ProjectionSpec, TrainingConfig, parameter_layout_hash
from scoring.data import load_pubmedqa
from scoring.errors import DataError
from scoring.io import checkpoint_from_bytes, checkpoint_to_bytes, write_checkpoint_dir
from scoring.spec import RunSpec
from scoring.training import read_run
from scoring.workflow import ProjectOptions, checkpoint_bundles, project_samples, run_warmup, write_run_dir
from tests.scoring.test_data import PUBMEDQA

LORA = LoraSettings(rank=4, alpha=8.0)
PROJECTION = {"kind": "sjlt", "dim": 32, "seed": 3}


def _warmup(root, training):
    samples = load_pubmedqa(PUBMEDQA, limit=12)
    run_warmup("tiny:0", samples[:8], root / "run", lora=LORA, training=training, projection=PROJECTION, max_len=96)
    manifest, _ = read_run(root / "run")
    return root / "run", manifest, samples[8:]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 3-step run with 2 checkpoints, and the samples to project."""
    cfg = TrainingConfig(epochs=2, batch_size=3, lr=1e-2, warmup_ratio=0.0, num_checkpoints=2, max_steps=3)
    return _warmup(tmp_path_factory.mktemp("bundle"), cfg)


@pytest.fixture(scope="module")
def good(trained):
    """The bundle bytes of the trained run's last checkpoint, and the run's spec."""
    run, manifest, _ = trained
    return checkpoint_bundles(run)[-1], ProjectionSpec.from_dict(manifest["projection"])


def _rebuild(run, manifest, dest):
    spec = ProjectionSpec.from_dict(manifest["projection"])
    bundles = [checkpoint_from_bytes(b, spec, f"checkpoint {i}") for i, b in enumerate(checkpoint_bundles(run))]
    write_run_dir(RunSpec.from_manifest(manifest).manifest(), bundles[::-1], dest)  # any order
    return bundles


def _same_projections(run, copy, samples, out, opts):
    a = project_samples(run, samples, out / "a", anchor=True, opts=opts)
    b = project_samples(copy, samples, out / "b", anchor=True, opts=opts)
    assert [p.name for p in a] == [p.name for p in b] and a
    for pa, pb in zip(a, b, strict=True):
        assert pa.read_bytes() == pb.read_bytes(), pa.name


def test_trained_run_rebuilt_from_bundles_projects_byte_for_byte(trained, tmp_path):
    run, manifest, samples = trained
    bundles = _rebuild(run, manifest, tmp_path / "copy")
    assert [b.index for b in bundles] == [0, 1] and all(b.has_moments for b in bundles)
    _same_projections(run, tmp_path / "copy", samples, tmp_path, ProjectOptions(batch_size=4))
    (_, originals), (copy_manifest, copies) = read_run(run), read_run(tmp_path / "copy")
    assert copy_manifest["layout"] == manifest["layout"] and [c.lr for c in copies] == [c.lr for c in originals]
    for original, copy in zip(originals, copies, strict=True):
        for x, y in zip(original.moments(), copy.moments(), strict=True):
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
        x = load_file(str(original.adapter_dir / "adapter_model.safetensors"))
        y = load_file(str(copy.adapter_dir / "adapter_model.safetensors"))
        assert x.keys() == y.keys() and all(x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]) for k in x)


def test_bundle_bytes_are_canonical(trained, tmp_path):
    run, manifest, _ = trained
    first = checkpoint_bundles(run)
    assert checkpoint_bundles(run) == first
    _rebuild(run, manifest, tmp_path / "copy")
    assert checkpoint_bundles(tmp_path / "copy") == first  # the rebuilt run bundles to the very same bytes


def test_bundle_keeps_peft_names_and_the_run_layout(trained, good):
    run, manifest, _ = trained
    data, spec = good
    bundle = checkpoint_from_bytes(data, spec)
    peft_names = load_file(str(run / "ckpt-001" / "adapter" / "adapter_model.safetensors")).keys()
    assert set(bundle.adapter) == set(peft_names) == set(bundle.exp_avg) == set(bundle.exp_avg_sq)
    assert [[n, list(s)] for n, s in bundle.layout] == manifest["layout"]
    assert bundle.entry == {k: manifest["checkpoints"][1][k] for k in ("index", "step", "lr", "lr_last", "adam")}
    assert bundle.adapter_config["peft_type"] == "LORA" and bundle.dtypes[f"adapter.{next(iter(peft_names))}"] == "F32"


def test_untrained_run_bundles_and_round_trips(tmp_path):
    run, manifest, samples = _warmup(tmp_path, None)
    assert (run / "ckpt-000" / "checkpoint.json").is_file()
    bundles = _rebuild(run, manifest, tmp_path / "copy")
    assert len(bundles) == 1 and not bundles[0].has_moments and bundles[0].exp_avg_sq == {}
    assert not (tmp_path / "copy" / "ckpt-000" / "optimizer.safetensors").exists()
    copy_manifest, _ = read_run(tmp_path / "copy")
    assert copy_manifest["checkpoints"][0]["has_moments"] is False and copy_manifest["training"] is None
    _same_projections(run, tmp_path / "copy", samples, tmp_path, ProjectOptions(precondition=False))


def test_run_without_layout_asks_for_a_new_warmup(trained, tmp_path):
    run, manifest, _ = trained
    old = tmp_path / "old"
    for path in run.rglob("*"):
        if path.is_file():
            (old / path.relative_to(run)).parent.mkdir(parents=True, exist_ok=True)
            (old / path.relative_to(run)).write_bytes(path.read_bytes())
    (old / "run.json").write_text(json.dumps({k: v for k, v in manifest.items() if k != "layout"}))
    with pytest.raises(DataError, match=r"no 'layout'.*warmup"):
        checkpoint_bundles(old)


def test_checkpoint_to_bytes_checks_the_layout_and_the_files(trained, tmp_path):
    run, manifest, _ = trained
    layout = manifest["layout"]
    with pytest.raises(DataError, match=r"missing.*lora_B"):
        checkpoint_to_bytes(run / "ckpt-000", [*layout, [layout[-1][0].replace("lora_A", "lora_B") + "x", [1]]])
    with pytest.raises(DataError, match="shape"):
        checkpoint_to_bytes(run / "ckpt-000", [[layout[0][0], [1, 1]], *layout[1:]])
    with pytest.raises(DataError, match=r"adapter_model\.safetensors: no such file"):
        checkpoint_to_bytes(tmp_path, layout)
    with pytest.raises(DataError, match="lacks \\['lr'\\]"):
        checkpoint_to_bytes(run / "ckpt-000", layout, entry={"index": 0, "step": 2, "lr_last": 0.1, "adam": {}})


def test_write_run_dir_refuses_inconsistent_bundles(good, trained, tmp_path):
    _, manifest, _ = trained
    data, spec = good
    bundle = checkpoint_from_bytes(data, spec)
    info = RunSpec.from_manifest(manifest).manifest()
    with pytest.raises(DataError, match="repeat"):
        write_run_dir(info, [bundle, bundle], tmp_path)
    with pytest.raises(DataError, match="no checkpoint bundles"):
        write_run_dir(info, [], tmp_path)
    other = {**info, "projection": {**info["projection"], "param_hash": "0" * 16}}
    with pytest.raises(DataError, match="does not hash"):
        write_run_dir(other, [bundle], tmp_path)
    assert not (tmp_path / "run.json").exists()


def test_bfloat16_adapters_pass_through_unchanged(tmp_path):
    weights = {"m.lora_A.weight": torch.randn(2, 3).bfloat16(), "m.lora_B.weight": torch.randn(3, 2).bfloat16()}
    layout = [[name, list(w.shape)] for name, w in weights.items()]
    (tmp_path / "ckpt" / "adapter").mkdir(parents=True)
    torch_save_file(weights, str(tmp_path / "ckpt" / "adapter" / "adapter_model.safetensors"), {"format": "pt"})
    (tmp_path / "ckpt" / "adapter" / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    entry = {"index": 0, "step": 0, "lr": 1.0, "lr_last": 1.0, "adam": {}}
    spec = ProjectionSpec(kind="sjlt", dim=8, seed=0, param_hash=parameter_layout_hash(layout), param_count=12)
    bundle = checkpoint_from_bytes(checkpoint_to_bytes(tmp_path / "ckpt", layout, entry), spec)
    assert bundle.dtypes == {"adapter.m.lora_A.weight": "BF16", "adapter.m.lora_B.weight": "BF16"}
    assert np.array_equal(bundle.adapter["m.lora_A.weight"], weights["m.lora_A.weight"].float().numpy())
    write_checkpoint_dir(bundle, tmp_path / "copy")
    back = load_file(str(tmp_path / "copy" / "adapter" / "adapter_model.safetensors"))
    assert all(back[k].dtype == torch.bfloat16 and torch.equal(back[k], w) for k, w in weights.items())


# ------------------------------------------------------------------------------------------------------------
# Validation: every malformed field is refused, naming the field


def _parts(data):
    n = int.from_bytes(data[:8], "little")
    return load(data), json.loads(data[8 : 8 + n])["__metadata__"]


def _tamper(data, tensors=None, drop=(), **meta):
    """The bundle ``data`` with tensors replaced or dropped and metadata fields replaced (None: removed)."""
    old_tensors, old_meta = _parts(data)
    new_tensors = {k: v for k, v in {**old_tensors, **(tensors or {})}.items() if k not in drop}
    new_meta = {k: v for k, v in {**old_meta, **meta}.items() if v is not None}
    return save(new_tensors, metadata=new_meta)


def _entry(**changes):
    entry = {"index": 1, "step": 3, "lr": 0.005, "lr_last": 0.0, "adam": {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8}}
    return json.dumps({k: v for k, v in {**entry, **changes}.items() if v is not None})


def _first(data, group):
    tensors, _ = _parts(data)
    return min(k for k in tensors if k.startswith(f"{group}."))  # load() orders names at random


def _poisoned(data, group, value):
    key = _first(data, group)
    array = load(data)[key].copy()
    array.flat[-1] = value
    return _tamper(data, {key: array})


CASES = {
    "garbage": (lambda d: b"not a safetensors file", "not a valid safetensors"),
    "truncated": (lambda d: d[:-10], "not a valid safetensors"),
    "format": (lambda d: _tamper(d, format="clues.projection/1"), "format must be 'clues.checkpoint/1'"),
    "no layout": (lambda d: _tamper(d, layout=None), "'layout' is missing"),
    "layout not json": (lambda d: _tamper(d, layout="[["), "'layout' is not JSON"),
    "layout order": (
        lambda d: _tamper(d, layout=json.dumps(json.loads(_parts(d)[1]["layout"])[::-1])),
        "'layout' hashes to .* not the expected param_hash",
    ),
    "layout shape": (
        lambda d: _tamper(
            d, layout=json.dumps([[n, [s[0] + 1, *s[1:]]] for n, s in json.loads(_parts(d)[1]["layout"])])
        ),
        "param_hash",
    ),
    "missing adapter": (
        lambda d: _tamper(d, drop=[_first(d, "adapter")]),
        "'adapter' tensors .* missing \\['base_model",
    ),
    "extra adapter": (
        lambda d: _tamper(d, {"adapter.extra.weight": np.zeros(2, np.float32)}),
        "'adapter' tensors .* unexpected \\['extra.weight'\\]",
    ),
    "stray tensor": (lambda d: _tamper(d, {"optimizer.step": np.zeros(1, np.float32)}), "unexpected tensor"),
    "adapter shape": (lambda d: _tamper(d, {_first(d, "adapter"): np.zeros((1, 1), np.float32)}), "has shape"),
    "partial moments": (lambda d: _tamper(d, drop=[_first(d, "exp_avg_sq")]), "'exp_avg_sq' tensors .* missing"),
    "one moment kind": (
        lambda d: _tamper(d, drop=[k for k in _parts(d)[0] if k.startswith("exp_avg_sq.")]),
        "'exp_avg_sq' tensors",
    ),
    "moment shape": (lambda d: _tamper(d, {_first(d, "exp_avg"): np.zeros(3, np.float32)}), "'exp_avg.*has shape"),
    "nan adapter": (lambda d: _poisoned(d, "adapter", np.nan), "'adapter\\..*' contains NaN or Inf"),
    "inf moment": (lambda d: _poisoned(d, "exp_avg_sq", np.inf), "'exp_avg_sq\\..*' contains NaN or Inf"),
    "int dtype": (
        lambda d: _tamper(d, {_first(d, "adapter"): load(d)[_first(d, "adapter")].astype(np.int32)}),
        "dtype I32; .* floating point",
    ),
    "adapter_config list": (lambda d: _tamper(d, adapter_config="[1]"), "'adapter_config' must be a JSON object"),
    "adapter_config text": (lambda d: _tamper(d, adapter_config="lora"), "'adapter_config' is not JSON"),
    "no entry": (lambda d: _tamper(d, checkpoint=None), "'checkpoint' is missing"),
    "entry lacks lr": (lambda d: _tamper(d, checkpoint=_entry(lr=None)), "lacks \\['lr'\\]"),
    "entry lacks adam": (lambda d: _tamper(d, checkpoint=_entry(adam=None)), "lacks \\['adam'\\]"),
    "negative lr": (lambda d: _tamper(d, checkpoint=_entry(lr=-1.0)), "'lr' must be a finite number >= 0"),
    "nan lr": (lambda d: _tamper(d, checkpoint=_entry(lr=math.nan)), "'lr' must be a finite number"),
    "string lr_last": (lambda d: _tamper(d, checkpoint=_entry(lr_last="0.1")), "'lr_last' must be a finite"),
    "bad index": (lambda d: _tamper(d, checkpoint=_entry(index=-1)), "'index' must be an integer >= 0"),
    "bad adam": (lambda d: _tamper(d, checkpoint=_entry(adam={"beta1": 2.0})), "'adam'.*beta1"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_bundles_are_refused_naming_the_field(good, case):
    data, spec = good
    make, message = CASES[case]
    with pytest.raises(DataError, match=f"^upload 7: .*{message}"):
        checkpoint_from_bytes(make(data), spec, where="upload 7")


def test_a_re_encoded_bundle_with_a_zero_lr_passes(good):
    data, spec = good
    assert checkpoint_from_bytes(_tamper(data, checkpoint=_entry(lr=0)), spec).entry["lr"] == 0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"param_hash": "0123456789abcdef"}, "not the expected param_hash 0123456789abcdef"),
        ({"param_count": 7}, "not 7"),
    ],
)
def test_bundle_for_another_spec_is_refused(good, change, message):
    data, spec = good
    with pytest.raises(DataError, match=message):
        checkpoint_from_bytes(data, ProjectionSpec.from_dict({**spec.to_dict(), **change}))


def test_projection_hands_freed_memory_back_even_when_it_fails(trained, tmp_path, monkeypatch):
    """`project_samples` ends with `release_memory` (glibc keeps ~6 GiB of freed SmolLM2 buffers otherwise), on
    success and on error."""
    import scoring.workflow as steps

    run, _, samples = trained
    calls = []
    monkeypatch.setattr(steps, "release_memory", lambda: calls.append(1))
    assert project_samples(run, samples[:2], tmp_path / "ok", opts=ProjectOptions(precondition=False))
    assert calls == [1]
    with pytest.raises(DataError, match=r"no run\.json"):
        project_samples(tmp_path / "no-run", samples[:2], tmp_path / "bad")
    assert calls == [1, 1]
