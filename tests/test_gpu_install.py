"""The GPU cluster install (``pip install -e ".[gpu]"``) resolves for Linux x86_64 / CUDA wheels, and its
committed lock is in step with pyproject.toml. Resolved by uv for that platform from this CPU machine: the
package index is read (as of ``tests.gpu_install.EXCLUDE_NEWER``), no wheel is downloaded or built."""

from __future__ import annotations

import importlib.metadata

import pytest
import tomllib

from tests import gpu_install

# What the recipes run on a GPU node: verl 0.9.1's own vLLM and torch pins, and the bridge the recipes select.
VERL_PINS = {"verl": "0.9.1", "vllm": "0.24.0", "torch": "2.11.0", "transformers": "5.9.0"}


def pyproject() -> dict:
    return tomllib.loads((gpu_install.REPO / "pyproject.toml").read_text())


def pinned(requirements: list[str], name: str) -> str | None:
    for requirement in requirements:
        if requirement.split("==")[0].split("[")[0].strip() == name and "==" in requirement:
            return requirement.split("==", 1)[1].strip()
    return None


@pytest.fixture(scope="module")
def extras() -> dict[str, list[str]]:
    return pyproject()["project"]["optional-dependencies"]


def test_megatron_versions_are_pinned_in_one_place_and_the_tests_run_them(extras):
    """megatron-core and mbridge are pinned only in the `mcore` extra, which `test`, `cpu` and `gpu` include,
    and the environment these tests run in has exactly those versions."""
    for name in ("megatron-core", "mbridge"):
        places = [extra for extra, requirements in extras.items() if pinned(requirements, name)]
        assert places == ["mcore"], (name, places)
        assert importlib.metadata.version(name) == pinned(extras["mcore"], name)
    for extra in ("test", "cpu", "gpu"):
        assert "cw-verl[mcore]" in extras[extra], extra


@pytest.fixture(scope="module")
def committed() -> dict[str, str]:
    return gpu_install.pins(gpu_install.LOCK.read_text())


def test_the_committed_lock_is_a_resolution_of_pyproject(committed):
    """Resolved again with the lock as constraints, pyproject's `gpu` extra gives exactly the lock's set: a pin or
    a dependency added to, changed in or removed from pyproject shows. (Not a fresh resolve compared line by
    line: the package index gains releases, and one CI run resolved a newer transitive pin than the lock.)"""
    result = gpu_install.resolve("3.12", "--constraint", str(gpu_install.LOCK))
    stale = f"{gpu_install.LOCK.relative_to(gpu_install.REPO)} is out of step with pyproject: run `make gpu-lock`"
    assert result.returncode == 0, f"{stale}\n{result.stderr[-3000:]}"
    again = gpu_install.pins(result.stdout)
    assert again == committed, (stale, {k: (committed.get(k), v) for k, v in again.items() if committed.get(k) != v})


def test_the_lock_holds_verls_pins_the_megatron_pins_and_transformer_engine(committed, extras):
    versions = committed
    for name, version in VERL_PINS.items():
        assert versions.get(name) == version, (name, versions.get(name))
    for name in ("megatron-core", "mbridge"):
        assert versions.get(name) == pinned(extras["mcore"], name)
    te = pinned(extras["gpu"], "transformer-engine")
    assert versions.get("transformer-engine") == versions.get("transformer-engine-torch") == te
    # CUDA wheels (torch 2.11.0 on the index is a CUDA 13 build): NCCL is part of the install.
    assert "nvidia-nccl-cu13" in versions
    # Megatron-Bridge has no release that installs beside vLLM 0.24.0: the recipes' bridge is mbridge.
    assert "megatron-bridge" not in versions


def test_only_transformer_engines_torch_extension_builds_from_source():
    """The two-step install (torch first, then `--no-build-isolation`) is needed for TE alone: every other
    package of the set has a wheel for Linux x86_64."""
    result = gpu_install.resolve("3.12", "--only-binary", ":all:", "--no-binary", "transformer-engine-torch")
    assert result.returncode == 0, result.stderr[-3000:]
    strict = gpu_install.resolve("3.12", "--only-binary", ":all:")
    assert strict.returncode != 0 and "transformer-engine-torch" in strict.stderr


@pytest.mark.parametrize("python_version", ["3.10", "3.11"])
def test_the_gpu_extra_resolves_for_the_other_supported_pythons(python_version, extras):
    result = gpu_install.resolve(python_version)
    assert result.returncode == 0, result.stderr[-3000:]
    versions = gpu_install.pins(result.stdout)
    for name, version in VERL_PINS.items():
        assert versions.get(name) == version, (python_version, name, versions.get(name))
    assert versions.get("megatron-core") == pinned(extras["mcore"], "megatron-core")


def test_supported_pythons_match_the_package_metadata():
    assert pyproject()["project"]["requires-python"] == ">=3.10"
    assert gpu_install.PYTHON_VERSIONS == ("3.10", "3.11", "3.12")
