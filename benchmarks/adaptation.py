"""Adapting SmolLM2-135M into MDM-Prime: which recipe gets closest to the AR source per training minute.

Runs ``examples/adapt_causal_lm.py`` (a subprocess each, the real script) for every variant with the same data,
steps and seed, and collects each run's ``adaptation.json``: the held-out and out-of-domain comparison against the
source at step 0 and every ``--eval_every`` steps. The source's AR perplexity is exact; the adapted models' numbers
are valid upper bounds (``nll_bound`` on the same tokens, given the first), ± 2 Monte-Carlo standard errors.

    python benchmarks/adaptation.py                     # every variant (about 12 minutes each on 2 CPU cores)
    python benchmarks/adaptation.py --variants l1_flip,l2_flip --max_steps 400 --mixed_precision bf16   # a GPU
    python benchmarks/adaptation.py --tiny              # a smoke run on a tiny random Llama (seconds)
    python benchmarks/adaptation.py --variants l2_flip --max_steps 520 --eval_every 130 --tag adaptation_long --append

Writes ``adaptation[_tiny].json``, ``.md`` (the table docs/guides/adaptation.md shows) and ``.png`` (perplexity
against training minutes) to ``--output_dir``; the runs' checkpoints stay in ``--work_dir``.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from modeling_mdm_prime.tools.cli import option_strings

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {
    "l1_flip": ("ℓ = 1, bidirectional at once (RND1)", ["--num_sub_tokens", "1"]),
    "l1_anneal": ("ℓ = 1, attention annealed over half the run (DiffuGPT)", ["--num_sub_tokens", "1", "--anneal"]),
    "l1_distill": ("ℓ = 1, flip + distillation from the source (λ = 1)", ["--num_sub_tokens", "1",
                                                                          "--distill_weight", "1.0"]),
    "l2_flip": ("ℓ = 2 (b = 222), bidirectional at once", ["--num_sub_tokens", "2"]),
    "l1_scratch": ("ℓ = 1, same architecture from random weights", ["--num_sub_tokens", "1", "--random_init"]),
}  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {list(VARIANTS)}")
    p.add_argument("--source", default="smollm2", help="SOURCE of examples/adapt_causal_lm.py")
    p.add_argument(*option_strings("max_steps"), type=int, default=100, help="optimizer steps per variant")
    p.add_argument(*option_strings("eval_every"), type=int, default=25, help="comparison every N steps")
    p.add_argument(*option_strings("eval_blocks"), type=int, default=8, help="held-out blocks per evaluation set")
    p.add_argument(*option_strings("batch_size"), type=int, default=8, help="blocks per step")
    p.add_argument(*option_strings("mixed_precision"), default="no", help="'no' or 'bf16' (GPU)")
    p.add_argument("--seed", type=int, default=0, help="seed of data order, masks and evaluation draws")
    p.add_argument("--tiny", action="store_true", help="a smoke run on a tiny random Llama")
    p.add_argument("--tag", default=None, help="file name of the results (default: adaptation, adaptation_tiny)")
    p.add_argument("--append", action="store_true",
                   help="add these variants to the tag's existing results (same source, steps, blocks and seed), "
                        "keeping the runs already there")  # fmt: skip
    p.add_argument(*option_strings("work_dir"), type=Path, default=REPO / "outputs" / "benchmark_adaptation",
                   help="where the runs' checkpoints go")  # fmt: skip
    p.add_argument(*option_strings("output_dir"), type=Path, default=REPO / "benchmarks" / "results",
                   help="where the JSON, table and plot go")  # fmt: skip
    return p.parse_args(argv)


def tiny_source(folder: Path) -> str:
    """A saved 2-layer random Llama with the committed GPT-2 tokenizer (for --tiny)."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    sys.path.insert(0, str(REPO / "tests"))
    from conftest import GPT2_TOKENIZER

    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(GPT2_TOKENIZER), eos_token="<|endoftext|>")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def run_variant(name: str, a: argparse.Namespace, source: str) -> dict:
    label, flags = VARIANTS[name]
    if "--anneal" in flags:
        flags = [f for f in flags if f != "--anneal"] + ["--annealing_steps", str(max(1, a.max_steps // 2))]
    out = a.work_dir / name
    command = [sys.executable, str(REPO / "examples" / "adapt_causal_lm.py"), source, str(out), *flags,
               "--max_steps", str(a.max_steps), "--eval_every", str(a.eval_every), "--eval_blocks", str(a.eval_blocks),
               "--batch_size", str(a.batch_size), "--mixed_precision", a.mixed_precision, "--seed", str(a.seed),
               "--overwrite_output_dir"]  # fmt: skip
    if a.tiny:
        command += ["--seq_len", "32", "--max_documents", "8", "--eval_time_samples", "2"]
    start = time.time()
    subprocess.run(command, check=True, cwd=REPO)
    report = json.loads((out / "adaptation.json").read_text())
    return {"label": label, "wall_seconds": time.time() - start, **report}


def render_markdown(results: dict) -> str:
    """The table docs/guides/adaptation.md shows (a test checks the page against the committed JSON)."""
    c = results["config"]
    seq_len = next(iter(results["runs"].values()))["config"]["seq_len"]
    lines = [
        f"{c['source']}, {c['max_steps']} steps × {c['batch_size']} blocks of {seq_len} tokens of the bundled plays, "
        f"{results['environment']['device']}. Perplexities over {c['eval_blocks']} blocks per set, the tokens after "
        "each block's first: the source's exact AR perplexity against the adapted models' valid upper bound ± 2 s.e.",
        "",
        "| variant | train min | held-out ppl (source AR) | held-out bound at 0 → end | out-of-domain (source AR) "
        "| out-of-domain bound at 0 → end |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for run in results["runs"].values():
        first, last = run["evals"][0], run["evals"][-1]
        cells = []
        for name in ("held_out", "out_of_domain"):
            a, b = first[name], last[name]
            spread = 2 * b["nelbo_stderr"] * b["ppl_bound"]
            cells += [f"{b['source_ppl']:.2f}", f"≤ {a['ppl_bound']:,.0f} → ≤ {b['ppl_bound']:.1f} ± {spread:.1f}"]
        lines.append(f"| {run['label']} | {last['train_seconds'] / 60:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=False)
    for ax, name, title in zip(axes, ("held_out", "out_of_domain"), ("held-out plays", "out of domain"), strict=True):
        source = None
        for run in results["runs"].values():
            minutes = [e["train_seconds"] / 60 for e in run["evals"]]
            bounds = [e[name]["ppl_bound"] for e in run["evals"]]
            ax.plot(minutes, bounds, marker="o", label=run["label"])
            source = run["evals"][0][name]["source_ppl"]
        ax.axhline(source, color="black", ls="--", lw=1, label="AR source (exact)")
        ax.set_yscale("log")
        ax.set_xlabel("training minutes")
        ax.set_ylabel("perplexity (adapted: valid upper bound)")
        ax.set_title(title)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# What makes two runs comparable in one table: the same source, data budget, evaluation and seed.
SHARED = ("source", "max_steps", "eval_every", "eval_blocks", "batch_size", "mixed_precision", "seed", "tiny")


def previous_runs(path: Path, config: dict, environment: dict) -> dict:
    """The runs of an earlier results file that ``--append`` may keep; refuses one measured differently."""
    if not path.exists():
        raise ValueError(f"--append: {path} does not exist; run without --append first")
    earlier = json.loads(path.read_text())
    differing = {k: (earlier["config"].get(k), config[k]) for k in SHARED if earlier["config"].get(k) != config[k]}
    if earlier["environment"]["device"] != environment["device"]:
        differing["device"] = (earlier["environment"]["device"], environment["device"])
    if differing:
        raise ValueError(f"--append: {path} was measured with other settings (earlier, now): {differing}")
    return earlier["runs"]


def main(argv=None) -> dict:
    a = parse_args(argv)
    names = [n for n in a.variants.split(",") if n]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        raise ValueError(f"unknown variants {unknown}; expected names from {list(VARIANTS)}")
    a.work_dir.mkdir(parents=True, exist_ok=True)
    a.output_dir.mkdir(parents=True, exist_ok=True)
    prefix = a.output_dir / (a.tag or ("adaptation_tiny" if a.tiny else "adaptation"))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{platform.machine()} CPU"
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()} | {
        "source": "a tiny random Llama" if a.tiny else a.source
    }
    environment = {"torch": torch.__version__, "device": device, "threads": torch.get_num_threads()}
    runs = previous_runs(prefix.with_suffix(".json"), config, environment) if a.append else {}
    source = tiny_source(a.work_dir / "tiny_source") if a.tiny else a.source
    for name in names:
        runs[name] = run_variant(name, a, source)
    config["variants"] = ",".join(runs)
    results = {"config": config, "environment": environment, "runs": runs}
    prefix.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    prefix.with_suffix(".md").write_text(render_markdown(results) + "\n")
    plot(results, prefix.with_suffix(".png"))
    print(render_markdown(results))
    return results


if __name__ == "__main__":
    main()
