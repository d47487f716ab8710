"""`clues demo --quick` end to end on the tiny model, from the bundled PubMedQA subset."""

from __future__ import annotations

import shutil

from clues import demo
from clues.cli import main


def test_quick_demo_runs_and_prints_the_table(tmp_path, capsys):
    data_dir = tmp_path / "data"
    (data_dir / "pubmedqa").mkdir(parents=True)
    shutil.copy(demo.BUNDLED, data_dir / "pubmedqa" / "ori_pqal.json")
    argv = ["demo", "--quick", "--model", "tiny", "--data-dir", str(data_dir), "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "AUROC trace" in out and "threshold (mean anchor score)" in out
    for silo, noisy in (("silo1", 2), ("silo2", 6), ("silo3", 9)):  # 10 %, 30 %, 50 % of 20, floored per kind
        row = next(line for line in out.splitlines() if line.startswith(silo)).split()
        assert row[1:3] == ["20", str(noisy)]
    assert (tmp_path / "out" / "proj" / "silo3" / "ckpt-000.candidate.safetensors").is_file()


def test_demo_data_resolution(tmp_path):
    assert demo.find_pubmedqa(None).is_file()
    assert len(demo.load_pubmedqa(demo.BUNDLED)) == 200
    assert main(["demo", "--quick", "--model", "tiny", "--data-dir", str(tmp_path), "--out", str(tmp_path)]) == 2
