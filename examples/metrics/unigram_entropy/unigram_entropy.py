"""Unigram entropy of generated samples: the entropy (nats) of each sample's empirical token distribution.

Low entropy with low generative perplexity is the signature of degenerate, repetitive samples (e.g. low-precision
Gumbel sampling, method.md §2); MDLM / ReMDM report this number next to generative perplexity.
"""

import math
from collections import Counter

import datasets
import evaluate

_DESCRIPTION = "Entropy H = -Σ_v p̂(v) log p̂(v) of the token frequencies p̂ within each sample, in nats."
_KWARGS = """
Args:
    predictions: list of token-id lists, one per sample.
Returns:
    entropy: mean over samples of the per-sample entropy (nats).
    entropies: the per-sample entropies.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class UnigramEntropy(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Sequence(datasets.Value("int64"))}),
        )

    def _compute(self, predictions: list[list[int]]) -> dict:
        entropies = []
        for sample in predictions:
            if len(sample) == 0:
                raise ValueError("unigram_entropy: a sample has no tokens; expected at least one token id.")
            counts = Counter(sample)
            total = len(sample)
            entropies.append(-sum(c / total * math.log(c / total) for c in counts.values()))
        return {"entropy": sum(entropies) / len(entropies), "entropies": entropies}
