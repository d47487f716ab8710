"""Tests of `scoring.noise`: each corruption kind, exact fractions, labels, seeding and validation."""

from __future__ import annotations

import math
import random
from collections import Counter
from pathlib import Path

import pytest

from scoring.data import Sample, load_gsm8k, load_pubmedqa
from scoring.errors import ConfigError, DataError
from scoring.noise import KINDS, cut_words, delete_words, derangement, inject_noise, wrong_answer

DATA = Path(__file__).resolve().parents[1] / "data"
RATES = {"cut": 0.1, "delete": 0.1, "exchange": 0.1}


@pytest.fixture(scope="module")
def pubmedqa() -> list[Sample]:
    return load_pubmedqa(DATA / "pubmedqa_small.json")


@pytest.fixture(scope="module")
def gsm8k() -> list[Sample]:
    return load_gsm8k(DATA / "gsm8k_small.jsonl")


TEXT = "The quick  brown fox\njumps over the lazy dog, then naps in the warm afternoon sun."


@pytest.mark.parametrize("seed", range(20))
def test_cut_keeps_a_leading_share_of_words(seed):
    words = TEXT.split()
    out = cut_words(TEXT, random.Random(seed))
    assert TEXT.startswith(out)
    assert out.split() == words[: len(out.split())]
    assert max(1, math.floor(0.1 * len(words))) <= len(out.split()) <= math.floor(0.5 * len(words))


@pytest.mark.parametrize("seed", range(20))
def test_delete_drops_a_fraction_of_words(seed):
    words = TEXT.split()
    out = delete_words(TEXT, random.Random(seed), 0.3).split()
    assert len(out) == len(words) - round(0.3 * len(words))
    remaining = iter(words)
    assert all(word in remaining for word in out)  # an in-order subsequence


def test_short_texts():
    assert cut_words("one", random.Random(0)) == "one"
    assert delete_words("one", random.Random(0)) == "one"
    assert len(delete_words("one two", random.Random(0)).split()) == 1
    assert delete_words("a\nb c", random.Random(3), 0.0) != "a\nb c"  # at least one word goes when W >= 2


@pytest.mark.parametrize(("n", "seed"), [(n, s) for n in range(2, 12) for s in range(5)])
def test_derangement(n, seed):
    perm = derangement(n, random.Random(seed))
    assert sorted(perm) == list(range(n))
    assert all(p != i for i, p in enumerate(perm))


def test_derangement_needs_two():
    with pytest.raises(ConfigError, match="exchange"):
        derangement(1, random.Random(0))


def test_wrong_answer_changes_final_and_last_line():
    text = "She had 3 + 2 = <<3+2=5>>5 apples.\nShe ate 0 + 5 = <<0+5=5>>5 of them, 5 in all.\n#### 5"
    for seed in range(20):
        out, final = wrong_answer(text, random.Random(seed))
        lines = out.split("\n")
        assert final != "5" and int(final) >= 0
        assert lines[0] == text.split("\n")[0]  # earlier reasoning untouched
        assert lines[1] == f"She ate 0 + 5 = <<0+5={final}>>{final} of them, {final} in all."
        assert lines[2] == f"#### {final}"


def test_wrong_answer_thousands_separator():
    out, final = wrong_answer("So 36 * 30 = <<36*30=1080>>1080.\n#### 1,080", random.Random(0))
    value = int(final)
    assert value != 1080
    assert out == f"So 36 * 30 = <<36*30={value}>>{value}.\n#### {value:,}"


def test_wrong_answer_needs_a_final():
    with pytest.raises(DataError, match="####"):
        wrong_answer("no final answer here", random.Random(0))


def test_inject_noise_fractions_and_labels(pubmedqa):
    noisy = inject_noise(pubmedqa, RATES, seed=0)
    assert [s.id for s in noisy] == [s.id for s in pubmedqa]
    assert [s.prompt for s in noisy] == [s.prompt for s in pubmedqa]
    assert Counter(s.meta["noise"] for s in noisy) == {"clean": 42, "cut": 6, "delete": 6, "exchange": 6}
    originals = {s.id: s for s in pubmedqa}
    for s in noisy:
        before = originals[s.id]
        assert s.meta["label"] == before.meta["label"]  # existing meta is kept
        kind = s.meta["noise"]
        if kind == "clean":
            assert s.response == before.response
        elif kind == "cut":
            assert before.response.startswith(s.response)
            assert len(s.response.split()) <= len(before.response.split()) // 2
        elif kind == "delete":
            assert len(s.response.split()) == len(before.response.split()) - round(0.3 * len(before.response.split()))
        else:
            assert s.meta["noise_source"] != s.id
            assert s.response == originals[s.meta["noise_source"]].response


def test_exchange_is_a_derangement(pubmedqa):
    noisy = inject_noise(pubmedqa, {"exchange": 0.5}, seed=3)
    swapped = [s for s in noisy if s.meta["noise"] == "exchange"]
    assert len(swapped) == 30
    sources = [s.meta["noise_source"] for s in swapped]
    assert sorted(sources) == sorted(s.id for s in swapped)  # a permutation of the chosen samples
    assert all(src != s.id for src, s in zip(sources, swapped, strict=True))


def test_seeded_determinism(pubmedqa):
    first = inject_noise(pubmedqa, RATES, seed=11)
    assert inject_noise(pubmedqa, RATES, seed=11) == first
    assert [s.meta for s in inject_noise(pubmedqa, RATES, seed=11)] == [s.meta for s in first]
    assert inject_noise(pubmedqa, dict(reversed(RATES.items())), seed=11) == first  # dict order is irrelevant
    other = inject_noise(pubmedqa, RATES, seed=12)
    assert [s.meta["noise"] for s in other] != [s.meta["noise"] for s in first]


def test_fraction_counts_are_floored():
    samples = [Sample(f"s{i}", (("user", f"q{i}"),), f"answer number {i} is here") for i in range(10)]
    noisy = inject_noise(samples, {"cut": 0.25, "delete": 0.39, "exchange": 0.36}, seed=0)
    assert Counter(s.meta["noise"] for s in noisy) == {"cut": 2, "delete": 3, "exchange": 3, "clean": 2}
    all_noisy = inject_noise(samples, {"cut": 0.5, "delete": 0.5}, seed=0)
    assert Counter(s.meta["noise"] for s in all_noisy) == {"cut": 5, "delete": 5}


def test_wrong_answer_on_gsm8k(gsm8k):
    noisy = inject_noise(gsm8k, {"wrong_answer": 0.25, "cut": 0.25}, seed=5)
    wrong = [s for s in noisy if s.meta["noise"] == "wrong_answer"]
    assert len(wrong) == 10
    for s in wrong:
        assert s.meta["noise_final"] != s.meta["final"]
        assert s.response.endswith(f"#### {s.meta['noise_final']}")


def test_empty_rates_label_everything_clean(gsm8k):
    noisy = inject_noise(gsm8k, {}, seed=0)
    assert [s.response for s in noisy] == [s.response for s in gsm8k]
    assert {s.meta["noise"] for s in noisy} == {"clean"}


@pytest.mark.parametrize(
    ("rates", "match"),
    [
        ({"cut": 0.6, "delete": 0.5}, "rates: sum"),
        ({"bogus": 0.1}, "rates.bogus: unknown noise kind"),
        ({"cut": -0.1}, r"rates.cut: must be a number in \[0, 1\]"),
        ({"cut": "0.1"}, "rates.cut"),
        ({"exchange": 0.02}, "rates.exchange: selects 1 of 60"),
    ],
)
def test_bad_rates(pubmedqa, rates, match):
    with pytest.raises(ConfigError, match=match):
        inject_noise(pubmedqa, rates, seed=0)


def test_other_errors(pubmedqa):
    with pytest.raises(ConfigError, match="seed"):
        inject_noise(pubmedqa, RATES, seed="0")  # type: ignore[arg-type]
    with pytest.raises(DataError, match="already carry"):
        inject_noise(inject_noise(pubmedqa, RATES, seed=0), RATES, seed=0)
    with pytest.raises(DataError, match="pubmedqa-"):
        inject_noise(pubmedqa, {"wrong_answer": 0.1}, seed=0)


def test_kinds():
    assert KINDS == ("cut", "delete", "exchange", "wrong_answer")
