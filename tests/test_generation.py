"""generate(): exactness against an oracle, idle steps, the cache, batch invariance, conditioning, precision,
streamers, callbacks and the generation config round trip."""

import math

import pytest
import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, PreTrainedTokenizerFast
from transformers.generation import TextIteratorStreamer, TextStreamer

from conftest import GPT2_TOKENIZER, OracleModel, oracle_config, tiny_model
from modeling_mdm_prime import MDMPrimeGenerationConfig, counter_uniform, sample_categorical, stream_keys


def empirical_tv(samples: torch.Tensor, sequences: torch.Tensor, probs: torch.Tensor) -> float:
    vocab = int(sequences.max()) + 1
    codes = (samples * vocab ** torch.arange(samples.shape[1] - 1, -1, -1)).sum(1)
    reference = (sequences * vocab ** torch.arange(sequences.shape[1] - 1, -1, -1)).sum(1)
    counts = torch.bincount(codes, minlength=vocab ** samples.shape[1]).double() / len(samples)
    target = torch.zeros_like(counts)
    target[reference] = probs
    return 0.5 * float((counts - target).abs().sum())


def product_distribution(vocab: int, seed: int):
    """Two independent positions, each with its own skewed distribution over tokens (digits coupled)."""
    gen = torch.Generator().manual_seed(seed)
    marginals = torch.rand(2, vocab, generator=gen).pow(3)
    marginals /= marginals.sum(1, keepdim=True)
    sequences = torch.cartesian_prod(torch.arange(vocab), torch.arange(vocab))
    return sequences, (marginals[0, sequences[:, 0]] * marginals[1, sequences[:, 1]]).double()


@pytest.mark.parametrize("ell", [1, 2, 3])
def test_exact_for_a_product_distribution_with_cache_on_and_off(ell):
    """Positions independent: the ancestral sampler is exact at any T, and the token's digits are drawn jointly."""
    vocab, samples = 6, 20000
    sequences, probs = product_distribution(vocab, seed=ell)
    model = OracleModel(oracle_config(vocab, ell), sequences, probs).eval()
    outputs = []
    for cache in (True, False):
        out = model.generate(
            max_new_tokens=2, num_steps=4, num_return_sequences=samples, use_idle_cache=cache, seed=7,
            return_dict_in_generate=True,
        )  # fmt: skip
        outputs.append(out)
    assert torch.equal(outputs[0].sequences, outputs[1].sequences)
    assert outputs[1].nfe == 4
    tv = empirical_tv(outputs[0].sequences, sequences, probs)
    # Sampling noise alone gives E[TV] ~ 0.01 here (36 outcomes, 20k samples); 0.03 leaves room, a wrong
    # digit coupling or reveal probability moves TV by far more.
    assert tv < 0.03, tv


def test_exact_for_a_coupled_distribution_at_large_t():
    """Positions dependent: exact as T grows (two elements of different positions rarely reveal together)."""
    from conftest import random_distribution

    vocab = 6
    sequences, probs = random_distribution(vocab, length=2, seed=11)
    model = OracleModel(oracle_config(vocab, 2), sequences, probs).eval()
    out = model.generate(max_new_tokens=2, num_steps=256, num_return_sequences=20000, seed=3)
    assert empirical_tv(out, sequences, probs) < 0.035


@pytest.mark.parametrize(("length", "steps", "ell"), [(4, 16, 1), (4, 8, 2), (3, 12, 3), (8, 8, 1)])
def test_idle_step_ratio_matches_formula(length, steps, ell):
    model = tiny_model(num_sub_tokens=ell)
    rows = 600
    out = model.generate(
        max_new_tokens=length, num_steps=steps, num_return_sequences=rows, seed=length * 100 + steps,
        return_dict_in_generate=True,
    )  # fmt: skip
    ratios = out.idle_steps.double() / steps
    expected = (1 - 1 / steps) ** (length * ell)
    stderr = ratios.std() / math.sqrt(rows)
    assert abs(ratios.mean() - expected) < 4 * stderr, (float(ratios.mean()), expected, float(stderr))


@pytest.mark.parametrize("time_conditioning", [False, True])
def test_idle_steps_skip_the_network_exactly(time_conditioning):
    model = tiny_model(num_sub_tokens=1, time_conditioning=time_conditioning)
    runs = {}
    for cache in (True, False):
        runs[cache] = model.generate(
            torch.tensor([[3, 4]]), max_new_tokens=6, num_steps=24, use_idle_cache=cache, seed=5,
            return_dict_in_generate=True, output_history=True,
        )  # fmt: skip
    assert torch.equal(runs[True].sequences, runs[False].sequences)
    history = torch.stack(runs[True].history)
    start = runs[True].history[0].new_full(history.shape[1:], model.codec.mask_id)
    start[:, :2] = model.codec.encode(torch.tensor([[3, 4]]))
    before = torch.cat([start.unsqueeze(0), history[:-1]])
    changed = (history != before).flatten(1).any(1)
    assert runs[True].idle_steps.item() == int((~changed).sum()) > 0
    # Whether a step reveals anything is decided before the network is consulted, so the network runs exactly
    # on the non-idle steps, for a time-conditioned network too.
    assert runs[True].nfe == int(changed.sum())
    # The naive sampler calls it at every step that starts with something masked.
    masked_before = (before == model.codec.mask_id).flatten(1).any(1)
    assert runs[False].nfe == int(masked_before.sum()) > runs[True].nfe


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("strategy", ["ancestral", "confidence"])
def test_batch_equals_single_prompt_generation(side, strategy):
    model = tiny_model(num_sub_tokens=2)
    prompts = [[11, 12, 13, 14, 15], [21, 22], [31, 32, 33]]
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        span = slice(width - len(prompt), width) if side == "left" else slice(0, len(prompt))
        ids[row, span], mask[row, span] = torch.tensor(prompt), 1
    settings = dict(max_new_tokens=6, num_steps=12, strategy=strategy, seed=9, num_return_sequences=2)
    batched = model.generate(ids, attention_mask=mask, **settings)
    for row, prompt in enumerate(prompts):
        alone = model.generate(torch.tensor([prompt]), **settings)
        for copy in range(2):
            out = batched[2 * row + copy]
            real = torch.cat([mask[row], torch.ones(6, dtype=torch.long)])
            if side == "right":
                real = torch.cat([mask[row][: len(prompt)], torch.ones(6, dtype=torch.long), mask[row][len(prompt) :]])
            assert torch.equal(out[real.bool()], alone[copy])
            assert torch.equal(alone[copy, : len(prompt)], torch.tensor(prompt))  # the prompt never changes
    assert int(batched.max()) < model.config.vocab_size and int(batched.min()) >= 0


def test_different_prompts_draw_independent_noise():
    model = tiny_model(num_sub_tokens=2)
    prompts = torch.tensor([[5, 6, 7], [5, 6, 8]])
    out = model.generate(prompts, max_new_tokens=16, seed=0, return_dict_in_generate=True, output_history=True)
    revealed = torch.stack([(h != model.codec.mask_id).flatten(1) for h in out.history])  # (steps, B, L·ℓ)
    assert not torch.equal(revealed[:, 0], revealed[:, 1])  # another prompt, another reveal order


def test_block_decoding_and_confidence():
    model = tiny_model(num_sub_tokens=3)
    out = model.generate(
        torch.tensor([[1, 2]]), max_new_tokens=8, num_steps=16, block_length=4, strategy="confidence", seed=0,
        return_dict_in_generate=True, output_history=True,
    )  # fmt: skip
    history = torch.stack(out.history)[:, 0]  # (steps, L, ℓ)
    masked = (history == model.codec.mask_id).any(-1)
    # Steps 0..7 decode the first block only: the second block is still fully masked afterwards.
    assert bool(masked[7, 6:].all()) and not bool(masked[7, 2:6].any())
    assert not bool(masked[-1].any())
    with pytest.raises(ValueError, match="divisible"):
        model.generate(max_new_tokens=8, num_steps=15, block_length=4)


def test_infilling_and_sub_token_conditioning():
    model = tiny_model(num_sub_tokens=3)
    template = torch.tensor([[5, 6, 7, 8, 9, 10], [15, 16, 17, 18, 19, 20]])
    holes = torch.tensor([[0, 1, 1, 0, 0, 1], [1, 0, 0, 0, 1, 0]], dtype=torch.bool)
    out = model.generate(template, infill_mask=holes, seed=0)
    assert out.shape == template.shape and torch.equal(out[~holes], template[~holes])
    codec = model.codec
    digits = codec.encode(torch.randint(0, 300, (2, 6)))
    keep = torch.rand(digits.shape, generator=torch.Generator().manual_seed(0)) < 0.5
    partial = digits.masked_fill(~keep, codec.mask_id)
    out = model.generate(sub_token_ids=partial, seed=0, strategy="confidence")
    assert torch.equal(codec.encode(out)[keep], digits[keep])  # the paper's imputation: fixed digits stay
    assert int(out.max()) < 300
    with pytest.raises(ValueError, match="match no token id"):
        model.generate(sub_token_ids=torch.tensor([[[6, 6, model.codec.mask_id]]]))  # 6·49 + 6·7 >= 300


@pytest.mark.slow
def test_rare_token_keeps_its_frequency_at_large_t():
    """One token with probability 1 % must keep it after T = 2048 steps (per-step reveal probability
    down to 1/2048): token draws never mix with the reveal probability, and are made in float64."""
    sequences = torch.arange(4).unsqueeze(1)
    probs = torch.tensor([0.01, 0.49, 0.25, 0.25], dtype=torch.float64)
    model = OracleModel(oracle_config(4, 1), sequences, probs).eval()
    samples = 20000
    out = model.generate(max_new_tokens=1, num_steps=2048, num_return_sequences=samples, seed=1)
    count = int((out == 0).sum())
    sd = math.sqrt(samples * 0.01 * 0.99)
    assert abs(count - 200) < 4 * sd, count


def test_categorical_draws_are_float64_exact():
    gen = torch.Generator().manual_seed(0)
    log_probs = torch.log(torch.tensor([[1e-3, 0.5, 0.499]])).expand(200000, 3)
    uniform = torch.rand(200000, generator=gen, dtype=torch.float64)
    draws, probs = sample_categorical(log_probs, uniform)
    assert abs(float((draws == 0).double().mean()) - 1e-3) < 4 * math.sqrt(1e-3 / 200000)
    assert torch.allclose(probs, torch.tensor([1e-3, 0.5, 0.499], dtype=torch.float64)[draws])
    # A token 2^-40 times less likely than another is drawn exactly when u falls in its CDF slice.
    tiny = torch.tensor([[0.0, -40 * math.log(2)]])
    assert sample_categorical(tiny, torch.tensor([1 - 2.0**-42], dtype=torch.float64))[0].item() == 1
    assert sample_categorical(tiny, torch.tensor([1 - 2.0**-39], dtype=torch.float64))[0].item() == 0
    gumbel, _ = sample_categorical(log_probs, uniform, float64=False)  # the comparison path still samples
    assert abs(float((gumbel == 0).double().mean()) - 1e-3) < 4 * math.sqrt(1e-3 / 200000)


def test_counter_rng_is_uniform_and_stream_independent():
    keys = stream_keys(123, torch.arange(4))
    u = counter_uniform(keys, 5, torch.arange(50000).expand(4, -1))
    assert float(u.min()) >= 0 and float(u.max()) < 1
    for row in u:
        sorted_u = row.sort().values
        ks = float((sorted_u - torch.linspace(0, 1, len(row), dtype=torch.float64)).abs().max())
        assert ks < 1.63 / math.sqrt(len(row))  # Kolmogorov-Smirnov at the 1 % level
    assert abs(float(torch.corrcoef(u[:2])[0, 1])) < 0.02
    assert not torch.equal(counter_uniform(keys, 6, torch.arange(10).expand(4, -1)), u[:, :10])


def test_reproducible_with_seed_and_generator():
    model = tiny_model()
    a = model.generate(max_new_tokens=5, generator=torch.Generator().manual_seed(4))
    b = model.generate(max_new_tokens=5, generator=torch.Generator().manual_seed(4))
    c = model.generate(max_new_tokens=5, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(0)
    d = model.generate(max_new_tokens=5)
    torch.manual_seed(0)
    assert torch.equal(d, model.generate(max_new_tokens=5))


def test_per_row_seeds_make_each_row_a_function_of_its_prompt_and_seed():
    """seed as one integer per row: a row equals its prompt generated alone with its seed (any batch, any padding,
    any row order); a repeated prompt with distinct seeds gets distinct samples, with equal seeds the occurrence
    rule still separates them; a tensor of seeds equals the list; a wrong count is refused."""
    model = tiny_model(vocab_size=64)
    prompts = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10], [0, 0, 5, 6]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 1, 1]])
    out = model.generate(prompts, attention_mask=mask, max_new_tokens=8, seed=[11, 12, 13])
    for row, seed in ((0, 11), (1, 12), (2, 13)):
        alone = model.generate(prompts[row : row + 1, mask[row].argmax() :], max_new_tokens=8, seed=[seed])
        assert torch.equal(alone[0, -8:], out[row, -8:])
    assert not torch.equal(out[0, -8:], out[2, -8:])
    swapped = model.generate(prompts[[2, 1, 0]], attention_mask=mask[[2, 1, 0]], max_new_tokens=8, seed=[13, 12, 11])
    assert torch.equal(swapped, out[[2, 1, 0]])
    same = model.generate(prompts, attention_mask=mask, max_new_tokens=8, seed=torch.tensor([11, 12, 11]))
    assert torch.equal(same[0], out[0]) and not torch.equal(same[2], same[0])
    assert torch.equal(same, model.generate(prompts, attention_mask=mask, max_new_tokens=8, seed=[11, 12, 11]))
    with pytest.raises(ValueError, match="one 64-bit integer per input row"):
        model.generate(prompts, attention_mask=mask, max_new_tokens=8, seed=[1, 2])


def test_eos_is_followed_by_padding():
    sequences = torch.tensor([[1, 2, 3]])
    model = OracleModel(oracle_config(6, 1), sequences, torch.tensor([1.0], dtype=torch.float64)).eval()
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 5
    out = model.generate(max_new_tokens=3, seed=0)
    assert out.tolist() == [[1, 2, 5]]


class BanToken(LogitsProcessor):
    def __init__(self, token: int):
        self.token = token
        self.calls = []

    def __call__(self, input_ids, scores):
        self.calls.append((tuple(input_ids.shape), tuple(scores.shape)))
        scores[:, self.token] = -math.inf
        return scores


def test_logits_processors_and_top_k():
    model = tiny_model(num_sub_tokens=1)
    ban = BanToken(7)
    out = model.generate(
        torch.tensor([[1, 2, 3]]), max_new_tokens=30, num_return_sequences=4, seed=0,
        logits_processor=LogitsProcessorList([ban]),
    )  # fmt: skip
    assert not bool((out[:, 3:] == 7).any())
    rows, length = ban.calls[0][0]
    assert ban.calls[0][1] == (rows, 300) and length == 33  # (N, C) scores, (N, L) sequences
    greedy = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=6, do_sample=False, seed=0)
    top1 = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=6, top_k=1, seed=0)  # same reveal order
    assert torch.equal(greedy, top1)


def test_streamer_and_callback(tmp_path):
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(GPT2_TOKENIZER))
    model = tiny_model(vocab_size=len(tokenizer), num_sub_tokens=2, hidden_size=32)
    prompt = tokenizer("Hello world", return_tensors="pt")
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
    pushed = []
    original_put = streamer.put

    def spy(value):
        pushed.append(value.clone())
        original_put(value)

    streamer.put = spy
    out = model.generate(**prompt, max_new_tokens=8, num_steps=8, seed=0, streamer=streamer)
    text = "".join(streamer)
    new = out[0, prompt["input_ids"].shape[1] :]
    assert torch.equal(torch.cat([p.flatten() for p in pushed[1:]]), new)  # in position order, each once
    assert text == tokenizer.decode(new)
    # The printing streamer takes the same calls (it raises on a malformed one).
    model.generate(**prompt, max_new_tokens=4, seed=0, streamer=TextStreamer(tokenizer, skip_prompt=True))

    seen = []

    def stop_after_three(state):
        seen.append((state.step, float(state.t), float(state.s)))
        return state.step == 3

    out = model.generate(max_new_tokens=10, num_steps=10, seed=0, step_callback=stop_after_three,
                         return_dict_in_generate=True)  # fmt: skip
    assert out.num_steps == 3 and [step for step, _, _ in seen] == [1, 2, 3]
    assert [t for _, t, _ in seen] == pytest.approx([1.0, 0.9, 0.8]) and seen[-1][2] == pytest.approx(0.7)
    assert not bool((out.sequences >= len(tokenizer)).any())  # the final pass filled everything


def test_generation_config_round_trip(tmp_path):
    model = tiny_model(num_sub_tokens=2)
    model.generation_config = MDMPrimeGenerationConfig(
        num_steps=32, time_grid="cosine", strategy="confidence", block_length=4, top_p=0.9, max_new_tokens=8,
        final_step="argmax", use_idle_cache=False,
    )  # fmt: skip
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path)
    config = loaded.generation_config
    assert isinstance(config, MDMPrimeGenerationConfig)
    for key in ("num_steps", "time_grid", "strategy", "block_length", "top_p", "max_new_tokens", "final_step"):
        assert getattr(config, key) == getattr(model.generation_config, key), key
    assert config.top_k is None and config.do_sample is True
    # A plain GenerationConfig (what transformers 4.57 hands the model) is converted, without AR defaults.
    plain = GenerationConfig.from_pretrained(tmp_path)
    converted = MDMPrimeGenerationConfig.from_generation_config(plain)
    assert converted.strategy == "confidence" and converted.top_k is None


def test_autoregressive_only_settings_raise():
    model = tiny_model()
    with pytest.raises(ValueError, match="num_beams"):
        model.generate(max_new_tokens=4, num_beams=2)
    with pytest.raises(ValueError, match="repetition_penalty"):
        model.generate(max_new_tokens=4, repetition_penalty=1.3)
    with pytest.raises(ValueError, match="past_key_values"):
        model.generate(max_new_tokens=4, past_key_values=object())
    with pytest.raises(ValueError, match="does not use"):
        model.generate(max_new_tokens=4, token_type_ids=torch.zeros(1, 1))
    with pytest.raises(ValueError, match="strategy"):
        model.generate(max_new_tokens=4, strategy="beam")
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.generate(max_new_tokens=100)
    with pytest.raises(ValueError, match="nothing to generate"):
        model.generate(torch.tensor([[1, 2]]), infill_mask=torch.zeros(1, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="one sequence at a time"):
        model.generate(max_new_tokens=2, num_return_sequences=2, streamer=object())


def test_text_generation_pipeline_runs_diffusion_sampling():
    """transformers' pipeline calls this model's generate(): the result is the diffusion sample, not AR decoding."""
    from transformers import pipeline

    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(GPT2_TOKENIZER))
    model = tiny_model(vocab_size=len(tokenizer), num_sub_tokens=2, hidden_size=32)
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    torch.manual_seed(0)
    text = generator("Hello world", max_new_tokens=6, num_steps=6)[0]["generated_text"]
    torch.manual_seed(0)
    direct = model.generate(**tokenizer("Hello world", return_tensors="pt"), max_new_tokens=6, num_steps=6)
    assert text == tokenizer.decode(direct[0])
