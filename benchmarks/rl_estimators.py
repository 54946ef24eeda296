"""Which sequence log-likelihood estimator gives RL the most accurate value and gradient per network call?

Every estimator of ``modeling_mdm_prime.tools.rl_likelihood`` is compared with the exact quantity, on three models:

* ``oracle`` (ℓ = 1 and 2): the network is the exact conditionals of a known distribution q over 3^4 sequences, so the
  target is the true ``log q(completion | prompt)`` (the ELBO is tight for it); value only (no parameters);
* ``random`` (ℓ = 2): a tiny randomly initialised model; the target is its ELBO by enumerating every mask, and its
  exact gradient with respect to all parameters;
* ``reference`` (ℓ = 2): the committed 1M-parameter Shakespeare checkpoint, trained; same targets, on a completion
  of five tokens (10 digits: 1,023 masks enumerated).

For each estimator and number of samples K, ``--repeats`` independent estimates give the value's bias (± s.e.) and
standard deviation, and the gradient's relative error ``‖ĝ - g‖ / ‖g‖`` and cosine with the exact gradient g, all
against the network calls (NFE) one estimate costs.

    python benchmarks/rl_estimators.py                 # ~3 minutes on 2 CPU cores
    python benchmarks/rl_estimators.py --repeats 20 --num_time_samples 1,2 --output_dir /tmp/rl   # a smoke run

Writes ``rl_estimators.json``, ``.md`` and ``.png`` (gradient error against NFE) to ``--output_dir``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer

from modeling_mdm_prime import MDMPrimeConfig, MDMPrimeForMaskedDiffusion
from modeling_mdm_prime.tools.cli import option_strings
from modeling_mdm_prime.tools.rl_likelihood import (
    exact_elbo,
    exact_log_likelihood,
    oracle_logits,
    sequence_log_likelihood,
)

REPO = Path(__file__).resolve().parents[1]
LABELS = {"elbo": "elbo (count)", "coupled": "coupled (complementary)", "one_pass": "one pass (d1)",
          "upper": "upper (tangent)"}  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(*option_strings("num_time_samples"), default="1,2,4,8",
                   help="Monte-Carlo draws K per estimate, comma-separated")  # fmt: skip
    p.add_argument("--repeats", type=int, default=100, help="independent estimates per setting")
    p.add_argument("--seed", type=int, default=0, help="seed of the estimates")
    p.add_argument(*option_strings("output_dir"), type=Path, default=REPO / "benchmarks" / "results",
                   help="where rl_estimators.json, .md and .png go")  # fmt: skip
    return p.parse_args(argv)


def oracle_model(ell: int):
    """A tiny model whose network is replaced by the exact conditionals of a random distribution over 3^4
    sequences; returns it with a (prompt, completion) pair and the true log q(completion | prompt)."""
    vocab, length = 3, 4
    gen = torch.Generator().manual_seed(ell)
    sequences = torch.cartesian_prod(*[torch.arange(vocab)] * length)
    probs = torch.rand(len(sequences), generator=gen, dtype=torch.float64).pow(3)
    probs /= probs.sum()
    config = MDMPrimeConfig(vocab_size=vocab, num_sub_tokens=ell, hidden_size=16, num_hidden_layers=1,
                            num_attention_heads=2, intermediate_size=16, max_position_embeddings=8,
                            time_conditioning=False)  # fmt: skip
    model = MDMPrimeForMaskedDiffusion(config).eval()

    def oracle(sub_ids, attention_mask=None, noise_level=None, positions=None, check_inputs=True):
        return oracle_logits(model.codec, sequences, probs, sub_ids, positions)

    model.token_logits = oracle
    row = sequences[int(probs.argmax())]
    prompt, completion = row[:2].unsqueeze(0), row[2:].unsqueeze(0)
    joint = probs[(sequences == row).all(1)].sum()
    marginal = probs[(sequences[:, :2] == row[:2]).all(1)].sum()
    return model, prompt, completion, float((joint / marginal).log())


def random_model():
    torch.manual_seed(0)
    config = MDMPrimeConfig(vocab_size=12, num_sub_tokens=2, hidden_size=48, num_hidden_layers=2,
                            num_attention_heads=4, intermediate_size=96, max_position_embeddings=16,
                            time_conditioning=False)  # fmt: skip
    return MDMPrimeForMaskedDiffusion(config).eval(), torch.tensor([[3, 4]]), torch.tensor([[1, 2, 7, 5]])


def reference_model():
    path = REPO / "checkpoints" / "mdm-prime-shakespeare-tiny"
    model = AutoModel.from_pretrained(path, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer("ROMEO: O my love, good night!")["input_ids"]
    return model, torch.tensor([ids[:-5]]), torch.tensor([ids[-5:]])


def flat_grad(model, value: torch.Tensor) -> torch.Tensor:
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(value.sum(), params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)])


def measure(name: str, model, prompt, completion, targets: dict, a) -> list[dict]:
    """``targets``: ``{"elbo": (value, gradient), "log_likelihood": (value, gradient)}``; ``upper`` is compared
    with the exact log-likelihood, the others with the ELBO (gradients None for the oracles)."""
    rows = []
    generator = torch.Generator().manual_seed(a.seed)
    for estimator in LABELS:
        target, exact_grad = targets["log_likelihood" if estimator == "upper" else "elbo"]
        if estimator == "one_pass":
            sample_counts = [1]  # deterministic
        else:
            sample_counts = [int(k) for k in a.num_time_samples.split(",")]
        if estimator == "upper":
            sample_counts = [k for k in sample_counts if k >= 2]  # ψ comes from the other samples
        for k in sample_counts:
            values, errors, cosines, nfe = [], [], [], 0
            repeats = 1 if estimator == "one_pass" else a.repeats
            for _ in range(repeats):
                with torch.set_grad_enabled(exact_grad is not None):
                    estimate = sequence_log_likelihood(model, prompt, completion, estimator=estimator,
                                                       num_samples=k, generator=generator)  # fmt: skip
                values.append(float(estimate.log_likelihood))
                nfe = estimate.nfe
                if exact_grad is not None:
                    g = flat_grad(model, estimate.log_likelihood)
                    errors.append(float((g - exact_grad).norm() / exact_grad.norm()))
                    cosines.append(float(torch.nn.functional.cosine_similarity(g, exact_grad, dim=0)))
            v = torch.tensor(values, dtype=torch.float64)
            sd = float(v.std()) if len(v) > 1 else 0.0
            rows.append({
                "model": name, "estimator": estimator, "samples": k, "nfe": nfe, "repeats": repeats,
                "target": target, "value_bias": float(v.mean()) - target,
                "value_bias_stderr": sd / math.sqrt(len(v)), "value_sd": sd,
                "grad_rel_error": None if not errors else sum(errors) / len(errors),
                "grad_cosine": None if not cosines else sum(cosines) / len(cosines),
            })  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    return rows


def render_markdown(report: dict) -> str:
    lines = [
        f"{report['machine']}, {report['config']['repeats']} independent estimates per row. Value: bias of the "
        "mean against the target (± s.e.) and the estimates' standard deviation, in nats per sequence. Gradient: "
        "mean relative error ‖ĝ − g‖ / ‖g‖ and cosine against the exact gradient of the target. Target: the "
        "enumerated ELBO, or for `upper` the exact log-likelihood (every reveal order); for the oracles both are "
        "log q.",
        "",
        "| model | estimator | K | NFE | target | value bias | value s.d. | grad. rel. error | grad. cosine |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        grad = ("–", "–") if r["grad_rel_error"] is None else (f"{r['grad_rel_error']:.3f}", f"{r['grad_cosine']:.3f}")
        lines.append(
            f"| {r['model']} | {LABELS[r['estimator']]} | {r['samples']} | {r['nfe']} | {r['target']:.4f} | "
            f"{r['value_bias']:+.4f} ± {r['value_bias_stderr']:.4f} | {r['value_sd']:.4f} | {grad[0]} | {grad[1]} |"
        )
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in dict.fromkeys(r["model"] for r in report["rows"] if r["grad_rel_error"] is not None)]
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        for estimator in LABELS:
            rows = [r for r in report["rows"] if r["model"] == model and r["estimator"] == estimator]
            ax.plot([r["nfe"] for r in rows], [r["grad_rel_error"] for r in rows], "o-", label=LABELS[estimator])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("network calls per estimate (NFE)")
        ax.set_ylabel("gradient relative error ‖ĝ − g‖ / ‖g‖")
        ax.set_title(model)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    a = parse_args(argv)
    start = time.time()
    rows = []
    for ell in (1, 2):
        model, prompt, completion, truth = oracle_model(ell)
        with torch.no_grad():
            enumerated = float(exact_elbo(model, prompt, completion))
        print(f"oracle ℓ={ell}: log q = {truth:.6f}, enumerated ELBO = {enumerated:.6f}", flush=True)
        targets = {"elbo": (truth, None), "log_likelihood": (truth, None)}
        rows += measure(f"oracle ℓ={ell}", model, prompt, completion, targets, a)
    for name, (model, prompt, completion) in (("random ℓ=2", random_model()), ("reference ℓ=2", reference_model())):
        elbo = exact_elbo(model, prompt, completion)
        log_likelihood = exact_log_likelihood(model, prompt, completion)
        print(f"{name}: log π = {float(log_likelihood):.6f}, ELBO = {float(elbo):.6f}", flush=True)
        targets = {
            "elbo": (float(elbo), flat_grad(model, elbo).detach()),
            "log_likelihood": (float(log_likelihood), flat_grad(model, log_likelihood).detach()),
        }
        rows += measure(name, model, prompt, completion, targets, a)
    machine = f"{platform.machine()} CPU, torch {torch.__version__}"
    config = {"num_time_samples": a.num_time_samples, "repeats": a.repeats, "seed": a.seed}
    report = {"config": config, "machine": machine, "seconds": time.time() - start, "rows": rows}
    a.output_dir.mkdir(parents=True, exist_ok=True)
    (a.output_dir / "rl_estimators.json").write_text(json.dumps(report, indent=2) + "\n")
    table = render_markdown(report)
    (a.output_dir / "rl_estimators.md").write_text(table + "\n")
    plot(report, a.output_dir / "rl_estimators.png")
    print(table)
    return report


if __name__ == "__main__":
    main()
