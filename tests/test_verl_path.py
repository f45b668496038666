"""cw_grpo inside verl: plugin discovery, verl's own ppo_loss through the patched engine entry point,
equality with verl's PPO loss on reweighted advantages, the estimator, the config rule and the v1 trainer."""

import subprocess
import sys

import numpy as np
import pytest
import torch
import verl  # noqa: F401  (loads the cw_verl plugin)

from cw_verl.weights import covariance_weights
from tests.fake_engine import GROUP_SIZE, train_step
from tests.ranks import RankFailed, run_on_ranks
from tests.toy_policy import actor_config, global_batch, log_probs, make_policy


def test_fresh_interpreter_import_verl_registers_everything():
    code = (
        "import verl\n"
        "from verl.trainer.ppo import core_algos as c\n"
        "print('cw_grpo' in c.ADV_ESTIMATOR_REGISTRY, 'cw_grpo' in c.POLICY_LOSS_REGISTRY)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip().splitlines()[-1] == "True True"


def _registrations_in_a_ray_worker():
    from verl.trainer.ppo import core_algos

    return "cw_grpo" in core_algos.ADV_ESTIMATOR_REGISTRY, "cw_grpo" in core_algos.POLICY_LOSS_REGISTRY


@pytest.mark.e2e  # starts Ray (tests/conftest.py): the e2e tier
def test_ray_worker_sees_the_registrations():
    import ray

    # A fresh local instance even if another Ray cluster runs on this machine (ray.init() would join it).
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        assert ray.get(ray.remote(_registrations_in_a_ray_worker).remote(), timeout=240) == (True, True)
    finally:
        ray.shutdown()


# --- verl's ppo_loss as the engine calls it ----------------------------------------------------------


def test_ppo_loss_through_the_patched_engine_is_data_parallel_invariant():
    """One micro-batch per rank: per-call statistics over the DP group equal those of the unsplit batch."""
    single = train_step(0, 1, "cw_grpo_microbatch")
    results = run_on_ranks(train_step, 2, "cw_grpo_microbatch", None, None, True, GROUP_SIZE, uneven=True)
    for r in results:
        assert r["micro_batch_sizes"] in ([6], [10])
        assert r["metrics"][0]["actor/cw/num_tokens"] == single["metrics"][0]["actor/cw/num_tokens"]
        assert r["metrics"][0]["actor/cw/sigma"] == pytest.approx(single["metrics"][0]["actor/cw/sigma"], rel=1e-12)
        torch.testing.assert_close(r["grads"], single["grads"], rtol=1e-11, atol=1e-14)


def test_every_micro_batch_call_reduces_over_the_dp_group():
    results = run_on_ranks(train_step, 2, "cw_grpo_microbatch", 4)
    assert [r["micro_batch_sizes"] for r in results] == [[4, 4], [4, 4]]
    # Call k's statistics cover micro-batch k of both ranks: the same on both ranks.
    for key in ("actor/cw/num_tokens", "actor/cw/sigma"):
        assert [m[key] for m in results[0]["metrics"]] == [m[key] for m in results[1]["metrics"]]


def test_without_the_engine_bridge_a_multi_rank_call_fails_loudly():
    with pytest.raises(RankFailed, match="cw_grpo needs the data-parallel group"):
        run_on_ranks(train_step, 2, "cw_grpo_microbatch", None, None, False)


# --- the policy loss is verl's PPO loss on reweighted advantages ------------------------------------


@pytest.mark.parametrize("loss_agg_mode", ["token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("with_is_weights", [False, True])
def test_cw_grpo_is_vanilla_ppo_on_reweighted_advantages(loss_agg_mode, with_is_weights):
    from verl.trainer.ppo.core_algos import compute_policy_loss_vanilla, get_policy_loss_fn

    batch = global_batch(torch.float64)
    log_prob = log_probs(make_policy(), batch["features"], batch["tokens"])
    config = actor_config(loss_agg_mode, clip_ratio_c=1.5)  # dual-clip bites at a low ratio bound
    is_weights = torch.rand(log_prob.shape, generator=torch.Generator().manual_seed(3)) if with_is_weights else None
    args = dict(old_log_prob=batch["old_log_prob"], log_prob=log_prob, response_mask=batch["mask"])
    loss, metrics = get_policy_loss_fn("cw_grpo_microbatch")(
        advantages=batch["advantages"],
        loss_agg_mode=loss_agg_mode,
        config=config,
        rollout_is_weights=is_weights,
        **args,
    )
    weights, _, stats = covariance_weights(log_prob, batch["advantages"], batch["mask"])
    expected, expected_metrics = compute_policy_loss_vanilla(
        advantages=weights * batch["advantages"],
        loss_agg_mode=loss_agg_mode,
        config=config,
        rollout_is_weights=is_weights,
        **args,
    )
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)  # summation order differs
    for key, value in expected_metrics.items():
        assert metrics[key] == pytest.approx(value)
    assert metrics["actor/pg_clipfrac_lower"] > 0 or metrics["actor/pg_clipfrac"] > 0  # clipping was exercised
    assert metrics["actor/cw/sigma"] == stats.sigma
    (grad,) = torch.autograd.grad(loss, log_prob)
    (expected_grad,) = torch.autograd.grad(expected, log_prob)
    torch.testing.assert_close(grad, expected_grad)


def test_weights_differ_from_one_so_cw_and_vanilla_losses_differ():
    from verl.trainer.ppo.core_algos import get_policy_loss_fn

    batch = global_batch(torch.float64)
    log_prob = log_probs(make_policy(), batch["features"], batch["tokens"])
    args = dict(
        old_log_prob=batch["old_log_prob"],
        log_prob=log_prob,
        advantages=batch["advantages"],
        response_mask=batch["mask"],
        loss_agg_mode="token-mean",
        config=actor_config(),
    )
    cw, _ = get_policy_loss_fn("cw_grpo_microbatch")(**args)
    vanilla, _ = get_policy_loss_fn("vanilla")(**args)
    assert abs(cw.item() - vanilla.item()) > 1e-6


def test_metrics_report_the_covariance_distribution():
    from verl.trainer.ppo.core_algos import get_policy_loss_fn

    batch = global_batch(torch.float64)
    log_prob = log_probs(make_policy(), batch["features"], batch["tokens"])
    _, metrics = get_policy_loss_fn("cw_grpo_microbatch")(
        old_log_prob=batch["old_log_prob"],
        log_prob=log_prob,
        advantages=batch["advantages"],
        response_mask=batch["mask"],
        loss_agg_mode="token-mean",
        config=actor_config(),
    )
    weights, cov, stats = covariance_weights(log_prob, batch["advantages"], batch["mask"])
    valid_cov = cov[batch["mask"]]
    n = valid_cov.numel()
    descending = torch.sort(valid_cov, descending=True).values
    # Order statistics are taken in float32.
    assert metrics["actor/cw/cov_pos_top_1pct"] == pytest.approx(descending[0].item(), rel=1e-6)  # ceil(0.01 n) = 1
    assert metrics["actor/cw/cov_pos_top_40pct"] == pytest.approx(
        descending[int(np.ceil(0.4 * n)) - 1].item(), rel=1e-6
    )
    ascending = torch.sort(valid_cov).values
    assert metrics["actor/cw/cov_neg_top_20pct"] == pytest.approx(ascending[int(np.ceil(0.2 * n)) - 1].item(), rel=1e-6)
    assert metrics["actor/cw/frac_below_half"] == pytest.approx((weights[batch["mask"]] < 0.5).double().mean().item())
    assert metrics["actor/cw/weight_mean"] == pytest.approx(1.0)
    assert metrics["actor/cw/weight_min"] < 1.0 < metrics["actor/cw/weight_max"]
    assert all(np.isfinite(v) for v in metrics.values())


def test_no_valid_tokens_gives_a_zero_loss_without_nan():
    from verl.trainer.ppo.core_algos import get_policy_loss_fn

    batch = global_batch(torch.float64)
    log_prob = log_probs(make_policy(), batch["features"], batch["tokens"])
    loss, metrics = get_policy_loss_fn("cw_grpo_microbatch")(
        old_log_prob=batch["old_log_prob"],
        log_prob=log_prob,
        advantages=batch["advantages"],
        response_mask=torch.zeros_like(batch["mask"]),
        loss_agg_mode="seq-mean-token-mean",
        config=actor_config("seq-mean-token-mean"),
    )
    assert loss.item() == 0.0
    loss.backward()
    assert all(np.isfinite(v) for v in metrics.values())


def test_conflicting_dp_size_is_refused():
    from verl.trainer.ppo.core_algos import get_policy_loss_fn

    batch = global_batch(torch.float64)
    config = actor_config()
    config.global_batch_info.update(dp_size=4, batch_num_tokens=int(batch["mask"].sum()), global_batch_size=12)
    with pytest.raises(RuntimeError, match="data-parallel group"):
        get_policy_loss_fn("cw_grpo_microbatch")(
            old_log_prob=batch["old_log_prob"],
            log_prob=batch["old_log_prob"],
            advantages=batch["advantages"],
            response_mask=batch["mask"],
            config=config,
        )


# --- the estimator --------------------------------------------------------------------------------


@pytest.mark.parametrize("norm_by_std", [True, False])
def test_cw_grpo_estimator_equals_grpo_through_verls_compute_advantage(norm_by_std):
    from omegaconf import OmegaConf
    from verl import DataProto
    from verl.trainer.ppo.ray_trainer import compute_advantage

    gen = torch.Generator().manual_seed(0)
    mask = (torch.rand(12, 6, generator=gen) > 0.2).float()
    rewards = torch.zeros(12, 6)
    rewards[:, -1] = torch.randint(0, 3, (12,), generator=gen).float()
    uid = np.array([f"p{i // 4}" for i in range(12)], dtype=object)
    out = {}
    for name in ["grpo", "cw_grpo"]:
        data = DataProto.from_dict(
            tensors={"token_level_rewards": rewards.clone(), "response_mask": mask.clone()},
            non_tensors={"uid": uid},
        )
        config = OmegaConf.create({"adv_estimator": name, "norm_adv_by_std_in_grpo": norm_by_std})
        out[name] = compute_advantage(data, name, norm_adv_by_std_in_grpo=norm_by_std, config=config)
    torch.testing.assert_close(out["cw_grpo"].batch["advantages"], out["grpo"].batch["advantages"], rtol=0, atol=0)
    assert out["grpo"].batch["advantages"].abs().sum() > 0


def test_cw_grpo_estimator_needs_group_ids():
    from verl.trainer.ppo.core_algos import get_adv_estimator_fn

    with pytest.raises(ValueError, match="uid"):
        get_adv_estimator_fn("cw_grpo")(token_level_rewards=torch.zeros(2, 3), response_mask=torch.ones(2, 3))


def test_v1_multi_trajectory_path_treats_cw_grpo_as_grpo():
    """Two sessions per sample: GRPO scores only each session's final output; cw_grpo must do the same."""
    from verl import DataProto
    from verl.trainer.ppo.v1 import utils as v1_utils

    gen = torch.Generator().manual_seed(1)
    keys, rows = [], 0
    for sample in range(2):
        for member in range(3):
            for turn in range(2):
                keys.append(f"u{sample}-{member}_{0}_{turn}")
                rows += 1
    mask = torch.ones(rows, 4)
    rewards = torch.zeros(rows, 4)
    rewards[:, -1] = torch.randint(0, 4, (rows,), generator=gen).float()
    uid = np.array([k.rsplit("_", 2)[0].split("-")[0] for k in keys], dtype=object)

    def run(fn, estimator):
        data = DataProto.from_dict(
            tensors={"token_level_rewards": rewards.clone(), "response_mask": mask.clone()}, non_tensors={"uid": uid}
        )
        return fn(data, batch_keys=keys, adv_estimator=estimator, norm_adv_by_std_in_grpo=True).batch["advantages"]

    patched = v1_utils.compute_advantage_for_multi_trajectories
    grpo, cw = run(patched, "grpo"), run(patched, "cw_grpo")
    torch.testing.assert_close(cw, grpo, rtol=0, atol=0)
    # Without the patch the name falls through to per-row GRPO, which scores every turn: the test can fail.
    unpatched = run(patched.__wrapped__, "cw_grpo")
    assert not torch.equal(unpatched, grpo)


def test_malformed_loss_inputs_raise_a_precise_error():
    from verl.trainer.ppo.core_algos import get_policy_loss_fn

    from cw_verl.weights import CovarianceInputError

    batch = global_batch(torch.float64)
    args = dict(
        old_log_prob=batch["old_log_prob"][:, :-1],
        log_prob=batch["old_log_prob"],
        advantages=batch["advantages"],
        response_mask=batch["mask"],
        config=actor_config(),
    )
    with pytest.raises(CovarianceInputError, match="old_log_prob has shape"):
        get_policy_loss_fn("cw_grpo_microbatch")(**args)
    args["old_log_prob"] = batch["old_log_prob"]
    args["advantages"] = batch["advantages"][:, :3]
    with pytest.raises(CovarianceInputError, match=r"same \[batch, length\] shape"):
        get_policy_loss_fn("cw_grpo_microbatch")(**args)


# --- the workers' last line of defence: cw_grpo advantages never train with a non-CW loss ----------


def test_cw_advantages_are_marked_through_verls_own_batch_plumbing():
    """Set in the driver (compute_advantage's meta_info), carried by DataProto.to_tensordict and verl's
    mini-batch iterator to the batch BaseEngine.train_batch sees."""
    from cw_verl.patches.advantage_source import MARK, marked_estimator
    from verl import DataProto
    from verl.trainer.ppo.ray_trainer import compute_advantage
    from verl.utils import tensordict_utils as tu

    def advantages(estimator):
        data = DataProto.from_dict(
            tensors={"token_level_rewards": torch.ones(8, 3), "response_mask": torch.ones(8, 3)},
            non_tensors={"uid": np.array([f"p{i // 4}" for i in range(8)], dtype=object)},
        )
        return compute_advantage(data, adv_estimator=estimator, num_repeat=4)

    assert MARK not in advantages("grpo").meta_info
    minis = list(tu.make_iterator(advantages("cw_grpo").to_tensordict(), mini_batch_size=4, epochs=1))
    assert [marked_estimator(mini) for mini in minis] == ["cw_grpo", "cw_grpo"]


def test_v1_trainer_marks_its_transfer_queue_batch():
    import types

    from cw_verl.patches.advantage_source import MARK, patch_v1_compute_advantage

    class Trainer:
        def _compute_advantage(self, batch, metrics):
            return batch

    module = types.SimpleNamespace(PPOTrainer=Trainer)
    patch_v1_compute_advantage(module)
    for estimator, expected in (("cw_grpo", {MARK: "cw_grpo"}), ("grpo", {})):
        trainer = Trainer()
        trainer.config = types.SimpleNamespace(algorithm=types.SimpleNamespace(adv_estimator=estimator))
        assert trainer._compute_advantage(types.SimpleNamespace(extra_info={}), {}).extra_info == expected


def guarded_step(rank, world_size, loss_mode, mark):
    from cw_verl.config_rules import ConfigConflictError

    try:
        train_step(rank, world_size, loss_mode, 4, mark=mark)
    except ConfigConflictError as error:
        return str(error)
    return None


def test_a_cw_marked_batch_with_a_non_cw_loss_stops_every_rank():
    errors = run_on_ranks(guarded_step, 2, "vanilla", "cw_grpo")
    assert all(error is not None and "loss_mode=vanilla" in error for error in errors)
    assert run_on_ranks(guarded_step, 2, "cw_grpo", "cw_grpo") == [None, None]
    assert guarded_step(0, 1, "vanilla", None) is None  # unmarked batches train with any loss


@pytest.mark.parametrize("on_device", [False, True])
def test_table1_thresholds_are_exact_order_statistics_on_either_path(on_device):
    """numpy's nested selection (CPU) and the device sort (GPU) pick the same order statistics."""
    import math

    from cw_verl.verl_losses import TABLE1_PERCENTILES, order_statistics

    for seed in range(40):
        gen = torch.Generator().manual_seed(seed)
        rows, length = int(torch.randint(1, 6, (1,), generator=gen)), int(torch.randint(1, 300, (1,), generator=gen))
        valid = (torch.rand(rows, length, generator=gen) < 0.6).float()
        cov = torch.randn(rows, length, generator=gen) * torch.rand(rows, length, generator=gen).pow(3) * valid
        n = int(valid.sum())
        got = order_statistics(cov, valid, valid.sum(), on_device=on_device)
        if n == 0:
            assert got.tolist() == [0.0] * 8
            continue
        ascending = np.sort(cov[valid.bool()].numpy())
        ks = [max(1, math.ceil(fraction * n)) for fraction, _ in TABLE1_PERCENTILES]
        expected = [ascending[n - k] for k in ks] + [ascending[k - 1] for k in ks]
        np.testing.assert_array_equal(got.numpy().astype(np.float32), np.asarray(expected, dtype=np.float32))
