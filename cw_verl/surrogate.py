"""PPO's clipped surrogate on the valid tokens only, with verl's loss aggregation (pure torch, no verl import).

It computes what verl's ``compute_policy_loss_vanilla`` + ``agg_loss`` compute (tests pin the equality for
every ``loss_agg_mode``), but on the flattened valid tokens instead of the padded ``[B, T]`` matrix and
with the three clipping branches folded into one effective ratio, so a CW-GRPO loss call (weights
included) costs less than verl's vanilla call on the same micro-batch. For advantage ``A`` and ratio
``r = exp(logp - old_logp)`` (log-ratio clamped to +-20 as verl does)::

    A >= 0:  loss = -A * min(r, 1 + clip_high)                    (standard PPO clip)
    A <  0:  loss = -A * min(max(r, 1 - clip_low), clip_ratio_c)  (PPO clip, then dual clip)
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
    num_rows: int
    row_length: int
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


def aggregate(token_losses: torch.Tensor, rows: torch.Tensor, agg: Aggregation) -> torch.Tensor:
    """verl's ``agg_loss`` for per-valid-token losses and their row indices."""
    if agg.mode == "token-mean":
        denominator = agg.batch_num_tokens if agg.batch_num_tokens is not None else token_losses.numel()
        return token_losses.sum() / denominator * agg.dp_size
    if agg.mode == "token-sum":
        return token_losses.sum() * agg.dp_size
    row_sums = torch.zeros(agg.num_rows, dtype=token_losses.dtype, device=token_losses.device)
    row_sums = row_sums.index_add(0, rows, token_losses)
    row_tokens = torch.bincount(rows, minlength=agg.num_rows)
    if agg.mode == "seq-mean-token-mean":
        row_sums = row_sums / (row_tokens + 1e-8)
    rows_with_tokens = (row_tokens > 0).sum()
    sequences = agg.global_batch_size if agg.global_batch_size is not None else rows_with_tokens
    loss = row_sums.sum() / sequences * agg.dp_size
    if agg.mode == "seq-mean-token-sum-norm":
        loss = loss / (agg.loss_scale_factor if agg.loss_scale_factor is not None else agg.row_length)
    return loss


def clipped_surrogate(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    clip: ClipConfig,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO losses of the valid tokens (1-D tensors), and ``[clipfrac, ppo_kl, clipfrac_lower]``
    (detached; denominators as verl's ``masked_mean``)."""
    # Half-precision log-probs are upcast: exp and the clipping branches are cheaper and more accurate in
    # float32 (the gradient flows back to the caller's dtype).
    compute = torch.promote_types(log_prob.dtype, torch.float32)
    log_ratio = (log_prob.to(compute) - old_log_prob.to(compute)).clamp(-20.0, 20.0)
    ratio = torch.exp(log_ratio)
    positive = advantages >= 0
    effective_ratio = torch.where(positive, ratio.clamp(max=1.0 + clip.high), ratio.clamp(1.0 - clip.low, clip.dual))
    losses = -advantages * effective_ratio
    if is_weights is not None:
        losses = losses * is_weights
    with torch.no_grad():
        ratio = ratio.detach()
        negative = advantages < 0
        clipped = (advantages > 0) & (ratio > 1.0 + clip.high) | negative & (ratio < 1.0 - clip.low)
        stats = torch.stack([clipped.sum(), -log_ratio.detach().sum(), (negative & (ratio > clip.dual)).sum()]).to(
            torch.float64
        )
        stats = stats / (log_prob.numel() + 1e-8)
    return losses, stats
