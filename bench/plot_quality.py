"""Write docs/results.md and its PNG plots from the per-seed JSON results of `bench/quality.py`.

Usage::

    python bench/plot_quality.py       # bench/results/quality-{pubmedqa,gsm8k}-seed*.json -> docs/results.md, docs/img/
                                       # (with the reading in bench/results/quality-notes.md)
    python bench/plot_quality.py --results R0.json R1.json ... --out-md docs/results.md --img-dir docs/img

Results are grouped by domain; each domain's seeds are summarised by `quality.summarize_seeds` (mean and spread over
seeds, issue 16's targets). Seeds run with ``--no-train`` have no training columns. Needs matplotlib
(``pip install -e '.[dev]'``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import SINGLE_SIGNALS, parse_args, summarize_seeds

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
DEFAULT_NOTES = RESULTS / "quality-notes.md"  # the reading of the figures, kept by hand
DOMAINS = ("pubmedqa", "gsm8k")
TITLES = {"pubmedqa": "PubMedQA (medical)", "gsm8k": "GSM8K (math)"}
TASK_METRIC = {"pubmedqa": ("pubmedqa_accuracy", "PubMedQA acc"), "gsm8k": ("gsm8k_exact_match", "GSM8K EM")}
ARMS = ("all", "random", "perplexity", "trace")  # then the default


def _f(value, spec: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return format(value, spec)


def _spread(stat: dict) -> str:
    """``mean (min–max)``, or the value alone for one seed."""
    if stat["mean"] is None:
        return "–"
    if stat["min"] == stat["max"]:
        return _f(stat["mean"])
    return f"{_f(stat['mean'])} ({_f(stat['min'])}–{_f(stat['max'])})"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def seeds_table(summary: dict) -> list[str]:
    """Method | AUROC | AUROC per kind | precision at the default's keep rate: mean over seeds (min–max)."""
    kinds, default = summary["kinds"], summary["default"]
    head = ["method", "AUROC", *[f"AUROC {k}" for k in kinds], "precision@keep"]
    lines = [_row(head), "|" + "---|" * len(head)]
    for name, s in summary["summary"].items():
        label = f"**{name}** (default)" if name == default else name
        by_kind = [_spread(s["by_kind"][k]) for k in kinds]
        lines.append(_row([label, _spread(s["auroc"]), *by_kind, _spread(s["precision_at_keep"])]))
    return lines


def training_table(results: list[dict]) -> list[str]:
    """Per trained seed: train samples (clean) and held-out loss / task metric of every arm."""
    trained = [r for r in results if r.get("training")]
    if not trained:
        return ["No training arms were run for these seeds (`--no-train`)."]
    domain = trained[0]["domain"]
    metric, metric_name = TASK_METRIC[domain]
    arms = ["base", *ARMS, trained[0]["default"]]
    lines = [_row(["seed", "arm", "train samples (clean)", "held-out loss", metric_name]), "|---|---|---|---|---|"]
    for r in trained:
        best = min(
            (a for a in arms[1:] if a in r["training"] and a != "trace"),
            key=lambda a: r["training"][a]["metrics"]["loss"],
        )
        for arm in arms:
            t = r["training"].get(arm)
            if t is None:
                continue
            loss = _f(t["metrics"]["loss"])
            loss = f"**{loss}**" if arm == best else loss
            samples = f"{t['train_samples']} ({t.get('train_clean', '–')})"
            lines.append(_row([str(r["settings"]["seed"]), arm, samples, loss, _f(t["metrics"].get(metric))]))
    return lines


def detail_table(results: list[dict]) -> list[str]:
    """Every trace variant and checkpoint subset: AUROC per seed."""
    names = [k for k, v in results[0]["detail"].items() if isinstance(v, dict) and "auroc" in v]
    lines = [_row(["variant", *[f"seed {r['settings']['seed']}" for r in results]]), "|---|" + "---|" * len(results)]
    for name in names:
        lines.append(_row([name, *[_f(r["detail"].get(name, {}).get("auroc")) for r in results]]))
    per = [r["detail"].get("per_checkpoint(trace)", []) for r in results]
    for t in range(max(map(len, per))):
        lines.append(_row([f"trace, checkpoint {t} alone", *[_f(p[t]["auroc"]) if t < len(p) else "–" for p in per]]))
    return lines


def guard_tables(results: list[dict]) -> list[str]:
    """Length guard (AUROC by response-length tercile) and, per noise kind, which signal flagged the dropped."""
    lines = ["AUROC within response-length terciles (a score that merely sorted by length would fail here):", ""]
    lines += [_row(["seed", "method", "short", "middle", "long"]), "|---|---|---|---|---|"]
    for r in results:
        for name, buckets in r["detail"]["length_buckets"].items():
            cells = [f"{_f(b['auroc'])} ({b['tokens'][0]:.0f}–{b['tokens'][1]:.0f} tok)" for b in buckets]
            lines.append(_row([str(r["settings"]["seed"]), name, *cells]))
    lines += ["", "Dropped samples by the signal that flagged them (largest calibrated z), per noise kind:", ""]
    signals = list(next(iter(results[0]["detail"]["flagged_by"].values())))
    lines += [_row(["seed", "kind", *signals]), "|---|---|" + "---|" * len(signals)]
    for r in results:
        for kind, counts in r["detail"]["flagged_by"].items():
            lines.append(_row([str(r["settings"]["seed"]), kind, *[str(counts[s]) for s in signals]]))
    return lines


def targets_text(summary: dict) -> str:
    t = summary["targets"]
    cells = []
    for key, v in t.items():
        if key == "all_pass":
            continue
        if "values" in v:
            value = ", ".join(_f(x) for x in v["values"])
        elif "default" in v:
            value = f"{_f(v['default'])} vs {v['at']} {_f(v['best_single'])}"
        elif "seeds" in v:
            value = "seeds " + ", ".join(map(str, v["seeds"]))
        else:
            value = ", ".join(f"seed {s}: {a}" for s, a in v["lowest"].items())
        cells.append(f"{key}: {value} {'✓' if v['pass'] else '✗'}")
    verdict = "met" if t["all_pass"] else "not met"
    return f"Issue 16's targets over these seeds: **{verdict}** — " + "; ".join(cells) + "."


def plot(groups: dict[str, tuple[list[dict], dict]], img_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img_dir.mkdir(parents=True, exist_ok=True)
    written = []
    fig, axes = plt.subplots(1, len(groups), figsize=(7 * len(groups), 4.2), squeeze=False)
    for ax, (domain, (_, summary)) in zip(axes[0], groups.items(), strict=True):
        default = summary["default"]
        methods = ["random", *SINGLE_SIGNALS, "hybrid_rank(trace, perplexity)", default]
        cols = ["overall", *summary["kinds"]]
        width = 0.8 / len(methods)
        for i, m in enumerate(methods):
            s = summary["summary"][m]
            stats = [s["auroc"] if c == "overall" else s["by_kind"][c] for c in cols]
            means = [x["mean"] for x in stats]
            err = [[x["mean"] - x["min"] for x in stats], [x["max"] - x["mean"] for x in stats]]
            xs = [j + i * width for j in range(len(cols))]
            ax.bar(xs, means, width, yerr=err, capsize=2, label=m.replace("(trace, perplexity)", ""))
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cols))], cols)
        ax.axhline(0.5, color="grey", lw=0.8, ls=":")
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{TITLES[domain]}: AUROC, mean over seeds {summary['seeds']} (bars: min–max)")
        ax.legend(fontsize=7, loc="lower right")
    written.append(_save(fig, img_dir / "quality-auroc.png"))
    trained = {d: [r for r in rs if r.get("training")] for d, (rs, _) in groups.items()}
    trained = {d: rs for d, rs in trained.items() if rs}
    if trained:
        fig, axes = plt.subplots(1, len(trained), figsize=(6 * len(trained), 3.8), squeeze=False)
        for ax, (domain, rs) in zip(axes[0], trained.items(), strict=True):
            arms = [a for a in (*ARMS, rs[0]["default"]) if a in rs[0]["training"]]
            width = 0.8 / len(rs)
            for i, r in enumerate(rs):
                losses = [r["training"][a]["metrics"]["loss"] for a in arms]
                ax.bar([j + i * width for j in range(len(arms))], losses, width, label=f"seed {r['settings']['seed']}")
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(arms))], arms)
            every = [r["training"][a]["metrics"]["loss"] for r in rs for a in arms]
            low, high = min(every), max(every)
            ax.set_ylim(low - 0.3 * (high - low + 1e-3), high + 0.3 * (high - low + 1e-3))
            ax.set_title(f"{TITLES[domain]}: held-out loss (lower is better)")
            ax.legend(fontsize=8)
        written.append(_save(fig, img_dir / "quality-training.png"))
    return written


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=110, format="png")
    tmp.replace(path)
    plt.close(fig)
    return path


def _argv(result: dict) -> str:
    """The command-line options of a run, as far as they differ from `bench/quality.py`'s defaults (seed apart)."""
    defaults = vars(parse_args(["--domain", result["domain"]]))
    parts = [f"--domain {result['domain']}"]
    skip = ("domain", "out", "data_dir", "seed", "seeds", "reuse_features", "summarize", "summary_out")
    for key, value in result["settings"].items():
        if key in skip or defaults.get(key) == value:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag if value else "")
        elif isinstance(value, list):
            parts.append(f"{flag} {','.join(map(str, value))}")
        else:
            parts.append(f"{flag} {value}")
    return " ".join(p for p in parts if p)


def render(groups: dict[str, tuple[list[dict], dict]], images: list[Path], md_path: Path, notes: str = "") -> str:
    rel = [Path("img") / p.name if p.parent.name == "img" else p for p in images]
    out = [
        "# Quality results",
        "",
        "Generated by `bench/plot_quality.py` from the per-seed results `bench/results/quality-<domain>-seed<N>.json`",
        "(made by `bench/quality.py`; the three-seed summaries are `bench/results/quality-<domain>-seeds.json`).",
        "",
        "Regenerate:",
        "",
        "```bash",
    ]
    for domain, (results, summary) in groups.items():
        seeds = ",".join(str(s) for s in summary["seeds"])
        out.append(f"python bench/quality.py {_argv(results[0])} --seeds {seeds} --out bench/.work/q-{domain} \\")
        out.append(f"    --summary-out bench/results/quality-{domain}-seeds.json")
    out += ["python bench/plot_quality.py", "```", ""]
    if notes:
        out += [notes.strip(), ""]
    for domain, (results, summary) in groups.items():
        r0, s = results[0], results[0]["settings"]
        d = r0["data"]
        noise = ", ".join(f"{k} {v}" for k, v in d["noise"].items())
        minutes = ", ".join(f"seed {r['settings']['seed']}: {r['timing_s']['total'] / 60:.0f}" for r in results)
        out += [
            f"## {TITLES[domain]}",
            "",
            f"Seeds {summary['seeds']}; each seed draws its own anchors, candidates, noise and warmup sample. "
            f"{d['candidates']} candidates ({noise}), {d['anchors']} clean anchors, {d['held_out']} clean held-out "
            f"items; model {s['model']}, LoRA r={s.get('lora_rank', 8)} on {', '.join(s['lora_targets'])}, "
            f"max_len {s['max_len']}, SJLT k = {max(s['dims'])}. Warmup: {s['warmup_steps']} AdamW steps, "
            f"checkpoints at steps {', '.join(str(c['step']) for c in d['warmup']['checkpoints'])}. Every ranked "
            "method keeps its top samples at the default's keep rate (its mean-anchor threshold: "
            + ", ".join(f"{r['keep_rate']:.3f}" for r in results)
            + f"). Minutes per seed ({r0['machine']['cpus']} CPUs, training arms included where run): {minutes}.",
            "",
            f"Default score: `{summary['default']}`; `trace` is the pure CLUES trace (`{r0['primary']}`).",
            "",
            *seeds_table(summary),
            "",
            targets_text(summary),
            "",
            "### Training on the kept samples",
            "",
            *training_table(results),
            "",
            "### Guards",
            "",
            *guard_tables(results),
            "",
            "### Trace variants and checkpoint subsets (AUROC)",
            "",
            *detail_table(results),
            "",
        ]
    out += ["## Plots", ""] + [f"![{p.stem}]({p.as_posix()})" for p in rel] + [""]
    text = "\n".join(out)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = md_path.with_name(f".{md_path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(md_path)
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, nargs="*", default=None, help="per-seed quality.py JSON files")
    p.add_argument("--out-md", type=Path, default=REPO / "docs" / "results.md")
    p.add_argument("--img-dir", type=Path, default=REPO / "docs" / "img")
    p.add_argument(
        "--notes",
        type=Path,
        default=DEFAULT_NOTES if DEFAULT_NOTES.is_file() else None,
        help="a Markdown file whose text goes under the commands (default: bench/results/quality-notes.md if present)",
    )
    args = p.parse_args(argv)
    paths = args.results or sorted(q for d in DOMAINS for q in RESULTS.glob(f"quality-{d}-seed[0-9]*.json"))
    if not paths:
        p.error("no results: run bench/quality.py first (or pass --results)")
    results = [json.loads(path.read_text()) for path in paths]
    by_domain: dict[str, list[dict]] = {}
    for r in sorted(results, key=lambda r: (DOMAINS.index(r["domain"]), r["settings"]["seed"])):
        by_domain.setdefault(r["domain"], []).append(r)
    groups = {d: (rs, summarize_seeds(rs)) for d, rs in by_domain.items()}
    images = plot(groups, args.img_dir)
    render(groups, images, args.out_md, args.notes.read_text() if args.notes else "")
    print(f"wrote {args.out_md} and {', '.join(str(i) for i in images)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
