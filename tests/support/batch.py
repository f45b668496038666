"""One RL batch sampled with the demo's pipeline, saved for studies that update on the very same batch
(``tests.support.studies``, ``tests/test_scopes_engine.py``, ``benchmarks/``).

A test and benchmark aid (not part of the package): it uses the demo's task and rollout.
"""

from __future__ import annotations

import torch


def save_shared_batch(rank: int, world_size: int, model_path: str, prompts: int, group_size: int, seed: int, path):
    """Sample one RL batch with the checkpoint's policy and save it to ``path`` (run it on one rank), so
    that runs on any number of ranks update on the very same batch."""
    from cw_verl.cpu import harness

    actor = harness.build_actor(harness.ActorSetup(model_path=model_path, rollout_n=group_size, ppo_mini_batch_size=1))
    batch = shared_batch(actor, model_path, prompts, group_size, seed)
    if rank == 0:
        torch.save(batch, path)


def shared_batch(actor, model_path: str, prompts: int, group_size: int, seed: int):
    """One RL step's batch (identical on every rank), as verl's trainer hands it to ``update_actor``."""
    from verl.trainer.config import AlgoConfig
    from verl.trainer.ppo.ray_trainer import compute_advantage

    from cw_verl.cpu import harness
    from cw_verl.demo.rollout import Rollout, to_data_proto
    from cw_verl.demo.task import STREAM_RL, ReversalTask

    task = ReversalTask()
    rollout = Rollout(model_path, task, temperature=1.0)
    rollout.sync_weights(actor)
    batch = to_data_proto(rollout.sample(task.sample(prompts, seed, STREAM_RL, 1), group_size, seed, 1), task)
    log_probs, _ = harness.compute_log_prob(actor, harness.actor_chunk(actor, batch))
    batch.batch["old_log_probs"] = harness.actor_gather_rows(actor, log_probs)
    batch = compute_advantage(
        batch, adv_estimator="grpo", num_repeat=group_size, config=AlgoConfig(adv_estimator="grpo")
    )
    keys = ["prompts", "responses", "input_ids", "attention_mask", "position_ids", "response_mask"]
    return batch.select(batch_keys=keys + ["old_log_probs", "advantages"], non_tensor_batch_keys=["uid"])
