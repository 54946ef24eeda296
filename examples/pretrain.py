"""Pretrain an MDM-Prime / MD4 model with Accelerate (one process, DDP, FSDP or DeepSpeed; CPU or GPU).

With no arguments it trains a small MDM-Prime on the Shakespeare plays bundled in examples/data (public
domain), in about 5-10 minutes on 2 CPU cores, and leaves a checkpoint that loads with
``AutoModel.from_pretrained(dir, trust_remote_code=True)``.

    python examples/pretrain.py                                        # the embedded default
    python examples/pretrain.py --num_sub_tokens 4 --max_steps 20000   # flags, or one JSON/YAML config file
    accelerate launch --multi_gpu --num_processes 2 examples/pretrain.py --tokenizer gpt2-tokenizer-dir
    python examples/pretrain.py --resume_from_checkpoint latest        # exact resume

Data: local text / JSON(L) files (compressed too) or any ``datasets.load_dataset`` name, a fast tokenizer (any
Hugging Face tokenizer, or a byte-level BPE trained on the corpus), documents wrapped with BOS/EOS and packed
into fixed-length blocks (as MDLM does) or padded one per row, a held-out split of whole documents, and
streaming for corpora larger than memory. Validation reports the valid-bound perplexity (the paper
objective is logged beside it, labelled).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from itertools import chain
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.logging import get_logger
from accelerate.tracking import GeneralTracker, on_main_process
from accelerate.utils import DataLoaderConfiguration, set_seed
from datasets import load_dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm
from transformers import AutoTokenizer, HfArgumentParser, PreTrainedTokenizerFast, get_scheduler

from modeling_mdm_prime import MDMPrimeConfig, MDMPrimeForMaskedDiffusion, make_tokenizer_portable

logger = get_logger("pretrain")
BUNDLED_CORPUS = Path(__file__).resolve().parent / "data" / "shakespeare_plays.jsonl.xz"


@dataclass
class PretrainConfig:
    # data
    dataset: str = str(BUNDLED_CORPUS)  # local file(s), comma-separated, or a load_dataset name
    dataset_config: str | None = None
    text_column: str = "text"
    validation_documents: float = 0.05  # fraction (or count, if >= 1) of documents held out
    max_documents: int | None = None  # use only the first N documents (quick runs)
    streaming: bool = False
    tokenizer: str = "bpe"  # "bpe": train a byte-level BPE on the corpus; else a tokenizer path or name
    bpe_vocab_size: int = 1024
    seq_len: int = 128
    packing: bool = True  # pack BOS doc EOS ... into blocks; False: one document per row, padded
    # model
    num_sub_tokens: int = 2
    hidden_size: int = 192
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 768
    dropout: float = 0.0
    time_conditioning: bool = False
    loss_type: str = "elbo"  # "elbo" (valid bound) or "prime" (the paper objective, not a bound)
    # optimisation
    batch_size: int = 16  # per process
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2e-3
    weight_decay: float = 0.0
    lr_scheduler: str = "cosine"  # any transformers.get_scheduler name, e.g. "constant_with_warmup"
    warmup_steps: int = 100
    max_steps: int = 1500
    max_grad_norm: float = 1.0
    ema_decay: float = 0.999  # 0 disables EMA
    mixed_precision: str = "no"  # "no", "bf16" or "fp16" (accelerate)
    cpu: bool = False
    # bookkeeping
    output_dir: str = "outputs/pretrain"
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    resume_from_checkpoint: str | None = None  # "latest" or a checkpoint directory
    stop_after_steps: int | None = None  # leave after this many steps in this run (time-limited jobs); resumable
    eval_every: int = 500
    eval_blocks: int = 64
    eval_time_samples: int = 4
    log_every: int = 10
    report_to: str = "jsonl,tensorboard"  # trackers; unavailable ones are skipped with a warning
    num_samples: int = 3
    sample_tokens: int = 64
    seed: int = 0


class JSONLTracker(GeneralTracker):
    """An accelerate tracker that appends every logged dict to ``<logging_dir>/metrics.jsonl``."""

    name = "jsonl"
    requires_logging_directory = True

    @on_main_process
    def __init__(self, run_name: str, logging_dir: str):
        super().__init__()
        self.path = Path(logging_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)

    @property
    def tracker(self):
        return self.path

    @on_main_process
    def store_init_configuration(self, values: dict):
        (self.path.parent / "config.json").write_text(json.dumps(values, indent=2, default=str))

    @on_main_process
    def log(self, values: dict, step: int | None = None, **kwargs):
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")


class EMA:
    """Exponential moving average of the parameters, with the usual warm-up ``min(decay, (1+n)/(10+n))``."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay, self.updates = decay, 0
        self.shadow = {name: p.detach().clone() for name, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for name, param in model.named_parameters():
            self.shadow[name].lerp_(param.detach(), 1.0 - decay)

    @contextmanager
    def applied(self, model: torch.nn.Module):
        """Swap the averaged weights in for the duration of the block."""
        saved = {name: p.detach().clone() for name, p in model.named_parameters()}
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.copy_(self.shadow[name])
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, param in model.named_parameters():
                    param.copy_(saved[name])

    def state_dict(self) -> dict:
        return {"updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.updates = state["updates"]
        for name, value in state["shadow"].items():
            self.shadow[name].copy_(value)


def read_documents(
    dataset: str, config: str | None = None, split: str = "train", text_column: str = "text", streaming: bool = False
):
    """Local text/JSON(L) files (comma-separated, compressed too) or a ``load_dataset`` name, as a dataset of
    documents with one ``text`` column."""
    files = [f for f in dataset.split(",") if f]
    if all(Path(f).exists() for f in files):
        suffixes = {s for f in files for s in Path(f).suffixes}
        builder = "json" if suffixes & {".json", ".jsonl"} else "text"
        kwargs = {"sample_by": "document"} if builder == "text" else {}
        data = load_dataset(builder, data_files=files, split="train", streaming=streaming, **kwargs)
    else:
        data = load_dataset(dataset, config, split=split, streaming=streaming)
    if data.column_names is not None and text_column not in data.column_names:
        raise ValueError(f"{dataset}: no column {text_column!r}; columns are {data.column_names}.")
    if text_column != "text":
        data = data.rename_column(text_column, "text")
    return data.select_columns(["text"])


def load_corpus(cfg: PretrainConfig):
    """(train, validation) datasets of documents with a ``text`` column."""
    data = read_documents(cfg.dataset, cfg.dataset_config, "train", cfg.text_column, cfg.streaming)
    if cfg.max_documents:
        data = data.take(cfg.max_documents) if cfg.streaming else data.select(range(cfg.max_documents))
    if cfg.streaming:  # a stream has no length: hold out the first N documents, or every k-th for a fraction
        if cfg.validation_documents >= 1:
            held = int(cfg.validation_documents)
            return data.skip(held), data.take(held)
        every = max(2, round(1 / cfg.validation_documents))
        return (
            data.filter(lambda _, i: i % every != 0, with_indices=True),
            data.filter(lambda _, i: i % every == 0, with_indices=True),
        )
    held = cfg.validation_documents
    split = data.train_test_split(test_size=int(held) if held >= 1 else held, seed=cfg.seed)
    return split["train"], split["test"]


def build_tokenizer(cfg: PretrainConfig, train) -> PreTrainedTokenizerFast:
    if cfg.tokenizer != "bpe":
        tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer)
        if not tokenizer.is_fast:
            raise ValueError(f"{cfg.tokenizer} is not a fast tokenizer; pass a tokenizer.json-based one.")
        if tokenizer.eos_token is None:
            raise ValueError(f"{cfg.tokenizer} has no EOS token, which packing needs between documents.")
        tokenizer.bos_token = tokenizer.bos_token or tokenizer.eos_token
        tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
        return tokenizer
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.bpe_vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator((row["text"] for row in train), trainer=trainer)
    special = "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=special, eos_token=special, pad_token=special)


def tokenize_blocks(data, tokenizer: PreTrainedTokenizerFast, cfg: PretrainConfig):
    """Documents -> fixed-length rows. Packing (MDLM's wrap): BOS doc EOS BOS doc EOS ... cut into blocks of
    ``seq_len``, every position real. Otherwise each document is one row, truncated and right-padded."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id

    def pack(batch):
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        stream = list(chain.from_iterable([bos, *doc, eos] for doc in ids))
        usable = len(stream) // cfg.seq_len * cfg.seq_len
        blocks = [stream[i : i + cfg.seq_len] for i in range(0, usable, cfg.seq_len)]
        return {"input_ids": blocks, "attention_mask": [[1] * cfg.seq_len for _ in blocks]}

    def pad(batch):
        rows = [
            [bos, *doc[: cfg.seq_len - 2], eos]
            for doc in tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        ]
        return {
            "input_ids": [row + [tokenizer.pad_token_id] * (cfg.seq_len - len(row)) for row in rows],
            "attention_mask": [[1] * len(row) + [0] * (cfg.seq_len - len(row)) for row in rows],
        }

    # Packing concatenates across documents, so a whole map batch must be seen at once.
    kwargs = {"batch_size": 256} if cfg.streaming else {"batch_size": 256, "desc": "tokenising"}
    return data.map(pack if cfg.packing else pad, batched=True, remove_columns=["text"], **kwargs).with_format("torch")


def build_model(cfg: PretrainConfig, tokenizer) -> MDMPrimeForMaskedDiffusion:
    config = MDMPrimeConfig(
        vocab_size=len(tokenizer),
        num_sub_tokens=cfg.num_sub_tokens,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.seq_len,
        dropout=cfg.dropout,
        time_conditioning=cfg.time_conditioning,
        loss_type=cfg.loss_type,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return MDMPrimeForMaskedDiffusion(config)


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a crash mid-save leaves only a ``.tmp`` directory behind)."""
    found = [p for p in (output_dir / "checkpoints").glob("checkpoint-*") if p.is_dir() and p.suffix != ".tmp"]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def save_checkpoint(accelerator: Accelerator, cfg: PretrainConfig, step: int) -> None:
    """accelerate.save_state into a temporary directory, renamed into place only when complete."""
    root = Path(cfg.output_dir) / "checkpoints"
    final, tmp = root / f"checkpoint-{step}", root / f"checkpoint-{step}.tmp"
    if final.exists():  # this step is already saved
        return
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)  # before any process writes its RNG state into it
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step}))
        os.replace(tmp, final)
        for old in checkpoint_dirs(Path(cfg.output_dir))[: -cfg.keep_checkpoints]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


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
                num_samples=cfg.eval_time_samples,
                generator=torch.Generator(accelerator.device).manual_seed(cfg.seed + start),
            )
            totals += torch.stack([out.nll.sum(), out.paper_objective.sum(), out.num_tokens.sum().double()])
    nll, paper, tokens = accelerator.reduce(totals, "sum").tolist()
    model.train()
    return {"val/nelbo": nll / tokens, "val/ppl_bound": math.exp(nll / tokens), "val/paper_objective": paper / tokens}


def parse_config(argv: list[str]) -> PretrainConfig:
    """Command-line flags, or a single JSON / YAML file holding them."""
    parser = HfArgumentParser(PretrainConfig)
    if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")):
        load = parser.parse_json_file if argv[0].endswith(".json") else parser.parse_yaml_file
        (cfg,) = load(argv[0])
    else:
        (cfg,) = parser.parse_args_into_dataclasses(args=argv)
    return cfg


def main() -> None:
    cfg = parse_config(sys.argv[1:])
    logging.basicConfig(format="%(message)s", level=logging.INFO)
    # Set up the process state before anything reads it: trackers consult it in their constructors, and a
    # default PartialState() made there would not know this is a CPU launch and would see one process.
    PartialState(cpu=cfg.cpu)
    trackers = [JSONLTracker(run_name="pretrain", logging_dir=str(Path(cfg.output_dir) / "logs"))]
    for name in filter(None, cfg.report_to.split(",")):
        if name != "jsonl":
            trackers.append(name)
    accelerator = Accelerator(
        cpu=cfg.cpu,
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        log_with=_available_trackers(trackers),
        project_dir=cfg.output_dir,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    set_seed(cfg.seed)
    train_docs, val_docs = load_corpus(cfg)
    tokenizer = build_tokenizer(cfg, train_docs)
    train_blocks, val_blocks = tokenize_blocks(train_docs, tokenizer, cfg), tokenize_blocks(val_docs, tokenizer, cfg)
    held_out = (
        list(val_blocks.take(cfg.eval_blocks))
        if cfg.streaming
        else val_blocks.select(range(min(cfg.eval_blocks, len(val_blocks))))
    )
    val_blocks = {
        k: torch.stack([torch.as_tensor(row[k]) for row in held_out]) for k in ("input_ids", "attention_mask")
    }
    model = build_model(cfg, tokenizer)
    logger.info(
        f"{model.num_parameters() / 1e6:.2f}M parameters, ℓ={cfg.num_sub_tokens}, vocabulary {len(tokenizer)}, "
        f"{accelerator.num_processes} process(es) on {accelerator.device}",
        main_process_only=True,
    )

    # The loader's own generator: iterator creation must not draw from the global RNG that samples the masks,
    # or a resumed run (which creates its iterator after restoring that RNG) would see other masks.
    loader = torch.utils.data.DataLoader(
        train_blocks,
        batch_size=cfg.batch_size,
        shuffle=not cfg.streaming,
        drop_last=True,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay, betas=(0.9, 0.98)
    )
    scheduler = get_scheduler(
        cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.max_steps
    )
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    ema = EMA(accelerator.unwrap_model(model), cfg.ema_decay) if cfg.ema_decay > 0 else None
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    accelerator.init_trackers("pretrain", config={**asdict(cfg), "num_processes": accelerator.num_processes})

    step = 0
    if cfg.resume_from_checkpoint:
        done = checkpoint_dirs(Path(cfg.output_dir))
        path = done[-1] if cfg.resume_from_checkpoint == "latest" and done else Path(cfg.resume_from_checkpoint)
        if not (path / "trainer_state.json").exists():
            raise ValueError(f"no complete checkpoint at {path} (looked for trainer_state.json).")
        accelerator.load_state(str(path))
        step = json.loads((path / "trainer_state.json").read_text())["step"]
        logger.info(f"resumed from {path} at step {step}", main_process_only=True)

    eval_model = accelerator.unwrap_model(model)
    bar = tqdm(total=cfg.max_steps, initial=step, desc="pretraining", disable=not accelerator.is_main_process)
    model.train()
    start, first_step = time.time(), step
    while step < cfg.max_steps:
        batches_per_epoch = len(loader) if not cfg.streaming else None
        epoch, offset = divmod(step * cfg.gradient_accumulation_steps, batches_per_epoch or sys.maxsize)
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        # Exact resume: skip the batches this epoch already consumed (the shuffle is seeded by epoch).
        epoch_loader = accelerator.skip_first_batches(loader, offset) if offset else loader
        for batch in epoch_loader:
            with accelerator.accumulate(model):
                out = model(batch["input_ids"], attention_mask=batch["attention_mask"])
                accelerator.backward(out.loss)
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            step += 1
            if ema is not None:
                ema.update(accelerator.unwrap_model(model))
            bar.update()
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                stats = accelerator.reduce(torch.stack([out.loss.detach(), out.elbo, out.prime_objective]), "mean")
                logs = {
                    "train/loss": stats[0].item(),
                    "train/elbo": stats[1].item(),
                    "train/paper_objective": stats[2].item(),
                    "train/lr": scheduler.get_last_lr()[0],
                    "train/grad_norm": float(grad_norm),
                    "train/seconds": time.time() - start,
                }
                accelerator.log(logs, step=step)
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
                save_checkpoint(accelerator, cfg, step)
            if step >= cfg.max_steps or (cfg.stop_after_steps and step - first_step >= cfg.stop_after_steps):
                break
        if cfg.stop_after_steps and step - first_step >= cfg.stop_after_steps:
            break
    bar.close()
    if step < cfg.max_steps:  # stopped early on purpose: the last checkpoint resumes the run
        save_checkpoint(accelerator, cfg, step)
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final = Path(cfg.output_dir) / "final"
        with ema.applied(eval_model) if ema is not None else nullcontext():
            eval_model.generation_config.update(max_new_tokens=cfg.sample_tokens)
            eval_model.save_pretrained(final)
            tokenizer.save_pretrained(final)
            make_tokenizer_portable(final)  # the folder's tokenizer also loads on transformers 4.57
            samples = eval_model.generate(
                max_new_tokens=cfg.sample_tokens, num_return_sequences=cfg.num_samples, seed=cfg.seed
            )
        texts = tokenizer.batch_decode(samples, skip_special_tokens=True)
        (final / "samples.txt").write_text("\n\n---\n\n".join(texts))
        for text in texts:
            logger.info(f"sample: {text!r}", main_process_only=True)
        logger.info(f"saved the EMA model, tokenizer and samples to {final}", main_process_only=True)
    accelerator.wait_for_everyone()
    accelerator.end_training()


def _available_trackers(requested: list) -> list:
    """Keep the trackers whose packages are installed (the JSONL one always is)."""
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    available = {"tensorboard": is_tensorboard_available(), "wandb": is_wandb_available()}
    kept = []
    for tracker in requested:
        if isinstance(tracker, str) and not available.get(tracker, True):
            print(f"tracker {tracker!r} is not installed; skipping it", file=sys.stderr)
            continue
        kept.append(tracker)
    return kept


if __name__ == "__main__":
    main()
