"""The folded-clip PPO surrogate and aggregation equal verl's compute_policy_loss_vanilla + agg_loss."""

import pytest
import torch
import verl  # noqa: F401

from cw_verl.surrogate import LOSS_AGG_MODES, Aggregation, ClipConfig, aggregate, clipped_surrogate
from tests.toy_policy import actor_config


def inputs(dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rows, length = 9, 30
    mask = torch.arange(length)[None, :] < torch.randint(0, length + 1, (rows,), generator=gen)[:, None]
    old = -torch.rand(rows, length, generator=gen, dtype=torch.float64) * 4
    # Wide log-ratios so that both clips and the dual clip bind somewhere.
    log_prob = (old + torch.randn(rows, length, generator=gen, dtype=torch.float64) * 0.8).requires_grad_()
    advantages = torch.randn(rows, 1, generator=gen, dtype=torch.float64).expand(rows, length).clone()
    advantages[2] = 0.0
    is_weights = torch.rand(rows, length, generator=gen, dtype=torch.float64)
    return log_prob, old.to(dtype), advantages.to(dtype), mask, is_weights.to(dtype)


@pytest.mark.parametrize("loss_agg_mode", LOSS_AGG_MODES)
@pytest.mark.parametrize("global_info", [False, True])
@pytest.mark.parametrize("with_is_weights", [False, True])
def test_equals_verls_vanilla_loss(loss_agg_mode, global_info, with_is_weights):
    from verl.trainer.ppo.core_algos import compute_policy_loss_vanilla

    log_prob, old, advantages, mask, is_weights = inputs()
    is_weights = is_weights if with_is_weights else None
    config = actor_config(loss_agg_mode, clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=2.0)
    info = {}
    if global_info:  # as on one of 3 DP ranks of a mini-batch with more tokens and sequences elsewhere
        info = {"dp_size": 3, "batch_num_tokens": 400, "global_batch_size": 25, "loss_scale_factor": 17}
    config.global_batch_info.update(info)
    expected, metrics = compute_policy_loss_vanilla(
        old, log_prob, advantages, mask, loss_agg_mode, config, rollout_is_weights=is_weights
    )
    (expected_grad,) = torch.autograd.grad(expected, log_prob)

    float_mask = mask.double()
    losses, stats = clipped_surrogate(
        log_prob, old, advantages * float_mask, float_mask, ClipConfig(low=0.2, high=0.28, dual=2.0), is_weights
    )
    loss = aggregate(losses, float_mask, Aggregation(loss_agg_mode, **info))
    (grad,) = torch.autograd.grad(loss, log_prob)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-15)
    clipfrac, ppo_kl, clipfrac_lower = stats.tolist()
    # verl takes the fractions in float32 (``.float()`` masks), and its ``mask.sum() + 1e-8`` denominator
    # rounds the 1e-8 away in float32.
    assert clipfrac == pytest.approx(metrics["actor/pg_clipfrac"], rel=1e-6)
    assert ppo_kl == pytest.approx(metrics["actor/ppo_kl"], rel=1e-9)
    assert clipfrac_lower == pytest.approx(metrics["actor/pg_clipfrac_lower"], rel=1e-6)
    assert 0 < clipfrac_lower < clipfrac  # every branch was exercised


def test_half_precision_log_probs_are_computed_in_float32():
    log_prob, old, advantages, mask, _ = inputs()
    bf16 = log_prob.detach().to(torch.bfloat16).requires_grad_()
    losses, _ = clipped_surrogate(
        bf16, old.to(torch.bfloat16), advantages.float() * mask, mask.float(), ClipConfig(0.2, 0.2, 3.0)
    )
    assert losses.dtype == torch.float32
    losses.sum().backward()
    assert bf16.grad.dtype == torch.bfloat16


def test_no_valid_token_gives_zero_not_nan():
    log_prob, old, advantages, _, _ = inputs()
    mask = torch.zeros(log_prob.shape, dtype=torch.float64)
    losses, stats = clipped_surrogate(log_prob, old, advantages * mask, mask, ClipConfig(0.2, 0.2, 3.0))
    for mode in LOSS_AGG_MODES:
        loss = aggregate(losses, mask, Aggregation(mode))
        assert loss.item() == 0.0
        (grad,) = torch.autograd.grad(loss, log_prob, retain_graph=True)
        assert torch.all(grad == 0)
    assert stats.tolist() == [0.0, 0.0, 0.0]


def test_invalid_settings_raise_like_verl():
    with pytest.raises(ValueError, match="clip_ratio_c must be > 1.0"):
        ClipConfig(0.2, 0.2, 1.0)
    with pytest.raises(ValueError, match="Invalid loss_agg_mode"):
        Aggregation("seq-sum")
    with pytest.raises(ValueError, match="batch_num_tokens is required"):
        Aggregation("token-mean", dp_size=2)
