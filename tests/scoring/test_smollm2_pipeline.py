"""Slow: the whole pipeline on the real SmolLM2-135M-Instruct with a handful of samples."""

from __future__ import annotations

import numpy as np
import pytest

from scoring.batching import make_batches, tokenize_samples
from scoring.config import LoraSettings, TraceConfig, TrainingConfig
from scoring.data import load_pubmedqa
from scoring.gradients import build_gradient_computer
from scoring.models import attach_lora, load_base_model
from scoring.selection import MeanAnchorScore, apply_threshold
from scoring.workflow import ProjectOptions, project_samples, run_warmup, score_dirs
from tests.scoring.test_data import PUBMEDQA

pytestmark = pytest.mark.slow


def test_engines_agree_on_smollm2():
    lm = load_base_model("smollm2")
    model = attach_lora(lm.model, LoraSettings(rank=8), random_b=True)
    model.eval()
    data = tokenize_samples(load_pubmedqa(PUBMEDQA, limit=3), lm.tokenizer, max_len=96)
    batch = make_batches(data, 3, lm.tokenizer.pad_token_id)[0]
    ref, ref_loss = build_gradient_computer(model, "loop").compute(batch.input_ids, batch.labels)
    got, loss = build_gradient_computer(model, "hooks").compute(batch.input_ids, batch.labels)
    assert max(((got[n] - ref[n]).norm() / ref[n].norm()).item() for n in ref) < 1e-4
    assert np.allclose(loss.numpy(), ref_loss.numpy(), rtol=1e-5)


def test_pipeline_on_smollm2(tmp_path):
    items = load_pubmedqa(PUBMEDQA, limit=10)
    anchors, silo = items[:3], items[3:10]
    training = TrainingConfig(epochs=1, batch_size=2, lr=1e-3, num_checkpoints=2, warmup_ratio=0.0)
    ckpts = run_warmup(
        "smollm2",
        silo[:4],
        tmp_path / "run",
        lora=LoraSettings(),
        training=training,
        projection={"kind": "sjlt", "dim": 1024, "seed": 0},
        max_len=128,
    )
    assert len(ckpts) == 2 and all(c.lr > 0 for c in ckpts)
    opts = ProjectOptions(batch_size=4)
    project_samples(tmp_path / "run", anchors, tmp_path / "anchors", anchor=True, opts=opts)
    project_samples(tmp_path / "run", silo, tmp_path / "silo", opts=opts)
    table, anchor_table = score_dirs({"silo": tmp_path / "silo"}, tmp_path / "anchors", TraceConfig())
    assert table.parts.shape == (7, 2) and np.isfinite(table.scores).all()
    assert np.allclose(table.parts.sum(1), table.scores)
    selected = apply_threshold(table, MeanAnchorScore(), anchor_table)
    assert selected.threshold == pytest.approx(anchor_table.scores.mean())
