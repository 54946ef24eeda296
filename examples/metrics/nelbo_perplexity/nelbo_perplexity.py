"""NELBO perplexity of a masked-diffusion language model: exp(valid bound per token) >= the true perplexity.

For MDM-Prime / MD4 / MDLM checkpoints (``AutoModel`` + ``trust_remote_code``). The number is computed from the
valid bound (``model.nll_bound``); the MDM-Prime paper objective is returned beside it under its own name, since
it is not an upper bound on the negative log-likelihood (method.md §3.4).
"""

import math

import datasets
import evaluate
import torch
from transformers import AutoModel, AutoTokenizer

_DESCRIPTION = "Valid-bound (NELBO) perplexity of texts under a masked-diffusion model, with its standard error."
_KWARGS = """
Args:
    predictions: list of texts, each scored as one sequence (truncated to the model's context size).
    model_id: a MDM-Prime / MD4 checkpoint path (loaded with trust_remote_code=True: only pass code you trust).
    num_time_samples: Monte-Carlo samples K per sequence (default 16).
    num_steps: None for the continuous-time bound, or T for the bound of a T-step sampler.
    batch_size: sequences per forward pass (default 8).
    add_special_tokens: wrap each text as BOS text EOS (default True), as the training pipeline packs documents.
    seed: seed of the Monte-Carlo draws (default 0).
    device: "cpu", "cuda", ... (default: cuda if available).
Returns:
    ppl_bound: exp(Σ NELBO / Σ tokens), an upper bound on the model's perplexity (up to Monte-Carlo error).
    nelbo_per_token, nelbo_stderr_per_token: the bound per token and its standard error.
    nelbos: per text, the NELBO in nats.
    num_tokens: tokens scored.
    paper_objective_per_token, paper_objective_ppl: the MDM-Prime paper objective (NOT a bound), continuous time.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class NelboPerplexity(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Chao et al., 2025 (MDM-Prime); Shi et al., 2024 (MD4); Sahoo et al., 2024 (MDLM).",
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("string")}),
        )

    def _compute(
        self,
        predictions: list[str],
        model_id: str,
        num_time_samples: int = 16,
        num_steps: int | None = None,
        batch_size: int = 8,
        add_special_tokens: bool = True,
        seed: int = 0,
        device: str | None = None,
    ) -> dict:
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = AutoModel.from_pretrained(model_id, trust_remote_code=True).to(device).eval()
        if not hasattr(model, "nll_bound"):
            raise ValueError(f"{model_id} is a {type(model).__name__}, which has no nll_bound(); expected MDM-Prime.")
        tokenizer = AutoTokenizer.from_pretrained(model_id)
        context = model.config.max_position_embeddings
        rows = []
        for text in predictions:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if add_special_tokens:
                ids = [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
            if not ids:
                raise ValueError(f"nelbo_perplexity: text {text!r} has no token to score.")
            rows.append(ids[:context])
        generator = torch.Generator(device).manual_seed(seed)
        nll, var, paper, counts = [], [], [], []
        with torch.no_grad():
            for start in range(0, len(rows), batch_size):
                batch = rows[start : start + batch_size]
                width = max(len(r) for r in batch)
                ids = torch.full((len(batch), width), tokenizer.pad_token_id or 0, dtype=torch.long)
                mask = torch.zeros(len(batch), width, dtype=torch.long)
                for i, r in enumerate(batch):
                    ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
                out = model.nll_bound(
                    ids.to(device), mask.to(device), num_time_samples=num_time_samples, num_steps=num_steps,
                    generator=generator,
                )  # fmt: skip
                nll += out.nll.tolist()
                var += (out.nll_stderr**2).tolist()
                counts += out.num_tokens.tolist()
                if out.paper_objective is not None:
                    paper += out.paper_objective.tolist()
        tokens = sum(counts)
        result = {
            "ppl_bound": math.exp(sum(nll) / tokens),
            "nelbo_per_token": sum(nll) / tokens,
            "nelbo_stderr_per_token": math.sqrt(sum(var)) / tokens,
            "nelbos": nll,
            "num_tokens": tokens,
        }
        if paper:
            result["paper_objective_per_token"] = sum(paper) / tokens
            result["paper_objective_ppl"] = math.exp(sum(paper) / tokens)
        return result
