"""The worker's last line of defence: advantages from a CW estimator never train with a non-CW loss (verl 0.9.1).

The config rules (:mod:`cw_verl.config_rules`) stop such a config before Ray starts at every entry point
that goes through verl's ``run_ppo``. A launcher that builds verl's trainer without it would otherwise
train plain GRPO on ``cw_grpo`` advantages, silently. verl gives the actor's workers no view of
``algorithm.adv_estimator``, so the driver marks the batch (a side channel through verl's own batch fields):

- **set** in the driver, where the advantages are computed: ``verl.trainer.ppo.ray_trainer.compute_advantage``
  (legacy trainer, ``one_step_off_policy``, ``fully_async_policy``) records the CW estimator in the batch's
  ``meta_info[MARK]``, which ``DataProto.to_tensordict`` turns into a non-tensor field of the actor's update
  batch; the v1 trainer keeps its batches in TransferQueue, so ``PPOTrainer._compute_advantage`` records it
  in ``KVBatchMeta.extra_info[MARK]``, which the worker's fetch turns into the same field.
- **read** in every actor worker: ``core_algos.get_policy_loss_fn``, which verl's ``ppo_loss`` calls on every
  micro-batch, looks at the mini-batch ``BaseEngine.train_batch`` is training
  (:func:`cw_verl.context.current_train_batch`) and refuses a non-CW loss for a marked batch. Every rank
  has the same config and batch marks, so every rank raises at the same call.
"""

from __future__ import annotations

import functools
import inspect

from cw_verl.config_rules import cw_loss_modes
from cw_verl.context import current_train_batch
from cw_verl.registry import CW_ESTIMATORS
from cw_verl.verl_config import ESTIMATOR_KEY, LOSS_MODE_KEY, ConfigConflictError

MARK = "cw_verl_adv_estimator"
MARKER = "_cw_verl_advantage_source"


def _name(estimator) -> str:
    return str(getattr(estimator, "value", estimator))


def marked_estimator(batch) -> str | None:
    """The CW estimator a batch's advantages came from (``None`` if unmarked)."""
    if batch is None or MARK not in batch.keys():
        return None
    from verl.utils import tensordict_utils as tu

    return tu.get(batch, MARK)


def check_policy_loss(loss_mode: str) -> None:
    """Raise if the mini-batch being trained carries CW advantages and ``loss_mode`` is not a CW loss."""
    call = current_train_batch()
    estimator = marked_estimator(call.mini_batch) if call is not None else None
    if estimator is not None and loss_mode not in cw_loss_modes():
        raise ConfigConflictError(
            f"this batch's advantages come from {ESTIMATOR_KEY}={estimator} (CW-GRPO), but the actor's "
            f"{LOSS_MODE_KEY}={loss_mode} would train it as plain PPO/GRPO. cw_verl's config rules were not "
            "applied (a launcher that bypasses verl's run_ppo?): apply cw_verl.config_rules.apply_config_rules "
            "to the config, or set the loss mode to a CW loss."
        )


def patch_policy_loss_lookup(core_algos) -> None:
    """Post-import hook for ``verl.trainer.ppo.core_algos`` (the reading side)."""
    original = core_algos.get_policy_loss_fn
    if getattr(original, MARKER, False):
        return

    @functools.wraps(original)
    def get_policy_loss_fn(name):
        check_policy_loss(name)
        return original(name)

    setattr(get_policy_loss_fn, MARKER, True)
    core_algos.get_policy_loss_fn = get_policy_loss_fn


def patch_compute_advantage(ray_trainer) -> None:
    """Post-import hook for ``verl.trainer.ppo.ray_trainer`` (the marking side, DataProto batches)."""
    original = ray_trainer.compute_advantage
    if getattr(original, MARKER, False):
        return
    signature = inspect.signature(original)

    @functools.wraps(original)
    def compute_advantage(*args, **kwargs):
        data = original(*args, **kwargs)
        estimator = _name(signature.bind(*args, **kwargs).arguments["adv_estimator"])
        if estimator in CW_ESTIMATORS:
            data.meta_info[MARK] = estimator
        return data

    setattr(compute_advantage, MARKER, True)
    ray_trainer.compute_advantage = compute_advantage


def patch_v1_compute_advantage(trainer_base) -> None:
    """Post-import hook for ``verl.trainer.ppo.v1.trainer_base`` (the marking side, TransferQueue batches)."""
    trainer = trainer_base.PPOTrainer
    original = trainer._compute_advantage
    if getattr(original, MARKER, False):
        return

    @functools.wraps(original)
    def _compute_advantage(self, batch, *args, **kwargs):
        batch = original(self, batch, *args, **kwargs)
        estimator = _name(self.config.algorithm.adv_estimator)
        if estimator in CW_ESTIMATORS:
            batch.extra_info[MARK] = estimator
        return batch

    setattr(_compute_advantage, MARKER, True)
    trainer._compute_advantage = _compute_advantage
