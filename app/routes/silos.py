"""Admin: register and list silos. A silo: who am I."""

from __future__ import annotations

from fastapi import APIRouter

from app.deps import AdminDep, SessionDep, SiloDep
from app.schemas import SiloCreate, SiloCreated, SiloPublic
from storage import repository as repo
from wire import API_PREFIX

router = APIRouter(prefix=f"{API_PREFIX}/silos", tags=["silos"])


@router.post("", status_code=201, operation_id="create_silo")
def create_silo(body: SiloCreate, session: SessionDep, _: AdminDep) -> SiloCreated:
    """Register a silo. Its token is in this answer only; the coordinator keeps a hash."""
    silo, token = repo.create_silo(session, name=body.name)
    session.commit()
    return SiloCreated(id=silo.id, name=silo.name, created_at=silo.created_at, token=token)


@router.get("", operation_id="list_silos")
def list_silos(session: SessionDep, _: AdminDep) -> list[SiloPublic]:
    return [SiloPublic(id=s.id, name=s.name, created_at=s.created_at) for s in repo.list_silos(session)]


@router.get("/me", operation_id="get_own_silo")
def own_silo(principal: SiloDep) -> SiloPublic:
    """The silo a token belongs to (a silo's agent learns its own name from it)."""
    silo = principal.silo
    return SiloPublic(id=silo.id, name=silo.name, created_at=silo.created_at)
