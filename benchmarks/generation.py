"""Cost of MDM-Prime's ``generate()``: sampler overhead, the idle-step cache's speedup, and tokens/s (ℓ = 1, 2, 4).

Every generate() call is unconditional (``max_new_tokens=L``), seeded with ``--seed``, on randomly initialised
models of equal size (``time_conditioning=False``, so the idle-step cache is exact). All calls run in
``--rounds`` interleaved rounds (every ℓ and setting once per round) and medians over rounds are quoted, so the
ratios compare quantities measured side by side in one run.

1. Sampler overhead (T = L, cache off, batch B): generate()'s wall time against NFE × t_forward, t_forward the
   median time of one ``model.denoise`` call on an all-masked (B, L) canvas with the attention mask and
   ``positions`` that generate() passes. ``model.denoise`` builds the consistency filter and log-softmax over
   the C tokens, so only the sampler's own work is overhead. The output layer runs only on positions that
   still hold a masked sub-token, so late calls are cheaper than the all-masked one; for that reason the
   overhead is also quoted against the network time measured inside the same call (``model.denoise`` wrapped
   with a timer): wall ÷ Σ t_denoise − 1.
2. Idle-step cache (ℓ = 1, batch 1, T = L and T = 4L): wall time cache off ÷ cache on (same seed, identical
   sequences, asserted), the NFE ratio nfe_off ÷ nfe_on, and the prediction 1 ÷ (1 − ISR) with the idle-step
   rate ISR = (1 − 1/T)^(L·ℓ) (each of the L·ℓ sub-tokens is revealed at one of the T steps, uniformly); the
   measured ISR is mean(idle_steps) ÷ T. Batch 1 because a batched step is skipped only when no row changed.
3. Tokens/s (T = L, cache on, batch B): B × L tokens per call ÷ wall time; the NFE is compared with
   T · (1 − ISR^B), the expected number of steps in which at least one row changed.

Full run (from the repository root):  python benchmarks/generation.py
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from tqdm import tqdm

try:
    from modeling_mdm_prime import MDMPrimeConfig, MDMPrimeForMaskedDiffusion
except ModuleNotFoundError:  # run as a file from a checkout without installing: use the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from modeling_mdm_prime import MDMPrimeConfig, MDMPrimeForMaskedDiffusion

ELLS = (1, 2, 4)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab_size", "--vocab-size", type=int, default=50257, help="vocabulary C (GPT-2: 50,257)")
    p.add_argument("--hidden_size", "--hidden-size", type=int, default=128, help="transformer width")
    p.add_argument(
        "--num_hidden_layers", "--num_layers", "--num-layers", type=int, default=2, help="transformer blocks"
    )
    p.add_argument("--num_attention_heads", "--num_heads", "--num-heads", type=int, default=4, help="attention heads")
    p.add_argument(
        "--intermediate_size", "--intermediate-size", type=int, default=None, help="default: 4 × hidden size"
    )
    p.add_argument("--seq_len", "--seq-len", type=int, default=64, help="L, generated tokens per sequence")
    p.add_argument("--batch_size", "--batch-size", type=int, default=4, help="B of parts 1 and 3")
    p.add_argument(
        "--cache_batch_size",
        "--cache-batch-size",
        type=int,
        default=1,
        help="B of part 2 (the ISR formula is for B = 1)",
    )
    p.add_argument("--long_steps", "--long-steps", type=int, default=4, help="part 2 also runs T = this × L")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    p.add_argument(
        "--forward_repeats", "--forward-repeats", type=int, default=3, help="timed denoise calls per ℓ per round"
    )
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation and generation")
    p.add_argument("--output", type=Path, default=Path("benchmarks/results/generation.json"), help="results JSON")
    return p.parse_args(argv)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def build_model(a: argparse.Namespace, ell: int, device: torch.device) -> MDMPrimeForMaskedDiffusion:
    torch.manual_seed(a.seed)
    cfg = MDMPrimeConfig(
        vocab_size=a.vocab_size, num_sub_tokens=ell, hidden_size=a.hidden_size, num_hidden_layers=a.num_hidden_layers,
        num_attention_heads=a.num_attention_heads, intermediate_size=a.intermediate_size or 4 * a.hidden_size,
        max_position_embeddings=a.seq_len, dropout=0.0,
    )  # fmt: skip
    model = MDMPrimeForMaskedDiffusion(cfg).to(device).eval()
    net_time = [0.0]  # seconds spent inside model.denoise; generate() calls self.denoise, so the wrapper sees it
    denoise = model.denoise

    def timed_denoise(*args, **kwargs):
        sync(device)
        start = time.perf_counter()
        out = denoise(*args, **kwargs)
        sync(device)
        net_time[0] += time.perf_counter() - start
        return out

    model.denoise, model.net_time = timed_denoise, net_time
    return model


def time_forward(model: MDMPrimeForMaskedDiffusion, batch: int, length: int, repeats: int) -> list[float]:
    """Seconds per ``denoise`` call on an all-masked (batch, length) canvas, as generate() calls it."""
    device = model.device
    sub = torch.full((batch, length, model.config.num_sub_tokens), model.codec.mask_id, device=device)
    ones = torch.ones(batch, length, dtype=torch.bool, device=device)
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        model.denoise(sub, attention_mask=ones, positions=ones)
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def time_generate(model: MDMPrimeForMaskedDiffusion, batch: int, length: int, steps: int, cache: bool, seed: int):
    model.net_time[0] = 0.0
    sync(model.device)
    start = time.perf_counter()
    out = model.generate(
        max_new_tokens=length, num_steps=steps, num_return_sequences=batch, seed=seed, use_idle_cache=cache,
        return_dict_in_generate=True,
    )  # fmt: skip
    sync(model.device)
    wall = time.perf_counter() - start
    return {"wall_s": wall, "net_s": model.net_time[0], "nfe": out.nfe, "sequences": out.sequences.cpu(),
            "isr": (out.idle_steps.float() / steps).mean().item()}  # fmt: skip


def isr_formula(steps: int, length: int, ell: int) -> float:
    return (1 - 1 / steps) ** (length * ell)


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()}
    print("config:", json.dumps(config), f"| device: {device} ({device_name(device)})", flush=True)
    L, B, B2 = a.seq_len, a.batch_size, a.cache_batch_size
    models = {ell: build_model(a, ell, device) for ell in ELLS}

    # jobs: key -> (callable); every job runs once per round, in this order
    jobs = {}
    for ell in ELLS:
        jobs[("fwd", ell)] = lambda ell=ell: time_forward(models[ell], B, L, a.forward_repeats)
        for cache in (False, True):
            jobs[("gen", ell, cache)] = lambda ell=ell, c=cache: time_generate(models[ell], B, L, L, c, a.seed)
    cache_steps = (L, a.long_steps * L)
    for steps in cache_steps:
        for cache in (False, True):
            jobs[("cache", steps, cache)] = lambda s=steps, c=cache: time_generate(models[1], B2, L, s, c, a.seed)

    for model in tqdm(models.values(), desc="warm-up", leave=False):
        time_forward(model, B, L, 1)
        model.generate(max_new_tokens=L, num_steps=4, num_return_sequences=B, seed=a.seed)
    runs: dict[tuple, list] = {key: [] for key in jobs}
    with tqdm(total=a.rounds * len(jobs), desc="timing") as bar:
        for _ in range(a.rounds):
            for key, job in jobs.items():
                runs[key].append(job())
                bar.update()

    def med(key, field):
        return statistics.median(r[field] for r in runs[key])

    def same_sequences(*keys) -> bool:
        first = runs[keys[0]][0]["sequences"]
        return all(torch.equal(r["sequences"], first) for k in keys for r in runs[k])

    # 1 + 3: sampler overhead and tokens/s
    sampler = {}
    for ell in ELLS:
        off, on = ("gen", ell, False), ("gen", ell, True)
        assert same_sequences(off, on), f"ℓ={ell}: the idle-step cache changed the samples"
        t_fwd = statistics.median(t for ts in runs[("fwd", ell)] for t in ts)
        isr = isr_formula(L, L, ell)
        sampler[ell] = {
            "t_forward_s": t_fwd, "t_forward_samples": runs[("fwd", ell)], "nfe_off": runs[off][0]["nfe"],
            "wall_off_s": med(off, "wall_s"), "net_off_s": med(off, "net_s"), "nfe_on": runs[on][0]["nfe"],
            "wall_on_s": med(on, "wall_s"), "wall_off_samples": [r["wall_s"] for r in runs[off]],
            "wall_on_samples": [r["wall_s"] for r in runs[on]], "isr_measured": runs[off][0]["isr"],
            "isr_formula": isr, "nfe_on_predicted": L * (1 - isr**B),
        }  # fmt: skip
        s = sampler[ell]
        s["overhead_vs_nfe_x_t_forward"] = s["wall_off_s"] / (s["nfe_off"] * t_fwd) - 1
        s["overhead_vs_net_time"] = statistics.median(r["wall_s"] / r["net_s"] - 1 for r in runs[off])
        s["tokens_per_s"] = B * L / s["wall_on_s"]
        s["tokens_per_s_cache_off"] = B * L / s["wall_off_s"]

    print(f"\n### 1. Sampler overhead (T = L = {L}, B = {B}, cache off)\n")
    print("| ℓ | NFE | t_forward ms | wall s | wall ÷ (NFE × t_forward) − 1 | net time s | wall ÷ net − 1 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for ell, s in sampler.items():
        print(
            f"| {ell} | {s['nfe_off']} | {s['t_forward_s'] * 1e3:.1f} | {s['wall_off_s']:.2f} "
            f"| {s['overhead_vs_nfe_x_t_forward']:+.1%} | {s['net_off_s']:.2f} | {s['overhead_vs_net_time']:+.1%} |"
        )

    # 2: idle-step cache, ℓ = 1
    cache_results = {}
    for steps in cache_steps:
        off, on = ("cache", steps, False), ("cache", steps, True)
        assert same_sequences(off, on), f"T={steps}: the idle-step cache changed the samples"
        isr = isr_formula(steps, L, 1)
        nfe_off, nfe_on = runs[off][0]["nfe"], runs[on][0]["nfe"]
        cache_results[steps] = {
            "nfe_off": nfe_off, "nfe_on": nfe_on, "nfe_ratio": nfe_off / nfe_on, "nfe_ratio_predicted": 1 / (1 - isr),
            "wall_off_s": med(off, "wall_s"), "wall_on_s": med(on, "wall_s"),
            "speedup": statistics.median(f["wall_s"] / n["wall_s"] for f, n in zip(runs[off], runs[on], strict=True)),
            "isr_measured": runs[off][0]["isr"], "isr_formula": isr,
            "net_off_s": med(off, "net_s"), "net_on_s": med(on, "net_s"),
            "wall_off_samples": [r["wall_s"] for r in runs[off]], "wall_on_samples": [r["wall_s"] for r in runs[on]],
        }  # fmt: skip
    print(f"\n### 2. Idle-step cache (ℓ = 1, L = {L}, B = {B2}; speedup = wall off ÷ wall on, per round, median)\n")
    print("| T | NFE off | NFE on | NFE ratio | predicted 1 ÷ (1 − ISR) | wall off s | wall on s | speedup "
          "| ISR measured | ISR formula |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for steps, c in cache_results.items():
        print(
            f"| {steps} | {c['nfe_off']} | {c['nfe_on']} | {c['nfe_ratio']:.2f} | {c['nfe_ratio_predicted']:.2f} "
            f"| {c['wall_off_s']:.2f} | {c['wall_on_s']:.2f} | {c['speedup']:.2f} | {c['isr_measured']:.3f} "
            f"| {c['isr_formula']:.3f} |"
        )

    print(f"\n### 3. Tokens/s (T = L = {L}, B = {B}, {B * L} tokens per call, cache on)\n")
    print("| ℓ | NFE | predicted T(1 − ISR^B) | wall s | tokens/s | tokens/s cache off | ISR measured | ISR formula |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for ell, s in sampler.items():
        print(
            f"| {ell} | {s['nfe_on']} | {s['nfe_on_predicted']:.1f} | {s['wall_on_s']:.2f} | {s['tokens_per_s']:.1f} "
            f"| {s['tokens_per_s_cache_off']:.1f} | {s['isr_measured']:.3f} | {s['isr_formula']:.3f} |"
        )

    report = {
        "config": config,
        "device": str(device),
        "device_name": device_name(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "sampler_and_tokens_per_s": {str(ell): s for ell, s in sampler.items()},
        "idle_cache_l1": {str(steps): c for steps, c in cache_results.items()},
    }
    a.output.parent.mkdir(parents=True, exist_ok=True)
    a.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {a.output}")


if __name__ == "__main__":
    main()
