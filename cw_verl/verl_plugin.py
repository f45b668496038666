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
    # config_rules imports every module that adds a CW loss mode to POLICY_LOSSES (cw_grpo_authors).
    from cw_verl import config_rules  # noqa: F401
    from cw_verl.patches import advantage_source
    from cw_verl.verl_ep import EP_GRPO, compute_ep_grpo_advantage
    from cw_verl.verl_losses import (
        CW_GRPO,
        POLICY_LOSSES,
        VANILLA_WITH_CW_METRICS,
        compute_cw_grpo_outcome_advantage,
        compute_policy_loss_vanilla_cw_metrics,
    )

    for name, policy_loss in POLICY_LOSSES.items():
        core_algos.register_policy_loss(name)(policy_loss)
    # Not a CW loss (it trains plain PPO/GRPO), so not in POLICY_LOSSES: the config rules refuse it with cw_grpo.
    core_algos.register_policy_loss(VANILLA_WITH_CW_METRICS)(compute_policy_loss_vanilla_cw_metrics)
    core_algos.register_adv_est(CW_GRPO)(compute_cw_grpo_outcome_advantage)
    core_algos.register_adv_est(EP_GRPO)(compute_ep_grpo_advantage)
    advantage_source.patch_policy_loss_lookup(core_algos)


# Several patches wrap the same verl functions; one hook per module applies them in a fixed order.
# ep_inputs first: it rebinds the v1 trainer's reference to verl's own compute_advantage, which it can
# only recognise before another wrapper replaces it.


def _patch_ray_trainer(ray_trainer) -> None:
    from cw_verl.patches import advantage_source, ep_inputs

    ep_inputs.patch_ray_trainer(ray_trainer)
    advantage_source.patch_compute_advantage(ray_trainer)


def _patch_v1_trainer(trainer_base) -> None:
    from cw_verl.patches import advantage_source, ep_inputs, reward_metrics, whole_groups

    ep_inputs.patch_v1_trainer(trainer_base)
    advantage_source.patch_v1_compute_advantage(trainer_base)
    whole_groups.patch(trainer_base)
    reward_metrics.patch(trainer_base)


def _hooks():
    from cw_verl.patches import engine_context, entry_points, v1_multi_trajectory

    return {
        "verl.trainer.ppo.core_algos": _register_with_core_algos,
        "verl.workers.engine.base": engine_context.patch,
        "verl.utils.config": entry_points.patch_validate_config,
        "verl.trainer.main_ppo": entry_points.patch_run_ppo,
        "verl.trainer.ppo.ray_trainer": _patch_ray_trainer,
        "verl.trainer.ppo.v1.utils": v1_multi_trajectory.patch,
        "verl.trainer.ppo.v1.trainer_base": _patch_v1_trainer,
    }


def install() -> None:
    """Arm the post-import hooks (idempotent); with ``VERL_PLATFORM=cpu`` also cw_verl's CPU support."""
    import wrapt

    from cw_verl.cpu.activation import activate as activate_cpu_support

    for module_name, hook in _hooks().items():
        if module_name not in INSTALLED_HOOKS:
            wrapt.register_post_import_hook(hook, module_name)
            INSTALLED_HOOKS.append(module_name)
    # A no-op unless the CPU platform is selected (cw_verl/cpu/activation.py).
    activate_cpu_support()


try:
    install()
except Exception:  # verl would hide this at DEBUG level; the user must see it.
    logger.exception("cw_verl failed to install its verl plugin; cw_grpo will NOT be available")
    raise
