"""`bench/dp.py` end to end on the tiny model and the bundled PubMedQA subset: every arm trains and is evaluated, each
DP arm spends its ε over its rounds, and the cost ratio is reported against its target."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a tiny-model federated run of three arms: about half a minute

REPO = Path(__file__).resolve().parents[2]


def test_the_dp_bench_runs_every_arm(tmp_path):
    (tmp_path / "pubmedqa").mkdir()
    shutil.copy(REPO / "clues" / "data" / "pubmedqa_200.json", tmp_path / "pubmedqa" / "ori_pqal.json")
    out = tmp_path / "dp.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "dp.py"), "--model", "tiny:0", "--data-dir", str(tmp_path),
         "--silo-samples", "12", "--held-out", "6", "--rounds", "2", "--steps", "2", "--epsilons", "8,1",
         "--max-len", "64", "--out", str(out)],
        capture_output=True, text=True, timeout=600, env=os.environ | {"HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["arms"]) == {"none", "eps=8", "eps=1"}
    for name, eps in (("eps=8", 8.0), ("eps=1", 1.0)):
        arm = result["arms"][name]
        assert arm["epsilon_spent"] == pytest.approx(eps, rel=1e-3) and arm["delta"] == pytest.approx(1 / 12)
    assert result["arms"]["eps=1"]["noise_multiplier"] > result["arms"]["eps=8"]["noise_multiplier"]
    assert all(arm["held_out_loss"] > 0 for arm in result["arms"].values())
    assert result["dp_over_plain_update_time"] > 0 and result["targets"]["dp_over_plain_update_time_max"] == 1.3
