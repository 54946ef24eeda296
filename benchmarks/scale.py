"""MDM-Prime at scale against GPT-2: training throughput, MFU, peak memory, torch.compile and generation.

For each configuration (``paper``: the MDM-Prime / MDLM papers' 768 × 12 layers × 12 heads, MLP 3072, L = 1024,
GPT-2 vocabulary; ``small``: 256 × 4 × 4, MLP 1024, L = 256), on whatever device is present:

1. Training step (forward + backward + AdamW) tokens/s of MDM-Prime ℓ = 1, 2, 4 and transformers'
   ``GPT2LMHeadModel`` with the same width, depth, heads, MLP, length, vocabulary and batch, dropout 0, timed
   interleaved in one run (rounds of gpt2, ℓ = 1, 2, 4, each reseeded alike; medians), quoted as ratios to GPT-2.
   On CUDA also model FLOPs utilisation: ``tokens/s × F / peak``, with F = 6 × (matmul parameters, the output
   layer's D × C included) + 12 × layers × D × L per token, the dense-transformer count (PaLM, appendix B) that
   every model here would need if it ran its output layer on every position; MDM-Prime runs it only on rows
   with a masked sub-token, so its MFU counts work it skips (quoted as such).
2. The same with the backbone compiled, ``backbone.compile(dynamic=True)`` (GPT-2's ``transformer``, MDM-Prime's
   ``model``), as speed-up over eager; the output layer and the loss stay eager in both. Compiling the whole
   MDM-Prime model fails in dynamo (torch 2.13): the forward process's ``torch.rand(..., generator=None)`` with
   a symbolic size raises "SymIntArrayRef expected to contain only concrete integers". On CPU only for the
   configurations in ``--compile_configs`` (inductor's C++ compile of the paper model costs minutes).
3. Peak memory of one forward + backward (no optimizer state), with and without gradient checkpointing, each
   cell in a fresh subprocess: on CUDA ``max_memory_allocated`` above what the model occupies before the step;
   on CPU the process's peak resident set (``VmHWM``) above its resident set just before the step (malloc
   caching included, so it is an upper bound of the tensor bytes).
4. Generation at that size: B × L = 1024 tokens per call (B = 1024 / L), ``--gen_steps`` steps, idle-step
   cache on: NFE, tokens/s, and generate()'s wall time against NFE × one forward pass (one ``denoise`` call on
   an all-masked canvas, which scores every position; later calls score fewer, so the ratio can fall below 1).

Writes ``benchmarks/results/scale_<device>.json`` and ``.md`` (``<device>`` = cpu or cuda). From the repository
root: ``python benchmarks/scale.py`` (CPU: both configurations, a few steps per cell; see ``--help``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import ELLS, VOCAB, build_models, device_name, make_step, sync  # noqa: E402

try:
    from modeling_mdm_prime import MDMPrimeConfig, MDMPrimeForMaskedDiffusion, SubTokenCodec, diffusion_terms
except ModuleNotFoundError:  # run as a file from a checkout without installing: use the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from modeling_mdm_prime import MDMPrimeConfig, MDMPrimeForMaskedDiffusion, SubTokenCodec, diffusion_terms

CONFIGS = {
    "paper": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, seq_len=1024),
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024, seq_len=256),
}
# Dense bf16 tensor-core peaks (vendor data sheets, SXM parts), for MFU.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}
MiB = 2**20
PARTS = ("objective", "train", "compile", "memory", "generation")
GENERATED_TOKENS = 1024


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", default="paper,small", help="comma-separated subset of: " + ", ".join(CONFIGS))
    p.add_argument(
        "--batch_size", "--batch-size", type=int, default=None, help="training batch; default 1 on CPU, 8 on CUDA"
    )
    p.add_argument("--steps", type=int, default=1, help="timed steps per model per round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per model (compiled: 3, to compile)")
    p.add_argument(
        "--compile_configs",
        "--compile-configs",
        default=None,
        help="configs timed with torch.compile; default: all on CUDA, small on CPU",
    )
    p.add_argument(
        "--parts",
        default=",".join(PARTS),
        help="comma-separated parts to run; with a subset, the other parts of an earlier result file are kept",
    )
    p.add_argument(
        "--gen_steps", "--gen-steps", type=int, default=None, help="generation steps T; default 8 on CPU, 128 on CUDA"
    )
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=("float32", "bf16"), default="float32", help="bf16 = autocast (for CUDA)")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation and inputs")
    p.add_argument(
        "--output_dir",
        "--output-dir",
        type=Path,
        default=Path("benchmarks/results"),
        help="where the JSON and table go",
    )
    p.add_argument(
        "--memory_cell", "--memory-cell", default=None, help=argparse.SUPPRESS
    )  # internal: one part-3 cell (JSON)
    return p.parse_args(argv)


def model_args(name: str, batch_size: int, seed: int) -> SimpleNamespace:
    return SimpleNamespace(**CONFIGS[name], batch_size=batch_size, seed=seed)


def model_flops_per_token(cfg: dict) -> float:
    """Training FLOPs per token of a dense transformer with this shape and an output layer on every position."""
    d, layers, inner, length = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"], cfg["seq_len"]
    matmul_params = layers * (4 * d * d + 2 * d * inner) + d * VOCAB
    return 6 * matmul_params + 12 * layers * d * length


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def time_training(
    cfg_name: str, a: argparse.Namespace, device: torch.device, batch: int, compiled: bool
) -> dict[str, dict]:
    """Part 1 (or 2 with ``compiled``): interleaved rounds, medians; returns per-model tokens/s and samples."""
    margs = model_args(cfg_name, batch, a.seed)
    models = build_models(margs, device)
    if compiled:  # the backbone; the output layer and the loss stay eager in both models
        for name, model in models.items():
            (model.transformer if name == "gpt2" else model.model).compile(dynamic=True)
    ids = torch.randint(0, VOCAB, (batch, margs.seq_len), generator=torch.Generator().manual_seed(a.seed)).to(device)
    steps = {name: make_step(name, m, ids, a.dtype == "bf16") for name, m in models.items()}
    warmup_s = {}
    for name, step in steps.items():
        sync(device)
        start = time.perf_counter()
        for _ in range(max(a.warmup, 3 if compiled else 0)):
            step()
        sync(device)
        warmup_s[name] = time.perf_counter() - start
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(a.rounds):
        for name, step in steps.items():
            torch.manual_seed(a.seed + r)
            sync(device)
            start = time.perf_counter()
            for _ in range(a.steps):
                step()
            sync(device)
            samples[name].append(a.steps * batch * margs.seq_len / (time.perf_counter() - start))
        print(f"  [{cfg_name}{' compiled' if compiled else ''}] round {r + 1}/{a.rounds}", flush=True)
    gpt2 = statistics.median(samples["gpt2"])
    return {
        name: {
            "tokens_per_s": statistics.median(s),
            "tokens_per_s_samples": s,
            "ratio_vs_gpt2": statistics.median(s) / gpt2,
            "warmup_s": warmup_s[name],
        }
        for name, s in samples.items()
    }


def objective_cost(device: torch.device, rows: int = 1024, repeats: int = 5) -> dict[str, dict]:
    """Part 0: forward + backward of the objective alone on ``(rows, C)`` float32 logits (half the digits masked,
    at least one per row): GPT-2's cross-entropy against ``diffusion_terms`` at ℓ = 1, 2, 4; medians."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(rows, VOCAB, generator=gen).to(device).requires_grad_()
    targets = torch.randint(0, VOCAB, (rows,), generator=gen).to(device)
    results = {}
    for name in ["cross-entropy", *(f"l={ell}" for ell in ELLS)]:
        ell = None if name == "cross-entropy" else int(name.split("=")[1])
        codec = SubTokenCodec(VOCAB, ell or 1)
        masked = torch.rand(rows, codec.num_sub_tokens, generator=gen) < 0.5
        masked[torch.arange(rows), torch.randint(0, codec.num_sub_tokens, (rows,), generator=gen)] = True
        masked = masked.to(device)

        def run(ell=ell, codec=codec, masked=masked) -> None:
            if ell is None:
                F.cross_entropy(logits, targets).backward()
            else:
                valid, prime = diffusion_terms(logits, targets, masked, codec)
                (valid.sum() + prime.sum()).backward()
            logits.grad = None

        times = []
        for _ in range(repeats + 1):  # the first call warms up
            sync(device)
            start = time.perf_counter()
            run()
            sync(device)
            times.append(time.perf_counter() - start)
        median = statistics.median(times[1:])
        results[name] = {"seconds": median, "ns_per_logit": median / (rows * VOCAB) * 1e9, "samples": times[1:]}
    print(f"  objective cost: { {k: round(v['ns_per_logit'], 2) for k, v in results.items()} } ns/logit", flush=True)
    return results


def memory_cell(spec: dict) -> dict:
    """Part 3, run in a fresh process: peak bytes of one forward + backward above the state just before it."""
    device = torch.device(spec["device"])
    cfg = CONFIGS[spec["config"]]
    torch.manual_seed(spec["seed"])
    if spec["model"] == "gpt2":  # the same GPT-2 as build_models, built alone
        model = transformers.GPT2LMHeadModel(
            transformers.GPT2Config(
                vocab_size=VOCAB,
                n_positions=cfg["seq_len"],
                n_embd=cfg["hidden_size"],
                n_layer=cfg["num_hidden_layers"],
                n_head=cfg["num_attention_heads"],
                n_inner=cfg["intermediate_size"],
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
                attn_implementation="sdpa",
            )  # fmt: skip
        ).to(device)
    else:
        model = MDMPrimeForMaskedDiffusion(
            MDMPrimeConfig(
                vocab_size=VOCAB,
                num_sub_tokens=int(spec["model"].split("=")[1]),
                hidden_size=cfg["hidden_size"],
                num_hidden_layers=cfg["num_hidden_layers"],
                num_attention_heads=cfg["num_attention_heads"],
                intermediate_size=cfg["intermediate_size"],
                max_position_embeddings=cfg["seq_len"],
                dropout=0.0,
            )  # fmt: skip
        ).to(device)
    model.train()
    if spec["checkpointing"]:
        model.gradient_checkpointing_enable()
    ids = torch.randint(0, VOCAB, (spec["batch_size"], cfg["seq_len"]), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    torch.manual_seed(spec["seed"])
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if spec["bf16"] else contextlib.nullcontext()

    def step() -> None:
        with autocast:
            out = model(input_ids=ids, labels=ids) if spec["model"] == "gpt2" else model(input_ids=ids)
        out.loss.backward()

    if device.type == "cuda":
        step()  # warm-up: cuBLAS workspaces and gradient buffers are not part of a step's working memory
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        sync(device)
        return {"peak_bytes": torch.cuda.max_memory_allocated(device) - base, "method": "cuda max_memory_allocated"}
    # CPU: gradients are allocated by the first backward; create them first so that both cells count activations.
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    # Not ru_maxrss: Linux carries the parent's peak over fork + exec into it (7.5 GiB here from the parent's four
    # models); VmHWM is this process's own peak resident set.
    base = _proc_status_bytes("VmRSS")
    step()
    return {"peak_bytes": _proc_status_bytes("VmHWM") - base, "method": "VmHWM - VmRSS before the step"}


def _proc_status_bytes(field: str) -> int:
    """A ``kB`` field of /proc/self/status (Linux) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field} (the CPU memory measurement needs Linux)")


def measure_memory(cfg_name: str, a: argparse.Namespace, device: torch.device, batch: int) -> dict[str, dict]:
    results: dict[str, dict] = {}
    for name in ["gpt2", *(f"mdm-prime l={ell}" for ell in ELLS)]:
        results[name] = {}
        for ckpt in (False, True):
            spec = dict(
                config=cfg_name, model=name, checkpointing=ckpt, batch_size=batch, seed=a.seed,
                device=str(device), bf16=a.dtype == "bf16",
            )  # fmt: skip
            proc = subprocess.run(
                [sys.executable, __file__, "--memory-cell", json.dumps(spec)],
                capture_output=True,
                text=True,
                check=False,
            )
            lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
            if proc.returncode != 0 or not lines:
                raise RuntimeError(f"memory cell {spec} failed:\n{proc.stderr[-3000:]}")
            cell = json.loads(lines[-1])
            results[name]["checkpointing" if ckpt else "plain"] = cell["peak_bytes"] / MiB
            results[name]["method"] = cell["method"]
        print(f"  [{cfg_name}] memory {name}: {results[name]}", flush=True)
    return results


def measure_generation(cfg_name: str, a: argparse.Namespace, device: torch.device) -> dict[str, dict]:
    """Part 4: per ℓ, one generate() call of B × L = 1024 tokens against NFE × one all-masked forward pass."""
    cfg = CONFIGS[cfg_name]
    length = cfg["seq_len"]
    batch = max(1, GENERATED_TOKENS // length)
    steps = a.gen_steps or (128 if device.type == "cuda" else 8)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if a.dtype == "bf16" else contextlib.nullcontext()
    results = {}
    for ell in ELLS:
        torch.manual_seed(a.seed)
        model = (
            MDMPrimeForMaskedDiffusion(
                MDMPrimeConfig(
                    vocab_size=VOCAB,
                    num_sub_tokens=ell,
                    hidden_size=cfg["hidden_size"],
                    num_hidden_layers=cfg["num_hidden_layers"],
                    num_attention_heads=cfg["num_attention_heads"],
                    intermediate_size=cfg["intermediate_size"],
                    max_position_embeddings=length,
                    dropout=0.0,
                )  # fmt: skip
            )
            .to(device)
            .eval()
        )
        canvas = torch.full((batch, length, ell), model.codec.mask_id, device=device)
        ones = torch.ones(batch, length, dtype=torch.bool, device=device)
        forward_s = []
        with autocast:
            for _ in range(2):  # the first call warms up
                sync(device)
                start = time.perf_counter()
                model.denoise(canvas, attention_mask=ones, positions=ones)
                sync(device)
                forward_s.append(time.perf_counter() - start)
            sync(device)
            start = time.perf_counter()
            out = model.generate(
                max_new_tokens=length, num_steps=steps, num_return_sequences=batch, seed=a.seed,
                return_dict_in_generate=True,
            )  # fmt: skip
            sync(device)
            wall = time.perf_counter() - start
        t_forward = forward_s[-1]
        results[f"mdm-prime l={ell}"] = {
            "batch": batch, "length": length, "num_steps": steps, "nfe": int(out.nfe), "wall_s": wall,
            "t_forward_s": t_forward, "tokens_per_s": batch * length / wall,
            "wall_over_nfe_x_forward": wall / (out.nfe * t_forward),
        }  # fmt: skip
        print(f"  [{cfg_name}] generation l={ell}: {results[f'mdm-prime l={ell}']}", flush=True)
        del model
    return results


def markdown(report: dict) -> str:
    dev = report["device_name"]
    lines = [f"# Scale benchmark ({dev}, {report['dtype']}, torch {report['torch']})", ""]
    cost = report.get("objective_cost") or {}
    lines += [
        "Objective alone, forward + backward on (1024, 50257) float32 logits:",
        "",
        "| objective | ms | ns per logit |",
        "|---|---:|---:|",
        *(f"| {name} | {c['seconds'] * 1e3:.0f} | {c['ns_per_logit']:.2f} |" for name, c in cost.items()),
        "",
    ]
    for cfg_name, res in report["configs"].items():
        c = CONFIGS[cfg_name]
        lines += [
            f"## {cfg_name}: D = {c['hidden_size']}, {c['num_hidden_layers']} layers, "
            f"{c['num_attention_heads']} heads, "
            f"MLP {c['intermediate_size']}, L = {c['seq_len']}, C = {VOCAB}, training batch {res['batch_size']}",
            "",
            "| model | tokens/s | ratio vs GPT-2 | MFU | compiled tokens/s | compiled ÷ eager "
            "| peak MiB | peak MiB, checkpointing |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, t in res.get("train", {}).items():
            comp = res.get("compiled", {}).get(name)
            mem = res.get("memory", {}).get(name)
            mem = mem if mem and "plain" in mem else None
            cells = [
                f"{t['tokens_per_s']:,.0f}",
                f"{t['ratio_vs_gpt2']:.2f}",
                f"{t['mfu']:.1%}" if t.get("mfu") is not None else "—",
                f"{comp['tokens_per_s']:,.0f}" if comp else "—",
                f"{comp['tokens_per_s'] / t['tokens_per_s']:.2f}" if comp else "—",
                f"{mem['plain']:,.0f}" if mem else "—",
                f"{mem['checkpointing']:,.0f}" if mem else "—",
            ]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        if "compile_error" in res:
            lines += ["", f"torch.compile failed: `{res['compile_error'].splitlines()[0]}`"]
        gen = res.get("generation")
        if not gen:
            continue
        first = next(iter(gen.values()))
        lines += [
            "",
            f"Generation: B = {first['batch']}, L = {first['length']}, T = {first['num_steps']} steps:",
            "",
            "| model | NFE | tokens/s | wall s | one forward s | wall ÷ (NFE × forward) |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for name, g in gen.items():
            lines.append(
                f"| {name} | {g['nfe']} | {g['tokens_per_s']:,.1f} | {g['wall_s']:.2f} | {g['t_forward_s']:.3f} "
                f"| {g['wall_over_nfe_x_forward']:.2f} |"
            )
        lines.append("")
    lines.append(f"Memory: {report['memory_method']}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    if a.memory_cell is not None:
        print(json.dumps(memory_cell(json.loads(a.memory_cell))), flush=True)
        return
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    configs = [c.strip() for c in a.configs.split(",") if c.strip()]
    unknown = sorted(set(configs) - set(CONFIGS))
    if unknown:
        raise SystemExit(f"unknown configs {unknown}; choose from {sorted(CONFIGS)}")
    compile_configs = (
        configs if a.compile_configs is None and device.type == "cuda"
        else ["small"] if a.compile_configs is None
        else [c.strip() for c in a.compile_configs.split(",") if c.strip()]
    )  # fmt: skip
    batch = a.batch_size or (8 if device.type == "cuda" else 1)
    print(f"device: {device} ({device_name(device)}), dtype {a.dtype}, batch {batch}", flush=True)
    peak = peak_flops(device)
    report: dict = {
        "device": device.type,
        "device_name": device_name(device),
        "dtype": a.dtype,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items() if k != "memory_cell"},
        "peak_flops": peak,
        "memory_method": (
            "torch.cuda.max_memory_allocated above the allocated bytes before the step (a fresh process per cell)"
            if device.type == "cuda"
            else "peak resident set (VmHWM) above the resident set before the step, a fresh process per cell (malloc "
            "cache included)"
        ),
        "configs": {},
    }
    a.output_dir.mkdir(parents=True, exist_ok=True)
    stem = a.output_dir / f"scale_{device.type}"
    parts = {p.strip() for p in a.parts.split(",") if p.strip()}
    if parts - set(PARTS):
        raise SystemExit(f"unknown parts {sorted(parts - set(PARTS))}; choose from {', '.join(PARTS)}")
    if parts != set(PARTS) and stem.with_suffix(".json").is_file():  # update some parts of an earlier run
        previous = json.loads(stem.with_suffix(".json").read_text())
        if previous.get("dtype") == a.dtype:
            report["configs"] = previous.get("configs", {})
            report["objective_cost"] = previous.get("objective_cost")
            if "memory" not in parts:
                report["memory_method"] = previous.get("memory_method")
    if "objective" in parts:
        report["objective_cost"] = objective_cost(device)
    for cfg_name in configs:
        res: dict = report["configs"].get(cfg_name, {})
        res |= {"batch_size": batch, "model_flops_per_token": model_flops_per_token(CONFIGS[cfg_name])}
        if "train" in parts:
            res["train"] = time_training(cfg_name, a, device, batch, compiled=False)
            for t in res["train"].values():
                t["mfu"] = t["tokens_per_s"] * res["model_flops_per_token"] / peak if peak else None
        if "compile" in parts and cfg_name in compile_configs:
            res.pop("compile_error", None)
            try:
                res["compiled"] = time_training(cfg_name, a, device, batch, compiled=True)
            except Exception as err:  # report, don't lose the other parts
                res["compile_error"] = f"{type(err).__name__}: {err}"[:2000]
                print(f"  torch.compile failed: {res['compile_error']}", flush=True)
        if "memory" in parts:
            res["memory"] = measure_memory(cfg_name, a, device, batch)
        if "generation" in parts:
            res["generation"] = measure_generation(cfg_name, a, device)
        report["configs"][cfg_name] = res
        stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")  # after each config
    stem.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
