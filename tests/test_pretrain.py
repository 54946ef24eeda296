"""examples/pretrain.py: the data pipeline (modeling_mdm_prime.tools.data), 2-process DDP through accelerate launch
(same learning-rate schedule as one process), exact resume or a refusal that says why, checkpoints that never
unpickle code, and a run killed mid-training."""

import dataclasses
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from safetensors.torch import load_file
from transformers import HfArgumentParser

from conftest import GPT2_TOKENIZER
from fresh_interpreter import tf4_python
from modeling_mdm_prime.tools import data

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "pretrain.py"


def load_pretrain():
    """examples/pretrain.py as a module (it is a script, not part of the package)."""
    if "pretrain_example" not in sys.modules:
        spec = importlib.util.spec_from_file_location("pretrain_example", SCRIPT)
        sys.modules["pretrain_example"] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules["pretrain_example"]


pretrain = load_pretrain()

TINY = [
    "--max_documents", "6", "--eval_blocks", "8", "--eval_time_samples", "2", "--hidden_size", "32",
    "--intermediate_size", "64", "--num_hidden_layers", "2", "--num_attention_heads", "2", "--batch_size", "4",
    "--seq_len", "32", "--bpe_vocab_size", "300", "--sample_tokens", "8", "--num_samples", "1",
    "--report_to", "jsonl", "--log_every", "1", "--warmup_steps", "2", "--cpu",
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run(args, processes=1, timeout=240):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    if processes == 1:
        command = [sys.executable, str(SCRIPT), *args]
    else:
        command = [
            sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
            str(free_port()),
            str(SCRIPT), *args,
        ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def logged(output_dir: Path, key: str = "train/loss") -> dict[int, float]:
    """``{step: value}`` of one logged metric; fails if a step was logged twice."""
    rows = [json.loads(line) for line in (output_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
    steps = [row["step"] for row in rows if key in row]
    assert len(steps) == len(set(steps)), f"{key} logged twice for some steps: {steps}"
    return {row["step"]: row[key] for row in rows if key in row}


losses = logged


def test_bundled_corpus_tokenises_and_packs_deterministically():
    cfg = data.DataConfig(max_documents=5, bpe_vocab_size=400, seq_len=64)
    runs = []
    for _ in range(2):
        train, val = data.load_corpus(cfg)
        tokenizer = data.build_tokenizer(cfg, train)
        runs.append((data.tokenize_blocks(train, tokenizer, cfg)[:]["input_ids"], tokenizer))
    (first, tokenizer), (second, _) = runs
    assert torch.equal(first, second) and first.shape[1] == 64 and len(first) > 100
    assert len(train) + len(val) == 5 and len(val) >= 1  # held out by whole documents
    # Packing is BOS doc EOS BOS doc EOS ... cut into blocks: the first block starts a play.
    assert first[0, 0] == tokenizer.bos_token_id
    assert tokenizer.decode(first[0, 1:20]) in train[0]["text"]
    # BOS and EOS share one id here: two per document, the last EOS possibly in the dropped partial block.
    assert 2 * len(train) - 1 <= int((first == tokenizer.eos_token_id).sum()) <= 2 * len(train)
    padded = data.tokenize_blocks(train, tokenizer, data.DataConfig(seq_len=64, packing=False))[:]
    assert padded["input_ids"].shape == (len(train), 64) and bool((padded["attention_mask"].sum(1) <= 64).all())


def test_config_file_streaming_and_a_pretrained_tokenizer(tmp_path):
    settings = {"max_documents": 3, "streaming": True, "seq_len": 48, "tokenizer": str(GPT2_TOKENIZER.parent)}
    (tmp_path / "run.json").write_text(json.dumps(settings))
    (tmp_path / "run.yaml").write_text("".join(f"{key}: {value}\n" for key, value in settings.items()))
    for name in ("run.json", "run.yaml"):
        cfg = pretrain.parse_config([str(tmp_path / name)])
        assert (cfg.max_documents, cfg.streaming, cfg.seq_len) == (3, True, 48)
    assert pretrain.parse_config(["--seq_len", "48", "--packing", "false"]).packing is False
    train, val = data.load_corpus(cfg)  # streaming: documents are read lazily
    tokenizer = data.build_tokenizer(cfg, train)
    assert len(tokenizer) == 50257 and tokenizer.pad_token_id == tokenizer.eos_token_id
    blocks = list(data.tokenize_blocks(train, tokenizer, cfg).take(5))
    assert len(blocks) == 5 and all(len(block["input_ids"]) == 48 for block in blocks)
    assert int(blocks[0]["input_ids"][0]) == tokenizer.bos_token_id
    assert len(list(val)) >= 1


COMMON = [*TINY, "--max_steps", "6", "--checkpoint_every", "3", "--eval_every", "3"]


@pytest.fixture(scope="module")
def single_run(tmp_path_factory) -> Path:
    """One process, 6 steps, checkpoints at steps 3 and 6."""
    out = tmp_path_factory.mktemp("single") / "run"
    run([*COMMON, "--output_dir", str(out)])
    return out


def test_help_describes_every_flag_with_its_default():
    parser = HfArgumentParser(pretrain.PretrainConfig)
    text = parser.format_help()
    formatter = parser._get_formatter()
    names = {f.name for f in dataclasses.fields(pretrain.PretrainConfig)}
    flags = [a for a in parser._actions if a.dest in names and f"--{a.dest}" in a.option_strings]
    assert {a.dest for a in flags} == names
    for action in flags:
        assert action.help and len(action.help) > 8, action.dest
        assert "(default: %(default)s)" in formatter._get_help_string(action), action.dest
        assert f"--{action.dest}" in text
    assert "(default: 0.999)" in " ".join(text.split())  # ema_decay, rendered


def test_resume_in_one_process_continues_exactly_and_logs_each_step_once(single_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(single_run, out)
    first = logged(out)
    run([*COMMON, "--output_dir", str(out), "--resume_from_checkpoint", str(out / "checkpoints" / "checkpoint-3")])
    again = logged(out)  # metrics.jsonl held steps 1-6 already: the repeated steps replace them, not duplicate them
    assert sorted(again) == list(range(1, 7)) and all(abs(again[s] - first[s]) < 1e-6 for s in again)
    assert sorted(logged(out, "val/ppl_bound")) == [3, 6]
    config = json.loads((out / "logs" / "config.json").read_text())
    assert config["batch_size"] == 4 and [r["step"] for r in config["resumes"]] == [3]
    # The EMA is the script's own safetensors file, not a pickle registered with accelerate.
    checkpoint = out / "checkpoints" / "checkpoint-6"
    assert (checkpoint / "ema.safetensors").is_file() and not list(checkpoint.glob("custom_checkpoint_*"))


HOSTILE = """
import pathlib, sys, torch
class Payload:
    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(sys.argv[2]),))
torch.save({"updates": Payload(), "shadow": {}}, sys.argv[1])
"""


def hostile_pickle(path: Path, marker: Path) -> None:
    """A file that creates ``marker`` when unpickled with weights_only=False (as accelerate loads custom states)."""
    subprocess.run([sys.executable, "-c", HOSTILE, str(path), str(marker)], check=True, timeout=60)


@pytest.mark.slow
def test_resume_never_unpickles_code_from_the_checkpoint(single_run, tmp_path):
    out, marker = tmp_path / "run", tmp_path / "pwned"
    shutil.copytree(single_run, out)
    checkpoint = out / "checkpoints" / "checkpoint-3"
    hostile_pickle(checkpoint / "custom_checkpoint_0.pkl", marker)
    # Sanity check of the payload: a plain unpickling runs it.
    torch.load(checkpoint / "custom_checkpoint_0.pkl", weights_only=False)
    assert marker.exists()
    marker.unlink()
    result = run([*COMMON, "--output_dir", str(out), "--resume_from_checkpoint", str(checkpoint)])
    assert not marker.exists()
    assert "ignored (never loaded" in result.stderr and "custom_checkpoint_0.pkl" in result.stderr
    assert json.loads((out / "logs" / "config.json").read_text())["resumes"][0]["ignored_files"] == [
        "custom_checkpoint_0.pkl"
    ]
    # accelerate's own pickles are read with weights_only=True: a hostile optimizer or RNG file is refused.
    for name in ("optimizer.bin", "random_states_0.pkl"):
        broken = tmp_path / name
        shutil.copytree(single_run, broken)
        hostile_pickle(broken / "checkpoints" / "checkpoint-6" / name, marker)
        with pytest.raises(ValueError, match=name.replace(".", r"\.")):
            pretrain.main([*COMMON, "--output_dir", str(broken), "--resume_from_checkpoint", "latest"])
        assert not marker.exists()


def resume_error(single_run: Path, tmp_path: Path, damage, *flags: str) -> str:
    """Copy the run, damage its latest checkpoint, resume in-process and return the ValueError's message."""
    out = tmp_path / f"case{len(list(tmp_path.iterdir()))}"
    shutil.copytree(single_run, out)
    damage(out / "checkpoints" / "checkpoint-6")
    with pytest.raises(ValueError) as error:
        pretrain.main([*COMMON, "--output_dir", str(out), "--resume_from_checkpoint", "latest", *flags])
    return str(error.value)


def truncate(name: str, keep: float = 0.5):
    def damage(checkpoint: Path) -> None:
        content = (checkpoint / name).read_bytes()
        (checkpoint / name).write_bytes(content[: int(len(content) * keep)])

    return damage


def test_inexact_or_changed_resume_is_refused_with_the_reason(single_run, tmp_path):
    def keep(checkpoint: Path) -> None:
        pass

    message = resume_error(single_run, tmp_path, truncate("random_states_0.pkl"))
    assert "cannot resume exactly" in message and "random_states_0.pkl" in message
    assert "--allow_inexact_resume" in message
    message = resume_error(single_run, tmp_path, keep, "--batch_size", "8", "--learning_rate", "1e-3")
    assert "batch_size: 4 -> 8" in message and "learning_rate: 0.002 -> 0.001" in message
    assert "--allow_changed_settings batch_size,learning_rate" in message
    # Allowed explicitly: the run goes on, and config.json keeps the first settings and records the resume.
    out = tmp_path / "allowed"
    shutil.copytree(single_run, out)
    truncate("random_states_0.pkl")(out / "checkpoints" / "checkpoint-3")
    flags = ["--allow_inexact_resume", "--learning_rate", "1e-3", "--allow_changed_settings", "learning_rate"]
    pretrain.main(
        [
            *COMMON,
            "--output_dir",
            str(out),
            "--resume_from_checkpoint",
            str(out / "checkpoints" / "checkpoint-3"),
            *flags,
        ]
    )
    config = json.loads((out / "logs" / "config.json").read_text())
    assert config["learning_rate"] == 0.002
    (record,) = config["resumes"]
    assert (
        record["changed_settings"] == {"learning_rate": [0.002, 0.001]}
        and "random_states_0.pkl" in record["inexact"][0]
    )
    assert sorted(logged(out)) == list(range(1, 7))


def test_broken_checkpoint_files_are_named_in_the_error(single_run, tmp_path):
    allow = ("--allow_changed_settings", "hidden_size,bpe_vocab_size")
    wider = resume_error(single_run, tmp_path, lambda c: None, "--hidden_size", "48", *allow)
    assert "model.safetensors" in wider and "does not fit this model" in wider and "32" in wider and "48" in wider
    vocab = resume_error(single_run, tmp_path, lambda c: None, "--bpe_vocab_size", "320", *allow)
    assert "model.safetensors" in vocab and "300" in vocab and "320" in vocab
    assert "truncated or corrupt" in resume_error(single_run, tmp_path, truncate("model.safetensors"))
    empty = resume_error(single_run, tmp_path, truncate("model.safetensors", keep=0))
    assert "model.safetensors" in empty and "truncated or corrupt" in empty
    garbage = resume_error(single_run, tmp_path, lambda c: (c / "trainer_state.json").write_text("{step: six"))
    assert "trainer_state.json" in garbage and "not valid JSON" in garbage
    no_step = resume_error(single_run, tmp_path, lambda c: (c / "trainer_state.json").write_text('{"step": "6"}'))
    assert "trainer_state.json" in no_step and "integer 'step'" in no_step
    ema = resume_error(single_run, tmp_path, truncate("ema.safetensors"))
    assert "ema.safetensors" in ema
    # A fresh run does not silently mix with an earlier run's checkpoints.
    with pytest.raises(ValueError, match="--overwrite_output_dir"):
        pretrain.main([*COMMON, "--output_dir", str(single_run)])


@pytest.mark.slow
def test_ddp_two_processes_follow_the_one_process_schedule_and_resume_exactly(single_run, tmp_path):
    common = COMMON
    run([*common, "--output_dir", str(tmp_path / "straight")], processes=2)
    run([*common, "--output_dir", str(tmp_path / "resumed"), "--stop_after_steps", "3"], processes=2)
    assert [p.name for p in pretrain.checkpoint_dirs(tmp_path / "resumed")] == ["checkpoint-3"]
    run([*common, "--output_dir", str(tmp_path / "resumed"), "--resume_from_checkpoint", "latest"], processes=2)
    for run_dir in ("straight", "resumed"):  # really two data-parallel processes, not two copies of one
        assert json.loads((tmp_path / run_dir / "logs" / "config.json").read_text())["num_processes"] == 2
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert sorted(straight) == list(range(1, 7)) and sorted(resumed) == list(range(1, 7))
    # Same data order, masks and optimizer state after the restart: the losses agree to float precision.
    for step in range(1, 7):
        assert abs(straight[step] - resumed[step]) < 1e-5, (step, straight[step], resumed[step])
    # The learning rate follows the schedule once per optimizer step whatever the number of processes.
    one, two = logged(single_run, "train/lr"), logged(tmp_path / "straight", "train/lr")
    print("lr, 1 process:", one, "\nlr, 2 processes:", two)
    assert sorted(one) == sorted(two) == list(range(1, 7)) and len(set(one.values())) >= 4
    assert all(one[step] == two[step] for step in one), (one, two)
    assert logged(tmp_path / "resumed", "train/lr") == one
    # The saved folder (model, remote code, tokenizer) loads and generates from a prompt with only the shipped
    # code, on transformers 5.x and on 4.57 (whose tokenizer must not add token_type_ids).
    final = tmp_path / "straight" / "final"
    pythons = [sys.executable] + ([tf4_python()] if tf4_python() else [])
    assert len(pythons) == 2 or os.environ.get("MDM_PRIME_REQUIRE_TF4") != "1"
    for python in pythons:
        check = subprocess.run(
            [python, "-c", "import sys; sys.modules['modeling_mdm_prime'] = None\n"
             "from transformers import AutoModel, AutoTokenizer\n"
             f"m = AutoModel.from_pretrained({str(final)!r}, trust_remote_code=True)\n"
             f"t = AutoTokenizer.from_pretrained({str(final)!r})\n"
             "out = m.generate(**t(['ROMEO:'], return_tensors='pt'), max_new_tokens=4, seed=0)\n"
             "print(type(m).__name__, out.shape[1] == len(t('ROMEO:')['input_ids']) + 4)"],
            cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert check.returncode == 0 and "MDMPrimeForMaskedDiffusion True" in check.stdout, check.stderr[-2000:]


@pytest.mark.slow
def test_killed_run_leaves_loadable_checkpoints_and_resumes(tmp_path):
    out = tmp_path / "run"
    args = [*TINY, "--max_steps", "400", "--checkpoint_every", "2", "--eval_every", "1000", "--output_dir", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), *args], cwd=REPO, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.time() + 180
    while time.time() < deadline and len(pretrain.checkpoint_dirs(out)) < 2:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)  # no clean-up at all, possibly in the middle of a save
    process.wait()
    done = pretrain.checkpoint_dirs(out)
    assert done, "no checkpoint was written before the kill"
    for checkpoint in done:  # every checkpoint that carries the final name is complete and loadable
        assert json.loads((checkpoint / "trainer_state.json").read_text())["step"] == int(checkpoint.name.split("-")[1])
        assert load_file(str(checkpoint / "model.safetensors"))
    last = int(done[-1].name.split("-")[1])
    resume = [*args[: args.index("--max_steps")], "--max_steps", str(last + 2), "--checkpoint_every", "2",
              "--eval_every", "1000", "--output_dir", str(out), "--resume_from_checkpoint", "latest"]  # fmt: skip
    refused = subprocess.run([sys.executable, str(SCRIPT), *resume], cwd=REPO, env=env, capture_output=True, text=True)
    assert refused.returncode != 0 and "max_steps: 400 -> " in refused.stderr  # the schedule would change
    run([*resume, "--allow_changed_settings", "max_steps"])
    assert pretrain.checkpoint_dirs(out)[-1].name == f"checkpoint-{last + 2}"
    assert sorted(logged(out)) == list(range(1, last + 3))  # steps logged after the checkpoint: not twice
    assert (out / "final" / "model.safetensors").exists()


@pytest.mark.slow
def test_an_fsdp_launch_that_cannot_shard_is_refused(tmp_path):
    """On a machine without GPUs accelerate runs the shipped FSDP config without FSDP and without a word (every
    process alone: DistributedType.NO); the script refuses instead, so nobody believes they trained (and
    checkpointed) a sharded model. (``accelerate launch --cpu`` drops the FSDP settings before the script starts,
    so there the user's --cpu decides.)"""
    if torch.cuda.is_available():
        pytest.skip("FSDP can run here: tests/test_fsdp.py covers it")
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file",
        str(REPO / "examples" / "accelerate_configs" / "fsdp.yaml"), "--num_processes", "2",
        "--mixed_precision", "no", "--main_process_port", str(free_port()),
        str(SCRIPT), *TINY, "--max_steps", "2", "--output_dir", str(tmp_path / "out"),
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode != 0
    assert "asks for FSDP, but accelerate runs it as" in result.stderr, result.stderr[-3000:]
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_fsdp_or_deepspeed_state_needs_the_unsafe_pickle_opt_in(single_run, tmp_path, monkeypatch):
    """FSDP / DeepSpeed states are read with full unpickling (DCP's .metadata, DeepSpeed's torch.load): refused
    unless --allow_unsafe_pickle; with it, a missing random-state file is still an inexact resume. Here the
    one-process run is made to take the FSDP branch of training.resume (FSDP itself needs GPUs)."""
    from types import SimpleNamespace

    from modeling_mdm_prime.tools import training

    loads = []
    monkeypatch.setattr(training, "DistributedType", SimpleNamespace(FSDP=DistributedType.NO, DEEPSPEED=None))
    monkeypatch.setattr(Accelerator, "load_state", lambda self, path: loads.append(path))
    message = resume_error(single_run, tmp_path, lambda checkpoint: None)
    assert "unpickles files in full" in message and "--allow_unsafe_pickle" in message and not loads
    message = resume_error(
        single_run, tmp_path, lambda checkpoint: (checkpoint / "random_states_0.pkl").unlink(), "--allow_unsafe_pickle"
    )
    assert "cannot resume exactly" in message and "random_states_0.pkl is missing" in message and len(loads) == 1


def test_resume_on_another_device_type_is_refused_with_what_changes(single_run, tmp_path):
    def written_on_cuda(checkpoint: Path) -> None:
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        state["device"] = "cuda"
        (checkpoint / "trainer_state.json").write_text(json.dumps(state))

    message = resume_error(single_run, tmp_path, written_on_cuda)
    assert "written on cuda and this run is on cpu" in message and "--allow_inexact_resume" in message
