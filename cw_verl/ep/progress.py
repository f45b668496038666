"""EP-GRPO's implicit progress signal and its polarity (arXiv 2605.04960, "implicit process signals from
policy divergence anchored to outcome advantages"; issue 12)."""

from __future__ import annotations

import torch

F64 = torch.float64


def polarity(
    scores: torch.Tensor, outcome_advantage: torch.Tensor, group: torch.Tensor, reward_threshold: float
) -> torch.Tensor:
    """``d_i = sign(A_i)`` if the rewards of i's group vary, else ``sign(r_i - threshold)`` (issue 12).

    "Vary" means not all exactly equal (a singleton group does not vary). ``d_i = 0`` when ``A_i = 0``
    in a varying group (a response exactly at its group's mean) or ``r_i == threshold``: such a
    response carries no direction, so it gets no progress advantage.

    Args:
        scores: ``[B]`` sequence rewards r_i.
        outcome_advantage: ``[B]`` sequence-level GRPO advantages A_i.
        group: ``[B]`` int64 group ids (same prompt, same id).
        reward_threshold: reward separating "good" from "bad" when a group's rewards are all equal.

    Returns:
        ``[B]`` float64 in {-1, 0, 1}.
    """
    scores = scores.to(F64)
    varies = group_rewards_vary(scores, group)[torch.unique(group, return_inverse=True)[1]]
    return torch.where(varies, torch.sign(outcome_advantage.to(F64)), torch.sign(scores - reward_threshold))


def group_rewards_vary(scores: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Per group (in ``torch.unique(group)`` order): are its rewards not all exactly equal?

    Args:
        scores: ``[B]`` sequence rewards.
        group: ``[B]`` int64 group ids.

    Returns:
        ``[num_groups]`` bool.
    """
    scores = scores.to(F64)
    _, inverse = torch.unique(group, return_inverse=True)
    num_groups = int(inverse.max()) + 1 if inverse.numel() else 0
    group_max = torch.full((num_groups,), -torch.inf, dtype=F64).scatter_reduce(0, inverse, scores, "amax")
    group_min = torch.full((num_groups,), torch.inf, dtype=F64).scatter_reduce(0, inverse, scores, "amin")
    return group_max != group_min


def policy_divergence(old_log_prob: torch.Tensor, ref_log_prob: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token implicit process signal ``log pi_old - log pi_ref`` (issue 12's s before lambda).

    *Interpretation*: ``pi_theta`` of the text is the policy that sampled the batch (verl's recomputed
    ``old_log_probs``), since the advantage is fixed before the update (the issue's "bucket statistics
    from the old policy"). lambda is applied after the bucket normalisation, where it would otherwise cancel.

    Args:
        old_log_prob: ``[B, T]``.
        ref_log_prob: ``[B, T]``.
        mask: ``[B, T]`` bool.

    Returns:
        ``[B, T]`` float64, 0 on invalid tokens.
    """
    return torch.where(mask, old_log_prob.to(F64) - ref_log_prob.to(F64), 0.0)
