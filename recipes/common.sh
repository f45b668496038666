#!/usr/bin/env bash
# Shared launcher for the paper's Table 2 runs on verl 0.9.1 (Megatron actor/ref, vLLM rollouts).
# Sourced by the per-model wrappers (run_cwgrpo_*.sh), which set MODEL_TAG and the model defaults.
# Every setting below is an environment variable with the paper's value as default; the mapping from
# the paper's trl settings to verl's is explained in recipes/README.md.
#
#   ARM=grpo|clip_cov|cw_grpo  selects the Table 2 row; nothing else differs between arms.
#   ARM=clip_cov_minibatch|kl_cov_minibatch  verl's Clip-Cov / KL-Cov with the tokens selected once per optimizer
#                              mini-batch over all ranks (cw_verl/cov_losses.py); verl's knob defaults.
#   GRPO_LOSS_MODE=vanilla_cw_metrics  the grpo arm also logs the covariance percentiles (Table 1), same loss.
#   ARM=cw_grpo_authors        the authors' released objective and reward rules (recipes/README.md).
#   ARM=ep_grpo                not a Table 2 row: EP-GRPO (README "EP-GRPO"), GRPO's loss on its token advantages.
#   MEMORY_PROFILE=80gb|141gb  parallelism and vLLM share for the GPUs' memory (set by the wrapper).
#   BRIDGE=mbridge|megatron-bridge  the Megatron bridge verl's engine imports (megatron.vanilla_mbridge); mbridge,
#                              the default, is what `pip install -e ".[gpu]"` installs (recipes/README.md).
#   DRY_RUN=1                  prints the command and checks it against verl's config; needs no GPU.
#   CHECK_IMPORTS=0            the launch check skips importing the workers' packages (vLLM, the bridge,
#                              TransformerEngine): for a dry run on a machine that is not the cluster's.
#   Extra arguments are appended as Hydra overrides (they are checked too).
#
# Profile hooks (set by a wrapper before sourcing; run_cwgrpo_tiny_cpu.sh uses them, the paper wrappers not):
#   ACTOR_STRATEGY=megatron|fsdp2  the actor/ref engine (default megatron, verl's ppo_megatron_trainer config).
#   VAL_FILES=(...)                evaluation parquet files instead of the paper's five sets in DATA_DIR.
#   REWARD_OVERRIDES=(...)         the reward function overrides instead of the paper's (cw_verl.paper.reward).
#   PROFILE_OVERRIDES=(...)        Hydra overrides applied after the recipe's own (a later value wins).
#   SUPERVISE=1                    run main_ppo under cw_verl.cpu.supervise (bounded waits, no process left).
#   WORKER_ENV="NAME ..."          variables of this shell every Ray worker gets (through Ray's runtime_env).
#   ENTRY_MODULE=... CONFIG_PREFIX=...  another verl entry point and the prefix of its config names (default
#                              verl.trainer.main_ppo, none): e.g. verl.experimental.one_step_off_policy.main_ppo with
#                              one_step_off_ (its one_step_off_ppo_trainer / one_step_off_ppo_megatron_trainer).

set -euo pipefail

die() {
    echo "ERROR: $*" >&2
    exit 1
}

# Ray workers do not run in the launch directory: every path handed to verl must be absolute.
abspath() {
    if [[ "$1" == /* ]]; then echo "$1"; else echo "$PWD/$1"; fi
}

: "${MODEL_TAG:?set by the wrapper script}"
: "${MODEL_PATH:?set by the wrapper script or the environment}"
: "${MAX_RESPONSE_LENGTH:?set by the wrapper script}"
: "${ACTOR_TP:?set by the wrapper script}"
: "${PROMPT_OPENS_THINK:?set by the wrapper script}"
: "${TOTAL_STEPS:?set by the wrapper script}"
: "${AUTHORS_FORMAT_REWARD:?set by the wrapper script}"
: "${MEMORY_PROFILE:?set by the wrapper script}"
: "${ROLLOUT_GPU_MEMORY:?set by the wrapper script}"

PYTHON=${PYTHON:-python3}
ARM=${ARM:-cw_grpo}
DRY_RUN=${DRY_RUN:-0}

case "$ARM" in
    # GRPO_LOSS_MODE=vanilla_cw_metrics: the same loss, bitwise, also logging the actor/cw/* covariance metrics.
    grpo) ADV_ESTIMATOR=grpo LOSS_MODE=${GRPO_LOSS_MODE:-vanilla} ;;
    clip_cov) ADV_ESTIMATOR=grpo LOSS_MODE=clip_cov ;;
    # The same objectives, their tokens selected over the whole mini-batch (not per micro-batch, verl #7829).
    clip_cov_minibatch | kl_cov_minibatch) ADV_ESTIMATOR=grpo LOSS_MODE=$ARM ;;
    # The paper's statistics scope: each prompt's G responses (Sec. 2.3; trl's loss call saw exactly one
    # group). Whole groups are guaranteed here by the one mini-batch per step. CW_LOSS_MODE=cw_grpo takes
    # cw_verl's default mini-batch scope instead (README: statistics scopes).
    cw_grpo) ADV_ESTIMATOR=cw_grpo LOSS_MODE=${CW_LOSS_MODE:-cw_grpo_group} ;;
    # What produced the paper's Table 2: the authors' released trl objective (weights on the current
    # log-probs, with gradient, per group) and their reward rules.
    cw_grpo_authors) ADV_ESTIMATOR=cw_grpo LOSS_MODE=cw_grpo_authors REWARD=${REWARD:-authors} ;;
    # EP-GRPO (issue 12): verl's vanilla loss on entropy-gated, progress-anchored token advantages. Its progress
    # signal needs the reference policy, which the KL loss below starts (KL_COEF=0 keeps it without a penalty).
    ep_grpo) ADV_ESTIMATOR=ep_grpo LOSS_MODE=vanilla ;;
    *) die "ARM must be grpo, clip_cov, clip_cov_minibatch, kl_cov_minibatch, cw_grpo, cw_grpo_authors or ep_grpo (got '$ARM')" ;;
esac
# paper: App. C as written (cw_verl/paper/reward.py); authors: their released rules (cw_verl/paper/authors_reward.py).
REWARD=${REWARD:-paper}
[[ "$REWARD" == paper || "$REWARD" == authors ]] || die "REWARD must be paper or authors (got '$REWARD')"

# --- data (python -m cw_verl.paper.data --out "$DATA_DIR") --------------------------------------------
DATA_DIR=${DATA_DIR:-$HOME/data/cw_grpo}
TRAIN_FILE=${TRAIN_FILE:-$DATA_DIR/open_rs.parquet}
EVAL_SETS=(aime24 math500 amc23 minerva olympiadbench)

ACTOR_STRATEGY=${ACTOR_STRATEGY:-megatron}
BRIDGE=${BRIDGE:-mbridge}
case "$BRIDGE" in
    mbridge) VANILLA_MBRIDGE=True ;;
    # verl's default; it has no release that installs beside verl 0.9.1's vLLM (use verl's container image).
    megatron-bridge) VANILLA_MBRIDGE=False ;;
    *) die "BRIDGE must be mbridge or megatron-bridge (got '$BRIDGE')" ;;
esac
case "$ACTOR_STRATEGY" in
    megatron) CONFIG_NAME=ppo_megatron_trainer ;;
    fsdp2) CONFIG_NAME=ppo_trainer ;;
    *) die "ACTOR_STRATEGY must be megatron or fsdp2 (got '$ACTOR_STRATEGY')" ;;
esac
ENTRY_MODULE=${ENTRY_MODULE:-verl.trainer.main_ppo}
CONFIG_NAME=${CONFIG_PREFIX:-}$CONFIG_NAME

# --- cluster: the paper used one node with 4 GPUs ------------------------------------------------------
NNODES=${NNODES:-1}
GPUS_PER_NODE=${GPUS_PER_NODE:-4}
ACTOR_PP=${ACTOR_PP:-1}
ACTOR_CP=${ACTOR_CP:-1}
ROLLOUT_TP=${ROLLOUT_TP:-1}
OFFLOAD=${OFFLOAD:-0}
# The launch check compares its per-GPU memory estimate with this (cw_verl/paper/memory.py).
GPU_MEMORY_GB=${GPU_MEMORY_GB:-${MEMORY_PROFILE%gb}}

# --- the paper's Table 5, in verl's units (recipes/README.md) -----------------------------------------
TRAIN_BATCH_SIZE=${TRAIN_BATCH_SIZE:-12} # prompts per optimizer step
N_GENERATIONS=${N_GENERATIONS:-12}
# TOTAL_STEPS (wrapper: the authors' 300 / 150) is also the length of the learning-rate schedule: verl sets
# the optimizer's total_training_steps from it. Table 2 is the global_step_100 checkpoint of such a run.
LR=${LR:-1e-6}
MIN_LR=${MIN_LR:-1e-7}
WARMUP_RATIO=${WARMUP_RATIO:-0.1}
TEMPERATURE=${TEMPERATURE:-0.7}
MAX_PROMPT_LENGTH=${MAX_PROMPT_LENGTH:-512}
KL_COEF=${KL_COEF:-0.04}
LOSS_AGG_MODE=${LOSS_AGG_MODE:-seq-mean-token-mean}
SEED=${SEED:-42}
# Micro-batching only splits the work of one optimizer step (gradients accumulate): by default by tokens
# per GPU (dynamic batching); MICRO_BATCH_PER_GPU=N uses N sequences instead. Memory-bound settings, but
# Clip-Cov's statistics are per micro-batch in verl (recipes/README.md).
ACTOR_MAX_TOKENS_PER_GPU=${ACTOR_MAX_TOKENS_PER_GPU:-$((3 * (MAX_PROMPT_LENGTH + MAX_RESPONSE_LENGTH)))}
if [[ "$LOSS_MODE" == cw_grpo_authors ]]; then
    # Its weights take gradient through each group's statistics, so a loss call holds whole groups
    # (cw_verl/whole_groups.py): one group per call, as the released trl code ran. Up to 12 x (prompt +
    # response) tokens per call need full activation recompute (trl: gradient_checkpointing).
    MICRO_BATCH_PER_GPU=${MICRO_BATCH_PER_GPU:-$N_GENERATIONS}
    RECOMPUTE=${RECOMPUTE:-full}
fi
MICRO_BATCH_PER_GPU=${MICRO_BATCH_PER_GPU:-}
RECOMPUTE=${RECOMPUTE:-selective} # selective: verl's default (attention only); full: every layer

# --- outputs -------------------------------------------------------------------------------------------
RUN_ROOT=${RUN_ROOT:-$PWD/runs}
PROJECT=${PROJECT:-cw_grpo_table2}
EXPERIMENT=${EXPERIMENT:-${MODEL_TAG}_${ARM}}
RUN_DIR=$RUN_ROOT/$PROJECT/$EXPERIMENT
SAVE_FREQ=${SAVE_FREQ:-50}
TEST_FREQ=${TEST_FREQ:--1}
# verl's file logger truncates its file when it opens it, so each launch (a resume is a new launch)
# writes its own JSONL; the metrics of a resumed run are the union of the files.
METRICS_FILE=${METRICS_FILE:-$RUN_DIR/metrics/metrics.$(date +%Y%m%d-%H%M%S).jsonl}
EXTRA_LOGGERS=${EXTRA_LOGGERS:-} # e.g. wandb or wandb,tensorboard

MODEL_PATH=$(abspath "$MODEL_PATH")
TRAIN_FILE=$(abspath "$TRAIN_FILE")
DATA_DIR=$(abspath "$DATA_DIR")
RUN_DIR=$(abspath "$RUN_DIR")
METRICS_FILE=$(abspath "$METRICS_FILE")

# --- fail fast on missing inputs -----------------------------------------------------------------------
[[ -f "$MODEL_PATH/config.json" ]] || die "MODEL_PATH=$MODEL_PATH is not a local Hugging Face model directory (no config.json); download it first, e.g. huggingface-cli download <repo> --local-dir <dir>"
[[ -f "$TRAIN_FILE" ]] || die "training data $TRAIN_FILE not found; build it with: $PYTHON -m cw_verl.paper.data --out $DATA_DIR"
if declare -p VAL_FILES &>/dev/null; then
    for file in "${VAL_FILES[@]}"; do
        [[ -f "$file" ]] || die "evaluation data $file not found"
    done
else
    VAL_FILES=()
    for name in "${EVAL_SETS[@]}"; do
        file=$DATA_DIR/$name.parquet
        [[ -f "$file" ]] || die "evaluation data $file not found; build it with: $PYTHON -m cw_verl.paper.data --out $DATA_DIR"
        VAL_FILES+=("$file")
    done
fi
val_list=$(printf "'%s'," "${VAL_FILES[@]}")
val_list=${val_list%,}

loggers=console,file
[[ -n "$EXTRA_LOGGERS" ]] && loggers+=",$EXTRA_LOGGERS"
offload=$([[ "$OFFLOAD" == 1 ]] && echo True || echo False)

if ! declare -p REWARD_OVERRIDES &>/dev/null; then
    opens_think=$([[ "$PROMPT_OPENS_THINK" == 1 ]] && echo True || echo False)
    authors_format=$([[ "$AUTHORS_FORMAT_REWARD" == 1 ]] && echo True || echo False)
    if [[ "$REWARD" == paper ]]; then
        # Paper App. C (accuracy + think-tag format), see cw_verl/paper/reward.py.
        REWARD_OVERRIDES=(
            reward.custom_reward_function.path=pkg://cw_verl.paper.reward
            reward.custom_reward_function.name=compute_score
            "+reward.custom_reward_function.reward_kwargs.prompt_opens_think=$opens_think"
        )
    else
        # The authors' rules: accuracy from the solution text (+ their "\n</think>\n" format reward on 1.5B).
        REWARD_OVERRIDES=(
            reward.custom_reward_function.path=pkg://cw_verl.paper.authors_reward
            reward.custom_reward_function.name=compute_score
            "+reward.custom_reward_function.reward_kwargs.format_reward=$authors_format"
        )
    fi
fi

if [[ "$ACTOR_STRATEGY" == megatron ]]; then
    STRATEGY_OVERRIDES=(
        "actor_rollout_ref.actor.megatron.tensor_model_parallel_size=$ACTOR_TP"
        "actor_rollout_ref.actor.megatron.pipeline_model_parallel_size=$ACTOR_PP"
        "actor_rollout_ref.actor.megatron.context_parallel_size=$ACTOR_CP"
        # The bridge between HF checkpoints and Megatron modules (BRIDGE above); the reference model follows it.
        "actor_rollout_ref.actor.megatron.vanilla_mbridge=$VANILLA_MBRIDGE"
        "actor_rollout_ref.actor.megatron.param_offload=$offload"
        "actor_rollout_ref.actor.megatron.optimizer_offload=$offload"
        # Cosine decay to MIN_LR after the warm-up (Open-RS's schedule).
        actor_rollout_ref.actor.optim.lr_decay_style=cosine
        "actor_rollout_ref.actor.optim.min_lr=$MIN_LR"
    )
else
    # verl's ppo_trainer config: the ref model follows the actor's strategy; TP/PP/CP do not apply.
    STRATEGY_OVERRIDES=(
        actor_rollout_ref.actor.strategy=fsdp2
        actor_rollout_ref.actor.fsdp_config.strategy=fsdp2
        actor_rollout_ref.ref.fsdp_config.strategy=fsdp2
        "actor_rollout_ref.actor.fsdp_config.param_offload=$offload"
        "actor_rollout_ref.actor.fsdp_config.optimizer_offload=$offload"
        # The same cosine schedule in the FSDP optimizer's terms (a floor relative to LR).
        actor_rollout_ref.actor.optim.lr_scheduler_type=cosine
        "actor_rollout_ref.actor.optim.min_lr_ratio=$(awk -v lo="$MIN_LR" -v lr="$LR" 'BEGIN { print lo / lr }')"
    )
fi

OVERRIDES=(
    # Algorithm: the only lines that differ between the three arms.
    "algorithm.adv_estimator=$ADV_ESTIMATOR"
    "actor_rollout_ref.actor.policy_loss.loss_mode=$LOSS_MODE"
    # GRPO as in trl: group-normalised outcome rewards, KL to the reference in the loss, no KL in the reward.
    algorithm.norm_adv_by_std_in_grpo=True
    algorithm.use_kl_in_reward=False
    actor_rollout_ref.actor.use_kl_loss=True
    "actor_rollout_ref.actor.kl_loss_coef=$KL_COEF"
    actor_rollout_ref.actor.kl_loss_type=low_var_kl
    "actor_rollout_ref.actor.loss_agg_mode=$LOSS_AGG_MODE"
    actor_rollout_ref.actor.entropy_coeff=0
    # On-policy: one optimizer step per rollout batch, as trl does with num_iterations=1.
    "data.train_batch_size=$TRAIN_BATCH_SIZE"
    "actor_rollout_ref.actor.ppo_mini_batch_size=$TRAIN_BATCH_SIZE"
    actor_rollout_ref.actor.ppo_epochs=1
    "actor_rollout_ref.rollout.n=$N_GENERATIONS"
    # Optimizer: trl's AdamW defaults (no weight decay, grad-norm clip 1.0) with Open-RS's schedule.
    "actor_rollout_ref.actor.optim.lr=$LR"
    "actor_rollout_ref.actor.optim.lr_warmup_steps_ratio=$WARMUP_RATIO"
    actor_rollout_ref.actor.optim.weight_decay=0.0
    actor_rollout_ref.actor.optim.clip_grad=1.0
    # Lengths: rollout.max_model_len is explicit so vLLM never silently shortens a generation.
    "data.max_prompt_length=$MAX_PROMPT_LENGTH"
    "data.max_response_length=$MAX_RESPONSE_LENGTH"
    "actor_rollout_ref.rollout.max_model_len=$((MAX_PROMPT_LENGTH + MAX_RESPONSE_LENGTH))"
    # Data.
    "data.train_files=['$TRAIN_FILE']"
    "data.val_files=[$val_list]"
    data.prompt_key=prompt
    data.shuffle=True
    "data.seed=$SEED"
    # Reward: REWARD=paper|authors, or the wrapper's REWARD_OVERRIDES (above).
    "${REWARD_OVERRIDES[@]}"
    # Model and actor/ref engine (Megatron for the paper's runs).
    "actor_rollout_ref.model.path=$MODEL_PATH"
    "${STRATEGY_OVERRIDES[@]}"
    # vLLM rollout.
    actor_rollout_ref.rollout.name=vllm
    "actor_rollout_ref.rollout.temperature=$TEMPERATURE"
    actor_rollout_ref.rollout.top_p=1.0
    actor_rollout_ref.rollout.top_k=-1
    "actor_rollout_ref.rollout.tensor_model_parallel_size=$ROLLOUT_TP"
    "actor_rollout_ref.rollout.gpu_memory_utilization=$ROLLOUT_GPU_MEMORY"
    # In-training validation (off by default; Table 2 comes from recipes/eval_pass1.sh): eval sampling.
    actor_rollout_ref.rollout.val_kwargs.do_sample=True
    actor_rollout_ref.rollout.val_kwargs.temperature=0.6
    actor_rollout_ref.rollout.val_kwargs.top_p=0.95
    actor_rollout_ref.rollout.val_kwargs.n=1
    trainer.val_before_train=False
    "trainer.test_freq=$TEST_FREQ"
    # Trainer, checkpoints (resumed automatically), logs.
    "trainer.nnodes=$NNODES"
    "trainer.n_gpus_per_node=$GPUS_PER_NODE"
    "trainer.total_training_steps=$TOTAL_STEPS"
    # An upper bound only: total_training_steps ends the run.
    trainer.total_epochs=1000
    trainer.critic_warmup=0
    "trainer.project_name=$PROJECT"
    "trainer.experiment_name=$EXPERIMENT"
    "trainer.default_local_dir=$RUN_DIR/checkpoints"
    "trainer.save_freq=$SAVE_FREQ"
    trainer.resume_mode=auto
    "trainer.logger=[$loggers]"
    "+ray_kwargs.ray_init.runtime_env.env_vars.VERL_FILE_LOGGER_PATH=$METRICS_FILE"
    "+ray_kwargs.ray_init.runtime_env.env_vars.TENSORBOARD_DIR=$RUN_DIR/tensorboard"
)

if [[ "$RECOMPUTE" == full && "$ACTOR_STRATEGY" == megatron ]]; then  # Megatron keys; the CPU FSDP2 profile has none
    OVERRIDES+=(
        actor_rollout_ref.actor.megatron.override_transformer_config.recompute_granularity=full
        actor_rollout_ref.actor.megatron.override_transformer_config.recompute_method=uniform
        actor_rollout_ref.actor.megatron.override_transformer_config.recompute_num_layers=1
    )
fi
if [[ -n "$MICRO_BATCH_PER_GPU" ]]; then
    OVERRIDES+=(
        actor_rollout_ref.actor.use_dynamic_bsz=False
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=$MICRO_BATCH_PER_GPU"
        "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=$MICRO_BATCH_PER_GPU"
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=$MICRO_BATCH_PER_GPU"
    )
else
    # ref and rollout log-prob passes follow these two settings (verl's oc.select defaults).
    OVERRIDES+=(
        actor_rollout_ref.actor.use_dynamic_bsz=True
        "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=$ACTOR_MAX_TOKENS_PER_GPU"
    )
fi

if declare -p PROFILE_OVERRIDES &>/dev/null; then
    OVERRIDES+=("${PROFILE_OVERRIDES[@]}")
fi

# Ray starts its workers from the raylet of their node, not from this shell: on a cluster started apart from the
# launch (RAY_ADDRESS), a variable exported here reaches them only through runtime_env. Quoted so that Hydra keeps
# every value a string (Ray refuses others, e.g. OMP_NUM_THREADS=1 read as an int). Left out of the launch check's
# recorded settings, as the rest of the environment is: a resume may change them.
WORKER_ENV=${WORKER_ENV:-}
ENV_OVERRIDES=()
for name in $WORKER_ENV; do
    [[ -v $name ]] || continue
    value=${!name}
    ENV_OVERRIDES+=("++ray_kwargs.ray_init.runtime_env.env_vars.$name='${value//\'/\\\'}'")
done

CMD=("$PYTHON" -m "$ENTRY_MODULE" "--config-name=$CONFIG_NAME" "${OVERRIDES[@]}" "${ENV_OVERRIDES[@]}" "$@")
CHECK=("$PYTHON" -m cw_verl.paper.launch_check --entry-module "$ENTRY_MODULE" --config-name "$CONFIG_NAME" --gpu-memory-gb "$GPU_MEMORY_GB" --run-dir "$RUN_DIR")
[[ -n "${DUMP_CONFIG:-}" ]] && CHECK+=(--dump-config "$DUMP_CONFIG")
[[ "${CHECK_IMPORTS:-1}" == 0 ]] && CHECK+=(--skip-imports)
# A real launch records its settings in RUN_DIR; a later launch with other settings is refused there.
[[ "$DRY_RUN" == 1 ]] || CHECK+=(--record)

bridge_note=$([[ "$ACTOR_STRATEGY" == megatron ]] && echo ", bridge $BRIDGE" || true)
echo "# $MODEL_TAG, arm $ARM (loss $LOSS_MODE, reward $REWARD), $TOTAL_STEPS steps, memory profile $MEMORY_PROFILE$bridge_note; outputs in $RUN_DIR"
printf '%q ' "${CMD[@]}"
echo
# verl fails on a wrong setting only after Ray and the GPU workers are up; check on the CPU first.
"${CHECK[@]}" -- "${OVERRIDES[@]}" "$@" || die "launch check failed; nothing was started"
if [[ "$DRY_RUN" == 1 ]]; then
    echo "# DRY_RUN=1: not started"
    exit 0
fi
mkdir -p "$(dirname "$METRICS_FILE")"
if [[ "${SUPERVISE:-0}" == 1 ]]; then
    # SUPERVISE_ARGS: e.g. (--startup-timeout 600 --step-timeout 120); see python -m cw_verl.cpu.supervise --help.
    declare -p SUPERVISE_ARGS &>/dev/null || SUPERVISE_ARGS=()
    # The supervisor finds the run's processes by this tag in their environment; Ray workers of a cluster
    # started apart from the launch carry it only through runtime_env. It names this launch, not a setting.
    RUN_ID=$(od -An -N8 -tx8 /dev/urandom | tr -d ' ')
    CMD+=("++ray_kwargs.ray_init.runtime_env.env_vars.CW_VERL_RUN_ID='$RUN_ID'")
    # Next to the metrics: the run's status, times and peak memory (JSON).
    CMD=("$PYTHON" -m cw_verl.cpu.supervise --metrics "$METRICS_FILE" --report "${METRICS_FILE%.jsonl}.run.json"
        --run-id "$RUN_ID" "${SUPERVISE_ARGS[@]}" -- "${CMD[@]}")
fi
exec "${CMD[@]}"
