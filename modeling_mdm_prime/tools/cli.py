"""One command-line vocabulary for ``examples/`` and ``benchmarks/``: the same flag for the same concept in every
script, and the sized-benchmark argument group (a full and a ``--tiny`` value per flag) written once.

The vocabulary (``tests/test_scripts.py`` checks every script against it):

- ``--model_name_or_path``: the model, a checkpoint folder or Hub id (transformers' example scripts' name);
- ``--num_time_samples``: Monte-Carlo draws of a likelihood bound (``nll_bound(num_time_samples=...)``);
  ``--eval_time_samples`` is the same for the evaluations inside a training run;
- ``--num_samples``: generated samples; ``--num_steps``: sampler steps T;
- ``--dataset``: the corpus or image set a script trains or evaluates on; the card metadata of a published model
  is ``--card_dataset``;
- model size and optimisation as in :class:`~modeling_mdm_prime.MDMPrimeConfig` and transformers'
  ``TrainingArguments``: ``--hidden_size``, ``--num_hidden_layers``, ``--num_attention_heads``, ``--batch_size``,
  ``--max_steps``, ``--learning_rate``, ``--seed``, ``--output_dir``.

Flags are spelt with underscores; the hyphenated spellings older benchmark versions took stay as aliases.
Not shipped as remote code.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

VOCABULARY = {
    "model_name_or_path": "checkpoint folder or Hub id of the model",
    "num_time_samples": "Monte-Carlo draws of the likelihood bound per sequence (its s.e. falls as 1/sqrt(K))",
    "num_samples": "generated samples per setting",
    "num_steps": "sampler steps T",
    "hidden_size": "transformer width",
    "num_hidden_layers": "transformer blocks",
    "num_attention_heads": "attention heads",
    "seq_len": "tokens per block",
    "bpe_vocab_size": "BPE vocabulary size trained on the corpus",
    "batch_size": "sequences per step",
    "max_steps": "training steps per model",
    "learning_rate": "peak AdamW learning rate",
    "eval_blocks": "held-out blocks scored",
    "max_documents": "use only the first N documents of the corpus (None: all)",
}


def option_strings(name: str) -> list[str]:
    """``--name`` and, for a multi-word name, its hyphenated alias ``--na-me``."""
    hyphenated = name.replace("_", "-")
    return [f"--{name}"] + ([f"--{hyphenated}"] if hyphenated != name else [])


def add_card_dataset_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--card_dataset`` (alias ``--dataset``), repeatable: Hub dataset ids for the model card's metadata."""
    parser.add_argument(
        "--card_dataset", "--dataset", dest="card_datasets", action="append", default=[],
        help="Hub dataset id the model was trained on, for the card's metadata (repeatable)",
    )  # fmt: skip


def add_demo_model_argument(parser: argparse.ArgumentParser, repo: Path) -> None:
    """``--model_name_or_path`` of the demos and the server: the adapted SmolLM2 when built, else the tiny reference
    checkpoint (``tools.serving.default_model_path``)."""
    from .serving import default_model_path

    parser.add_argument(
        *option_strings("model_name_or_path"), default=str(default_model_path(repo)),
        help="checkpoint folder or Hub id (default: outputs/smollm2-mdm if built, else the tiny reference)",
    )  # fmt: skip


def add_common_arguments(parser: argparse.ArgumentParser, output_dir: Path, seed_help: str) -> None:
    """``--tiny``, ``--output_dir`` and ``--seed``, which every sized benchmark takes."""
    parser.add_argument("--tiny", action="store_true", help="smoke-test configuration")
    parser.add_argument(
        *option_strings("output_dir"), type=Path, default=output_dir, help="where the JSON, table and plots go"
    )
    parser.add_argument("--seed", type=int, default=0, help=seed_help)


def add_sized_arguments(
    parser: argparse.ArgumentParser, full: dict[str, Any], tiny: dict[str, Any], help: dict[str, str] | None = None
) -> None:
    """One flag per key of ``full``: unset by default, then filled by :func:`sized_defaults` from ``full`` or, with
    ``--tiny``, from ``tiny``. Help comes from ``help`` (the script's own flags) or :data:`VOCABULARY`."""
    texts = {**VOCABULARY, **(help or {})}
    missing = sorted(set(full) - set(texts))
    if missing or set(full) != set(tiny):
        raise ValueError(f"sized flags need help texts and tiny values: missing help {missing}, tiny keys {set(tiny)}")
    for key, value in full.items():
        parser.add_argument(
            *option_strings(key),
            type=type(value) if value is not None else int,
            default=None,
            help=f"{texts[key]} (default {value}; --tiny: {tiny[key]})",
        )


def sized_defaults(args: argparse.Namespace, full: dict[str, Any], tiny: dict[str, Any]) -> argparse.Namespace:
    """Fill every sized flag the command line left unset from ``tiny`` (with ``--tiny``) or ``full``."""
    for key, value in (tiny if args.tiny else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args
