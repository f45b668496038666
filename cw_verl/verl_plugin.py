"""verl plugin (entry-point group ``verl.plugins``): loaded by ``import verl`` in every process.

verl imports this module at the end of its ``__init__`` (driver and every Ray worker, which all import
verl) and swallows any exception at DEBUG level; so this module only arms post-import hooks, and logs
loudly before re-raising if even that fails. The registrations and patches run when verl imports the
module they concern, and an error there propagates into that import, where nobody can miss it.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("cw_verl")

INSTALLED_HOOKS: list[str] = []


def _register_with_core_algos(core_algos) -> None:
    from cw_verl.verl_losses import CW_GRPO, POLICY_LOSSES, compute_cw_grpo_outcome_advantage

    for name, policy_loss in POLICY_LOSSES.items():
        core_algos.register_policy_loss(name)(policy_loss)
    core_algos.register_adv_est(CW_GRPO)(compute_cw_grpo_outcome_advantage)
    from cw_verl.verl_ep import EP_GRPO, compute_ep_grpo_advantage

    core_algos.register_adv_est(EP_GRPO)(compute_ep_grpo_advantage)


def _hooks():
    from cw_verl.patches import engine_context, ep_inputs, v1_multi_trajectory, validate_config

    return {
        "verl.trainer.ppo.core_algos": _register_with_core_algos,
        "verl.workers.engine.base": engine_context.patch,
        "verl.utils.config": validate_config.patch,
        "verl.trainer.ppo.v1.utils": v1_multi_trajectory.patch,
        "verl.trainer.ppo.ray_trainer": ep_inputs.patch_ray_trainer,
        "verl.trainer.ppo.v1.trainer_base": ep_inputs.patch_v1_trainer,
    }


def install() -> None:
    """Arm the post-import hooks (idempotent)."""
    import wrapt

    for module_name, hook in _hooks().items():
        if module_name not in INSTALLED_HOOKS:
            wrapt.register_post_import_hook(hook, module_name)
            INSTALLED_HOOKS.append(module_name)


try:
    install()
except Exception:  # verl would hide this at DEBUG level; the user must see it.
    logger.exception("cw_verl failed to install its verl plugin; cw_grpo will NOT be available")
    raise
