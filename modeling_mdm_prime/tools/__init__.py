"""The package's tools: everything of ``modeling_mdm_prime`` that is *not* shipped with a checkpoint as remote code.

The shipped files are exactly the ``*_mdm_prime.py`` modules at the top level of the package; they import each
other only as ``from .module import Name`` and never from here. This subpackage holds what runs on the user's
machine around a model:

==================  =============================================================================================
``checkpoint_files``  what a checkpoint folder holds and what may be published (allowlist, pickle and symlink checks)
``model_card``        the sandboxed model-card rendering
``publish``           staging and publishing to the Hugging Face Hub
``convert``           conversion of the published MDLM / MDM-Prime checkpoints (restricted unpickling)
``training``          the run machinery of the training scripts (accelerate, EMA, atomic checkpoints, resume)
``data``              corpora, tokenizers and packing for text training
``image_data``        image datasets (digits, MNIST) and sample grids
``image_metrics``     Fréchet distances of image samples
``lm_eval_adapter``   the ``mdm_prime`` model of lm-evaluation-harness
``unmasking_view``    a step streamer for ``generate(streamer=...)`` and its views: terminal (rich), HTML, GIF
``serving``           templates with holes, JSON-schema templates, the batching engine of ``examples/serve.py``
``rl_likelihood``     ``log π(completion | prompt)`` estimators for RL and the exact ELBO by enumeration
==================  =============================================================================================

The publishing API is re-exported here: ``from modeling_mdm_prime.tools import publish_checkpoint``.
"""

from .checkpoint_files import (
    check_checkpoint,
    count_parameters,
    is_image_checkpoint,
    load_eval_results,
    load_image_eval,
    load_image_metrics,
    load_training_config,
    outside_folder,
    pickle_reason,
    public_settings,
    refuse_outside_files,
    select_files,
    shipped_code_differences,
    shipped_code_files,
)
from .model_card import conversion_lines, markdown_code, markdown_text, render_card_template, render_model_card
from .publish import (
    HubPublishError,
    checkpoint_contents,
    make_tokenizer_portable,
    publish_checkpoint,
    stage_checkpoint,
)

__all__ = [
    "HubPublishError",
    "check_checkpoint",
    "checkpoint_contents",
    "conversion_lines",
    "count_parameters",
    "is_image_checkpoint",
    "load_eval_results",
    "load_image_eval",
    "load_image_metrics",
    "load_training_config",
    "make_tokenizer_portable",
    "markdown_code",
    "markdown_text",
    "outside_folder",
    "pickle_reason",
    "public_settings",
    "publish_checkpoint",
    "refuse_outside_files",
    "render_card_template",
    "render_model_card",
    "select_files",
    "shipped_code_differences",
    "shipped_code_files",
    "stage_checkpoint",
]
