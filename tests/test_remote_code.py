"""Save a tiny model, then load it with trust_remote_code in fresh processes where the package is not importable,
on the installed transformers (5.x) and on a transformers 4.57 environment."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fresh_interpreter import interpreters

REPO = Path(__file__).resolve().parents[1]
SHIPPED = {
    "adapted_mdm_prime.py",
    "configuration_mdm_prime.py",
    "codec_mdm_prime.py",
    "estimators_mdm_prime.py",
    "schedules_mdm_prime.py",
    "losses_mdm_prime.py",
    "sampling_mdm_prime.py",
    "generation_mdm_prime.py",
    "modeling_mdm_prime.py",
}

LOADER = r"""
import json, sys
sys.modules["modeling_mdm_prime"] = None  # the package must not be importable: only the checkpoint's code
try:
    import modeling_mdm_prime  # noqa: F401
    raise SystemExit("modeling_mdm_prime is importable in the loader process")
except ImportError:
    pass
import torch, transformers
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

path, work = sys.argv[1], sys.argv[2]
inputs = load_file(f"{work}/inputs.safetensors")
config = AutoConfig.from_pretrained(path, trust_remote_code=True)
report = {"transformers": transformers.__version__, "config_class": type(config).__name__, "models": {}}
for auto in (AutoModel, AutoModelForMaskedLM):
    model = auto.from_pretrained(path, trust_remote_code=True).eval()
    cls = type(model)
    report["models"][auto.__name__] = [cls.__name__, cls.__module__]
    generated = model.generate(inputs["ids"][:1, :4], seed=0, return_dict_in_generate=True)
    settings = model.generation_config
    report["generation"] = {
        "class": type(settings).__name__,
        **{k: getattr(settings, k, None) for k in ("strategy", "num_steps", "top_p", "top_k", "max_new_tokens")},
        "steps_run": generated.num_steps,
    }
    outputs = {
        "generated": generated.sequences,
        "log_probs": model.denoise(inputs["sub_ids"], attention_mask=inputs["mask"]),
        "loss": model(inputs["ids"], attention_mask=inputs["mask"], generator=torch.Generator().manual_seed(0))
        .loss.reshape(1),
    }
    save_file(outputs, f"{work}/{auto.__name__}.safetensors")
# A step streamer (any object with put_step / end) sees what output_history records; constrained infilling.
class Recorder:
    def __init__(self):
        self.states, self.ended = [], False
    def put_step(self, state):
        self.states.append(state.sub_ids.clone())
    def end(self):
        self.ended = True
recorder = Recorder()
streamed = model.generate(inputs["ids"][:2, :4], seed=0, streamer=recorder, return_dict_in_generate=True,
                          output_history=True)
report["step_streamer"] = [len(recorder.states) - 1, len(streamed.history), recorder.ended,
                           all(torch.equal(a, b) for a, b in zip(recorder.states[1:], streamed.history))]
template, holes = inputs["ids"][:1, :6], torch.zeros(1, 6, dtype=torch.bool)
holes[0, 2:5] = True
sets = torch.zeros(2, config.vocab_size, dtype=torch.bool)
sets[0], sets[1, 5:15] = True, True
constrained = model.generate(template, infill_mask=holes, seed=0, token_sets=sets, token_set_ids=holes.long())
per_row = model.generate(inputs["ids"][:2, :4], seed=[3, 4], max_new_tokens=5)  # one seed per row (tools.grpo)
save_file({"constrained": constrained, "per_row": per_row}, f"{work}/constrained.safetensors")
# transformers' attention interface: eager attention from from_pretrained, and switched at runtime.
eager = AutoModel.from_pretrained(path, trust_remote_code=True, attn_implementation="eager").eval()
attention = {"eager": eager.denoise(inputs["sub_ids"], attention_mask=inputs["mask"])}
report["attn_implementation"] = [model.config._attn_implementation, eager.config._attn_implementation]
model.set_attn_implementation("eager")
attention["switched"] = model.denoise(inputs["sub_ids"], attention_mask=inputs["mask"])
report["attn_implementation"].append(model.config._attn_implementation)
save_file(attention, f"{work}/attention.safetensors")
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def saved(saved_checkpoint):
    return saved_checkpoint.root, saved_checkpoint.expected


def test_checkpoint_contents(saved):
    root, _ = saved
    files = {p.name for p in (root / "checkpoint").iterdir()}
    assert SHIPPED <= files and "model.safetensors" in files
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    config = json.loads((root / "checkpoint" / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_mdm_prime.MDMPrimeConfig",
        "AutoModel": "modeling_mdm_prime.MDMPrimeForMaskedDiffusion",
        "AutoModelForMaskedLM": "modeling_mdm_prime.MDMPrimeForMaskedDiffusion",
    }
    for name in SHIPPED:  # the shipped code is the package's code, byte for byte
        assert (root / "checkpoint" / name).read_bytes() == (REPO / "modeling_mdm_prime" / name).read_bytes()


@pytest.mark.parametrize(("python", "version"), list(interpreters()))
def test_remote_code_loads_in_fresh_process(saved, saved_checkpoint, python, version, fresh_python, tmp_path_factory):
    root, expected = saved
    work = tmp_path_factory.mktemp(f"loaded-{version}")
    shutil.copy(root / "inputs.safetensors", work)
    result = fresh_python(python, LOADER, [root / "checkpoint", work], cwd=work)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["transformers"].startswith(version)
    assert report["config_class"] == "MDMPrimeConfig"
    # generation_config.json survives the round trip (4.57 hands the model a plain GenerationConfig, which
    # generate() converts) and generate() follows it: same settings, same samples as in this process.
    generation = report["generation"]
    assert generation["strategy"] == "confidence" and generation["num_steps"] == 8 and generation["top_p"] == 0.95
    assert generation["max_new_tokens"] == 5 and generation["steps_run"] == 8
    assert generation["class"] == ("MDMPrimeGenerationConfig" if version == "5." else "GenerationConfig")
    for auto in ("AutoModel", "AutoModelForMaskedLM"):
        name, module = report["models"][auto]
        assert name == "MDMPrimeForMaskedDiffusion" and module.startswith("transformers_modules")
        outputs = load_file(str(work / f"{auto}.safetensors"))
        assert torch.allclose(outputs["log_probs"], expected["log_probs"], atol=1e-6, equal_nan=True)
        assert torch.allclose(outputs["loss"], expected["loss"], atol=1e-6)
        assert torch.equal(outputs["generated"], expected["generated"])
    steps, history, ended, same = report["step_streamer"]
    assert steps == history == 8 and ended and same
    saved_outputs = load_file(str(work / "constrained.safetensors"))
    constrained = saved_outputs["constrained"]
    assert bool(((constrained[0, 2:5] >= 5) & (constrained[0, 2:5] < 15)).all())
    ids = load_file(str(root / "inputs.safetensors"))["ids"]
    per_row = saved_checkpoint.model.generate(ids[:2, :4], seed=[3, 4], max_new_tokens=5)
    assert torch.equal(saved_outputs["per_row"], per_row)
    holes = torch.zeros(1, 6, dtype=torch.bool)
    holes[0, 2:5] = True
    sets = torch.zeros(2, saved_checkpoint.model.config.vocab_size, dtype=torch.bool)
    sets[0], sets[1, 5:15] = True, True
    here = saved_checkpoint.model.generate(ids[:1, :6], infill_mask=holes, seed=0, token_sets=sets,
                                           token_set_ids=holes.long())  # fmt: skip
    assert torch.equal(constrained, here)
    assert report["attn_implementation"] == ["sdpa", "eager", "eager"]
    real = load_file(str(root / "inputs.safetensors"))["mask"].bool()
    for log_probs in load_file(str(work / "attention.safetensors")).values():
        assert torch.allclose(log_probs[real], expected["log_probs"][real], atol=1e-5, equal_nan=True)


def test_auto_classes_in_process(saved):
    """With the package imported, the Auto factories resolve without remote code."""
    from transformers import AutoModel, AutoModelForMaskedLM

    import modeling_mdm_prime

    root, expected = saved
    for auto in (AutoModel, AutoModelForMaskedLM):
        model = auto.from_pretrained(root / "checkpoint").eval()
        assert type(model) is modeling_mdm_prime.MDMPrimeForMaskedDiffusion
        ids, mask, sub_ids = (load_file(str(root / "inputs.safetensors"))[k] for k in ("ids", "mask", "sub_ids"))
        assert torch.allclose(
            model.denoise(sub_ids, attention_mask=mask), expected["log_probs"], atol=1e-6, equal_nan=True
        )


PIPELINE = r"""
import json, sys
sys.modules["modeling_mdm_prime"] = None  # only the checkpoint's code
import torch, transformers
from transformers import AutoModel, AutoTokenizer, pipeline

path = sys.argv[1]
model = AutoModel.from_pretrained(path, trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)  # 5.x reads config.json first
# The pipeline takes the loaded model (text-generation would look for an AutoModelForCausalLM by path).
generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
settings = dict(max_new_tokens=8, num_steps=8, do_sample=True, temperature=1.0)
torch.manual_seed(0)
text = generator("ROMEO:", **settings)[0]["generated_text"]
torch.manual_seed(0)
direct = model.generate(**tokenizer("ROMEO:", return_tensors="pt"), **settings)
template = tokenizer("ROMEO: What light through yonder window breaks?", return_tensors="pt")["input_ids"]
holes = torch.zeros_like(template, dtype=torch.bool)
holes[0, 3:6] = True
filled = model.generate(template, infill_mask=holes, seed=0)
repeated = model.generate(**tokenizer(["ROMEO:"] * 3, return_tensors="pt"), max_new_tokens=6, seed=0)
print(json.dumps({
    "transformers": transformers.__version__,
    "pipeline": text,
    "direct": tokenizer.decode(direct[0]),
    "infill_shape": list(filled.shape),
    "template_shape": list(template.shape),
    "template_kept": bool((filled[~holes] == template[~holes]).all()),
    "distinct_repeats": len({tuple(row) for row in repeated.tolist()}),
}))
"""


@pytest.mark.slow
@pytest.mark.parametrize(("python", "version"), list(interpreters()))
def test_pipeline_and_saved_generation_config_with_only_the_shipped_code(tmp_path, python, version, fresh_python):
    """The reference checkpoint as users meet it (its generation_config.json sets max_new_tokens=64): the
    text-generation pipeline runs diffusion sampling, infilling appends nothing, and repeated prompts in one
    batch get distinct samples, on transformers 5.x and 4.57, with the package not importable."""
    checkpoint = REPO / "checkpoints" / "mdm-prime-shakespeare-tiny"
    result = fresh_python(python, PIPELINE, [checkpoint], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["transformers"].startswith(version)
    assert report["pipeline"] == report["direct"] and report["pipeline"].startswith("ROMEO:")
    assert report["infill_shape"] == report["template_shape"] and report["template_kept"]
    assert report["distinct_repeats"] == 3


def test_the_fresh_worker_behaves_like_a_fresh_process(fresh_python, tmp_path):
    """tests/fresh_interpreter.py: what one case does is not seen by the next one, the package cannot be imported,
    exit codes and output come back as from a process, and each process a test starts has one thread."""
    import sys

    probe = (
        "import os, sys, torch\n"
        "try:\n    import modeling_mdm_prime\n    print('importable')\nexcept ImportError:\n    print('blocked')\n"
        "os.write(1, b'written to fd 1 by C code\\n')\n"  # must not corrupt the worker's replies
        "print(torch.get_default_dtype(), torch.get_num_threads(), os.getcwd(), sys.argv[1:])\n"
        "torch.set_default_dtype(torch.float64)\n"
        "sys.modules['transformers_modules.leftover'] = sys\n"
        "raise SystemExit(int(sys.argv[1]))\n"
    )
    first = fresh_python(sys.executable, probe, [3, "x"], cwd=tmp_path)
    second = fresh_python(sys.executable, probe, [0, "y"], cwd=tmp_path.parent)
    assert first.returncode == 3 and second.returncode == 0
    for result, argv, cwd in ((first, ["3", "x"], tmp_path), (second, ["0", "y"], tmp_path.parent)):
        assert result.stdout.splitlines() == ["blocked", f"torch.float32 1 {cwd} {argv}"]
    leftover = "import sys; print('transformers_modules.leftover' in sys.modules)"
    leaked = fresh_python(sys.executable, leftover, [], tmp_path)
    assert leaked.stdout == "False\n"
    failed = fresh_python(sys.executable, "raise KeyError('boom')", [], tmp_path)
    assert failed.returncode == 1 and "KeyError: 'boom'" in failed.stderr
