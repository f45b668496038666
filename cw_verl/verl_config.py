"""Reading verl's composed config: the keys cw_verl reads, the trainer loop that runs it, the conflict error.

The base of the config rules (:mod:`cw_verl.config_rules`) and of the modules whose checks those rules run
(:mod:`cw_verl.ep_config`, :mod:`cw_verl.whole_groups`): it imports none of them, so the rules can import
all of them.
"""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf

LOSS_MODE_KEY = "actor_rollout_ref.actor.policy_loss.loss_mode"
ESTIMATOR_KEY = "algorithm.adv_estimator"
BYPASS_MODE_KEY = "algorithm.rollout_correction.bypass_mode"


class ConfigConflictError(ValueError):
    """The configuration asks for CW-GRPO and for something that contradicts it."""


def verl_default_loss_mode() -> str:
    """The ``loss_mode`` verl ships as default (``PolicyLossConfig.loss_mode``: ``vanilla`` in 0.9.1)."""
    import dataclasses

    from verl.workers.config import PolicyLossConfig

    return next(f.default for f in dataclasses.fields(PolicyLossConfig) if f.name == "loss_mode")


@dataclass(frozen=True)
class Launch:
    """Which verl trainer loop runs the config: what a rule may need beyond the config itself.

    ``prompts_per_update``: prompts in each batch the trainer hands to one actor update (it slices that
    batch into ``ppo_mini_batch_size``-prompt optimizer mini-batches), or ``None`` when unknown.
    ``legacy_loop``: verl's legacy ``RayPPOTrainer`` loop runs it (``main_ppo`` with ``trainer.use_v1=False``, and
    ``one_step_off_policy`` / ``fully_async_policy``, whose ``SeparateRayPPOTrainer`` inherits it) rather than the v1
    trainer. That loop balances each batch over data-parallel ranks sequence by sequence, not by prompt group
    (``_balance_batch``), and calls verl's ``apply_bypass_mode`` when :data:`BYPASS_MODE_KEY` is set, which
    rewrites ``policy_loss.loss_mode`` to verl's ``bypass_mode`` loss (verl 0.9.1: ``RayPPOTrainer.fit`` and
    ``SeparateRayPPOTrainer._fit_compute_log_prob``); the v1 trainer only takes the rollout's log-probs as
    ``old_log_probs`` and keeps the loss.
    """

    entry_point: str
    prompts_per_update: int | None
    legacy_loop: bool = False

    @property
    def rewrites_loss_in_bypass_mode(self) -> bool:
        return self.legacy_loop


def select(config: DictConfig, key: str, default=None):
    """``OmegaConf.select`` with a default: the value at dotted ``key``, or ``default`` when absent."""
    return OmegaConf.select(config, key, default=default)


def launch_of(config: DictConfig, runner: str) -> Launch:
    """The :class:`Launch` of ``config`` run by verl's task runner class named ``runner``.

    verl 0.9.1's runners: ``TaskRunnerV1`` (``main_ppo`` with ``trainer.use_v1``; each step makes
    ``trainer.v1.<mode>.parameter_sync_step`` local updates, default 1), ``TaskRunner`` (``main_ppo_v0``,
    one update per step), ``OneStepTaskRunner`` (``one_step_off_policy``, one update per step) and
    ``FullyAsyncTaskRunner`` (``fully_async_policy``: ``async_training.require_batches`` mini-batches per
    update). Another runner is treated as the one ``main_ppo`` would pick for this config.
    """
    train_batch = select(config, "data.train_batch_size")
    if runner == "FullyAsyncTaskRunner":
        mini = select(config, "actor_rollout_ref.actor.ppo_mini_batch_size")
        batches = select(config, "async_training.require_batches", 1)
        return Launch("fully_async_policy", None if mini is None else int(mini) * int(batches), True)
    if runner == "OneStepTaskRunner":
        return Launch("one_step_off_policy", train_batch, True)
    if runner not in ("TaskRunnerV1", "TaskRunner"):
        runner = "TaskRunnerV1" if select(config, "trainer.use_v1", True) else "TaskRunner"
    if runner == "TaskRunner":
        return Launch("main_ppo (legacy trainer)", train_batch, True)
    mode = select(config, "trainer.v1.trainer_mode", "sync")
    sync_step = int(select(config, f"trainer.v1.{mode}.parameter_sync_step", 1) or 1)
    per_update = None if train_batch is None else int(train_batch) // sync_step
    return Launch(f"main_ppo (v1 {mode})", per_update)
