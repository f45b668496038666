"""The statistics scopes on verl's real actor path (TrainingWorker, FSDP2 engine, verl's micro-batching and
ppo_loss on gloo ranks): the mini-batch and group scopes give the same gradient and weights for any
micro-batch size, dynamic batch size and DP size; the per-call scope does not."""

import pytest
import torch

from tests.ranks import run_on_ranks
from tests.support.batch import save_shared_batch
from tests.support.studies import Variant, updates_per_variant

PROMPTS, GROUP_SIZE = 4, 4  # 16 sequences
INVARIANT = ["cw_grpo_minibatch", "cw_grpo_group"]
MICRO_BATCHINGS = {1: [{"micro_batch_size": 16}, {"micro_batch_size": 1}, {"micro_batch_size": 4}]}
MICRO_BATCHINGS[2] = [{"micro_batch_size": 8}, {"micro_batch_size": 2}, {"max_token_len": 40}]
# float32 engine: the same gradient summed over other micro-batch splits differs by rounding only.
GRAD_RTOL = 1e-5


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_assets):
    tmp = tmp_path_factory.mktemp("policy")
    model_path = tiny_assets / "model"
    batch_path = str(tmp / "batch.pt")
    run_on_ranks(save_shared_batch, 1, str(model_path), PROMPTS, GROUP_SIZE, 0, batch_path)
    out = {}
    for world_size, layouts in MICRO_BATCHINGS.items():
        variants = [Variant(loss, **kw) for loss in INVARIANT + ["cw_grpo_microbatch"] for kw in layouts]
        results = run_on_ranks(updates_per_variant, world_size, str(model_path), variants, batch_path)
        out[world_size] = results[0]
        for other in results[1:]:  # every rank reports the same full gradient and weights
            for variant, got in other["variants"].items():
                torch.testing.assert_close(got["gradient"], results[0]["variants"][variant]["gradient"])
    return out


def relative(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("loss_mode", INVARIANT)
def test_wide_scopes_do_not_depend_on_micro_batching_or_dp_size(runs, loss_mode):
    reference = runs[1]["variants"][Variant(loss_mode, micro_batch_size=16)]
    mask = runs[1]["response_mask"]
    assert reference["gradient"].norm() > 0 and reference["loss_calls"] >= 1
    for world_size, layouts in MICRO_BATCHINGS.items():
        for kw in layouts:
            got = runs[world_size]["variants"][Variant(loss_mode, **kw)]
            assert relative(got["gradient"], reference["gradient"]) < GRAD_RTOL, (world_size, kw)
            torch.testing.assert_close(got["weights"][mask], reference["weights"][mask], rtol=1e-6, atol=1e-7)


def test_the_per_call_scope_depends_on_micro_batching(runs):
    reference = runs[1]["variants"][Variant("cw_grpo_microbatch", micro_batch_size=16)]
    split = runs[1]["variants"][Variant("cw_grpo_microbatch", micro_batch_size=1)]
    mask = runs[1]["response_mask"]
    assert split["loss_calls"] == 16
    assert (split["weights"] - reference["weights"])[mask].abs().max().item() > 0.05
    assert relative(split["gradient"], reference["gradient"]) > 100 * GRAD_RTOL


def test_per_call_scope_with_one_micro_batch_equals_the_minibatch_scope_on_policy(runs):
    """old_log_probs are verl's recomputation with the same weights, so both scopes see the same log-probs."""
    mask = runs[1]["response_mask"]
    per_call = runs[1]["variants"][Variant("cw_grpo_microbatch", micro_batch_size=16)]
    minibatch = runs[1]["variants"][Variant("cw_grpo_minibatch", micro_batch_size=16)]
    torch.testing.assert_close(per_call["weights"][mask], minibatch["weights"][mask], rtol=1e-4, atol=1e-5)
