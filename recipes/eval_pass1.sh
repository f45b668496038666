#!/usr/bin/env bash
# Zero-shot pass@1 of one model on the paper's five benchmarks (Table 2 protocol; needs a GPU and vLLM).
#   bash recipes/eval_pass1.sh <hf_model_dir> "<row label>" [out_dir]
# A training checkpoint's HF weights are in <run>/checkpoints/global_step_<N>/actor/model/huggingface.
# Then: python -m cw_verl.paper.report <out_dir>/results.json ... --baseline "<base label>"
set -euo pipefail

die() {
    echo "ERROR: $*" >&2
    exit 1
}

[[ $# -ge 2 ]] || die "usage: $0 <hf_model_dir> <label> [out_dir]"
MODEL=$1
LABEL=$2
OUT=${3:-$PWD/evals/$(echo "$LABEL" | tr -c 'A-Za-z0-9._-' '_')}
PYTHON=${PYTHON:-python3}
DATA_DIR=${DATA_DIR:-$HOME/data/cw_grpo}
TP=${TP:-1}
PROMPT_STYLE=${PROMPT_STYLE:-lighteval} # or "train": the training system prompt

[[ -f "$MODEL/config.json" ]] || die "$MODEL is not a Hugging Face model directory (no config.json)"
for name in aime24 math500 amc23 minerva olympiadbench; do
    [[ -f "$DATA_DIR/$name.parquet" ]] || die "$DATA_DIR/$name.parquet not found; build it with: $PYTHON -m cw_verl.paper.data --out $DATA_DIR"
done

"$PYTHON" -m cw_verl.paper.evaluate generate --model "$MODEL" --data-dir "$DATA_DIR" --out "$OUT" \
    --tensor-parallel-size "$TP" --prompt-style "$PROMPT_STYLE"
"$PYTHON" -m cw_verl.paper.evaluate score --out "$OUT" --label "$LABEL"
