"""Rank programs for the multi-process demo tests (module-level, so spawned ranks can import them)."""

from __future__ import annotations

import math

import torch.distributed as dist

GROUP_SIZE = 4
PROMPTS = 8
PROMPTS_PER_MINI_BATCH = 4


def one_update_per_loss_mode(
    rank: int,
    world_size: int,
    model_path: str,
    loss_modes: list[str],
    micro_batch_size: int,
    seed: int,
    call_overrides: dict | None = None,
) -> dict:
    """For each loss mode in turn: a fresh actor from the same checkpoint, one RL update on one shared batch.

    The actor is set up with ``micro_batch_size`` and fixed-size micro-batches; ``call_overrides``
    (e.g. ``use_dynamic_bsz``/``max_token_len``) go to :func:`harness.train_step` for the update only.
    Returns per update the policy-loss calls seen in this rank (for every registered loss that the
    test watches), the change of this rank's parameter shards, verl's metrics, and the rank's
    per-mini-batch token counts.
    """
    call_overrides = call_overrides or {}
    from cw_verl.cpu import harness
    from tests.support.batch import shared_batch

    watched = sorted(set(loss_modes) | {"vanilla"})
    batch = None
    updates = []
    for loss_mode in loss_modes:
        actor = harness.build_actor(
            harness.ActorSetup(
                model_path=model_path,
                rollout_n=GROUP_SIZE,
                ppo_mini_batch_size=PROMPTS_PER_MINI_BATCH,
                loss_mode=loss_mode,
                ppo_micro_batch_size_per_gpu=micro_batch_size,
                lr=1e-3,
            )
        )
        if batch is None:
            batch = shared_batch(actor, model_path, PROMPTS, GROUP_SIZE, seed)
        local = harness.dp_chunk(batch)
        before = harness.local_shards(actor)
        counters = {}
        managers = [harness.count_policy_loss_calls(name) for name in watched]
        for name, manager in zip(watched, managers, strict=True):
            counters[name] = manager.__enter__()
        try:
            metrics = harness.train_step(actor, local, **call_overrides)
        finally:
            for manager in reversed(managers):
                manager.__exit__(None, None, None)
        after = harness.local_shards(actor)
        per_mini_batch = PROMPTS_PER_MINI_BATCH * GROUP_SIZE // world_size
        tokens = local.batch["attention_mask"].sum(dim=1)
        updates.append(
            {
                "loss_mode": loss_mode,
                "calls": {name: counter[0] for name, counter in counters.items()},
                "delta": {name: after[name] - before[name] for name in before},
                "metrics": metrics,
                "mini_batch_tokens": [
                    int(tokens[i : i + per_mini_batch].sum()) for i in range(0, len(tokens), per_mini_batch)
                ],
            }
        )
        del actor
    advantages = batch.batch["advantages"]
    return {
        "updates": updates,
        "local_sequences": len(batch) // world_size,
        "nonzero_advantage_rows": int((advantages.abs().sum(dim=1) > 0).sum()),
        # With dynamic batch size, no micro-batch may hold more than max_token_len tokens.
        "min_micro_batches": [math.ceil(t / call_overrides["max_token_len"]) for t in updates[0]["mini_batch_tokens"]]
        if call_overrides.get("use_dynamic_bsz")
        else None,
    }


def raise_on_rank_one(rank: int, world_size: int) -> int:
    if rank == 1:
        raise ValueError("rank one fails on purpose")
    dist.barrier()
    return rank


def sleep_forever(rank: int, world_size: int) -> None:
    import time

    time.sleep(3600)


def rank_and_platform(rank: int, world_size: int) -> tuple[int, int, str, str]:
    from verl.utils.device import get_device_name, get_nccl_backend

    return rank, dist.get_world_size(), get_device_name(), get_nccl_backend()


def environment_value(rank: int, world_size: int, name: str) -> str | None:
    import os

    return os.environ.get(name)


def write_pid_and_sleep(rank: int, world_size: int, directory: str) -> None:
    import os
    import time

    with open(f"{directory}/rank{rank}.pid", "w") as f:
        f.write(str(os.getpid()))
    time.sleep(3600)
