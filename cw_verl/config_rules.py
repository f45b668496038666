"""Rules on verl's composed config, applied at every verl entry point before Ray or any worker starts.

A rule is a function ``rule(config, launch)`` of the composed config (a ``DictConfig``, whatever its
values came from: command line, YAML files, ``compose(overrides=...)``) and of the :class:`Launch` (which
trainer loop will run it). It either leaves the config alone, resolves a value left at verl's default
(and says so at WARNING level), or raises :class:`ConfigConflictError`. Rules run in registration order,
each seeing the changes of the ones before; add one with the :func:`config_rule` decorator::

    @config_rule
    def my_rule(config, launch): ...

:mod:`cw_verl.patches.entry_points` applies :data:`CONFIG_RULES` in ``verl.trainer.main_ppo.run_ppo`` (every
entry point goes through it before ``ray.init``) and in ``main_ppo.main``'s ``validate_config`` call (for
``python -m verl.trainer.main_ppo``, whose ``run_ppo`` is ``__main__``'s); applying them twice changes
nothing.

The rule for the loss: with a CW estimator (:data:`CW_ESTIMATORS`), ``policy_loss.loss_mode`` equal to
verl's shipped default (``vanilla``) means "not chosen" and follows the estimator; a CW loss mode is kept;
any other loss mode is a conflict. This does not depend on where a value came from, so the same config
gives the same result on every entry point. Plain GRPO is ``algorithm.adv_estimator=grpo``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf

from cw_verl.verl_losses import CW_GRPO, GROUP_STATISTICS_LOSS_MODES, POLICY_LOSSES

logger = logging.getLogger(__name__)

LOSS_MODE_KEY = "actor_rollout_ref.actor.policy_loss.loss_mode"
ESTIMATOR_KEY = "algorithm.adv_estimator"

CW_ESTIMATORS: dict[str, str] = {CW_GRPO: CW_GRPO}
"""CW advantage estimators and the loss mode each selects when ``loss_mode`` is left at verl's default."""


class ConfigConflictError(ValueError):
    """The configuration asks for CW-GRPO and for something that contradicts it."""


def verl_default_loss_mode() -> str:
    """The ``loss_mode`` verl ships as default (``PolicyLossConfig.loss_mode``: ``vanilla`` in 0.9.1)."""
    import dataclasses

    from verl.workers.config import PolicyLossConfig

    return next(f.default for f in dataclasses.fields(PolicyLossConfig) if f.name == "loss_mode")


def cw_loss_modes() -> set[str]:
    """Policy-loss names that implement CW-GRPO (every loss cw_verl registers)."""
    return set(POLICY_LOSSES)


@dataclass(frozen=True)
class Launch:
    """Which verl trainer loop runs the config: what a rule may need beyond the config itself.

    ``prompts_per_update``: prompts in each batch the trainer hands to one actor update (it slices that
    batch into ``ppo_mini_batch_size``-prompt optimizer mini-batches), or ``None`` when unknown.
    """

    entry_point: str
    prompts_per_update: int | None


def _select(config: DictConfig, key: str, default=None):
    return OmegaConf.select(config, key, default=default)


def launch_of(config: DictConfig, runner: str) -> Launch:
    """The :class:`Launch` of ``config`` run by verl's task runner class named ``runner``.

    verl 0.9.1's runners: ``TaskRunnerV1`` (``main_ppo`` with ``trainer.use_v1``; each step makes
    ``trainer.v1.<mode>.parameter_sync_step`` local updates, default 1), ``TaskRunner`` (``main_ppo_v0``,
    one update per step), ``OneStepTaskRunner`` (``one_step_off_policy``, one update per step) and
    ``FullyAsyncTaskRunner`` (``fully_async_policy``: ``async_training.require_batches`` mini-batches per
    update). Another runner is treated as the one ``main_ppo`` would pick for this config.
    """
    train_batch = _select(config, "data.train_batch_size")
    if runner == "FullyAsyncTaskRunner":
        mini = _select(config, "actor_rollout_ref.actor.ppo_mini_batch_size")
        batches = _select(config, "async_training.require_batches", 1)
        return Launch("fully_async_policy", None if mini is None else int(mini) * int(batches))
    if runner == "OneStepTaskRunner":
        return Launch("one_step_off_policy", train_batch)
    if runner not in ("TaskRunnerV1", "TaskRunner"):
        runner = "TaskRunnerV1" if _select(config, "trainer.use_v1", True) else "TaskRunner"
    if runner == "TaskRunner":
        return Launch("main_ppo (legacy trainer)", train_batch)
    mode = _select(config, "trainer.v1.trainer_mode", "sync")
    sync_step = int(_select(config, f"trainer.v1.{mode}.parameter_sync_step", 1) or 1)
    per_update = None if train_batch is None else int(train_batch) // sync_step
    return Launch(f"main_ppo (v1 {mode})", per_update)


CONFIG_RULES: list[Callable[[DictConfig, Launch], None]] = []
"""The rules, in the order they run."""


def config_rule(rule: Callable[[DictConfig, Launch], None]):
    """Decorator: append ``rule`` to :data:`CONFIG_RULES`."""
    CONFIG_RULES.append(rule)
    return rule


def apply_config_rules(config: DictConfig, launch: Launch) -> None:
    """Run every rule on ``config`` (in place).

    Raises:
        ConfigConflictError: from the first rule that finds a conflict.
    """
    for rule in CONFIG_RULES:
        rule(config, launch)


@config_rule
def loss_mode_follows_estimator(config: DictConfig, launch: Launch) -> None:
    """With a CW estimator, ``loss_mode`` left at verl's default follows it; another non-CW loss is a conflict."""
    estimator = _select(config, ESTIMATOR_KEY)
    if estimator not in CW_ESTIMATORS:
        return
    default = verl_default_loss_mode()
    loss_mode = _select(config, LOSS_MODE_KEY, default)
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


@config_rule
def group_scope_needs_whole_groups(config: DictConfig, launch: Launch) -> None:
    """``cw_grpo_group`` (and ``vanilla_cw_metrics``) need every prompt's responses in one optimizer mini-batch.

    verl reorders each update's batch over data-parallel ranks (``trainer.balance_batch``) and every rank
    slices its chunk into mini-batches, so a group stays whole only when each update is one mini-batch:
    ``ppo_mini_batch_size`` equal to the prompts the trainer loop hands to one update (the paper's
    on-policy setting). The loss also checks every group's size at run time.
    """
    loss_mode = _select(config, LOSS_MODE_KEY)
    if loss_mode not in GROUP_STATISTICS_LOSS_MODES or launch.prompts_per_update is None:
        return
    mini = _select(config, "actor_rollout_ref.actor.ppo_mini_batch_size")
    if mini is not None and int(mini) != int(launch.prompts_per_update):
        raise ConfigConflictError(
            f"{LOSS_MODE_KEY}={loss_mode} computes statistics per prompt group, which needs each prompt's responses in "
            f"one optimizer mini-batch; with {launch.entry_point} each actor update holds {launch.prompts_per_update} "
            f"prompts, so ppo_mini_batch_size={mini} splits groups over mini-batches. Set "
            f"actor_rollout_ref.actor.ppo_mini_batch_size={launch.prompts_per_update}, or use {CW_GRPO} (the "
            "mini-batch scope)."
        )


# Modules that add a CW loss mode (to verl_losses.POLICY_LOSSES) or a rule (with @config_rule); imported
# last because they import this module.
from cw_verl import authors_loss, ep_config, whole_groups  # noqa: E402, F401
