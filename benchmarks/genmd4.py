"""MD4 against GenMD4 (method.md §2) on the bundled Shakespeare corpus, at equal optimiser steps and at equal network
evaluations.

Both models have the same transformer, tokenizer, data order, optimiser and learning-rate schedule, and both are
time conditioned (GenMD4 needs it; MD4 gets it too so that the comparison isolates the schedule):
- MD4: linear schedule (α_t = 1 - t), trained on the count estimator, for N steps and (separately, with its own
  learning-rate schedule) for 2N steps;
- GenMD4: learnable per-token powers (α_{t,i} = 1 - t^{w_i}), REINFORCE leave-one-out gradient, N steps. Each step
  scores two masks per sequence, so N GenMD4 steps cost as many network evaluations as 2N MD4 steps.
For every checkpoint it reports the held-out valid-bound perplexity (``nll_bound``, K time samples per block; an
upper bound on the true perplexity) with the standard error of the per-token NELBO, and for GenMD4 the learned
powers of frequent and rare tokens (PNG: powers against training frequency). Writes JSON + PNG to
benchmarks/results/ and prints a markdown table.

    python benchmarks/genmd4.py           # the committed results (about 10 minutes on 2 CPU cores)
    python benchmarks/genmd4.py --tiny    # a seconds-long smoke configuration
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import get_scheduler

from modeling_mdm_prime import MDMPrimeForMaskedDiffusion
from modeling_mdm_prime.tools.cli import add_common_arguments, add_sized_arguments, sized_defaults
from modeling_mdm_prime.tools.data import DataConfig, build_tokenizer, load_corpus, tokenize_blocks
from modeling_mdm_prime.tools.training import optimizer_groups, plot_powers, text_model_config

REPO = Path(__file__).resolve().parents[1]

FULL = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, seq_len=128, bpe_vocab_size=1024,
            batch_size=16, max_steps=500, learning_rate=2e-3, eval_blocks=64, num_time_samples=8,
            max_documents=None)  # fmt: skip
TINY = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, seq_len=32, bpe_vocab_size=300, batch_size=4,
            max_steps=4, learning_rate=2e-3, eval_blocks=4, num_time_samples=2, max_documents=6)  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(p, REPO / "benchmarks" / "results", "seed of data order, initialisation and sampling")
    add_sized_arguments(p, FULL, TINY)
    return sized_defaults(p.parse_args(argv), FULL, TINY)


def build(schedule: str, a: argparse.Namespace, tokenizer):
    torch.manual_seed(a.seed)  # the same initial network for both models
    config = text_model_config(
        tokenizer, a.seq_len, num_sub_tokens=1, hidden_size=a.hidden_size, num_hidden_layers=a.num_hidden_layers,
        num_attention_heads=a.num_attention_heads, intermediate_size=4 * a.hidden_size, time_conditioning=True,
        noise_schedule=schedule,
    )  # fmt: skip
    return MDMPrimeForMaskedDiffusion(config)


@torch.no_grad()
def held_out(model, blocks: torch.Tensor, a: argparse.Namespace) -> dict:
    """Valid-bound NELBO per token with its standard error (independent blocks: variances add)."""
    model.eval()
    nll = var = tokens = 0.0
    for i, b in enumerate(blocks.split(a.batch_size)):
        out = model.nll_bound(
            b, num_time_samples=a.num_time_samples, generator=torch.Generator().manual_seed(a.seed + i)
        )
        nll, var = nll + out.nll.sum().item(), var + out.nll_stderr.pow(2).sum().item()
        tokens += out.num_tokens.sum().item()
    model.train()
    nelbo, stderr = nll / tokens, math.sqrt(var) / tokens
    return {
        "nelbo_per_token": nelbo,
        "nelbo_stderr": stderr,
        "ppl_bound": math.exp(nelbo),
        # exp is monotone: the interval nelbo ± 2 stderr maps to a perplexity interval
        "ppl_bound_low": math.exp(nelbo - 2 * stderr),
        "ppl_bound_high": math.exp(nelbo + 2 * stderr),
    }


def train(model, name: str, steps: int, evaluate_at: list[int], train_blocks, val_blocks, a) -> list[dict]:
    """One loop for both models (same data order, optimiser and cosine schedule over ``steps``)."""
    optimizer = torch.optim.AdamW(optimizer_groups(model, weight_decay=0.0), lr=a.learning_rate, betas=(0.9, 0.98))
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=max(1, steps // 15), num_training_steps=steps)
    order = torch.Generator().manual_seed(a.seed)
    torch.manual_seed(a.seed)
    model.train()
    rows, step, start, evaluations = [], 0, time.perf_counter(), 0
    copies = 2 if model.state_dependent else 1  # masks scored per sequence and step
    bar = tqdm(total=steps, desc=f"training {name}", leave=False)
    while step < steps:
        for idx in torch.randperm(len(train_blocks), generator=order).split(a.batch_size):
            if len(idx) < a.batch_size or step >= steps:
                continue
            out = model(train_blocks[idx])
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step(), scheduler.step(), optimizer.zero_grad(set_to_none=True)
            step += 1
            evaluations += copies * a.batch_size
            bar.update()
            if step in evaluate_at:
                seconds = time.perf_counter() - start
                row = {"model": name, "steps": step, "sequence_evaluations": evaluations, "train_seconds": seconds}
                row |= held_out(model, val_blocks, a)
                if model.state_dependent:
                    w = model.powers.detach()
                    row |= {"power_max": float(w.max()), "power_min": float(w.min()), "power_mean": float(w.mean())}
                rows.append(row)
                start = time.perf_counter() - seconds  # evaluation time is not training time
    bar.close()
    model.eval()
    return rows


def power_summary(powers: torch.Tensor, counts: torch.Tensor) -> dict:
    """Mean learned power of the 50 most frequent tokens, of rare seen tokens (the least frequent 25 % of seen
    tokens) and of tokens never seen in training; and the rank correlation of power with frequency (seen tokens)."""
    seen = counts > 0
    order = torch.argsort(counts, descending=True)
    frequent = order[:50]
    seen_ids = order[: int(seen.sum())]
    rare = seen_ids[-max(1, len(seen_ids) // 4) :]

    def ranks(x: torch.Tensor) -> torch.Tensor:
        return torch.argsort(torch.argsort(x)).double()

    rp, rc = ranks(powers[seen].double()), ranks(counts[seen].double())
    spearman = float(((rp - rp.mean()) * (rc - rc.mean())).sum() / (rp.std() * rc.std() * (len(rp) - 1)))
    return {
        "frequent_50_mean_power": float(powers[frequent].mean()),
        "rare_seen_mean_power": float(powers[rare].mean()),
        "unseen_mean_power": float(powers[~seen].mean()) if bool((~seen).any()) else None,
        "unseen_tokens": int((~seen).sum()),
        "spearman_power_vs_frequency": spearman,
    }


def render_markdown(results: dict) -> str:
    c = results["config"]
    lines = [
        f"MD4 (linear) vs GenMD4, both time conditioned: hidden {c['hidden_size']}, {c['num_hidden_layers']} layers, "
        f"L = {c['seq_len']}, BPE {c['bpe_vocab_size']}, batch {c['batch_size']}; {c['eval_blocks']} held-out blocks × "
        f"{c['num_time_samples']} time samples. Perplexities are valid upper bounds; ± is 2 standard errors of the "
        "per-token NELBO.",
        "",
        "| model | optimiser steps | sequence evaluations | NELBO (nats/token) | ppl bound | train s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in results["rows"]:
        lines.append(
            f"| {row['model']} | {row['steps']} | {row['sequence_evaluations']:,} | {row['nelbo_per_token']:.4f} ± "
            f"{2 * row['nelbo_stderr']:.4f} | {row['ppl_bound']:.2f} | {row['train_seconds']:.0f} |"
        )
    p = results["powers"]
    lines += [
        "",
        f"GenMD4 learned powers: 50 most frequent tokens {p['frequent_50_mean_power']:.3f}, rare seen tokens "
        f"{p['rare_seen_mean_power']:.3f}, unseen tokens ({p['unseen_tokens']}) "
        f"{p['unseen_mean_power'] if p['unseen_mean_power'] is None else round(p['unseen_mean_power'], 3)}; "
        f"Spearman(power, frequency) = {p['spearman_power_vs_frequency']:.3f}.",
    ]
    return "\n".join(lines)


def main(argv=None) -> dict:
    a = parse_args(argv)
    a.output_dir.mkdir(parents=True, exist_ok=True)
    prefix = "genmd4_tiny" if a.tiny else "genmd4"
    data_cfg = DataConfig(
        seq_len=a.seq_len, bpe_vocab_size=a.bpe_vocab_size, max_documents=a.max_documents, seed=a.seed
    )
    train_docs, val_docs = load_corpus(data_cfg)
    tokenizer = build_tokenizer(data_cfg, train_docs)
    train_table = tokenize_blocks(train_docs, tokenizer, data_cfg)[:]
    train_blocks = torch.as_tensor(train_table["input_ids"])
    val_blocks = torch.as_tensor(tokenize_blocks(val_docs, tokenizer, data_cfg)[:]["input_ids"][: a.eval_blocks])
    real = torch.as_tensor(train_table["attention_mask"]).bool()
    counts = torch.bincount(train_blocks[real], minlength=len(tokenizer))
    results = {
        "config": vars(a) | {"output_dir": str(a.output_dir)},
        "environment": {"torch": torch.__version__, "machine": platform.machine(), "threads": torch.get_num_threads()},
    }
    rows = []
    for steps in (a.max_steps, 2 * a.max_steps):  # each run completes its own cosine schedule
        md4 = build("linear", a, tokenizer)
        rows += train(md4, "MD4 (linear)", steps, [steps], train_blocks, val_blocks, a)
    genmd4 = build("learnable_polynomial", a, tokenizer)
    rows += train(genmd4, "GenMD4", a.max_steps, [a.max_steps], train_blocks, val_blocks, a)
    results["rows"] = rows
    powers = genmd4.powers.detach()
    results["powers"] = power_summary(powers, counts)
    results["per_token"] = {"powers": powers.tolist(), "counts": counts.tolist()}
    plot_powers(powers, counts, a.output_dir / f"{prefix}_powers.png", title=f"GenMD4 after {a.max_steps} steps")
    by = {(r["model"], r["steps"]): r for r in rows}
    g, same_steps, same_evals = (
        by[("GenMD4", a.max_steps)],
        by[("MD4 (linear)", a.max_steps)],
        by[("MD4 (linear)", 2 * a.max_steps)],
    )
    for key, ref in (("equal_steps", same_steps), ("equal_evaluations", same_evals)):
        diff = g["nelbo_per_token"] - ref["nelbo_per_token"]
        se = math.hypot(g["nelbo_stderr"], ref["nelbo_stderr"])
        results[key] = {"genmd4_minus_md4_nelbo": diff, "stderr": se, "z": diff / se if se > 0 else None}
    (a.output_dir / f"{prefix}.json").write_text(json.dumps(results, indent=2))
    table = render_markdown(results)
    (a.output_dir / f"{prefix}.md").write_text(table + "\n")
    print(table)
    for key in ("equal_steps", "equal_evaluations"):
        r = results[key]
        print(f"{key}: GenMD4 - MD4 = {r['genmd4_minus_md4_nelbo']:+.4f} ± {r['stderr']:.4f} nats/token")
    return results


if __name__ == "__main__":
    main()
