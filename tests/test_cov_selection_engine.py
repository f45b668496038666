"""clip_cov_minibatch and kl_cov_minibatch on verl's real actor path (TrainingWorker, FSDP2 engine, verl's
micro-batching and ppo_loss) on two gloo ranks: with several micro-batches per rank, fixed or token-packed,
the tokens selected are the set of one selection over the whole mini-batch, in each of two PPO epochs; verl's
own clip_cov and kl_cov select another number of tokens on the same update (the negative control)."""

from collections import Counter

import numpy as np
import pytest
import torch

from tests.ranks import run_on_ranks
from tests.test_cov_selection_dp import KNOBS, VERL_MODE, verl_counts

PROMPTS, GROUP_SIZE = 4, 4  # 16 sequences
LAYOUTS = [{"micro_batch_size": 2}, {"max_token_len": 40}]
EPOCHS = 2  # ppo_epochs: the mini-batch is trained twice, its selection made twice


def with_spread_advantages(batch):
    """The saved batch with one seeded advantage per sequence: a barely warmed-up policy earns the same reward on
    most prompts, and the selection needs covariances of both signs (the loss does not care where A came from)."""
    gen = torch.Generator().manual_seed(11)
    mask = batch.batch["response_mask"]
    batch.batch["advantages"] = torch.randn(len(mask), 1, generator=gen).expand_as(mask) * mask
    return batch


def engine_selections(rank, world_size, model_path, layouts=LAYOUTS, parallel=None, epochs=1):
    """One actor on the ranks (``parallel``: further ActorSetup keys, e.g. a Megatron layout): it samples the
    batch (:func:`tests.support.batch.shared_batch`), then per loss mode and micro-batch layout makes one update
    of ``epochs`` PPO epochs and records the (row, position) pairs this rank's calls selected (``picks``: every
    time one was), its call count and the metrics; then verl's own mode on the first layout, with its per-call
    counts. The selection is made from the batch's old log-probs, so the updates in between do not change it."""
    import dataclasses
    from unittest import mock

    from verl.utils import tensordict_utils as tu

    from cw_verl.context import current_loss_call
    from cw_verl.cpu import harness
    from cw_verl.selection import Selection
    from tests.support.batch import shared_batch
    from tests.support.studies import ROW_ID

    knobs = {key: value for per_mode in KNOBS.values() for key, value in per_mode.items()}
    actor = harness.build_actor(
        harness.ActorSetup(
            model_path=model_path,
            rollout_n=GROUP_SIZE,
            ppo_mini_batch_size=PROMPTS,
            policy_loss=knobs,
            **(parallel or {}),
        )
    )
    batch = with_spread_advantages(shared_batch(actor, model_path, PROMPTS, GROUP_SIZE, 0))
    batch.non_tensor_batch[ROW_ID] = np.arange(len(batch), dtype=object)
    local = harness.actor_chunk(actor, batch)
    actor.setup = dataclasses.replace(actor.setup, ppo_epochs=epochs)  # read by train_step for each update
    members = Selection.members
    out = {"batch": batch, "dp_rank": actor.engine.get_data_parallel_rank()}
    for loss_mode in KNOBS:
        for layout in layouts:
            picks, calls = [], []

            def recording(self, cov, valid, old_log_prob, advantages, picks=picks, calls=calls):
                chosen = members(self, cov, valid, old_log_prob, advantages)
                rows = tu.get(current_loss_call().micro_batch, ROW_ID)
                picks.extend((int(rows[r]), t) for r, t in chosen.nonzero().tolist())
                calls.append(int(valid.sum()))
                return chosen

            with mock.patch.object(Selection, "members", recording):
                metrics = harness.train_step(actor, local, loss_mode=loss_mode, **step_layout(layout))
            out[(loss_mode, tuple(layout.items()))] = {
                "selected": set(picks),
                "picks": picks,
                "calls": calls,
                "metrics": metrics,
            }
        with verl_counts(VERL_MODE[loss_mode]) as counts:
            harness.train_step(actor, local, loss_mode=VERL_MODE[loss_mode], **step_layout(layouts[0]))
        out[VERL_MODE[loss_mode]] = counts
    return out


def step_layout(layout):
    return {
        "micro_batch_size": layout.get("micro_batch_size"),
        "use_dynamic_bsz": "max_token_len" in layout,
        "max_token_len": layout.get("max_token_len"),
    }


def one_selection(batch, loss_mode):
    """The set one call over the whole mini-batch selects: the statistics pass and selection on one process."""
    from verl.workers.config import PolicyLossConfig

    from cw_verl.cov_losses import selection_rule
    from cw_verl.selection import select, token_keys
    from cw_verl.weights import scope_statistics
    from tests.toy_policy import actor_config

    old, adv = batch.batch["old_log_probs"], batch.batch["advantages"]
    mask = batch.batch["response_mask"].bool()
    rule = selection_rule(
        loss_mode, actor_config(policy_loss=PolicyLossConfig(loss_mode=loss_mode, **KNOBS[loss_mode]))
    )
    stats, tokens = scope_statistics(old, adv, mask)
    keys = token_keys(old, adv, mask)
    selection = select(rule, rule.count(int(mask.sum())), tokens.cov, tokens.valid, keys, lambda t: t[None])
    chosen = selection.members(tokens.cov, tokens.valid, old, adv)
    return {(r, t) for r, t in chosen.nonzero().tolist()}, selection


@pytest.fixture(scope="module")
def results(tiny_assets):
    per_rank = run_on_ranks(engine_selections, 2, str(tiny_assets / "model"), LAYOUTS, None, EPOCHS)
    return per_rank[0]["batch"], per_rank


@pytest.mark.parametrize("loss_mode", list(KNOBS))
def test_dp2_engine_selection_equals_the_one_call_set_and_verls_count_moves(results, loss_mode):
    import verl  # noqa: F401  (loads the cw_verl plugin)

    batch, per_rank = results
    expected, selection = one_selection(batch, loss_mode)
    assert len(expected) == selection.selected == min(selection.k, selection.eligible) > 1
    for layout in LAYOUTS:
        key = (loss_mode, tuple(layout.items()))
        ours = [r[key] for r in per_rank]
        assert min(len(r["calls"]) for r in ours) > 1, layout  # several micro-batches on each rank
        union = set().union(*(r["selected"] for r in ours))
        assert sum(len(r["selected"]) for r in ours) == len(union) and union == expected, layout
        # every PPO epoch selected the same tokens: each one picked once per epoch
        for r in ours:
            assert Counter(r["picks"]) == dict.fromkeys(r["selected"], EPOCHS), layout
        for r in ours:
            assert r["metrics"]["actor/cov_select/selected"] == selection.selected
            assert r["metrics"]["actor/cov_select/k"] == selection.k
    verl_total = sum(sum(r[VERL_MODE[loss_mode]]) for r in per_rank)
    assert verl_total != len(expected)
