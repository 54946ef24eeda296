"""MD4 (ℓ = 1) against MDM-Prime (ℓ = 2, 3) on scikit-learn's 8 × 8 digits at the same training budget.

Every model is trained by ``examples/train_images.py`` with the same transformer, data order, optimiser, schedule and
number of steps; only ℓ differs. 17 grey levels allow ℓ ≤ 3 (ℓ = 2: base 5, 8 invalid codes; ℓ = 3: base 3, 10
invalid codes; ℓ = 4 would leave the most significant digit always 0). For every model:

- bits per dimension on the 360 held-out digits from the valid bound (``nll_bound``, K Monte-Carlo samples per
  image), mean ± the standard error over images;
- at NFE 8, 16, 32, 64: the **classifier Fréchet distance** (CFD: the Fréchet distance between the penultimate
  features of a small CNN trained on the training digits, for N generated and the 1,437 training digits; *not* FID,
  which means little at 8 × 8) and class coverage (classes the classifier sees among the samples, and the total
  variation of their histogram from uniform). The held-out digits give the floor of both numbers.

Writes JSON, a markdown table, a CFD-against-NFE PNG and one sample grid per ℓ to benchmarks/results/.

    python benchmarks/images.py          # the committed results (about 15 minutes on 2 CPU cores)
    python benchmarks/images.py --tiny   # a smoke configuration (seconds)
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from modeling_mdm_prime import MDMPrimeForImageDiffusion
from modeling_mdm_prime.tools.image_data import load_digits_split, save_image_grid
from modeling_mdm_prime.tools.image_metrics import DigitsMetrics

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
FULL = dict(steps=1200, ells=(1, 2, 3), nfes=(8, 16, 32, 64), samples=720, time_samples=16)
TINY = dict(steps=4, ells=(1, 2), nfes=(4, 8), samples=20, time_samples=2)


def train(ell: int, steps: int, output: Path, tiny: bool, reuse: bool) -> float:
    """Train one model with examples/train_images.py in a subprocess; returns the training wall time in seconds.
    With ``reuse``, a finished run in ``output`` is kept and its time read from its metrics log."""
    metrics = output / "logs" / "metrics.jsonl"
    if reuse and (output / "final" / "model.safetensors").is_file() and metrics.is_file():
        rows = [json.loads(line) for line in metrics.read_text().splitlines()]
        return max(row.get("train/seconds", 0.0) for row in rows)
    args = ["--num_sub_tokens", str(ell), "--max_steps", str(steps), "--output_dir", str(output)]
    args += ["--overwrite_output_dir", "--report_to", "jsonl", "--eval_every", str(steps), "--num_samples", "10"]
    if tiny:
        args += ["--hidden_size", "32", "--num_hidden_layers", "1", "--num_attention_heads", "2", "--eval_images", "8"]
    elif ell == 3:
        # The ℓ sub-token embeddings of a pixel are concatenated: the width must be divisible by 3 (and each head's
        # by 4 for 2-D RoPE): 132 = 3 heads of 44, 6 % more parameters than the 128-wide models.
        args += ["--hidden_size", "132", "--num_attention_heads", "3", "--intermediate_size", "528"]
    subprocess.run([sys.executable, str(REPO / "examples" / "train_images.py"), *args], check=True)
    return train(ell, steps, output, tiny, reuse=True)


@torch.no_grad()
def bits_per_dim(model, images: torch.Tensor, time_samples: int) -> tuple[float, float]:
    per_image = torch.cat(
        [
            model.nll_bound(
                chunk, num_time_samples=time_samples, generator=torch.Generator().manual_seed(i)
            ).bits_per_dim
            for i, chunk in enumerate(images.split(120))
        ]
    )
    return float(per_image.mean()), float(per_image.std() / math.sqrt(len(per_image)))


def plot(rows: list[dict], floor: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for ell in sorted({r["ell"] for r in rows}):
        mine = [r for r in rows if r["ell"] == ell]
        label = "MD4 (ℓ = 1)" if ell == 1 else f"MDM-Prime (ℓ = {ell})"
        ax.plot([r["nfe"] for r in mine], [r["cfd"] for r in mine], marker="o", label=label)
    ax.axhline(floor, color="grey", linestyle="--", label="held-out digits")
    ax.set(xscale="log", xlabel="NFE (network evaluations per sample)", ylabel="classifier Fréchet distance")
    ax.set_xticks(sorted({r["nfe"] for r in rows}), labels=[str(n) for n in sorted({r["nfe"] for r in rows})])
    ax.set_title("8 × 8 digits: CFD (not FID) against NFE, lower is better", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a seconds-long smoke configuration")
    parser.add_argument("--work_dir", default="outputs/benchmark_images", help="where the models are trained")
    parser.add_argument("--reuse_models", action="store_true", help="keep models already trained in work_dir")
    args = parser.parse_args(argv)
    settings = TINY if args.tiny else FULL
    torch.manual_seed(0)
    split = load_digits_split(seed=0)
    metrics = DigitsMetrics(split.train_images, split.train_labels, split.test_images, split.test_labels, seed=0)
    floor = metrics(split.test_images)
    cfd_floor = floor["classifier_frechet_distance"]
    print(f"classifier test accuracy {metrics.test_accuracy:.3f}; held-out digits: CFD {cfd_floor:.2f}")

    models, rows = [], []
    for ell in settings["ells"]:
        output = Path(args.work_dir) / f"ell{ell}"
        seconds = train(ell, settings["steps"], output, args.tiny, args.reuse_models)
        model = MDMPrimeForImageDiffusion.from_pretrained(output / "final").eval()
        bpd, bpd_se = bits_per_dim(model, split.test_images, settings["time_samples"])
        models.append(dict(ell=ell, base=model.codec.base, train_seconds=seconds, bpd=bpd, bpd_stderr=bpd_se,
                           parameters=model.num_parameters()))  # fmt: skip
        print(f"ℓ={ell}: {bpd:.4f} ± {bpd_se:.4f} bits/dim (valid bound), trained in {seconds:.0f} s")
        for nfe in settings["nfes"]:
            start = time.time()
            samples = model.generate(num_images=settings["samples"], num_steps=nfe, seed=1)
            seconds = time.time() - start
            scores = metrics(samples)
            rows.append(dict(ell=ell, nfe=nfe, cfd=scores["classifier_frechet_distance"],
                             classes_covered=round(10 * scores["coverage"]), class_tv=scores["tv_to_uniform"],
                             sample_seconds=seconds))  # fmt: skip
            print(f"  NFE {nfe}: CFD {rows[-1]['cfd']:.2f}, classes {rows[-1]['classes_covered']}")
            if nfe == max(settings["nfes"]):
                save_image_grid(samples[:100], 17, RESULTS / f"images_digits_ell{ell}.png", nrow=10)

    report = dict(
        benchmark="images.py", settings={k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()},
        machine=f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        feature_network=metrics.network, classifier_test_accuracy=metrics.test_accuracy,
        held_out=dict(cfd=cfd_floor, classes_covered=round(10 * floor["coverage"]), class_tv=floor["tv_to_uniform"]),
        models=models, generation=rows,
    )  # fmt: skip
    suffix = "_tiny" if args.tiny else ""
    (RESULTS / f"images_digits{suffix}.json").write_text(json.dumps(report, indent=2))
    table = markdown(report)
    (RESULTS / f"images_digits{suffix}.md").write_text(table)
    plot(rows, cfd_floor, RESULTS / f"images_digits_cfd{suffix}.png")
    print(table)


def markdown(report: dict) -> str:
    nfes = sorted({r["nfe"] for r in report["generation"]})
    lines = [
        "| model | bits/dim (valid bound, ± s.e.) | " + " | ".join(f"CFD @ NFE {n}" for n in nfes) + " | classes @ NFE "
        f"{nfes[-1]} |",
        "|---|---:|" + "---:|" * len(nfes) + "---:|",
    ]
    for m in report["models"]:
        cells = {r["nfe"]: r for r in report["generation"] if r["ell"] == m["ell"]}
        name = "MD4 (ℓ = 1)" if m["ell"] == 1 else f"MDM-Prime (ℓ = {m['ell']}, b = {m['base']})"
        lines.append(
            f"| {name} | {m['bpd']:.3f} ± {m['bpd_stderr']:.3f} | "
            + " | ".join(f"{cells[n]['cfd']:.2f}" for n in nfes)
            + f" | {cells[nfes[-1]]['classes_covered']}/10 |"
        )
    held = report["held_out"]
    lines.append(
        "| held-out digits (floor) | — | "
        + " | ".join(f"{held['cfd']:.2f}" for _ in nfes)
        + f" | {held['classes_covered']}/10 |"
    )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
