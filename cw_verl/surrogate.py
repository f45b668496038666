"""PPO's clipped surrogate with verl's loss aggregation, in a few arithmetic passes (pure torch, no verl import).

It computes what verl's ``compute_policy_loss_vanilla`` + ``agg_loss`` compute (tests pin the equality of
loss and gradient for every ``loss_agg_mode``), with the three clipping branches folded into one clamp
of the ratio between per-token bounds. For advantage ``A`` and ratio ``r = exp(logp - old_logp)``
(log-ratio clamped to +-20 as verl does)::

    A >= 0:  loss = -A * min(r, 1 + clip_high)                    (standard PPO clip)
    A <  0:  loss = -A * min(max(r, 1 - clip_low), clip_ratio_c)  (PPO clip, then dual clip)

The loss's gradient is ``-A * r`` where the ratio is not clipped and 0 where it is; a small autograd
function applies it in one multiplication. Nothing is compacted or selected with boolean masks (``where``,
comparisons and ``nonzero`` cost ten times an arithmetic pass on a CPU and a host sync on a GPU): signs
and ``clamp`` make the 0/1 indicators.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LOSS_AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


@dataclass(frozen=True)
class ClipConfig:
    low: float
    high: float
    dual: float

    def __post_init__(self):
        if not self.dual > 1.0:
            raise ValueError(f"the dual-clip bound clip_ratio_c must be > 1.0, got {self.dual}")


@dataclass(frozen=True)
class Aggregation:
    """verl's ``loss_agg_mode`` and its ``global_batch_info`` (values for the whole mini-batch, all DP ranks)."""

    mode: str
    dp_size: int = 1
    batch_num_tokens: int | None = None
    global_batch_size: int | None = None
    loss_scale_factor: int | None = None

    def __post_init__(self):
        if self.mode not in LOSS_AGG_MODES:
            raise ValueError(f"Invalid loss_agg_mode: {self.mode}")
        if self.dp_size > 1:
            if self.mode == "token-mean" and self.batch_num_tokens is None:
                raise ValueError("(global) batch_num_tokens is required when dp_size > 1")
            if self.mode.startswith("seq-mean") and self.global_batch_size is None:
                raise ValueError("global_batch_size is required when dp_size > 1")


def _positive(x: torch.Tensor) -> torch.Tensor:
    """1 where ``x > 0``, else 0 (in ``x``'s dtype), without a boolean pass."""
    return torch.sign(x).clamp_(min=0.0)


# verl clamps the log-ratio to +-20: the ratio is at least exp(-20), and where it is that small its
# gradient is 0. A lower bound of exp(-20) for A >= 0 changes no value and makes that gradient 0.
_SMALLEST_RATIO = float(torch.exp(torch.tensor(-20.0, dtype=torch.float64)))


class _ClippedPPO(torch.autograd.Function):
    """Per-token clipped PPO loss ``-A * clamp(r, lower, upper)`` with its gradient ``-A * r * [unclipped]``.

    Also returns (not differentiable) the clamped log-ratio and ``sign(clamp(r) - r)``: -1 where the ratio
    was clipped from above, +1 from below, 0 where it is not clipped. ``A`` is differentiable only when it
    requires a gradient (``cw_grpo_authors``: the released objective's weights carry one), with
    d loss / d A = -clamp(r), saved only then.
    """

    @staticmethod
    def forward(ctx, log_prob, old_log_prob, scaled_advantages, lower, upper):
        log_ratio = (log_prob - old_log_prob).clamp_(-20.0, 20.0)
        ratio = torch.exp(log_ratio)
        clipped = torch.clamp(ratio, min=lower, max=upper)
        advantage_gradient = clipped.neg() if ctx.needs_input_grad[2] else None
        change = torch.sub(clipped, ratio).sign_()
        # Unclipped (change = 0) the ratio is differentiable: d loss / d log_prob = -A r.
        coefficient = change.abs().neg_().add_(1.0).mul_(ratio).mul_(scaled_advantages).neg_()
        ctx.save_for_backward(coefficient, advantage_gradient)
        ctx.mark_non_differentiable(log_ratio, change)
        return clipped.mul_(scaled_advantages).neg_(), log_ratio, change

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        coefficient, advantage_gradient = ctx.saved_tensors
        grad_advantages = None if advantage_gradient is None else grad_loss * advantage_gradient
        return grad_loss * coefficient, None, grad_advantages, None, None


def clipped_surrogate(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: ClipConfig,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO losses, and the clip statistics as verl reports them.

    Args:
        log_prob: ``[B, T]`` log-probs under the policy being trained (carries the gradient; half
            precision is computed in float32, the gradient returns in its dtype).
        old_log_prob: ``[B, T]`` log-probs under the sampling policy (finite).
        advantages: ``[B, T]`` advantages, 0 outside the mask (e.g. ``w~ * A``); differentiated through
            only if they require a gradient.
        mask: ``[B, T]`` valid-token mask (float).
        clip: the clip ratios.
        is_weights: ``[B, T]`` rollout importance weights, or ``None``.

    Returns:
        ``(losses, stats)``: ``[B, T]`` per-token losses (0 outside the mask) and the detached ``[3]``
        ``[pg_clipfrac, ppo_kl, pg_clipfrac_lower]`` (denominators as verl's ``masked_mean``).
    """
    compute = torch.promote_types(log_prob.dtype, torch.float32)
    advantages = advantages.to(compute)
    positive = torch.sign(advantages.detach())
    negative = positive.neg().clamp_(min=0.0)
    positive.clamp_(min=0.0)
    lower = negative.mul(1.0 - clip.low - _SMALLEST_RATIO).add_(_SMALLEST_RATIO)
    upper = negative.mul(clip.dual - 1.0 - clip.high).add_(1.0 + clip.high)
    # verl weighs the clipped loss by the importance weights after clipping: the same as weighing A.
    scaled = advantages if is_weights is None else advantages * is_weights.detach().to(compute)
    if not scaled.requires_grad:
        scaled = scaled.detach()
    losses, log_ratio, change = _ClippedPPO.apply(
        log_prob.to(compute), old_log_prob.detach().to(compute), scaled, lower, upper
    )
    with torch.no_grad():
        # clipfrac: A > 0 clipped above, or A < 0 clipped below 1 - clip_low; lower: A < 0 past clip_ratio_c.
        below = change.neg().clamp_(min=0.0).flatten()
        above = change.clamp_(min=0.0).flatten()
        positive, negative, mask = positive.flatten(), negative.flatten(), mask.to(compute).flatten()
        stats = torch.stack(
            [
                torch.dot(positive, below) + torch.dot(negative, above),
                -torch.dot(log_ratio.flatten(), mask),
                torch.dot(negative, below),
            ]
        ).to(torch.float64)
        tokens = mask.sum().to(torch.float64) + 1e-8
    return losses, stats / tokens


def aggregate(token_losses: torch.Tensor, mask: torch.Tensor, agg: Aggregation) -> torch.Tensor:
    """verl's ``agg_loss`` of ``[B, T]`` per-token losses (0 outside the ``[B, T]`` float ``mask``).

    Returns:
        The scalar loss. Where verl would divide 0 by 0 (no valid token anywhere), it is 0 (and still
        connected to the graph, so that every rank runs the same backward).
    """
    if agg.mode == "token-mean":
        if agg.batch_num_tokens is not None:
            return token_losses.sum() / max(agg.batch_num_tokens, 1) * agg.dp_size
        return token_losses.sum() / mask.sum().clamp(min=1.0) * agg.dp_size
    if agg.mode == "token-sum":
        return token_losses.sum() * agg.dp_size
    row_sums = token_losses.sum(-1)
    row_tokens = mask.sum(-1)
    if agg.mode == "seq-mean-token-mean":
        # verl adds 1e-8 to an integer count, which makes a float32 tensor: the same denominator here.
        row_sums = row_sums / (row_tokens.to(torch.float32) + 1e-8)
    if agg.global_batch_size is not None:
        sequences = max(agg.global_batch_size, 1)
    else:
        sequences = _positive(row_tokens).sum().clamp(min=1.0)
    loss = row_sums.sum() / sequences * agg.dp_size
    if agg.mode == "seq-mean-token-sum-norm":
        loss = loss / (agg.loss_scale_factor if agg.loss_scale_factor is not None else mask.shape[-1])
    return loss
