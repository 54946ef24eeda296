"""MDM-Prime's Table 1 at small scale: an autoregressive baseline, MDM (ℓ = 1) and MDM-Prime (ℓ = 2, 4) trained on
the bundled Shakespeare corpus with the same tokenizer, data order, optimiser and number of steps.

For every model it reports, on the same held-out blocks:
- valid-bound perplexity (``nll_bound``, K time samples; an upper bound on the true perplexity),
- paper-objective perplexity (exp of MDM-Prime's loss: NOT a bound on the NLL, method.md §3.4),
- the AR baseline's exact perplexity,
- generative perplexity (scored by the AR baseline through the ``generative_perplexity`` metric module) and
  unigram entropy of unconditional samples at equal NFE (T = L steps), against the number of steps T,
- the idle-step ratio at T = L, measured by running the sampler, next to the closed form (1 - 1/T)^(L·ℓ),
- wall time of training.
Separately it runs the sampler at L = T = 1024 for ℓ in {1, 2, 3, 4, 6, 8} (GPT-2's vocabulary) to reproduce
Table 1's idle-step column. It writes JSON, a markdown table and two PNG plots.

    python benchmarks/reproduce_table1.py            # the committed results (about 25 minutes on 2 CPU cores)
    python benchmarks/reproduce_table1.py --tiny     # a seconds-long smoke configuration (used by the tests)
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import evaluate
import torch
from tqdm.auto import tqdm
from transformers import GPT2Config, GPT2LMHeadModel, get_scheduler

from modeling_mdm_prime import MDMPrimeConfig, MDMPrimeForMaskedDiffusion
from modeling_mdm_prime.tools.cli import add_common_arguments, add_sized_arguments, sized_defaults
from modeling_mdm_prime.tools.data import DataConfig, build_tokenizer, load_corpus, tokenize_blocks
from modeling_mdm_prime.tools.training import text_model_config

REPO = Path(__file__).resolve().parents[1]

METRICS = REPO / "examples" / "metrics"
PAPER_ISR = {1: 36.77, 2: 13.52, 3: 4.97, 4: 1.83, 6: 0.25, 8: 0.03}  # MDM-Prime Table 1, %, L = T = 1024
FULL = dict(
    models="ar,mdm,prime2,prime4", hidden_size=128, num_hidden_layers=4, num_attention_heads=4, seq_len=128,
    bpe_vocab_size=1024, batch_size=16, max_steps=1000, learning_rate=2e-3, eval_blocks=64, num_time_samples=8,
    num_samples=16, sweep="16,32,64,128", isr_length=1024,
    isr_ells="1,2,3,4,6,8", isr_samples=4, max_documents=None,
)  # fmt: skip
HELP = {
    "models": "comma-separated models to train: ar, mdm, prime2, prime4, ...",
    "num_samples": "generated samples per model",
    "sweep": "comma-separated numbers of sampler steps for the quality sweep",
    "isr_length": "sequence length of the idle-step-ratio measurement",
    "isr_ells": "comma-separated ℓ values of the idle-step-ratio measurement",
    "isr_samples": "sequences per ℓ in the idle-step-ratio measurement",
}
TINY = dict(
    models="ar,mdm,prime2", hidden_size=32, num_hidden_layers=1, num_attention_heads=2, seq_len=32,
    bpe_vocab_size=300, batch_size=4, max_steps=8, learning_rate=2e-3,
    eval_blocks=4, num_time_samples=2, num_samples=2, sweep="8,32", isr_length=64, isr_ells="1,2", isr_samples=2,
    max_documents=6,
)  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_arguments(p, REPO / "benchmarks" / "results", "seed of data order, initialisation and sampling")
    add_sized_arguments(p, FULL, TINY, HELP)
    return sized_defaults(p.parse_args(argv), FULL, TINY)


def build(name: str, a: argparse.Namespace, tokenizer) -> torch.nn.Module:
    """``ar`` (GPT-2 architecture), ``mdm`` (ℓ = 1), ``primeN`` (ℓ = N), ``primeN-paper`` (paper loss)."""
    torch.manual_seed(a.seed)
    if name == "ar":
        return GPT2LMHeadModel(
            GPT2Config(
                vocab_size=len(tokenizer), n_positions=a.seq_len, n_embd=a.hidden_size, n_layer=a.num_hidden_layers,
                n_head=a.num_attention_heads, n_inner=4 * a.hidden_size, resid_pdrop=0.0, embd_pdrop=0.0,
                attn_pdrop=0.0,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            )
        )  # fmt: skip
    ell = 1 if name == "mdm" else int(name.removeprefix("prime").removesuffix("-paper"))
    config = text_model_config(
        tokenizer, a.seq_len, num_sub_tokens=ell, hidden_size=a.hidden_size, num_hidden_layers=a.num_hidden_layers,
        num_attention_heads=a.num_attention_heads, intermediate_size=4 * a.hidden_size,
        loss_type="prime" if name.endswith("-paper") else "elbo",
    )  # fmt: skip
    return MDMPrimeForMaskedDiffusion(config)


def train(model, name: str, blocks: torch.Tensor, a: argparse.Namespace) -> dict:
    """The same loop, data order and optimiser for every model; returns the wall time and last losses."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=a.learning_rate, betas=(0.9, 0.98), weight_decay=0.0)
    scheduler = get_scheduler(
        "cosine", optimizer, num_warmup_steps=max(1, a.max_steps // 15), num_training_steps=a.max_steps
    )
    order = torch.Generator().manual_seed(a.seed)
    torch.manual_seed(a.seed)  # the same masks / times for every MDM
    model.train()
    start, losses, step = time.perf_counter(), [], 0
    bar = tqdm(total=a.max_steps, desc=f"training {name}", leave=False)
    while step < a.max_steps:
        for idx in torch.randperm(len(blocks), generator=order).split(a.batch_size):
            if len(idx) < a.batch_size or step >= a.max_steps:
                continue
            batch = blocks[idx]
            loss = model(input_ids=batch, labels=batch).loss if name == "ar" else model(batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step(), scheduler.step(), optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            step += 1
            bar.update()
    bar.close()
    model.eval()
    return {"train_seconds": time.perf_counter() - start, "final_train_loss": sum(losses[-20:]) / len(losses[-20:])}


@torch.no_grad()
def held_out_ppl(model, name: str, blocks: torch.Tensor, a: argparse.Namespace) -> dict:
    if name == "ar":  # exact: tokens 2..L of every block (the first has no context)
        nll = sum(model(input_ids=b, labels=b).loss.item() * b[:, 1:].numel() for b in blocks.split(a.batch_size))
        tokens = blocks[:, 1:].numel()
        return {"ar_ppl": math.exp(nll / tokens), "nelbo_per_token": nll / tokens}
    nll = var = paper = tokens = 0.0
    for i, b in enumerate(blocks.split(a.batch_size)):
        out = model.nll_bound(
            b, num_time_samples=a.num_time_samples, generator=torch.Generator().manual_seed(a.seed + i)
        )
        nll, var = nll + out.nll.sum().item(), var + out.nll_stderr.pow(2).sum().item()
        paper, tokens = paper + out.paper_objective.sum().item(), tokens + out.num_tokens.sum().item()
    return {
        "ppl_bound": math.exp(nll / tokens),
        "nelbo_per_token": nll / tokens,
        "nelbo_stderr": math.sqrt(var) / tokens,
        "paper_objective_ppl": math.exp(paper / tokens),
    }


@torch.no_grad()
def sample_quality(model, name: str, tokenizer, scorer_dir: Path, steps: int, a: argparse.Namespace) -> dict:
    """Unconditional samples of L tokens: generative perplexity under the AR scorer, entropy, NFE, idle steps."""
    if name == "ar":  # L network calls for L tokens; starts from BOS
        bos = torch.full((a.num_samples, 1), tokenizer.bos_token_id)
        torch.manual_seed(a.seed)
        ids = model.generate(
            bos,
            attention_mask=torch.ones_like(bos),
            do_sample=True,
            top_k=0,
            max_new_tokens=a.seq_len - 1,
            pad_token_id=0,
        )[:, 1:]
        nfe, idle = a.seq_len - 1, None
    else:
        out = model.generate(
            max_new_tokens=a.seq_len, num_return_sequences=a.num_samples, num_steps=steps, seed=a.seed,
            return_dict_in_generate=True,
        )  # fmt: skip
        ids, nfe, idle = out.sequences, out.nfe, out.idle_steps.tolist()
    texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
    gen = evaluate.load(str(METRICS / "generative_perplexity")).compute(
        predictions=[t if t.strip() else "." for t in texts], model_id=str(scorer_dir), device="cpu"
    )
    entropy = evaluate.load(str(METRICS / "unigram_entropy")).compute(predictions=ids.tolist())["entropy"]
    result = {"num_steps": steps, "nfe": nfe, "gen_ppl": gen["corpus_perplexity"], "entropy": entropy}
    if idle is not None:
        isr = evaluate.load(str(METRICS / "idle_step_ratio")).compute(
            idle_steps=idle, num_steps=[steps] * len(idle), sequence_length=a.seq_len,
            num_sub_tokens=model.config.num_sub_tokens,
        )  # fmt: skip
        result.update(idle_step_ratio=isr["idle_step_ratio"], expected_idle_step_ratio=isr["expected_idle_step_ratio"])
    result["example"] = texts[0][:200]
    return result


@torch.no_grad()
def idle_steps_at_scale(a: argparse.Namespace) -> list[dict]:
    """Table 1's idle-step column by running generate() at L = T (GPT-2's vocabulary; ISR is model-free)."""
    rows = []
    for ell in [int(x) for x in a.isr_ells.split(",")]:
        torch.manual_seed(a.seed)
        config = MDMPrimeConfig(
            vocab_size=50257, num_sub_tokens=ell, hidden_size=48, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=48, max_position_embeddings=a.isr_length,
        )  # fmt: skip
        model = MDMPrimeForMaskedDiffusion(config).eval()
        start = time.perf_counter()
        out = model.generate(
            max_new_tokens=a.isr_length, num_steps=a.isr_length, num_return_sequences=a.isr_samples, seed=a.seed,
            return_dict_in_generate=True,
        )  # fmt: skip
        isr = evaluate.load(str(METRICS / "idle_step_ratio")).compute(
            idle_steps=out.idle_steps.tolist(), num_steps=[a.isr_length] * a.isr_samples,
            sequence_length=a.isr_length, num_sub_tokens=ell,
        )  # fmt: skip
        rows.append(
            {
                "num_sub_tokens": ell,
                "measured": isr["idle_step_ratio"],
                "stderr": isr["idle_step_ratio_stderr"],
                "closed_form": isr["expected_idle_step_ratio"],
                "paper": PAPER_ISR.get(ell, float("nan")) / 100 if a.isr_length == 1024 else None,
                "nfe": out.nfe,
                "seconds": time.perf_counter() - start,
            }
        )
    return rows


def render_markdown(results: dict) -> str:
    """The tables that README.md shows (a test checks README.md against the committed JSON through this)."""
    c = results["config"]
    lines = [
        f"Shakespeare plays, BPE {c['bpe_vocab_size']}, L = {c['seq_len']}, "
        f"{c['num_hidden_layers']} layers × {c['hidden_size']} wide, "
        f"{c['max_steps']} steps × {c['batch_size']} blocks, {c['eval_blocks']} held-out blocks, "
        f"{c['num_samples']} samples, NFE ≤ T = L.",
        "",
        "| model | params | valid-bound ppl (≥ true) | paper-objective ppl (not a bound) | AR ppl | gen. ppl | "
        "entropy | idle steps at T = L (closed form) | train time |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results["models"].items():
        at_l = r["sweep"][-1]
        bound = f"≤ {r['ppl_bound']:.2f} ± {r['ppl_bound'] * r['nelbo_stderr']:.2f}" if "ppl_bound" in r else "–"
        paper = f"{r['paper_objective_ppl']:.2f}" if "paper_objective_ppl" in r else "–"
        ar = f"{r['ar_ppl']:.2f}" if "ar_ppl" in r else "–"
        isr = (
            f"{100 * at_l['idle_step_ratio']:.1f} % ({100 * at_l['expected_idle_step_ratio']:.1f} %)"
            if "idle_step_ratio" in at_l
            else "–"
        )
        gen = f"{at_l['gen_ppl']:.1f}" + (" (self-scored)" if name == "ar" else "")
        lines.append(
            f"| {r['label']} | {r['params'] / 1e6:.2f}M | {bound} | {paper} | {ar} | {gen} | "
            f"{at_l['entropy']:.2f} | {isr} | {r['train_seconds']:.0f} s |"
        )
    lines += [
        "",
        f"Idle-step ratio at L = T = {c['isr_length']} (sampler run, {c['isr_samples']} samples each):",
        "",
        "| ℓ | measured | closed form (1 − 1/T)^(Lℓ) | paper Table 1 |",
        "|---:|---:|---:|---:|",
    ]
    for r in results["idle_steps_at_scale"]:
        paper = f"{100 * r['paper']:.2f} %" if r["paper"] is not None else "–"
        lines.append(
            f"| {r['num_sub_tokens']} | {100 * r['measured']:.2f} ± {100 * r['stderr']:.2f} % | "
            f"{100 * r['closed_form']:.2f} % | {paper} |"
        )
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, r in results["models"].items():
        if name == "ar":
            for ax, key in zip(axes[:2], ("gen_ppl", "entropy")):
                ax.axhline(r["sweep"][-1][key], color="k", ls=":", label=f"{r['label']} (NFE = L)")
            continue
        steps = [s["num_steps"] for s in r["sweep"]]
        axes[0].plot(steps, [s["gen_ppl"] for s in r["sweep"]], "o-", label=r["label"])
        axes[1].plot(steps, [s["entropy"] for s in r["sweep"]], "o-", label=r["label"])
        line = axes[2].plot(steps, [100 * s["idle_step_ratio"] for s in r["sweep"]], "o", label=r["label"])[0]
        axes[2].plot(steps, [100 * s["expected_idle_step_ratio"] for s in r["sweep"]], "--", color=line.get_color())
    axes[0].set(xscale="log", yscale="log", xlabel="sampling steps T", ylabel="generative perplexity (AR scorer)")
    axes[1].set(xscale="log", xlabel="sampling steps T", ylabel="unigram entropy of samples (nats)")
    axes[2].set(xscale="log", xlabel="sampling steps T", ylabel="idle-step ratio (%)", title="dashed: (1 − 1/T)^(Lℓ)")
    sweep = [s["num_steps"] for r in results["models"].values() for s in r["sweep"]]
    for ax in axes:
        ax.set_xticks(sorted(set(sweep)), [str(t) for t in sorted(set(sweep))])
        ax.minorticks_off()
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    a = parse_args(argv)
    a.output_dir.mkdir(parents=True, exist_ok=True)
    prefix = "table1_tiny" if a.tiny else "table1"
    data_cfg = DataConfig(
        seq_len=a.seq_len, bpe_vocab_size=a.bpe_vocab_size, max_documents=a.max_documents, seed=a.seed
    )
    train_docs, val_docs = load_corpus(data_cfg)
    tokenizer = build_tokenizer(data_cfg, train_docs)
    train_blocks = tokenize_blocks(train_docs, tokenizer, data_cfg)[:]["input_ids"]
    val_blocks = tokenize_blocks(val_docs, tokenizer, data_cfg)[:]["input_ids"][: a.eval_blocks]
    sweep = [int(x) for x in a.sweep.split(",")]
    if sweep[-1] != a.seq_len:
        raise ValueError(f"--sweep must end at T = L = {a.seq_len} (the equal-NFE column), got {a.sweep}.")
    labels = {"ar": "AR (GPT-2 arch.)", "mdm": "MDM (ℓ = 1)"}
    results = {"config": vars(a) | {"output_dir": str(a.output_dir)}, "models": {}}
    results["environment"] = {
        "torch": torch.__version__,
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
    }
    models = a.models.split(",")
    if models[0] != "ar":
        raise ValueError("--models must start with 'ar': the AR baseline scores every model's samples.")
    scorer_dir = a.output_dir / f"{prefix}_scorer"
    for name in models:
        model = build(name, a, tokenizer)
        entry = {
            "label": labels.get(name, f"MDM-Prime (ℓ = {name.removeprefix('prime')})"),
            "params": model.num_parameters(),
        }
        entry |= train(model, name, train_blocks, a)
        entry |= held_out_ppl(model, name, val_blocks, a)
        if name == "ar":  # the generative-perplexity scorer: saved so the metric module loads it like any model
            model.save_pretrained(scorer_dir)
            tokenizer.save_pretrained(scorer_dir)
        entry["sweep"] = [
            sample_quality(model, name, tokenizer, scorer_dir, steps, a)
            for steps in ([a.seq_len] if name == "ar" else sweep)
        ]
        results["models"][name] = entry
        print(f"{entry['label']}: " + ", ".join(f"{k}={v:.4g}" for k, v in entry.items() if isinstance(v, float)))
    results["idle_steps_at_scale"] = idle_steps_at_scale(a)
    (a.output_dir / f"{prefix}.json").write_text(json.dumps(results, indent=2) + "\n")
    table = render_markdown(results)
    (a.output_dir / f"{prefix}.md").write_text(table + "\n")
    plot(results, a.output_dir / f"{prefix}.png")
    print(table)
    return results


if __name__ == "__main__":
    main()
