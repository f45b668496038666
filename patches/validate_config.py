"""verl 0.9.1: apply cw_verl's config rules inside ``verl.utils.config.validate_config``.

``main_ppo.main`` (and ``main_ppo_v0``, ``one_step_off_policy``) call ``validate_config(config, ...)`` on the
composed Hydra config before ``ray.init`` and before any worker exists; the wrapper first makes the actor's
``loss_mode`` follow ``algorithm.adv_estimator=cw_grpo`` or stops the run on a conflict, and refuses a group
scope that verl's mini-batching would split (:mod:`cw_verl.config_rules`). Those modules import the
function by name after ``import verl`` has run the plugin, so rebinding the module attributes is enough.
"""

from __future__ import annotations

import functools
import sys

from cw_verl.config_rules import align_loss_mode_with_estimator, check_group_scope, explicit_override_keys
from cw_verl.ep_config import check_ep_grpo

_PATCHED = "_cw_verl_config_rules"


def _command_line_overrides() -> list[str]:
    try:
        from hydra.core.hydra_config import HydraConfig
    except ImportError:
        return []
    if not HydraConfig.initialized():
        return []
    return list(HydraConfig.get().overrides.task)


def patch(config_module) -> None:
    """Post-import hook for ``verl.utils.config``."""
    original = config_module.validate_config
    if getattr(original, _PATCHED, False):
        return

    @functools.wraps(original)
    def validate_config(config, *args, **kwargs):
        align_loss_mode_with_estimator(config, explicit_override_keys(_command_line_overrides()))
        check_group_scope(config)
        check_ep_grpo(config)
        return original(config, *args, **kwargs)

    setattr(validate_config, _PATCHED, True)
    config_module.validate_config = validate_config
    # verl.utils re-exports it; keep the two names the same function.
    utils_package = sys.modules.get("verl.utils")
    if utils_package is not None and getattr(utils_package, "validate_config", None) is original:
        utils_package.validate_config = validate_config
