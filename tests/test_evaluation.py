"""Evaluation: the evaluate metric modules (loaded offline from their folders) against closed forms,
examples/evaluate_ppl.py end to end (one and two processes), the NELBO estimator's convergence with an oracle,
and the Table 1 reproduction benchmark (a tiny configuration, end to end; README.md against its committed JSON)."""

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import evaluate
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from conftest import GPT2_TOKENIZER, OracleModel, oracle_config, random_distribution, tiny_config
from modeling_mdm_prime import MDMPrimeForMaskedDiffusion

REPO = Path(__file__).resolve().parents[1]
METRICS = REPO / "examples" / "metrics"
sys.path.insert(0, str(REPO / "examples"))
sys.path.insert(0, str(REPO / "benchmarks"))


def load_metric(name: str):
    return evaluate.load(str(METRICS / name))


def sixteen_token_checkpoint(path: Path, seed: int = 0, zero_head: bool = False) -> Path:
    """An MDM-Prime checkpoint over a 16-word vocabulary (C = 16 = 4², ℓ = 2) with its tokenizer."""
    words = ["<s>"] + [f"w{i}" for i in range(15)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<s>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<s>", pad_token="<s>")
    torch.manual_seed(seed)
    config = tiny_config(vocab_size=16, num_sub_tokens=2, hidden_size=32, max_position_embeddings=32)
    config.bos_token_id = config.eos_token_id = config.pad_token_id = 0
    model = MDMPrimeForMaskedDiffusion(config)
    if zero_head:  # uniform over the consistent tokens
        torch.nn.init.zeros_(model.lm_head.weight), torch.nn.init.zeros_(model.lm_head.bias)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_unigram_entropy_and_distinct_n_closed_forms():
    entropy = load_metric("unigram_entropy").compute(predictions=[[1, 1, 2, 2], [5, 5, 5, 5], [1, 2, 3, 4]])
    assert entropy["entropies"] == pytest.approx([math.log(2), 0.0, math.log(4)], abs=1e-12)
    assert entropy["entropy"] == pytest.approx((math.log(2) + math.log(4)) / 3, abs=1e-12)
    distinct = load_metric("distinct_n").compute(predictions=[[1, 2, 1, 2], [3, 3, 3]], max_n=2)
    # pooled unigrams 1,2,1,2,3,3,3 -> 3 of 7; bigrams (1,2),(2,1),(1,2),(3,3),(3,3) -> 3 of 5
    assert distinct["distinct-1"] == pytest.approx(3 / 7) and distinct["distinct-2"] == pytest.approx(3 / 5)
    # within-sample repetition: 1 - 2/4 and 1 - 1/3 for unigrams; 1 - 2/3 and 1 - 1/2 for bigrams
    assert distinct["repetition-1"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert distinct["repetition-2"] == pytest.approx((1 / 3 + 1 / 2) / 2)
    with pytest.raises(ValueError, match="at least one token"):
        load_metric("unigram_entropy").compute(predictions=[[]])


def test_idle_step_ratio_matches_table1_and_checks_input():
    isr = load_metric("idle_step_ratio")
    out = isr.compute(idle_steps=[3, 5], num_steps=[10, 10])
    assert out["idle_step_ratio"] == pytest.approx(0.4) and out["idle_step_ratio_stderr"] == pytest.approx(0.1)
    paper = {1: 36.77, 2: 13.52, 3: 4.97, 4: 1.83, 6: 0.25, 8: 0.03}  # MDM-Prime Table 1 (%), L = T = 1024
    for ell, percent in paper.items():
        closed = isr.compute(idle_steps=[0], num_steps=[1024], sequence_length=1024, num_sub_tokens=ell)
        assert round(100 * closed["expected_idle_step_ratio"], 2) == percent
    with pytest.raises(ValueError, match=r"idle_steps must lie in \[0, num_steps\]"):
        isr.compute(idle_steps=[11], num_steps=[10])


def test_generative_perplexity_uniform_scorer_and_direct_loss(tmp_path):
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(GPT2_TOKENIZER), bos_token="<|endoftext|>")
    config = GPT2Config(vocab_size=50257, n_positions=64, n_embd=16, n_layer=1, n_head=2)
    torch.manual_seed(0)
    scorer = GPT2LMHeadModel(config).eval()  # no dropout: from_pretrained also returns an eval-mode model
    scorer.save_pretrained(tmp_path / "random")
    tokenizer.save_pretrained(tmp_path / "random")
    texts = ["To be, or not to be, that is the question.", "Exeunt."]
    metric = load_metric("generative_perplexity")
    got = metric.compute(predictions=texts, model_id=str(tmp_path / "random"), device="cpu")
    for text, ppl in zip(texts, got["perplexities"]):  # = exp(the model's own mean loss with BOS prepended)
        ids = torch.tensor([[tokenizer.bos_token_id, *tokenizer(text)["input_ids"]]])
        assert ppl == pytest.approx(math.exp(scorer(input_ids=ids, labels=ids).loss.item()), rel=1e-5)
    torch.nn.init.zeros_(scorer.transformer.wte.weight)  # tied head: every logit is 0, a uniform scorer
    scorer.save_pretrained(tmp_path / "uniform")
    tokenizer.save_pretrained(tmp_path / "uniform")
    uniform = metric.compute(predictions=texts, model_id=str(tmp_path / "uniform"), device="cpu")
    assert uniform["corpus_perplexity"] == pytest.approx(50257, rel=1e-5)
    assert uniform["mean_perplexity"] == pytest.approx(50257, rel=1e-5)


def test_nelbo_perplexity_module_closed_form_and_direct_bound(tmp_path):
    metric = load_metric("nelbo_perplexity")
    texts = ["w1 w2 w3 w4 w5", "w9 w9 w0 w14 w3 w7 w1", "w2"]
    # A uniform denoiser over C = 4² tokens: every masked digit costs exactly ln 4 whatever is revealed, so the
    # count estimator has no variance and the bound is ln 16 per token: perplexity 16, standard error 0.
    uniform = sixteen_token_checkpoint(tmp_path / "uniform", zero_head=True)
    out = metric.compute(predictions=texts, model_id=str(uniform), num_time_samples=3, device="cpu")
    assert out["num_tokens"] == 5 + 7 + 1 + 2 * 3  # BOS and EOS around each text
    assert out["ppl_bound"] == pytest.approx(16.0, rel=1e-6) and out["nelbo_stderr_per_token"] < 1e-6
    # A random model: the module reports model.nll_bound on the same batch with the same seed.
    random = sixteen_token_checkpoint(tmp_path / "random", seed=3)
    out = metric.compute(predictions=texts, model_id=str(random), num_time_samples=4, seed=7, device="cpu")
    model = MDMPrimeForMaskedDiffusion.from_pretrained(random).eval()
    rows = [[0, 2, 3, 4, 5, 6, 0], [0, 10, 10, 1, 15, 4, 8, 2, 0], [0, 3, 0]]
    ids = torch.zeros(3, 9, dtype=torch.long)
    mask = torch.zeros(3, 9, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
    direct = model.nll_bound(ids, mask, num_time_samples=4, generator=torch.Generator().manual_seed(7))
    assert out["nelbos"] == pytest.approx(direct.nll.tolist(), rel=1e-5)
    assert out["ppl_bound"] == pytest.approx(math.exp(direct.nll.sum().item() / 19), rel=1e-5)
    assert out["paper_objective_ppl"] == pytest.approx(math.exp(direct.paper_objective.sum().item() / 19), rel=1e-5)


def test_nelbo_estimate_converges_to_the_nll_and_its_error_shrinks_with_k():
    vocab, ell = 6, 2
    sequences, probs = random_distribution(vocab, length=2, seed=5)
    model = OracleModel(oracle_config(vocab, ell), sequences, probs).eval()
    pick = int(probs.argsort()[len(probs) // 3])
    true_nll = -math.log(float(probs[pick]))
    ids = sequences[pick : pick + 1].repeat(20, 1)
    errors = {}
    for k in (4, 16, 64):
        out = model.nll_bound(ids, num_time_samples=k, generator=torch.Generator().manual_seed(k))
        estimate, stderr = out.nll.mean().item(), out.nll_stderr.pow(2).mean().sqrt().item() / math.sqrt(20)
        assert abs(estimate - true_nll) < 4 * stderr, (k, estimate, true_nll, stderr)
        errors[k] = stderr
    # The standard error falls like 1/sqrt(K) or faster (stratified draws): 16x the samples, <= 1/2.5 the error.
    assert errors[16] < errors[4] / 1.5 and errors[64] < errors[4] / 2.5, errors
    assert errors[64] < 0.03 * true_nll


@pytest.mark.slow
def test_evaluate_ppl_script_suite_and_two_processes(tmp_path):
    import evaluate_ppl

    checkpoint = sixteen_token_checkpoint(tmp_path / "model", seed=1)
    docs = [" ".join(f"w{(7 * i + j) % 15}" for j in range(40 + 3 * i)) for i in range(6)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:3]))
    (tmp_path / "b.txt").write_text("\n".join(docs[3:]))
    (tmp_path / "suite.yaml").write_text("- {name: corpus a, path: a.jsonl}\n- {name: corpus b, path: b.txt}\n")
    args = ["--model_name_or_path", str(checkpoint), "--suite", str(tmp_path / "suite.yaml"), "--seq_len", "16",
            "--num_time_samples", "3", "--batch_size", "2", "--cpu"]  # fmt: skip
    results = evaluate_ppl.main([*args, "--write_results"])
    assert [r["dataset"] for r in results] == ["corpus a", "corpus b"]
    # Local files are scored whole: the label says so instead of calling them a "train" split.
    assert [r["split"] for r in results] == ["all documents of a.jsonl", "all documents of b.txt"]
    saved = json.loads((checkpoint / "eval_results.json").read_text())
    assert saved["results"] == json.loads(json.dumps(results))
    for r in results:
        assert r["num_tokens"] == 16 * r["num_blocks"]
        assert r["ppl_bound"] == pytest.approx(math.exp(r["nelbo_per_token"]))
        assert r["ppl_bound_95"][0] < r["ppl_bound"] < r["ppl_bound_95"][1]
    # Two processes through accelerate launch split the batches; each batch is seeded by its index, so the
    # numbers equal the single-process run.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               str(port), str(REPO / "examples" / "evaluate_ppl.py"), *args,
               "--output", str(tmp_path / "ddp.json")]  # fmt: skip
    run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    ddp = json.loads((tmp_path / "ddp.json").read_text())["results"]
    for single, double in zip(results, ddp):
        assert double["num_tokens"] == single["num_tokens"]
        assert double["nelbo_per_token"] == pytest.approx(single["nelbo_per_token"], rel=1e-7)  # summation order
    with pytest.raises(ValueError, match="name=path"):
        evaluate_ppl.main(["--model", str(checkpoint), "--corpus", "no-equals-sign"])


def test_table1_benchmark_tiny_end_to_end(tmp_path):
    import reproduce_table1

    results = reproduce_table1.main(["--tiny", "--output-dir", str(tmp_path)])
    assert set(results["models"]) == {"ar", "mdm", "prime2"}
    for name, r in results["models"].items():
        assert r["train_seconds"] > 0 and math.isfinite(r["final_train_loss"])
        if name != "ar":  # the equal-NFE column is T = L
            assert r["sweep"][-1]["num_steps"] == results["config"]["seq_len"]
        if name == "mdm":  # ℓ = 1: the paper objective is the valid bound
            assert r["paper_objective_ppl"] == pytest.approx(r["ppl_bound"], rel=1e-9)
    for row in results["idle_steps_at_scale"]:  # the sampler's idle steps agree with the closed form
        assert abs(row["measured"] - row["closed_form"]) < 5 * row["stderr"] + 0.05
    for suffix in ("json", "md", "png"):
        assert (tmp_path / f"table1_tiny.{suffix}").stat().st_size > 0
    assert (tmp_path / "table1_tiny.md").read_text().strip() == reproduce_table1.render_markdown(results)


def test_readme_shows_the_committed_table1_results():
    import reproduce_table1

    committed = json.loads((REPO / "benchmarks" / "results" / "table1.json").read_text())
    assert reproduce_table1.render_markdown(committed) in (REPO / "docs" / "benchmarks" / "table1.md").read_text()
