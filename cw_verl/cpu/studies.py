"""How one actor update depends on micro-batching, on verl's real actor path (a test and benchmark aid).

:func:`updates_per_variant` runs in every rank of a gloo group (:func:`cw_verl.cpu.launch.run_ranks`):
it loads one RL batch sampled with the demo's pipeline (:func:`save_shared_batch`: rollout, exact-match
reward, verl's old log-probs, GRPO advantages, the prompts' ``uid``), then for each :class:`Variant`
builds a fresh actor from the same
checkpoint, makes one update through ``TrainingWorker.train_mini_batch`` (verl's FSDP2 engine,
micro-batching, ``ppo_loss`` and the registered policy loss) and records the full parameter change and
the per-token CW-GRPO weights each loss call used.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager

import torch


@dataclasses.dataclass(frozen=True)
class Variant:
    """A policy loss and a micro-batching: fixed micro-batches of ``micro_batch_size`` sequences per rank,
    or, with ``max_token_len``, verl's dynamic batch size (token-packed micro-batches)."""

    loss_mode: str
    micro_batch_size: int | None = None
    max_token_len: int | None = None

    def __post_init__(self):
        if (self.micro_batch_size is None) == (self.max_token_len is None):
            raise ValueError("a variant has either micro_batch_size or max_token_len")

    @property
    def label(self) -> str:
        return f"dynamic<={self.max_token_len} tokens" if self.max_token_len else f"{self.micro_batch_size} seq"


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


@contextmanager
def recorded_weights():
    """Record ``(old_log_prob rows, response_mask rows, weights)`` of every CW-GRPO loss call in this rank."""
    from cw_verl import verl_losses

    calls = []

    def record(old_log_prob, response_mask, weights):
        calls.append((old_log_prob.detach().clone(), response_mask.clone(), weights.detach().clone()))

    verl_losses.weight_observers.append(record)
    try:
        yield calls
    finally:
        verl_losses.weight_observers.remove(record)


def _weights_by_row(calls, batch) -> torch.Tensor:
    """Each batch row's weights, found by matching a call's rows to the batch's by their old log-probs."""
    old = batch.batch["old_log_probs"]
    mask = batch.batch["response_mask"].bool()
    weights = torch.ones(old.shape, dtype=torch.float64)
    found = torch.zeros(len(old), dtype=torch.bool)
    for call_old, call_mask, call_weights in calls:
        for row in range(call_old.shape[0]):
            valid = call_mask[row].bool()
            length = int(valid.sum())
            if length == 0:
                continue
            candidates = (mask.sum(1) == length) & (old[:, :length] == call_old[row, :length]).all(1) & ~found
            index = int(torch.nonzero(candidates)[0, 0])  # identical responses: the first one not yet placed
            weights[index, :length] = call_weights[row, :length].double()
            found[index] = True
    if not bool(found[mask.any(1)].all()):
        raise RuntimeError("some rows' weights were not seen in any loss call")
    return weights


def updates_per_variant(
    rank: int, world_size: int, model_path: str, variants: list[Variant], batch_path, layout: dict | None = None
) -> dict:
    """Per variant: the gradient and parameter change of one update, each token's CW-GRPO weight and verl's
    ``actor/*`` metrics (identical on all ranks; ``weights`` is None for losses without them), and this rank's
    CW-GRPO loss calls (their number, and the valid tokens each one saw). ``layout``: further
    :class:`~cw_verl.cpu.harness.ActorSetup` keys (e.g. the Megatron engine and its parallel sizes)."""
    from cw_verl import verl_losses
    from cw_verl.cpu import harness

    batch = torch.load(batch_path, weights_only=False)
    group_size = int(len(batch) // len(set(batch.non_tensor_batch["uid"])))
    results = {}
    for variant in variants:
        actor = harness.build_actor(
            harness.ActorSetup(
                model_path=model_path,
                rollout_n=group_size,
                ppo_mini_batch_size=len(batch) // group_size,
                loss_mode=variant.loss_mode,
                ppo_micro_batch_size_per_gpu=variant.micro_batch_size or 1,
                lr=1e-3,
                **(layout or {}),
            )
        )
        local = harness.actor_chunk(actor, batch)
        before = harness.full_state_dict(actor)
        with recorded_weights() as calls, harness.recorded_gradient(actor) as gradient:
            metrics = harness.train_step(
                actor,
                local,
                micro_batch_size=variant.micro_batch_size,
                use_dynamic_bsz=variant.max_token_len is not None,
                max_token_len=variant.max_token_len,
            )
        after = harness.full_state_dict(actor)
        delta = torch.cat([(after[name] - before[name]).flatten().double() for name in sorted(before)])
        weights = None
        if variant.loss_mode in verl_losses.POLICY_LOSSES:
            # Megatron's pipeline stages before the last make no loss call: placeholder rows, never read.
            own = _weights_by_row(calls, local) if calls else torch.ones(local.batch["old_log_probs"].shape)
            weights = harness.from_output_rank(actor, harness.actor_gather_rows(actor, own.double()))
        results[variant] = {
            "gradient": torch.cat([gradient[name].flatten() for name in sorted(gradient)]),
            "delta": delta,
            "weights": weights,
            "loss_calls": len(calls),
            "loss_call_tokens": [int(mask.sum()) for _, mask, _ in calls],
            "metrics": metrics,
        }
        del actor
    return {"variants": results, "response_mask": batch.batch["response_mask"].bool()}
