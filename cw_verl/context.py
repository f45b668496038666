"""Every value verl forces cw_verl to pass through a side channel, in one place.

verl's calling conventions do not hand some values to the function that needs them: a registered policy
loss gets no data-parallel group, micro-batch or mini-batch; a registered advantage estimator gets no entropy
and returns no metrics. Each such value lives here as a ``ContextVar`` (set for the duration of one call,
so it never outlives the call that set it, and threads/async tasks do not see each other's), or as a named
key on verl's own batch. Nothing else in cw_verl holds ambient state.

Who sets each value, and who reads it:

* :func:`current_loss_call` (the DP group and micro-batch of one loss call). Set by
  ``patches/engine_context.py`` around each loss call of ``BaseEngine.train_batch``/``infer_batch``
  (:func:`loss_call`). Read by :func:`cw_verl.distributed.resolve_data_parallel_group` (every CW loss) and
  for the row uids of the group scope and of the authors' loss.
* :func:`current_train_batch` (the optimizer mini-batch, and its statistics once computed). Set by
  ``patches/engine_context.py`` around ``BaseEngine.train_batch``/``infer_batch`` (:func:`train_batch_call`).
  Read by :func:`cw_verl.verl_losses.mini_batch_statistics` and by ``patches/advantage_source.py`` (the
  batch's estimator mark).
* :func:`current_ep_entropy` and :func:`current_ep_metrics` (v1 trainer, ``ep_grpo`` only). Set by
  ``patches/ep_inputs.py`` around the v1 trainer's ``_compute_advantage`` (:func:`ep_advantage_call`: the
  entropy fetched from TransferQueue, an empty dict). Read by the ``ep_grpo`` branch of ``compute_advantage``
  in the same module, which fills the dict; the wrapper adds it to the step's metrics.
* :data:`EP_ENTROPY_KEY` (a key of the legacy trainer's batch). Set by ``patches/ep_inputs.py`` in
  ``_compute_old_log_prob``; popped by the ``ep_grpo`` branch of ``compute_advantage``.
* :data:`EP_METRICS_KEY` (a key of the legacy trainer's ``meta_info``). Set by the ``ep_grpo`` branch of
  ``compute_advantage``; popped by ``patches/ep_inputs.py``'s ``compute_data_metrics`` wrapper.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

EP_ENTROPY_KEY = "ep_grpo_entropy"
"""Legacy trainer: batch key carrying the old-log-prob pass's entropy to ``ep_grpo`` (``fit`` drops verl's)."""
EP_METRICS_KEY = "ep_grpo_metrics"
"""Legacy trainer: ``meta_info`` key carrying the step's ``ep/*`` diagnostics to ``compute_data_metrics``."""


@dataclass(frozen=True)
class LossCall:
    """One call of the engine's loss function: its DP group and its micro-batch (a TensorDict, or None)."""

    dp_group: Any
    micro_batch: Any = None


@dataclass
class TrainBatchCall:
    """One ``engine.train_batch``/``infer_batch`` call: this rank's optimizer mini-batch.

    ``statistics``: scope -> the mini-batch's statistics, computed on its first loss call.
    ``first_call_weights``: scope -> the statistics pass's weighed tokens, kept for the first loss call only.
    """

    mini_batch: Any
    statistics: dict[str, Any] = field(default_factory=dict)
    first_call_weights: dict[str, Any] = field(default_factory=dict)


_loss_call: contextvars.ContextVar[LossCall | None] = contextvars.ContextVar("cw_verl_loss_call", default=None)
_train_batch: contextvars.ContextVar[TrainBatchCall | None] = contextvars.ContextVar(
    "cw_verl_train_batch", default=None
)
_ep_entropy: contextvars.ContextVar[Any] = contextvars.ContextVar("cw_verl_ep_entropy", default=None)
_ep_metrics: contextvars.ContextVar[dict | None] = contextvars.ContextVar("cw_verl_ep_metrics", default=None)


@contextlib.contextmanager
def _set(var: contextvars.ContextVar, value) -> Iterator:
    token = var.set(value)
    try:
        yield value
    finally:
        var.reset(token)


def loss_call(dp_group, micro_batch=None):
    """Context of one loss call: CW-GRPO reduces over ``dp_group`` (``None``: no reduction). Also the way to
    call a CW policy loss yourself in a multi-process run."""
    return _set(_loss_call, LossCall(dp_group, micro_batch))


def train_batch_call(mini_batch, statistics: dict | None = None):
    """Context of one optimizer mini-batch (``engine.train_batch``). ``statistics``: reuse the statistics
    already computed for this same mini-batch (a benchmark's repeated calls)."""
    return _set(_train_batch, TrainBatchCall(mini_batch, {} if statistics is None else statistics))


def current_loss_call() -> LossCall | None:
    """The loss call in progress, or ``None`` outside a verl engine's loss call."""
    return _loss_call.get()


def current_train_batch() -> TrainBatchCall | None:
    """The optimizer mini-batch in progress, or ``None`` outside ``engine.train_batch``/``infer_batch``."""
    return _train_batch.get()


@contextlib.contextmanager
def ep_advantage_call(entropy, metrics: dict) -> Iterator[None]:
    """Context of the v1 trainer's ``_compute_advantage`` for ``ep_grpo``: the entropy ``[B, T]`` it needs and
    the dict its ``ep/*`` diagnostics go to."""
    with _set(_ep_entropy, entropy), _set(_ep_metrics, metrics):
        yield


def current_ep_entropy():
    """The v1 trainer's entropy for ``ep_grpo`` in this call, or ``None``."""
    return _ep_entropy.get()


def current_ep_metrics() -> dict | None:
    """The dict collecting the v1 trainer's ``ep/*`` diagnostics in this call, or ``None``."""
    return _ep_metrics.get()
