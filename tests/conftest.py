import os

# An accidental Hub id must fail at once instead of retrying for a minute.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from modeling_mdm_prime import MDMPrimeConfig, MDMPrimeForMaskedDiffusion  # noqa: E402

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


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


class OracleModel(MDMPrimeForMaskedDiffusion):
    """Returns the exact conditionals p(x_i | y_t) of a known distribution over short sequences."""

    def __init__(self, config: MDMPrimeConfig, sequences: torch.Tensor, probs: torch.Tensor):
        super().__init__(config)
        self.sequences, self.probs = sequences, probs

    def token_logits(self, sub_ids, attention_mask=None, noise_level=None, positions=None, check_inputs=True):
        allowed = self.codec.consistency_mask(sub_ids).double()  # (B, L, C)
        batch, length, vocab = allowed.shape
        weight = self.probs.expand(batch, -1).clone()  # (B, S)
        for i in range(length):
            weight *= allowed[:, i].index_select(1, self.sequences[:, i])
        marginals = torch.zeros(batch, length, vocab, dtype=torch.float64)
        for i in range(length):
            marginals[:, i].index_add_(1, self.sequences[:, i], weight)
        logits = marginals.log().float()
        return logits if positions is None else logits[positions]


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
