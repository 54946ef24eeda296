"""Fine-tuning with the transformers Trainer: in-process, and examples/finetune.py end to end (full and LoRA): SFT
that learns to end its answers, outputs that fit the toolchain (eval_results.json, portable tokenizer, adapters
that load from anywhere), and the data rules shared with the other scripts."""

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


def run_finetune(workdir: Path, name: str, steps: int, *extra: str, base: str | None = None) -> tuple[Path, dict]:
    out = workdir / name
    cwd = REPO if base is None else workdir
    cmd = [sys.executable, str(SCRIPT), "--model_name_or_path", base or str(workdir / "base")]
    cmd += ["--train_file", str(workdir / "train.jsonl"), "--validation_file", str(workdir / "valid.jsonl")]
    cmd += ["--output_dir", str(out), "--max_steps", str(steps), "--per_device_train_batch_size", "16"]
    cmd += ["--logging_steps", "50", "--save_strategy", "no", "--seed", "0", "--use_cpu", "--eval_time_samples", "2"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=str(workdir / "datasets-cache"))
    env.update(TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")  # one thread: ~10x faster when the CPU is shared
    proc = subprocess.run([*cmd, *extra], cwd=cwd, env=env, capture_output=True, text=True, timeout=180)
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
    return script.held_out_loss(model, held_out, tok.pad_token_id, num_time_samples=2)


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
    eos = tok.eos_token_id
    for pair, row in zip(pairs, data):  # LLaDA's SFT: response, EOS, then EOS up to the block, all of it target
        prompt = tok(pair["prompt"])["input_ids"]
        target = tok(pair["response"])["input_ids"] + [eos] * (
            32 - len(prompt) - len(tok(pair["response"])["input_ids"])
        )
        assert row["input_ids"] == prompt + target and len(row["input_ids"]) == 32
        assert row["labels"] == [-100] * len(prompt) + target
    batch = script.collate(data.to_list(), tok.pad_token_id)
    assert batch["input_ids"].shape == (2, 32) and bool(batch["attention_mask"].all())
    model = AutoModel.from_pretrained(workdir / "base", trust_remote_code=True).eval()
    inputs = []
    original = model.token_logits
    model.token_logits = lambda sub_ids, *a, **k: inputs.append(sub_ids) or original(sub_ids, *a, **k)
    scored = (batch["labels"] != -100).sum().item()
    for seed in range(20):
        out = model(**batch, generator=torch.Generator().manual_seed(seed))
        assert out.num_tokens.item() == scored
    masked = torch.stack([(sub == model.codec.mask_id).any(-1) for sub in inputs])  # (draws, B, L)
    assert not masked[:, batch["labels"] == -100].any()  # the prompt: never masked
    assert masked[:, batch["labels"] != -100].any(0).all()  # every response and tail token is masked in some draw

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


@pytest.mark.slow
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


def test_sft_model_ends_its_answer_and_fills_the_rest_with_padding(full_run, workdir):
    out, _ = full_run
    tok = AutoTokenizer.from_pretrained(out, padding_side="left")
    model = AutoModel.from_pretrained(out, trust_remote_code=True).eval()
    pairs = copy_pairs(40, seed=0)[:24]  # training pairs: the test is about the tail, not generalisation
    batch = tok([p["prompt"] for p in pairs], return_tensors="pt", padding=True)
    room = 32 - batch["input_ids"].shape[1]  # every remaining position: 3-5x the response length
    assert room >= 3 * max(len(tok(p["response"])["input_ids"]) for p in pairs)
    generated = model.generate(**batch, max_new_tokens=room, seed=0)[:, batch["input_ids"].shape[1] :]
    padding = {tok.eos_token_id, tok.pad_token_id}
    exact, stopped, ended = 0, 0, 0
    for pair, row in zip(pairs, generated.tolist()):
        ended += set(row[8:]) <= padding  # at most 8 tokens of answer, then only padding
        response = tok(pair["response"])["input_ids"]
        stopped += set(row[len(response) :]) <= padding  # the answer ends where the response ends: padding after
        exact += row[: len(response)] == response and set(row[len(response) :]) <= padding
    print(f"SFT: {stopped}/{len(pairs)} answers end at the response length with only padding after it; {exact} exact")
    # The tail is learned: nearly every answer stops at the response's length and pads the remaining ~20 positions
    # (with the old unscored padding, none did). Copying the words themselves is beyond this 2-layer model's 200 steps.
    assert ended == len(pairs) and stopped >= 0.6 * len(pairs)  # measured: 24 and 18 of 24


def test_finetune_outputs_fit_the_toolchain(full_run):
    from modeling_mdm_prime import check_checkpoint

    out, metrics = full_run
    # eval_results.json in evaluate_ppl.py's format: the card and push_to_hub read it.
    (row,) = metrics["results"]
    assert row["split"] != "train" and "prompt" in row["split"]
    assert row["ppl_bound"] == pytest.approx(math.exp(row["nelbo_per_token"]))
    assert row["nelbo_per_token"] == pytest.approx(metrics["held_out_loss_after"])
    assert "eval_results.json" in check_checkpoint(out)  # the folder publishes as it is
    assert not (out / "all_results.json").exists()
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config.get("tokenizer_class") != "TokenizersBackend"  # transformers 4.57 knows the class
    from fresh_interpreter import tf4_python

    if tf4_python():
        check = subprocess.run(
            [tf4_python(), "-c", "import sys; sys.modules['modeling_mdm_prime'] = None\n"
             "from transformers import AutoModel, AutoTokenizer\n"
             f"m = AutoModel.from_pretrained({str(out)!r}, trust_remote_code=True)\n"
             f"t = AutoTokenizer.from_pretrained({str(out)!r})\n"
             "print(type(m).__name__, len(t('copy: ab')['input_ids']) > 0)"],
            env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert "MDMPrimeForMaskedDiffusion True" in check.stdout, check.stderr[-2000:]


@pytest.mark.slow
def test_unmerged_lora_adapter_loads_from_another_directory(workdir, tmp_path):
    pytest.importorskip("peft")
    out, _ = run_finetune(workdir, "adapter", 3, "--lora", "--learning_rate", "1e-3", base="base")  # relative path
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert Path(adapter["base_model_name_or_path"]).is_absolute()
    code = (
        "from peft import PeftConfig, PeftModel\nfrom transformers import AutoModel\n"
        f"config = PeftConfig.from_pretrained({str(out)!r})\n"
        "base = AutoModel.from_pretrained(config.base_model_name_or_path, trust_remote_code=True)\n"
        f"model = PeftModel.from_pretrained(base, {str(out)!r})\nprint(type(model).__name__)"
    )
    check = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                           env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert check.returncode == 0 and "PeftModel" in check.stdout, check.stderr[-2000:]


def test_validation_split_and_text_files_follow_one_rule(tmp_path):
    from modeling_mdm_prime.tools.data import read_documents

    script = load_script()
    assert script.validation_count(None, 50) == 5  # the default: 10 %, not 32 of 50
    assert script.validation_count(None, 100_000) == 256  # capped
    assert script.validation_count(0.2, 50) == 10 and script.validation_count(7, 50) == 7
    with pytest.raises(ValueError, match="32 of 50"):
        script.validation_count(32, 50)
    with pytest.raises(ValueError, match="fraction"):
        script.validation_count(2.5, 50)
    # A .txt file is one document in every script (modeling_mdm_prime.tools.data), JSON(L) one per record.
    (tmp_path / "notes.txt").write_text("first line\nsecond line\n\nthird\n")
    assert len(script.read_examples(str(tmp_path / "notes.txt"))) == 1
    assert len(read_documents(str(tmp_path / "notes.txt"))) == 1
    write_jsonl(tmp_path / "docs.jsonl", [{"text": "a b"}, {"text": "c d"}])
    assert script.read_examples(str(tmp_path / "docs.jsonl")).column_names == ["text"]
    pairs = script.read_examples(str(write_jsonl(tmp_path / "pairs.jsonl", copy_pairs(3, seed=0))))
    assert pairs.column_names == ["prompt", "response"] and len(pairs) == 3
