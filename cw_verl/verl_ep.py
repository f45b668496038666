"""EP-GRPO as a verl advantage estimator: ``algorithm.adv_estimator=ep_grpo``.

The estimator runs on the trainer's driver, once per step, on the whole batch (legacy
``ray_trainer.compute_advantage``; the v1 trainer's ``_compute_advantage``), so every statistic that
spans sequences (entropy mean/std, bucket mean/std) is global over the step's batch by construction and
does not depend on the actor's data-parallel size or micro-batching: the actor receives fixed
``advantages`` and runs verl's vanilla PPO/GRPO loss on them.

verl's ``compute_advantage`` hands registered estimators only rewards, mask, config and uid; the entropy,
old and reference log-probs reach :func:`compute_ep_grpo_advantage` through
:mod:`cw_verl.patches.ep_inputs`.
"""

from __future__ import annotations

import numpy as np
import torch

from cw_verl.ep import ep_diagnostics, ep_token_advantages
from cw_verl.ep_config import EP_GRPO, ep_config_from_algorithm


def group_ids(index) -> torch.Tensor:
    """``[B]`` int64 group ids from verl's uid array (same uid, same id)."""
    _, inverse = np.unique(np.asarray([str(uid) for uid in index]), return_inverse=True)
    return torch.as_tensor(inverse.reshape(-1), dtype=torch.int64)


def compute_ep_grpo_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    config=None,
    index: np.ndarray | None = None,
    entropy: torch.Tensor | None = None,
    old_log_probs: torch.Tensor | None = None,
    ref_log_prob: torch.Tensor | None = None,
    norm_adv_by_std_in_grpo: bool | None = None,
    epsilon: float = 1e-6,
    metrics: dict | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """EP-GRPO token advantages (issue 12): ``A = W * A_grpo + lambda * d * bucketnorm(log pi_old - log pi_ref)``.

    Args:
        token_level_rewards: ``[B, T]``; the sequence reward is the row sum.
        response_mask: ``[B, T]``.
        config: verl's ``algorithm`` section (``norm_adv_by_std_in_grpo``; knobs under ``ep_grpo``).
        index: ``[B]`` prompt uids.
        entropy: ``[B, T]`` actor entropy from the old-log-prob pass.
        old_log_probs: ``[B, T]``.
        ref_log_prob: ``[B, T]``.
        norm_adv_by_std_in_grpo: GRPO's std normalisation of A_i; ``None`` reads it from ``config`` (default True).
        epsilon: GRPO's std epsilon.
        metrics: if given, receives the step's :func:`~cw_verl.ep.ep_diagnostics` (``ep/*``); verl's
            ``compute_advantage`` passes none (a registered estimator returns only tensors), cw_verl's
            ``ep_inputs`` patch does and hands them to the trainer's metrics.

    Returns:
        ``(advantages, returns)``, both ``[B, T]`` in the rewards' dtype, 0 on padding.

    Raises:
        RuntimeError: an input is missing (the plugin's ``ep_inputs`` patch did not run, or no reference policy).
    """
    missing = [
        name
        for name, value in (
            ("index (uid)", index),
            ("entropy", entropy),
            ("old_log_probs", old_log_probs),
            ("ref_log_prob", ref_log_prob),
        )
        if value is None
    ]
    if missing:
        raise RuntimeError(
            f"adv_estimator={EP_GRPO} got no {', '.join(missing)}. verl passes registered estimators only rewards "
            "and mask; cw_verl's ep_inputs patch adds the rest (is the cw_verl plugin loaded?), and ref_log_prob "
            "exists only with a reference policy (actor_rollout_ref.actor.use_kl_loss=true)."
        )
    from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage

    norm_by_std = norm_adv_by_std_in_grpo
    if norm_by_std is None:
        norm_by_std = True if config is None else config.get("norm_adv_by_std_in_grpo", True)
    sequence_mask = torch.ones_like(response_mask[:, :1])
    outcome, _ = compute_grpo_outcome_advantage(
        token_level_rewards, sequence_mask, index, epsilon=epsilon, norm_adv_by_std_in_grpo=norm_by_std
    )
    scores, group = token_level_rewards.sum(dim=-1), group_ids(index)
    result = ep_token_advantages(
        scores=scores,
        outcome_advantage=outcome[:, 0],
        group=group,
        entropy=entropy,
        old_log_prob=old_log_probs,
        ref_log_prob=ref_log_prob,
        response_mask=response_mask,
        config=ep_config_from_algorithm(config),
    )
    if metrics is not None:
        metrics.update(ep_diagnostics(result, scores, group, response_mask))
    advantages = result.advantages.to(token_level_rewards.dtype)
    return advantages, advantages
