"""The demo's task: reverse a string of digits, scored by exact match.

A prompt is ``R<digits>=`` (e.g. ``R4821=``) and the only correct response is the digits reversed,
then end-of-sequence (``1284<eos>``). Every character is one token (see
:func:`cw_verl.cpu.tiny_model.build_char_tokenizer`), so the reward is computed on token ids and
cannot be fooled by detokenisation: 1.0 when the response is exactly the expected ids followed by
``<eos>``, else 0.0. Scoring is a list comparison: bounded time, no failure mode to hide.

Problems are drawn from ``numpy.random.default_rng`` seeded by (seed, stream, index), so every arm of
a run sees the same prompts at the same step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ALPHABET = "R=0123456789"
PAD_ID, EOS_ID = 0, 1
_CHAR_TO_ID = {ch: i + 2 for i, ch in enumerate(ALPHABET)}
_ID_TO_CHAR = {i: ch for ch, i in _CHAR_TO_ID.items()}

# Separate random streams for prompts the policy trains on and for the warm-start / evaluation sets.
STREAM_RL, STREAM_WARMSTART, STREAM_EVAL = 0, 1, 2


@dataclass(frozen=True)
class Problem:
    digits: str

    @property
    def prompt(self) -> str:
        return f"R{self.digits}="

    @property
    def answer(self) -> str:
        return self.digits[::-1]

    @property
    def prompt_ids(self) -> list[int]:
        return encode(self.prompt)

    @property
    def answer_ids(self) -> list[int]:
        """The expected response, ``<eos>`` included."""
        return encode(self.answer) + [EOS_ID]


@dataclass(frozen=True)
class ReversalTask:
    min_digits: int = 3
    max_digits: int = 7

    def __post_init__(self) -> None:
        if not 1 <= self.min_digits <= self.max_digits:
            raise ValueError(f"need 1 <= min_digits <= max_digits, got {self.min_digits}, {self.max_digits}")

    @property
    def max_response_tokens(self) -> int:
        # Room for the longest answer and its <eos>, plus one token so that an over-long response
        # is visible as such instead of being cut at exactly the right length.
        return self.max_digits + 2

    def sample(self, count: int, seed: int, stream: int, index: int) -> list[Problem]:
        rng = np.random.default_rng([seed, stream, index])
        lengths = rng.integers(self.min_digits, self.max_digits + 1, size=count)
        return [Problem("".join(str(d) for d in rng.integers(0, 10, size=n))) for n in lengths]


def encode(text: str) -> list[int]:
    try:
        return [_CHAR_TO_ID[ch] for ch in text]
    except KeyError as error:
        raise ValueError(f"character {error.args[0]!r} is not in the task alphabet {ALPHABET!r}") from None


def decode(ids: list[int]) -> str:
    """Readable text of token ids, for logs (``<eos>`` shown, padding dropped)."""
    out = []
    for i in ids:
        if i == PAD_ID:
            continue
        out.append("<eos>" if i == EOS_ID else _ID_TO_CHAR.get(i, "?"))
    return "".join(out)


def response_length(ids: list[int]) -> int:
    """Tokens the policy generated: up to and including the first ``<eos>``, else all of them.

    ``<pad>`` is an ordinary token while sampling (the policy may emit it and is scored on it); it
    only marks padding after the ``<eos>`` that ended a response.
    """
    for position, token in enumerate(ids):
        if token == EOS_ID:
            return position + 1
    return len(ids)


def trim_response(ids: list[int]) -> list[int]:
    return list(ids[: response_length(ids)])


def reward(problem: Problem, response_ids: list[int]) -> float:
    """1.0 iff the response is exactly the reversed digits followed by ``<eos>``."""
    return 1.0 if trim_response(response_ids) == problem.answer_ids else 0.0
