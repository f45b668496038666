"""verl's actor update path without a model engine: the trainer's batch layout, verl's own micro-batching
(``prepare_micro_batches``, fixed or dynamic), verl's ``ppo_loss``, and the patched ``BaseEngine.train_batch``.

The real FSDP engine on CPU is exercised by ``tests/demo``; this harness is small and fast enough to sweep
micro-batch sizes, packings and DP sizes in float64.
"""

from functools import partial

import numpy as np
import torch
import torch.distributed as dist

PROMPT, RESPONSE, VOCAB, HIDDEN = 4, 12, 13, 6
NUM_SEQUENCES, GROUP_SIZE = 16, 4
ROW_ID = "fake_row_id"
"""Non-tensor field: each row's index in the global batch (``row-<i>``), carried through verl's micro-batching."""


class ToyLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.embed = torch.nn.Embedding(VOCAB, HIDDEN, dtype=torch.float64)
        self.head = torch.nn.Linear(HIDDEN, VOCAB, dtype=torch.float64)

    def forward(self, input_ids):
        """Next-token log-probs per position of a jagged batch, the layout verl's engines return."""
        ids = input_ids.values()
        logp = torch.log_softmax(self.head(self.embed(ids)), -1)
        next_ids = torch.roll(ids, -1)  # wraps at sequence ends; those positions are never read
        values = logp.gather(-1, next_ids[:, None]).squeeze(-1)
        return torch.nested.nested_tensor_from_jagged(values, offsets=input_ids.offsets())


def trainer_batch(rows, on_policy=False, interleaved_groups=True):
    """The actor's update batch as the trainer sends it, for the given rows of a fixed global batch.

    Groups of GROUP_SIZE responses share a ``uid``; interleaved, a group's responses are spread over
    every rank and micro-batch. ``on_policy``: old_log_probs are the ToyLM's own (one update per rollout).
    """
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import left_right_2_no_padding

    gen = torch.Generator().manual_seed(7)
    n = NUM_SEQUENCES
    prompt_lens = torch.randint(1, PROMPT + 1, (n,), generator=gen)
    response_lens = torch.randint(1, RESPONSE + 1, (n,), generator=gen)
    response_lens[5] = RESPONSE
    prompts = torch.randint(1, VOCAB, (n, PROMPT), generator=gen)
    responses = torch.randint(1, VOCAB, (n, RESPONSE), generator=gen)
    prompt_mask = torch.arange(PROMPT)[None, :] >= (PROMPT - prompt_lens)[:, None]
    response_mask = torch.arange(RESPONSE)[None, :] < response_lens[:, None]
    group = torch.arange(n) % (n // GROUP_SIZE) if interleaved_groups else torch.arange(n) // GROUP_SIZE
    rewards = torch.randint(0, 2, (n,), generator=gen).double()
    adv = torch.zeros(n, dtype=torch.float64)
    for g in group.unique():
        members = group == g
        adv[members] = (rewards[members] - rewards[members].mean()) / (rewards[members].std() + 1e-6)
    old_log_probs = -torch.rand(n, RESPONSE, generator=gen, dtype=torch.float64) * 3
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    rows = torch.as_tensor(rows, dtype=torch.long)
    uids = np.array([f"prompt-{int(g)}" for g in group], dtype=object)[rows.numpy()]
    data = tu.get_tensordict(
        {
            "prompts": prompts[rows],
            "responses": responses[rows],
            "input_ids": torch.cat([prompts, responses], dim=1)[rows],
            "attention_mask": attention_mask[rows].long(),
            "position_ids": position_ids[rows],
            "response_mask": response_mask[rows].long(),
            "old_log_probs": old_log_probs[rows],
            "advantages": (adv[:, None] * response_mask)[rows],
            "uid": list(uids),
            ROW_ID: [f"row-{int(row)}" for row in rows],
        },
        non_tensor_dict={"temperature": 1.0},
    )
    data = left_right_2_no_padding(data)
    if on_policy:
        from verl.workers.utils.padding import no_padding_2_padding

        with torch.no_grad():
            current = no_padding_2_padding(ToyLM()(data["input_ids"]), data)
        data["old_log_probs"] = current * data["response_mask"]
    return data


class MinimalEngine:
    """Duck-typed to what ``BaseEngine.train_batch`` uses, with the FSDP engine's forward_backward_batch logic."""

    def __init__(self, model, dp_group):
        self.model, self.dp_group = model, dp_group
        self.micro_batch_sizes = []

    def get_data_parallel_group(self):
        return self.dp_group

    def optimizer_zero_grad(self):
        self.model.zero_grad()

    def optimizer_step(self):
        return 0.0

    def is_mp_src_rank_with_outputs(self):
        return True

    def forward_backward_batch(self, data, loss_function, forward_only=False):
        from verl.utils import tensordict_utils as tu
        from verl.workers.engine.utils import prepare_micro_batches

        group = self.get_data_parallel_group()
        batch_num_tokens = data["loss_mask"].sum()
        dp_size = dist.get_world_size(group) if group is not None else 1
        if group is not None:
            dist.all_reduce(batch_num_tokens, group=group)
        tu.assign_non_tensor(data, batch_num_tokens=batch_num_tokens.item(), dp_size=dp_size)
        micro_batches, _ = prepare_micro_batches(data=data, dp_group=group, same_micro_num_in_dp=True)
        metrics = []
        for micro_batch in micro_batches:
            output = {"log_probs": self.model(micro_batch["input_ids"])}
            loss, step_metrics = loss_function(model_output=output, data=micro_batch, dp_group=group)
            loss.backward()
            self.micro_batch_sizes.append(len(micro_batch))
            metrics.append(step_metrics)
        return {"metrics": {"steps": metrics}}


def rank_rows(rank, world_size, uneven=False):
    """Rows of the global batch on ``rank``: contiguous shards, equal as verl's dispatch makes them, or uneven
    (possible with one micro-batch per rank, or dynamic batch sizes that equalise the micro-batch count)."""
    even = {1: [0, 16], 2: [0, 8, 16], 4: [0, 4, 8, 12, 16]}
    bounds = {1: [0, 16], 2: [0, 6, 16], 4: [0, 3, 8, 12, 16]} if uneven else even
    return list(range(bounds[world_size][rank], bounds[world_size][rank + 1]))


def train_step(
    rank,
    world_size,
    loss_mode,
    micro_batch_size=None,
    dynamic_tokens=None,
    bridged=True,
    rollout_n=GROUP_SIZE,
    mark=None,
    policy_loss=None,
    **batch_kw,
):
    """One optimizer mini-batch through the patched ``BaseEngine.train_batch``: DP-averaged gradients,
    the number of loss calls, and per-call metrics.

    ``micro_batch_size`` per rank (fixed micro-batches) or ``dynamic_tokens`` (verl's dynamic batch size,
    token-packed micro-batches of at most that many tokens). ``mark``: the advantage estimator the driver
    recorded in the batch (cw_verl.patches.advantage_source). ``policy_loss``: further ``policy_loss`` knobs.
    """
    import verl  # noqa: F401  (loads the cw_verl plugin)
    from verl.utils import tensordict_utils as tu
    from verl.workers.engine.base import BaseEngine
    from verl.workers.utils.losses import ppo_loss

    from tests.toy_policy import actor_config

    rows = rank_rows(rank, world_size, batch_kw.pop("uneven", False))
    data = trainer_batch(rows, **batch_kw)
    dynamic = dynamic_tokens is not None
    if mark is not None:
        from cw_verl.patches.advantage_source import MARK

        tu.assign_non_tensor(data, **{MARK: mark})
    tu.assign_non_tensor(
        data,
        global_batch_size=NUM_SEQUENCES,
        use_dynamic_bsz=dynamic,
        micro_batch_size_per_gpu=micro_batch_size or len(rows),
        max_token_len_per_gpu=dynamic_tokens or 0,
    )
    from verl.workers.config import PolicyLossConfig

    knobs = PolicyLossConfig(loss_mode=loss_mode, **(policy_loss or {}))
    config = actor_config("token-mean", policy_loss=knobs, rollout_n=rollout_n)
    model = ToyLM()
    engine = MinimalEngine(model, dist.group.WORLD if world_size > 1 else None)
    loss_fn = partial(ppo_loss, config=config)  # what engine_workers builds
    if bridged:
        out = BaseEngine.train_batch(engine, data, loss_fn)  # the patched entry point every engine runs
    else:
        out = type(engine).forward_backward_batch(engine, data, loss_fn)
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    if world_size > 1:
        dist.all_reduce(grads)
        grads /= world_size
    steps = out["metrics"]["steps"]
    return {
        "grads": grads,
        "micro_batch_sizes": engine.micro_batch_sizes,
        "metrics": [{k: v.aggregate() for k, v in m.items() if hasattr(v, "aggregate")} for m in steps],
    }
