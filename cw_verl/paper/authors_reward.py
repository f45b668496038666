"""The CW-GRPO authors' reward rules (their released ``src/open_r1/rewards.py``) as a verl reward function.

score = accuracy + format (their 1.5B recipe, weights 1 and 1) or accuracy alone (their 7B recipe):

* accuracy: the gold is parsed from the problem's full *solution* text (math-verify's default targets,
  first match), the prediction from the whole completion (LaTeX, boxed first, equations normalised, no
  unanchored guesses, first match), then math-verify's equivalence. Their code returns ``None`` when the
  gold does not parse or verification raises, and their vendored trl then fails building a float tensor
  from the rewards (no sample is skipped: a step that met it would have stopped the run); here it scores 0 with
  ``scoring_failed=1``, logged and counted. A gold that math-verify can only keep
  as text is still compared, as they did, and flagged ``gold_is_text=1``.
* format: 1 when the completion contains ``"\\n</think>\\n"`` exactly once.

Configure with ``reward.custom_reward_function.path=pkg://cw_verl.paper.authors_reward``, ``.name=compute_score``
and ``+reward.custom_reward_function.reward_kwargs.format_reward=true|false``. The gold solution comes from
``extra_info["solution"]`` (written by ``python -m cw_verl.paper.data`` for Open-RS); rows without one (the
evaluation sets) use the boxed ground-truth answer.
"""

from __future__ import annotations

from cw_verl.paper.reward import _get_pool, _log_failure, _stats, _stats_lock

FORMAT_MARK = "\n</think>\n"


def compute_score(
    data_source: str,
    solution_str: str,
    ground_truth: str,
    extra_info: dict | None = None,
    format_reward: bool = True,
    verify_timeout_s: float = 10.0,
    verify_workers: int = 2,
) -> dict:
    """verl reward function; see the module docstring.

    Args:
        format_reward: add the ``"\\n</think>\\n"``-exactly-once format reward (their 1.5B recipe); their
            7B recipe trains on accuracy alone.
        verify_timeout_s: wall-clock bound of one math-verify check.
        verify_workers: math-verify worker processes per reward-worker process (created on first use).
    """
    solution = (extra_info or {}).get("solution")
    gold = solution if isinstance(solution, str) and solution.strip() else "\\boxed{" + str(ground_truth) + "}"
    verdict = _get_pool(verify_workers).check(gold, solution_str, "authors", verify_timeout_s)
    if verdict.failed:
        _log_failure(data_source, verdict.status, verdict.detail, solution_str[-200:])
    with _stats_lock:
        _stats["scored"] += 1
    acc = float(verdict.correct)
    fmt = float(solution_str.count(FORMAT_MARK) == 1)
    return {
        "score": acc + (fmt if format_reward else 0.0),
        "acc": acc,
        "format": fmt,
        "scoring_failed": float(verdict.failed),
        "gold_is_text": float(verdict.gold_is_text),
    }
