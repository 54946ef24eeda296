"""Valid-bound (NELBO) perplexity of an MDM-Prime / MD4 checkpoint on one or more corpora.

Each corpus is packed as MDLM does (BOS doc EOS BOS doc EOS ... cut into blocks of ``seq_len``) and every block
gets K Monte-Carlo time samples of the valid bound (``model.nll_bound``), in continuous time or for a T-step
sampler. The result is an upper bound on the model's perplexity, reported with its standard error; the MDM-Prime
paper objective is printed beside it, labelled, because it is not a bound (method.md §3.4).

    # the held-out plays that examples/pretrain.py did not train on
    python examples/evaluate_ppl.py --model_name_or_path outputs/pretrain/final
    # a zero-shot suite over several corpora in one command (offline: Shakespeare + the Python reference)
    python examples/evaluate_ppl.py --model_name_or_path outputs/pretrain/final \
        --suite examples/eval_suites/offline.yaml
    # MDLM's zero-shot suite from the Hub, two processes, the bound of a 1000-step sampler
    accelerate launch --num_processes 2 examples/evaluate_ppl.py --model_name_or_path user/repo \
        --suite examples/eval_suites/mdlm_zero_shot.yaml --num_steps 1000

Batches are seeded by their index, so the numbers do not depend on the number of processes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.logging import get_logger
from tqdm.auto import tqdm
from transformers import AutoModel, AutoTokenizer, HfArgumentParser

from modeling_mdm_prime.tools.data import (
    BUNDLED_CORPUS,
    DataConfig,
    describe_split,
    load_corpus,
    read_documents,
    tokenize_blocks,
)
from modeling_mdm_prime.tools.training import end_run

logger = get_logger("evaluate_ppl")


@dataclass
class Corpus:
    """One evaluation corpus: local files (json/jsonl: one document per record; txt: one document per file;
    optionally .xz/.gz) or a ``load_dataset`` name, read at ``split`` (local files are scored whole)."""

    name: str
    path: str
    config: str | None = None
    split: str = "train"
    text_column: str = "text"
    # Score the documents examples/pretrain.py held out of this corpus (same fraction and seed), not all of it.
    pretrain_holdout: bool = False
    validation_documents: float = 0.05
    holdout_seed: int = 0
    max_documents: int | None = None


def _help(text: str, default=None, factory=None):
    if factory is not None:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


@dataclass
class EvalConfig:
    model_name_or_path: str = field(
        default="outputs/pretrain/final",
        metadata={"help": "checkpoint folder or Hub id of the model to score", "aliases": ["--model"]},
    )
    suite: str | None = _help(
        "YAML or JSON list of corpora (name, path, ...: see examples/eval_suites/); overrides --corpus", None
    )
    corpus: list[str] = _help(
        "name=path entries (a local file or a load_dataset name); default: the held-out plays of the bundled corpus",
        factory=list,
    )
    seq_len: int | None = _help("tokens per scored block (default: the model's max_position_embeddings)", None)
    num_time_samples: int = _help("Monte-Carlo draws of the bound per block (its standard error falls as 1/√K)", 16)
    num_steps: int | None = _help(
        "None: the continuous-time bound; T: the bound of a T-step sampler (the discrete-time NELBO)", None
    )
    batch_size: int = _help("blocks per forward pass", 8)
    max_blocks: int | None = _help("score at most this many blocks per corpus (default: all)", None)
    seed: int = _help("seed of the Monte-Carlo draws", 0)
    output: str | None = _help("write the results JSON here too", None)
    write_results: bool = _help("also write <model>/eval_results.json, which the model card reads", False)
    cpu: bool = _help("run on the CPU even when a GPU is present", False)


def load_suite(cfg: EvalConfig) -> list[Corpus]:
    if cfg.suite:
        text = Path(cfg.suite).read_text()
        entries = yaml.safe_load(text) if cfg.suite.endswith((".yaml", ".yml")) else json.loads(text)
        if not isinstance(entries, list) or not entries:
            raise ValueError(f"{cfg.suite} must hold a non-empty list of corpora, each with a name and a path.")
        root = Path(cfg.suite).resolve().parent
        corpora = [Corpus(**entry) for entry in entries]
        for corpus in corpora:  # relative local paths are relative to the suite file
            if not Path(corpus.path).exists() and (root / corpus.path).exists():
                corpus.path = str(root / corpus.path)
        return corpora
    if not cfg.corpus:
        return [Corpus("shakespeare (held-out plays)", str(BUNDLED_CORPUS), pretrain_holdout=True)]
    corpora = []
    for entry in cfg.corpus:
        name, sep, path = entry.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--corpus takes name=path (a file or a load_dataset name), got {entry!r}.")
        corpora.append(Corpus(name, path))
    return corpora


def load_documents(corpus: Corpus):
    """The corpus as a dataset with one ``text`` column."""
    if corpus.pretrain_holdout:
        settings = DataConfig(
            dataset=corpus.path,
            text_column=corpus.text_column,
            validation_documents=corpus.validation_documents,
            seed=corpus.holdout_seed,
            max_documents=corpus.max_documents,
        )
        return load_corpus(settings)[1]
    data = read_documents(corpus.path, corpus.config, corpus.split, corpus.text_column)
    return data.select(range(min(corpus.max_documents, len(data)))) if corpus.max_documents else data


@torch.no_grad()
def score_blocks(accelerator: Accelerator, model, blocks: torch.Tensor, cfg: EvalConfig) -> dict:
    """Σ NELBO, Σ variance of the per-block estimates, Σ paper objective and Σ tokens over ``blocks (N, L)``."""
    batches = list(range(0, len(blocks), cfg.batch_size))
    totals = torch.zeros(4, dtype=torch.float64, device=accelerator.device)
    with accelerator.split_between_processes(batches) as mine:
        for start in tqdm(mine, desc="scoring", leave=False, disable=not accelerator.is_main_process):
            rows = blocks[start : start + cfg.batch_size].to(accelerator.device)
            out = model.nll_bound(
                rows,
                num_time_samples=cfg.num_time_samples,
                num_steps=cfg.num_steps,
                generator=torch.Generator(accelerator.device).manual_seed(cfg.seed + start),
            )
            paper = out.paper_objective.sum() if out.paper_objective is not None else torch.tensor(float("nan"))
            totals += torch.stack(
                [out.nll.sum(), (out.nll_stderr**2).sum(), paper.double(), out.num_tokens.sum().double()]
            ).to(totals)
    nll, var, paper, tokens = accelerator.reduce(totals, "sum").tolist()
    return {"nll": nll, "var": var, "paper": paper, "tokens": tokens}


def evaluate_corpus(accelerator, model, tokenizer, corpus: Corpus, cfg: EvalConfig) -> dict:
    seq_len = cfg.seq_len or model.config.max_position_embeddings
    with accelerator.main_process_first():  # one process builds the datasets cache, the others read it
        documents = load_documents(corpus)
        packed = tokenize_blocks(documents, tokenizer, DataConfig(seq_len=seq_len, packing=True))
    if len(packed) == 0:
        raise ValueError(f"{corpus.name}: fewer than seq_len={seq_len} tokens, so no block to score.")
    blocks = packed[: cfg.max_blocks or len(packed)]["input_ids"]
    sums = score_blocks(accelerator, model, blocks, cfg)
    nelbo, stderr = sums["nll"] / sums["tokens"], math.sqrt(sums["var"]) / sums["tokens"]
    paper = sums["paper"] / sums["tokens"]
    return {
        "dataset": corpus.name,
        "split": "pretrain held-out documents"
        if corpus.pretrain_holdout
        else describe_split(corpus.path, corpus.split),
        "num_tokens": int(sums["tokens"]),
        "num_blocks": len(blocks),
        "seq_len": seq_len,
        "num_time_samples": cfg.num_time_samples,
        "num_steps": cfg.num_steps,
        "nelbo_per_token": nelbo,
        "nelbo_stderr": stderr,
        "ppl_bound": math.exp(nelbo),
        "ppl_bound_95": [math.exp(nelbo - 1.96 * stderr), math.exp(nelbo + 1.96 * stderr)],
        "paper_objective_per_token": None if math.isnan(paper) else paper,
        "paper_objective_ppl": None if math.isnan(paper) else math.exp(paper),
    }


def format_table(results: list[dict]) -> str:
    lines = [
        "| corpus | tokens | valid-bound ppl (≥ true ppl) | NELBO nats/token ± s.e. "
        "| paper objective ppl (not a bound) |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in results:
        paper = f"{r['paper_objective_ppl']:.2f}" if r["paper_objective_ppl"] is not None else "n/a (discrete time)"
        lines.append(
            f"| {r['dataset']} | {r['num_tokens']:,} | {r['ppl_bound']:.2f} | "
            f"{r['nelbo_per_token']:.4f} ± {r['nelbo_stderr']:.4f} | {paper} |"
        )
    return "\n".join(lines)


def write_json_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = HfArgumentParser(EvalConfig)
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")):
        (cfg,) = (parser.parse_json_file if argv[0].endswith(".json") else parser.parse_yaml_file)(argv[0])
    else:
        (cfg,) = parser.parse_args_into_dataclasses(args=argv)
    if cfg.num_time_samples < 1:
        raise ValueError(f"--num_time_samples must be >= 1, got {cfg.num_time_samples}.")
    logging.basicConfig(format="%(message)s", level=logging.INFO)
    accelerator = Accelerator(cpu=cfg.cpu)
    model = AutoModel.from_pretrained(cfg.model_name_or_path, trust_remote_code=True).to(accelerator.device).eval()
    if not hasattr(model, "nll_bound"):
        raise ValueError(
            f"{cfg.model_name_or_path} loads as {type(model).__name__}, which has no nll_bound(); expected MDM-Prime."
        )
    tokenizer = AutoTokenizer.from_pretrained(cfg.model_name_or_path)
    results = []
    for corpus in load_suite(cfg):
        results.append(evaluate_corpus(accelerator, model, tokenizer, corpus, cfg))
        r = results[-1]
        logger.info(f"{corpus.name}: valid-bound perplexity <= {r['ppl_bound']:.2f} ({r['num_tokens']:,} tokens)")
    if accelerator.is_main_process:
        print(format_table(results))
        payload = {"model": cfg.model_name_or_path, "config": asdict(cfg), "results": results}
        targets = [Path(cfg.output)] if cfg.output else []
        if cfg.write_results:
            targets.append(Path(cfg.model_name_or_path) / "eval_results.json")
        for target in targets:
            target.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(target, payload)
    end_run(accelerator)  # tear the process group down explicitly: no hang at exit under DDP
    return results


if __name__ == "__main__":
    main()
