"""MDM-Prime and MD4 masked diffusion language models for transformers.

Importing the package registers the classes with the Auto factories, so ``AutoModel.from_pretrained`` works
on saved checkpoints without ``trust_remote_code``; checkpoints also carry the code for users who do not
install the package. The shipped code is exactly the ``*_mdm_prime.py`` files here; everything else (publishing,
conversion, training machinery, data, lm-eval) lives in :mod:`modeling_mdm_prime.tools`, which is never shipped.
``publish_checkpoint`` pushes a checkpoint with its code, tokenizer and a generated model card to the Hub.
"""

from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

from .codec_mdm_prime import SubTokenCodec, integer_base
from .configuration_mdm_prime import MDMPrimeConfig, MDMPrimeImageConfig
from .generation_mdm_prime import (
    MDMPrimeGenerateOutput,
    MDMPrimeGenerationConfig,
    MDMPrimeGenerationMixin,
    MDMPrimeSamplerState,
)
from .losses_mdm_prime import (
    diffusion_terms,
    digit_set_log_probs,
    discrete_step_terms,
    genmd4_integrand,
    genmd4_step_kl,
    reinforce_leave_one_out,
    sample_mask_counts,
    sample_masking_time_corruption,
    sample_masks,
    sample_state_dependent_masks,
    state_dependent_mask_log_prob,
    superset_logsumexp,
)
from .modeling_image_mdm_prime import (
    MDMPrimeForImageDiffusion,
    MDMPrimeImageGenerateOutput,
    MDMPrimeImageModel,
    MDMPrimeImageNLLOutput,
    levels_to_pil,
    pixels_from_unit_interval,
)
from .modeling_mdm_prime import (
    MDMPrimeDiffusionOutput,
    MDMPrimeForMaskedDiffusion,
    MDMPrimeModel,
    MDMPrimeNLLOutput,
    MDMPrimePreTrainedModel,
)
from .sampling_mdm_prime import (
    AncestralStrategy,
    ConfidenceStrategy,
    PredictorCorrectorStrategy,
    SamplerStepInput,
    SamplerStepOutput,
    SamplerStrategy,
    StateDependentStrategy,
    ThresholdStrategy,
    content_words,
    counter_uniform,
    digit_confidence,
    digit_marginals,
    get_sampler_strategy,
    sample_categorical,
    stream_keys,
    time_grid,
    warp_times,
)
from .schedules_mdm_prime import (
    CosineSchedule,
    GeometricSchedule,
    LinearSchedule,
    NoiseSchedule,
    PolynomialSchedule,
    StateDependentPolynomialSchedule,
    get_noise_schedule,
    sample_times,
)
from .tools import (
    HubPublishError,
    check_checkpoint,
    make_tokenizer_portable,
    publish_checkpoint,
    render_model_card,
    shipped_code_files,
    stage_checkpoint,
)
from .tools.convert import convert_checkpoint, restricted_torch_load

__version__ = "0.2.0"

AutoConfig.register(MDMPrimeConfig.model_type, MDMPrimeConfig, exist_ok=True)
# AutoModel returns the model that trains and generates (as Dream's does); the backbone stays importable.
AutoModel.register(MDMPrimeConfig, MDMPrimeForMaskedDiffusion, exist_ok=True)
AutoModelForMaskedLM.register(MDMPrimeConfig, MDMPrimeForMaskedDiffusion, exist_ok=True)
AutoConfig.register(MDMPrimeImageConfig.model_type, MDMPrimeImageConfig, exist_ok=True)
AutoModel.register(MDMPrimeImageConfig, MDMPrimeForImageDiffusion, exist_ok=True)

__all__ = [
    "AncestralStrategy",
    "ConfidenceStrategy",
    "PredictorCorrectorStrategy",
    "MDMPrimeGenerateOutput",
    "MDMPrimeGenerationConfig",
    "MDMPrimeGenerationMixin",
    "MDMPrimeSamplerState",
    "SamplerStepInput",
    "SamplerStepOutput",
    "SamplerStrategy",
    "StateDependentStrategy",
    "ThresholdStrategy",
    "content_words",
    "counter_uniform",
    "digit_confidence",
    "digit_marginals",
    "get_sampler_strategy",
    "sample_categorical",
    "stream_keys",
    "time_grid",
    "warp_times",
    "CosineSchedule",
    "GeometricSchedule",
    "HubPublishError",
    "LinearSchedule",
    "MDMPrimeConfig",
    "MDMPrimeForImageDiffusion",
    "MDMPrimeImageConfig",
    "MDMPrimeImageGenerateOutput",
    "MDMPrimeImageModel",
    "MDMPrimeImageNLLOutput",
    "levels_to_pil",
    "pixels_from_unit_interval",
    "MDMPrimeDiffusionOutput",
    "MDMPrimeForMaskedDiffusion",
    "MDMPrimeModel",
    "MDMPrimeNLLOutput",
    "MDMPrimePreTrainedModel",
    "NoiseSchedule",
    "PolynomialSchedule",
    "StateDependentPolynomialSchedule",
    "check_checkpoint",
    "convert_checkpoint",
    "restricted_torch_load",
    "make_tokenizer_portable",
    "publish_checkpoint",
    "render_model_card",
    "shipped_code_files",
    "stage_checkpoint",
    "SubTokenCodec",
    "diffusion_terms",
    "digit_set_log_probs",
    "discrete_step_terms",
    "genmd4_integrand",
    "genmd4_step_kl",
    "reinforce_leave_one_out",
    "sample_masking_time_corruption",
    "sample_state_dependent_masks",
    "state_dependent_mask_log_prob",
    "get_noise_schedule",
    "integer_base",
    "sample_mask_counts",
    "sample_masks",
    "sample_times",
    "superset_logsumexp",
]
