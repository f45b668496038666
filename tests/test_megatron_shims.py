"""cw_verl.cpu.megatron's shims against the code they stand in for: fail loudly when verl, megatron-core or
mbridge change shape under them (the engine tests, tests/test_megatron_engine.py, run them end to end)."""

import importlib.metadata
import inspect
import types

import pytest
import torch

from cw_verl.cpu import megatron as cpu_megatron
from tests.megatron_ranks import recompute_gradients
from tests.ranks import run_on_ranks


def test_the_installed_libraries_are_the_ones_the_shims_were_written_against():
    for distribution, version in cpu_megatron.WRITTEN_AGAINST.items():
        assert importlib.metadata.version(distribution) == version, distribution


def test_install_refuses_outside_the_cpu_platform(monkeypatch):
    monkeypatch.setenv("VERL_PLATFORM", "cuda")
    with pytest.raises(RuntimeError, match="VERL_PLATFORM=cpu"):
        cpu_megatron.install()
    monkeypatch.delenv("VERL_PLATFORM")
    with pytest.raises(RuntimeError, match="VERL_PLATFORM=cpu"):
        cpu_megatron.install()


class _AllocatesInBackward(torch.autograd.Function):
    """Like megatron's sequence-parallel linear: allocates on ``torch.cuda.current_device()`` in backward."""

    @staticmethod
    def forward(ctx, x):
        return 2 * x

    @staticmethod
    def backward(ctx, grad):
        return 2 * grad + torch.zeros(grad.shape, device=torch.cuda.current_device())


def test_cuda_as_cpu_runs_the_cuda_idioms_megatron_and_mbridge_use_on_the_cpu():
    with cpu_megatron.cuda_as_cpu():
        linear = torch.nn.Linear(2, 2).cuda(torch.cuda.current_device())
        tensors = [
            torch.empty(2, device="cuda"),
            torch.zeros(2, device=torch.cuda.current_device()),
            torch.tensor([1.0], device=0),
            torch.ones(2).to(torch.device("cuda", 0)),
            torch.ones(2).cuda(),
            torch.ones(2).new_zeros(2, device="cuda:0"),
            linear.weight,
        ]
        type_names = {linear.weight.type(), torch.ones(1, dtype=torch.bfloat16).type()}
        torch.cuda.synchronize()
        x = torch.ones(3, requires_grad=True)
        torch.autograd.backward(_AllocatesInBackward.apply(x).sum())
    assert all(t.device.type == "cpu" for t in tensors)
    assert type_names == {"torch.cuda.FloatTensor", "torch.cuda.BFloat16Tensor"}
    assert torch.equal(x.grad, torch.full((3,), 2.0))


def test_cuda_as_cpu_is_off_outside_its_scope():
    with cpu_megatron.cuda_as_cpu(), cpu_megatron.cuda_as_cpu():  # re-entrant
        pass
    if torch.cuda.is_available():
        pytest.skip("a CUDA build with a GPU runs CUDA calls for real")
    with pytest.raises((AssertionError, RuntimeError)):
        torch.empty(1, device="cuda")
    with pytest.raises((AssertionError, RuntimeError)):
        torch.cuda.current_device()
    assert torch.ones(1).type() == "torch.FloatTensor"


def test_the_engine_methods_the_device_shim_wraps_exist():
    from verl.workers.engine.megatron.transformer_impl import MegatronEngine

    for name in (*cpu_megatron.ENGINE_METHODS, "get_per_tensor_param"):
        assert name in MegatronEngine.__dict__, name
    source = inspect.getsource(MegatronEngine.get_per_tensor_param)
    assert "return per_tensor_param, peft_config" in source


def test_the_cpu_rng_tracker_forks_named_cpu_streams():
    from megatron.core.tensor_parallel import random

    # initialize_rng_tracker instantiates the module-level name the hook replaces.
    assert "base_tracker = CudaRNGStatesTracker" in inspect.getsource(random.initialize_rng_tracker)
    assert "model_parallel_cuda_manual_seed" in inspect.getsource(
        __import__("verl.workers.engine.megatron.utils", fromlist=["set_random_seed"]).set_random_seed
    )
    module = types.SimpleNamespace(
        CudaRNGStatesTracker=random.CudaRNGStatesTracker,
        _MODEL_PARALLEL_RNG_TRACKER_NAME=random._MODEL_PARALLEL_RNG_TRACKER_NAME,
        _CUDA_RNG_STATE_TRACKER=None,
    )
    cpu_megatron.patch_megatron_random(module)
    tracker = module.CudaRNGStatesTracker()
    assert isinstance(tracker, random.CudaRNGStatesTracker)
    tracker.add(random._MODEL_PARALLEL_RNG_TRACKER_NAME, 7)
    tracker.add("other", 8)
    torch.manual_seed(0)
    outer = torch.rand(2)
    torch.manual_seed(0)
    with tracker.fork():
        first = torch.rand(2)
    with tracker.fork():
        second = torch.rand(2)  # the stream goes on where it stopped
    with tracker.fork("other"):
        other = torch.rand(2)
    assert torch.equal(torch.rand(2), outer)  # the default stream is untouched
    assert torch.equal(torch.cat([first, second]), torch.rand(4, generator=torch.Generator().manual_seed(7)))
    assert torch.equal(other, torch.rand(2, generator=torch.Generator().manual_seed(8)))
    with pytest.raises(Exception, match="already exists"):
        tracker.add("other", 9)


def test_megatrons_recompute_saves_and_restores_rng_states_through_the_two_functions_the_shim_replaces():
    from megatron.core.tensor_parallel import random

    def source(function):
        return inspect.getsource(function)

    # What fails on a CPU-only torch: the CUDA generator's state.
    assert "_get_cuda_rng_state(" in source(random._get_all_rng_states)
    assert "_set_cuda_rng_state(" in source(random._set_all_rng_states)
    assert list(inspect.signature(random._get_all_rng_states).parameters) == []
    assert list(inspect.signature(random._set_all_rng_states).parameters) == [
        "cpu_rng_state",
        "cuda_rng_state",
        "cuda_rng_state_tracker",
    ]
    # Every recompute path reaches the states through the module-level names the shim replaces.
    assert "ctx.rng_states = _get_all_rng_states()" in source(random.CheckpointFunction.forward)
    assert "with _fork_rng():" in source(random.CheckpointFunction.backward)
    assert "_set_all_rng_states(*ctx.rng_states)" in source(random.CheckpointFunction.backward)
    assert "current_states = _get_all_rng_states()" in source(random._fork_rng)
    assert "_set_all_rng_states(*current_states)" in source(random._fork_rng)
    assert "self.rng_states = _get_all_rng_states()" in source(random.CheckpointWithoutOutput.checkpoint)
    assert "_set_all_rng_states(*self.rng_states)" in source(random.CheckpointWithoutOutput._recompute)
    if not torch.cuda.is_available():
        with pytest.raises((AssertionError, RuntimeError)):
            torch.cuda.random.get_rng_state()


def test_recompute_on_the_cpu_gives_the_gradients_of_the_plain_forward():
    (runs,) = run_on_ranks(recompute_gradients, 1)
    assert runs["patched"] == [True, "_set_all_rng_states"]  # the CPU platform armed the shim in the rank
    plain, recompute, control = runs["plain"], runs["recompute"], runs["recompute without restore"]
    assert torch.equal(recompute["out"], plain["out"])
    for got, want in zip(recompute["grads"], plain["grads"], strict=True):
        assert torch.equal(got, want)
    # The default stream goes on as if nothing had been recomputed.
    assert torch.equal(recompute["rng_after"], plain["rng_after"])
    # Replayed on other random numbers (dropout masks), the same recompute gives other gradients.
    assert not all(torch.equal(got, want) for got, want in zip(control["grads"], plain["grads"], strict=True))


def test_the_cpu_layers_take_the_arguments_megatron_passes():
    from megatron.core.transformer.attention import SelfAttentionSubmodules
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.transformer_layer import TransformerLayerSubmodules

    from cw_verl.cpu import megatron_layers

    def parameters(function):
        return list(inspect.signature(function).parameters)

    attention = megatron_layers.PackedCausalAttention
    assert parameters(attention.__init__) == parameters(DotProductAttention.__init__)
    assert parameters(attention.forward) == parameters(DotProductAttention.forward)
    norm = megatron_layers.SequenceParallelRMSNorm
    assert (
        parameters(norm.__init__)[1:4] == parameters(WrappedTorchNorm.__new__)[1:4] == ["config", "hidden_size", "eps"]
    )
    assert {"input_layernorm", "self_attention", "pre_mlp_layernorm"} <= set(
        TransformerLayerSubmodules.__dataclass_fields__
    )
    assert "core_attention" in SelfAttentionSubmodules.__dataclass_fields__


def test_the_local_norm_names_map_to_the_hf_names_of_the_te_norms():
    from mbridge.core.llm_bridge import LLMBridge
    from mbridge.models.llama import LLaMABridge

    from cw_verl.cpu import megatron_layers

    names = megatron_layers.local_to_te_parameter_names()
    assert names == {
        "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
        "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
    }
    te_names = set(LLaMABridge._ATTENTION_MAPPING) | set(LLaMABridge._MLP_MAPPING)
    assert {f"{te}weight" for te in names.values()} <= te_names
    assert list(inspect.signature(LLMBridge._get_transformer_layer_spec).parameters) == ["self", "vp_stage"]
    assert "use_transformer_engine=True" in inspect.getsource(LLMBridge._get_transformer_layer_spec)


@pytest.mark.parametrize("cp_size", [1, 2, 4])
def test_zigzag_positions_match_verls_context_parallel_split(monkeypatch, cp_size):
    """verl's own THD packing (``preprocess_thd_engine``) on sequences whose tokens encode their sequence and
    position: each CP rank's rows are where :func:`zigzag_positions` says."""
    from verl.models.mcore import util

    from cw_verl.cpu.megatron_layers import zigzag_positions

    lengths = [5, 8, 1, 12]
    ids = [torch.tensor([1000 * (s + 1) + p + 1 for p in range(n)]) for s, n in enumerate(lengths)]
    nested = torch.nested.as_nested_tensor(ids, layout=torch.jagged)
    for cp_rank in range(cp_size):
        fake_mpu = types.SimpleNamespace(
            get_tensor_model_parallel_world_size=lambda: 1,
            get_context_parallel_world_size=lambda: cp_size,
            get_context_parallel_rank=lambda rank=cp_rank: rank,
        )
        monkeypatch.setattr(util, "mpu", fake_mpu)
        rows, params, _ = util.preprocess_thd_engine(nested, pre_process=True)
        sequence, position = zigzag_positions(params.cu_seqlens_q_padded, cp_size, cp_rank)
        rows = rows[0]
        real = rows != 0  # padding rows are zeros
        assert len(rows) == len(sequence)
        assert torch.equal(rows[real], 1000 * (sequence[real] + 1) + position[real] + 1)
        assert bool((position[~real] >= torch.tensor(lengths)[sequence[~real]]).all())


def test_packed_causal_attention_attends_within_each_sequence_up_to_its_position(monkeypatch):
    """One process (context parallelism is checked end to end: CP2 log-probs equal one process's)."""
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.transformer_config import TransformerConfig

    from cw_verl.cpu import megatron_layers

    monkeypatch.setattr(
        megatron_layers,
        "mpu",
        types.SimpleNamespace(get_context_parallel_world_size=lambda: 1, get_context_parallel_rank=lambda: 0),
    )
    config = TransformerConfig(
        num_layers=1, hidden_size=8, num_attention_heads=4, num_query_groups=2, attention_dropout=0.0
    )
    attention = megatron_layers.PackedCausalAttention(config, 1, None, "self")
    lengths = [3, 5, 2]
    cu = torch.tensor([0, 3, 8, 10], dtype=torch.int32)
    query, key, value = torch.randn(10, 4, 2), torch.randn(10, 2, 2), torch.randn(10, 2, 2)
    packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu)
    got = attention(query, key, value, None, packed_seq_params=packed)
    expected = []
    for start, length in zip(cu[:-1].tolist(), lengths, strict=True):
        rows = slice(start, start + length)
        q, k, v = (x[rows].transpose(0, 1) for x in (query, key, value))
        k, v = k.repeat_interleave(2, dim=0), v.repeat_interleave(2, dim=0)  # 2 query heads per key head
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=2**-0.5)
        expected.append(out.transpose(0, 1).reshape(length, -1))
    torch.testing.assert_close(got, torch.cat(expected))
    with pytest.raises(NotImplementedError, match="packed sequences"):
        attention(query, key, value, None)
    sequence_parallel = types.SimpleNamespace(params_dtype=torch.float32, sequence_parallel=True)
    norm = megatron_layers.SequenceParallelRMSNorm(sequence_parallel, 8, eps=1e-6)
    assert norm.weight.sequence_parallel is True and norm.eps == 1e-6
