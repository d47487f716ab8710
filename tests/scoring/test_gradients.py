"""Per-sample gradient engines against the batch-size-1 autograd loop (the LESS/CLUES way)."""

from __future__ import annotations

import itertools
from collections import OrderedDict

import pytest
import torch

from scoring.config import DEFAULT_LORA_TARGETS, AdamState
from scoring.errors import ConfigError, IncompatibleArtifactError, ShapeMismatchError
from scoring.gradients import (
    ENGINES,
    adam_precondition,
    build_gradient_computer,
    label_positions,
    response_losses,
)
from tests.conftest import tiny_lora_model


def make_batch(lengths, prompt_len=5, vocab=259, seed=0):
    """Right-padded random batch; labels on the tokens after ``prompt_len``."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    for b, n in enumerate(lengths):
        ids[b, :n] = torch.randint(3, vocab, (n,), generator=g)
        labels[b, prompt_len:n] = ids[b, prompt_len:n]
    return ids, labels


def rel_err(a, b):
    return max(((a[n] - b[n]).norm() / b[n].norm()).item() for n in b)


def test_label_positions_pick_the_predicting_positions():
    labels = torch.tensor([[-100, -100, 7, 8, -100], [-100, 5, 6, 7, 8]])
    pos, target, weight = label_positions(labels)
    assert pos[0, :2].tolist() == [1, 2] and pos[1].tolist() == [0, 1, 2, 3]
    assert target[0, :2].tolist() == [7, 8] and target[1].tolist() == [5, 6, 7, 8]
    assert torch.allclose(weight.sum(1), torch.ones(2))
    assert weight[0, 2:].eq(0).all()


def test_label_positions_reject_sample_without_response():
    with pytest.raises(ShapeMismatchError, match="no response tokens"):
        label_positions(torch.tensor([[-100, -100, -100]]))


def test_response_loss_equals_hf_loss_on_one_sample(tiny_model):
    model, _ = tiny_model
    ids, labels = make_batch([12])
    ours = response_losses(model, ids, *label_positions(labels))
    theirs = model(input_ids=ids, labels=labels).loss
    assert torch.allclose(ours[0], theirs, rtol=1e-5)


@pytest.mark.parametrize(
    ("engine", "targets", "chunk"),
    [
        (e, t, c)
        for e, t, c in itertools.product(
            ("hooks", "vmap"),
            (("q_proj", "v_proj"), ("q_proj", "k_proj", "o_proj", "up_proj", "down_proj"), DEFAULT_LORA_TARGETS),
            (None, 2),
        )
        if not (e == "hooks" and c == 2)
    ],
)
def test_engines_equal_batch_size_one_loop(engine, targets, chunk):
    model, _ = tiny_lora_model(targets=targets)
    ids, labels = make_batch([17, 9, 23, 12, 23])
    ref, ref_loss = build_gradient_computer(model, "loop").compute(ids, labels)
    got, loss = build_gradient_computer(model, engine, chunk_size=chunk).compute(ids, labels)
    assert list(got) == list(ref)
    assert all(got[n].shape == (5, *p.shape) for n, p in zip(got, [ref[n][0] for n in ref], strict=True))
    assert rel_err(got, ref) < 1e-5
    assert torch.allclose(loss, ref_loss, rtol=1e-5)


@pytest.mark.parametrize("engine", ENGINES)
def test_padding_invariance(engine, tiny_model):
    model, _ = tiny_model
    ids, labels = make_batch([10, 31])
    alone = build_gradient_computer(model, engine).compute(ids[:1, :10], labels[:1, :10])[0]
    padded = build_gradient_computer(model, engine).compute(ids, labels)[0]
    first = OrderedDict((n, g[:1]) for n, g in padded.items())
    assert rel_err(first, alone) < 1e-5


def test_gradients_are_per_sample_not_summed(tiny_model):
    model, _ = tiny_model
    ids, labels = make_batch([14, 14], seed=3)
    both = build_gradient_computer(model, "hooks").compute(ids, labels)[0]
    second = build_gradient_computer(model, "hooks").compute(ids[1:], labels[1:])[0]
    assert rel_err(OrderedDict((n, g[1:]) for n, g in both.items()), second) < 1e-5
    assert min((both[n][0] - both[n][1]).norm().item() for n in both) > 0


def test_bf16_gradients_close_to_fp32():
    model32, _ = tiny_lora_model()
    model16, _ = tiny_lora_model(dtype="bfloat16")
    ids, labels = make_batch([16, 11])
    g32 = build_gradient_computer(model32, "hooks").compute(ids, labels)[0]
    for engine in ("hooks", "vmap"):
        g16, _ = build_gradient_computer(model16, engine).compute(ids, labels)
        assert all(g.dtype == torch.float32 for g in g16.values())
        assert rel_err(g16, g32) < 0.05


def test_unknown_engine_and_bad_chunk():
    model, _ = tiny_lora_model()
    with pytest.raises(ConfigError, match="engine"):
        build_gradient_computer(model, "magic")
    with pytest.raises(ConfigError, match="chunk_size"):
        build_gradient_computer(model, "vmap", chunk_size=0)


def test_adam_precondition_matches_hand_computation():
    g = OrderedDict(a=torch.tensor([[1.0, -2.0], [0.5, 0.0]]), b=torch.tensor([[[3.0]], [[-1.0]]]))
    m = {"b": torch.tensor([[0.2]]), "a": torch.tensor([0.1, 0.1])}  # keyed by name, any order
    v = {"a": torch.tensor([0.01, 0.04]), "b": torch.tensor([[0.09]])}
    adam = AdamState(beta1=0.9, beta2=0.99, eps=1e-8)
    out = adam_precondition(g, m, v, adam)
    # sample 0, coordinate 0 of "a": m' = .9*.1 + .1*1 = .19 ; v' = .99*.01 + .01*1 = .0199
    assert out["a"][0, 0].item() == pytest.approx(0.19 / (0.0199**0.5 + 1e-8), rel=1e-6)
    # sample 1 of "b": m' = .9*.2 + .1*(-1) = .08 ; v' = .99*.09 + .01*1 = .0991
    assert out["b"][1, 0, 0].item() == pytest.approx(0.08 / (0.0991**0.5 + 1e-8), rel=1e-6)
    assert list(out) == ["a", "b"]


def test_adam_precondition_refuses_mismatched_names_and_shapes():
    g = OrderedDict(a=torch.ones(2, 3))
    adam = AdamState()
    with pytest.raises(IncompatibleArtifactError, match="missing"):
        adam_precondition(g, {"x": torch.ones(3)}, {"a": torch.ones(3)}, adam)
    with pytest.raises(ShapeMismatchError, match="shape"):
        adam_precondition(g, {"a": torch.ones(4)}, {"a": torch.ones(4)}, adam)


@pytest.mark.parametrize("engine", ENGINES)
def test_returned_gradients_are_detached(engine, tiny_model):
    model, _ = tiny_model
    grads, losses = build_gradient_computer(model, engine).compute(*make_batch([9, 12]))
    assert not losses.requires_grad
    assert not any(g.requires_grad for g in grads.values())
