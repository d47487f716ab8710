"""Seeded, labelled corruption of responses, to test whether scores single out bad samples.

The kinds (word level, independent of any tokenizer), after the CLUES paper plus one for GSM8K:

- ``cut``: keep only the first 10–50 % of the response's words (at least one), `cut_words`.
- ``delete``: drop a fraction (default 0.3) of the words at random, keeping at least one, `delete_words`.
- ``exchange``: the chosen samples swap responses along a random cycle (a derangement: nobody keeps its own),
  `derangement`; needs at least two samples.
- ``wrong_answer``: change the number after ``####`` to a different plausible integer, and the same number in
  the last reasoning line, `wrong_answer` (GSM8K-style responses only).

`inject_noise` is the entry point. It picks disjoint random subsets, ``floor(rate * N)`` samples per kind, and
labels every sample with ``meta["noise"]`` (the kind or ``"clean"``). Word splitting keeps the original
whitespace between the words that remain.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import replace

from scoring.data import Sample
from scoring.errors import ConfigError, DataError

KINDS = ("cut", "delete", "exchange", "wrong_answer")
CUT_RANGE = (0.1, 0.5)
DELETE_FRACTION = 0.3
_WORD = re.compile(r"\S+")
_FINAL = re.compile(r"\s*(-?\d[\d,]*(?:\.\d+)?)")


def cut_words(text: str, rng: random.Random, low: float = CUT_RANGE[0], high: float = CUT_RANGE[1]) -> str:
    """Keep the first ``floor(W * u)`` words (at least 1), ``u ~ U(low, high)``, W the number of words."""
    spans = [m.span() for m in _WORD.finditer(text)]
    if not spans:
        return text
    keep = max(1, math.floor(len(spans) * rng.uniform(low, high)))
    return text[: spans[keep - 1][1]]


def delete_words(text: str, rng: random.Random, fraction: float = DELETE_FRACTION) -> str:
    """Drop ``round(W * fraction)`` random words (at least 1, at most W - 1); a one-word text is unchanged."""
    spans = [m.span() for m in _WORD.finditer(text)]
    n_drop = min(len(spans) - 1, max(1, round(len(spans) * fraction)))
    if n_drop <= 0:
        return text
    dropped = set(rng.sample(range(len(spans)), n_drop))
    pieces: list[str] = []
    prev_end = 0
    for i, (start, end) in enumerate(spans):
        if i not in dropped:  # keep the whitespace that preceded this word (unless it is the first kept)
            pieces.append((text[prev_end:start] if pieces else "") + text[start:end])
        prev_end = end
    return "".join(pieces)


def derangement(n: int, rng: random.Random) -> list[int]:
    """A random permutation ``p`` of ``range(n)``, n >= 2, with ``p[i] != i`` for all i (Sattolo)."""
    if n < 2:
        raise ConfigError(f"exchange: a derangement needs at least 2 samples, got {n}")
    perm = list(range(n))
    for i in range(n - 1, 0, -1):
        j = rng.randrange(i)
        perm[i], perm[j] = perm[j], perm[i]
    return perm


def _perturb(value: int, rng: random.Random) -> int:
    """A different integer 10–50 % away from ``value`` (at least 1), non-negative if ``value`` is."""
    step = max(1, round(abs(value) * rng.uniform(0.1, 0.5)))
    new = value + step * rng.choice((-1, 1))
    return value + step if value >= 0 > new else new


def _replace_number(line: str, old: str, new: str) -> str:
    """Replace ``old`` as a whole number after the last ``=`` of ``line`` (anywhere if it has none).

    Restricting to the result side keeps operands equal to the answer (``5 + 0 = 5``) untouched.
    """
    cut = line.rfind("=") + 1
    pattern = rf"(?<![\d.,]){re.escape(old)}(?![\d]|[.,]\d)"
    return line[:cut] + re.sub(pattern, new, line[cut:])


def wrong_answer(text: str, rng: random.Random) -> tuple[str, str]:
    """Change the final ``#### N`` to another plausible integer, also in the last line before it.

    Returns:
        (the new text, the new final number without thousands separators).

    Raises:
        DataError: ``text`` has no ``#### N`` final answer.
    """
    at = text.rfind("####")
    match = _FINAL.match(text, at + 4) if at >= 0 else None
    if match is None:
        raise DataError(f"wrong_answer: no '#### N' final answer in {text[-40:]!r}")
    written = match.group(1)
    new_value = _perturb(round(float(written.replace(",", ""))), rng)
    new_written = f"{new_value:,}" if "," in written else str(new_value)
    body = text[:at].rstrip("\n")
    head, sep, last = body.rpartition("\n")
    last = _replace_number(last, written, new_written)
    if "," in written:  # the reasoning may write the number without separators
        last = _replace_number(last, written.replace(",", ""), str(new_value))
    final = text[at : match.start(1)] + new_written + text[match.end(1) :]
    return head + sep + last + text[len(body) : at] + final, str(new_value)


def _counts(rates: Mapping[str, float], n: int) -> dict[str, int]:
    """Validate ``rates`` and turn them into per-kind sample counts (``floor(rate * n)``)."""
    for kind, rate in rates.items():
        if kind not in KINDS:
            raise ConfigError(f"rates.{kind}: unknown noise kind; choose from {list(KINDS)}")
        if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0.0 <= rate <= 1.0:
            raise ConfigError(f"rates.{kind}: must be a number in [0, 1], got {rate!r}")
    total = sum(rates.values())
    if total > 1.0 + 1e-9:
        raise ConfigError(f"rates: sum to {total:g} > 1 (the noisy subsets are disjoint)")
    counts = {kind: math.floor(rates.get(kind, 0.0) * n + 1e-9) for kind in KINDS}
    if counts["exchange"] == 1:
        raise ConfigError(f"rates.exchange: selects 1 of {n} samples; exchange needs at least 2")
    return counts


def _corrupt(kind: str, chosen: list[Sample], rng: random.Random, delete_fraction: float) -> list[Sample]:
    """Apply one kind to the chosen samples (in their given order) and label them."""
    if kind == "exchange":
        perm = derangement(len(chosen), rng)
        return [
            replace(s, response=chosen[p].response, meta={**s.meta, "noise": kind, "noise_source": chosen[p].id})
            for s, p in zip(chosen, perm, strict=True)
        ]
    out = []
    for s in chosen:
        extra: dict[str, str] = {}
        if kind == "cut":
            response = cut_words(s.response, rng)
        elif kind == "delete":
            response = delete_words(s.response, rng, delete_fraction)
        else:
            try:
                response, extra["noise_final"] = wrong_answer(s.response, rng)
            except DataError as exc:
                raise DataError(f"sample {s.id!r} ({s.origin}): {exc}") from exc
        out.append(replace(s, response=response, meta={**s.meta, "noise": kind, **extra}))
    return out


def inject_noise(
    samples: Sequence[Sample],
    rates: Mapping[str, float],
    seed: int,
    *,
    delete_fraction: float = DELETE_FRACTION,
) -> list[Sample]:
    """Corrupt disjoint random subsets of ``samples`` and label every sample.

    Args:
        samples: the clean samples (N of them); none may already carry ``meta["noise"]``.
        rates: fraction of N per kind, e.g. ``{"cut": 0.1, "delete": 0.1, "exchange": 0.1}``; kind k corrupts
            exactly ``floor(rates[k] * N)`` samples.
        seed: the same seed (and inputs) gives the same result in any process.
        delete_fraction: share of words ``delete`` drops.

    Returns:
        The N samples in their original order, ids unchanged, each with ``meta["noise"]`` set to its kind or
        ``"clean"`` (``exchange`` adds ``meta["noise_source"]``, the donor's id; ``wrong_answer`` adds
        ``meta["noise_final"]``).

    Raises:
        ConfigError: unknown kind, a rate outside [0, 1], rates summing above 1, or one sample for exchange.
        DataError: a sample already has a noise label, or has no ``#### N`` when chosen for ``wrong_answer``.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed: must be an int, got {seed!r}")
    if not 0.0 <= delete_fraction < 1.0:
        raise ConfigError(f"delete_fraction: must be in [0, 1), got {delete_fraction!r}")
    labelled = [s.id for s in samples if "noise" in s.meta]
    if labelled:
        raise DataError(f"samples already carry meta['noise'] (e.g. {labelled[:3]}); inject noise once")
    counts = _counts(rates, len(samples))
    order = list(range(len(samples)))
    random.Random(f"clues-noise:{seed}:select").shuffle(order)
    out = [replace(s, meta={**s.meta, "noise": "clean"}) for s in samples]
    start = 0
    for kind in KINDS:  # fixed order, so the dict order of ``rates`` does not matter
        chosen = sorted(order[start : start + counts[kind]])
        start += counts[kind]
        if chosen:  # each kind draws its edits from its own seeded stream
            rng = random.Random(f"clues-noise:{seed}:{kind}")
            corrupted = _corrupt(kind, [samples[i] for i in chosen], rng, delete_fraction)
            for index, noisy in zip(chosen, corrupted, strict=True):
                out[index] = noisy
    return out
