"""How ``algorithm.adv_estimator=cw_grpo`` and the actor's ``policy_loss.loss_mode`` fit together.

The user's single switch is ``algorithm.adv_estimator=cw_grpo``: the estimator is GRPO's, and the
reweighting lives in the ``cw_grpo`` policy loss, so the actor's ``loss_mode`` follows the estimator
when it is left at verl's default. Any other explicit choice contradicts the switch and is an error.
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig, OmegaConf

from cw_verl.verl_losses import CW_GRPO, GROUP, LOSS_MODES

logger = logging.getLogger(__name__)

LOSS_MODE_KEY = "actor_rollout_ref.actor.policy_loss.loss_mode"
ESTIMATOR_KEY = "algorithm.adv_estimator"
VERL_DEFAULT_LOSS_MODE = "vanilla"


class ConfigConflictError(ValueError):
    """The configuration asks for CW-GRPO and for something that contradicts it."""


def cw_loss_modes() -> set[str]:
    """Policy-loss names that implement CW-GRPO (one per statistics scope, and the authors' released objective)."""
    from cw_verl.authors_loss import AUTHORS_LOSS_MODE

    return set(LOSS_MODES) | {AUTHORS_LOSS_MODE}


def explicit_override_keys(overrides: list[str]) -> set[str]:
    """Config keys set on the command line (``key=value``, ``+key=value``, ``++key=value``)."""
    keys = set()
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        keys.add(key)
    return keys


def align_loss_mode_with_estimator(config: DictConfig, explicit_keys: set[str]) -> str | None:
    """Apply the rule to ``config`` in place; return the loss mode set, or ``None`` if unchanged.

    Raises:
        ConfigConflictError: ``adv_estimator=cw_grpo`` with an explicitly chosen non-CW loss mode.
    """
    if OmegaConf.select(config, ESTIMATOR_KEY) != CW_GRPO:
        return None
    loss_mode = OmegaConf.select(config, LOSS_MODE_KEY, default=VERL_DEFAULT_LOSS_MODE)
    if loss_mode in cw_loss_modes():
        return None
    if loss_mode == VERL_DEFAULT_LOSS_MODE and LOSS_MODE_KEY not in explicit_keys:
        OmegaConf.update(config, LOSS_MODE_KEY, CW_GRPO, merge=False)
        logger.warning("cw_verl: %s=%s, so %s follows it: %s", ESTIMATOR_KEY, CW_GRPO, LOSS_MODE_KEY, CW_GRPO)
        return CW_GRPO
    raise ConfigConflictError(
        f"{ESTIMATOR_KEY}=cw_grpo selects CW-GRPO, whose reweighting happens in the actor's policy loss, but "
        f"{LOSS_MODE_KEY}={loss_mode}. Drop the loss_mode override (it then follows the estimator), set it to "
        f"one of {sorted(cw_loss_modes())}, or use {ESTIMATOR_KEY}=grpo for a {loss_mode} baseline."
    )


def check_group_scope(config: DictConfig) -> None:
    """``cw_grpo_group`` needs every prompt's responses in one optimizer mini-batch.

    verl reorders the batch over data-parallel ranks (``trainer.balance_batch``) and each rank slices its
    chunk into mini-batches, so with several mini-batches per step a group's responses land in different
    ones. One mini-batch per step (the paper's on-policy setting) keeps every group whole.

    Raises:
        ConfigConflictError: several mini-batches per step with the group scope.
    """
    loss_mode = OmegaConf.select(config, LOSS_MODE_KEY, default=VERL_DEFAULT_LOSS_MODE)
    if LOSS_MODES.get(loss_mode) != GROUP:
        return
    mini = OmegaConf.select(config, "actor_rollout_ref.actor.ppo_mini_batch_size")
    batch = OmegaConf.select(config, "data.train_batch_size")
    if mini is not None and batch is not None and mini != batch:
        raise ConfigConflictError(
            f"{LOSS_MODE_KEY}={loss_mode} computes statistics per prompt group, which needs each prompt's responses "
            f"in one optimizer mini-batch; ppo_mini_batch_size={mini} < data.train_batch_size={batch} splits groups "
            f"over mini-batches. Set actor_rollout_ref.actor.ppo_mini_batch_size={batch}, or use {CW_GRPO} (the "
            "mini-batch scope)."
        )
