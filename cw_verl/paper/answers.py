"""Text-level answer handling shared by the data builder, the reward and the evaluation.

Pure Python (no math-verify, no sympy) so that it is cheap to import and to test.
"""

from __future__ import annotations

import re

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

# `\boxed{...}` and `\boxed {...}`; `\fbox` is what some models emit for the same purpose.
_BOXED_START = re.compile(r"\\(?:boxed|fbox)\s*\{")


def boxed_contents(text: str) -> list[str]:
    """Contents of every complete ``\\boxed{...}`` in ``text``, in order, with nested braces kept.

    Escaped braces (``\\{``, ``\\}``) do not count for nesting. A box whose closing brace never comes
    (e.g. a completion cut off at the length limit) is not an answer and is skipped.
    """
    found = []
    for match in _BOXED_START.finditer(text):
        depth, i = 1, match.end()
        while i < len(text) and depth:
            ch = text[i]
            if ch == "\\":
                i += 2
                continue
            depth += ch == "{"
            depth -= ch == "}"
            i += 1
        if depth == 0:
            found.append(text[match.end() : i - 1])
    return found


def last_boxed(text: str) -> str | None:
    """The last complete boxed answer, the convention of MATH-style solutions."""
    boxes = boxed_contents(text)
    return boxes[-1] if boxes else None


def think_tags_matched(completion: str, prompt_opens_think: bool) -> bool:
    """Paper, App. C: format reward 1 iff the output has properly matched <think> tags.

    "Properly matched" here: exactly one opening and one closing tag, the opening one first. When the
    chat template's generation prompt already ends with ``<think>`` (DeepSeek-R1-Distill), that tag is
    part of the model's output as far as the format goes, and the completion itself must not open a
    second one.
    """
    text = (THINK_OPEN if prompt_opens_think else "") + completion
    if text.count(THINK_OPEN) != 1 or text.count(THINK_CLOSE) != 1:
        return False
    return text.index(THINK_OPEN) < text.index(THINK_CLOSE)


def answer_region(completion: str) -> str:
    """Where the final answer is looked for: after the last ``</think>`` if there is one.

    Boxed expressions inside the reasoning are drafts, not the answer; without a closing tag (a
    format failure, scored separately) the whole completion is searched, as Open-RS did.
    """
    cut = completion.rfind(THINK_CLOSE)
    return completion if cut < 0 else completion[cut + len(THINK_CLOSE) :]


def normalize_box(content: str) -> str:
    """Whitespace-insensitive form used to decide whether two boxed answers are the same answer."""
    return "".join(content.split())
