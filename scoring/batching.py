"""Tokenise samples with response-only labels and batch them with right padding.

Contains `TokenizedSample`, `tokenize_samples` (chat or Alpaca template; labels are -100 on prompt and
padding tokens, so the loss covers the response only), `truncate` and `make_batches` / `collate` (-> `Batch`).

Choose ``template="auto"`` (the tokenizer's chat template if any, else Alpaca). Batches are right-padded: the
gradient engines rely on causal attention plus right padding for padding invariance.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from scoring.data import IGNORE_INDEX, Sample
from scoring.errors import ConfigError, DataError

TEMPLATES = ("auto", "chat", "alpaca")


@dataclass(frozen=True)
class TokenizedSample:
    """A tokenised sample: ``labels[i]`` is ``input_ids[i]`` on response tokens and -100 elsewhere.

    Attributes:
        id: the sample id.
        input_ids: (L,) token ids, prompt then response.
        labels: (L,) same length as ``input_ids``.
        truncated: whether prompt or response tokens were dropped to fit ``max_len``.
    """

    id: str
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    @property
    def num_response_tokens(self) -> int:
        """How many tokens carry loss."""
        return response_token_count(self.labels)


def response_token_count(labels: Sequence[int]) -> int:
    """Number of labelled (not -100) positions."""
    return sum(1 for label in labels if label != IGNORE_INDEX)


def _chat_ids(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> list[int]:
    ids = tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=generation_prompt, return_dict=False
    )
    return list(ids["input_ids"] if isinstance(ids, Mapping) else ids)


def _encode_chat(sample: Sample, tokenizer: Any) -> tuple[list[int], list[int]]:
    """Prompt ids (with the generation prompt) and response ids (through the end-of-turn token).

    The response ids are the tail of the full rendered conversation after the prompt prefix; tokens the
    template adds after the last eos (ChatML's trailing newline) are dropped, as generation stops at eos.
    If the prompt does not render as a prefix of the full conversation (templates that rewrite earlier
    turns), the response is tokenised on its own and followed by eos.
    """
    messages = [{"role": role, "content": content} for role, content in sample.prompt]
    prompt_ids = _chat_ids(tokenizer, messages, True)
    full_ids = _chat_ids(tokenizer, [*messages, {"role": "assistant", "content": sample.response}], False)
    eos = tokenizer.eos_token_id
    if full_ids[: len(prompt_ids)] != prompt_ids:
        return prompt_ids, tokenizer(sample.response, add_special_tokens=False)["input_ids"] + [eos]
    response_ids = full_ids[len(prompt_ids) :]
    if eos in response_ids:
        response_ids = response_ids[: len(response_ids) - response_ids[::-1].index(eos)]
    return prompt_ids, response_ids


def alpaca_prompt(prompt: Sequence[tuple[str, str]]) -> str:
    r"""Render prompt turns in the Alpaca layout, ending with ``"### Response:\n"``."""
    heads = {"system": "", "user": "### Instruction:\n", "assistant": "### Response:\n"}
    return "".join(f"{heads[role]}{content}\n\n" for role, content in prompt) + "### Response:\n"


def _encode_alpaca(sample: Sample, tokenizer: Any) -> tuple[list[int], list[int]]:
    prompt_ids = tokenizer(alpaca_prompt(sample.prompt))["input_ids"]
    response_ids = tokenizer(sample.response, add_special_tokens=False)["input_ids"]
    return list(prompt_ids), [*response_ids, tokenizer.eos_token_id]


def truncate(prompt_ids: list[int], response_ids: list[int], max_len: int) -> tuple[list[int], list[int], bool]:
    """Fit prompt + response into ``max_len`` tokens.

    At least ``min(len(response_ids), max_len // 2)`` response tokens are kept; prompt tokens are dropped from
    the left (its end, with the question and the generation prompt, survives), response tokens from the right.

    Returns:
        (kept prompt ids, kept response ids, whether anything was dropped).
    """
    if len(prompt_ids) + len(response_ids) <= max_len:
        return prompt_ids, response_ids, False
    keep_prompt = min(len(prompt_ids), max_len - min(len(response_ids), max_len // 2))
    keep_response = min(len(response_ids), max_len - keep_prompt)
    return prompt_ids[len(prompt_ids) - keep_prompt :], response_ids[:keep_response], True


def _encoder(tokenizer: Any, template: str) -> Callable[[Sample, Any], tuple[list[int], list[int]]]:
    """The (prompt ids, response ids) encoder of ``template`` for ``tokenizer`` (``auto``: chat if it has one)."""
    if template not in TEMPLATES:
        raise ConfigError(f"template: must be one of {list(TEMPLATES)}, got {template!r}")
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if template == "chat" and not has_chat:
        raise ConfigError("template: 'chat' needs a tokenizer with a chat_template")
    if tokenizer.eos_token_id is None:
        raise ConfigError("tokenizer: has no eos token")
    return _encode_chat if template == "chat" or (template == "auto" and has_chat) else _encode_alpaca


def tokenize_samples(
    samples: Sequence[Sample], tokenizer: Any, max_len: int, template: str = "auto"
) -> list[TokenizedSample]:
    """Tokenise samples with loss on response tokens only (see `truncate` for what ``max_len`` drops).

    Args:
        samples: the samples.
        tokenizer: a Hugging Face tokenizer with an eos token.
        max_len: the most tokens per sample (at least 2).
        template: ``"chat"`` (``tokenizer.apply_chat_template``; response through the end-of-turn token),
            ``"alpaca"`` (`alpaca_prompt`, response + eos) or ``"auto"`` (chat if the tokenizer has one).

    Raises:
        ConfigError: bad ``max_len`` or ``template``, chat template missing, or no eos token.
        DataError: a sample has no response tokens (names the id).
    """
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 2:
        raise ConfigError(f"max_len: must be an int >= 2, got {max_len!r}")
    encode = _encoder(tokenizer, template)
    out = []
    for sample in samples:
        prompt_ids, response_ids = encode(sample, tokenizer)
        if not response_ids:
            raise DataError(f"sample {sample.id!r} ({sample.origin}): the response has no tokens")
        prompt_ids, response_ids, cut = truncate(prompt_ids, response_ids, max_len)
        labels = [IGNORE_INDEX] * len(prompt_ids) + list(response_ids)
        out.append(TokenizedSample(sample.id, [*prompt_ids, *response_ids], labels, cut))
    return out


# --- batching ---


@dataclass(frozen=True)
class Batch:
    """Right-padded tensors of a batch (with causal attention, right pads never affect real positions).

    Attributes:
        ids: (B,) sample ids, row order.
        input_ids: (B, L) LongTensor, padded with the pad id.
        labels: (B, L) LongTensor, -100 on prompt and padding.
        attention_mask: (B, L) LongTensor, 1 on real tokens.
    """

    ids: list[str]
    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens in the batch."""
        return int(self.attention_mask.sum())


def collate(items: Sequence[TokenizedSample], pad_id: int) -> Batch:
    """Right-pad tokenised samples into one `Batch` (L = the longest sample)."""
    width = max(len(item.input_ids) for item in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)  # (B, L)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)  # (B, L)
    mask = torch.zeros((len(items), width), dtype=torch.long)  # (B, L)
    for row, item in enumerate(items):
        n = len(item.input_ids)
        input_ids[row, :n] = torch.tensor(item.input_ids, dtype=torch.long)
        labels[row, :n] = torch.tensor(item.labels, dtype=torch.long)
        mask[row, :n] = 1
    return Batch([item.id for item in items], input_ids, labels, mask)


def make_batches(
    tokenized: Sequence[TokenizedSample],
    batch_size: int,
    pad_id: int,
    bucket: bool = True,
    max_tokens: int | None = None,
) -> list[Batch]:
    """Group tokenised samples into right-padded batches.

    Args:
        tokenized: the samples.
        batch_size: the most samples per batch.
        pad_id: the padding token id.
        bucket: sort by length first (stable: ties keep input order), so each batch holds similar lengths and
            batches come in ascending length; otherwise batches follow input order. Key results by ids.
        max_tokens: if set, the most padded tokens (B * L) per batch.

    Raises:
        ConfigError: a bad argument, or a sample longer than ``max_tokens`` (names the id).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size: must be a positive int, got {batch_size!r}")
    if max_tokens is not None and max_tokens < 1:
        raise ConfigError(f"max_tokens: must be None or positive, got {max_tokens!r}")
    if pad_id is None:
        raise ConfigError("pad_id: the tokenizer has no pad (or eos) token id")
    order = sorted(tokenized, key=lambda t: len(t.input_ids)) if bucket else list(tokenized)
    groups: list[list[TokenizedSample]] = []
    current: list[TokenizedSample] = []
    for item in order:
        n = len(item.input_ids)
        if max_tokens is not None and n > max_tokens:
            raise ConfigError(f"max_tokens: sample {item.id!r} has {n} tokens > max_tokens={max_tokens}")
        width = max([n, *(len(c.input_ids) for c in current)])
        if current and (len(current) == batch_size or (max_tokens and (len(current) + 1) * width > max_tokens)):
            groups.append(current)
            current = []
        current.append(item)
    if current:
        groups.append(current)
    return [collate(group, pad_id) for group in groups]


# --- the response without its prompt ---


def unconditional_samples(
    samples: Sequence[Sample], tokenized: Sequence[TokenizedSample], tokenizer: Any, template: str = "auto"
) -> list[TokenizedSample]:
    """Each sample's response after an empty prompt, for the unconditional loss ℓ(y|∅).

    The prompt is the template rendered with the user turns emptied (one empty user turn; system turns stay, as
    they are part of the template rather than of the question). The response tokens are exactly the labelled
    tokens of ``tokenized`` (after its truncation), so ℓ(y|∅) and ℓ(y|x) average the log-likelihood of the same
    tokens and differ only in what precedes them.

    Args:
        samples: the samples, in the order of ``tokenized``.
        tokenized: their `tokenize_samples` output (same template).
        tokenizer, template: as for `tokenize_samples`.

    Raises:
        ConfigError: a bad template, or ``samples`` and ``tokenized`` do not match by id.
    """
    if len(samples) != len(tokenized) or any(s.id != t.id for s, t in zip(samples, tokenized, strict=False)):
        raise ConfigError("tokenized: must be tokenize_samples(samples) in the same order")
    encode = _encoder(tokenizer, template)
    out = []
    for sample, item in zip(samples, tokenized, strict=True):
        turns = [(role, text) for role, text in sample.prompt if role == "system"] + [("user", "")]
        prompt_ids, _ = encode(Sample(sample.id, tuple(turns), sample.response), tokenizer)
        response_ids = [label for label in item.labels if label != IGNORE_INDEX]
        out.append(
            TokenizedSample(item.id, [*prompt_ids, *response_ids], [IGNORE_INDEX] * len(prompt_ids) + response_ids)
        )
    return out
