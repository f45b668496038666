"""``python -m cw_verl check`` and the visibility of a broken plugin."""

import os
import subprocess
import sys


def run(*args, env_overrides=None):
    env = {**os.environ, **(env_overrides or {})}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, env=env)


def test_check_reports_a_working_installation():
    result = run("-m", "cw_verl", "check")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK: cw_verl is active in verl" in result.stdout
    assert "[FAIL]" not in result.stdout
    assert "[ok] entry point in group 'vllm.general_plugins': cw_verl_cpu" in result.stdout


def test_check_fails_when_verl_is_told_not_to_load_plugins():
    result = run("-m", "cw_verl", env_overrides={"VERL_USE_EXTERNAL_PLUGINS": "none"})
    assert result.returncode == 1
    assert "[FAIL] actor.policy_loss.loss_mode=cw_grpo registered" in result.stdout


def test_a_plugin_that_fails_to_load_is_reported_loudly():
    # verl swallows plugin import errors at DEBUG level; cw_verl's own ERROR log must still reach the user.
    code = "import sys; sys.modules['wrapt'] = None; import verl"
    result = run("-c", code)
    assert "cw_verl failed to install its verl plugin" in result.stderr


def test_check_reports_every_registration_and_patch_from_the_tables():
    from cw_verl import patches
    from cw_verl.registry import ADVANTAGE_ESTIMATORS, CW_POLICY_LOSSES, OTHER_POLICY_LOSSES

    result = run("-m", "cw_verl", "check")
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ADVANTAGE_ESTIMATORS:
        assert f"[ok] algorithm.adv_estimator={name} registered" in result.stdout
    for name in {**CW_POLICY_LOSSES, **OTHER_POLICY_LOSSES}:
        assert f"[ok] actor.policy_loss.loss_mode={name} registered" in result.stdout
    for patch in patches.PATCHES:
        assert f"[ok] {patch.module}.{patch.attribute}: {patch.what}" in result.stdout


def test_the_cpu_platform_needs_the_cpu_support_entry_point_too():
    # The CPU support is its own verl plugin: a plugin list naming only the core one leaves a CPU run without it.
    result = run("-m", "cw_verl", env_overrides={"VERL_PLATFORM": "cpu", "VERL_USE_EXTERNAL_PLUGINS": "cw_verl"})
    assert result.returncode == 1
    assert "[FAIL] VERL_USE_EXTERNAL_PLUGINS='cw_verl' lets verl load cw_verl, cw_verl_cpu" in result.stdout
    assert "[FAIL] VERL_PLATFORM=cpu: `import verl` loaded the CPU support" in result.stdout
