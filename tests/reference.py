"""A direct, deliberately naive transcription of the paper's Sec. 2.3 formulas, in float64.

Used as the oracle in tests: boolean indexing, two-pass mean and std, no numerical tricks. The one rule
beyond the paper is :data:`cw_verl.weights.FLOOR_ULPS`: a sigma within the rounding error of the
computed ``c`` counts as 0, transcribed here from its definition.
"""

import math

import torch

from cw_verl.weights import FLOOR_ULPS


def reference_weights(log_prob: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, eps: float | None = None):
    """Normalised weights w~ at valid positions (1 elsewhere), c, and sigma.

    ``eps``: the precision of the computation under test (default: that of the inputs, at least float32).
    """
    if eps is None:
        eps = torch.finfo(torch.promote_types(log_prob.dtype, torch.float32)).eps
    valid = mask.bool()
    logp = log_prob.double()[valid]
    adv = advantages.double()[valid]
    weights = torch.ones(log_prob.shape, dtype=torch.float64)
    cov = torch.zeros(log_prob.shape, dtype=torch.float64)
    if logp.numel() == 0:
        return weights, cov, 0.0
    x, y = logp - logp.mean(), adv - adv.mean()
    c = x * y
    sigma = c.std(unbiased=False).item()
    rounding = math.sqrt(
        3 * (logp.mean() ** 2 * (y**2).mean() + adv.mean() ** 2 * (x**2).mean() + 9 * (c**2).mean()).item()
    )
    if sigma <= FLOOR_ULPS * eps * rounding:
        sigma = 0.0
        w = torch.ones_like(c)
    else:
        w = torch.softmax(-(c**2) / (2 * sigma**2), dim=0)  # normalised in log space: no 0/0 on underflow
    cov[valid] = c
    weights[valid] = w * c.numel() / w.sum()
    return weights, cov, sigma
