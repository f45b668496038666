"""The demo's observation-only probes, against the paper's equations written out by hand (Sec. 2.3)."""

import math
from types import SimpleNamespace

import pytest
import torch

from cw_verl.demo.probes import kernel_tails


def paper_weights(log_prob, advantages, mask):
    """Sec. 2.3 over the valid tokens: c = (logp - mean) (A - mean), w = exp(-c^2 / 2 sigma^2), w~ = w N / sum w."""
    valid = mask.bool()
    lp, adv = log_prob[valid].double(), advantages[valid].double()
    c = (lp - lp.mean()) * (adv - adv.mean())
    sigma = (c - c.mean()).pow(2).mean().sqrt()
    w = torch.exp(-c.pow(2) / (2 * sigma**2))
    return c, w * len(w) / w.sum()


def batch_of(log_prob, advantages, mask):
    return SimpleNamespace(batch={"old_log_probs": log_prob, "advantages": advantages, "response_mask": mask})


def test_kernel_tails_count_each_side_of_the_covariance_as_the_paper_weighs_it():
    generator = torch.Generator().manual_seed(3)
    log_prob = -torch.rand(16, 12, generator=generator) * 3
    # A long positive tail: a few likely tokens with a large positive advantage, as in the demo's skew.
    log_prob[:2, :3] = -0.01
    advantages = torch.randn(16, 1, generator=generator).expand(16, 12).clone()
    advantages[:2] = 3.0
    mask = torch.ones(16, 12)
    mask[5:, 9:] = 0  # padding must not count on either side

    tails = kernel_tails(batch_of(log_prob, advantages, mask))

    c, weights = paper_weights(log_prob, advantages, mask)
    below = weights < 0.5
    assert below.any() and (below & (c > 0)).any(), "the case must exercise the positive tail"
    assert tails["probe/kernel/pos_below_half"] == pytest.approx(float((below & (c > 0)).sum() / (c > 0).sum()))
    assert tails["probe/kernel/neg_below_half"] == pytest.approx(float((below & (c < 0)).sum() / (c < 0).sum()))
    assert tails["probe/kernel/pos_share_of_below_half"] == pytest.approx(float((below & (c > 0)).sum() / below.sum()))


def test_kernel_tails_of_a_batch_without_spread_weigh_nothing_down():
    # Equal advantages (every response of the step equally rewarded): c = 0 everywhere, the weights are 1.
    log_prob = -torch.rand(4, 5, generator=torch.Generator().manual_seed(0))
    tails = kernel_tails(batch_of(log_prob, torch.ones(4, 5), torch.ones(4, 5)))
    assert all(math.isnan(value) for value in tails.values())


def _call(loss_mode, old, current, advantages, mask, **policy_loss):
    """verl's registered loss as its engine calls it (keywords, padded tensors), and d loss / d current."""
    from verl.trainer.ppo.core_algos import get_policy_loss_fn
    from verl.workers.config import PolicyLossConfig

    from tests.toy_policy import actor_config

    config = actor_config("token-mean", policy_loss=PolicyLossConfig(loss_mode=loss_mode, **policy_loss))
    config.global_batch_info.update(
        dp_size=1, batch_num_tokens=int(mask.sum()), global_batch_size=len(mask), loss_scale_factor=None
    )
    loss, metrics = get_policy_loss_fn(loss_mode)(
        old_log_prob=old,
        log_prob=current,
        advantages=advantages,
        response_mask=mask,
        loss_agg_mode="token-mean",
        config=config,
        rollout_is_weights=None,
    )
    (grad,) = torch.autograd.grad(loss, current)
    return grad


def _tokens(seed, rows=12, length=10, delta=0.0):
    generator = torch.Generator().manual_seed(seed)
    old = -torch.rand(rows, length, generator=generator, dtype=torch.float64) * 3
    mask = torch.arange(length)[None, :] < torch.randint(3, length + 1, (rows, 1), generator=generator)
    # Advantages bounded away from 0, so every unselected valid token has a nonzero gradient.
    signs = torch.randint(0, 2, (rows, 1), generator=generator) * 2 - 1
    advantages = (signs * (0.5 + torch.rand(rows, 1, generator=generator))).expand(rows, length).double() * mask
    current = old + delta * (1 + torch.rand(rows, length, generator=generator, dtype=torch.float64))
    return old, current.requires_grad_(True), advantages, mask


def test_local_selection_counter_counts_the_tokens_verls_clip_cov_zeroes_in_each_call():
    from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY

    from cw_verl.demo.probes import LocalSelectionCounter

    original = POLICY_LOSS_REGISTRY["clip_cov"]
    counter = LocalSelectionCounter("clip_cov")
    try:
        zeroed = 0
        for seed in (1, 2):  # two calls of one update: the counts add up
            old, current, advantages, mask = _tokens(seed)
            # current == old: ratio 1, nothing PPO-clipped, every valid token is a candidate of the wide band.
            grad = _call(
                "clip_cov", old, current, advantages, mask, clip_cov_ratio=0.1, clip_cov_lb=-50, clip_cov_ub=50
            )
            zeroed += int(((grad == 0) & mask).sum())
            assert int(((grad == 0) & mask).sum()) == max(int(0.1 * int(mask.sum())), 1)
        assert counter.take() == zeroed
        assert counter.take() == 0
    finally:
        counter.close()
    assert POLICY_LOSS_REGISTRY["clip_cov"] is original


def test_local_selection_counter_counts_the_tokens_verls_kl_cov_penalises_in_each_call():
    from cw_verl.demo.probes import LocalSelectionCounter

    counter = LocalSelectionCounter("kl_cov")
    try:
        penalised = 0
        for seed in (3, 4):
            old, current, advantages, mask = _tokens(seed, delta=0.01)
            grad = _call("kl_cov", old, current, advantages, mask, kl_cov_ratio=0.05, ppo_kl_coef=1.0)
            # Unpenalised tokens: d(-A ratio)/d log-prob = -A ratio, over the token-mean's N.
            vanilla = -advantages * torch.exp(current.detach() - old) / mask.sum()
            penalised += int((((grad - vanilla).abs() > 1e-9) & mask).sum())
        assert penalised > 2 and counter.take() == penalised
    finally:
        counter.close()


def test_local_selection_counter_observes_only_verls_per_call_modes():
    from cw_verl.demo.probes import LocalSelectionCounter

    with pytest.raises(ValueError, match="clip_cov_minibatch"):
        LocalSelectionCounter("clip_cov_minibatch")
