"""The CPU checkpoint engine (cw_verl/cpu/gloo_checkpoint_engine.py) driven the way verl's manager drives it.

Four gloo ranks: 0 and 1 play the actor workers (their weight generator is collective over the two, as
FSDP's full-tensor gather is), 2 and 3 the rollout's checkpoint workers. Each update follows
``CheckpointEngineManager.update_weights``: ``prepare`` on all, ``build_topology`` over the gathered metadata,
``init_process_group``, send and receive together, ``finalize``.
"""

import asyncio

import pytest
import torch
import torch.distributed as dist

from cw_verl.cpu.gloo_checkpoint_engine import BACKEND, GlooCheckpointEngine, StoreAddress
from tests.ranks import run_on_ranks

ACTORS = 2
BUCKET_BYTES = 256


def _weights(update: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(update)
    return {
        "embed.weight": torch.randn(7, 5, generator=generator),  # 140 bytes
        "norm.weight": torch.randn(3, generator=generator).to(torch.bfloat16),  # 6 bytes: misaligns what follows
        "lm_head.weight": torch.randn(300, generator=generator),  # 1200 bytes: chunked over 5 buckets
        "position": torch.arange(update, update + 2, dtype=torch.int64),
    }


def _actor_weights(update: int, actor_group):
    # Producing each full tensor is collective over the actor ranks, as FSDP's gather is; an actor rank that
    # skipped its generator would leave rank 0 waiting here.
    for name, tensor in _weights(update).items():
        token = torch.ones(1)
        dist.all_reduce(token, group=actor_group)
        assert token.item() == ACTORS
        yield name, tensor


async def _collect(generator) -> list[tuple[str, torch.Tensor]]:
    return [(name, tensor.clone()) async for name, tensor in generator]


def _updates_on_rank(rank: int, world_size: int, updates: int) -> list:
    actor_group = dist.new_group(list(range(ACTORS)))
    is_actor = rank < ACTORS
    engine = GlooCheckpointEngine(bucket_size=BUCKET_BYTES, is_master=rank == 0, timeout_s=60)
    received = []
    for update in range(updates):
        metadata = [None] * world_size
        dist.all_gather_object(metadata, engine.prepare())
        actor_kwargs, rollout_kwargs = GlooCheckpointEngine.build_topology(ACTORS, world_size - ACTORS, metadata)
        kwargs, index = (actor_kwargs, rank) if is_actor else (rollout_kwargs, rank - ACTORS)
        engine.init_process_group(**{key: values[index] for key, values in kwargs.items()})
        if is_actor:
            asyncio.run(engine.send_weights(_actor_weights(update, actor_group)))
        else:
            received.append(asyncio.run(_collect(engine.receive_weights())))
        engine.finalize()
    return received


def test_rollout_workers_receive_every_weight_bit_for_bit_in_each_update():
    updates = 2
    results = run_on_ranks(_updates_on_rank, 4, updates)
    assert results[:ACTORS] == [[], []]
    for received in results[ACTORS:]:
        assert len(received) == updates
        for update, weights in enumerate(received):
            expected = _weights(update)
            assert [name for name, _ in weights] == list(expected)
            for name, tensor in weights:
                assert tensor.dtype == expected[name].dtype and tensor.shape == expected[name].shape
                assert torch.equal(tensor, expected[name]), name


def test_build_topology_sends_from_actor_rank_0_only():
    address = StoreAddress(host="10.0.0.1", port=1234)
    actor, rollout = GlooCheckpointEngine.build_topology(3, 2, [address, None, None, None, None])
    assert actor == {"rank": [0, -1, -1], "world_size": [3] * 3, "address": [address] * 3}
    assert rollout == {"rank": [1, 2], "world_size": [3] * 2, "address": [address] * 2}


def test_build_topology_refuses_metadata_without_the_senders_address():
    with pytest.raises(ValueError, match="actor rank 0 must report the store's address"):
        GlooCheckpointEngine.build_topology(2, 1, [None, None, None])


def test_a_rank_must_join_before_it_sends_or_receives():
    engine = GlooCheckpointEngine(bucket_size=BUCKET_BYTES)
    with pytest.raises(RuntimeError, match="before init_process_group"):
        asyncio.run(engine.send_weights(iter([])))
    with pytest.raises(RuntimeError, match="only rollout workers receive"):
        asyncio.run(_collect(engine.receive_weights()))


def test_registered_under_its_backend_name_in_verls_registry():
    from verl.checkpoint_engine.base import CheckpointEngineRegistry

    assert CheckpointEngineRegistry.get(BACKEND) is GlooCheckpointEngine


def _code(obj) -> str:
    import inspect

    return "".join(inspect.getsource(obj).split())


def test_verls_manager_and_workers_drive_an_engine_as_the_test_above_does():
    """Written against verl 0.9.1: fails loudly if the calls the four-rank test mimics change shape."""
    from verl.checkpoint_engine.base import CheckpointEngine, CheckpointEngineManager, CheckpointEngineWorker
    from verl.workers.engine_workers import ActorRolloutRefWorker

    assert CheckpointEngine.__abstractmethods__ == {
        "prepare",
        "build_topology",
        "init_process_group",
        "finalize",
        "send_weights",
        "receive_weights",
    }
    build = _code(CheckpointEngineManager.build_process_group)
    assert 'execute_checkpoint_engine(["prepare"]*actor_wg.world_size)+rollout.execute_checkpoint_engine(' in build
    assert "self.backend_cls.build_topology(actor_wg.world_size,rollout.world_size,metadata)" in build
    assert '["init_process_group"]' in build
    update = _code(CheckpointEngineManager.update_weights)
    assert "self.build_process_group(rollout)" in update and '["finalize"]' in update
    # Actor rank 0 is the master; every engine gets the bucket size and the backend's engine_kwargs.
    assert "is_master=(torch.distributed.get_rank()==0),bucket_size=bucket_size,**engine_kwargs" in _code(
        ActorRolloutRefWorker.init_model
    )
    assert "bucket_size=bucket_size,**engine_kwargs" in _code(CheckpointEngineWorker.__init__)
    assert "self.checkpoint_engine.receive_weights(global_steps=global_steps)" in _code(
        CheckpointEngineWorker.update_weights
    )
