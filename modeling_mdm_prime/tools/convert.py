"""Convert the published MDLM and MDM-Prime checkpoints into checkpoints of this package, exactly.

Sources (../shared/spec/conversion.md has the full key table):

* MDLM's Hub format (``kuleshov-group/mdlm-owt`` and siblings): ``config.json`` with ``model_type "mdlm"`` and
  safetensors weights under ``backbone.``;
* MDM-Prime's PyTorch Lightning ``.ckpt`` (``chen-hao-chao/mdm-prime``, ``text/owt/results_prime_l{ℓ}_owt/``): a
  pickle holding ``state_dict``, an ``ema`` dict whose ``shadow_params`` list follows the trainable-parameter order,
  and ``hyper_parameters`` (an OmegaConf config whose ``prime`` section holds ℓ and carry_over, and a pickled
  tokenizer). The EMA weights are converted by default, as the paper evaluates them.

Both are the DiT of MDLM with time conditioning off, so the conditioning vector is a constant
``c = SiLU(sigma_map(emb(0)))`` and every adaLN modulation ``(shift, scale, gate) = W c + b`` is a constant too. The
block ``x + gate ⊙ f(LN(x) ⊙ (1 + scale) + shift)`` is then exactly the plain pre-LN block of this package with
LayerNorm weight ``w ⊙ (1 + scale)``, bias ``shift``, and ``f``'s output rows (and bias) multiplied by ``gate``
(dropout is elementwise, so it commutes with the gate). The fold is computed in float64 and cast to the source dtype.

Loading a ``.ckpt`` never runs code from it by default: :func:`restricted_torch_load` unpickles with an allowlist of
tensor-building functions and turns every other global (OmegaConf classes, the tokenizer, anything hostile) into an
inert stub that only records its arguments, from which the plain values of the config are read back.
``allow_unsafe_pickle=True`` (``--allow_unsafe_pickle``) uses the full unpickler instead, which runs whatever code
the file names: only for files whose origin you trust.

This module is not remote code (its name does not end in ``_mdm_prime.py``).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import pickle
import re
import stat
import types
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..codec_mdm_prime import integer_base
from ..configuration_mdm_prime import MDMPrimeConfig

# Licences as stated on the sources' own pages (the MDLM model card; MDM-Prime's text code is Apache-2.0).
KNOWN_LICENSES = {"kuleshov-group/mdlm-owt": "apache-2.0", "kuleshov-group/mdlm-noeos-owt": "apache-2.0"}
KNOWN_LICENSE_PREFIXES = {"chen-hao-chao/mdm-prime": "apache-2.0"}
DEFAULT_TOKENIZER = "gpt2"  # the Hub id of the GPT-2 tokenizer that MDLM and MDM-Prime trained with
GPT2_EOS = 50256
ROPE_BASE = 10000.0
CONVERSION_FILE = "conversion.json"


# -- safe unpickling ------------------------------------------------------------------------------------------------


class PickleStub:
    """Stands in for any class or function a pickle names outside the allowlist. Constructing, calling or
    restoring it only records the arguments (``args``, ``kwargs``, ``state``, ``items``, ``list``): no code of the
    pickle's choosing runs."""

    _stub_of = "?"

    def __init__(self, *args: Any, **kwargs: Any):
        self.args, self.kwargs = args, kwargs
        self.state: Any = None
        self.items: dict = {}
        self.list: list = []

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.items[key] = value

    def append(self, value: Any) -> None:
        self.list.append(value)

    def extend(self, values: Any) -> None:
        self.list.extend(values)

    def __repr__(self) -> str:
        return f"<stub of {self._stub_of}>"


def _checked_rebuild(rebuild):
    """torch's ``_rebuild_tensor(_v2)`` after checking that the view fits its storage: a tiny file must not claim a
    huge tensor through stride-0 or overlapping views (``expand``-like), which would allocate once materialised."""

    def checked(storage, storage_offset, size, stride, *args, **kwargs):
        check_tensor_view(storage, storage_offset, size, stride)
        return rebuild(storage, storage_offset, size, stride, *args, **kwargs)

    return checked


def check_tensor_view(storage: Any, storage_offset: Any, size: Any, stride: Any) -> None:
    """Raise ``ValueError`` unless a saved tensor view is a plain one of its storage: non-negative integer offset,
    sizes and strides; the last element it addresses lies inside the storage; and it claims no more elements than
    the storage holds after the offset (so no stride-0 or overlapping view multiplies a small storage)."""
    if isinstance(storage, torch.storage.TypedStorage):
        available = int(storage._size())  # elements (the public size() warns that TypedStorage is deprecated)
    elif isinstance(storage, torch.UntypedStorage):
        available = int(storage.nbytes())  # bytes: at least the elements of any dtype
    else:
        raise ValueError(f"a tensor's storage is a {type(storage).__name__}, not a torch storage: refusing the file.")
    values = [storage_offset, *size, *stride]
    if len(size) != len(stride) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise ValueError(
            f"a tensor view with offset {storage_offset!r}, size {tuple(size)!r}, stride {tuple(stride)!r}: expected "
            "non-negative integers and one stride per dimension."
        )
    numel = math.prod(size)
    if numel == 0:
        return
    last = storage_offset + sum((n - 1) * st for n, st in zip(size, stride))
    if last >= available or numel > available - storage_offset:
        raise ValueError(
            f"a tensor of shape {tuple(size)} with strides {tuple(stride)} at offset {storage_offset} claims "
            f"{numel:,} elements (last index {last:,}), but its storage holds {available:,}: a stride-0 or "
            "overlapping view that would expand a small file into a large tensor. Refusing the file."
        )


def _rebuild_from_type_v2(func, new_type, args, state):
    """torch's wrapper for tensor subclasses, limited to plain tensors and Parameters (a stubbed type is refused)."""
    if new_type not in (torch.Tensor, torch.nn.Parameter):
        return PickleStub(func, new_type, args, state)
    return torch._tensor._rebuild_from_type_v2(func, new_type, args, state)


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """The only callables a checkpoint may name: torch's tensor rebuilders, dtypes, ``OrderedDict``."""
    allowed: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): OrderedDict,
        ("torch", "Size"): torch.Size,
        ("torch", "Tensor"): torch.Tensor,
        ("torch.nn.parameter", "Parameter"): torch.nn.Parameter,
        ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    }
    for name in ("_rebuild_tensor", "_rebuild_tensor_v2"):
        if hasattr(torch._utils, name):
            allowed[("torch._utils", name)] = _checked_rebuild(getattr(torch._utils, name))
    for name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
        if hasattr(torch._utils, name):
            allowed[("torch._utils", name)] = getattr(torch._utils, name)
    for name in dir(torch):
        if isinstance(getattr(torch, name, None), torch.dtype):
            allowed[("torch", name)] = getattr(torch, name)
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that builds tensors and plain containers and stubs every other global (see :class:`PickleStub`).

    ``torch.load`` wraps it (storages reach it through ``persistent_load``, which torch handles)."""

    _allowed = _allowed_globals()
    _stubs: dict[tuple[str, str], type] = {}

    def find_class(self, module: str, name: str) -> Any:
        key = (module, name)
        if key in self._allowed:
            return self._allowed[key]
        if key not in self._stubs:  # one class per name, so equal names give the same stub type
            self._stubs[key] = type(name, (PickleStub,), {"_stub_of": f"{module}.{name}", "__module__": __name__})
        return self._stubs[key]


def _restricted_pickle_module() -> types.ModuleType:
    module = types.ModuleType("restricted_pickle")
    module.Unpickler = RestrictedUnpickler
    module.load = lambda file, **kwargs: RestrictedUnpickler(file, **kwargs).load()
    module.loads = lambda data, **kwargs: RestrictedUnpickler(io.BytesIO(data), **kwargs).load()
    return module


# Limits of the restricted loader: generous for real checkpoints (a Lightning .ckpt of a 170M-parameter model with
# its optimizer state is ~2 GB and ~10^5 containers and items), small enough to refuse hostile files quickly.
MAX_CHECKPOINT_BYTES = 64 * 2**30
MAX_PICKLE_ITEMS = 10_000_000
MAX_PICKLE_DEPTH = 64


def restricted_torch_load(
    path: str | os.PathLike,
    *,
    allow_unsafe_pickle: bool = False,
    max_bytes: int = MAX_CHECKPOINT_BYTES,
    max_items: int = MAX_PICKLE_ITEMS,
    max_depth: int = MAX_PICKLE_DEPTH,
) -> Any:
    """``torch.load`` a checkpoint on the CPU without running code from it, refusing hostile files before they
    cost memory.

    Always (both modes): the path must be a regular file (not a FIFO or device: a link to one is followed and
    refused) in torch's zip format. The legacy tar format is refused outright (it follows symlink members and can
    block forever on a FIFO member), and so is every zip record that is compressed (``torch.save`` stores records
    uncompressed) or a set of records whose sizes add up to more than the file itself (overlapping records) or
    than ``max_bytes``. The file is checked and loaded through one open file, so it cannot be swapped in between.

    By default the pickle is read by :class:`RestrictedUnpickler`: tensors, ``OrderedDict`` and plain containers are
    built, everything else becomes an inert :class:`PickleStub` (read its plain values with :func:`plain_value`).
    Every tensor view must fit its storage (:func:`check_tensor_view`), and the loaded structure is walked before it
    is returned (:func:`check_structure`): at most ``max_depth`` levels of nesting and ``max_items`` items
    counted along every path (memo-shared containers count once per reference, so a few hundred
    bytes cannot describe a structure whose traversal never ends).

    ``allow_unsafe_pickle=True`` uses Python's full unpickler, which imports and calls whatever the file names:
    a hostile file can then run any code as you. Use it only for files whose origin you trust.

    Raises:
        ValueError: naming the check and the limit that the file failed.
    """
    where = str(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO must not block the open
    except OSError as error:
        raise ValueError(f"{where}: cannot open the checkpoint ({error.strerror}).") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"{where}: not a regular file (a FIFO, device or socket); expected a torch .ckpt file.")
        if not zipfile.is_zipfile(f):
            raise ValueError(
                f"{where}: not a torch zip checkpoint (torch.save's format since torch 1.6). The legacy tar format "
                "and other non-zip files are refused: expected a .ckpt written by torch.save."
            )
        f.seek(0)
        with zipfile.ZipFile(f) as archive:
            records = archive.infolist()
        compressed = [r.filename for r in records if r.compress_type != zipfile.ZIP_STORED]
        if compressed:
            raise ValueError(
                f"{where}: {len(compressed)} compressed zip record(s) ({compressed[0]}, ...): torch.save stores "
                "records uncompressed, and a compressed record can unpack to far more than the file. Refusing the file."
            )
        unpacked = sum(r.file_size for r in records)
        if unpacked > min(info.st_size, max_bytes):
            raise ValueError(
                f"{where}: its zip records hold {unpacked:,} bytes, more than the file's {info.st_size:,} bytes "
                f"(overlapping records) or the limit max_bytes = {max_bytes:,}. Refusing the file."
            )
        f.seek(0)
        if allow_unsafe_pickle:
            return torch.load(f, map_location="cpu", weights_only=False)
        try:
            loaded = torch.load(f, map_location="cpu", weights_only=False, pickle_module=_restricted_pickle_module())
        except RecursionError:
            raise ValueError(f"{where}: the pickle nests too deeply to load. Refusing the file.") from None
    check_structure(loaded, max_items=max_items, max_depth=max_depth, where=where)
    return loaded


def check_structure(
    obj: Any, *, max_items: int = MAX_PICKLE_ITEMS, max_depth: int = MAX_PICKLE_DEPTH, where: str = "checkpoint"
) -> None:
    """Walk an unpickled structure iteratively (dicts, lists, tuples, sets, :class:`PickleStub` contents) and raise
    ``ValueError`` on nesting deeper than ``max_depth`` or more than ``max_items`` items counted along every path.
    A reference back to a container on the current path (a cycle: OmegaConf nodes point at their parents) is not
    followed; :func:`plain_value` refuses cycles among the values it reads. After this check, recursive readers
    terminate in bounded time and depth."""
    count = 0
    on_path: set[int] = set()
    stack: list[tuple[Any, int, bool]] = [(obj, 0, False)]
    while stack:
        node, depth, leaving = stack.pop()
        if leaving:
            on_path.discard(id(node))
            continue
        count += 1
        if count > max_items:
            raise ValueError(
                f"{where}: the pickle describes more than max_items = {max_items:,} items counted along every path "
                "(memo-shared containers count once per reference). Refusing the file."
            )
        children = _children(node)
        if children is None or id(node) in on_path:  # a leaf, or a reference back up the path (OmegaConf's _parent)
            continue
        if depth >= max_depth:
            raise ValueError(f"{where}: containers nest deeper than max_depth = {max_depth}. Refusing the file.")
        on_path.add(id(node))
        stack.append((node, depth, True))
        stack.extend((child, depth + 1, False) for child in children)


def _children(node: Any) -> list | None:
    """The items a container holds (None for a leaf: tensors, strings, numbers)."""
    if isinstance(node, Mapping):
        return [*node.keys(), *node.values()]
    if isinstance(node, (list, tuple, set, frozenset)):
        return list(node)
    if isinstance(node, PickleStub):
        # A stub made by the pickle's NEWOBJ never ran __init__: it may lack any of these.
        return [getattr(node, name, None) for name in ("args", "kwargs", "state", "items", "list")]
    return None


def plain_value(obj: Any, _path: frozenset[int] = frozenset()) -> Any:
    """Plain Python values from stubbed objects: OmegaConf containers (``_content``) and nodes (``_val``) become
    dicts, lists and scalars; other stubs stay stubs.

    Raises:
        ValueError: the values read form a cycle (a container inside itself), which has no plain value.
    """
    if isinstance(obj, (PickleStub, Mapping, list, tuple)):
        if id(obj) in _path:
            raise ValueError("the checkpoint's config holds a reference cycle (a value inside itself); refusing it.")
        _path = _path | {id(obj)}
    if isinstance(obj, PickleStub):
        state = getattr(obj, "state", None)
        state = state if isinstance(state, dict) else {}
        if "_content" in state:
            return plain_value(state["_content"], _path)
        if "_val" in state:
            return plain_value(state["_val"], _path)
        return obj
    if isinstance(obj, Mapping):
        return {key: plain_value(value, _path) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain_value(value, _path) for value in obj]
    return obj


# -- the source checkpoint ------------------------------------------------------------------------------------------


@dataclass
class SourceCheckpoint:
    """A DiT checkpoint read from either format, before the fold.

    Attributes:
        weights: the backbone's tensors without the ``backbone.`` prefix (the EMA ones for a ``.ckpt`` by default).
        vocab_size: C, the real tokens (GPT-2: 50,257; the MASK is not counted).
        num_sub_tokens: ℓ; carry_over: MDM-Prime's consistency filter (MDLM's SUBS always carries over).
        hidden_size, num_layers, num_heads, cond_dim, max_length, dropout: from the source's config.
        description: what was read, for ``conversion.json`` and the card.
    """

    weights: dict[str, torch.Tensor]
    vocab_size: int
    num_sub_tokens: int
    carry_over: bool
    hidden_size: int
    num_layers: int
    num_heads: int
    cond_dim: int
    max_length: int
    dropout: float
    description: dict = field(default_factory=dict)


def dit_parameter_names(num_layers: int) -> list[str]:
    """The DiT's trainable parameters in registration order, which is the order of the EMA's ``shadow_params``
    (the ``rotary_emb.inv_freq`` buffer is not a parameter)."""
    names = ["vocab_embed.embedding", *(f"sigma_map.mlp.{i}.{p}" for i in (0, 2) for p in ("weight", "bias"))]
    for n in range(num_layers):
        block = f"blocks.{n}."
        names += [block + s for s in ("norm1.weight", "attn_qkv.weight", "attn_out.weight", "norm2.weight")]
        names += [block + f"mlp.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")]
        names += [block + "adaLN_modulation.weight", block + "adaLN_modulation.bias"]
    names += ["output_layer.norm_final.weight", "output_layer.linear.weight", "output_layer.linear.bias"]
    names += ["output_layer.adaLN_modulation.weight", "output_layer.adaLN_modulation.bias"]
    return names


def _check_keys(weights: Mapping[str, torch.Tensor], num_layers: int, where: str) -> None:
    expected = set(dit_parameter_names(num_layers))
    found = set(weights) - {"rotary_emb.inv_freq"}
    missing, unknown = sorted(expected - found), sorted(found - expected)
    if missing or unknown:
        blocks = sorted({int(m.group(1)) for k in found if (m := re.match(r"blocks\.(\d+)\.", k))})
        raise ValueError(
            f"{where}: unknown key set for an MDLM DiT with {num_layers} blocks (its config's n_blocks; the weights "
            f"have {len(blocks)} blocks). Missing: {missing[:8]}{' ...' if len(missing) > 8 else ''}; unexpected: "
            f"{unknown[:8]}{' ...' if len(unknown) > 8 else ''}. Expected the backbone.* keys of conversion.md's table."
        )


def _check_shapes(source: SourceCheckpoint, where: str) -> None:
    """Every tensor's shape against the source's config: a ValueError naming the first mismatches."""
    d, ell, cond = source.hidden_size, source.num_sub_tokens, source.cond_dim
    w = source.weights
    base = integer_base(source.vocab_size, ell)
    mlp = w["blocks.0.mlp.0.weight"].shape[0]  # the MLP width is not in the config: MDLM uses 4 D
    expected = {
        "vocab_embed.embedding": (base + 1, d // ell),
        "sigma_map.mlp.0.weight": (cond, w["sigma_map.mlp.0.weight"].shape[1]),
        "sigma_map.mlp.0.bias": (cond,),
        "sigma_map.mlp.2.weight": (cond, cond),
        "sigma_map.mlp.2.bias": (cond,),
        "output_layer.norm_final.weight": (d,),
        "output_layer.adaLN_modulation.weight": (2 * d, cond),
        "output_layer.adaLN_modulation.bias": (2 * d,),
        "output_layer.linear.bias": (w["output_layer.linear.bias"].shape[0],),
    }
    for n in range(source.num_layers):
        b = f"blocks.{n}."
        expected.update(
            {
                b + "norm1.weight": (d,),
                b + "norm2.weight": (d,),
                b + "attn_qkv.weight": (3 * d, d),
                b + "attn_out.weight": (d, d),
                b + "mlp.0.weight": (mlp, d),
                b + "mlp.0.bias": (mlp,),
                b + "mlp.2.weight": (d, mlp),
                b + "mlp.2.bias": (d,),
                b + "adaLN_modulation.weight": (6 * d, cond),
                b + "adaLN_modulation.bias": (6 * d,),
            }
        )
    out_rows = w["output_layer.linear.weight"].shape[0]
    if out_rows not in (source.vocab_size, source.vocab_size + 1):
        raise ValueError(
            f"{where}: output_layer.linear has {out_rows} rows; expected vocab_size = {source.vocab_size} or "
            f"{source.vocab_size + 1} (with the MASK row)."
        )
    expected["output_layer.linear.weight"] = (out_rows, d)
    expected["output_layer.linear.bias"] = (out_rows,)
    wrong = [f"{k}: {tuple(w[k].shape)}, expected {v}" for k, v in expected.items() if tuple(w[k].shape) != v]
    if wrong:
        raise ValueError(
            f"{where}: shape mismatch with the source config (hidden {d}, ℓ = {ell} so base {base}, cond {cond}, "
            f"vocabulary {source.vocab_size}): " + "; ".join(wrong[:6])
        )
    if "rotary_emb.inv_freq" in w:  # a buffer: recomputed by this package; it must be the standard one
        head_dim = d // source.num_heads
        ref = 1.0 / ROPE_BASE ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        got = w["rotary_emb.inv_freq"].double()
        if got.shape != ref.shape or not torch.allclose(got, ref, rtol=1e-3):
            raise ValueError(
                f"{where}: rotary_emb.inv_freq {tuple(got.shape)} is not 1/10000^(2i/{head_dim}) for head_dim "
                f"{head_dim} (hidden {d} / {source.num_heads} heads): a different RoPE base or head count."
            )


KEY_PATTERN = re.compile(r"[A-Za-z0-9_.]+")


def check_key_names(state: Mapping[Any, Any], where: str) -> None:
    """Refuse a state dict with a key that is not a plain parameter name (``^[A-Za-z0-9_.]+$``): the names travel
    into ``conversion.json`` and the model card, and a hostile one could carry markup or template syntax."""
    for key in state:
        if not isinstance(key, str) or not KEY_PATTERN.fullmatch(key):
            shown = ascii(key)[:120] + ("..." if len(ascii(key)) > 120 else "")
            raise ValueError(
                f"{where}: state-dict key {shown} is not a parameter name: expected letters, digits, '_' and '.' "
                "only (^[A-Za-z0-9_.]+$). Refusing the checkpoint."
            )


def check_weight_values(source: SourceCheckpoint, where: str) -> None:
    """Refuse what would convert into a silently broken model, naming the tensor: NaN or infinite values, a
    non-floating or mixed dtype (the fold computes in float64 and casts back to the one source dtype), and at
    ℓ > 1 an output layer with a MASK row (MDM-Prime's output has exactly the C token rows; a MASK row there means
    a vocabulary or ℓ that does not match the weights)."""
    dtypes: dict[torch.dtype, list[str]] = {}
    for name, tensor in source.weights.items():
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{where}: {name} is a {type(tensor).__name__}, not a tensor.")
        if name == "rotary_emb.inv_freq":  # a float32 buffer in any precision; recomputed, not converted
            continue
        if not tensor.is_floating_point():
            raise ValueError(f"{where}: {name} has dtype {tensor.dtype}; expected floating-point weights.")
        dtypes.setdefault(tensor.dtype, []).append(name)
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            raise ValueError(
                f"{where}: {name} {tuple(tensor.shape)} holds {bad:,} NaN or infinite value(s); a diverged or corrupt "
                "checkpoint. Refusing to convert it."
            )
    if len(dtypes) > 1:
        main = max(dtypes, key=lambda d: len(dtypes[d]))
        odd = sorted(f"{n} ({d})" for d, names in dtypes.items() if d != main for n in names)
        raise ValueError(
            f"{where}: mixed dtypes: most weights are {main}, but {', '.join(odd[:6])}"
            f"{' ...' if len(odd) > 6 else ''}. "
            "Expected one dtype for every weight (cast the checkpoint first, knowing what the cast rounds)."
        )
    rows = source.weights["output_layer.linear.weight"].shape[0]
    if source.num_sub_tokens > 1 and rows != source.vocab_size:
        raise ValueError(
            f"{where}: output_layer.linear.weight has {rows} rows at ℓ = {source.num_sub_tokens}; expected exactly "
            f"the vocabulary, {source.vocab_size} rows (MDM-Prime predicts tokens, not the MASK): the config's "
            "vocabulary or ℓ does not match the weights."
        )


def _refuse_unconvertible(settings: Mapping[str, Any], where: str) -> None:
    """Refuse time-conditioned, uniform-state (Duo) and block-causal (BD3-LM, block < length) models."""
    model_type = str(settings.get("model_type", ""))
    diffusion = str(settings.get("diffusion", "absorbing_state"))
    if "duo" in model_type.lower() or "uniform" in diffusion.lower():
        raise ValueError(
            f"{where}: a uniform-state model (model_type {model_type!r}, diffusion {diffusion!r}, Duo): it has no MASK "
            "state, so it is not a masked diffusion model and cannot be converted. Expected an absorbing-state model."
        )
    if "time_conditioning" not in settings:
        raise ValueError(
            f"{where}: the config does not say whether the model is time conditioned (no time_conditioning): "
            "only time-independent models (time_conditioning false) fold exactly."
        )
    if settings["time_conditioning"] is not False:
        raise ValueError(
            f"{where}: time_conditioning={settings['time_conditioning']!r}: a time-conditioned DiT's adaLN "
            "modulation depends on the noise level, so it does not fold into constant weights. Expected "
            "time_conditioning false (kuleshov-group/mdlm-owt, the MDM-Prime text checkpoints)."
        )
    block, length = settings.get("block_size"), settings.get("model_length")
    if block is not None and length is not None and int(block) < int(length):
        raise ValueError(
            f"{where}: block_size {block} < model length {length}: a block-causal BD3-LM (attention is causal "
            "across blocks), while this package's attention is bidirectional. Only block_size = length converts."
        )
    parameterization = settings.get("parameterization", "subs")
    if parameterization != "subs":
        raise ValueError(
            f"{where}: parameterization {parameterization!r}; expected 'subs' (MDLM's masked-diffusion denoiser)."
        )


def load_mdlm_folder(folder: str | os.PathLike) -> SourceCheckpoint:
    """Read MDLM's Hub format: ``config.json`` (``model_type "mdlm"``, ``vocab_size`` including the MASK) and
    safetensors with ``backbone.*`` keys (one file or an index with shards)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    where = str(folder)
    _refuse_unconvertible(config, where)
    if config.get("model_type") not in ("mdlm", "bd3lm"):
        raise ValueError(f"{where}: config.json has model_type {config.get('model_type')!r}; expected 'mdlm'.")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        others = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        raise ValueError(f"{where}: no safetensors weights (found {others or 'nothing'}); expected model.safetensors.")
    raw: dict[str, torch.Tensor] = {}
    for path in files:
        raw.update(load_file(str(path)))
    foreign = sorted(k for k in raw if not k.startswith("backbone."))
    if foreign:
        raise ValueError(f"{where}: unknown keys outside backbone.: {foreign[:8]}; expected only backbone.* keys.")
    weights = {k.removeprefix("backbone."): v for k, v in raw.items()}
    num_layers = int(config["n_blocks"])
    _check_keys(weights, num_layers, where)
    source = SourceCheckpoint(
        weights=weights,
        vocab_size=int(config["vocab_size"]) - 1,  # MDLM counts the MASK (id vocab_size - 1)
        num_sub_tokens=1,
        carry_over=True,
        hidden_size=int(config["hidden_dim"]),
        num_layers=num_layers,
        num_heads=int(config["n_heads"]),
        cond_dim=int(config["cond_dim"]),
        max_length=int(config["model_length"]),
        dropout=float(config.get("dropout", 0.0)),
        description={"format": "MDLM safetensors (config.json model_type mdlm)", "weights": "as published"},
    )
    _check_shapes(source, where)
    check_weight_values(source, where)
    return source


def load_lightning_checkpoint(
    path: str | os.PathLike, *, use_ema: bool = True, allow_unsafe_pickle: bool = False
) -> SourceCheckpoint:
    """Read an MDM-Prime / MDLM Lightning ``.ckpt`` (see :func:`restricted_torch_load` for the safety rules).

    ``use_ema``: substitute ``ema.shadow_params`` (trainable-parameter order, :func:`dit_parameter_names`) for the
    raw ``state_dict`` weights, as the papers evaluate. ℓ, the base and carry_over come from the config's ``prime``
    section (absent: ℓ = 1, an MDLM run), the sizes from its ``model`` section.
    """
    where = Path(path).name
    ckpt = restricted_torch_load(path, allow_unsafe_pickle=allow_unsafe_pickle)
    if not isinstance(ckpt, Mapping) or "state_dict" not in ckpt:
        found = sorted(ckpt)[:10] if isinstance(ckpt, Mapping) else type(ckpt).__name__
        raise ValueError(f"{where}: expected a Lightning checkpoint with 'state_dict', found {found}.")
    try:
        hyper = plain_value(ckpt.get("hyper_parameters") or {})
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
    config = hyper.get("config", hyper) if isinstance(hyper, Mapping) else {}
    if not isinstance(config, Mapping) or not isinstance(config.get("model"), Mapping):
        raise ValueError(f"{where}: hyper_parameters hold no readable config with a 'model' section.")
    model = config["model"]
    prime = config.get("prime") if isinstance(config.get("prime"), Mapping) else {}
    _refuse_unconvertible(
        {
            "time_conditioning": config.get("time_conditioning"),
            "diffusion": config.get("diffusion", "absorbing_state"),
            "parameterization": config.get("parameterization", "subs"),
            "block_size": config.get("block_size", model.get("block_size")),
            "model_length": model.get("length"),
        },
        where,
    )
    state = ckpt["state_dict"]
    if not isinstance(state, Mapping):
        raise ValueError(f"{where}: state_dict is a {type(state).__name__}; expected a mapping of names to tensors.")
    check_key_names(state, where)
    weights = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    others = sorted(k for k in state if not k.startswith("backbone."))
    for key in others:  # buffers of the training module; a non-identity digit permutation changes the code
        value = state[key]
        if "perm" in key.rsplit(".", 1)[-1] and isinstance(value, torch.Tensor) and value.numel():
            if not torch.equal(value.long(), torch.arange(value.numel())):
                raise ValueError(
                    f"{where}: {key} is a non-identity permutation of the sub-token codes (a shuffling "
                    "sub-tokenizer); this package writes token ids in plain base b, most significant digit first."
                )
    num_layers = int(model["n_blocks"])
    _check_keys(weights, num_layers, where)
    ell = int(prime.get("target_length", 1))
    vocab = int(prime.get("vocab_size", weights["output_layer.linear.weight"].shape[0] - (ell == 1)))
    if "base" in prime and ell > 1 and int(prime["base"]) != integer_base(vocab, ell):
        raise ValueError(
            f"{where}: prime.base {prime['base']} is not the smallest b with b^{ell} >= {vocab} "
            f"({integer_base(vocab, ell)}), the only base this package's codec uses."
        )
    ema_used = False
    if use_ema:
        ema = ckpt.get("ema")
        shadow = ema.get("shadow_params") if isinstance(ema, Mapping) else None
        if not isinstance(shadow, (list, tuple)):
            raise ValueError(
                f"{where}: no ema.shadow_params list (found ema={type(ema).__name__}); pass use_ema=False."
            )
        names = dit_parameter_names(num_layers)
        if len(shadow) != len(names):
            raise ValueError(
                f"{where}: ema.shadow_params has {len(shadow)} tensors; expected {len(names)}, the DiT's trainable "
                "parameters in registration order."
            )
        for name, tensor in zip(names, shadow):
            if not isinstance(tensor, torch.Tensor) or tensor.shape != weights[name].shape:
                shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                raise ValueError(
                    f"{where}: ema.shadow_params entry for {name} has shape {shape}, the weight "
                    f"{tuple(weights[name].shape)}: the EMA list is not in trainable-parameter order."
                )
            weights[name] = tensor  # its dtype is checked with the others (check_weight_values)
        ema_used = True
    source = SourceCheckpoint(
        weights=weights,
        vocab_size=vocab,
        num_sub_tokens=ell,
        carry_over=bool(prime.get("carry_over", True)) if ell > 1 else True,
        hidden_size=int(model["hidden_size"]),
        num_layers=num_layers,
        num_heads=int(model["n_heads"]),
        cond_dim=int(model["cond_dim"]),
        max_length=int(model.get("length", prime.get("seq_length", 1024))),
        dropout=float(model.get("dropout", 0.0)),
        description={
            "format": "PyTorch Lightning .ckpt (MDM-Prime / MDLM training code)",
            "weights": "EMA (ema.shadow_params)" if ema_used else "raw state_dict (no EMA)",
            "ignored_keys": others,
            "unpickler": "full (allow_unsafe_pickle)" if allow_unsafe_pickle else "restricted (code stubbed)",
        },
    )
    _check_shapes(source, where)
    check_weight_values(source, where)
    return source


# -- the fold -------------------------------------------------------------------------------------------------------


def constant_conditioning(weights: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``c = SiLU(mlp(emb(σ = 0)))`` in float64, ``(cond,)``: the DiT's conditioning with time conditioning off.

    ``emb(0)`` is MDLM's sinusoidal embedding at 0, cos then sin: ``F/2`` ones then ``F/2`` zeros (F = 256), and
    ``mlp = Linear → SiLU → Linear``."""
    w0, b0 = weights["sigma_map.mlp.0.weight"].double(), weights["sigma_map.mlp.0.bias"].double()
    w2, b2 = weights["sigma_map.mlp.2.weight"].double(), weights["sigma_map.mlp.2.bias"].double()
    features = torch.zeros(w0.shape[1], dtype=torch.float64)
    features[: w0.shape[1] // 2] = 1.0  # cos(0) = 1; sin(0) = 0 (and an odd F's zero pad)
    return torch.nn.functional.silu(w2 @ torch.nn.functional.silu(w0 @ features + b0) + b2)


def fold_weights(source: SourceCheckpoint) -> dict[str, torch.Tensor]:
    """This package's state dict for the source: the adaLN fold (float64, then the source dtype), renamed keys.

    With ``(shift, scale, gate) = W c + b`` per block (chunks shift1, scale1, gate1, shift2, scale2, gate2):
    ``norm.weight = w ⊙ (1 + scale)``, ``norm.bias = shift``, ``attn_out.weight = diag(gate1) W_out``,
    ``fc_out.weight = diag(gate2) W_2``, ``fc_out.bias = gate2 ⊙ b_2``; the final layer's ``(shift, scale)`` fold into
    ``norm_final``. The MASK logit row (row C of ``output_layer.linear``) is dropped: MDLM's SUBS sets it to -inf.
    """
    w = source.weights
    c = constant_conditioning(w)
    dtype = w["vocab_embed.embedding"].dtype
    out: dict[str, torch.Tensor] = {"model.embed_sub_tokens.weight": w["vocab_embed.embedding"]}

    def modulation(prefix: str, chunks: int) -> tuple[torch.Tensor, ...]:
        return (w[prefix + ".weight"].double() @ c + w[prefix + ".bias"].double()).chunk(chunks)

    for n in range(source.num_layers):
        b, t = f"blocks.{n}.", f"model.layers.{n}."
        shift1, scale1, gate1, shift2, scale2, gate2 = modulation(b + "adaLN_modulation", 6)
        out[t + "norm1.weight"] = w[b + "norm1.weight"].double() * (1 + scale1)
        out[t + "norm1.bias"] = shift1
        out[t + "attn.attn_qkv.weight"] = w[b + "attn_qkv.weight"]
        out[t + "attn.attn_out.weight"] = gate1[:, None] * w[b + "attn_out.weight"].double()
        out[t + "norm2.weight"] = w[b + "norm2.weight"].double() * (1 + scale2)
        out[t + "norm2.bias"] = shift2
        out[t + "mlp.fc_in.weight"] = w[b + "mlp.0.weight"]
        out[t + "mlp.fc_in.bias"] = w[b + "mlp.0.bias"]
        out[t + "mlp.fc_out.weight"] = gate2[:, None] * w[b + "mlp.2.weight"].double()
        out[t + "mlp.fc_out.bias"] = gate2 * w[b + "mlp.2.bias"].double()
    shift, scale = modulation("output_layer.adaLN_modulation", 2)
    out["model.norm.norm_final.weight"] = w["output_layer.norm_final.weight"].double() * (1 + scale)
    out["model.norm.norm_final.bias"] = shift
    out["lm_head.weight"] = w["output_layer.linear.weight"][: source.vocab_size]
    out["lm_head.bias"] = w["output_layer.linear.bias"][: source.vocab_size]
    return {k: v.to(dtype).contiguous() for k, v in out.items()}


def converted_config(source: SourceCheckpoint, *, embedding_dropout: float = 0.0, eos_token_id: int = GPT2_EOS):
    """The :class:`MDMPrimeConfig` of the converted model; every size comes from the source."""
    mlp = source.weights["blocks.0.mlp.0.weight"].shape[0]
    return MDMPrimeConfig(
        vocab_size=source.vocab_size,
        num_sub_tokens=source.num_sub_tokens,
        hidden_size=source.hidden_size,
        num_hidden_layers=source.num_layers,
        num_attention_heads=source.num_heads,
        intermediate_size=mlp,
        max_position_embeddings=source.max_length,
        dropout=source.dropout,
        embedding_dropout=embedding_dropout,  # MDLM's DiT has none on the embedding
        attention_dropout=0.0,
        time_conditioning=False,
        noise_schedule="linear",  # MDLM's log-linear σ(t) is α_t = 1 - t (with noise_eps)
        noise_eps=1e-3,
        loss_type="elbo",
        carry_over=source.carry_over,
        rope_theta=ROPE_BASE,
        layer_norm_eps=1e-5,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
    )


def convert_source(source: SourceCheckpoint, *, embedding_dropout: float = 0.0, eos_token_id: int = GPT2_EOS):
    """The converted :class:`MDMPrimeForMaskedDiffusion` (eval mode, the source dtype), loaded strictly."""
    from ..modeling_mdm_prime import MDMPrimeForMaskedDiffusion

    config = converted_config(source, embedding_dropout=embedding_dropout, eos_token_id=eos_token_id)
    state = fold_weights(source)
    # In the source dtype before loading, so that nothing is rounded through float32 on the way.
    model = MDMPrimeForMaskedDiffusion(config).to(state["lm_head.weight"].dtype)
    model.load_state_dict(state, strict=True)  # every key and shape of this package, or an error
    return model.eval()


# -- the command ----------------------------------------------------------------------------------------------------


def resolve_source(source: str, filename: str | None = None, revision: str | None = None) -> Path:
    """A local folder or ``.ckpt``, or a Hub repo id (with ``filename`` for a file inside it) downloaded first."""
    if filename is None and Path(source).exists():
        return Path(source)
    if filename is not None and (Path(source) / filename).exists():
        return Path(source) / filename
    from huggingface_hub import hf_hub_download, snapshot_download

    if filename is not None:
        return Path(hf_hub_download(source, filename, revision=revision))
    patterns = ["config.json", "*.safetensors", "*.safetensors.index.json"]
    return Path(snapshot_download(source, revision=revision, allow_patterns=patterns))


def source_license(source: str) -> str | None:
    if source in KNOWN_LICENSES:
        return KNOWN_LICENSES[source]
    return next((lic for prefix, lic in KNOWN_LICENSE_PREFIXES.items() if source.startswith(prefix)), None)


def _sha256(paths: list[Path]) -> dict[str, str]:
    digests = {}
    for path in paths:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                digest.update(chunk)
        digests[path.name] = digest.hexdigest()
    return digests


def write_model_card(folder: Path, record: Mapping[str, Any], model_id: str | None = None) -> None:
    """``README.md`` from the package's card template; its Conversion section is rendered from ``conversion.json``
    (:func:`modeling_mdm_prime.tools.conversion_lines`), so a push of the folder keeps it without a custom template.
    Values from the source reach the card only as escaped template variables, never as template source."""
    from .model_card import render_model_card

    card = render_model_card(
        folder,
        model_id or str(folder),
        license=record["source"]["license"],
        datasets=record.get("datasets", ()),
        language=["en"],
        training_data=record.get("training_data"),
    )
    (folder / "README.md").write_text(str(card), encoding="utf-8")


def source_label(source: str) -> str:
    """What the card and ``conversion.json`` call the source: a Hub id as it is, a local path by its file name only
    (a published card must not reveal the converting machine's layout)."""
    return Path(source).name if Path(source).exists() or os.path.isabs(source) else source


def load_tokenizer(tokenizer: str | os.PathLike | None):
    """The converter's tokenizer: ``tokenizer`` (a folder or Hub id), else GPT-2 from the Hub (``gpt2``).

    Raises:
        ValueError: the default cannot be loaded (offline, no cached copy): pass ``tokenizer`` (``--tokenizer``).
    """
    from transformers import AutoTokenizer

    if tokenizer is not None:
        return AutoTokenizer.from_pretrained(str(tokenizer))
    try:
        return AutoTokenizer.from_pretrained(DEFAULT_TOKENIZER)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"could not load the default tokenizer {DEFAULT_TOKENIZER!r} from the Hugging Face Hub "
            f"({' '.join(str(error).split())}). Offline, "
            "pass the GPT-2 tokenizer the model was trained with as a local folder: --tokenizer DIR "
            "(convert_checkpoint(..., tokenizer=DIR))."
        ) from None


def convert_checkpoint(
    source: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    filename: str | None = None,
    revision: str | None = None,
    tokenizer: str | os.PathLike | None = None,
    embedding_dropout: float = 0.0,
    use_ema: bool = True,
    allow_unsafe_pickle: bool = False,
    license: str | None = None,  # noqa: A002 - the model card field's name
    datasets: tuple[str, ...] = (),
    training_data: str | None = None,
    model_id: str | None = None,
    max_new_tokens: int = 128,
) -> Path:
    """Convert an MDLM folder / Hub repo or an MDM-Prime ``.ckpt`` into a ``save_pretrained`` folder of this package.

    Args:
        source: a local MDLM folder or ``.ckpt``, or a Hub repo id (``filename`` names a file inside it).
        output_dir: a new or empty folder.
        tokenizer: a tokenizer folder or Hub id (default: ``gpt2`` from the Hub; offline, pass a local copy); its
            size must be the model's vocabulary, its EOS becomes BOS = EOS of the config.
        embedding_dropout: dropout on the embedding of the converted model (MDLM has none: 0.0).
        use_ema: for a ``.ckpt``, convert the EMA weights (default) rather than the raw ones.
        allow_unsafe_pickle: unpickle a ``.ckpt`` with Python's full unpickler, which runs any code the file names.
        license, datasets, training_data, model_id: for the model card (the licence defaults to the known one of
            the source).

    Writes ``model.safetensors``, ``config.json``, the code files, ``generation_config.json``, the tokenizer (made
    portable to transformers 4.57), ``conversion.json`` (what was done, with the source files' SHA-256) and the card.

    Raises:
        ValueError: an unconvertible or malformed source (see :func:`load_mdlm_folder`,
            :func:`load_lightning_checkpoint`), a tokenizer that does not fit, or a non-empty ``output_dir``.
    """
    from .publish import make_tokenizer_portable

    target = Path(output_dir)
    if target.exists() and any(target.iterdir()):
        raise ValueError(f"{target} is not empty; choose a new folder.")
    name = str(source)
    path = resolve_source(name, filename, revision)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{path}: a folder without config.json; expected MDLM's Hub format or a .ckpt file.")
        loaded = load_mdlm_folder(path)
        files = sorted(path.glob("*.safetensors"))
    else:
        loaded = load_lightning_checkpoint(path, use_ema=use_ema, allow_unsafe_pickle=allow_unsafe_pickle)
        files = [path]
    tok = load_tokenizer(tokenizer)
    if len(tok) != loaded.vocab_size or tok.eos_token_id is None:
        raise ValueError(
            f"the tokenizer has {len(tok)} tokens (EOS {tok.eos_token_id}); the model has a vocabulary of "
            f"{loaded.vocab_size} real tokens (MDLM's config counts the MASK as one more). Pass the tokenizer it "
            "was trained with (--tokenizer)."
        )
    model = convert_source(loaded, embedding_dropout=embedding_dropout, eos_token_id=tok.eos_token_id)
    model.generation_config.update(max_new_tokens=min(max_new_tokens, loaded.max_length))
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    tok.save_pretrained(target)
    make_tokenizer_portable(target)
    record = {
        "source": {
            "name": source_label(name),
            "filename": filename,
            "revision": revision,
            "license": license or source_license(name),
            "sha256": _sha256(files),
            **loaded.description,
        },
        "num_sub_tokens": loaded.num_sub_tokens,
        "carry_over": loaded.carry_over,
        "dtype": str(loaded.weights["vocab_embed.embedding"].dtype).removeprefix("torch."),
        "dropped_mask_row": loaded.weights["output_layer.linear.weight"].shape[0] > loaded.vocab_size,
        "dropout": loaded.dropout,
        "embedding_dropout": embedding_dropout,
        "fold": "constant adaLN modulation (sigma = 0) folded into LayerNorm affine and output rows, in float64",
        "datasets": list(datasets),
        "training_data": training_data,
        "num_parameters": sum(math.prod(p.shape) for p in model.parameters()),
    }
    (target / CONVERSION_FILE).write_text(json.dumps(record, indent=2) + "\n")
    write_model_card(target, record, model_id)
    return target


__all__ = [
    "PickleStub",
    "RestrictedUnpickler",
    "SourceCheckpoint",
    "constant_conditioning",
    "convert_checkpoint",
    "convert_source",
    "converted_config",
    "dit_parameter_names",
    "fold_weights",
    "load_lightning_checkpoint",
    "load_mdlm_folder",
    "plain_value",
    "resolve_source",
    "restricted_torch_load",
]
