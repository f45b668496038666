"""``algorithm.adv_estimator=cw_grpo`` is the one switch on every verl entry point: the same config gives the
same loss_mode or the same error, whatever the entry point and wherever a value came from, before Ray starts."""

import json
import os
import subprocess
import sys

import pytest
import verl  # noqa: F401
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from cw_verl import config_rules
from cw_verl.config_rules import CONFIG_RULES, ConfigConflictError, Launch, apply_config_rules, launch_of
from cw_verl.verl_config import LOSS_MODE_KEY, verl_default_loss_mode

VERL_CONFIG_DIR = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
SYNC = Launch("main_ppo (v1 sync)", None)


def verl_config(*overrides):
    with initialize_config_dir(config_dir=VERL_CONFIG_DIR, version_base=None):
        return compose(config_name="ppo_trainer", overrides=list(overrides))


def test_verls_default_loss_mode_is_vanilla():
    assert verl_default_loss_mode() == "vanilla" == verl_config().actor_rollout_ref.actor.policy_loss.loss_mode


def test_loss_mode_left_at_verls_default_follows_the_estimator(caplog):
    config = verl_config("algorithm.adv_estimator=cw_grpo")
    with caplog.at_level("WARNING", logger="cw_verl.config_rules"):
        apply_config_rules(config, SYNC)
    assert config.actor_rollout_ref.actor.policy_loss.loss_mode == "cw_grpo"
    assert "follows the estimator: cw_grpo" in caplog.text


@pytest.mark.parametrize("loss_mode", ["clip_cov", "gspo", "kl_cov", "clip_cov_minibatch", "kl_cov_minibatch"])
def test_a_non_cw_loss_other_than_verls_default_is_an_error(loss_mode):
    config = verl_config("algorithm.adv_estimator=cw_grpo", f"{LOSS_MODE_KEY}={loss_mode}")
    with pytest.raises(ConfigConflictError, match=f"loss_mode={loss_mode}"):
        apply_config_rules(config, SYNC)


def test_the_rule_does_not_depend_on_where_a_value_came_from():
    """The same value set on the command line, in a merged YAML or by code gives the same outcome."""
    composed = verl_config("algorithm.adv_estimator=cw_grpo", f"{LOSS_MODE_KEY}=vanilla")
    merged = OmegaConf.merge(verl_config(), OmegaConf.create({"algorithm": {"adv_estimator": "cw_grpo"}}))
    for config in (composed, merged):
        apply_config_rules(config, SYNC)
        assert config.actor_rollout_ref.actor.policy_loss.loss_mode == "cw_grpo"


def test_consistent_or_unrelated_settings_are_left_alone():
    config = verl_config("algorithm.adv_estimator=cw_grpo", f"{LOSS_MODE_KEY}=cw_grpo_microbatch")
    apply_config_rules(config, SYNC)
    assert config.actor_rollout_ref.actor.policy_loss.loss_mode == "cw_grpo_microbatch"
    for loss_mode in ("clip_cov", "clip_cov_minibatch", "kl_cov_minibatch"):  # the baselines, with GRPO
        config = verl_config("algorithm.adv_estimator=grpo", f"{LOSS_MODE_KEY}={loss_mode}")
        apply_config_rules(config, SYNC)
        assert config.actor_rollout_ref.actor.policy_loss.loss_mode == loss_mode
    config = verl_config("algorithm.adv_estimator=grpo", f"{LOSS_MODE_KEY}=cw_grpo")  # CW loss, GRPO estimator
    apply_config_rules(config, SYNC)
    assert config.actor_rollout_ref.actor.policy_loss.loss_mode == "cw_grpo"


def group_scope(*overrides):
    return verl_config(f"{LOSS_MODE_KEY}=cw_grpo_group", "data.train_batch_size=16", *overrides)


def test_group_scope_needs_one_mini_batch_per_update():
    whole = group_scope("actor_rollout_ref.actor.ppo_mini_batch_size=16")
    apply_config_rules(whole, launch_of(whole, "TaskRunnerV1"))
    split = group_scope("actor_rollout_ref.actor.ppo_mini_batch_size=4")
    with pytest.raises(ConfigConflictError, match="ppo_mini_batch_size=16"):
        apply_config_rules(split, launch_of(split, "TaskRunnerV1"))
    mini = verl_config(f"{LOSS_MODE_KEY}=cw_grpo", "actor_rollout_ref.actor.ppo_mini_batch_size=4")
    apply_config_rules(mini, launch_of(mini, "TaskRunnerV1"))


def test_group_scope_accepts_separate_async_whose_local_updates_hold_whole_groups():
    """verl's separate_async makes parameter_sync_step local updates per step, each of ppo_mini_batch_size
    prompts (it requires train_batch_size == parameter_sync_step * ppo_mini_batch_size)."""
    config = group_scope(
        "trainer.v1.trainer_mode=separate_async",
        "trainer.v1.separate_async.parameter_sync_step=4",
        "actor_rollout_ref.actor.ppo_mini_batch_size=4",
    )
    launch = launch_of(config, "TaskRunnerV1")
    assert launch.prompts_per_update == 4
    apply_config_rules(config, launch)
    # The same numbers on the legacy trainer, which updates on the whole step's batch, split groups.
    with pytest.raises(ConfigConflictError, match="legacy"):
        apply_config_rules(config, launch_of(config, "TaskRunner"))


def test_fully_async_updates_hold_require_batches_mini_batches():
    config = group_scope("actor_rollout_ref.actor.ppo_mini_batch_size=4", "+async_training.require_batches=2")
    assert launch_of(config, "FullyAsyncTaskRunner").prompts_per_update == 8
    with pytest.raises(ConfigConflictError, match="fully_async_policy"):
        apply_config_rules(config, launch_of(config, "FullyAsyncTaskRunner"))


def test_the_rules_run_in_table_order_and_a_new_rule_is_one_entry(monkeypatch):
    seen = []

    def record(config, launch):
        seen.append((config.actor_rollout_ref.actor.policy_loss.loss_mode, launch.entry_point))

    # The loss-mode rule comes first, so that a rule after it sees the resolved loss mode.
    assert CONFIG_RULES[0] is config_rules.loss_mode_follows_estimator
    monkeypatch.setattr(config_rules, "CONFIG_RULES", (*CONFIG_RULES, record))
    apply_config_rules(verl_config("algorithm.adv_estimator=cw_grpo"), SYNC)
    assert seen == [("cw_grpo", "main_ppo (v1 sync)")]


def test_task_runner_classes_are_recognised_through_ray_and_subclassing():
    import ray
    from cw_verl.patches.entry_points import runner_name
    from verl.trainer.main_ppo import TaskRunnerV1

    class RecipeRunner(TaskRunnerV1.__ray_actor_class__):
        pass

    assert runner_name(TaskRunnerV1) == "TaskRunnerV1"
    assert runner_name(ray.remote(RecipeRunner)) == "TaskRunnerV1"
    assert runner_name(object) == "object"


# --- every entry point, run as a user runs it, with Ray faked (tests/entry_points.py) --------------


@pytest.fixture(scope="module")
def entry_points():
    result = subprocess.run(
        [sys.executable, os.path.join(os.path.dirname(__file__), "entry_points.py"), "--json", "--quick"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HYDRA_FULL_ERROR": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULTS "))
    return json.loads(line.removeprefix("RESULTS "))


ENTRY_POINTS = [
    "main_ppo (v1 sync)",
    "main_ppo (v1 separate_async)",
    "main_ppo (legacy trainer)",
    "one_step_off_policy",
    "fully_async_policy",
    "compose + run_ppo",
]


def find(results, entry, source, loss_mode, overrides=()):
    return next(
        r
        for r in results
        if (r["entry"], r["source"], r["loss_mode"], tuple(r["overrides"])) == (entry, source, loss_mode, overrides)
    )


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_every_entry_point_resolves_the_estimator_alone_to_cw_grpo(entry_points, entry):
    result = find(entry_points, entry, "estimator only", None)
    assert result["error"] is None and result["resolved"] == "cw_grpo"


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_every_entry_point_refuses_a_conflicting_loss_from_any_source_before_ray_starts(entry_points, entry):
    sources = ["compose overrides"] if entry == "compose + run_ppo" else ["YAML", "command line"]
    for source in sources:
        result = find(entry_points, entry, source, "clip_cov")
        assert result["error"].startswith("ConfigConflictError") and "loss_mode=clip_cov" in result["error"], result
        assert not result["ray_started"] and result["resolved"] is None


def test_verls_default_set_explicitly_anywhere_is_the_same_as_leaving_it(entry_points):
    for result in entry_points:
        if result["loss_mode"] == "vanilla":
            assert result["error"] is None and result["resolved"] == "cw_grpo", result


def test_group_scope_per_trainer_loop(entry_points):
    assert find(entry_points, "main_ppo (v1 separate_async)", "command line", "cw_grpo_group")["resolved"] == (
        "cw_grpo_group"
    )
    split = ("data.train_batch_size=16", "actor_rollout_ref.actor.ppo_mini_batch_size=4")
    assert find(entry_points, "main_ppo (v1 sync)", "command line", "cw_grpo_group", split)["error"].startswith(
        "ConfigConflictError"
    )
    one = find(
        entry_points, "fully_async_policy", "command line", "cw_grpo_group", ("async_training.require_batches=1",)
    )
    assert one["resolved"] == "cw_grpo_group"
    two = find(
        entry_points, "fully_async_policy", "command line", "cw_grpo_group", ("async_training.require_batches=2",)
    )
    assert two["error"].startswith("ConfigConflictError") and not two["ray_started"]


def test_validate_config_applies_the_rules_only_in_the_driver_of_python_m_main_ppo(monkeypatch):
    """The process state the wrapped validate_config keys on: __main__ is verl.trainer.main_ppo, Ray not started."""
    import types

    import ray
    from cw_verl.patches.entry_points import driver_of_python_m_main_ppo

    main = types.ModuleType("__main__")
    monkeypatch.setitem(sys.modules, "__main__", main)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    main.__spec__ = types.SimpleNamespace(name="verl.trainer.main_ppo")
    assert driver_of_python_m_main_ppo()
    monkeypatch.setattr(ray, "is_initialized", lambda: True)  # a Ray task runner calling validate_config
    assert not driver_of_python_m_main_ppo()
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    main.__spec__ = types.SimpleNamespace(name="verl.experimental.one_step_off_policy.main_ppo")  # run_ppo applies
    assert not driver_of_python_m_main_ppo()
    main.__spec__ = None  # `python script.py`
    assert not driver_of_python_m_main_ppo()


# --- rollout-correction bypass mode: kept loss in the v1 trainer, rewritten loss elsewhere (issue 28) ----------

BYPASS = "algorithm.rollout_correction.bypass_mode=true"
REWRITING_RUNNERS = ["TaskRunner", "OneStepTaskRunner", "FullyAsyncTaskRunner"]
CW_VERL_LOSSES = ["cw_grpo", "cw_grpo_group", "cw_grpo_microbatch", "clip_cov_minibatch", "kl_cov_minibatch"]


@pytest.mark.parametrize("runner", REWRITING_RUNNERS)
@pytest.mark.parametrize("loss_mode", CW_VERL_LOSSES)
def test_bypass_mode_with_cw_verls_loss_is_refused_where_verl_rewrites_the_loss(runner, loss_mode):
    estimator = "cw_grpo" if loss_mode.startswith("cw_grpo") else "grpo"
    config = verl_config(BYPASS, f"algorithm.adv_estimator={estimator}", f"{LOSS_MODE_KEY}={loss_mode}")
    launch = launch_of(config, runner)
    assert launch.rewrites_loss_in_bypass_mode
    with pytest.raises(ConfigConflictError, match="bypass_mode") as refused:
        apply_config_rules(config, launch)
    # The setting that fixes it, and the trainer that keeps the loss.
    assert "algorithm.rollout_correction.bypass_mode=False" in str(refused.value)
    assert "trainer.use_v1=True" in str(refused.value) and launch.entry_point in str(refused.value)


def test_the_cw_estimator_alone_is_refused_with_bypass_mode_where_verl_rewrites_the_loss():
    config = verl_config(BYPASS, "algorithm.adv_estimator=cw_grpo")
    with pytest.raises(ConfigConflictError, match="loss_mode=cw_grpo"):
        apply_config_rules(config, launch_of(config, "TaskRunner"))


@pytest.mark.parametrize("mode", ["sync", "colocate_async", "separate_async"])
@pytest.mark.parametrize("loss_mode", CW_VERL_LOSSES)
def test_bypass_mode_with_cw_verls_loss_is_allowed_in_the_v1_trainer_and_the_loss_is_kept(mode, loss_mode):
    estimator = "cw_grpo" if loss_mode.startswith("cw_grpo") else "grpo"
    config = verl_config(
        BYPASS,
        f"algorithm.adv_estimator={estimator}",
        f"{LOSS_MODE_KEY}={loss_mode}",
        f"trainer.v1.trainer_mode={mode}",
        # Whole groups per update in every mode (separate_async: train_batch_size = parameter_sync_step x mini).
        "data.train_batch_size=16",
        f"actor_rollout_ref.actor.ppo_mini_batch_size={4 if mode == 'separate_async' else 16}",
    )
    launch = launch_of(config, "TaskRunnerV1")
    assert not launch.rewrites_loss_in_bypass_mode
    apply_config_rules(config, launch)
    assert config.actor_rollout_ref.actor.policy_loss.loss_mode == loss_mode


@pytest.mark.parametrize("runner", REWRITING_RUNNERS)
def test_bypass_mode_is_left_alone_with_verls_own_losses_or_without_bypass(runner):
    for overrides, loss_mode in (
        ([BYPASS, "algorithm.adv_estimator=grpo"], "vanilla"),  # verl's loss: verl's business
        (["algorithm.adv_estimator=cw_grpo", "algorithm.rollout_correction.rollout_is=token"], "cw_grpo"),  # decoupled
    ):
        config = verl_config(*overrides)
        apply_config_rules(config, launch_of(config, runner))
        assert config.actor_rollout_ref.actor.policy_loss.loss_mode == loss_mode


def test_verls_experimental_trainers_default_to_bypass_mode():
    """So their default config with a CW loss is refused (the error names the setting that fixes it)."""
    for path in (
        "experimental/one_step_off_policy/config/one_step_off_ppo_trainer.yaml",
        "experimental/fully_async_policy/config/fully_async_ppo_trainer.yaml",
    ):
        config = OmegaConf.load(os.path.join(os.path.dirname(verl.__file__), path))
        assert config.algorithm.rollout_correction.bypass_mode is True, path


def test_verls_apply_bypass_mode_rewrites_the_loss_mode_in_the_trainers_that_call_it():
    """What the rule guards against, on verl's own function; and who calls it (verl 0.9.1)."""
    import inspect

    import torch
    from verl import DataProto
    from verl.experimental.separation import ray_trainer as separation
    from verl.trainer.ppo import ray_trainer as legacy
    from verl.trainer.ppo.rollout_corr_helper import apply_bypass_mode
    from verl.trainer.ppo.v1 import trainer_base

    rollout_log_probs = torch.randn(2, 3)
    batch = DataProto.from_dict({"rollout_log_probs": rollout_log_probs})
    policy_loss = OmegaConf.create({"loss_mode": "cw_grpo_group"})
    apply_bypass_mode(batch, OmegaConf.create({"bypass_mode": True}), policy_loss)
    assert policy_loss.loss_mode == "bypass_mode" and batch.batch["old_log_probs"].equal(rollout_log_probs)
    # The legacy trainer's fit and the separation trainers' (one_step_off_policy, fully_async_policy) call it on
    # the actor's policy-loss config; the v1 trainer does not.
    assert "policy_loss_config=self.config.actor_rollout_ref.actor.policy_loss" in inspect.getsource(
        legacy.RayPPOTrainer.fit
    )
    assert "apply_bypass_mode(" in inspect.getsource(separation.SeparateRayPPOTrainer._fit_compute_log_prob)
    assert "apply_bypass_mode" not in inspect.getsource(trainer_base)


def test_verls_v1_trainer_in_bypass_mode_only_takes_the_rollout_log_probs_as_old_log_probs(monkeypatch):
    """verl 0.9.1's ``PPOTrainer._compute_old_log_prob`` in bypass mode, run on a fake TransferQueue: it writes
    ``old_log_probs`` = the rollout's, computes nothing on the actor and leaves the loss mode alone."""
    from types import SimpleNamespace

    import torch
    from tensordict import TensorDict
    from verl.trainer.ppo.v1 import trainer_base

    rollout_log_probs = torch.randn(2, 3)
    written = {}

    class FakeQueue:
        @staticmethod
        def kv_batch_get(keys, partition_id, select_fields):
            assert select_fields == ["rollout_log_probs"]
            return TensorDict({"rollout_log_probs": rollout_log_probs.clone()}, batch_size=len(keys))

        @staticmethod
        def kv_batch_put(keys, partition_id, fields):
            written.update(fields.items())

    class NoActor:
        def __getattr__(self, name):
            raise AssertionError(f"bypass mode called the actor: {name}")

    monkeypatch.setattr(trainer_base, "tq", FakeQueue)
    config = verl_config(BYPASS, f"{LOSS_MODE_KEY}=cw_grpo_group")
    trainer = SimpleNamespace(config=config, actor_rollout_wg=NoActor())
    batch = SimpleNamespace(keys=["a", "b"], partition_id="train")
    assert trainer_base.PPOTrainer._compute_old_log_prob(trainer, batch, metrics={}) is batch
    assert list(written) == ["old_log_probs"] and written["old_log_probs"].equal(rollout_log_probs)
    assert config.actor_rollout_ref.actor.policy_loss.loss_mode == "cw_grpo_group"


def test_bypass_mode_per_entry_point(entry_points):
    """Every entry point run as a user runs it: the v1 trainer keeps cw_grpo in bypass mode, the legacy and
    experimental trainers are refused before Ray starts."""
    bypass = ("algorithm.rollout_correction.bypass_mode=true",)
    for entry in ("main_ppo (v1 sync)", "main_ppo (v1 separate_async)"):
        result = find(entry_points, entry, "estimator only", None, bypass)
        assert result["error"] is None and result["resolved"] == "cw_grpo", result
    for entry in ("main_ppo (legacy trainer)", "one_step_off_policy", "fully_async_policy"):
        result = find(entry_points, entry, "estimator only", None, bypass)
        assert result["error"].startswith("ConfigConflictError") and "bypass_mode=False" in result["error"], result
        assert not result["ray_started"] and result["resolved"] is None
