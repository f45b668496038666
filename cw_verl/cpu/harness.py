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
    ``ppo_mini_batch_size * rollout_n`` sequences over all data-parallel ranks.
    """

    model_path: str
    rollout_n: int
    ppo_mini_batch_size: int
    loss_mode: str = "vanilla"
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
    ppo_epochs: int = 1
    total_training_steps: int = 1000
    # fp32 on CPU: bf16 autocast there is slow and would make the engine's log-probs differ from the
    # fp32 rollout model's; clusters keep verl's bf16 default.
    param_dtype: str = "fp32"
    use_remove_padding: bool = True
    data_loader_seed: int = 42
    temperature: float = 1.0


@dataclasses.dataclass
class Actor:
    """A built actor: verl's ``TrainingWorker`` plus the ``ActorConfig`` its ``ppo_loss`` reads."""

    worker: Any
    config: Any
    setup: ActorSetup

    @property
    def engine(self):
        return self.worker.engine


def _actor_config(setup: ActorSetup):
    from verl.workers.config import FSDPActorConfig, FSDPEngineConfig, FSDPOptimizerConfig, PolicyLossConfig

    precision = {"param_dtype": setup.param_dtype, "reduce_dtype": "fp32", "buffer_dtype": "fp32"}
    return FSDPActorConfig(
        strategy="fsdp2",
        rollout_n=setup.rollout_n,
        ppo_mini_batch_size=setup.ppo_mini_batch_size,
        ppo_micro_batch_size_per_gpu=setup.ppo_micro_batch_size_per_gpu,
        use_dynamic_bsz=setup.use_dynamic_bsz,
        ppo_max_token_len_per_gpu=setup.ppo_max_token_len_per_gpu,
        clip_ratio=setup.clip_ratio,
        clip_ratio_low=setup.clip_ratio,
        clip_ratio_high=setup.clip_ratio,
        policy_loss=PolicyLossConfig(loss_mode=setup.loss_mode),
        loss_agg_mode=setup.loss_agg_mode,
        entropy_coeff=setup.entropy_coeff,
        ppo_epochs=setup.ppo_epochs,
        data_loader_seed=setup.data_loader_seed,
        use_torch_compile=False,
        use_remove_padding=setup.use_remove_padding,
        optim=FSDPOptimizerConfig(
            lr=setup.lr,
            lr_warmup_steps_ratio=setup.lr_warmup_steps_ratio,
            weight_decay=setup.weight_decay,
            clip_grad=setup.clip_grad,
            total_training_steps=setup.total_training_steps,
        ),
        fsdp_config=FSDPEngineConfig(
            strategy="fsdp2",
            use_torch_compile=False,
            mixed_precision=precision,
            use_dynamic_bsz=setup.use_dynamic_bsz,
        ),
    )


def build_actor(setup: ActorSetup) -> Actor:
    """Build verl's actor ``TrainingWorker`` as ``ActorRolloutRefWorker.init_model`` does (FSDP2, sdpa)."""
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
    model_config = HFModelConfig(
        path=setup.model_path,
        # verl defaults to flash_attention_2, which does not exist on CPU.
        override_config={"attn_implementation": "sdpa"},
        # Recomputing activations only costs time at this size.
        enable_gradient_checkpointing=False,
        use_remove_padding=setup.use_remove_padding,
    )
    actor_config = _actor_config(setup)
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
    """This rank's contiguous chunk of a full-batch ``DataProto``, as verl's dispatch sends it."""
    rank = dist.get_rank() if rank is None else rank
    world_size = dist.get_world_size() if world_size is None else world_size
    if len(batch) % world_size:
        raise ValueError(f"batch of {len(batch)} sequences does not split over {world_size} data-parallel ranks")
    return batch.chunk(world_size)[rank]


def all_gather_rows(local: torch.Tensor) -> torch.Tensor:
    """Every rank's rows, concatenated in rank order (what verl's collect does after a DP dispatch)."""
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local.contiguous())
    return torch.cat(parts, dim=0)


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
    """``(old_log_probs, entropy)`` of this rank's chunk, each ``[B_local, response_len]`` (trainer's
    ``_compute_old_log_prob``: ``infer_batch`` with ``calculate_entropy=True, compute_loss=False``)."""
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
    log_probs = no_padding_2_padding(tu.get(output, "log_probs"), batch_td).float()
    entropy = no_padding_2_padding(tu.get(output, "entropy"), batch_td).float()
    return log_probs, entropy


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
    """One actor update on this rank's chunk (trainer's ``_update_actor``); returns verl's reduced
    ``actor/*`` metrics, identical on every rank.

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
    metrics = rename_dict(tu.get(output, "metrics"), "actor/")
    if "actor/mfu" in metrics:
        metrics["perf/mfu/actor"] = metrics.pop("actor/mfu")
    return {key: float(np.asarray(value)) for key, value in reduce_metrics(metrics).items()}


def full_state_dict(actor: Actor) -> dict[str, torch.Tensor]:
    """The unsharded weights under their Hugging Face names (the trainer's weight sync to rollout:
    ``engine.get_per_tensor_param()`` all-gathers each FSDP2 shard)."""
    per_tensor, peft_config = actor.engine.get_per_tensor_param()
    if peft_config is not None:
        raise NotImplementedError("LoRA actors are not supported by this harness")
    return {name: tensor.detach().to("cpu", copy=True) for name, tensor in per_tensor}


def local_shards(actor: Actor) -> dict[str, torch.Tensor]:
    """This rank's own FSDP2 parameter shards (copies), for checking what the optimizer changed."""
    from torch.distributed.tensor import DTensor

    return {
        name: (p.to_local() if isinstance(p, DTensor) else p).detach().clone()
        for name, p in actor.engine.module.named_parameters()
    }


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
