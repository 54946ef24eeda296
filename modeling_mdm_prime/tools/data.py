"""Corpora, tokenizers and packing for the training and evaluation scripts in ``examples/``.

This module is part of the installed package but is **not** shipped as remote code with checkpoints (only the
``*_mdm_prime.py`` files are): it needs ``datasets`` and ``tokenizers``, which a model user does not.
``examples/pretrain.py``, ``examples/evaluate_ppl.py`` and ``examples/finetune.py`` import it as
``from modeling_mdm_prime.tools.data import ...``.

The one rule for local files, in every script:

* ``.txt`` (optionally ``.xz``/``.gz``/...): **each file is one document**. To give several documents, pass several
  files (comma-separated) or use JSON(L).
* ``.json`` / ``.jsonl``: one document per record, in ``--text_column`` (default ``text``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

from datasets import Dataset, IterableDataset, load_dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

# Package data (setup.cfg), so the default exists in a clone and in a wheel install alike.
BUNDLED_CORPUS = Path(__file__).resolve().parents[1] / "corpora" / "shakespeare_plays.jsonl.xz"
JSON_SUFFIXES = {".json", ".jsonl"}
SPECIAL_TOKEN = "<|endoftext|>"


@dataclass
class DataConfig:
    """Where the documents come from, how they are tokenised and how they become fixed-length rows."""

    dataset: str = field(
        default=str(BUNDLED_CORPUS),
        metadata={
            "help": "local file(s), comma-separated (.txt: one document per file; .json/.jsonl: one per record; "
            "compressed too), or a datasets.load_dataset name"
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "load_dataset configuration name"})
    text_column: str = field(default="text", metadata={"help": "column holding the documents"})
    validation_documents: float = field(
        default=0.05, metadata={"help": "documents held out for validation: a fraction (< 1) or a count (>= 1)"}
    )
    max_documents: int | None = field(default=None, metadata={"help": "use only the first N documents (quick runs)"})
    streaming: bool = field(default=False, metadata={"help": "stream the corpus instead of loading it (large data)"})
    tokenizer: str = field(
        default="bpe",
        metadata={"help": "'bpe': train a byte-level BPE on the training documents; else a fast tokenizer path/name"},
    )
    bpe_vocab_size: int = field(default=1024, metadata={"help": "vocabulary size of the trained BPE"})
    seq_len: int = field(default=128, metadata={"help": "tokens per row (the model's max_position_embeddings)"})
    packing: bool = field(
        default=True,
        metadata={
            "help": "pack BOS doc EOS BOS doc EOS ... into full blocks (MDLM); false: one padded document per row"
        },
    )
    seed: int = field(default=0, metadata={"help": "seed of the held-out split, the data order and the masks"})


def local_files(dataset: str) -> list[str] | None:
    """The comma-separated local files named by ``dataset``, or None when it is not a list of existing files."""
    files = [f for f in dataset.split(",") if f]
    return files if files and all(Path(f).exists() for f in files) else None


def read_documents(
    dataset: str,
    config: str | None = None,
    split: str = "train",
    text_column: str = "text",
    streaming: bool = False,
) -> Dataset | IterableDataset:
    """Documents as a dataset with one ``text`` column.

    Local files follow the module's rule (``.txt``: one document per file; JSON(L): one per record); anything
    else is a ``datasets.load_dataset`` name, read at ``split``.

    Raises:
        ValueError: the files mix text and JSON, or the text column is missing.
    """
    files = local_files(dataset)
    if files is not None:
        kinds = {bool(set(Path(f).suffixes) & JSON_SUFFIXES) for f in files}
        if len(kinds) > 1:
            raise ValueError(f"{dataset}: mixes JSON(L) and text files; give one kind at a time.")
        builder = "json" if kinds == {True} else "text"
        kwargs = {"sample_by": "document"} if builder == "text" else {}
        data = load_dataset(builder, data_files=files, split="train", streaming=streaming, **kwargs)
    else:
        data = load_dataset(dataset, config, split=split, streaming=streaming)
    if data.column_names is not None and text_column not in data.column_names:
        raise ValueError(f"{dataset}: no column {text_column!r}; columns are {data.column_names}.")
    if text_column != "text":
        data = data.rename_column(text_column, "text")
    return data.select_columns(["text"])


def describe_split(dataset: str, split: str) -> str:
    """What a scored corpus is, for result files: a load_dataset split name, or the local files in full."""
    files = local_files(dataset)
    return split if files is None else "all documents of " + ", ".join(Path(f).name for f in files)


def load_corpus(cfg: DataConfig) -> tuple[Dataset | IterableDataset, Dataset | IterableDataset]:
    """(train, validation) documents. The held-out split is made of whole documents: a seeded random split, or
    for a stream (no length) the first N documents, or every k-th one for a fraction."""
    data = read_documents(cfg.dataset, cfg.dataset_config, "train", cfg.text_column, cfg.streaming)
    if cfg.max_documents:
        data = data.take(cfg.max_documents) if cfg.streaming else data.select(range(min(cfg.max_documents, len(data))))
    held = cfg.validation_documents
    if not held > 0:
        raise ValueError(f"validation_documents must be > 0 (a fraction or a count), got {held}.")
    if cfg.streaming:
        if held >= 1:
            return data.skip(int(held)), data.take(int(held))
        every = max(2, round(1 / held))
        return (
            data.filter(lambda _, i: i % every != 0, with_indices=True),
            data.filter(lambda _, i: i % every == 0, with_indices=True),
        )
    split = data.train_test_split(test_size=int(held) if held >= 1 else held, seed=cfg.seed)
    return split["train"], split["test"]


def train_bpe(texts, vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on ``texts``, with one special token as BOS, EOS and pad."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[SPECIAL_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=SPECIAL_TOKEN, eos_token=SPECIAL_TOKEN, pad_token=SPECIAL_TOKEN
    )


def build_tokenizer(cfg: DataConfig, train) -> PreTrainedTokenizerFast:
    """``cfg.tokenizer == "bpe"``: a byte-level BPE trained on ``train``; else a fast tokenizer loaded from a path
    or name, with BOS and pad falling back to EOS.

    Raises:
        ValueError: the tokenizer is not a fast one or has no EOS token.
    """
    if cfg.tokenizer == "bpe":
        return train_bpe((row["text"] for row in train), cfg.bpe_vocab_size)
    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer)
    if not tokenizer.is_fast:
        raise ValueError(f"{cfg.tokenizer} is not a fast tokenizer; pass a tokenizer.json-based one.")
    if tokenizer.eos_token is None:
        raise ValueError(f"{cfg.tokenizer} has no EOS token, which packing needs between documents.")
    tokenizer.bos_token = tokenizer.bos_token or tokenizer.eos_token
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    return tokenizer


def tokenize_blocks(data, tokenizer: PreTrainedTokenizerBase, cfg: DataConfig):
    """Documents -> fixed-length rows with ``input_ids`` and ``attention_mask`` (torch format).

    Packing (MDLM's wrap): BOS doc EOS BOS doc EOS ... cut into blocks of ``seq_len``, every position real, the
    last partial block dropped. Otherwise each document is one row, truncated and right-padded.
    """
    bos, eos, seq_len = tokenizer.bos_token_id, tokenizer.eos_token_id, cfg.seq_len

    def pack(batch: dict) -> dict:
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        stream = list(chain.from_iterable([bos, *doc, eos] for doc in ids))
        usable = len(stream) // seq_len * seq_len
        blocks = [stream[i : i + seq_len] for i in range(0, usable, seq_len)]
        return {"input_ids": blocks, "attention_mask": [[1] * seq_len for _ in blocks]}

    def pad(batch: dict) -> dict:
        docs = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        rows = [[bos, *doc[: seq_len - 2], eos] for doc in docs]
        return {
            "input_ids": [row + [tokenizer.pad_token_id] * (seq_len - len(row)) for row in rows],
            "attention_mask": [[1] * len(row) + [0] * (seq_len - len(row)) for row in rows],
        }

    # Packing concatenates across documents, so a whole map batch must be seen at once.
    kwargs = {"batch_size": 256} if cfg.streaming else {"batch_size": 256, "desc": "tokenising"}
    return data.map(pack if cfg.packing else pad, batched=True, remove_columns=["text"], **kwargs).with_format("torch")
