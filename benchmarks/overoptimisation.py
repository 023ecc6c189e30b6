"""Reward over-optimisation, made visible: PPO against the learned judge with a
weak KL penalty, the judge's (proxy) reward and the labeller's (gold) reward
side by side at every step.

    python benchmarks/overoptimisation.py [--steps 80] [--kl-coef 0.001] [--json OUT.json] [--png OUT.png]

Through the real entry point: `configs/local_tiny_pipeline.yaml` trains the SFT
policy and the tiny reward model (or reuses them from `--from DIR`, a
pipeline's output directory), then PPO runs from the SFT policy against the
judge served over HTTP, for many steps, with the KL coefficient turned down
and a higher learning rate. A second PPO run with the pipeline's own KL
coefficient is the baseline, on the same judge and seeds.

The picture (PNG) shows both rewards over steps and over the KL to the
reference for both runs; the JSON holds the curves and the summary figures:
the step where gold peaked, the gold lost after it, and how much the proxy
still rose after that step.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from common import REPO, launch, write_result

from cluster.metrics import read_metrics

CONFIG = "configs/local_tiny_pipeline.yaml"
# A strong push: higher lr and more PPO epochs than the demo, so the policy reaches the judge's mistakes.
PUSH = ["learner.lr=3e-4", "learner.ppo_epochs=4"]


def _curves(run_dir: Path) -> dict[str, list[float]]:
    rows = read_metrics(run_dir / "metrics.jsonl")
    return {"step": [r["step"] for r in rows], "proxy": [r["score_mean"] for r in rows],
            "gold": [r["gold_reward_mean"] for r in rows], "kl": [r["kl"] for r in rows]}


def _smooth(values: list[float], width: int = 5) -> list[float]:
    out = []
    for i in range(len(values)):
        window = values[max(0, i - width + 1): i + 1]
        out.append(sum(window) / len(window))
    return out


def summarise(curves: dict[str, list[float]]) -> dict[str, float]:
    """Where gold peaked (smoothed over 5 steps) and what the proxy and gold did after it."""
    gold, proxy = _smooth(curves["gold"]), _smooth(curves["proxy"])
    peak = max(range(len(gold)), key=gold.__getitem__)
    return {"gold_start": gold[0], "gold_peak": gold[peak], "gold_peak_step": curves["step"][peak],
            "gold_end": gold[-1], "gold_lost_after_peak": gold[peak] - gold[-1],
            "proxy_at_gold_peak": proxy[peak], "proxy_end": proxy[-1],
            "proxy_gain_after_gold_peak": proxy[-1] - proxy[peak], "kl_end": curves["kl"][-1],
            "overoptimised": bool(proxy[-1] - proxy[peak] > 0 and gold[peak] - gold[-1] > 0)}


def plot(runs: dict[str, dict[str, list[float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    styles = {"weak_kl": "-", "baseline": "--"}
    for name, c in runs.items():
        for key, colour in (("proxy", "tab:blue"), ("gold", "tab:orange")):
            label = f"{key} ({name.replace('_', ' ')})"
            axes[0].plot(c["step"], _smooth(c[key]), styles[name], color=colour, label=label)
            axes[1].plot(_smooth(c["kl"]), _smooth(c[key]), styles[name], color=colour, label=label)
    axes[0].set_xlabel("PPO step")
    axes[1].set_xlabel("KL to the SFT reference (nats per sequence, 5-step mean)")
    for ax in axes:
        ax.set_ylabel("reward (5-step mean)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Proxy (learned judge) against gold (labeller) reward: over-optimisation under a weak KL penalty")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--kl-coef", type=float, default=0.001, help="the weak KL coefficient")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--from", dest="from_dir", default=None,
                        help="a pipeline output directory whose sft/ and reward_model/ to reuse")
    parser.add_argument("--runs", default="runs/overoptimisation")
    parser.add_argument("--json", default="benchmarks/results/overoptimisation.json")
    parser.add_argument("--png", default="benchmarks/results/overoptimisation.png")
    parser.add_argument("--plot-only", action="store_true", help="redraw the PNG from the JSON, run nothing")
    args = parser.parse_args()
    if args.plot_only:
        plot(json.loads((REPO / args.json).read_text())["curves"], REPO / args.png)
        return 0

    root = REPO / args.runs
    t0 = time.perf_counter()
    seed = f"run.seed={args.seed}"
    base = Path(args.from_dir) if args.from_dir else root / "stages"
    if not args.from_dir:
        launch(CONFIG, base, [seed, "run.stages=[sft,reward_model]"])
    stages = {s: json.loads((base / s / "summary.json").read_text()) for s in ("sft", "reward_model")}
    common = [seed, "run.stages=[ppo]", f"model.path={stages['sft']['model']}", "reward.rule=null",
              f"reward.model_path={stages['reward_model']['model']}", f"run.steps={args.steps}",
              "run.save_final=false", *PUSH]
    runs = {}
    for name, kl in (("weak_kl", args.kl_coef), ("baseline", None)):
        out = root / name
        print(f"{name}: {args.steps} PPO steps, kl_coef {kl if kl is not None else 'from the config'}", flush=True)
        launch(CONFIG, out, common + ([f"learner.kl_coef={kl}"] if kl is not None else []))
        runs[name] = _curves(out / "ppo")

    report = {"steps": args.steps, "weak_kl_coef": args.kl_coef, "judge_agreement":
              stages["reward_model"]["held_out_agreement_after"], "wall_s": time.perf_counter() - t0,
              "summary": {name: summarise(c) for name, c in runs.items()}, "curves": runs}
    print(f"\n{'run':<9} {'gold start':>10} {'gold peak':>9} {'@step':>5} {'gold end':>8} {'proxy@peak':>10} "
          f"{'proxy end':>9} {'KL end':>7}")
    for name, s in report["summary"].items():
        print(f"{name:<9} {s['gold_start']:>10.3f} {s['gold_peak']:>9.3f} {s['gold_peak_step']:>5} {s['gold_end']:>8.3f} "
              f"{s['proxy_at_gold_peak']:>10.3f} {s['proxy_end']:>9.3f} {s['kl_end']:>7.2f}")
    plot(runs, REPO / args.png)
    write_result(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
