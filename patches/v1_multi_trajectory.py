"""verl 0.9.1's v1 trainer: let the multi-trajectory advantage path treat ``cw_grpo`` as GRPO.

``verl.trainer.ppo.v1.utils.compute_advantage_for_multi_trajectories`` special-cases the *name* ``grpo``:
for GRPO only each session's final output takes part in the group statistics and the result is broadcast
to the session's other outputs; any other name falls back to per-row ``compute_advantage``. The ``cw_grpo``
estimator is GRPO's (CW-GRPO reweights in the loss), so it is routed down the GRPO branch, which then
computes exactly what the ``cw_grpo`` estimator would.
"""

from __future__ import annotations

import functools

from cw_verl.verl_losses import CW_GRPO

MARKER = "_cw_verl_multi_trajectory"


def patch(utils_module) -> None:
    """Post-import hook for ``verl.trainer.ppo.v1.utils``."""
    original = utils_module.compute_advantage_for_multi_trajectories
    if getattr(original, MARKER, False):
        return
    from verl.trainer.ppo.core_algos import AdvantageEstimator

    @functools.wraps(original)
    def compute_advantage_for_multi_trajectories(data, batch_keys, adv_estimator, *args, **kwargs):
        if adv_estimator == CW_GRPO:
            adv_estimator = AdvantageEstimator.GRPO
        return original(data, batch_keys, adv_estimator, *args, **kwargs)

    setattr(compute_advantage_for_multi_trajectories, MARKER, True)
    utils_module.compute_advantage_for_multi_trajectories = compute_advantage_for_multi_trajectories
