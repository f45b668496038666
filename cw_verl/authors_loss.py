"""``loss_mode=cw_grpo_authors``: the CW-GRPO authors' released objective as a verl policy loss.

The weights are :func:`cw_verl.authors_objective.authors_weights`, computed on the *current* log-probs of
each prompt group with their gradient (nothing detached), so each group must be whole inside one loss
call; :mod:`cw_verl.whole_groups` makes verl's batching guarantee that and refuses the configurations
where it cannot. The token loss is verl's PPO clipped loss (as ``compute_policy_loss_vanilla``) with the
advantage ``w~ * A``; on-policy (one mini-batch per rollout batch, one epoch) the ratio is 1 up to the
old log-prob recomputation's numerics and the clip never binds, so the value and gradient are the released
code's ``-(w~ * exp(logp - stopgrad(logp)) * A)``. Its ``beta * k3`` KL term is verl's own
``use_kl_loss=True, kl_loss_type=low_var_kl``; its per-sequence token mean then mean over sequences is
``loss_agg_mode=seq-mean-token-mean``.

Side channel: verl's ``ppo_loss`` does not hand the micro-batch's ``uid`` to policy losses; it is read from
:func:`cw_verl.context.current_loss_call`, which ``cw_verl/patches/engine_context.py`` sets.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from cw_verl.authors_objective import Groups, authors_weights, sequence_advantages
from cw_verl.context import current_loss_call
from cw_verl.distributed import gather_flags, raise_together, resolve_data_parallel_group
from cw_verl.verl_losses import TABLE1_PERCENTILES, order_statistics, row_uids, verl_ppo_loss

AUTHORS_LOSS_MODE = "cw_grpo_authors"


class WholeGroupError(ValueError):
    """A loss call does not hold every prompt group whole; raised on every data-parallel rank together."""


def _problem(log_prob, old_log_prob, advantages, mask, uids, rollout_n) -> str | None:
    """Why this rank's call cannot compute the authors' objective (``None`` if it can)."""
    if not (log_prob.shape == old_log_prob.shape == advantages.shape == mask.shape) or log_prob.dim() != 2:
        return (
            f"log_prob, old_log_prob, advantages and response_mask must share one [batch, length] shape, got "
            f"{tuple(log_prob.shape)}, {tuple(old_log_prob.shape)}, {tuple(advantages.shape)}, {tuple(mask.shape)}"
        )
    valid = mask.bool()
    if not bool(torch.isfinite(log_prob.detach()[valid]).all() and torch.isfinite(advantages[valid]).all()):
        return "non-finite log-probs or advantages at valid positions; the authors' weights are undefined"
    if uids is None:
        return (
            f"{AUTHORS_LOSS_MODE} computes its statistics per prompt group and needs each sequence's 'uid' in the "
            "micro-batch (verl's trainers put it there; call the loss through a verl engine)"
        )
    if len(uids) != mask.shape[0]:
        return f"{len(uids)} uids for {mask.shape[0]} rows"
    sizes = Groups.from_labels(uids).sizes()
    if rollout_n is not None and not bool((sizes == rollout_n).all()):
        return (
            f"a loss call holds prompt groups of {sorted(set(sizes.tolist()))} responses, not whole groups of "
            f"rollout.n={rollout_n}. {AUTHORS_LOSS_MODE} needs every group whole in one micro-batch: keep "
            "actor.shuffle=False, ppo_micro_batch_size_per_gpu a multiple of rollout.n (or use_dynamic_bsz with "
            "cw_verl's whole-group batching), and no multi-trajectory outputs; see cw_verl.whole_groups"
        )
    return None


def _metrics(result, mask: torch.Tensor) -> dict[str, float]:
    valid = mask.bool()
    weights = result.weights.detach()[valid].double()
    cov = result.cov.detach()[valid].double()
    tokens = result.num_tokens
    total = float(tokens.sum())
    metrics = {
        # Token-weighted RMS of the groups' sigma (the released sigma, 1e-8 included).
        "actor/cw/sigma": math.sqrt(float((result.sigma.double() ** 2 * tokens).sum()) / total) if total else 0.0,
        "actor/cw/num_tokens": total,
        "actor/cw/weight_mean": float(weights.mean()) if weights.numel() else 1.0,
        "actor/cw/weight_min": float(weights.min()) if weights.numel() else 1.0,
        "actor/cw/weight_max": float(weights.max()) if weights.numel() else 1.0,
        "actor/cw/frac_below_half": float((weights < 0.5).double().mean()) if weights.numel() else 0.0,
        "actor/cw/cov_mean": float(cov.mean()) if cov.numel() else 0.0,
    }
    tails = order_statistics(result.cov.detach(), valid.to(result.cov.dtype), valid.sum()).tolist()
    names = [f"cov_{side}_top_{name}" for side in ("pos", "neg") for _, name in TABLE1_PERCENTILES]
    metrics.update({f"actor/cw/{name}": value for name, value in zip(names, tails, strict=True)})
    return metrics


def compute_policy_loss_cw_grpo_authors(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config=None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """verl policy loss ``cw_grpo_authors``: PPO's clipped loss with the released code's weights ``w~ * A``.

    Args:
        old_log_prob: ``[B, T]`` log-probs of the policy that sampled (verl's recomputation).
        log_prob: ``[B, T]`` current log-probs, with gradient; the weights are computed from them.
        advantages: ``[B, T]`` token advantages, one value per sequence (GRPO's outcome advantages).
        response_mask: ``[B, T]`` valid-token mask.
        loss_agg_mode: verl's aggregation; the released objective is ``seq-mean-token-mean``.
        config: verl's ``ActorConfig`` (clip ratios, ``rollout_n``, ``global_batch_info``).
        rollout_is_weights: ``[B, T]`` optional importance weights, multiplied into the token losses.

    Returns:
        ``(loss, metrics)``: the aggregated scalar loss and ``actor/cw/*``, ``actor/pg_*`` metrics.

    Raises:
        WholeGroupError: on every data-parallel rank, when any rank's call holds a partial prompt group or
            unusable input.
    """
    if config is None:
        raise ValueError(f"{AUTHORS_LOSS_MODE} needs the actor config (clip ratios, rollout_n, global_batch_info)")
    batch_info = getattr(config, "global_batch_info", None) or {}
    group = resolve_data_parallel_group(batch_info.get("dp_size"))
    call = current_loss_call()
    uids = row_uids(call.micro_batch if call is not None else None)
    rollout_n = getattr(config, "rollout_n", None)
    problem = _problem(log_prob, old_log_prob, advantages, response_mask, uids, rollout_n)
    if problem is None:
        try:
            seq_advantages = sequence_advantages(advantages, response_mask)
        except ValueError as error:
            problem = str(error)
    device = log_prob.device if isinstance(log_prob, torch.Tensor) else None
    raise_together(gather_flags(problem, group, device), problem, WholeGroupError, group)

    result = authors_weights(log_prob, seq_advantages, response_mask, Groups.from_labels(uids))
    metrics: dict[str, Any] = _metrics(result, response_mask)
    valid = response_mask.bool()
    if not bool(valid.any()):
        metrics.update({"actor/pg_clipfrac": 0.0, "actor/ppo_kl": 0.0, "actor/pg_clipfrac_lower": 0.0})
        # A zero that still reaches every parameter, so that all ranks run the same backward.
        return torch.where(valid, log_prob, 0.0).sum() * 0.0, metrics
    # The weights keep their gradient (the released objective); positions outside the mask weigh 0.
    weighted = torch.where(valid, result.weights * advantages.to(result.weights.dtype), 0.0)
    loss, pg_metrics = verl_ppo_loss(
        old_log_prob, log_prob, weighted, response_mask, loss_agg_mode, config, rollout_is_weights
    )
    metrics.update(pg_metrics)
    return loss, metrics
