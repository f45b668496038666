"""The authors' released objective (cw_verl.authors_objective) against a float64 transcription of the facts:
padding, groups of unequal lengths, groups interleaved in one call, the two 1e-8, sum(w) = 0, zero variance,
and the gradient through the weights (autograd vs finite differences)."""

import pytest
import torch

from cw_verl.authors_objective import (
    Groups,
    authors_weights,
    kernel_weights,
    sequence_advantages,
)
from tests.authors_reference import batch_loss, scatter_group_weights


def make_call(seed=0, groups=3, group_size=4, width=11, interleave=True, scale=1.0):
    """A call's worth of rows: ``groups`` prompt groups with completions of unequal lengths, padded to ``width``
    (beyond every group's own longest completion), rows of different groups interleaved."""
    gen = torch.Generator().manual_seed(seed)
    rows = groups * group_size
    labels = [f"p{r % groups}" if interleave else f"p{r // group_size}" for r in range(rows)]
    lengths = torch.randint(1, width - 1, (rows,), generator=gen)
    mask = torch.arange(width)[None, :] < lengths[:, None]
    log_prob = -scale * torch.rand(rows, width, generator=gen, dtype=torch.float64) * 4
    log_prob = torch.where(mask, log_prob, 0.0)
    rewards = torch.randint(0, 3, (rows,), generator=gen).double()
    seq_adv = torch.zeros(rows, dtype=torch.float64)
    for label in set(labels):
        members = torch.tensor([lab == label for lab in labels])
        r = rewards[members]
        seq_adv[members] = (r - r.mean()) / (r.std() + 1e-4)
    return log_prob, seq_adv, mask, labels


def objective(log_prob, seq_adv, mask, labels):
    """The weighted policy-gradient term, aggregated as the released code: token mean per row, mean over rows."""
    result = authors_weights(log_prob, seq_adv, mask, Groups.from_labels(labels))
    ratio = torch.exp(log_prob - log_prob.detach())
    token_loss = -(result.weights * ratio * seq_adv[:, None]) * mask
    return (token_loss.sum(1) / mask.sum(1)).mean()


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("interleave", [False, True])
def test_weights_match_the_transcription_per_group(seed, interleave):
    log_prob, seq_adv, mask, labels = make_call(seed, interleave=interleave)
    result = authors_weights(log_prob, seq_adv, mask, Groups.from_labels(labels))
    weights, cov = scatter_group_weights(log_prob, seq_adv, mask, labels)
    torch.testing.assert_close(result.weights.detach(), weights, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(result.cov.detach(), cov, rtol=1e-12, atol=1e-14)
    # B * L counts padding: the mean weight over a group's real tokens is B * L / N > 1 with unequal lengths.
    for label in set(labels):
        rows = torch.tensor([lab == label for lab in labels])
        group_mask = mask[rows]
        expected_mean = rows.sum().item() * group_mask.sum(1).max().item() / group_mask.sum().item()
        assert weights[rows][group_mask].mean().item() == pytest.approx(expected_mean, rel=1e-12)
        assert expected_mean > 1


@pytest.mark.parametrize("seed", range(3))
def test_gradient_matches_the_transcription(seed):
    log_prob, seq_adv, mask, labels = make_call(seed)
    ours = log_prob.clone().requires_grad_(True)
    objective(ours, seq_adv, mask, labels).backward()
    theirs = log_prob.clone().requires_grad_(True)
    batch_loss(theirs, seq_adv, mask, labels).backward()
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-10, atol=1e-13)
    # The weights' own term is part of it: detaching them changes the gradient.
    detached = log_prob.clone().requires_grad_(True)
    result = authors_weights(detached, seq_adv, mask, Groups.from_labels(labels))
    w = result.weights.detach()
    ((-(w * torch.exp(detached - detached.detach()) * seq_adv[:, None]) * mask).sum(1) / mask.sum(1)).mean().backward()
    assert (detached.grad - ours.grad).norm() > 1e-3 * ours.grad.norm()


def test_gradient_of_the_weights_matches_finite_differences():
    """torch.autograd.gradcheck (central differences against autograd, float64): the weights' own term
    sum_t w~_t(logp) * A_i, and the whole objective written with verl's ratio exp(logp - old), whose value and
    gradient at logp = old are the released exp(logp - stopgrad(logp)) form's."""
    log_prob, seq_adv, mask, labels = make_call(7, groups=2, group_size=3, width=7)
    groups = Groups.from_labels(labels)

    def weighted_advantage(lp):
        return (authors_weights(lp, seq_adv, mask, groups).weights * seq_adv[:, None]).sum()

    assert torch.autograd.gradcheck(weighted_advantage, (log_prob.clone().requires_grad_(True),), eps=1e-6, atol=1e-7)
    old = log_prob.clone()

    def verl_form(lp):
        weights = authors_weights(lp, seq_adv, mask, groups).weights
        token_loss = -(weights * torch.exp(lp - old) * seq_adv[:, None]) * mask
        return (token_loss.sum(1) / mask.sum(1)).mean()

    at_old = log_prob.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(verl_form, (at_old,), eps=1e-6, atol=1e-7)
    verl_form(at_old).backward()
    released = log_prob.clone().requires_grad_(True)
    objective(released, seq_adv, mask, labels).backward()
    torch.testing.assert_close(at_old.grad, released.grad, rtol=1e-12, atol=1e-15)


def test_the_two_epsilons_are_the_released_ones():
    """With covariances of order 1e-8, sigma's +1e-8 decides the weights; the transcription agrees exactly."""
    log_prob, seq_adv, mask, labels = make_call(3, groups=1, group_size=5)
    tiny = log_prob * 1e-8
    result = authors_weights(tiny, seq_adv, mask, Groups.from_labels(labels))
    weights, _ = scatter_group_weights(tiny, seq_adv, mask, labels)
    torch.testing.assert_close(result.weights.detach(), weights, rtol=1e-12, atol=1e-14)
    # Without the epsilon the weights would be a function of c / std(c), invariant to the 1e-8 scale.
    unscaled = authors_weights(log_prob, seq_adv, mask, Groups.from_labels(labels)).weights.detach()
    assert (result.weights.detach() - unscaled)[mask].abs().max() > 0.1
    # The mean's "+ 1e-8" is added to an integer token count: torch makes that float32, where it vanishes.
    counts = torch.tensor([[1], [9], [4096]])
    assert (counts + 1e-8).dtype == torch.float32 and torch.equal(counts + 1e-8, counts.float())


def test_sum_of_weights_zero_leaves_them_unnormalised():
    """Equal non-zero covariances: sigma is only the 1e-8, every w underflows, sum(w) = 0 -> weights 0 (no NaN)."""
    groups = Groups(torch.zeros(2, dtype=torch.int64), 1)
    mask = torch.ones(2, 3, dtype=torch.bool)
    cov = torch.full((2, 3), 1e-3, dtype=torch.float64, requires_grad=True)
    result = kernel_weights(cov, mask, groups)
    assert result.weight_sum.item() == 0.0 and torch.equal(
        result.weights.detach(), torch.zeros(2, 3, dtype=torch.float64)
    )
    result.weights.sum().backward()
    assert torch.isfinite(cov.grad).all()
    # Through log-probs it cannot happen: each row's centred log-probs sum to 0, so mean(c) = 0 and some
    # token has c^2 <= sigma^2, i.e. w >= exp(-1/2).


def test_zero_variance_gives_finite_gradients_equal_to_torch_std():
    """All advantages of a group equal: c = 0, sigma = 1e-8, w = 1, w~ = B * L / N; the gradient is finite
    and equals the transcription's (torch.std's backward sets the gradient at std = 0 to 0)."""
    log_prob, _, mask, labels = make_call(5, groups=2, group_size=3)
    seq_adv = torch.zeros(len(labels), dtype=torch.float64)
    seq_adv[[lab == "p0" for lab in labels]] = 0.5  # constant within each group
    ours = log_prob.clone().requires_grad_(True)
    objective(ours, seq_adv, mask, labels).backward()
    theirs = log_prob.clone().requires_grad_(True)
    batch_loss(theirs, seq_adv, mask, labels).backward()
    assert torch.isfinite(ours.grad).all()
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-12, atol=1e-14)


def test_half_precision_inputs_are_computed_in_float32():
    log_prob, seq_adv, mask, labels = make_call(2)
    result = authors_weights(log_prob.to(torch.bfloat16), seq_adv, mask, Groups.from_labels(labels))
    assert result.weights.dtype == torch.float32
    reference, _ = scatter_group_weights(log_prob.to(torch.bfloat16).double(), seq_adv, mask, labels)
    torch.testing.assert_close(result.weights.double(), reference, rtol=1e-5, atol=1e-6)


def test_padding_contents_never_reach_the_weights():
    log_prob, seq_adv, mask, labels = make_call(4)
    poisoned = torch.where(mask, log_prob, torch.tensor(float("inf"), dtype=torch.float64))
    clean = authors_weights(log_prob, seq_adv, mask, Groups.from_labels(labels)).weights
    dirty = authors_weights(poisoned, seq_adv, mask, Groups.from_labels(labels)).weights
    torch.testing.assert_close(dirty, clean)


def test_sequence_advantages_need_one_value_per_row():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    advantages = torch.tensor([[0.5, 0.5, 0.0], [-1.0, 7.0, 0.0], [3.0, 3.0, 3.0]])
    torch.testing.assert_close(sequence_advantages(advantages, mask), torch.tensor([0.5, -1.0, 0.0]))
    advantages[0, 1] = 0.4
    with pytest.raises(ValueError, match=r"rows \[0\]"):
        sequence_advantages(advantages, mask)


def test_rows_without_tokens_stay_out_of_their_group():
    log_prob, seq_adv, mask, labels = make_call(6, groups=1, group_size=4)
    with_empty = authors_weights(
        torch.cat([log_prob, log_prob[:1]]),
        torch.cat([seq_adv, torch.tensor([5.0], dtype=torch.float64)]),
        torch.cat([mask, torch.zeros_like(mask[:1])]),
        Groups.from_labels(labels + labels[:1]),
    )
    alone = authors_weights(log_prob, seq_adv, mask, Groups.from_labels(labels))
    torch.testing.assert_close(with_empty.weights[:-1], alone.weights)
    assert with_empty.weights[-1].abs().sum() == 0 and with_empty.num_rows.item() == 4


def test_groups_from_labels_number_by_first_appearance():
    groups = Groups.from_labels(["b", "a", "b", "c", "a"])
    assert groups.index.tolist() == [0, 1, 0, 2, 1] and groups.count == 3
    assert groups.sizes().tolist() == [2, 2, 1]
