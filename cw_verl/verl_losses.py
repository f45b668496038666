"""CW-GRPO as verl functions: the ``cw_grpo`` advantage estimator and policy losses.

The policy losses are verl's PPO clipped objective (as ``compute_policy_loss_vanilla``: clip_ratio_low/
high, dual-clip ``clip_ratio_c``, ``rollout_is_weights``, every ``loss_agg_mode`` with verl's
``global_batch_info``) applied to ``w~ * A`` instead of ``A`` (paper Sec. 2.3, the loss l~_{i,t}). They
differ only in the *statistics scope*, the set of tokens whose mean, sigma and normaliser the weights
share (a semantic choice, not a knob to tune):

``cw_grpo_minibatch``
    all tokens of the optimizer mini-batch on all DP ranks. Computed once per mini-batch from the
    log-probs the batch already carries (``old_log_probs``: the policy that sampled it, recomputed by
    the actor, as in verl's ratio), so the update is the same for any micro-batch size, token packing
    and DP size, with no extra forward pass and two small collectives per mini-batch.
``cw_grpo_group``
    the paper's literal scope: each prompt's G responses (segments keyed by ``uid``), also from
    ``old_log_probs``, wherever the responses sit across ranks and micro-batches of the mini-batch.
``cw_grpo_microbatch``
    the tokens of one loss call on all DP ranks, with the current ``log_prob``. It changes with the
    micro-batch size and packing (see the README's measurements).
``cw_grpo``
    :data:`DEFAULT_SCOPE`.

Metrics (``actor/cw/...``) add no collective. ``sigma``, ``cov_mean``, ``num_tokens``, ``weight_min``
and ``weight_max`` are exact for the whole scope (identical on every rank; with group scope, sigma is
the token-weighted RMS over groups); ``weight_mean``, ``frac_below_half`` and the covariance
percentiles are over this rank's tokens in scope. verl averages all of them over micro-batches and ranks.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import numpy as np
import torch

from cw_verl.distributed import current_loss_call, current_train_batch, group_gather, resolve_data_parallel_group
from cw_verl.surrogate import Aggregation, ClipConfig, aggregate, clipped_surrogate
from cw_verl.weights import (
    CompactTokens,
    CovarianceInputError,
    ScopeStatistics,
    token_weights,
    weigh_tokens,
)

CW_GRPO = "cw_grpo"
MICROBATCH, MINIBATCH, GROUP = "microbatch", "minibatch", "group"
DEFAULT_SCOPE = MINIBATCH
LOSS_MODES = {
    CW_GRPO: DEFAULT_SCOPE,
    f"{CW_GRPO}_{MICROBATCH}": MICROBATCH,
    f"{CW_GRPO}_{MINIBATCH}": MINIBATCH,
    f"{CW_GRPO}_{GROUP}": GROUP,
}

# Callables ``(old_log_prob, response_mask, weights)`` run on every CW-GRPO loss call with the [B, T] weights
# it applied: for studies and debugging (cw_verl.cpu.studies); empty, and free, in training.
weight_observers: list = []

# The paper's Table 1 percentiles, as fractions of the valid tokens.
TABLE1_PERCENTILES = ((0.0001, "0.01pct"), (0.01, "1pct"), (0.2, "20pct"), (0.4, "40pct"))


def covariance_metrics(weights: torch.Tensor, cov: torch.Tensor, stats: ScopeStatistics) -> dict[str, float]:
    """The ``actor/cw/*`` metrics from this rank's valid tokens' weights and ``c`` (1-D, compact).

    ``cov_pos_top_P`` is the value that the top P of the token covariances reach or exceed,
    ``cov_neg_top_P`` the value that the bottom P reach or fall below (Table 1's "percentile
    thresholds"; its 100% row fits no single reading and is left out).
    """
    metrics = {
        "actor/cw/sigma": stats.sigma,
        "actor/cw/cov_mean": stats.scope_cov_mean,
        "actor/cw/num_tokens": float(stats.total_tokens),
        "actor/cw/weight_min": stats.weight_min.min().item() if len(stats.keys) else 1.0,
        "actor/cw/weight_max": stats.weight_max.max().item() if len(stats.keys) else 1.0,
    }
    n = cov.numel()
    names = [name for _, name in TABLE1_PERCENTILES]
    if n == 0:
        # Neutral values keep the key set identical on every rank, as verl's dp aggregation requires.
        metrics.update({"actor/cw/weight_mean": 1.0, "actor/cw/frac_below_half": 0.0})
        metrics.update({f"actor/cw/cov_{side}_top_{name}": 0.0 for side in ("pos", "neg") for name in names})
        return metrics
    ks = [max(1, math.ceil(fraction * n)) for fraction, _ in TABLE1_PERCENTILES]
    # Order statistics in float32 with numpy's vectorised sort (an order of magnitude faster than torch's
    # on CPU); one device-to-host copy of this rank's c.
    ascending = np.sort(cov.detach().to("cpu", torch.float32).numpy())
    for k, name in zip(ks, names, strict=True):
        metrics[f"actor/cw/cov_pos_top_{name}"] = float(ascending[n - k])
        metrics[f"actor/cw/cov_neg_top_{name}"] = float(ascending[k - 1])
    mean, below_half = torch.stack([weights.mean(), (weights < 0.5).to(torch.float64).mean()]).tolist()
    metrics["actor/cw/weight_mean"] = mean
    metrics["actor/cw/frac_below_half"] = below_half
    return metrics


def uid_keys(uids) -> torch.Tensor:
    """Stable int64 segment keys for prompt uids (the same on every process, unlike ``hash``)."""
    return torch.tensor(
        [
            int.from_bytes(hashlib.blake2b(str(uid).encode(), digest_size=8).digest(), "little", signed=True)
            for uid in uids
        ],
        dtype=torch.int64,
    )


def _row_uids(batch) -> list:
    from verl.utils import tensordict_utils as tu

    if batch is None or "uid" not in batch.keys():
        raise RuntimeError(
            "cw_grpo_group needs each sequence's prompt 'uid' in the actor's batch (verl's trainers put it "
            "there); none was found."
        )
    uids = tu.get(batch, "uid")
    return list(uids.tolist() if isinstance(uids, np.ndarray) else uids)


def _padded(batch, *fields):
    selected = batch.select(*fields)
    if any(getattr(selected[f], "is_nested", False) for f in fields):
        selected = selected.to_padded_tensor()
    return [selected[f] for f in fields]


def mini_batch_statistics(scope: str, group, config) -> tuple[ScopeStatistics, dict[str, float]]:
    """Statistics of this optimizer mini-batch in ``scope``, computed on its first loss call and cached."""
    call = current_train_batch()
    if call is None:
        raise RuntimeError(
            f"cw_grpo_{scope} computes its statistics once per optimizer mini-batch from the batch verl's engine "
            "trains on (BaseEngine.train_batch); call it through a verl engine, or use cw_grpo_microbatch."
        )
    if scope not in call.cache:
        old_log_prob, advantages, mask = _padded(call.mini_batch, "old_log_probs", "advantages", "response_mask")
        tokens, problem = CompactTokens.checked(old_log_prob, advantages, mask)
        row_keys, max_segments = None, 1
        if scope == GROUP:
            row_keys = uid_keys(_row_uids(call.mini_batch))
            global_rows = int(config.global_batch_info.get("global_batch_size") or len(row_keys))
            max_segments = max(1, global_rows // max(1, int(config.rollout_n)))
        weights, c, stats = weigh_tokens(tokens, group_gather(group), row_keys, max_segments, problem)
        if scope == GROUP and not bool((stats.rows == config.rollout_n).all()):
            raise CovarianceInputError(
                f"cw_grpo_group: prompt groups in this mini-batch have {sorted(set(stats.rows.long().tolist()))} "
                f"responses, not rollout.n={config.rollout_n}; the group scope needs each prompt's responses in one "
                "mini-batch (ppo_mini_batch_size in whole prompts, no multi-trajectory outputs)."
            )
        call.cache[scope] = (stats, covariance_metrics(weights, c, stats))
    return call.cache[scope]


def _zero_loss(log_prob, mask):
    # A zero that still reaches every parameter (all ranks run the same backward), instead of verl's
    # 0/0 when it normalises by a local token count of zero.
    return torch.where(mask.bool(), log_prob, 0.0).sum() * 0.0


def _clip_config(config) -> ClipConfig:
    # As verl's compute_policy_loss_vanilla reads them.
    low = config.clip_ratio_low if config.clip_ratio_low is not None else config.clip_ratio
    high = config.clip_ratio_high if config.clip_ratio_high is not None else config.clip_ratio
    return ClipConfig(low=low, high=high, dual=config.get("clip_ratio_c", 3.0))


def _aggregation(loss_agg_mode, mask, batch_info) -> Aggregation:
    fields = ("dp_size", "batch_num_tokens", "global_batch_size", "loss_scale_factor")
    known = {key: batch_info[key] for key in fields if batch_info.get(key) is not None}
    return Aggregation(loss_agg_mode, num_rows=mask.shape[0], row_length=mask.shape[-1], **known)


def cw_grpo_policy_loss(
    scope: str,
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config=None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """CW-GRPO policy loss in ``scope``: PPO's clipped loss with advantages ``w~ * A`` (paper Sec. 2.3).

    The clipped loss and its aggregation are verl's (``compute_policy_loss_vanilla`` + ``agg_loss``),
    computed on the valid tokens only (:mod:`cw_verl.surrogate`).
    """
    if config is None:
        raise ValueError("cw_grpo needs the actor config (clip ratios, global_batch_info)")
    batch_info = getattr(config, "global_batch_info", None) or {}
    group = resolve_data_parallel_group(batch_info.get("dp_size"))
    # The per-call scope weighs with the current log-probs, the wider scopes with the batch's old ones.
    scope_log_prob = log_prob if scope == MICROBATCH else old_log_prob
    tokens, problem = CompactTokens.checked(scope_log_prob, advantages, response_mask)
    if problem is None and old_log_prob.shape != log_prob.shape:
        problem = f"old_log_prob has shape {tuple(old_log_prob.shape)}, log_prob {tuple(log_prob.shape)}"
    if scope == MICROBATCH:
        weights, cov, stats = weigh_tokens(tokens, group_gather(group), problem=problem)
        metrics = dict(covariance_metrics(weights, cov, stats))
    else:
        stats, metrics = mini_batch_statistics(scope, group, config)
        metrics = dict(metrics)
        if problem is not None:
            raise CovarianceInputError(problem)
        call = current_loss_call()
        row_keys = uid_keys(_row_uids(call.micro_batch if call else None)) if scope == GROUP else None
        weights, _ = token_weights(tokens, stats, row_keys)
    if stats.total_tokens == 0:
        metrics.update({"actor/pg_clipfrac": 0.0, "actor/ppo_kl": 0.0, "actor/pg_clipfrac_lower": 0.0})
        return _zero_loss(log_prob, response_mask), metrics

    for observer in weight_observers:
        observer(old_log_prob, response_mask, tokens.scatter(weights, 1.0))
    index = tokens.index
    is_weights = None if rollout_is_weights is None else rollout_is_weights.flatten()[index]
    token_losses, pg_stats = clipped_surrogate(
        log_prob.flatten()[index],
        old_log_prob.flatten()[index],
        (weights * tokens.adv).to(advantages.dtype),
        _clip_config(config),
        is_weights,
    )
    loss = aggregate(token_losses, tokens.row, _aggregation(loss_agg_mode, response_mask, batch_info))
    clipfrac, ppo_kl, clipfrac_lower = pg_stats.tolist()
    metrics.update({"actor/pg_clipfrac": clipfrac, "actor/ppo_kl": ppo_kl, "actor/pg_clipfrac_lower": clipfrac_lower})
    return loss, metrics


def _scoped_policy_loss(loss_mode: str, scope: str):
    def policy_loss(
        old_log_prob: torch.Tensor,
        log_prob: torch.Tensor,
        advantages: torch.Tensor,
        response_mask: torch.Tensor,
        loss_agg_mode: str = "token-mean",
        config=None,
        rollout_is_weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        return cw_grpo_policy_loss(
            scope, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights
        )

    policy_loss.__name__ = policy_loss.__qualname__ = f"compute_policy_loss_{loss_mode}"
    policy_loss.__doc__ = f"verl policy loss ``{loss_mode}``: CW-GRPO with the {scope} statistics scope."
    return policy_loss


POLICY_LOSSES = {name: _scoped_policy_loss(name, scope) for name, scope in LOSS_MODES.items()}


def compute_cw_grpo_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: np.ndarray | None = None,
    config=None,
    **_: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``cw_grpo`` estimator: GRPO's group-normalised outcome advantage, unchanged.

    CW-GRPO reweights in the loss; the estimator only exists so that ``algorithm.adv_estimator=cw_grpo``
    selects the whole method (cw_verl makes the actor's ``loss_mode`` follow it). Honours
    ``algorithm.norm_adv_by_std_in_grpo`` like ``grpo``.
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
