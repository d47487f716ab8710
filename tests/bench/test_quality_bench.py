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


def run_bench(domain: str, n: int, data_dir: Path, out: Path, *extra: str) -> dict:
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "quality.py"), "--domain", domain, "--n", str(n),
         "--data-dir", str(data_dir), "--out", str(out), *SMALL, *extra],
        capture_output=True, text=True, timeout=600, env=os.environ | {"HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "run").is_dir() and not (out / "run" / "full").exists()  # unprojected matrices removed after use
    result = json.loads(done.stdout)
    lora = json.loads((out / "run" / "run.json").read_text())["lora"]  # the warmup's adapter is the one asked for
    assert (lora["rank"], lora["alpha"]) == (result["settings"]["lora_rank"], 2.0 * result["settings"]["lora_rank"])
    assert lora["target_modules"] == result["settings"]["lora_targets"]
    return result


@pytest.fixture(scope="module")
def results(data_dir, tmp_path_factory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("runs")
    gsm8k = ["--lora-targets", "q_proj,v_proj", "--lora-rank", "4", "--no-unprojected"]
    return {
        "pubmedqa": run_bench("pubmedqa", 20, data_dir, root / "pubmedqa"),
        "gsm8k": run_bench("gsm8k", 20, data_dir, root / "gsm8k", *gsm8k),
    }


def test_every_method_and_variant_is_scored(results):
    for domain, r in results.items():
        kinds = {"pubmedqa": ["cut", "delete", "exchange"], "gsm8k": ["exchange", "wrong_answer"]}[domain]
        assert sorted(k for k in r["data"]["noise"] if k != "clean") == kinds
        assert list(r["methods"]) == ["all", "random", "perplexity", r["primary"]]
        assert r["primary"] == "ours[cosine, adam, all ckpts, k=64]"
        variants = [k for k in r["detail"] if k.startswith("ours[")]
        # 2 similarities x 2 preconditionings x 2 checkpoint sets x 3 dims (2 with --no-unprojected), less the
        # primary (in methods)
        unprojected = domain == "pubmedqa"
        assert len(variants) + 1 >= 2 * 2 * 2 * (3 if unprojected else 2)
        assert ("ours[dot, plain, last ckpt, unprojected]" in r["detail"]) == unprojected
        assert "ours[dot, plain, last ckpt, k=16]" in r["detail"]
        assert len(r["detail"]["per_checkpoint(primary)"]) == 2
        for name, m in {**r["methods"], **r["detail"]}.items():
            if isinstance(m, dict) and m.get("auroc") is not None:
                assert 0.0 <= m["auroc"] <= 1.0, name
                assert all(0.0 <= m[f"auroc_{k}"] <= 1.0 for k in kinds), name
        kept = r["methods"][r["primary"]]["threshold_kept"]
        assert r["keep_rate"] == pytest.approx(kept / r["data"]["candidates"])
        assert all(r["methods"][m]["kept"] == kept for m in ("random", "perplexity"))  # the same keep rate
    assert "targets" in results["pubmedqa"] and "targets" not in results["gsm8k"]


def test_training_arms_train_on_what_each_method_keeps(results):
    for domain, r in results.items():
        training = r["training"]
        assert list(training) == ["base", "all", "random", "perplexity", "ours"]
        assert training["base"]["train_samples"] == 0
        assert training["all"]["train_samples"] == r["data"]["candidates"]
        assert training["ours"]["train_samples"] == r["methods"][r["primary"]]["threshold_kept"]
        assert training["all"]["train_clean"] == r["data"]["noise"]["clean"]
        metric = {"pubmedqa": "pubmedqa_accuracy", "gsm8k": "gsm8k_exact_match"}[domain]
        for arm in training.values():
            assert arm["metrics"]["loss"] > 0 and 0.0 <= arm["metrics"][metric] <= 1.0


def test_plot_writes_the_results_page_and_pngs(results, tmp_path):
    paths = []
    for domain, r in results.items():
        paths.append(tmp_path / f"quality-{domain}.json")
        paths[-1].write_text(json.dumps(r))
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
    assert "| ours[cosine, adam, all ckpts, k=64] |" in text and "Issue 2's target" in text
    assert "LoRA r=8 on q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj," in text  # the default
    assert "LoRA r=4 on q_proj, v_proj," in text and "--lora-targets q_proj,v_proj" in text  # the GSM8K run's
    assert "--lora-rank 4" in text
    for name in ("quality-auroc.png", "quality-projection.png", "quality-training.png"):
        png = tmp_path / "docs" / "img" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"(img/{name})" in text
