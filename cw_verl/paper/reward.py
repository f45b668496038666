"""The paper's reward (App. C) as a verl custom reward function.

score = accuracy + format, each 0 or 1:
  * accuracy: math-verify equivalence of the final answer with the ground truth;
  * format: properly matched <think> tags (see ``answers.think_tags_matched``).

verl 0.9.1 calls ``compute_score(data_source=, solution_str=, ground_truth=, extra_info=, **reward_kwargs)``
from an executor thread of its reward-loop workers (``NaiveRewardManager.run_single``); ``solution_str``
is the decoded response without the prompt. Configure with
``reward.custom_reward_function.path=pkg://cw_verl.paper.reward`` and ``.name=compute_score``; the
``reward_kwargs`` below go under ``+reward.custom_reward_function.reward_kwargs.<name>=...``.

Failures stay visible: a check that times out, crashes, or meets an unparseable ground truth returns
``scoring_failed=1`` (verl reports extra keys in validation metrics, e.g. ``val-aux/<source>/scoring_failed``)
and is logged with a running count; it is never reported as a plain wrong answer.
"""

from __future__ import annotations

import logging
import threading

from cw_verl.paper.answers import answer_region, boxed_contents, normalize_box, think_tags_matched
from cw_verl.paper.mathverify_pool import MathVerifyPool

logger = logging.getLogger(__name__)

# Legitimate final answers are short; a longer "answer" is a dump of text, scored 0 (answer_rejected).
MAX_ANSWER_CHARS = 1000
# Without any boxed answer, math-verify only looks at anchored forms ("the answer is $x$"), which sit at
# the end; scanning a long tail costs time and finds nothing the tail does not hold.
MAX_TAIL_CHARS = 4000

_pool: MathVerifyPool | None = None
_pool_lock = threading.Lock()
_stats_lock = threading.Lock()
_stats = {"scored": 0, "failed": 0}


def _get_pool(size: int) -> MathVerifyPool:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = MathVerifyPool(size=size)
        return _pool


def extract_answer(completion: str) -> tuple[str | None, str]:
    """The text math-verify should read for ``completion``, or None with the reason it has no answer.

    Several *different* boxed answers are a hedge, not an answer: rewarding them would teach the policy
    to box every candidate (math-verify would also merge them into one set). Repeats of the same box
    are fine.
    """
    region = answer_region(completion)
    boxes = boxed_contents(region)
    if not boxes:
        return region[-MAX_TAIL_CHARS:], ""
    if len({normalize_box(b) for b in boxes}) > 1:
        return None, f"{len(boxes)} boxed answers that differ"
    if len(boxes[-1]) > MAX_ANSWER_CHARS:
        return None, f"boxed answer of {len(boxes[-1])} characters"
    return "\\boxed{" + boxes[-1] + "}", ""


def compute_score(
    data_source: str,
    solution_str: str,
    ground_truth: str,
    extra_info: dict | None = None,
    prompt_opens_think: bool = False,
    verify_timeout_s: float = 10.0,
    verify_workers: int = 2,
) -> dict:
    """verl reward function; see the module docstring.

    Args:
        prompt_opens_think: the chat template's generation prompt ends with ``<think>`` (DeepSeek-R1-Distill),
            so the completion carries only the closing tag. The recipes set it per model and the launch
            check compares it with the tokenizer's template.
        verify_timeout_s: wall-clock bound of one math-verify check.
        verify_workers: math-verify worker processes per reward-worker process (created on first use).
    """
    fmt = float(think_tags_matched(solution_str, prompt_opens_think))
    pred, rejection = extract_answer(solution_str)
    acc, failed = 0.0, False
    if pred is not None:
        verdict = _get_pool(verify_workers).check(str(ground_truth), pred, "open_rs", verify_timeout_s)
        acc = float(verdict.correct)
        if verdict.failed:
            failed = True
            _log_failure(data_source, verdict.status, verdict.detail, pred)
    with _stats_lock:
        _stats["scored"] += 1
    return {
        "score": acc + fmt,
        "acc": acc,
        "format": fmt,
        "answer_rejected": float(pred is None),
        "scoring_failed": float(failed),
    }


def _log_failure(data_source: str, status: str, detail: str, pred: str) -> None:
    with _stats_lock:
        _stats["failed"] += 1
        failed, scored = _stats["failed"], _stats["scored"] + 1
    logger.warning(
        "reward scoring failed (%s) for data_source=%s: %s; answer %.120r; %d failures in %d scored so far",
        status,
        data_source,
        detail,
        pred,
        failed,
        scored,
    )


def failure_counts() -> dict[str, int]:
    """Scored and failed checks in this process since import (for logs and tests)."""
    with _stats_lock:
        return dict(_stats)
