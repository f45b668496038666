"""Run-time patches of verl, importable as ``cw_verl.patches``: one ordered table, :data:`PATCHES`.

Each patch is tiny, was written against verl :data:`VERL_VERSION`, and is applied when verl imports the
module it patches (``wrapt`` post-import hooks armed by :mod:`cw_verl.verl_plugin`, so ``import verl``
stays cheap). Patches of the same module run in table order: the order is data, not a comment.
``tests/test_patches.py`` checks the shape of every verl function a patch relies on and fails loudly when
verl changes it; ``python -m cw_verl check`` reports :func:`applied` for every row.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

from cw_verl.patches import (
    advantage_source,
    engine_context,
    entry_points,
    ep_inputs,
    reward_metrics,
    v1_multi_trajectory,
    whole_groups,
)

VERL_VERSION = "0.9.1"


@dataclass(frozen=True)
class Patch:
    """One patch: ``apply(module)`` runs when verl imports ``module``; it marks ``attribute`` (a dotted path
    inside the module) with ``marker``, which :func:`applied` reads."""

    module: str
    attribute: str
    marker: str
    apply: Callable[[ModuleType], None]
    what: str
    verl_version: str = VERL_VERSION


PATCHES: tuple[Patch, ...] = (
    Patch(
        "verl.trainer.ppo.core_algos",
        "get_policy_loss_fn",
        advantage_source.MARKER,
        advantage_source.patch_policy_loss_lookup,
        "workers refuse to train cw_grpo advantages with a non-CW loss (loss lookup)",
    ),
    Patch(
        "verl.workers.engine.base",
        "BaseEngine.train_batch",
        engine_context.MARKER,
        engine_context.patch,
        "BaseEngine.train_batch/infer_batch hand the engine's dp_group and batches to the policy loss",
    ),
    Patch(
        "verl.utils.config",
        "validate_config",
        entry_points.MARKER,
        entry_points.patch_validate_config,
        "config rules run in `python -m verl.trainer.main_ppo` before Ray starts",
    ),
    Patch(
        "verl.trainer.main_ppo",
        "run_ppo",
        entry_points.MARKER,
        entry_points.patch_run_ppo,
        "config rules (loss_mode follows adv_estimator=cw_grpo) run at every entry point before Ray starts",
    ),
    # ep_inputs before advantage_source: it recognises verl's own compute_advantage only before another
    # wrapper replaces it.
    Patch(
        "verl.trainer.ppo.ray_trainer",
        "compute_advantage",
        ep_inputs.MARKER,
        ep_inputs.patch_ray_trainer,
        "compute_advantage hands ep_grpo the entropy and reference log-probs",
    ),
    Patch(
        "verl.trainer.ppo.ray_trainer",
        "compute_advantage",
        advantage_source.MARKER,
        advantage_source.patch_compute_advantage,
        "the legacy trainer marks cw_grpo advantages for the workers' check",
    ),
    Patch(
        "verl.trainer.ppo.v1.utils",
        "compute_advantage_for_multi_trajectories",
        v1_multi_trajectory.MARKER,
        v1_multi_trajectory.patch,
        "v1 trainer's multi-trajectory advantages treat cw_grpo as GRPO",
    ),
    Patch(
        "verl.trainer.ppo.v1.trainer_base",
        "PPOTrainer._compute_advantage",
        ep_inputs.MARKER,
        ep_inputs.patch_v1_trainer,
        "v1 trainer hands ep_grpo the entropy and collects its ep/* metrics",
    ),
    Patch(
        "verl.trainer.ppo.v1.trainer_base",
        "PPOTrainer._compute_advantage",
        advantage_source.MARKER,
        advantage_source.patch_v1_compute_advantage,
        "v1 trainer marks cw_grpo advantages for the workers' check",
    ),
    Patch(
        "verl.trainer.ppo.v1.trainer_base",
        "PPOTrainer._balance_batch",
        whole_groups.MARKER,
        whole_groups.patch,
        "v1 trainer keeps prompt groups whole for cw_grpo_authors",
    ),
    Patch(
        "verl.trainer.ppo.v1.trainer_base",
        "PPOTrainer._compute_metrics",
        reward_metrics.MARKER,
        reward_metrics.patch,
        "v1 trainer logs cw_verl's reward diagnostics per step",
    ),
)
"""Every patch, in the order it applies."""


def patched_modules() -> list[str]:
    """The verl modules :data:`PATCHES` patch, each once, in table order."""
    return list(dict.fromkeys(patch.module for patch in PATCHES))


def apply(module: ModuleType) -> None:
    """Apply, in table order, every patch of ``module`` (a post-import hook; each patch is idempotent)."""
    for patch in PATCHES:
        if patch.module == module.__name__:
            patch.apply(module)


def applied(patch: Patch) -> bool:
    """Whether ``patch`` is in place (imports its module, as verl would, which applies it if armed)."""
    target = importlib.import_module(patch.module)
    for name in patch.attribute.split("."):
        target = getattr(target, name)
    return bool(getattr(target, patch.marker, False))
