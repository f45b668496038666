"""The same global micro-batch on 1, 2 and 4 data-parallel gloo ranks, and on Megatron's TP=2 x DP=2 and
CP=2 x DP=2 groups, gives the single-process weights, loss and parameter gradients."""

import pytest
import torch
import torch.distributed as dist

from tests.ranks import run_on_ranks
from tests.toy_policy import actor_config, global_batch, global_batch_info, log_probs, make_policy, shard

LOSS_AGG_MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm", "token-sum"]
# Uneven shards; the last shard of the 4-way split holds only a sequence without valid tokens.
SPLITS = {1: [(0, 12)], 2: [(0, 7), (7, 12)], 4: [(0, 5), (5, 9), (9, 11), (11, 12)]}


def cw_step(local, dp_size, group, loss_agg_mode, dtype):
    """One cw_grpo loss call and backward, as a DP rank does it; gradients averaged over ``group``."""
    import verl  # noqa: F401  (loads the cw_verl plugin)
    from verl.trainer.ppo.core_algos import get_policy_loss_fn

    from cw_verl.context import loss_call

    full = global_batch(dtype)
    model = make_policy(dtype)
    log_prob = log_probs(model, local["features"], local["tokens"])
    config = actor_config(loss_agg_mode)
    config.global_batch_info.update(global_batch_info(full, dp_size))
    with loss_call(group):
        loss, metrics = get_policy_loss_fn("cw_grpo_microbatch")(
            old_log_prob=local["old_log_prob"],
            log_prob=log_prob,
            advantages=local["advantages"],
            response_mask=local["mask"],
            loss_agg_mode=loss_agg_mode,
            config=config,
        )
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    loss = loss.detach().clone()
    if group is not None:
        # FSDP/Megatron average gradients and verl averages the reported loss over the DP group.
        dist.all_reduce(grads, group=group)
        dist.all_reduce(loss, group=group)
        grads /= dp_size
        loss /= dp_size
    return {"loss": loss, "grads": grads, "metrics": metrics}


def weights_of(local, group):
    from cw_verl.distributed import group_gather
    from cw_verl.weights import covariance_weights

    log_prob = log_probs(make_policy(local["features"].dtype), local["features"], local["tokens"])
    weights, _, stats = covariance_weights(log_prob, local["advantages"], local["mask"], group_gather(group))
    return weights, stats


def data_parallel_rank(rank, world_size, dtype):
    full = global_batch(dtype)
    start, stop = SPLITS[world_size][rank]
    local = shard(full, start, stop)
    group = dist.group.WORLD
    weights, stats = weights_of(local, group)
    steps = {mode: cw_step(local, world_size, group, mode, dtype) for mode in LOSS_AGG_MODES}
    return {"weights": weights, "stats": stats, "steps": steps}


def single_process(dtype):
    full = global_batch(dtype)
    weights, stats = weights_of(full, None)
    steps = {mode: cw_step(full, 1, None, mode, dtype) for mode in LOSS_AGG_MODES}
    return {"weights": weights, "stats": stats, "steps": steps}


@pytest.fixture(scope="module")
def expected():
    return single_process(torch.float64)


@pytest.mark.parametrize("world_size", [2, 4])
def test_data_parallel_split_matches_single_process(world_size, expected):
    results = run_on_ranks(data_parallel_rank, world_size, torch.float64)
    for r in results:
        # every rank computed the same global statistics
        assert torch.equal(r["stats"].variance, results[0]["stats"].variance)
        assert r["stats"].total_tokens == expected["stats"].total_tokens
        assert r["stats"].sigma == pytest.approx(expected["stats"].sigma, rel=1e-12)
    torch.testing.assert_close(torch.cat([r["weights"] for r in results]), expected["weights"], rtol=1e-12, atol=1e-13)
    for mode in LOSS_AGG_MODES:
        for r in results:
            torch.testing.assert_close(
                r["steps"][mode]["loss"], expected["steps"][mode]["loss"], rtol=1e-12, atol=1e-14
            )
            torch.testing.assert_close(
                r["steps"][mode]["grads"], expected["steps"][mode]["grads"], rtol=1e-11, atol=1e-14
            )


def test_float32_split_matches_single_process_to_float32_precision():
    expected32 = single_process(torch.float32)
    results = run_on_ranks(data_parallel_rank, 4, torch.float32)
    torch.testing.assert_close(torch.cat([r["weights"] for r in results]), expected32["weights"], rtol=1e-6, atol=1e-7)
    for r in results:
        got, want = r["steps"]["token-mean"], expected32["steps"]["token-mean"]
        torch.testing.assert_close(got["grads"], want["grads"], rtol=1e-5, atol=1e-7)


def megatron_rank(rank, world_size, dtype, model_parallel):
    """TP=2 x DP=2 or CP=2 x DP=2 with megatron-core's real parallel_state: the two tensor- or context-
    parallel ranks of a DP rank see the same micro-batch (verl all-gathers the model output over the CP
    group before the loss), so they are replicas for the statistics."""
    from megatron.core import parallel_state as mpu

    mpu.initialize_model_parallel(**{model_parallel: 2})
    try:
        full = global_batch(dtype)
        dp_rank, dp_size = mpu.get_data_parallel_rank(), mpu.get_data_parallel_world_size()
        start, stop = SPLITS[dp_size][dp_rank]
        local = shard(full, start, stop)
        group = mpu.get_data_parallel_group()
        weights, stats = weights_of(local, group)
        step = cw_step(local, dp_size, group, "token-mean", dtype)
        # WORLD spans the replicas: cw_grpo must refuse it rather than count every token twice.
        try:
            cw_step(local, dp_size, dist.group.WORLD, "token-mean", dtype)
            world_error = None
        except RuntimeError as error:
            world_error = str(error)
        replica_rank = (
            mpu.get_tensor_model_parallel_rank()
            if model_parallel == "tensor_model_parallel_size"
            else mpu.get_context_parallel_rank()
        )
        return {
            "dp_rank": dp_rank,
            "replica_rank": replica_rank,
            "dp_size": dp_size,
            "weights": weights,
            "stats": stats,
            "step": step,
            "world_error": world_error,
        }
    finally:
        mpu.destroy_model_parallel()


@pytest.mark.parametrize("model_parallel", ["tensor_model_parallel_size", "context_parallel_size"])
def test_megatron_tp_or_cp_replicas_are_not_counted_twice(expected, model_parallel):
    results = run_on_ranks(megatron_rank, 4, torch.float64, model_parallel)
    assert sorted((r["dp_rank"], r["replica_rank"]) for r in results) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(r["dp_size"] == 2 for r in results)
    for r in results:
        # Counting the replicas would double N (the weights of a uniformly duplicated set would not change,
        # which is why N itself is checked).
        assert r["stats"].total_tokens == expected["stats"].total_tokens
        start, stop = SPLITS[2][r["dp_rank"]]
        torch.testing.assert_close(r["weights"], expected["weights"][start:stop], rtol=1e-12, atol=1e-13)
        want = expected["steps"]["token-mean"]
        torch.testing.assert_close(r["step"]["loss"], want["loss"], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(r["step"]["grads"], want["grads"], rtol=1e-11, atol=1e-14)
        assert r["world_error"] is not None and "replicas" in r["world_error"]


def test_verl_gathers_the_model_output_over_the_context_parallel_group_before_the_loss():
    """Why CP ranks are replicas for the loss (verl 0.9.1, models/mcore/util.py)."""
    import inspect

    from verl.models.mcore import util

    source = inspect.getsource(util.postprocess_packed_seqs)
    assert "all_gather" in source and "get_context_parallel_group()" in source
