"""Fine-tuning with the transformers Trainer: in-process, and examples/finetune.py end to end (full and LoRA)."""

import importlib.util
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset, load_dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModel, AutoTokenizer, PreTrainedTokenizerFast, Trainer, TrainingArguments

from conftest import tiny_config, tiny_model
from modeling_mdm_prime import MDMPrimeForMaskedDiffusion

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "finetune.py"
LORA_TARGETS = ("attn_qkv", "attn_out", "fc_in", "fc_out")
WORDS = ["ab", "cd", "ef", "gh", "ij", "kl", "mn", "op"]


def load_script():
    """examples/finetune.py as a module, to reuse its data preparation and held-out loss."""
    if "finetune_example" not in sys.modules:
        spec = importlib.util.spec_from_file_location("finetune_example", SCRIPT)
        sys.modules["finetune_example"] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules["finetune_example"]


def copy_pairs(n: int, seed: int) -> list[dict]:
    """Prompt "copy: w1 w2 w3" -> response " w1 w2 w3": the response is a deterministic function of the prompt."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 4)))
        pairs.append({"prompt": f"copy: {words}", "response": f" {words}"})
    return pairs


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def pretrain(model: MDMPrimeForMaskedDiffusion, tok, steps: int = 150) -> MDMPrimeForMaskedDiffusion:
    """A plain loop on word sequences (every token scored, no copy task), so that fine-tuning starts from a
    trained model as in real use: with a random frozen lm_head, LoRA can barely move the loss."""
    rng = random.Random(1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: more threads only contend with other processes
    try:
        torch.manual_seed(0)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for _ in range(steps):
            lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) for _ in range(32)]
            ids = [tok(line)["input_ids"] + [tok.eos_token_id] for line in lines]
            longest = max(map(len, ids))
            input_ids = torch.tensor([i + [tok.pad_token_id] * (longest - len(i)) for i in ids])
            mask = torch.tensor([[1] * len(i) + [0] * (longest - len(i)) for i in ids])
            model(input_ids, attention_mask=mask).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A tiny pretrained checkpoint (byte-level BPE with ~300 tokens) and copy-task data."""
    root = tmp_path_factory.mktemp("finetune")
    pairs = copy_pairs(400, seed=0)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator([p["prompt"] + p["response"] for p in pairs], trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    config = tiny_config(
        vocab_size=len(tok), num_sub_tokens=2, hidden_size=64, intermediate_size=128, max_position_embeddings=32,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    pretrain(MDMPrimeForMaskedDiffusion(config), tok).save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    write_jsonl(root / "train.jsonl", pairs)
    write_jsonl(root / "valid.jsonl", copy_pairs(32, seed=1))
    return root


def run_finetune(workdir: Path, name: str, steps: int, *extra: str) -> tuple[Path, dict]:
    out = workdir / name
    cmd = [sys.executable, str(SCRIPT.relative_to(REPO)), "--model_name_or_path", str(workdir / "base")]
    cmd += ["--train_file", str(workdir / "train.jsonl"), "--validation_file", str(workdir / "valid.jsonl")]
    cmd += ["--output_dir", str(out), "--max_steps", str(steps), "--per_device_train_batch_size", "16"]
    cmd += ["--logging_steps", "50", "--save_strategy", "no", "--seed", "0", "--use_cpu", "--eval_repeats", "2"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=str(workdir / "datasets-cache"))
    env.update(TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")  # one thread: ~10x faster when the CPU is shared
    proc = subprocess.run([*cmd, *extra], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((out / "eval_results.json").read_text())
    assert f"held-out loss before: {metrics['held_out_loss_before']:.4f}" in proc.stdout
    return out, metrics


@pytest.fixture(scope="module")
def full_run(workdir):
    return run_finetune(workdir, "full", 200, "--learning_rate", "3e-3")


@pytest.fixture(scope="module")
def lora_run(workdir):
    pytest.importorskip("peft")  # in the `train` extras, not `test`
    lora = ["--lora", "--lora_r", "16", "--lora_alpha", "32", "--merge_lora"]
    return run_finetune(workdir, "lora", 300, "--learning_rate", "5e-3", *lora)


def reloaded_loss(path: Path, workdir: Path) -> float:
    """Held-out loss of a checkpoint loaded the way a user would, with the script's fixed noise."""
    script = load_script()
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    data = load_dataset("json", data_files=str(workdir / "valid.jsonl"), cache_dir=str(workdir / "datasets-cache"))
    held_out = script.tokenize(data["train"], tok, 32, jsonl=True)
    model = AutoModel.from_pretrained(path, trust_remote_code=True)
    assert type(model).__name__ == "MDMPrimeForMaskedDiffusion"
    return script.held_out_loss(model, held_out, tok.pad_token_id, repeats=2)


def test_trainer_trains_with_the_models_own_loss(tmp_path):
    model = tiny_model()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (16, 12), generator=gen)
    labels = ids.clone()
    labels[:, :4] = -100  # a 4-token "prompt"
    data = [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": lab} for i, lab in zip(ids, labels)]
    seen = []
    model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(sorted(kwargs)), with_kwargs=True)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data)
    result = trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert result.global_step == 3 and len(losses) == 3
    assert all(math.isfinite(loss) and loss > 0 for loss in losses)
    assert len(seen) == 3 and all(keys == ["attention_mask", "input_ids", "labels"] for keys in seen)
    changed = {k for k, v in model.named_parameters() if not torch.equal(v, before[k])}
    assert {"lm_head.weight", "model.layers.0.attn.attn_qkv.weight", "model.layers.1.mlp.fc_out.weight"} <= changed


def test_prompt_tokens_are_neither_masked_nor_scored(workdir):
    script = load_script()
    tok = PreTrainedTokenizerFast.from_pretrained(workdir / "base")
    pairs = [{"prompt": "copy: ab cd", "response": " ab cd"}, {"prompt": "copy: ef", "response": " ef"}]
    data = script.tokenize(Dataset.from_list(pairs), tok, 32, jsonl=True)
    for pair, row in zip(pairs, data):
        prompt = tok(pair["prompt"])["input_ids"]
        response = tok(pair["response"])["input_ids"] + [tok.eos_token_id]
        assert row["input_ids"] == prompt + response
        assert row["labels"] == [-100] * len(prompt) + response
    batch = script.collate(data.to_list(), tok.pad_token_id)
    lengths = [len(row["input_ids"]) for row in data]
    assert lengths[0] > lengths[1] and batch["input_ids"].shape == (2, lengths[0])
    assert batch["attention_mask"][1].tolist() == [1] * lengths[1] + [0] * (lengths[0] - lengths[1])
    assert (batch["labels"][1, lengths[1] :] == -100).all()

    model = AutoModel.from_pretrained(workdir / "base", trust_remote_code=True).eval()
    inputs = []
    original = model._logits_at
    model._logits_at = lambda sub_ids, *a, **k: inputs.append(sub_ids) or original(sub_ids, *a, **k)
    scored = (batch["labels"] != -100).sum().item()
    for seed in range(20):
        out = model(**batch, generator=torch.Generator().manual_seed(seed))
        assert out.num_tokens.item() == scored
    masked = torch.stack([(sub == model.codec.mask_id).any(-1) for sub in inputs])  # (draws, B, L)
    assert not masked[:, batch["labels"] == -100].any()  # prompt and padding: never masked
    assert masked[:, batch["labels"] != -100].any(0).all()  # every response token is masked in some draw

    one = torch.full_like(batch["labels"], -100)
    one[0, -1] = batch["labels"][0, -1]
    assert model(**{**batch, "labels": one}).num_tokens.item() == 1


def test_finetune_script_full_reduces_held_out_loss(full_run, workdir):
    out, metrics = full_run
    before, after = metrics["held_out_loss_before"], metrics["held_out_loss_after"]
    print(f"full fine-tuning: held-out loss {before:.4f} -> {after:.4f}")
    assert after < 0.75 * before
    assert (out / "tokenizer.json").exists() and (out / "modeling_mdm_prime.py").exists()
    assert reloaded_loss(out, workdir) == pytest.approx(after, rel=1e-5)
    assert reloaded_loss(workdir / "base", workdir) == pytest.approx(before, rel=1e-5)


def test_finetune_script_lora_merged_changes_only_targeted_weights(lora_run, workdir):
    out, metrics = lora_run
    before, after = metrics["held_out_loss_before"], metrics["held_out_loss_after"]
    print(f"LoRA (merged): held-out loss {before:.4f} -> {after:.4f}")
    assert after < 0.9 * before
    assert not (out / "adapter_config.json").exists()
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModel"].endswith("MDMPrimeForMaskedDiffusion")
    assert reloaded_loss(out, workdir) == pytest.approx(after, rel=1e-5)

    base = AutoModel.from_pretrained(workdir / "base", trust_remote_code=True).state_dict()
    merged = AutoModel.from_pretrained(out, trust_remote_code=True).state_dict()
    assert merged.keys() == base.keys()  # no lora_A / lora_B / base_layer left over
    targeted = {k for k in base if k.endswith(".weight") and k.split(".")[-2] in LORA_TARGETS}
    assert len(targeted) == 4 * 2  # four Linear layers in each of the two blocks
    for key in base:
        if key in targeted:
            assert not torch.equal(merged[key], base[key]), key
        else:
            assert torch.equal(merged[key], base[key]), key  # embeddings, norms, biases, lm_head untouched
