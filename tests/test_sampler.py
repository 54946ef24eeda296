"""The sampler API and the generate() contract as users meet it: strategies (shipped and custom), saved
checkpoints' generation configs, repeated prompts, per-row defaults, early stopping, carry_over=False,
reduced precision and argument validation."""

import logging
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, GenerationConfig

from conftest import OracleModel, oracle_config, tiny_model
from modeling_mdm_prime import (
    AncestralStrategy,
    MDMPrimeGenerationConfig,
    SamplerStepOutput,
    SamplerStrategy,
    SubTokenCodec,
    ThresholdStrategy,
    digit_confidence,
    digit_marginals,
)

REFERENCE = Path(__file__).resolve().parents[1] / "checkpoints" / "mdm-prime-shakespeare-tiny"


@pytest.fixture(scope="module")
def reference_model():
    """The committed checkpoint, loaded as users load it (its generation_config.json has max_new_tokens=64)."""
    model = AutoModel.from_pretrained(REFERENCE, trust_remote_code=True).eval()
    assert model.generation_config.max_new_tokens == 64
    return model


# ---------------------------------------------------------------------------------------------------------------
# A saved checkpoint's generation config and the call's arguments
# ---------------------------------------------------------------------------------------------------------------


def test_infilling_a_saved_checkpoint_appends_nothing(reference_model):
    model = reference_model
    template = torch.randint(1, 2048, (2, 16), generator=torch.Generator().manual_seed(0))
    holes = torch.zeros_like(template, dtype=torch.bool)
    holes[:, 5:9] = True
    out = model.generate(template, infill_mask=holes, seed=0)
    assert out.shape == template.shape and torch.equal(out[~holes], template[~holes])
    long_template = torch.randint(1, 2048, (1, 100), generator=torch.Generator().manual_seed(1))
    long_holes = torch.zeros_like(long_template, dtype=torch.bool)
    long_holes[0, 40:60] = True
    assert model.generate(long_template, infill_mask=long_holes, seed=0).shape == (1, 100)
    partial = model.codec.encode(template)
    partial[:, 3:7, 1] = model.codec.mask_id
    out = model.generate(sub_token_ids=partial, seed=0)
    assert out.shape == template.shape and torch.equal(model.codec.encode(out)[:, :, 0], partial[:, :, 0])
    # A call that asks for new tokens gets them.
    assert model.generate(template, infill_mask=holes, max_new_tokens=3, seed=0).shape == (2, 19)


def test_call_length_arguments_win_over_the_saved_config(reference_model, caplog):
    model = reference_model
    prompt = torch.tensor([[5, 6, 7, 8, 9]])
    assert model.generate(prompt, seed=0).shape == (1, 5 + 64)  # the saved max_new_tokens
    assert model.generate(prompt, max_length=20, seed=0).shape == (1, 20)
    assert model.generate(prompt, max_new_tokens=7, seed=0).shape == (1, 12)
    with caplog.at_level(logging.WARNING):
        both = model.generate(prompt, max_new_tokens=4, max_length=30, seed=0)
    assert both.shape == (1, 9) and "max_new_tokens` will take precedence" in caplog.text
    # An explicit generation_config counts as the call's, too.
    assert model.generate(prompt, generation_config=GenerationConfig(max_length=11), seed=0).shape == (1, 11)


# ---------------------------------------------------------------------------------------------------------------
# Batches: repeated prompts, per-row defaults
# ---------------------------------------------------------------------------------------------------------------


def test_repeated_prompts_get_distinct_samples_and_match_num_return_sequences():
    model = tiny_model(num_sub_tokens=2)
    a, b = [5, 6, 7], [5, 6, 8]
    eight = model.generate(torch.tensor([a] * 8), max_new_tokens=12, seed=0)
    assert len({tuple(row.tolist()) for row in eight}) == 8  # an RL rollout batch gets 8 different completions
    one_prompt = model.generate(torch.tensor([a]), max_new_tokens=12, seed=0, num_return_sequences=8)
    assert torch.equal(eight, one_prompt)  # [A] * 8 == [A] with num_return_sequences=8
    # Rows are keyed by (content, occurrence of that content, return index): distinct prompts stay batch-invariant.
    mixed = model.generate(torch.tensor([a, b, a]), max_new_tokens=12, seed=0, num_return_sequences=2)
    assert torch.equal(mixed[[0, 1, 4, 5]], model.generate(torch.tensor([a]), max_new_tokens=12, seed=0,
                                                          num_return_sequences=4))  # fmt: skip
    assert torch.equal(mixed[2:4], model.generate(torch.tensor([b]), max_new_tokens=12, seed=0, num_return_sequences=2))


@pytest.mark.parametrize("strategy", ["ancestral", "confidence", "threshold"])
def test_batched_infilling_uses_per_row_defaults(strategy):
    """Rows with different numbers of holes and num_steps unset: each row equals its single-row run."""
    model = tiny_model(num_sub_tokens=2)
    template = torch.randint(0, 300, (3, 12), generator=torch.Generator().manual_seed(3))
    holes = torch.zeros_like(template, dtype=torch.bool)
    holes[0, [1, 2]] = True
    holes[1, 3:11] = True
    holes[2, [0, 5, 6, 7, 11]] = True
    batched = model.generate(template, infill_mask=holes, seed=4, strategy=strategy, return_dict_in_generate=True)
    for row in range(3):
        alone = model.generate(template[row : row + 1], infill_mask=holes[row : row + 1], seed=4, strategy=strategy,
                               return_dict_in_generate=True)  # fmt: skip
        assert torch.equal(batched.sequences[row], alone.sequences[0]), row
        assert int(batched.idle_steps[row]) == int(alone.idle_steps[0])
        assert int(batched.row_nfe[row]) <= int(alone.nfe)  # a row is scored at most as often as alone


# ---------------------------------------------------------------------------------------------------------------
# Early stop, carry_over=False, reduced precision
# ---------------------------------------------------------------------------------------------------------------


def test_early_stop_tells_the_network_the_current_noise_level():
    model = tiny_model(num_sub_tokens=2, time_conditioning=True)
    levels = []
    original = model.token_logits

    def spy(sub_ids, attention_mask=None, noise_level=None, positions=None, **kwargs):
        masked = (sub_ids == model.codec.mask_id).any(-1)[0, 2:].double().mean()
        levels.append((float(noise_level[0]), float(masked)))
        return original(sub_ids, attention_mask, noise_level, positions, **kwargs)

    model.token_logits = spy
    out = model.generate(torch.tensor([[1, 2]]), max_new_tokens=10, num_steps=10, seed=0, use_idle_cache=False,
                         step_callback=lambda state: state.step == 3, return_dict_in_generate=True)  # fmt: skip
    assert out.num_steps == 3
    assert [level for level, _ in levels[:3]] == pytest.approx([1.0, 0.9, 0.8], abs=1e-6)
    final_level, masked_fraction = levels[-1]
    assert final_level == pytest.approx(0.7, abs=1e-6) and masked_fraction > 0.3  # was 0 before the fix
    assert not bool((out.sequences >= 300).any())


def test_generate_with_carry_over_off_decodes_valid_tokens():
    """vocab 300, ℓ = 3: b = 7 gives 343 codes, 43 invalid. Sampling always conditions on the revealed digits."""
    model = tiny_model(num_sub_tokens=3, carry_over=False)
    out = model.generate(max_new_tokens=24, num_steps=6, num_return_sequences=16, seed=0)
    assert out.shape == (16, 24) and int(out.max()) < 300
    partial = model.codec.encode(out[:2])
    partial[:, :, 1:] = model.codec.mask_id
    filled = model.generate(sub_token_ids=partial, seed=1)
    assert torch.equal(model.codec.encode(filled)[:, :, 0], partial[:, :, 0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_is_reproducible_and_valid(dtype):
    """What holds in reduced precision (README, generate() docstring): the same call gives the same output,
    every token is valid and the prompt is kept. Batched = single is only claimed in float32."""
    model = tiny_model(num_sub_tokens=2).to(dtype)
    ids = torch.tensor([[0, 0, 11, 12, 13], [21, 22, 23, 24, 25]])
    mask = (torch.arange(5) >= 2).long().expand(2, 5).clone()
    mask[1] = 1
    first = model.generate(ids, attention_mask=mask, max_new_tokens=8, seed=3)
    assert torch.equal(first, model.generate(ids, attention_mask=mask, max_new_tokens=8, seed=3))
    assert torch.equal(first[:, :5][mask.bool()], ids[mask.bool()]) and int(first.max()) < 300


# ---------------------------------------------------------------------------------------------------------------
# Argument validation at the entry point
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(num_return_sequences=-1), "num_return_sequences must be a positive integer"),
        (dict(num_return_sequences=0), "num_return_sequences must be a positive integer"),
        (dict(top_p=1.5), r"top_p must be a number in \(0, 1\]"),
        (dict(top_k=-2), "top_k must be a non-negative integer"),
        (dict(temperature=0.0), "temperature must be a positive number"),
        (dict(pad_token_id=-1), "pad_token_id must be a non-negative token id"),
        (dict(pad_token_id=300), r"pad_token_id=\[300\] is not a token id of this model \(vocab_size=300\)"),
        (dict(eos_token_id=[1, 999]), "eos_token_id=.*is not a token id"),
        (dict(max_new_tokens=2.5), "max_new_tokens must be a non-negative integer"),
        (dict(num_steps=0), "num_steps must be a positive integer"),
        (dict(strategy="beam"), "strategy must be one of"),
        (dict(confidence_measure="logit"), "confidence_measure must be one of"),
        (dict(seed="abc"), "seed must be an integer"),
        (dict(seed=True), "seed must be an integer"),
        (dict(input_ids=[[1, 2, 3]]), "input_ids must be a torch.Tensor, got list"),
        (dict(input_ids=torch.tensor([[1.0, 2.0]])), "input_ids must be an integer or bool tensor"),
        (
            dict(input_ids=torch.ones(1, 5, dtype=torch.long), attention_mask=torch.tensor([[1, 0, 1, 1, 1]])),
            "left- or right-padded",
        ),  # fmt: skip
        (
            dict(input_ids=torch.ones(1, 5, dtype=torch.long), attention_mask=torch.tensor([[1, 0, 1, 1, 0]])),
            "left- or right-padded",
        ),  # fmt: skip
        (
            dict(input_ids=torch.ones(1, 5, dtype=torch.long), attention_mask=torch.tensor([[0, 1, 1, 1, 0]])),
            "left- or right-padded",
        ),  # fmt: skip
        (dict(input_ids=torch.ones(1, 3, dtype=torch.long), attention_mask=torch.tensor([[1, 2, 1]])), "0 .* and 1"),
        (dict(strategy=object()), "strategy must be a name or a SamplerStrategy"),
    ],
)
def test_bad_arguments_get_clear_errors(kwargs, message):
    model = tiny_model(num_sub_tokens=2)
    kwargs.setdefault("max_new_tokens", 4)
    with pytest.raises((ValueError, TypeError), match=message):
        model.generate(**kwargs)


def test_numpy_input_ids_are_refused_by_name():
    np = pytest.importorskip("numpy")
    with pytest.raises(TypeError, match="input_ids must be a torch.Tensor, got ndarray"):
        tiny_model().generate(np.ones((1, 3), dtype=np.int64), max_new_tokens=2)


def test_generation_config_validates_when_loaded(tmp_path):
    (tmp_path / "generation_config.json").write_text('{"top_p": 1.5}')
    with pytest.raises(ValueError, match="top_p"):
        MDMPrimeGenerationConfig.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# Strategies: confidence measures, threshold decoding, a custom strategy
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("vocab", "ell"), [(12, 1), (12, 2), (30, 3), (16, 4)])
def test_digit_marginals_and_confidences_against_enumeration(vocab, ell):
    codec = SubTokenCodec(vocab, ell)
    log_probs = torch.randn(5, vocab, generator=torch.Generator().manual_seed(vocab + ell)).double().log_softmax(-1)
    probs, table = log_probs.exp(), codec.digit_table()
    expected = torch.zeros(5, ell, codec.base, dtype=torch.float64)
    for token in range(vocab):
        for j in range(ell):
            expected[:, j, table[token, j]] += probs[:, token]
    marginals = digit_marginals(log_probs, codec)
    assert torch.allclose(marginals.double(), expected, atol=1e-6)  # float32: the strategies only rank them
    tokens = torch.tensor([0, 3, vocab - 1, 7, 5])
    prob = digit_confidence(log_probs, tokens, codec, "probability")
    assert torch.allclose(prob.double(), expected.gather(2, table[tokens].unsqueeze(-1)).squeeze(-1), atol=1e-6)
    top2 = expected.sort(-1, descending=True).values
    margin = digit_confidence(log_probs, tokens, codec, "margin").double()
    assert torch.allclose(margin, top2[..., 0] - top2[..., 1], atol=1e-6)
    entropy = -(expected * expected.clamp(min=1e-300).log()).sum(-1)
    assert torch.allclose(digit_confidence(log_probs, None, codec, "entropy").double(), -entropy, atol=1e-5)


@pytest.mark.parametrize("measure", ["probability", "margin", "entropy"])
def test_threshold_decoding_adapts_its_steps(measure):
    model = tiny_model(num_sub_tokens=2)
    prompt = torch.tensor([[1, 2, 3]])
    settings = dict(max_new_tokens=8, seed=0, return_dict_in_generate=True)
    # A threshold no confidence exceeds reveals one digit per step: NFE = positions · ℓ.
    never = model.generate(prompt, strategy=ThresholdStrategy(2.0, measure), **settings)
    assert never.nfe == 16 and int(never.row_nfe[0]) == 16
    # A threshold everything exceeds reveals the whole block at once: NFE = number of blocks.
    always = model.generate(
        prompt, strategy=ThresholdStrategy(-math.inf, measure), block_length=4, output_history=True, **settings
    )
    assert always.nfe == 2 and always.num_steps == 2
    # The prompt is kept and blocks are decoded left to right.
    history = torch.stack(always.history)[:, 0]
    assert torch.equal(always.sequences[0, :3], prompt[0])
    assert not bool((history[0, 3:7] == model.codec.mask_id).any()) and bool(
        (history[0, 7:] == model.codec.mask_id).all()
    )


def test_threshold_nfe_is_per_row_and_batch_invariant():
    model = tiny_model(num_sub_tokens=2)
    ids = torch.tensor([[0, 0, 4, 5], [6, 7, 8, 9]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    settings = dict(max_new_tokens=10, seed=2, strategy="threshold", threshold=0.05, return_dict_in_generate=True)
    batched = model.generate(ids, attention_mask=mask, **settings)
    for row in range(2):
        alone = model.generate(ids[row : row + 1, mask[row].bool()], **settings)
        assert torch.equal(batched.sequences[row, mask[row].bool().tolist() + [True] * 10], alone.sequences[0])
        assert int(batched.row_nfe[row]) == alone.nfe
    assert batched.nfe == int(batched.row_nfe.max())


class LeftToRight(SamplerStrategy):
    """A user's strategy: reveal the leftmost masked position (all its digits) each step, greedily."""

    name = "left-to-right"
    adaptive = True

    def plan(self, state):
        first = state.updatable.any(-1).long().argmax(1, keepdim=True)
        positions = torch.zeros_like(state.updatable[..., 0]).scatter_(1, first, True)
        return positions & state.updatable.any(-1)

    def step(self, scores, scored, state):
        tokens, _ = self.draw(scores, scored, replace(state, greedy=torch.ones_like(state.greedy)))
        return self.reveal(state, tokens, scored.unsqueeze(-1).expand_as(state.updatable))


def test_a_custom_strategy_drives_the_loop():
    model = tiny_model(num_sub_tokens=3)
    strategy = LeftToRight()
    out = model.generate(torch.tensor([[1, 2]]), max_new_tokens=5, strategy=strategy, seed=0,
                         return_dict_in_generate=True, output_history=True)  # fmt: skip
    assert out.nfe == 5 and out.num_steps == 5
    decided = torch.stack([(h[0] != model.codec.mask_id).all(-1) for h in out.history])  # (steps, L)
    for step in range(5):
        assert decided[step, : 3 + step].all() and not decided[step, 3 + step :].any()
    # Greedy left to right: each token is the argmax given the tokens to its left (and masks to its right).
    y = model.codec.encode(out.sequences)
    for position in range(2, 7):
        canvas = y.clone()
        canvas[:, position:] = model.codec.mask_id
        best = model.denoise(canvas, positions=torch.arange(7).eq(position).unsqueeze(0)).argmax(-1)
        assert int(best) == int(out.sequences[0, position])
    assert strategy.timesteps is None  # generate() works on a copy: the object can serve many calls


def test_ancestral_strategy_object_equals_the_default():
    model = tiny_model(num_sub_tokens=2)
    by_name = model.generate(torch.tensor([[1, 2]]), max_new_tokens=6, num_steps=6, seed=5)
    by_object = model.generate(torch.tensor([[1, 2]]), max_new_tokens=6, num_steps=6, seed=5,
                               strategy=AncestralStrategy())  # fmt: skip
    assert torch.equal(by_name, by_object)


def test_confidence_strategy_reveals_the_most_confident_digits():
    """An oracle whose second position is certain: confidence ordering reveals it first."""
    vocab = 6
    sequences = torch.cartesian_prod(torch.arange(vocab), torch.tensor([4]))
    probs = torch.full((vocab,), 1.0 / vocab, dtype=torch.float64)
    model = OracleModel(oracle_config(vocab, 1), sequences, probs).eval()
    for measure in ("probability", "margin", "entropy"):
        out = model.generate(max_new_tokens=2, num_steps=2, strategy="confidence", confidence_measure=measure,
                             seed=0, return_dict_in_generate=True, output_history=True)  # fmt: skip
        first = out.history[0][0, :, 0]
        assert first.tolist() == [model.codec.mask_id, 4], measure


def test_sampler_step_output_reports_revealed_digits():
    model = tiny_model(num_sub_tokens=2)
    seen = []

    class Recording(AncestralStrategy):
        def step(self, scores, scored, state):
            out = super().step(scores, scored, state)
            seen.append((out, state.sub_ids.clone()))
            return out

    model.generate(max_new_tokens=6, num_steps=6, seed=1, strategy=Recording())
    for out, before in seen:
        assert isinstance(out, SamplerStepOutput)
        assert torch.equal(out.revealed, (out.sub_ids != before))
        assert bool((before[out.revealed] == model.codec.mask_id).all())


@pytest.mark.slow
def test_strategy_benchmark_runs_and_readme_shows_its_committed_table(tmp_path, monkeypatch):
    """benchmarks/sampling_strategies.py end to end at its tiny configuration; README's table is the committed
    JSON rendered by the script."""
    import json
    import sys

    repo = Path(__file__).resolve().parents[1]
    monkeypatch.syspath_prepend(str(repo / "benchmarks"))
    sys.modules.pop("sampling_strategies", None)
    import sampling_strategies

    results = sampling_strategies.main(["--tiny", "--output-dir", str(tmp_path)])
    assert {"quality", "overhead_at_scale"} <= set(results)
    assert (tmp_path / "strategies_tiny.png").stat().st_size > 0
    rows = [row for row in results["quality"] if "row_nfe" in row]
    assert {row["strategy"] for row in rows} == {"ancestral", "confidence", "threshold"}
    for row in rows:  # fixed-step strategies never call the network more often than their steps
        if row["strategy"] != "threshold":
            assert row["row_nfe"] <= row["num_steps"]
    committed = json.loads((repo / "benchmarks" / "results" / "strategies.json").read_text())
    assert sampling_strategies.render_markdown(committed) in (repo / "docs" / "benchmarks" / "README.md").read_text()
