"""Statistics scopes through verl's micro-batching (fixed and dynamic) and the patched engine entry point:
mini-batch and group scopes give the same update for any micro-batch size, packing and DP size; the
per-call scope does not, and all scopes agree where they must."""

import pytest
import torch

from cw_verl.weights import CovarianceInputError
from tests.fake_engine import GROUP_SIZE, NUM_SEQUENCES, train_step
from tests.ranks import run_on_ranks

INVARIANT_MODES = ["cw_grpo_minibatch", "cw_grpo_group", "cw_grpo"]
# (micro_batch_size, dynamic_tokens, uneven shards) per rank; dynamic batching equalises the call count.
SINGLE_RANK_VARIANTS = [(1, None, False), (2, None, False), (4, None, False), (8, None, False), (None, 20, False)]
MULTI_RANK_VARIANTS = [(1, None, False), (4, None, False), (None, 20, False), (None, 1000, True)]


def sweep(rank, world_size, variants, modes):
    return {
        (mode, variant): train_step(rank, world_size, mode, variant[0], variant[1], uneven=variant[2])["grads"]
        for mode in modes
        for variant in variants
    }


@pytest.fixture(scope="module")
def reference():
    """One rank, one micro-batch holding the whole mini-batch."""
    return {mode: train_step(0, 1, mode, NUM_SEQUENCES) for mode in INVARIANT_MODES + ["cw_grpo_microbatch"]}


def test_single_rank_update_does_not_depend_on_micro_batching(reference):
    for mode in INVARIANT_MODES:
        for micro_batch_size, dynamic_tokens, _ in SINGLE_RANK_VARIANTS:
            step = train_step(0, 1, mode, micro_batch_size, dynamic_tokens)
            assert len(step["micro_batch_sizes"]) > 1
            torch.testing.assert_close(step["grads"], reference[mode]["grads"], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("world_size", [2, 4])
def test_update_does_not_depend_on_data_parallel_size_or_packing(world_size, reference):
    variants = MULTI_RANK_VARIANTS if world_size == 2 else [(1, None, False), (None, 20, False)]
    results = run_on_ranks(sweep, world_size, variants, INVARIANT_MODES)
    for per_rank in results:
        for (mode, _), grads in per_rank.items():
            torch.testing.assert_close(grads, reference[mode]["grads"], rtol=1e-12, atol=1e-15)


def test_per_call_scope_changes_with_the_micro_batch_size(reference):
    """The bug the wider scopes fix (verl issue #7829's shape): same data, another micro-batch size."""
    whole = reference["cw_grpo_microbatch"]["grads"]
    for micro_batch_size in (1, 2, 4):
        split = train_step(0, 1, "cw_grpo_microbatch", micro_batch_size)["grads"]
        assert (split - whole).abs().max().item() > 1e-4


def test_minibatch_scope_equals_per_call_scope_on_policy_with_one_micro_batch():
    per_call = train_step(0, 1, "cw_grpo_microbatch", NUM_SEQUENCES, on_policy=True)
    minibatch = train_step(0, 1, "cw_grpo_minibatch", NUM_SEQUENCES, on_policy=True)
    torch.testing.assert_close(minibatch["grads"], per_call["grads"], rtol=1e-10, atol=1e-14)
    assert minibatch["metrics"][0]["actor/cw/sigma"] == pytest.approx(per_call["metrics"][0]["actor/cw/sigma"])


def test_group_scope_equals_per_call_scope_when_a_micro_batch_is_one_group_on_policy():
    """trl's layout in the paper: each loss call saw exactly one prompt's G responses."""
    kw = dict(on_policy=True, interleaved_groups=False)
    per_call = train_step(0, 1, "cw_grpo_microbatch", GROUP_SIZE, **kw)
    group = train_step(0, 1, "cw_grpo_group", GROUP_SIZE, **kw)
    torch.testing.assert_close(group["grads"], per_call["grads"], rtol=1e-10, atol=1e-14)
    # ...and differs from the mini-batch scope, which pools the groups.
    minibatch = train_step(0, 1, "cw_grpo_minibatch", GROUP_SIZE, **kw)
    assert (minibatch["grads"] - group["grads"]).abs().max().item() > 1e-4


def test_wide_scopes_emit_the_same_metrics_on_every_call_and_rank():
    results = run_on_ranks(train_step, 2, "cw_grpo_minibatch", 2)
    metrics = [m for r in results for m in r["metrics"]]
    assert len(metrics) == 8
    for key in ("actor/cw/sigma", "actor/cw/num_tokens", "actor/cw/weight_min", "actor/cw/weight_max"):
        assert len({m[key] for m in metrics}) == 1, key


def test_group_scope_refuses_incomplete_groups():
    with pytest.raises(CovarianceInputError, match="rollout.n=3"):
        train_step(0, 1, "cw_grpo_group", 4, rollout_n=3)


def test_wide_scopes_outside_an_engine_call_say_how_to_use_them():
    from verl.trainer.ppo.core_algos import get_policy_loss_fn

    from tests.toy_policy import actor_config, global_batch

    batch = global_batch()
    with pytest.raises(RuntimeError, match="once per optimizer mini-batch"):
        get_policy_loss_fn("cw_grpo_minibatch")(
            old_log_prob=batch["old_log_prob"],
            log_prob=batch["old_log_prob"],
            advantages=batch["advantages"],
            response_mask=batch["mask"],
            config=actor_config(),
        )


def loss_calls_with_one_bad_micro_batch(rank, world_size, loss_mode, bad_rank, bad_call):
    """The engine's loss calls of one mini-batch (2 micro-batches per rank), with a malformed micro-batch
    (old log-probs one position short) on ``bad_rank`` only: which call raised, and what, on this rank."""
    import torch.distributed as dist
    from verl.trainer.ppo.core_algos import get_policy_loss_fn
    from verl.utils import tensordict_utils as tu

    from cw_verl.context import loss_call, train_batch_call
    from tests.fake_engine import rank_rows, trainer_batch
    from tests.toy_policy import actor_config

    data = trainer_batch(rank_rows(rank, world_size))
    tu.assign_non_tensor(data, global_batch_size=NUM_SEQUENCES)
    padded = data.select("old_log_probs", "advantages", "response_mask").to_padded_tensor()
    config = actor_config(policy_loss={"loss_mode": loss_mode}, rollout_n=GROUP_SIZE)
    tokens = padded["response_mask"].sum()
    dist.all_reduce(tokens)
    config.global_batch_info.update(
        dp_size=world_size, batch_num_tokens=int(tokens), global_batch_size=NUM_SEQUENCES, loss_scale_factor=None
    )
    half = len(padded) // 2
    with train_batch_call(data):
        for call, rows in enumerate((slice(0, half), slice(half, None))):
            old = padded["old_log_probs"][rows]
            if rank == bad_rank and call == bad_call:
                old = old[:, :-1]
            micro = tu.index_select_tensor_dict(data, torch.arange(len(padded))[rows])
            with loss_call(dist.group.WORLD, micro):
                try:
                    get_policy_loss_fn(loss_mode)(
                        old_log_prob=old,
                        log_prob=padded["old_log_probs"][rows].clone().requires_grad_(),
                        advantages=padded["advantages"][rows],
                        response_mask=padded["response_mask"][rows].bool(),
                        config=config,
                    )
                except CovarianceInputError as error:
                    return call, str(error)
    return None, None


CASES = [
    (loss_mode, bad_call)
    for loss_mode in ("cw_grpo_minibatch", "cw_grpo_group", "cw_grpo_microbatch")
    for bad_call in (0, 1)
]


def every_case(rank, world_size):
    # Every rank stops at the same call of each case, so the ranks stay in step from one case to the next.
    return [loss_calls_with_one_bad_micro_batch(rank, world_size, mode, 1, call) for mode, call in CASES]


def test_a_bad_micro_batch_on_one_rank_stops_every_rank_at_that_call():
    """Never one rank raising while the others go on into the backward's collectives and wait forever."""
    per_rank = run_on_ranks(every_case, 2)
    for (loss_mode, bad_call), good, bad in zip(CASES, per_rank[0], per_rank[1], strict=True):
        assert (good[0], bad[0]) == (bad_call, bad_call), loss_mode
        assert "(4, 11)" in bad[1]  # the bad rank names its malformed tensor
        assert "rank(s) [1]" in good[1]


@pytest.mark.parametrize("loss_mode", ["cw_grpo_minibatch", "cw_grpo_group"])
def test_a_first_call_holding_the_whole_mini_batch_reuses_the_statistics_pass(loss_mode, monkeypatch):
    """One micro-batch per mini-batch: the weights of the statistics pass are applied, not computed again
    (bitwise the same, tests/test_weights.py); a micro-batch of the same shape but other values is weighed
    anew."""
    import verl  # noqa: F401  (registers the losses)
    from verl.trainer.ppo.core_algos import get_policy_loss_fn
    from verl.utils import tensordict_utils as tu

    from cw_verl import verl_losses
    from cw_verl.context import loss_call, train_batch_call
    from tests.toy_policy import actor_config, global_batch

    batch = global_batch(torch.float64)
    uids = [f"prompt-{i // GROUP_SIZE}" for i in range(len(batch["mask"]))]
    fields = {"old_log_probs": batch["old_log_prob"], "advantages": batch["advantages"], "response_mask": batch["mask"]}
    mini_batch = tu.get_tensordict({**fields, "uid": uids})
    calls = []
    original = verl_losses.token_weights
    monkeypatch.setattr(verl_losses, "token_weights", lambda *a, **k: calls.append(1) or original(*a, **k))
    observed = []
    reweighted = verl_losses.reweighted_advantages
    monkeypatch.setattr(verl_losses, "reweighted_advantages", lambda w, a: observed.append(w) or reweighted(w, a))

    def one_call(advantages):
        micro_batch = tu.get_tensordict({**fields, "advantages": advantages, "uid": uids})
        with train_batch_call(mini_batch), loss_call(None, micro_batch):
            return get_policy_loss_fn(loss_mode)(
                old_log_prob=batch["old_log_prob"].clone(),  # other memory, same values
                log_prob=batch["old_log_prob"] + 0.01,
                advantages=advantages,
                response_mask=batch["mask"],
                loss_agg_mode="token-mean",
                config=actor_config(),
            )

    one_call(batch["advantages"].clone())
    assert calls == []  # the pass's weights
    one_call(batch["advantages"] * 1.5)
    assert calls == [1]  # same shape, other advantages: weighed from the statistics
    assert not torch.equal(observed[0], observed[1])
