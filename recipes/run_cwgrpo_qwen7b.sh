#!/usr/bin/env bash
# Table 2, 7B rows: Qwen2.5-Math-7B-Instruct on one 4-GPU node (ARM=grpo|clip_cov|cw_grpo).
#   MODEL_PATH=/models/Qwen2.5-Math-7B-Instruct bash recipes/run_cwgrpo_qwen7b.sh
set -euo pipefail

MODEL_TAG=qwen2.5-math-7b-instruct
MODEL_PATH=${MODEL_PATH:-$HOME/models/Qwen2.5-Math-7B-Instruct}
# The model has 4096 positions (rope_theta 10000), so the paper's 512 + 4096 cannot fit: the response
# budget is what is left after the 512-token prompt, 3584, which is also Open-RS's completion length.
# (trl + vLLM in the paper's setup could not generate past 4096 - prompt tokens either.) The launch
# check refuses any prompt + response longer than the model's max_position_embeddings.
MAX_RESPONSE_LENGTH=${MAX_RESPONSE_LENGTH:-3584}
# 7B with Adam states: TP=2 halves per-GPU weights, gradients and optimizer shards.
ACTOR_TP=${ACTOR_TP:-2}
# Qwen2.5-Math's chat template does not open a <think> block: the model writes both tags.
PROMPT_OPENS_THINK=0

# shellcheck source=recipes/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
