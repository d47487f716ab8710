"""The results API of a scored job (`app.routes.scores`) over a job seeded straight into storage: the sample table's
filters, sort and paging against a Python oracle, the CSV export against the JSON rows, the summary, near-duplicate
clusters, and owner overrides with who may see and do what."""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.config import AppSettings
from app.main import create_app
from app.schemas import ScoresPublic
from scoring.calibration import EXPLANATIONS, fused_signals
from scoring.config import DEFAULT_SIGNALS
from storage import repository as repo
from storage.models import Job, Score
from tests.seed import SeededJob, seed_scored_job
from wire import ANCHOR_OWNER

ADMIN = {"Authorization": "Bearer admin-secret-for-tests-0123456789abcdef"}
SIZES = {"silo1": 30, "silo2": 20, "silo3": 10}
ANCHORS = 12


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@dataclass
class Env:
    app: object
    client: TestClient
    job: SeededJob

    def silo(self, name: str) -> dict[str, str]:
        return bearer(self.job.tokens[name])

    def url(self, tail: str = "") -> str:
        return f"/v1/jobs/{self.job.job_id}{tail}"

    def sessions(self):
        return self.app.state.clues.sessions()


def draft_job(session, silos: list[str]) -> str:
    """A job over ``silos`` that is not scored yet (status draft)."""
    job = repo.create_job(
        session, name="draft", model="tiny:0", lora={"rank": 4, "alpha": 8.0, "target_modules": ["q_proj"]},
        projection={"kind": "sjlt", "dim": 64, "seed": 0}, similarity="cosine", threshold={"kind": "mean-anchor"},
        precondition=True, options={}, checkpoints=[{"index": 0, "step": 1, "lr": 1e-4, "lr_last": 1e-4, "adam": {}}],
        silo_names=silos,
    )  # fmt: skip
    session.commit()
    return job.id


@pytest.fixture
def env(tmp_path):
    app = create_app(
        AppSettings(data_dir=tmp_path, admin_token="admin-secret-for-tests-0123456789abcdef"),
        send=lambda *a: None,
    )
    with TestClient(app) as client:  # the lifespan runs the migrations
        with app.state.clues.sessions() as session:
            job = seed_scored_job(session, per_silo=tuple(SIZES.values()), anchors=ANCHORS, checkpoints=2, seed=5)
        yield Env(app, client, job)


def all_rows(env: Env) -> list[dict]:
    """Every row, as the admin sees them unfiltered: the oracle's input."""
    r = env.client.get(env.url("/scores"), headers=ADMIN)
    assert r.status_code == 200, r.text
    return r.json()["rows"]


def ids(rows: list[dict]) -> list[tuple[str, str]]:
    return [(r["silo"], r["sample_id"]) for r in rows]


def test_admin_gets_every_row_in_upload_order(env):
    r = env.client.get(env.url("/scores"), headers=ADMIN)
    body = r.json()
    assert body["total"] == len(body["rows"]) == sum(SIZES.values()) + ANCHORS
    assert body["threshold"] == pytest.approx(env.job.threshold) and body["status"] == "done"
    want = [(ANCHOR_OWNER, a) for a in env.job.anchor_ids] + [
        (s, sid) for s in sorted(SIZES) for sid in env.job.sample_ids[s]
    ]  # ties: owner, then row ("__anchor__" sorts before "silo1")
    assert ids(body["rows"]) == want
    row = next(r for r in body["rows"] if r["silo"] == "silo1")
    assert math.isclose(row["score"], sum(row["parts"]), rel_tol=1e-12) and len(row["parts"]) == 2
    assert row["selected"] == row["auto_selected"] == (row["score"] >= env.job.threshold)
    assert row["override"] is None and len(row["nearest_anchors"]) == 3
    assert {a["anchor_id"] for a in row["nearest_anchors"]} <= set(env.job.anchor_ids)
    anchor = next(r for r in body["rows"] if r["silo"] == ANCHOR_OWNER)
    assert anchor["nearest_anchors"] is None


@pytest.mark.parametrize(
    "params",
    [
        {"silo": "silo2"},
        {"silo": ANCHOR_OWNER},
        {"kept": "true"},
        {"kept": "false", "silo": "silo1"},
        {"min_score": "0.3", "max_score": "0.45"},
        {"q": "SILO3-00000"},
        {"sort": "score", "order": "desc"},
        {"sort": "part:1"},
        {"sort": "part:0", "order": "desc", "kept": "true"},
        {"sort": "sample_id", "order": "desc", "silo": "silo3"},
        {"sort": "selected"},
        {"sort": "silo", "order": "desc"},
        {"overridden": "false", "sort": "score"},
    ],
    ids=lambda p: "&".join(f"{k}={v}" for k, v in p.items()),
)
def test_filters_and_sort_match_python(env, params):
    rows = all_rows(env)
    sort, desc = params.get("sort", "row"), params.get("order") == "desc"
    want = [
        r
        for r in rows
        if r["silo"] == params.get("silo", r["silo"])
        and ("kept" not in params or r["selected"] == (params["kept"] == "true"))
        and ("overridden" not in params or r["override"] is None)
        and r["score"] >= float(params.get("min_score", "-inf"))
        and r["score"] <= float(params.get("max_score", "inf"))
        and params.get("q", "").lower() in r["sample_id"].lower()
    ]  # `rows` is in (owner, row) order already: the ties
    if sort.startswith("part:"):
        want = sorted(want, key=lambda r: r["parts"][int(sort[5:])], reverse=desc)
    elif sort != "row":
        want = sorted(want, key=lambda r: r[sort], reverse=desc)
    elif desc:
        want = want[::-1]
    assert want, "a filter that matches nothing tests little"
    body = env.client.get(env.url("/scores"), params=params, headers=ADMIN).json()
    assert body["total"] == len(want)
    assert ids(body["rows"]) == ids(want)


def test_paging(env):
    params = {"sort": "score", "order": "desc"}
    full = env.client.get(env.url("/scores"), params=params, headers=ADMIN).json()["rows"]
    pages = []
    for offset in range(0, len(full), 25):
        body = env.client.get(env.url("/scores"), params={**params, "limit": 25, "offset": offset}, headers=ADMIN)
        assert body.json()["total"] == len(full)
        pages += body.json()["rows"]
    assert ids(pages) == ids(full)
    past = env.client.get(env.url("/scores"), params={"offset": 10_000}, headers=ADMIN).json()
    assert (past["total"], past["rows"]) == (len(full), [])


@pytest.mark.parametrize(
    "params",
    [
        {"sort": "part:2"},  # T = 2: parts 0 and 1
        {"sort": "part:9"},
        {"sort": "bogus"},
        {"sort": "part:x"},
        {"sort": "score; drop table scores"},
        {"order": "sideways"},
        {"limit": "0"},
        {"offset": "-1"},
        {"kept": "perhaps"},
    ],
)
def test_bad_query_is_422(env, params):
    r = env.client.get(env.url("/scores"), params=params, headers=ADMIN)
    assert r.status_code == 422, r.text
    if not {"limit", "offset"} & set(params):  # the export has no paging
        r = env.client.get(env.url("/scores.csv"), params=params, headers=ADMIN)
        assert r.status_code == 422, r.text


def test_part_beyond_T_names_the_checkpoints(env):
    r = env.client.get(env.url("/scores"), params={"sort": "part:9"}, headers=ADMIN)
    assert "part:9" in r.json()["detail"]


def test_silo_sees_only_its_own_rows(env):
    body = env.client.get(env.url("/scores"), headers=env.silo("silo2")).json()
    assert body["total"] == SIZES["silo2"]
    assert ids(body["rows"]) == [("silo2", s) for s in env.job.sample_ids["silo2"]]
    own = env.client.get(env.url("/scores"), params={"silo": "silo2", "q": "silo1"}, headers=env.silo("silo2"))
    assert own.status_code == 200 and own.json()["total"] == 0  # no other silo's ids leak through a search
    for other in ("silo1", ANCHOR_OWNER):
        for tail in ("/scores", "/scores.csv"):
            r = env.client.get(env.url(tail), params={"silo": other}, headers=env.silo("silo2"))
            assert r.status_code == 403, (other, tail)


def test_scores_need_a_member_and_a_done_job(env):
    with env.sessions() as session:
        _, outsider = repo.create_silo(session, name="outsider")
        session.commit()
        draft = draft_job(session, ["silo1"])
    assert env.client.get(env.url("/scores"), headers=bearer(outsider)).status_code == 404
    assert env.client.get(env.url("/scores")).status_code == 401
    for tail in ("/scores", "/scores.csv", "/summary"):
        r = env.client.get(f"/v1/jobs/{draft}{tail}", headers=env.silo("silo1"))
        assert r.status_code == 409 and "draft" in r.json()["detail"], tail
    assert env.client.get(f"/v1/jobs/{'0' * 32}/scores", headers=ADMIN).status_code == 404


# --- CSV -----------------------------------------------------------------------------------------------------------


def read_csv(text: str) -> tuple[list[str], list[list[str]]]:
    header, *rows = list(csv.reader(io.StringIO(text)))
    return header, rows


def assert_csv_matches(csv_rows: list[list[str]], json_rows: list[dict]) -> None:
    assert len(csv_rows) == len(json_rows)
    for got, want in zip(csv_rows, json_rows, strict=True):
        silo, sid, score, p0, p1, selected, auto, decision, reason, nearest = got
        assert (silo, sid) == (want["silo"], want["sample_id"])
        assert float(score) == want["score"] and [float(p0), float(p1)] == want["parts"]  # exact round trip
        assert (selected, auto) == (str(int(want["selected"])), str(int(want["auto_selected"])))
        o = want["override"]
        assert (decision, reason) == ((o["decision"], o["reason"]) if o else ("", ""))
        assert nearest == ";".join(a["anchor_id"] for a in want["nearest_anchors"] or [])


@pytest.mark.parametrize(
    "params",
    [{}, {"sort": "part:1", "order": "desc"}, {"kept": "false", "sort": "score"}, {"silo": "silo3", "q": "0000"}],
)
def test_csv_equals_the_json_rows(env, params):
    r = env.client.get(env.url("/scores.csv"), params=params, headers=ADMIN)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/csv")
    assert f'filename="clues-{env.job.job_id}-scores.csv"' in r.headers["content-disposition"]
    header, rows = read_csv(r.text)
    assert header == [
        "silo", "sample_id", "score", "part_0", "part_1", "selected", "auto_selected", "override", "override_reason",
        "nearest",
    ]  # fmt: skip
    assert_csv_matches(rows, env.client.get(env.url("/scores"), params=params, headers=ADMIN).json()["rows"])


def test_csv_of_a_silo_is_its_own_and_carries_overrides(env):
    sid = env.job.sample_ids["silo1"][4]
    reason = 'a reason, with "quotes"\nand a newline'
    r = env.client.post(
        env.url("/overrides"), json={"sample_id": sid, "decision": "drop", "reason": reason}, headers=env.silo("silo1")
    )
    assert r.status_code == 201, r.text
    _, rows = read_csv(env.client.get(env.url("/scores.csv"), headers=env.silo("silo1")).text)
    assert_csv_matches(rows, env.client.get(env.url("/scores"), headers=env.silo("silo1")).json()["rows"])
    assert {row[0] for row in rows} == {"silo1"}
    mine = next(row for row in rows if row[1] == sid)
    assert (mine[5], mine[7], mine[8]) == ("0", "drop", reason)


def test_csv_streams_many_batches(tmp_path):
    """More rows than one streamed batch (2000) of the export."""
    app = create_app(
        AppSettings(data_dir=tmp_path, admin_token="admin-secret-for-tests-0123456789abcdef"),
        send=lambda *a: None,
    )
    with TestClient(app) as client, app.state.clues.sessions() as session:
        job = seed_scored_job(session, silos=("big", "small"), per_silo=(4100, 3), anchors=5, checkpoints=2)
        url = f"/v1/jobs/{job.job_id}"
        with client.stream("GET", f"{url}/scores.csv", params={"sort": "score"}, headers=ADMIN) as r:
            assert r.status_code == 200
            chunks = list(r.iter_raw())
        assert len(chunks) >= 2  # streamed in batches, not built whole
        text = b"".join(chunks).decode()
        _, rows = read_csv(text)
        assert len(rows) == 4108
        json_rows = client.get(f"{url}/scores", params={"sort": "score"}, headers=ADMIN).json()["rows"]
        assert_csv_matches(rows, json_rows)


# --- summary -------------------------------------------------------------------------------------------------------


def test_admin_summary(env):
    rows = all_rows(env)
    body = env.client.get(env.url("/summary"), headers=ADMIN).json()
    assert set(body["silos"]) == {*SIZES, ANCHOR_OWNER}
    assert body["checkpoints"] == 2 and len(body["edges"]) == 41
    assert body["edges"][0] <= body["threshold"] <= body["edges"][-1]
    assert body["edges"] == sorted(body["edges"])
    assert body["anchor_scores"] == sorted(r["score"] for r in rows if r["silo"] == ANCHOR_OWNER)
    for owner, s in body["silos"].items():
        mine = [r for r in rows if r["silo"] == owner]
        assert s["n"] == len(mine) == sum(s["counts"])
        assert s["kept"] == s["auto_kept"] == sum(r["selected"] for r in mine)
        assert s["overridden"] == 0
        assert s["mean"] == pytest.approx(sum(r["score"] for r in mine) / len(mine))
        for t in range(2):
            assert s["part_means"][t] == pytest.approx(sum(r["parts"][t] for r in mine) / len(mine))
        # each score falls in the bin its count is in
        for r in mine:
            assert body["edges"][0] <= r["score"] <= body["edges"][-1]
        below = [sum(r["score"] < e for r in mine) for e in body["edges"][1:-1]]
        assert below == [sum(s["counts"][: i + 1]) for i in range(len(below))]


def test_silo_summary_is_its_own(env):
    body = env.client.get(env.url("/summary"), headers=env.silo("silo3")).json()
    assert set(body["silos"]) == {"silo3"} and body["anchor_scores"] == []
    admin = env.client.get(env.url("/summary"), headers=ADMIN).json()
    mine = {k: v for k, v in body["silos"]["silo3"].items() if k != "counts"}
    assert mine == {k: v for k, v in admin["silos"]["silo3"].items() if k != "counts"}
    # Its histogram spans its own scores and the threshold, never the other silos' or the anchors' range.
    own = [r["score"] for r in all_rows(env) if r["silo"] == "silo3"]
    lo, hi = min([*own, admin["threshold"]]), max([*own, admin["threshold"]])
    assert body["edges"][0] == pytest.approx(lo) and body["edges"][-1] == pytest.approx(hi)
    assert body["edges"] != admin["edges"] and sum(body["silos"]["silo3"]["counts"]) == len(own)
    counts, _ = np.histogram(own, bins=np.asarray(body["edges"]))
    assert body["silos"]["silo3"]["counts"] == counts.tolist()
    job = env.client.get(env.url(""), headers=env.silo("silo3")).json()  # its own counts, not everyone's
    kept = sum(r["selected"] for r in all_rows(env) if r["silo"] == "silo3")
    assert job["message"] == f"{kept} of your {len(own)} samples selected"


def test_override_changes_kept_counts_not_histograms(env):
    before = env.client.get(env.url("/summary"), headers=ADMIN).json()
    dropped = next(r for r in all_rows(env) if r["silo"] == "silo1" and not r["selected"])
    r = env.client.post(
        env.url("/overrides"), json={"sample_id": dropped["sample_id"], "decision": "keep", "reason": "looks fine"},
        headers=env.silo("silo1"),
    )  # fmt: skip
    assert r.status_code == 201
    after = env.client.get(env.url("/summary"), headers=ADMIN).json()
    b, a = before["silos"]["silo1"], after["silos"]["silo1"]
    assert (a["kept"], a["auto_kept"], a["overridden"]) == (b["kept"] + 1, b["auto_kept"], 1)
    assert a["counts"] == b["counts"] and after["edges"] == before["edges"]
    assert a["part_means_kept"] == b["part_means_kept"]  # the threshold's own split
    assert {k: v for k, v in after["silos"].items() if k != "silo1"} == {
        k: v for k, v in before["silos"].items() if k != "silo1"
    }


def test_summary_is_built_once_when_missing(env):
    expected = env.client.get(env.url("/summary"), headers=ADMIN).json()
    with env.sessions() as session:  # a job scored before summaries were kept
        session.get(Job, env.job.job_id).summary = None
        session.commit()
    assert env.client.get(env.url("/summary"), headers=ADMIN).json() == expected
    with env.sessions() as session:
        assert session.get(Job, env.job.job_id).summary is not None


# --- near-duplicate clusters ---------------------------------------------------------------------------------------


def test_duplicate_clusters(env):
    scores = {(r["silo"], r["sample_id"]): r for r in all_rows(env)}
    body = env.client.get(env.url("/duplicates/clusters"), headers=ADMIN).json()
    a, b = env.job.sample_ids["silo1"], env.job.sample_ids["silo2"]
    assert body["total"] == 3  # the seed's 3 pairs a[i]-b[i] share no member
    assert [[(m["silo"], m["sample_id"]) for m in c["members"]] for c in body["clusters"]] == [
        [("silo1", a[i]), ("silo2", b[i])] for i in range(3)
    ]  # equal sizes: the most similar first
    assert [c["max_similarity"] for c in body["clusters"]] == pytest.approx([0.99, 0.989, 0.988])
    for c in body["clusters"]:
        assert (c["silos"], c["pairs"]) == (["silo1", "silo2"], 1)
        for m in c["members"]:
            want = scores[m["silo"], m["sample_id"]]
            assert (m["score"], m["selected"]) == (want["score"], want["selected"])
    page = env.client.get(env.url("/duplicates/clusters"), params={"limit": 1, "offset": 1}, headers=ADMIN).json()
    assert page["total"] == 3 and page["clusters"] == body["clusters"][1:2]
    assert env.client.get(env.url("/duplicates/clusters"), headers=env.silo("silo1")).status_code == 403
    assert env.client.get(env.url("/duplicates"), headers=env.silo("silo1")).status_code == 403


def test_duplicate_clusters_join_across_three_silos(env):
    a, b, c = (env.job.sample_ids[s][0] for s in ("silo1", "silo2", "silo3"))
    with env.sessions() as session:
        repo.replace_duplicates(
            session,
            job_id=env.job.job_id,
            pairs=[
                {"owner_a": "silo1", "sample_a": a, "owner_b": "silo2", "sample_b": b, "similarity": 0.981},
                {"owner_a": "silo2", "sample_a": b, "owner_b": "silo3", "sample_b": c, "similarity": 0.995},
            ],
        )
        session.commit()
    body = env.client.get(env.url("/duplicates/clusters"), headers=ADMIN).json()
    assert body["total"] == 1
    cluster = body["clusters"][0]
    assert [(m["silo"], m["sample_id"]) for m in cluster["members"]] == [("silo1", a), ("silo2", b), ("silo3", c)]
    assert (cluster["pairs"], cluster["max_similarity"], cluster["silos"]) == (2, 0.995, ["silo1", "silo2", "silo3"])


# --- overrides -----------------------------------------------------------------------------------------------------


def override(env, silo: str, sample_id: str, decision: str = "keep", reason: str = "why not"):
    return env.client.post(
        env.url("/overrides"), json={"sample_id": sample_id, "decision": decision, "reason": reason},
        headers=env.silo(silo),
    )  # fmt: skip


def test_override_flips_the_decision_in_force(env):
    kept = next(r for r in all_rows(env) if r["silo"] == "silo2" and r["selected"])
    r = override(env, "silo2", kept["sample_id"], "drop", "  mislabelled  ")
    assert r.status_code == 201, r.text
    record = r.json()
    want = {
        "job": env.job.job_id, "silo": "silo2", "sample_id": kept["sample_id"], "decision": "drop",
        "reason": "mislabelled", "actor": "silo2", "previous": True, "selected": False,
    }  # fmt: skip
    assert {k: record[k] for k in want} == want and isinstance(record["id"], int)
    row = env.client.get(env.url("/scores"), params={"q": kept["sample_id"]}, headers=env.silo("silo2")).json()
    (row,) = row["rows"]
    assert (row["selected"], row["auto_selected"]) == (False, True)
    assert row["override"]["id"] == record["id"]
    assert (row["override"]["decision"], row["override"]["reason"], row["override"]["actor"]) == (
        "drop", "mislabelled", "silo2",
    )  # fmt: skip
    flagged = env.client.get(env.url("/scores"), params={"overridden": "true"}, headers=ADMIN).json()
    assert ids(flagged["rows"]) == [("silo2", kept["sample_id"])]
    dropped = env.client.get(env.url("/scores"), params={"kept": "false", "silo": "silo2"}, headers=ADMIN).json()
    assert ("silo2", kept["sample_id"]) in ids(dropped["rows"])

    undo = override(env, "silo2", kept["sample_id"], "auto", "undo")
    assert undo.status_code == 201 and (undo.json()["previous"], undo.json()["selected"]) == (False, True)
    row = env.client.get(env.url("/scores"), params={"q": kept["sample_id"]}, headers=ADMIN).json()["rows"][0]
    assert (row["selected"], row["override"]) == (True, None)


def test_override_refusals(env):
    own = env.job.sample_ids["silo1"][0]
    other = env.job.sample_ids["silo2"][0]
    body = {"sample_id": own, "decision": "keep", "reason": "r"}
    assert env.client.post(env.url("/overrides"), json=body, headers=ADMIN).status_code == 403
    assert env.client.post(env.url("/overrides"), json=body).status_code == 401
    assert override(env, "silo1", "no-such-sample").status_code == 404
    assert override(env, "silo1", other).status_code == 404  # another silo's sample: as if it did not exist
    assert override(env, "silo1", env.job.anchor_ids[0]).status_code == 404
    for bad in (
        {**body, "reason": ""},
        {**body, "reason": "   "},
        {**body, "reason": "x" * 501},
        {**body, "decision": "maybe"},
        {**body, "sample_id": ""},
        {"sample_id": own, "decision": "keep"},
        {**body, "extra": 1},
    ):
        r = env.client.post(env.url("/overrides"), json=bad, headers=env.silo("silo1"))
        assert r.status_code == 422, bad
    with env.sessions() as session:
        draft = draft_job(session, ["silo1"])
    r = env.client.post(f"/v1/jobs/{draft}/overrides", json=body, headers=env.silo("silo1"))
    assert r.status_code == 409
    log = env.client.get(env.url("/overrides"), headers=ADMIN).json()
    assert log == {"total": 0, "rows": []}  # nothing refused was recorded
    assert all(not r["override"] for r in all_rows(env))


def test_override_log_admin_all_silo_own(env):
    made = [
        override(env, "silo1", env.job.sample_ids["silo1"][0], "keep").json(),
        override(env, "silo2", env.job.sample_ids["silo2"][1], "drop").json(),
        override(env, "silo1", env.job.sample_ids["silo1"][2], "drop").json(),
    ]
    admin = env.client.get(env.url("/overrides"), headers=ADMIN).json()
    assert admin["total"] == 3 and [r["id"] for r in admin["rows"]] == [m["id"] for m in made[::-1]]
    assert admin["rows"][0] == made[2]
    mine = env.client.get(env.url("/overrides"), headers=env.silo("silo1")).json()
    assert mine["total"] == 2 and {r["silo"] for r in mine["rows"]} == {"silo1"}
    assert env.client.get(env.url("/overrides"), params={"silo": "silo1"}, headers=env.silo("silo2")).status_code == 403
    only2 = env.client.get(env.url("/overrides"), params={"silo": "silo2"}, headers=ADMIN).json()
    assert [r["id"] for r in only2["rows"]] == [made[1]["id"]]
    one = env.client.get(
        env.url("/overrides"), params={"sample_id": env.job.sample_ids["silo1"][0]}, headers=env.silo("silo1")
    ).json()
    assert [r["id"] for r in one["rows"]] == [made[0]["id"]]
    page = env.client.get(env.url("/overrides"), params={"limit": 1, "offset": 1}, headers=ADMIN).json()
    assert page["total"] == 3 and [r["id"] for r in page["rows"]] == [made[1]["id"]]
    r = env.client.get(env.url("/overrides"), params={"silo": ANCHOR_OWNER}, headers=ADMIN)
    assert r.status_code == 422
    assert env.client.get(env.url("/overrides"), headers=env.silo("silo3")).json() == {"total": 0, "rows": []}


def test_a_silo_learns_its_own_name(env):
    me = env.client.get("/v1/silos/me", headers=env.silo("silo2"))
    assert me.status_code == 200 and me.json()["name"] == "silo2"
    assert env.client.get("/v1/silos/me", headers=ADMIN).status_code == 403
    assert env.client.get("/v1/silos/me").status_code == 401


# --- a calibrated job's signal columns -------------------------------------------------------------------------------


@pytest.fixture
def calibrated(tmp_path):
    app = create_app(
        AppSettings(data_dir=tmp_path, admin_token="admin-secret-for-tests-0123456789abcdef"),
        send=lambda *a: None,
    )
    with TestClient(app) as client:
        with app.state.clues.sessions() as session:
            job = seed_scored_job(session, per_silo=tuple(SIZES.values()), anchors=ANCHORS, seed=5, calibrated=True)
        yield Env(app, client, job)


def test_a_calibrated_job_s_rows_carry_values_z_and_the_flagging_signal_in_words(calibrated, env):
    rows = all_rows(calibrated)
    fused = list(fused_signals(DEFAULT_SIGNALS))
    with calibrated.sessions() as session:
        stored = {(s.owner, s.sample_id): s for s in session.query(Score).filter_by(job_id=calibrated.job.job_id)}
    for row in rows:
        s = stored[(row["silo"], row["sample_id"])]
        assert row["values"] == s.signal_values and row["z"] == s.signal_z and row["flagged_by"] == s.flagged_by
        assert sorted(row["values"]) == sorted(["trace", "loss", *DEFAULT_SIGNALS]) and list(row["z"]) == fused
        assert row["flagged_by"] == max(fused, key=lambda name: row["z"][name])
        assert row["flag_reason"] == EXPLANATIONS[row["flagged_by"]]
        assert math.isclose(row["values"]["trace"], sum(row["parts"]), rel_tol=1e-12)  # the parts stay the trace's
    dropped = [r for r in rows if not r["auto_selected"] and r["silo"] != ANCHOR_OWNER]
    assert dropped and {r["flagged_by"] for r in dropped} <= set(fused)
    ScoresPublic.model_validate(calibrated.client.get(calibrated.url("/scores"), headers=ADMIN).json())
    trace = all_rows(env)  # a pure trace job: none of it
    assert all((r["values"], r["z"], r["flagged_by"], r["flag_reason"]) == (None, None, None, None) for r in trace)
    mine = calibrated.client.get(calibrated.url("/scores"), headers=calibrated.silo("silo2")).json()["rows"]
    assert {r["silo"] for r in mine} == {"silo2"} and all(r["z"] is not None for r in mine)


def test_a_calibrated_job_s_csv_has_the_same_signal_columns(calibrated):
    fused = list(fused_signals(DEFAULT_SIGNALS))
    values = ["trace", "loss", *DEFAULT_SIGNALS]
    params = {"kept": "false", "sort": "score"}
    header, rows = read_csv(calibrated.client.get(calibrated.url("/scores.csv"), params=params, headers=ADMIN).text)
    extra = [*values, *(f"z_{s}" for s in fused), "flagged_by", "flag_reason"]
    assert header[-len(extra) :] == extra and len(header) == 10 + len(extra)
    json_rows = calibrated.client.get(calibrated.url("/scores"), params=params, headers=ADMIN).json()["rows"]
    assert_csv_matches([row[:10] for row in rows], json_rows)
    for got, want in zip(rows, json_rows, strict=True):
        cells = dict(zip(header, got, strict=True))
        assert [float(cells[v]) for v in values] == [want["values"][v] for v in values]  # exact round trip
        assert [float(cells[f"z_{s}"]) for s in fused] == [want["z"][s] for s in fused]
        assert (cells["flagged_by"], cells["flag_reason"]) == (want["flagged_by"], want["flag_reason"])
