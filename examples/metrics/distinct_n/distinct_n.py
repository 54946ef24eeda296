"""Distinct-n and repetition of generated samples (token ids).

distinct-n is the number of unique n-grams over the number of n-grams (Li et al., 2016), pooled over all
samples; repetition-n is the mean over samples of 1 - (unique n-grams / n-grams) within each sample.
"""

import datasets
import evaluate

_DESCRIPTION = "distinct-n (pooled) and within-sample repetition-n for n = 1..max_n over token-id sequences."
_KWARGS = """
Args:
    predictions: list of token-id lists, one per sample.
    max_n: largest n-gram order (default 4).
Returns:
    distinct-1 .. distinct-{max_n}: unique n-grams / n-grams, pooled over samples.
    repetition-1 .. repetition-{max_n}: mean over samples of 1 - unique / total n-grams within the sample
        (samples shorter than n are skipped for that n).
"""


def _ngrams(sample: list[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(sample[i : i + n]) for i in range(len(sample) - n + 1)]


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class DistinctN(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Li et al., A Diversity-Promoting Objective Function for Neural Conversation Models, 2016.",
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Sequence(datasets.Value("int64"))}),
        )

    def _compute(self, predictions: list[list[int]], max_n: int = 4) -> dict:
        if max_n < 1:
            raise ValueError(f"distinct_n: max_n must be >= 1, got {max_n}.")
        out = {}
        for n in range(1, max_n + 1):
            grams = [_ngrams(sample, n) for sample in predictions]
            pooled = [g for sample in grams for g in sample]
            out[f"distinct-{n}"] = len(set(pooled)) / len(pooled) if pooled else 0.0
            within = [1 - len(set(g)) / len(g) for g in grams if g]
            out[f"repetition-{n}"] = sum(within) / len(within) if within else 0.0
        return out
