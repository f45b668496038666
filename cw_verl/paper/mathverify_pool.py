"""math-verify with a wall-clock bound that holds in any thread.

math-verify bounds ``parse``/``verify`` with ``signal.alarm``, which only works in a process's main
thread; verl scores in executor threads, where those calls raise ``ValueError`` (and a broad
``except`` upstream turns that into a silent 0). With the alarms disabled, a pathological answer can
hang the scorer forever. So each check runs, alarms disabled, in a persistent worker subprocess
(``python -m cw_verl.paper.mathverify_pool``) that the calling thread waits on with a deadline; a worker
that misses it is killed and replaced. Every outcome other than a finished comparison is reported as a
status, never folded into "incorrect".

Workers are plain subprocesses (fork+exec), not ``multiprocessing`` children: they are safe to start
from a multithreaded Ray worker and never re-import the parent's ``__main__``.
"""

from __future__ import annotations

import json
import os
import queue
import select
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

# Extraction presets (names travel over the pipe; the configs are built in the worker).
#   "open_rs":   Open-RS's trl accuracy reward: boxed answers first, no unanchored guesses.
#   "lighteval": Open-RS's lighteval tasks: expression or LaTeX answers, boxed first, 5-digit rounding.
#   "authors":   the CW-GRPO authors' accuracy reward (their src/open_r1/rewards.py): the gold is read from
#                a full solution text (math-verify's default targets, first match), the prediction from the
#                whole completion (LaTeX only, boxed first, equations normalised, no unanchored guesses).
PRESETS = ("open_rs", "lighteval", "authors")

_MODULE = "cw_verl.paper.mathverify_pool"


@dataclass(frozen=True)
class Verdict:
    """Outcome of one check. ``status`` is "ok" only when the comparison ran to completion."""

    status: str  # "ok" | "gold_unparseable" | "timeout" | "worker_error"
    correct: bool = False
    pred_parsed: bool = False
    detail: str = ""
    # The gold parsed to text only (math-verify's fallback): "authors" still compares it, as their code did.
    gold_is_text: bool = False

    @property
    def failed(self) -> bool:
        return self.status != "ok"


class _WorkerGone(Exception):
    pass


class _Worker:
    def __init__(self, startup_timeout_s: float):
        # stderr is inherited so a crashing worker's traceback lands in the caller's log.
        self.proc = subprocess.Popen(
            [sys.executable, "-m", _MODULE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,
        )
        self._buf = b""
        try:
            ready = self._read_line(time.monotonic() + startup_timeout_s)
        except (TimeoutError, _WorkerGone) as e:
            self.kill()
            raise RuntimeError(f"math-verify worker ({_MODULE}) failed to start: {e!r}") from e
        if ready != {"ready": True}:
            self.kill()
            raise RuntimeError(f"math-verify worker ({_MODULE}) sent {ready!r} instead of its ready line")

    def request(self, job: dict, timeout_s: float) -> dict:
        try:
            self.proc.stdin.write(json.dumps(job).encode() + b"\n")
        except (BrokenPipeError, OSError) as e:
            raise _WorkerGone(f"worker pipe closed: {e}") from e
        return self._read_line(time.monotonic() + timeout_s)

    def _read_line(self, deadline: float) -> dict:
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            readable, _, _ = select.select([fd], [], [], left)
            if not readable:
                raise TimeoutError
            chunk = os.read(fd, 65536)
            if not chunk:
                raise _WorkerGone(f"worker exited with code {self.proc.wait()}")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


class MathVerifyPool:
    """At most ``size`` concurrent checks, each bounded by ``timeout_s`` seconds of worker time.

    Thread-safe. A caller may additionally wait for a free worker; that wait is bounded by the other
    callers' bounded checks.
    """

    def __init__(self, size: int = 2, startup_timeout_s: float = 120.0):
        if size < 1:
            raise ValueError(f"pool size must be >= 1, got {size}")
        self.size = size
        self.startup_timeout_s = startup_timeout_s
        self._slots = threading.BoundedSemaphore(size)
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()

    def check(self, gold: str, pred: str, preset: str = "open_rs", timeout_s: float = 10.0) -> Verdict:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; expected one of {PRESETS}")
        job = {"gold": gold, "pred": pred, "preset": preset}
        with self._slots:
            try:
                worker = self._idle.get_nowait()
            except queue.Empty:
                # Start-up (imports of sympy & co., ~1-2 s) is not charged to the check's timeout.
                worker = _Worker(self.startup_timeout_s)
            try:
                reply = worker.request(job, timeout_s)
            except TimeoutError:
                worker.kill()
                return Verdict("timeout", detail=f"no result within {timeout_s:g} s; worker killed")
            except _WorkerGone as e:
                worker.kill()
                return Verdict("worker_error", detail=str(e))
            self._idle.put(worker)
        if "error" in reply:
            return Verdict("worker_error", detail=reply["error"])
        if not reply["gold_parsed"]:
            return Verdict("gold_unparseable", detail=f"math-verify cannot parse the ground truth {gold!r}")
        return Verdict(
            "ok",
            correct=reply["correct"],
            pred_parsed=reply["pred_parsed"],
            gold_is_text=reply.get("gold_is_text", False),
        )

    def close(self) -> None:
        while True:
            try:
                self._idle.get_nowait().kill()
            except queue.Empty:
                return


def _serve() -> None:
    """Worker loop: one JSON job per stdin line, one JSON reply per stdout line."""
    import logging

    from latex2sympy2_extended import NormalizationConfig
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    # The wall-clock bound is the parent's deadline; math-verify's note that its own timeouts are off
    # is expected here and would only add noise to the trainer's log.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    logging.getLogger("latex2sympy2_extended").setLevel(logging.ERROR)

    gold_targets = [LatexExtractionConfig()]
    # equations=True still keeps only the last side of "a = b = c" in latex2sympy2_extended 1.x, which warns
    # on every call that it is deprecated: the warning is silenced below, the behaviour kept.
    authors_pred = LatexExtractionConfig(
        normalization_config=NormalizationConfig(
            nits=False, malformed_operators=False, basic_latex=True, equations=True, boxed="all", units=True
        ),
        boxed_match_priority=0,
        try_extract_without_anchor=False,
    )
    pred_targets = {
        "open_rs": [
            LatexExtractionConfig(
                normalization_config=NormalizationConfig(
                    nits=False, malformed_operators=False, basic_latex=True, boxed="all", units=True
                ),
                boxed_match_priority=0,
                try_extract_without_anchor=False,
            )
        ],
        "lighteval": [ExprExtractionConfig(), LatexExtractionConfig(boxed_match_priority=0)],
        "authors": [authors_pred],
    }
    pred_mode = {"open_rs": "first_match", "lighteval": "any_match", "authors": "first_match"}
    rounding = {"open_rs": 6, "lighteval": 5, "authors": 6}

    out = sys.stdout.buffer
    out.write(b'{"ready": true}\n')
    out.flush()
    for line in sys.stdin.buffer:
        try:
            job = json.loads(line)
            preset = job["preset"]
            if preset == "authors":
                # A full solution text, read as the authors did: default targets, first match.
                gold = parse(job["gold"], extraction_mode="first_match", parsing_timeout=None, raise_on_error=True)
            else:
                # Ground truths are bare answers ("\frac{1}{2}", "$x=1$", "34"); boxing them makes LaTeX
                # extraction take the whole answer, as it does for MATH-style gold solutions.
                gold = parse("\\boxed{" + job["gold"] + "}", gold_targets, parsing_timeout=None, raise_on_error=True)
            pred = parse(
                job["pred"],
                pred_targets[preset],
                extraction_mode=pred_mode[preset],
                parsing_timeout=None,
                raise_on_error=True,
            )
            # math-verify falls back to the raw matched string when it cannot build an expression, so a
            # non-empty result is not a parsed gold: only an expression is.
            gold_is_text = bool(gold) and all(isinstance(g, str) for g in gold)
            gold_parsed = bool(gold) and (preset == "authors" or not gold_is_text)
            correct = (
                gold_parsed
                and bool(pred)
                and verify(gold, pred, float_rounding=rounding[preset], timeout_seconds=None, raise_on_error=True)
            )
            reply = {
                "gold_parsed": gold_parsed,
                "gold_is_text": gold_is_text,
                "pred_parsed": bool(pred),
                "correct": bool(correct),
            }
        except Exception as e:  # reported to the caller as a worker_error, never as "incorrect"
            reply = {"error": f"{type(e).__name__}: {e}"[:500]}
        out.write(json.dumps(reply).encode() + b"\n")
        out.flush()


if __name__ == "__main__":
    _serve()
