"""Training-step throughput of MDM-Prime (ℓ = 1, 2, 4) vs GPT-2, and peak memory of the loss at C = 50,257.

Throughput: one step = forward + backward + AdamW step on a fixed random batch, for GPT-2 (``labels=input_ids``)
and MDM-Prime (``model(input_ids).loss``; it samples t and masks itself) at equal width, depth, heads, MLP size,
sequence length, batch and vocabulary, dropout 0. Models are timed interleaved (rounds of gpt2, ℓ=1, ℓ=2, ℓ=4;
within a round every model is reseeded alike) and the median per model is quoted; tokens/s counts all B × L input
tokens (MDM-Prime runs its output layer only on the rows with a masked sub-token, so its per-step work varies with t).

Loss memory: peak extra bytes of loss + backward on an (N, C) fp32 logits tensor that requires grad (the
logits themselves excluded, their gradient included), as a multiple of N × C × 4 bytes. On CUDA:
``max_memory_allocated`` after ``reset_peak_memory_stats``. On CPU: the torch profiler with
``profile_memory=True`` logs every allocation and free of the c10 CPU allocator with its size; the running sum
over time gives the peak of allocated tensor bytes, the same quantity as CUDA's ``max_memory_allocated``. (RSS via
``ru_maxrss`` in a fresh process is not equivalent: it mixes in malloc caching and misses untouched pages of
``torch.empty`` buffers that are filled chunk by chunk.)

Full run (from the repository root):  python benchmarks/train_throughput.py
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from torch.profiler import ProfilerActivity, profile
from tqdm import tqdm

try:
    from modeling_mdm_prime import MDMPrimeConfig, MDMPrimeForMaskedDiffusion, SubTokenCodec, diffusion_terms
except ModuleNotFoundError:  # run as a file from a checkout without installing: use the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from modeling_mdm_prime import MDMPrimeConfig, MDMPrimeForMaskedDiffusion, SubTokenCodec, diffusion_terms

VOCAB = 50257
ELLS = (1, 2, 4)
MiB = 2**20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden_size", "--hidden-size", type=int, default=256, help="transformer width")
    p.add_argument(
        "--num_hidden_layers", "--num_layers", "--num-layers", type=int, default=4, help="transformer blocks"
    )
    p.add_argument("--num_attention_heads", "--num_heads", "--num-heads", type=int, default=4, help="attention heads")
    p.add_argument("--intermediate_size", "--intermediate-size", type=int, default=1024, help="MLP width")
    p.add_argument("--seq_len", "--seq-len", type=int, default=256, help="tokens per sequence")
    p.add_argument("--batch_size", "--batch-size", type=int, default=4, help="sequences per step")
    p.add_argument("--steps", type=int, default=3, help="timed steps per model per round")
    p.add_argument("--rounds", type=int, default=4, help="interleaved rounds; the median is reported")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model before the rounds")
    p.add_argument(
        "--loss_rows", "--loss-rows", type=int, default=1024, help="N, rows of the logits in the loss-memory test"
    )
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=("float32", "bf16"), default="float32", help="bf16 = autocast (for CUDA)")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation and inputs")
    p.add_argument("--output", type=Path, default=Path("benchmarks/results/train_throughput.json"), help="results JSON")
    return p.parse_args(argv)


def build_models(a: argparse.Namespace, device: torch.device) -> dict[str, torch.nn.Module]:
    torch.manual_seed(a.seed)
    gpt2_cfg = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=a.seq_len, n_embd=a.hidden_size, n_layer=a.num_hidden_layers,
        n_head=a.num_attention_heads, n_inner=a.intermediate_size, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        attn_implementation="sdpa",
    )  # fmt: skip
    models: dict[str, torch.nn.Module] = {"gpt2": transformers.GPT2LMHeadModel(gpt2_cfg)}
    for ell in ELLS:
        cfg = MDMPrimeConfig(
            vocab_size=VOCAB, num_sub_tokens=ell, hidden_size=a.hidden_size, num_hidden_layers=a.num_hidden_layers,
            num_attention_heads=a.num_attention_heads, intermediate_size=a.intermediate_size,
            max_position_embeddings=a.seq_len, dropout=0.0,
        )  # fmt: skip
        models[f"mdm-prime l={ell}"] = MDMPrimeForMaskedDiffusion(cfg)
    return {name: m.to(device).train() for name, m in models.items()}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(name: str, model: torch.nn.Module, ids: torch.Tensor, autocast: bool) -> Callable[[], float]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> float:
        with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=autocast):
            out = model(input_ids=ids, labels=ids) if name == "gpt2" else model(input_ids=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(out.loss.detach())

    return step


def peak_extra_bytes(fn: Callable[[], None], device: torch.device) -> int:
    """Peak bytes allocated by ``fn`` above what was allocated when it started (see module docstring)."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    return max(itertools.accumulate(n for _, n in events), default=0)


def loss_peak(ell: int | None, rows: int, device: torch.device, seed: int) -> int:
    """Peak extra bytes of GPT-2's loss (``ell=None``) or ``diffusion_terms`` with ℓ sub-tokens, + backward."""
    gen = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(rows, VOCAB, device=device, generator=gen).requires_grad_()
    targets = torch.randint(0, VOCAB, (rows,), device=device, generator=gen)
    codec = SubTokenCodec(VOCAB, ell or 1)
    codec.digit_table(device)  # cached lookup table: not part of the loss's working memory
    masked = torch.rand(rows, codec.num_sub_tokens, device=device, generator=gen) < 0.5
    masked[
        torch.arange(rows, device=device), torch.randint(0, codec.num_sub_tokens, (rows,), device=device, generator=gen)
    ] = True

    def run() -> None:
        if ell is None:
            F.cross_entropy(logits.float(), targets).backward()
        else:
            diffusion_terms(logits, targets, masked, codec, carry_over=True)[0].sum().backward()

    return peak_extra_bytes(run, device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()} | {"vocab_size": VOCAB}
    print("config:", json.dumps(config), f"| device: {device} ({device_name(device)})", flush=True)

    models = build_models(a, device)
    ids = torch.randint(0, VOCAB, (a.batch_size, a.seq_len), generator=torch.Generator().manual_seed(a.seed)).to(device)
    steps = {name: make_step(name, m, ids, a.dtype == "bf16") for name, m in models.items()}
    tokens_per_step = a.batch_size * a.seq_len
    for step in tqdm(steps.values(), desc="warm-up", leave=False):
        for _ in range(a.warmup):
            step()
    samples: dict[str, list[float]] = {name: [] for name in steps}
    losses: dict[str, list[float]] = {name: [] for name in steps}
    with tqdm(total=a.rounds * len(steps), desc="timing") as bar:
        for r in range(a.rounds):
            for name, step in steps.items():
                torch.manual_seed(a.seed + r)  # within a round, every model draws the same t / masks
                sync(device)
                start = time.perf_counter()
                losses[name] += [step() for _ in range(a.steps)]  # float() syncs every step
                sync(device)
                samples[name].append(a.steps * tokens_per_step / (time.perf_counter() - start))
                bar.set_postfix_str(f"{name}: {samples[name][-1]:,.0f} tok/s")
                bar.update()
    del models, steps

    loss_keys: dict[str, int | None] = {"gpt2": None} | {f"mdm-prime l={ell}": ell for ell in ELLS}
    logits_bytes = a.loss_rows * VOCAB * 4
    peaks = {
        name: loss_peak(ell, a.loss_rows, device, a.seed) for name, ell in tqdm(loss_keys.items(), desc="loss memory")
    }

    gpt2_tps = statistics.median(samples["gpt2"])
    results = {}
    for name, tps_samples in samples.items():
        tps = statistics.median(tps_samples)
        results[name] = {
            "num_sub_tokens": loss_keys[name],
            "tokens_per_s": tps,
            "tokens_per_s_samples": tps_samples,
            "ratio_vs_gpt2": tps / gpt2_tps,
            "final_loss": losses[name][-1],
            "loss_peak_mib": peaks[name] / MiB,
            "loss_peak_over_logits": peaks[name] / logits_bytes,
        }

    # An (N, C, ℓ) tensor would add >= 0.5x logits size (bool) from ℓ = 2 to ℓ = 4; fp32 would add 2x.
    r = {ell: results[f"mdm-prime l={ell}"]["loss_peak_over_logits"] for ell in ELLS}
    growth = r[4] - r[2]
    no_ncl = growth < 0.25
    print(
        f"\nloss peak / logits size (N={a.loss_rows}, C={VOCAB}, logits {logits_bytes / MiB:.1f} MiB): "
        + ", ".join(f"l={ell}: {v:.2f}x" for ell, v in r.items())
        + f"\n{'PASS' if no_ncl else 'FAIL'}: no N x C x l tensor allocated "
        f"(peak growth l=2 -> l=4 is {growth:+.3f}x logits; an (N, C, l) bool tensor alone would add +0.5x)\n"
    )

    print(f"| model | ℓ | tokens/s | ratio vs GPT-2 | loss-peak MiB (N={a.loss_rows}) | peak ÷ logits size |")
    print("|---|---|---:|---:|---:|---:|")
    for name, res in results.items():
        ell = "—" if res["num_sub_tokens"] is None else res["num_sub_tokens"]
        print(
            f"| {name.split()[0]} | {ell} | {res['tokens_per_s']:,.0f} | {res['ratio_vs_gpt2']:.3f} "
            f"| {res['loss_peak_mib']:.1f} | {res['loss_peak_over_logits']:.2f} |"
        )

    report = {
        "config": config,
        "device": str(device),
        "device_name": device_name(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "memory_method": "cuda max_memory_allocated" if device.type == "cuda" else "torch.profiler profile_memory",
        "no_nxcxl_tensor": no_ncl,
        "results": results,
    }
    a.output.parent.mkdir(parents=True, exist_ok=True)
    a.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {a.output}")
    if not no_ncl:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
