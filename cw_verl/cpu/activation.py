"""The one place that turns cw_verl's CPU support on in a process: only when ``VERL_PLATFORM=cpu``.

verl's real trainer (``python -m verl.trainer.main_ppo``) runs in many processes: the driver, Ray's
TaskRunner, one worker per rank (actor/ref), agent-loop and reward workers, one vLLM server actor per
rollout replica and vLLM's own engine-core/worker processes. Two entry points reach all of them:

* the CPU support's own verl plugin (``verl.plugins`` -> :mod:`cw_verl.cpu.verl_plugin`) runs on every
  ``import verl``, so in every process that imports verl; it calls :func:`activate`. (cw_verl's core plugin,
  :mod:`cw_verl.verl_plugin`, never imports this package.)
* vLLM's plugin (``vllm.general_plugins`` -> :func:`cw_verl.cpu.vllm_plugin.register`) runs in every
  vLLM process, which need not import verl before building its model.

Both are no-ops unless the CPU platform is selected (``VERL_PLATFORM=cpu`` in the environment, which
Ray workers and vLLM subprocesses inherit from the driver), so a GPU user's processes are untouched.

:data:`CPU_SHIM_MODULES` lists the modules whose ``install()`` :func:`activate` calls; each arms its
own ``POST_IMPORT_HOOKS`` (``{module_name: hook(module)}``, wrapt post-import hooks, so a patch applies
when, and only if, the patched library is imported). A new CPU shim module is one more line there.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping

PLATFORM_ENV = "VERL_PLATFORM"
CPU_PLATFORM = "cpu"

# Order matters only in that each install() is independent; all are idempotent.
CPU_SHIM_MODULES: tuple[str, ...] = ("cw_verl.cpu.verl_shims", "cw_verl.cpu.megatron")

_ACTIVATED: list[str] = []


def cpu_platform_selected(environ: Mapping[str, str] | None = None) -> bool:
    """True iff ``VERL_PLATFORM`` names the CPU platform (verl reads the same variable, same way)."""
    environ = os.environ if environ is None else environ
    return environ.get(PLATFORM_ENV, "").strip().lower() == CPU_PLATFORM


def activate() -> bool:
    """Register the CPU platform with verl and install every CPU shim; no-op unless selected.

    Runs inside ``import verl`` (from the verl plugin), before any verl module calls
    ``get_platform()``: verl resolves ``VERL_PLATFORM=cpu`` to the class registered here.

    Returns:
        bool: whether the CPU support is active in this process.
    """
    if not cpu_platform_selected():
        return False
    # Registers PlatformCPU under "cpu" with verl's PlatformRegistry (import side effect).
    import cw_verl.cpu.platform  # noqa: F401

    # verl registers its FSDP engines for the device names "cuda" and "npu" only; the engine then runs
    # on the platform's device ("cpu"). An explicit user setting wins.
    os.environ.setdefault("VERL_ENGINE_DEVICE", "cuda")
    for name in CPU_SHIM_MODULES:
        if name not in _ACTIVATED:
            importlib.import_module(name).install()
            _ACTIVATED.append(name)
    return True


def active_shims() -> list[str]:
    """The shim modules :func:`activate` installed in this process (for ``python -m cw_verl check``)."""
    return list(_ACTIVATED)
