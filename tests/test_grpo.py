"""GRPO through TRL (``modeling_mdm_prime.tools.grpo``, ``examples/grpo.py``): rollouts distinct within a group and
reproducible, the same masks for a sequence before and after an update (ratio and KL exactly at their neutral
values before the first update), LoRA with the base as reference, the refusals, and two processes equal to one."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from conftest import free_port, load_benchmark, tiny_model
from modeling_mdm_prime import MDMPrimeForMaskedDiffusion
from modeling_mdm_prime.tools.grpo import DiffusionGRPOConfig, DiffusionGRPOTrainer, rollout_seed

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT = REPO / "checkpoints" / "mdm-prime-shakespeare-tiny"
EXAMPLE = REPO / "examples" / "grpo.py"
sys.path.insert(0, str(REPO / "examples"))
import grpo as grpo_example  # noqa: E402


def _trainer(tmp_path, model=None, steps=2, **settings) -> DiffusionGRPOTrainer:
    tokenizer = AutoTokenizer.from_pretrained(CHECKPOINT, padding_side="left")
    defaults = dict(output_dir=str(tmp_path), report_to="none", max_completion_length=6, num_generations=4,
                    per_device_train_batch_size=8, max_steps=steps, logging_steps=1, save_strategy="no",
                    learning_rate=1e-3, disable_tqdm=True, use_cpu=True, likelihood_samples=2)  # fmt: skip
    args = DiffusionGRPOConfig(**{**defaults, **settings})
    return DiffusionGRPOTrainer(
        model=model if model is not None else MDMPrimeForMaskedDiffusion.from_pretrained(CHECKPOINT),
        reward_funcs=grpo_example.word_count_reward(2),
        args=args,
        train_dataset=grpo_example.prompts(tokenizer, 8, 2),
        processing_class=tokenizer,
    )


def _prompt_ids(trainer, prompts):
    return [trainer.processing_class(p)["input_ids"] for p in prompts]


def test_rollouts_distinct_within_a_group_and_reproducible(tmp_path):
    """A group of 4 copies of one prompt gets 4 different completions; the same rollout index gives the same
    completions again, and each row equals that prompt generated alone with the row's logged seed."""
    trainer = _trainer(tmp_path)
    trainer.model.eval()
    ids = _prompt_ids(trainer, ["ROMEO.\n"] * 4 + ["HAMLET.\n"] * 4)
    first, _ = trainer._generate_single_turn(ids, None, {}, 4)
    seeds = trainer._pending_extra_logs["seed"][:]
    assert len({tuple(c) for c in first[:4]}) == 4 and len({tuple(c) for c in first[4:]}) == 4
    assert seeds == [rollout_seed(trainer.args.seed, "eval", (0, 0), i) for i in range(8)]
    trainer._rollouts["eval"] = 0
    again, _ = trainer._generate_single_turn(ids, None, {}, 4)
    assert again == first
    alone = trainer.model.generate(torch.tensor([ids[5]]), max_new_tokens=6, seed=[seeds[5]], pad_token_id=0)
    assert alone[0, len(ids[5]) :].tolist()[: len(first[5])] == first[5]
    nxt, _ = trainer._generate_single_turn(ids, None, {}, 4)  # the next rollout draws new samples
    assert nxt != first


def test_same_masks_before_and_after_an_update_and_in_any_batch(tmp_path):
    """Scoring a sequence twice in one rollout uses the same masks (identical values), whatever the batch order;
    a new rollout index draws new masks."""
    trainer = _trainer(tmp_path)
    trainer._rollout_key["train"] = (0, 0)
    trainer.model.train()
    ids = torch.tensor([[0, 5, 6, 7, 8, 9, 0, 0], [3, 4, 10, 11, 12, 13, 14, 15], [0, 5, 6, 20, 21, 0, 0, 0]])
    mask = torch.tensor([[0, 1, 1, 1, 1, 1, 0, 0], [1] * 8, [0, 1, 1, 1, 1, 0, 0, 0]])
    logps, entropies, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, 5, compute_entropy=True)
    order = torch.tensor([2, 0, 1])
    swapped, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids[order], mask[order], 5)
    torch.testing.assert_close(swapped, logps[order], rtol=0, atol=1e-5)
    assert bool((logps[mask[:, -5:] == 0] == 0).all()) and bool((entropies > 0).sum() == mask[:, -5:].sum())
    # the per-token share is the sequence estimate over its n tokens
    share = logps.sum(1) / mask[:, -5:].sum(1)
    assert bool(((logps - share.unsqueeze(1)) * mask[:, -5:]).abs().max() < 1e-5)
    trainer._rollout_key["train"] = (0, 1)
    other, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, 5)
    assert not torch.allclose(other, logps)


def test_importance_ratio_is_one_before_the_update_then_moves(tmp_path):
    """num_iterations=2: each rollout is used for two updates with the old log-likelihoods from the same masks, so
    the first update's ratios are exactly 1 and the second's are not."""
    trainer = _trainer(tmp_path, steps=2, num_iterations=2, learning_rate=3e-3)
    trainer.train()
    logged = [e for e in trainer.state.log_history if "importance_ratio/mean" in e]
    assert len(logged) == 2
    assert logged[0]["importance_ratio/min"] == pytest.approx(1.0, abs=1e-5)
    assert logged[0]["importance_ratio/max"] == pytest.approx(1.0, abs=1e-5)
    assert abs(logged[1]["importance_ratio/max"] - 1) > 1e-4 or abs(logged[1]["importance_ratio/min"] - 1) > 1e-4


def test_lora_trains_the_adapter_with_the_base_as_reference(tmp_path):
    """With a peft LoRA config and beta > 0 the reference is the adapter-free base: the KL estimate is exactly 0
    at the first rollout (same masks, same weights), the base weights never change, the adapter does."""
    from peft import LoraConfig

    tokenizer = AutoTokenizer.from_pretrained(CHECKPOINT, padding_side="left")
    before = load_file(CHECKPOINT / "model.safetensors")
    args = DiffusionGRPOConfig(output_dir=str(tmp_path), report_to="none", max_completion_length=6, num_generations=4,
                               per_device_train_batch_size=8, max_steps=3, logging_steps=1, save_strategy="no",
                               learning_rate=1e-2, disable_tqdm=True, use_cpu=True, beta=0.1)  # fmt: skip
    trainer = DiffusionGRPOTrainer(
        model=MDMPrimeForMaskedDiffusion.from_pretrained(CHECKPOINT),
        reward_funcs=grpo_example.word_count_reward(2),
        args=args,
        train_dataset=grpo_example.prompts(tokenizer, 8, 2),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=grpo_example.LORA_TARGETS),
    )
    trainer.train()
    kl = [e["kl/sequence"] for e in trainer.state.log_history if "kl/sequence" in e]
    assert len(kl) == 3 and kl[0] == pytest.approx(0.0, abs=1e-6) and kl[-1] != pytest.approx(0.0, abs=1e-6)
    trainer.save_model(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    base = trainer.model.get_base_model()
    for name, value in base.state_dict().items():
        if "lora_" not in name:
            key = name.replace("base_layer.", "")
            torch.testing.assert_close(value, before[key], rtol=0, atol=0)


def test_refusals_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="likelihood_estimator must be one of"):
        _trainer(tmp_path, likelihood_estimator="exact")
    with pytest.raises(ValueError, match="leave room for the prompt"):
        _trainer(tmp_path, max_completion_length=128)
    with pytest.raises(ValueError, match="leave use_vllm and use_transformers_continuous_batching off"):
        _trainer(tmp_path, use_transformers_continuous_batching=True)
    with pytest.raises(ValueError, match="min_p and repetition_penalty"):
        _trainer(tmp_path, repetition_penalty=1.2)
    with pytest.raises(ValueError, match="time-independent network"):
        _trainer(tmp_path, model=tiny_model(time_conditioning=True), likelihood_estimator="coupled")
    with pytest.raises(ValueError, match="'upper' needs likelihood_samples >= 2"):
        _trainer(tmp_path, likelihood_estimator="upper", likelihood_samples=1)
    with pytest.raises(ValueError, match="GenMD4"):
        _trainer(tmp_path, model=tiny_model(noise_schedule="learnable_polynomial"))
    with pytest.raises(ValueError, match="trains MDM-Prime / MD4 models"):
        _trainer(tmp_path, model=torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="target_words must be at least 1"):
        grpo_example.word_count_reward(0)


def test_word_count_reward():
    reward = grpo_example.word_count_reward(4)
    texts = ["one two three four", "one two", "", "a b c d e f g h i", [{"role": "assistant", "content": "a b c"}]]
    assert reward(texts) == [1.0, 0.5, 0.0, 0.0, 0.75]


def _run(args, processes):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
              str(free_port())]  # fmt: skip
    command = (launch if processes > 1 else [sys.executable]) + [str(EXAMPLE), *args]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path):
    """examples/grpo.py through accelerate launch: 2 processes with half the batch each draw the same rollouts,
    the same masks and the same (synchronised) gradients as 1 process: rewards and weights agree to float
    summation order."""
    common = ["--max_steps", "3", "--num_generations", "4", "--max_completion_length", "6", "--learning_rate", "3e-3",
              "--model_name_or_path", str(CHECKPOINT), "--num_prompts", "8", "--use_cpu", "true"]  # fmt: skip
    one = tmp_path / "one"
    two = tmp_path / "two"
    result = _run([*common, "--output_dir", str(one), "--per_device_train_batch_size", "8"], 1)
    assert "mean reward" in result.stdout
    _run([*common, "--output_dir", str(two), "--per_device_train_batch_size", "4"], 2)
    rewards = [json.loads((d / "rewards.json").read_text())["reward"] for d in (one, two)]
    assert rewards[0] == pytest.approx(rewards[1], abs=1e-6)
    a, b = (load_file(d / "model.safetensors") for d in (one, two))
    start = load_file(CHECKPOINT / "model.safetensors")
    assert max((a[k] - start[k]).abs().max().item() for k in a) > 1e-4  # it trained
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=2e-5)


def test_reward_benchmark_table_matches_its_json():
    committed = json.loads((REPO / "benchmarks" / "results" / "grpo_rewards.json").read_text())
    table = load_benchmark("grpo_rewards").render_markdown(committed)
    assert (REPO / "benchmarks" / "results" / "grpo_rewards.md").read_text(encoding="utf-8").strip() == table
    assert table in (REPO / "docs" / "guides" / "rl.md").read_text(encoding="utf-8")  # never retyped
    assert {r["estimator"] for r in committed["runs"]} >= {"coupled", "one_pass"}
    for r in committed["runs"]:
        assert r["last"] > r["first"]  # the reward rose in every committed run


@pytest.mark.slow
def test_reward_benchmark_smoke(tmp_path):
    arguments = ["--max_steps", "3", "--seeds", "0", "--estimators", "one_pass", "--window", "1",
                 "--output_dir", str(tmp_path), "--model_name_or_path", str(CHECKPOINT)]  # fmt: skip
    report = load_benchmark("grpo_rewards").main(arguments)
    assert [r["steps"] for r in report["runs"]] == [3]
    assert (tmp_path / "grpo_rewards.png").read_bytes()[:4] == b"\x89PNG"
