"""A CPU platform for verl 0.9.1 (CPU-only runs; never selected on a GPU cluster).

verl resolves its device once, on the first ``verl.plugin.platform.get_platform()`` call, and some
modules read it at import time (``verl/workers/engine/fsdp/transformer_impl.py`` stores
``device_name`` at module level). :func:`enable_cpu_platform` must therefore run before anything
imports verl's engines; it raises if verl already resolved a different platform, because a
half-CUDA, half-CPU process would fail later with far less obvious errors.
"""

from __future__ import annotations

import os
import types
from contextlib import contextmanager
from typing import Any

import psutil
import torch
from verl.plugin.platform import PlatformBase, PlatformRegistry
from verl.plugin.platform import platform_manager as _platform_manager

PLATFORM_NAME = "cpu"


class _CPUDeviceModule(types.ModuleType):
    """``torch.cpu`` plus the ``torch.cuda``-style functions verl calls on its device module.

    Memory counters are 0 because a CPU has no separate device memory to account for; verl logs
    host memory separately (``perf/cpu_memory_used_gb``).
    """

    def __init__(self) -> None:
        super().__init__("cw_verl_cpu_device")

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cpu, name)

    @staticmethod
    def empty_cache() -> None:
        return None

    @staticmethod
    def ipc_collect() -> None:
        return None

    @staticmethod
    def memory_allocated(device: Any = None) -> int:
        return 0

    @staticmethod
    def memory_reserved(device: Any = None) -> int:
        return 0

    @staticmethod
    def max_memory_allocated(device: Any = None) -> int:
        return 0

    @staticmethod
    def max_memory_reserved(device: Any = None) -> int:
        return 0

    @staticmethod
    def reset_peak_memory_stats(device: Any = None) -> None:
        return None

    @staticmethod
    def mem_get_info(device: Any = None) -> tuple[int, int]:
        vm = psutil.virtual_memory()
        return vm.available, vm.total

    @staticmethod
    def set_per_process_memory_fraction(fraction: float, device: Any = None) -> None:
        return None

    @staticmethod
    def get_rng_state(device: Any = None) -> torch.Tensor:
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(state: torch.Tensor, device: Any = None) -> None:
        torch.set_rng_state(state)

    @staticmethod
    def manual_seed(seed: int) -> None:
        torch.manual_seed(seed)

    @staticmethod
    def manual_seed_all(seed: int) -> None:
        torch.manual_seed(seed)

    @staticmethod
    def get_device_name(device: Any = None) -> str:
        return "cpu"


_DEVICE_MODULE = _CPUDeviceModule()


@PlatformRegistry.register(platform=PLATFORM_NAME)
class PlatformCPU(PlatformBase):
    """verl platform for CPU processes talking over gloo."""

    @property
    def device_name(self) -> str:
        return "cpu"

    @property
    def vendor_name(self) -> str:
        return "cpu"

    @property
    def device_module(self) -> types.ModuleType:
        return _DEVICE_MODULE

    def is_available(self) -> bool:
        return True

    def is_platform_available(self, use_smi_check: bool = False) -> bool:
        # Never auto-detected: a GPU box without VERL_PLATFORM=cpu must keep verl's own choice.
        return False

    def current_device(self) -> str:
        # verl passes this to ``Tensor.to``; an int would mean ``cuda:<int>``.
        return "cpu"

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index: int) -> None:
        return None

    def synchronize(self, device_index: int | None = None) -> None:
        return None

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None:
        return None

    def empty_cache(self) -> None:
        return None

    def get_device_capability(self, device_index: int = 0) -> tuple[int | None, int | None]:
        return None, None

    def communication_backend_name(self) -> str:
        return "gloo"

    def visible_devices_envvar(self) -> str:
        # Not CUDA_VISIBLE_DEVICES: nothing here may hide GPUs from other code in the process.
        return "CW_VERL_CPU_VISIBLE_DEVICES"

    @contextmanager
    def nvtx_range(self, msg: str):
        yield

    def profiler_start(self) -> None:
        return None

    def profiler_stop(self) -> None:
        return None

    def ray_resource_name(self) -> str:
        # One unit of Ray's "GPU" resource is one rank slot, declared on a CPU machine with
        # ``ray.init(num_gpus=N)`` (``+ray_kwargs.ray_init.num_gpus=N`` for main_ppo; Ray accepts it
        # without GPUs). Not a custom resource: verl 0.9.1's start-up check
        # (``ResourcePoolManager._check_resource_available``) counts only "GPU" and "NPU". Ray then sets
        # CUDA_VISIBLE_DEVICES in each worker, which nothing on a CPU-only run reads.
        return "GPU"

    def ray_noset_envvars(self) -> list[str]:
        return []

    def ray_resource_options(self, num_gpus: float) -> dict[str, Any]:
        return {"num_gpus": num_gpus}

    def is_ipc_supported(self) -> bool:
        return False

    def cudart(self) -> Any:
        return None


def enable_cpu_platform() -> None:
    """Select the CPU platform for this process and its children; call before verl's engines load.

    ``VERL_ENGINE_DEVICE=cuda`` makes ``EngineRegistry`` return the FSDP engine, which verl registers
    for the device names "cuda" and "npu" only; the engine itself then runs on whatever device the
    platform names ("cpu").
    """
    current = _platform_manager._current_platform
    if current is not None and not isinstance(current, PlatformCPU):
        raise RuntimeError(
            f"verl already resolved its platform to {type(current).__name__}; call "
            "cw_verl.cpu.platform.enable_cpu_platform() before anything calls verl's get_platform() "
            "(e.g. before importing verl.workers.engine)."
        )
    os.environ["VERL_PLATFORM"] = PLATFORM_NAME
    os.environ["VERL_ENGINE_DEVICE"] = "cuda"
    if current is None:
        _platform_manager.set_platform(PlatformCPU())
