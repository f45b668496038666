"""clip_cov_minibatch and kl_cov_minibatch against verl 0.9.1's own clip_cov and kl_cov (one rank, one
micro-batch that is the whole mini-batch), the selection's math, and their bad input."""

import math
from unittest import mock

import pytest
import torch
import verl  # noqa: F401  (loads the cw_verl plugin)
from tensordict import TensorDict

from cw_verl.context import current_train_batch, train_batch_call
from cw_verl.cov_losses import CLIP_COV_MINIBATCH, KL_COV_MINIBATCH, selection_rule
from cw_verl.selection import DRAW, TOP, SelectionRule, select, token_keys
from cw_verl.verl_losses import MINIBATCH
from cw_verl.weights import CovarianceInputError, local_gather, token_covariance
from tests.lockstep import run_lockstep
from tests.toy_policy import actor_config

B, T = 8, 20


def data(seed=3, delta=1e-3):
    """A mini-batch whose covariances are well apart (tie-free), with current log-probs ``delta`` off the old
    ones: close enough that verl's selection from the current log-probs is the one from the old ones."""
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=gen, dtype=torch.float64) * 4
    lengths = torch.randint(6, T + 1, (B,), generator=gen)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    adv = torch.randn(B, 1, generator=gen, dtype=torch.float64).expand(B, T).clone() * mask
    current = (old + delta * torch.randn(B, T, generator=gen, dtype=torch.float64)).requires_grad_(True)
    return old, current, adv, mask


def config(**policy_loss):
    from verl.workers.config import PolicyLossConfig

    return actor_config("token-mean", policy_loss=PolicyLossConfig(**policy_loss))


def batch_info(mask):
    return {
        "dp_size": 1,
        "batch_num_tokens": int(mask.sum()),
        "global_batch_size": len(mask),
        "loss_scale_factor": None,
    }


def ours(loss_mode, old, current, adv, mask, cfg, rollout_is_weights=None):
    """Our loss as verl's engine calls it: inside the mini-batch's context, one call for the whole mini-batch."""
    from verl.trainer.ppo.core_algos import get_policy_loss_fn

    cfg.global_batch_info.update(batch_info(mask))
    mini_batch = TensorDict({"old_log_probs": old, "advantages": adv, "response_mask": mask.long()}, batch_size=[B])
    with train_batch_call(mini_batch):
        loss, metrics = get_policy_loss_fn(loss_mode)(old, current, adv, mask, "token-mean", cfg, rollout_is_weights)
        rule = selection_rule(loss_mode, cfg)
        scoped = current_train_batch().statistics[(MINIBATCH, rule)]
        selected = scoped.selection.members(token_covariance(scoped.stats, old, adv), mask, old, adv)
    (grad,) = torch.autograd.grad(loss, current)
    return loss.detach(), grad, metrics, selected


def verls(verl_mode, old, current, adv, mask, cfg, rollout_is_weights=None, randperm=None):
    from verl.trainer.ppo.core_algos import get_policy_loss_fn

    cfg.global_batch_info.update(batch_info(mask))
    with mock.patch.object(torch, "randperm", randperm) if randperm else mock.MagicMock():
        loss, metrics = get_policy_loss_fn(verl_mode)(old, current, adv, mask, "token-mean", cfg, rollout_is_weights)
    (grad,) = torch.autograd.grad(loss, current)
    return loss.detach(), grad, metrics


def top_gap(cov, k):
    """How far apart the k-th and (k+1)-th largest covariances are."""
    values = cov.sort(descending=True).values
    return (values[k - 1] - values[k]).item()


def test_kl_cov_minibatch_equals_verls_kl_cov_loss_gradient_and_metric():
    old, current, adv, mask = data()
    ratio = 0.06
    cfg = config(loss_mode=KL_COV_MINIBATCH, kl_cov_ratio=ratio, ppo_kl_coef=0.5)
    n = int(mask.sum())
    k = max(int(n * ratio), 1)
    valid_cov = ((adv - adv[mask].mean()) * (old - old[mask].mean()))[mask]
    assert k > 3 and top_gap(valid_cov, k) > 0.05  # the data are tie-free at the boundary by a margin
    loss, grad, metrics, selected = ours(KL_COV_MINIBATCH, old, current, adv, mask, cfg)
    verl_loss, verl_grad, verl_metrics = verls(
        "kl_cov", old, current, adv, mask, config(kl_cov_ratio=ratio, ppo_kl_coef=0.5)
    )
    assert int(selected.sum()) == k == metrics["actor/cov_select/selected"] == metrics["actor/cov_select/k"]
    torch.testing.assert_close(loss, verl_loss, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(grad, verl_grad, rtol=1e-12, atol=1e-15)
    assert metrics["actor/ppo_kl"] == pytest.approx(verl_metrics["actor/ppo_kl"], rel=1e-12)
    # The KL term is there: without it the gradient at the selected tokens differs.
    plain_grad = ours(
        KL_COV_MINIBATCH,
        old,
        current,
        adv,
        mask,
        config(loss_mode=KL_COV_MINIBATCH, kl_cov_ratio=ratio, ppo_kl_coef=0.0),
    )[1]
    assert (plain_grad - grad)[selected].abs().min() > 0 and torch.equal(plain_grad[~selected], grad[~selected])
    assert metrics["actor/cov_select/kth_cov"] == pytest.approx(valid_cov.sort(descending=True).values[k - 1].item())


def test_kl_cov_minibatch_with_rollout_is_weights_and_k_of_one():
    old, current, adv, mask = data(seed=5)
    weights = torch.rand(B, T, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.5
    cfg = config(loss_mode=KL_COV_MINIBATCH, kl_cov_ratio=1e-6)
    loss, grad, metrics, selected = ours(KL_COV_MINIBATCH, old, current, adv, mask, cfg, weights)
    verl_loss, verl_grad, _ = verls("kl_cov", old, current, adv, mask, config(kl_cov_ratio=1e-6), weights)
    assert int(selected.sum()) == 1 and metrics["actor/cov_select/k"] == 1
    torch.testing.assert_close(loss, verl_loss, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(grad, verl_grad, rtol=1e-12, atol=1e-15)


def candidates_of(old, adv, mask, lb, ub):
    cov = (adv - adv[mask].mean()) * (old - old[mask].mean())
    return mask & (cov > lb) & (cov < ub), cov


def test_clip_cov_minibatch_equals_verls_clip_cov_when_k_covers_every_candidate():
    old, current, adv, mask = data(seed=4)
    lb, ub = 0.3, 2.0
    candidates, cov = candidates_of(old, adv, mask, lb, ub)
    near_bound = ((cov - lb).abs() < 0.02) | ((cov - ub).abs() < 0.02)
    assert 5 < int(candidates.sum()) < int(mask.sum()) // 2 and not near_bound[mask].any()
    knobs = dict(clip_cov_ratio=0.6, clip_cov_lb=lb, clip_cov_ub=ub)
    loss, grad, metrics, selected = ours(
        CLIP_COV_MINIBATCH, old, current, adv, mask, config(loss_mode=CLIP_COV_MINIBATCH, **knobs)
    )
    verl_loss, verl_grad, verl_metrics = verls("clip_cov", old, current, adv, mask, config(**knobs))
    assert torch.equal(selected, candidates)
    assert metrics["actor/cov_select/selected"] == metrics["actor/cov_select/eligible"] == int(candidates.sum())
    torch.testing.assert_close(loss, verl_loss, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(grad, verl_grad, rtol=1e-12, atol=1e-15)
    for key in ("actor/pg_clipfrac", "actor/ppo_kl"):
        assert metrics[key] == pytest.approx(verl_metrics[key], rel=1e-12), key
    assert (grad[selected] == 0).all() and (grad[mask & ~selected] != 0).all()


def test_clip_cov_minibatch_equals_verls_clip_cov_given_the_same_draw():
    """k below the candidates: verl's own code, its unseeded randperm made to put our drawn tokens first."""
    old, current, adv, mask = data(seed=4)
    lb, ub = 0.3, 2.0
    knobs = dict(clip_cov_ratio=0.04, clip_cov_lb=lb, clip_cov_ub=ub)
    loss, grad, metrics, selected = ours(
        CLIP_COV_MINIBATCH, old, current, adv, mask, config(loss_mode=CLIP_COV_MINIBATCH, **knobs)
    )
    candidates, _ = candidates_of(old, adv, mask, lb, ub)
    k = max(int(0.04 * int(mask.sum())), 1)
    assert int(selected.sum()) == k < int(candidates.sum()) and not (selected & ~candidates).any()
    drawn = selected[candidates]  # in verl's order: torch.nonzero of the candidates, row-major
    order = torch.cat([drawn.nonzero().flatten(), (~drawn).nonzero().flatten()])
    verl_loss, verl_grad, verl_metrics = verls(
        "clip_cov", old, current, adv, mask, config(**knobs), randperm=lambda n, *a, **kw: order.clone()
    )
    torch.testing.assert_close(loss, verl_loss, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(grad, verl_grad, rtol=1e-12, atol=1e-15)
    assert metrics["actor/pg_clipfrac"] == pytest.approx(verl_metrics["actor/pg_clipfrac"], rel=1e-12)


def test_clip_cov_draw_is_spread_over_the_candidates():
    """The k smallest pseudo-random keys: over many batches every position and row is drawn about equally."""
    counts = torch.zeros(B, T)
    rule = SelectionRule(DRAW, 0.25, -math.inf, math.inf)
    for seed in range(200):
        old, _, adv, mask = data(seed=seed)
        mask = torch.ones_like(mask)
        cov = (old - old.mean()) * (adv - adv.mean())
        sel = select(rule, 40, cov, mask, token_keys(old, adv, mask), local_gather)
        counts += sel.members(cov, mask, old, adv)
    # 40 of 160 drawn per batch: 50 expected per token over 200 batches (binomial sd ~6).
    assert counts.sum() == 200 * 40 and 20 < counts.min() and counts.max() < 80


def test_selection_is_the_same_for_any_sharding_and_breaks_exact_ties_by_key():
    """The lockstep merge of 1, 3 and 5 shards gives the one-shard set; equal covariances are ordered by key."""
    old, _, adv, mask = data(seed=7)
    old[:, :4] = -0.5  # four exactly equal covariances in every row
    cov = (old - old[mask].mean()) * (adv - adv[mask].mean())
    keys = token_keys(old, adv, mask)
    ordered = cov[mask].sort(descending=True).values
    k_tie = next(i + 1 for i in range(len(ordered) - 1) if ordered[i] == ordered[i + 1])  # k-th in a tie
    for rule, k in ((SelectionRule(TOP, 0.1), k_tie), (SelectionRule(DRAW, 0.1, 0.1, 1.5), 9)):
        whole = select(rule, k, cov, mask, keys, local_gather)
        expected = whole.members(cov, mask, old, adv)
        assert int(expected.sum()) == whole.selected == min(k, whole.eligible) and whole.eligible > k
        for cuts in ([0, 3, 8], [0, 1, 2, 5, 7, 8]):
            shards = [slice(a, b) for a, b in zip(cuts, cuts[1:], strict=False)]
            results, errors = run_lockstep(
                lambda s, gather, rule=rule, k=k: select(rule, k, cov[s], mask[s], keys[s], gather).members(
                    cov[s], mask[s], old[s], adv[s]
                ),
                shards,
            )
            assert errors == [None] * len(shards)
            assert torch.equal(torch.cat(results), expected)
        if rule.kind == TOP:
            # The tie was broken: the k-th covariance is shared by selected and unselected tokens.
            tied = mask & (cov == whole.kth_cov)
            assert (tied & expected).any() and (tied & ~expected).any()


def test_token_keys_do_not_depend_on_padding_or_the_other_rows():
    old, _, adv, mask = data(seed=2)
    keys = token_keys(old, adv, mask)
    wider = token_keys(
        torch.cat([old, torch.full((B, 5), float("nan"), dtype=old.dtype)], 1),
        torch.cat([adv, torch.zeros(B, 5, dtype=adv.dtype)], 1),
        torch.cat([mask, torch.zeros(B, 5, dtype=torch.bool)], 1),
    )
    assert torch.equal(wider[:, :T][mask], keys[mask])
    assert torch.equal(token_keys(old[3:5], adv[3:5], mask[3:5]), keys[3:5])
    assert len(set(keys[mask].tolist())) == int(mask.sum())  # distinct tokens, distinct keys
    assert keys.min() >= 0 and keys.max() < 2**62


# --- bad input --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_mode", [CLIP_COV_MINIBATCH, KL_COV_MINIBATCH])
def test_non_finite_old_log_prob_at_a_valid_token_is_an_error(loss_mode):
    old, current, adv, mask = data()
    old[2, 1] = float("nan")
    with pytest.raises(CovarianceInputError, match="non-finite old log-prob"):
        ours(loss_mode, old, current, adv, mask, config(loss_mode=loss_mode))


@pytest.mark.parametrize("loss_mode", [CLIP_COV_MINIBATCH, KL_COV_MINIBATCH])
def test_non_finite_advantage_at_a_valid_token_is_an_error(loss_mode):
    old, current, adv, mask = data()
    adv[4, 0] = float("inf")
    with pytest.raises(CovarianceInputError, match="non-finite advantages"):
        ours(loss_mode, old, current, adv, mask, config(loss_mode=loss_mode))


@pytest.mark.parametrize("loss_mode", [CLIP_COV_MINIBATCH, KL_COV_MINIBATCH])
def test_garbage_outside_the_mask_does_not_reach_the_loss(loss_mode):
    old, current, adv, mask = data()
    clean = ours(
        loss_mode, old, current, adv, mask, config(loss_mode=loss_mode, kl_cov_ratio=0.05, clip_cov_ratio=0.05)
    )
    old2, adv2 = old.clone(), adv.clone()
    old2[~mask], adv2[~mask] = float("nan"), float("inf")
    dirty = ours(
        loss_mode, old2, current, adv2, mask, config(loss_mode=loss_mode, kl_cov_ratio=0.05, clip_cov_ratio=0.05)
    )
    assert torch.equal(clean[0], dirty[0]) and torch.equal(clean[1], dirty[1]) and torch.equal(clean[3], dirty[3])


@pytest.mark.parametrize("loss_mode", [CLIP_COV_MINIBATCH, KL_COV_MINIBATCH])
def test_an_empty_mask_gives_a_connected_zero_and_selects_nothing(loss_mode):
    old, current, adv, mask = data()
    mask = torch.zeros_like(mask)
    cfg = config(loss_mode=loss_mode)
    loss, grad, metrics, selected = ours(loss_mode, old, current, adv, mask, cfg)
    assert loss.item() == 0.0 and torch.equal(grad, torch.zeros_like(grad)) and not selected.any()
    assert metrics["actor/cov_select/selected"] == 0 and metrics["actor/cov_select/k"] == 1


@pytest.mark.parametrize("knob", ["kl_cov_ratio", "clip_cov_ratio"])
def test_a_ratio_that_is_not_positive_is_refused(knob):
    loss_mode = KL_COV_MINIBATCH if knob == "kl_cov_ratio" else CLIP_COV_MINIBATCH
    old, current, adv, mask = data()
    with pytest.raises(ValueError, match="ratio must be a finite number > 0"):
        ours(loss_mode, old, current, adv, mask, config(loss_mode=loss_mode, **{knob: 0.0}))


def test_outside_a_verl_engine_it_says_where_to_call_it():
    from verl.trainer.ppo.core_algos import get_policy_loss_fn

    old, current, adv, mask = data()
    with pytest.raises(RuntimeError, match="BaseEngine.train_batch"):
        get_policy_loss_fn(KL_COV_MINIBATCH)(old, current, adv, mask, "token-mean", config(loss_mode=KL_COV_MINIBATCH))


BAD_CASES = ("nan_adv", "nan_old", "shape", "empty")


def two_rank_call(rank, world_size, case):
    """One clip/kl_cov_minibatch call per rank over the gloo WORLD, with ``case``'s bad input on one rank
    (:data:`BAD_CASES`); the error each rank raised, or its metrics and valid tokens. Run by the two-rank launch
    of ``tests/test_cov_selection_dp.py``, which checks the results."""
    import torch.distributed as dist

    from cw_verl.context import loss_call

    old, current, adv, mask = data(seed=10 + rank)
    loss_mode = KL_COV_MINIBATCH if case != "nan_old" else CLIP_COV_MINIBATCH
    if rank == 1 and case == "nan_adv":
        adv[0, 0] = float("nan")
    if rank == 0 and case == "nan_old":
        old[1, 1] = float("-inf")
    if rank == 1 and case == "empty":
        mask = torch.zeros_like(mask)
    if rank == 1 and case == "shape":
        current = current[:, :-1]
    cfg = config(loss_mode=loss_mode, kl_cov_ratio=0.05)
    cfg.global_batch_info.update({**batch_info(mask), "dp_size": 2})
    mini_batch = TensorDict({"old_log_probs": old, "advantages": adv, "response_mask": mask.long()}, batch_size=[B])
    from verl.trainer.ppo.core_algos import get_policy_loss_fn

    try:
        with loss_call(dist.group.WORLD), train_batch_call(mini_batch):
            loss, metrics = get_policy_loss_fn(loss_mode)(old, current, adv, mask, "token-mean", cfg)
    except CovarianceInputError as error:
        return {"error": str(error)}
    loss.backward()
    return {"metrics": metrics, "tokens": int(mask.sum())}
