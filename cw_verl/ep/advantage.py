"""EP-GRPO's token advantage: the composition of gate, polarity, progress and buckets (issue 12)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cw_verl.ep.buckets import bucket_index, bucket_normalise
from cw_verl.ep.gate import entropy_gate
from cw_verl.ep.progress import group_rewards_vary, polarity, policy_divergence

F64 = torch.float64

# verl computes entropy as ``logsumexp(l) - sum(softmax(l) * l)`` (``entropy_from_logits``, Megatron's
# ``vocab_parallel_entropy``): two terms of the size of the largest |logit| whose difference, on a peaked
# distribution, is ~0, so it can round below 0 by a few units in the last place of that logit. Measured with
# verl 0.9.1's functions (tests/test_ep_rounding.py): float32 down to -1.3 eps |l|max (-1.5e-5 at |l|max ~ 97),
# bfloat16 down to -0.4 eps |l|max (-0.125 at |l|max ~ 39). A negative entropy within
# ENTROPY_ROUNDING_EPS x eps(dtype) x ENTROPY_LOGIT_BOUND of 0 is such rounding and counts as 0: 3x the measured
# worst case, for logits up to 128 in magnitude (language models' logits stay well inside it). Anything further
# below 0 is not an entropy (log-probs passed in its place, say) and raises.
ENTROPY_ROUNDING_EPS = 4.0
ENTROPY_LOGIT_BOUND = 128.0


def entropy_rounding_tolerance(dtype: torch.dtype) -> float:
    """How far below 0 an entropy held in ``dtype`` may round (float32 and float64: 6.1e-5; bfloat16: 4.0).

    verl computes entropies in float32 at best: a float64 tensor is an upcast and carries float32's rounding.
    """
    eps = max(torch.finfo(dtype).eps, torch.finfo(torch.float32).eps)
    return ENTROPY_ROUNDING_EPS * eps * ENTROPY_LOGIT_BOUND


class EPInputError(ValueError):
    """Invalid input to the EP-GRPO advantage (shapes, NaN/inf, no valid token)."""


@dataclass(frozen=True)
class EPConfig:
    """EP-GRPO's knobs (``algorithm.ep_grpo.*`` in verl; defaults and their reasons in docs/fidelity.md).

    Attributes:
        gamma: entropy-gate sharpness; 1.0 = logistic of the standardised entropy.
        lam: weight of the progress term relative to the gated outcome term.
        num_buckets: K, progress buckets (10 in the paper's secondary note).
        reward_threshold: r above it is "good" in a group whose rewards are all equal.
        epsilon: added to the bucket std (as verl's GRPO adds it to the group std).
    """

    gamma: float = 1.0
    lam: float = 0.1
    num_buckets: int = 10
    reward_threshold: float = 0.5
    epsilon: float = 1e-6

    def __post_init__(self):
        if not self.gamma > 0:
            raise EPInputError(f"ep_grpo gamma must be > 0 (the gate must rise with entropy), got {self.gamma}")
        if not self.lam >= 0:
            raise EPInputError(f"ep_grpo lam must be >= 0, got {self.lam}")
        if int(self.num_buckets) != self.num_buckets or self.num_buckets < 1:
            raise EPInputError(f"ep_grpo num_buckets must be a positive integer, got {self.num_buckets}")
        if not self.epsilon > 0:
            raise EPInputError(f"ep_grpo epsilon must be > 0, got {self.epsilon}")


@dataclass(frozen=True)
class EPAdvantage:
    """The token advantage and its parts (``[B, T]`` float64, 0 on invalid tokens; ``polarity`` ``[B]``)."""

    advantages: torch.Tensor
    outcome: torch.Tensor
    progress: torch.Tensor
    gate: torch.Tensor
    polarity: torch.Tensor
    bucket: torch.Tensor


def _check(name: str, tensor: torch.Tensor, shape: tuple, mask: torch.Tensor | None) -> None:
    if tuple(tensor.shape) != shape:
        raise EPInputError(f"ep_grpo: {name} has shape {tuple(tensor.shape)}, expected {shape}")
    values = tensor if mask is None else tensor[mask]
    if not torch.isfinite(values).all():
        bad = int((~torch.isfinite(values)).sum())
        raise EPInputError(f"ep_grpo: {name} has {bad} NaN/inf value(s) on valid tokens")


def _rounding_clamped(entropy: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``entropy`` with values rounded below 0 (see :data:`ENTROPY_ROUNDING_EPS`) set to 0."""
    lowest = entropy[mask].min()
    if lowest >= 0:
        return entropy
    tolerance = entropy_rounding_tolerance(entropy.dtype)
    if lowest < -tolerance:
        below = int((entropy[mask] < -tolerance).sum())
        raise EPInputError(
            f"ep_grpo: negative entropy on {below} valid token(s) (min {lowest.item():.3g}), beyond the "
            f"{entropy.dtype} rounding tolerance -{tolerance:.3g} (= {ENTROPY_ROUNDING_EPS:g} eps x logits up to "
            f"{ENTROPY_LOGIT_BOUND:g}): not an entropy"
        )
    return entropy.clamp(min=0)


def ep_token_advantages(
    scores: torch.Tensor,
    outcome_advantage: torch.Tensor,
    group: torch.Tensor,
    entropy: torch.Tensor,
    old_log_prob: torch.Tensor,
    ref_log_prob: torch.Tensor,
    response_mask: torch.Tensor,
    config: EPConfig,
) -> EPAdvantage:
    """``A(i,t) = W(i,t) A_i + lambda d_i bucketnorm_k(log pi_old - log pi_ref)(i,t)`` (issue 12).

    Every statistic (entropy mean/std, bucket mean/std) is over all valid tokens passed in.

    Args:
        scores: ``[B]`` sequence rewards r_i.
        outcome_advantage: ``[B]`` GRPO advantages A_i.
        group: ``[B]`` int64 prompt-group ids.
        entropy: ``[B, T]`` per-token entropy of the policy that sampled the batch; values rounded below 0 (within
            :func:`entropy_rounding_tolerance` of its dtype) count as 0.
        old_log_prob: ``[B, T]`` log-probs of the sampled tokens under that policy.
        ref_log_prob: ``[B, T]`` log-probs under the reference policy.
        response_mask: ``[B, T]`` bool or 0/1.
        config: :class:`EPConfig`.

    Returns:
        :class:`EPAdvantage`.

    Raises:
        EPInputError: a shape mismatch, NaN/inf on a valid token, an entropy below 0 by more than rounding, or no
            valid token.
    """
    if response_mask.dim() != 2:
        raise EPInputError(f"ep_grpo: response_mask must be [B, T], got shape {tuple(response_mask.shape)}")
    shape = tuple(response_mask.shape)
    mask = response_mask.bool()
    for name, tensor in (("scores", scores), ("outcome_advantage", outcome_advantage)):
        _check(name, tensor, shape[:1], None)
    _check("group", group, shape[:1], None)
    for name, tensor in (("entropy", entropy), ("old_log_prob", old_log_prob), ("ref_log_prob", ref_log_prob)):
        _check(name, tensor, shape, mask)
    if not mask.any():
        raise EPInputError("ep_grpo: the batch has no valid response token (response_mask is all zero)")
    entropy = _rounding_clamped(entropy, mask)

    gate = entropy_gate(entropy, mask, config.gamma)
    outcome = gate * outcome_advantage.to(F64)[:, None]
    direction = polarity(scores, outcome_advantage, group, config.reward_threshold)
    bucket = bucket_index(entropy, mask, config.num_buckets)
    divergence = policy_divergence(old_log_prob, ref_log_prob, mask)
    normalised = bucket_normalise(divergence, bucket, mask, config.num_buckets, config.epsilon)
    progress = config.lam * direction[:, None] * normalised
    return EPAdvantage(outcome + progress, outcome, progress, gate, direction, bucket)


def ep_diagnostics(result: EPAdvantage, scores: torch.Tensor, group: torch.Tensor, response_mask: torch.Tensor) -> dict:
    """One step's EP-GRPO diagnostics, as verl metric names (means over the batch's valid tokens).

    - ``ep/gate_mean``: the entropy gate W (0.5 when every token has the same entropy);
    - ``ep/outcome_abs_mean``: ``|W A_i|``, the gated outcome term;
    - ``ep/progress_abs_mean``: ``|lambda d_i bucketnorm(...)|``, the progress term (compare with the outcome term
      to judge lambda);
    - ``ep/zero_variance_group_frac``: the share of prompt groups whose rewards are all equal (GRPO gives them no
      gradient; EP-GRPO's progress term does).

    Args:
        result: :func:`ep_token_advantages`' output.
        scores: ``[B]`` sequence rewards.
        group: ``[B]`` int64 group ids.
        response_mask: ``[B, T]``.

    Returns:
        ``{name: float}``.
    """
    mask = response_mask.bool()
    return {
        "ep/gate_mean": result.gate[mask].mean().item(),
        "ep/outcome_abs_mean": result.outcome[mask].abs().mean().item(),
        "ep/progress_abs_mean": result.progress[mask].abs().mean().item(),
        "ep/zero_variance_group_frac": (~group_rewards_vary(scores, group)).to(F64).mean().item(),
    }
