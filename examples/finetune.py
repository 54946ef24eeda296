"""Fine-tune a saved MDM-Prime / MD4 checkpoint on new data with the transformers Trainer, fully or with LoRA.

The Trainer optimises the model's own forward loss (the valid bound by default, in nats per scored token).

* ``--train_file notes.txt``: plain text, one document per line, packed into ``--block_size`` blocks with EOS
  between documents; every position is scored.
* ``--train_file pairs.jsonl``: ``{"prompt": ..., "response": ...}`` per line. The sequence is prompt + response
  + EOS and the labels are -100 on the prompt, so the prompt is never masked and never scored: the model learns
  to fill in the response given the prompt.

    python examples/finetune.py --model_name_or_path outputs/pretrain/final --train_file pairs.jsonl \\
        --output_dir outputs/finetuned --max_steps 200 --learning_rate 1e-4 --per_device_train_batch_size 16
    python examples/finetune.py ... --lora --lora_r 8 --merge_lora   # LoRA, merged into the weights at the end

The held-out loss (mean forward loss over ``--validation_file`` or a split of the training data, with fixed
noise) is printed before and after training and saved to ``eval_results.json`` in the output directory.
Every ``TrainingArguments`` option works (``--lr_scheduler_type``, ``--warmup_steps``, ``--bf16``, ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch
from datasets import Dataset, load_dataset
from transformers import AutoModel, AutoTokenizer, HfArgumentParser, Trainer, TrainingArguments, set_seed

LORA_TARGETS = ["attn_qkv", "attn_out", "fc_in", "fc_out"]  # every Linear in the transformer blocks


@dataclass
class ScriptArguments:
    model_name_or_path: str = field(metadata={"help": "directory or Hub id of a saved MDM-Prime checkpoint"})
    train_file: str = field(metadata={"help": ".txt (packed documents) or .jsonl (prompt/response pairs)"})
    validation_file: str | None = field(default=None, metadata={"help": "same format; default: split train_file"})
    validation_size: int = field(default=32, metadata={"help": "examples split off when no validation_file"})
    block_size: int | None = field(default=None, metadata={"help": "default: max_position_embeddings"})
    eval_repeats: int = field(default=4, metadata={"help": "noise draws per held-out batch"})
    lora: bool = field(default=False, metadata={"help": "train LoRA adapters instead of all weights"})
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    merge_lora: bool = field(default=False, metadata={"help": "save merged full weights instead of the adapter"})


def tokenize(data: Dataset, tokenizer, block_size: int, jsonl: bool) -> Dataset:
    """Prompt/response pairs -> input_ids + labels (-100 on the prompt); text -> packed blocks of input_ids."""
    eos = tokenizer.eos_token_id

    def pair(example):
        prompt = tokenizer(example["prompt"], add_special_tokens=False)["input_ids"]
        response = tokenizer(example["response"], add_special_tokens=False)["input_ids"] + [eos]
        ids = (prompt + response)[:block_size]
        return {"input_ids": ids, "labels": ([-100] * len(prompt) + response)[:block_size]}

    def pack(batch):
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
def held_out_loss(model, data: Dataset, pad_token_id: int, batch_size: int = 16, repeats: int = 4) -> float:
    """Token-weighted mean forward loss over ``data`` with fixed noise: comparable across models and runs."""
    model.eval()
    total, tokens = 0.0, 0
    for start in range(0, len(data), batch_size):
        batch = collate(data.select(range(start, min(start + batch_size, len(data)))).to_list(), pad_token_id)
        batch = {k: v.to(model.device) for k, v in batch.items()}
        for r in range(repeats):
            noise = torch.Generator(model.device).manual_seed(1000 * r + start)
            out = model(**batch, generator=noise)
            total += out.loss.item() * out.num_tokens.item()
            tokens += out.num_tokens.item()
    return total / max(tokens, 1)


def main() -> None:
    parser = HfArgumentParser((ScriptArguments, TrainingArguments))
    parser.set_defaults(report_to="none")
    args, training_args = parser.parse_args_into_dataclasses()
    set_seed(training_args.seed)

    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path, trust_remote_code=True)
    model = AutoModel.from_pretrained(args.model_name_or_path, trust_remote_code=True)
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer needs an eos_token (it ends every document / response)")
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    block_size = args.block_size or model.config.max_position_embeddings

    jsonl = args.train_file.endswith((".jsonl", ".json"))
    files = {"train": args.train_file} | ({"validation": args.validation_file} if args.validation_file else {})
    raw = load_dataset("json" if jsonl else "text", data_files=files)
    if "validation" not in raw:
        raw = raw["train"].train_test_split(test_size=args.validation_size, seed=training_args.seed)
        raw["validation"] = raw.pop("test")
    train, held_out = (tokenize(raw[split], tokenizer, block_size, jsonl) for split in ("train", "validation"))
    print(f"data: {len(train)} training and {len(held_out)} held-out sequences (block_size {block_size})")

    device = training_args.device
    before = held_out_loss(model.to(device), held_out, pad_token_id, repeats=args.eval_repeats)
    print(f"held-out loss before: {before:.4f} nats/token")

    if args.lora:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, target_modules=LORA_TARGETS
        )
        model = get_peft_model(model, lora)
        model.print_trainable_parameters()

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train,
        data_collator=partial(collate, pad_token_id=pad_token_id),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)

    if args.lora and args.merge_lora:
        model = model.merge_and_unload()  # the plain MDMPrimeForMaskedDiffusion with updated Linear weights
    after = held_out_loss(model, held_out, pad_token_id, repeats=args.eval_repeats)
    print(f"held-out loss after: {after:.4f} nats/token")

    # Full or merged model: weights, config with auto_map and the code files, so that
    # AutoModel.from_pretrained(output_dir, trust_remote_code=True) loads it. LoRA without merging: the adapter.
    if trainer.is_world_process_zero():
        model.save_pretrained(training_args.output_dir)
        tokenizer.save_pretrained(training_args.output_dir)
        trainer.save_metrics("eval", {"held_out_loss_before": before, "held_out_loss_after": after})
        print(f"saved to {training_args.output_dir}")


if __name__ == "__main__":
    main()
