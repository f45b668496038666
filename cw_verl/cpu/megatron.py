"""CPU support for verl's Megatron engine on gloo ranks (a test and demo aid, like the CPU platform).

verl 0.9.1's ``MegatronEngineWithLMHead`` (through its "vanilla" mbridge path) trains on gloo ranks with
megatron-core's real pipeline schedule, distributed optimizer, tensor/sequence/context parallelism, once
four things that megatron-core 0.16.1 and mbridge 0.15.1 take from CUDA are given a CPU stand-in:

- **device** (:func:`cuda_as_cpu`): megatron and mbridge hard-code CUDA (``.cuda()``, ``device="cuda"``,
  ``device=torch.cuda.current_device()``, ``param.type() == "torch.cuda.BFloat16Tensor"``,
  ``torch.cuda.synchronize()``). While one of verl's Megatron engine methods runs, a torch function mode
  maps CUDA devices to the CPU and two ``torch.cuda`` functions are stubbed. Scoped to those methods, so
  nothing else in the process (an FSDP engine, vLLM) sees it.
- **RNG** (:func:`patch_megatron_rng`): megatron's model-parallel RNG tracker keeps CUDA generator
  states; a subclass keeps CPU ones. Activation recompute saves and restores the CPU states instead of CUDA's
  (:func:`patch_recompute_rng_states`).
- **layers** (:func:`patch_mbridge_llm_bridge`): mbridge builds TransformerEngine layers; on CPU it builds
  :func:`cw_verl.cpu.megatron_layers.cpu_layer_spec` (megatron's local spec with a packed-sequence,
  context-parallel attention and a sequence-parallel RMSNorm) and maps the local spec's norm names to HF.

Each piece is armed by a post-import hook on the module it patches (:data:`POST_IMPORT_HOOKS`), only
when verl's CPU platform is selected (``VERL_PLATFORM=cpu``): :func:`install` refuses otherwise, so a GPU
run never carries any of it. ``tests/test_megatron_shims.py`` fails loudly when the code these shims rely
on changes shape; the Megatron engine tests run them end to end.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

# The versions every shim below was written against and tested with.
WRITTEN_AGAINST = {"verl": "0.9.1", "megatron-core": "0.16.1", "mbridge": "0.15.1"}


# ---------------------------------------------------------------------------------------------- device


def _is_cuda(value: Any) -> bool:
    if isinstance(value, str):
        return value == "cuda" or value.startswith("cuda:")
    return isinstance(value, torch.device) and value.type == "cuda"


class _CudaAsCPU(TorchFunctionMode):
    """Every CUDA device named in a torch call becomes the CPU; CPU tensors report CUDA type names.

    Modes are not active inside a call they handle (e.g. inside ``torch.autograd.backward``); what runs
    there reaches CUDA only through ``torch.cuda.current_device()``, which the stubs answer with "cpu".
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # megatron's optimizers accept only parameters whose type() names a CUDA tensor type.
            return func(*args).replace("torch.", "torch.cuda.", 1)
        if func is torch.device and args and _is_cuda(args[0]):
            return torch.device("cpu")
        if any(_is_cuda(arg) for arg in args):
            args = tuple("cpu" if _is_cuda(arg) else arg for arg in args)
        device = kwargs.get("device")
        if device is not None and (_is_cuda(device) or isinstance(device, int)):
            kwargs["device"] = "cpu"
        return func(*args, **kwargs)


_TORCH_CUDA_STUBS: dict[str, Callable[..., Any]] = {
    "current_device": lambda: "cpu",
    "synchronize": lambda device=None: None,
}
_active = [0]


@contextlib.contextmanager
def cuda_as_cpu() -> Iterator[None]:
    """Run megatron/mbridge code that hard-codes CUDA on the CPU (re-entrant; not thread-safe)."""
    if _active[0]:
        yield
        return
    saved = {name: getattr(torch.cuda, name) for name in _TORCH_CUDA_STUBS}
    _active[0] += 1
    try:
        for name, stub in _TORCH_CUDA_STUBS.items():
            setattr(torch.cuda, name, stub)
        with _CudaAsCPU():
            yield
    finally:
        for name, original in saved.items():
            setattr(torch.cuda, name, original)
        _active[0] -= 1


# verl's Megatron engine methods that reach megatron/mbridge code.
ENGINE_METHODS = (
    "__init__",
    "initialize",
    "forward_backward_batch",
    "optimizer_zero_grad",
    "optimizer_step",
    "lr_scheduler_step",
    "to",
    "save_checkpoint",
    "load_checkpoint",
)
_PATCHED = "_cw_verl_cuda_as_cpu"


def _on_cpu(method):
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        with cuda_as_cpu():
            return method(*args, **kwargs)

    setattr(wrapper, _PATCHED, True)
    return wrapper


def patch_megatron_engine(transformer_impl) -> None:
    """Post-import hook for ``verl.workers.engine.megatron.transformer_impl``: :func:`cuda_as_cpu` around
    the engine's methods, and around each step of the weight generator ``get_per_tensor_param`` returns."""
    engine = transformer_impl.MegatronEngine
    if getattr(engine.initialize, _PATCHED, False):
        return
    for name in ENGINE_METHODS:
        setattr(engine, name, _on_cpu(engine.__dict__[name]))
    get_per_tensor_param = _on_cpu(engine.__dict__["get_per_tensor_param"])

    @functools.wraps(get_per_tensor_param)
    def per_tensor_param_on_cpu(self, *args, **kwargs):
        per_tensor, peft_config = get_per_tensor_param(self, *args, **kwargs)
        return _each_step_on_cpu(per_tensor), peft_config

    engine.get_per_tensor_param = per_tensor_param_on_cpu


def _each_step_on_cpu(generator):
    # Not one `with` around the loop: the consumer runs between steps, and must not run under the mode.
    iterator = iter(generator)
    while True:
        with cuda_as_cpu():
            item = next(iterator, _DONE)
        if item is _DONE:
            return
        yield item


_DONE = object()


# ------------------------------------------------------------------------------------------------- RNG


def patch_megatron_random(random_module) -> None:
    """Post-import hook for ``megatron.core.tensor_parallel.random``: the RNG tracker keeps CPU states.

    ``initialize_rng_tracker`` instantiates the module-level name ``CudaRNGStatesTracker``, so replacing that
    name with a CPU subclass covers every tracker megatron creates (verl's ``set_random_seed`` ->
    ``model_parallel_cuda_manual_seed``; ``torch.cuda.manual_seed`` itself is a no-op without CUDA).
    """
    base = random_module.CudaRNGStatesTracker
    if getattr(base, _PATCHED, False):
        return

    class CPURNGStatesTracker(base):
        """Megatron's tracker of named RNG states (model-parallel, data-parallel, expert), on the CPU RNG."""

        def add(self, name: str, seed: int) -> None:
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self._is_initialized = True
            self.seeds_.add(seed)
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name: str = random_module._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            outer = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(outer)

    setattr(CPURNGStatesTracker, _PATCHED, True)
    random_module.CudaRNGStatesTracker = CPURNGStatesTracker
    if random_module._CUDA_RNG_STATE_TRACKER is not None:
        # Created before this hook ran (with CUDA states): start over with a CPU tracker.
        random_module.initialize_rng_tracker(force_reset=True)


def patch_megatron_rng(random_module) -> None:
    """Post-import hook for ``megatron.core.tensor_parallel.random``: the tracker and activation recompute."""
    patch_megatron_random(random_module)
    patch_recompute_rng_states(random_module)


def patch_recompute_rng_states(random_module) -> None:
    """Activation recompute (``recompute_granularity=full``/``selective``) on the CPU RNG.

    megatron-core 0.16.1's ``CheckpointFunction`` and ``CheckpointWithoutOutput`` replay a segment's forward in
    backward with the RNG states it ran with, through the module's ``_get_all_rng_states`` /
    ``_set_all_rng_states`` (also ``_fork_rng``): the CPU generator, the CUDA generator (which a CPU-only torch
    refuses: "Torch not compiled with CUDA enabled") and the tracker's named states. On the CPU, every random op
    draws from the CPU generator, so it and the tracker's (CPU) states are the whole state; no CUDA slot is kept.
    """
    if getattr(random_module._get_all_rng_states, _PATCHED, False):
        return

    def _get_all_rng_states():
        return torch.get_rng_state(), None, random_module.get_cuda_rng_tracker().get_states()

    def _set_all_rng_states(cpu_rng_state, cuda_rng_state, cuda_rng_state_tracker):
        torch.set_rng_state(cpu_rng_state)
        random_module.get_cuda_rng_tracker().set_states(cuda_rng_state_tracker)

    for function in (_get_all_rng_states, _set_all_rng_states):
        setattr(function, _PATCHED, True)
        setattr(random_module, function.__name__, function)


# ------------------------------------------------------------------------------------------------ layers


def patch_mbridge_llm_bridge(llm_bridge) -> None:
    """Post-import hook for ``mbridge.core.llm_bridge``: build the CPU layer spec, and map its norm
    parameters (separate modules in the local spec) to the HF names of the TE spec's fused norms."""
    from cw_verl.cpu import megatron_layers

    bridge = llm_bridge.LLMBridge
    if getattr(bridge._get_transformer_layer_spec, _PATCHED, False):
        return
    local_to_te = megatron_layers.local_to_te_parameter_names()
    to_hf = bridge._weight_name_mapping_mcore_to_hf

    def _get_transformer_layer_spec(self, vp_stage=None):
        self.has_vp_stage = True  # megatron-core 0.16 takes vp_stage; mbridge's provider reads this flag
        return megatron_layers.cpu_layer_spec(self.config, vp_stage)

    def _weight_name_mapping_mcore_to_hf(self, mcore_weights_name: str) -> list[str]:
        for local, te in local_to_te.items():
            mcore_weights_name = mcore_weights_name.replace(f".{local}", f".{te}")
        return to_hf(self, mcore_weights_name)

    for method in (_get_transformer_layer_spec, _weight_name_mapping_mcore_to_hf):
        setattr(method, _PATCHED, True)
        setattr(bridge, method.__name__, method)


# -------------------------------------------------------------------------------------------- activation

POST_IMPORT_HOOKS: dict[str, Callable[[Any], None]] = {
    "megatron.core.tensor_parallel.random": patch_megatron_rng,
    "mbridge.core.llm_bridge": patch_mbridge_llm_bridge,
    "verl.workers.engine.megatron.transformer_impl": patch_megatron_engine,
}
INSTALLED_HOOKS: list[str] = []


def install() -> None:
    """Arm :data:`POST_IMPORT_HOOKS` (idempotent; a hook runs at once if its module is already imported).

    Raises:
        RuntimeError: unless verl's CPU platform is selected (``VERL_PLATFORM=cpu``, see
            :func:`cw_verl.cpu.platform.enable_cpu_platform`).
    """
    import wrapt

    if os.environ.get("VERL_PLATFORM") != "cpu":
        raise RuntimeError(
            "cw_verl.cpu.megatron runs verl's Megatron engine on the CPU and is armed only with VERL_PLATFORM=cpu "
            f"(have {os.environ.get('VERL_PLATFORM')!r})"
        )
    for module_name, hook in POST_IMPORT_HOOKS.items():
        if module_name not in INSTALLED_HOOKS:
            wrapt.register_post_import_hook(hook, module_name)
            INSTALLED_HOOKS.append(module_name)
