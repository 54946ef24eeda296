"""GRPO post-training of an MDM-Prime / MD4 model with a checkable reward, through TRL (docs/guides/rl.md).

The task is a word-count constraint: each completion is rewarded by how close its number of words is to
``--target_words``, ``r = 1 - min(|words - target|, target) / target`` (1 exactly on target, 0 at twice the target
or more, or with no words). Rollouts come from ``generate()`` (one seed per completion, logged), likelihoods from
the chosen estimator (``--likelihood_estimator coupled | elbo | one_pass | upper``); everything else is TRL's
GRPOTrainer (``tools.grpo.DiffusionGRPOTrainer``).

    python examples/grpo.py --output_dir outputs/grpo --max_steps 300                    # the default model
    python examples/grpo.py --output_dir outputs/grpo-lora --lora --beta 0.04 --max_steps 300   # LoRA, KL to the base
    accelerate launch --num_processes 2 examples/grpo.py --output_dir outputs/grpo-ddp ...   # same result as 1 process

The default model is the adapted SmolLM2 (outputs/smollm2-mdm) when it has been built, else the committed tiny
reference checkpoint. A model with a chat template gets instructions ("Describe the sea in exactly 4 words."),
others get short speaker cues to continue. Every ``GRPOConfig`` option works (``--num_generations``,
``--loss_type``, ``--num_iterations``, ``--beta``, ``--learning_rate``, ...). The output folder holds the trained
model (or the LoRA adapter), ``trainer_state.json`` with every logged metric, and ``rewards.json``: the mean
reward per step.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from datasets import Dataset
from transformers import AutoModel, AutoTokenizer, HfArgumentParser

from modeling_mdm_prime.tools.grpo import DiffusionGRPOConfig, DiffusionGRPOTrainer
from modeling_mdm_prime.tools.serving import default_model_path

REPO = Path(__file__).resolve().parents[1]
SPEAKERS = ["ROMEO.", "JULIET.", "HAMLET.", "KING.", "QUEEN.", "FIRST CITIZEN.", "DUKE.", "PORTIA.",
            "MACBETH.", "LEAR.", "OTHELLO.", "IAGO.", "BRUTUS.", "ROSALIND.", "PROSPERO.", "FALSTAFF."]  # fmt: skip
TOPICS = ["the sea", "a cat", "the night sky", "winter", "a city", "music", "rain", "a forest",
          "coffee", "the moon", "a river", "bread", "snow", "a garden", "the wind", "a book"]  # fmt: skip
LORA_TARGETS = ["attn_qkv", "attn_out", "fc_in", "fc_out"]  # every Linear in the transformer blocks


@dataclass
class ScriptArguments:
    model_name_or_path: str = field(
        default=str(default_model_path(REPO)),
        metadata={"help": "checkpoint folder or Hub id (default: outputs/smollm2-mdm if built, else the tiny one)"},
    )
    target_words: int = field(default=4, metadata={"help": "the word count the reward asks for"})
    num_prompts: int = field(default=16, metadata={"help": "distinct prompts in the training set"})
    lora: bool = field(default=False, metadata={"help": "train a LoRA adapter (peft) instead of all weights"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator"})


def word_count_reward(target: int):
    """TRL reward function: ``1 - min(|words - target|, target) / target`` per completion (text or chat)."""
    if target < 1:
        raise ValueError(f"target_words must be at least 1, got {target}.")

    def reward(completions, **kwargs) -> list[float]:
        texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
        return [1.0 - min(abs(len(text.split()) - target), target) / target for text in texts]

    reward.__name__ = f"words_{target}"
    return reward


def prompts(tokenizer, count: int, target: int) -> Dataset:
    """Instructions for chat models, speaker cues for the others, cycled to ``count`` rows."""
    if tokenizer.chat_template:
        rows = [[{"role": "user", "content": f"Describe {t} in exactly {target} words."}] for t in TOPICS]
    else:
        rows = [f"{s}\n" for s in SPEAKERS]
    return Dataset.from_dict({"prompt": [rows[i % len(rows)] for i in range(count)]})


def main(argv: list[str] | None = None) -> None:
    parser = HfArgumentParser((ScriptArguments, DiffusionGRPOConfig))
    parser.set_defaults(
        report_to="none", max_completion_length=12, num_generations=8, per_device_train_batch_size=32,
        learning_rate=1e-4, logging_steps=1, save_strategy="no", loss_type="grpo", beta=0.0,
    )  # fmt: skip
    args, config = parser.parse_args_into_dataclasses(args=argv)
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path, padding_side="left")
    model = AutoModel.from_pretrained(args.model_name_or_path, trust_remote_code=True)
    peft_config = None
    if args.lora:
        from peft import LoraConfig

        adapted = getattr(model.config, "transformer_config", None)
        targets = "all-linear" if adapted else LORA_TARGETS
        peft_config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, target_modules=targets)
    trainer = DiffusionGRPOTrainer(
        model=model, reward_funcs=word_count_reward(args.target_words), args=config,
        train_dataset=prompts(tokenizer, args.num_prompts, args.target_words), processing_class=tokenizer,
        peft_config=peft_config,
    )  # fmt: skip
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    if trainer.accelerator.is_main_process:
        trainer.save_model(config.output_dir)
        tokenizer.save_pretrained(config.output_dir)
        trainer.state.save_to_json(str(Path(config.output_dir) / "trainer_state.json"))
        history = [e for e in trainer.state.log_history if "reward" in e]
        curve = {"step": [e["step"] for e in history], "reward": [e["reward"] for e in history]}
        (Path(config.output_dir) / "rewards.json").write_text(json.dumps(curve, indent=1) + "\n")
        first, last = curve["reward"][:10], curve["reward"][-10:]
        print(f"mean reward: first 10 steps {sum(first) / len(first):.3f}, last 10 steps {sum(last) / len(last):.3f}")


if __name__ == "__main__":
    main()
