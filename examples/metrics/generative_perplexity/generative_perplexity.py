"""Generative perplexity: how likely an autoregressive scorer finds generated text.

Each sample is re-tokenised with the scorer's tokenizer, the scorer's BOS token is prepended (so the first token
is scored too), and the perplexity is exp of the mean token negative log-likelihood. Report it together with
sample entropy (``unigram_entropy``): repetitive text scores a low generative perplexity.
"""

import math

import datasets
import evaluate
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

_DESCRIPTION = "Perplexity of texts under an autoregressive model (any AutoModelForCausalLM path or name)."
_KWARGS = """
Args:
    predictions: list of generated texts.
    model_id: the scorer, any AutoModelForCausalLM path (or Hub name where the Hub is reachable).
    batch_size: texts scored per forward pass (default 8).
    max_length: truncate each text to this many scorer tokens (default: the scorer's context size).
    add_start_token: prepend the scorer's BOS token so that the first token is scored (default True).
    device: "cpu", "cuda", ... (default: cuda if available).
Returns:
    perplexities: per text, exp(mean NLL of its tokens).
    mean_perplexity: mean of the per-text perplexities.
    corpus_perplexity: exp(Σ NLL / Σ tokens) over all texts.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class GenerativePerplexity(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("string")}),
        )

    def _compute(
        self,
        predictions: list[str],
        model_id: str,
        batch_size: int = 8,
        max_length: int | None = None,
        add_start_token: bool = True,
        device: str | None = None,
    ) -> dict:
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = AutoModelForCausalLM.from_pretrained(model_id).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(model_id)
        if add_start_token and tokenizer.bos_token_id is None:
            raise ValueError(f"{model_id}'s tokenizer has no BOS token; pass add_start_token=False.")
        context = max_length or getattr(model.config, "max_position_embeddings", None) or 1024
        rows = []
        for text in predictions:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids = ([tokenizer.bos_token_id] if add_start_token else []) + ids
            if len(ids) < 2:
                raise ValueError(f"generative_perplexity: text {text!r} has no token to score.")
            rows.append(ids[:context])
        nll, counts = [], []
        with torch.no_grad():
            for start in range(0, len(rows), batch_size):
                batch = rows[start : start + batch_size]
                width = max(len(r) for r in batch)
                ids = torch.zeros(len(batch), width, dtype=torch.long)
                mask = torch.zeros(len(batch), width, dtype=torch.long)
                for i, r in enumerate(batch):
                    ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
                ids, mask = ids.to(device), mask.to(device)
                logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
                token_nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
                scored = mask[:, 1:].to(token_nll.dtype)
                nll += (token_nll * scored).sum(1).tolist()
                counts += scored.sum(1).long().tolist()
        return {
            "perplexities": [math.exp(n / c) for n, c in zip(nll, counts)],
            "mean_perplexity": sum(math.exp(n / c) for n, c in zip(nll, counts)) / len(nll),
            "corpus_perplexity": math.exp(sum(nll) / sum(counts)),
        }
