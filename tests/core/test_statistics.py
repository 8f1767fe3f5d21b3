"""InputNormStatistics vs a float64 loop reference: per-sequence squared norms, padding excluded, float32 sums."""

from __future__ import annotations

import pytest
import torch

from wanda_lightning.core.statistics import GramStatistics, InputNormStatistics, MomentStatistics, flatten_tokens

pytestmark = pytest.mark.usefixtures("single_thread")


def reference_stats(batches):
    """Float64 loops: mean over sequences of sum over that sequence's unmasked tokens of x_j**2; counts."""
    in_features = batches[0][0].shape[-1]
    total = [0.0] * in_features
    num_sequences = 0
    num_tokens = 0
    for inputs, mask in batches:
        values = inputs.double().tolist()
        for b, sequence in enumerate(values):
            num_sequences += 1
            for t, token in enumerate(sequence):
                if mask is not None and not bool(mask[b, t]):
                    continue
                num_tokens += 1
                for j, x in enumerate(token):
                    total[j] += x * x
    return torch.tensor([v / num_sequences for v in total], dtype=torch.float64), num_sequences, num_tokens


def reference_scaler_row(batches):
    """The Wanda reference code's running mean (lib/layerwrapper.py), one sequence per add_batch, in float64."""
    in_features = batches[0][0].shape[-1]
    scaler_row = torch.zeros(in_features, dtype=torch.float64)
    nsamples = 0
    for inputs, mask in batches:
        for b in range(inputs.shape[0]):
            tokens = inputs[b].double()
            if mask is not None:
                tokens = tokens[mask[b].bool()]
            scaler_row *= nsamples / (nsamples + 1)
            nsamples += 1
            scaler_row += torch.norm(tokens, p=2, dim=0) ** 2 / nsamples
    return scaler_row


def run(batches, in_features):
    stats = InputNormStatistics(in_features, torch.device("cpu"))
    for inputs, mask in batches:
        stats.update(inputs, mask, num_sequences=inputs.shape[0])
    return stats


def random_batches(seed, dtype=torch.float32, masked=False, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for batch, length in [(3, 7), (1, 7), (2, 4)]:
        inputs = (torch.randn(batch, length, 6, generator=generator) * scale).to(dtype)
        mask = None
        if masked:
            mask = torch.rand(batch, length, generator=generator) > 0.4
            mask[:, 0] = True
            inputs[~mask] = 1e4  # padding must not count, whatever it holds
        batches.append((inputs, mask))
    return batches


@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "mask"])
@pytest.mark.parametrize("seed", range(3))
def test_matches_float64_reference(seed, masked):
    batches = random_batches(seed, masked=masked)
    stats = run(batches, 6)
    expected, num_sequences, num_tokens = reference_stats(batches)
    assert stats.num_sequences == num_sequences == 6
    assert stats.num_tokens == num_tokens
    if not masked:
        assert num_tokens == 3 * 7 + 7 + 2 * 4
    assert stats.mean_sq_norm.dtype == torch.float32
    torch.testing.assert_close(stats.mean_sq_norm.double(), expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(reference_scaler_row(batches), expected, rtol=1e-12, atol=0)
    assert stats.state_tensors()[0] is stats.sum_sq and stats.state_tensors()[1] is stats.counts


def test_padding_excluded_equals_trimmed_sequences():
    generator = torch.Generator().manual_seed(5)
    lengths = [5, 2, 7]
    padded = torch.full((3, 7, 4), 123.0)
    mask = torch.zeros(3, 7, dtype=torch.bool)
    trimmed = []
    for b, length in enumerate(lengths):
        sequence = torch.randn(length, 4, generator=generator)
        padded[b, :length] = sequence
        mask[b, :length] = True
        trimmed.append(sequence.unsqueeze(0))
    with_padding = InputNormStatistics(4, torch.device("cpu"))
    with_padding.update(padded, mask.long(), num_sequences=3)  # an integer attention mask works as well
    without = InputNormStatistics(4, torch.device("cpu"))
    for sequence in trimmed:
        without.update(sequence, None, num_sequences=1)
    assert with_padding.num_tokens == without.num_tokens == sum(lengths)
    assert with_padding.num_sequences == without.num_sequences == 3
    torch.testing.assert_close(with_padding.mean_sq_norm, without.mean_sq_norm, rtol=1e-6, atol=0)
    # and the padding value really would have mattered
    unmasked = InputNormStatistics(4, torch.device("cpu"))
    unmasked.update(padded, None, num_sequences=3)
    assert (unmasked.mean_sq_norm > 1000 * with_padding.mean_sq_norm).all()


def test_bf16_inputs_accumulate_in_float32():
    # 1 + 2**-7 is exact in bfloat16; its square 1.01568603515625 is not (bf16 would round it to 1.015625), and a
    # bf16 running sum of ~1 stops growing at 256. Float32 squares and sums are exact here.
    x = torch.full((2, 300, 3), 1.0 + 2**-7, dtype=torch.bfloat16)
    stats = InputNormStatistics(3, torch.device("cpu"))
    stats.update(x, None, num_sequences=2)
    stats.update(x[:1], None, num_sequences=1)
    assert stats.sum_sq.dtype == torch.float32 and stats.mean_sq_norm.dtype == torch.float32
    exact = 900 * (1.0 + 2**-7) ** 2 / 3  # 900 tokens over 3 sequences
    assert stats.mean_sq_norm.tolist() == [exact] * 3
    assert stats.num_tokens == 900 and stats.num_sequences == 3


def test_bf16_random_inputs_match_float64_of_the_same_values():
    batches = random_batches(7, dtype=torch.bfloat16, scale=30.0)
    stats = run(batches, 6)
    expected, _, _ = reference_stats(batches)  # float64 of the bf16 values
    torch.testing.assert_close(stats.mean_sq_norm.double(), expected, rtol=1e-6, atol=0)


def test_two_dimensional_inputs_and_zero_batches():
    stats = InputNormStatistics(2, torch.device("cpu"))
    assert stats.num_tokens == 0 and stats.num_sequences == 0
    assert stats.mean_sq_norm.tolist() == [0.0, 0.0]  # no division by zero before any update
    stats.update(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), None, num_sequences=1)
    assert stats.mean_sq_norm.tolist() == [10.0, 20.0] and stats.num_tokens == 2


def test_flatten_tokens_drops_a_mask_that_cannot_be_aligned():
    tokens, mask = flatten_tokens(torch.ones(2, 3, 4), torch.ones(2, 5, dtype=torch.bool), 4)
    assert tokens.shape == (6, 4) and mask is None
    tokens, mask = flatten_tokens(torch.ones(2, 3, 4), torch.tensor([[1, 0, 1], [0, 0, 1]]), 4)
    assert mask is not None and mask.dtype == torch.bool and mask.tolist() == [True, False, True, False, False, True]


@pytest.mark.parametrize("kind", ["moment", "gram"])
def test_moment_and_gram_statistics_match_float64_reference(kind):
    batches = random_batches(3, masked=True)
    cls = MomentStatistics if kind == "moment" else GramStatistics
    stats = cls(6, torch.device("cpu"))
    for inputs, mask in batches:
        stats.update(inputs, mask, num_sequences=inputs.shape[0])
    tokens = torch.cat([x.double().reshape(-1, 6)[m.reshape(-1)] for x, m in batches])  # only unmasked tokens
    torch.testing.assert_close(stats.mean.double(), tokens.mean(dim=0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.variance.double(), tokens.var(dim=0, unbiased=False), rtol=1e-4, atol=1e-6)
    assert stats.num_tokens == tokens.shape[0]
    if kind == "gram":
        assert isinstance(stats, GramStatistics)
        torch.testing.assert_close(stats.gram.double(), tokens.t() @ tokens, rtol=1e-5, atol=1e-4)
    assert len(stats.state_tensors()) == (3 if kind == "moment" else 4)
