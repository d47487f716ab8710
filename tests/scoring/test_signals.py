"""The unconditional response loss ℓ(y|∅): the same response tokens as ℓ(y|x), padding-invariant, forward only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scoring.batching import make_batches, tokenize_samples, unconditional_samples
from scoring.data import IGNORE_INDEX, Sample
from scoring.errors import ConfigError
from scoring.gradients import build_gradient_computer
from scoring.signals import forward_losses, sample_signals
from tests.conftest import tiny_lora_model

SAMPLES = [
    Sample("a", (("user", "What is the capital of France?"),), "Paris."),
    Sample("b", (("system", "Be brief."), ("user", "Name three primes and explain why.")), "2, 3 and 5: no divisors."),
    Sample("c", (("user", "Q " * 40),), "A long answer " * 12),  # truncated at max_len
    Sample("d", (("user", "yes or no?"),), "yes"),
]


def response_tokens(item):
    return [label for label in item.labels if label != IGNORE_INDEX]


@pytest.mark.parametrize("template", ["chat", "alpaca"])
def test_unconditional_samples_keep_exactly_the_response_tokens(template):
    _, tok = tiny_lora_model()
    cond = tokenize_samples(SAMPLES, tok, 64, template=template)
    uncond = unconditional_samples(SAMPLES, cond, tok, template=template)
    assert [u.id for u in uncond] == [c.id for c in cond]
    assert any(c.truncated for c in cond)  # the truncated response is the one that is kept, not re-tokenised
    for c, u in zip(cond, uncond, strict=True):
        assert response_tokens(u) == response_tokens(c)
        assert u.input_ids[-len(response_tokens(c)) :] == response_tokens(c)  # the response ends the sequence
        n_prompt = len(u.input_ids) - len(response_tokens(c))
        assert u.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
        if not c.truncated:
            assert n_prompt < len(c.input_ids) - len(response_tokens(c))  # the question is gone


def test_unconditional_prompt_keeps_system_turns_and_drops_the_question():
    _, tok = tiny_lora_model()
    cond = tokenize_samples(SAMPLES[:2], tok, 256, template="chat")
    uncond = unconditional_samples(SAMPLES[:2], cond, tok, template="chat")
    text = tok.decode(uncond[1].input_ids)
    assert "Be brief." in text and "primes" not in text
    assert "capital" not in tok.decode(uncond[0].input_ids)


def test_unconditional_samples_refuse_mismatched_inputs():
    _, tok = tiny_lora_model()
    cond = tokenize_samples(SAMPLES, tok, 64)
    with pytest.raises(ConfigError, match="tokenized"):
        unconditional_samples(SAMPLES[::-1], cond, tok)


def test_forward_losses_are_padding_invariant_and_match_the_gradient_engine():
    model, tok = tiny_lora_model()
    cond = tokenize_samples(SAMPLES, tok, 64, template="chat")
    uncond = unconditional_samples(SAMPLES, cond, tok, template="chat")
    for items in (cond, uncond):
        batched = forward_losses(model, items, batch_size=4, pad_id=tok.pad_token_id)  # right-padded batches
        alone = np.array([forward_losses(model, [item], 1, tok.pad_token_id)[0] for item in items])
        np.testing.assert_allclose(batched, alone, rtol=1e-5, atol=1e-6)
    engine = build_gradient_computer(model, "hooks")
    for batch in make_batches(cond, 4, tok.pad_token_id):
        _, losses = engine.compute(batch.input_ids, batch.labels)
        got = forward_losses(model, [c for i in batch.ids for c in cond if c.id == i], 4, tok.pad_token_id)
        np.testing.assert_allclose(got, losses.numpy(), rtol=1e-5, atol=1e-6)


def test_forward_losses_equal_a_manual_cross_entropy_over_the_response():
    model, tok = tiny_lora_model()
    item = unconditional_samples(SAMPLES[:1], tokenize_samples(SAMPLES[:1], tok, 64), tok)[0]
    ids = torch.tensor([item.input_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    labels = torch.tensor(item.labels)
    mask = labels[1:] != IGNORE_INDEX
    nll = torch.nn.functional.cross_entropy(logits[:-1][mask], labels[1:][mask])
    assert forward_losses(model, [item], 1, tok.pad_token_id)[0] == pytest.approx(float(nll), rel=1e-5)


def test_sample_signals_give_both_signals_and_leave_the_model_mode_alone():
    model, tok = tiny_lora_model()
    model.train()
    cond = tokenize_samples(SAMPLES, tok, 64)
    out = sample_signals(model, tok, SAMPLES, cond, batch_size=3)
    assert model.training
    assert set(out) == {"loss_uncond", "n_tokens"}
    assert out["n_tokens"].tolist() == [c.num_response_tokens for c in cond]
    assert np.isfinite(out["loss_uncond"]).all() and (out["loss_uncond"] > 0).all()
