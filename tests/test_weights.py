"""Properties of the CW-GRPO weights (paper Sec. 2.3) against a direct fp64 transcription."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cw_verl.weights import (
    CovarianceInputError,
    covariance_weights,
    kernel_limit,
    scope_statistics,
    token_weights,
)
from tests.lockstep import run_lockstep
from tests.reference import reference_weights

SETTINGS = settings(max_examples=60, deadline=None)


def make_batch(seed, batch, length, mask_density=0.7, per_sequence_adv=True, scale=1.0, dtype=torch.float64):
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
    for name in (
        "keys",
        "num_tokens",
        "logp_mean",
        "adv_mean",
        "variance",
        "norm",
        "abs_c_min",
        "abs_c_max",
        "inv_two_var",
    ):
        assert torch.equal(getattr(stats, name), getattr(other, name)), name


def sigma(stats):
    return stats.sigma


def total_tokens(stats):
    return stats.total_tokens


def assert_matches_reference(log_prob, advantages, mask, weights, cov, stats, rtol=1e-9, atol=1e-11):
    ref_weights, ref_cov, ref_sigma = reference_weights(log_prob, advantages, mask)
    torch.testing.assert_close(weights.double(), ref_weights, rtol=rtol, atol=atol)
    torch.testing.assert_close(cov.double(), ref_cov, rtol=rtol, atol=atol * 10)
    assert sigma(stats) == pytest.approx(ref_sigma, rel=rtol, abs=1e-14)
    assert total_tokens(stats) == int(mask.sum())


@SETTINGS
@given(batches)
def test_matches_direct_transcription(batch):
    log_prob, advantages, mask = batch
    weights, cov, stats = covariance_weights(log_prob, advantages, mask)
    assert weights.dtype == torch.float64  # float64 inputs are computed in float64
    assert_matches_reference(log_prob, advantages, mask, weights, cov, stats)


@SETTINGS
@given(batches)
def test_float32_inputs_match_to_float32_precision(batch):
    log_prob, advantages, mask = (t.float() if t.is_floating_point() else t for t in batch)
    weights, cov, stats = covariance_weights(log_prob, advantages, mask)
    assert weights.dtype == torch.float32
    ref_weights, _, ref_sigma = reference_weights(log_prob, advantages, mask)
    # A weight is exp(-q) with q = c^2 / 2 sigma^2: float32 relative error ~1e-7 in q.
    torch.testing.assert_close(weights.double(), ref_weights, rtol=1e-4, atol=1e-5)
    assert sigma(stats) == pytest.approx(ref_sigma, rel=1e-4, abs=1e-5)


@SETTINGS
@given(batches)
def test_normalised_to_mean_one_and_bounded_by_stats(batch):
    log_prob, advantages, mask = batch
    weights, _, stats = covariance_weights(log_prob, advantages, mask)
    valid = mask.bool()
    if valid.any():
        assert weights[valid].mean().item() == pytest.approx(1.0, abs=1e-12)
        summary = stats.summary()
        assert weights[valid].min().item() == pytest.approx(summary[4].item(), rel=1e-12)
        assert weights[valid].max().item() == pytest.approx(summary[5].item(), rel=1e-12)
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
    assert sigma(shuffled_stats) == pytest.approx(sigma(stats), rel=1e-10, abs=1e-15)


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
        assert total_tokens(stats) == total_tokens(expected_stats)
        assert sigma(stats) == pytest.approx(sigma(expected_stats), rel=1e-10, abs=1e-15)
        assert_identical(stats, results[0][2])


def test_float32_token_values_do_not_depend_on_the_split():
    """Each c is a pointwise function of the global means: bitwise the same on any rank layout."""
    log_prob, advantages, mask = make_batch(12, 8, 300, dtype=torch.float32, per_sequence_adv=False)
    whole, whole_cov, _ = covariance_weights(log_prob, advantages, mask)
    shards = [(log_prob[i : i + 3], advantages[i : i + 3], mask[i : i + 3]) for i in range(0, 8, 3)]
    results, errors = run_lockstep(lambda s, gather: covariance_weights(*s, gather=gather), shards)
    assert errors == [None] * 3
    assert torch.equal(torch.cat([r[1] for r in results]), whole_cov)
    torch.testing.assert_close(torch.cat([r[0] for r in results]), whole, rtol=1e-6, atol=1e-7)


def test_bf16_log_probs_are_computed_in_float32():
    log_prob, advantages, mask = make_batch(3, 8, 64, per_sequence_adv=True)
    log_prob_bf16 = log_prob.to(torch.bfloat16)
    weights, cov, stats = covariance_weights(log_prob_bf16, advantages.float(), mask)
    assert weights.dtype == torch.float32
    # The only rounding beyond float32's is the input's own.
    ref_weights, _, ref_sigma = reference_weights(log_prob_bf16, advantages.float(), mask)
    torch.testing.assert_close(weights.double(), ref_weights, rtol=1e-4, atol=1e-5)
    assert sigma(stats) == pytest.approx(ref_sigma, rel=1e-5)


def test_statistics_survive_large_offsets_and_very_different_rank_means():
    """Large common offsets and ranks whose means differ wildly: no raw power sum cancels."""
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
    assert sigma(results[0][2]) == pytest.approx(ref_sigma, rel=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("value", [0.0, 0.5, 0.7071067811865476, -1.2345678901234567])
def test_equal_advantages_give_sigma_zero_and_unit_weights(value, dtype):
    """E.g. a group where every response got the same reward: c is 0 up to rounding, and the weights exactly 1."""
    log_prob, _, mask = make_batch(1, 3, 7, mask_density=1.0, dtype=dtype)
    advantages = torch.full_like(log_prob, value)
    weights, cov, stats = covariance_weights(log_prob, advantages, mask)
    assert sigma(stats) == 0.0 and torch.all(weights == 1.0)
    assert cov.abs().max().item() <= (1e-5 if dtype == torch.float32 else 1e-14)


def test_equal_advantages_split_over_ranks_still_give_unit_weights():
    log_prob, _, mask = make_batch(2, 6, 11, mask_density=1.0)
    advantages = torch.full_like(log_prob, 0.1)
    shards = [(log_prob[i : i + 2], advantages[i : i + 2], mask[i : i + 2]) for i in range(0, 6, 2)]
    results, errors = run_lockstep(lambda s, gather: covariance_weights(*s, gather=gather), shards)
    assert errors == [None] * 3
    assert all(sigma(r[2]) == 0.0 and torch.all(r[0] == 1.0) for r in results)


def test_equal_log_probs_give_unit_weights():
    _, advantages, mask = make_batch(4, 5, 9, mask_density=1.0)
    log_prob = torch.full(advantages.shape, -0.1, dtype=torch.float64)
    weights, _, stats = covariance_weights(log_prob, advantages, mask)
    assert sigma(stats) == 0.0 and torch.all(weights == 1.0)


def test_constant_nonzero_covariance_gives_unit_weights():
    """Two tokens with c = +1 each: sigma = 0 but c != 0; all weights are equal, hence 1."""
    log_prob = torch.tensor([[-1.0, -3.0]])
    advantages = torch.tensor([[1.0, -1.0]])
    weights, cov, stats = covariance_weights(log_prob, advantages, torch.ones(1, 2))
    assert torch.all(cov == 1.0)
    assert sigma(stats) == 0.0 and torch.all(weights == 1.0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layout", ["one row", "two rows", "two ranks"])
def test_every_two_token_scope_has_unit_weights(dtype, layout):
    """Two tokens always have c_1 = c_2 = (l_1 - l_2)(a_1 - a_2) / 4 exactly, so sigma = 0 and w~ = 1, however
    the computed c round (the defect: 413 of 2000 random float64 pairs got arbitrary weights)."""
    gen = torch.Generator().manual_seed(7)
    log_prob = (-torch.rand(2000, 2, generator=gen, dtype=torch.float64) * 8).to(dtype)
    advantages = torch.randn(2000, 2, generator=gen, dtype=torch.float64).to(dtype)
    wrong = 0
    for lp, adv in zip(log_prob, advantages, strict=True):
        if layout == "one row":
            weights, _, _ = covariance_weights(lp[None], adv[None], torch.ones(1, 2))
        elif layout == "two rows":
            weights, _, _ = covariance_weights(lp[:, None], adv[:, None], torch.ones(2, 1))
        else:
            shards = [(lp[i : i + 1, None], adv[i : i + 1, None], torch.ones(1, 1)) for i in range(2)]
            results, errors = run_lockstep(lambda s, gather: covariance_weights(*s, gather=gather), shards)
            assert errors == [None, None]
            weights = torch.cat([r[0] for r in results])
        wrong += not bool(torch.all(weights == 1.0))
    assert wrong == 0


@pytest.mark.parametrize("world", [1, 3])
def test_tiny_sigma_next_to_a_large_mean_is_resolved(world):
    """c = 1 + 1e-9 * z: sigma is 1e-9 |mean(c)|, far above float64 rounding. E[c^2] - E[c]^2 would leave
    rounding noise of the size of sigma^2 itself; the centred sums recover it."""
    z = torch.tensor([0.3, -1.1, 0.8, 0.0, -0.4, 1.7, -0.9, 0.5, -0.6], dtype=torch.float64)
    root = torch.sqrt(1 + 1e-9 * z)
    log_prob = torch.cat([root, -root]).reshape(3, 6)  # columns pair +r with -r: sum of x is 0
    advantages = torch.cat([root, -root]).reshape(3, 6)
    mask = torch.ones(3, 6)
    expected, _, ref_sigma = reference_weights(log_prob, advantages, mask)
    assert ref_sigma == pytest.approx(1e-9 * z.repeat(2).std(unbiased=False).item(), rel=1e-6)
    shards = [(log_prob[i::world], advantages[i::world], mask[i::world]) for i in range(world)]
    results, errors = run_lockstep(lambda s, gather: covariance_weights(*s, gather=gather), shards)
    assert errors == [None] * world
    for i, (weights, _, stats) in enumerate(results):
        torch.testing.assert_close(weights, expected[i::world], rtol=1e-5, atol=1e-7)
        assert sigma(stats) == pytest.approx(ref_sigma, rel=1e-6)


def test_no_valid_tokens_gives_unit_weights_and_zero_statistics():
    log_prob, advantages, _ = make_batch(5, 3, 4)
    weights, cov, stats = covariance_weights(log_prob, advantages, torch.zeros(3, 4, dtype=torch.bool))
    assert torch.all(weights == 1.0) and torch.all(cov == 0.0)
    assert stats.summary()[:4].tolist() == [0.0, 0.0, 0.0, 0.0]


def test_empty_tensors_are_a_scope_without_tokens():
    weights, _, stats = covariance_weights(torch.zeros(0, 8), torch.zeros(0, 8), torch.zeros(0, 8))
    assert weights.shape == (0, 8) and total_tokens(stats) == 0


def test_extreme_tokens_are_suppressed_without_nan():
    log_prob, advantages, mask = make_batch(6, 4, 200, mask_density=1.0)
    log_prob[0, 0] = -80.0  # an extremely unlikely token in a high-advantage sequence
    advantages[0] = 3.0
    weights, _, _ = covariance_weights(log_prob, advantages, mask)
    assert torch.isfinite(weights).all()
    assert weights[0, 0].item() < 1e-6
    assert weights.mean().item() == pytest.approx(1.0, abs=1e-12)


def test_kernel_that_underflows_everywhere_is_normalised_about_the_smallest_c():
    """c nearly constant and far from 0 (sigma << |c|): every exp(-c^2/2sigma^2) underflows to 0."""
    eps = torch.tensor([1e-3, -1e-3, 2e-3, -2e-3], dtype=torch.float64)
    root = torch.sqrt(1 + eps)
    log_prob = torch.stack([root, -root]).reshape(1, -1)  # sum x = 0
    advantages = torch.stack([root, -root]).reshape(1, -1)  # c_i = 1 + eps_i for every token
    mask = torch.ones_like(log_prob, dtype=torch.bool)
    weights, cov, stats = covariance_weights(log_prob, advantages, mask)
    q = cov**2 / (2 * sigma(stats) ** 2)
    assert torch.exp(-q).max().item() == 0.0  # the naive formula would return 0/0 here
    expected = torch.softmax(-q.flatten(), dim=0).reshape(q.shape) * q.numel()
    torch.testing.assert_close(weights, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_log_prob_is_left_out_with_weight_zero_and_counted(bad):
    log_prob, advantages, mask = make_batch(7, 3, 5, mask_density=1.0, per_sequence_adv=False)
    log_prob[1, 2] = bad
    weights, cov, stats = covariance_weights(log_prob, advantages, mask)
    assert weights[1, 2].item() == 0.0 and cov[1, 2].item() == 0.0
    assert stats.summary()[:2].tolist() == [14.0, 1.0]  # 14 tokens in the statistics, 1 left out
    rest = mask.clone()
    rest[1, 2] = False
    expected, _, ref_sigma = reference_weights(log_prob, advantages, rest)
    torch.testing.assert_close(weights[rest], expected[rest], rtol=1e-9, atol=1e-11)
    assert sigma(stats) == pytest.approx(ref_sigma, rel=1e-9)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_advantage_at_a_valid_token_raises(bad):
    log_prob, advantages, mask = make_batch(7, 2, 5, mask_density=1.0)
    advantages[1, 2] = bad
    with pytest.raises(
        CovarianceInputError, match=r"non-finite advantages at valid tokens .*rank 0: 1; here at .*\(1, 2\)"
    ):
        covariance_weights(log_prob, advantages, mask)


def test_non_finite_values_at_masked_positions_are_ignored():
    log_prob, advantages, mask = make_batch(8, 3, 6, mask_density=1.0)
    mask[:, -1] = False
    log_prob[:, -1] = -math.inf
    advantages[0, -1] = math.nan
    weights, _, stats = covariance_weights(log_prob, advantages, mask)
    expected, _, _ = reference_weights(log_prob, advantages, mask)
    torch.testing.assert_close(weights, expected, rtol=1e-9, atol=1e-12)
    assert stats.summary()[1].item() == 0.0


def test_shape_mismatch_raises():
    with pytest.raises(CovarianceInputError, match=r"same \[batch, length\] shape"):
        covariance_weights(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3))


def test_integer_inputs_raise():
    with pytest.raises(CovarianceInputError, match="floating point"):
        covariance_weights(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3), torch.ones(2, 3))


def test_bad_input_on_one_rank_raises_on_every_rank_instead_of_hanging():
    good = make_batch(9, 2, 5, mask_density=1.0)
    nan_shard = make_batch(10, 2, 5, mask_density=1.0)
    nan_shard[1][0, 0] = math.nan
    malformed = (torch.zeros(2, 5), torch.zeros(2, 6), torch.ones(2, 5))
    _, errors = run_lockstep(lambda s, gather: covariance_weights(*s, gather=gather), [good, nan_shard, good])
    assert all(isinstance(e, CovarianceInputError) and "rank 1: 1" in str(e) for e in errors)
    _, errors = run_lockstep(lambda s, gather: covariance_weights(*s, gather=gather), [good, malformed])
    assert "same [batch, length] shape" in str(errors[1])
    assert isinstance(errors[0], CovarianceInputError) and "rank(s) [1]" in str(errors[0])


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
        present = stats.rows > 0
        assert torch.equal(stats.keys[present], keys.unique())
        assert stats.rows[present].tolist() == [float((keys == k).sum()) for k in keys.unique()]


def test_more_segments_than_announced_raise_on_every_rank():
    log_prob, advantages, mask = make_batch(11, 4, 5, mask_density=1.0)
    shards = [(log_prob[:2], advantages[:2], mask[:2]), (log_prob[2:], advantages[2:], mask[2:])]
    keys = [torch.tensor([0, 1]), torch.tensor([2, 2])]

    def rank(shard, gather):
        index = 0 if shard[0].data_ptr() == log_prob.data_ptr() else 1
        return covariance_weights(*shard, gather, keys[index], max_segments=1)

    _, errors = run_lockstep(rank, shards)
    assert "2 segments on one rank, more than the 1 announced" in str(errors[0])
    assert isinstance(errors[1], CovarianceInputError) and "rank(s) [0]" in str(errors[1])


# Operations whose result a GPU must send back to the host before the next step can be issued.
HOST_SYNCS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::_unique2", "aten::unique_dim", "aten::masked_select"}


@pytest.mark.parametrize("segments", [False, True])
def test_the_statistics_read_nothing_back_to_the_host(segments):
    """Three rounds of statistics, weights and all, issue no operation that makes a GPU wait (the
    segment keys are made on the host from the prompts' uids, where their unique() runs)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    log_prob, advantages, mask = make_batch(13, 6, 50, dtype=torch.float32)
    row_keys = torch.arange(6) // 2 if segments else None
    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if str(func.name()) in HOST_SYNCS and not (args and args[0] is row_keys):
                seen.append(str(func.name()))
            return func(*args, **(kwargs or {}))

    with Record():
        stats, tokens = scope_statistics(log_prob, advantages, mask, row_keys=row_keys, max_segments=3)
    assert seen == []
    assert tokens.weights.shape == (6, 50) and stats.num_tokens.sum().item() == mask.sum().item()


@SETTINGS
@given(
    batch=batches,
    dtype=st.sampled_from([torch.float32, torch.float64]),
    segments=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_a_loss_call_weighs_its_rows_bitwise_as_the_statistics_pass(batch, dtype, segments, seed):
    """token_weights on any subset of rows (a micro-batch) repeats the statistics pass's operations, so the
    first loss call of a mini-batch can use the pass's weights without changing a bit (verl_losses)."""
    log_prob, advantages, mask = (t.to(dtype) if t.is_floating_point() else t for t in batch)
    rows = log_prob.shape[0]
    row_keys = torch.arange(rows) % 2 if segments else None
    stats, tokens = scope_statistics(log_prob, advantages, mask, row_keys=row_keys, max_segments=2)
    subset = torch.randperm(rows, generator=torch.Generator().manual_seed(seed))[: max(1, rows // 2)]
    slots = None if row_keys is None else stats.slots_of(row_keys[subset])
    again = token_weights(stats, log_prob[subset], advantages[subset], slots) * mask[subset].to(dtype)
    assert torch.equal(again, tokens.weights[subset])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_values_past_the_underflow_limit_are_the_smallest_normal_kernel(dtype):
    """A token ~60 sigma out (q ~ 2000) weighs norm * exp(-limit): exp of an underflowing result is 10-40x
    slower on a CPU, and the difference to exp(-q) is below anything a sum can see."""
    log_prob = torch.zeros(1, 4000, dtype=dtype)
    log_prob[0, :2000] = -1.0
    advantages = torch.ones(1, 4000, dtype=dtype)
    advantages[0, 1::2] = -1.0
    mask = torch.ones(1, 4000, dtype=torch.bool)
    log_prob[0, 0] = -1.0e4  # one outlier among N tokens sits ~sqrt(N) sigma out
    weights, cov, stats = covariance_weights(log_prob, advantages, mask)
    limit = kernel_limit(torch.promote_types(dtype, torch.float32))
    norm = stats.norm.to(weights.dtype)
    assert weights[0, 0].item() == (torch.exp(torch.tensor(-limit, dtype=weights.dtype)) * norm).item() > 0
    assert torch.isfinite(weights).all() and weights.mean().item() == pytest.approx(1.0, rel=1e-6)
    assert stats.weight_min.item() == pytest.approx(weights.min().item(), rel=1e-6)
    # The same weight from a loss call, and a non-finite log-prob there still weighs 0.
    torch.testing.assert_close(token_weights(stats, log_prob, advantages), weights, rtol=0, atol=0)
    for bad in (math.inf, -math.inf, math.nan):
        poisoned = log_prob.clone()
        poisoned[0, 5] = bad
        assert token_weights(stats, poisoned, advantages)[0, 5].item() == 0.0
