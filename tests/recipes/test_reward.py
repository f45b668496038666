"""The paper's reward (accuracy + think-tag format) as verl calls it, in the main thread and in workers."""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from cw_verl.paper import reward
from cw_verl.paper.answers import boxed_contents, think_tags_matched
from cw_verl.paper.mathverify_pool import MathVerifyPool

R1 = True  # DeepSeek-R1-Distill: the generation prompt already opened <think>
QWEN = False  # Qwen2.5-Math: the model writes both tags

# (id, prompt_opens_think, completion, ground truth, accuracy, format, answer_rejected)
CASES = [
    ("r1-correct", R1, "Half of 1 is...\n</think>\n\nThe answer is $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}", 1, 1, 0),
    ("r1-equivalent-decimal", R1, "ok\n</think>\n\\boxed{0.5}", "\\frac{1}{2}", 1, 1, 0),
    ("r1-dfrac", R1, "ok\n</think>\n\\boxed{\\dfrac{9}{4}}", "\\frac{9}{4}", 1, 1, 0),
    ("r1-nested-braces", R1, "</think> \\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt3}{2}", 1, 1, 0),
    ("r1-rationalised", R1, "</think> \\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}", 1, 1, 0),
    ("r1-gold-with-dollars", R1, "</think> \\boxed{\\sqrt{2}}", "$\\sqrt{2}$", 1, 1, 0),
    ("r1-interval", R1, "</think> \\boxed{(-2,2)}", "(-2, 2)", 1, 1, 0),
    ("r1-set", R1, "</think> \\boxed{\\{2,3\\}}", "2, 3", 1, 1, 0),
    ("r1-units", R1, "</think> \\boxed{10 \\text{ pc}}", "10", 1, 1, 0),
    ("r1-equation", R1, "</think> \\boxed{x=3}", "3", 1, 1, 0),
    ("r1-choice", R1, "</think> \\boxed{B}", "\\text{(B)}", 1, 1, 0),
    ("r1-anchored-no-box", R1, "</think> The final answer is $5$.", "5", 1, 1, 0),
    ("r1-wrong", R1, "</think> \\boxed{3}", "4", 0, 1, 0),
    ("r1-bare-number-not-extracted", R1, "</think> so the answer is 5", "5", 0, 1, 0),
    ("r1-approximation-is-wrong", R1, "</think> \\boxed{0.7071}", "\\frac{1}{\\sqrt{2}}", 0, 1, 0),
    # Format: the prompt opened <think>, so the completion must close it exactly once and not reopen it.
    ("r1-reopens-think", R1, "<think>\nagain\n</think>\n\\boxed{5}", "5", 1, 0, 0),
    ("r1-unterminated-think", R1, "still thinking ... \\boxed{5}", "5", 1, 0, 0),
    ("r1-duplicated-close", R1, "a</think>b</think>\\boxed{5}", "5", 1, 0, 0),
    # Gaming the accuracy check.
    ("hedge-two-answers", R1, "</think> It is \\boxed{1} or \\boxed{2}.", "1", 0, 1, 1),
    ("hedge-in-answer-tag-too", R1, "</think><answer>\\boxed{4}</answer> or maybe \\boxed{5}", "4", 0, 1, 1),
    ("same-answer-twice-is-fine", R1, "</think> \\boxed{5}. Final: \\boxed{ 5 }", "5", 1, 1, 0),
    ("draft-in-thoughts-ignored", R1, "try \\boxed{7}? no.\n</think>\nSo \\boxed{8}.", "7", 0, 1, 0),
    ("draft-in-thoughts-not-a-hedge", R1, "try \\boxed{7}? no.\n</think>\nSo \\boxed{8}.", "8", 1, 1, 0),
    ("unterminated-box", R1, "</think> \\boxed{\\frac{1}{2}", "\\frac{1}{2}", 0, 1, 0),
    ("oversized-answer", R1, "</think> \\boxed{" + "1+" * 600 + "1}", "1201", 0, 1, 1),
    # Qwen2.5-Math: both tags are the model's.
    ("qwen-full-format", QWEN, "<think>\n2+3\n</think>\n<answer>\\boxed{5}</answer>", "5", 1, 1, 0),
    ("qwen-no-tags", QWEN, "2+3 = \\boxed{5}", "5", 1, 0, 0),
    ("qwen-only-closing-tag", QWEN, "2+3\n</think>\n\\boxed{5}", "5", 1, 0, 0),
    ("qwen-tags-reversed", QWEN, "</think> x <think> \\boxed{5}", "5", 1, 0, 0),
]


def score(case):
    _, opens, completion, gold, *_ = case
    return reward.compute_score(
        data_source="t", solution_str=completion, ground_truth=gold, extra_info={}, prompt_opens_think=opens
    )


def expected(case):
    *_, acc, fmt, rejected = case
    return {"score": acc + fmt, "acc": acc, "format": fmt, "answer_rejected": rejected, "scoring_failed": 0}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_reward_main_thread(case):
    assert score(case) == expected(case)


def test_reward_from_worker_threads():
    """verl scores in executor threads, where math-verify's signal-based timeouts raise."""
    with ThreadPoolExecutor(max_workers=6) as ex:
        results = list(ex.map(score, CASES * 2))
    assert results == [expected(c) for c in CASES * 2]


def test_huge_output_is_bounded():
    completion = "</think>" + "x = y + 1, " * 50_000 + "\\boxed{5}"
    start = time.monotonic()
    result = reward.compute_score("t", completion, "5", {}, prompt_opens_think=True)
    assert result["acc"] == 1 and result["scoring_failed"] == 0
    assert time.monotonic() - start < 5


def test_timeout_is_a_visible_failure_and_the_pool_recovers(caplog):
    # sympy evaluates this tower of powers in C, where no signal reaches it: only killing the worker helps.
    tower = "</think> \\boxed{9^{9^{9^{9}}}}"
    before = reward.failure_counts()["failed"]
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="cw_verl.paper.reward"):
        with ThreadPoolExecutor(1) as ex:
            result = ex.submit(reward.compute_score, "aime24", tower, "1", {}, True, 1.0).result()
    assert time.monotonic() - start < 10
    assert result == {"score": 1.0, "acc": 0.0, "format": 1.0, "answer_rejected": 0.0, "scoring_failed": 1.0}
    assert reward.failure_counts()["failed"] == before + 1
    assert "reward scoring failed (timeout) for data_source=aime24" in caplog.text
    assert score(CASES[0]) == expected(CASES[0])


def test_unparseable_ground_truth_is_a_failure_not_a_zero():
    result = reward.compute_score("t", "</think> \\boxed{5}", "\\text{}", {}, prompt_opens_think=True)
    assert result["scoring_failed"] == 1 and result["acc"] == 0


def test_dead_worker_is_reported_and_replaced():
    pool = MathVerifyPool(size=1)
    try:
        assert pool.check("5", "\\boxed{5}").correct
        worker = pool._idle.get_nowait()
        worker.proc.kill()
        worker.proc.wait()
        pool._idle.put(worker)
        verdict = pool.check("5", "\\boxed{5}")
        assert verdict.status == "worker_error" and not verdict.correct
        assert pool.check("5", "\\boxed{5}").correct
    finally:
        pool.close()


def test_reward_kwargs_typos_fail_loudly():
    with pytest.raises(TypeError):
        reward.compute_score("t", "x", "1", {}, prompt_open_think=True)


@pytest.mark.parametrize(
    ("text", "boxes"),
    [
        ("\\boxed{\\frac{a}{b}} and \\boxed {2}", ["\\frac{a}{b}", "2"]),
        ("\\boxed{\\{1,2\\}}", ["\\{1,2\\}"]),
        ("\\fbox{3}", ["3"]),
        ("\\boxed{1", []),
        ("\\boxed{\\left\\{x\\right\\}}", ["\\left\\{x\\right\\}"]),
    ],
)
def test_boxed_contents(text, boxes):
    assert boxed_contents(text) == boxes


def test_think_tags_matched_is_about_the_whole_output():
    assert think_tags_matched("x\n</think>\ny", prompt_opens_think=True)
    assert not think_tags_matched("x\n</think>\ny", prompt_opens_think=False)
    assert think_tags_matched("<think>x</think>y", prompt_opens_think=False)
    assert not think_tags_matched("<think>x</think>y", prompt_opens_think=True)
