"""lm-evaluation-harness on the reference checkpoint: the local tasks of tests/lm_eval_tasks through the ``mdm_prime``
model, with scores, standard errors and the time per request of each method.

For each number of Monte-Carlo samples K it runs the four local tasks (multiple choice, rolling perplexity, two
generation tasks) with lm-eval's evaluator and reports
- every task metric with lm-eval's standard error over documents (for the bound-based metrics this is not the
  Monte-Carlo error, which is reported separately as the mean per-request s.e. of the bound, in nats);
- per method (loglikelihood, loglikelihood_rolling, generate_until, and loglikelihood with ``is_greedy``): requests,
  wall seconds and seconds per request.
Scores from ``loglikelihood`` and ``loglikelihood_rolling`` are valid-bound estimates (perplexities are upper
bounds), not exact log-likelihoods. Writes benchmarks/results/lm_eval_tasks.json and .md and prints the table.

    python benchmarks/lm_eval_tasks.py             # the committed results (about a minute on 2 CPU cores)
    python benchmarks/lm_eval_tasks.py --tiny      # K = 2 only, a smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import lm_eval
import torch
from lm_eval.tasks import TaskManager

from modeling_mdm_prime.tools.lm_eval_adapter import MDMPrimeLM

REPO = Path(__file__).resolve().parents[1]
TASKS = ["mdm_prime_mc", "mdm_prime_ppl", "mdm_prime_gen", "mdm_prime_gen_word"]


class TimedLM(MDMPrimeLM):
    """Records wall time and request counts of each method."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.timings: dict[str, dict[str, float]] = {}

    def _timed(self, name, method, requests, *args, **kwargs):
        start = time.perf_counter()
        out = method(requests, *args, **kwargs)
        entry = self.timings.setdefault(name, {"requests": 0, "seconds": 0.0})
        entry["requests"] += len(requests)
        entry["seconds"] += time.perf_counter() - start
        return out

    def loglikelihood(self, requests, *args, **kwargs):
        return self._timed("loglikelihood", super().loglikelihood, requests, *args, **kwargs)

    def loglikelihood_rolling(self, requests, *args, **kwargs):
        return self._timed("loglikelihood_rolling", super().loglikelihood_rolling, requests, *args, **kwargs)

    def generate_until(self, requests, *args, **kwargs):
        return self._timed("generate_until", super().generate_until, requests, *args, **kwargs)


def run(checkpoint: Path, num_time_samples: int, tasks: list[str], seed: int, batch_size: int, is_greedy=False) -> dict:
    lm = TimedLM(
        str(checkpoint), num_time_samples=num_time_samples, seed=seed, batch_size=batch_size, is_greedy=is_greedy
    )
    manager = TaskManager(include_path=str(REPO / "tests" / "lm_eval_tasks"))
    results = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, log_samples=False)
    scores = {}
    for task, values in results["results"].items():
        for key, value in values.items():
            if "," not in key or "_stderr" in key:
                continue
            metric = key.split(",")[0]
            stderr = values.get(f"{metric}_stderr,none")
            scores[f"{task}/{metric}"] = {
                "value": value,
                "stderr": stderr if isinstance(stderr, (int, float)) and math.isfinite(stderr) else None,
            }
    methods = {}
    for name, entry in lm.timings.items():
        key = f"{name}+is_greedy" if is_greedy and name == "loglikelihood" else name
        methods[key] = {**entry, "seconds_per_request": entry["seconds"] / max(entry["requests"], 1)}
        stderrs = lm.last_stderr.get(name)
        if stderrs:
            methods[key]["mean_bound_stderr_nats"] = sum(stderrs) / len(stderrs)
    if "mdm_prime_ppl" in tasks:
        # The Monte-Carlo error of the aggregated bits_per_byte: documents use independent noise, so the s.e. of
        # the summed bound is the root of the summed variances (lm-eval reports no s.e. for this metric).
        texts = [json.loads(line)["text"] for line in (REPO / "tests" / "lm_eval_tasks" / "ppl.jsonl").open()]
        total_bytes = sum(len(t.encode("utf-8")) for t in texts)
        variance = sum(se**2 for se in lm.last_stderr["loglikelihood_rolling"])
        scores["mdm_prime_ppl/bits_per_byte"]["monte_carlo_stderr"] = math.sqrt(variance) / (total_bytes * math.log(2))
    return {"scores": scores, "methods": methods}


def render_markdown(results: dict) -> str:
    lines = [
        f"lm-eval {results['lm_eval_version']} on `{results['checkpoint']}`, local tasks of tests/lm_eval_tasks "
        f"({results['device']}, batch_size {results['batch_size']}, generation: {results['generation']}).",
        "",
        "| K (num_time_samples) | task / metric | value | s.e. over documents | Monte-Carlo s.e. |",
        "|---|---|---|---|---|",
    ]
    for run_ in results["runs"]:
        for name, score in run_["scores"].items():
            stderr = "n/a" if score["stderr"] is None else f"{score['stderr']:.4g}"
            mc = score.get("monte_carlo_stderr")
            mc = "-" if mc is None else f"{mc:.4g}"
            lines.append(f"| {run_['num_time_samples']} | {name} | {score['value']:.4g} | {stderr} | {mc} |")
    lines += [
        "",
        "| K (num_time_samples) | method | requests | seconds | s / request | "
        "mean Monte-Carlo s.e. per request (nats) |",
        "|---|---|---|---|---|---|",
    ]
    for run_ in results["runs"]:
        for name, m in run_["methods"].items():
            se = m.get("mean_bound_stderr_nats")
            lines.append(
                f"| {run_['num_time_samples']} | {name} | {m['requests']} | {m['seconds']:.2f} | "
                f"{m['seconds_per_request']:.4f} | {'-' if se is None else f'{se:.3f}'} |"
            )
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--model_name_or_path",
        "--checkpoint",
        type=Path,
        default=REPO / "checkpoints" / "mdm-prime-shakespeare-tiny",
        help="model to evaluate",
    )
    p.add_argument(
        "--num_time_samples",
        "--mc-samples",
        type=int,
        nargs="+",
        default=[8, 32],
        help="Monte-Carlo draws per scored window to compare",
    )
    p.add_argument(
        "--batch_size", "--batch-size", type=int, default=8, help="windows per forward pass, prompts per generate()"
    )
    p.add_argument("--seed", type=int, default=1234, help="base seed of the adapter")
    p.add_argument("--tiny", action="store_true", help="smoke-test configuration (few requests)")
    p.add_argument(
        "--output_dir",
        "--output-dir",
        type=Path,
        default=REPO / "benchmarks" / "results",
        help="where the JSON, table and plots go",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    ks = [2] if args.tiny else args.num_time_samples
    runs = [{"num_time_samples": k, **run(args.model_name_or_path, k, TASKS, args.seed, args.batch_size)} for k in ks]
    greedy = run(args.model_name_or_path, ks[0], ["mdm_prime_mc"], args.seed, args.batch_size, is_greedy=True)
    runs[0]["methods"].update(greedy["methods"])
    generation = MDMPrimeLM(str(args.model_name_or_path)).model.generation_config
    results = {
        "checkpoint": str(
            args.model_name_or_path.relative_to(REPO)
            if args.model_name_or_path.is_relative_to(REPO)
            else args.model_name_or_path
        ),
        "lm_eval_version": lm_eval.__version__,
        "torch": torch.__version__,
        "device": f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads",
        "batch_size": args.batch_size,
        "seed": args.seed,
        "generation": f"strategy={generation.strategy}, num_steps=one per new token, do_sample per task",
        "runs": runs,
    }
    table = render_markdown(results)
    print(table)
    if not args.tiny:
        args.output_dir.mkdir(parents=True, exist_ok=True)
        (args.output_dir / "lm_eval_tasks.json").write_text(json.dumps(results, indent=2) + "\n")
        (args.output_dir / "lm_eval_tasks.md").write_text(table + "\n")
    return results


if __name__ == "__main__":
    main()
