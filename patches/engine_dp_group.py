"""Give the policy loss the data-parallel group of the engine's loss call (verl 0.9.1).

verl's engines call ``loss_function(model_output=..., data=..., dp_group=engine.get_data_parallel_group())``
for every micro-batch, and ``verl.workers.utils.losses.ppo_loss`` receives that group but does not pass it
on to the registered policy-loss function. Every engine trains through ``BaseEngine.train_batch`` and
infers through ``BaseEngine.infer_batch`` (no engine overrides them in 0.9.1), so wrapping the loss function
there reaches all of them: the wrapper opens :func:`cw_verl.distributed.data_parallel_group` around each call.
"""

from __future__ import annotations

import functools

from cw_verl.distributed import data_parallel_group

_PATCHED = "_cw_verl_dp_group_bridge"


def bridge(loss_function):
    """``loss_function`` with the ``dp_group`` of each call made visible to the policy loss."""
    if loss_function is None or getattr(loss_function, _PATCHED, False):
        return loss_function

    @functools.wraps(loss_function)
    def with_dp_group(*args, dp_group=None, **kwargs):
        with data_parallel_group(dp_group):
            return loss_function(*args, dp_group=dp_group, **kwargs)

    setattr(with_dp_group, _PATCHED, True)
    return with_dp_group


def patch(base_module) -> None:
    """Post-import hook for ``verl.workers.engine.base``."""
    engine = base_module.BaseEngine
    if getattr(engine.train_batch, _PATCHED, False):
        return
    original_train, original_infer = engine.train_batch, engine.infer_batch

    @functools.wraps(original_train)
    def train_batch(self, data, loss_function):
        return original_train(self, data, bridge(loss_function))

    @functools.wraps(original_infer)
    def infer_batch(self, data, loss_function=None):
        return original_infer(self, data, bridge(loss_function))

    for method in (train_batch, infer_batch):
        setattr(method, _PATCHED, True)
    engine.train_batch, engine.infer_batch = train_batch, infer_batch
