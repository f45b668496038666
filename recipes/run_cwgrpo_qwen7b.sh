#!/usr/bin/env bash
# Table 2, 7B rows: Qwen2.5-Math-7B-Instruct on one 4-GPU node (ARM=grpo|clip_cov|cw_grpo|cw_grpo_authors).
#   MODEL_PATH=/models/Qwen2.5-Math-7B-Instruct bash recipes/run_cwgrpo_qwen7b.sh
set -euo pipefail

MODEL_TAG=qwen2.5-math-7b-instruct
MODEL_PATH=${MODEL_PATH:-$HOME/models/Qwen2.5-Math-7B-Instruct}
# The model has 4096 positions (rope_theta 10000), so the paper's 512 + 4096 cannot fit: the response
# budget is what is left after the 512-token prompt, 3584, which is also Open-RS's completion length.
# (trl + vLLM in the paper's setup could not generate past 4096 - prompt tokens either.) The launch
# check refuses any prompt + response longer than the model's max_position_embeddings.
MAX_RESPONSE_LENGTH=${MAX_RESPONSE_LENGTH:-3584}
# The authors' 7B runs (recipes/gaussian_7b.yaml, grpo_7b.yaml): 150 steps, the schedule over all of them.
TOTAL_STEPS=${TOTAL_STEPS:-150}
# Their 7B reward is accuracy alone (with REWARD=authors, the default of ARM=cw_grpo_authors).
AUTHORS_FORMAT_REWARD=${AUTHORS_FORMAT_REWARD:-0}
# Per-GPU memory (estimates of cw_verl/paper/memory.py, printed by the launch check):
#   80gb:  TP=4 (DP=1), vLLM 0.35 x 80 GB: about 66 GB in the rollout phase (3.8 GB weights, 7.6 GB fp32
#          gradients, 22.8 GB Adam states, 3.8 GB reference, 28 GB vLLM) and 53-61 GB in training.
#   141gb: the authors' H200s: TP=2 (DP=2), vLLM 0.5 x 141 GB: about 124 GB in the rollout phase, 84-99 GB
#          in training. (The first 7B defaults, TP=2 and vLLM 0.5 on 80 GB GPUs, needed about 93 GB.)
MEMORY_PROFILE=${MEMORY_PROFILE:-80gb}
case "$MEMORY_PROFILE" in
    80gb) ACTOR_TP=${ACTOR_TP:-4} ROLLOUT_GPU_MEMORY=${ROLLOUT_GPU_MEMORY:-0.35} ;;
    141gb) ACTOR_TP=${ACTOR_TP:-2} ROLLOUT_GPU_MEMORY=${ROLLOUT_GPU_MEMORY:-0.5} ;;
    *) echo "ERROR: MEMORY_PROFILE must be 80gb or 141gb (got '$MEMORY_PROFILE')" >&2 && exit 1 ;;
esac
# Qwen2.5-Math's chat template does not open a <think> block: the model writes both tags.
PROMPT_OPENS_THINK=0

# shellcheck source=recipes/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
