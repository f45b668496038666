"""Zero-shot pass@1 on the paper's five benchmarks, the way Open-RS ran lighteval for Table 2.

    python -m cw_verl.paper.evaluate generate --model CKPT --data-dir DATA --out OUT   # vLLM, GPU
    python -m cw_verl.paper.evaluate score --out OUT --label "GRPO (7B)"               # CPU

``generate`` samples one completion per problem (temperature 0.6, top_p 0.95, chat template, the
lighteval task prompt of Open-RS's ``src/open_r1/evaluate.py``; ``--prompt-style train`` uses the
training system prompt instead) into ``OUT/generations.jsonl``. ``score`` grades them with math-verify
using lighteval's extraction targets for those tasks (expressions or LaTeX, boxed first, 5-digit
rounding), each check bounded in time, and writes ``OUT/results.json`` for ``cw_verl.paper.report``.
A check that times out or crashes is counted as incorrect *and* reported as failed.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from cw_verl.paper.data import EVAL, SYSTEM_PROMPT

BENCHMARKS = tuple(s.key for s in EVAL)

# Open-RS src/open_r1/evaluate.py (lighteval custom tasks), after str.format.
LIGHTEVAL_MATH_PROMPT = (
    "Solve the following math problem efficiently and clearly.  The last line of your response should be "
    "of the following format: 'Therefore, the final answer is: $\\boxed{ANSWER}$. I hope it is correct' "
    "(without quotes) where ANSWER is just the final number or expression that solves the problem. "
    "Think step by step before answering.\n\n{question}"
)
TEMPERATURE, TOP_P = 0.6, 0.95
MAX_MODEL_LEN = 32768  # Open-RS's lighteval max_model_length and max_new_tokens


@dataclass(frozen=True)
class Problem:
    benchmark: str
    index: int
    question: str
    gold: str


def load_problems(data_dir: Path, benchmarks=BENCHMARKS) -> list[Problem]:
    """Problems from the parquet files of ``cw_verl.paper.data`` (the user turn is the question)."""
    import pyarrow.parquet

    problems = []
    for name in benchmarks:
        for row in pyarrow.parquet.read_table(data_dir / f"{name}.parquet").to_pylist():
            question = next(m["content"] for m in row["prompt"] if m["role"] == "user")
            problems.append(Problem(name, row["extra_info"]["index"], question, row["reward_model"]["ground_truth"]))
    return problems


def chat_messages(question: str, prompt_style: str) -> list[dict]:
    if prompt_style == "lighteval":
        return [{"role": "user", "content": LIGHTEVAL_MATH_PROMPT.replace("{question}", question)}]
    if prompt_style == "train":
        return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]
    raise ValueError(f"prompt style must be 'lighteval' or 'train', got {prompt_style!r}")


def generate(args) -> None:
    """One sample per problem with vLLM; each request may use the whole context left after its prompt."""
    from transformers import AutoConfig
    from vllm import LLM, SamplingParams

    max_pos = AutoConfig.from_pretrained(args.model).max_position_embeddings
    max_model_len = min(args.max_model_len, max_pos)
    llm = LLM(
        model=args.model,
        tensor_parallel_size=args.tensor_parallel_size,
        max_model_len=max_model_len,
        gpu_memory_utilization=0.8,
        dtype="bfloat16",
        seed=args.seed,
    )
    tokenizer = llm.get_tokenizer()
    problems = load_problems(args.data_dir, args.benchmarks)
    # Render, then tokenize without special tokens: the chat template already holds the BOS token.
    texts = [
        tokenizer.apply_chat_template(
            chat_messages(p.question, args.prompt_style), add_generation_prompt=True, tokenize=False
        )
        for p in problems
    ]
    prompts = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    params = [
        SamplingParams(temperature=TEMPERATURE, top_p=TOP_P, max_tokens=max_model_len - len(ids), seed=args.seed + i)
        for i, ids in enumerate(prompts)
    ]
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], params)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "generations.jsonl", "w") as f:
        for p, out in zip(problems, outputs, strict=True):
            completion = out.outputs[0]
            record = {
                "benchmark": p.benchmark,
                "index": p.index,
                "gold": p.gold,
                "generation": completion.text,
                "finish_reason": completion.finish_reason,
            }
            f.write(json.dumps(record) + "\n")
    settings = {
        "model": str(args.model),
        "prompt_style": args.prompt_style,
        "temperature": TEMPERATURE,
        "top_p": TOP_P,
        "max_model_len": max_model_len,
        "seed": args.seed,
    }
    (args.out / "generation_settings.json").write_text(json.dumps(settings, indent=2))


def score_records(records: list[dict], timeout_s: float = 30.0, workers: int = 2) -> dict:
    """Per-benchmark ``{correct, total, failed}`` for generation records; also marks each record."""
    from cw_verl.paper.mathverify_pool import MathVerifyPool

    pool = MathVerifyPool(size=workers)
    results: dict[str, dict[str, int]] = {}
    try:
        for rec in records:
            verdict = pool.check(rec["gold"], rec["generation"], "lighteval", timeout_s)
            rec["correct"], rec["status"] = verdict.correct, verdict.status
            counts = results.setdefault(rec["benchmark"], {"correct": 0, "total": 0, "failed": 0})
            counts["correct"] += verdict.correct
            counts["total"] += 1
            counts["failed"] += verdict.failed
    finally:
        pool.close()
    return results


def score(args) -> None:
    lines = (args.out / "generations.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    benchmarks = score_records(records, args.timeout, args.workers)
    with open(args.out / "scored.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    settings_file = args.out / "generation_settings.json"
    settings = json.loads(settings_file.read_text()) if settings_file.exists() else {}
    result = {"label": args.label, "settings": settings, "benchmarks": benchmarks}
    (args.out / "results.json").write_text(json.dumps(result, indent=2))
    for name, c in benchmarks.items():
        failed = f", {c['failed']} scoring failures" if c["failed"] else ""
        print(f"{name}: {100 * c['correct'] / c['total']:.1f} ({c['correct']}/{c['total']}){failed}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="sample with vLLM (GPU)")
    gen.add_argument("--model", type=Path, required=True, help="HF model dir, e.g. <ckpt>/actor/model/huggingface")
    gen.add_argument("--data-dir", type=Path, required=True, help="parquet files from cw_verl.paper.data")
    gen.add_argument("--out", type=Path, required=True)
    gen.add_argument("--benchmarks", nargs="+", default=list(BENCHMARKS), choices=BENCHMARKS)
    gen.add_argument("--prompt-style", default="lighteval", choices=("lighteval", "train"))
    gen.add_argument("--max-model-len", type=int, default=MAX_MODEL_LEN, help="capped at the model's positions")
    gen.add_argument("--tensor-parallel-size", type=int, default=1)
    gen.add_argument("--seed", type=int, default=42)
    sc = sub.add_parser("score", help="grade OUT/generations.jsonl (CPU)")
    sc.add_argument("--out", type=Path, required=True)
    sc.add_argument("--label", required=True, help="row name in the report, e.g. 'CW-GRPO (1.5B)'")
    sc.add_argument("--timeout", type=float, default=30.0, help="seconds per math-verify check")
    sc.add_argument("--workers", type=int, default=2, help="math-verify worker processes")
    args = parser.parse_args(argv)
    generate(args) if args.command == "generate" else score(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
