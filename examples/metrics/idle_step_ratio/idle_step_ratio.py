"""Idle-step ratio (ISR) of a masked-diffusion sampler: the fraction of denoising steps that change nothing.

On an idle step a time-independent network can reuse its last output (MDLM's cache), so ISR is the fraction of
network evaluations a sampler can skip. Each of the L·ℓ sub-tokens is revealed in a uniformly random step of a
T-step uniform grid under the linear schedule, so the expected ISR is (1 - 1/T)^(L·ℓ) (method.md §3.5); at
L = T = 1024 that is MDM-Prime's Table 1: 36.77 % (ℓ=1), 13.52 % (2), 4.97 % (3), 1.83 % (4), 0.25 % (6), 0.03 % (8).
"""

import datasets
import evaluate

_DESCRIPTION = "Idle steps / total steps per sample, and the closed form (1 - 1/T)^(L·ℓ) when L and ℓ are given."
_KWARGS = """
Args:
    idle_steps: per sample, the number of steps that changed nothing (``generate(...).idle_steps``).
    num_steps: per sample, the number of steps T that were run.
    sequence_length: L, the number of generated tokens (optional, for the closed form).
    num_sub_tokens: ℓ (optional, for the closed form).
Returns:
    idle_step_ratio: Σ idle / Σ steps over samples.
    idle_step_ratio_stderr: standard error of the per-sample ratios' mean.
    expected_idle_step_ratio: (1 - 1/T)^(L·ℓ), if sequence_length and num_sub_tokens are given and every
        sample ran the same T.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class IdleStepRatio(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Chao et al., Beyond Masked and Unmasked: Discrete Diffusion Models via Partial Masking, 2025.",
            inputs_description=_KWARGS,
            features=datasets.Features({"idle_steps": datasets.Value("int64"), "num_steps": datasets.Value("int64")}),
        )

    def _compute(
        self,
        idle_steps: list[int],
        num_steps: list[int],
        sequence_length: int | None = None,
        num_sub_tokens: int | None = None,
    ) -> dict:
        if any(t < 1 for t in num_steps):
            raise ValueError("idle_step_ratio: every num_steps must be >= 1.")
        if any(not 0 <= i <= t for i, t in zip(idle_steps, num_steps)):
            raise ValueError("idle_step_ratio: idle_steps must lie in [0, num_steps] for every sample.")
        ratios = [i / t for i, t in zip(idle_steps, num_steps)]
        mean = sum(ratios) / len(ratios)
        var = sum((r - mean) ** 2 for r in ratios) / max(len(ratios) - 1, 1)
        out = {
            "idle_step_ratio": sum(idle_steps) / sum(num_steps),
            "idle_step_ratio_stderr": (var / len(ratios)) ** 0.5,
        }
        if sequence_length is not None and num_sub_tokens is not None:
            if len(set(num_steps)) != 1:
                raise ValueError("idle_step_ratio: the closed form needs the same num_steps for every sample.")
            steps = num_steps[0]
            out["expected_idle_step_ratio"] = (1 - 1 / steps) ** (sequence_length * num_sub_tokens)
        return out
