"""Instruction-tuning samples: read, write and adapt PubMedQA / GSM8K.

Contains `Sample` (a prompt/response pair), `read_samples` / `write_samples` (Alpaca or chat records, JSON or
JSONL) and the adapters `load_pubmedqa` and `load_gsm8k`. Tokenisation and batching live in `scoring.batching`,
noise injection for evaluation in `scoring.noise`.

Record forms accepted by `read_samples` (unknown extra keys are ignored):

- Alpaca: ``{"instruction": str, "input": str (optional), "output": str}``; instruction and input become one
  user turn (instruction, blank line, input).
- chat: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``; the last message must
  be the assistant's and is the response; at least one user turn must precede it.

Both may carry ``id`` (string or int) and ``meta`` (an object, passed through). Without an id a sample gets a
content hash, ``h-`` + 16 hex digits of sha256 over the canonical JSON of prompt and response, stable across
runs and processes. ``Sample.origin`` is ``path:line`` (1-based) for JSONL, ``path[index]`` (0-based) for a
JSON list and ``path[key]`` for keyed files; error messages use the same locations. A file holding one JSON
object is read as one record.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from scoring.errors import ConfigError, DataError
from wire.files import atomic_file

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
MAX_REPORTED_ERRORS = 10
PUBMEDQA_DECISIONS = ("yes", "no", "maybe")
PUBMEDQA_INSTRUCTION = "Answer the question with a short explanation, then yes, no or maybe."


@dataclass(frozen=True)
class Sample:
    """One instruction-tuning pair.

    Attributes:
        id: unique within a dataset.
        prompt: the (role, content) turns before the response, e.g. ``(("user", "What is 2+2?"),)``.
        response: the assistant's final answer, the only text that carries loss.
        origin: where it was read from (``path:line`` or ``path[index]``); not part of equality.
        meta: read-only extra fields (e.g. ``{"label": "yes", "noise": "clean"}``); not part of the hash.
    """

    id: str
    prompt: tuple[tuple[str, str], ...]
    response: str
    origin: str = field(default="", compare=False)
    meta: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        """Normalise ``prompt`` to nested tuples and freeze a copy of ``meta``."""
        object.__setattr__(self, "prompt", tuple((str(r), str(c)) for r, c in self.prompt))
        object.__setattr__(self, "meta", MappingProxyType(dict(self.meta)))

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle support (a mappingproxy does not pickle, so ``meta`` travels as a plain dict)."""
        return (Sample, (self.id, self.prompt, self.response, self.origin, dict(self.meta)))

    def to_record(self) -> dict[str, Any]:
        """The JSON record: Alpaca form for one user turn, chat form otherwise; ``meta`` only if non-empty."""
        record: dict[str, Any] = {"id": self.id}
        if len(self.prompt) == 1 and self.prompt[0][0] == "user":
            record |= {"instruction": self.prompt[0][1], "output": self.response}
        else:
            turns = [*self.prompt, ("assistant", self.response)]
            record["messages"] = [{"role": r, "content": c} for r, c in turns]
        if self.meta:
            record["meta"] = dict(self.meta)
        return record


def content_id(prompt: Sequence[tuple[str, str]], response: str) -> str:
    """Stable id from content: ``h-`` + 16 hex digits of sha256(canonical JSON of prompt and response)."""
    payload = json.dumps(
        {"prompt": [list(t) for t in prompt], "response": response},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return "h-" + hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


# --- reading and writing ---


def _nonempty_str(record: Mapping[str, Any], key: str, errors: list[str]) -> str:
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
        got = "missing" if key not in record else f"got {type(value).__name__} {str(value)[:20]!r}"
        errors.append(f"field '{key}': must be a non-empty string ({got})")
        return ""
    return value


def _parse_alpaca(record: Mapping[str, Any], errors: list[str]) -> tuple[tuple[tuple[str, str], ...], str]:
    instruction = _nonempty_str(record, "instruction", errors)
    extra = record.get("input", "")
    if not isinstance(extra, str):
        errors.append(f"field 'input': must be a string (got {type(extra).__name__})")
        extra = ""
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return (("user", user),), _nonempty_str(record, "output", errors)


def _parse_chat(record: Mapping[str, Any], errors: list[str]) -> tuple[tuple[tuple[str, str], ...], str]:
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        errors.append("field 'messages': must be a non-empty list")
        return (), ""
    turns: list[tuple[str, str]] = []
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        if role not in ROLES:
            errors.append(f"field 'messages[{i}].role': must be one of {list(ROLES)} (got {role!r})")
        elif not isinstance(content, str):
            errors.append(f"field 'messages[{i}].content': must be a string (got {type(content).__name__})")
        else:
            turns.append((role, content))
    if errors:
        return (), ""
    if turns[-1][0] != "assistant" or not turns[-1][1].strip():
        errors.append(f"field 'messages[{len(turns) - 1}]': the last message must be a non-empty assistant turn")
    elif not any(role == "user" for role, _ in turns[:-1]):
        errors.append("field 'messages': a user turn must precede the assistant response")
    return tuple(turns[:-1]), turns[-1][1]


MAX_ID_LENGTH = 500
"""The longest sample id any party accepts (the coordinator stores ids in ``String(500)`` columns)."""
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def id_problem(sample_id: str) -> str | None:
    """Why ``sample_id`` is not a valid sample id, or None: ids are 1 to `MAX_ID_LENGTH` characters of valid
    Unicode (no lone surrogate) without control characters (no NUL, newline, tab...)."""
    if not sample_id:
        return "is empty"
    if len(sample_id) > MAX_ID_LENGTH:
        return f"is {len(sample_id)} characters long; at most {MAX_ID_LENGTH} are allowed"
    if _SURROGATE.search(sample_id):
        return "is not valid Unicode (it holds a lone surrogate)"
    bad = _CONTROL.search(sample_id)
    if bad:
        return f"contains the control character U+{ord(bad.group()):04X}"
    return None


def _parse_record(record: Any, origin: str) -> tuple[Sample | None, list[str]]:
    """Validate one record; returns the sample (None if invalid) and error strings (without location)."""
    if not isinstance(record, dict):
        return None, [f"expected a JSON object, got {type(record).__name__}"]
    errors: list[str] = []
    if "messages" in record and ("instruction" in record or "output" in record):
        return None, ["ambiguous record: has both 'messages' (chat) and 'instruction'/'output' (Alpaca)"]
    if "messages" in record:
        prompt, response = _parse_chat(record, errors)
    elif "instruction" in record or "output" in record:
        prompt, response = _parse_alpaca(record, errors)
    else:
        return None, ["unknown record format: expected 'instruction'+'output' (Alpaca) or 'messages' (chat)"]
    raw_id, meta = record.get("id"), record.get("meta", {})
    if raw_id is not None and (isinstance(raw_id, bool) or not isinstance(raw_id, str | int) or raw_id == ""):
        errors.append(f"field 'id': must be a non-empty string or an int (got {raw_id!r})")
    if not isinstance(meta, dict):
        errors.append(f"field 'meta': must be an object (got {type(meta).__name__})")
    if raw_id is not None and not errors and (problem := id_problem(str(raw_id))):
        errors.append(f"field 'id': {problem}")
    if errors:
        return None, errors
    sample_id = str(raw_id) if raw_id is not None else content_id(prompt, response)
    return Sample(sample_id, prompt, response, origin, meta), []


def _iter_raw(path: Path, text: str) -> Iterable[tuple[str, Any]]:
    """Yield (origin, parsed record or JSONDecodeError) from a JSON list or JSONL text."""
    try:
        whole = json.loads(text)
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply") from None
    except json.JSONDecodeError as exc:
        if text.lstrip().startswith("["):
            yield f"{path}:{exc.lineno}", exc
            return
        whole = None
    if isinstance(whole, list):
        yield from ((f"{path}[{i}]", item) for i, item in enumerate(whole))
        return
    if whole is not None:  # one (possibly pretty-printed) record
        yield f"{path}:{text[: len(text) - len(text.lstrip())].count(chr(10)) + 1}", whole
        return
    # split on "\n" only: str.splitlines would also split inside strings holding U+2028 or U+0085
    for number, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            try:
                record = json.loads(line)
            except RecursionError:
                raise DataError(f"{path}:{number}: JSON nested too deeply") from None
            except json.JSONDecodeError as exc:
                yield f"{path}:{number}", exc
                continue
            yield f"{path}:{number}", record


def _raise_collected(path: Path, errors: list[str]) -> None:
    if errors:
        shown = errors[:MAX_REPORTED_ERRORS]
        more = f"\n  ... and {len(errors) - len(shown)} more" if len(errors) > len(shown) else ""
        raise DataError(f"{path}: {len(errors)} invalid record(s):\n  " + "\n  ".join(shown) + more)


def read_samples(path: str | os.PathLike[str]) -> list[Sample]:
    """Read Alpaca or chat records from JSONL (blank lines skipped) or a JSON list (see module docstring).

    Raises:
        DataError: the file is empty or not UTF-8, or records are invalid (bad JSON, unknown form, missing or
            mistyped fields, empty response, duplicate ids). Up to 10 problems are listed, each with its
            location (``path:line`` or ``path[index]``) and field.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc})") from exc
    samples: list[Sample] = []
    errors: list[str] = []
    first_seen: dict[str, str] = {}
    for origin, raw in _iter_raw(path, text):
        if isinstance(raw, json.JSONDecodeError):
            errors.append(f"{origin}: invalid JSON ({raw.msg} at column {raw.colno})")
            continue
        sample, problems = _parse_record(raw, origin)
        errors.extend(f"{origin}: {p}" for p in problems)
        if sample is not None and sample.id in first_seen:
            errors.append(f"{origin}: field 'id': duplicate id {sample.id!r} (first at {first_seen[sample.id]})")
        elif sample is not None:
            first_seen[sample.id] = origin
            samples.append(sample)
    _raise_collected(path, errors)
    if not samples:
        raise DataError(f"{path}: no records (empty file)")
    return samples


def write_samples(path: str | os.PathLike[str], samples: Iterable[Sample]) -> None:
    """Write samples as JSONL (`Sample.to_record` per line), atomically: a temp file, then ``os.replace``.

    Raises:
        DataError: two samples share an id (the file would not read back).
    """
    path = Path(path)
    seen: set[str] = set()
    lines = []
    for sample in samples:
        if sample.id in seen:
            raise DataError(f"{path}: duplicate id {sample.id!r}; not written")
        seen.add(sample.id)
        lines.append(json.dumps(sample.to_record(), ensure_ascii=False) + "\n")
    with atomic_file(path, "w", encoding="utf-8") as handle:
        handle.writelines(lines)


# --- adapters ---


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"limit: must be None or a positive int, got {limit!r}")


def _pmid_key(pmid: str) -> tuple[int, int, str]:
    return (0, int(pmid), pmid) if pmid.isdigit() else (1, 0, pmid)


def _pubmedqa_sample(pmid: str, item: Any, origin: str) -> Sample:
    if not isinstance(item, dict):
        raise DataError(f"{origin}: expected an object, got {type(item).__name__}")
    question, contexts = item.get("QUESTION"), item.get("CONTEXTS")
    answer, decision = item.get("LONG_ANSWER"), item.get("final_decision")
    for name, ok in (
        ("QUESTION", isinstance(question, str) and question.strip()),
        ("CONTEXTS", isinstance(contexts, list) and all(isinstance(c, str) for c in contexts)),
        ("LONG_ANSWER", isinstance(answer, str) and answer.strip()),
        ("final_decision", decision in PUBMEDQA_DECISIONS),
    ):
        if not ok:
            raise DataError(f"{origin}: field '{name}': missing or invalid")
    # Context first, question last: left truncation of long prompts then drops context, never the question.
    context = "\n".join(contexts)
    user = f"Context: {context}\n\nQuestion: {question}\n\n{PUBMEDQA_INSTRUCTION}"
    response = f"{answer}\nFinal answer: {decision}"
    return Sample(f"pubmedqa-{pmid}", (("user", user),), response, origin, {"label": decision})


def load_pubmedqa(path: str | os.PathLike[str], limit: int | None = None) -> list[Sample]:
    r"""PubMedQA PQA-L (``ori_pqal.json``: PMID -> item) as samples, in ascending numeric PMID order.

    Sorting (rather than file order) keeps ``limit`` subsets identical whatever order the file lists items in.
    Prompt: one user turn with contexts (joined by newlines), question and `PUBMEDQA_INSTRUCTION`. Response:
    ``LONG_ANSWER + "\nFinal answer: " + final_decision``. Id ``pubmedqa-<PMID>``; meta
    ``{"label": decision}``.

    Args:
        path: the JSON file.
        limit: keep only the first ``limit`` items (after sorting).
    """
    _check_limit(limit)
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: invalid JSON ({exc})") from exc
    if not isinstance(data, dict) or not data:
        raise DataError(f"{path}: expected a non-empty JSON object mapping PMID to item")
    pmids = sorted(data, key=_pmid_key)[:limit]
    return [_pubmedqa_sample(pmid, data[pmid], f"{path}[{pmid}]") for pmid in pmids]


def load_gsm8k(path: str | os.PathLike[str], limit: int | None = None) -> list[Sample]:
    """GSM8K JSONL (``question``, ``answer`` ending in ``#### N``) as samples, in file order.

    The response is the answer text as is. Id ``gsm8k-<file stem>-<line>``; meta ``{"final": N}`` with N the
    text after ``####``, commas removed (``"1,080"`` -> ``"1080"``).
    """
    _check_limit(limit)
    path = Path(path)
    samples: list[Sample] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
        if limit is not None and len(samples) >= limit:
            break
        if not line.strip():
            continue
        origin = f"{path}:{number}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{origin}: invalid JSON ({exc.msg})") from exc
        if not isinstance(item, dict):
            raise DataError(f"{origin}: expected a JSON object, got {type(item).__name__}")
        question, answer = item.get("question"), item.get("answer")
        if not isinstance(question, str) or not question.strip():
            raise DataError(f"{origin}: field 'question': missing or not a non-empty string")
        if not isinstance(answer, str) or "####" not in answer:
            raise DataError(f"{origin}: field 'answer': missing or without a '#### N' final line")
        meta = {"final": answer.rsplit("####", 1)[1].strip().replace(",", "")}
        samples.append(Sample(f"gsm8k-{path.stem}-{number}", (("user", question),), answer, origin, meta))
    if not samples:
        raise DataError(f"{path}: no records (empty file)")
    return samples


# --- tokenisation ---
