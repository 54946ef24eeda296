"""Quickstart: train a small MDM-Prime on real English text on CPU, report its valid-bound perplexity, sample.

No downloads: the corpus is CPython's own documentation (``pydoc_data.topics``, ~465k characters), the tokenizer
a byte-level BPE trained on it with ``tokenizers``. About two minutes on 2 CPU cores with the defaults.

    python examples/quickstart.py --num-sub-tokens 2 --steps 400
"""

from __future__ import annotations

import argparse
import logging
import math
import pydoc_data.topics
import time
from pathlib import Path

import torch
from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm
from transformers import AutoModel, PreTrainedTokenizerFast, get_scheduler

from modeling_mdm_prime import MDMPrimeConfig, MDMPrimeForMaskedDiffusion

logger = logging.getLogger("quickstart")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-sub-tokens", type=int, default=2, help="ℓ; 1 is plain masked diffusion (MD4/MDLM)")
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--hidden-size", type=int, default=192)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--loss-type", choices=["elbo", "prime"], default="elbo")
    parser.add_argument("--eval-samples", type=int, default=8, help="time samples per held-out sequence")
    parser.add_argument("--sample-tokens", type=int, default=48, help="tokens per generated sample")
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/quickstart"))
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def build_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def packed_blocks(texts: list[str], tokenizer: PreTrainedTokenizerFast, seq_len: int) -> Dataset:
    """Tokenise, append EOS to each document and cut the stream into fixed-length blocks (as MDLM does)."""

    def tokenize(batch):
        return {"input_ids": [ids + [tokenizer.eos_token_id] for ids in tokenizer(batch["text"])["input_ids"]]}

    def group(batch):
        stream = [t for ids in batch["input_ids"] for t in ids]
        usable = len(stream) // seq_len * seq_len
        return {"input_ids": [stream[i : i + seq_len] for i in range(0, usable, seq_len)]}

    data = Dataset.from_dict({"text": texts}).map(tokenize, batched=True, remove_columns=["text"])
    return data.map(group, batched=True, batch_size=len(data)).with_format("torch")


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(args.seed)
    texts = [text for _, text in sorted(pydoc_data.topics.topics.items())]
    tokenizer = build_tokenizer(texts, args.vocab_size)
    blocks = packed_blocks(texts, tokenizer, args.seq_len).train_test_split(test_size=0.05, seed=args.seed)
    train, held_out = blocks["train"], blocks["test"]
    logger.info("corpus: %d training and %d held-out blocks of %d tokens", len(train), len(held_out), args.seq_len)

    config = MDMPrimeConfig(
        vocab_size=len(tokenizer),
        num_sub_tokens=args.num_sub_tokens,
        hidden_size=args.hidden_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        intermediate_size=4 * args.hidden_size,
        max_position_embeddings=args.seq_len,
        dropout=0.0,
        loss_type=args.loss_type,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = MDMPrimeForMaskedDiffusion(config)
    logger.info(
        "model: ℓ=%d (base %d), %.2fM parameters", config.num_sub_tokens, model.codec.base, model.num_parameters() / 1e6
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.98))
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=args.steps // 10, num_training_steps=args.steps)
    loader = torch.utils.data.DataLoader(train, batch_size=args.batch_size, shuffle=True, drop_last=True)

    model.train()
    start, step, bar = time.time(), 0, tqdm(total=args.steps, desc="training")
    while step < args.steps:
        for batch in loader:
            out = model(batch["input_ids"])
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update()
            bar.set_postfix(elbo=f"{out.elbo:.3f}", paper_objective=f"{out.prime_objective:.3f}")
            if step == args.steps:
                break
    bar.close()
    logger.info("trained %d steps in %.0f s", args.steps, time.time() - start)

    model.eval()
    ids = held_out[:]["input_ids"]
    result = model.nll_bound(ids, num_samples=args.eval_samples, generator=torch.Generator().manual_seed(0))
    tokens = result.num_tokens.sum().item()
    nll = result.nll.sum().item() / tokens
    stderr = math.sqrt(result.nll_stderr.pow(2).sum().item()) / tokens
    paper = result.paper_objective.sum().item() / tokens
    logger.info(
        "held-out valid-bound perplexity: <= %.2f (NELBO %.4f ± %.4f nats/token, %d tokens)",
        math.exp(nll),
        nll,
        stderr,
        tokens,
    )
    logger.info("paper objective (not a likelihood bound): %.4f nats/token, exp = %.2f", paper, math.exp(paper))

    model.generation_config.update(max_new_tokens=args.sample_tokens, num_steps=args.sample_tokens)
    prompts = ["The with statement", "A function definition"]
    tokenizer.padding_side = "left"
    tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    out = model.generate(**batch, seed=args.seed, return_dict_in_generate=True)
    for text in tokenizer.batch_decode(out.sequences, skip_special_tokens=True):
        logger.info("sample: %r", text)
    logger.info(
        "generation: %d steps, %d network calls, idle-step ratio %.2f (formula (1 - 1/T)^(Lℓ) = %.2f)",
        out.num_steps,
        out.nfe,
        out.idle_steps.double().mean().item() / out.num_steps,
        (1 - 1 / out.num_steps) ** (args.sample_tokens * config.num_sub_tokens),
    )

    model.save_pretrained(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)
    reloaded = AutoModel.from_pretrained(args.output_dir, trust_remote_code=True).eval()
    probe = torch.Generator().manual_seed(1)
    same = torch.equal(reloaded(ids[:2], generator=probe).loss, model(ids[:2], generator=probe.manual_seed(1)).loss)
    logger.info("saved to %s; AutoModel(trust_remote_code=True) reload gives identical loss: %s", args.output_dir, same)


if __name__ == "__main__":
    main()
