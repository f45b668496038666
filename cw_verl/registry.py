"""What cw_verl registers with verl, as literal tables: the plugin registers them, ``python -m cw_verl check``
reports them, and the config rules and the workers' guard read them.

A new loss mode or estimator is one line in one table here; nothing registers itself by being imported.
"""

from __future__ import annotations

from collections.abc import Callable

from cw_verl.authors_loss import AUTHORS_LOSS_MODE, compute_policy_loss_cw_grpo_authors
from cw_verl.cov_losses import (
    CLIP_COV_MINIBATCH,
    KL_COV_MINIBATCH,
    compute_policy_loss_clip_cov_minibatch,
    compute_policy_loss_kl_cov_minibatch,
)
from cw_verl.verl_ep import EP_GRPO, compute_ep_grpo_advantage
from cw_verl.verl_losses import (
    CW_GRPO,
    GROUP,
    MICROBATCH,
    MINIBATCH,
    VANILLA_WITH_CW_METRICS,
    compute_cw_grpo_outcome_advantage,
    compute_policy_loss_cw_grpo,
    compute_policy_loss_cw_grpo_group,
    compute_policy_loss_cw_grpo_microbatch,
    compute_policy_loss_cw_grpo_minibatch,
    compute_policy_loss_vanilla_cw_metrics,
)

CW_POLICY_LOSSES: dict[str, tuple[Callable, str]] = {
    CW_GRPO: (compute_policy_loss_cw_grpo, f"CW-GRPO, {MINIBATCH} statistics scope (the default)"),
    f"{CW_GRPO}_{MINIBATCH}": (compute_policy_loss_cw_grpo_minibatch, f"CW-GRPO, {MINIBATCH} scope"),
    f"{CW_GRPO}_{GROUP}": (compute_policy_loss_cw_grpo_group, f"CW-GRPO, {GROUP} scope (the paper's literal one)"),
    f"{CW_GRPO}_{MICROBATCH}": (compute_policy_loss_cw_grpo_microbatch, f"CW-GRPO, {MICROBATCH} scope"),
    AUTHORS_LOSS_MODE: (compute_policy_loss_cw_grpo_authors, "the authors' released objective"),
}
"""``loss_mode`` -> (verl policy loss, what it is): the losses that implement CW-GRPO. The config rules and the
workers' guard treat exactly these as CW losses."""

OTHER_POLICY_LOSSES: dict[str, tuple[Callable, str]] = {
    VANILLA_WITH_CW_METRICS: (compute_policy_loss_vanilla_cw_metrics, "verl's vanilla loss + actor/cw/* metrics"),
    CLIP_COV_MINIBATCH: (compute_policy_loss_clip_cov_minibatch, "verl's clip_cov, tokens drawn once per mini-batch"),
    KL_COV_MINIBATCH: (compute_policy_loss_kl_cov_minibatch, "verl's kl_cov, global top-k once per mini-batch"),
}
"""Loss modes cw_verl adds that train plain PPO/GRPO (so the config rules refuse them with ``cw_grpo``)."""

ADVANTAGE_ESTIMATORS: dict[str, tuple[Callable, str]] = {
    CW_GRPO: (compute_cw_grpo_outcome_advantage, "GRPO's advantages; selects the whole CW-GRPO method"),
    EP_GRPO: (compute_ep_grpo_advantage, "EP-GRPO"),
}
"""``algorithm.adv_estimator`` -> (verl advantage estimator, what it is)."""

CW_ESTIMATORS: dict[str, str] = {CW_GRPO: CW_GRPO}
"""CW advantage estimators and the loss mode each selects when ``loss_mode`` is left at verl's default."""
