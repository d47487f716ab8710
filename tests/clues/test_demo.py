"""`clues demo`: the data split, the output directory rules, and (integration) the whole run on the tiny model —
a real embedded coordinator process, three agents, the summary, the dashboards up until SIGINT."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from clues import demo
from clues.cli import main


def test_data_resolution(tmp_path: Path):
    assert demo.find_pubmedqa(None).is_file()
    assert len(demo.load_pubmedqa(demo.BUNDLED)) == 200
    assert main(["demo", "--quick", "--model", "tiny:0", "--data-dir", str(tmp_path), "--out", str(tmp_path)]) == 2


@pytest.mark.parametrize("size", [demo.QUICK, demo.DEFAULT])
def test_split_is_disjoint_labelled_and_fits_the_bundled_subset(size: demo.DemoSize):
    split = demo.split_data(demo.BUNDLED, size)
    ids = [s.id for s in split.anchors + split.held_out] + [s.id for v in split.silos.values() for s in v]
    assert len(ids) == len(set(ids)) == size.anchors + size.held_out + 3 * size.per_silo
    assert all("noise" not in s.meta and s.meta["label"] in ("yes", "no", "maybe") for s in split.held_out)
    noisy = {name: sum(s.meta["noise"] != "clean" for s in samples) for name, samples in split.silos.items()}
    for name, rate in (("silo1", 0.1), ("silo2", 0.3), ("silo3", 0.5)):
        assert rate - 0.1 <= noisy[name] / size.per_silo <= rate  # floor(rate·N) per kind
    assert demo.split_data(demo.BUNDLED, size).silos["silo3"] == split.silos["silo3"]  # seeded


def test_out_dir_is_only_ever_cleared_when_a_demo_made_it(tmp_path: Path):
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "keep.txt").write_text("precious")
    with pytest.raises(demo.DemoError, match=r"--out: .* is not a clues demo directory"):
        demo.fresh_out_dir(mine)
    assert (mine / "keep.txt").read_text() == "precious"
    out = demo.fresh_out_dir(tmp_path / "run")  # new
    (out / "old.log").write_text("x")
    again = demo.fresh_out_dir(out)  # an earlier demo's: emptied
    assert again == out and sorted(p.name for p in out.iterdir()) == [demo.MARKER]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert demo.fresh_out_dir(empty) == empty


def test_progress_counts_updates_within_the_open_round():
    history = [{"status": "closed", "received": ["a", "b", "c"]}, {"status": "open", "received": ["a"]}]
    job = {"status": "running", "rounds": 2, "silos": [{}, {}, {}], "progress": 0.0, "history": history}
    assert demo._progress(job) == pytest.approx(0.9 * (1 + 1 / 3) / 2)
    assert demo._progress(job | {"status": "evaluating"}) == 0.95
    assert demo._progress({"status": "queued", "progress": 0.25}) == 0.25  # a scoring job


@pytest.mark.integration
def test_quick_demo_end_to_end_serves_dashboards_until_sigint(tmp_path: Path):
    """The tiny model through every phase; then the URLs answer, and SIGINT stops everything with status 0."""
    data_dir = tmp_path / "data"
    (data_dir / "pubmedqa").mkdir(parents=True)
    shutil.copy(demo.BUNDLED, data_dir / "pubmedqa" / "ori_pqal.json")
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLUES_")} | {"HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "clues", "demo", "--quick", "--model", "tiny:0", "--data-dir", str(data_dir),
         "--out", str(out)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    lines: list[str] = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("press Ctrl-C"):
                break
        text = "".join(lines)
        assert "press Ctrl-C" in text, text
        summary = json.loads((out / "summary.json").read_text())
        silos = {row["silo"]: row for row in summary["silos"]}
        assert [(silos[s]["samples"], silos[s]["noisy"]) for s in ("silo1", "silo2", "silo3")] == [
            (20, 2), (20, 6), (20, 9)
        ]  # fmt: skip
        assert all(0.0 <= row["auroc_trace"] <= 1.0 and 0 <= row["kept"] <= 20 for row in silos.values())
        assert summary["score"] == "calibrated" and all(0.0 <= row["auroc_score"] <= 1.0 for row in silos.values())
        arms = {row["arm"]: row for row in summary["models"]}
        assert list(arms) == ["all", "random", "selected"]
        kept = sum(row["kept"] for row in silos.values())
        assert (arms["all"]["train_samples"], arms["selected"]["train_samples"]) == (60, kept)
        assert arms["random"]["train_samples"] == kept  # the control matches the selected size per silo
        assert all(row["held_out_loss"] > 0 and row["pubmedqa_n"] == demo.QUICK.held_out for row in arms.values())
        for silo in ("silo1", "silo2", "silo3"):
            assert re.search(rf"^{silo} +20 +\d+ +\d+ +\d+ +\d\.\d{{3}}", text, re.M), text
        coordinator = re.search(r"coordinator dashboard: (http://127\.0\.0\.1:(\d+))/ui/jobs/\w+", text)
        assert coordinator, text
        assert httpx.get(f"{coordinator[1]}/ui/login", timeout=10).status_code == 200
        for url in re.findall(r"^silo\d dashboard: (\S+)", text, re.M):
            assert _answers(url), url
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        with pytest.raises(httpx.TransportError):  # the coordinator went down with the demo
            httpx.get(f"{coordinator[1]}/healthz", timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
@pytest.mark.integration
def test_quick_demo_on_smollm2_prints_a_sensible_summary(tmp_path: Path):
    """The README's `make demo-quick`, on the real model and the bundled PubMedQA subset (about 3 minutes)."""
    data_dir = tmp_path / "data"
    (data_dir / "pubmedqa").mkdir(parents=True)
    shutil.copy(demo.BUNDLED, data_dir / "pubmedqa" / "ori_pqal.json")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLUES_")} | {"HF_HUB_OFFLINE": "1"}
    if os.environ.get("CLUES_CACHE_DIR"):
        env["CLUES_CACHE_DIR"] = os.environ["CLUES_CACHE_DIR"]
    done = subprocess.run(
        [sys.executable, "-m", "clues", "demo", "--quick", "--no-serve", "--data-dir", str(data_dir),
         "--out", str(tmp_path / "out")],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["model"] == "smollm2"
    assert sum(row["kept"] for row in summary["silos"]) > 0
    for row in summary["silos"]:
        assert 0.0 <= row["auroc_trace"] <= 1.0 and 0.0 <= row["auroc_perplexity"] <= 1.0
    for row in summary["models"]:  # SmolLM2's held-out response loss on PubMedQA is about 3
        assert 1.0 < row["held_out_loss"] < 6.0 and 0.0 <= row["pubmedqa_accuracy"] <= 1.0
    assert "Model (federated LoRA training" in done.stdout


def _answers(url: str, tries: int = 40) -> bool:
    """The silo dashboard starts after the summary is printed: give it a few seconds to listen."""
    import time

    for _ in range(tries):
        try:
            return httpx.get(url, timeout=5, follow_redirects=True).status_code == 200
        except httpx.TransportError:
            time.sleep(0.5)
    return False
