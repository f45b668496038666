"""clip_cov_minibatch and kl_cov_minibatch on verl's real Megatron engine (mbridge, megatron-core's pipeline
schedule, the loss on the last stage) on four gloo ranks, TP2 x DP2 with sequence parallelism and several
micro-batches per rank: every tensor-parallel replica selects the same tokens, the data-parallel ranks'
selections are disjoint and together the set of one selection over the whole mini-batch; verl's own clip_cov
and kl_cov select another number of tokens. Run alone: ``python -m pytest tests -k megatron``."""

import pytest
import torch

from cw_verl.cpu.launch import run_ranks
from cw_verl.cpu.tiny_model import TinyModelSpec
from cw_verl.demo.task import ReversalTask
from cw_verl.demo.warmstart import WarmStart, build_demo_model
from tests.support.megatron_study import LAYOUTS
from tests.test_cov_selection_dp import KNOBS, VERL_MODE
from tests.test_cov_selection_engine import engine_selections, one_selection

LAYOUT = "TP2xDP2, SP"
MICRO_BATCHING = [{"micro_batch_size": 2}]  # 8 sequences per data-parallel rank: 4 loss calls each


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("policy")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a loaded 2-core box: torch's default pool spins (tests/test_megatron_engine.py)
    try:
        model_path, _ = build_demo_model(tmp, ReversalTask(), TinyModelSpec(), WarmStart(steps=20), 0)
    finally:
        torch.set_num_threads(threads)
    per_rank = run_ranks(
        engine_selections, 4, str(model_path), MICRO_BATCHING, LAYOUTS[LAYOUT], timeout_s=900.0, threads_per_rank=1
    )
    return per_rank[0]["batch"], per_rank


@pytest.mark.parametrize("loss_mode", list(KNOBS))
def test_megatron_tp2_dp2_selection_equals_the_one_call_set(results, loss_mode):
    import verl  # noqa: F401  (loads the cw_verl plugin)

    batch, per_rank = results
    expected, selection = one_selection(batch, loss_mode)
    assert len(expected) == selection.selected > 1
    key = (loss_mode, tuple(MICRO_BATCHING[0].items()))
    by_dp_rank = {}
    for r in per_rank:
        assert len(r[key]["calls"]) > 1
        # the tensor-parallel replicas of a data-parallel rank select the same tokens
        by_dp_rank.setdefault(r["dp_rank"], r[key]["selected"])
        assert r[key]["selected"] == by_dp_rank[r["dp_rank"]]
    assert sorted(by_dp_rank) == [0, 1]
    union = set().union(*by_dp_rank.values())
    assert sum(len(chosen) for chosen in by_dp_rank.values()) == len(union) and union == expected
    # verl's own mode: each tensor-parallel replica repeats its data-parallel rank's calls; count one of them.
    verl_total = sum(sum(r[VERL_MODE[loss_mode]]) for r in per_rank) // 2
    assert verl_total != len(expected)
