"""Pretraining throughput with 1 vs 2 processes (DDP through `accelerate launch`), e.g. on a 2-core CPU.

Runs examples/pretrain.py for --steps optimizer steps per setting (same per-process batch, so 2 processes train
on twice the tokens per step) and reads the elapsed training time from its metrics.jsonl, excluding the first
--skip steps (start-up). Prints a table, writes JSON.

    python benchmarks/ddp_throughput.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=60, help="training steps per run")
    p.add_argument("--skip", type=int, default=10, help="steps excluded from the timing (start-up)")
    p.add_argument("--batch_size", "--batch-size", type=int, default=16, help="per process")
    p.add_argument("--seq_len", "--seq-len", type=int, default=128, help="tokens per sequence")
    p.add_argument("--rounds", type=int, default=2, help="interleaved repetitions of each configuration")
    p.add_argument(
        "--output", type=Path, default=REPO / "benchmarks" / "results" / "ddp_throughput.json", help="results JSON"
    )
    return p.parse_args(argv)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run(processes: int, a: argparse.Namespace, workdir: Path) -> float:
    """Training tokens per second (all processes) between step --skip and step --steps."""
    out = workdir / f"p{processes}"
    args = [
        "--max_steps", str(a.steps), "--batch_size", str(a.batch_size), "--seq_len", str(a.seq_len),
        "--log_every", "1", "--eval_every", "100000", "--checkpoint_every", "100000", "--report_to", "jsonl",
        "--num_samples", "1", "--sample_tokens", "8", "--output_dir", str(out), "--cpu",
    ]  # fmt: skip
    script = str(REPO / "examples" / "pretrain.py")
    if processes == 1:
        command = [sys.executable, script, *args]
    else:
        config = str(REPO / "examples" / "accelerate_configs" / "cpu_ddp.yaml")
        port = str(free_port())
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config,
                   "--num_processes", str(processes), "--main_process_port", port, script, *args]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(max(1, os.cpu_count() // processes))}
    subprocess.run(command, cwd=REPO, env=env, check=True, capture_output=True, text=True)
    rows = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    seconds = {row["step"]: row["train/seconds"] for row in rows if "train/seconds" in row}
    tokens = (a.steps - a.skip) * a.batch_size * a.seq_len * processes
    return tokens / (seconds[a.steps] - seconds[a.skip])


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    results: dict[int, list[float]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(a.rounds):
            for processes in (1, 2):
                results[processes].append(run(processes, a, Path(tmp) / f"r{round_index}"))
                print(f"round {round_index}: {processes} process(es): {results[processes][-1]:,.0f} tokens/s")
    best = {p: max(v) for p, v in results.items()}
    print("\n| processes | threads each | tokens/s (best of rounds) | ratio vs 1 process |\n|---:|---:|---:|---:|")
    for p in (1, 2):
        print(f"| {p} | {max(1, os.cpu_count() // p)} | {best[p]:,.0f} | {best[p] / best[1]:.2f} |")
    a.output.parent.mkdir(parents=True, exist_ok=True)
    a.output.write_text(json.dumps({
        "config": {k: str(v) for k, v in vars(a).items()}, "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(), "tokens_per_s": results,
    }, indent=2))  # fmt: skip
    print(f"wrote {a.output}")


if __name__ == "__main__":
    main()
