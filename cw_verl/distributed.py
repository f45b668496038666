"""Where CW-GRPO's statistics are reduced: the engine call context, the DP group, and its all-gather.

The statistics of a loss call are those of all tokens that the data-parallel group holds in scope.
Which group that is belongs to the training engine (verl's FSDP engine: WORLD, or the ``dp`` dimension
of the Ulysses mesh; Megatron: ``mpu.get_data_parallel_group()``, which leaves tensor-, pipeline- and
context-parallel replicas of the same tokens out). The engine hands its group, and the micro-batch,
to each loss call; :mod:`cw_verl.patches.engine_context` (``patches/engine_context.py``) records them here
(:func:`loss_call`), and records each optimizer mini-batch (:func:`train_batch_call`) for the scopes wider
than one call. These are the side channels verl forces: set by the patch around the engine's calls, read
by the CW-GRPO losses (:mod:`cw_verl.verl_losses`) and by the worker's advantage-source guard
(:mod:`cw_verl.patches.advantage_source`).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from cw_verl.weights import Gather, local_gather


@dataclass(frozen=True)
class LossCall:
    """One call of the engine's loss function: its DP group and its micro-batch (a TensorDict, or None)."""

    dp_group: Any
    micro_batch: Any = None


@dataclass
class TrainBatchCall:
    """One ``engine.train_batch``/``infer_batch`` call: this rank's optimizer mini-batch, and a cache for
    statistics computed once per mini-batch."""

    mini_batch: Any
    cache: dict = field(default_factory=dict)


_loss_call: contextvars.ContextVar[LossCall | None] = contextvars.ContextVar("cw_verl_loss_call", default=None)
_train_batch: contextvars.ContextVar[TrainBatchCall | None] = contextvars.ContextVar(
    "cw_verl_train_batch", default=None
)


@contextlib.contextmanager
def _set(var: contextvars.ContextVar, value) -> Iterator:
    token = var.set(value)
    try:
        yield value
    finally:
        var.reset(token)


def loss_call(dp_group, micro_batch=None):
    """Context of one loss call: CW-GRPO reduces over ``dp_group`` (``None``: no reduction)."""
    return _set(_loss_call, LossCall(dp_group, micro_batch))


def data_parallel_group(group):
    """For calling the policy loss yourself in a multi-process run: reduce over ``group``."""
    return loss_call(group)


def train_batch_call(mini_batch, cache: dict | None = None):
    """Context of one optimizer mini-batch (``engine.train_batch``). ``cache``: reuse statistics already
    computed for this same mini-batch (a benchmark's repeated calls)."""
    return _set(_train_batch, TrainBatchCall(mini_batch, {} if cache is None else cache))


def current_loss_call() -> LossCall | None:
    return _loss_call.get()


def current_train_batch() -> TrainBatchCall | None:
    return _train_batch.get()


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
    call = _loss_call.get()
    distributed = dist.is_available() and dist.is_initialized()
    if call is None:
        if (expected_dp_size or 1) > 1 or (distributed and dist.get_world_size() > 1):
            raise RuntimeError(
                "cw_grpo needs the data-parallel group of the loss call, but none was provided. verl's "
                "engines provide it through cw_verl's patch of BaseEngine.train_batch/infer_batch (is the "
                "cw_verl plugin loaded? run `python -m cw_verl check`); when calling the policy loss yourself "
                "in a multi-process run, wrap the call in `cw_verl.distributed.data_parallel_group(group)`."
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
