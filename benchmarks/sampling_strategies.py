"""Sampling strategies side by side: NFE, tokens/s, sample quality and the sampler's own overhead.

Part 1 (quality, the reference checkpoint ``checkpoints/mdm-prime-shakespeare-tiny``: ℓ = 2, C = 2,048, L = 128).
Unconditional samples from every strategy of ``generate()``: ancestral (exact), confidence ordering with each
measure (probability, margin, entropy) at several step budgets T, and threshold decoding (Fast-dLLM) at several
thresholds, where the number of steps adapts. For each: the mean network calls per row (``row_nfe``), tokens/s,
generative perplexity under an autoregressive scorer and the samples' unigram entropy (a low entropy with a
good perplexity means repetitive text). The scorer is a GPT-2-architecture model of the reference checkpoint's
width and depth, trained here on the training plays with the checkpoint's tokenizer (cached under
``benchmarks/results/strategies_scorer``); the held-out plays' own perplexity under it is the row "real text".

Part 2 (overhead): generate()'s wall time against the time spent in the network (``model.token_logits``, timed
inside the same call), at T = L, for each strategy, at two scales: the reference checkpoint (batch 16) and a
randomly initialised model of the papers' width and depth (768 × 12 layers × 12 heads, C = 50,257, ℓ = 2,
L = 128, batch 1). Everything outside the network (consistency filter, log-softmax, draws, confidences, the
loop) counts as overhead.

Run from the repository root:  python benchmarks/sampling_strategies.py        (about 15 minutes on 2 CPU cores)
Smoke test:                    python benchmarks/sampling_strategies.py --tiny
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import evaluate
import torch
import transformers
from tqdm.auto import tqdm
from transformers import AutoModel, AutoTokenizer, GPT2Config, GPT2LMHeadModel, get_scheduler

from modeling_mdm_prime import MDMPrimeConfig, MDMPrimeForMaskedDiffusion, ThresholdStrategy
from modeling_mdm_prime.tools.cli import add_common_arguments, add_sized_arguments, sized_defaults
from modeling_mdm_prime.tools.data import DataConfig, load_corpus, tokenize_blocks

REPO = Path(__file__).resolve().parents[1]
METRICS = REPO / "examples" / "metrics"
REFERENCE = REPO / "checkpoints" / "mdm-prime-shakespeare-tiny"
FULL = dict(num_steps="16,32,64,128", thresholds="probability:0.9,probability:0.7,probability:0.5,margin:0.8,"
            "margin:0.5,entropy:-0.3,entropy:-1.0", num_samples=16, scorer_steps=800, scale_layers=12,
            scale_hidden=768, scale_heads=12, scale_len=128)  # fmt: skip
HELP = {
    "num_steps": "comma-separated numbers of sampler steps (T)",
    "thresholds": "comma-separated confidence thresholds, measure:value",
    "scorer_steps": "training steps of the scoring model",
    "scale_layers": "blocks of the paper-scale timing model",
    "scale_hidden": "width of the paper-scale timing model",
    "scale_heads": "heads of the paper-scale timing model",
    "scale_len": "sequence length of the paper-scale timing",
}
TINY = dict(num_steps="8,16", thresholds="probability:0.7,margin:0.5", num_samples=2, scorer_steps=4,
            scale_layers=1, scale_hidden=64, scale_heads=2, scale_len=16)  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(p, REPO / "benchmarks" / "results", "seed of data order, initialisation and sampling")
    add_sized_arguments(p, FULL, TINY, HELP)
    return sized_defaults(p.parse_args(argv), FULL, TINY)


def settings(a: argparse.Namespace) -> list[dict]:
    """Every (strategy, budget) to run: fixed-step strategies at each T, threshold decoding at each threshold."""
    runs = []
    for steps in [int(x) for x in a.num_steps.split(",")]:
        runs.append({"strategy": "ancestral", "measure": None, "num_steps": steps})
        for measure in ("probability", "margin", "entropy"):
            runs.append({"strategy": "confidence", "measure": measure, "num_steps": steps})
    for item in a.thresholds.split(","):
        measure, value = item.split(":")
        runs.append({"strategy": "threshold", "measure": measure, "threshold": float(value)})
    return runs


def label(run: dict) -> str:
    if run["strategy"] == "ancestral":
        return "ancestral (exact)"
    if run["strategy"] == "confidence":
        return f"confidence / {run['measure']}"
    return f"threshold / {run['measure']} > {run['threshold']:g}"


def train_scorer(tokenizer, train_blocks: torch.Tensor, a: argparse.Namespace, directory: Path, reference) -> Path:
    """A GPT-2-architecture scorer of the reference model's width and depth (cached: trained once)."""
    if (directory / "config.json").exists() and not a.tiny:
        return directory
    c = reference.config
    torch.manual_seed(a.seed)
    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(tokenizer), n_positions=train_blocks.shape[1], n_embd=c.hidden_size,
            n_layer=c.num_hidden_layers, n_head=c.num_attention_heads, n_inner=c.intermediate_size,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        )
    )  # fmt: skip
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.98), weight_decay=0.0)
    scheduler = get_scheduler("cosine", optimizer, max(1, a.scorer_steps // 15), a.scorer_steps)
    order = torch.Generator().manual_seed(a.seed)
    model.train()
    for _ in tqdm(range(a.scorer_steps), desc="training the AR scorer", leave=False):
        batch = train_blocks[torch.randint(len(train_blocks), (16,), generator=order)]
        model(input_ids=batch, labels=batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step(), scheduler.step(), optimizer.zero_grad(set_to_none=True)
    model.eval().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


class NetworkTimer:
    """Wraps ``model.token_logits`` to add up the time spent in the network during a generate() call."""

    def __init__(self, model):
        self.model, self.original, self.seconds = model, model.token_logits, 0.0

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        out = self.original(*args, **kwargs)
        self.seconds += time.perf_counter() - start
        return out

    def __enter__(self):
        self.seconds = 0.0
        self.model.token_logits = self
        return self

    def __exit__(self, *exc):
        del self.model.token_logits


def run_generate(model, run: dict, batch: int, length: int, seed: int) -> tuple[object, float, float]:
    """One generate() call: output, wall seconds, network seconds."""
    kwargs = {"strategy": run["strategy"]}
    if run["strategy"] == "threshold":
        kwargs["strategy"] = ThresholdStrategy(run["threshold"], run["measure"])
    else:
        kwargs["num_steps"] = run["num_steps"]
        if run["measure"]:
            kwargs["confidence_measure"] = run["measure"]
    with NetworkTimer(model) as timer:
        start = time.perf_counter()
        out = model.generate(
            max_new_tokens=length, num_return_sequences=batch, seed=seed, return_dict_in_generate=True, **kwargs
        )
        wall = time.perf_counter() - start
    return out, wall, timer.seconds


@torch.no_grad()
def quality(model, tokenizer, scorer: Path, val_blocks: torch.Tensor, a: argparse.Namespace) -> list[dict]:
    gen_ppl = evaluate.load(str(METRICS / "generative_perplexity"))
    entropy = evaluate.load(str(METRICS / "unigram_entropy"))
    length = model.config.max_position_embeddings
    real = tokenizer.batch_decode(val_blocks[: a.num_samples], skip_special_tokens=True)
    rows = [
        {
            "label": "real text (held-out plays)",
            "gen_ppl": gen_ppl.compute(predictions=real, model_id=str(scorer), device="cpu")["corpus_perplexity"],
            "entropy": entropy.compute(predictions=val_blocks[: a.num_samples].tolist())["entropy"],
        }
    ]
    for run in tqdm(settings(a), desc="strategies", leave=False):
        out, wall, network = run_generate(model, run, a.num_samples, length, a.seed)
        texts = tokenizer.batch_decode(out.sequences, skip_special_tokens=True)
        rows.append(
            run
            | {
                "label": label(run),
                "row_nfe": float(out.row_nfe.double().mean()),
                "row_nfe_range": [int(out.row_nfe.min()), int(out.row_nfe.max())],
                "tokens_per_second": a.num_samples * length / wall,
                "overhead": wall / network - 1,
                "gen_ppl": gen_ppl.compute(
                    predictions=[t if t.strip() else "." for t in texts], model_id=str(scorer), device="cpu"
                )["corpus_perplexity"],
                "entropy": entropy.compute(predictions=out.sequences.tolist())["entropy"],
                "example": texts[0][:160],
            }
        )
    return rows


@torch.no_grad()
def overhead_at_scale(a: argparse.Namespace) -> list[dict]:
    """The same strategies at T = L on a model of the papers' width and depth (random weights, C = 50,257)."""
    torch.manual_seed(a.seed)
    config = MDMPrimeConfig(
        vocab_size=50257, num_sub_tokens=2, hidden_size=a.scale_hidden, num_hidden_layers=a.scale_layers,
        num_attention_heads=a.scale_heads, intermediate_size=4 * a.scale_hidden, max_position_embeddings=a.scale_len,
    )  # fmt: skip
    model = MDMPrimeForMaskedDiffusion(config).eval()
    runs = [
        {"strategy": "ancestral", "measure": None, "num_steps": a.scale_len},
        {"strategy": "confidence", "measure": "probability", "num_steps": a.scale_len},
        {"strategy": "confidence", "measure": "margin", "num_steps": a.scale_len},
        {"strategy": "threshold", "measure": "probability", "threshold": 0.9},
    ]
    rows = []
    for run in tqdm(runs, desc="overhead at the papers' width", leave=False):
        out, wall, network = run_generate(model, run, 1, a.scale_len, a.seed)
        rows.append(run | {"label": label(run), "nfe": out.nfe, "wall": wall, "network": network,
                           "overhead": wall / network - 1})  # fmt: skip
    return rows


def render_markdown(results: dict) -> str:
    lines = [
        "| strategy | T | NFE per row | tokens/s | gen. ppl (AR scorer) | unigram entropy | overhead |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results["quality"]:
        if "row_nfe" not in row:
            lines.append(f"| {row['label']} | – | – | – | {row['gen_ppl']:.1f} | {row['entropy']:.2f} | – |")
            continue
        steps = row.get("num_steps") or "adaptive"
        nfe = f"{row['row_nfe']:.1f}" + (
            f" ({row['row_nfe_range'][0]}–{row['row_nfe_range'][1]})" if row["strategy"] == "threshold" else ""
        )
        lines.append(
            f"| {row['label']} | {steps} | {nfe} | {row['tokens_per_second']:.0f} | {row['gen_ppl']:.1f} | "
            f"{row['entropy']:.2f} | {100 * row['overhead']:+.1f} % |"
        )
    scale = results["config"]
    lines += [
        "",
        f"Sampler overhead at the papers' width ({scale['scale_hidden']} × {scale['scale_layers']} layers, C = 50,257, "
        f"ℓ = 2, L = T = {scale['scale_len']}, batch 1, random weights):",
        "",
        "| strategy | NFE | wall s | network s | overhead |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in results["overhead_at_scale"]:
        lines.append(
            f"| {row['label']} | {row['nfe']} | {row['wall']:.2f} | {row['network']:.2f} | "
            f"{100 * row['overhead']:+.1f} % |"
        )
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    families: dict[str, list[dict]] = {}
    for row in results["quality"]:
        if "row_nfe" in row:
            key = row["label"] if row["strategy"] != "threshold" else f"threshold / {row['measure']}"
            families.setdefault(key, []).append(row)
    real = results["quality"][0]
    for key, rows in families.items():
        rows = sorted(rows, key=lambda r: r["row_nfe"])
        style = "o-" if not key.startswith("threshold") else "s--"
        nfe = [r["row_nfe"] for r in rows]
        axes[0].plot(nfe, [r["gen_ppl"] for r in rows], style, label=key)
        axes[1].plot(nfe, [r["entropy"] for r in rows], style, label=key)
    axes[0].axhline(real["gen_ppl"], color="grey", lw=0.8, ls=":", label="real text")
    axes[1].axhline(real["entropy"], color="grey", lw=0.8, ls=":")
    axes[0].set(xscale="log", yscale="log", xlabel="network calls per sample", ylabel="generative perplexity")
    axes[1].set(xscale="log", xlabel="network calls per sample", ylabel="unigram entropy (nats)")
    ticks = sorted({int(r["num_steps"]) for r in results["quality"] if r.get("num_steps")} | {256})
    for axis in axes:
        axis.set_xticks(ticks, [str(t) for t in ticks])
        axis.minorticks_off()
    axes[0].legend(fontsize=7)
    fig.suptitle("Sampling strategies on the reference checkpoint (ℓ = 2, L = 128)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    a = parse_args(argv)
    a.output_dir.mkdir(parents=True, exist_ok=True)
    prefix = "strategies_tiny" if a.tiny else "strategies"
    model = AutoModel.from_pretrained(REFERENCE).eval()
    tokenizer = AutoTokenizer.from_pretrained(REFERENCE)
    data_cfg = DataConfig(
        seq_len=model.config.max_position_embeddings, seed=a.seed, max_documents=4 if a.tiny else None
    )
    train_docs, val_docs = load_corpus(data_cfg)
    train_blocks = tokenize_blocks(train_docs, tokenizer, data_cfg)[:]["input_ids"]
    val_blocks = tokenize_blocks(val_docs, tokenizer, data_cfg)[:]["input_ids"]
    scorer = train_scorer(tokenizer, train_blocks, a, a.output_dir / f"{prefix}_scorer", model)
    results = {
        "config": vars(a) | {"output_dir": str(a.output_dir)},
        "environment": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "machine": platform.machine(),
            "threads": torch.get_num_threads(),
        },
        "quality": quality(model, tokenizer, scorer, val_blocks, a),
        "overhead_at_scale": overhead_at_scale(a),
    }
    (a.output_dir / f"{prefix}.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    table = render_markdown(results)
    (a.output_dir / f"{prefix}.md").write_text(table + "\n")
    plot(results, a.output_dir / f"{prefix}.png")
    print(table)
    return results


if __name__ == "__main__":
    main()
