"""``algorithm.adv_estimator=ep_grpo`` through verl 0.9.1: the inputs' path, the estimator, the config rules.

The ``test_verl_*`` tests pin the verl internals that ``patches/ep_inputs.py`` relies on; if one fails after
a verl upgrade, re-read the verl code it names before changing the test.
"""

import inspect
import os
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import verl
from cw_verl.patches import ep_inputs
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from tensordict import TensorDict
from verl import DataProto
from verl.trainer.ppo import core_algos, ray_trainer
from verl.trainer.ppo.v1 import trainer_base
from verl.trainer.ppo.v1 import utils as v1_utils

from cw_verl import context
from cw_verl.context import EP_ENTROPY_KEY as ENTROPY_KEY
from cw_verl.ep import EPConfig, ep_diagnostics, ep_token_advantages
from cw_verl.ep_config import EPConfigError, check_ep_grpo, ep_config_from_algorithm
from cw_verl.verl_ep import compute_ep_grpo_advantage

VERL_DIR = os.path.dirname(verl.__file__)
VERL_CONFIG_DIR = os.path.join(VERL_DIR, "trainer", "config")


def read(relative_path):
    with open(os.path.join(VERL_DIR, relative_path)) as f:
        return f.read()


def verl_config(*overrides):
    with initialize_config_dir(config_dir=VERL_CONFIG_DIR, version_base=None):
        return compose(config_name="ppo_trainer", overrides=list(overrides))


def step_batch(seed=0, groups=3, group_size=4, length=7):
    """A driver batch as the legacy trainer holds it at ``compute_advantage`` (right-padded responses)."""
    gen = torch.Generator().manual_seed(seed)
    batch = groups * group_size
    lengths = torch.randint(1, length + 1, (batch,), generator=gen)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).float()
    scores = (torch.rand(batch, generator=gen) < 0.5).float()
    scores[:group_size] = 1.0  # one zero-variance group
    rewards = torch.zeros(batch, length)
    rewards[torch.arange(batch), lengths - 1] = scores
    tensors = {
        "token_level_rewards": rewards,
        "response_mask": mask,
        "old_log_probs": -torch.rand(batch, length, generator=gen) * 3 * mask,
        "ref_log_prob": -torch.rand(batch, length, generator=gen) * 3 * mask,
        ENTROPY_KEY: torch.rand(batch, length, generator=gen) * 2 * mask,
    }
    uids = np.array([f"prompt-{i // group_size}" for i in range(batch)], dtype=object)
    return DataProto.from_dict(tensors=tensors, non_tensors={"uid": uids})


def grpo_outcome(data, norm_by_std=True):
    """``(scores, groups, outcome)``: each response's score, its prompt group and GRPO's outcome advantage."""
    scores = data.batch["token_level_rewards"].sum(-1).double()
    groups = torch.as_tensor(np.unique(data.non_tensor_batch["uid"].astype(str), return_inverse=True)[1])
    outcome = torch.zeros_like(scores)
    for g in groups.unique():
        members = groups == g
        centred = scores[members] - scores[members].mean()
        outcome[members] = centred / (scores[members].std() + 1e-6) if norm_by_std else centred
    return scores, groups, outcome


def expected_advantages(data, config=None, norm_by_std=True):
    config = config or EPConfig()
    b = data.batch
    scores, groups, outcome = grpo_outcome(data, norm_by_std)
    result = ep_token_advantages(
        scores, outcome, groups, b[ENTROPY_KEY], b["old_log_probs"], b["ref_log_prob"], b["response_mask"], config
    )
    return result.advantages.float()


ALGORITHM = OmegaConf.create({"adv_estimator": "ep_grpo", "norm_adv_by_std_in_grpo": True})


# the estimator through verl's own functions


def test_ep_grpo_is_registered_with_verl():
    assert core_algos.get_adv_estimator_fn("ep_grpo") is compute_ep_grpo_advantage


def test_legacy_compute_advantage_feeds_entropy_and_log_probs_to_the_estimator():
    data = step_batch()
    expected = expected_advantages(data)
    out = ray_trainer.compute_advantage(data, adv_estimator="ep_grpo", num_repeat=4, config=ALGORITHM)
    torch.testing.assert_close(out.batch["advantages"], expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(out.batch["returns"], out.batch["advantages"])
    assert ENTROPY_KEY not in out.batch.keys()  # popped: it does not travel on to the actor
    # the all-correct group (zero reward variance) still gets token advantages, GRPO would give 0
    assert (out.batch["advantages"][:4][data.batch["response_mask"][:4].bool()] != 0).any()


def test_knobs_and_norm_flag_reach_the_estimator():
    data = step_batch(seed=1)
    knobs = {"gamma": 3.0, "lam": 0.7, "num_buckets": 4, "reward_threshold": 0.2}
    algorithm = OmegaConf.create({"adv_estimator": "ep_grpo", "ep_grpo": knobs})
    expected = expected_advantages(data, EPConfig(**knobs), norm_by_std=False)
    out = ray_trainer.compute_advantage(
        data, "ep_grpo", 1.0, 1.0, 4, False, algorithm
    )  # positional, as verl's signature orders them
    torch.testing.assert_close(out.batch["advantages"], expected, rtol=1e-6, atol=1e-6)


def test_other_estimators_are_untouched():
    data = step_batch()
    grpo = ray_trainer.compute_advantage(data, adv_estimator="grpo", config=ALGORITHM)
    reference, _ = core_algos.compute_grpo_outcome_advantage(
        data.batch["token_level_rewards"], data.batch["response_mask"], data.non_tensor_batch["uid"]
    )
    assert torch.equal(grpo.batch["advantages"], reference)
    assert ENTROPY_KEY in grpo.batch.keys()


def test_missing_reference_log_probs_is_a_precise_error():
    data = step_batch()
    data.batch.pop("ref_log_prob")
    with pytest.raises(RuntimeError, match="got no ref_log_prob.*use_kl_loss=true"):
        ray_trainer.compute_advantage(data, adv_estimator="ep_grpo", config=ALGORITHM)


def test_v1_path_fetches_entropy_from_transfer_queue():
    data = step_batch(seed=2)
    expected = expected_advantages(data)
    lengths = data.batch["response_mask"].sum(-1).long()
    entropy = data.batch.pop(ENTROPY_KEY)
    rows = [row[:n] for row, n in zip(entropy, lengths, strict=True)]
    nested = torch.nested.as_nested_tensor(rows, layout=torch.jagged)
    calls = []

    class FakeTransferQueue:
        def kv_batch_get(self, keys, partition_id, select_fields):
            calls.append((keys, partition_id, select_fields))
            return TensorDict({"entropy": nested}, batch_size=[len(keys)])

    def original(self, batch, metrics):  # what verl's _compute_advantage does with the fetched fields
        keys = [f"{uid}_0_0" for uid in data.non_tensor_batch["uid"]]
        return v1_utils.compute_advantage_for_multi_trajectories(
            data, keys, self.config.algorithm.adv_estimator, num_repeat=4, config=self.config.algorithm
        )

    wrapped = ep_inputs.wrap_v1_compute_advantage(original, SimpleNamespace(tq=FakeTransferQueue()))
    trainer = SimpleNamespace(config=SimpleNamespace(algorithm=ALGORITHM))
    step_metrics = {"training/global_step": 1}
    out = wrapped(trainer, SimpleNamespace(keys=["k"] * len(data), partition_id="train"), metrics=step_metrics)
    torch.testing.assert_close(out.batch["advantages"], expected, rtol=1e-6, atol=1e-6)
    assert calls == [(["k"] * len(data), "train", ["entropy"])]
    assert context.current_ep_entropy() is None and context.current_ep_metrics() is None
    # the diagnostics reach the step's metrics dict (verl passes it positionally too)
    data.batch[ENTROPY_KEY] = entropy
    assert step_metrics == {"training/global_step": 1, **expected_diagnostics(data)}
    positional = {}
    wrapped(trainer, SimpleNamespace(keys=["k"] * len(data), partition_id="train"), positional)
    assert set(positional) == set(EP_METRIC_NAMES)


def test_legacy_old_log_prob_keeps_the_entropy_for_ep_grpo_only():
    def original(self, batch):
        return DataProto.from_dict({"old_log_probs": torch.zeros(2, 3), "entropys": torch.ones(2, 3)}), 0.5

    wrapped = ep_inputs.wrap_old_log_prob(original)
    for estimator, kept in (("ep_grpo", True), ("grpo", False)):
        trainer = SimpleNamespace(config=OmegaConf.create({"algorithm": {"adv_estimator": estimator}}))
        out, mfu = wrapped(trainer, None)
        assert (ENTROPY_KEY in out.batch.keys()) is kept and mfu == 0.5
        out.batch.pop("entropys")  # as fit does
        if kept:
            assert torch.equal(out.batch[ENTROPY_KEY], torch.ones(2, 3))


# the ep/* diagnostics in the trainers' logged metrics

EP_METRIC_NAMES = ["ep/gate_mean", "ep/outcome_abs_mean", "ep/progress_abs_mean", "ep/zero_variance_group_frac"]


def expected_diagnostics(data, config=None):
    """The diagnostics recomputed from the estimator's parts and the group rewards (float64 here; verl's GRPO
    advantage inside the estimator is float32, hence rel 1e-6)."""
    mask = data.batch["response_mask"].bool()
    parts = ep_parts(data, config)
    scores = data.batch["token_level_rewards"].sum(-1)
    groups = np.unique(data.non_tensor_batch["uid"].astype(str), return_inverse=True)[1]
    equal = [len(set(scores[groups == g].tolist())) == 1 for g in np.unique(groups)]
    return {
        "ep/gate_mean": pytest.approx(parts.gate[mask].mean().item(), rel=1e-6),
        "ep/outcome_abs_mean": pytest.approx(parts.outcome[mask].abs().mean().item(), rel=1e-6),
        "ep/progress_abs_mean": pytest.approx(parts.progress[mask].abs().mean().item(), rel=1e-6),
        "ep/zero_variance_group_frac": sum(equal) / len(equal),
    }


def ep_parts(data, config=None):
    b = data.batch
    scores, groups, outcome = grpo_outcome(data)
    inputs = (b[ENTROPY_KEY], b["old_log_probs"], b["ref_log_prob"], b["response_mask"])
    return ep_token_advantages(scores, outcome, groups, *inputs, config or EPConfig())


def test_diagnostics_of_a_batch_with_one_zero_variance_group():
    data = step_batch(seed=5)
    expected = expected_diagnostics(data)
    assert expected["ep/zero_variance_group_frac"] == pytest.approx(1 / 3)  # step_batch's all-correct group
    mask = data.batch["response_mask"].bool()
    scores = data.batch["token_level_rewards"].sum(-1)
    groups = torch.as_tensor(np.unique(data.non_tensor_batch["uid"].astype(str), return_inverse=True)[1])
    got = ep_diagnostics(ep_parts(data), scores, groups, mask)
    assert got == expected and 0 < got["ep/gate_mean"] < 1 and got["ep/progress_abs_mean"] > 0


def test_legacy_trainer_logs_the_diagnostics_through_compute_data_metrics():
    data = step_batch(seed=5)
    expected = expected_diagnostics(data)
    out = ray_trainer.compute_advantage(data, adv_estimator="ep_grpo", num_repeat=4, config=ALGORITHM)
    assert out.meta_info[ep_inputs.EP_METRICS_KEY] == expected
    # the batch still converts for the actor update (_update_actor: to_tensordict) with the dict on board
    assert out.to_tensordict()[ep_inputs.EP_METRICS_KEY] == out.meta_info[ep_inputs.EP_METRICS_KEY]
    # fit's compute_data_metrics (here over a stand-in for verl's own body) adds and removes them
    wrapped = ep_inputs.wrap_compute_data_metrics(lambda batch, use_critic=True: {"critic/score/mean": 0.5})
    assert wrapped(batch=out, use_critic=False) == {"critic/score/mean": 0.5, **expected}
    assert ep_inputs.EP_METRICS_KEY not in out.meta_info
    assert wrapped(out) == {"critic/score/mean": 0.5}
    grpo = ray_trainer.compute_advantage(step_batch(seed=5), adv_estimator="grpo", config=ALGORITHM)
    assert ep_inputs.EP_METRICS_KEY not in grpo.meta_info


def test_verl_legacy_fit_logs_compute_data_metrics_of_the_updated_batch():
    assert getattr(ray_trainer.compute_data_metrics, "__wrapped__", None) is not None  # the hook is applied
    source = read("trainer/ppo/ray_trainer.py")
    call = "metrics.update(compute_data_metrics(batch=batch, use_critic=self.use_critic))"
    assert source.index("batch = compute_advantage(") < source.index(call) < source.index("logger.log(data=metrics")


def test_verl_v1_step_passes_its_metrics_dict_to_compute_advantage():
    original = getattr(trainer_base.PPOTrainer._compute_advantage, ep_inputs.MARKER)
    assert list(inspect.signature(original).parameters) == ["self", "batch", "metrics"]
    assert "self._compute_advantage(batch, metrics=metrics)" in inspect.getsource(trainer_base.PPOTrainer._step_once)
    step = inspect.getsource(trainer_base.PPOTrainer.step)  # each iteration's metrics are aggregated into the step's
    assert "self._step_once(iter_metrics" in step and "metrics_aggregator.add_step_metrics(iter_metrics" in step


# the verl internals the patch relies on


def test_verl_compute_advantage_signature_and_generic_branch():
    original = getattr(ray_trainer.compute_advantage, ep_inputs.MARKER)
    params = list(inspect.signature(original).parameters)
    assert params == ["data", "adv_estimator", "gamma", "lam", "num_repeat", "norm_adv_by_std_in_grpo", "config"]
    source = inspect.getsource(original)
    # registered estimators still get no log-probs or entropy (else the patch could go)
    assert '"token_level_rewards": data.batch["token_level_rewards"]' in source
    assert 'adv_kwargs["ref_log_prob"]' not in source and "entropy" not in source


def test_verl_legacy_fit_pops_the_entropy_before_compute_advantage():
    source = read("trainer/ppo/ray_trainer.py")
    assert "old_log_prob, old_log_prob_mfu = self._compute_old_log_prob(batch)" in source
    assert 'old_log_prob.batch.pop("entropys")' in source
    assert re.search(r'result = \{"old_log_probs": log_probs.float\(\), "entropys": entropy.float\(\)\}', source)
    assert source.index("self._compute_old_log_prob(batch)") < source.index("batch = compute_advantage(")


def test_verl_v1_trainer_stores_entropy_but_does_not_fetch_it_for_the_advantage():
    original = getattr(trainer_base.PPOTrainer._compute_advantage, ep_inputs.MARKER)
    source = inspect.getsource(original)
    fields = re.search(r"fields = \[(.*?)\]", source).group(1)
    assert '"entropy"' not in fields and '"ref_log_prob"' in fields and '"old_log_probs"' in fields
    assert "compute_advantage_for_multi_trajectories(" in source
    old_source = inspect.getsource(trainer_base.PPOTrainer._compute_old_log_prob)
    assert 'fields=data.select("old_log_probs", "entropy")' in old_source
    assert v1_utils.compute_advantage is ray_trainer.compute_advantage  # v1 goes through the patched function


# config rules (applied at every verl entry point, before Ray starts)


def test_ep_grpo_without_a_reference_policy_is_refused():
    with pytest.raises(EPConfigError, match="use_kl_loss=true"):
        check_ep_grpo(verl_config("algorithm.adv_estimator=ep_grpo"))


def test_ep_grpo_with_kl_loss_passes_and_knobs_are_read():
    config = verl_config(
        "algorithm.adv_estimator=ep_grpo",
        "actor_rollout_ref.actor.use_kl_loss=true",
        "actor_rollout_ref.actor.kl_loss_coef=0.0",
        "+algorithm.ep_grpo.gamma=2.0",
        "+algorithm.ep_grpo.num_buckets=5",
    )
    check_ep_grpo(config)
    assert ep_config_from_algorithm(config.algorithm) == EPConfig(gamma=2.0, num_buckets=5)


@pytest.mark.parametrize(
    "override, message",
    [
        ("+algorithm.ep_grpo.gama=2.0", "unknown key"),
        ("actor_rollout_ref.actor.policy_loss.loss_mode=cw_grpo", "third algorithm"),
        ("+algorithm.rollout_correction={bypass_mode: true}", "bypass_mode"),
    ],
)
def test_conflicting_ep_grpo_configs_are_refused(override, message):
    base = ["algorithm.adv_estimator=ep_grpo", "actor_rollout_ref.actor.use_kl_loss=true"]
    with pytest.raises(EPConfigError, match=message):
        check_ep_grpo(verl_config(*base, override))


def test_the_ep_rule_is_one_of_the_config_rules_every_entry_point_applies():
    from cw_verl.config_rules import apply_config_rules, launch_of

    config = verl_config("algorithm.adv_estimator=ep_grpo")
    with pytest.raises(EPConfigError, match="reference policy"):
        apply_config_rules(config, launch_of(config, "TaskRunnerV1"))


def test_other_estimators_ignore_the_ep_rule():
    check_ep_grpo(verl_config("algorithm.adv_estimator=grpo"))


# scope: the statistics are the step's whole batch, fixed before the actor splits it over DP ranks/micro-batches


def test_verl_computes_advantages_on_the_driver_before_the_actor_update():
    legacy = read("trainer/ppo/ray_trainer.py")
    assert legacy.index("batch = compute_advantage(") < legacy.index("actor_output = self._update_actor(batch)")
    v1_step = inspect.getsource(trainer_base.PPOTrainer._step_once)
    assert v1_step.index("self._compute_advantage(batch") < v1_step.index("self._update_actor(batch")


def test_scope_is_the_whole_step_batch_not_a_shard():
    """Any DP/micro-batch split of the step's batch sees the full-batch advantages (they are fixed data);
    computing on a shard instead would change them, which is why the estimator must run on the driver."""
    data = step_batch(seed=4, groups=4, group_size=4)
    full = ray_trainer.compute_advantage(data, adv_estimator="ep_grpo", config=ALGORITHM).batch["advantages"]
    first_half = step_batch(seed=4, groups=4, group_size=4).slice(0, 8)
    shard = ray_trainer.compute_advantage(first_half, adv_estimator="ep_grpo", config=ALGORITHM).batch["advantages"]
    assert not torch.allclose(shard, full[:8])
    permutation = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    shuffled = step_batch(seed=4, groups=4, group_size=4).select_idxs(permutation)  # as balance_batch reorders
    reordered = ray_trainer.compute_advantage(shuffled, adv_estimator="ep_grpo", config=ALGORITHM).batch["advantages"]
    torch.testing.assert_close(reordered, full[permutation], rtol=1e-6, atol=1e-6)
