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
