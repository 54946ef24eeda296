"""Does GRPO raise the reward, and how does the likelihood estimator change that? The same run of
``examples/grpo.py`` (word-count reward, docs/guides/rl.md) for each estimator and seed, each in its own process.

    python benchmarks/grpo_rewards.py                          # 3 estimators x 2 seeds x 300 steps, ~12 min on 2 cores
    python benchmarks/grpo_rewards.py --max_steps 6 --seeds 0 --estimators coupled --output_dir /tmp/g   # smoke run

Per run: the mean reward over the first and the last ``--window`` steps, the network calls of one likelihood
estimate, and the seconds per step. Writes ``grpo_rewards.json``, ``.md`` and ``.png`` (reward against step,
smoothed over ``--window`` steps, one line per run) to ``--output_dir``.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from modeling_mdm_prime.tools.cli import option_strings
from modeling_mdm_prime.tools.serving import default_model_path

REPO = Path(__file__).resolve().parents[1]
K = {"coupled": 2, "elbo": 4, "one_pass": 1}  # samples per estimate: 5, 4 and 1 network calls


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--estimators", default="coupled,elbo,one_pass", help="comma-separated likelihood estimators")
    p.add_argument("--seeds", default="0,1", help="comma-separated training seeds")
    p.add_argument(*option_strings("max_steps"), type=int, default=300, help="GRPO steps per run")
    p.add_argument("--window", type=int, default=20, help="steps averaged at the start and end, and in the plot")
    p.add_argument(*option_strings("model_name_or_path"), default=None, help="default: the example's default")
    p.add_argument(*option_strings("output_dir"), type=Path, default=REPO / "benchmarks" / "results",
                   help="where grpo_rewards.json, .md and .png go")  # fmt: skip
    return p.parse_args(argv)


def run(estimator: str, seed: int, a: argparse.Namespace, work: Path) -> dict:
    out = work / f"{estimator}-{seed}"
    command = [
        sys.executable, str(REPO / "examples" / "grpo.py"), "--output_dir", str(out), "--max_steps", str(a.max_steps),
        "--likelihood_estimator", estimator, "--likelihood_samples", str(K[estimator]), "--seed", str(seed),
        "--disable_tqdm", "true",
    ] + (["--model_name_or_path", a.model_name_or_path] if a.model_name_or_path else [])  # fmt: skip
    start = time.time()
    subprocess.run(command, check=True, cwd=work, stdout=subprocess.DEVNULL)
    seconds = time.time() - start
    curve = json.loads((out / "rewards.json").read_text())
    logs = [e for e in json.loads((out / "trainer_state.json").read_text())["log_history"] if "reward" in e]
    rewards, w = curve["reward"], min(a.window, len(curve["reward"]))
    return {
        "estimator": estimator, "samples": K[estimator], "seed": seed, "steps": len(rewards),
        "nfe": logs[0]["likelihood/nfe"], "first": sum(rewards[:w]) / w, "last": sum(rewards[-w:]) / w,
        "seconds_per_step": sum(e["step_time"] for e in logs) / len(logs), "wall_seconds": seconds,
        "reward": rewards,
    }  # fmt: skip


def render_markdown(report: dict) -> str:
    w = report["config"]["window"]
    lines = [
        f"{report['machine']}, model `{report['model']}`, {report['config']['max_steps']} steps per run. Mean reward "
        f"of the first and last {w} steps (1 = every completion on target).",
        "",
        "| estimator | K | NFE per estimate | seed | reward, first steps | reward, last steps | gain | s per step |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["runs"]:
        lines.append(
            f"| {r['estimator']} | {r['samples']} | {r['nfe']:.0f} | {r['seed']} | {r['first']:.3f} | "
            f"{r['last']:.3f} | {r['last'] - r['first']:+.3f} | {r['seconds_per_step']:.2f} |"
        )
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w = report["config"]["window"]
    fig, ax = plt.subplots(figsize=(7, 4))
    colors = {}
    for r in report["runs"]:
        smooth = [sum(r["reward"][max(0, i - w + 1) : i + 1]) / len(r["reward"][max(0, i - w + 1) : i + 1])
                  for i in range(len(r["reward"]))]  # fmt: skip
        color = colors.setdefault(r["estimator"], f"C{len(colors)}")
        label = (
            f"{r['estimator']} (K={r['samples']}, {r['nfe']:.0f} NFE)"
            if r["seed"] == report["runs"][0]["seed"]
            else None
        )
        ax.plot(range(1, len(smooth) + 1), smooth, color=color, alpha=0.85, label=label)
    ax.set_xlabel("GRPO step")
    ax.set_ylabel(f"mean reward (moving average, {w} steps)")
    ax.set_title("word-count reward, one line per seed")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    a = parse_args(argv)
    import torch

    runs = []
    with tempfile.TemporaryDirectory() as work:
        for estimator in a.estimators.split(","):
            if estimator not in K:
                raise ValueError(f"unknown estimator {estimator!r}; expected some of {list(K)}")
            for seed in (int(s) for s in a.seeds.split(",")):
                runs.append(run(estimator, seed, a, Path(work)))
                r = runs[-1]
                print(f"{estimator} seed {seed}: reward {r['first']:.3f} -> {r['last']:.3f}", flush=True)
    model = a.model_name_or_path or str(default_model_path(REPO).relative_to(REPO))
    config = {"max_steps": a.max_steps, "window": a.window, "estimators": a.estimators, "seeds": a.seeds}
    machine = f"{platform.machine()} CPU ({torch.get_num_threads()} threads), torch {torch.__version__}"
    report = {"config": config, "machine": machine, "model": model, "runs": runs}
    a.output_dir.mkdir(parents=True, exist_ok=True)
    (a.output_dir / "grpo_rewards.json").write_text(json.dumps(report, indent=1) + "\n")
    table = render_markdown(report)
    (a.output_dir / "grpo_rewards.md").write_text(table + "\n")
    plot(report, a.output_dir / "grpo_rewards.png")
    print(table)
    return report


if __name__ == "__main__":
    main()
