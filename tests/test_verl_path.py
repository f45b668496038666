"""cw_grpo inside verl: plugin discovery, verl's own ppo_loss through the patched engine entry point,
equality with verl's PPO loss on reweighted advantages, the estimator, the config rule and the v1 trainer."""

import subprocess
import sys
from functools import partial

import numpy as np
import pytest
import torch
import torch.distributed as dist
import verl  # noqa: F401  (loads the cw_verl plugin)

from cw_verl.weights import covariance_weights
from tests.distributed_harness import run_on_ranks
from tests.toy_policy import actor_config, global_batch, log_probs, make_policy

PROMPT, RESPONSE, VOCAB, HIDDEN = 4, 8, 13, 6


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


def test_ray_worker_sees_the_registrations():
    import ray

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        assert ray.get(ray.remote(_registrations_in_a_ray_worker).remote(), timeout=240) == (True, True)
    finally:
        ray.shutdown()


# --- verl's ppo_loss as the engine calls it ----------------------------------------------------------


def trainer_batch(start, stop):
    """The actor's update batch as the trainer sends it (left/right padded), for sequences [start, stop)."""
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import left_right_2_no_padding

    gen = torch.Generator().manual_seed(7)
    n = 8
    prompt_lens = torch.randint(1, PROMPT + 1, (n,), generator=gen)
    response_lens = torch.randint(1, RESPONSE + 1, (n,), generator=gen)
    response_lens[5] = RESPONSE
    prompts = torch.randint(1, VOCAB, (n, PROMPT), generator=gen)
    responses = torch.randint(1, VOCAB, (n, RESPONSE), generator=gen)
    prompt_mask = torch.arange(PROMPT)[None, :] >= (PROMPT - prompt_lens)[:, None]
    response_mask = torch.arange(RESPONSE)[None, :] < response_lens[:, None]
    rewards = torch.randint(0, 2, (n,), generator=gen).double().view(-1, 4)
    adv = ((rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-6)).flatten()
    old_log_probs = -torch.rand(n, RESPONSE, generator=gen, dtype=torch.float64) * 3
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    sl = slice(start, stop)
    data = tu.get_tensordict(
        {
            "prompts": prompts[sl],
            "responses": responses[sl],
            "input_ids": torch.cat([prompts, responses], dim=1)[sl],
            "attention_mask": attention_mask[sl].long(),
            "position_ids": position_ids[sl],
            "response_mask": response_mask[sl].long(),
            "old_log_probs": old_log_probs[sl],
            "advantages": (adv[:, None] * response_mask)[sl],
        },
        non_tensor_dict={"temperature": 1.0},
    )
    return left_right_2_no_padding(data)


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


class MinimalEngine:
    """Duck-typed to what ``BaseEngine.train_batch`` uses, with the FSDP engine's forward_backward_batch logic."""

    def __init__(self, model, dp_group):
        self.model, self.dp_group = model, dp_group
        self.loss_calls = []

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
            self.loss_calls.append(loss.detach())
            metrics.append(step_metrics)
        return {"metrics": {"steps": metrics}}


def engine_rank(rank, world_size, bridged, micro_batch_size):
    from verl.utils import tensordict_utils as tu
    from verl.workers.engine.base import BaseEngine
    from verl.workers.utils.losses import ppo_loss

    per_rank = 8 // world_size
    data = trainer_batch(rank * per_rank, (rank + 1) * per_rank)
    tu.assign_non_tensor(data, global_batch_size=8, use_dynamic_bsz=False, micro_batch_size_per_gpu=micro_batch_size)
    config = actor_config("token-mean", policy_loss={"loss_mode": "cw_grpo"})
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
        "num_calls": len(engine.loss_calls),
        "num_tokens": [m["actor/cw/num_tokens"].aggregate() for m in steps],
        "sigma": [m["actor/cw/sigma"].aggregate() for m in steps],
    }


def test_ppo_loss_through_the_patched_engine_is_data_parallel_invariant():
    """One micro-batch per rank: statistics over the DP group equal those of the unsplit micro-batch."""
    (single,) = run_on_ranks(engine_rank, 1, True, 8)
    results = run_on_ranks(engine_rank, 2, True, 4)
    assert single["num_tokens"] == results[0]["num_tokens"] == results[1]["num_tokens"]
    for r in results:
        assert r["num_calls"] == 1
        assert r["sigma"] == pytest.approx(single["sigma"], rel=1e-12)
        torch.testing.assert_close(r["grads"], single["grads"], rtol=1e-11, atol=1e-14)
    # And the statistics are those of the whole micro-batch, computed directly.
    full = trainer_batch(0, 8)
    mask = full["response_mask"].bool()
    valid_tokens = int(mask.sum())
    assert single["num_tokens"] == [float(valid_tokens)]


def test_every_micro_batch_call_reduces_over_the_dp_group():
    results = run_on_ranks(engine_rank, 2, True, 2)
    assert [r["num_calls"] for r in results] == [2, 2]
    # Call k's statistics cover micro-batch k of both ranks: same on both ranks.
    assert results[0]["num_tokens"] == results[1]["num_tokens"]
    assert results[0]["sigma"] == results[1]["sigma"]


def test_without_the_engine_bridge_a_multi_rank_call_fails_loudly():
    with pytest.raises(AssertionError, match="cw_grpo needs the data-parallel group"):
        run_on_ranks(engine_rank, 2, False, 4)


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
    loss, metrics = get_policy_loss_fn("cw_grpo")(
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
    torch.testing.assert_close(loss, expected, rtol=1e-14, atol=0)
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
    cw, _ = get_policy_loss_fn("cw_grpo")(**args)
    vanilla, _ = get_policy_loss_fn("vanilla")(**args)
    assert abs(cw.item() - vanilla.item()) > 1e-6


def test_metrics_report_the_covariance_distribution():
    from verl.trainer.ppo.core_algos import get_policy_loss_fn

    batch = global_batch(torch.float64)
    log_prob = log_probs(make_policy(), batch["features"], batch["tokens"])
    _, metrics = get_policy_loss_fn("cw_grpo")(
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
    assert metrics["actor/cw/cov_pos_top_1pct"] == torch.sort(valid_cov, descending=True).values[0].item()  # ceil
    assert (
        metrics["actor/cw/cov_pos_top_40pct"]
        == torch.sort(valid_cov, descending=True).values[int(np.ceil(0.4 * n)) - 1]
    )
    assert metrics["actor/cw/cov_neg_top_20pct"] == torch.sort(valid_cov).values[int(np.ceil(0.2 * n)) - 1]
    assert metrics["actor/cw/frac_below_half"] == pytest.approx((weights[batch["mask"]] < 0.5).double().mean().item())
    assert metrics["actor/cw/weight_mean"] == pytest.approx(1.0)
    assert metrics["actor/cw/weight_min"] < 1.0 < metrics["actor/cw/weight_max"]
    assert all(np.isfinite(v) for v in metrics.values())


def test_no_valid_tokens_gives_a_zero_loss_without_nan():
    from verl.trainer.ppo.core_algos import get_policy_loss_fn

    batch = global_batch(torch.float64)
    log_prob = log_probs(make_policy(), batch["features"], batch["tokens"])
    loss, metrics = get_policy_loss_fn("cw_grpo")(
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
        get_policy_loss_fn("cw_grpo")(
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
