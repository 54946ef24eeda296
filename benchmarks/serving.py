"""Serving under load: ``examples/serve.py`` on loopback against N concurrent clients, and the same requests as
sequential ``generate()`` calls in one process, measured in the same run on the same machine.

For each concurrency N in ``--concurrency`` (default 1, 4, 16), N clients (``httpx.AsyncClient``) send
``--num_requests`` completion requests between them, each as soon as its previous answer arrived; every request has
its own prompt, the same settings and the same seed, so the server may batch any of them. Reported per N:
requests/s and generated tokens/s over the whole wave, p50 / p99 latency, and the server's rows per
``generate()`` call (from ``/health``). The baseline answers the same requests one ``generate()`` call at a time in
this process, with the server stopped (the two would share the CPU cores otherwise). Bounded: ``--num_requests``
per wave and ``--timeout`` seconds per request.

    python benchmarks/serving.py                          # the tiny reference checkpoint, ~1 minute on 2 CPU cores
    python benchmarks/serving.py --model_name_or_path outputs/smollm2-prime2 --num_requests 16 --tag serving_smollm2

Writes ``serving.json`` and ``serving.md`` (``--tag``) to ``--output_dir``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch
from transformers import AutoModel, AutoTokenizer

from modeling_mdm_prime.tools.cli import add_demo_model_argument, option_strings

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["ROMEO:", "JULIET:", "NURSE:", "MERCUTIO:", "TYBALT:", "BENVOLIO:", "FRIAR LAURENCE:", "CAPULET:"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_demo_model_argument(p, REPO)
    p.add_argument("--concurrency", default="1,4,16", help="comma-separated numbers of concurrent clients")
    p.add_argument(*option_strings("num_requests"), type=int, default=32, help="requests per wave")
    p.add_argument(*option_strings("max_tokens"), type=int, default=32, help="tokens per answer")
    p.add_argument(
        *option_strings("num_steps"), type=int, default=None, help="sampler steps T (default: one per token)"
    )
    p.add_argument(*option_strings("tick_ms"), type=float, default=20.0, help="the server's batching tick")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds a request may take")
    p.add_argument("--seed", type=int, default=0, help="the seed of every request")
    p.add_argument(*option_strings("output_dir"), type=Path, default=REPO / "benchmarks" / "results",
                   help="where TAG.json and TAG.md go")  # fmt: skip
    p.add_argument("--tag", default="serving", help="file name of the results")
    return p.parse_args(argv)


def request_bodies(a: argparse.Namespace, model_id: str) -> list[dict]:
    bodies = []
    for i in range(a.num_requests):
        prompt = f"{PROMPTS[i % len(PROMPTS)]} {i}"  # every prompt its own: a repeat would wait for another call
        body = {"model": model_id, "prompt": prompt, "max_tokens": a.max_tokens, "seed": a.seed}
        if a.num_steps:
            body["steps"] = a.num_steps
        bodies.append(body)
    return bodies


def sequential_baseline(a: argparse.Namespace, bodies: list[dict]) -> dict:
    model = AutoModel.from_pretrained(a.model_name_or_path, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(a.model_name_or_path)
    extra = {"num_steps": a.num_steps} if a.num_steps else {}
    model.generate(tokenizer("warm", return_tensors="pt")["input_ids"], max_new_tokens=4, seed=0)
    latencies, tokens = [], 0
    start = time.perf_counter()
    for body in bodies:
        t = time.perf_counter()
        ids = tokenizer(body["prompt"], return_tensors="pt")["input_ids"]
        out = model.generate(ids, max_new_tokens=body["max_tokens"], seed=body["seed"], **extra)
        new = out[0, ids.shape[1] :].tolist()
        eos = tokenizer.eos_token_id
        tokens += new.index(eos) if eos in new else len(new)
        latencies.append(time.perf_counter() - t)
    wall = time.perf_counter() - start
    return summary("sequential generate()", 1, latencies, tokens, wall, None)


def summary(name: str, clients: int, latencies: list[float], tokens: int, wall: float, rows_per_call) -> dict:
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]
    return {
        "setting": name,
        "clients": clients,
        "requests": len(latencies),
        "wall_s": wall,
        "requests_per_s": len(latencies) / wall,
        "tokens_per_s": tokens / wall,
        "p50_latency_s": statistics.median(latencies),
        "p99_latency_s": p99,
        "rows_per_generate_call": rows_per_call,
    }


async def wave(base: str, bodies: list[dict], clients: int, timeout: float) -> tuple[list[float], int, float]:
    pending = list(bodies)
    latencies, tokens = [], 0

    async def client(http: httpx.AsyncClient):
        nonlocal tokens
        while pending:
            body = pending.pop()
            t = time.perf_counter()
            response = await http.post(base + "/v1/completions", json=body, timeout=timeout)
            response.raise_for_status()
            latencies.append(time.perf_counter() - t)
            tokens += response.json()["usage"]["completion_tokens"]

    start = time.perf_counter()
    async with httpx.AsyncClient() as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    return latencies, tokens, time.perf_counter() - start


def start_server(a: argparse.Namespace, port: int) -> subprocess.Popen:
    command = [sys.executable, str(REPO / "examples" / "serve.py"), "--model_name_or_path", a.model_name_or_path,
               "--port", str(port), "--tick_ms", str(a.tick_ms), "--request_timeout", str(a.timeout),
               "--max_tokens", str(a.max_tokens), "--max_batch_size", "16"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with code {process.returncode}: {' '.join(command)}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.2)
    process.terminate()
    raise RuntimeError("the server did not start within 180 s")


def main(argv=None) -> dict:
    a = parse_args(argv)
    model_id = Path(a.model_name_or_path).name
    bodies = request_bodies(a, model_id)
    rows = [sequential_baseline(a, bodies)]
    print(json.dumps(rows[-1]), flush=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    server = start_server(a, port)
    try:
        asyncio.run(wave(base, bodies[:2], 2, a.timeout))  # warm-up
        for clients in [int(c) for c in a.concurrency.split(",") if c]:
            before = httpx.get(base + "/health").json()
            latencies, tokens, wall = asyncio.run(wave(base, bodies, clients, a.timeout))
            after = httpx.get(base + "/health").json()
            calls = after["generate_calls"] - before["generate_calls"]
            served = after["rows_served"] - before["rows_served"]
            rows.append(summary(f"server, {clients} client(s)", clients, latencies, tokens, wall, served / calls))
            print(json.dumps(rows[-1]), flush=True)
    finally:
        server.terminate()
        server.wait(timeout=30)

    baseline = rows[0]["requests_per_s"]
    for row in rows:
        row["speedup_vs_sequential"] = row["requests_per_s"] / baseline
    machine = f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}"
    config = {k: getattr(a, k) for k in ("concurrency", "num_requests", "max_tokens", "num_steps", "tick_ms", "seed")}
    report = {"config": {"model": model_id, **config}, "machine": machine, "rows": rows}
    a.output_dir.mkdir(parents=True, exist_ok=True)
    (a.output_dir / f"{a.tag}.json").write_text(json.dumps(report, indent=2) + "\n")
    table = render_markdown(report)
    (a.output_dir / f"{a.tag}.md").write_text(table + "\n")
    print(table)
    return report


def render_markdown(report: dict) -> str:
    """The table docs/guides/serving.md shows (a test checks the page against the committed JSON)."""
    c = report["config"]
    lines = [
        f"{c['model']}, {c['num_requests']} requests of {c['max_tokens']} tokens per wave, "
        f"{report['machine']}; the server and the baseline ran one after the other, never at once.",
        "",
        "| setting | requests/s | tokens/s | p50 latency (s) | p99 latency (s) | rows per generate() | × sequential |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        per_call = "1" if r["rows_per_generate_call"] is None else f"{r['rows_per_generate_call']:.1f}"
        lines.append(
            f"| {r['setting']} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.0f} | {r['p50_latency_s']:.2f} | "
            f"{r['p99_latency_s']:.2f} | {per_call} | {r['speedup_vs_sequential']:.2f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
