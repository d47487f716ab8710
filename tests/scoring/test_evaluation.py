"""Coordinator-side evaluation: response loss against a per-sample hand loop, PubMedQA option log-likelihoods
against a direct per-option computation, answer parsers, greedy generation and task detection."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from scoring.batching import tokenize_samples
from scoring.data import IGNORE_INDEX, PUBMEDQA_DECISIONS, Sample, load_gsm8k, load_pubmedqa
from scoring.errors import ConfigError, DataError
from scoring.federated import evaluation
from scoring.federated.evaluation import (
    EVAL_TASKS,
    detect_tasks,
    evaluate,
    extract_final_number,
    generate_texts,
    gsm8k_exact_match,
    option_logliks,
    parse_pubmedqa_answer,
    pubmedqa_accuracy,
    response_loss,
)
from tests.conftest import tiny_lora_model
from tests.scoring.test_data import GSM8K, PUBMEDQA

MAX_LEN = 64


@pytest.fixture(scope="module")
def tiny():
    return tiny_lora_model()


def _plain(n=5):
    return [Sample(f"s{i}", (("user", f"Question {i}?"),), "ok " * (i + 1) + "done.") for i in range(n)]


def _nll(model, ids: list[int], labels: list[int]) -> tuple[float, int]:
    """Summed response-token NLL of one unpadded sample and its token count (full-vocabulary softmax)."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].double()  # (L-1, V)
    target = torch.tensor(labels[1:])
    keep = target != IGNORE_INDEX
    nll = F.cross_entropy(logits[keep], target[keep], reduction="sum")
    return float(nll), int(keep.sum())


def test_response_loss_matches_a_per_sample_loop(tiny):
    model, tok = tiny
    samples = _plain()
    model.train()  # the mode is restored afterwards; the loss itself is taken in eval mode
    out = response_loss(model, tok, samples, max_len=MAX_LEN, batch_size=2)
    assert model.training
    model.eval()
    per_sample = [_nll(model, t.input_ids, t.labels) for t in tokenize_samples(samples, tok, MAX_LEN)]
    sums, counts = [s for s, _ in per_sample], [c for _, c in per_sample]
    assert len(set(counts)) > 1  # lengths differ, so the two means differ
    assert out["loss"] == pytest.approx(sum(s / c for s, c in zip(sums, counts, strict=True)) / len(samples), rel=1e-5)
    assert out["token_loss"] == pytest.approx(sum(sums) / sum(counts), rel=1e-5)
    assert out["loss"] != pytest.approx(out["token_loss"], rel=1e-6)
    assert out["perplexity"] == pytest.approx(math.exp(out["token_loss"]))
    assert out["num_samples"] == len(samples)


def test_option_logliks_and_argmax_accuracy(tiny):
    model, tok = tiny
    samples = load_pubmedqa(PUBMEDQA, limit=6)
    scores = option_logliks(model, tok, samples, max_len=MAX_LEN, template="auto", batch_size=4)
    assert scores.shape == (6, 3)
    for i, sample in enumerate(samples):
        for j, option in enumerate(PUBMEDQA_DECISIONS):
            variant = Sample(sample.id, sample.prompt, f"Final answer: {option}")
            (t,) = tokenize_samples([variant], tok, MAX_LEN)
            assert scores[i, j] == pytest.approx(-_nll(model, t.input_ids, t.labels)[0], rel=1e-5)
    picked = [PUBMEDQA_DECISIONS[j] for j in scores.argmax(1)]
    expected = sum(p == s.meta["label"] for p, s in zip(picked, samples, strict=True)) / len(samples)
    assert pubmedqa_accuracy(model, tok, samples, max_len=MAX_LEN) == {"accuracy": expected, "num_samples": 6}


def test_loglik_prompt_tokens_are_the_training_ones(tiny):
    _, tok = tiny
    (sample,) = load_pubmedqa(PUBMEDQA, limit=1)
    (train,) = tokenize_samples([sample], tok, 100_000)  # no truncation (which cuts prompts by response length)
    (option,) = tokenize_samples([Sample(sample.id, sample.prompt, "Final answer: yes")], tok, 100_000)
    assert not train.truncated
    n_prompt = train.labels.count(IGNORE_INDEX)
    assert option.input_ids[:n_prompt] == train.input_ids[:n_prompt]
    assert option.labels.count(IGNORE_INDEX) == n_prompt


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Because ...\nFinal answer: yes", "yes"),
        ("Final answer: no. Wait. final answer:Maybe", "maybe"),
        ("No idea, maybe yes", "no"),
        ("nothing useful", None),
        ("yesterday: unknown", None),
    ],
)
def test_parse_pubmedqa_answer(text, expected):
    assert parse_pubmedqa_answer(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("48/2 = 24 clips\n#### 72", "72"),
        ("#### 5 then #### 1,080", "1080"),
        ("The answer is 18.", "18"),
        ("costs $3.50 and 2.0", "2"),
        ("#### 7.50", "7.5"),
        ("1,2,3", "3"),
        ("-4 degrees, then -0.0", "0"),
        ("#### unknown, but 12 apples", "12"),
        ("no digits here ####", None),
    ],
)
def test_extract_final_number(text, expected):
    assert extract_final_number(text) == expected


def test_generation_is_padding_invariant_and_starts_from_the_prompt(tiny):
    model, tok = tiny
    samples = load_gsm8k(GSM8K, limit=3)
    prompt_ids = evaluation._prompt_ids(samples, tok, 400, "auto")
    assert len({len(p) for p in prompt_ids}) == 3  # untruncated prompts of different lengths: padding is needed
    batched = generate_texts(model, tok, samples, max_new_tokens=5, max_len=400, batch_size=3)
    alone = [generate_texts(model, tok, [s], max_new_tokens=5, max_len=400)[0] for s in samples]
    assert batched == alone and all(batched)
    prompt_ids = evaluation._prompt_ids(samples, tok, 100_000, "auto")
    trained = tokenize_samples(samples, tok, 100_000)
    assert prompt_ids == [t.input_ids[: t.labels.count(IGNORE_INDEX)] for t in trained]


def test_gsm8k_exact_match_on_the_tiny_model(tiny):
    model, tok = tiny
    samples = load_gsm8k(GSM8K, limit=2)
    out = gsm8k_exact_match(model, tok, samples, max_new_tokens=4, max_len=MAX_LEN)
    assert 0.0 <= out["exact_match"] <= 1.0 and out["num_samples"] == 2


def test_gsm8k_scoring_of_given_texts(tiny, monkeypatch):
    samples = load_gsm8k(GSM8K, limit=3)
    finals = [s.meta["final"] for s in samples]
    texts = [f"so #### {finals[0]}.0", f"I think {finals[1]}0", "no number"]
    monkeypatch.setattr(evaluation, "generate_texts", lambda *args, **kwargs: texts)
    assert gsm8k_exact_match(*tiny, samples, max_len=MAX_LEN) == {"exact_match": pytest.approx(1 / 3), "num_samples": 3}


def test_pubmedqa_generate_path(tiny, monkeypatch):
    model, tok = tiny
    samples = load_pubmedqa(PUBMEDQA, limit=2)
    out = pubmedqa_accuracy(model, tok, samples, method="generate", max_new_tokens=4, max_len=MAX_LEN)
    assert 0.0 <= out["accuracy"] <= 1.0 and out["num_samples"] == 2
    labels = [s.meta["label"] for s in samples]
    texts = [f"Final answer: {labels[0]}", "Final answer: " + ("no" if labels[1] != "no" else "yes")]
    monkeypatch.setattr(evaluation, "generate_texts", lambda *args, **kwargs: texts)
    assert pubmedqa_accuracy(model, tok, samples, method="generate", max_len=MAX_LEN)["accuracy"] == 0.5


def test_evaluate_detects_tasks(tiny):
    model, tok = tiny
    pubmedqa, gsm8k, plain = load_pubmedqa(PUBMEDQA, limit=2), load_gsm8k(GSM8K, limit=2), _plain(2)
    assert detect_tasks(pubmedqa) == ("loss", "pubmedqa")
    assert detect_tasks(gsm8k) == ("loss", "gsm8k")
    assert detect_tasks([*pubmedqa, *plain]) == ("loss",)
    out = evaluate(model, tok, pubmedqa, max_len=MAX_LEN)
    assert set(out) == {"loss", "token_loss", "perplexity", "num_samples", "pubmedqa_accuracy", "pubmedqa_n"}
    assert out["loss"] == response_loss(model, tok, pubmedqa, max_len=MAX_LEN)["loss"]
    out = evaluate(model, tok, gsm8k, max_len=MAX_LEN, max_new_tokens=3)
    assert {"gsm8k_exact_match", "gsm8k_n"} <= set(out) and "pubmedqa_accuracy" not in out
    assert set(evaluate(model, tok, plain, max_len=MAX_LEN)) == {"loss", "token_loss", "perplexity", "num_samples"}
    assert set(evaluate(model, tok, gsm8k, tasks=["loss"], max_len=MAX_LEN)) == {
        "loss",
        "token_loss",
        "perplexity",
        "num_samples",
    }
    assert EVAL_TASKS == ("loss", "pubmedqa", "gsm8k")


def test_evaluation_errors(tiny):
    model, tok = tiny
    plain = _plain(2)
    with pytest.raises(ConfigError, match="tasks"):
        evaluate(model, tok, plain, tasks=["loss", "mmlu"])
    with pytest.raises(DataError, match=r"'s0'.*label"):
        evaluate(model, tok, plain, tasks=["pubmedqa"], max_len=MAX_LEN)
    with pytest.raises(DataError, match=r"'s0'.*final"):
        gsm8k_exact_match(model, tok, plain, max_len=MAX_LEN)
    with pytest.raises(ConfigError, match="method"):
        pubmedqa_accuracy(model, tok, load_pubmedqa(PUBMEDQA, limit=1), method="vote")
    with pytest.raises(DataError, match="no evaluation samples"):
        response_loss(model, tok, [])
    with pytest.raises(ConfigError, match="max_new_tokens"):
        generate_texts(model, tok, plain, max_new_tokens=0)


@pytest.mark.gpu
def test_cuda_matches_cpu(tiny):
    if not torch.cuda.is_available():
        pytest.skip("CUDA not available")
    model, tok = tiny
    samples = load_pubmedqa(PUBMEDQA, limit=3)
    cpu = evaluate(model, tok, samples, max_len=MAX_LEN)
    gpu_model = tiny_lora_model()[0].cuda()
    gpu = evaluate(gpu_model, tok, samples, max_len=MAX_LEN)
    assert gpu["loss"] == pytest.approx(cpu["loss"], rel=1e-4) and gpu["pubmedqa_n"] == 3
    assert len(generate_texts(gpu_model, tok, samples, max_new_tokens=3, max_len=MAX_LEN)) == 3
