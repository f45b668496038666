"""verl plugin (entry-point group ``verl.plugins``): loaded by ``import verl`` in every process.

verl imports this module at the end of its ``__init__`` (driver and every Ray worker, which all import
verl) and swallows any exception at DEBUG level; so this module only arms post-import hooks, and logs
loudly before re-raising if even that fails. The registrations (:mod:`cw_verl.registry`'s tables) and the
patches (:data:`cw_verl.patches.PATCHES`) run when verl imports the module they concern, and an error there
propagates into that import, where nobody can miss it. The CPU support has its own entry point
(:mod:`cw_verl.cpu.verl_plugin`): this module never imports it.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("cw_verl")

CORE_ALGOS = "verl.trainer.ppo.core_algos"
_ARMED: list[str] = []


def register_with_core_algos(core_algos) -> None:
    """Register every loss mode and advantage estimator of :mod:`cw_verl.registry` with verl's registries."""
    from cw_verl.registry import ADVANTAGE_ESTIMATORS, CW_POLICY_LOSSES, OTHER_POLICY_LOSSES

    for name, (policy_loss, _) in {**CW_POLICY_LOSSES, **OTHER_POLICY_LOSSES}.items():
        core_algos.register_policy_loss(name)(policy_loss)
    for name, (estimator, _) in ADVANTAGE_ESTIMATORS.items():
        core_algos.register_adv_est(name)(estimator)


def _on_import(module) -> None:
    from cw_verl import patches

    if module.__name__ == CORE_ALGOS:
        register_with_core_algos(module)
    patches.apply(module)


def install() -> None:
    """Arm one post-import hook per verl module cw_verl registers into or patches (idempotent)."""
    import wrapt

    from cw_verl.patches import patched_modules

    for module_name in dict.fromkeys([CORE_ALGOS, *patched_modules()]):
        if module_name not in _ARMED:
            wrapt.register_post_import_hook(_on_import, module_name)
            _ARMED.append(module_name)


try:
    install()
except Exception:  # verl would hide this at DEBUG level; the user must see it.
    logger.exception("cw_verl failed to install its verl plugin; cw_grpo will NOT be available")
    raise
