"""Held-out pass@k (cw_verl.demo.passk): the unbiased estimator against enumeration, and the dump reader."""

import itertools
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cw_verl.demo.passk import dump_pass_at_k, pass_at_k, run_pass_at_k


@given(st.lists(st.booleans(), min_size=1, max_size=9), st.data())
def test_pass_at_k_is_the_share_of_k_subsets_holding_a_correct_sample(outcomes, data):
    k = data.draw(st.integers(1, len(outcomes)))
    subsets = list(itertools.combinations(outcomes, k))
    expected = sum(any(subset) for subset in subsets) / len(subsets)
    assert pass_at_k(len(outcomes), sum(outcomes), k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_refuses_impossible_counts():
    for samples, correct, k in ((4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)):
        with pytest.raises(ValueError):
            pass_at_k(samples, correct, k)


def _dump(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_dump_groups_samples_by_prompt(tmp_path):
    rows = [{"input": "R12=", "acc": a, "score": 0.0} for a in (1.0, 0.0, 0.0, 0.0)]
    rows += [{"input": "R345=", "acc": a, "score": 0.0} for a in (0.0, 0.0, 0.0, 0.0)]
    _dump(tmp_path / "0.jsonl", rows)
    # ``acc`` decides over ``score``; pass@1 = mean over prompts of c/n, pass@4 = share of prompts solved.
    assert dump_pass_at_k(tmp_path / "0.jsonl", (1, 4)) == {1: pytest.approx(0.125), 4: pytest.approx(0.5)}
    _dump(tmp_path / "5.jsonl", [{**row, "acc": 1.0} for row in rows])
    (tmp_path / "notes.jsonl").write_text("")
    assert run_pass_at_k(tmp_path, (1,)) == {0: {1: pytest.approx(0.125)}, 5: {1: pytest.approx(1.0)}}


def test_dump_without_acc_uses_the_score_and_refuses_too_few_samples(tmp_path):
    _dump(tmp_path / "1.jsonl", [{"input": "R1=", "score": s} for s in (1.0, 0.0)])
    assert dump_pass_at_k(tmp_path / "1.jsonl", (1, 2)) == {1: 0.5, 2: 1.0}
    with pytest.raises(ValueError, match="pass@4 needs at least 4 samples"):
        dump_pass_at_k(tmp_path / "1.jsonl", (1, 4))
    (tmp_path / "2.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no validation samples"):
        dump_pass_at_k(tmp_path / "2.jsonl", (1,))


def test_harness_validation_gives_accuracy_over_all_samples_and_pass_at_k_per_problem():
    """cw_verl.demo.loop._validate on a stand-in rollout: 4 problems x 4 samples, rows grouped per problem."""
    from types import SimpleNamespace

    from cw_verl.demo.loop import RunConfig, _validate
    from cw_verl.demo.runlog import PASS_AT_K_KEY

    outcomes = [[1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1], [0, 1, 1, 0]]
    calls = []

    class Rollout:
        def sample(self, problems, group_size, seed, step):
            calls.append((len(problems), group_size, seed, step))
            return SimpleNamespace(rewards=[float(r) for problem in outcomes for r in problem])

    cfg = RunConfig(model_path="unused", out_dir="unused", val_problems=4, val_samples=4, seed=5)
    assert cfg.pass_at_ks == (1, 2, 4) and cfg.val_key == "val-core/digit_reversal/acc/mean@4"
    metrics = _validate(Rollout(), cfg)
    assert calls == [(4, 4, 5, 0)]
    assert metrics[cfg.val_key] == pytest.approx(7 / 16)
    expected = {k: sum(pass_at_k(4, sum(o), k) for o in outcomes) / 4 for k in (1, 2, 4)}
    assert {k: metrics[PASS_AT_K_KEY.format(k=k)] for k in (1, 2, 4)} == pytest.approx(expected)
    assert metrics[PASS_AT_K_KEY.format(k=4)] == pytest.approx(3 / 4)  # one problem never solved
    assert RunConfig(model_path="m", out_dir="o", val_samples=8).pass_at_ks == (1, 2, 4, 8)
    with pytest.raises(ValueError, match="val_samples"):
        RunConfig(model_path="m", out_dir="o", val_samples=0).validate(1)
