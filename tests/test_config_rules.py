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
