import os

# An accidental Hub id must fail at once instead of retrying for a minute.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from modeling_mdm_prime import MDMPrimeConfig, MDMPrimeForMaskedDiffusion  # noqa: E402


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
