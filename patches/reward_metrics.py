"""verl 0.9.1's v1 trainer: put cw_verl's reward diagnostics into the per-step training metrics.

verl logs the reward function's extra keys only for validation (``val-aux/...``); in training, the step's
metrics carry ``critic/score/mean`` alone, so a run whose scorer silently fails looks like a run that
learns nothing. The reward loop does keep each sample's extra keys in TransferQueue
(``extra_fields["reward_extra_info"]``, which verl's DAPO filter reads); after verl's own
``PPOTrainer._compute_metrics`` this wrapper averages them over the step's real (non-padding) samples as
``reward/<key>/mean`` (e.g. ``reward/acc/mean``, ``reward/format/mean``, ``reward/scoring_failed/mean``)
plus ``reward/scoring_failed/count``. Only runs whose custom reward function is one of cw_verl's
(:data:`CW_VERL_REWARDS`) are touched.
"""

from __future__ import annotations

import functools
import math

from omegaconf import OmegaConf

MARKER = "_cw_verl_reward_metrics"
CW_VERL_REWARDS = ("pkg://cw_verl.paper.reward", "pkg://cw_verl.paper.authors_reward")


def uses_cw_verl_reward(config) -> bool:
    return OmegaConf.select(config, "reward.custom_reward_function.path", default=None) in CW_VERL_REWARDS


def reward_rates(extra_fields: list) -> dict[str, float]:
    """Mean of every numeric ``reward_extra_info`` key over the samples that carry it."""
    values: dict[str, list[float]] = {}
    for fields in extra_fields:
        info = fields.get("reward_extra_info", {}) if isinstance(fields, dict) else {}
        for key, value in info.items():
            if isinstance(value, bool | int | float) and math.isfinite(float(value)):
                values.setdefault(key, []).append(float(value))
    metrics = {f"reward/{key}/mean": sum(v) / len(v) for key, v in values.items()}
    if "scoring_failed" in values:
        metrics["reward/scoring_failed/count"] = float(sum(values["scoring_failed"]))
    return metrics


def patch(trainer_base_module) -> None:
    """Post-import hook for ``verl.trainer.ppo.v1.trainer_base``."""
    trainer_cls = trainer_base_module.PPOTrainer
    if getattr(trainer_cls._compute_metrics, MARKER, False):
        return
    original = trainer_cls._compute_metrics

    @functools.wraps(original)
    def _compute_metrics(self, batch, metrics, timing_raw, global_steps, epoch):
        result = original(self, batch, metrics, timing_raw, global_steps=global_steps, epoch=epoch)
        if uses_cw_verl_reward(self.config):
            keys = [key for key, tag in zip(batch.keys, batch.tags, strict=True) if not tag.get("is_padding", False)]
            data = trainer_base_module.tq.kv_batch_get(
                keys=keys, partition_id=batch.partition_id, select_fields=["extra_fields"]
            )
            metrics.update(reward_rates(data.pop("extra_fields").tolist()))  # as verl reads it
        return result

    setattr(_compute_metrics, MARKER, True)
    trainer_cls._compute_metrics = _compute_metrics
