"""The lm-evaluation-harness model ``mdm_prime`` (modeling_mdm_prime/tools/lm_eval_adapter.py).

Exact checks against ``nll_bound`` and an oracle denoiser (exact conditionals of a known distribution), the
request plumbing (leading spaces, empty and over-long contexts, rolling windows, per-request stop strings, LoRA),
and lm-eval's own CLI on the local tasks in tests/lm_eval_tasks (one process and two under accelerate).
"""

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import OracleModel, oracle_config, random_distribution, tiny_model

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from modeling_mdm_prime import MDMPrimeForMaskedDiffusion  # noqa: E402
from modeling_mdm_prime.tools.lm_eval_adapter import MDMPrimeLM, conditional_bounds  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT = REPO / "checkpoints" / "mdm-prime-shakespeare-tiny"
TASKS = REPO / "tests" / "lm_eval_tasks"


def request(kind: str, *args) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def test_mc_samples_is_a_deprecated_alias():
    with pytest.warns(FutureWarning, match="mc_samples is deprecated"):
        lm = MDMPrimeLM(str(CHECKPOINT), mc_samples=3, is_greedy=False)
    assert lm.num_time_samples == 3 and lm.get_model_info()["mdm_prime_num_time_samples"] == 3


@pytest.fixture(scope="module")
def reference_lm():
    return MDMPrimeLM(str(CHECKPOINT), num_time_samples=4, batch_size=4, num_steps=8)


@pytest.mark.parametrize("time_conditioning", [False, True])
def test_count_estimator_draws_exactly_what_nll_bound_draws(time_conditioning):
    # With nothing held clean, the conditional bound of one sequence is nll_bound itself: the same noise from
    # the same seed (mask sets, weights N/k and, for a time-conditioned network, noise levels).
    model = tiny_model(time_conditioning=time_conditioning)
    ids = torch.randint(0, 300, (1, 20), generator=torch.Generator().manual_seed(3))
    reference = model.nll_bound(ids, num_time_samples=8, generator=torch.Generator().manual_seed(11))
    samples, _ = conditional_bounds(model, [([], ids[0].tolist())], 8, seeds=[11], batch_size=3)
    assert samples.mean().item() == pytest.approx(reference.nll.item(), rel=1e-5)
    assert (samples.std() / math.sqrt(8)).item() == pytest.approx(reference.nll_stderr.item(), rel=1e-4)


def exact_conditional(sequences, probs, context, continuation) -> float:
    """log p(continuation | context) of the toy distribution, by enumeration."""
    prefix = (sequences[:, : len(context)] == torch.tensor(context)).all(1)
    whole = prefix & (sequences[:, len(context) :] == torch.tensor(continuation)).all(1)
    return math.log(probs[whole].sum().item()) - math.log(probs[prefix].sum().item())


@pytest.mark.parametrize("ell", [1, 2])
def test_loglikelihood_converges_to_the_exact_conditional_with_an_oracle(ell):
    vocab, length = 5, 4
    sequences, probs = random_distribution(vocab, length, seed=ell)
    oracle = OracleModel(oracle_config(vocab, ell), sequences, probs).eval()
    likely = sequences[probs.argmax()].tolist()
    cases = [(likely[:2], likely[2:]), (likely[:1], likely[1:]), ([], likely), (sequences[7, :3].tolist(), [4])]
    requests = [(None, ctx, cont) for ctx, cont in cases]
    stderrs = {}
    for num_time_samples in (16, 256):
        lm = MDMPrimeLM(oracle, num_time_samples=num_time_samples, seed=0, is_greedy=False)
        results = lm._loglikelihood_tokens(requests)
        stderrs[num_time_samples] = torch.tensor([e.stderr for e in lm.last_estimates["loglikelihood"]])
        for (ctx, cont), (ll, greedy), est in zip(cases, results, lm.last_estimates["loglikelihood"], strict=True):
            exact = exact_conditional(sequences, probs, ctx, cont)
            assert greedy is False  # not computed: is_greedy=False
            assert est.num_tokens == len(cont)
            # An exact denoiser makes the conditional bound tight: the estimate is unbiased for log p(cont | ctx).
            # (One token with ℓ = 1 has N = 1 element: every draw masks it, the estimate is exact, s.e. 0.)
            assert abs(ll - exact) < 4 * est.stderr + 1e-5, (ctx, cont, ll, exact, est.stderr)
    # The standard error falls like 1/sqrt(K) (16x the samples: about 4x smaller; stratification helps more).
    noisy = stderrs[16] > 1e-9
    assert int(noisy.sum()) >= 3
    ratio = stderrs[16][noisy] / stderrs[256][noisy]
    assert bool((ratio > 2.5).all()), ratio


def test_is_greedy_by_iterative_argmax_unmasking():
    vocab, length = 5, 4
    sequences, probs = random_distribution(vocab, length, seed=5)
    top = probs.argmax()
    probs = probs * 0.1 / (probs.sum() - probs[top])
    probs[top] = 0.9  # one sequence has most of the mass: argmax unmasking must reproduce it
    oracle = OracleModel(oracle_config(vocab, 2), sequences, probs.double()).eval()
    best = sequences[top].tolist()
    other = [(best[2] + 1) % vocab, best[3]]
    lm = MDMPrimeLM(oracle, num_time_samples=2, is_greedy=True)
    results = lm._loglikelihood_tokens([(None, best[:2], best[2:]), (None, best[:2], other), (None, [], best)])
    assert [greedy for _, greedy in results] == [True, False, True]


def test_rolling_with_an_oracle_matches_nll_bound_and_the_exact_likelihood():
    # Texts end up behind the end-of-text token 0, so the toy distribution puts token 0 first with probability 1.
    vocab, ell = 5, 2
    tails, probs = random_distribution(vocab, 3, seed=2)
    sequences = torch.cat([torch.zeros(len(tails), 1, dtype=torch.long), tails], 1)
    config = oracle_config(vocab, ell)
    config.eos_token_id = 0
    oracle = OracleModel(config, sequences, probs).eval()
    lm = MDMPrimeLM(oracle, num_time_samples=256, seed=1, max_length=4)  # one window: [EOT] | x1 x2 x3
    text = tails[probs.argmax()].tolist()
    (est,) = lm.rolling_bounds([text])
    assert est.num_windows == 1 and est.num_tokens == 3
    exact = math.log(probs.max().item())
    bound = oracle.nll_bound(
        torch.tensor([[0, *text]]), num_time_samples=256, generator=torch.Generator().manual_seed(4)
    )
    assert abs(est.loglikelihood - exact) < 4 * est.stderr
    assert abs(bound.nll.item() + exact) < 4 * bound.nll_stderr.item()
    assert abs(est.loglikelihood + bound.nll.item()) < 4 * math.hypot(est.stderr, bound.nll_stderr.item())


def test_rolling_is_the_sum_of_disjoint_window_bounds():
    model = tiny_model()
    model.config.eos_token_id = 0
    lm = MDMPrimeLM(model, num_time_samples=3, seed=7, rolling_context_len=8)
    tokens = torch.randint(1, 300, (150,), generator=torch.Generator().manual_seed(0)).tolist()
    windows = lm._rolling_windows(tokens, lm.eot_token_id)
    assert [t for _, t in windows] and sum((t for _, t in windows), []) == tokens  # each token scored once
    assert windows[0][0] == [lm.eot_token_id] and all(len(c) + len(t) <= lm.max_length for c, t in windows)
    start = len(windows[0][1])
    for context, target in windows[1:]:  # each later window: >= 8 tokens of the text just before its targets
        assert len(context) >= 8 and context == tokens[start - len(context) : start]
        start += len(target)
    (total,) = lm.rolling_bounds([tokens])
    parts = lm._loglikelihood_tokens([(None, c, t) for c, t in windows])
    assert total.num_windows == len(windows) > 2
    assert total.loglikelihood == pytest.approx(sum(ll for ll, _ in parts), rel=1e-12)
    stderrs = [e.stderr for e in lm.last_estimates["loglikelihood"]]
    assert total.stderr == pytest.approx(math.sqrt(sum(s**2 for s in stderrs)), rel=1e-12)


def test_long_contexts_are_cut_from_the_left_and_never_scored_zero():
    lm = MDMPrimeLM(tiny_model(), num_time_samples=4, seed=0)  # max_length = 64
    tokens = torch.randint(1, 300, (200,), generator=torch.Generator().manual_seed(1)).tolist()
    context, continuation = tokens[:120], tokens[120:125]
    (long_ll, _), (cut_ll, _) = lm._loglikelihood_tokens(
        [(None, context, continuation), (None, context[-(64 - 5) :], continuation)]
    )
    assert long_ll == cut_ll < -1.0  # the same request once cut; a real (negative) score
    # A continuation longer than the window is scored in rolling windows, not dropped.
    ((ll, _),) = lm._loglikelihood_tokens([(None, context, tokens[:100])])
    assert lm.last_estimates["loglikelihood"][0].num_windows == 2 and ll < -100


def test_text_requests_follow_lm_eval_conventions(reference_lm):
    lm = reference_lm
    moved, plain, empty, with_bos = lm.loglikelihood(
        [
            request("loglikelihood", "ROMEO: ", "O, she doth"),  # the trailing space moves to the continuation
            request("loglikelihood", "ROMEO:", " O, she doth"),
            request("loglikelihood", "", "ROMEO: hi"),  # empty context: conditioned on the BOS/EOS token
            request("loglikelihood", "<|endoftext|>", "ROMEO: hi"),
        ]
    )
    assert moved == plain and empty == with_bos and empty[0] < 0
    assert lm.tok_encode("<|endoftext|>") == [lm.prefix_token_id]
    assert len(lm.last_stderr["loglikelihood"]) == 4 and all(s > 0 for s in lm.last_stderr["loglikelihood"])
    assert lm.get_model_info()["mdm_prime_num_time_samples"] == 4
    with pytest.raises(ValueError, match="unknown mdm_prime model_args"):
        MDMPrimeLM(str(CHECKPOINT), num_beams=4)
    with pytest.raises(ValueError, match="strategy"):
        MDMPrimeLM(str(CHECKPOINT), strategy="beam")


def test_batched_generation_equals_one_at_a_time_with_each_requests_stops(reference_lm):
    lm = reference_lm
    specs = [
        ("ROMEO:", {"until": ["\n"], "max_gen_toks": 12}),
        ("ROMEO:", {"until": [","], "max_gen_toks": 12}),  # same prompt and length, other stop string
        ("ROMEO:", {"until": [], "max_gen_toks": 12}),  # only EOS stops it
        ("JULIET: O Romeo, Romeo!", {"until": [".", "!"], "max_gen_toks": 12}),
        ("JULIET: O Romeo, Romeo!", {"until": ["\n"], "max_gen_toks": 6, "do_sample": False}),
        ("", {"until": ["\n\n"], "max_gen_toks": 12}),
    ]
    reqs = [request("generate_until", ctx, kw) for ctx, kw in specs]
    batched = lm.generate_until(reqs)
    singles = [lm.generate_until([r])[0] for r in reqs]
    assert batched == singles
    uncut = batched[2]
    assert batched[0] == uncut.split("\n")[0] and batched[1] == uncut.split(",")[0]
    for (_, kw), text in zip(specs, batched, strict=True):
        assert not any(stop in text for stop in kw["until"])
    assert len(lm.tok_encode(batched[4])) <= 6 + 1  # max_gen_toks honoured (decode/encode may merge one token)


def test_a_lora_adapter_is_evaluated_on_its_base_model(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    base = MDMPrimeForMaskedDiffusion.from_pretrained(CHECKPOINT)
    torch.manual_seed(0)
    lora = get_peft_model(base, LoraConfig(r=4, target_modules=["attn_qkv", "fc_in"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")
    # The base recorded in the adapter's config, the tokenizer from the base folder.
    adapted = MDMPrimeLM(peft=str(tmp_path / "adapter"), num_time_samples=4)
    plain = MDMPrimeLM(str(CHECKPOINT), num_time_samples=4)
    unmerged = PeftModel.from_pretrained(MDMPrimeForMaskedDiffusion.from_pretrained(CHECKPOINT), tmp_path / "adapter")
    reference = MDMPrimeLM(unmerged.get_base_model(), tokenizer=str(CHECKPOINT), num_time_samples=4)
    reqs = [request("loglikelihood", "ROMEO:", " O, she doth teach the torches to burn bright!")]
    (ll_adapted, _), (ll_plain, _), (ll_reference, _) = (m.loglikelihood(reqs)[0] for m in (adapted, plain, reference))
    assert ll_adapted == pytest.approx(ll_reference, abs=1e-3)  # merged = LoRA layers applied on the fly
    assert abs(ll_adapted - ll_plain) > 0.1


ADAPTER = "modeling_mdm_prime.tools.lm_eval_adapter"


def run_cli(args: list[str], processes: int = 1) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    if processes == 1:
        command = [sys.executable, "-m", "modeling_mdm_prime.tools.lm_eval_adapter", *args]
    else:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        command = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", str(processes),
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", str(port), "-m", ADAPTER, *args]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def read_run(output: Path) -> tuple[dict, dict[str, list[dict]]]:
    (folder,) = [p for p in output.iterdir() if p.is_dir()]
    (results_file,) = folder.glob("results_*.json")
    samples = {}
    for path in folder.glob("samples_*.jsonl"):
        task = path.name[len("samples_") :].rsplit("_", 1)[0]
        samples[task] = sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda s: s["doc_id"])
    return json.loads(results_file.read_text()), samples


@pytest.mark.slow
def test_lm_eval_cli_runs_the_local_tasks_on_one_and_two_processes(tmp_path):
    args = ["--model", "mdm_prime", "--model_args", f"pretrained={CHECKPOINT},num_time_samples=2,num_steps=4",
            "--tasks", "mdm_prime_local", "--include_path", str(TASKS), "--batch_size", "4", "--device", "cpu",
            "--log_samples"]  # fmt: skip
    run_cli([*args, "--output_path", str(tmp_path / "one")])
    results, samples = read_run(tmp_path / "one")
    scores = results["results"]
    assert set(scores) == {"mdm_prime_mc", "mdm_prime_ppl", "mdm_prime_gen", "mdm_prime_gen_word"}
    assert 0.0 <= scores["mdm_prime_mc"]["acc,none"] <= 1.0 and scores["mdm_prime_mc"]["acc_stderr,none"] > 0
    assert (
        1.0 < scores["mdm_prime_ppl"]["byte_perplexity,none"] < 2048
        and scores["mdm_prime_ppl"]["bits_per_byte,none"] > 0
    )
    assert results["config"]["mdm_prime_num_time_samples"] == 2
    assert len(samples["mdm_prime_mc"]) == 16 and len(samples["mdm_prime_ppl"]) == 6
    for doc in samples["mdm_prime_mc"]:
        assert all(float(resp[0][0]) < 0 for resp in doc["resps"])  # a bound on a log-probability
    for task, stops in (("mdm_prime_gen", ["\n"]), ("mdm_prime_gen_word", [" ", ",", "\n"])):
        for doc in samples[task]:
            assert not any(stop in doc["resps"][0][0] for stop in stops)
    # Two processes split the requests; every window and prompt is seeded by its own tokens, so each document
    # gets the numbers of the single-process run.
    run_cli([*args, "--tasks", "mdm_prime_mc,mdm_prime_gen", "--output_path", str(tmp_path / "two")], processes=2)
    _, split = read_run(tmp_path / "two")
    for task in ("mdm_prime_mc", "mdm_prime_gen"):
        assert [d["resps"] for d in split[task]] == [d["resps"] for d in samples[task]]


def test_repeated_identical_requests_are_independent_samples(reference_lm):
    """lm-eval's ``repeats: K`` (self-consistency, pass@k) sends K identical requests: K samples, not one K times.
    Each stays a pure function of (seed, occurrence, prompt): the same list gives the same texts again, the first
    occurrence is what a single request gives, and batching does not matter."""
    lm = reference_lm
    kwargs = {"until": [], "max_gen_toks": 12, "do_sample": True, "temperature": 1.0}
    reqs = [request("generate_until", "ROMEO:", dict(kwargs)) for _ in range(4)]
    reqs.insert(2, request("generate_until", "JULIET:", dict(kwargs)))
    texts = lm.generate_until(reqs)
    romeo = [texts[i] for i in (0, 1, 3, 4)]
    assert len(set(romeo)) == 4, romeo
    assert lm.generate_until(reqs) == texts
    assert lm.generate_until([reqs[0]]) == [texts[0]] and lm.generate_until([reqs[2]]) == [texts[2]]
    assert lm.generate_until(reqs[:2]) == texts[:2]


def test_is_greedy_is_computed_by_default():
    vocab = 5
    sequences, probs = random_distribution(vocab, 4, seed=5)
    top = probs.argmax()
    probs = probs * 0.1 / (probs.sum() - probs[top])
    probs[top] = 0.9
    oracle = OracleModel(oracle_config(vocab, 2), sequences, probs.double()).eval()
    best = sequences[top].tolist()
    requests = [(None, best[:2], best[2:])]
    ((_, greedy),) = MDMPrimeLM(oracle, num_time_samples=2)._loglikelihood_tokens(requests)
    assert greedy is True
    ((_, skipped),) = MDMPrimeLM(oracle, num_time_samples=2, is_greedy=False)._loglikelihood_tokens(requests)
    assert skipped is False


@pytest.mark.parametrize("time_conditioning", [False, True])
def test_per_row_generators_make_the_bound_independent_of_the_batch(time_conditioning):
    """nll_bound with one generator per row and a scored_mask (the lm-eval adapter's call): each row's samples are
    those of the row alone (same draws; padding and neighbours change nothing but float rounding), and the
    context tokens are never masked, so a fully clean row's bound is 0."""
    model = tiny_model(time_conditioning=time_conditioning)
    rows = [list(range(5, 25)), list(range(40, 52)), list(range(60, 68))]
    ids = torch.zeros(3, 20, dtype=torch.long)
    real = torch.zeros(3, 20, dtype=torch.long)
    target = torch.zeros(3, 20, dtype=torch.bool)
    for r, tokens in enumerate(rows):
        ids[r, : len(tokens)] = torch.tensor(tokens)
        real[r, : len(tokens)] = 1
        target[r, 4 : len(tokens)] = r < 2  # row 2 is all context
    generators = [torch.Generator().manual_seed(100 + r) for r in range(3)]
    batched = model.nll_bound(ids, real, num_time_samples=6, generator=generators, scored_mask=target)
    for r, tokens in enumerate(rows):
        alone = model.nll_bound(
            ids[r : r + 1, : len(tokens)],
            num_time_samples=6,
            generator=[torch.Generator().manual_seed(100 + r)],
            scored_mask=target[r : r + 1, : len(tokens)],
        )
        assert torch.allclose(batched.nll_samples[r], alone.nll_samples[0], rtol=1e-5, atol=1e-4)
    assert batched.num_tokens.tolist() == [16, 8, 0] and batched.nll[2].item() == 0.0
    with pytest.raises(ValueError, match="one per row"):
        model.nll_bound(ids, real, generator=generators[:2])
