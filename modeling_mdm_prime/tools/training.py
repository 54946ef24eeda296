"""The run machinery shared by the training scripts (``examples/pretrain.py``, ``examples/train_images.py``):
accelerate set-up and trackers, an EMA of the weights, atomic checkpoints and exact resumption.

Not shipped as remote code. A run's settings are a dataclass ``cfg`` with the fields these functions read:
``output_dir``, ``overwrite_output_dir``, ``resume_from_checkpoint``, ``keep_checkpoints``,
``allow_inexact_resume``, ``allow_changed_settings``, ``cpu``, ``mixed_precision``,
``gradient_accumulation_steps`` and ``report_to``. Checkpoints hold accelerate's model, optimizer and RNG files
plus the script's own state as JSON and safetensors (scheduler, EMA, settings); resuming never unpickles
anything beyond tensors (``torch.load(weights_only=True)``) unless ``allow_unsafe_pickle`` allows it for the FSDP and
DeepSpeed states that need it, and refuses what would not continue the run exactly unless ``allow_inexact_resume`` /
``allow_changed_settings`` say otherwise.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator, PartialState
from accelerate.logging import get_logger
from accelerate.tracking import GeneralTracker, on_main_process
from accelerate.utils import DataLoaderConfiguration, DistributedType, gather_object
from accelerate.utils import load as accelerate_load
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, load_model, save_file
from transformers import HfArgumentParser

from ..configuration_mdm_prime import MDMPrimeConfig

logger = get_logger(__name__)
STATE_FILE, EMA_FILE = "trainer_state.json", "ema.safetensors"  # the script's own state: JSON and safetensors
MODEL_FILE, OPTIMIZER_FILE = "model.safetensors", "optimizer.bin"  # accelerate's
STATE_FORMAT = 2
# Settings of every run that do not change the trained weights: they may differ between a run and its resumption.
NEUTRAL_SETTINGS = frozenset({
    "output_dir", "resume_from_checkpoint", "stop_after_steps", "report_to", "log_every", "eval_every",
    "checkpoint_every", "keep_checkpoints", "allow_inexact_resume", "allow_changed_settings", "overwrite_output_dir",
    "allow_unsafe_pickle",
})  # fmt: skip


def parse_settings(config_class: type, argv: list[str], description: str | None = None) -> Any:
    """A run's settings (an instance of the dataclass ``config_class``) from command-line flags, or from a single
    JSON / YAML file holding them."""
    parser = HfArgumentParser(config_class, description=description)
    if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")):
        load = parser.parse_json_file if argv[0].endswith(".json") else parser.parse_yaml_file
        (cfg,) = load(argv[0])
    else:
        (cfg,) = parser.parse_args_into_dataclasses(args=argv)
    return cfg


# -- logging ---------------------------------------------------------------------------------------------------------


class JSONLTracker(GeneralTracker):
    """An accelerate tracker that appends every logged dict to ``<logging_dir>/metrics.jsonl``. The settings go
    to ``config.json``, written by :func:`record_settings` (which keeps the first run's and lists resumes)."""

    name = "jsonl"
    requires_logging_directory = True

    @on_main_process
    def __init__(self, run_name: str, logging_dir: str):
        super().__init__()
        self.path = Path(logging_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)

    @property
    def tracker(self) -> Path:
        return self.path

    def store_init_configuration(self, values: dict) -> None:
        """Nothing: :func:`record_settings` writes ``config.json``."""

    @on_main_process
    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file, so a crash never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def record_settings(log_dir: Path, settings: dict, resume: dict | None) -> None:
    """``config.json``: a fresh run writes its settings (and a fresh ``metrics.jsonl``); a resume keeps the first
    run's settings, appends itself to ``resumes`` and drops the metrics logged after the checkpoint's step, so
    the repeated steps are not logged twice."""
    log_dir.mkdir(parents=True, exist_ok=True)
    config, metrics = log_dir / "config.json", log_dir / "metrics.jsonl"
    if resume is None or not config.is_file():
        write_atomic(config, json.dumps({**settings, "resumes": []}, indent=2, default=str))
        if resume is None:
            metrics.unlink(missing_ok=True)
    if resume is None:
        return
    saved = json.loads(config.read_text())
    saved.setdefault("resumes", []).append(resume)
    write_atomic(config, json.dumps(saved, indent=2, default=str))
    if metrics.is_file():
        rows = map(_json_or_none, metrics.read_text().splitlines())
        kept = [row for row in rows if row is not None and row["step"] <= resume["step"]]
        write_atomic(metrics, "".join(json.dumps(row) + "\n" for row in kept))


def _json_or_none(line: str) -> dict | None:
    """A metrics line, or None for a line a killed run left half-written."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row if isinstance(row, dict) and isinstance(row.get("step"), int) else None


def _available_trackers(requested: list) -> list:
    """Keep the trackers whose packages are installed (the JSONL one always is)."""
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    available = {"tensorboard": is_tensorboard_available(), "wandb": is_wandb_available()}
    kept = []
    for tracker in requested:
        if isinstance(tracker, str) and not available.get(tracker, True):
            print(f"tracker {tracker!r} is not installed; skipping it", file=sys.stderr)
            continue
        kept.append(tracker)
    return kept


# -- EMA -------------------------------------------------------------------------------------------------------------


class EMA:
    """Exponential moving average of the parameters, with the usual warm-up ``min(decay, (1+n)/(10+n))``.

    Saved as safetensors (:meth:`save`, :meth:`load`), never pickled."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay, self.updates = decay, 0
        self.shadow = {name: p.detach().clone() for name, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for name, param in model.named_parameters():
            self.shadow[name].lerp_(param.detach(), 1.0 - decay)

    @contextmanager
    def applied(self, model: torch.nn.Module):
        """Swap the averaged weights in for the duration of the block."""
        saved = {name: p.detach().clone() for name, p in model.named_parameters()}
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.copy_(self.shadow[name])
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, param in model.named_parameters():
                    param.copy_(saved[name])

    def save(self, path: Path) -> None:
        tensors = {name: value.detach().cpu().contiguous() for name, value in self.shadow.items()}
        save_file(tensors, str(path), metadata={"updates": str(self.updates), "decay": repr(self.decay)})

    def load(self, path: Path) -> None:
        """Raises ValueError naming the file when it is unreadable or does not fit the model."""
        try:
            with safe_open(str(path), framework="pt") as f:
                updates = int((f.metadata() or {}).get("updates", "x"))
                shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
            tensors = load_file(str(path))
        except (SafetensorError, ValueError, OSError) as error:
            raise ValueError(f"{path}: not a readable EMA file ({error}).") from error
        expected = {name: tuple(value.shape) for name, value in self.shadow.items()}
        if shapes != expected:
            raise ValueError(f"{path}: {_shape_difference(shapes, expected)}")
        self.updates = updates
        for name, value in tensors.items():
            self.shadow[name].copy_(value)


# -- checkpoints -----------------------------------------------------------------------------------------------------


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a crash mid-save leaves only a ``.tmp`` directory behind)."""
    found = [p for p in (output_dir / "checkpoints").glob("checkpoint-*") if p.is_dir() and p.suffix != ".tmp"]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def run_settings(cfg, accelerator: Accelerator) -> dict:
    return {**asdict(cfg), "num_processes": accelerator.num_processes}


def save_checkpoint(accelerator: Accelerator, cfg, step: int, scheduler, ema: EMA | None) -> None:
    """accelerate.save_state (model, optimizer, RNG) plus the script's own state as JSON/safetensors, into a
    temporary directory renamed into place only when complete."""
    root = Path(cfg.output_dir) / "checkpoints"
    final, tmp = root / f"checkpoint-{step}", root / f"checkpoint-{step}.tmp"
    if final.exists():  # this step is already saved
        return
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)  # before any process writes its RNG state into it
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if ema is not None:
            ema.save(tmp / EMA_FILE)
        state = {
            "format": STATE_FORMAT,
            "step": step,
            "scheduler": scheduler.state_dict(),
            "ema_updates": ema.updates if ema is not None else None,
            "device": accelerator.device.type,
            "settings": run_settings(cfg, accelerator),
        }
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2, default=str))
        os.replace(tmp, final)
        for old in checkpoint_dirs(Path(cfg.output_dir))[: -cfg.keep_checkpoints]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def read_trainer_state(path: Path) -> dict:
    """The checkpoint's ``trainer_state.json``, checked. Raises ValueError naming the file and the problem."""
    file = path / STATE_FILE
    if not path.is_dir():
        raise ValueError(f"--resume_from_checkpoint: {path} is not a directory.")
    if not file.is_file():
        raise ValueError(f"{file}: missing, so {path} is not a complete checkpoint.")
    try:
        state = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{file}: not valid JSON ({error}).") from error
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or state["step"] < 0:
        raise ValueError(f"{file}: expected an object with a non-negative integer 'step', got {str(state)[:200]!r}.")
    if state.get("format") == STATE_FORMAT:
        for key, kind in (("scheduler", dict), ("settings", dict)):
            if not isinstance(state.get(key), kind):
                raise ValueError(f"{file}: '{key}' must be a JSON object.")
    return state


def changed_settings(saved: dict, current: dict, allowed: str, neutral=NEUTRAL_SETTINGS) -> dict:
    """Settings that differ from the checkpoint's and are neither neutral nor allowed: ``{name: (saved, now)}``."""
    allow = {name.strip() for name in allowed.split(",") if name.strip()}
    unknown = allow - set(current) - {"all"}
    if unknown:
        raise ValueError(f"--allow_changed_settings: unknown settings {sorted(unknown)}.")
    return {
        key: (saved.get(key), value)
        for key, value in current.items()
        if key not in neutral and saved.get(key) != value and "all" not in allow and key not in allow
    }


def _shape_difference(found: dict, expected: dict) -> str:
    """What differs between two ``{name: shape}`` maps, for an error message."""
    differ = [key for key in expected if found.get(key, expected[key]) != expected[key]]
    wrong = [f"{key} is {found[key]} in the file but {expected[key]} here" for key in differ]
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    parts = wrong[:3] + ([f"missing {missing[:5]}"] if missing else []) + ([f"unexpected {extra[:5]}"] if extra else [])
    return "does not fit this model: " + "; ".join(parts) + " (different hidden_size, vocabulary or layers?)."


def check_model_file(file: Path, model: torch.nn.Module) -> None:
    """The safetensors header of ``file`` against ``model``'s parameters. Raises ValueError naming the file."""
    if not file.is_file():
        raise ValueError(f"{file}: missing.")
    try:
        with safe_open(str(file), framework="pt") as f:
            found = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{file}: not a readable safetensors file, truncated or corrupt ({error}).") from error
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    # Tied weights are stored once, so a missing key is fine when a tensor of its shape is there.
    missing = {key for key in expected if key not in found and expected[key] not in found.values()}
    if missing or any(found[key] != expected.get(key) for key in found):
        raise ValueError(f"{file}: {_shape_difference(found, expected)}")


def safe_torch_load(file: Path) -> Any:
    """``torch.load(weights_only=True)`` (tensors, numbers and numpy RNG state only). Raises ValueError naming the
    file when it is missing, corrupt or holds anything else (such as code to run)."""
    if not file.is_file():
        raise ValueError(f"{file}: missing.")
    try:
        return accelerate_load(str(file), map_location="cpu", weights_only=True)
    except Exception as error:  # UnpicklingError, RuntimeError (truncated zip), EOFError, ...
        raise ValueError(
            f"{file}: refused or unreadable: {type(error).__name__}: {str(error).splitlines()[0][:300]}"
        ) from error


def set_random_states(states: dict) -> None:
    random.setstate(states["random_state"])
    np.random.set_state(states["numpy_random_seed"])
    torch.set_rng_state(states["torch_manual_seed"])
    if torch.cuda.is_available() and "torch_cuda_manual_seed" in states:
        torch.cuda.set_rng_state_all(states["torch_cuda_manual_seed"])


def resume(
    accelerator: Accelerator, cfg, path: Path, model, optimizer, scheduler, ema, neutral=NEUTRAL_SETTINGS
) -> dict:
    """Restore a checkpoint exactly, or raise ValueError saying why not. Returns the record of the resume.

    One process or DDP: only tensors are unpickled (``weights_only=True``); any other file in the folder, such as a
    ``custom_checkpoint_*.pkl``, is never loaded and is listed in a warning. FSDP and DeepSpeed states can only be
    read by unpickling in full, so they are refused unless ``cfg.allow_unsafe_pickle``; a missing random-state file
    there, or a checkpoint written on another device type (CPU -> GPU), is an inexact resume (refused unless
    ``cfg.allow_inexact_resume``)."""
    state = read_trainer_state(path)
    step, inexact = state["step"], []
    if state.get("format") != STATE_FORMAT:
        raise ValueError(
            f"{path / STATE_FILE}: written by an older training script (no settings, scheduler or EMA in it)."
        )
    current = run_settings(cfg, accelerator)
    changed = changed_settings(state["settings"], current, cfg.allow_changed_settings, neutral)
    if changed:
        listing = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
        raise ValueError(
            f"{path}: these settings differ from the checkpoint's and would not continue the run exactly: {listing}. "
            f"Pass --allow_changed_settings {','.join(changed)} to resume anyway."
        )
    own = {STATE_FILE, EMA_FILE, MODEL_FILE, OPTIMIZER_FILE, "scaler.pt"}
    own |= {f"random_states_{i}.pkl" for i in range(accelerator.num_processes)}
    ignored = sorted(p.name for p in path.iterdir() if p.name not in own)
    if ignored:
        logger.warning(
            f"{path}: ignored (never loaded, pickles are not trusted): {', '.join(ignored)}", main_process_only=True
        )
    saved_device, device = state.get("device"), accelerator.device.type
    if saved_device is not None and saved_device != device:
        inexact.append(
            f"the checkpoint was written on {saved_device} and this run is on {device}: the weights, optimizer and "
            f"data order carry over, but the {device} random generator cannot take the {saved_device} one's state "
            "(masks and dropout draw other numbers) and the kernels round differently, so the run will not follow "
            "the uninterrupted one"
        )
    special = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    if special:
        if any(name.startswith("custom_checkpoint_") for name in ignored):
            raise ValueError(f"{path}: holds custom_checkpoint_*.pkl files, which are never loaded; remove them.")
        if not getattr(cfg, "allow_unsafe_pickle", False):
            raise ValueError(
                f"{path}: resuming {accelerator.distributed_type.value} state unpickles files in full (FSDP's sharded "
                "state through torch.distributed.checkpoint, whose .metadata is read with pickle.load; DeepSpeed's "
                "states with torch.load(weights_only=False)), which runs any code a hostile checkpoint names. Pass "
                "--allow_unsafe_pickle if you trust this checkpoint (you wrote it); one-process and DDP resumes need "
                "no such flag (tensors only)."
            )
        rng_file = path / f"random_states_{accelerator.process_index}.pkl"
        if not rng_file.is_file():  # accelerate would go on without it, silently inexact
            inexact.append(f"{rng_file} is missing, so this process's random streams would restart")
        accelerator.load_state(str(path))
    else:
        check_model_file(path / MODEL_FILE, accelerator.unwrap_model(model))
        optimizer_state = safe_torch_load(path / OPTIMIZER_FILE)
        try:
            load_model(accelerator.unwrap_model(model), str(path / MODEL_FILE), strict=True)
            optimizer.load_state_dict(optimizer_state)
        except (SafetensorError, RuntimeError, ValueError, KeyError) as error:
            raise ValueError(f"{path}: the model or optimizer state does not load: {error}") from error
        if accelerator.scaler is not None:
            accelerator.scaler.load_state_dict(safe_torch_load(path / "scaler.pt"))
    try:
        scheduler.load_state_dict(state["scheduler"])
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path / STATE_FILE}: the 'scheduler' state does not load ({error}).") from error
    if ema is not None:
        if (path / EMA_FILE).is_file():
            ema.load(path / EMA_FILE)
        else:
            inexact.append(f"{path / EMA_FILE} is missing, so the EMA would restart from the current weights")
            ema.shadow = {n: p.detach().clone() for n, p in accelerator.unwrap_model(model).named_parameters()}
    if not special:  # each process restores its own random states; all of them must succeed
        rng_file = path / f"random_states_{accelerator.process_index}.pkl"
        try:
            states = safe_torch_load(rng_file)
            set_random_states(states)
            accelerator.step = int(states.get("step", 0))
        except (ValueError, KeyError, TypeError) as error:
            inexact.append(f"{rng_file}: the random states do not load ({error})")
    inexact = [problem for problems in gather_object([inexact]) for problem in problems]
    if inexact and not cfg.allow_inexact_resume:
        raise ValueError(
            "cannot resume exactly: " + "; ".join(dict.fromkeys(inexact)) + ". Pass --allow_inexact_resume to go on."
        )
    for problem in dict.fromkeys(inexact):
        logger.warning(f"inexact resume: {problem}", main_process_only=True)
    logger.info(f"resumed from {path} at step {step}", main_process_only=True)
    return {
        "step": step,
        "checkpoint": str(path),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "changed_settings": {
            k: [state["settings"].get(k), v]
            for k, v in current.items()
            if k not in neutral and state["settings"].get(k) != v
        },
        "inexact": list(dict.fromkeys(inexact)),
        "ignored_files": ignored,
    }


def find_checkpoint(cfg) -> Path | None:
    """The checkpoint to resume from, or None for a fresh run (which refuses to mix with an earlier run's)."""
    done = checkpoint_dirs(Path(cfg.output_dir))
    if not cfg.resume_from_checkpoint:
        if done and not cfg.overwrite_output_dir:
            raise ValueError(
                f"{cfg.output_dir} holds checkpoints of an earlier run ({done[-1].name}); pass "
                "--resume_from_checkpoint latest to continue it or --overwrite_output_dir to start afresh."
            )
        return None
    if cfg.resume_from_checkpoint == "latest":
        if not done:
            raise ValueError(
                f"--resume_from_checkpoint latest: no complete checkpoint in {cfg.output_dir}/checkpoints."
            )
        return done[-1]
    return Path(cfg.resume_from_checkpoint)


def end_run(accelerator: Accelerator | None = None) -> None:
    """End a script's run: every process waits for the others, trackers are closed (accelerate's
    ``end_training``), and the process group is destroyed now, while the interpreter is fully alive.

    Left to interpreter shutdown, gloo's ``~ProcessGroupGloo`` joins its worker thread while holding the GIL, and the
    worker may be waiting for the GIL to release its last work object (a barrier's): a CPU DDP run that has written
    everything then never exits. ``end_training`` destroys the group in current accelerate, but not for
    fork-launched processes nor in every version, so the group is destroyed here too, and lingering work objects
    are collected before shutdown."""
    import gc

    import torch.distributed as dist

    if accelerator is not None:
        accelerator.wait_for_everyone()
        accelerator.end_training()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()


def make_accelerator(cfg, run_name: str) -> Accelerator:
    # Set up the process state before anything reads it: trackers consult it in their constructors, and a
    # default PartialState() made there would not know this is a CPU launch and would see one process.
    PartialState(cpu=cfg.cpu)
    trackers = [JSONLTracker(run_name=run_name, logging_dir=str(Path(cfg.output_dir) / "logs"))]
    trackers += [name for name in filter(None, cfg.report_to.split(",")) if name != "jsonl"]
    accelerator = Accelerator(
        cpu=cfg.cpu,
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        log_with=_available_trackers(trackers),
        project_dir=cfg.output_dir,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    # accelerate silently runs an FSDP launch as DDP (or one process) where FSDP cannot run, e.g. on CPU; a user who
    # asked for sharded training must not get unsharded training and checkpoints without being told.
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true") and (
        accelerator.distributed_type != DistributedType.FSDP
    ):
        raise ValueError(
            f"this launch asks for FSDP, but accelerate runs it as {accelerator.distributed_type.value} on "
            f"{accelerator.device} (FSDP needs GPUs). Launch with a DDP config (e.g. "
            "examples/accelerate_configs/cpu_ddp.yaml) instead."
        )
    return accelerator


# -- text models (pretrain.py and the benchmarks that train like it) ---------------------------------------------


def text_model_config(tokenizer, seq_len: int, **fields) -> MDMPrimeConfig:
    """An :class:`MDMPrimeConfig` over the tokenizer's vocabulary and special tokens, ``seq_len`` positions and the
    given config ``fields`` (size, ℓ, schedule, loss, ...)."""
    return MDMPrimeConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=seq_len,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **fields,
    )


SCHEDULE_PARAMETERS = ("schedule_power_logits",)  # GenMD4's ŵ


def optimizer_groups(model: torch.nn.Module, weight_decay: float, decay_schedule_parameters: bool = False) -> list:
    """AdamW parameter groups: the network with ``weight_decay``; the schedule parameters (GenMD4's ŵ) without it
    unless ``decay_schedule_parameters``. Decay pulls ŵ towards 0, i.e. every power towards softplus(0) = 0.693,
    whatever the data says (the md4 reference applies it to ŵ)."""
    network, schedule = [], []
    for name, parameter in model.named_parameters():
        (schedule if name.split(".")[-1] in SCHEDULE_PARAMETERS else network).append(parameter)
    groups = [{"params": network, "weight_decay": weight_decay}]
    if schedule:
        groups.append({"params": schedule, "weight_decay": weight_decay if decay_schedule_parameters else 0.0})
    return groups


def token_frequencies(blocks, vocab_size: int, max_rows: int = 20_000) -> torch.Tensor:
    """``(C,)`` token counts over (at most ``max_rows``) training blocks, padding excluded."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for index, row in enumerate(blocks):
        if index >= max_rows:
            break
        ids = torch.as_tensor(row["input_ids"])
        counts += torch.bincount(ids[torch.as_tensor(row["attention_mask"]).bool()], minlength=vocab_size)
    return counts


def plot_powers(powers: torch.Tensor, counts: torch.Tensor, path: Path, title: str = "GenMD4 learned powers") -> None:
    """PNG: each token's learned power w_i against its training frequency (log scale; unseen tokens at the left)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frequency = counts.double() / counts.sum().clamp(min=1)
    floor = float(frequency[frequency > 0].min()) / 10 if bool((frequency > 0).any()) else 1e-9
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter(frequency.clamp(min=floor).numpy(), powers.detach().double().numpy(), s=4, alpha=0.5)
    ax.set_xscale("log")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--", label="w = 1 (initial, MD4 linear)")
    ax.set_xlabel(f"token frequency in the training data (unseen tokens at {floor:.1e})")
    ax.set_ylabel(r"power $w_i$  ($\alpha_{t,i} = 1 - t^{w_i}$)")
    ax.set_title(title)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
