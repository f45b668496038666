"""verl 0.9.1's v1 trainer: keep prompt groups whole for the loss modes that need it (off for all others).

``PPOTrainer._balance_batch`` (``verl/trainer/ppo/v1/trainer_base.py``) reorders the batch sequence by
sequence on every step, splitting groups over data-parallel ranks, and dynamic micro-batching re-packs
sequences unless told to keep ``force_group_size`` consecutive rows together. When the actor's loss mode
is in :data:`cw_verl.whole_groups.WHOLE_GROUP_LOSS_MODES`, the wrapped ``_balance_batch`` partitions whole
groups instead (:func:`cw_verl.whole_groups.group_partitions`), and the wrapped ``_update_actor`` adds
``force_group_size = rollout.n`` to the actor's batch when ``use_dynamic_bsz`` is on (the value reaches
``verl.workers.engine.utils.prepare_micro_batches`` as non-tensor data, like the batch's temperature).
Every other loss mode runs verl's methods untouched.
"""

from __future__ import annotations

import functools

from cw_verl.whole_groups import group_partitions, needs_whole_groups

MARKER = "_cw_verl_whole_groups"


def balance_whole_groups(trainer, batch, metrics: dict, logging_prefix: str):
    """verl's ``_balance_batch`` with whole groups per rank (``batch``: a ``KVBatchMeta``, keys ``<uid>_...``)."""
    import torch
    from verl.utils.seqlen_balancing import calculate_workload, log_seqlen_unbalance

    worker_group = trainer.actor_rollout_wg
    if "actor" not in worker_group._dispatch_info:
        worker_group._dispatch_info["actor"] = worker_group._query_dispatch_info("actor")
    dp_size = max(worker_group._dispatch_info["actor"]) + 1
    seq_lens = torch.tensor([tag["seq_len"] for tag in batch.tags], dtype=torch.int64)
    # verl's replay buffer reads a sample's prompt uid the same way (trainer/ppo/v1/replay_buffer.py).
    uids = [key.split("_")[0] for key in batch.keys]
    rollout_n = trainer.config.actor_rollout_ref.rollout.n
    partitions = group_partitions(uids, calculate_workload(seq_lens).tolist(), dp_size, rollout_n)
    batch.reorder([row for partition in partitions for row in partition])
    metrics.update(log_seqlen_unbalance(seqlen_list=seq_lens.tolist(), partitions=partitions, prefix=logging_prefix))
    return batch


def patch(trainer_base_module) -> None:
    """Post-import hook for ``verl.trainer.ppo.v1.trainer_base``."""
    trainer_cls = trainer_base_module.PPOTrainer
    if getattr(trainer_cls._balance_batch, MARKER, False):
        return
    original_balance, original_update = trainer_cls._balance_batch, trainer_cls._update_actor

    @functools.wraps(original_balance)
    def _balance_batch(self, batch, metrics, logging_prefix="global_seqlen", keep_minibatch=False):
        if not needs_whole_groups(self.config):
            return original_balance(self, batch, metrics, logging_prefix, keep_minibatch)
        return balance_whole_groups(self, batch, metrics, logging_prefix)

    @functools.wraps(original_update)
    def _update_actor(self, batch, metrics):
        if needs_whole_groups(self.config) and self.config.actor_rollout_ref.actor.use_dynamic_bsz:
            batch.extra_info["force_group_size"] = self.config.actor_rollout_ref.rollout.n
        return original_update(self, batch, metrics)

    for method in (_balance_batch, _update_actor):
        setattr(method, MARKER, True)
    trainer_cls._balance_batch, trainer_cls._update_actor = _balance_batch, _update_actor
