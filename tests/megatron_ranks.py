"""Rank functions for tests/test_megatron_engine.py (module-level, so that spawned ranks can import them)."""

import torch
import torch.distributed as dist

from tests.support.megatron_study import LAYOUTS, layout_run


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


def recompute_gradients(rank, world_size):
    """A segment with dropout on the default CPU stream and on the tracker's model-parallel stream (as megatron's
    attention dropout), run plain, under megatron's activation recompute, and under recompute with the RNG restore
    disabled (the control: replaying it on other random numbers). Returns each run's output, gradients and the
    default stream's state afterwards."""
    from megatron.core import parallel_state as mpu
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel import random

    mpu.initialize_model_parallel()
    try:
        random.model_parallel_cuda_manual_seed(123)
        tracker = random.get_cuda_rng_tracker()
        start = tracker.get_states()
        torch.manual_seed(0)
        layers = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 8))
        x = torch.randn(4, 8)

        def segment(h):
            h = torch.nn.functional.dropout(layers[0](h), p=0.5)
            with tracker.fork():
                h = torch.nn.functional.dropout(h, p=0.5)
            return layers[1](h)

        def run(recompute):
            torch.manual_seed(1)
            tracker.set_states(dict(start))  # the tracker forks into the dict it is given
            inp = x.clone().requires_grad_()
            out = tensor_parallel.checkpoint(segment, False, inp) if recompute else segment(inp)
            out.square().sum().backward()
            grads = [inp.grad] + [p.grad.clone() for p in layers.parameters()]
            layers.zero_grad(set_to_none=True)
            return {"out": out.detach(), "grads": grads, "rng_after": torch.get_rng_state()}

        runs = {"plain": run(False), "recompute": run(True)}
        restore = random._set_all_rng_states
        random._set_all_rng_states = lambda *states: None
        try:
            runs["recompute without restore"] = run(True)
        finally:
            random._set_all_rng_states = restore
        runs["patched"] = [getattr(random._get_all_rng_states, "_cw_verl_cuda_as_cpu", False), restore.__name__]
        return runs
    finally:
        mpu.destroy_model_parallel()
