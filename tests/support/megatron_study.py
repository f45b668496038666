"""One actor update on verl's Megatron engine under each parallel layout, against one process (test and
benchmark aid).

:func:`reference_run` (one process) samples one RL batch with the demo's pipeline, its old log-probs
computed by a one-process Megatron actor (as the trainer recomputes them with the actor being trained),
saves it, and makes the reference updates; :func:`layout_run` makes the same updates under each layout of
a launch (every layout of one world size shares the launch: megatron's process groups are rebuilt between
layouts). Every update starts from the same checkpoint, on the same batch, through
:func:`tests.support.studies.updates_per_variant` (``TrainingWorker.train_mini_batch`` -> Megatron engine ->
megatron's schedule -> ``ppo_loss`` -> the registered policy loss). :func:`deviations` compares a layout's
updates with the reference's.
"""

from __future__ import annotations

import torch

from tests.support.batch import shared_batch
from tests.support.studies import Variant, updates_per_variant

MEGATRON = {"strategy": "megatron"}
# Named layouts: ActorSetup keys; the data-parallel size is what the launch's world size leaves.
LAYOUTS = {
    "1 process": {**MEGATRON},
    "TP2, SP": {**MEGATRON, "tensor_model_parallel_size": 2, "sequence_parallel": True},
    "PP2": {**MEGATRON, "pipeline_model_parallel_size": 2},
    "CP2": {**MEGATRON, "context_parallel_size": 2},
    "TP2xPP2": {**MEGATRON, "tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2},
    "TP2xDP2, SP": {**MEGATRON, "tensor_model_parallel_size": 2, "sequence_parallel": True},
}
WORLD_SIZES = {"1 process": 1, "TP2, SP": 2, "PP2": 2, "CP2": 2, "TP2xPP2": 4, "TP2xDP2, SP": 4}
# Sequences per micro-batch and rank, for a 16-sequence batch: layouts with one data-parallel rank run 4
# micro-batches of 4 (several in the pipeline at once), as the one-process reference does; TP2xDP2 runs one
# micro-batch of 8 per rank, the same global partition as one micro-batch of 16 on one process (the per-call
# scope's statistics depend on the partition, by design).
MICRO_BATCH = {"TP2, SP": 4, "PP2": 4, "CP2": 4, "TP2xPP2": 4, "TP2xDP2, SP": 8}
REFERENCE_MICRO_BATCH = {name: 16 if name == "TP2xDP2, SP" else 4 for name in MICRO_BATCH}


def layout_variants(name: str, losses: list[str]) -> list[Variant]:
    return [Variant(loss, micro_batch_size=MICRO_BATCH[name]) for loss in losses]


def reference_run(
    rank: int, world_size: int, model_path: str, batch_path, prompts: int, group_size: int, seed: int, variants
) -> dict:
    """On one process: sample and save the shared batch (Megatron old log-probs), then
    :func:`updates_per_variant` for ``variants``; also returns the batch."""
    from cw_verl.cpu import harness

    if world_size != 1:
        raise ValueError("the reference runs on one process")
    actor = harness.build_actor(
        harness.ActorSetup(model_path=model_path, rollout_n=group_size, ppo_mini_batch_size=1, **MEGATRON)
    )
    batch = shared_batch(actor, model_path, prompts, group_size, seed)
    torch.save(batch, batch_path)
    del actor
    return {"batch": batch, **updates_per_variant(rank, world_size, model_path, variants, batch_path, MEGATRON)}


def layout_run(rank: int, world_size: int, model_path: str, batch_path, plan: list[tuple[str, list[Variant]]]) -> dict:
    """For each ``(layout name, variants)`` of ``plan`` in order, :func:`updates_per_variant` under that layout
    of :data:`LAYOUTS`; returns them by layout name."""
    for name, _ in plan:
        if WORLD_SIZES[name] != world_size:
            raise ValueError(f"layout {name!r} runs on {WORLD_SIZES[name]} ranks, not {world_size}")
    return {
        name: updates_per_variant(rank, world_size, model_path, variants, batch_path, LAYOUTS[name])
        for name, variants in plan
    }


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def deviations(got: dict, reference: dict) -> dict[str, float]:
    """How far one update (an :func:`updates_per_variant` entry) is from the reference's.

    Returns: ``loss`` (absolute, verl's ``actor/pg_loss``), ``grad_norm`` (relative, verl's
    ``actor/grad_norm``), ``gradient`` and ``update`` (relative L2 distance of the full gradient and of the
    parameter change) and ``weights`` (largest absolute difference of a token's CW-GRPO weight; 0 without).
    """
    weights = 0.0
    if got["weights"] is not None:
        weights = (got["weights"] - reference["weights"]).abs().max().item()
    return {
        "loss": abs(got["metrics"]["actor/pg_loss"] - reference["metrics"]["actor/pg_loss"]),
        "grad_norm": abs(got["metrics"]["actor/grad_norm"] / reference["metrics"]["actor/grad_norm"] - 1.0),
        "gradient": relative(got["gradient"], reference["gradient"]),
        "update": relative(got["delta"], reference["delta"]),
        "weights": weights,
    }


__all__ = [
    "LAYOUTS",
    "MICRO_BATCH",
    "REFERENCE_MICRO_BATCH",
    "WORLD_SIZES",
    "Variant",
    "deviations",
    "layout_run",
    "layout_variants",
    "reference_run",
    "relative",
]
