"""Evaluation (everything but vLLM itself) and the Table 2 report, on recorded fixtures."""

from __future__ import annotations

import csv
import io
import json
import shutil
import sys
import types

import pytest
from recipe_helpers import FIXTURES

from cw_verl.paper import evaluate, report
from cw_verl.paper.data import SYSTEM_PROMPT

RESULTS = FIXTURES / "results"
TABLE2_7B = [RESULTS / f"qwen7b_{arm}.json" for arm in ("base", "grpo", "clip_cov", "cw_grpo")]


def load_generations():
    return [json.loads(line) for line in (FIXTURES / "generations.jsonl").read_text().splitlines()]


def test_scoring_recorded_generations():
    records = load_generations()
    counts = evaluate.score_records(records)
    assert counts == {
        "aime24": {"correct": 1, "total": 2, "failed": 0},  # 119 is not 120
        "math500": {"correct": 2, "total": 3, "failed": 0},  # [-2, 2] is not (-2, 2); 9/2 unboxed is 4.5
        "amc23": {"correct": 1, "total": 2, "failed": 0},  # the think-block draft \boxed{4} is not the answer
        "minerva": {"correct": 2, "total": 2, "failed": 0},  # sqrt(2)/2 == 1/sqrt(2)
        "olympiadbench": {"correct": 2, "total": 2, "failed": 0},
    }
    assert [r["correct"] for r in records if r["benchmark"] == "aime24"] == [True, False]
    assert {r["status"] for r in records} == {"ok"}


def test_a_check_that_times_out_is_counted_wrong_and_failed():
    records = [{"benchmark": "aime24", "gold": "1", "generation": "$\\boxed{9^{9^{9^{9}}}}$"}]
    assert evaluate.score_records(records, timeout_s=1.0) == {"aime24": {"correct": 0, "total": 1, "failed": 1}}
    assert records[0]["status"] == "timeout"


def test_score_command_writes_results(tmp_path, capsys):
    shutil.copy(FIXTURES / "generations.jsonl", tmp_path / "generations.jsonl")
    assert evaluate.main(["score", "--out", str(tmp_path), "--label", "CW-GRPO (7B)"]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["label"] == "CW-GRPO (7B)"
    assert result["benchmarks"]["math500"] == {"correct": 2, "total": 3, "failed": 0}
    assert len((tmp_path / "scored.jsonl").read_text().splitlines()) == 11
    assert "math500: 66.7 (2/3)" in capsys.readouterr().out


def test_prompts(data_dir):
    problems = evaluate.load_problems(data_dir)
    assert [p.benchmark for p in problems].count("math500") == 3
    olympiad = [p for p in problems if p.benchmark == "olympiadbench"]
    assert olympiad[1].question == "Find the positive real $x$ with $x^2 = 2$." and olympiad[1].gold == "$\\sqrt{2}$"
    (message,) = evaluate.chat_messages("What is 1+1?", "lighteval")
    assert message["role"] == "user"
    assert message["content"].startswith("Solve the following math problem efficiently and clearly.  The last line")
    assert "'Therefore, the final answer is: $\\boxed{ANSWER}$. I hope it is correct'" in message["content"]
    assert message["content"].endswith("Think step by step before answering.\n\nWhat is 1+1?")
    assert evaluate.chat_messages("Q", "train") == [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": "Q"},
    ]


def test_generate_without_a_gpu(data_dir, models, tmp_path, monkeypatch):
    """generate() with vLLM replaced by a stand-in that records what it is asked for."""
    calls = {}

    class FakeLLM:
        def __init__(self, **kwargs):
            calls["llm"] = kwargs
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(kwargs["model"])

        def get_tokenizer(self):
            return self.tokenizer

        def generate(self, prompts, params):
            calls["prompts"], calls["params"] = prompts, params
            done = types.SimpleNamespace(text="\\boxed{1}", finish_reason="stop")
            return [types.SimpleNamespace(outputs=[done]) for _ in prompts]

    def sampling_params(**kwargs):
        return kwargs

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=FakeLLM, SamplingParams=sampling_params))
    out = tmp_path / "eval"
    evaluate.main(["generate", "--model", str(models["qwen7b"]), "--data-dir", str(data_dir), "--out", str(out)])
    # Qwen2.5-Math-7B has 4096 positions: Open-RS's 32768-token budget is capped to what the model has.
    assert calls["llm"]["max_model_len"] == 4096
    for prompt, params in zip(calls["prompts"], calls["params"], strict=True):
        assert params["max_tokens"] == 4096 - len(prompt["prompt_token_ids"]) > 0
        assert (params["temperature"], params["top_p"]) == (0.6, 0.95)
    records = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(records) == 11 and records[0]["generation"] == "\\boxed{1}"
    assert json.loads((out / "generation_settings.json").read_text())["prompt_style"] == "lighteval"


def test_report_reproduces_table2_7b_rows(capsys):
    assert report.main([*map(str, TABLE2_7B), "--baseline", "Qwen-2.5-Math-7B-Instruct"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| Model | AIME24 | MATH-500 | AMC23 | Minerva | OlympiadBench | Avg. |"
    assert lines[2:] == [
        "| Qwen-2.5-Math-7B-Instruct | 3.3 (1/30) | 82.6 (413/500) | 47.5 (19/40) | 33.1 (90/272) | 40.4 (273/675) "
        "| 41.4 |",
        "| GRPO | 10.0 (3/30) | 82.2 (411/500) | 55.0 (22/40) | 33.1 (90/272) | 40.3 (272/675) | 44.1 (+2.7) |",
        "| Clip-Cov | 10.0 (3/30) | 82.4 (412/500) | 57.5 (23/40) | 32.4 (88/272) | 41.3 (279/675) | 44.7 (+3.3) |",
        # The paper prints "46.7 (+4.3)" here, but its own averages give 46.7 - 41.4 = +5.3.
        "| GRPO + Gaussian Reweight (ours) | 13.3 (4/30) | 82.8 (414/500) | 62.5 (25/40) | 32.0 (87/272) "
        "| 42.7 (288/675) | 46.7 (+5.3) |",
    ]


def test_report_csv(tmp_path):
    out = tmp_path / "t.csv"
    report.main(
        [
            *map(str, TABLE2_7B[:3]),
            "--baseline",
            "Qwen-2.5-Math-7B-Instruct",
            "--csv",
            str(out),
            "--markdown",
            str(tmp_path / "t.md"),
        ]
    )
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert [r["model"] for r in rows] == ["Qwen-2.5-Math-7B-Instruct", "GRPO", "Clip-Cov"]
    clip = rows[2]
    assert (clip["math500_acc"], clip["math500_correct"], clip["math500_total"]) == ("82.40", "412", "500")
    assert (clip["avg"], clip["avg_gain"], rows[0]["avg_gain"]) == ("44.72", "3.32", "")
    assert (tmp_path / "t.md").read_text().count("\n") == 5


def test_report_marks_scoring_failures(tmp_path, capsys):
    result = json.loads(TABLE2_7B[2].read_text())
    result["benchmarks"]["minerva"]["failed"] = 2
    path = tmp_path / "r.json"
    path.write_text(json.dumps(result))
    report.main([str(path)])
    out = capsys.readouterr().out
    assert "| 32.4 (88/272)* |" in out
    assert "Clip-Cov / Minerva: 2 answer(s) could not be scored (counted wrong)" in out


def test_report_refuses_incomplete_results(tmp_path):
    result = json.loads(TABLE2_7B[0].read_text())
    del result["benchmarks"]["amc23"]
    path = tmp_path / "r.json"
    path.write_text(json.dumps(result))
    with pytest.raises(ValueError, match=r"no results for \['amc23'\]"):
        report.main([str(path)])
    with pytest.raises(ValueError, match="--baseline 'nope' must name exactly one result"):
        report.main([str(TABLE2_7B[0]), "--baseline", "nope"])
