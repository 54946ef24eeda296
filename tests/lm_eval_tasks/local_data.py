"""Loads this folder's JSONL files for the local lm-eval tasks (``custom_dataset: !function local_data.load``).

A path relative to this file, not to the working directory, so ``--include_path tests/lm_eval_tasks`` works from
anywhere. The records are lines and passages of two plays from ``modeling_mdm_prime/corpora/shakespeare_plays.jsonl.xz``
(public domain): ``mc.jsonl`` (a verse line's last two words against three other lines' endings),
``ppl.jsonl`` (passages for rolling perplexity) and ``gen.jsonl`` (a speaker and a line's first words; the rest
of the line is the target).
"""

import json
from pathlib import Path

import datasets


def load(file: str, **_metadata) -> datasets.DatasetDict:
    """``{"test": Dataset}`` from the JSONL ``file`` beside this module (lm-eval also passes its metadata)."""
    path = Path(__file__).resolve().parent / file
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(records)})
