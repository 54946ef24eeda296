import contextlib
import os

# An accidental Hub id must fail at once instead of retrying for a minute.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from modeling_mdm_prime import MDMPrimeConfig, MDMPrimeForMaskedDiffusion  # noqa: E402
from modeling_mdm_prime.tools.rl_likelihood import oracle_logits  # noqa: E402, F401 - the tests' oracle network

# One thread per process that a test starts (scripts, accelerate launches, the fresh-process workers): several of
# them often run at once on a 2-core machine, where OpenMP threads contending for the cores slow a run down tenfold.
# Set after torch is imported, so this process keeps its threads (libgomp reads the variable when it loads).
os.environ.setdefault("OMP_NUM_THREADS", "1")

GPT2_SHA256 = "311f7262f89ffe8757683fda3c081a5cac5a885dc311264791a17d2a18499a4f"


def _gpt2_tokenizer() -> Path:
    """The real GPT-2 tokenizer committed under tests/data (xz-compressed; see its PROVENANCE.md), unpacked once
    per machine into a temporary folder (atomically, so parallel sessions and subprocesses share it)."""
    import hashlib
    import lzma
    import shutil
    import tempfile

    source = Path(__file__).resolve().parent / "data" / "gpt2-tokenizer"
    folder = Path(tempfile.gettempdir()) / f"mdm-prime-tests-gpt2-{GPT2_SHA256[:12]}"
    target = folder / "tokenizer.json"
    if not target.is_file() or hashlib.sha256(target.read_bytes()).hexdigest() != GPT2_SHA256:
        staging = Path(tempfile.mkdtemp(prefix="gpt2-", dir=tempfile.gettempdir()))
        data = lzma.decompress((source / "tokenizer.json.xz").read_bytes())
        if hashlib.sha256(data).hexdigest() != GPT2_SHA256:
            raise RuntimeError(f"{source / 'tokenizer.json.xz'} does not unpack to the GPT-2 tokenizer (SHA-256).")
        (staging / "tokenizer.json").write_bytes(data)
        shutil.copy(source / "tokenizer_config.json", staging / "tokenizer_config.json")
        shutil.rmtree(folder, ignore_errors=True)
        try:
            staging.rename(folder)
        except OSError:  # another process won the race: its copy is the same
            shutil.rmtree(staging, ignore_errors=True)
    return target


# The real GPT-2 tokenizer (tokenizer.json; its folder also holds tokenizer_config.json): from the repository.
GPT2_TOKENIZER = _gpt2_tokenizer()


def tiny_config(**overrides) -> MDMPrimeConfig:
    settings = dict(
        vocab_size=300,
        num_sub_tokens=3,
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=96,
        max_position_embeddings=64,
        dropout=0.0,
    )
    settings.update(overrides)
    return MDMPrimeConfig(**settings)


def tiny_model(**overrides) -> MDMPrimeForMaskedDiffusion:
    torch.manual_seed(0)
    return MDMPrimeForMaskedDiffusion(tiny_config(**overrides)).eval()


@dataclass(frozen=True)
class SavedCheckpoint:
    """A tiny text model saved once per session (read-only for the tests): ``root/checkpoint`` holds the model with a
    non-default generation config, ``root/inputs.safetensors`` padded inputs (``ids``, ``mask``, partly masked
    ``sub_ids``), and ``expected`` what the saving process computed on them."""

    root: Path
    model: MDMPrimeForMaskedDiffusion
    expected: dict

    @property
    def path(self) -> Path:
        return self.root / "checkpoint"


@pytest.fixture(scope="session")
def saved_checkpoint(tmp_path_factory) -> SavedCheckpoint:
    from safetensors.torch import save_file

    from modeling_mdm_prime import MDMPrimeGenerationConfig

    root = tmp_path_factory.mktemp("saved")
    model = tiny_model(num_sub_tokens=3, time_conditioning=False)
    model.generation_config = MDMPrimeGenerationConfig(num_steps=8, strategy="confidence", max_new_tokens=5, top_p=0.95)
    model.save_pretrained(root / "checkpoint")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 300, (2, 10), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    sub_ids = model.codec.encode(ids)
    sub_ids[torch.rand(sub_ids.shape, generator=gen) < 0.5] = model.codec.mask_id
    save_file({"ids": ids, "mask": mask, "sub_ids": sub_ids}, str(root / "inputs.safetensors"))
    with torch.no_grad():
        expected = {
            "generated": model.generate(ids[:1, :4], seed=0),
            "log_probs": model.denoise(sub_ids, attention_mask=mask),
            "loss": model(ids, attention_mask=mask, generator=torch.Generator().manual_seed(0)).loss.reshape(1),
        }
    return SavedCheckpoint(root, model, expected)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


class OracleModel(MDMPrimeForMaskedDiffusion):
    """Returns the exact conditionals p(x_i | y_t) of a known distribution over short sequences."""

    def __init__(self, config: MDMPrimeConfig, sequences: torch.Tensor, probs: torch.Tensor):
        super().__init__(config)
        self.sequences, self.probs = sequences, probs

    def token_logits(self, sub_ids, attention_mask=None, noise_level=None, positions=None, check_inputs=True):
        return oracle_logits(self.codec, self.sequences, self.probs, sub_ids, positions)


def oracle_config(vocab: int, ell: int) -> MDMPrimeConfig:
    return MDMPrimeConfig(
        vocab_size=vocab,
        num_sub_tokens=ell,
        hidden_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=8,
    )


def random_distribution(vocab: int, length: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    sequences = torch.cartesian_prod(*[torch.arange(vocab)] * length).view(-1, length)
    probs = torch.rand(len(sequences), generator=gen).pow(3)  # skewed, fixed by the generator
    return sequences, (probs / probs.sum()).double()


@pytest.fixture(scope="session")
def fresh_python():
    """``run(python, code, argv, cwd)``: ``code`` run as ``python -I -c code *argv`` with the package not importable,
    in one worker per interpreter for the whole session (tests/fresh_interpreter.py says what stays fresh)."""
    from fresh_interpreter import FreshInterpreter

    workers: dict[str, FreshInterpreter] = {}

    def run(python: str | None, code: str, argv: list, cwd: Path):
        if python is None:
            pytest.fail("MDM_PRIME_REQUIRE_TF4=1 but no transformers 4.57 interpreter was found")
        if python not in workers:
            workers[python] = FreshInterpreter(python)
        return workers[python].run(code, argv, cwd)

    yield run
    for worker in workers.values():
        worker.close()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def http_process(command: list[str], ready_url: str, timeout: float = 120.0):
    """Run a server (``command``, one thread per process) until ``ready_url`` answers 200; stop it afterwards."""
    import subprocess
    import time

    import httpx

    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False")
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{command[1]} exited: {process.stdout.read()}")
            try:
                if httpx.get(ready_url, timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{command[1]} did not answer {ready_url} within {timeout:.0f} s")
            time.sleep(0.2)
        yield
    finally:
        process.terminate()
        process.wait(timeout=30)


def load_benchmark(name: str):
    """A script of ``benchmarks/`` as a module (its ``main`` and ``render_markdown``)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        return __import__(name)
    finally:
        sys.path.pop(0)
