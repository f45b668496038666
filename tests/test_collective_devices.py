"""Every collective of the CW losses runs on the device of the tensors it reduces, over the engine's DP group,
and the cross-rank merge adds in an order that does not depend on scheduling.

On a GPU cluster the engine's data-parallel group may have only an NCCL backend, which refuses CPU tensors;
this CPU box cannot run NCCL, so a recorder checks the device of every tensor handed to a collective from
cw_verl's code, on 2 gloo ranks, through verl's ``ppo_loss`` and the patched ``BaseEngine.train_batch``.
Inside the loss, factory functions default to the ``meta`` device: a tensor made without naming a device
(as the authors' error flag was) lands there and fails the check, instead of passing as "cpu".
"""

from __future__ import annotations

import contextlib
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fake_engine import GROUP_SIZE
from tests.ranks import run_on_ranks

COLLECTIVES = ("all_gather", "all_reduce", "all_gather_into_tensor", "broadcast", "reduce_scatter_tensor", "gather")


def _tensors(value):
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    return []


@contextlib.contextmanager
def recording_collectives():
    """Records each collective called from cw_verl's code: (name, caller, devices of its tensors, group size)."""
    import torch.distributed as dist

    seen, originals = [], {name: getattr(dist, name) for name in COLLECTIVES}

    def recorder(name):
        def record(*args, **kwargs):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith("cw_verl"):
                devices = sorted({str(t.device) for t in _tensors(list(args) + list(kwargs.values()))})
                group = kwargs.get("group")
                seen.append((name, caller, devices, None if group is None else dist.get_world_size(group)))
            return originals[name](*args, **kwargs)

        return record

    for name in COLLECTIVES:
        setattr(dist, name, recorder(name))
    try:
        yield seen
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)


def recorded_step(rank, world_size, loss_mode, bad_rank=None, **step):
    """One train step with ``loss_mode`` (``bad_rank``: that rank's loss inputs are unusable); returns the
    recorded collectives and the error the step raised, if any."""
    from verl.trainer.ppo import core_algos

    from tests.fake_engine import train_step

    registered = core_algos.POLICY_LOSS_REGISTRY[loss_mode]

    def loss_on_meta_defaults(old_log_prob, log_prob, advantages, response_mask, *args, **kwargs):
        assert log_prob.device.type == "cpu"
        if bad_rank == rank and loss_mode in ("cw_grpo", "cw_grpo_group"):
            # The wide scopes take their statistics from the mini-batch; a call is checked for its own shapes.
            old_log_prob = old_log_prob[:, :-1]
        elif bad_rank == rank:
            advantages = advantages.clone()
            advantages[0, 0] = float("nan")
        with torch.device("meta"):
            return registered(old_log_prob, log_prob, advantages, response_mask, *args, **kwargs)

    core_algos.POLICY_LOSS_REGISTRY[loss_mode] = loss_on_meta_defaults
    try:
        with recording_collectives() as seen:
            try:
                train_step(rank, world_size, loss_mode, **step)
            except Exception as e:  # the bad-input runs: which error, on which rank
                return seen, f"{type(e).__name__}: {e}"
        return seen, None
    finally:
        core_algos.POLICY_LOSS_REGISTRY[loss_mode] = registered


CASES = {
    "cw_grpo": {"micro_batch_size": 4},
    "cw_grpo_group": {"micro_batch_size": 4},
    "cw_grpo_microbatch": {"micro_batch_size": 4},
    "cw_grpo_authors": {"micro_batch_size": GROUP_SIZE, "interleaved_groups": False},
}


def every_case(rank, world_size, bad_rank=None):
    """Each loss mode's recorded step in one pair of processes (each start imports verl: ~20 s)."""
    return {mode: recorded_step(rank, world_size, mode, bad_rank, **step) for mode, step in CASES.items()}


@pytest.fixture(scope="module")
def good():
    return run_on_ranks(every_case, 2)


@pytest.fixture(scope="module")
def bad():
    return run_on_ranks(every_case, 2, bad_rank=1)


@pytest.mark.parametrize("loss_mode", sorted(CASES))
def test_every_collective_of_a_cw_loss_is_on_the_inputs_device_over_the_dp_group(good, loss_mode):
    results = [rank[loss_mode] for rank in good]
    for seen, error in results:
        assert error is None, error
        assert seen, "no collective recorded: the recorder is not in the path"
        for name, caller, devices, group_size in seen:
            assert devices == ["cpu"], (name, caller, devices)
            assert group_size == 2, (name, caller, group_size)
    # The same collectives, in the same order, on both ranks (none skipped on one rank: no hang).
    assert [s[:2] for s in results[0][0]] == [s[:2] for s in results[1][0]]


@pytest.mark.parametrize("loss_mode", sorted(CASES))
def test_bad_input_on_one_rank_stops_both_with_collectives_on_the_inputs_device(bad, loss_mode):
    results = [rank[loss_mode] for rank in bad]
    for seen, error in results:
        assert error is not None and "Error" in error.split(":")[0], error
        assert seen and all(devices == ["cpu"] for _, _, devices, _ in seen), seen
    own = results[1][1]
    assert ("same [batch, length] shape" if loss_mode in ("cw_grpo", "cw_grpo_group") else "non-finite") in own, own
    assert "rank" in results[0][1], results[0][1]  # the other rank names the failing one


def gather_a_default_device_flag(rank, world_size):
    """What the authors' loss once did: an error flag made without naming a device, then gathered."""
    import torch.distributed as dist

    from cw_verl.distributed import group_gather

    with recording_collectives() as seen:
        with torch.device("meta"):
            flag = torch.tensor([0.0], dtype=torch.float64)
        group_gather(dist.group.WORLD)(flag)
    return seen


def test_the_recorder_sees_a_flag_made_on_the_default_device():
    """The check can fail: under the meta default such a flag reaches the collective as a meta tensor."""
    for seen in run_on_ranks(gather_a_default_device_flag, 2):
        assert [(name, caller, devices) for name, caller, devices, _ in seen] == [
            ("all_gather", "cw_verl.distributed", ["meta"])
        ]


# --- the merge ------------------------------------------------------------------------------------------------


def test_the_merge_adds_each_slot_in_rank_order():
    """1e16 + 1 - 1e16 is 0 in float64 in rank order and 1 in another: the rank order is the one used."""
    from cw_verl.weights import _sum_by_rank

    entries = torch.tensor([[1e16], [0.0], [1.0], [0.0], [-1e16], [0.0]], dtype=torch.float64)  # 3 ranks x 2
    slots = torch.tensor([0, 1, 0, 1, 0, 1])
    assert _sum_by_rank(entries, slots, 2, 3)[:, 0].tolist() == [0.0, 0.0]
    assert ((1e16 - 1e16) + 1.0) == 1.0  # what an addition in another order gives


@settings(max_examples=60, deadline=None)
@given(
    keys=st.lists(st.lists(st.integers(0, 6), min_size=0, max_size=4, unique=True), min_size=1, max_size=4),
    capacity_extra=st.integers(0, 2),
)
def test_one_ranks_entries_land_in_distinct_slots(keys, capacity_extra):
    """What makes the rank-by-rank sum's order fixed: within one rank, no two present entries share a slot."""
    from cw_verl.weights import KEY, ROWS, _merge_round1

    capacity = max(len(k) for k in keys) + capacity_extra
    stack = torch.zeros(len(keys), capacity + 1, 9, dtype=torch.float64)
    for rank, rank_keys in enumerate(keys):
        for i, key in enumerate(rank_keys):
            stack[rank, 1 + i, KEY] = torch.tensor([key], dtype=torch.int64).view(torch.float64)
            stack[rank, 1 + i, ROWS] = 1.0
    merge = _merge_round1(stack)
    for rank, rank_keys in enumerate(keys):
        slots = merge.slot_of_entry[rank * capacity : rank * capacity + len(rank_keys)].tolist()
        assert len(set(slots)) == len(slots)
        assert merge.keys[slots].tolist() == rank_keys
