"""The API's request and response models, kept apart from the tables (`storage.models`).

The algorithm settings inside a job are validated twice on the way in: by shape here, and by the scoring engine's own
frozen dataclasses (`scoring.config`) in the route, so the API accepts exactly what the engine accepts.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SiloCreate(_Strict):
    name: str = Field(pattern=NAME_PATTERN, description="letters, digits, '_', '.', '-'; at most 64 characters")


class SiloPublic(BaseModel):
    id: int
    name: str
    created_at: datetime


class SiloCreated(SiloPublic):
    token: str = Field(description="the silo's bearer token; shown once, stored only as a hash")


class LoraSpec(_Strict):
    rank: int = Field(8, gt=0, le=4096)
    alpha: float = Field(16.0, gt=0)
    target_modules: list[str] = Field(["q_proj", "v_proj"], min_length=1)
    dropout: float = Field(0.0, ge=0, lt=1)


class ProjectionSpecModel(_Strict):
    kind: Literal["sjlt", "rademacher", "gaussian"]
    dim: int = Field(gt=0, le=1 << 20)
    seed: int = Field(ge=0, lt=2**63)
    param_hash: str = Field(min_length=1, max_length=64)
    param_count: int = Field(gt=0)
    nnz: int = Field(4, gt=0)


class CheckpointSpec(_Strict):
    index: int = Field(ge=0)
    step: int = Field(ge=0)
    lr: float = Field(ge=0, allow_inf_nan=False)
    lr_last: float = Field(ge=0, allow_inf_nan=False)
    adam: dict[str, Any]


class JobCreate(_Strict):
    """A scoring job: what every party needs to compute comparable projections, and how to select."""

    name: str = Field(min_length=1, max_length=200)
    silos: list[str] = Field(min_length=1, description="names of the registered silos taking part")
    model: str = Field(min_length=1, max_length=500, description="model reference, e.g. 'smollm2' or 'tiny:0'")
    lora: LoraSpec
    lora_init_seed: int = Field(0, ge=0)
    max_len: int = Field(768, ge=8, le=32768)
    template: str = Field("auto", min_length=1, max_length=32)
    projection: ProjectionSpecModel
    checkpoints: list[CheckpointSpec] = Field(min_length=1, max_length=1000)
    precondition: bool = Field(True, description="silos Adam-precondition candidate gradients (LESS/CLUES)")
    similarity: Literal["cosine", "dot"] = "cosine"
    threshold: dict[str, Any] = Field(
        default_factory=lambda: {"kind": "mean-anchor"},
        description="{'kind': 'mean-anchor'} (CLUES) | {'kind': 'top', 'fraction': q} | {'kind': 'fixed', 'value': v}",
    )
    auto_score: bool = Field(True, description="start scoring as soon as the last silo completes its upload")

    @field_validator("silos")
    @classmethod
    def _unique(cls, silos: list[str]) -> list[str]:
        if len(set(silos)) != len(silos):
            raise ValueError("silo names must be unique")
        return silos

    @field_validator("checkpoints")
    @classmethod
    def _indexed(cls, checkpoints: list[CheckpointSpec]) -> list[CheckpointSpec]:
        if [c.index for c in checkpoints] != list(range(len(checkpoints))):
            raise ValueError("checkpoint indices must be 0, 1, ..., T-1 in order")
        return checkpoints


class MemberPublic(BaseModel):
    name: str
    status: Literal["pending", "complete"]
    num_samples: int | None


class JobPublic(BaseModel):
    id: str
    name: str
    status: Literal["draft", "open", "scoring", "done", "failed"]
    anchor_status: Literal["pending", "running", "done", "failed"]
    progress: float
    message: str
    error: str | None
    threshold_value: float | None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    spec: dict[str, Any] = Field(description="model, LoRA, projection, checkpoints, similarity, threshold, ...")
    silos: list[MemberPublic] = Field(description="all members for the admin; only itself for a silo")
    checkpoints_uploaded: list[int]
    anchors: int | None = Field(description="number of anchor samples uploaded (admin only)")


class UploadResult(BaseModel):
    sha256: str
    size: int
    created: bool = Field(description="false when the same bytes were already held (idempotent re-upload)")


class ShardPublic(BaseModel):
    checkpoint: int
    part: int
    rows: int
    sha256: str


class ScoreRow(BaseModel):
    silo: str
    sample_id: str
    score: float
    parts: list[float] = Field(description="η_t·sim at each checkpoint t; they sum to score")
    selected: bool


class ScoresPublic(BaseModel):
    job: str
    status: str
    threshold: float | None
    total: int = Field(description="rows matching, before limit/offset")
    rows: list[ScoreRow]


class DuplicatePair(BaseModel):
    silo_a: str
    sample_a: str
    silo_b: str
    sample_b: str
    similarity: float


class Health(BaseModel):
    status: Literal["ok", "degraded"]
    database: str
    broker: str
