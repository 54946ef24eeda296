"""Generation from an adapted model (examples/adapt_causal_lm.py): samples, and quality against network calls.

Prompted continuation of held-out plays (the first ``--prompt_tokens`` tokens of a held-out block, then
``--new_tokens`` generated) for the ancestral sampler, confidence decoding (probability, margin) at each T in
``--num_steps``, and threshold decoding (Fast-dLLM) at each threshold. Quality is the *generative perplexity* of the
generated tokens judged by the AR source itself (exact, given the prompt) and their unigram entropy (low entropy =
repetition); cost is the measured network calls per row (NFE). Also writes fixed-seed samples: continuations and
infilling of the middle of held-out lines.

    python benchmarks/adapted_generation.py --model_name_or_path outputs/benchmark_adaptation/l1_flip
    python benchmarks/adapted_generation.py --tiny   # a random tiny model (seconds)
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import tempfile
import time
from pathlib import Path

import evaluate
import torch
from transformers import AutoModel, AutoTokenizer

from modeling_mdm_prime import ThresholdStrategy
from modeling_mdm_prime.tools.adaptation import load_source, prepare_smollm2
from modeling_mdm_prime.tools.cli import option_strings
from modeling_mdm_prime.tools.data import DataConfig, load_corpus, tokenize_blocks

REPO = Path(__file__).resolve().parents[1]
METRICS = REPO / "examples" / "metrics"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(*option_strings("model_name_or_path"), default=str(REPO / "outputs" / "benchmark_adaptation" /
                   "l1_flip"), help="the adapted checkpoint")  # fmt: skip
    p.add_argument("--source", default="smollm2", help="the AR source that judges the samples (as for the script)")
    p.add_argument(*option_strings("num_samples"), type=int, default=8, help="prompts (one sample each) per setting")
    p.add_argument(*option_strings("prompt_tokens"), type=int, default=16, help="prompt tokens per sample")
    p.add_argument(*option_strings("new_tokens"), type=int, default=48, help="generated tokens per sample")
    p.add_argument(*option_strings("num_steps"), default="8,16,48", help="comma-separated T of fixed-step strategies")
    p.add_argument("--thresholds", default="0.9,0.7,0.5", help="comma-separated probability thresholds")
    p.add_argument("--seed", type=int, default=0, help="seed of prompts and sampling")
    p.add_argument("--tiny", action="store_true", help="smoke configuration")
    p.add_argument("--tag", default=None, help="file name of the results (default: adapted_generation[_tiny])")
    p.add_argument(*option_strings("output_dir"), type=Path, default=REPO / "benchmarks" / "results",
                   help="where the JSON and table go")  # fmt: skip
    return p.parse_args(argv)


def settings(a: argparse.Namespace) -> list[dict]:
    runs = []
    for steps in [int(x) for x in a.num_steps.split(",")]:
        runs.append({"label": "ancestral", "kwargs": {"num_steps": steps}})
        for measure in ("probability", "margin"):
            runs.append({"label": f"confidence / {measure}", "kwargs": {"num_steps": steps, "strategy": "confidence",
                                                                         "confidence_measure": measure}})  # fmt: skip
    for value in [float(x) for x in a.thresholds.split(",")]:
        runs.append({"label": f"threshold / probability > {value:g}", "threshold": value, "kwargs": {}})
    return runs


@torch.no_grad()
def judged_nll(source, sequences: torch.Tensor, prompt_tokens: int) -> float:
    """Mean NLL per generated token under the AR source, given the prompt (nats)."""
    logits = source(input_ids=sequences).logits[:, prompt_tokens - 1 : -1].float()
    targets = sequences[:, prompt_tokens:]
    return -logits.log_softmax(-1).gather(-1, targets[..., None]).mean().item()


@torch.no_grad()
def main(argv=None) -> dict:
    a = parse_args(argv)
    if a.tiny:
        import sys

        sys.path.insert(0, str(REPO / "benchmarks"))
        from adaptation import tiny_source

        from modeling_mdm_prime.tools.adaptation import adapt_causal_lm

        source_dir = tiny_source(Path(tempfile.mkdtemp(prefix="adapted-generation-")) / "source")
        source, tokenizer = load_source(source_dir)
        model = adapt_causal_lm(source, max_position_embeddings=64)
        a.num_samples, a.num_steps, a.thresholds, a.prompt_tokens, a.new_tokens = 2, "4", "0.5", 4, 8
    else:
        model = AutoModel.from_pretrained(a.model_name_or_path, trust_remote_code=True).eval()
        tokenizer = AutoTokenizer.from_pretrained(a.model_name_or_path, trust_remote_code=True)
        source, _ = load_source(prepare_smollm2() if a.source == "smollm2" else a.source)
    tokenizer.bos_token = tokenizer.bos_token or tokenizer.eos_token  # packing puts BOS before each document
    length = a.prompt_tokens + a.new_tokens
    data = DataConfig(seq_len=length, seed=0, max_documents=8 if a.tiny else None)
    _, val_docs = load_corpus(data)
    blocks = torch.stack([row["input_ids"] for row in tokenize_blocks(val_docs, tokenizer, data)])
    pick = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(a.seed))[: a.num_samples]
    real, prompts = blocks[pick], blocks[pick, : a.prompt_tokens]
    entropy = evaluate.load(str(METRICS / "unigram_entropy"))
    rows = [{"label": "real continuation (held-out plays)", "nfe": None,
             "gen_ppl": math.exp(judged_nll(source, real, a.prompt_tokens)),
             "entropy": entropy.compute(predictions=real[:, a.prompt_tokens :].tolist())["entropy"]}]  # fmt: skip
    for run in settings(a):
        kwargs = dict(run["kwargs"])
        if "threshold" in run:
            kwargs["strategy"] = ThresholdStrategy(run["threshold"], "probability")
        start = time.perf_counter()
        out = model.generate(prompts, max_new_tokens=a.new_tokens, seed=a.seed, return_dict_in_generate=True, **kwargs)
        seconds = time.perf_counter() - start
        generated = out.sequences[:, a.prompt_tokens :]
        rows.append({
            "label": run["label"], "num_steps": kwargs.get("num_steps"), "nfe": float(out.row_nfe.double().mean()),
            "gen_ppl": math.exp(judged_nll(source, out.sequences, a.prompt_tokens)),
            "entropy": entropy.compute(predictions=generated.tolist())["entropy"], "seconds": seconds,
            "example": tokenizer.decode(out.sequences[0], skip_special_tokens=True),
        })  # fmt: skip
    samples = samples_of(model, tokenizer, real, a)
    results = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
        "environment": {"torch": torch.__version__, "machine": platform.machine(), "threads": torch.get_num_threads()},
        "rows": rows,
        "samples": samples,
    }
    a.output_dir.mkdir(parents=True, exist_ok=True)
    prefix = a.output_dir / (a.tag or ("adapted_generation_tiny" if a.tiny else "adapted_generation"))
    prefix.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    prefix.with_suffix(".md").write_text(render_markdown(results) + "\n")
    print(render_markdown(results))
    return results


def samples_of(model, tokenizer, real: torch.Tensor, a: argparse.Namespace) -> list[dict]:
    """Fixed-seed samples: a continuation (ancestral, T = new tokens) and an infilling of the middle third."""
    out = []
    for row in range(min(3, len(real))):
        prompt = real[row : row + 1, : a.prompt_tokens]
        continued = model.generate(prompt, max_new_tokens=a.new_tokens, seed=a.seed + row)
        holes = torch.zeros_like(real[row : row + 1], dtype=torch.bool)
        third = real.shape[1] // 3
        holes[:, third : 2 * third] = True
        filled = model.generate(real[row : row + 1], infill_mask=holes, seed=a.seed + row)
        decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        out.append({
            "prompt": decode(prompt[0]), "continuation": decode(continued[0, a.prompt_tokens :]),
            "real_continuation": decode(real[row, a.prompt_tokens :]),
            "infill_left": decode(real[row, :third]), "infill_right": decode(real[row, 2 * third :]),
            "infill_generated": decode(filled[0, third : 2 * third]),
            "infill_real": decode(real[row, third : 2 * third]),
        })  # fmt: skip
    return out


def render_markdown(results: dict) -> str:
    c = results["config"]
    lines = [
        f"Continuations of {c['num_samples']} held-out prompts ({c['prompt_tokens']} tokens, {c['new_tokens']} "
        "generated), judged by the AR source (generative perplexity of the generated tokens given the prompt).",
        "",
        "| strategy | T | NFE per row | gen. ppl (source) | unigram entropy |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in results["rows"]:
        steps = row.get("num_steps") or ("–" if row["nfe"] is None else "adaptive")
        nfe = "–" if row["nfe"] is None else f"{row['nfe']:.1f}"
        lines.append(f"| {row['label']} | {steps} | {nfe} | {row['gen_ppl']:.1f} | {row['entropy']:.2f} |")
    lines += ["", "Samples (fixed seeds; ancestral, T = number of new tokens):", ""]
    for s in results["samples"]:
        lines += [
            f"- prompt: `{s['prompt']!r}`",
            f"  - generated: `{s['continuation']!r}`",
            f"  - real: `{s['real_continuation']!r}`",
            f"  - infill: `{s['infill_left']!r}` **[{s['infill_generated']!r}]** `{s['infill_right']!r}` "
            f"(real middle: `{s['infill_real']!r}`)",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
