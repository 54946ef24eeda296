import itertools

import pytest
import torch

from modeling_mdm_prime import SubTokenCodec, integer_base

GPT2_VOCAB = 50257


@pytest.mark.parametrize(
    ("vocab", "ell", "base"),
    [
        (GPT2_VOCAB, 1, GPT2_VOCAB),
        (GPT2_VOCAB, 2, 225),
        (GPT2_VOCAB, 3, 37),
        (GPT2_VOCAB, 4, 15),
        (GPT2_VOCAB, 6, 7),
        (GPT2_VOCAB, 8, 4),
        (256, 2, 16),
        (256, 4, 4),
        (256, 8, 2),
    ],
)
def test_bases_match_method_md(vocab, ell, base):
    assert integer_base(vocab, ell) == base
    codec = SubTokenCodec(vocab, ell)
    assert codec.base == base and codec.mask_id == base


@pytest.mark.parametrize("ell", [2, 3, 4, 5, 6])
def test_integer_base_exact_on_perfect_powers(ell):
    # Float roots of perfect powers (e.g. 125 ** (1/3) = 4.999...) are where ceil(C ** (1/ℓ)) goes wrong.
    for b in range(2, 40):
        assert integer_base(b**ell, ell) == b
        assert integer_base(b**ell + 1, ell) == b + 1


@pytest.mark.parametrize("ell", [1, 2, 3, 4, 6, 8])
def test_gpt2_bijection_on_every_id(ell):
    codec = SubTokenCodec(GPT2_VOCAB, ell)
    ids = torch.arange(GPT2_VOCAB)
    digits = codec.encode(ids)
    assert digits.shape == (GPT2_VOCAB, ell)
    assert int(digits.min()) >= 0 and int(digits.max()) < codec.base
    assert torch.equal(codec.decode(digits), ids)
    # Most significant digit first: lexicographic order of digit tuples is numeric order of ids.
    assert torch.equal(digits, codec.digit_table())
    if ell > 1:
        assert torch.equal(digits[:, 0], ids // codec.base ** (ell - 1))
    assert torch.equal(digits[:, -1], ids % codec.base)


@pytest.mark.parametrize("ell", [1, 2, 4, 8])
def test_pixel_bijection(ell):
    codec = SubTokenCodec(256, ell)
    ids = torch.arange(256)
    assert torch.equal(codec.decode(codec.encode(ids)), ids)


@pytest.mark.parametrize(("vocab", "ell"), [(6, 3), (10, 2), (27, 3), (23, 3), (50, 2), (80, 4)])
def test_filter_matches_brute_force(vocab, ell):
    codec = SubTokenCodec(vocab, ell)
    b = codec.base
    states = list(itertools.product(range(b + 1), repeat=ell))  # every digit or mask, invalid codes included
    sub_ids = torch.tensor(states)
    mask = codec.consistency_mask(sub_ids)
    for row, state in zip(mask.tolist(), states):
        expected = [
            all(s == b or s == (x // b ** (ell - 1 - j)) % b for j, s in enumerate(state)) for x in range(vocab)
        ]
        assert row == expected
    # The true token is always consistent with any partial masking of itself.
    for x in range(vocab):
        digits = codec.encode(torch.tensor(x))
        for flags in itertools.product([False, True], repeat=ell):
            partial = digits.masked_fill(torch.tensor(flags), b)
            assert codec.consistency_mask(partial)[x]


def test_invalid_inputs_raise():
    codec = SubTokenCodec(GPT2_VOCAB, 2)
    with pytest.raises(ValueError, match="outside"):
        codec.encode(torch.tensor([GPT2_VOCAB]))
    with pytest.raises(ValueError, match="outside"):
        codec.encode(torch.tensor([-1]))
    with pytest.raises(ValueError, match="shape"):
        codec.decode(torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="masked"):
        codec.decode(torch.tensor([[codec.mask_id, 0]]))
    with pytest.raises(ValueError, match="invalid codes"):
        codec.decode(torch.tensor([[224, 224]]))  # 224 * 225 + 224 >= 50257
    with pytest.raises(ValueError, match="digits"):
        codec.consistency_mask(torch.tensor([[226, 0]]))
    with pytest.raises(ValueError, match="integer"):
        codec.encode(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="most significant digit is always 0"):
        SubTokenCodec(9, 3)  # base 3, and 3 ** 2 >= 9
