"""The embedded default per CPU-minute: which settings of ``examples/pretrain.py`` give the lowest held-out valid
bound for a fixed wall-clock training budget.

Every candidate is a set of ``pretrain.py`` flags on top of the script's defaults. For each one this script
1. times the training step in this process (the mean of 30 steps after 3 warm-up steps: the real model, AdamW, EMA
   and training batches) and sets ``max_steps = budget / step time`` (unless the candidate's flags fix ``max_steps``),
   so that every candidate trains for about the same wall time and its learning-rate schedule ends where its budget
   does (runs under 1,000 steps warm up for a tenth of their steps instead of the default 100, the same fraction for
   every candidate); the table reports the training seconds each run actually took;
2. runs ``examples/pretrain.py`` with those flags in a subprocess (the real script: data, loader, EMA, schedule,
   ``final/``), evaluating and checkpointing only at the end, and reads the training seconds it logged;
3. scores the saved ``final/`` (the EMA weights, as a user gets them) with one evaluation common to all candidates:
   the valid bound ``nll_bound`` on the first ``--eval_blocks`` held-out blocks with ``--num_time_samples`` time samples
   each, the same seeds for every model. Perplexity ``exp(NELBO/token)`` is an upper bound on the true perplexity.
   Differences to the first candidate are paired over the same blocks, so their standard error is much smaller
   than that of each value.

Writes ``<output-dir>/default_budget.{json,md,png}`` and prints the markdown table. ``torch.compile`` is not a
candidate: ``benchmarks/scale.py`` measured a compiled backbone at 0.59-0.69x of eager on this kind of CPU.

    python benchmarks/default_budget.py --budget 180                      # the screen (~4 min per candidate)
    python benchmarks/default_budget.py --candidates "" --tag default_budget_confirm --extra \
        '{"old default": {"max_steps": 1500}, "2 layers": {"num_hidden_layers": 2, "max_steps": 2300}}'
    python benchmarks/default_budget.py --tiny                            # a seconds-long smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))
from pretrain import EMA, build_model, load_corpus, parse_config, prepare_data, tokenize_blocks  # noqa: E402

# name -> pretrain.py flags changed from its defaults. "seq_len" candidates keep tokens per batch fixed; their
# perplexity is measured on blocks of their own length, so it is labelled as not strictly comparable.
CANDIDATES: dict[str, dict[str, object]] = {
    "default": {},
    "ema_decay=0 (no EMA)": {"ema_decay": 0.0},
    "ema_decay=0.99": {"ema_decay": 0.99},
    "learning_rate=4e-3": {"learning_rate": 4e-3},
    "learning_rate=1e-3": {"learning_rate": 1e-3},
    "lr_scheduler=linear": {"lr_scheduler": "linear"},
    "batch_size=32": {"batch_size": 32},
    "batch_size=8": {"batch_size": 8},
    "width 128 (MLP 512)": {"hidden_size": 128, "intermediate_size": 512},
    "width 256 (MLP 1024)": {"hidden_size": 256, "intermediate_size": 1024},
    "2 layers": {"num_hidden_layers": 2},
    "6 layers": {"num_hidden_layers": 6},
    "ℓ=1 (MD4)": {"num_sub_tokens": 1},
    "ℓ=4": {"num_sub_tokens": 4},
    "seq_len=256 & batch_size=8": {"seq_len": 256, "batch_size": 8},
}
TINY_FLAGS = {"max_documents": 8, "bpe_vocab_size": 300, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 1, "num_attention_heads": 2, "seq_len": 32, "batch_size": 4}  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--budget", type=float, default=180.0, help="training seconds per candidate")
    p.add_argument("--candidates", default=",".join(CANDIDATES), help="comma-separated names from CANDIDATES")
    p.add_argument("--extra", default=None, help='JSON {"name": {flag: value}} of further candidates')
    p.add_argument(
        "--eval_blocks", "--eval-blocks", type=int, default=512, help="held-out blocks in the common evaluation"
    )
    p.add_argument("--num_time_samples", "--time-samples", type=int, default=2, help="time samples per held-out block")
    p.add_argument(
        "--output_dir",
        "--output-dir",
        type=Path,
        default=REPO / "benchmarks" / "results",
        help="where the JSON, table and plots go",
    )
    p.add_argument(
        "--run_dir", "--run-dir", type=Path, default=Path("outputs/default_budget"), help="the runs' output_dirs"
    )
    p.add_argument("--tag", default="default_budget", help="file name of the results")
    p.add_argument("--tiny", action="store_true", help="smoke configuration: seconds, not minutes")
    a = p.parse_args(argv)
    if a.tiny:
        a.budget, a.eval_blocks, a.num_time_samples, a.tag = 3.0, 8, 1, a.tag + "_tiny"
    a.extra = json.loads(a.extra) if a.extra else {}
    known = {**CANDIDATES, **a.extra}
    a.names = [n for n in a.candidates.split(",") if n] + [n for n in a.extra if n not in a.candidates.split(",")]
    unknown = [n for n in a.names if n not in known]
    if unknown:
        raise ValueError(f"unknown candidates {unknown}; expected names from {list(known)}")
    a.flags = {n: ({**TINY_FLAGS, **known[n]} if a.tiny else dict(known[n])) for n in a.names}
    return a


def as_argv(flags: dict[str, object]) -> list[str]:
    return [f"--{key}={value}" for key, value in flags.items()]


def step_seconds(flags: dict[str, object], steps: int = 30, warmup: int = 3) -> tuple[float, float]:
    """(mean seconds per optimizer step over ``steps`` steps, million parameters) of the candidate, timed in this
    process like the script's step: forward, backward, clipping, AdamW and the EMA update. The mean, not the median:
    a step's cost varies with the number of masked rows it draws, and the run's length is the sum."""
    cfg = parse_config(as_argv(flags))
    tokenizer, train_blocks, _ = prepare_data(cfg)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, tokenizer).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, betas=(0.9, 0.98))
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    loader = iter(torch.utils.data.DataLoader(train_blocks, batch_size=cfg.batch_size, shuffle=True, drop_last=True))
    for step in range(warmup + steps):
        if step == warmup:
            start = time.perf_counter()
        batch = next(loader)
        model(batch["input_ids"], attention_mask=batch["attention_mask"]).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(model)
    return (time.perf_counter() - start) / steps, model.num_parameters() / 1e6


def run_pretrain(flags: dict[str, object], max_steps: int, output_dir: Path) -> dict:
    """Run examples/pretrain.py; returns its logged training seconds and the subprocess's wall seconds."""
    argv = as_argv({**flags, "max_steps": max_steps, "eval_every": max_steps, "checkpoint_every": max_steps,
                    "keep_checkpoints": 1, "num_samples": 1, "sample_tokens": 16, "report_to": "jsonl",
                    "output_dir": output_dir, "overwrite_output_dir": True})  # fmt: skip
    if max_steps < 1000:  # short runs (the screen): warm up for the same tenth of every candidate's run
        argv.append(f"--warmup_steps={min(100, max_steps // 10)}")
    start = time.time()
    subprocess.run([sys.executable, str(REPO / "examples" / "pretrain.py"), *argv], check=True, cwd=REPO)
    wall = time.time() - start
    logged = [json.loads(line) for path in output_dir.rglob("metrics.jsonl") for line in path.read_text().splitlines()]
    seconds = max(r["train/seconds"] for r in logged if "train/seconds" in r)
    script_ppl = [r["val/ppl_bound"] for r in logged if "val/ppl_bound" in r][-1]
    return {"train_seconds": seconds, "wall_seconds": wall, "script_ppl_bound": script_ppl}


@torch.no_grad()
def common_evaluation(flags: dict[str, object], final: Path, a: argparse.Namespace) -> dict:
    """Per-block valid-bound NELBO (nats) and token counts of ``final/`` on the first ``eval_blocks`` held-out
    blocks, with seeds that depend on the block only."""
    cfg = parse_config(as_argv(flags))
    _, val_docs = load_corpus(cfg)
    tokenizer = AutoTokenizer.from_pretrained(final)
    blocks = tokenize_blocks(val_docs, tokenizer, cfg)
    blocks = blocks.select(range(min(a.eval_blocks, len(blocks))))
    ids = torch.stack([torch.as_tensor(r["input_ids"]) for r in blocks])
    mask = torch.stack([torch.as_tensor(r["attention_mask"]) for r in blocks])
    model = AutoModel.from_pretrained(final, trust_remote_code=True).eval()
    nll, tokens = [], []
    for start in range(0, len(ids), 32):
        out = model.nll_bound(
            ids[start : start + 32], attention_mask=mask[start : start + 32], num_time_samples=a.num_time_samples,
            generator=torch.Generator().manual_seed(start),
        )  # fmt: skip
        nll += out.nll.tolist()
        tokens += out.num_tokens.tolist()
    return {"block_nll": nll, "block_tokens": tokens}


def summarise(results: dict) -> None:
    """Adds ppl ± s.e. (ratio estimator over blocks) and the paired difference to the first candidate."""
    names = list(results["runs"])
    base = results["runs"][names[0]]
    for name in names:
        run = results["runs"][name]
        nll, tok = torch.tensor(run["block_nll"], dtype=torch.float64), torch.tensor(run["block_tokens"]).double()
        per_token = float(nll.sum() / tok.sum())
        # Standard error of a ratio of sums over n blocks (delta method).
        resid = (nll - per_token * tok) / tok.mean()
        se = float(resid.std() / math.sqrt(len(nll)))
        run.update(nelbo=per_token, nelbo_se=se, ppl_bound=math.exp(per_token))
        if run["block_tokens"] == base["block_tokens"] and name != names[0]:
            b_nll = torch.tensor(base["block_nll"], dtype=torch.float64)
            diff = (nll - b_nll) / tok.mean()
            run.update(delta_nelbo=float((nll - b_nll).sum() / tok.sum()),
                       delta_se=float(diff.std() / math.sqrt(len(nll))))  # fmt: skip
        else:
            run.update(delta_nelbo=None, delta_se=None)


def render_markdown(results: dict) -> str:
    lines = [
        f"Training budget {results['budget']:.0f} s per candidate unless its flags fix the steps ('train s' is what "
        f"each run took) on {results['machine']}; common evaluation: {results['eval_blocks']} held-out blocks × "
        f"{results['time_samples']} time samples (valid bound, EMA weights as saved). Δ is paired against the first "
        "row over the same blocks (negative = better); its ± is the evaluation's Monte-Carlo error only, not the "
        "run-to-run spread of training.",
        "",
        "| candidate | params | s/step | steps | train s | valid-bound ppl | Δ nats/token vs first "
        "| script's own ppl |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results["runs"].items():
        delta = "—" if r["delta_nelbo"] is None else f"{r['delta_nelbo']:+.4f} ± {r['delta_se']:.4f}"
        if r["delta_nelbo"] is None and name != next(iter(results["runs"])):
            delta = "other blocks"
        lines.append(
            f"| {name} | {r['params_m']:.2f}M | {r['step_seconds']:.3f} | {r['max_steps']} | {r['train_seconds']:.0f} "
            f"| ≤ {r['ppl_bound']:.2f} ± {r['ppl_bound'] * r['nelbo_se']:.2f} | {delta} | {r['script_ppl_bound']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    names = list(runs)
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(names) + 1.2))
    y = range(len(names))
    ax.errorbar([runs[n]["ppl_bound"] for n in names], list(y),
                xerr=[runs[n]["ppl_bound"] * runs[n]["nelbo_se"] for n in names], fmt="o", capsize=3)  # fmt: skip
    ax.axvline(runs[names[0]]["ppl_bound"], color="grey", lw=0.8, ls="--")
    ax.set_yticks(list(y), names)
    ax.invert_yaxis()
    ax.set_xlabel("held-out valid-bound perplexity (lower is better; ± 1 s.e. over blocks)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def rerender(path: Path) -> None:
    """Rewrite the table and plot of a results JSON (e.g. after changing the rendering)."""
    results = json.loads(path.read_text())
    summarise(results)
    path.with_suffix(".md").write_text(render_markdown(results))
    plot(results, path.with_suffix(".png"))


def main(argv=None) -> dict:
    a = parse_args(argv)
    a.output_dir.mkdir(parents=True, exist_ok=True)
    results = {"budget": a.budget, "eval_blocks": a.eval_blocks, "time_samples": a.num_time_samples,
               "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}",
               "runs": {}}  # fmt: skip
    for name in a.names:
        flags = dict(a.flags[name])
        seconds, params = step_seconds(flags)
        # A candidate may fix its own step count, e.g. from a screen's measured seconds per step in the script
        # (which adds the loader, EMA and logging to the step timed here).
        max_steps = int(flags.pop("max_steps", 0)) or max(2, int(a.budget / seconds))
        print(f"[{name}] {params:.2f}M parameters, {seconds:.3f} s/step -> {max_steps} steps", flush=True)
        run_dir = a.run_dir / "".join(c if c.isalnum() else "_" for c in name)
        run = run_pretrain(flags, max_steps, run_dir)
        run.update(common_evaluation(flags, run_dir / "final", a))
        run.update(flags=flags, step_seconds=seconds, params_m=params, max_steps=max_steps)
        results["runs"][name] = run
        summarise(results)
        print(
            f"[{name}] {run['train_seconds']:.0f} s of training: valid-bound ppl <= {run['ppl_bound']:.2f}", flush=True
        )
        (a.output_dir / f"{a.tag}.json").write_text(json.dumps(results, indent=1))
    table = render_markdown(results)
    (a.output_dir / f"{a.tag}.md").write_text(table)
    plot(results, a.output_dir / f"{a.tag}.png")
    print(table)
    return results


if __name__ == "__main__":
    main()
