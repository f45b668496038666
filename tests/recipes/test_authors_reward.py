"""The authors' reward rules (cw_verl.paper.authors_reward), the scoring failures that are no longer silent
zeros (a gold math-verify only keeps as text, verification errors), and the per-step training metrics that
carry the reward's diagnostics (patches/reward_metrics.py)."""

from __future__ import annotations

import pytest

from cw_verl.paper import authors_reward, reward

SOLUTION = "By AM-GM, $xy \\le 25$, with equality at $x=y=5$. The answer is $\\boxed{25}$."

# (id, completion, solution in extra_info, ground truth, accuracy, format)
CASES = [
    ("boxed-after-thinking", "x\n</think>\nSo \\boxed{25}.", SOLUTION, "25", 1, 1),
    ("whole-completion-is-read", "\\boxed{25} without closing the thought", SOLUTION, "25", 1, 0),
    ("wrong", "x\n</think>\n\\boxed{24}", SOLUTION, "25", 0, 1),
    ("no-anchor-no-guess", "x\n</think>\nthe answer is 25", SOLUTION, "25", 0, 1),
    ("format-needs-newlines", "x</think>\\boxed{25}", SOLUTION, "25", 1, 0),
    ("format-exactly-once", "a\n</think>\nb\n</think>\n\\boxed{25}", SOLUTION, "25", 1, 0),
    ("set-answer", "x\n</think>\n\\boxed{\\{2,3\\}}", "so $x \\in \\boxed{\\{2, 3\\}}$", "2, 3", 1, 1),
    ("eval-rows-use-the-answer", "x\n</think>\n\\boxed{\\frac{1}{2}}", None, "0.5", 1, 1),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("format_reward", [True, False])
def test_authors_rules(case, format_reward):
    _, completion, solution, gold, acc, fmt = case
    extra = {} if solution is None else {"solution": solution}
    result = authors_reward.compute_score("open_rs", completion, gold, extra, format_reward=format_reward)
    assert result == {
        "score": acc + (fmt if format_reward else 0),
        "acc": acc,
        "format": fmt,
        "scoring_failed": 0.0,
        "gold_is_text": 0.0,
    }


def test_text_only_gold_is_compared_as_the_authors_did_and_flagged():
    result = authors_reward.compute_score("open_rs", "\\boxed{x}", "", {"solution": "The answer is \\boxed{hello ??}"})
    assert result["gold_is_text"] == 1 and result["scoring_failed"] == 0 and result["acc"] == 0


def test_unparseable_solution_is_a_counted_failure():
    before = reward.failure_counts()["failed"]
    result = authors_reward.compute_score("open_rs", "\\boxed{1}", "", {"solution": "no answer anywhere"})
    assert result["scoring_failed"] == 1 and result["acc"] == 0
    assert reward.failure_counts()["failed"] == before + 1


def test_paper_reward_no_longer_scores_a_text_only_gold_as_a_plain_zero():
    # math-verify keeps "hello ??" as its raw string: bool(parse(...)) is true, yet nothing was parsed.
    result = reward.compute_score("t", "</think> \\boxed{5}", "hello ??", {}, prompt_opens_think=True)
    assert result["scoring_failed"] == 1 and result["acc"] == 0


def test_verification_errors_are_failures_not_zeros(monkeypatch):
    """math-verify's verify returns False on an internal error unless raise_on_error=True: the worker must ask
    for the error, and report it, instead of scoring a plain 0. Run the worker loop in this process with a
    verify that fails the way math-verify does."""
    import io
    import json
    import sys

    import math_verify

    from cw_verl.paper import mathverify_pool

    def failing_verify(gold, pred, *args, raise_on_error=False, **kwargs):
        if raise_on_error:
            raise TypeError("cannot compare Matrix and FiniteSet")
        return False

    monkeypatch.setattr(math_verify, "verify", failing_verify)
    jobs = [{"gold": "5", "pred": "\\boxed{5}", "preset": preset} for preset in ("open_rs", "authors")]
    stdin = io.TextIOWrapper(io.BytesIO("".join(json.dumps(job) + "\n" for job in jobs).encode()))
    stdout = io.TextIOWrapper(io.BytesIO())
    monkeypatch.setattr(sys, "stdin", stdin)
    monkeypatch.setattr(sys, "stdout", stdout)
    mathverify_pool._serve()
    stdout.flush()
    replies = [json.loads(line) for line in stdout.buffer.getvalue().decode().splitlines()]
    assert replies[0] == {"ready": True}
    assert [reply.get("error", "").split(":")[0] for reply in replies[1:]] == ["TypeError", "TypeError"]


# --- training metrics --------------------------------------------------------------------------------------------


def test_reward_rates_average_the_numeric_extra_keys():
    from cw_verl.patches.reward_metrics import reward_rates

    rates = reward_rates(
        [
            {"reward_extra_info": {"acc": 1.0, "format": 1.0, "scoring_failed": 0.0, "note": "x"}},
            {"reward_extra_info": {"acc": 0.0, "format": 1.0, "scoring_failed": 1.0}},
            {},
            None,
        ]
    )
    assert rates == {
        "reward/acc/mean": 0.5,
        "reward/format/mean": 1.0,
        "reward/scoring_failed/mean": 0.5,
        "reward/scoring_failed/count": 1.0,
    }


def test_v1_training_metrics_carry_the_reward_diagnostics():
    from types import SimpleNamespace

    from cw_verl.patches import reward_metrics
    from omegaconf import OmegaConf
    from tensordict import TensorDict
    from tensordict.tensorclass import NonTensorStack
    from verl.utils.transferqueue_utils import KVBatchMeta

    seen = {}

    class Trainer:
        def _compute_metrics(self, batch, metrics, timing_raw, global_steps, epoch):  # verl's, reduced
            metrics["critic/score/mean"] = 1.5

    def kv_batch_get(keys, partition_id, select_fields):
        seen["keys"], seen["fields"] = keys, select_fields
        infos = [{"reward_extra_info": {"acc": float(i % 2), "scoring_failed": 0.0}} for i in range(len(keys))]
        return TensorDict({"extra_fields": NonTensorStack(*infos)}, batch_size=[len(keys)])

    reward_metrics.patch(SimpleNamespace(PPOTrainer=Trainer, tq=SimpleNamespace(kv_batch_get=kv_batch_get)))
    trainer = Trainer()
    batch = KVBatchMeta(partition_id="train", keys=["a_0_0", "a_1_0", "pad_0_0"], tags=[{}, {}, {"is_padding": True}])
    for path, expect in (("pkg://cw_verl.paper.authors_reward", True), ("pkg://elsewhere.reward", False)):
        trainer.config = OmegaConf.create({"reward": {"custom_reward_function": {"path": path}}})
        metrics = {}
        trainer._compute_metrics(batch, metrics, {}, global_steps=1, epoch=0)
        assert metrics["critic/score/mean"] == 1.5
        assert ("reward/acc/mean" in metrics) == expect
    assert seen["keys"] == ["a_0_0", "a_1_0"] and seen["fields"] == ["extra_fields"]  # padding samples left out


def test_verl_v1_code_the_metrics_patch_relies_on():
    import inspect

    import verl  # noqa: F401
    from verl.trainer.ppo.v1 import agent_loop_tq, trainer_base

    method = trainer_base.PPOTrainer._compute_metrics
    assert getattr(method, "_cw_verl_reward_metrics", False)
    assert list(inspect.signature(method.__wrapped__).parameters) == [
        "self",
        "batch",
        "metrics",
        "timing_raw",
        "global_steps",
        "epoch",
    ]
    # verl's own read of per-sample extra fields, and where the reward loop's extra keys land in training.
    assert 'select_fields=["extra_fields"]' in inspect.getsource(method.__wrapped__)
    assert 'output.extra_fields["reward_extra_info"]' in inspect.getsource(agent_loop_tq)
    assert "self._compute_metrics(batch, metrics" in inspect.getsource(trainer_base.PPOTrainer.fit)
