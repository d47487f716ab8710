"""Coordinator-side evaluation of a (federated) adapter on a held-out clean set.

Contains `response_loss` (mean response loss and perplexity, the loss training minimises), `pubmedqa_accuracy`
(yes/no/maybe by option log-likelihood or by greedy generation), `gsm8k_exact_match` (greedy generation, the final
number compared with the reference), the parsers `parse_pubmedqa_answer` and `extract_final_number`, the greedy
`generate_texts`, and `evaluate`, which runs the tasks that fit the samples.

Prompts are tokenised with `scoring.batching.tokenize_samples`, so the model sees exactly the prompt tokens of
training (same template and special tokens). A prompt too long for ``max_len`` is cut from the left as in training,
but keeps more of its context: how much `truncate` keeps depends on the response, and here the response is short
(an option, or a placeholder before generation). Choose ``pubmedqa_method="loglik"`` for a cheap, stable number (one
forward per option, no parsing); ``generate`` tests the full answer format but costs ``max_new_tokens`` decoding
steps per batch.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

from scoring.batching import TokenizedSample, collate, tokenize_samples
from scoring.config import DEFAULT_MAX_LEN
from scoring.data import IGNORE_INDEX, PUBMEDQA_DECISIONS, Sample
from scoring.errors import ConfigError, DataError
from scoring.gradients import label_positions, response_losses

EVAL_TASKS = ("loss", "pubmedqa", "gsm8k")
PUBMEDQA_METHODS = ("loglik", "generate")
_FINAL_ANSWER = re.compile(r"final answer\s*:\s*(yes|no|maybe)\b", re.IGNORECASE)
_DECISION = re.compile(r"\b(yes|no|maybe)\b", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?|-?\.\d+")  # 1,080.5 | 72 | 0.25 | .5


@contextmanager
def _inference(model: nn.Module) -> Iterator[torch.device]:
    """Eval mode and no_grad for the block (the model's mode is restored after); yields the model's device."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield next(model.parameters()).device
    finally:
        model.train(was_training)


def _pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _length_order(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Index groups of at most ``batch_size``, by ascending length (less padding); results are put back by index."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size: must be a positive int, got {batch_size!r}")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _require_samples(samples: Sequence[Sample]) -> None:
    if not samples:
        raise DataError("no evaluation samples")


def _token_losses(
    model: nn.Module, tokenized: Sequence[TokenizedSample], pad_id: int, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """(N,) mean response-token loss and (N,) number of loss-bearing tokens of each sample, in input order."""
    losses, counts = np.zeros(len(tokenized)), np.zeros(len(tokenized), dtype=np.int64)
    with _inference(model) as device:
        for group in _length_order([len(t.input_ids) for t in tokenized], batch_size):
            batch = collate([tokenized[i] for i in group], pad_id)
            labels = batch.labels.to(device)
            pos, target, weight = label_positions(labels)
            out = response_losses(model, batch.input_ids.to(device), pos, target, weight)  # (B,)
            losses[group] = out.double().cpu().numpy()
            counts[group] = (labels[:, 1:] != IGNORE_INDEX).sum(1).cpu().numpy()
    return losses, counts


def response_loss(
    model: nn.Module,
    tokenizer: Any,
    samples: Sequence[Sample],
    *,
    max_len: int = DEFAULT_MAX_LEN,
    template: str = "auto",
    batch_size: int = 8,
) -> dict[str, float | int]:
    """Response loss of ``samples`` under ``model`` (eval mode, no gradients).

    Returns:
        ``loss``: the mean over samples of each sample's mean response-token loss (the training loss);
        ``token_loss``: the loss averaged over all response tokens; ``perplexity``: ``exp(token_loss)``;
        ``num_samples``.
    """
    _require_samples(samples)
    tokenized = tokenize_samples(samples, tokenizer, max_len, template)
    losses, counts = _token_losses(model, tokenized, _pad_id(tokenizer), batch_size)
    token_loss = float((losses * counts).sum() / counts.sum())
    return {
        "loss": float(losses.mean()),
        "token_loss": token_loss,
        "perplexity": math.exp(min(token_loss, 700.0)),  # exp overflows float64 past ~709
        "num_samples": len(samples),
    }


# --- generation ---


def _prompt_ids(samples: Sequence[Sample], tokenizer: Any, max_len: int, template: str) -> list[list[int]]:
    """The prompt tokens (with the generation prompt) of each sample, exactly as `tokenize_samples` renders them.

    A one-character placeholder stands in for the response, so the prompt keeps all but a token or two of
    ``max_len`` when it must be cut.
    """
    stubs = [Sample(s.id, s.prompt, ".") for s in samples]
    return [
        t.input_ids[: sum(1 for label in t.labels if label == IGNORE_INDEX)]
        for t in tokenize_samples(stubs, tokenizer, max_len, template)
    ]


def _generate_batch(model: nn.Module, prompts: list[list[int]], tokenizer: Any, max_new_tokens: int, device) -> list:
    """Greedy continuations (token ids up to, not including, eos) of left-padded prompts."""
    width, pad, eos = max(len(p) for p in prompts), _pad_id(tokenizer), tokenizer.eos_token_id
    input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)  # (B, W), left-padded
    mask = torch.zeros((len(prompts), width), dtype=torch.long)  # (B, W)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        mask[row, width - len(ids) :] = 1
    out = model.generate(
        input_ids=input_ids.to(device),
        attention_mask=mask.to(device),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=pad,
        eos_token_id=eos,
    )
    new = out[:, width:].cpu().tolist()  # (B, <= max_new_tokens)
    return [row[: row.index(eos)] if eos in row else row for row in new]


def generate_texts(
    model: nn.Module,
    tokenizer: Any,
    samples: Sequence[Sample],
    *,
    max_new_tokens: int = 256,
    max_len: int = DEFAULT_MAX_LEN,
    template: str = "auto",
    batch_size: int = 8,
) -> list[str]:
    """Greedy completions of the samples' prompts (their responses are ignored), in input order.

    Prompts are left-padded per batch; decoding stops at eos or after ``max_new_tokens`` tokens.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens: must be a positive int, got {max_new_tokens!r}")
    prompts = _prompt_ids(samples, tokenizer, max_len, template)
    texts = [""] * len(prompts)
    with _inference(model) as device:
        for group in _length_order([len(p) for p in prompts], batch_size):
            outputs = _generate_batch(model, [prompts[i] for i in group], tokenizer, max_new_tokens, device)
            for i, ids in zip(group, outputs, strict=True):
                texts[i] = tokenizer.decode(ids, skip_special_tokens=True)
    return texts


# --- PubMedQA ---


def parse_pubmedqa_answer(text: str) -> str | None:
    """The decision in a generated answer: the last ``Final answer: X``, else the first yes/no/maybe word."""
    finals = _FINAL_ANSWER.findall(text)
    if finals:
        return finals[-1].lower()
    first = _DECISION.search(text)
    return first.group(1).lower() if first else None


def _pubmedqa_labels(samples: Sequence[Sample]) -> list[str]:
    labels = []
    for sample in samples:
        label = sample.meta.get("label")
        if label not in PUBMEDQA_DECISIONS:
            raise DataError(
                f"sample {sample.id!r}: meta 'label' must be one of {list(PUBMEDQA_DECISIONS)}, got {label!r}"
            )
        labels.append(label)
    return labels


def option_logliks(
    model: nn.Module, tokenizer: Any, samples: Sequence[Sample], *, max_len: int, template: str, batch_size: int
) -> np.ndarray:
    """(N, 3) total log-likelihood of the response ``"Final answer: <option>"`` (end-of-turn token included) for
    each sample's prompt and each option of `PUBMEDQA_DECISIONS`, in that order."""
    variants = [Sample(s.id, s.prompt, f"Final answer: {option}") for s in samples for option in PUBMEDQA_DECISIONS]
    tokenized = tokenize_samples(variants, tokenizer, max_len, template)
    losses, counts = _token_losses(model, tokenized, _pad_id(tokenizer), batch_size)
    return (-losses * counts).reshape(len(samples), len(PUBMEDQA_DECISIONS))  # (N*3,) -> (N, 3)


def pubmedqa_accuracy(
    model: nn.Module,
    tokenizer: Any,
    samples: Sequence[Sample],
    *,
    method: str = "loglik",
    max_len: int = DEFAULT_MAX_LEN,
    template: str = "auto",
    max_new_tokens: int = 128,
    batch_size: int = 8,
) -> dict[str, float | int]:
    """Accuracy of the yes/no/maybe decision on PubMedQA samples (``meta["label"]``).

    Args:
        method: ``loglik``: the option whose ``"Final answer: <option>"`` is most likely after the prompt (ties go
            to the first of yes, no, maybe); ``generate``: greedy generation parsed by `parse_pubmedqa_answer`
            (no decision found counts as wrong).

    Returns:
        ``accuracy`` in [0, 1] and ``num_samples``.

    Raises:
        ConfigError: an unknown ``method``.
        DataError: no samples, or a sample without a yes/no/maybe label (names it).
    """
    if method not in PUBMEDQA_METHODS:
        raise ConfigError(f"method: must be one of {list(PUBMEDQA_METHODS)}, got {method!r}")
    _require_samples(samples)
    labels = _pubmedqa_labels(samples)
    if method == "loglik":
        scores = option_logliks(model, tokenizer, samples, max_len=max_len, template=template, batch_size=batch_size)
        predicted = [PUBMEDQA_DECISIONS[i] for i in scores.argmax(1)]
    else:
        gen = {"max_new_tokens": max_new_tokens, "max_len": max_len, "template": template, "batch_size": batch_size}
        texts = generate_texts(model, tokenizer, samples, **gen)
        predicted = [parse_pubmedqa_answer(text) for text in texts]
    correct = sum(p == label for p, label in zip(predicted, labels, strict=True))
    return {"accuracy": correct / len(samples), "num_samples": len(samples)}


# --- GSM8K ---


def normalise_number(text: str) -> str:
    """Canonical form of a number string: commas removed, trailing zeros after a decimal point and a bare trailing
    point dropped (``"1,080.0"`` -> ``"1080"``, ``"2.50"`` -> ``"2.5"``, ``"-0"`` -> ``"0"``)."""
    out = text.strip().replace(",", "")
    if "." in out:
        out = out.rstrip("0").rstrip(".")
    return "0" if out == "-0" else out


def extract_final_number(text: str) -> str | None:
    """The answer of a GSM8K-style solution: the first number after the last ``####``, else the last number in the
    text, normalised with `normalise_number`; None when the text holds no number."""
    _, sep, tail = text.rpartition("####")
    if sep:
        after = _NUMBER.search(tail)
        if after:
            return normalise_number(after.group())
    numbers = _NUMBER.findall(text)
    return normalise_number(numbers[-1]) if numbers else None


def _gsm8k_finals(samples: Sequence[Sample]) -> list[str]:
    finals = []
    for sample in samples:
        final = sample.meta.get("final")
        number = extract_final_number(str(final)) if isinstance(final, str | int | float) else None
        if number is None:
            raise DataError(f"sample {sample.id!r}: meta 'final' must hold the reference number, got {final!r}")
        finals.append(number)
    return finals


def gsm8k_exact_match(
    model: nn.Module,
    tokenizer: Any,
    samples: Sequence[Sample],
    *,
    max_new_tokens: int = 256,
    max_len: int = DEFAULT_MAX_LEN,
    template: str = "auto",
    batch_size: int = 8,
) -> dict[str, float | int]:
    """Share of GSM8K samples whose greedy answer's `extract_final_number` equals ``meta["final"]``.

    Returns:
        ``exact_match`` in [0, 1] and ``num_samples``.

    Raises:
        DataError: no samples, or a sample without a numeric ``meta["final"]`` (names it).
    """
    _require_samples(samples)
    finals = _gsm8k_finals(samples)
    gen = {"max_new_tokens": max_new_tokens, "max_len": max_len, "template": template, "batch_size": batch_size}
    texts = generate_texts(model, tokenizer, samples, **gen)
    correct = sum(extract_final_number(text) == final for text, final in zip(texts, finals, strict=True))
    return {"exact_match": correct / len(samples), "num_samples": len(samples)}


# --- all tasks ---


def detect_tasks(samples: Sequence[Sample]) -> tuple[str, ...]:
    """``loss``, plus ``pubmedqa`` when every sample has a yes/no/maybe label and ``gsm8k`` when every sample has
    ``meta["final"]``."""
    tasks = ["loss"]
    if samples and all(s.meta.get("label") in PUBMEDQA_DECISIONS for s in samples):
        tasks.append("pubmedqa")
    if samples and all("final" in s.meta for s in samples):
        tasks.append("gsm8k")
    return tuple(tasks)


def _check_tasks(tasks: Sequence[str] | str) -> tuple[str, ...]:
    tasks = (tasks,) if isinstance(tasks, str) else tuple(tasks)
    unknown = [t for t in tasks if t not in EVAL_TASKS]
    if unknown or not tasks:
        raise ConfigError(f"tasks: must be a non-empty subset of {list(EVAL_TASKS)}, got unknown {unknown}")
    return tasks


def evaluate(
    model: nn.Module,
    tokenizer: Any,
    samples: Sequence[Sample],
    *,
    tasks: Sequence[str] | None = None,
    max_len: int = DEFAULT_MAX_LEN,
    template: str = "auto",
    batch_size: int = 8,
    max_new_tokens: int = 256,
    pubmedqa_method: str = "loglik",
) -> dict[str, float | int]:
    """Run the evaluation ``tasks`` (None: `detect_tasks`) on ``samples``.

    Returns:
        A flat dict: ``loss``, ``token_loss``, ``perplexity``, ``num_samples`` (task ``loss``);
        ``pubmedqa_accuracy``, ``pubmedqa_n``; ``gsm8k_exact_match``, ``gsm8k_n``.

    Raises:
        ConfigError: an unknown task (names ``tasks``) or a bad option.
        DataError: no samples, or samples that lack what a requested task needs.
    """
    _require_samples(samples)
    tasks = detect_tasks(samples) if tasks is None else _check_tasks(tasks)
    common = {"max_len": max_len, "template": template, "batch_size": batch_size}
    out: dict[str, float | int] = {}
    if "loss" in tasks:
        out |= response_loss(model, tokenizer, samples, **common)
    if "pubmedqa" in tasks:
        result = pubmedqa_accuracy(
            model, tokenizer, samples, method=pubmedqa_method, max_new_tokens=max_new_tokens, **common
        )
        out |= {"pubmedqa_accuracy": result["accuracy"], "pubmedqa_n": result["num_samples"]}
    if "gsm8k" in tasks:
        result = gsm8k_exact_match(model, tokenizer, samples, max_new_tokens=max_new_tokens, **common)
        out |= {"gsm8k_exact_match": result["exact_match"], "gsm8k_n": result["num_samples"]}
    return out


def evaluate_adapter(
    bundle: Any,
    samples: Sequence[Sample],
    spec: dict[str, Any],
    *,
    work_dir: Any,
    dtype: str = "float32",
    device: str = "cpu",
    cache_dir: Any = None,
) -> dict[str, float | int]:
    """`evaluate` a training job's adapter (a `scoring.io.CheckpointBundle`) on ``samples`` with the job's
    ``spec`` (``model``, ``max_len``, ``template`` and its ``evaluation`` options); the peft adapter is written
    to a temporary directory under ``work_dir`` and loaded onto the base model."""
    import tempfile
    from pathlib import Path

    from scoring.io import write_checkpoint_dir
    from scoring.models import load_adapter, load_base_model

    ev = spec.get("evaluation") or {}
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        write_checkpoint_dir(bundle, Path(tmp))
        base = load_base_model(spec["model"], dtype=dtype, device=device, cache_dir=cache_dir)
        model = load_adapter(base.model, Path(tmp) / "adapter", trainable=False)
        model.eval()
        return evaluate(
            model,
            base.tokenizer,
            samples,
            tasks=ev.get("tasks"),
            max_len=spec["max_len"],
            template=spec["template"],
            batch_size=ev.get("batch_size", 8),
            max_new_tokens=ev.get("max_new_tokens", 256),
            pubmedqa_method=ev.get("pubmedqa_method", "loglik"),
        )
