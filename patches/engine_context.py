"""Give the policy loss the engine's data-parallel group, micro-batch and mini-batch (verl 0.9.1).

verl's engines call ``loss_function(model_output=..., data=micro_batch, dp_group=engine.get_data_parallel_group())``
for every micro-batch, and ``verl.workers.utils.losses.ppo_loss`` receives that group but does not pass it
on to the registered policy-loss function (nor the micro-batch's other fields, such as ``uid``). Every engine
trains through ``BaseEngine.train_batch(data=mini_batch, loss_function)`` and infers through
``BaseEngine.infer_batch`` (no engine overrides them in 0.9.1), so wrapping them reaches all engines: the
wrapper records the mini-batch (:func:`cw_verl.context.train_batch_call`) and wraps the loss function
so that each call records its group and micro-batch (:func:`cw_verl.context.loss_call`).
"""

from __future__ import annotations

import functools

from cw_verl.context import loss_call, train_batch_call

MARKER = "_cw_verl_engine_context"


def bridge(loss_function):
    """``loss_function`` with the ``dp_group`` and ``data`` of each call made visible to the policy loss."""
    if loss_function is None or getattr(loss_function, MARKER, False):
        return loss_function

    @functools.wraps(loss_function)
    def with_engine_context(*args, dp_group=None, **kwargs):
        with loss_call(dp_group, kwargs.get("data")):
            return loss_function(*args, dp_group=dp_group, **kwargs)

    setattr(with_engine_context, MARKER, True)
    return with_engine_context


def patch(base_module) -> None:
    """Post-import hook for ``verl.workers.engine.base``."""
    engine = base_module.BaseEngine
    if getattr(engine.train_batch, MARKER, False):
        return
    original_train, original_infer = engine.train_batch, engine.infer_batch

    @functools.wraps(original_train)
    def train_batch(self, data, loss_function):
        with train_batch_call(data):
            return original_train(self, data, bridge(loss_function))

    @functools.wraps(original_infer)
    def infer_batch(self, data, loss_function=None):
        with train_batch_call(data):
            return original_infer(self, data, bridge(loss_function))

    for method in (train_batch, infer_batch):
        setattr(method, MARKER, True)
    engine.train_batch, engine.infer_batch = train_batch, infer_batch
