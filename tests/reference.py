"""A direct, deliberately naive transcription of the paper's Sec. 2.3 formulas, in float64.

Used as the oracle in tests: boolean indexing, two-pass mean and std, no numerical tricks.
"""

import torch


def reference_weights(log_prob: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor):
    """Normalised weights w~ at valid positions (1 elsewhere), c, and sigma."""
    valid = mask.bool()
    logp = log_prob.double()[valid]
    adv = advantages.double()[valid]
    weights = torch.ones(log_prob.shape, dtype=torch.float64)
    cov = torch.zeros(log_prob.shape, dtype=torch.float64)
    if logp.numel() == 0:
        return weights, cov, 0.0
    c = (logp - logp.mean()) * (adv - adv.mean())
    sigma = c.std(unbiased=False)
    if sigma == 0:
        w = torch.ones_like(c)
    else:
        w = torch.exp(-(c**2) / (2 * sigma**2))
    cov[valid] = c
    weights[valid] = w * c.numel() / w.sum()
    return weights, cov, float(sigma)
