"""The reduction group of CW-GRPO's statistics, and the one collective it uses.

The statistics of one loss call are those of all tokens that the data-parallel group holds in that
call. Which group that is belongs to the training engine (verl's FSDP engine: WORLD, or the ``dp``
dimension of the Ulysses mesh; Megatron: ``mpu.get_data_parallel_group()``, which leaves tensor-,
pipeline- and context-parallel replicas of the same tokens out). The engine hands its group to the
loss; :func:`data_parallel_group` carries it to the policy loss (see ``cw_verl/patches``), and
:func:`resolve_data_parallel_group` checks it against the DP size that verl reports for the batch.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch
import torch.distributed as dist

from cw_verl.weights import Gather, local_gather

_UNSET = object()
_current_group: contextvars.ContextVar = contextvars.ContextVar("cw_verl_dp_group", default=_UNSET)


@contextlib.contextmanager
def data_parallel_group(group) -> Iterator[None]:
    """Within this block, CW-GRPO reduces its statistics over ``group`` (``None``: no reduction)."""
    token = _current_group.set(group)
    try:
        yield
    finally:
        _current_group.reset(token)


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
    group = _current_group.get()
    distributed = dist.is_available() and dist.is_initialized()
    if group is _UNSET:
        if (expected_dp_size or 1) > 1 or (distributed and dist.get_world_size() > 1):
            raise RuntimeError(
                "cw_grpo needs the data-parallel group of the loss call, but none was provided. verl's "
                "engines provide it through cw_verl's patch of BaseEngine.train_batch/infer_batch (is the "
                "cw_verl plugin loaded? run `python -m cw_verl check`); when calling the policy loss yourself "
                "in a multi-process run, wrap the call in `cw_verl.distributed.data_parallel_group(group)`."
            )
        return None
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

    ``all_gather`` rather than ``all_reduce``: the merge of central moments needs every rank's vector,
    and every rank then merges the same stack in the same order, so all ranks get identical results.
    """
    if group is None:
        return local_gather

    def gather(vector: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(vector) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, vector.contiguous(), group=group)
        return torch.stack(parts)

    return gather
