"""Per-GPU memory of a recipe on verl's Megatron backend with a colocated vLLM: an estimate before launch.

Nothing here has been measured on a GPU; it is arithmetic over stated assumptions, good for telling a
setting that cannot fit from one that might (the paper recipes' first 7B defaults needed about 93 GB).

Model states per GPU, for ``P`` parameters, tensor/pipeline parallel ``t * p`` and data parallel ``d``
(verl's defaults: bf16 weights, fp32 gradient buffer ``grad_reduce_in_fp32``, distributed optimizer)::

    weights    2 P / (t p)          bf16
    gradients  4 P / (t p)          fp32
    optimizer 12 P / (t p d)        fp32 master copy + Adam's two moments, sharded over DP
    reference  2 P / (t p)          bf16 (offloaded with the actor's weights when param_offload is on)

Phases (verl's hybrid engine runs them one after the other on the same GPUs)::

    rollout  = resident model states + vLLM's share (gpu_memory_utilization x GPU memory)
    training = weights + gradients + reference + resident optimizer + activations of one micro-batch
    step     = weights + gradients + reference + optimizer (reloaded for the step when offloaded)

Activations of a micro-batch of ``n`` tokens (bf16, sequence parallel), ``h`` hidden, ``L`` layers, ``V``
vocabulary: ``34 h / t`` bytes per token and layer with verl's default selective recompute (Korthikanti et
al., 2022), or ``2 h / t`` per layer plus one layer's ``34 h / t`` with full recompute; plus the logits,
:data:`LOGIT_BYTES` per token and vocabulary entry over ``t``.
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 1e9
LOGIT_BYTES = 10
"""bf16 logits, the fp32 copy the log-softmax works on, and its fp32 gradient."""


@dataclass(frozen=True)
class Layout:
    tensor_parallel: int
    pipeline_parallel: int
    data_parallel: int
    param_offload: bool
    optimizer_offload: bool
    rollout_memory_fraction: float
    gpu_memory_gb: float
    micro_batch_tokens: int
    full_recompute: bool


def parameter_count(hf_config) -> int:
    """Parameters of a Llama/Qwen2-style decoder from its Hugging Face config."""
    h, layers = hf_config.hidden_size, hf_config.num_hidden_layers
    heads = hf_config.num_attention_heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    head_dim = getattr(hf_config, "head_dim", None) or h // heads
    vocab, inter = hf_config.vocab_size, hf_config.intermediate_size
    kv = kv_heads * head_dim
    # Qwen2 has biases on q, k and v.
    bias = heads * head_dim + 2 * kv if getattr(hf_config, "model_type", "") == "qwen2" else 0
    attention = h * heads * head_dim + 2 * h * kv + heads * head_dim * h + bias
    per_layer = attention + 3 * h * inter + 2 * h
    embeddings = vocab * h * (1 if getattr(hf_config, "tie_word_embeddings", False) else 2)
    return int(embeddings + layers * per_layer + h)


@dataclass(frozen=True)
class Estimate:
    parameters: int
    weights: float
    gradients: float
    optimizer: float
    reference: float
    vllm: float
    activations: float
    rollout: float
    training: float
    step: float
    gpu: float

    @property
    def peak(self) -> float:
        return max(self.rollout, self.training, self.step)

    @property
    def fits(self) -> bool:
        return self.peak <= self.gpu

    def summary(self) -> str:
        return (
            f"{self.peak:.1f} of {self.gpu:.0f} GB per GPU (estimate; {self.parameters / 1e9:.2f}B parameters): "
            f"weights {self.weights:.1f}, gradients {self.gradients:.1f}, optimizer {self.optimizer:.1f}, "
            f"reference {self.reference:.1f}, vLLM {self.vllm:.1f}, activations {self.activations:.1f}; "
            f"rollout phase {self.rollout:.1f}, training {self.training:.1f}, optimizer step {self.step:.1f}"
        )


def estimate(hf_config, layout: Layout) -> Estimate:
    """Per-GPU memory in GB of each phase; see the module docstring for the model."""
    p = parameter_count(hf_config)
    model_parallel = layout.tensor_parallel * layout.pipeline_parallel
    weights = 2 * p / model_parallel / GB
    gradients = 4 * p / model_parallel / GB
    optimizer = 12 * p / (model_parallel * layout.data_parallel) / GB
    reference = weights
    h, layers, t = hf_config.hidden_size, hf_config.num_hidden_layers, layout.tensor_parallel
    layers_here = layers / layout.pipeline_parallel
    if layout.full_recompute:
        per_token = layers_here * 2 * h / t + 34 * h / t
    else:
        per_token = layers_here * 34 * h / t
    per_token += LOGIT_BYTES * hf_config.vocab_size / t
    activations = layout.micro_batch_tokens * per_token / GB
    vllm = layout.rollout_memory_fraction * layout.gpu_memory_gb
    resident_optimizer = 0.0 if layout.optimizer_offload else optimizer
    resident_model = 0.0 if layout.param_offload else weights + gradients + reference
    rollout = resident_model + resident_optimizer + vllm
    training = weights + gradients + reference + resident_optimizer + activations
    step = weights + gradients + reference + optimizer
    return Estimate(
        parameters=p,
        weights=weights,
        gradients=gradients,
        optimizer=optimizer,
        reference=reference,
        vllm=vllm,
        activations=activations,
        rollout=rollout,
        training=training,
        step=step,
        gpu=layout.gpu_memory_gb,
    )


def layout_from_config(cfg, gpu_memory_gb: float) -> Layout:
    """The :class:`Layout` of a composed ``ppo_megatron_trainer`` configuration, or of ``ppo_trainer`` with an
    FSDP actor (the CPU profile): estimated as TP = PP = CP = 1 with the optimizer sharded over the data-parallel
    ranks; FSDP also shards the parameters, so this over-estimates it."""
    actor = cfg.actor_rollout_ref.actor
    n_gpus = cfg.trainer.n_gpus_per_node * cfg.trainer.nnodes
    if actor.strategy == "megatron":
        mg = actor.megatron
        tp, pp, cp = mg.tensor_model_parallel_size, mg.pipeline_model_parallel_size, mg.context_parallel_size
        offload = (mg.param_offload, mg.optimizer_offload)
        recompute = (mg.get("override_transformer_config") or {}).get("recompute_granularity")
    else:
        tp = pp = cp = 1
        offload = (actor.fsdp_config.param_offload, actor.fsdp_config.optimizer_offload)
        gradient_checkpointing = cfg.actor_rollout_ref.model.get("enable_gradient_checkpointing", False)
        recompute = "full" if gradient_checkpointing else None
    longest = cfg.data.max_prompt_length + cfg.data.max_response_length
    if actor.use_dynamic_bsz:
        tokens = actor.ppo_max_token_len_per_gpu
    else:
        tokens = actor.ppo_micro_batch_size_per_gpu * longest
    return Layout(
        tensor_parallel=tp,
        pipeline_parallel=pp,
        data_parallel=max(1, n_gpus // (tp * pp * cp)),
        param_offload=bool(offload[0]),
        optimizer_offload=bool(offload[1]),
        rollout_memory_fraction=float(cfg.actor_rollout_ref.rollout.gpu_memory_utilization),
        gpu_memory_gb=gpu_memory_gb,
        # Context parallelism splits a micro-batch's tokens over its ranks.
        micro_batch_tokens=int(tokens // cp),
        full_recompute=recompute == "full",
    )
