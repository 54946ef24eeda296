"""GRPO for masked diffusion models through TRL: :class:`DiffusionGRPOTrainer`, a ``trl.GRPOTrainer`` whose rollouts
come from ``generate()`` (iterative unmasking) and whose log-likelihoods come from one of the estimators of
:mod:`.rl_likelihood`. Not shipped as remote code. The guide is docs/guides/rl.md.

TRL keeps everything else: the group sampler, reward functions, group-normalised advantages, the clipped
objectives (``loss_type``), the reference model or a LoRA adapter's base as reference, logging, checkpoints,
Accelerate. The trainer replaces exactly two of TRL's extension points:

* ``_generate_single_turn``: rollouts by ``model.generate`` with **one seed per completion**, a hash of
  (``args.seed``, the rollout's key (optimizer step, rollout count), the completion's global index in the generation
  batch). A completion is then a
  function of its prompt and seed alone, so the samples of a repeated prompt differ, a run is reproducible, and one
  process draws exactly what two processes draw between them. The seeds are logged with the completions.
* ``_get_per_token_logps_and_entropies``: ``log π(completion | prompt)`` by :func:`.sequence_log_likelihood`.
  Each sequence's masks come from a generator seeded by (``args.seed``, rollout key, the sequence's tokens), so
  the old, new and reference policies score a sequence with the *same* masks: the importance ratio measures the
  policy's change, not the estimator's noise, and it is exactly 1 before the first update. The estimators are
  sequence-level; TRL's per-token tensor holds ``estimate / n`` at each of the n completion tokens, so TRL's
  token- and sequence-level ratios both equal ``exp(Δ / n)`` (GSPO's length-normalised ratio) and
  ``loss_type="grpo"`` weights ``Δ`` per sequence. Entropies (TRL logs them) are those of the one-pass predictive
  distributions ``p_θ(x_i | prompt, completion masked)``, measured without gradient.

The network call goes through the distributed wrapper's ``forward`` (forward redirection, as Lightning Fabric does
for methods other than ``forward``), so DDP synchronises the gradients of a likelihood that ``forward`` itself does
not compute.

Logged besides TRL's metrics: ``likelihood/mean`` (nats per sequence), ``likelihood/stderr`` (the estimator's own
standard error), ``likelihood/nfe``, ``importance_ratio/{mean,min,max}`` (sequence-level ``exp(new - old)``, when
TRL keeps old log-likelihoods: ``num_iterations > 1``) and, with a reference (``beta > 0``), ``kl/sequence``: the
mean of ``log π(y) - log π_ref(y)`` over the rollouts, an estimate of KL(π ‖ π_ref) in nats per sequence.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel
from trl import GRPOConfig, GRPOTrainer
from trl.models.utils import unwrap_model_for_generation

from .rl_likelihood import ESTIMATORS, completion_entropy, sequence_log_likelihood

__all__ = ["DiffusionGRPOConfig", "DiffusionGRPOTrainer", "forward_redirection", "rollout_seed"]


@dataclass
class DiffusionGRPOConfig(GRPOConfig):
    """``trl.GRPOConfig`` plus the diffusion-specific settings. TRL's sampling settings map onto the diffusion
    sampler (``temperature``, ``top_p``, ``top_k``); ``min_p`` and ``repetition_penalty`` have no counterpart
    and are refused. Gradient checkpointing and bf16 are off by default (TRL turns both on for causal LMs on GPUs);
    the estimators were measured in float32."""

    likelihood_estimator: str = field(
        default="coupled", metadata={"help": f"log-likelihood estimator, one of {ESTIMATORS} (docs/guides/rl.md)"}
    )
    likelihood_samples: int = field(default=2, metadata={"help": "Monte-Carlo samples K per sequence"})
    num_steps: int | None = field(default=None, metadata={"help": "sampler steps per rollout (None: one per token)"})
    sampling_strategy: str = field(default="ancestral", metadata={"help": "generate(strategy=...) of the rollouts"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "gradient checkpointing (off)"})
    bf16: bool | None = field(default=False, metadata={"help": "bf16 mixed precision (off: TRL's default is on)"})


def rollout_seed(*parts) -> int:
    """A 62-bit seed from any printable parts (a stable hash: the same in every process and Python run)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


def forward_redirection(wrapper: torch.nn.Module, module: torch.nn.Module, fn: Callable[[], object]):
    """Run ``fn()`` inside ``wrapper``'s forward (``wrapper`` wraps ``module``, e.g. DDP): for the duration of one
    call, ``module.forward`` is ``fn``. DDP prepares its gradient synchronisation in its own ``forward``; a
    computation that calls the module's other methods directly would otherwise train each process on its own
    gradients."""
    if wrapper is module:
        return fn()
    original = module.forward

    def redirected(*args, **kwargs):
        module.forward = original  # restore at once: fn may itself call the module
        return fn()

    module.forward = redirected
    try:
        return wrapper()
    finally:
        module.forward = original


def _base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The MDM-Prime model under a PEFT wrapper, if any (PEFT forwards attribute access, but not isinstance)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


class DiffusionGRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` for MDM-Prime / MD4 models (module docstring). Arguments as TRL's, with a
    :class:`DiffusionGRPOConfig`; ``model`` is a model instance or a path loaded with ``AutoModel``.

    Raises:
        ValueError: an unknown estimator, a GenMD4 model (no conditional bound with a clean prompt), ``coupled``
            on a time-conditioned network, a completion length that leaves no room for a prompt on the canvas,
            sampling settings the diffusion sampler does not have, or vLLM / continuous batching.
    """

    def __init__(self, model, reward_funcs, args: DiffusionGRPOConfig | None = None, **kwargs):
        args = args if args is not None else DiffusionGRPOConfig("mdm-prime-grpo")
        if not isinstance(args, DiffusionGRPOConfig):
            raise TypeError(f"args must be a DiffusionGRPOConfig, got {type(args).__name__}.")
        if isinstance(model, str):
            from transformers import AutoModel

            model = AutoModel.from_pretrained(model, trust_remote_code=args.trust_remote_code)
        self._check_settings(_base_model(model), args)
        super().__init__(model=model, reward_funcs=reward_funcs, args=args, **kwargs)
        # The current rollout's key per mode, part of every seed: (optimizer step, rollouts so far). The step keeps
        # a resumed run from repeating the seeds of the run it resumes; the count separates rollouts within a step.
        self._rollouts = {"train": 0, "eval": 0}
        self._rollout_key: dict[str, tuple[int, int] | None] = {"train": None, "eval": None}
        self._loss_inputs: dict | None = None

    @staticmethod
    def _check_settings(model: PreTrainedModel, args: DiffusionGRPOConfig) -> None:
        if args.likelihood_estimator not in ESTIMATORS:
            raise ValueError(f"likelihood_estimator must be one of {ESTIMATORS}, got {args.likelihood_estimator!r}.")
        if not isinstance(args.likelihood_samples, int) or args.likelihood_samples < 1:
            raise ValueError(f"likelihood_samples must be a positive integer, got {args.likelihood_samples!r}.")
        if not hasattr(model, "codec") or not hasattr(model, "token_logits"):
            raise ValueError(
                f"DiffusionGRPOTrainer trains MDM-Prime / MD4 models (MDMPrimeForMaskedDiffusion); got "
                f"{type(model).__name__}. Use trl.GRPOTrainer for causal LMs."
            )
        if getattr(model, "state_dependent", False):
            raise ValueError(
                "GenMD4 models (noise_schedule='learnable_polynomial') have no conditional bound with a clean prompt, "
                "so none of the likelihood estimators applies to them."
            )
        if args.likelihood_estimator in ("coupled", "upper") and model.config.time_conditioning:
            raise ValueError(
                f"likelihood_estimator={args.likelihood_estimator!r} needs a time-independent network; this model is "
                "time-conditioned. Use likelihood_estimator='elbo'."
            )
        if args.likelihood_estimator == "upper" and args.likelihood_samples < 2:
            raise ValueError("likelihood_estimator='upper' needs likelihood_samples >= 2 (ψ comes from the others).")
        canvas = model.config.max_position_embeddings
        if args.max_completion_length is None or args.max_completion_length >= canvas:
            raise ValueError(
                f"max_completion_length={args.max_completion_length} must be set and leave room for the prompt on "
                f"the model's canvas of {canvas} positions (max_position_embeddings)."
            )
        if args.use_vllm or args.use_transformers_continuous_batching:
            raise ValueError(
                "vLLM and transformers' continuous batching generate autoregressively; rollouts of a diffusion model "
                "come from its own generate(): leave use_vllm and use_transformers_continuous_batching off."
            )
        if args.min_p is not None or args.repetition_penalty != 1.0:
            raise ValueError(
                "min_p and repetition_penalty have no counterpart in the diffusion sampler; leave them unset "
                "(temperature, top_p, top_k, num_steps and sampling_strategy are available)."
            )

    # ------------------------------------------------------------------------------------------------------------
    # Rollouts
    # ------------------------------------------------------------------------------------------------------------

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        if images is not None or multimodal_fields:
            raise ValueError("DiffusionGRPOTrainer generates text only; the prompts carry images.")
        mode = "train" if self.model.training else "eval"
        rollout = self._rollout_key[mode] = (self.state.global_step, self._rollouts[mode])
        self._rollouts[mode] += 1
        first = self.accelerator.process_index * len(prompt_ids)  # global index of this process's first row
        seeds = [rollout_seed(self.args.seed, mode, rollout, first + i) for i in range(len(prompt_ids))]
        device = self.accelerator.device
        width = max(len(p) for p in prompt_ids)
        pad = self._tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompt_ids], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids], device=device)
        args = self.args
        with (
            unwrap_model_for_generation(self.model_wrapped, self.accelerator) as unwrapped,
            torch.no_grad(),
        ):
            out = unwrapped.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=args.max_completion_length, seed=seeds,
                num_steps=args.num_steps, strategy=args.sampling_strategy, temperature=args.temperature,
                top_p=args.top_p, top_k=args.top_k or None, eos_token_id=self.eos_token_ids, pad_token_id=pad,
            )  # fmt: skip
        completions = []
        for row in out[:, width:].tolist():
            end = next((i for i, t in enumerate(row) if t in self.eos_token_ids), len(row) - 1)
            completions.append(row[: end + 1])  # up to and including the first EOS, as TRL cuts
        self._log_completion_extra("seed", seeds)
        return completions, None

    # ------------------------------------------------------------------------------------------------------------
    # Likelihoods
    # ------------------------------------------------------------------------------------------------------------

    def _mask_generators(self, ids: torch.Tensor, real: torch.Tensor) -> list[torch.Generator]:
        """One generator per row, seeded by (seed, rollout, the row's real tokens): padding-, batch- and
        process-independent, and the same for the old, new and reference scoring of one rollout."""
        mode = "train" if self.model.training else "eval"
        rollout = self._rollout_key[mode]
        generators = []
        for row, keep in zip(ids.tolist(), real.tolist(), strict=True):
            tokens = tuple(t for t, k in zip(row, keep, strict=True) if k)
            generator = torch.Generator(device=ids.device)
            generator.manual_seed(rollout_seed(self.args.seed, mode, rollout, "masks", tokens))
            generators.append(generator)
        return generators

    def _get_per_token_logps_and_entropies(
        self, model, input_ids, attention_mask, logits_to_keep, batch_size=None, compute_entropy=False,
        compute_aux_loss=False, **multimodal,
    ):  # fmt: skip
        """``(B, T)`` per-token share ``estimate / n`` of each sequence's log-likelihood estimate (0 on padding and
        on rows without a scored token), ``(B, T)`` one-pass entropies when asked, no auxiliary loss."""
        if any(v is not None for v in multimodal.values()):
            raise ValueError("DiffusionGRPOTrainer scores text only.")
        prompt, prompt_mask = input_ids[:, :-logits_to_keep], attention_mask[:, :-logits_to_keep]
        completion, done = input_ids[:, -logits_to_keep:], attention_mask[:, -logits_to_keep:]
        rows = done.bool().any(1)  # TRL zeroes truncated completions with mask_truncated_completions
        logps = torch.zeros(completion.shape, device=completion.device)
        entropies = torch.zeros(completion.shape, device=completion.device) if compute_entropy else None
        if not bool(rows.any()):
            return logps, entropies, None
        module = self.accelerator.unwrap_model(model)
        generators = self._mask_generators(input_ids[rows], attention_mask[rows].bool())
        arguments = dict(
            prompt_attention_mask=prompt_mask[rows], completion_mask=done[rows],
            estimator=self.args.likelihood_estimator, num_samples=self.args.likelihood_samples, generator=generators,
        )  # fmt: skip
        estimate = forward_redirection(
            model, module, lambda: sequence_log_likelihood(module, prompt[rows], completion[rows], **arguments)
        )
        share = estimate.log_likelihood.float() / done[rows].sum(1)
        logps[rows] = share.unsqueeze(1) * done[rows]
        if compute_entropy:
            with torch.no_grad():
                entropy = completion_entropy(module, prompt[rows], completion[rows], prompt_mask[rows], done[rows])
            entropies[rows] = entropy.float()
            self._log_likelihood_metrics(estimate, logps, done)
        return logps, entropies, None

    def _log_likelihood_metrics(self, estimate, logps: torch.Tensor, done: torch.Tensor) -> None:
        """Per optimisation step: the estimate, its standard error, its cost and, when TRL kept the rollout's
        old log-likelihoods, the sequence-level importance ratios."""
        mode = "train" if self.model.training else "eval"
        gather = self.accelerator.gather
        values = gather(estimate.log_likelihood.detach().float())
        self._metrics[mode]["likelihood/mean"].append(values.mean().item())
        stderr = gather(estimate.stderr.detach().float())
        if not bool(stderr.isnan().all()):
            self._metrics[mode]["likelihood/stderr"].append(stderr.nanmean().item())
        self._metrics[mode]["likelihood/nfe"].append(float(estimate.nfe))
        old = None if self._loss_inputs is None else self._loss_inputs.get("old_per_token_logps")
        if old is not None:
            log_ratio = gather(((logps.detach() - old) * done).sum(1))
            ratio = log_ratio.exp()
            self._metrics[mode]["importance_ratio/mean"].append(ratio.mean().item())
            self._metrics[mode]["importance_ratio/min"].append(ratio.min().item())
            self._metrics[mode]["importance_ratio/max"].append(ratio.max().item())

    def _compute_loss(self, model, inputs):
        self._loss_inputs = inputs  # the old log-likelihoods, for the importance-ratio metrics
        try:
            return super()._compute_loss(model, inputs)
        finally:
            self._loss_inputs = None

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        reference = output.get("ref_per_token_logps")
        if reference is not None:
            # KL(π ‖ π_ref) per sequence: mean over rollouts y ~ π of log π(y) - log π_ref(y), both estimated with
            # the same masks (the old log-likelihoods when TRL kept them, else one more no-grad scoring).
            done = output["completion_mask"]
            policy = output.get("old_per_token_logps")
            if policy is None:
                with torch.no_grad():
                    ids = torch.cat([output["prompt_ids"], output["completion_ids"]], 1)
                    mask = torch.cat([output["prompt_mask"], done], 1)
                    policy, _, _ = self._get_per_token_logps_and_entropies(
                        self.model, ids, mask, output["completion_ids"].shape[1]
                    )
            gap = self.accelerator.gather(((policy - reference) * done).sum(1))
            mode = "train" if self.model.training else "eval"
            self._metrics[mode]["kl/sequence"].append(gap.mean().item())
        return output
