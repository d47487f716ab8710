"""Shared fixtures: seeding, offline mode, and tiny-model builders."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)
    yield


def tiny_lora_model(targets=("q_proj", "v_proj"), rank=4, seed=0, dtype="float32"):
    """A tiny random Llama with LoRA whose B matrices are random too (so every gradient is non-zero)."""
    from scoring.config import LoraSettings
    from scoring.models import attach_lora, load_base_model

    lm = load_base_model(f"tiny:{seed}", dtype=dtype)
    model = attach_lora(
        lm.model, LoraSettings(rank=rank, alpha=2.0 * rank, target_modules=tuple(targets)), random_b=True
    )
    model.eval()
    return model, lm.tokenizer


@pytest.fixture
def tiny_model():
    return tiny_lora_model()
