"""verl 0.9.1: hand ``adv_estimator=ep_grpo`` the entropy, old and reference log-probs it needs.

``ray_trainer.compute_advantage`` passes a registered estimator only ``token_level_rewards``,
``response_mask``, ``config`` and ``index``. For ``ep_grpo`` (and only for it) the wrapper below calls
:func:`cw_verl.verl_ep.compute_ep_grpo_advantage` with ``old_log_probs`` and ``ref_log_prob`` from the
batch and the entropy from one of two side channels, because both trainers drop it before that point:

- legacy ``RayPPOTrainer``: ``_compute_old_log_prob`` returns ``entropys``, which ``fit`` pops before
  merging into the batch; the wrapper copies it to :data:`~cw_verl.context.EP_ENTROPY_KEY` (set here),
  and ``compute_advantage`` pops that key again (read here), so it never reaches the actor.
- v1 trainer (``trainer_base.PPOTrainer``): the old-log-prob pass stores ``entropy`` in TransferQueue, but
  ``_compute_advantage`` fetches a fixed field list without it. The wrapper fetches it for the same keys
  and holds it in :func:`cw_verl.context.current_ep_entropy` for the duration of the call (set and read here only).

The estimator's diagnostics (``ep/*``, :func:`cw_verl.ep.ep_diagnostics`) reach the step's logged metrics
through two more side channels, because a registered estimator returns only tensors and neither trainer
hands ``compute_advantage`` its metrics dict (both listed in :mod:`cw_verl.context`):

- legacy: the wrapper stores them in the returned batch's ``meta_info[EP_METRICS_KEY]`` (set here); the
  wrapper of ``ray_trainer.compute_data_metrics``, which ``fit`` calls on the same batch after the update,
  pops them into its result (read here). Until then they travel with the batch as one small dict.
- v1: ``PPOTrainer._compute_advantage`` receives the step's ``metrics`` dict; its wrapper holds a dict in
  :func:`cw_verl.context.current_ep_metrics` for the duration of the call (set here), which the estimator's
  wrapper fills, and merges it into ``metrics`` afterwards (read here).

Any other estimator goes through verl's functions untouched.
"""

from __future__ import annotations

import functools
import inspect
import sys

from cw_verl.context import EP_ENTROPY_KEY, EP_METRICS_KEY, current_ep_entropy, current_ep_metrics, ep_advantage_call
from cw_verl.ep_config import EP_GRPO

MARKER = "_cw_verl_ep_inputs"
V1_UTILS = "verl.trainer.ppo.v1.utils"


def _is_ep(adv_estimator) -> bool:
    return getattr(adv_estimator, "value", adv_estimator) == EP_GRPO


def _ep_compute_advantage(data, config, norm_adv_by_std_in_grpo):
    from verl.trainer.ppo.ray_trainer import compute_response_mask

    from cw_verl.verl_ep import compute_ep_grpo_advantage

    if "response_mask" not in data.batch.keys():
        data.batch["response_mask"] = compute_response_mask(data)
    batch = data.batch
    entropy = batch.pop(EP_ENTROPY_KEY) if EP_ENTROPY_KEY in batch.keys() else current_ep_entropy()
    mask_shape = tuple(batch["response_mask"].shape)
    if entropy is not None and tuple(entropy.shape) != mask_shape:
        raise RuntimeError(f"ep_grpo: entropy has shape {tuple(entropy.shape)}, response_mask {mask_shape}")
    metrics: dict[str, float] = {}
    advantages, returns = compute_ep_grpo_advantage(
        token_level_rewards=batch["token_level_rewards"],
        response_mask=batch["response_mask"],
        config=config,
        index=data.non_tensor_batch.get("uid"),
        entropy=entropy,
        old_log_probs=batch.get("old_log_probs", None),
        ref_log_prob=batch.get("ref_log_prob", None),
        norm_adv_by_std_in_grpo=norm_adv_by_std_in_grpo,
        metrics=metrics,
    )
    batch["advantages"] = advantages
    batch["returns"] = returns
    data.meta_info[EP_METRICS_KEY] = metrics
    v1_metrics = current_ep_metrics()
    if v1_metrics is not None:
        v1_metrics.update(metrics)
    return data


def _wrap_compute_advantage(original):
    signature = inspect.signature(original)

    @functools.wraps(original)
    def compute_advantage(data, adv_estimator, *args, **kwargs):
        if not _is_ep(adv_estimator):
            return original(data, adv_estimator, *args, **kwargs)
        bound = signature.bind(data, adv_estimator, *args, **kwargs)
        bound.apply_defaults()
        return _ep_compute_advantage(data, bound.arguments["config"], bound.arguments["norm_adv_by_std_in_grpo"])

    setattr(compute_advantage, MARKER, original)
    return compute_advantage


def _rebind_v1_utils(original, patched) -> None:
    v1_utils = sys.modules.get(V1_UTILS)
    if v1_utils is not None and getattr(v1_utils, "compute_advantage", None) is original:
        v1_utils.compute_advantage = patched


def patch_ray_trainer(module) -> None:
    """Post-import hook for ``verl.trainer.ppo.ray_trainer``."""
    if getattr(module.compute_advantage, MARKER, None) is not None:
        return
    original = module.compute_advantage
    module.compute_advantage = _wrap_compute_advantage(original)
    _rebind_v1_utils(original, module.compute_advantage)

    module.compute_data_metrics = wrap_compute_data_metrics(module.compute_data_metrics)
    trainer = module.RayPPOTrainer
    trainer._compute_old_log_prob = wrap_old_log_prob(trainer._compute_old_log_prob)


def wrap_compute_data_metrics(original):
    """Legacy trainer's ``compute_data_metrics(batch, use_critic)``: add the ``ep/*`` diagnostics that the
    ``ep_grpo`` step left in ``batch.meta_info`` (and remove them from the batch)."""

    @functools.wraps(original)
    def compute_data_metrics(batch, *args, **kwargs):
        metrics = original(batch, *args, **kwargs)
        metrics.update(batch.meta_info.pop(EP_METRICS_KEY, {}))
        return metrics

    return compute_data_metrics


def wrap_old_log_prob(original):
    """Legacy ``RayPPOTrainer._compute_old_log_prob``: keep the entropy that ``fit`` pops, for ``ep_grpo`` only."""

    @functools.wraps(original)
    def _compute_old_log_prob(self, batch, *args, **kwargs):
        result = original(self, batch, *args, **kwargs)
        if _is_ep(self.config.algorithm.adv_estimator):
            old_log_prob = result[0] if isinstance(result, tuple) else result
            old_log_prob.batch[EP_ENTROPY_KEY] = old_log_prob.batch["entropys"]
        return result

    return _compute_old_log_prob


def patch_v1_trainer(module) -> None:
    """Post-import hook for ``verl.trainer.ppo.v1.trainer_base``."""
    trainer = module.PPOTrainer
    if getattr(trainer._compute_advantage, MARKER, None) is not None:
        return
    ray_trainer = sys.modules["verl.trainer.ppo.ray_trainer"]
    original = getattr(ray_trainer.compute_advantage, MARKER, None)
    if original is not None:
        _rebind_v1_utils(original, ray_trainer.compute_advantage)
    trainer._compute_advantage = wrap_v1_compute_advantage(trainer._compute_advantage, module)


def wrap_v1_compute_advantage(original, trainer_module):
    """v1 ``PPOTrainer._compute_advantage(batch, metrics)``: for ``ep_grpo``, fetch the entropy the old-log-prob
    pass stored in TransferQueue (``trainer_module.tq``) and hold it in
    :func:`cw_verl.context.current_ep_entropy` during the call; collect the estimator's ``ep/*`` diagnostics in
    :func:`cw_verl.context.current_ep_metrics` and add them to the step's ``metrics``."""
    signature = inspect.signature(original)

    @functools.wraps(original)
    def _compute_advantage(self, batch, *args, **kwargs):
        if not _is_ep(self.config.algorithm.adv_estimator):
            return original(self, batch, *args, **kwargs)
        step_metrics = signature.bind(self, batch, *args, **kwargs).arguments["metrics"]
        fetched = trainer_module.tq.kv_batch_get(
            keys=batch.keys, partition_id=batch.partition_id, select_fields=["entropy"]
        )
        ep_metrics: dict[str, float] = {}
        with ep_advantage_call(fetched.to_padded_tensor()["entropy"], ep_metrics):
            result = original(self, batch, *args, **kwargs)
        step_metrics.update(ep_metrics)
        return result

    setattr(_compute_advantage, MARKER, original)
    return _compute_advantage
