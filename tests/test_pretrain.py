"""examples/pretrain.py: the data pipeline, 2-process DDP through accelerate launch, exact resume, and a run
killed mid-training."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))

import pretrain  # noqa: E402
from test_remote_code import tf4_python  # noqa: E402

from conftest import GPT2_TOKENIZER  # noqa: E402

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
        command = [sys.executable, str(REPO / "examples" / "pretrain.py"), *args]
    else:
        command = [
            sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
            str(free_port()),
            str(REPO / "examples" / "pretrain.py"), *args,
        ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def losses(output_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (output_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["train/loss"] for row in rows if "train/loss" in row}


def test_bundled_corpus_tokenises_and_packs_deterministically():
    cfg = pretrain.PretrainConfig(max_documents=5, bpe_vocab_size=400, seq_len=64)
    runs = []
    for _ in range(2):
        train, val = pretrain.load_corpus(cfg)
        tokenizer = pretrain.build_tokenizer(cfg, train)
        runs.append((pretrain.tokenize_blocks(train, tokenizer, cfg)[:]["input_ids"], tokenizer))
    (first, tokenizer), (second, _) = runs
    assert torch.equal(first, second) and first.shape[1] == 64 and len(first) > 100
    assert len(train) + len(val) == 5 and len(val) >= 1  # held out by whole documents
    # Packing is BOS doc EOS BOS doc EOS ... cut into blocks: the first block starts a play.
    assert first[0, 0] == tokenizer.bos_token_id
    assert tokenizer.decode(first[0, 1:20]) in train[0]["text"]
    # BOS and EOS share one id here: two per document, the last EOS possibly in the dropped partial block.
    assert 2 * len(train) - 1 <= int((first == tokenizer.eos_token_id).sum()) <= 2 * len(train)
    padded = pretrain.tokenize_blocks(train, tokenizer, pretrain.PretrainConfig(seq_len=64, packing=False))[:]
    assert padded["input_ids"].shape == (len(train), 64) and bool((padded["attention_mask"].sum(1) <= 64).all())


def test_config_file_streaming_and_a_pretrained_tokenizer(tmp_path):
    settings = {"max_documents": 3, "streaming": True, "seq_len": 48, "tokenizer": str(GPT2_TOKENIZER.parent)}
    (tmp_path / "run.json").write_text(json.dumps(settings))
    (tmp_path / "run.yaml").write_text("".join(f"{key}: {value}\n" for key, value in settings.items()))
    for name in ("run.json", "run.yaml"):
        cfg = pretrain.parse_config([str(tmp_path / name)])
        assert (cfg.max_documents, cfg.streaming, cfg.seq_len) == (3, True, 48)
    assert pretrain.parse_config(["--seq_len", "48", "--packing", "false"]).packing is False
    train, val = pretrain.load_corpus(cfg)  # streaming: documents are read lazily
    tokenizer = pretrain.build_tokenizer(cfg, train)
    assert len(tokenizer) == 50257 and tokenizer.pad_token_id == tokenizer.eos_token_id
    blocks = list(pretrain.tokenize_blocks(train, tokenizer, cfg).take(5))
    assert len(blocks) == 5 and all(len(block["input_ids"]) == 48 for block in blocks)
    assert int(blocks[0]["input_ids"][0]) == tokenizer.bos_token_id
    assert len(list(val)) >= 1


def test_ddp_two_processes_resume_reproduces_the_uninterrupted_run(tmp_path):
    common = [*TINY, "--max_steps", "6", "--checkpoint_every", "3", "--eval_every", "3"]
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


def test_killed_run_leaves_loadable_checkpoints_and_resumes(tmp_path):
    out = tmp_path / "run"
    args = [*TINY, "--max_steps", "400", "--checkpoint_every", "2", "--eval_every", "1000", "--output_dir", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, str(REPO / "examples" / "pretrain.py"), *args], cwd=REPO, env=env,
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
    run(resume)
    assert pretrain.checkpoint_dirs(out)[-1].name == f"checkpoint-{last + 2}"
    assert (out / "final" / "model.safetensors").exists()
