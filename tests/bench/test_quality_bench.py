"""`bench/quality.py` and `bench/plot_quality.py` end to end on the tiny model and the bundled data subsets: every
method and variant is scored, the training arms run, and docs/results.md with its plots is written from the JSON."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # two tiny-model benchmark runs with training arms: about a minute

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "data"
SMALL = ["--model", "tiny:0", "--anchors", "6", "--held-out", "4", "--checkpoints", "2", "--warmup-steps", "2",
         "--max-len", "96", "--dims", "16,64", "--train-epochs", "0.5", "--max-new-tokens", "8"]  # fmt: skip


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    (root / "pubmedqa").mkdir()
    shutil.copy(REPO / "clues" / "data" / "pubmedqa_200.json", root / "pubmedqa" / "ori_pqal.json")
    (root / "gsm8k").mkdir()
    for split in ("train", "test"):  # the 40-item subset serves as both (a smoke test, not a measurement)
        shutil.copy(DATA / "gsm8k_small.jsonl", root / "gsm8k" / f"{split}.jsonl")
    return root


def run_bench(domain: str, n: int, data_dir: Path, out: Path, *extra: str, check_run: bool = True) -> dict:
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "quality.py"), "--domain", domain, "--n", str(n),
         "--data-dir", str(data_dir), "--out", str(out), *SMALL, *extra],
        capture_output=True, text=True, timeout=600, env=os.environ | {"HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    for run in [out / f"seed-{s}" for s in result["seeds"]] if "seeds" in result else [out] if check_run else []:
        assert (run / "run").is_dir() and not (run / "run" / "full").exists()  # unprojected matrices removed
        lora = json.loads((run / "run" / "run.json").read_text())["lora"]  # the warmup's adapter is the one asked for
        settings = json.loads((run / "result.json").read_text())["settings"]
        assert (lora["rank"], lora["alpha"]) == (settings["lora_rank"], 2.0 * settings["lora_rank"])
        assert lora["target_modules"] == settings["lora_targets"]
    return result


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("runs")
    gsm8k = ["--lora-targets", "q_proj,v_proj", "--lora-rank", "4", "--no-unprojected"]
    return {
        "root": root,
        "pubmedqa": run_bench("pubmedqa", 20, data_dir, root / "pubmedqa", "--seeds", "0,1"),
        "gsm8k": run_bench("gsm8k", 20, data_dir, root / "gsm8k", *gsm8k),
    }


@pytest.fixture(scope="module")
def results(runs) -> dict[str, dict]:
    """One seed's result per domain (PubMedQA: seed 0 of the two-seed run)."""
    seed0 = json.loads((runs["root"] / "pubmedqa" / "seed-0" / "result.json").read_text())
    return {"pubmedqa": seed0, "gsm8k": runs["gsm8k"]}


SINGLE = ["perplexity", "ifd", "pmi", "trace"]


def test_every_method_and_variant_is_scored(results):
    for domain, r in results.items():
        kinds = {"pubmedqa": ["cut", "delete", "exchange"], "gsm8k": ["exchange", "wrong_answer"]}[domain]
        assert sorted(k for k in r["data"]["noise"] if k != "clean") == kinds
        assert r["default"] == "calibrated"
        assert list(r["methods"])[:7] == ["all", "random", *SINGLE, "hybrid_rank(trace, perplexity)"]
        assert "calibrated" in r["methods"] and "calibrated[max]" in r["methods"]
        assert r["primary"] == "ours[cosine, adam, all ckpts, k=64]"
        variants = [k for k in r["detail"] if k.startswith("ours[")]
        # 2 similarities x 2 preconditionings x 2 checkpoint sets x 3 dims (2 with --no-unprojected)
        unprojected = domain == "pubmedqa"
        assert len(variants) >= 2 * 2 * 2 * (3 if unprojected else 2)
        assert ("ours[dot, plain, last ckpt, unprojected]" in r["detail"]) == unprojected
        assert r["detail"][r["primary"]]["auroc"] == r["methods"]["trace"]["auroc"]  # the trace is the primary
        assert len(r["detail"]["per_checkpoint(trace)"]) == 2 and "trace(checkpoints 1..1)" in r["detail"]
        for name, m in {**r["methods"], **r["detail"]}.items():
            if isinstance(m, dict) and m.get("auroc") is not None:
                assert 0.0 <= m["auroc"] <= 1.0, name
                assert all(0.0 <= m[f"auroc_{k}"] <= 1.0 for k in kinds), name
        kept = r["methods"]["calibrated"]["threshold_kept"]
        assert r["keep_rate"] == pytest.approx(kept / r["data"]["candidates"])
        assert all(r["methods"][m]["kept"] == kept for m in ("random", *SINGLE))  # the default's keep rate
        assert len(r["detail"]["length_buckets"]["calibrated"]) == 3
        flagged = r["detail"]["flagged_by"]
        dropped = r["data"]["candidates"] - kept
        assert sum(n for counts in flagged.values() for n in counts.values()) == dropped
    assert "targets" in results["pubmedqa"] and "targets" not in results["gsm8k"]


def test_seeds_summary_has_the_published_shape(runs):
    summary = runs["pubmedqa"]
    assert summary["seeds"] == [0, 1] and summary["default"] == "calibrated"
    for seed in ("0", "1"):
        methods = summary["per_seed"][seed]["methods"]
        assert {"perplexity", "ifd", "pmi", "trace", "calibrated"} <= set(methods)
        for m in methods["calibrated"], methods["pmi"]:
            assert set(m) >= {"auroc", "by_kind", "precision_at_keep"}
            assert set(m["by_kind"]) == {"cut", "delete", "exchange"}
    aurocs = [summary["per_seed"][s]["methods"]["trace"]["auroc"] for s in ("0", "1")]
    assert summary["summary"]["trace"]["auroc"]["mean"] == pytest.approx(sum(aurocs) / 2)
    targets = summary["targets"]
    assert targets["all_pass"] == all(v["pass"] for k, v in targets.items() if k != "all_pass")
    assert {"default_auroc_ge_0.97_every_seed", "default_exchange_mean_ge_best_single"} <= set(targets)
    assert "default_arm_lowest_held_out_loss_on_2_seeds" in targets


def test_reused_features_score_exactly_as_the_run_that_saved_them(runs, data_dir, tmp_path):
    saved = runs["root"] / "pubmedqa" / "seed-1"
    again = run_bench("pubmedqa", 20, data_dir, tmp_path / "again", "--seed", "1", "--no-train",
                      "--no-unprojected", "--reuse-features", str(saved / "features"), check_run=False)  # fmt: skip
    first = json.loads((saved / "result.json").read_text())
    for name, m in again["methods"].items():
        assert m["auroc"] == first["methods"][name]["auroc"], name
    other = subprocess.run(
        [sys.executable, str(REPO / "bench" / "quality.py"), "--domain", "pubmedqa", "--n", "20", "--data-dir",
         str(data_dir), "--out", str(tmp_path / "other"), *SMALL, "--seed", "0", "--no-train",
         "--reuse-features", str(saved / "features")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert other.returncode != 0 and "made with other settings" in other.stderr  # seed 1's features for seed 0


def test_training_arms_train_on_what_each_method_keeps(results):
    for domain, r in results.items():
        training = r["training"]
        assert list(training) == ["base", "all", "random", "perplexity", "calibrated"]
        assert training["base"]["train_samples"] == 0
        assert training["all"]["train_samples"] == r["data"]["candidates"]
        assert training["calibrated"]["train_samples"] == r["methods"]["calibrated"]["threshold_kept"]
        assert training["random"]["train_samples"] == r["methods"]["random"]["kept"]
        assert training["all"]["train_clean"] == r["data"]["noise"]["clean"]
        metric = {"pubmedqa": "pubmedqa_accuracy", "gsm8k": "gsm8k_exact_match"}[domain]
        for arm in training.values():
            assert arm["metrics"]["loss"] > 0 and 0.0 <= arm["metrics"][metric] <= 1.0


def test_plot_writes_the_results_page_and_pngs(runs, results, tmp_path):
    paths = [runs["root"] / "pubmedqa" / f"seed-{s}" / "result.json" for s in (0, 1)]
    paths.append(tmp_path / "quality-gsm8k-seed0.json")
    paths[-1].write_text(json.dumps(results["gsm8k"]))
    md = tmp_path / "docs" / "results.md"
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "plot_quality.py"), "--results", *map(str, paths), "--out-md", str(md),
         "--img-dir", str(tmp_path / "docs" / "img")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    text = md.read_text()
    assert "## PubMedQA (medical)" in text and "## GSM8K (math)" in text
    assert "python bench/quality.py --domain pubmedqa --model tiny:0 --n 20 --anchors 6" in text  # what made it
    assert "--seeds 0,1" in text and "Seeds [0, 1]" in text
    assert "| **calibrated** (default) |" in text and "Issue 16's targets" in text
    assert "LoRA r=8 on q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj," in text  # the default
    assert "LoRA r=4 on q_proj, v_proj," in text and "--lora-targets q_proj,v_proj" in text  # the GSM8K run's
    for name in ("quality-auroc.png", "quality-training.png"):
        png = tmp_path / "docs" / "img" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"(img/{name})" in text
