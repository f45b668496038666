#!/usr/bin/env bash
# Table 2, 1.5B rows and Table 3: DeepSeek-R1-Distill-Qwen-1.5B on one 4-GPU node
# (ARM=grpo|clip_cov|cw_grpo|cw_grpo_authors).
#   MODEL_PATH=/models/DeepSeek-R1-Distill-Qwen-1.5B bash recipes/run_cwgrpo_r1distill_1p5b.sh
set -euo pipefail

MODEL_TAG=deepseek-r1-distill-qwen-1.5b
MODEL_PATH=${MODEL_PATH:-$HOME/models/DeepSeek-R1-Distill-Qwen-1.5B}
# The paper's 4096-token completions; 512 + 4096 = 4608 is Open-RS's vLLM max_model_len too.
MAX_RESPONSE_LENGTH=${MAX_RESPONSE_LENGTH:-4096}
# The authors' 1.5B runs (recipes/gaussian_1.5b.yaml, grpo_1.5b.yaml): 300 steps, the schedule over all of
# them; Table 2 is step 100 and Table 3 steps 100/150/200 of one such run.
TOTAL_STEPS=${TOTAL_STEPS:-300}
# Their 1.5B reward is accuracy + format, weights 1 and 1 (with REWARD=authors).
AUTHORS_FORMAT_REWARD=${AUTHORS_FORMAT_REWARD:-1}
# Per-GPU memory (estimates of cw_verl/paper/memory.py, printed by the launch check):
#   80gb:  TP=2 (DP=2), vLLM 0.5 x 80 GB: about 52 GB in the rollout phase, 33 GB in training with
#          token-budget micro-batches and 58 GB with whole-group ones (cw_grpo_authors: 12 x 4608 tokens).
#   141gb: the authors' H200s: TP=1 (DP=4), vLLM 0.5 x 141 GB: about 90 GB in the rollout phase, 61-111 GB
#          in training.
MEMORY_PROFILE=${MEMORY_PROFILE:-80gb}
case "$MEMORY_PROFILE" in
    80gb) ACTOR_TP=${ACTOR_TP:-2} ROLLOUT_GPU_MEMORY=${ROLLOUT_GPU_MEMORY:-0.5} ;;
    141gb) ACTOR_TP=${ACTOR_TP:-1} ROLLOUT_GPU_MEMORY=${ROLLOUT_GPU_MEMORY:-0.5} ;;
    *) echo "ERROR: MEMORY_PROFILE must be 80gb or 141gb (got '$MEMORY_PROFILE')" >&2 && exit 1 ;;
esac
# The chat template's generation prompt ends with "<think>\n": completions carry only </think>.
PROMPT_OPENS_THINK=1

# shellcheck source=recipes/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
