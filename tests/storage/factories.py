"""Small builders shared by the storage tests."""

from __future__ import annotations

from sqlalchemy.orm import Session

from storage import repository as repo
from storage.models import Job

KEY_A, KEY_B = "a" * 64, "b" * 64


def new_job(session: Session, silo_names: tuple[str, ...] = ("alpha", "beta"), checkpoints: int = 2) -> Job:
    """A draft job over ``silo_names`` (created here) with ``checkpoints`` checkpoints."""
    for name in silo_names:
        repo.create_silo(session, name=name)
    return repo.create_job(
        session,
        name="demo",
        model="tiny:0",
        lora={"rank": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj"]},
        projection={"kind": "sjlt", "dim": 64, "seed": 0},
        similarity="cosine",
        threshold={"kind": "quantile", "value": 0.5},
        precondition=True,
        options={"max_len": 128, "auto_score": True},
        checkpoints=[
            {"index": t, "step": 3 * (t + 1), "lr": 1e-4, "lr_last": 5e-5, "adam": {"beta1": 0.9}}
            for t in range(checkpoints)
        ],
        silo_names=list(silo_names),
    )
