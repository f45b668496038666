"""How one actor update depends on micro-batching, on verl's real actor path (a test and benchmark aid).

It observes the weights from the outside: :func:`recorded_weights` wraps two functions of
:mod:`cw_verl.verl_losses` for the duration of an update; the product code has no hook for it.

:func:`updates_per_variant` runs in every rank of a gloo group (:func:`cw_verl.cpu.launch.run_ranks`):
it loads one saved RL batch (e.g. :func:`tests.support.batch.save_shared_batch`: the demo's rollout,
exact-match reward, verl's old log-probs, GRPO advantages, the prompts' ``uid``), then for each
:class:`Variant` builds a fresh actor from the same checkpoint, makes one update through
``TrainingWorker.train_mini_batch`` (verl's FSDP2 engine, micro-batching, ``ppo_loss`` and the registered
policy loss) and records the full parameter change and the per-token CW-GRPO weights each loss call used,
each row identified by a ``ROW_ID`` field that verl carries through its micro-batching.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager

import numpy as np
import torch

ROW_ID = "cw_row_id"
"""Non-tensor batch field: each row's index in the saved batch (verl's micro-batches carry it along)."""


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


@contextmanager
def recorded_weights():
    """Record ``(row ids, response mask, weights)`` of every CW-GRPO loss call in this rank (``ROW_ID`` of the
    micro-batch's rows, its ``[b, T]`` response mask and the ``[b, T]`` weights the call applied).

    Wraps :func:`cw_verl.verl_losses.reweighted_advantages` (which sees the weights) and
    :func:`cw_verl.verl_losses.verl_ppo_loss` (which the same call then hands its response mask).
    """
    from unittest import mock

    from verl.utils import tensordict_utils as tu

    from cw_verl import verl_losses
    from cw_verl.context import current_loss_call

    calls, pending = [], []
    reweighted, ppo_loss = verl_losses.reweighted_advantages, verl_losses.verl_ppo_loss

    def recording_reweighted(weights, advantages):
        pending.append(weights.detach().clone())
        return reweighted(weights, advantages)

    def recording_ppo_loss(old_log_prob, log_prob, weighted, response_mask, *args):
        if pending:  # a cw_grpo* call (cw_grpo_authors reweights inside its own loss)
            micro_batch = current_loss_call().micro_batch
            calls.append((list(tu.get(micro_batch, ROW_ID)), response_mask.detach().clone(), pending.pop()))
        return ppo_loss(old_log_prob, log_prob, weighted, response_mask, *args)

    with (
        mock.patch.object(verl_losses, "reweighted_advantages", recording_reweighted),
        mock.patch.object(verl_losses, "verl_ppo_loss", recording_ppo_loss),
    ):
        yield calls


def _weights_by_row(calls, batch) -> torch.Tensor:
    """Each batch row's weights, placed by the ``ROW_ID`` of the rows each loss call saw."""
    mask = batch.batch["response_mask"].bool()
    weights = torch.ones(mask.shape, dtype=torch.float64)
    position = {int(row_id): index for index, row_id in enumerate(batch.non_tensor_batch[ROW_ID])}
    seen = torch.zeros(len(mask), dtype=torch.bool)
    for row_ids, _, call_weights in calls:
        for row, row_id in enumerate(row_ids):
            index = position[int(row_id)]
            length = int(mask[index].sum())
            weights[index, :length] = call_weights[row, :length].double()
            seen[index] = True
    if not bool(seen[mask.any(1)].all()):
        raise RuntimeError("some rows' weights were not seen in any loss call")
    return weights


def updates_per_variant(
    rank: int, world_size: int, model_path: str, variants: list[Variant], batch_path, layout: dict | None = None
) -> dict:
    """Per variant: the gradient and parameter change of one update, each token's CW-GRPO weight and verl's
    ``actor/*`` metrics (identical on all ranks; ``weights`` is None for losses without them), and this rank's
    CW-GRPO loss calls (their number, and the valid tokens each one saw). ``layout``: further
    :class:`~cw_verl.cpu.harness.ActorSetup` keys (e.g. the Megatron engine and its parallel sizes)."""
    from cw_verl.cpu import harness
    from cw_verl.registry import CW_POLICY_LOSSES

    batch = torch.load(batch_path, weights_only=False)
    batch.non_tensor_batch[ROW_ID] = np.arange(len(batch), dtype=object)
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
        if variant.loss_mode in CW_POLICY_LOSSES:
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
