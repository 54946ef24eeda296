"""Pretrain an MDM-Prime / MD4 model with Accelerate (one process, DDP, FSDP or DeepSpeed; CPU or GPU).

With no arguments it trains a small MDM-Prime on the Shakespeare plays bundled in modeling_mdm_prime/corpora (public
domain), in about 6 minutes on 2 CPU cores, and leaves a checkpoint that loads with
``AutoModel.from_pretrained(dir, trust_remote_code=True)``. The default size and step count are the best valid bound
per CPU-minute that ``benchmarks/default_budget.py`` found (2 layers of width 192 for 2,300 steps).

    python examples/pretrain.py                                        # the embedded default
    python examples/pretrain.py --num_sub_tokens 4 --max_steps 20000   # flags, or one JSON/YAML config file
    accelerate launch --multi_gpu --num_processes 2 examples/pretrain.py --tokenizer gpt2-tokenizer-dir
    python examples/pretrain.py --resume_from_checkpoint latest        # exact resume, or an error saying why not
    python examples/pretrain.py --noise_schedule learnable_polynomial  # GenMD4 (ℓ = 1, time conditioned)

The corpus, tokenizer and packing code is in ``modeling_mdm_prime.tools.data``. Checkpoints hold accelerate's model,
optimizer and RNG files plus this script's own state as JSON and safetensors (scheduler, EMA, settings); resuming
never unpickles anything beyond tensors (``torch.load(weights_only=True)``; FSDP and DeepSpeed states, which need
full unpickling, only with ``--allow_unsafe_pickle``) and refuses what would not continue the run exactly unless
``--allow_inexact_resume`` / ``--allow_changed_settings`` say otherwise.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

from modeling_mdm_prime import MDMPrimeForMaskedDiffusion, make_tokenizer_portable
from modeling_mdm_prime.tools import training
from modeling_mdm_prime.tools.data import (  # noqa: F401 - re-exported for scripts that import them from here
    BUNDLED_CORPUS,
    DataConfig,
    build_tokenizer,
    load_corpus,
    read_documents,
    tokenize_blocks,
)
from modeling_mdm_prime.tools.training import (  # noqa: F401 - the run machinery, shared with train_images.py
    EMA,
    EMA_FILE,
    MODEL_FILE,
    OPTIMIZER_FILE,
    STATE_FILE,
    JSONLTracker,
    checkpoint_dirs,
    find_checkpoint,
    optimizer_groups,
    plot_powers,
    record_settings,
    run_settings,
    save_checkpoint,
    text_model_config,
    token_frequencies,
    write_atomic,
)

logger = get_logger("pretrain")
# Settings that do not change the trained weights: they may differ between a run and its resumption.
NEUTRAL_SETTINGS = training.NEUTRAL_SETTINGS | {"eval_blocks", "eval_time_samples", "num_samples", "sample_tokens"}


def _help(text: str, default: Any) -> Any:
    return field(default=default, metadata={"help": text})


@dataclass
class PretrainConfig(DataConfig):
    """Every setting of a pretraining run (the data settings come from :class:`DataConfig`)."""

    # model
    num_sub_tokens: int = _help("ℓ, sub-tokens per token (1 = MD4/MDLM)", 2)
    hidden_size: int = _help("transformer width", 192)
    num_hidden_layers: int = _help("transformer blocks", 2)
    num_attention_heads: int = _help("attention heads", 4)
    intermediate_size: int = _help("MLP width", 768)
    dropout: float = _help("dropout probability", 0.0)
    time_conditioning: bool = _help("condition the network on t (adaLN-Zero)", False)
    loss_type: str = _help("'elbo' (the valid bound) or 'prime' (the paper objective, not a bound)", "elbo")
    noise_schedule: str = _help(
        "masking schedule: linear, polynomial, cosine, geometric, or learnable_polynomial (GenMD4: one learnable "
        "power per token; sets num_sub_tokens=1 and time_conditioning=True)",
        "linear",
    )
    # optimisation
    batch_size: int = _help("sequences per process and micro-batch", 16)
    gradient_accumulation_steps: int = _help("micro-batches per optimizer step", 1)
    learning_rate: float = _help("peak AdamW learning rate", 2e-3)
    weight_decay: float = _help("AdamW weight decay", 0.0)
    decay_schedule_parameters: bool = _help(
        "also apply weight decay to GenMD4's schedule parameters ŵ (md4 does; it pulls every power towards "
        "softplus(0) = 0.693). Off by default",
        False,
    )
    lr_scheduler: str = _help("any transformers.get_scheduler name, e.g. 'constant_with_warmup'", "cosine")
    warmup_steps: int = _help("linear warm-up steps", 100)
    max_steps: int = _help("optimizer steps in the whole run", 2300)
    max_grad_norm: float = _help("gradient clipping norm", 1.0)
    ema_decay: float = _help("EMA decay of the weights used for validation and saving; 0 disables EMA", 0.999)
    mixed_precision: str = _help("'no', 'bf16' or 'fp16' (accelerate)", "no")
    cpu: bool = _help("run on CPU even when a GPU is present (also makes CPU DDP launches work)", False)
    # bookkeeping
    output_dir: str = _help("checkpoints/, logs/ and final/ are written here", "outputs/pretrain")
    overwrite_output_dir: bool = _help("start afresh in an output_dir that already holds checkpoints", False)
    checkpoint_every: int = _help("save a resumable checkpoint every N steps", 500)
    keep_checkpoints: int = _help("keep only the newest N checkpoints", 2)
    resume_from_checkpoint: str | None = _help("'latest' or a checkpoint directory", None)
    allow_inexact_resume: bool = _help(
        "resume even when the run cannot continue exactly (lost random states, EMA of an old checkpoint)", False
    )
    allow_changed_settings: str = _help(
        "comma-separated settings that may differ from the checkpoint's on resume (or 'all')", ""
    )
    allow_unsafe_pickle: bool = _help(
        "allow resuming FSDP / DeepSpeed states, which are read by unpickling in full (runs any code the files "
        "name): only for checkpoints you wrote. One-process and DDP resumes never need it",
        False,
    )
    stop_after_steps: int | None = _help("leave after N steps of this run (time-limited jobs); resumable", None)
    eval_every: int = _help("held-out valid-bound evaluation every N steps", 500)
    eval_blocks: int = _help("held-out blocks scored at each evaluation", 64)
    eval_time_samples: int = _help("Monte-Carlo time samples per held-out block", 4)
    log_every: int = _help("log training metrics every N steps", 10)
    report_to: str = _help(
        "trackers, comma-separated; unavailable ones are skipped with a warning", "jsonl,tensorboard"
    )
    num_samples: int = _help("unconditional samples written with the final model", 3)
    sample_tokens: int = _help("length of those samples", 64)


# -- logging ---------------------------------------------------------------------------------------------------------


# -- model and EMA ---------------------------------------------------------------------------------------------------


def build_model(cfg: PretrainConfig, tokenizer) -> MDMPrimeForMaskedDiffusion:
    """A fresh model sized by ``cfg`` over the tokenizer's vocabulary."""
    config = text_model_config(
        tokenizer,
        cfg.seq_len,
        num_sub_tokens=cfg.num_sub_tokens,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        intermediate_size=cfg.intermediate_size,
        dropout=cfg.dropout,
        time_conditioning=cfg.time_conditioning,
        loss_type=cfg.loss_type,
        noise_schedule=cfg.noise_schedule,
    )
    return MDMPrimeForMaskedDiffusion(config)


# -- checkpoints -----------------------------------------------------------------------------------------------------


# -- training --------------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(accelerator: Accelerator, model, blocks: dict, cfg: PretrainConfig) -> dict:
    """Valid-bound perplexity on held-out blocks (each process scores its share; sums are reduced)."""
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=accelerator.device)
    with accelerator.split_between_processes(list(range(len(blocks["input_ids"])))) as mine:
        for start in range(0, len(mine), cfg.batch_size):
            rows = {key: value[mine[start : start + cfg.batch_size]] for key, value in blocks.items()}
            out = model.nll_bound(
                rows["input_ids"].to(accelerator.device),
                attention_mask=rows["attention_mask"].to(accelerator.device),
                num_time_samples=cfg.eval_time_samples,
                generator=torch.Generator(accelerator.device).manual_seed(cfg.seed + start),
            )
            totals += torch.stack([out.nll.sum(), out.paper_objective.sum(), out.num_tokens.sum().double()])
    nll, paper, tokens = accelerator.reduce(totals, "sum").tolist()
    model.train()
    return {"val/nelbo": nll / tokens, "val/ppl_bound": math.exp(nll / tokens), "val/paper_objective": paper / tokens}


def parse_config(argv: list[str]) -> PretrainConfig:
    """Command-line flags, or a single JSON / YAML file holding them."""
    cfg = training.parse_settings(PretrainConfig, argv, __doc__.split("\n")[0])
    if cfg.noise_schedule == "learnable_polynomial":
        # GenMD4 is defined for whole tokens, and its posterior depends on t (the config refuses anything else).
        for name, value in (("num_sub_tokens", 1), ("time_conditioning", True)):
            if getattr(cfg, name) != value:
                logging.getLogger("pretrain").warning(f"learnable_polynomial (GenMD4): setting {name}={value}.")
                setattr(cfg, name, value)
    return cfg


def prepare_data(cfg: PretrainConfig):
    """(tokenizer, training blocks, held-out blocks as stacked tensors)."""
    train_docs, val_docs = load_corpus(cfg)
    tokenizer = build_tokenizer(cfg, train_docs)
    train_blocks, val_blocks = tokenize_blocks(train_docs, tokenizer, cfg), tokenize_blocks(val_docs, tokenizer, cfg)
    if cfg.streaming:
        held = list(val_blocks.take(cfg.eval_blocks))
    else:
        held = val_blocks.select(range(min(cfg.eval_blocks, len(val_blocks))))
    held = {k: torch.stack([torch.as_tensor(row[k]) for row in held]) for k in ("input_ids", "attention_mask")}
    return tokenizer, train_blocks, held


def train(accelerator, cfg, model, optimizer, scheduler, loader, ema, val_blocks, step: int) -> int:
    """Optimizer steps from ``step`` until max_steps (or stop_after_steps); returns the last step."""
    eval_model = accelerator.unwrap_model(model)
    bar = tqdm(total=cfg.max_steps, initial=step, desc="pretraining", disable=not accelerator.is_main_process)
    model.train()
    start, first_step = time.time(), step
    while step < cfg.max_steps and not (cfg.stop_after_steps and step - first_step >= cfg.stop_after_steps):
        batches_per_epoch = len(loader) if not cfg.streaming else None
        epoch, offset = divmod(step * cfg.gradient_accumulation_steps, batches_per_epoch or sys.maxsize)
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        # Exact resume: skip the batches this epoch already consumed (the shuffle is seeded by epoch).
        for batch in accelerator.skip_first_batches(loader, offset) if offset else loader:
            with accelerator.accumulate(model):
                out = model(batch["input_ids"], attention_mask=batch["attention_mask"])
                accelerator.backward(out.loss)
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            # The scheduler is not prepared by accelerate (which would step it once per process): one step per
            # optimizer step, so every process count follows the same schedule.
            if not getattr(optimizer, "step_was_skipped", False):
                scheduler.step()
            step += 1
            if ema is not None:
                ema.update(eval_model)
            bar.update()
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                stats = accelerator.reduce(torch.stack([out.loss.detach(), out.elbo, out.paper_objective]), "mean")
                logs = dict(zip(("train/loss", "train/elbo", "train/paper_objective"), stats.tolist()))
                logs.update({"train/lr": scheduler.get_last_lr()[0], "train/grad_norm": float(grad_norm)})
                if out.power_mean is not None:  # GenMD4: the learned powers w = softplus(ŵ)
                    logs.update({f"train/power_{k}": float(getattr(out, f"power_{k}")) for k in ("max", "min", "mean")})
                accelerator.log({**logs, "train/seconds": time.time() - start}, step=step)
                bar.set_postfix(elbo=f"{logs['train/elbo']:.3f}")
            if step % cfg.eval_every == 0 or step == cfg.max_steps:
                with ema.applied(eval_model) if ema is not None else nullcontext():
                    metrics = evaluate(accelerator, eval_model, val_blocks, cfg)
                accelerator.log(metrics, step=step)
                logger.info(
                    f"step {step}: held-out valid-bound perplexity <= {metrics['val/ppl_bound']:.2f} "
                    f"(paper objective, not a bound: {metrics['val/paper_objective']:.4f} nats/token)",
                    main_process_only=True,
                )
            if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
                save_checkpoint(accelerator, cfg, step, scheduler, ema)
            if step >= cfg.max_steps or (cfg.stop_after_steps and step - first_step >= cfg.stop_after_steps):
                break
    bar.close()
    return step


def save_final(
    accelerator: Accelerator, cfg: PretrainConfig, model, tokenizer, ema: EMA | None, token_counts=None
) -> None:
    """``final/``: the EMA weights with code, a portable tokenizer, generation config and samples; for GenMD4 also
    ``powers.png`` (learned powers against the ``(C,)`` training ``token_counts``) and ``powers.json``."""
    if not accelerator.is_main_process:
        return
    final, model = Path(cfg.output_dir) / "final", accelerator.unwrap_model(model)
    with ema.applied(model) if ema is not None else nullcontext():
        model.generation_config.update(max_new_tokens=cfg.sample_tokens)
        model.save_pretrained(final)
        tokenizer.save_pretrained(final)
        make_tokenizer_portable(final)  # the folder's tokenizer also loads on transformers 4.57
        samples = model.generate(max_new_tokens=cfg.sample_tokens, num_return_sequences=cfg.num_samples, seed=cfg.seed)
        powers = None if getattr(model, "powers", None) is None else model.powers.detach().cpu()
    if powers is not None and token_counts is not None:
        plot_powers(powers, token_counts, final / "powers.png")
        write_atomic(final / "powers.json", json.dumps({"powers": powers.tolist(), "counts": token_counts.tolist()}))
        logger.info(
            f"learned powers: max {float(powers.max()):.3f}, min {float(powers.min()):.3f}, mean "
            f"{float(powers.mean()):.3f} (plot: {final / 'powers.png'})",
            main_process_only=True,
        )
    texts = tokenizer.batch_decode(samples, skip_special_tokens=True)
    write_atomic(final / "samples.txt", "\n\n---\n\n".join(texts))
    for text in texts:
        logger.info(f"sample: {text!r}", main_process_only=True)
    logger.info(f"saved the EMA model, tokenizer and samples to {final}", main_process_only=True)


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(format="%(message)s", level=logging.INFO)
    checkpoint = find_checkpoint(cfg)
    accelerator = training.make_accelerator(cfg, "pretrain")
    set_seed(cfg.seed)
    tokenizer, train_blocks, val_blocks = prepare_data(cfg)
    model = build_model(cfg, tokenizer)
    logger.info(
        f"{model.num_parameters() / 1e6:.2f}M parameters, ℓ={cfg.num_sub_tokens}, vocabulary {len(tokenizer)}, "
        f"{accelerator.num_processes} process(es) on {accelerator.device}",
        main_process_only=True,
    )
    # The loader's own generator: iterator creation must not draw from the global RNG that samples the masks.
    loader = torch.utils.data.DataLoader(
        train_blocks, batch_size=cfg.batch_size, shuffle=not cfg.streaming, drop_last=True,
        generator=torch.Generator().manual_seed(cfg.seed),
    )  # fmt: skip
    optimizer = torch.optim.AdamW(
        optimizer_groups(model, cfg.weight_decay, cfg.decay_schedule_parameters),
        lr=cfg.learning_rate,
        betas=(0.9, 0.98),
    )
    scheduler = get_scheduler(
        cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.max_steps
    )
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)  # the scheduler is stepped by hand
    ema = EMA(accelerator.unwrap_model(model), cfg.ema_decay) if cfg.ema_decay > 0 else None
    record = (
        training.resume(accelerator, cfg, checkpoint, model, optimizer, scheduler, ema, NEUTRAL_SETTINGS)
        if checkpoint
        else None
    )
    if accelerator.is_main_process:
        record_settings(Path(cfg.output_dir) / "logs", run_settings(cfg, accelerator), record)
    accelerator.init_trackers("pretrain", config=run_settings(cfg, accelerator))
    step = train(
        accelerator, cfg, model, optimizer, scheduler, loader, ema, val_blocks, record["step"] if record else 0
    )
    accelerator.wait_for_everyone()
    if step < cfg.max_steps:  # stopped early on purpose: the last checkpoint resumes the run
        save_checkpoint(accelerator, cfg, step, scheduler, ema)
    else:
        genmd4 = cfg.noise_schedule == "learnable_polynomial"
        counts = token_frequencies(train_blocks, len(tokenizer)) if genmd4 else None
        save_final(accelerator, cfg, model, tokenizer, ema, counts)
    training.end_run(accelerator)  # tear the process group down explicitly: no hang at exit under DDP


if __name__ == "__main__":
    main()
