"""DP-SGD utility and cost: federated LoRA training of two PubMedQA silos with plain local training and with DP-SGD at
ε ∈ {8, 3, 1} (δ = 1/N at each silo), the held-out loss of each, and the cost of a DP-SGD round over a plain one.

    python bench/dp.py --out bench/results/dp-pubmedqa.json              # SmolLM2, ~1 h on 2 cores
    python bench/dp.py --model tiny:0 --silo-samples 12 --held-out 6 --rounds 2 --steps 2   # a smoke run

What it runs, in one process: the PubMedQA items (`--data-dir/pubmedqa/ori_pqal.json`, seeded split) become two silos
of `--silo-samples` clean samples each (the data a scoring job would select: the arms differ only in DP) and a
held-out set. Every arm starts from the same LoRA initialisation and runs `--rounds` federated rounds: each silo
trains `--steps` AdamW steps from the round's global adapter (plain: `scoring.federated.local.local_update`, batches
of `--batch-size`; DP: `scoring.federated.dp.dp_local_update`, Poisson batches of expected size `--batch-size`,
clip `--clip`, σ calibrated to the arm's ε over all its rounds, `scoring.privacy`), then FedAvg. The held-out loss
of the final global adapter is the utility.

Cost: one untimed plain and one untimed DP update come first; then the rounds of the arms are interleaved (round r
of every arm before round r + 1 of any), so each arm's local updates meet the same machine; the ratio is the median
seconds of a DP silo update over the median of a plain one (target ≤ 1.3: the per-sample gradients are the price, and
the engine computes them at the batched backward's cost). Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import emit, make_log  # noqa: E402

log = make_log("dp")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", help="model reference (default smollm2; tiny:0 for a smoke run)")
    p.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data", help="holds pubmedqa/")
    p.add_argument("--silo-samples", type=int, default=100, help="samples per silo (default 100; two silos)")
    p.add_argument("--held-out", type=int, default=30, help="held-out samples (default 30)")
    p.add_argument("--epsilons", default="8,3,1", help="DP arms, comma-separated (default 8,3,1)")
    p.add_argument("--rounds", type=int, default=4, help="federated rounds (default 4)")
    p.add_argument("--steps", type=int, default=10, help="local steps per round (default 10)")
    p.add_argument("--batch-size", type=int, default=8, help="(expected) batch per step (default 8)")
    p.add_argument("--lr", type=float, default=3e-4, help="local learning rate (default 3e-4)")
    p.add_argument("--clip", type=float, default=1.0, help="DP-SGD per-sample clip norm C (default 1)")
    p.add_argument("--max-len", type=int, default=256, help="tokens per sample (default 256)")
    p.add_argument("--seed", type=int, default=0, help="data split and DP noise seed (default 0)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default 0: torch's default)")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from scoring.batching import tokenize_samples
    from scoring.config import DPSettings, LocalTrainConfig, LoraSettings
    from scoring.data import load_pubmedqa
    from scoring.federated.aggregation import SiloUpdate, build_aggregator
    from scoring.federated.dp import dp_local_update
    from scoring.federated.evaluation import evaluate
    from scoring.federated.local import get_lora_weights, local_update, set_lora_weights
    from scoring.models import attach_lora, load_base_model
    from scoring.privacy import PrivacyPlan

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.monotonic()
    items = load_pubmedqa(args.data_dir / "pubmedqa" / "ori_pqal.json")
    random.Random(args.seed).shuffle(items)
    n = args.silo_samples
    silos = {"silo1": items[:n], "silo2": items[n : 2 * n]}
    held_out = items[2 * n : 2 * n + args.held_out]
    log(f"loading {args.model}; silos of {n} samples, {len(held_out)} held out")
    base = load_base_model(args.model)
    model = attach_lora(base.model, LoraSettings(), init_seed=0)
    model.eval()
    tok = base.tokenizer
    data = {name: tokenize_samples(samples, tok, args.max_len) for name, samples in silos.items()}
    cfg = LocalTrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, max_grad_norm=0.0)
    start = get_lora_weights(model)
    epsilons = [float(e) for e in args.epsilons.split(",") if e.strip()]
    arms: dict[str, dict] = {"none": {"epsilon": None}}
    for eps in epsilons:
        arms[f"eps={eps:g}"] = {"epsilon": eps}
    fedavg = build_aggregator("fedavg")
    generator = torch.Generator().manual_seed(args.seed)  # a benchmark: reproducible noise (the product's is secret)
    for name, arm in arms.items():
        arm["global"], arm["moments"], arm["seconds"], arm["losses"] = dict(start), {}, [], []
        if arm["epsilon"] is not None:
            arm["plans"] = {
                silo: PrivacyPlan.of(
                    DPSettings(epsilon=arm["epsilon"], clip_norm=args.clip),
                    num_samples=len(d),
                    expected_batch=args.batch_size,
                    planned_steps=args.rounds * args.steps,
                )
                for silo, d in data.items()
            }
            plan = arm["plans"]["silo1"]
            log(f"{name}: σ = {plan.noise_multiplier:.3f}, q = {plan.sampling_rate:.3f}")
    common = {"pad_id": tok.pad_token_id, "global_weights": start, "lr": cfg.lr}
    local_update(model, data["silo1"], cfg, **common)  # untimed: one-time costs (allocations, kernels) land here
    if epsilons:
        dp_local_update(model, data["silo1"], cfg, arms[f"eps={epsilons[0]:g}"]["plans"]["silo1"], **common)
    for r in range(args.rounds):
        for name, arm in arms.items():
            updates = []
            for silo, d in data.items():
                t0 = time.perf_counter()
                common = {"pad_id": tok.pad_token_id, "global_weights": arm["global"], "lr": cfg.lr}
                moments = arm["moments"].get(silo)
                if arm["epsilon"] is None:
                    result = local_update(model, d, cfg, moments=moments, round=r, **common)
                else:
                    plan = arm["plans"][silo]
                    result = dp_local_update(model, d, cfg, plan, moments=moments, generator=generator, **common)
                arm["seconds"].append(time.perf_counter() - t0)
                arm["moments"][silo] = result.moments
                updates.append(SiloUpdate(silo, result.weights, result.num_samples))
                if result.mean_loss == result.mean_loss:  # not NaN (a DP step may draw no sample)
                    arm["losses"].append(result.mean_loss)
            arm["global"], _ = fedavg.aggregate(arm["global"], updates)
            log(f"round {r + 1}/{args.rounds} {name}: {statistics.median(arm['seconds'][-len(data) :]):.1f} s/update")
    results = {}
    for name, arm in arms.items():
        set_lora_weights(model, arm["global"])
        metrics = evaluate(model, tok, held_out, tasks=["loss"], max_len=args.max_len)
        entry = {
            "held_out_loss": metrics["loss"],
            "held_out_perplexity": metrics["perplexity"],
            "train_loss_mean": statistics.fmean(arm["losses"]) if arm["losses"] else None,
            "median_update_s": statistics.median(arm["seconds"]),
        }
        if arm["epsilon"] is not None:
            plan = arm["plans"]["silo1"]
            entry |= {
                "epsilon": arm["epsilon"],
                "delta": plan.delta,
                "noise_multiplier": plan.noise_multiplier,
                "sampling_rate": plan.sampling_rate,
                "epsilon_spent": plan.epsilon_after(args.rounds * args.steps),
            }
        results[name] = entry
        log(f"{name}: held-out loss {metrics['loss']:.4f}")
    set_lora_weights(model, start)
    base_metrics = evaluate(model, tok, held_out, tasks=["loss"], max_len=args.max_len)
    dp_seconds = [s for name, arm in arms.items() if arm["epsilon"] is not None for s in arm["seconds"]]
    overhead = statistics.median(dp_seconds) / results["none"]["median_update_s"] if dp_seconds else None
    result = {
        "benchmark": "dp",
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"},
        "base_held_out_loss": base_metrics["loss"],
        "arms": results,
        "dp_over_plain_update_time": overhead,
        "targets": {"dp_over_plain_update_time_max": 1.3, "met": overhead is not None and overhead <= 1.3},
        "seconds": time.monotonic() - started,
        "machine": {"torch_threads": torch.get_num_threads()},
    }
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
