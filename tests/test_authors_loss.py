"""``loss_mode=cw_grpo_authors`` through verl's own ppo_loss, micro-batching (fixed, dynamic with
force_group_size) and the patched BaseEngine.train_batch on gloo ranks (float64 toy model): the gradient
and value of the released objective, whatever the micro-batching and DP size as long as groups are whole,
and an error on every rank when they are not."""

from functools import partial

import pytest
import torch
import torch.distributed as dist
import verl  # noqa: F401  (loads the cw_verl plugin)

from cw_verl.authors_loss import AUTHORS_LOSS_MODE
from cw_verl.authors_objective import sequence_advantages
from tests.authors_reference import batch_loss
from tests.fake_engine import GROUP_SIZE, NUM_SEQUENCES, MinimalEngine, ToyLM, rank_rows, trainer_batch
from tests.ranks import run_on_ranks

BETA = 0.04


def _batch(rows, interleaved=False, beta=0.0):
    data = trainer_batch(rows, on_policy=True, interleaved_groups=interleaved)
    if beta:
        # A reference policy off the current one (row-wise, so the same on any rank): k3 is then non-zero.
        data["ref_log_prob"] = data["old_log_probs"] * 1.2
    return data


def authors_step(rank, world_size, micro_batch_size=None, dynamic_tokens=None, force_group=False, **kw):
    """One mini-batch of cw_grpo_authors through the patched BaseEngine.train_batch: DP-averaged gradient,
    the summed pg/kl loss metrics, and the micro-batch sizes."""
    from verl.utils import tensordict_utils as tu
    from verl.workers.engine.base import BaseEngine
    from verl.workers.utils.losses import ppo_loss

    from tests.toy_policy import actor_config

    beta = kw.pop("beta", 0.0)
    rows = rank_rows(rank, world_size, kw.pop("uneven", False))
    data = _batch(rows, beta=beta, **kw)
    meta = dict(
        global_batch_size=NUM_SEQUENCES,
        use_dynamic_bsz=dynamic_tokens is not None,
        micro_batch_size_per_gpu=micro_batch_size or len(rows),
        max_token_len_per_gpu=dynamic_tokens or 0,
    )
    if force_group:
        meta["force_group_size"] = GROUP_SIZE  # what cw_verl's patch of the v1 trainer adds
    tu.assign_non_tensor(data, **meta)
    config = actor_config(
        "seq-mean-token-mean",
        policy_loss={"loss_mode": AUTHORS_LOSS_MODE},
        rollout_n=GROUP_SIZE,
        use_kl_loss=bool(beta),
        kl_loss_coef=beta,
        kl_loss_type="low_var_kl",
    )
    model = ToyLM()
    engine = MinimalEngine(model, dist.group.WORLD if world_size > 1 else None)
    out = BaseEngine.train_batch(engine, data, partial(ppo_loss, config=config))
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    if world_size > 1:
        dist.all_reduce(grads)
        grads /= world_size
    steps = out["metrics"]["steps"]
    total = {
        key: sum(float(m[key].aggregate()) for m in steps) for key in ("actor/pg_loss", "kl_loss") if key in steps[0]
    }
    return {"grads": grads, "micro_batch_sizes": engine.micro_batch_sizes, "totals": total, "metrics": steps}


def reference(interleaved=False, beta=0.0):
    """The transcription's loss and gradient for the whole batch, on the same toy model, in one process."""
    from verl.workers.utils.padding import no_padding_2_padding

    data = _batch(list(range(NUM_SEQUENCES)), interleaved=interleaved, beta=beta)
    model = ToyLM()
    log_prob = no_padding_2_padding(model(data["input_ids"]), data)
    mask = data["response_mask"].bool()
    seq_adv = sequence_advantages(data["advantages"], mask)
    kw = {"beta": beta, "ref_log_prob": data["ref_log_prob"]} if beta else {}
    loss = batch_loss(log_prob, seq_adv, mask, list(data["uid"]), **kw)
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()])


LAYOUTS = {
    "one group per call": {"micro_batch_size": GROUP_SIZE},  # as trl ran it
    "two groups per call": {"micro_batch_size": 2 * GROUP_SIZE},
    "whole rank per call": {},
    "dynamic, force_group_size": {"dynamic_tokens": 64, "force_group": True},
    "with KL": {"micro_batch_size": GROUP_SIZE, "beta": BETA},
    "half a group per call": {"micro_batch_size": 2},
    "dynamic without force_group_size": {"dynamic_tokens": 64},
    "interleaved groups": {"micro_batch_size": GROUP_SIZE, "interleaved": True},
}
SPLIT = ("half a group per call", "dynamic without force_group_size", "interleaved groups")


def every_layout(rank, world_size):
    """Each layout's result on this rank, or the error it raised (errors are raised on all ranks together)."""
    from cw_verl.authors_loss import WholeGroupError

    out = {}
    for name, layout in LAYOUTS.items():
        try:
            out[name] = authors_step(rank, world_size, **layout)
        except WholeGroupError as error:
            out[name] = error
    return out


@pytest.fixture(scope="module")
def runs():
    """world size -> one result per rank -> layout -> result (1 rank in this process, 2 on gloo ranks)."""
    return {1: [every_layout(0, 1)], 2: run_on_ranks(every_layout, 2)}


@pytest.fixture(scope="module")
def expected():
    return {0.0: reference(), BETA: reference(beta=BETA)}


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("name", [name for name in LAYOUTS if name not in SPLIT])
def test_gradient_and_value_are_the_released_objectives(runs, expected, world_size, name):
    beta = LAYOUTS[name].get("beta", 0.0)
    loss, grads = expected[beta]
    results = [rank[name] for rank in runs[world_size]]
    for result in results:
        torch.testing.assert_close(result["grads"], grads, rtol=1e-10, atol=1e-13)
    # Each rank's loss is its share of the global seq-mean (scaled by dp_size); their mean is the whole value.
    pg = sum(r["totals"]["actor/pg_loss"] for r in results) / world_size
    kl = sum(r["totals"].get("kl_loss", 0.0) for r in results) / world_size
    assert pg + beta * kl == pytest.approx(loss, rel=1e-10)
    assert (kl > 0) == bool(beta)
    if LAYOUTS[name].get("force_group"):
        assert all(size % GROUP_SIZE == 0 for r in results for size in r["micro_batch_sizes"])
        assert len(results[0]["micro_batch_sizes"]) > 1


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("name", SPLIT)
def test_split_groups_fail_on_every_rank(runs, world_size, name):
    errors = [str(rank[name]) for rank in runs[world_size]]
    assert all(isinstance(rank[name], Exception) for rank in runs[world_size])
    assert any("not whole groups of rollout.n=4" in text for text in errors), errors
    if world_size == 2 and name == "interleaved groups":
        assert errors  # every rank raised (none was left waiting), whichever rank saw the split


def test_metrics_describe_the_released_weights(runs):
    metrics = runs[1][0]["one group per call"]["metrics"][0]
    values = {key: float(m.aggregate()) if hasattr(m, "aggregate") else m for key, m in metrics.items()}
    # B * L counts padding, so the mean weight over real tokens is at least 1.
    assert values["actor/cw/weight_mean"] >= 1.0
    assert values["actor/cw/weight_min"] <= values["actor/cw/weight_max"]
    for key in ("actor/cw/sigma", "actor/cw/cov_pos_top_1pct", "actor/cw/cov_neg_top_1pct", "actor/cw/num_tokens"):
        assert key in values
    assert values["actor/pg_clipfrac"] == 0.0  # on-policy: the clip never binds


def test_direct_call_without_uids_is_refused():
    from verl.trainer.ppo.core_algos import get_policy_loss_fn

    from tests.toy_policy import actor_config

    lp = -torch.rand(4, 5, dtype=torch.float64)
    config = actor_config("seq-mean-token-mean", policy_loss={"loss_mode": AUTHORS_LOSS_MODE}, rollout_n=4)
    with pytest.raises(ValueError, match="needs each sequence's 'uid'"):
        get_policy_loss_fn(AUTHORS_LOSS_MODE)(
            lp, lp, torch.ones(4, 5), torch.ones(4, 5, dtype=torch.bool), config=config
        )
