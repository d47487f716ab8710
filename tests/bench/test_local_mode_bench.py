"""`bench/local_mode.py` end to end on the tiny model and the bundled PubMedQA subset: every mode is scored on every
seed, the silo-local projected scores equal the shared ones, the silo-local exact ones (streamed on the first seed,
from the kept gradients on the second) equal the coordinator-side computation, and nothing per sample leaves."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # two tiny-model warmups and gradient passes: about 15 s

REPO = Path(__file__).resolve().parents[2]


def test_the_local_mode_bench_scores_every_mode_and_the_masks_agree(tmp_path):
    (tmp_path / "pubmedqa").mkdir()
    shutil.copy(REPO / "clues" / "data" / "pubmedqa_200.json", tmp_path / "pubmedqa" / "ori_pqal.json")
    out = tmp_path / "local-mode.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "local_mode.py"), "--model", "tiny:0", "--data-dir", str(tmp_path),
         "--n", "30", "--anchors", "8", "--dim", "256", "--max-len", "64", "--warmup-steps", "4", "--seeds", "0,1",
         "--out", str(tmp_path / "work"), "--result", str(out)],
        capture_output=True, text=True, timeout=600, env=os.environ | {"HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [s["exact_path"].split()[0] for s in result["seeds"]] == ["streamed", "score_locally"]
    for seed in result["seeds"]:
        assert set(seed["modes"]) == {
            "shared, projected", "silo-local, projected", "coordinator-side, exact", "silo-local, exact"
        }  # fmt: skip
        for check in ("local_projected_equals_shared", "local_exact_equals_coordinator_side"):
            assert seed["checks"][check]["mask_disagreements"] == 0
            assert seed["checks"][check]["max_abs_score_diff"] < 1e-6
        assert seed["leaves_a_silo"]["silo-local"]["bytes_per_sample"] == 0
    first = result["seeds"][0]["leaves_a_silo"]
    assert first["aggregates_add_up"] and first["reference_bytes"] > 0
    assert result["summary"]["targets"]["masks_identical_to_coordinator_side"] is True
    again = tmp_path / "again.json"
    subprocess.run(
        [sys.executable, str(REPO / "bench" / "local_mode.py"), "--summarize",
         *[str(tmp_path / "work" / f"seed-{s}.json") for s in (0, 1)], "--result", str(again)],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    assert json.loads(again.read_text())["summary"] == result["summary"]
