"""Every prompt group whole inside one loss call, with verl 0.9.1's batching.

``cw_grpo_authors`` computes each group's statistics on the current log-probs with their gradient, so a
group's responses must all be in the same loss call. On their way from the rollout to the loss, verl
0.9.1 (default v1 trainer, ``trainer.use_v1=True``) moves sequences four times:

1. ``PPOTrainer._balance_batch`` (``trainer/ppo/v1/trainer_base.py``) runs on every step whatever
   ``trainer.balance_batch`` says: it pads the batch with dummy sequences to a multiple of
   ``lcm(dp, ppo_mini_batch_size * n)`` and reorders it *sequence by sequence* (Karmarkar-Karp on
   lengths) into one partition per data-parallel rank, so a group's responses land on several ranks,
   in the order the rollouts finished.
2. The dispatch hands each DP rank a contiguous chunk.
3. ``TrainingWorker.train_mini_batch`` slices the chunk into contiguous mini-batches of
   ``ppo_mini_batch_size * n / dp`` rows, or draws them at random with ``actor.shuffle=True``.
4. The engine's ``prepare_micro_batches`` cuts contiguous micro-batches of
   ``ppo_micro_batch_size_per_gpu`` rows, or, with ``use_dynamic_bsz``, re-partitions by tokens
   sequence by sequence -- unless the batch carries ``force_group_size``, which makes verl keep runs
   of that many consecutive rows together (its reward-model path uses it).

So for the loss modes in :data:`WHOLE_GROUP_LOSS_MODES`, ``cw_verl/patches/whole_groups.py`` makes
step 1 partition *whole groups* (balanced by their summed workload, the same number of groups per rank,
each group's rows contiguous) and sets ``force_group_size = rollout.n`` for dynamic micro-batching;
:func:`check_whole_groups` refuses at config validation every setting that would still split a group.
The loss itself checks every call (:mod:`cw_verl.authors_loss`) and raises on all ranks if a group is
not whole (e.g. multi-trajectory agent outputs).
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from cw_verl.authors_loss import AUTHORS_LOSS_MODE
from cw_verl.verl_config import LOSS_MODE_KEY, ConfigConflictError, verl_default_loss_mode

WHOLE_GROUP_LOSS_MODES = frozenset({AUTHORS_LOSS_MODE})
ACTOR = "actor_rollout_ref.actor"


def needs_whole_groups(config) -> bool:
    """The actor's loss mode needs every prompt group inside one loss call."""
    return OmegaConf.select(config, LOSS_MODE_KEY, default=verl_default_loss_mode()) in WHOLE_GROUP_LOSS_MODES


def data_parallel_size(config) -> int | None:
    """The actor's data-parallel size from the config (``None`` for strategies cw_verl does not model)."""
    n_gpus = OmegaConf.select(config, "trainer.n_gpus_per_node") * OmegaConf.select(config, "trainer.nnodes")
    strategy = OmegaConf.select(config, f"{ACTOR}.strategy")
    if strategy == "megatron":
        sizes = [
            OmegaConf.select(config, f"{ACTOR}.megatron.{key}", default=1) or 1
            for key in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size")
        ]
        model_parallel = sizes[0] * sizes[1] * sizes[2]
    elif strategy in ("fsdp", "fsdp2"):
        model_parallel = OmegaConf.select(config, f"{ACTOR}.ulysses_sequence_parallel_size", default=1) or 1
    else:
        return None
    return n_gpus // model_parallel if n_gpus % model_parallel == 0 else None


def check_whole_groups(config: DictConfig, legacy_loop: bool = False) -> None:
    """Refuse every batching that would split a prompt group over loss calls (whole-group loss modes only).

    Args:
        config: verl's trainer config.
        legacy_loop: verl's legacy trainer loop runs it (``Launch.legacy_loop``: also the experimental one-step-off
            and fully async trainers), whose batch balancing is not group-aware; ``trainer.use_v1=False`` says the
            same for ``main_ppo``.

    Raises:
        ConfigConflictError: naming the setting to change.
    """
    if not needs_whole_groups(config):
        return
    loss_mode = OmegaConf.select(config, LOSS_MODE_KEY)
    n = OmegaConf.select(config, "actor_rollout_ref.rollout.n")
    problems = []
    if legacy_loop or not OmegaConf.select(config, "trainer.use_v1", default=True):
        problems.append(
            "verl's legacy trainer loop (trainer.use_v1=False, or the experimental one_step_off_policy / "
            "fully_async_policy trainers) balances batches sequence by sequence, not by group; run verl's v1 trainer "
            "(verl.trainer.main_ppo with trainer.use_v1=True, any trainer.v1.trainer_mode)"
        )
    if OmegaConf.select(config, f"{ACTOR}.shuffle", default=False):
        problems.append(f"{ACTOR}.shuffle=True draws mini-batch rows at random; set {ACTOR}.shuffle=False")
    if OmegaConf.select(config, f"{ACTOR}.use_dynamic_bsz", default=False):
        budget = OmegaConf.select(config, f"{ACTOR}.ppo_max_token_len_per_gpu")
        longest = OmegaConf.select(config, "data.max_prompt_length") + OmegaConf.select(
            config, "data.max_response_length"
        )
        if budget is not None and budget < n * longest:
            problems.append(
                f"{ACTOR}.ppo_max_token_len_per_gpu={budget} cannot hold a whole group of rollout.n={n} sequences of "
                f"up to {longest} tokens; set it to at least {n * longest} (or use fixed micro-batches of "
                f"{n} sequences: {ACTOR}.use_dynamic_bsz=False {ACTOR}.ppo_micro_batch_size_per_gpu={n})"
            )
    else:
        micro = OmegaConf.select(config, f"{ACTOR}.ppo_micro_batch_size_per_gpu")
        if micro is None or micro % n:
            problems.append(
                f"{ACTOR}.ppo_micro_batch_size_per_gpu={micro} is not a multiple of rollout.n={n}; set it to {n} "
                "(one group per loss call, as the released trl code ran) or a multiple of it"
            )
    dp = data_parallel_size(config)
    if dp is not None:
        for key in ("data.train_batch_size", f"{ACTOR}.ppo_mini_batch_size"):
            prompts = OmegaConf.select(config, key)
            if prompts is not None and prompts % dp:
                problems.append(
                    f"{key}={prompts} prompts do not split into whole groups over {dp} data-parallel ranks; "
                    f"make it a multiple of {dp}"
                )
    if problems:
        raise ConfigConflictError(
            f"{LOSS_MODE_KEY}={loss_mode} computes each prompt group's statistics inside one loss call, which "
            "needs every group whole in one micro-batch:\n  - " + "\n  - ".join(problems)
        )


def group_partitions(uids: list, workloads: list[int], dp_size: int, rollout_n: int) -> list[list[int]]:
    """Row indices per data-parallel rank: whole groups, each group's rows contiguous and in their order.

    Groups are balanced over ranks by their summed workload with verl's own Karmarkar-Karp partitioner,
    the same number of groups per rank.

    Raises:
        ValueError: a group does not have ``rollout_n`` rows, or the groups do not split evenly.
    """
    from verl.utils.seqlen_balancing import get_seqlen_balanced_partitions

    rows_of: dict = {}
    for row, uid in enumerate(uids):
        rows_of.setdefault(uid, []).append(row)
    sizes = sorted({len(rows) for rows in rows_of.values()})
    if sizes != [rollout_n]:
        raise ValueError(
            f"{AUTHORS_LOSS_MODE}: the batch's prompt groups have {sizes} responses, not rollout.n={rollout_n} each "
            "(multi-trajectory outputs, filtered groups, or padding sequences); whole-group batching needs every "
            "group complete"
        )
    groups = list(rows_of.values())
    if len(groups) % dp_size:
        raise ValueError(
            f"{AUTHORS_LOSS_MODE}: {len(groups)} prompt groups do not split evenly over {dp_size} data-parallel ranks; "
            "make data.train_batch_size a multiple of the data-parallel size"
        )
    group_workloads = [sum(workloads[row] for row in rows) for rows in groups]
    partitions = get_seqlen_balanced_partitions(group_workloads, k_partitions=dp_size, equal_size=True)
    return [[row for group in partition for row in groups[group]] for partition in partitions]
