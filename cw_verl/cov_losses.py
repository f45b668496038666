"""verl's Clip-Cov and KL-Cov with the token selection made once per optimizer mini-batch, over all DP ranks.

``clip_cov_minibatch`` and ``kl_cov_minibatch`` are verl 0.9.1's ``clip_cov`` and ``kl_cov`` objectives
(``core_algos.compute_policy_loss_clip_cov`` / ``_kl_cov``: the same knobs ``clip_cov_ratio/lb/ub``,
``kl_cov_ratio``, ``ppo_kl_coef`` with verl's fallbacks, the same token terms, ``rollout_is_weights`` and
verl's ``agg_loss`` with ``global_batch_info``, the same ``actor/pg_clipfrac`` and ``actor/ppo_kl``), except
which tokens they pick. verl picks inside each loss call, from the call's current log-probs, so the count and
the tokens move with the micro-batch size and the DP size (verl issue #7829). Here the covariance ``c`` is the
one :func:`cw_verl.verl_losses.mini_batch_statistics` computes for ``cw_grpo_minibatch`` (means over the whole
mini-batch on every rank, from its ``old_log_probs``: no extra forward pass), ``k = max(int(ratio N), 1)`` for
the mini-batch's ``N`` valid tokens, and the tokens are chosen by :mod:`cw_verl.selection` in one more gather
round: the same set for any micro-batching, dynamic batching, DP size and model-parallel layout, and in every
PPO epoch over the same mini-batch.

* KL-Cov: the ``k`` largest ``c`` (ties broken by a sharding-independent key) get
  ``-A ratio + ppo_kl_coef |log ratio|`` instead of ``-A ratio``; nothing is clipped (as verl).
* Clip-Cov: ``k`` of the candidates ``lb < c < ub`` drawn uniformly (the smallest pseudo-random keys) have
  their PPO clipped term multiplied by 0. verl leaves out of its candidates the tokens PPO's clip already
  clipped in that call; drawn once from ``old_log_probs`` (ratio 1), nothing is clipped yet, so every token in
  the interval is a candidate, and a drawn token that PPO clips in a later call stays drawn (its gradient is 0
  either way).

On-policy (one mini-batch, one epoch) ``old_log_probs`` are the current log-probs up to their recomputation,
so the selection is verl's covariance on the whole mini-batch. Bad input stops every rank together, as for
the CW losses: the mini-batch's in the statistics rounds (plus a non-finite old log-prob at a valid token,
which makes the ratio undefined), each call's with one one-element all-gather. Outside the mask, old
log-probs and advantages may be anything (NaN included): they are zeroed before the loss.
"""

from __future__ import annotations

from typing import Any

import torch

from cw_verl.distributed import raise_together, resolve_data_parallel_group
from cw_verl.selection import DRAW, TOP, SelectionRule
from cw_verl.verl_losses import (
    MINIBATCH,
    call_checks,
    call_problem,
    connected_zero_if_empty,
    mini_batch_statistics,
    verl_policy_loss,
)
from cw_verl.weights import CovarianceInputError, token_covariance

CLIP_COV_MINIBATCH, KL_COV_MINIBATCH = "clip_cov_minibatch", "kl_cov_minibatch"
SELECTION_METRICS = ("k", "eligible", "selected", "kth_cov")
"""``actor/cov_select/*``: identical on every rank and call: ``k``, the mini-batch's eligible tokens (every
valid token for KL-Cov, the candidates for Clip-Cov), how many were selected, and KL-Cov's k-th ``c``."""


def selection_rule(loss_mode: str, config) -> SelectionRule:
    """The selection of ``loss_mode`` from the actor's ``policy_loss`` config, with verl 0.9.1's fallbacks."""
    if loss_mode == KL_COV_MINIBATCH:
        return SelectionRule(TOP, _knob(config, "kl_cov_ratio", 0.0002))
    bounds = _knob(config, "clip_cov_lb", 1.0), _knob(config, "clip_cov_ub", 5.0)
    return SelectionRule(DRAW, _knob(config, "clip_cov_ratio", 0.0002), *bounds)


def _knob(config, name: str, fallback: float) -> float:
    """``config.policy_loss.<name>`` (verl's ``PolicyLossConfig``, or a mapping), ``fallback`` when None as
    verl's loss functions do."""
    policy = config.policy_loss
    value = policy.get(name) if hasattr(policy, "get") else getattr(policy, name, None)
    return float(fallback if value is None else value)


def covariance_selection_loss(
    loss_mode: str,
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config=None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Clip-Cov or KL-Cov (``loss_mode``) with the mini-batch's global selection.

    Args:
        loss_mode: :data:`CLIP_COV_MINIBATCH` or :data:`KL_COV_MINIBATCH`.
        old_log_prob: ``[B, T]`` log-probs under the policy that sampled the batch (the selection's).
        log_prob: ``[B, T]`` log-probs under the policy being trained (carries the gradient).
        advantages: ``[B, T]`` advantages.
        response_mask: ``[B, T]`` valid-token mask.
        loss_agg_mode: verl's aggregation mode.
        config: the actor's ``ActorConfig`` (``policy_loss`` knobs, clip ratios, ``global_batch_info``).
        rollout_is_weights: ``[B, T]`` rollout-correction importance weights, or ``None``.

    Returns:
        ``(loss, metrics)``: verl's scalar loss for this micro-batch, verl's ``actor/ppo_kl`` (and for
        Clip-Cov ``actor/pg_clipfrac``, the share of this call's valid tokens zeroed), and
        ``actor/cov_select/*`` (:data:`SELECTION_METRICS`).

    Raises:
        CovarianceInputError: on every rank of the data-parallel group together, when any rank's input is
            unusable.
        ValueError: without a config, or with a ratio that is not > 0.
    """
    from verl.trainer.ppo.core_algos import agg_loss
    from verl.utils.torch_functional import masked_mean

    if config is None or getattr(config, "policy_loss", None) is None:
        raise ValueError(f"{loss_mode} needs the actor config (policy_loss knobs, global_batch_info)")
    rule = selection_rule(loss_mode, config)
    batch_info = getattr(config, "global_batch_info", None) or {}
    group = resolve_data_parallel_group(batch_info.get("dp_size"))
    problem = call_problem(old_log_prob, old_log_prob, log_prob, advantages, response_mask)
    device = log_prob.device if isinstance(log_prob, torch.Tensor) else torch.device("cpu")
    scoped = mini_batch_statistics(MINIBATCH, group, config, device, None, rule)
    checks = call_checks(problem, torch.zeros(1, dtype=torch.float64, device=device), group, device)

    valid = response_mask.bool()
    # Outside the mask the batch may hold anything; 0 there keeps every term finite (and masked).
    old_log_prob = torch.where(valid, old_log_prob, 0.0)
    advantages = torch.where(valid, advantages, 0.0)
    cov = token_covariance(scoped.stats, old_log_prob, advantages)
    selected = scoped.selection.members(cov, valid, old_log_prob, advantages)

    negative_approx_kl = log_prob - old_log_prob
    ratio = torch.exp(negative_approx_kl)
    pg_losses1 = -advantages * ratio
    if loss_mode == KL_COV_MINIBATCH:
        ppo_kl_coef = _knob(config, "ppo_kl_coef", 1.0)
        abs_kl = negative_approx_kl.abs()
        pg_losses = torch.where(selected, pg_losses1 + ppo_kl_coef * abs_kl, pg_losses1)
        pg_values = [masked_mean(abs_kl, valid)]  # verl logs the mean |log ratio| as ppo_kl
        pg_names = ["actor/ppo_kl"]
    else:
        low = config.clip_ratio_low if config.clip_ratio_low is not None else config.clip_ratio
        high = config.clip_ratio_high if config.clip_ratio_high is not None else config.clip_ratio
        pg_losses2 = -advantages * torch.clamp(ratio, 1 - low, 1 + high)
        corr = torch.where(selected, 0.0, torch.ones_like(advantages))
        pg_losses = torch.maximum(pg_losses1, pg_losses2) * corr
        pg_values = [masked_mean((corr == 0).float(), valid), masked_mean(-negative_approx_kl, valid)]
        pg_names = ["actor/pg_clipfrac", "actor/ppo_kl"]
    if rollout_is_weights is not None:
        pg_losses = pg_losses * rollout_is_weights
    loss = agg_loss(loss_mat=pg_losses, loss_mask=valid, loss_agg_mode=loss_agg_mode, **config.global_batch_info)
    loss = connected_zero_if_empty(loss, log_prob, valid)

    # One read to the host for every rank's check and verl's metrics, after the loss is queued.
    values = torch.cat([checks.to(torch.float64), torch.stack(pg_values).detach().to(torch.float64)]).tolist()
    raise_together(values[: len(checks)], None, CovarianceInputError, group)
    selection = scoped.selection
    metrics = dict(zip(pg_names, values[len(checks) :], strict=True))
    own = (selection.k, selection.eligible, selection.selected, selection.kth_cov)
    metrics.update(
        {f"actor/cov_select/{name}": float(value) for name, value in zip(SELECTION_METRICS, own, strict=True)}
    )
    if loss_mode == CLIP_COV_MINIBATCH:
        del metrics["actor/cov_select/kth_cov"]  # a draw has no threshold covariance
    return loss, metrics


def _policy_loss(loss_mode: str, verl_name: str):
    summary = f"verl's ``{verl_name}``, selection global per mini-batch."
    return verl_policy_loss(loss_mode, covariance_selection_loss, loss_mode, summary)


compute_policy_loss_clip_cov_minibatch = _policy_loss(CLIP_COV_MINIBATCH, "clip_cov")
compute_policy_loss_kl_cov_minibatch = _policy_loss(KL_COV_MINIBATCH, "kl_cov")
