#!/usr/bin/env bash
# Table 2, 1.5B rows: DeepSeek-R1-Distill-Qwen-1.5B on one 4-GPU node (ARM=grpo|clip_cov|cw_grpo).
#   MODEL_PATH=/models/DeepSeek-R1-Distill-Qwen-1.5B bash recipes/run_cwgrpo_r1distill_1p5b.sh
set -euo pipefail

MODEL_TAG=deepseek-r1-distill-qwen-1.5b
MODEL_PATH=${MODEL_PATH:-$HOME/models/DeepSeek-R1-Distill-Qwen-1.5B}
# The paper's 4096-token completions; 512 + 4096 = 4608 is Open-RS's vLLM max_model_len too.
MAX_RESPONSE_LENGTH=${MAX_RESPONSE_LENGTH:-4096}
ACTOR_TP=${ACTOR_TP:-1}
# The chat template's generation prompt ends with "<think>\n": completions carry only </think>.
PROMPT_OPENS_THINK=1

# shellcheck source=recipes/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
