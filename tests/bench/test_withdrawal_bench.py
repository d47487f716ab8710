"""`bench/withdrawal.py` end to end on the tiny model and the bundled PubMedQA subset: every arm is timed, and the
whole-silo re-merge equals a fresh merge of the other silos."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # three tiny silos trained twice and merged four times: seconds

REPO = Path(__file__).resolve().parents[2]


def test_the_withdrawal_bench_times_every_arm(tmp_path):
    (tmp_path / "pubmedqa").mkdir()
    shutil.copy(REPO / "clues" / "data" / "pubmedqa_200.json", tmp_path / "pubmedqa" / "ori_pqal.json")
    out = tmp_path / "withdrawal.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "withdrawal.py"), "--model", "tiny:0", "--data-dir", str(tmp_path),
         "--silo-samples", "12", "--steps", "2", "--max-len", "64", "--out", str(out)],
        capture_output=True, text=True, timeout=600, env=os.environ | {"HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["remerge_equals_fresh_merge"] is True
    assert min(result["remerge_s"], result["sample_withdrawal_s"], result["full_retrain_s"]) > 0
    assert set(result["train_s"]) == {"silo1", "silo2", "silo3"} and result["withdrawn_samples"] == 5
