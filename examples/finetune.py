"""Fine-tune a saved MDM-Prime / MD4 checkpoint on new data with the transformers Trainer, fully or with LoRA.

The Trainer optimises the model's own forward loss (the valid bound by default, in nats per scored token).

* Documents (``.txt``: one document per file; JSON(L) with a ``text`` column: one per record; the rule of
  ``modeling_mdm_prime.tools.data``, the same in every script): packed into ``--block_size`` blocks with EOS between
  documents; every position is scored.
* Prompt/response pairs (JSON(L) with ``prompt`` and ``response``), supervised fine-tuning as LLaDA does it: the
  sequence is prompt + response + EOS, filled up to ``--block_size`` with more EOS tokens, and everything after
  the prompt is the target. The prompt is never masked and never scored; the EOS tail is, so the model learns
  to end its answer and fill the remaining positions with EOS, and ``generate(max_new_tokens=...)`` with more
  positions than the answer needs returns the answer followed by padding.

    python examples/finetune.py --model_name_or_path outputs/pretrain/final --train_file pairs.jsonl \\
        --output_dir outputs/finetuned --max_steps 200 --learning_rate 1e-4 --per_device_train_batch_size 16
    python examples/finetune.py ... --lora --lora_r 8 --merge_lora   # LoRA, merged into the weights at the end

The held-out valid bound (the forward NELBO over ``--validation_file`` or a split of the training data, with
fixed noise) is printed before and after training and saved to ``eval_results.json`` in the format of
``examples/evaluate_ppl.py``, so ``examples/push_to_hub.py`` publishes the output folder as it is. The output folder
holds a tokenizer that also loads on transformers 4.57. An unmerged LoRA adapter records the absolute path of its
base model. Every ``TrainingArguments`` option works (``--lr_scheduler_type``, ``--warmup_steps``, ``--bf16``, ...).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch
from datasets import Dataset, load_dataset
from transformers import AutoModel, AutoTokenizer, HfArgumentParser, Trainer, TrainingArguments, set_seed

from modeling_mdm_prime import make_tokenizer_portable
from modeling_mdm_prime.tools.data import JSON_SUFFIXES, read_documents
from modeling_mdm_prime.tools.training import end_run

LORA_TARGETS = ["attn_qkv", "attn_out", "fc_in", "fc_out"]  # every Linear in the transformer blocks
# A model adapted from a causal LM (examples/adapt_causal_lm.py) keeps its source's module names (q_proj, c_attn,
# ...): there LoRA goes on every linear layer of the backbone (peft's "all-linear" leaves the output layer out).
ADAPTED_LORA_TARGETS = "all-linear"
VALIDATION_FRACTION, VALIDATION_CAP = 0.1, 256


@dataclass
class ScriptArguments:
    model_name_or_path: str = field(metadata={"help": "directory or Hub id of a saved MDM-Prime checkpoint"})
    train_file: str = field(metadata={"help": ".txt (one document per file) or .json/.jsonl (pairs or documents)"})
    validation_file: str | None = field(default=None, metadata={"help": "same format; default: split train_file"})
    validation_size: float | None = field(
        default=None,
        metadata={
            "help": f"examples held out when there is no validation_file: a fraction (< 1) or a count (>= 1); "
            f"default {VALIDATION_FRACTION:.0%}% of the examples, at most {VALIDATION_CAP}"  # argparse: %% is %
        },
    )
    block_size: int | None = field(default=None, metadata={"help": "default: max_position_embeddings"})
    eval_time_samples: int = field(
        default=4, metadata={"help": "Monte-Carlo draws of the bound per held-out batch", "aliases": ["--eval_repeats"]}
    )
    lora: bool = field(default=False, metadata={"help": "train LoRA adapters instead of all weights"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator"})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout"})
    merge_lora: bool = field(default=False, metadata={"help": "save merged full weights instead of the adapter"})


def read_examples(path: str) -> Dataset:
    """Prompt/response pairs (a JSON(L) file with both columns) or documents (the ``tools.data`` rule)."""
    if set(Path(path).suffixes) & JSON_SUFFIXES:
        data = load_dataset("json", data_files=path, split="train")
        if {"prompt", "response"} <= set(data.column_names):
            return data.select_columns(["prompt", "response"])
    return read_documents(path)


def validation_count(size: float | None, total: int) -> int:
    """How many of ``total`` examples to hold out. Raises ValueError if that would leave fewer for training."""
    if size is None:
        count = min(VALIDATION_CAP, max(1, round(VALIDATION_FRACTION * total)))
    elif 0 < size < 1:
        count = max(1, round(size * total))
    elif size >= 1 and float(size).is_integer():
        count = int(size)
    else:
        raise ValueError(f"--validation_size must be a fraction in (0, 1) or a whole count >= 1, got {size}.")
    if count > total - count:
        raise ValueError(
            f"--validation_size {size} would hold out {count} of {total} examples, more than it leaves for "
            "training; pass a --validation_file or a smaller --validation_size."
        )
    return count


def tokenize(data: Dataset, tokenizer, block_size: int, jsonl: bool) -> Dataset:
    """Pairs -> input_ids + labels (-100 on the prompt; response, EOS and an EOS tail up to ``block_size`` as the
    target, LLaDA's SFT); documents -> packed blocks of input_ids (every position scored)."""
    eos = tokenizer.eos_token_id

    def pair(example: dict) -> dict:
        prompt = tokenizer(example["prompt"], add_special_tokens=False)["input_ids"][:block_size]
        response = tokenizer(example["response"], add_special_tokens=False)["input_ids"] + [eos]
        target = (response + [eos] * block_size)[: block_size - len(prompt)]
        return {"input_ids": prompt + target, "labels": [-100] * len(prompt) + target}

    def pack(batch: dict) -> dict:
        stream = [t for ids in tokenizer(batch["text"], add_special_tokens=False)["input_ids"] for t in ids + [eos]]
        usable = len(stream) // block_size * block_size
        return {"input_ids": [stream[i : i + block_size] for i in range(0, usable, block_size)]}

    if jsonl:  # a prompt that fills the whole block leaves nothing to score: drop it
        data = data.map(pair, remove_columns=data.column_names)
        return data.filter(lambda example: any(label != -100 for label in example["labels"]))
    data = data.filter(lambda example: bool(example["text"].strip()))
    return data.map(pack, batched=True, batch_size=None, remove_columns=data.column_names)


def collate(features: list[dict], pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad input_ids (pad id), attention_mask (0) and labels (-100, never scored)."""
    length = max(len(f["input_ids"]) for f in features)
    batch = {
        "input_ids": torch.tensor([f["input_ids"] + [pad_token_id] * (length - len(f["input_ids"])) for f in features]),
        "attention_mask": torch.tensor(
            [[1] * len(f["input_ids"]) + [0] * (length - len(f["input_ids"])) for f in features]
        ),
    }
    if "labels" in features[0]:
        batch["labels"] = torch.tensor([f["labels"] + [-100] * (length - len(f["labels"])) for f in features])
    return batch


@torch.no_grad()
def held_out_bound(model, data: Dataset, pad_token_id: int, batch_size: int = 16, num_time_samples: int = 4) -> dict:
    """The forward valid bound (NELBO) and paper objective per scored token over ``data``, with fixed noise, so
    that numbers are comparable across models and runs. The standard error is taken over the ``num_time_samples``
    draws."""
    if len(data) == 0:
        raise ValueError("no held-out sequence to score (every prompt fills the whole block?).")
    model.eval()
    nelbo, paper, tokens = (
        torch.zeros(num_time_samples, dtype=torch.float64),
        torch.zeros(num_time_samples, dtype=torch.float64),
        0,
    )
    for start in range(0, len(data), batch_size):
        batch = collate(data.select(range(start, min(start + batch_size, len(data)))).to_list(), pad_token_id)
        batch = {k: v.to(model.device) for k, v in batch.items()}
        for r in range(num_time_samples):
            out = model(**batch, generator=torch.Generator(model.device).manual_seed(1000 * r + start))
            nelbo[r] += out.elbo.item() * out.num_tokens.item()
            paper[r] += out.paper_objective.item() * out.num_tokens.item()
        tokens += out.num_tokens.item()
    tokens = max(tokens, 1)
    stderr = (nelbo / tokens).std().item() / math.sqrt(num_time_samples) if num_time_samples > 1 else None
    return {
        "nelbo": nelbo.mean().item() / tokens,
        "stderr": stderr,
        "paper": paper.mean().item() / tokens,
        "tokens": tokens,
    }


def held_out_loss(model, data: Dataset, pad_token_id: int, batch_size: int = 16, num_time_samples: int = 4) -> float:
    """The held-out valid bound in nats per scored token (see :func:`held_out_bound`)."""
    return held_out_bound(model, data, pad_token_id, batch_size, num_time_samples)["nelbo"]


def eval_results(args: ScriptArguments, before: dict, after: dict, jsonl: bool) -> dict:
    """``eval_results.json`` in ``examples/evaluate_ppl.py``'s format (what the model card and push_to_hub read)."""
    source = args.validation_file or f"{args.train_file} (held-out split)"
    row = {
        "dataset": Path(source).name if args.validation_file else source,
        "split": "held-out responses given their prompts (SFT)" if jsonl else "held-out documents",
        "num_tokens": int(after["tokens"]),
        "num_time_samples": args.eval_time_samples,
        "num_steps": None,
        "nelbo_per_token": after["nelbo"],
        "nelbo_stderr": after["stderr"],
        "ppl_bound": math.exp(after["nelbo"]),
        "paper_objective_per_token": after["paper"],
        "paper_objective_ppl": math.exp(after["paper"]),
    }
    return {
        "model": args.model_name_or_path,
        "config": asdict(args),
        "results": [row],
        "held_out_loss_before": before["nelbo"],
        "held_out_loss_after": after["nelbo"],
    }


def write_json_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)


def load_splits(args: ScriptArguments, tokenizer, block_size: int, seed: int) -> tuple[Dataset, Dataset, bool]:
    """(train, held-out) tokenised sequences, and whether they are prompt/response pairs. Without a
    validation_file, pairs are split by example and documents by packed block (a .txt file is one document)."""
    train = read_examples(args.train_file)
    jsonl = "prompt" in train.column_names
    if args.validation_file:
        held_out = read_examples(args.validation_file)
        if jsonl != ("prompt" in held_out.column_names):
            raise ValueError("--train_file and --validation_file must both hold pairs or both hold documents.")
        return tokenize(train, tokenizer, block_size, jsonl), tokenize(held_out, tokenizer, block_size, jsonl), jsonl
    train = tokenize(train, tokenizer, block_size, jsonl)
    split = train.train_test_split(test_size=validation_count(args.validation_size, len(train)), seed=seed)
    return split["train"], split["test"], jsonl


def main(argv: list[str] | None = None) -> None:
    parser = HfArgumentParser((ScriptArguments, TrainingArguments))
    parser.set_defaults(report_to="none")
    args, training_args = parser.parse_args_into_dataclasses(args=argv)
    set_seed(training_args.seed)

    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path, trust_remote_code=True)
    model = AutoModel.from_pretrained(args.model_name_or_path, trust_remote_code=True)
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer needs an eos_token (it ends every document / response)")
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    block_size = args.block_size or model.config.max_position_embeddings
    train, held_out, jsonl = load_splits(args, tokenizer, block_size, training_args.seed)
    print(f"data: {len(train)} training and {len(held_out)} held-out sequences (block_size {block_size})")

    before = held_out_bound(
        model.to(training_args.device), held_out, pad_token_id, num_time_samples=args.eval_time_samples
    )
    print(f"held-out loss before: {before['nelbo']:.4f} nats/token")
    if args.lora:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=args.lora_r,
            lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout,
            target_modules=ADAPTED_LORA_TARGETS if getattr(model.config, "transformer_config", None) else LORA_TARGETS,
        )
        model = get_peft_model(model, lora)
        model.print_trainable_parameters()
        if Path(args.model_name_or_path).exists():  # the adapter must find its base from any directory
            model.peft_config["default"].base_model_name_or_path = str(Path(args.model_name_or_path).resolve())

    trainer = Trainer(
        model=model, args=training_args, train_dataset=train, data_collator=partial(collate, pad_token_id=pad_token_id)
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    if args.lora and args.merge_lora:
        model = model.merge_and_unload()  # the plain MDMPrimeForMaskedDiffusion with updated Linear weights
    after = held_out_bound(model, held_out, pad_token_id, num_time_samples=args.eval_time_samples)
    print(f"held-out loss after: {after['nelbo']:.4f} nats/token")

    # Full or merged model: weights, config with auto_map and the code files, so that
    # AutoModel.from_pretrained(output_dir, trust_remote_code=True) loads it. LoRA without merging: the adapter.
    if trainer.is_world_process_zero():
        output = Path(training_args.output_dir)
        model.save_pretrained(output)
        tokenizer.save_pretrained(output)
        make_tokenizer_portable(output)  # the tokenizer also loads on transformers 4.57
        write_json_atomic(output / "eval_results.json", eval_results(args, before, after, jsonl))
        print(f"saved to {output}")
    end_run(trainer.accelerator)  # tear the process group down explicitly: no hang at exit under DDP


if __name__ == "__main__":
    main()
