"""clip_cov_minibatch and kl_cov_minibatch on verl's real Megatron engine (mbridge, megatron-core's pipeline
schedule, the loss on the last stage) on four gloo ranks, TP2 x DP2 with sequence parallelism, PP2 x DP2 and
CP2 x DP2, several micro-batches per rank: every tensor- and context-parallel replica selects the same tokens
(verl gathers the model's output over the context-parallel group before the loss), only the last pipeline
stage calls the loss, the data-parallel ranks' selections are disjoint and together the set of one selection
over the whole mini-batch; verl's own clip_cov and kl_cov select another number of tokens. Run alone:
``python -m pytest tests -k megatron``."""

import pytest
import torch

from cw_verl.cpu.launch import run_ranks
from tests.support.megatron_study import LAYOUTS
from tests.test_cov_selection_dp import KNOBS, VERL_MODE
from tests.test_cov_selection_engine import engine_selections, one_selection

# Each a DP2 layout on four ranks, and how many ranks of a data-parallel rank call the loss (TP and CP replicas;
# PP: the last stage only).
LAYOUT_CALLERS = {"TP2xDP2, SP": 2, "PP2": 1, "CP2": 2}
MICRO_BATCHING = [{"micro_batch_size": 2}]  # 8 sequences per data-parallel rank: 4 loss calls each


@pytest.fixture(scope="module")
def results(tiny_assets):
    per_rank = run_ranks(megatron_layouts, 4, str(tiny_assets / "model"), timeout_s=900.0, threads_per_rank=1)
    return per_rank


def megatron_layouts(rank, world_size, model_path):
    """:func:`engine_selections` under each layout of :data:`LAYOUT_CALLERS`, in one launch."""
    return {
        name: engine_selections(rank, world_size, model_path, MICRO_BATCHING, LAYOUTS[name]) for name in LAYOUT_CALLERS
    }


@pytest.mark.parametrize("layout", list(LAYOUT_CALLERS))
@pytest.mark.parametrize("loss_mode", list(KNOBS))
def test_megatron_selection_equals_the_one_call_set(results, loss_mode, layout):
    import verl  # noqa: F401  (loads the cw_verl plugin)

    per_rank = [r[layout] for r in results]
    callers = LAYOUT_CALLERS[layout]
    key = (loss_mode, tuple(MICRO_BATCHING[0].items()))
    per_rank = [r for r in per_rank if r[key]["calls"]]  # PP: the first stage makes no loss call
    assert len(per_rank) == 2 * callers
    # Each layout's actor recomputed the old log-probs (bf16, its own layout's rounding): that layout's batch.
    batch = per_rank[0]["batch"]
    for r in per_rank:
        assert torch.equal(r["batch"].batch["old_log_probs"], batch.batch["old_log_probs"])
    expected, selection = one_selection(batch, loss_mode)
    assert len(expected) == selection.selected > 1
    by_dp_rank = {}
    for r in per_rank:
        assert len(r[key]["calls"]) > 1
        # the tensor- and context-parallel replicas of a data-parallel rank select the same tokens
        by_dp_rank.setdefault(r["dp_rank"], r[key]["selected"])
        assert r[key]["selected"] == by_dp_rank[r["dp_rank"]]
    assert sorted(by_dp_rank) == [0, 1]
    union = set().union(*by_dp_rank.values())
    assert sum(len(chosen) for chosen in by_dp_rank.values()) == len(union) and union == expected
    # verl's own mode: each TP / CP replica repeats its data-parallel rank's calls; count one of them.
    verl_total = sum(sum(r[VERL_MODE[loss_mode]]) for r in per_rank) // callers
    assert verl_total != len(expected)
