"""An owner's override is honoured where the selection is used: a training job's `choose_samples` (selected and the
same-size random control) and the mask `clues agent run` writes, all read through the real coordinator over HTTP."""

from __future__ import annotations

import httpx

from agent.client import SiloClient
from agent.loop import write_outputs
from agent.train import choose_samples
from scoring.data import load_pubmedqa, read_samples
from tests.scoring.test_data import PUBMEDQA
from tests.seed import seed_scored_job


def test_overrides_change_what_training_and_the_mask_use(coordinator, tmp_path):
    samples = load_pubmedqa(PUBMEDQA, limit=12)
    with coordinator.app.state.clues.sessions() as session:
        seeded = seed_scored_job(
            session, silos=("a", "b"), per_silo=12, sample_ids={"a": [s.id for s in samples]}, duplicates=0
        )
    job = seeded.job_id
    spec = {"id": "f" * 32, "spec": {"selection": {"source": "selected", "scoring_job": job, "seed": 0}}}
    with SiloClient(coordinator.url, seeded.tokens["a"]) as client:
        rows = {r["sample_id"]: r for r in client.scores(job)["rows"]}
        before, _ = choose_samples(client, spec, samples)
        assert [s.id for s in before] == [s.id for s in samples if rows[s.id]["selected"]]
        dropped = next(s.id for s in samples if not rows[s.id]["selected"])
        kept = before[0].id

        silo = httpx.Client(base_url=coordinator.url, headers={"Authorization": f"Bearer {seeded.tokens['a']}"})
        for sample_id, decision in ((dropped, "keep"), (kept, "drop")):
            answer = silo.post(
                f"/v1/jobs/{job}/overrides",
                json={"sample_id": sample_id, "decision": decision, "reason": f"owner review: {decision}"},
            )
            assert answer.status_code == 201, answer.text

        after, mass = choose_samples(client, spec, samples)
        expected = {s.id for s in before} - {kept} | {dropped}
        assert {s.id for s in after} == expected
        assert mass == sum(rows[i]["score"] for i in expected)
        control = {**spec, "spec": {"selection": {**spec["spec"]["selection"], "source": "random"}}}
        assert len(choose_samples(client, control, samples)[0]) == len(expected)

        answer = client.scores(job)
        data = tmp_path / "a.jsonl"
        _, selected_path, count = write_outputs(data, samples, answer["rows"], job)
        assert {s.id for s in read_samples(selected_path)} == expected and count == len(expected)

        assert (
            silo.post(
                f"/v1/jobs/{job}/overrides", json={"sample_id": dropped, "decision": "auto", "reason": "undo"}
            ).status_code
            == 201
        )
        assert dropped not in {s.id for s in choose_samples(client, spec, samples)[0]}
        log = silo.get(f"/v1/jobs/{job}/overrides").json()
        assert [(r["sample_id"], r["decision"]) for r in log["rows"]] == [
            (dropped, "auto"),
            (kept, "drop"),
            (dropped, "keep"),
        ]
