"""`bench/fed_lora.py` end to end on the tiny model and the bundled PubMedQA subset: the selection, one federated job
per aggregation kind from the same start, the summary over seeds and the two targets."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a tiny warmup, gradient pass and three 2-round jobs per seed: seconds

REPO = Path(__file__).resolve().parents[2]


def test_the_fed_lora_bench_runs_every_kind_and_reports_the_targets(tmp_path):
    (tmp_path / "pubmedqa").mkdir()
    shutil.copy(REPO / "clues" / "data" / "pubmedqa_200.json", tmp_path / "pubmedqa" / "ori_pqal.json")
    out = tmp_path / "fed-lora.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "fed_lora.py"), "--model", "tiny:0", "--data-dir", str(tmp_path),
         "--seeds", "0,1", "--n", "24", "--anchors", "6", "--held-out", "6", "--rounds", "2", "--steps", "1",
         "--max-len", "64", "--work", str(tmp_path / "work"), "--out", str(out)],
        capture_output=True, text=True, timeout=600, env=os.environ | {"HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    summary = result["summary"]
    assert set(summary) == {"fedavg", "stack-warm", "stack-fresh", "shared-basis", "targets"}
    assert len(summary["stack-warm"]["held_out_loss"]["values"]) == 2 and "loss_minus_fedavg" in summary["stack-warm"]
    targets = summary["targets"]
    assert targets["shared_basis_bytes_ratio"] > 1 and "stack-fresh_not_worse_than_fedavg" in targets
    for seed in result["seeds"]:
        stack = seed["kinds"]["stack-fresh"]["rounds"]
        assert [r["rank"] for r in stack] == [r * 3 * 8 for r in (1, 2)]  # three silos of rank 8 per round
        assert all(r["truncation_error"] == 0.0 for r in stack)
    assert out.with_suffix(".seed1.json").is_file()  # each seed written as it lands
    # --summarize joins the arms of a seed measured in separate runs, and refuses an arm measured twice
    parts = []
    for seed in result["seeds"]:
        for arms in (("fedavg", "stack-fresh"), ("stack-warm", "shared-basis")):
            path = tmp_path / f"part-{seed['seed']}-{arms[0]}.json"
            path.write_text(json.dumps({**seed, "kinds": {a: seed["kinds"][a] for a in arms}}))
            parts.append(path)
    joined = tmp_path / "joined.json"
    cmd = [sys.executable, str(REPO / "bench" / "fed_lora.py"), "--summarize", *map(str, parts), "--out", str(joined)]
    assert subprocess.run(cmd, capture_output=True, timeout=120).returncode == 0
    assert json.loads(joined.read_text())["summary"] == summary
    again = subprocess.run([*cmd[:3], *map(str, parts), str(parts[0])], capture_output=True, text=True, timeout=120)
    assert again.returncode != 0 and "in two files" in again.stderr
