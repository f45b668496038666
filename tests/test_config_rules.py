"""``algorithm.adv_estimator=cw_grpo`` is the one switch: loss_mode follows it, conflicts stop the run early."""

import os
import subprocess
import sys

import pytest
import verl  # noqa: F401
from hydra import compose, initialize_config_dir

from cw_verl.config_rules import (
    LOSS_MODE_KEY,
    ConfigConflictError,
    align_loss_mode_with_estimator,
    check_group_scope,
    explicit_override_keys,
)

VERL_CONFIG_DIR = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")


def verl_config(*overrides):
    with initialize_config_dir(config_dir=VERL_CONFIG_DIR, version_base=None):
        return compose(config_name="ppo_trainer", overrides=list(overrides))


def test_loss_mode_left_at_verls_default_follows_the_estimator():
    config = verl_config("algorithm.adv_estimator=cw_grpo")
    assert config.actor_rollout_ref.actor.policy_loss.loss_mode == "vanilla"  # verl's default
    assert align_loss_mode_with_estimator(config, set()) == "cw_grpo"
    assert config.actor_rollout_ref.actor.policy_loss.loss_mode == "cw_grpo"


@pytest.mark.parametrize("loss_mode", ["vanilla", "clip_cov", "gspo"])
def test_explicit_conflicting_loss_mode_is_an_error(loss_mode):
    override = f"{LOSS_MODE_KEY}={loss_mode}"
    config = verl_config("algorithm.adv_estimator=cw_grpo", override)
    with pytest.raises(ConfigConflictError, match=f"loss_mode={loss_mode}"):
        align_loss_mode_with_estimator(config, explicit_override_keys([override]))


def test_consistent_or_unrelated_settings_are_left_alone():
    config = verl_config("algorithm.adv_estimator=cw_grpo", f"{LOSS_MODE_KEY}=cw_grpo")
    assert align_loss_mode_with_estimator(config, {LOSS_MODE_KEY}) is None
    config = verl_config("algorithm.adv_estimator=grpo", f"{LOSS_MODE_KEY}=clip_cov")
    assert align_loss_mode_with_estimator(config, {LOSS_MODE_KEY}) is None
    assert config.actor_rollout_ref.actor.policy_loss.loss_mode == "clip_cov"


def test_group_scope_needs_one_mini_batch_per_step():
    whole = verl_config(
        f"{LOSS_MODE_KEY}=cw_grpo_group", "data.train_batch_size=12", "actor_rollout_ref.actor.ppo_mini_batch_size=12"
    )
    check_group_scope(whole)
    split = verl_config(
        f"{LOSS_MODE_KEY}=cw_grpo_group", "data.train_batch_size=12", "actor_rollout_ref.actor.ppo_mini_batch_size=6"
    )
    with pytest.raises(ConfigConflictError, match="ppo_mini_batch_size=12"):
        check_group_scope(split)
    check_group_scope(verl_config(f"{LOSS_MODE_KEY}=cw_grpo", "actor_rollout_ref.actor.ppo_mini_batch_size=6"))


def test_override_keys_strip_hydra_prefixes():
    assert explicit_override_keys([f"++{LOSS_MODE_KEY}=x", "+a.b=1", "~c"]) == {LOSS_MODE_KEY, "a.b", "c"}


def run_main_ppo(*overrides):
    return subprocess.run(
        [sys.executable, "-m", "verl.trainer.main_ppo", *overrides],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HYDRA_FULL_ERROR": "1"},
    )


def test_verl_main_stops_on_a_conflict_before_ray_starts():
    result = run_main_ppo("algorithm.adv_estimator=cw_grpo", f"{LOSS_MODE_KEY}=vanilla")
    assert result.returncode != 0
    assert "ConfigConflictError" in result.stderr and f"{LOSS_MODE_KEY}=vanilla" in result.stderr
    assert "ray init kwargs" not in result.stdout  # validation happens before run_ppo's ray.init


def test_verl_main_applies_the_rule_then_runs_verls_own_validation():
    result = run_main_ppo("algorithm.adv_estimator=cw_grpo")
    assert "follows it: cw_grpo" in result.stdout + result.stderr  # hydra logs to stdout
    # verl's own checks ran after ours (the default config lacks micro-batch sizes).
    assert "ppo_micro_batch_size" in result.stderr
