"""EP-GRPO's entropy gate (arXiv 2605.04960, "entropy-gated modulation"; issue 12)."""

from __future__ import annotations

import torch

F64 = torch.float64


def masked_standardise(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(x - mean x) / std x`` over the valid tokens, population std, 0 on invalid tokens.

    Args:
        values: ``[B, T]`` float.
        mask: ``[B, T]`` bool, at least one True.

    Returns:
        ``[B, T]`` float64. Where all valid values are equal (std 0) the result is 0 everywhere:
        no token is more or less "uncertain" than another, so none is singled out.
    """
    x = values.to(F64)
    n = mask.sum()
    mean = torch.where(mask, x, 0.0).sum() / n
    centred = torch.where(mask, x - mean, 0.0)
    std = (centred.square().sum() / n).sqrt()
    if std == 0:
        return torch.zeros_like(x)
    return centred / std


def entropy_gate(entropy: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """``W(i,t) = sigmoid(gamma * (H(i,t) - mean H) / std H)`` (issue 12, "entropy gate").

    Mean and std are over every valid token passed in (the step's batch). ``gamma > 0`` makes W
    strictly increasing in H; W lies in (0, 1) for finite input (in float64; exactly 0 or 1 only
    for |gamma * z| > ~37, which a finite batch of realistic size cannot reach with gamma ~ 1).

    Args:
        entropy: ``[B, T]`` per-token policy entropy (nats).
        mask: ``[B, T]`` bool response mask, at least one True.
        gamma: gate sharpness.

    Returns:
        ``[B, T]`` float64 gate, 0 on invalid tokens.
    """
    gate = torch.sigmoid(gamma * masked_standardise(entropy, mask))
    return torch.where(mask, gate, 0.0)
