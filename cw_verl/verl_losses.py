"""CW-GRPO as verl functions: the ``cw_grpo`` advantage estimator and policy loss.

The policy loss is verl's own PPO clipped objective (``compute_policy_loss_vanilla``: clip_ratio_low/
high, dual-clip ``clip_ratio_c``, ``rollout_is_weights``, every ``loss_agg_mode`` with verl's
``global_batch_info``) applied to ``w~ * A`` instead of ``A`` (paper Sec. 2.3, the loss l~_{i,t}).
The weights come from :mod:`cw_verl.weights`, with statistics reduced over the data-parallel group of
the loss call (:mod:`cw_verl.distributed`).

Metrics (``actor/cw/...``) add no collective. ``sigma``, ``cov_mean``, ``num_tokens``, ``weight_min``
and ``weight_max`` are exact for the loss call's whole statistics scope (identical on every rank);
``weight_mean``, ``frac_below_half`` and the covariance percentiles are over this rank's valid tokens
in the call. verl averages all of them over micro-batches and ranks.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from cw_verl.distributed import group_gather, resolve_data_parallel_group
from cw_verl.weights import CovarianceStats, covariance_weights

CW_GRPO = "cw_grpo"

# The paper's Table 1 percentiles, as fractions of the valid tokens.
TABLE1_PERCENTILES = ((0.0001, "0.01pct"), (0.01, "1pct"), (0.2, "20pct"), (0.4, "40pct"))


def covariance_metrics(
    weights: torch.Tensor, cov: torch.Tensor, mask: torch.Tensor, stats: CovarianceStats
) -> dict[str, float]:
    """The ``actor/cw/*`` metrics of one loss call (see the module docstring for their scope).

    ``cov_pos_top_P`` is the value that the top P of this rank's token covariances reach or exceed,
    ``cov_neg_top_P`` the value that the bottom P reach or fall below (Table 1's "percentile
    thresholds"; its 100% row fits no single reading and is left out).
    """
    valid = mask.bool()
    local_cov = cov[valid]
    local_weights = weights[valid]
    n = local_cov.numel()
    metrics = {
        "actor/cw/sigma": stats.sigma,
        "actor/cw/cov_mean": stats.cov_mean,
        "actor/cw/num_tokens": float(stats.num_tokens),
        "actor/cw/weight_min": stats.weight_min,
        "actor/cw/weight_max": stats.weight_max,
    }
    if n == 0:
        # Neutral values keep the key set identical on every rank, as verl's dp aggregation requires.
        metrics.update({"actor/cw/weight_mean": 1.0, "actor/cw/frac_below_half": 0.0})
        metrics.update(
            {f"actor/cw/cov_{side}_top_{name}": 0.0 for side in ("pos", "neg") for _, name in TABLE1_PERCENTILES}
        )
        return metrics
    ascending = torch.sort(local_cov).values
    ks = [max(1, math.ceil(fraction * n)) for fraction, _ in TABLE1_PERCENTILES]
    index = torch.tensor([n - k for k in ks] + [k - 1 for k in ks], device=ascending.device)
    summary = torch.cat(
        [
            ascending[index],
            torch.stack([local_weights.mean(), (local_weights < 0.5).to(torch.float64).mean()]),
        ]
    ).tolist()
    names = [name for _, name in TABLE1_PERCENTILES]
    for i, name in enumerate(names):
        metrics[f"actor/cw/cov_pos_top_{name}"] = summary[i]
        metrics[f"actor/cw/cov_neg_top_{name}"] = summary[len(names) + i]
    metrics["actor/cw/weight_mean"] = summary[-2]
    metrics["actor/cw/frac_below_half"] = summary[-1]
    return metrics


def compute_policy_loss_cw_grpo(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config=None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """CW-GRPO policy loss: verl's PPO clipped loss with advantages ``w~ * A`` (paper Sec. 2.3).

    Args: as verl's ``compute_policy_loss_vanilla``. ``log_prob`` (the current policy's, detached)
    and ``advantages`` over the valid tokens of the data-parallel group give the weights.
    """
    from verl.trainer.ppo.core_algos import compute_policy_loss_vanilla

    if config is None:
        raise ValueError("cw_grpo needs the actor config (clip ratios, global_batch_info)")
    batch_info = getattr(config, "global_batch_info", None) or {}
    group = resolve_data_parallel_group(batch_info.get("dp_size"))
    weights, cov, stats = covariance_weights(log_prob, advantages, response_mask, group_gather(group))
    if stats.num_tokens == 0:
        # No valid token on any rank: a zero loss that still reaches every parameter (all ranks run
        # the same backward), rather than verl's 0/0 when it normalises by a local token count.
        zero = torch.where(response_mask.bool(), log_prob, 0.0).sum() * 0.0
        metrics = {"actor/pg_clipfrac": 0.0, "actor/ppo_kl": 0.0, "actor/pg_clipfrac_lower": 0.0}
        metrics.update(covariance_metrics(weights, cov, response_mask, stats))
        return zero, metrics
    reweighted = (weights * advantages).to(advantages.dtype)
    loss, metrics = compute_policy_loss_vanilla(
        old_log_prob=old_log_prob,
        log_prob=log_prob,
        advantages=reweighted,
        response_mask=response_mask,
        loss_agg_mode=loss_agg_mode,
        config=config,
        rollout_is_weights=rollout_is_weights,
    )
    metrics.update(covariance_metrics(weights, cov, response_mask, stats))
    return loss, metrics


def compute_cw_grpo_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: np.ndarray | None = None,
    config=None,
    **_: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``cw_grpo`` estimator: GRPO's group-normalised outcome advantage, unchanged.

    CW-GRPO reweights in the loss, where the current log-probs are; the estimator only exists so that
    ``algorithm.adv_estimator=cw_grpo`` selects the whole method (cw_verl makes the actor's
    ``loss_mode`` follow it). Honours ``algorithm.norm_adv_by_std_in_grpo`` like ``grpo``.
    """
    from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage

    if index is None:
        raise ValueError("cw_grpo normalises rewards within each prompt's group and needs the batch's 'uid' index")
    norm_by_std = True if config is None else bool(config.get("norm_adv_by_std_in_grpo", True))
    return compute_grpo_outcome_advantage(
        token_level_rewards=token_level_rewards,
        response_mask=response_mask,
        index=index,
        norm_adv_by_std_in_grpo=norm_by_std,
        config=config,
    )
