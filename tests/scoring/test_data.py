"""Tests of `scoring.data`: readers and writer, adapters, tokenisation with response-only labels, batching."""

from __future__ import annotations

import hashlib
import itertools
import json
import pickle
from pathlib import Path

import pytest
import torch

from scoring.batching import (
    TokenizedSample,
    alpaca_prompt,
    collate,
    make_batches,
    response_token_count,
    tokenize_samples,
    truncate,
)
from scoring.data import (
    IGNORE_INDEX,
    Sample,
    content_id,
    load_gsm8k,
    load_pubmedqa,
    read_samples,
    write_samples,
)
from scoring.errors import ConfigError, DataError, ModelNotFoundError
from scoring.models import build_tiny_tokenizer, load_base_model

DATA = Path(__file__).resolve().parents[1] / "data"
PUBMEDQA = DATA / "pubmedqa_small.json"
GSM8K = DATA / "gsm8k_small.jsonl"
GOOD = {"id": "ok", "instruction": "Say hi.", "output": "Hi."}


def _jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


# --- reading and writing ---


def test_read_alpaca_jsonl(tmp_path):
    path = _jsonl(
        tmp_path / "a.jsonl",
        [
            {"id": 7, "instruction": "Add.", "input": "2 and 3", "output": "5", "meta": {"src": "x"}},
            "",
            {"id": "b", "instruction": "Greet.", "input": "", "output": "Hello", "extra": 1},
        ],
    )
    first, second = read_samples(path)
    assert first == Sample("7", (("user", "Add.\n\n2 and 3"),), "5", meta={"src": "x"})
    assert first.origin == f"{path}:1"
    assert second.prompt == (("user", "Greet."),)
    assert second.origin == f"{path}:3"  # the blank line still counts
    assert second.meta == {}


def test_read_chat_json_list(tmp_path):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    path = tmp_path / "c.json"
    path.write_text(json.dumps([GOOD, {"id": "chat", "messages": messages}], indent=2))
    samples = read_samples(path)
    assert samples[1].prompt == (("system", "Be brief."), ("user", "2+2?"))
    assert samples[1].response == "4"
    assert samples[1].origin == f"{path}[1]"


def test_read_single_pretty_object(tmp_path):
    path = tmp_path / "one.json"
    path.write_text("\n" + json.dumps(GOOD, indent=2))
    (sample,) = read_samples(path)
    assert sample.id == "ok"
    assert sample.origin == f"{path}:2"


def test_content_hash_ids_are_stable(tmp_path):
    path = _jsonl(tmp_path / "h.jsonl", [{"instruction": "Say hi.", "output": "Hi."}])
    (sample,) = read_samples(path)
    # Recomputed independently of the module, and pinned: the id does not depend on the process or hash seed.
    payload = '{"prompt":[["user","Say hi."]],"response":"Hi."}'
    expected = "h-" + hashlib.sha256(payload.encode()).hexdigest()[:16]
    assert sample.id == expected == content_id((("user", "Say hi."),), "Hi.") == "h-fdb244bcc39dba3b"
    assert read_samples(path)[0].id == sample.id


def test_write_read_roundtrip(tmp_path):
    samples = [
        Sample("a", (("user", "Q1\n\nwith input"),), "A1 \u2028 odd line separator", meta={"noise": "cut"}),
        Sample("b", (("system", "S"), ("user", "Q2"), ("assistant", "x"), ("user", "Q3")), "A2"),
        Sample("c", (("user", "ünïcode"),), "✓", meta={"nested": {"k": [1, 2]}}),
    ]
    path = tmp_path / "sub" / "out.jsonl"
    write_samples(path, samples)
    back = read_samples(path)
    assert back == samples
    assert [s.meta for s in back] == [s.meta for s in samples]
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.jsonl"]  # no temp file left behind
    assert "instruction" in json.loads(path.read_text().split("\n")[0])  # Alpaca form when possible


def test_write_rejects_duplicate_ids(tmp_path):
    sample = Sample("a", (("user", "q"),), "r")
    with pytest.raises(DataError, match="duplicate id 'a'"):
        write_samples(tmp_path / "x.jsonl", [sample, sample])
    assert not (tmp_path / "x.jsonl").exists()


def test_sample_is_frozen_and_hashable():
    sample = Sample("a", [["user", "q"]], "r", meta={"k": 1})
    assert sample.prompt == (("user", "q"),)
    assert hash(sample) == hash(Sample("a", (("user", "q"),), "r", meta={"k": 2}))
    with pytest.raises(TypeError):
        sample.meta["k"] = 2  # type: ignore[index]
    copy = pickle.loads(pickle.dumps(sample))  # workers ship samples between processes
    assert copy == sample and copy.origin == sample.origin and copy.meta == {"k": 1}


BAD_RECORDS = [
    ({"instruction": "x"}, "field 'output'"),
    ({"instruction": "x", "output": "  "}, "field 'output'"),
    ({"instruction": 3, "output": "y"}, "field 'instruction'"),
    ({"instruction": "x", "input": ["a"], "output": "y"}, "field 'input'"),
    ('{"instruction": "x", "output": ', "invalid JSON"),
    ({"prompt": "x", "completion": "y"}, "unknown record format"),
    ([1, 2], "expected a JSON object"),
    ({"messages": "hi"}, "field 'messages'"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "field 'messages[0].role'"),
    (
        {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": 5}]},
        "messages[1].content",
    ),
    (
        {"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}]},
        "field 'messages[1]'",
    ),
    (
        {"messages": [{"role": "system", "content": "x"}, {"role": "assistant", "content": "y"}]},
        "a user turn",
    ),
    ({"id": ["a"], "instruction": "x", "output": "y"}, "field 'id'"),
    ({"id": True, "instruction": "x", "output": "y"}, "field 'id'"),
    ({"instruction": "x", "output": "y", "meta": [1]}, "field 'meta'"),
    ({"instruction": "x", "output": "y", "messages": []}, "ambiguous"),
]


@pytest.mark.parametrize(("record", "field"), BAD_RECORDS)
def test_bad_record_names_file_line_and_field(tmp_path, record, field):
    path = _jsonl(tmp_path / "bad.jsonl", [GOOD, record])
    with pytest.raises(DataError) as info:
        read_samples(path)
    assert f"{path}:2: " in str(info.value)
    assert field in str(info.value)


def test_bad_item_in_json_list_names_index(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([GOOD, {"instruction": "x"}]))
    with pytest.raises(DataError, match=r"bad\.json\[1\]: field 'output'"):
        read_samples(path)


def test_invalid_json_list_names_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"instruction": "x", "output": "y"},\n  {"instruction": }\n]')
    with pytest.raises(DataError, match=r"bad\.json:3: invalid JSON"):
        read_samples(path)


def test_errors_are_collected(tmp_path):
    path = _jsonl(tmp_path / "many.jsonl", [{"instruction": "x"}] * 15)
    with pytest.raises(DataError) as info:
        read_samples(path)
    message = str(info.value)
    assert "15 invalid record(s)" in message
    assert f"{path}:10:" in message and f"{path}:11:" not in message
    assert "and 5 more" in message


@pytest.mark.parametrize("text", ["", "\n  \n", "[]"])
def test_empty_file(tmp_path, text):
    path = tmp_path / "empty.jsonl"
    path.write_text(text)
    with pytest.raises(DataError, match="no records"):
        read_samples(path)


def test_duplicate_ids(tmp_path):
    path = _jsonl(tmp_path / "dup.jsonl", [GOOD, {**GOOD, "output": "other"}])
    with pytest.raises(DataError, match=rf"dup\.jsonl:2: field 'id': duplicate id 'ok' \(first at {path}:1\)"):
        read_samples(path)


def test_duplicate_content_without_ids(tmp_path):
    record = {"instruction": "x", "output": "y"}
    path = _jsonl(tmp_path / "dup.jsonl", [record, record])
    with pytest.raises(DataError, match="duplicate id 'h-"):
        read_samples(path)


def test_not_utf8(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(b'{"instruction": "caf\xe9", "output": "y"}\n')
    with pytest.raises(DataError, match="not UTF-8"):
        read_samples(path)


# --- adapters ---


def test_load_pubmedqa():
    samples = load_pubmedqa(PUBMEDQA)
    raw = json.loads(PUBMEDQA.read_text())
    assert [s.id for s in samples] == [f"pubmedqa-{k}" for k in sorted(raw, key=int)]
    first = samples[0]
    item = raw[first.id.removeprefix("pubmedqa-")]
    assert first.meta == {"label": item["final_decision"]}
    assert first.response == f"{item['LONG_ANSWER']}\nFinal answer: {item['final_decision']}"
    ((role, user),) = first.prompt
    assert role == "user"
    assert user.startswith("Context: " + item["CONTEXTS"][0])
    assert user.index(item["QUESTION"]) > user.index(item["CONTEXTS"][-1])  # question last: survives truncation
    assert {s.meta["label"] for s in samples} == {"yes", "no", "maybe"}


def test_load_pubmedqa_order_and_limit(tmp_path):
    raw = json.loads(PUBMEDQA.read_text())
    shuffled = tmp_path / "rev.json"
    shuffled.write_text(json.dumps(dict(reversed(list(raw.items())))))
    assert [s.id for s in load_pubmedqa(shuffled, limit=5)] == [s.id for s in load_pubmedqa(PUBMEDQA)[:5]]
    with pytest.raises(ConfigError, match="limit"):
        load_pubmedqa(PUBMEDQA, limit=0)


def test_load_pubmedqa_bad_item(tmp_path):
    raw = json.loads(PUBMEDQA.read_text())
    pmid = sorted(raw, key=int)[3]
    raw[pmid]["final_decision"] = "perhaps"
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(DataError, match=rf"\[{pmid}\]: field 'final_decision'"):
        load_pubmedqa(path)


def test_load_gsm8k():
    samples = load_gsm8k(GSM8K)
    lines = GSM8K.read_text().splitlines()
    assert len(samples) == 40
    first = json.loads(lines[0])
    assert samples[0].id == "gsm8k-gsm8k_small-1"
    assert samples[0].prompt == (("user", first["question"]),)
    assert samples[0].response == first["answer"]
    assert samples[0].meta == {"final": first["answer"].rsplit("#### ", 1)[1]}
    assert [s.id for s in load_gsm8k(GSM8K, limit=3)] == [s.id for s in samples[:3]]


def test_load_gsm8k_comma_final_and_errors(tmp_path):
    path = _jsonl(tmp_path / "g.jsonl", [{"question": "q", "answer": "a\n#### 1,080"}])
    assert load_gsm8k(path)[0].meta == {"final": "1080"}
    path = _jsonl(tmp_path / "bad.jsonl", [{"question": "q", "answer": "a\n#### 1"}, {"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match=r"bad\.jsonl:2: field 'answer'"):
        load_gsm8k(path)


# --- tokenisation ---


def _chat(tok, messages, gen):
    return tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen, return_dict=False)


def test_chat_labels_cover_exactly_the_response(tok):
    sample = Sample("s", (("system", "Be brief."), ("user", "What is 2+2?")), "It is 4.")
    (t,) = tokenize_samples([sample], tok, max_len=512, template="chat")
    messages = [{"role": r, "content": c} for r, c in sample.prompt]
    n_prompt = len(_chat(tok, messages, True))
    assert len(t.input_ids) == len(t.labels)
    assert t.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert t.labels[n_prompt:] == t.input_ids[n_prompt:]
    assert tok.decode(t.labels[n_prompt:]) == "It is 4.<|im_end|>"
    full = _chat(tok, [*messages, {"role": "assistant", "content": sample.response}], False)
    assert t.input_ids == full[:-1]  # the template's newline after <|im_end|> is not trained on
    assert not t.truncated and t.num_response_tokens == len("It is 4.") + 1


def test_auto_template(tok):
    sample = Sample("s", (("user", "hi"),), "yo")
    assert tokenize_samples([sample], tok, 64) == tokenize_samples([sample], tok, 64, template="chat")
    plain = build_tiny_tokenizer()
    plain.chat_template = None
    assert tokenize_samples([sample], plain, 64) == tokenize_samples([sample], tok, 64, template="alpaca")
    with pytest.raises(ConfigError, match="template"):
        tokenize_samples([sample], plain, 64, template="chat")


def test_alpaca_labels(tok):
    sample = Sample("s", (("system", "Sys."), ("user", "Add 2 and 3.")), "5")
    (t,) = tokenize_samples([sample], tok, max_len=512, template="alpaca")
    prompt = "Sys.\n\n### Instruction:\nAdd 2 and 3.\n\n### Response:\n"
    assert alpaca_prompt(sample.prompt) == prompt
    n_prompt = len(tok(prompt)["input_ids"])
    assert tok.decode(t.input_ids[:n_prompt]) == prompt
    assert t.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert tok.decode(t.labels[n_prompt:]) == "5<|im_end|>"


def test_chat_template_fallback_when_prompt_is_not_a_prefix():
    tok = build_tiny_tokenizer()  # renders the generation prompt differently from the assistant turn
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}<A>{{ m['content'] }}<|im_end|>"
        "{% else %}<U>{{ m['content'] }}{% endif %}{% endfor %}{% if add_generation_prompt %}<G>{% endif %}"
    )
    (t,) = tokenize_samples([Sample("s", (("user", "q"),), "answer")], tok, 64, template="chat")
    assert tok.decode(t.input_ids) == "<U>q<G>answer<|im_end|>"
    assert tok.decode([x for x in t.labels if x != IGNORE_INDEX]) == "answer<|im_end|>"


def test_response_without_tokens_is_an_error():
    tok = build_tiny_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] != 'assistant' %}{{ m['content'] }}{% endif %}{% endfor %}"
    )
    with pytest.raises(DataError, match="'empty-one'"):
        tokenize_samples([Sample("empty-one", (("user", "q"),), "r")], tok, 64, template="chat")


def test_tokenize_config_errors(tok):
    sample = [Sample("s", (("user", "q"),), "r")]
    for bad in (1, 0, 2.5, True):
        with pytest.raises(ConfigError, match="max_len"):
            tokenize_samples(sample, tok, bad)
    with pytest.raises(ConfigError, match="template"):
        tokenize_samples(sample, tok, 64, template="llama")


def test_truncation_keeps_response_and_end_of_prompt(tok):
    question = "QUESTION: is the sky blue?"
    sample = Sample("long", (("user", "context " * 100 + question),), "Yes, it is.")
    (t,) = tokenize_samples([sample], tok, max_len=64, template="chat")
    assert t.truncated and len(t.input_ids) == 64
    kept_prompt = [x for x, y in zip(t.input_ids, t.labels, strict=True) if y == IGNORE_INDEX]
    assert tok.decode(kept_prompt).endswith(question + "<|im_end|>\n<|im_start|>assistant\n")
    assert tok.decode(t.labels[len(kept_prompt) :]) == "Yes, it is.<|im_end|>"

    long_answer = Sample("long-r", (("user", "Q?"),), "word " * 100)
    (t,) = tokenize_samples([long_answer], tok, max_len=64, template="chat")
    n_prompt = len(_chat(tok, [{"role": "user", "content": "Q?"}], True))
    assert t.truncated and len(t.input_ids) == 64
    assert t.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt  # whole prompt kept, response cut on the right
    assert tok.decode(t.labels[n_prompt:]) == ("word " * 100)[: 64 - n_prompt]


@pytest.mark.parametrize(
    ("n_prompt", "n_response", "max_len"), list(itertools.product([0, 1, 5, 40], [1, 3, 40], [2, 7, 32, 50]))
)
def test_truncate_invariants(n_prompt, n_response, max_len):
    prompt, response = list(range(n_prompt)), list(range(100, 100 + n_response))
    kept_p, kept_r, cut = truncate(prompt, response, max_len)
    assert len(kept_p) + len(kept_r) == min(max_len, n_prompt + n_response)  # no room wasted
    assert len(kept_r) >= min(n_response, max_len // 2)
    assert kept_p == prompt[n_prompt - len(kept_p) :]  # a suffix of the prompt
    assert kept_r == response[: len(kept_r)]  # a prefix of the response
    assert cut == (n_prompt + n_response > max_len)


# --- batching ---


def _tokenized(lengths: list[int]) -> list[TokenizedSample]:
    return [
        TokenizedSample(f"s{i}", list(range(3, 3 + n)), [IGNORE_INDEX] * (n // 2) + list(range(3 + n // 2, 3 + n)))
        for i, n in enumerate(lengths)
    ]


def _padding(batches) -> int:
    return sum(b.input_ids.numel() - b.num_tokens for b in batches)


def test_batches_are_right_padded():
    items = _tokenized([5, 2, 9, 4])
    batch = collate(items, pad_id=0)
    assert batch.input_ids.shape == batch.labels.shape == batch.attention_mask.shape == (4, 9)
    assert batch.input_ids.dtype == batch.labels.dtype == batch.attention_mask.dtype == torch.long
    for row, item in enumerate(items):
        n = len(item.input_ids)
        assert batch.attention_mask[row].tolist() == [1] * n + [0] * (9 - n)
        assert batch.input_ids[row].tolist() == item.input_ids + [0] * (9 - n)
        assert batch.labels[row].tolist() == item.labels + [IGNORE_INDEX] * (9 - n)
    assert batch.num_tokens == 20
    assert response_token_count(batch.labels[0].tolist()) == items[0].num_response_tokens == 3


def test_bucketing_reduces_padding():
    lengths = [30, 2, 28, 3, 31, 4, 29, 5]
    items = _tokenized(lengths)
    bucketed = make_batches(items, batch_size=4, pad_id=0)
    plain = make_batches(items, batch_size=4, pad_id=0, bucket=False)
    assert _padding(bucketed) < _padding(plain)
    assert [b.ids for b in plain] == [["s0", "s1", "s2", "s3"], ["s4", "s5", "s6", "s7"]]
    assert [b.ids for b in bucketed] == [["s1", "s3", "s5", "s7"], ["s2", "s6", "s0", "s4"]]


def test_bucketing_is_stable_on_ties():
    batches = make_batches(_tokenized([4, 2, 4, 2, 4]), batch_size=10, pad_id=0)
    assert batches[0].ids == ["s1", "s3", "s0", "s2", "s4"]


@pytest.mark.parametrize(("bucket", "max_tokens"), list(itertools.product([True, False], [10, 31, 64])))
def test_max_tokens_respected(bucket, max_tokens):
    items = _tokenized([3, 9, 1, 7, 10, 2, 8, 5, 6, 4])
    batches = make_batches(items, batch_size=4, pad_id=0, bucket=bucket, max_tokens=max_tokens)
    assert all(b.input_ids.numel() <= max_tokens and len(b.ids) <= 4 for b in batches)
    assert sorted(i for b in batches for i in b.ids) == sorted(t.id for t in items)


def test_batching_errors():
    items = _tokenized([3, 12])
    with pytest.raises(ConfigError, match="'s1' has 12 tokens"):
        make_batches(items, batch_size=2, pad_id=0, max_tokens=10)
    with pytest.raises(ConfigError, match="batch_size"):
        make_batches(items, batch_size=0, pad_id=0)
    with pytest.raises(ConfigError, match="pad_id"):
        make_batches(items, batch_size=2, pad_id=None)
    assert make_batches([], batch_size=2, pad_id=0) == []


def test_end_to_end_pubmedqa_batches(tok):
    tokenized = tokenize_samples(load_pubmedqa(PUBMEDQA, limit=12), tok, max_len=256)
    batches = make_batches(tokenized, batch_size=4, pad_id=tok.pad_token_id, max_tokens=900)
    assert sorted(i for b in batches for i in b.ids) == sorted(t.id for t in tokenized)
    for b in batches:
        assert b.input_ids.shape[1] <= 256
        assert ((b.labels != IGNORE_INDEX).sum(dim=1) >= 1).all()


@pytest.mark.slow
def test_smollm2_chat_labels_on_pubmedqa():
    try:
        tok = load_base_model("smollm2").tokenizer
    except ModelNotFoundError as exc:
        pytest.skip(str(exc))
    samples = load_pubmedqa(PUBMEDQA, limit=20)
    for t, s in zip(tokenize_samples(samples, tok, max_len=4096), samples, strict=True):
        assert not t.truncated
        assert tok.decode([x for x in t.labels if x != IGNORE_INDEX]) == s.response + "<|im_end|>"


@pytest.mark.parametrize(
    ("sample_id", "needle"),
    [("a\u0000b", "U+0000"), ("tab\there", "U+0009"), ("\ud800x", "lone surrogate"), ("x" * 501, "at most 500")],
)
def test_ids_no_party_could_store_are_refused_naming_the_line(tmp_path, sample_id, needle):
    path = tmp_path / "d.jsonl"
    record = {"id": sample_id, "instruction": "q", "output": "a"}
    path.write_text(json.dumps({"id": "ok", "instruction": "q", "output": "a"}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(DataError) as info:
        read_samples(path)
    assert f"{path}:2: field 'id'" in str(info.value) and needle in str(info.value)


def test_json_nested_deeper_than_python_can_parse_is_a_data_error(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DataError, match="nested too deeply"):
        read_samples(path)
    path.write_text('{"instruction": "q", "output": "a", "meta": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    with pytest.raises(DataError, match="nested too deeply"):
        read_samples(path)
