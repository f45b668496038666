"""The CPU layer spec for verl's Megatron engine (test/demo aid; see :mod:`cw_verl.cpu.megatron`).

Written against megatron-core 0.16.1 and mbridge 0.15.1. mbridge builds every model with megatron's
TransformerEngine layer spec, which needs TE's CUDA kernels. :func:`cpu_layer_spec` is megatron's own
local (pure PyTorch) spec with two of its modules replaced, because the local ones refuse what verl asks:

- :class:`PackedCausalAttention` for megatron's local ``DotProductAttention``, which refuses packed
  sequences (verl always packs them: THD) and context parallelism;
- :class:`SequenceParallelRMSNorm` for megatron's ``WrappedTorchNorm``, which refuses sequence
  parallelism (mbridge turns it on whenever TP > 1).

Importing this module imports megatron; :mod:`cw_verl.cpu.megatron` imports it only once mbridge is loaded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import torch
from megatron.core import parallel_state as mpu
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_layer_local_spec
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig


class SequenceParallelRMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` with megatron's norm constructor, usable under sequence parallelism.

    Under sequence parallelism each tensor-parallel rank normalises its own slice of the sequence, so the
    weight's gradient is partial on every rank; megatron all-reduces, over the TP group, the gradients of
    parameters flagged ``sequence_parallel`` (``finalize_model_grads``), as TE's and Apex's norms flag them.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **unused):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        self.weight.sequence_parallel = config.sequence_parallel


def zigzag_positions(cu_seqlens_padded: torch.Tensor, cp_size: int, cp_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence index and position within its sequence of each row of one CP rank's packed (THD) buffer.

    verl's ``preprocess_thd_engine`` cuts every padded sequence into ``2 * cp_size`` equal chunks and gives
    CP rank ``r`` chunks ``r`` and ``2 * cp_size - 1 - r``, back to back (load balance under a causal mask);
    without context parallelism a rank holds every sequence whole.

    Args:
        cu_seqlens_padded: ``[num_sequences + 1]`` offsets of the padded sequences in the global buffer.

    Returns:
        ``(sequence, position)``, each ``[sum of padded lengths / cp_size]`` int64.
    """
    segments, positions = [], []
    bounds = cu_seqlens_padded.tolist()
    for index, (start, end) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        length = end - start
        if cp_size == 1:
            position = torch.arange(length)
        else:
            chunk = length // (2 * cp_size)
            head = torch.arange(chunk * cp_rank, chunk * (cp_rank + 1))
            tail = torch.arange(length - chunk * (cp_rank + 1), length - chunk * cp_rank)
            position = torch.cat([head, tail])
        segments.append(torch.full_like(position, index))
        positions.append(position)
    return torch.cat(segments), torch.cat(positions)


class PackedCausalAttention(MegatronModule):
    """Causal attention within each packed sequence, with context parallelism (stands in for TE's attention).

    Keys and values are all-gathered over the CP group (megatron's sequence-parallel gather, whose backward
    reduce-scatters the gradients back to their owners), and a query attends to a key of the same sequence
    at an earlier or equal position, both placed by :func:`zigzag_positions`. One dense masked attention
    over the micro-batch: fine at test sizes, not a ring attention.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type=None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> torch.Tensor:
        """Args: ``query`` ``[t, heads, dim]``, ``key``/``value`` ``[t, kv_heads, dim]`` (THD, this rank's
        rows). Returns: ``[t, heads * dim]``."""
        if packed_seq_params is None or packed_seq_params.qkv_format != "thd":
            raise NotImplementedError("cw_verl's CPU attention needs packed sequences (use_remove_padding=True)")
        if attention_bias is not None:
            raise NotImplementedError("cw_verl's CPU attention takes no attention bias")
        cu_seqlens = packed_seq_params.cu_seqlens_q_padded
        cp_size, cp_rank = mpu.get_context_parallel_world_size(), mpu.get_context_parallel_rank()
        query_sequence, query_position = zigzag_positions(cu_seqlens, cp_size, cp_rank)
        key_sequence, key_position = query_sequence, query_position
        if cp_size > 1:
            group = mpu.get_context_parallel_group()
            key = gather_from_sequence_parallel_region(key, group=group)
            value = gather_from_sequence_parallel_region(value, group=group)
            ranks = [zigzag_positions(cu_seqlens, cp_size, rank) for rank in range(cp_size)]
            key_sequence = torch.cat([sequence for sequence, _ in ranks])
            key_position = torch.cat([position for _, position in ranks])
        allowed = (query_sequence[:, None] == key_sequence[None, :]) & (
            key_position[None, :] <= query_position[:, None]
        )
        # [t, heads, dim] -> [1, heads, t, dim]
        q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in (query, key, value))
        dropout = self.dropout if self.training else 0.0
        # As megatron's DotProductAttention: attention dropout draws from the model-parallel RNG stream
        # unless sequence parallelism already gives each rank different tokens.
        forked = dropout > 0 and not self.config.sequence_parallel
        rng = get_cuda_rng_tracker().fork() if forked else contextlib.nullcontext()
        with rng:
            out = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=allowed, dropout_p=dropout, scale=self.softmax_scale, enable_gqa=True
            )
        return out.squeeze(0).transpose(0, 1).reshape(query.shape[0], -1)


def cpu_layer_spec(config: TransformerConfig, vp_stage: int | None = None) -> TransformerBlockSubmodules:
    """Megatron's local GPT block spec for this pipeline stage, with the two modules above swapped in."""
    if config.qk_layernorm or config.multi_latent_attention or config.num_moe_experts:
        raise NotImplementedError(
            "cw_verl's CPU Megatron support covers dense Llama/Qwen2-style models (no QK norm, MLA or MoE)"
        )
    block = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization="RMSNorm", vp_stage=vp_stage)
    layers = []
    for layer in block.layer_specs:
        attention: ModuleSpec = layer.submodules.self_attention
        attention = dataclasses.replace(
            attention, submodules=dataclasses.replace(attention.submodules, core_attention=PackedCausalAttention)
        )
        submodules = dataclasses.replace(
            layer.submodules,
            input_layernorm=SequenceParallelRMSNorm,
            self_attention=attention,
            pre_mlp_layernorm=SequenceParallelRMSNorm,
        )
        layers.append(dataclasses.replace(layer, submodules=submodules))
    return dataclasses.replace(block, layer_specs=layers, layer_norm=SequenceParallelRMSNorm)


def local_to_te_parameter_names() -> dict[str, str]:
    """The local spec's separate norms under their TE-spec names (norm fused into the next linear), which
    mbridge maps to Hugging Face names: megatron's own checkpoint key map for the local spec, e.g.
    ``{"input_layernorm.": "self_attention.linear_qkv.layer_norm_", ...}``."""
    return dict(get_gpt_layer_local_spec(normalization="RMSNorm").submodules.sharded_state_dict_keys_map)
