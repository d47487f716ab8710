"""The dashboard's data layer (`storage.scores`) against plain-Python and numpy oracles: filters, sort orders and
pages of the sample table, the summary's histograms and means, owner overrides and their replay after a rescore,
near-duplicate clusters, and the 0004 migration of existing score rows."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
from alembic import command
from sqlalchemy import inspect, select, text

from scoring.spec import JobSpec
from storage import repository as repo
from storage import scores as store
from storage.db import alembic_config, make_engine, make_session_factory, upgrade
from storage.errors import NotFoundError
from storage.models import Job, Score, ScoreOverride
from storage.scores import ScoreQuery
from tests.seed import seed_scored_job
from tests.storage.factories import new_job
from wire import ANCHOR_OWNER

SILOS = ("silo1", "silo2", "silo3")
PREFIXES = ("Doc_A", "doc%A", "DOCxA", "note-")
# silo1's ids hold the LIKE wildcards % and _ literally, in mixed case, to test the escaped, case-insensitive search
SILO1_IDS = [f"{p}{i:03d}" for i, p in zip(range(24), itertools.cycle(PREFIXES), strict=False)]


@pytest.fixture
def seeded(session):
    return seed_scored_job(
        session, silos=SILOS, per_silo=(24, 20, 16), anchors=15, checkpoints=3, seed=7, sample_ids={"silo1": SILO1_IDS}
    )


def all_rows(session, job_id: str) -> list[Score]:
    """Every score of the job, read without `storage.scores` (the oracle's input)."""
    return list(session.scalars(select(Score).where(Score.job_id == job_id)))


def keys(rows) -> list[tuple[str, str]]:
    return [(r.owner, r.sample_id) for r in rows]


def expected_order(rows: list[Score], sort: str, descending: bool) -> list[Score]:
    """The documented order: the sort key (asc/desc), ties by (owner, row) ascending; ``row`` is (owner, row)."""
    base = sorted(rows, key=lambda r: (r.owner, r.row))
    if sort == "row":
        return base[::-1] if descending else base
    if sort.startswith("part:"):
        t = int(sort.split(":")[1])
        return sorted(base, key=lambda r: r.parts[t], reverse=descending)  # sorted is stable under reverse too
    attr = {"silo": "owner"}.get(sort, sort)
    return sorted(base, key=lambda r: getattr(r, attr), reverse=descending)


def test_seed_is_what_the_oracles_assume(session, seeded):
    rows = all_rows(session, seeded.job_id)
    counts = {o: sum(r.owner == o for r in rows) for o in (*SILOS, ANCHOR_OWNER)}
    assert counts == {"silo1": 24, "silo2": 20, "silo3": 16, ANCHOR_OWNER: 15}
    assert all(r.auto_selected == r.selected and r.override_id is None for r in rows)
    assert any(r.selected for r in rows) and not all(r.selected for r in rows)  # both decisions occur
    assert all(math.isclose(r.score, sum(r.parts), rel_tol=1e-12) and len(r.parts) == 3 for r in rows)


@pytest.mark.parametrize(
    "query",
    [
        ScoreQuery(),
        ScoreQuery(owner="silo2"),
        ScoreQuery(owner=ANCHOR_OWNER),
        ScoreQuery(owner="nobody"),
        ScoreQuery(selected=True),
        ScoreQuery(selected=False, owner="silo1"),
        ScoreQuery(overridden=False),
        ScoreQuery(overridden=True),
        ScoreQuery(min_score=0.4),
        ScoreQuery(max_score=0.4),
        ScoreQuery(min_score=0.2, max_score=0.5, selected=True),
        ScoreQuery(id_contains="SILO2-00001"),
    ],
    ids=repr,
)
def test_query_filters_match_python(session, seeded, query):
    rows = all_rows(session, seeded.job_id)
    want = [
        r
        for r in rows
        if (query.owner is None or r.owner == query.owner)
        and (query.selected is None or r.selected == query.selected)
        and (query.overridden is None or (r.override_id is not None) == query.overridden)
        and (query.min_score is None or r.score >= query.min_score)
        and (query.max_score is None or r.score <= query.max_score)
        and (query.id_contains is None or query.id_contains.lower() in r.sample_id.lower())
    ]
    total, page = store.query_scores(session, job_id=seeded.job_id, query=query)
    assert total == len(page) == len(want)
    assert keys(page) == keys(expected_order(want, "row", False))


def test_score_bounds_are_inclusive(session, seeded):
    some = all_rows(session, seeded.job_id)[5]
    total, page = store.query_scores(
        session, job_id=seeded.job_id, query=ScoreQuery(min_score=some.score, max_score=some.score)
    )
    assert (total, keys(page)) == (1, [(some.owner, some.sample_id)])


@pytest.mark.parametrize(
    ("needle", "prefix"),
    [("c_a", "Doc_A"), ("C_A", "Doc_A"), ("%a", "doc%A"), ("cxa", "DOCxA"), ("E-0", "note-")],
)
def test_id_search_is_case_insensitive_and_takes_wildcards_literally(session, seeded, needle, prefix):
    total, page = store.query_scores(session, job_id=seeded.job_id, query=ScoreQuery(id_contains=needle))
    assert total == 6  # 24 ids cycle through 4 prefixes; a LIKE wildcard would have matched the other spellings too
    assert [sid for _, sid in keys(page)] == [s for s in SILO1_IDS if s.startswith(prefix)]


@pytest.mark.parametrize(
    ("sort", "descending"),
    list(itertools.product(["row", "score", "sample_id", "silo", "selected", "part:0", "part:2"], [False, True])),
)
def test_sort_orders_match_python(session, seeded, sort, descending):
    rows = all_rows(session, seeded.job_id)
    query = ScoreQuery(sort=sort, descending=descending)
    total, page = store.query_scores(session, job_id=seeded.job_id, query=query)
    assert total == len(rows)
    assert keys(page) == keys(expected_order(rows, sort, descending))
    streamed = list(store.iter_scores(session, job_id=seeded.job_id, query=query, batch=7))
    assert keys(streamed) == keys(page)


def test_sort_with_filter_and_pages(session, seeded):
    query = ScoreQuery(selected=False, sort="part:1", descending=True)
    total, full = store.query_scores(session, job_id=seeded.job_id, query=query)
    assert keys(full) == keys(
        expected_order([r for r in all_rows(session, seeded.job_id) if not r.selected], "part:1", True)
    )
    pages = []
    for offset in range(0, total + 5, 9):
        t, page = store.query_scores(session, job_id=seeded.job_id, query=query, limit=9, offset=offset)
        assert t == total  # the total ignores paging
        assert len(page) == max(0, min(9, total - offset))
        pages += page
    assert keys(pages) == keys(full)


@pytest.mark.parametrize("sort", ["bogus", "part:", "part:x", "part:-1", "parts:1", "score:1", ""])
def test_unknown_sort_key_raises(sort):
    with pytest.raises(ValueError, match="sort"):
        ScoreQuery(sort=sort).part_index()


def test_part_index():
    assert ScoreQuery(sort="part:12").part_index() == 12
    assert ScoreQuery(sort="score").part_index() is None


# --- summary -------------------------------------------------------------------------------------------------------


def test_summary_matches_numpy(session, seeded):
    rows = all_rows(session, seeded.job_id)
    summary = store.build_summary(session, job_id=seeded.job_id)
    scores = np.array([r.score for r in rows])
    lo, hi = min(scores.min(), seeded.threshold), max(scores.max(), seeded.threshold)
    edges = np.linspace(lo, hi, store.HIST_BINS + 1)
    np.testing.assert_allclose(summary["edges"], edges, rtol=0, atol=1e-12)
    assert summary["edges"][0] <= summary["threshold"] <= summary["edges"][-1]
    assert summary["threshold"] == pytest.approx(seeded.threshold)
    assert summary["checkpoints"] == 3
    assert set(summary["owners"]) == {*SILOS, ANCHOR_OWNER}
    for owner, got in summary["owners"].items():
        mine = [r for r in rows if r.owner == owner]
        s = np.array([r.score for r in mine])
        parts = np.array([r.parts for r in mine])  # (n, T)
        kept = np.array([r.auto_selected for r in mine])
        assert got["n"] == len(mine) == sum(got["counts"])
        assert len(got["counts"]) == store.HIST_BINS
        assert got["counts"] == np.histogram(s, bins=edges)[0].tolist()
        assert got["mean"] == pytest.approx(s.mean()) and got["median"] == pytest.approx(np.median(s))
        np.testing.assert_allclose(got["part_means"], parts.mean(axis=0), rtol=1e-12)
        np.testing.assert_allclose(got["part_means_kept"], parts[kept].mean(axis=0), rtol=1e-12)
        np.testing.assert_allclose(got["part_means_dropped"], parts[~kept].mean(axis=0), rtol=1e-12)
    assert summary["anchor_scores"] == sorted(r.score for r in rows if r.owner == ANCHOR_OWNER)
    # replace_scores stored the same summary on the job
    assert session.get(Job, seeded.job_id).summary == summary


def test_summary_with_one_side_empty_and_degenerate_edges(session):
    job = new_job(session)
    row = {"owner": "alpha", "sample_id": "s", "row": 0, "score": 2.0, "parts": [1.5, 0.5], "selected": True}
    repo.replace_scores(session, job_id=job.id, rows=[row])
    summary = store.build_summary(session, job_id=job.id)
    assert summary["threshold"] is None
    assert summary["edges"][0] == pytest.approx(1.5) and summary["edges"][-1] == pytest.approx(2.5)
    alpha = summary["owners"]["alpha"]
    assert (alpha["n"], sum(alpha["counts"]), alpha["part_means_dropped"]) == (1, 1, None)
    assert alpha["part_means_kept"] == [1.5, 0.5]
    assert summary["anchor_scores"] == []


def test_summary_threshold_outside_the_scores_widens_the_edges(session):
    job = new_job(session)
    rows = [
        {"owner": "alpha", "sample_id": f"s{i}", "row": i, "score": v, "parts": [v, 0.0], "selected": False}
        for i, v in enumerate([0.1, 0.2, 0.3])
    ]
    repo.update_job(session, job_id=job.id, threshold_value=0.9)
    repo.replace_scores(session, job_id=job.id, rows=rows)
    summary = store.build_summary(session, job_id=job.id, bins=8)
    assert summary["edges"] == pytest.approx(np.linspace(0.1, 0.9, 9).tolist())
    assert summary["owners"]["alpha"]["counts"] == np.histogram([0.1, 0.2, 0.3], np.linspace(0.1, 0.9, 9))[0].tolist()


def test_summary_of_an_empty_job_and_of_a_missing_one(session):
    job = new_job(session)
    summary = store.build_summary(session, job_id=job.id)
    assert (summary["owners"], summary["anchor_scores"], len(summary["edges"])) == ({}, [], store.HIST_BINS + 1)
    with pytest.raises(NotFoundError):
        store.build_summary(session, job_id="0" * 32)


def test_anchor_scores_are_thinned_evenly(session, seeded, monkeypatch):
    monkeypatch.setattr(store, "ANCHOR_SCORES_KEPT", 4)
    anchors = sorted(r.score for r in all_rows(session, seeded.job_id) if r.owner == ANCHOR_OWNER)
    got = store.build_summary(session, job_id=seeded.job_id)["anchor_scores"]
    assert got == anchors[::4]  # ceil(15 / 4) = 4
    assert len(got) <= 4


# --- overrides -----------------------------------------------------------------------------------------------------


def _first(session, job_id: str, owner: str, selected: bool) -> Score:
    return next(r for r in all_rows(session, job_id) if r.owner == owner and r.selected is selected)


def test_override_keep_drop_auto(session, seeded):
    job_id = seeded.job_id
    dropped = _first(session, job_id, "silo2", False)
    before = store.decision_counts(session, job_id=job_id)

    keep = store.override(
        session, job_id=job_id, owner="silo2", sample_id=dropped.sample_id, decision="keep", reason="  fine  ",
        actor="silo2",
    )  # fmt: skip
    assert (keep.previous, keep.selected, keep.reason, keep.decision, keep.actor) == (
        False, True, "fine", "keep", "silo2",
    )  # fmt: skip
    session.expire_all()
    row = session.get(Score, (job_id, "silo2", dropped.sample_id))
    assert (row.selected, row.auto_selected, row.override_id) == (True, False, keep.id)
    after = store.decision_counts(session, job_id=job_id)
    assert after["silo2"] == {**before["silo2"], "kept": before["silo2"]["kept"] + 1, "overridden": 1}
    assert {o: c for o, c in after.items() if o != "silo2"} == {o: c for o, c in before.items() if o != "silo2"}
    total, page = store.query_scores(session, job_id=job_id, query=ScoreQuery(overridden=True))
    assert (total, keys(page)) == (1, [("silo2", dropped.sample_id)])

    drop = store.override(
        session, job_id=job_id, owner="silo2", sample_id=dropped.sample_id, decision="drop", reason="no",
        actor="silo2",
    )  # fmt: skip
    assert (drop.previous, drop.selected) == (True, False)
    session.expire_all()
    assert session.get(Score, (job_id, "silo2", dropped.sample_id)).override_id == drop.id

    auto = store.override(
        session, job_id=job_id, owner="silo2", sample_id=dropped.sample_id, decision="auto", reason="undo",
        actor="silo2",
    )  # fmt: skip
    assert (auto.previous, auto.selected) == (False, False)
    session.expire_all()
    row = session.get(Score, (job_id, "silo2", dropped.sample_id))
    assert (row.selected, row.override_id) == (False, None)
    assert store.decision_counts(session, job_id=job_id) == before

    total, log = store.list_overrides(session, job_id=job_id)
    assert total == 3 and [o.id for o in log] == [auto.id, drop.id, keep.id]  # newest first


def test_decision_counts_match_python(session, seeded):
    rows = all_rows(session, seeded.job_id)
    kept = _first(session, seeded.job_id, "silo1", True)
    store.override(
        session, job_id=seeded.job_id, owner="silo1", sample_id=kept.sample_id, decision="drop", reason="r",
        actor="silo1",
    )  # fmt: skip
    session.expire_all()
    rows = all_rows(session, seeded.job_id)
    want = {
        o: {
            "n": sum(r.owner == o for r in rows),
            "kept": sum(r.owner == o and r.selected for r in rows),
            "auto_kept": sum(r.owner == o and r.auto_selected for r in rows),
            "overridden": sum(r.owner == o and r.override_id is not None for r in rows),
        }
        for o in (*SILOS, ANCHOR_OWNER)
    }
    assert store.decision_counts(session, job_id=seeded.job_id) == want
    assert want["silo1"]["kept"] == want["silo1"]["auto_kept"] - 1


@pytest.mark.parametrize(
    ("decision", "reason", "error"),
    [
        ("maybe", "r", ValueError),
        ("KEEP", "r", ValueError),
        ("keep", "", ValueError),
        ("keep", " \n\t ", ValueError),
        ("keep", "x" * (store.MAX_REASON + 1), ValueError),
    ],
)
def test_override_rejects_bad_input_and_records_nothing(session, seeded, decision, reason, error):
    sid = seeded.sample_ids["silo1"][0]
    with pytest.raises(error):
        store.override(
            session, job_id=seeded.job_id, owner="silo1", sample_id=sid, decision=decision, reason=reason,
            actor="silo1",
        )  # fmt: skip
    assert store.list_overrides(session, job_id=seeded.job_id)[0] == 0


def test_override_reason_at_the_limit_is_accepted(session, seeded):
    sid = seeded.sample_ids["silo1"][0]
    record = store.override(
        session, job_id=seeded.job_id, owner="silo1", sample_id=sid, decision="keep", reason="x" * store.MAX_REASON,
        actor="silo1",
    )  # fmt: skip
    assert len(record.reason) == store.MAX_REASON


@pytest.mark.parametrize(
    ("owner", "sample_id"),
    [("silo1", "missing"), ("silo2", SILO1_IDS[0]), ("silo1", "silo2-000000"), (ANCHOR_OWNER, "silo1-000000")],
)
def test_override_of_an_unknown_sample_is_not_found(session, seeded, owner, sample_id):
    with pytest.raises(NotFoundError):
        store.override(
            session, job_id=seeded.job_id, owner=owner, sample_id=sample_id, decision="keep", reason="r", actor=owner
        )
    assert store.list_overrides(session, job_id=seeded.job_id)[0] == 0


def test_override_reads_the_committed_decision_not_a_cached_one(engine, seeded):
    """A session that read the row earlier must still record the decision in force when it overrides: the row is
    re-read under its lock, not taken from the session's identity map."""
    factory = make_session_factory(engine)
    sid = seeded.sample_ids["silo3"][0]
    with factory() as reader, factory() as writer:
        was = reader.get(Score, (seeded.job_id, "silo3", sid)).selected
        reader.commit()  # ends the transaction; expire_on_commit=False keeps the cached row
        flip = "drop" if was else "keep"
        store.override(
            writer, job_id=seeded.job_id, owner="silo3", sample_id=sid, decision=flip, reason="a", actor="silo3"
        )
        writer.commit()
        record = store.override(
            reader, job_id=seeded.job_id, owner="silo3", sample_id=sid, decision="auto", reason="b", actor="silo3"
        )
        assert record.previous is (not was)


def test_list_overrides_filters_and_pages(session, seeded):
    made = []
    for owner, i, decision in [("silo1", 0, "keep"), ("silo2", 1, "drop"), ("silo1", 2, "drop"), ("silo1", 0, "auto")]:
        sid = seeded.sample_ids[owner][i]
        made.append(
            store.override(
                session, job_id=seeded.job_id, owner=owner, sample_id=sid, decision=decision, reason="r", actor=owner
            )
        )
    total, rows = store.list_overrides(session, job_id=seeded.job_id, owner="silo1")
    assert total == 3 and [r.id for r in rows] == [made[3].id, made[2].id, made[0].id]
    total, rows = store.list_overrides(session, job_id=seeded.job_id, sample_id=seeded.sample_ids["silo1"][0])
    assert total == 2 and [r.id for r in rows] == [made[3].id, made[0].id]
    total, rows = store.list_overrides(session, job_id=seeded.job_id, limit=2, offset=1)
    assert total == 4 and [r.id for r in rows] == [made[2].id, made[1].id]
    assert store.overrides_by_id(session, [made[1].id, None, made[1].id]) == {made[1].id: made[1]}
    assert store.overrides_by_id(session, [None]) == {}


def test_rescore_reapplies_the_latest_overrides_and_rebuilds_the_summary(session, seeded):
    job_id = seeded.job_id
    # a (row 1) and c (row 3) are dropped by the rescore's threshold, b (row 0) kept: the overrides of a and b
    # disagree with it
    a, b, c = (seeded.sample_ids["silo1"][i] for i in (1, 0, 3))

    def do(sid: str, decision: str):
        return store.override(
            session, job_id=job_id, owner="silo1", sample_id=sid, decision=decision, reason="r", actor="silo1"
        )

    do(a, "drop")
    keep_a = do(a, "keep")  # the latest of a's overrides is the one in force
    drop_b = do(b, "drop")
    do(c, "keep")
    do(c, "auto")  # back to the threshold's decision: nothing to re-apply
    old = {(r.owner, r.sample_id): r.score for r in all_rows(session, job_id)}

    # A rescore: every score shifts by +10 and the threshold's decision alternates by row
    rows = [
        {"owner": r.owner, "sample_id": r.sample_id, "row": r.row, "score": r.score + 10, "parts": [*r.parts[:2],
         r.parts[2] + 10], "selected": r.row % 2 == 0}
        for r in all_rows(session, job_id)
    ]  # fmt: skip
    session.expunge_all()
    repo.replace_scores(session, job_id=job_id, rows=rows)
    session.expire_all()
    got = {(r.owner, r.sample_id): r for r in all_rows(session, job_id)}
    assert (got["silo1", a].selected, got["silo1", a].auto_selected, got["silo1", a].override_id) == (
        True, False, keep_a.id,
    )  # fmt: skip
    assert (got["silo1", b].selected, got["silo1", b].auto_selected, got["silo1", b].override_id) == (
        False, True, drop_b.id,
    )  # fmt: skip
    assert (got["silo1", c].selected, got["silo1", c].override_id) == (False, None)
    others = [r for k, r in got.items() if k not in {("silo1", a), ("silo1", b)}]
    assert all(r.selected == (r.row % 2 == 0) and r.override_id is None for r in others)
    assert all(got[k].score == pytest.approx(v + 10) for k, v in old.items())

    summary = session.get(Job, job_id).summary
    assert summary["owners"]["silo2"]["mean"] == pytest.approx(
        np.mean([v for (o, _), v in old.items() if o == "silo2"]) + 10
    )
    assert summary["edges"][-1] == pytest.approx(max(old.values()) + 10)
    assert store.reapply_overrides(session, job_id=job_id) == 2  # a and b


def test_rescore_that_flips_auto_keeps_the_owner_decision(session, seeded):
    job_id = seeded.job_id
    kept = _first(session, job_id, "silo2", True)
    store.override(
        session, job_id=job_id, owner="silo2", sample_id=kept.sample_id, decision="keep", reason="r", actor="silo2"
    )
    rows = [
        {"owner": r.owner, "sample_id": r.sample_id, "row": r.row, "score": r.score, "parts": r.parts,
         "selected": False}
        for r in all_rows(session, job_id)
    ]  # fmt: skip
    session.expunge_all()
    repo.replace_scores(session, job_id=job_id, rows=rows)
    counts = store.decision_counts(session, job_id=job_id)
    assert counts["silo2"] == {"n": 20, "kept": 1, "auto_kept": 0, "overridden": 1}
    assert counts["silo1"]["kept"] == 0


# --- near-duplicate clusters ---------------------------------------------------------------------------------------


def _pair(a: tuple[str, str], b: tuple[str, str], sim: float) -> dict:
    return {"owner_a": a[0], "sample_a": a[1], "owner_b": b[0], "sample_b": b[1], "similarity": sim}


def test_duplicate_clusters_join_chains(session, seeded):
    ids = seeded.sample_ids
    a, b, c = ("silo1", ids["silo1"][3]), ("silo2", ids["silo2"][4]), ("silo3", ids["silo3"][5])
    d, e = ("silo1", ids["silo1"][7]), ("silo2", ids["silo2"][8])
    ghost = ("silo3", "not-scored")
    repo.replace_duplicates(
        session, job_id=seeded.job_id, pairs=[_pair(a, b, 0.985), _pair(b, c, 0.991), _pair(d, e, 0.999)]
    )
    scored = {(r.owner, r.sample_id): r for r in all_rows(session, seeded.job_id)}
    clusters = store.duplicate_clusters(session, job_id=seeded.job_id)
    assert [len(c["members"]) for c in clusters] == [3, 2]
    first, second = clusters
    assert [(m["silo"], m["sample_id"]) for m in first["members"]] == sorted([a, b, c])
    assert (first["silos"], first["pairs"], first["max_similarity"]) == (["silo1", "silo2", "silo3"], 2, 0.991)
    for m in first["members"] + second["members"]:
        r = scored[m["silo"], m["sample_id"]]
        assert (m["score"], m["selected"]) == (r.score, r.selected)
    assert (second["silos"], second["pairs"], second["max_similarity"]) == (["silo1", "silo2"], 1, 0.999)

    repo.replace_duplicates(session, job_id=seeded.job_id, pairs=[_pair(a, b, 0.985), _pair(e, ghost, 0.98)])
    clusters = store.duplicate_clusters(session, job_id=seeded.job_id)
    ghost_member = next(m for c in clusters for m in c["members"] if m["sample_id"] == "not-scored")
    assert (ghost_member["score"], ghost_member["selected"]) == (None, None)
    assert store.duplicate_clusters(session, job_id="0" * 32) == []


def test_duplicate_clusters_are_the_connected_components(session, seeded):
    rng = np.random.default_rng(3)
    nodes = [("silo1", s) for s in seeded.sample_ids["silo1"]] + [("silo2", s) for s in seeded.sample_ids["silo2"]]
    edges = {tuple(sorted(rng.choice(len(nodes), 2, replace=False).tolist())) for _ in range(25)}
    pairs = [_pair(nodes[i], nodes[j], 0.98 + 0.0001 * k) for k, (i, j) in enumerate(sorted(edges))]
    repo.replace_duplicates(session, job_id=seeded.job_id, pairs=pairs)

    # oracle: components by depth-first search over the adjacency lists
    adjacent: dict[int, set[int]] = {}
    for i, j in edges:
        adjacent.setdefault(i, set()).add(j)
        adjacent.setdefault(j, set()).add(i)
    seen, components = set(), []
    for start in adjacent:
        if start in seen:
            continue
        stack, comp = [start], set()
        while stack:
            n = stack.pop()
            if n not in comp:
                comp.add(n)
                stack.extend(adjacent[n] - comp)
        seen |= comp
        components.append(frozenset(nodes[n] for n in comp))

    clusters = store.duplicate_clusters(session, job_id=seeded.job_id)
    got = [frozenset((m["silo"], m["sample_id"]) for m in c["members"]) for c in clusters]
    assert sorted(map(sorted, got)) == sorted(map(sorted, components))
    assert [len(c) for c in got] == sorted((len(c) for c in got), reverse=True)
    assert sum(c["pairs"] for c in clusters) == len(edges)


# --- migration 0004 ------------------------------------------------------------------------------------------------


def test_migration_0004_copies_selected_into_auto_selected(tmp_path: Path):
    engine = make_engine(f"sqlite:///{tmp_path}/clues.db")
    upgrade(engine, "0003_training")
    now = "2026-01-01 00:00:00.000000"
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO jobs (id, name, model, lora, projection, similarity, threshold, precondition, options,"
                " status, anchor_status, progress, message, threshold_value, created_at, updated_at) VALUES (:id,"
                " 'old', 'tiny:0', '{}', '{}', 'cosine', '{}', 1, '{}', 'done', 'done', 1.0, '', 0.5, :now, :now)"
            ),
            {"id": "a" * 32, "now": now},
        )
        for i, (score, selected) in enumerate([(0.9, True), (0.1, False), (0.7, True)]):
            conn.execute(
                text(
                    "INSERT INTO scores (job_id, owner, sample_id, row, score, parts, selected)"
                    " VALUES (:job, 'alpha', :sid, :row, :score, :parts, :selected)"
                ),
                {
                    "job": "a" * 32,
                    "sid": f"s{i}",
                    "row": i,
                    "score": score,
                    "parts": f"[{score}]",
                    "selected": selected,
                },
            )
    upgrade(engine)
    with engine.connect() as conn:
        got = conn.execute(
            text("SELECT sample_id, selected, auto_selected, override_id, nearest FROM scores ORDER BY row")
        ).all()
        assert [tuple(r) for r in got] == [("s0", 1, 1, None, None), ("s1", 0, 0, None, None), ("s2", 1, 1, None, None)]
        assert conn.execute(text("SELECT summary FROM jobs")).scalar() is None
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0011_withdrawals"
    indexes = {i["name"] for i in inspect(engine).get_indexes("scores")}
    assert {"ix_scores_job_id_score", "ix_scores_job_id_owner_score"} <= indexes

    with make_session_factory(engine)() as session:  # the ORM reads the migrated rows
        total, page = store.query_scores(session, job_id="a" * 32, query=ScoreQuery(sort="score", descending=True))
        assert total == 3 and [r.sample_id for r in page] == ["s0", "s2", "s1"]
        record = store.override(
            session, job_id="a" * 32, owner="alpha", sample_id="s1", decision="keep", reason="r", actor="alpha"
        )
        assert (record.previous, record.selected) == (False, True)
        summary = store.store_summary(session, job_id="a" * 32)
        assert summary["owners"]["alpha"]["n"] == 3
        session.commit()

    with engine.begin() as conn:  # and back down: the new columns and table are gone, the old rows stay
        command.downgrade(alembic_config(conn), "0003_training")
    assert "score_overrides" not in inspect(engine).get_table_names()
    assert "auto_selected" not in {c["name"] for c in inspect(engine).get_columns("scores")}
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM scores")).scalar() == 3
    engine.dispose()


def test_override_records_are_deleted_with_their_job(session, seeded):
    sid = seeded.sample_ids["silo1"][0]
    store.override(session, job_id=seeded.job_id, owner="silo1", sample_id=sid, decision="keep", reason="r", actor="x")
    session.commit()
    repo.delete_job(session, job_id=seeded.job_id)
    session.commit()
    assert session.scalars(select(ScoreOverride)).all() == []


# --- migration 0005 and the calibrated columns ------------------------------------------------------------------------


def test_migration_0005_adds_empty_signal_columns_to_existing_scores(tmp_path: Path):
    engine = make_engine(f"sqlite:///{tmp_path}/clues.db")
    upgrade(engine, "0004_dashboard")
    with make_session_factory(engine)() as session:  # written through the 0004 schema, before the new columns
        session.execute(
            text(
                "INSERT INTO jobs (id, name, model, lora, projection, similarity, threshold, precondition, options,"
                " status, anchor_status, progress, message, threshold_value, created_at, updated_at) VALUES (:id,"
                " 'old', 'tiny:0', '{}', '{}', 'cosine', '{}', 1, '{}', 'done', 'done', 1.0, '', 0.5, :now, :now)"
            ),
            {"id": "b" * 32, "now": "2026-01-01 00:00:00.000000"},
        )
        session.execute(
            text(
                "INSERT INTO scores (job_id, owner, sample_id, row, score, parts, selected, auto_selected)"
                " VALUES (:job, 'alpha', 's0', 0, 0.9, '[0.9]', 1, 1)"
            ),
            {"job": "b" * 32},
        )
        session.commit()
    upgrade(engine)
    with make_session_factory(engine)() as session:
        _, (row,) = store.query_scores(session, job_id="b" * 32, query=ScoreQuery())
        assert (row.signal_values, row.signal_z, row.flagged_by) == (None, None, None)
        _, (raw,) = store.query_scores(session, job_id="b" * 32, query=ScoreQuery(), raw_json=True)
        assert (raw.parts, raw.signal_values, raw.signal_z) == ("[0.9]", None, None)
        job = session.get(Job, "b" * 32)
        spec = JobSpec.of(job)
        assert (spec.score, spec.signals) == ("trace", ())  # a job from before: pure trace
    with engine.begin() as conn:
        command.downgrade(alembic_config(conn), "0004_dashboard")
    assert "flagged_by" not in {c["name"] for c in inspect(engine).get_columns("scores")}
    engine.dispose()


def test_signal_columns_are_stored_and_read_back(session):
    job = new_job(session)
    values = {"trace": 0.25, "loss": 1.5, "loss_uncond": 2.0, "n_tokens": 17}
    z = {"trace": -0.5, "perplexity": 1.25, "ifd": 3.5, "pmi": 2.0}
    rows = [
        {"owner": "alpha", "sample_id": "s0", "row": 0, "score": -9.0, "parts": [0.1, 0.15], "selected": False,
         "signal_values": values, "signal_z": z, "flagged_by": "ifd"},
        {"owner": "alpha", "sample_id": "s1", "row": 1, "score": 0.5, "parts": [0.2, 0.3], "selected": True},
    ]  # fmt: skip
    repo.replace_scores(session, job_id=job.id, rows=rows)
    _, page = store.query_scores(session, job_id=job.id, query=ScoreQuery())
    assert [(r.signal_values, r.signal_z, r.flagged_by) for r in page] == [(values, z, "ifd"), (None, None, None)]
    _, raw = store.query_scores(session, job_id=job.id, query=ScoreQuery(), raw_json=True)
    assert json.loads(raw[0].signal_values) == values and json.loads(raw[0].signal_z) == z
    assert [r.flagged_by for r in store.iter_scores(session, job_id=job.id, query=ScoreQuery())] == ["ifd", None]
