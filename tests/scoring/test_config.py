"""Each bound on a setting is written once, on its dataclass field, and holds everywhere: building the dataclass in
Python, reading it from JSON, and validating a REST body against it (pydantic reads the same ``Annotated`` bounds)."""

from __future__ import annotations

import dataclasses
import math
from typing import Annotated, get_args, get_origin, get_type_hints

import pytest
from annotated_types import Ge, Gt, Le, Lt
from pydantic import TypeAdapter, ValidationError

from scoring.config import AdamState, LocalTrainConfig, LoraSettings, ProjectionSpec, TrainingConfig
from scoring.errors import ConfigError

VALID = {
    LoraSettings: {},
    ProjectionSpec: {"kind": "sjlt", "dim": 64, "seed": 0, "param_hash": "abc", "param_count": 10, "nnz": 1},
    AdamState: {},
    TrainingConfig: {},
    LocalTrainConfig: {},
}


def _violations():
    """``(class, field, bad value)`` just beyond each numeric bound of each dataclass."""
    for cls in VALID:
        hints = get_type_hints(cls, include_extras=True)
        for f in dataclasses.fields(cls):
            hint = hints[f.name]
            if get_origin(hint) is not Annotated:
                continue
            base, *meta = get_args(hint)
            step = 1 if base is int else 1e-9
            for m in meta:
                if isinstance(m, Gt | Ge | Lt | Le):
                    bound = next(getattr(m, a) for a in ("gt", "ge", "lt", "le") if hasattr(m, a))
                    bad = {Gt: bound, Ge: bound - step, Lt: bound, Le: bound + step}[type(m)]
                    yield cls, f.name, bad
            if base is float:
                yield cls, f.name, "nan"


CASES = list(_violations())


def test_every_numeric_field_of_the_api_settings_is_bounded():
    assert {(c.__name__, name) for c, name, _ in CASES} >= {
        ("LoraSettings", "rank"),
        ("ProjectionSpec", "dim"),
        ("LocalTrainConfig", "lr"),
        ("AdamState", "eps"),
    }


@pytest.mark.parametrize(("cls", "name", "bad"), CASES, ids=lambda v: getattr(v, "__name__", repr(v)))
def test_a_value_beyond_a_bound_is_refused_by_the_dataclass_and_by_the_api(cls, name, bad):
    value = math.nan if bad == "nan" else bad
    with pytest.raises(ConfigError, match=rf"^{name}: must be"):
        cls(**{**VALID[cls], name: value})
    with pytest.raises(ConfigError, match=name):
        cls.from_dict({**VALID[cls], name: value})
    with pytest.raises(ValidationError, match=name):
        TypeAdapter(cls).validate_python({**VALID[cls], name: value})


def test_a_bool_is_not_an_integer_to_the_engine():
    """JSON's ``true`` reads as 1 in pydantic's lax mode (as the API always did); the engine itself refuses a bool."""
    with pytest.raises(ConfigError, match=r"^rank: must be an integer > 0 and <= 4096, got True"):
        LoraSettings(rank=True)


@pytest.mark.parametrize("cls", list(VALID), ids=lambda c: c.__name__)
def test_the_api_reads_what_the_engine_writes_and_refuses_unknown_fields(cls):
    obj = cls(**VALID[cls])
    assert TypeAdapter(cls).validate_python(obj.to_dict()) == obj
    assert TypeAdapter(cls).validate_json(obj.to_json()) == obj
    with pytest.raises(ValidationError, match="unknown_field"):
        TypeAdapter(cls).validate_python({**obj.to_dict(), "unknown_field": 1})
    with pytest.raises(ConfigError, match="unknown_field"):
        cls.from_dict({**obj.to_dict(), "unknown_field": 1})
