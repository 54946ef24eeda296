"""What a checkpoint folder holds and what of it may be published: the allowlist (:func:`select_files`), the
completeness and safety checks (:func:`check_checkpoint`: pickles of any protocol, exact safetensors, files that
resolve outside the folder), the code files ``trust_remote_code`` loads, and the reports a card reads
(evaluation, image metrics, sanitised training settings).

Not shipped as remote code (it lives in ``modeling_mdm_prime.tools``)."""

from __future__ import annotations

import bz2
import gzip
import io
import json
import logging
import lzma
import math
import os
import re
import struct
import zipfile
import zlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # huggingface_hub is imported where it is used: importing the package stays light
    pass


logger = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # modeling_mdm_prime/: where the shipped *_mdm_prime.py files are
# config.json's model_type of MDMPrimeImageConfig: such a checkpoint has no tokenizer and publishes its samples grid.
IMAGE_MODEL_TYPE = "mdm_prime_image"

# Loading a pickle can run arbitrary code: the Hub flags such files, and a published model must not need them.
# Names are compared case-insensitively, on every suffix (``weights.pkl.gz``); contents are checked too.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".dill", ".npy", ".npz")
TOKENIZER_VOCAB_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "tokenizer.model", "spiece.model")
# What save_pretrained writes for a tokenizer, besides a vocabulary file.
TOKENIZER_FILES = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
REQUIRED_AUTO_CLASSES = ("AutoConfig", "AutoModel")
EVAL_FILE = "eval_results.json"
TRAINING_CONFIG_FILE = "training_config.json"
SAMPLES_FILE = "samples.txt"
# The published files besides weights, code and tokenizer (docs/guides/publishing.md, "What is uploaded").
# README.md is not among them: the card is generated.
CONVERSION_FILE = "conversion.json"  # written by modeling_mdm_prime.tools.convert: what a conversion did
ADAPTATION_FILE = "adaptation.json"  # written by examples/adapt_causal_lm.py: the source, the checks, the curve
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    EVAL_FILE,
    SAMPLES_FILE,
    TRAINING_CONFIG_FILE,
    CONVERSION_FILE,
    ADAPTATION_FILE,
)
# Files of a repository that a push never takes from the checkpoint folder.
GENERATED_FILES = ("README.md", ".gitattributes")
# Training settings that describe the run; paths and bookkeeping are left out of a published card.
PRIVATE_TRAINING_KEYS = ("output_dir", "resume_from_checkpoint", "report_to", "logging_dir", "cpu")
# Setting names that may hold a secret: never published, whatever file they come from. Matched as whole words of the
# name (``hub_token``, ``apiKey``, ``db-password``), so ``tokenizer`` or ``sample_tokens`` are kept.
SECRET_WORDS = {"token", "secret", "secrets", "password", "passwd", "pwd", "key", "apikey", "credential"}
SECRET_WORDS |= {"credentials", "auth", "authorization", "cookie", "session"}
SECRET_VALUE = re.compile(r"^(hf_[A-Za-z0-9]{20,}|gh[pousr]_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_-]{20,})$")
RELATIVE_IMPORT = re.compile(r"^\s*(?:from\s+\.(\w+)\s+import|import\s+\.(\w+))", re.MULTILINE)
EVAL_REQUIRED = {"dataset": str, "split": str, "nelbo_per_token": float, "ppl_bound": float}
EVAL_OPTIONAL = {
    "num_tokens": int,
    "num_time_samples": int,
    "nelbo_stderr": float,
    "paper_objective_per_token": float,
    "paper_objective_ppl": float,
}
# Image checkpoints (examples/train_images.py's final/): the PNG grid of samples, the training run's metrics
# (bits per dimension from the valid bound) and, when present, examples/evaluate_images.py's report. No tokenizer.
IMAGE_SAMPLES_FILE = "samples.png"
IMAGE_METRICS_FILE = "metrics.json"
IMAGE_EVAL_FILE = "eval_images.json"
# Where evaluate_images.py writes its report by default (<model>/eval_images/); published as IMAGE_EVAL_FILE.
IMAGE_EVAL_DEFAULT = f"eval_images/{IMAGE_EVAL_FILE}"
IMAGE_MODEL_FILES = (
    "config.json",
    "generation_config.json",
    TRAINING_CONFIG_FILE,
    IMAGE_SAMPLES_FILE,
    IMAGE_METRICS_FILE,
    IMAGE_EVAL_FILE,
)
# The sample-quality metrics of an image evaluation report, and how the card names them.
FRECHET_METRICS = {"fid": "FID", "classifier_frechet_distance": "classifier Fréchet distance (CFD, not FID)"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SNIFF_BYTES = 1 << 20  # how much of a file (decompressed, for a compressed one) the pickle sniffing reads


# -- the checkpoint -------------------------------------------------------------------------------------------------


def shipped_code_files(checkpoint_dir: str | os.PathLike) -> list[str]:
    """The code files ``trust_remote_code`` loads from a checkpoint, sorted.

    These are the modules that ``config.json``'s ``auto_map`` names and, transitively, the files they import with
    ``from .module import ...``: the rule transformers applies when it copies and loads remote code.

    Raises:
        ValueError: ``config.json`` is missing or has no ``auto_map``.
    """
    folder = Path(checkpoint_dir)
    config = _read_json(folder / "config.json")
    auto_map = config.get("auto_map") or {}
    if not auto_map:
        raise ValueError(f"{folder / 'config.json'} has no auto_map, so trust_remote_code cannot load it.")
    pending = []
    for reference in auto_map.values():
        for item in reference if isinstance(reference, list) else [reference]:
            if item and "--" not in item:  # "other/repo--module.Class" points at another repository's code
                pending.append(item.rsplit(".", 1)[0])
    found: set[str] = set()
    while pending:
        module = pending.pop()
        if module in found:
            continue
        found.add(module)
        path = folder / f"{module}.py"
        if path.is_file():
            text = path.read_text(encoding="utf-8")
            pending.extend(a or b for a, b in RELATIVE_IMPORT.findall(text))
    return sorted(f"{module}.py" for module in found)


def is_image_checkpoint(checkpoint_dir: str | os.PathLike) -> bool:
    """Whether the folder holds an image model: ``config.json`` says ``"model_type": "mdm_prime_image"``
    (:class:`MDMPrimeImageConfig`). False when there is no readable ``config.json`` (the completeness check reports
    it)."""
    path = Path(checkpoint_dir) / "config.json"
    if not path.is_file():
        return False
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(config, dict) and config.get("model_type") == IMAGE_MODEL_TYPE


def outside_folder(folder: str | os.PathLike, name: str) -> bool:
    """Whether ``folder/name``, symlinks resolved, lies outside ``folder`` (a link to ``~/.ssh/id_rsa``, ``..``)."""
    root = Path(folder).resolve()
    return not (Path(folder) / name).resolve().is_relative_to(root)


def refuse_outside_files(folder: str | os.PathLike, names: Iterable[str]) -> None:
    """Raise ``ValueError`` naming every file of ``names`` whose real path leaves ``folder``.

    A push uploads, and the card quotes, only files that really are in the checkpoint folder: an allowlisted name
    (``samples.txt``, ``merges.txt``, ...) that is a symlink to a file elsewhere would otherwise publish that file.
    """
    folder = Path(folder)
    escaping = sorted(name for name in names if (folder / name).exists() and outside_folder(folder, name))
    if escaping:
        listed = ", ".join(f"{name} -> {(folder / name).resolve()}" for name in escaping)
        raise ValueError(
            f"Refusing to publish from {folder}: {listed} resolve(s) outside the folder (a symlink). Only files that "
            "are really inside the checkpoint folder are published or read into the card: copy the file in, or "
            "remove the link."
        )


def select_files(checkpoint_dir: str | os.PathLike, extra_files: Sequence[str] = ()) -> tuple[list[str], list[str]]:
    """The files a push takes from a checkpoint folder, and the ones it leaves out.

    Published (docs/guides/publishing.md, "What is uploaded"), where present: the weights (``model.safetensors``, or
    ``model.safetensors.index.json`` and the shards it names), ``config.json``, the code files that
    ``trust_remote_code`` loads (:func:`shipped_code_files`), ``generation_config.json`` and
    ``training_config.json``; for a text model the tokenizer files (``tokenizer.json``, ``tokenizer_config.json``,
    ``special_tokens_map.json``, ...), ``eval_results.json`` and ``samples.txt``; for an image model
    (:func:`is_image_checkpoint`) ``samples.png``, ``metrics.json`` and ``eval_images.json`` (or, where
    ``examples/evaluate_images.py`` writes it by default, ``eval_images/eval_images.json``); plus whatever
    ``extra_files`` selects. ``README.md`` is never taken from the folder: the card is generated.

    Args:
        checkpoint_dir: the checkpoint folder.
        extra_files: more files to publish: names or glob patterns relative to the folder (``"notes.txt"``,
            ``"assets/*.png"``). Each must match at least one file inside the folder.

    Returns:
        ``(published, left_out)``: paths relative to the folder (``/``-separated), sorted. A sub-folder of which
        nothing is published is listed once, as ``"name/"``.

    Raises:
        ValueError: an ``extra_files`` pattern matches no file, points outside the folder, or names a file the push
            generates (``README.md``).
    """
    folder = Path(checkpoint_dir)
    top = sorted(p.name for p in folder.iterdir() if p.is_file())
    image = is_image_checkpoint(folder)
    wanted = set(IMAGE_MODEL_FILES) if image else {*MODEL_FILES, *TOKENIZER_VOCAB_FILES, *TOKENIZER_FILES}
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        wanted.add(index.name)
        weight_map = _read_json(index).get("weight_map")
        wanted.update(weight_map.values() if isinstance(weight_map, dict) else ())
    else:
        wanted.add("model.safetensors")
    config = _read_json(folder / "config.json") if (folder / "config.json").is_file() else None
    if isinstance(config, dict) and config.get("auto_map"):
        wanted.update(shipped_code_files(folder))
    published = {name for name in top if name in wanted}
    if image and IMAGE_EVAL_FILE not in published and (folder / IMAGE_EVAL_DEFAULT).is_file():
        published.add(IMAGE_EVAL_DEFAULT)
    refuse_outside_files(folder, published)
    for pattern in extra_files:
        if Path(pattern).is_absolute() or ".." in Path(pattern).parts:
            raise ValueError(f"extra file {pattern!r} must be a path or pattern inside {folder}, e.g. 'notes.txt'.")
        matches = [p for p in sorted(folder.glob(pattern)) if p.is_file()]
        refuse_outside_files(folder, [p.relative_to(folder).as_posix() for p in matches])
        if not matches:
            raise ValueError(
                f"extra file {pattern!r} matches no file in {folder}: expected a file name or pattern there."
            )
        for path in matches:
            name = path.relative_to(folder).as_posix()
            if name in GENERATED_FILES:
                raise ValueError(f"extra file {name!r} cannot be published from the folder: the push generates it.")
            published.add(name)
    left_out: set[str] = {name for name in top if name not in published and name not in GENERATED_FILES}
    for path in folder.rglob("*"):
        if path.is_file() and path.parent != folder:
            name = path.relative_to(folder).as_posix()
            if name not in published:
                first = name.split("/", 1)[0]
                partly = any(other.startswith(first + "/") for other in published)
                left_out.add(name if partly else first + "/")
    return sorted(published), sorted(left_out)


def pickle_reason(path: str | os.PathLike) -> str | None:
    """Why a file is (or may hold) a pickle, or None. Loading a pickle can run arbitrary code.

    By name, case-insensitively, on every suffix (``pytorch_model.BIN``, ``weights.pkl.gz``, ``arr.npy``); by
    content (the first :data:`SNIFF_BYTES`): a pickle stream of any protocol (:func:`_pickle_magic`), a zip archive
    holding a pickle or a numpy array (``torch.save``, ``numpy.savez``), a numpy ``.npy`` array (it can hold pickled
    objects), or one of these compressed with gzip, bz2, xz or zlib. A valid safetensors file
    (:func:`_is_safetensors`) is never a pickle.
    """
    path = Path(path)
    suffix = next((s for s in Path(path.name.lower()).suffixes if s in PICKLE_SUFFIXES), None)
    if suffix is not None:
        return f"its name ends in {suffix}, a pickle format"
    if _is_safetensors(path):
        return None
    with open(path, "rb") as f:
        head = f.read(SNIFF_BYTES)
    found = _pickle_magic(head)
    if found:
        return f"its content is {found}"
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as archive:
                members = archive.namelist()
        except (zipfile.BadZipFile, OSError):
            return None
        inner = [m for m in members if m.lower().endswith((".pkl", ".pickle", ".npy"))]
        if inner:
            return f"its content is a zip archive holding {inner[0]} (the torch.save / numpy.savez format)"
        return None
    for magic, opener, kind in (
        (b"\x1f\x8b", gzip.open, "gzip"),
        (b"BZh", bz2.open, "bz2"),
        (b"\xfd7zXZ\x00", lzma.open, "xz"),
    ):
        if head.startswith(magic):
            try:
                with opener(path, "rb") as f:
                    found = _pickle_magic(f.read(SNIFF_BYTES))
            except (OSError, EOFError, lzma.LZMAError):
                return None
            return f"its content is {found}, {kind}-compressed" if found else None
    if len(head) >= 2 and head[0] & 0x0F == 8 and (head[0] << 8 | head[1]) % 31 == 0:  # a zlib stream header
        try:
            found = _pickle_magic(zlib.decompressobj().decompress(head, SNIFF_BYTES))
        except zlib.error:
            return None
        return f"its content is {found}, zlib-compressed" if found else None
    return None


def check_checkpoint(checkpoint_dir: str | os.PathLike, extra_files: Sequence[str] = ()) -> list[str]:
    """Check that a folder is a complete, loadable, pickle-free checkpoint, and return the files to publish.

    Required: ``config.json`` with an ``auto_map`` naming at least AutoConfig and AutoModel, every code file it
    needs (:func:`shipped_code_files`), safetensors weights (``model.safetensors``, or an index and all its
    shards), ``generation_config.json``, and for a text model a tokenizer (``tokenizer_config.json`` plus a
    vocabulary file). An image model (:func:`is_image_checkpoint`) needs no tokenizer; its ``samples.png``,
    ``metrics.json`` and evaluation report are optional, but must be what they say when present.
    The files to publish are the allowlist of :func:`select_files` plus ``extra_files``; everything else is left
    out, and listed in a warning.

    Raises:
        ValueError: the folder does not exist, something is missing (all missing items are listed), a file is not
            what its name says (weights that are not safetensors, a ``samples.png`` that is not a PNG, a malformed
            ``metrics.json`` or evaluation report), or the folder holds pickles (:func:`pickle_reason`, on every
            top-level file and every published or extra file).
    """
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        raise ValueError(f"Checkpoint folder {folder} does not exist.")
    published, left_out = select_files(folder, extra_files)
    # Every file of the folder is sniffed for pickles, except links that leave it (never published, never read).
    inside = [p.name for p in folder.iterdir() if p.is_file() and not outside_folder(folder, p.name)]
    scanned = sorted({*inside, *published})
    pickles = {name: reason for name in scanned if (reason := pickle_reason(folder / name))}
    if pickles:
        listed = "; ".join(f"{name} ({reason})" for name, reason in pickles.items())
        raise ValueError(
            f"Refusing to publish {folder}: it holds pickles, and loading a pickle can run arbitrary code: {listed}. "
            "Expected safetensors weights and JSON/text files only: save the model with save_pretrained (safetensors, "
            "the default) into a folder without them. A folder of optimizer.bin / random_states_*.pkl is a training "
            "state (accelerate save_state), not a model."
        )
    missing = []
    if "config.json" not in published:
        missing.append("config.json")
    else:
        auto_map = _read_json(folder / "config.json").get("auto_map") or {}
        absent = [name for name in REQUIRED_AUTO_CLASSES if name not in auto_map]
        if absent:
            missing.append(f"auto_map entries {absent} in config.json (save the model with save_pretrained)")
        missing.extend(name for name in shipped_code_files(folder) if name not in published)
    if "model.safetensors.index.json" in published:
        weights = set(_read_json(folder / "model.safetensors.index.json").get("weight_map", {}).values())
        missing.extend(sorted(shard for shard in weights if shard not in published))
    else:
        weights = {"model.safetensors"}
        if "model.safetensors" not in published:
            missing.append("model.safetensors (or model.safetensors.index.json and its shards)")
    if "generation_config.json" not in published:
        missing.append("generation_config.json")
    image = is_image_checkpoint(folder)
    if not image and "tokenizer_config.json" not in published:
        missing.append("tokenizer_config.json (save the tokenizer with tokenizer.save_pretrained)")
    if not image and not any(name in published for name in TOKENIZER_VOCAB_FILES):
        missing.append(f"a tokenizer vocabulary ({' or '.join(TOKENIZER_VOCAB_FILES)})")
    if missing:
        hint = ""
        if (folder / "final" / "config.json").exists():
            hint = (
                f" Did you mean {folder / 'final'} (where examples/pretrain.py and examples/train_images.py save the "
                "model)?"
            )
        raise ValueError(f"{folder} is not a complete checkpoint. Missing: {'; '.join(missing)}.{hint}")
    broken = sorted(name for name in weights if not _is_safetensors(folder / name))
    if broken:
        raise ValueError(
            f"{', '.join(broken)} in {folder} is not a valid safetensors file (expected an 8-byte header "
            "length, then a JSON header): save the model again with save_pretrained."
        )
    if image:
        if IMAGE_SAMPLES_FILE in published:
            with open(folder / IMAGE_SAMPLES_FILE, "rb") as f:
                if f.read(len(PNG_MAGIC)) != PNG_MAGIC:
                    raise ValueError(
                        f"{folder / IMAGE_SAMPLES_FILE} is not a PNG file: expected the grid of samples that "
                        "examples/train_images.py writes (modeling_mdm_prime.tools.image_data.save_image_grid)."
                    )
        load_image_metrics(folder)
        load_image_eval(folder)
    if left_out:
        logger.warning(
            "Not publishing %d file(s) of %s that are not part of the model: %s. Pass extra_files= (--include) to "
            "publish some of them.",
            len(left_out),
            folder,
            ", ".join(left_out),
        )
    return published


def shipped_code_differences(checkpoint_dir: str | os.PathLike) -> list[str]:
    """The code files of a checkpoint (:func:`shipped_code_files`) that are not byte for byte the installed
    package's, sorted: a push publishes the checkpoint's copy, which is what ``trust_remote_code`` runs."""
    folder = Path(checkpoint_dir)
    return [
        name
        for name in shipped_code_files(folder)
        if (folder / name).is_file()
        and (not (PACKAGE_DIR / name).is_file() or (folder / name).read_bytes() != (PACKAGE_DIR / name).read_bytes())
    ]


def load_eval_results(checkpoint_dir: str | os.PathLike) -> dict | None:
    """The checkpoint's ``eval_results.json`` (written by ``examples/evaluate_ppl.py --write_results``), or None.

    Schema: ``{"model": str, "results": [{"dataset", "split", "num_tokens", "num_time_samples", "nelbo_per_token",
    "nelbo_stderr", "ppl_bound", "paper_objective_per_token", "paper_objective_ppl"}]}``, in nats per token.
    ``ppl_bound`` must equal ``exp(nelbo_per_token)``: it is the perplexity of the valid bound, never of the paper
    objective.

    Raises:
        ValueError: the file is malformed.
    """
    path = Path(checkpoint_dir) / EVAL_FILE
    if not path.is_file():
        return None
    data = _read_json(path)
    results = data.get("results") if isinstance(data, dict) else None
    if not isinstance(results, list) or not results:
        raise ValueError(f"{path} must hold a non-empty 'results' list.")
    for i, row in enumerate(results):
        where = f"{path}: results[{i}]"
        if not isinstance(row, dict):
            raise ValueError(f"{where} is not an object.")
        for key, kind in {**EVAL_REQUIRED, **EVAL_OPTIONAL}.items():
            value = row.get(key)
            if value is None and key in EVAL_OPTIONAL:
                continue
            numeric = kind in (int, float) and isinstance(value, (int, float)) and not isinstance(value, bool)
            if not (numeric or isinstance(value, kind)):
                raise ValueError(f"{where}['{key}'] must be a {kind.__name__}, got {value!r}.")
        if not math.isclose(math.log(row["ppl_bound"]), row["nelbo_per_token"], rel_tol=1e-4, abs_tol=1e-6):
            raise ValueError(
                f"{where}: ppl_bound {row['ppl_bound']} is not exp(nelbo_per_token = {row['nelbo_per_token']}); "
                "the published perplexity must be the valid bound's."
            )
    return data


def load_image_metrics(checkpoint_dir: str | os.PathLike) -> dict | None:
    """An image checkpoint's ``metrics.json`` (written by ``examples/train_images.py``), or None.

    Schema: ``{"val/bpd": float, "val/bpd_stderr": float, "nfe": int, "num_sub_tokens": int, "dataset": str}``:
    held-out bits per dimension from the valid bound (an upper bound on ``-log2 p(x) / (C·H·W)``) with its standard
    error, and the number of sampler steps behind ``samples.png``. Only ``val/bpd`` is required; other keys are
    kept as they are.

    Raises:
        ValueError: the file is malformed, or its ``num_sub_tokens`` is not the checkpoint's (the metrics of another
            model).
    """
    folder = Path(checkpoint_dir)
    path = folder / IMAGE_METRICS_FILE
    if not path.is_file():
        return None
    data = _read_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object such as {{'val/bpd': 1.23, 'val/bpd_stderr': 0.01}}.")
    for key, kind, required in (
        ("val/bpd", float, True),
        ("val/bpd_stderr", float, False),
        ("nfe", int, False),
        ("num_sub_tokens", int, False),
        ("dataset", str, False),
    ):
        value = data.get(key)
        if value is None and not required:
            continue
        if not _is_kind(value, kind):
            raise ValueError(f"{path}: '{key}' must be a {kind.__name__}, got {value!r}.")
    ell = data.get("num_sub_tokens")
    config_ell = (
        _read_json(folder / "config.json").get("num_sub_tokens", 1) if (folder / "config.json").is_file() else ell
    )
    if ell is not None and ell != config_ell:
        raise ValueError(
            f"{path} reports num_sub_tokens={ell} but config.json has {config_ell}: these are another model's "
            "metrics. Remove the file or evaluate this checkpoint again."
        )
    return data


def find_image_eval(checkpoint_dir: str | os.PathLike) -> Path | None:
    """The image evaluation report of a checkpoint: ``eval_images.json`` in the folder, else
    ``eval_images/eval_images.json`` (``examples/evaluate_images.py``'s default output), else None."""
    folder = Path(checkpoint_dir)
    for name in (IMAGE_EVAL_FILE, IMAGE_EVAL_DEFAULT):
        if (folder / name).is_file():
            return folder / name
    return None


def load_image_eval(checkpoint_dir: str | os.PathLike) -> dict | None:
    """The image evaluation report of a checkpoint (:func:`find_image_eval`), or None. Optional: a card without it
    shows the training run's ``metrics.json``.

    The format ``examples/evaluate_images.py`` writes; what the card uses is checked, everything else is kept:
    ``{"dataset": str, "bits_per_dim": {"bits_per_dim": float, "bits_per_dim_stderr": float, "num_images": int,
    "num_time_samples": int, "bound": str}, "sample_metric": str, "feature_network": str, "num_reference": int,
    "samples": [{"nfe": int, "network_evaluations": float, "fid" | "classifier_frechet_distance": float,
    "coverage": float}], "real_baseline": {"fid" | "classifier_frechet_distance": float}}``. At least one of
    ``bits_per_dim`` and ``samples`` must be there, and ``feature_network`` with ``samples``: a Fréchet distance
    means nothing without the network whose features it compares.

    Raises:
        ValueError: the file is malformed.
    """
    path = find_image_eval(checkpoint_dir)
    if path is None:
        return None
    data = _read_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object (the report of examples/evaluate_images.py).")
    bound, samples = data.get("bits_per_dim"), data.get("samples") or []
    if bound is None and not samples:
        raise ValueError(f"{path} has neither 'bits_per_dim' nor 'samples': nothing to report.")
    if bound is not None:
        if not isinstance(bound, dict) or not _is_kind(bound.get("bits_per_dim"), float):
            raise ValueError(f"{path}: 'bits_per_dim' must be an object with a number 'bits_per_dim', got {bound!r}.")
        stderr = bound.get("bits_per_dim_stderr")
        if stderr is not None and not _is_kind(stderr, float):
            raise ValueError(f"{path}: 'bits_per_dim.bits_per_dim_stderr' must be a number, got {stderr!r}.")
    if not isinstance(samples, list):
        raise ValueError(f"{path}: 'samples' must be a list of rows, got {samples!r}.")
    for i, row in enumerate(samples):
        keys = [key for key in FRECHET_METRICS if isinstance(row, dict) and key in row]
        if not isinstance(row, dict) or not _is_kind(row.get("nfe"), int) or len(keys) != 1:
            raise ValueError(
                f"{path}: samples[{i}] must be an object with an integer 'nfe' and one of {list(FRECHET_METRICS)}, "
                f"got {row!r}."
            )
        if not _is_kind(row[keys[0]], float):
            raise ValueError(f"{path}: samples[{i}]['{keys[0]}'] must be a number, got {row[keys[0]]!r}.")
    if samples and not isinstance(data.get("feature_network"), str):
        raise ValueError(
            f"{path}: 'feature_network' (the network whose features the Fréchet distance compares) is missing."
        )
    if data.get("dataset") is not None and not isinstance(data["dataset"], str):
        raise ValueError(f"{path}: 'dataset' must be a string, got {data['dataset']!r}.")
    return data


def count_parameters(checkpoint_dir: str | os.PathLike) -> int:
    """Number of parameters in the safetensors weights, read from the file headers (no tensor is loaded)."""
    folder = Path(checkpoint_dir)
    index = folder / "model.safetensors.index.json"
    shards = sorted(set(_read_json(index)["weight_map"].values())) if index.exists() else ["model.safetensors"]
    total = 0
    for shard in shards:
        with open(folder / shard, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        total += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    return total


def load_training_config(checkpoint_dir: str | os.PathLike) -> dict | None:
    """The training settings of the run, for the card, or None.

    Looked up as ``training_config.json`` in the checkpoint, else ``../logs/config.json`` (where
    ``examples/pretrain.py`` writes them next to ``final/``). Absolute paths are reduced to file names and
    bookkeeping keys (output folder, trackers, ...) are dropped, so a published card does not reveal the machine's
    layout.
    """
    folder = Path(checkpoint_dir)
    logs = folder.parent / "logs" / "config.json"
    for path, root in ((folder / TRAINING_CONFIG_FILE, folder), (logs, folder.parent)):
        if path.is_file():
            refuse_outside_files(root, [path.relative_to(root).as_posix()])
            raw = _read_json(path)
            if not isinstance(raw, dict):
                raise ValueError(f"{path} holds {type(raw).__name__}; expected a JSON object of training settings.")
            return public_settings(raw)
    return None


def public_settings(settings: Mapping[str, Any]) -> dict:
    """Training settings as they may be published: bookkeeping keys (:data:`PRIVATE_TRAINING_KEYS`) dropped, every
    key that may name a secret (a word of :data:`SECRET_WORDS`: ``hub_token``, ``wandb_api_key``, ``password``) and
    every value that looks like an access token dropped at any depth, absolute paths reduced to their last
    component (:func:`_public`)."""

    def secret_name(key: Any) -> bool:
        words = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", str(key)).lower()
        return any(word in SECRET_WORDS for word in re.split(r"[^a-z0-9]+", words))

    def clean(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {k: clean(v) for k, v in value.items() if not secret_name(k) and not _secret_value(v)}
        if isinstance(value, list):
            return [clean(v) for v in value if not _secret_value(v)]
        return value

    return _public(clean({k: v for k, v in settings.items() if k not in PRIVATE_TRAINING_KEYS}))


def _secret_value(value: Any) -> bool:
    return isinstance(value, str) and bool(SECRET_VALUE.match(value.strip()))


SAFETENSORS_DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "U16": 16, "I16": 16, "F16": 16,
    "BF16": 16, "U32": 32, "I32": 32, "F32": 32, "U64": 64, "I64": 64, "F64": 64, "F4": 4, "F6_E2M3": 6,
    "F6_E3M2": 6, "C64": 64,
}  # fmt: skip


def _is_safetensors(path: Path) -> bool:
    """Whether ``path`` is exactly a safetensors file: an 8-byte little-endian header length N, an N-byte JSON
    object whose tensors each have a known dtype, a shape and ``data_offsets`` that match them, laid end to end from
    0, and nothing after the last tensor's data (the file's length is ``8 + N + end``, so no bytes are smuggled
    after it)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                return False
            (length,) = struct.unpack("<Q", prefix)
            if length < 2 or length > min(size - 8, 100 * 2**20):
                return False
            header = f.read(length)
    except OSError:
        return False
    if not header.startswith(b"{"):
        return False
    try:
        entries = json.loads(header)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False
    if not isinstance(entries, dict):
        return False
    spans = []
    for name, entry in entries.items():
        if name == "__metadata__":
            if not isinstance(entry, dict):
                return False
            continue
        if not isinstance(entry, dict) or entry.get("dtype") not in SAFETENSORS_DTYPE_BITS:
            return False
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not (isinstance(shape, list) and all(_is_kind(n, int) and n >= 0 for n in shape)):
            return False
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_kind(n, int) for n in offsets)):
            return False
        begin, end = offsets
        if not 0 <= begin <= end or (end - begin) * 8 != math.prod(shape) * SAFETENSORS_DTYPE_BITS[entry["dtype"]]:
            return False
        spans.append((begin, end))
    position = 0
    for begin, end in sorted(spans):  # contiguous from 0, no overlap, no gap
        if begin != position:
            return False
        position = end
    return size == 8 + length + position


def _pickle_magic(head: bytes) -> str | None:
    """What the first bytes of a file say it is, when that is a pickle (any protocol) or a numpy array.

    Protocols 2 and later start with opcode ``0x80``; protocols 0 and 1 have no header, so the bytes are parsed as
    pickle opcodes (:mod:`pickletools`): a stream that parses to its STOP opcode, or fills the whole window without
    an invalid opcode, is a pickle. Text files fail within a few bytes (JSON, Markdown, merges lists)."""
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return f"a pickle stream (protocol {head[1]})"
    if head.startswith(b"\x93NUMPY"):
        return "a numpy .npy array (it can hold pickled objects)"
    if head and _parses_as_pickle(head):
        return "a pickle stream (protocol 0 or 1)"
    return None


def _parses_as_pickle(data: bytes) -> bool:
    import pickletools

    operations = 0
    try:
        for opcode, _, _ in pickletools.genops(io.BytesIO(data)):
            operations += 1
            if opcode.name == "STOP":
                return operations > 1
    except Exception:  # noqa: BLE001 - any parse failure means "not a pickle stream"
        # Running out of the window after many valid opcodes is a long pickle, not text.
        return len(data) >= SNIFF_BYTES and operations >= 64
    return len(data) >= SNIFF_BYTES and operations >= 64


def _is_kind(value: Any, kind: type) -> bool:
    """Whether a JSON value is a ``kind``: ints count as floats, booleans as neither."""
    if kind in (int, float):
        return isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path} does not exist.") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None


def _public(value: Any) -> Any:
    """``value`` with every absolute path (in nested dicts and lists too) reduced to its last component, so that
    published files do not reveal the layout of the machine they were made on."""
    if isinstance(value, dict):
        return {k: _public(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_public(v) for v in value]
    if isinstance(value, str) and os.path.isabs(value) and "\n" not in value:
        return Path(value).name
    return value
