"""The tiny task's reward for verl's reward workers (``reward.custom_reward_function.path=pkg://cw_verl.demo.reward``).

verl's reward managers decode the valid response with ``skip_special_tokens=True`` before calling
this, so the text is the response up to its ``<eos>`` with ``<pad>``/``<eos>`` removed. A response
cut at the length limit without ``<eos>`` can only equal the answer if the limit fell right after
it, which :attr:`cw_verl.demo.task.ReversalTask.max_response_tokens` (one spare token) prevents.
Unlike :func:`cw_verl.demo.task.reward`, which scores token ids, a ``<pad>`` emitted inside a response
is invisible here; the warm-started policy practically never emits one. Pure string comparison:
bounded time, nothing to fail silently.
"""

from __future__ import annotations


def compute_score(data_source: str, solution_str: str, ground_truth: str, extra_info: dict | None = None) -> float:
    """1.0 iff the decoded response is exactly the reversed digits, else 0.0.

    Args:
        data_source: the row's ``data_source`` (only ``digit_reversal`` is scored).
        solution_str: the decoded response.
        ground_truth: the expected answer (``reward_model.ground_truth``).
        extra_info: the row's ``extra_info`` (unused).

    Returns:
        float: the reward.
    """
    if data_source != "digit_reversal":
        raise ValueError(f"cw_verl.demo.reward scores data_source 'digit_reversal' only, got {data_source!r}")
    return 1.0 if solution_str == ground_truth else 0.0
