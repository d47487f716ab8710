"""The LoRA SFT loop: schedule, checkpoints with η_t and name-keyed Adam moments, and the run manifest."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from scoring.batching import tokenize_samples
from scoring.config import TrainingConfig
from scoring.data import load_pubmedqa
from scoring.errors import ConfigError, DataError
from scoring.models import lora_parameters
from scoring.training import checkpoint_steps, lr_lambda, read_run, train_lora
from tests.conftest import tiny_lora_model
from tests.scoring.test_data import PUBMEDQA


def test_schedules():
    linear = lr_lambda("linear", total_steps=10, warmup_steps=2)
    assert [round(linear(s), 4) for s in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 0.125]
    assert lr_lambda("constant", 10, 0)(7) == 1.0
    cosine = lr_lambda("cosine", 10, 0)
    assert cosine(0) == 1.0 and cosine(5) == pytest.approx(0.5)


def test_checkpoint_steps_are_evenly_spaced_and_end_at_the_last_step():
    assert checkpoint_steps(12, 4) == [3, 6, 9, 12]
    assert checkpoint_steps(5, 1) == [5]
    with pytest.raises(ConfigError, match="num_checkpoints"):
        checkpoint_steps(2, 3)


def test_train_saves_checkpoints_with_lrs_and_moments(tmp_path):
    model, tok = tiny_lora_model()
    data = tokenize_samples(load_pubmedqa(PUBMEDQA, limit=12), tok, max_len=96)
    before = {n: p.detach().clone() for n, p in lora_parameters(model).items()}
    cfg = TrainingConfig(epochs=2, batch_size=4, lr=1e-2, schedule="linear", warmup_ratio=0.0, num_checkpoints=3)
    seen = []
    ckpts = train_lora(
        model,
        data,
        cfg,
        tmp_path,
        pad_id=tok.pad_token_id,
        run_info={"model": "tiny"},
        progress=lambda s, t, loss: seen.append((s, t)),
    )
    assert [c.step for c in ckpts] == [2, 4, 6] and seen[-1] == (6, 6)
    # η_t is the mean lr over each interval: steps use factors 1, 5/6 | 4/6, 3/6 | 2/6, 1/6
    assert [round(c.lr / 1e-2, 6) for c in ckpts] == [round((1 + 5 / 6) / 2, 6), round(7 / 12, 6), 0.25]
    assert all(not torch.equal(before[n], p) for n, p in lora_parameters(model).items())
    exp_avg, exp_avg_sq = ckpts[-1].moments()
    assert set(exp_avg) == set(lora_parameters(model)) == set(exp_avg_sq)
    assert all(v.abs().sum() > 0 for v in exp_avg_sq.values())
    saved = load_file(str(ckpts[-1].adapter_dir / "adapter_model.safetensors"))
    assert all(torch.equal(saved[n], p.detach()) for n, p in lora_parameters(model).items())
    manifest, again = read_run(tmp_path)
    assert manifest["model"] == "tiny" and [c.lr for c in again] == [c.lr for c in ckpts]
    assert json.loads((ckpts[0].path / "checkpoint.json").read_text())["index"] == 0


def test_unfinished_run_is_refused(tmp_path):
    with pytest.raises(DataError, match=r"run\.json"):
        read_run(tmp_path)
    with pytest.raises(DataError, match="no training samples"):
        train_lora(tiny_lora_model()[0], [], TrainingConfig(), tmp_path, pad_id=0)
