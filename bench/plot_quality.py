"""Write docs/results.md and its PNG plots from the JSON results of `bench/quality.py` (one file per domain).

Usage::

    python bench/plot_quality.py                       # bench/results/quality-{pubmedqa,gsm8k}.json -> docs/
                                                       # (with the reading in bench/results/quality-notes.md)
    python bench/plot_quality.py --results R1.json R2.json --out-md docs/results.md --img-dir docs/img

Only the files given (or found) are reported; a domain whose run was made with ``--no-train`` has no training
columns. Needs matplotlib (``pip install -e '.[dev]'``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RESULTS = [REPO / "bench" / "results" / f"quality-{d}.json" for d in ("pubmedqa", "gsm8k")]
DEFAULT_NOTES = REPO / "bench" / "results" / "quality-notes.md"  # the reading of the figures, kept by hand
TITLES = {"pubmedqa": "PubMedQA (medical)", "gsm8k": "GSM8K (math)"}
ARM_OF = {"all": "all", "random": "random", "perplexity": "perplexity"}  # method -> training arm; ours -> "ours"
TASK_METRIC = {"pubmedqa": ("pubmedqa_accuracy", "PubMedQA acc"), "gsm8k": ("gsm8k_exact_match", "GSM8K EM")}


def _f(value, spec: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return format(value, spec)


def _kinds(result: dict) -> list[str]:
    return sorted(k for k in result["data"]["noise"] if k != "clean")


def _arm(method: str) -> str:
    return "ours" if method.startswith("ours[") else ARM_OF[method]


def main_table(result: dict) -> list[str]:
    """Method | AUROC (overall, per kind) | precision at the keep rate | held-out loss | task metric."""
    kinds, domain = _kinds(result), result["domain"]
    metric, metric_name = TASK_METRIC[domain]
    training = result.get("training") or {}
    head = ["method", "AUROC", *[f"AUROC {k}" for k in kinds], "precision@keep", "kept"]
    if training:
        head += ["train samples (clean)", "held-out loss", metric_name]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    if training:
        base = training["base"]["metrics"]
        row = ["base model (no training)", "–", *["–"] * len(kinds), "–", "–", "0", _f(base["loss"])]
        lines.append("| " + " | ".join([*row, _f(base.get(metric))]) + " |")
    for method, m in result["methods"].items():
        row = [method, _f(m["auroc"]), *[_f(m.get(f"auroc_{k}")) for k in kinds], _f(m["precision_at_keep"])]
        row.append(str(m["kept"]))
        if training:
            arm = training[_arm(method)]
            row += [f"{arm['train_samples']} ({arm.get('train_clean', '–')})", _f(arm["metrics"]["loss"])]
            row.append(_f(arm["metrics"].get(metric)))
        lines.append("| " + " | ".join(row) + " |")
    return lines


def ablation_table(result: dict) -> list[str]:
    """Every trace variant (and the perplexity per checkpoint, the hybrid): AUROC, per kind, precision@keep."""
    kinds = _kinds(result)
    rows = {**{k: v for k, v in result["methods"].items() if k.startswith("ours[")}, **result["detail"]}
    head = ["variant", "AUROC", *[f"AUROC {k}" for k in kinds], "precision@keep", "kept by its own threshold"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in rows.items():
        if name.startswith("per_checkpoint"):
            continue
        own = f"{m['threshold_kept']} ({_f(m['precision_at_threshold'])} clean)" if "threshold_kept" in m else "–"
        cells = [name, _f(m["auroc"]), *[_f(m.get(f"auroc_{k}")) for k in kinds], _f(m["precision_at_keep"]), own]
        lines.append("| " + " | ".join(cells) + " |")
    per = result["detail"].get("per_checkpoint(primary)", [])
    if per:
        steps = [c["step"] for c in result["data"]["warmup"]["checkpoints"]]
        lines += ["", "Primary score at each checkpoint alone: " + ", ".join(
            f"step {s}: {_f(m['auroc'])}" for s, m in zip(steps, per, strict=True)
        ) + "."]  # fmt: skip
    return lines


def plot(results: list[dict], img_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img_dir.mkdir(parents=True, exist_ok=True)
    written = []

    # 1. detection AUROC by method and noise kind
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, r in zip(axes[0], results, strict=True):
        rows = {m: v for m, v in r["methods"].items() if v["auroc"] is not None}
        rows["hybrid rank (ours + perplexity)"] = r["detail"]["hybrid_rank(ours, perplexity)"]
        groups = ["overall", *_kinds(r)]
        width = 0.8 / len(rows)
        for i, (m, row) in enumerate(rows.items()):
            vals = [row["auroc" if g == "overall" else f"auroc_{g}"] for g in groups]
            label = "ours" if m.startswith("ours[") else m
            ax.bar([j + i * width for j in range(len(groups))], vals, width, label=label)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))], groups)
        ax.axhline(0.5, color="grey", lw=0.8, ls=":")
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{TITLES[r['domain']]}: detection AUROC")
        ax.legend(fontsize=8, loc="lower right")
    written.append(_save(fig, img_dir / "quality-auroc.png"))

    # 2. AUROC against the projection dimension, per similarity and preconditioning (all checkpoints)
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, r in zip(axes[0], results, strict=True):
        dims = r["settings"]["dims"]
        rows = {**r["methods"], **r["detail"]}
        labels = [f"k={k}" for k in dims] + ["unprojected"]
        for sim in ("cosine", "dot"):
            for pre in ("adam", "plain"):
                for ckpts, style in (("all ckpts", "-"), ("last ckpt", "--")):
                    vals = [rows.get(f"ours[{sim}, {pre}, {ckpts}, {lab}]", {}).get("auroc") for lab in labels]
                    ax.plot(labels, vals, style, marker="o", label=f"{sim}, {pre}, {ckpts}")
        ppl = r["methods"]["perplexity"]["auroc"]
        ax.axhline(ppl, color="black", lw=1, ls=":", label=f"perplexity ({ppl:.3f})")
        ax.set_ylim(0.4, 1.0)
        ax.set_title(f"{TITLES[r['domain']]}: AUROC by projection")
        ax.legend(fontsize=7, loc="lower right")
    written.append(_save(fig, img_dir / "quality-projection.png"))

    # 3. held-out loss after training on each arm
    trained = [r for r in results if r.get("training")]
    if trained:
        fig, axes = plt.subplots(1, len(trained), figsize=(5 * len(trained), 3.6), squeeze=False)
        for ax, r in zip(axes[0], trained, strict=True):
            arms = [a for a in ("all", "random", "perplexity", "ours") if a in r["training"]]
            losses = [r["training"][a]["metrics"]["loss"] for a in arms]
            ax.bar(arms, losses, color=["#999", "#bbb", "#7a9", "#c63"][: len(arms)])
            base = r["training"]["base"]["metrics"]["loss"]
            ax.axhline(base, color="black", ls="--", lw=1, label=f"base model ({base:.3f})")
            low, high = min([*losses, base]), max([*losses, base])
            ax.set_ylim(low - 0.2 * (high - low + 1e-3), high + 0.2 * (high - low + 1e-3))
            ax.set_title(f"{TITLES[r['domain']]}: held-out loss (lower is better)")
            ax.legend(fontsize=8)
        written.append(_save(fig, img_dir / "quality-training.png"))
    return written


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=110, format="png")
    tmp.replace(path)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def render(results: list[dict], images: list[Path], md_path: Path, notes: str = "") -> str:
    rel = [Path("img") / p.name if p.parent.name == "img" else p for p in images]
    out = [
        "# Quality results",
        "",
        "Generated by `bench/plot_quality.py` from `bench/results/quality-*.json` (made by `bench/quality.py`).",
        "",
        "Regenerate (about "
        + " + ".join(f"{r['timing_s']['total'] / 60:.0f}" for r in results)
        + f" minutes on {results[0]['machine']['cpus']} CPU cores):",
        "",
        "```bash",
        *[f"python bench/quality.py {_argv(r)} > bench/results/quality-{r['domain']}.json" for r in results],
        "python bench/plot_quality.py",
        "```",
        "",
    ]
    if notes:
        out += [notes.strip(), ""]
    for r in results:
        d, s = r["data"], r["settings"]
        noise = ", ".join(f"{k} {v}" for k, v in d["noise"].items())
        warm = d["warmup"]
        out += [
            f"## {TITLES[r['domain']]}",
            "",
            f"{d['candidates']} candidates ({noise}), {d['anchors']} clean anchors, {d['held_out']} clean held-out "
            f"items; SmolLM2-135M-Instruct, LoRA r={s.get('lora_rank', 8)} on {_targets(s)}, "
            f"max_len {s['max_len']}. Warmup: "
            f"{s['warmup_steps']} AdamW steps on {warm['train_samples']} candidates ({warm['train_noisy']} noisy), "
            "checkpoints at steps "
            f"{', '.join(str(c['step']) for c in warm['checkpoints'])}. Keep rate {r['keep_rate']:.3f} (the "
            f"primary score's mean-anchor threshold); every ranked method keeps its top samples at that rate. "
            f"Training arms: {s['train_epochs']:g} epoch(s) of fresh LoRA on the kept samples. Run time "
            f"{r['timing_s']['total'] / 60:.0f} min ({r['machine']['cpus']} CPUs).",
            "",
            f"Primary score: `{r['primary']}`.",
            "",
            *main_table(r),
            "",
            "Every variant (ours: similarity, Adam preconditioning or plain gradients, checkpoints, projection):",
            "",
            *ablation_table(r),
            "",
        ]
        if "targets" in r:
            t = r["targets"]
            verdict = "met" if t["all_pass"] else "not met"
            cells = "; ".join(
                f"{k}: {_f(v.get('value', v.get('trace')))}"
                + (f" vs {_f(v['best_perplexity'])}" if "best_perplexity" in v else "")
                + (" ✓" if v["pass"] else " ✗")
                for k, v in t.items()
                if k != "all_pass"
            )
            out += [
                f"Issue 2's target on this run (trace AUROC ≥ 0.95 and ≥ perplexity on every kind): **{verdict}** — "
                f"{cells}.",
                "",
            ]
    out += ["## Plots", ""] + [f"![{p.stem}]({p.as_posix()})" for p in rel] + [""]
    text = "\n".join(out)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = md_path.with_name(f".{md_path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(md_path)
    return text


def _targets(settings: dict) -> str:
    """The LoRA target modules of a run (runs from before ``--lora-targets`` adapted q_proj and v_proj)."""
    return ", ".join(settings.get("lora_targets", ["q_proj", "v_proj"]))


def _argv(result: dict) -> str:
    """The command-line options of the run, as far as they differ from `bench/quality.py`'s defaults."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from quality import parse_args

    defaults = vars(parse_args(["--domain", result["domain"]]))
    parts = [f"--domain {result['domain']}"]
    for key, value in result["settings"].items():
        if key in ("domain", "out", "data_dir") or defaults.get(key) == value:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag if value else "")
        elif isinstance(value, list):
            parts.append(f"{flag} {','.join(map(str, value))}")
        else:
            parts.append(f"{flag} {value}")
    return " ".join(p for p in parts if p)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, nargs="*", default=None, help="quality.py JSON files")
    p.add_argument("--out-md", type=Path, default=REPO / "docs" / "results.md")
    p.add_argument("--img-dir", type=Path, default=REPO / "docs" / "img")
    p.add_argument(
        "--notes",
        type=Path,
        default=DEFAULT_NOTES if DEFAULT_NOTES.is_file() else None,
        help="a Markdown file whose text goes under the commands (default: bench/results/quality-notes.md if present)",
    )
    args = p.parse_args(argv)
    paths = args.results or [path for path in DEFAULT_RESULTS if path.is_file()]
    if not paths:
        p.error("no results: run bench/quality.py first (or pass --results)")
    results = [json.loads(path.read_text()) for path in paths]
    images = plot(results, args.img_dir)
    render(results, images, args.out_md, args.notes.read_text() if args.notes else "")
    print(f"wrote {args.out_md} and {', '.join(str(i) for i in images)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
