"""verl's actor, built and driven the way verl's trainer does it, inside one rank of a gloo group.

Each function here mirrors one step of verl 0.9.1's PPO trainer (``trainer/ppo/ray_trainer.py`` and
``trainer/ppo/v1/trainer_base.py``) and of its ``ActorRolloutRefWorker.init_model``, minus Ray: the
caller is already one rank of a ``torch.distributed`` group (see :mod:`cw_verl.cpu.launch`) and hands
each call the rank's contiguous data-parallel chunk, as verl's ``make_nd_compute_dataproto_dispatch_fn``
would. What runs below these functions -- ``TrainingWorker``, the FSDP2 engine, micro-batching,
``ppo_loss`` and the registered policy loss, gradient sync, the optimizer -- is verl's own code.

All functions are collective: every rank of the group must call them in the same order.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

# Registers the "cpu" platform class; resolving it is left to enable_cpu_platform / VERL_PLATFORM.
import cw_verl.cpu.platform  # noqa: F401


@dataclasses.dataclass(frozen=True)
class ActorSetup:
    """The knobs of one actor, named after verl's ``actor_rollout_ref.actor`` config keys.

    ``ppo_mini_batch_size`` counts prompts, as in verl's config; one optimizer step consumes
    ``ppo_mini_batch_size * rollout_n`` sequences over all data-parallel ranks. ``strategy`` selects
    verl's FSDP2 engine (``"fsdp2"``) or its Megatron engine (``"megatron"``: mbridge, megatron-core's
    pipeline schedule and distributed optimizer), whose ``actor.megatron.*`` parallel sizes follow; the
    data-parallel size is whatever the world size leaves.
    """

    model_path: str
    rollout_n: int
    ppo_mini_batch_size: int
    loss_mode: str = "vanilla"
    # Further ``policy_loss`` knobs (e.g. ``clip_cov_ratio``, ``kl_cov_ratio``), as verl's PolicyLossConfig.
    policy_loss: dict = dataclasses.field(default_factory=dict)
    ppo_micro_batch_size_per_gpu: int = 4
    use_dynamic_bsz: bool = False
    ppo_max_token_len_per_gpu: int = 1024
    lr: float = 1e-3
    lr_warmup_steps_ratio: float = 0.0
    weight_decay: float = 0.0
    clip_grad: float = 1.0
    clip_ratio: float = 0.2
    loss_agg_mode: str = "token-mean"
    entropy_coeff: float = 0.0
    # verl's KL loss to the reference policy (the batch must carry ``ref_log_prob``); 0: none.
    kl_loss_coef: float = 0.0
    kl_loss_type: str = "low_var_kl"
    ppo_epochs: int = 1
    total_training_steps: int = 1000
    # None: fp32 for FSDP on CPU (bf16 autocast there is slow and would make the engine's log-probs differ
    # from the fp32 rollout model's; clusters keep verl's bf16 default), bf16 for Megatron (verl's Megatron
    # engine accepts only bf16/fp16).
    param_dtype: str | None = None
    use_remove_padding: bool = True
    data_loader_seed: int = 42
    temperature: float = 1.0
    strategy: str = "fsdp2"
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    context_parallel_size: int = 1
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = True

    def __post_init__(self):
        if self.strategy not in ("fsdp2", "megatron"):
            raise ValueError(f"strategy must be 'fsdp2' or 'megatron', got {self.strategy!r}")
        if self.strategy == "fsdp2" and (self.model_parallel_size > 1 or self.sequence_parallel):
            raise ValueError("tensor/pipeline/context/sequence parallelism needs strategy='megatron'")
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            # verl would switch it off with a warning; a test asking for it must not silently run without.
            raise ValueError("sequence_parallel needs tensor_model_parallel_size > 1")

    @property
    def model_parallel_size(self) -> int:
        """Ranks that hold one replica of the model: TP x PP x CP (each such group sees the same data)."""
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size * self.context_parallel_size


@dataclasses.dataclass
class Actor:
    """A built actor: verl's ``TrainingWorker`` plus the ``ActorConfig`` its ``ppo_loss`` reads."""

    worker: Any
    config: Any
    setup: ActorSetup

    @property
    def engine(self):
        return self.worker.engine

    @property
    def is_megatron(self) -> bool:
        return self.setup.strategy == "megatron"


def _fsdp_actor_config(setup: ActorSetup):
    from verl.workers.config import FSDPActorConfig, FSDPEngineConfig, FSDPOptimizerConfig

    precision = {"param_dtype": setup.param_dtype or "fp32", "reduce_dtype": "fp32", "buffer_dtype": "fp32"}
    return FSDPActorConfig(
        strategy="fsdp2",
        optim=FSDPOptimizerConfig(**_optimizer_keys(setup)),
        fsdp_config=FSDPEngineConfig(
            strategy="fsdp2",
            use_torch_compile=False,
            mixed_precision=precision,
            use_dynamic_bsz=setup.use_dynamic_bsz,
        ),
        use_remove_padding=setup.use_remove_padding,
        **_common_actor_keys(setup),
    )


def _megatron_actor_config(setup: ActorSetup):
    from verl.workers.config import McoreActorConfig, McoreEngineConfig, McoreOptimizerConfig

    dtype = {None: "bfloat16", "bf16": "bfloat16", "fp16": "float16"}.get(setup.param_dtype, setup.param_dtype)
    return McoreActorConfig(
        strategy="megatron",
        # FSDP's scheduler keeps the rate constant after warm-up; the same here, so both engines agree.
        optim=McoreOptimizerConfig(lr_decay_style="constant", **_optimizer_keys(setup)),
        megatron=McoreEngineConfig(
            tensor_model_parallel_size=setup.tensor_model_parallel_size,
            pipeline_model_parallel_size=setup.pipeline_model_parallel_size,
            context_parallel_size=setup.context_parallel_size,
            sequence_parallel=setup.sequence_parallel,
            use_distributed_optimizer=setup.use_distributed_optimizer,
            use_dynamic_bsz=setup.use_dynamic_bsz,
            dtype=dtype,
            # mbridge (verl's "vanilla" bridge) installs here; Megatron-Bridge, verl's default, does not.
            vanilla_mbridge=True,
            # mbridge turns sequence parallelism on whenever TP > 1, and verl's engine does not pass its own
            # `sequence_parallel` to mbridge: the knob goes through the bridge's config overrides.
            override_transformer_config={"sequence_parallel": setup.sequence_parallel},
        ),
        **_common_actor_keys(setup),
    )


def _optimizer_keys(setup: ActorSetup) -> dict[str, Any]:
    return dict(
        lr=setup.lr,
        lr_warmup_steps_ratio=setup.lr_warmup_steps_ratio,
        weight_decay=setup.weight_decay,
        clip_grad=setup.clip_grad,
        total_training_steps=setup.total_training_steps,
    )


def _common_actor_keys(setup: ActorSetup) -> dict[str, Any]:
    from verl.workers.config import PolicyLossConfig

    return dict(
        policy_loss=PolicyLossConfig(loss_mode=setup.loss_mode, **setup.policy_loss),
        rollout_n=setup.rollout_n,
        ppo_mini_batch_size=setup.ppo_mini_batch_size,
        ppo_micro_batch_size_per_gpu=setup.ppo_micro_batch_size_per_gpu,
        use_dynamic_bsz=setup.use_dynamic_bsz,
        ppo_max_token_len_per_gpu=setup.ppo_max_token_len_per_gpu,
        clip_ratio=setup.clip_ratio,
        clip_ratio_low=setup.clip_ratio,
        clip_ratio_high=setup.clip_ratio,
        loss_agg_mode=setup.loss_agg_mode,
        entropy_coeff=setup.entropy_coeff,
        use_kl_loss=setup.kl_loss_coef > 0,
        kl_loss_coef=setup.kl_loss_coef,
        kl_loss_type=setup.kl_loss_type,
        ppo_epochs=setup.ppo_epochs,
        data_loader_seed=setup.data_loader_seed,
        use_torch_compile=False,
    )


def build_actor(setup: ActorSetup) -> Actor:
    """Build verl's actor ``TrainingWorker`` as ``ActorRolloutRefWorker.init_model`` does (FSDP2 with sdpa
    attention, or Megatron through mbridge with :mod:`cw_verl.cpu.megatron`'s CPU support)."""
    from verl.workers.config import HFModelConfig, TrainingWorkerConfig
    from verl.workers.engine_workers import TrainingWorker
    from verl.workers.utils.losses import ppo_loss

    if not dist.is_initialized():
        raise RuntimeError("build_actor runs inside a torch.distributed group; see cw_verl.cpu.launch.run_ranks")
    from verl.utils.device import get_device_name

    if get_device_name() != "cpu":
        raise RuntimeError(
            f"verl resolved its device to {get_device_name()!r}; call cw_verl.cpu.platform.enable_cpu_platform() first"
        )
    if dist.get_world_size() % setup.model_parallel_size:
        raise ValueError(
            f"{dist.get_world_size()} ranks do not split into model replicas of "
            f"TP x PP x CP = {setup.model_parallel_size} ranks"
        )
    if setup.strategy == "megatron":
        from cw_verl.cpu import megatron

        megatron.install()
        _set_megatron_layout(setup)
    model_config = HFModelConfig(
        path=setup.model_path,
        # verl defaults to flash_attention_2, which does not exist on CPU (Megatron builds its own attention).
        override_config={"attn_implementation": "sdpa"} if setup.strategy == "fsdp2" else {},
        # Recomputing activations only costs time at this size.
        enable_gradient_checkpointing=False,
        use_remove_padding=setup.use_remove_padding,
    )
    actor_config = _megatron_actor_config(setup) if setup.strategy == "megatron" else _fsdp_actor_config(setup)
    actor_config.model_config = model_config
    worker_config = TrainingWorkerConfig(
        model_type="language_model",
        model_config=model_config,
        engine_config=actor_config.engine,
        optimizer_config=actor_config.optim,
        checkpoint_config=actor_config.checkpoint,
    )
    # The same engine-config assignments as ActorRolloutRefWorker.init_model (log-prob passes reuse
    # the training micro-batching, as verl's configs usually do).
    engine_config = worker_config.engine_config
    engine_config.use_dynamic_bsz = setup.use_dynamic_bsz
    engine_config.infer_max_token_len_per_gpu = setup.ppo_max_token_len_per_gpu
    engine_config.infer_micro_batch_size_per_gpu = setup.ppo_micro_batch_size_per_gpu
    engine_config.max_token_len_per_gpu = setup.ppo_max_token_len_per_gpu
    engine_config.micro_batch_size_per_gpu = setup.ppo_micro_batch_size_per_gpu
    engine_config.use_remove_padding = setup.use_remove_padding

    worker = TrainingWorker(config=worker_config)
    worker.reset()
    worker.set_loss_fn(partial(ppo_loss, config=actor_config))
    return Actor(worker=worker, config=actor_config, setup=setup)


def _set_megatron_layout(setup: ActorSetup) -> None:
    """verl's Megatron engine initialises megatron's process groups on its first construction in a process
    and reuses them afterwards; for another layout they are torn down first, so that the engine builds the
    new ones. Actors built on the old layout are unusable after that (their groups are gone)."""
    from megatron.core import parallel_state as mpu

    if not mpu.is_initialized():
        return
    current = (
        mpu.get_tensor_model_parallel_world_size(),
        mpu.get_pipeline_model_parallel_world_size(),
        mpu.get_context_parallel_world_size(),
    )
    wanted = (setup.tensor_model_parallel_size, setup.pipeline_model_parallel_size, setup.context_parallel_size)
    if current != wanted:
        mpu.destroy_model_parallel()


def set_loss_mode(actor: Actor, loss_mode: str) -> None:
    """Switch the registered policy loss that verl's ``ppo_loss`` calls (e.g. ``vanilla`` -> ``cw_grpo``)."""
    from verl.workers.utils.losses import ppo_loss

    if actor.config.policy_loss.loss_mode == loss_mode:
        return
    config = dataclasses.replace(
        actor.config, policy_loss=dataclasses.replace(actor.config.policy_loss, loss_mode=loss_mode)
    )
    config.model_config = actor.config.model_config
    actor.config = config
    actor.worker.set_loss_fn(partial(ppo_loss, config=config))


def dp_chunk(batch, rank: int | None = None, world_size: int | None = None):
    """This rank's contiguous chunk of a full-batch ``DataProto``, as verl's dispatch sends it (default:
    every rank is a data-parallel rank, as with FSDP; see :func:`actor_chunk` for any engine)."""
    rank = dist.get_rank() if rank is None else rank
    world_size = dist.get_world_size() if world_size is None else world_size
    if len(batch) % world_size:
        raise ValueError(f"batch of {len(batch)} sequences does not split over {world_size} data-parallel ranks")
    return batch.chunk(world_size)[rank]


def actor_chunk(actor: Actor, batch):
    """The chunk verl's dispatch sends this rank of ``actor``: its data-parallel rank's chunk (tensor-,
    pipeline- and context-parallel peers of a Megatron model replica all get the same chunk)."""
    return dp_chunk(batch, actor.engine.get_data_parallel_rank(), actor.engine.get_data_parallel_size())


def all_gather_rows(local: torch.Tensor, group=None) -> torch.Tensor:
    """Every rank's rows of ``group`` (default WORLD), concatenated in rank order (what verl's collect does
    after a DP dispatch)."""
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local.contiguous(), group=group)
    return torch.cat(parts, dim=0)


def actor_gather_rows(actor: Actor, local: torch.Tensor) -> torch.Tensor:
    """The full batch's rows from each data-parallel rank's :func:`actor_chunk` rows."""
    return all_gather_rows(local, group=actor.engine.get_data_parallel_group())


def from_output_rank(actor: Actor, value):
    """``value`` of this rank's model replica, on every rank of the replica.

    verl's Megatron engine returns outputs only on one rank per replica (the last pipeline stage's
    tensor- and context-parallel rank 0; ``is_mp_src_rank_with_outputs``), whose results verl's collect
    forwards to the trainer; the other ranks return None. FSDP returns them on every rank.
    """
    if not actor.is_megatron:
        return value
    engine = actor.engine
    gathered: list = [None] * dist.get_world_size()
    mine = value if engine.is_mp_src_rank_with_outputs() else None
    dist.all_gather_object(gathered, (engine.get_data_parallel_rank(), mine))
    for dp_rank, candidate in gathered:
        if dp_rank == engine.get_data_parallel_rank() and candidate is not None:
            return candidate
    raise RuntimeError("no rank of this model replica returned an output")


def _to_no_padding(batch, **meta):
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import left_right_2_no_padding

    batch_td = left_right_2_no_padding(batch.to_tensordict())
    tu.assign_non_tensor(batch_td, **meta)
    return batch_td


def _batch_override_keys(
    micro_batch_size: int | None, use_dynamic_bsz: bool | None, max_token_len: int | None
) -> dict[str, Any]:
    # TrainingWorker.train_batch/infer_batch only inject their config defaults for absent keys, so
    # these per-call values take precedence over the engine config.
    overrides: dict[str, Any] = {}
    if micro_batch_size is not None:
        overrides["micro_batch_size_per_gpu"] = micro_batch_size
    if use_dynamic_bsz is not None:
        overrides["use_dynamic_bsz"] = use_dynamic_bsz
    if max_token_len is not None:
        overrides["max_token_len_per_gpu"] = max_token_len
    return overrides


def compute_log_prob(
    actor: Actor,
    local_batch,
    *,
    micro_batch_size: int | None = None,
    use_dynamic_bsz: bool | None = None,
    max_token_len: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(old_log_probs, entropy)`` of this rank's chunk (:func:`actor_chunk`), each ``[B_local, response_len]``
    (trainer's ``_compute_old_log_prob``: ``infer_batch`` with ``calculate_entropy=True, compute_loss=False``)."""
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import no_padding_2_padding

    batch_td = _to_no_padding(
        local_batch,
        calculate_entropy=True,
        compute_loss=False,
        temperature=actor.setup.temperature,
        **_batch_override_keys(micro_batch_size, use_dynamic_bsz, max_token_len),
    )
    output = actor.worker.infer_batch(batch_td)
    result = None
    if output is not None:
        log_probs = no_padding_2_padding(tu.get(output, "log_probs"), batch_td).float()
        entropy = no_padding_2_padding(tu.get(output, "entropy"), batch_td).float()
        result = log_probs, entropy
    return from_output_rank(actor, result)


def train_step(
    actor: Actor,
    local_batch,
    *,
    loss_mode: str | None = None,
    micro_batch_size: int | None = None,
    use_dynamic_bsz: bool | None = None,
    max_token_len: int | None = None,
    mini_batch_size: int | None = None,
    shuffle: bool = False,
    extra_meta: dict[str, Any] | None = None,
) -> dict[str, float]:
    """One actor update on this rank's chunk (:func:`actor_chunk`; trainer's ``_update_actor``); returns
    verl's reduced ``actor/*`` metrics, identical on every rank.

    ``mini_batch_size`` counts sequences over all ranks (default: ``ppo_mini_batch_size * rollout_n``);
    the other keyword arguments override the actor's setup for this call only. ``extra_meta``: more
    non-tensor entries for the batch, as a trainer adds them (e.g. ``force_group_size``).
    """
    from verl.utils import tensordict_utils as tu
    from verl.utils.metric import reduce_metrics
    from verl.utils.py_functional import rename_dict

    if loss_mode is not None:
        set_loss_mode(actor, loss_mode)
    setup = actor.setup
    sequences_per_update = mini_batch_size or setup.ppo_mini_batch_size * setup.rollout_n
    batch_td = _to_no_padding(
        local_batch,
        calculate_entropy=setup.entropy_coeff != 0.0,
        distillation_use_topk=False,
        distillation_only=False,
        global_batch_size=sequences_per_update,
        mini_batch_size=sequences_per_update,
        epochs=setup.ppo_epochs,
        seed=setup.data_loader_seed,
        dataloader_kwargs={"shuffle": shuffle},
        compute_loss=True,
        temperature=setup.temperature,
        **_batch_override_keys(micro_batch_size, use_dynamic_bsz, max_token_len),
        **(extra_meta or {}),
    )
    output = actor.worker.train_mini_batch(batch_td)
    reduced = None
    if output is not None:
        metrics = rename_dict(tu.get(output, "metrics"), "actor/")
        if "actor/mfu" in metrics:
            metrics["perf/mfu/actor"] = metrics.pop("actor/mfu")
        reduced = {key: float(np.asarray(value)) for key, value in reduce_metrics(metrics).items()}
    return from_output_rank(actor, reduced)


def full_state_dict(actor: Actor) -> dict[str, torch.Tensor]:
    """The unsharded weights under their Hugging Face names, on every rank (the trainer's weight sync to
    rollout: ``engine.get_per_tensor_param()`` all-gathers each FSDP2 shard, or mbridge gathers the
    tensor-parallel shards and broadcasts each pipeline stage's weights)."""
    # No autograd graph: mbridge broadcasts parameters in place, which autograd would otherwise record.
    with torch.no_grad():
        per_tensor, peft_config = actor.engine.get_per_tensor_param()
        if peft_config is not None:
            raise NotImplementedError("LoRA actors are not supported by this harness")
        return {name: tensor.detach().to("cpu", copy=True) for name, tensor in per_tensor}


def local_shards(actor: Actor) -> dict[str, torch.Tensor]:
    """This rank's own parameters (copies: FSDP2 shards, or a Megatron rank's tensor-parallel shards of its
    pipeline stage), for checking what the optimizer changed."""
    from torch.distributed.tensor import DTensor

    modules = actor.engine.module if actor.is_megatron else [actor.engine.module]
    return {
        f"{index}.{name}": (p.to_local() if isinstance(p, DTensor) else p).detach().clone()
        for index, module in enumerate(modules)
        for name, p in module.named_parameters()
    }


@contextlib.contextmanager
def recorded_gradient(actor: Actor) -> Iterator[dict[str, torch.Tensor]]:
    """The full gradient the optimizer step of ``actor`` receives (before clipping), under Hugging Face
    parameter names, float64, identical on every rank; yields a dict filled at the optimizer step."""
    engine = actor.engine
    original = engine.optimizer_step
    record: dict[str, torch.Tensor] = {}

    def step():
        record.update(_megatron_gradient(engine) if actor.is_megatron else _fsdp_gradient(engine))
        return original()

    engine.optimizer_step = step
    try:
        yield record
    finally:
        engine.optimizer_step = original


def _fsdp_gradient(engine) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return {
        name: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).detach().double()
        for name, p in engine.module.named_parameters()
    }


def _megatron_gradient(engine) -> dict[str, torch.Tensor]:
    """Megatron's reduced gradients (``param.main_grad``, in DDP's grad buffers) as full HF-named tensors.

    With the distributed optimizer, each rank of the data(-and-context)-parallel group holds only its own
    reduce-scattered shard of each bucket: all-gathering the shards completes the buffers (the optimizer
    reads only its own shard, so this changes nothing it sees). mbridge's weight export then gathers the
    tensor-parallel shards, broadcasts each pipeline stage's tensors and maps the names, on the gradients
    swapped in for the parameters' data for the duration of the export.
    """
    from megatron.core.distributed.param_and_grad_buffer import shard_buffer

    chunks = engine.module
    for chunk in chunks:
        if not chunk.ddp_config.use_distributed_optimizer:
            continue
        for bucket_group in chunk.bucket_groups + chunk.expert_parallel_bucket_groups:
            group = bucket_group.intra_distributed_optimizer_instance_group
            for bucket in bucket_group.buckets:
                own = shard_buffer(bucket.grad_data, group.size())[group.rank()].clone()
                dist.all_gather_into_tensor(bucket.grad_data, own, group=group)
    params = [p for chunk in chunks for p in chunk.parameters()]
    saved = [p.data for p in params]
    try:
        for p in params:
            p.data = p.main_grad
        with torch.no_grad():
            per_tensor, _ = engine.get_per_tensor_param()
            return {name: tensor.detach().double() for name, tensor in per_tensor}
    finally:
        for p, data in zip(params, saved, strict=True):
            p.data = data


@contextlib.contextmanager
def count_policy_loss_calls(loss_mode: str) -> Iterator[list[int]]:
    """Count this process's calls of the registered policy loss ``loss_mode``.

    verl's ``ppo_loss`` looks the function up in ``POLICY_LOSS_REGISTRY`` on every micro-batch, so
    wrapping the registry entry sees every call the engine makes. Yields a one-element list holding
    the running count.
    """
    from verl.trainer.ppo import core_algos

    if loss_mode not in core_algos.POLICY_LOSS_REGISTRY:
        raise KeyError(f"policy loss {loss_mode!r} is not registered; have {sorted(core_algos.POLICY_LOSS_REGISTRY)}")
    original = core_algos.POLICY_LOSS_REGISTRY[loss_mode]
    counter = [0]

    def counting(*args, **kwargs):
        counter[0] += 1
        return original(*args, **kwargs)

    core_algos.POLICY_LOSS_REGISTRY[loss_mode] = counting
    try:
        yield counter
    finally:
        core_algos.POLICY_LOSS_REGISTRY[loss_mode] = original
