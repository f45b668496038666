"""EP-GRPO's knobs and config rules (``algorithm.adv_estimator=ep_grpo``), on the composed verl config.

verl's ``algorithm`` section already has ``gamma`` and ``lam`` (GAE's), so EP-GRPO's knobs live in their
own dict, added with Hydra's ``+``: ``+algorithm.ep_grpo.gamma=2.0``. The trainers hand the estimator the
``algorithm`` section as a ``DictConfig`` (verl never instantiates ``AlgoConfig`` from it), so the extra
key passes through; :func:`ep_config_from_algorithm` rejects unknown names so a typo cannot silently run
the defaults.
"""

from __future__ import annotations

import dataclasses

from omegaconf import DictConfig, OmegaConf

from cw_verl.ep import EPConfig
from cw_verl.verl_config import ESTIMATOR_KEY, LOSS_MODE_KEY

EP_GRPO = "ep_grpo"
KNOBS_KEY = "ep_grpo"


class EPConfigError(ValueError):
    """The configuration asks for EP-GRPO and for something it cannot run with."""


def ep_config_from_algorithm(algorithm) -> EPConfig:
    """The :class:`~cw_verl.ep.EPConfig` from verl's ``algorithm`` section (``DictConfig``, dict or ``None``).

    Raises:
        EPConfigError: an unknown key under ``algorithm.ep_grpo``.
    """
    knobs = None if algorithm is None else algorithm.get(KNOBS_KEY)
    if knobs is None:
        return EPConfig()
    if isinstance(knobs, DictConfig):
        knobs = OmegaConf.to_container(knobs, resolve=True)
    known = {f.name for f in dataclasses.fields(EPConfig)}
    unknown = sorted(set(knobs) - known)
    if unknown:
        raise EPConfigError(f"algorithm.{KNOBS_KEY} has unknown key(s) {unknown}; known: {sorted(known)}")
    return EPConfig(**knobs)


def check_ep_grpo(config: DictConfig) -> None:
    """Refuse a config that selects ``ep_grpo`` but cannot feed it (rule run before Ray starts).

    EP-GRPO needs the reference policy's log-probs (its implicit progress signal), the actor's entropy
    from the old-log-prob recompute (which rollout-correction bypass mode skips), and GRPO's vanilla
    loss (a ``cw_grpo*`` loss would reweight its advantages by a second method).

    Raises:
        EPConfigError: with the setting to change.
    """
    if OmegaConf.select(config, ESTIMATOR_KEY) != EP_GRPO:
        return
    ep_config_from_algorithm(OmegaConf.select(config, "algorithm"))
    use_kl_loss = OmegaConf.select(config, "actor_rollout_ref.actor.use_kl_loss", default=False)
    use_kl_in_reward = OmegaConf.select(config, "algorithm.use_kl_in_reward", default=False)
    if not (use_kl_loss or use_kl_in_reward):
        raise EPConfigError(
            f"{ESTIMATOR_KEY}={EP_GRPO} needs the reference policy's log-probs (its implicit progress signal is "
            "log pi_old - log pi_ref), and verl starts a reference policy only with a KL term. Set "
            "actor_rollout_ref.actor.use_kl_loss=true (add actor_rollout_ref.actor.kl_loss_coef=0.0 for no KL "
            "penalty in the loss)."
        )
    if OmegaConf.select(config, "algorithm.rollout_correction.bypass_mode", default=False):
        raise EPConfigError(
            f"{ESTIMATOR_KEY}={EP_GRPO} needs the actor's per-token entropy from the old-log-prob recompute, which "
            "algorithm.rollout_correction.bypass_mode=true skips. Set it to false."
        )
    loss_mode = OmegaConf.select(config, LOSS_MODE_KEY, default="vanilla")
    if loss_mode.startswith("cw_grpo"):
        raise EPConfigError(
            f"{ESTIMATOR_KEY}={EP_GRPO} with {LOSS_MODE_KEY}={loss_mode} would reweight EP-GRPO's token advantages "
            "by CW-GRPO as well, a third algorithm. Use loss_mode=vanilla (verl's default) with ep_grpo."
        )
