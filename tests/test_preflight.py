"""The GPU preflight (``python -m cw_verl check --gpu``, :mod:`cw_verl.preflight`).

Tests marked ``gpu`` run its three parts on CUDA and NCCL; without CUDA they are skipped, and pytest reports
them as skipped. The CPU rehearsal runs the same code on this box (float32 on the CPU, gloo ranks), so that the
preflight itself is tested here; what CUDA and NCCL do only a GPU node shows.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from cw_verl import preflight

NO_CUDA = "needs CUDA: run on a GPU node (pytest -m gpu)"


def test_the_loss_comparison_passes_on_the_cpu_in_float32():
    assert preflight.loss_on_device("cpu") == []


def test_the_comparison_catches_a_difference_larger_than_float32_rounding():
    want = torch.linspace(0.5, 1.5, 100, dtype=torch.float64)
    assert preflight._close("w", want.float(), want) is None
    assert "relative difference" in preflight._close("w", want * (1 + 1e-3), want)


def test_the_statistics_over_two_gloo_ranks_match_the_whole_batch_and_each_other():
    assert preflight.statistics_over_ranks(2, "gloo") == []


def test_check_gpu_on_a_machine_without_cuda_fails_with_a_clear_message():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the gpu-marked tests cover it")
    result = subprocess.run(
        [sys.executable, "-m", "cw_verl", "check", "--gpu"], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 1 and "no CUDA device" in result.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
def test_gpu_packages_import_at_the_tested_versions():
    from omegaconf import OmegaConf

    from cw_verl import packages

    cfg = OmegaConf.create(
        {
            "trainer": {"device": "cuda"},
            "actor_rollout_ref": {
                "rollout": {"name": "vllm"},
                "actor": {"strategy": "megatron", "megatron": {"vanilla_mbridge": True}},
            },
        }
    )
    needs = packages.needed(cfg)
    assert packages.problems(needs, packages.probe(needs)) == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
def test_the_cw_loss_on_cuda_matches_float64_on_the_cpu():
    assert preflight.loss_on_device("cuda") == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
def test_the_statistics_all_gather_over_nccl_on_every_gpu_of_the_node():
    assert preflight.statistics_over_ranks(torch.cuda.device_count(), "nccl") == []
