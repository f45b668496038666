"""Where CW-GRPO's statistics are reduced: the DP group of a loss call, its all-gather, and stopping together.

The statistics of a loss call are those of all tokens that the data-parallel group holds in scope.
Which group that is belongs to the training engine (verl's FSDP engine: WORLD, or the ``dp`` dimension
of the Ulysses mesh; Megatron: ``mpu.get_data_parallel_group()``, which leaves tensor-, pipeline- and
context-parallel replicas of the same tokens out). The engine's group reaches the loss through
:func:`cw_verl.context.current_loss_call` (set by ``patches/engine_context.py``); every collective below
takes the group as an argument.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from cw_verl.context import current_loss_call
from cw_verl.weights import Gather, local_gather


def resolve_data_parallel_group(expected_dp_size: int | None):
    """The process group to reduce over in this loss call, or ``None`` for a single-rank scope.

    Args:
        expected_dp_size: the data-parallel size verl reports for this micro-batch
            (``config.global_batch_info["dp_size"]``), or ``None`` when unknown.

    Raises:
        RuntimeError: when statistics would silently be rank-local in a multi-rank run, or when the
            group does not have the DP size (e.g. a WORLD group that also spans tensor-parallel ranks,
            which would count every token once per replica).
    """
    call = current_loss_call()
    distributed = dist.is_available() and dist.is_initialized()
    if call is None:
        if (expected_dp_size or 1) > 1 or (distributed and dist.get_world_size() > 1):
            raise RuntimeError(
                "cw_grpo needs the data-parallel group of the loss call, but none was provided. verl's "
                "engines provide it through cw_verl's patch of BaseEngine.train_batch/infer_batch (is the "
                "cw_verl plugin loaded? run `python -m cw_verl check`); when calling the policy loss yourself "
                "in a multi-process run, wrap the call in `cw_verl.context.loss_call(group)`."
            )
        return None
    group = call.dp_group
    if group is None:
        if (expected_dp_size or 1) > 1:
            raise RuntimeError(
                f"the engine passed dp_group=None but reports dp_size={expected_dp_size}; "
                "CW-GRPO statistics cannot be made global."
            )
        return None
    size = dist.get_world_size(group)
    if expected_dp_size is not None and size != expected_dp_size:
        raise RuntimeError(
            f"the statistics group has {size} ranks but the batch's data-parallel size is {expected_dp_size}; "
            "reducing over it would count tensor/context-parallel replicas of the same tokens more than once "
            "(or miss ranks)."
        )
    return group if size > 1 else None


def group_gather(group) -> Gather:
    """A :data:`~cw_verl.weights.Gather` over ``group`` (``None``: this process alone).

    ``all_gather`` rather than ``all_reduce``: the merge of central moments needs every rank's table,
    and every rank then merges the same stack in the same order, so all ranks get identical results.
    """
    if group is None:
        return local_gather

    def gather(table: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(table) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, table.contiguous(), group=group)
        return torch.stack(parts)

    return gather


def gather_flags(problem: str | None, group, device) -> list[float]:
    """Every rank's 0/1 "my call is unusable" flag, in group order (one one-element all-gather).

    The flag lives on ``device``, the loss's: the engine's DP group may have only an NCCL backend."""
    flag = torch.tensor([0.0 if problem is None else 1.0], dtype=torch.float64, device=device)
    return group_gather(group)(flag).flatten().tolist()


def raise_together(flags: list[float], problem: str | None, error: type[Exception], group, own_flag: str = "") -> None:
    """Raise on every rank when any rank flagged its call, so that no rank waits alone in a collective.

    Args:
        flags: one 0/1 per rank of ``group`` in group order (gathered, e.g. by :func:`gather_flags`).
        problem: this rank's own problem, raised as is.
        error: the exception type to raise.
        group: the process group the flags came from (``None``: this process alone).
        own_flag: the message when this rank's flag is set without a ``problem`` (a check done on the device).

    Raises:
        error: when ``problem`` is set or any flag is.
    """
    if problem is not None:
        raise error(problem)
    bad = [rank for rank, flag in enumerate(flags) if flag > 0]
    if not bad:
        return
    rank = dist.get_rank(group) if group is not None else 0
    if rank in bad:
        raise error(own_flag)
    raise error(
        f"rank(s) {bad} of the data-parallel group got an unusable micro-batch in this loss call (see the error "
        "on those ranks); every rank stops."
    )
