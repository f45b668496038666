"""Rank functions for tests/test_megatron_engine.py (module-level, so that spawned ranks can import them)."""

import torch
import torch.distributed as dist

from cw_verl.demo.megatron_study import LAYOUTS, layout_run


def layouts_and_a_wrong_group(rank, world_size, model_path, batch_path, plan, wrong_group_layout):
    """:func:`layout_run`, then one cw_grpo update under ``wrong_group_layout`` whose engine hands the loss
    WORLD (tensor-parallel replicas included) as its data-parallel group; returns the error each rank raised."""
    from cw_verl.cpu import harness

    out = layout_run(rank, world_size, model_path, batch_path, plan)
    batch = torch.load(batch_path, weights_only=False)
    group_size = len(batch) // len(set(batch.non_tensor_batch["uid"]))
    setup = harness.ActorSetup(
        model_path=model_path,
        rollout_n=group_size,
        ppo_mini_batch_size=len(batch) // group_size,
        loss_mode="cw_grpo",
        **LAYOUTS[wrong_group_layout],
    )
    actor = harness.build_actor(setup)
    actor.engine.get_data_parallel_group = lambda: dist.group.WORLD
    try:
        harness.train_step(actor, harness.actor_chunk(actor, batch))
    except RuntimeError as error:
        out["wrong group error"] = str(error)
    else:
        out["wrong group error"] = None
    return out


def vocab_parallel_entropies(rank, world_size, cases):
    """verl's Megatron ``vocab_parallel_entropy`` on this rank's share of the vocabulary (TP = ``world_size``),
    for each ``(logits, dtype)`` of ``cases``."""
    from megatron.core import parallel_state as mpu
    from verl.utils.megatron.tensor_parallel import vocab_parallel_entropy

    mpu.initialize_model_parallel(tensor_model_parallel_size=world_size)
    try:
        tp_rank = mpu.get_tensor_model_parallel_rank()
        shards = [logits.chunk(world_size, dim=-1)[tp_rank].to(dtype).contiguous() for logits, dtype in cases]
        return [vocab_parallel_entropy(shard) for shard in shards]
    finally:
        mpu.destroy_model_parallel()
