"""Rules on verl's composed config, applied at every verl entry point before Ray or any worker starts.

A rule is a plain function ``rule(config, launch)`` of the composed config (a ``DictConfig``, whatever its
values came from: command line, YAML files, ``compose(overrides=...)``) and of the :class:`Launch` (which
trainer loop will run it). It either leaves the config alone, resolves a value left at verl's default
(and says so at WARNING level), or raises :class:`ConfigConflictError`. :data:`CONFIG_RULES` lists them in
the order they run, each seeing the changes of the ones before; a new rule is one more entry there.

:mod:`cw_verl.patches.entry_points` applies them in ``verl.trainer.main_ppo.run_ppo`` (every entry point
goes through it before ``ray.init``) and, for ``python -m verl.trainer.main_ppo`` (whose ``run_ppo`` is
``__main__``'s), in ``main_ppo.main``'s ``validate_config`` call; applying them twice changes nothing.

The rule for the loss: with a CW estimator (:data:`~cw_verl.registry.CW_ESTIMATORS`), ``policy_loss.loss_mode``
equal to verl's shipped default (``vanilla``) means "not chosen" and follows the estimator; a CW loss mode is
kept; any other loss mode is a conflict. This does not depend on where a value came from, so the same config
gives the same result on every entry point. Plain GRPO is ``algorithm.adv_estimator=grpo``.

The rule for rollout-correction bypass mode: allowed with cw_verl's losses in the v1 trainer (which keeps the
loss), refused in the trainers that rewrite the loss mode (:func:`bypass_mode_keeps_cw_verls_loss`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from omegaconf import DictConfig, OmegaConf

from cw_verl.ep_config import check_ep_grpo
from cw_verl.registry import CW_ESTIMATORS, CW_POLICY_LOSSES, OTHER_POLICY_LOSSES
from cw_verl.verl_config import (
    BYPASS_MODE_KEY,
    ESTIMATOR_KEY,
    LOSS_MODE_KEY,
    ConfigConflictError,
    Launch,
    launch_of,
    select,
    verl_default_loss_mode,
)
from cw_verl.verl_losses import CW_GRPO, GROUP_STATISTICS_LOSS_MODES
from cw_verl.whole_groups import check_whole_groups

__all__ = [
    "CONFIG_RULES",
    "ConfigConflictError",
    "Launch",
    "apply_config_rules",
    "cw_loss_modes",
    "launch_of",
]

logger = logging.getLogger(__name__)


def cw_loss_modes() -> set[str]:
    """Policy-loss names that implement CW-GRPO (:data:`~cw_verl.registry.CW_POLICY_LOSSES`)."""
    return set(CW_POLICY_LOSSES)


def apply_config_rules(config: DictConfig, launch: Launch) -> None:
    """Run every rule on ``config`` (in place).

    Raises:
        ConfigConflictError: from the first rule that finds a conflict.
    """
    for rule in CONFIG_RULES:
        rule(config, launch)


def loss_mode_follows_estimator(config: DictConfig, launch: Launch) -> None:
    """With a CW estimator, ``loss_mode`` left at verl's default follows it; another non-CW loss is a conflict."""
    estimator = select(config, ESTIMATOR_KEY)
    if estimator not in CW_ESTIMATORS:
        return
    default = verl_default_loss_mode()
    loss_mode = select(config, LOSS_MODE_KEY, default)
    if loss_mode in cw_loss_modes():
        return
    if loss_mode == default:
        OmegaConf.update(config, LOSS_MODE_KEY, CW_ESTIMATORS[estimator], merge=False)
        logger.warning(
            "cw_verl: %s=%s and %s is verl's default (%s), so it follows the estimator: %s (%s)",
            ESTIMATOR_KEY,
            estimator,
            LOSS_MODE_KEY,
            default,
            CW_ESTIMATORS[estimator],
            launch.entry_point,
        )
        return
    raise ConfigConflictError(
        f"{ESTIMATOR_KEY}={estimator} selects CW-GRPO, whose reweighting happens in the actor's policy loss, but "
        f"{LOSS_MODE_KEY}={loss_mode}. Leave loss_mode at verl's default ({default}: it then follows the "
        f"estimator), set it to one of {sorted(cw_loss_modes())}, or use {ESTIMATOR_KEY}=grpo for a {loss_mode} "
        f"baseline. ({launch.entry_point})"
    )


def bypass_mode_keeps_cw_verls_loss(config: DictConfig, launch: Launch) -> None:
    """Refuse verl's rollout-correction bypass mode with a loss of cw_verl's where verl rewrites the loss mode.

    Bypass mode (:data:`~cw_verl.verl_config.BYPASS_MODE_KEY`) takes the rollout's log-probs as
    ``old_log_probs`` instead of recomputing them. The v1 trainer does only that and keeps the configured loss
    (its statistics then come from the rollout's log-probs). The legacy trainer, ``one_step_off_policy`` and
    ``fully_async_policy`` (whose own configs default to bypass mode) also call ``apply_bypass_mode``, which
    sets ``loss_mode`` to verl's ``bypass_mode`` loss. In verl 0.9.1 they do so on the driver's config during
    ``fit``, after the actor workers were built from it, so which loss the workers train follows that
    ordering, not the config: either cw_verl's loss is replaced (CW-GRPO silently off) or verl's bypass loss
    settings (``loss_type``, rejection sampling) are silently not applied. Refused before Ray starts.
    cw_verl's losses here: the CW losses (also selected by a CW estimator) and ``OTHER_POLICY_LOSSES``.
    """
    if not launch.rewrites_loss_in_bypass_mode or not select(config, BYPASS_MODE_KEY, False):
        return
    loss_mode = select(config, LOSS_MODE_KEY)
    estimator = select(config, ESTIMATOR_KEY)
    if loss_mode not in cw_loss_modes() | set(OTHER_POLICY_LOSSES) and estimator not in CW_ESTIMATORS:
        return
    raise ConfigConflictError(
        f"{BYPASS_MODE_KEY}=True with {LOSS_MODE_KEY}={loss_mode} ({ESTIMATOR_KEY}={estimator}): {launch.entry_point} "
        f"rewrites the loss mode to verl's 'bypass_mode' loss in bypass mode (apply_bypass_mode), so cw_verl's "
        f"{loss_mode} would not reliably be the loss that trains. Set {BYPASS_MODE_KEY}=False (verl then recomputes "
        "old_log_probs with the actor), or run verl's v1 trainer (verl.trainer.main_ppo with trainer.use_v1=True, "
        "any trainer.v1.trainer_mode), which keeps the loss in bypass mode."
    )


def group_scope_needs_whole_groups(config: DictConfig, launch: Launch) -> None:
    """``cw_grpo_group`` (and ``vanilla_cw_metrics``) need every prompt's responses in one optimizer mini-batch.

    verl reorders each update's batch over data-parallel ranks (``trainer.balance_batch``) and every rank
    slices its chunk into mini-batches, so a group stays whole only when each update is one mini-batch:
    ``ppo_mini_batch_size`` equal to the prompts the trainer loop hands to one update (the paper's
    on-policy setting). The loss also checks every group's size at run time.
    """
    loss_mode = select(config, LOSS_MODE_KEY)
    if loss_mode not in GROUP_STATISTICS_LOSS_MODES or launch.prompts_per_update is None:
        return
    mini = select(config, "actor_rollout_ref.actor.ppo_mini_batch_size")
    if mini is not None and int(mini) != int(launch.prompts_per_update):
        raise ConfigConflictError(
            f"{LOSS_MODE_KEY}={loss_mode} computes statistics per prompt group, which needs each prompt's responses in "
            f"one optimizer mini-batch; with {launch.entry_point} each actor update holds {launch.prompts_per_update} "
            f"prompts, so ppo_mini_batch_size={mini} splits groups over mini-batches. Set "
            f"actor_rollout_ref.actor.ppo_mini_batch_size={launch.prompts_per_update}, or use {CW_GRPO} (the "
            "mini-batch scope)."
        )


def ep_grpo_can_be_fed(config: DictConfig, launch: Launch) -> None:
    """:func:`cw_verl.ep_config.check_ep_grpo` (``launch`` is not needed)."""
    check_ep_grpo(config)


def whole_groups_for_whole_group_losses(config: DictConfig, launch: Launch) -> None:
    """:func:`cw_verl.whole_groups.check_whole_groups` for the loop ``launch`` names."""
    check_whole_groups(config, legacy_loop=launch.legacy_loop)


CONFIG_RULES: tuple[Callable[[DictConfig, Launch], None], ...] = (
    loss_mode_follows_estimator,
    bypass_mode_keeps_cw_verls_loss,
    group_scope_needs_whole_groups,
    ep_grpo_can_be_fed,
    whole_groups_for_whole_group_losses,
)
"""The rules, in the order they run: the loss mode is settled first, since the others read it."""
