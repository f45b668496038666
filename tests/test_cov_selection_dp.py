"""The global selection of clip_cov_minibatch and kl_cov_minibatch through verl's micro-batching (fixed and
dynamic), ppo_loss and the patched engine entry point, on 1 and 2 gloo ranks: the selected tokens are those
of one call over the whole mini-batch, where verl's own clip_cov and kl_cov select another number; and what
each rank sends per mini-batch."""

from contextlib import contextmanager
from unittest import mock

import pytest
import torch

from tests.fake_engine import NUM_SEQUENCES, ROW_ID, train_step
from tests.ranks import run_on_ranks
from tests.test_cov_losses import BAD_CASES, two_rank_call

KNOBS = {
    "kl_cov_minibatch": {"kl_cov_ratio": 0.05},
    "clip_cov_minibatch": {"clip_cov_ratio": 0.05, "clip_cov_lb": 0.2, "clip_cov_ub": 5.0},
}
VERL_MODE = {"kl_cov_minibatch": "kl_cov", "clip_cov_minibatch": "clip_cov"}
# (micro_batch_size, dynamic_tokens, uneven shards) per rank.
VARIANTS = {
    1: [(1, None, False), (4, None, False), (None, 20, False)],
    2: [(2, None, False), (None, 20, False), (None, 1000, True)],
}


@contextmanager
def recorded_selection():
    """``(row id, position)`` of every token a clip/kl_cov_minibatch call selected in this rank, and the bytes
    of every table this rank contributed to a gather (the CW rounds, the selection round, the call checks)."""
    from verl.utils import tensordict_utils as tu

    from cw_verl import verl_losses
    from cw_verl.context import current_loss_call
    from cw_verl.selection import Selection

    record = {"selected": set(), "bytes": 0, "rounds": 0}
    members, group_gather = Selection.members, verl_losses.group_gather

    def recording_members(self, cov, valid, old_log_prob, advantages):
        selected = members(self, cov, valid, old_log_prob, advantages)
        rows = tu.get(current_loss_call().micro_batch, ROW_ID)
        record["selected"] |= {(rows[r], t) for r, t in selected.nonzero().tolist()}
        return selected

    def counting_gather(group):
        gather = group_gather(group)

        def counted(table):
            record["rounds"] += 1
            record["bytes"] += table.numel() * table.element_size()
            return gather(table)

        return counted

    with (
        mock.patch.object(Selection, "members", recording_members),
        mock.patch.object(verl_losses, "group_gather", counting_gather),
    ):
        yield record


@contextmanager
def verl_counts(verl_mode):
    """How many tokens each call of verl's own ``verl_mode`` selected in this rank (kl_cov: ``max(1, int(N ratio))``
    as it hands to ``torch.topk``; clip_cov: its share of zeroed tokens times the call's valid tokens)."""
    from verl.trainer.ppo import core_algos

    counts = []
    original = core_algos.POLICY_LOSS_REGISTRY[verl_mode]

    def recording(old_log_prob, log_prob, advantages, response_mask, *args, **kwargs):
        topk = torch.topk

        def recording_topk(values, k, *a, **kw):
            counts.append(k)
            return topk(values, k, *a, **kw)

        with mock.patch.object(torch, "topk", recording_topk):
            loss, metrics = original(old_log_prob, log_prob, advantages, response_mask, *args, **kwargs)
        if verl_mode == "clip_cov":
            counts.append(round(metrics["actor/pg_clipfrac"] * int(response_mask.sum())))
        return loss, metrics

    with mock.patch.dict(core_algos.POLICY_LOSS_REGISTRY, {verl_mode: recording}):
        yield counts


def selections(rank, world_size, loss_mode, variants):
    """Per variant: the tokens this rank's calls selected, its calls' metrics and bytes sent; and verl's own mode's
    per-call counts on the same variant."""
    out = {}
    for micro_batch_size, dynamic_tokens, uneven in variants:
        with recorded_selection() as record:
            step = train_step(
                rank,
                world_size,
                loss_mode,
                micro_batch_size,
                dynamic_tokens,
                policy_loss=KNOBS[loss_mode],
                uneven=uneven,
            )
        with verl_counts(VERL_MODE[loss_mode]) as counts:
            train_step(
                rank,
                world_size,
                VERL_MODE[loss_mode],
                micro_batch_size,
                dynamic_tokens,
                policy_loss=KNOBS[loss_mode],
                uneven=uneven,
            )
        out[(micro_batch_size, dynamic_tokens, uneven)] = {
            **record,
            "calls": len(step["micro_batch_sizes"]),
            "metrics": step["metrics"],
            "grads": step["grads"],
            "verl_counts": counts,
        }
    return out


def both_modes(rank, world_size, variants):
    out = {loss_mode: selections(rank, world_size, loss_mode, variants) for loss_mode in KNOBS}
    out["bad input"] = {case: two_rank_call(rank, world_size, case) for case in BAD_CASES}
    return out


@pytest.fixture(scope="module")
def two_ranks():
    """One launch of two gloo ranks for both loss modes (a launch costs more than the runs)."""
    return run_on_ranks(both_modes, 2, VARIANTS[2])


@pytest.fixture(scope="module", params=list(KNOBS))
def runs(request, two_ranks):
    loss_mode = request.param
    reference = selections(0, 1, loss_mode, [(NUM_SEQUENCES, None, False)])[(NUM_SEQUENCES, None, False)]
    results = {1: [selections(0, 1, loss_mode, VARIANTS[1])], 2: [r[loss_mode] for r in two_ranks]}
    return loss_mode, reference, results


def test_the_selected_tokens_are_the_one_call_set_for_any_micro_batching_and_dp_size(runs):
    loss_mode, reference, results = runs
    k = reference["metrics"][0]["actor/cov_select/k"]
    assert (
        reference["calls"] == 1 and len(reference["selected"]) == reference["metrics"][0]["actor/cov_select/selected"]
    )
    assert len(reference["selected"]) == k > 1  # the knobs select several tokens, all of them in scope
    for world_size, per_rank in results.items():
        for variant in VARIANTS[world_size]:
            union = set().union(*(r[variant]["selected"] for r in per_rank))
            assert sum(len(r[variant]["selected"]) for r in per_rank) == len(union)  # no token twice
            assert union == reference["selected"], (world_size, variant)
            if not variant[2]:  # the uneven shards hold one call each (6 and 10 rows)
                assert max(r[variant]["calls"] for r in per_rank) > 1
            for r in per_rank:
                torch.testing.assert_close(r[variant]["grads"], reference["grads"], rtol=1e-12, atol=1e-15)
                # the selection metrics are the mini-batch's, the same in every call on every rank
                for metrics in r[variant]["metrics"]:
                    for name in ("k", "eligible", "selected"):
                        key = f"actor/cov_select/{name}"
                        assert metrics[key] == reference["metrics"][0][key], key


def test_verls_own_mode_selects_another_number_of_tokens_on_the_same_variants(runs):
    """The negative control (verl issue #7829): the per-call count moves with the micro-batching."""
    loss_mode, reference, results = runs
    one_call = sum(reference["verl_counts"])
    assert one_call == len(reference["selected"])  # one call over the whole mini-batch: verl's count is ours
    for world_size, per_rank in results.items():
        for variant in VARIANTS[world_size]:
            verl_total = sum(sum(r[variant]["verl_counts"]) for r in per_rank)
            if loss_mode == "kl_cov_minibatch":
                assert verl_total != one_call, (world_size, variant)
    if loss_mode == "clip_cov_minibatch":
        # Clip-Cov's count is min(k_call, candidates in the call) per call: with one sequence per call it differs.
        verl_total = sum(results[1][0][(1, None, False)]["verl_counts"])
        assert verl_total != one_call


def test_each_rank_sends_o_of_k_plus_calls_numbers_per_mini_batch(runs):
    """Bytes per rank per mini-batch = 8 (23 + 2 (k + 1) + calls) with two ranks: the three CW rounds (a
    [2, 9], a [1, 4] and a [1, 1] float64 table), the selection round ([k + 1, 2]) and one float64 per call."""
    _, reference, results = runs
    k = int(reference["metrics"][0]["actor/cov_select/k"])
    for r in results[2]:
        for variant in VARIANTS[2]:
            calls = r[variant]["calls"]
            assert r[variant]["rounds"] == 4 + calls
            assert r[variant]["bytes"] == 8 * (23 + 2 * (k + 1) + calls)


def test_bad_input_on_one_rank_stops_both_ranks_with_a_clear_error_and_an_empty_rank_takes_part(two_ranks):
    results = [r["bad input"] for r in two_ranks]
    nan_adv = [r["nan_adv"]["error"] for r in results]
    assert all("non-finite advantages" in e for e in nan_adv) and "rank 1: 1" in nan_adv[0]
    assert all("non-finite old log-prob" in r["nan_old"]["error"] for r in results)
    assert "old_log_prob has shape" in results[1]["shape"]["error"]
    assert "rank(s) [1]" in results[0]["shape"]["error"]
    empty = [r["empty"] for r in results]
    k = max(int(0.05 * empty[0]["tokens"]), 1)  # rank 1 holds no valid token: N is rank 0's
    assert empty[1]["tokens"] == 0
    for r in empty:
        assert r["metrics"]["actor/cov_select/k"] == k == r["metrics"]["actor/cov_select/selected"]
