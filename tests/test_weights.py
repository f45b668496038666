"""Properties of the CW-GRPO weights (paper Sec. 2.3) against a direct fp64 transcription."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cw_verl.weights import CovarianceInputError, covariance_weights
from tests.lockstep import run_lockstep
from tests.reference import reference_weights

SETTINGS = settings(max_examples=60, deadline=None)


def make_batch(seed, batch, length, mask_density=0.7, per_sequence_adv=True, scale=1.0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    log_prob = -torch.rand(batch, length, generator=gen, dtype=torch.float64).pow(3) * 8 * scale
    if per_sequence_adv:
        advantages = torch.randn(batch, 1, generator=gen, dtype=torch.float64).expand(batch, length).clone()
    else:
        advantages = torch.randn(batch, length, generator=gen, dtype=torch.float64)
    mask = torch.rand(batch, length, generator=gen) < mask_density
    return log_prob.to(dtype), advantages.to(dtype), mask


batches = st.builds(
    make_batch,
    seed=st.integers(0, 2**31 - 1),
    batch=st.integers(1, 6),
    length=st.integers(1, 40),
    mask_density=st.sampled_from([0.15, 0.6, 1.0]),
    per_sequence_adv=st.booleans(),
    scale=st.sampled_from([1e-3, 1.0, 4.0]),
)


def assert_identical(stats, other):
    """Every rank must hold bitwise the same statistics."""
    for name in ("keys", "num_tokens", "logp_mean", "adv_mean", "variance", "q_shift", "log_normaliser"):
        assert torch.equal(getattr(stats, name), getattr(other, name)), name


def assert_matches_reference(log_prob, advantages, mask, weights, cov, stats):
    ref_weights, ref_cov, ref_sigma = reference_weights(log_prob, advantages, mask)
    torch.testing.assert_close(weights, ref_weights, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(cov, ref_cov, rtol=1e-9, atol=1e-12)
    assert stats.sigma == pytest.approx(ref_sigma, rel=1e-9, abs=1e-14)
    assert stats.total_tokens == int(mask.sum())


@SETTINGS
@given(batches)
def test_matches_direct_transcription(batch):
    log_prob, advantages, mask = batch
    weights, cov, stats = covariance_weights(log_prob, advantages, mask)
    assert_matches_reference(log_prob, advantages, mask, weights, cov, stats)


@SETTINGS
@given(batches)
def test_normalised_to_mean_one_and_bounded_by_stats(batch):
    log_prob, advantages, mask = batch
    weights, _, stats = covariance_weights(log_prob, advantages, mask)
    valid = mask.bool()
    if valid.any():
        assert weights[valid].mean().item() == pytest.approx(1.0, abs=1e-12)
        assert weights[valid].min().item() == pytest.approx(stats.weight_min.min().item(), rel=1e-12)
        assert weights[valid].max().item() == pytest.approx(stats.weight_max.max().item(), rel=1e-12)
    assert torch.all(weights[~valid] == 1.0)
    assert torch.isfinite(weights).all()


@SETTINGS
@given(batches, st.integers(0, 2**31 - 1))
def test_permutation_invariance(batch, seed):
    log_prob, advantages, mask = batch
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(log_prob.numel(), generator=gen)

    def shuffle(t):
        return t.flatten()[perm].reshape(1, -1)

    weights, _, stats = covariance_weights(log_prob, advantages, mask)
    shuffled, _, shuffled_stats = covariance_weights(shuffle(log_prob), shuffle(advantages), shuffle(mask))
    torch.testing.assert_close(shuffled, shuffle(weights), rtol=1e-10, atol=1e-12)
    assert shuffled_stats.sigma == pytest.approx(stats.sigma, rel=1e-10, abs=1e-15)


@SETTINGS
@given(batches, st.lists(st.integers(0, 6), min_size=1, max_size=6), st.integers(0, 5))
def test_any_split_over_ranks_gives_the_single_rank_result(batch, cut_points, masked_out_rank):
    """Shards of any size (empty ones, all-masked ones) merge to exactly the unsplit statistics."""
    log_prob, advantages, mask = batch
    rows = log_prob.shape[0]
    cuts = sorted({min(c, rows) for c in cut_points})
    bounds = [0, *cuts, rows]
    shards = [(log_prob[a:b], advantages[a:b], mask[a:b].clone()) for a, b in zip(bounds, bounds[1:], strict=False)]
    if masked_out_rank < len(shards):
        shards[masked_out_rank][2].zero_()
    full_mask = torch.cat([s[2] for s in shards])
    expected, expected_cov, expected_stats = covariance_weights(log_prob, advantages, full_mask)

    results, errors = run_lockstep(lambda s, gather: covariance_weights(*s, gather=gather), shards)
    assert errors == [None] * len(shards)
    torch.testing.assert_close(torch.cat([r[0] for r in results]), expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.cat([r[1] for r in results]), expected_cov, rtol=1e-10, atol=1e-13)
    for _, _, stats in results:
        assert stats.total_tokens == expected_stats.total_tokens
        assert stats.sigma == pytest.approx(expected_stats.sigma, rel=1e-10, abs=1e-15)
        assert_identical(stats, results[0][2])


def test_bf16_log_probs_are_accumulated_in_float64():
    log_prob, advantages, mask = make_batch(3, 8, 64, per_sequence_adv=True)
    log_prob_bf16 = log_prob.to(torch.bfloat16)
    weights, cov, stats = covariance_weights(log_prob_bf16, advantages, mask)
    assert weights.dtype == torch.float64
    # Exact for the values bf16 holds: the only rounding is the input's own.
    assert_matches_reference(log_prob_bf16, advantages, mask, weights, cov, stats)


def test_statistics_survive_large_offsets_and_very_different_rank_means():
    """Central moments shifted between ranks stay accurate where raw power sums would cancel."""
    gen = torch.Generator().manual_seed(0)
    n = 4000
    log_prob = torch.randn(4, n, generator=gen, dtype=torch.float64) * 0.5
    log_prob[0] -= 25.0  # one rank of extremely unlikely tokens
    advantages = 1e4 + torch.randn(4, 1, generator=gen, dtype=torch.float64).expand(4, n)
    mask = torch.ones(4, n, dtype=torch.bool)
    ref_weights, _, ref_sigma = reference_weights(log_prob, advantages, mask)
    shards = [(log_prob[i : i + 1], advantages[i : i + 1], mask[i : i + 1]) for i in range(4)]
    results, errors = run_lockstep(lambda s, gather: covariance_weights(*s, gather=gather), shards)
    assert errors == [None] * 4
    torch.testing.assert_close(torch.cat([r[0] for r in results]), ref_weights, rtol=1e-9, atol=1e-11)
    assert results[0][2].sigma == pytest.approx(ref_sigma, rel=1e-10)


@pytest.mark.parametrize("value", [0.0, 0.5, 0.7071067811865476, -1.2345678901234567])
def test_equal_advantages_give_sigma_zero_and_unit_weights(value):
    """E.g. a group where every response got the same reward: A - mean(A) must be exactly 0."""
    log_prob, _, mask = make_batch(1, 3, 7, mask_density=1.0)
    advantages = torch.full_like(log_prob, value)
    weights, cov, stats = covariance_weights(log_prob, advantages, mask)
    assert stats.sigma == 0.0
    assert torch.all(cov == 0) and torch.all(weights == 1.0)


def test_equal_advantages_split_over_ranks_still_give_unit_weights():
    log_prob, _, mask = make_batch(2, 6, 11, mask_density=1.0)
    advantages = torch.full_like(log_prob, 0.1)
    shards = [(log_prob[i : i + 2], advantages[i : i + 2], mask[i : i + 2]) for i in range(0, 6, 2)]
    results, errors = run_lockstep(lambda s, gather: covariance_weights(*s, gather=gather), shards)
    assert errors == [None] * 3
    assert all(r[2].sigma == 0.0 and torch.all(r[0] == 1.0) for r in results)


def test_equal_log_probs_give_unit_weights():
    _, advantages, mask = make_batch(4, 5, 9, mask_density=1.0)
    log_prob = torch.full(advantages.shape, -0.1)
    weights, _, stats = covariance_weights(log_prob, advantages, mask)
    assert stats.sigma == 0.0 and torch.all(weights == 1.0)


def test_constant_nonzero_covariance_gives_unit_weights():
    """Two tokens with c = +1 each: sigma = 0 but c != 0; all weights are equal, hence 1."""
    log_prob = torch.tensor([[-1.0, -3.0]])
    advantages = torch.tensor([[1.0, -1.0]])
    weights, cov, stats = covariance_weights(log_prob, advantages, torch.ones(1, 2))
    assert torch.all(cov == 1.0)
    assert stats.sigma == 0.0 and torch.all(weights == 1.0)


def test_no_valid_tokens_gives_unit_weights_and_zero_statistics():
    log_prob, advantages, _ = make_batch(5, 3, 4)
    weights, cov, stats = covariance_weights(log_prob, advantages, torch.zeros(3, 4, dtype=torch.bool))
    assert torch.all(weights == 1.0) and torch.all(cov == 0.0)
    assert (stats.total_tokens, stats.sigma, stats.scope_cov_mean, stats.collective_rounds) == (0, 0.0, 0.0, 1)


def test_empty_tensors_are_a_scope_without_tokens():
    weights, _, stats = covariance_weights(torch.zeros(0, 8), torch.zeros(0, 8), torch.zeros(0, 8))
    assert weights.shape == (0, 8) and stats.total_tokens == 0


def test_extreme_tokens_are_suppressed_without_nan():
    log_prob, advantages, mask = make_batch(6, 4, 200, mask_density=1.0)
    log_prob[0, 0] = -80.0  # an extremely unlikely token in a high-advantage sequence
    advantages[0] = 3.0
    weights, _, _ = covariance_weights(log_prob, advantages, mask)
    assert torch.isfinite(weights).all()
    assert weights[0, 0].item() < 1e-6
    assert weights.mean().item() == pytest.approx(1.0, abs=1e-12)


def test_kernel_that_underflows_everywhere_is_normalised_in_log_space():
    """c nearly constant and far from 0 (sigma << |c|): every exp(-c^2/2sigma^2) underflows to 0."""
    eps = torch.tensor([1e-3, -1e-3, 2e-3, -2e-3], dtype=torch.float64)
    root = torch.sqrt(1 + eps)
    log_prob = torch.stack([root, -root]).reshape(1, -1)  # sum x = 0
    advantages = torch.stack([root, -root]).reshape(1, -1)  # c_i = 1 + eps_i for every token
    mask = torch.ones_like(log_prob, dtype=torch.bool)
    weights, cov, stats = covariance_weights(log_prob, advantages, mask)
    q = cov**2 / (2 * stats.sigma**2)
    assert torch.exp(-q).max().item() == 0.0  # the naive formula would return 0/0 here
    expected = torch.softmax(-q.flatten(), dim=0).reshape(q.shape) * q.numel()
    torch.testing.assert_close(weights, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("field", ["log_prob", "advantages"])
def test_non_finite_valid_input_raises(bad, field):
    log_prob, advantages, mask = make_batch(7, 2, 5, mask_density=1.0)
    {"log_prob": log_prob, "advantages": advantages}[field][1, 2] = bad
    with pytest.raises(CovarianceInputError, match="1 valid token.*non-finite"):
        covariance_weights(log_prob, advantages, mask)


def test_non_finite_values_at_masked_positions_are_ignored():
    log_prob, advantages, mask = make_batch(8, 3, 6, mask_density=1.0)
    mask[:, -1] = False
    log_prob[:, -1] = -math.inf
    advantages[0, -1] = math.nan
    weights, _, _ = covariance_weights(log_prob, advantages, mask)
    expected, _, _ = reference_weights(log_prob, advantages, mask)
    torch.testing.assert_close(weights, expected, rtol=1e-9, atol=1e-12)


def test_shape_mismatch_raises():
    with pytest.raises(CovarianceInputError, match=r"same \[batch, length\] shape"):
        covariance_weights(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3))


def test_integer_inputs_raise():
    with pytest.raises(CovarianceInputError, match="floating point"):
        covariance_weights(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3), torch.ones(2, 3))


def test_bad_input_on_one_rank_raises_on_every_rank_instead_of_hanging():
    good = make_batch(9, 2, 5, mask_density=1.0)
    nan_shard = make_batch(10, 2, 5, mask_density=1.0)
    nan_shard[0][0, 0] = math.nan
    malformed = (torch.zeros(2, 5), torch.zeros(2, 6), torch.ones(2, 5))
    results, errors = run_lockstep(lambda s, gather: covariance_weights(*s, gather=gather), [good, nan_shard, good])
    assert all(isinstance(e, CovarianceInputError) and "non-finite" in str(e) for e in errors)
    results, errors = run_lockstep(lambda s, gather: covariance_weights(*s, gather=gather), [good, malformed])
    assert "same [batch, length] shape" in str(errors[1])
    assert isinstance(errors[0], CovarianceInputError) and "unusable input" in str(errors[0])


@SETTINGS
@given(batches, st.integers(1, 4), st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_segments_shuffled_over_ranks_match_each_segment_alone(batch, rows_per_segment, world, seed):
    """The paper's group scope: rows with the same key share statistics wherever they sit."""
    log_prob, advantages, mask = batch
    rows = log_prob.shape[0]
    keys = torch.arange(rows) // rows_per_segment * 7919 - 3  # arbitrary, non-contiguous int64 keys
    expected = torch.ones_like(log_prob, dtype=torch.float64)
    for key in keys.unique():
        members = keys == key
        expected[members] = reference_weights(log_prob[members], advantages[members], mask[members])[0]
    perm = torch.randperm(rows, generator=torch.Generator().manual_seed(seed))
    shards = [perm[r::world] for r in range(world)]
    max_segments = len(keys.unique())

    def rank(rows_of_rank, gather):
        return covariance_weights(
            log_prob[rows_of_rank],
            advantages[rows_of_rank],
            mask[rows_of_rank],
            gather,
            keys[rows_of_rank],
            max_segments,
        )

    results, errors = run_lockstep(rank, shards)
    assert errors == [None] * world
    for rows_of_rank, (weights, _, stats) in zip(shards, results, strict=True):
        torch.testing.assert_close(weights, expected[rows_of_rank], rtol=1e-9, atol=1e-11)
        assert torch.equal(stats.keys, keys.unique())
        assert stats.rows.tolist() == [float((keys == k).sum()) for k in keys.unique()]


def test_more_segments_than_announced_raise_on_every_rank():
    log_prob, advantages, mask = make_batch(11, 4, 5, mask_density=1.0)
    shards = [(log_prob[:2], advantages[:2], mask[:2]), (log_prob[2:], advantages[2:], mask[2:])]
    keys = [torch.tensor([0, 1]), torch.tensor([2, 2])]

    def rank(shard, gather):
        index = 0 if shard[0].data_ptr() == log_prob.data_ptr() else 1
        return covariance_weights(*shard, gather, keys[index], max_segments=1)

    _, errors = run_lockstep(rank, shards)
    assert all(isinstance(e, CovarianceInputError) and "more than 1 segments" in str(e) for e in errors)
