"""EP-GRPO's pure functions (cw_verl.ep): properties of issue 12 and a loop-by-loop fp64 transcription."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cw_verl.ep import EPConfig, EPInputError, ep_token_advantages
from cw_verl.ep.buckets import bucket_index, bucket_normalise, progress_coordinate
from cw_verl.ep.gate import entropy_gate

SETTINGS = settings(max_examples=25, deadline=None)


def make_batch(seed, groups, group_size, length, mask_density=0.8, binary=True):
    gen = torch.Generator().manual_seed(seed)
    batch = groups * group_size
    group = torch.arange(groups).repeat_interleave(group_size)
    if binary:
        scores = (torch.rand(batch, generator=gen) < 0.5).to(torch.float64)
    else:
        scores = torch.rand(batch, generator=gen, dtype=torch.float64)
    advantage = torch.zeros(batch, dtype=torch.float64)
    for g in range(groups):
        members = group == g
        r = scores[members]
        advantage[members] = (r - r.mean()) / (r.std() + 1e-6) if group_size > 1 else r
    mask = torch.rand(batch, length, generator=gen) < mask_density
    mask[:, 0] = True
    entropy = torch.rand(batch, length, generator=gen, dtype=torch.float64) * 3
    old = -torch.rand(batch, length, generator=gen, dtype=torch.float64) * 4
    ref = old + torch.randn(batch, length, generator=gen, dtype=torch.float64) * 0.3
    return scores, advantage, group, entropy, old, ref, mask


batches = st.builds(
    make_batch,
    seed=st.integers(0, 2**31 - 1),
    groups=st.integers(1, 4),
    group_size=st.integers(1, 5),
    length=st.integers(1, 30),
    mask_density=st.sampled_from([0.3, 0.8, 1.0]),
    binary=st.booleans(),
)


def reference(scores, advantage, group, entropy, old, ref, mask, cfg):
    """Issue 12's equations, one token at a time in Python floats."""
    B, T = mask.shape
    valid = [(i, t) for i in range(B) for t in range(T) if mask[i, t]]
    hs = [float(entropy[i, t]) for i, t in valid]
    mean_h = sum(hs) / len(hs)
    std_h = math.sqrt(sum((h - mean_h) ** 2 for h in hs) / len(hs))
    direction = []
    for i in range(B):
        members = [float(scores[j]) for j in range(B) if group[j] == group[i]]
        a = float(advantage[i])
        if max(members) != min(members):
            direction.append((a > 0) - (a < 0))
        else:
            d = float(scores[i]) - cfg.reward_threshold
            direction.append((d > 0) - (d < 0))
    bucket = {}
    for i in range(B):
        ts = [t for t in range(T) if mask[i, t]]
        total = sum(float(entropy[i, t]) for t in ts)
        running = 0.0
        for n, t in enumerate(ts, start=1):
            running += float(entropy[i, t])
            scaled = cfg.num_buckets * running / total if total > 0 else cfg.num_buckets * n / len(ts)
            bucket[i, t] = min(max(math.ceil(scaled) - 1, 0), cfg.num_buckets - 1)
    members = {}
    for key, k in bucket.items():
        members.setdefault(k, []).append(float(old[key]) - float(ref[key]))
    stats = {}
    for k, xs in members.items():
        mu = sum(xs) / len(xs)
        stats[k] = (mu, math.sqrt(sum((x - mu) ** 2 for x in xs) / len(xs)))
    out = torch.zeros(B, T, dtype=torch.float64)
    for i, t in valid:
        z = (float(entropy[i, t]) - mean_h) / std_h if std_h > 0 else 0.0
        gate = 1 / (1 + math.exp(-cfg.gamma * z))
        mu, sigma = stats[bucket[i, t]]
        s = (float(old[i, t]) - float(ref[i, t]) - mu) / (sigma + cfg.epsilon)
        out[i, t] = gate * float(advantage[i]) + cfg.lam * direction[i] * s
    return out


@SETTINGS
@given(batches, st.sampled_from([EPConfig(), EPConfig(gamma=3.0, lam=1.0, num_buckets=3, reward_threshold=0.2)]))
def test_matches_transcription(batch, cfg):
    result = ep_token_advantages(*batch, cfg)
    torch.testing.assert_close(result.advantages, reference(*batch, cfg), rtol=1e-9, atol=1e-9)
    assert torch.all(result.advantages[~batch[-1]] == 0)


@SETTINGS
@given(batches)
def test_gate_in_open_unit_interval_and_monotone_in_entropy(batch):
    _, _, _, entropy, _, _, mask = batch
    gate = entropy_gate(entropy, mask, gamma=2.0)
    g, h = gate[mask], entropy[mask]
    assert torch.all((g > 0) & (g < 1))
    order = torch.argsort(h)
    assert torch.all(g[order].diff() >= 0)
    # strictly increasing where the entropies strictly increase (unless all equal)
    strict = h[order].diff() > 0
    assert torch.all(g[order].diff()[strict] > 0)


def test_zero_variance_group_gets_polarity_correct_token_advantages():
    scores, advantage, group, entropy, old, ref, mask = make_batch(3, groups=2, group_size=4, length=12)
    scores[:4], advantage[:4] = 1.0, 0.0  # all correct: GRPO and CW-GRPO give no gradient
    scores[4:], advantage[4:] = 0.0, 0.0  # all wrong
    result = ep_token_advantages(scores, advantage, group, entropy, old, ref, mask, EPConfig())
    assert torch.equal(result.polarity, torch.tensor([1.0] * 4 + [-1.0] * 4, dtype=torch.float64))
    assert torch.all(result.outcome == 0)
    assert (result.advantages[mask] != 0).float().mean() > 0.9
    # polarity-correct: the sign is d_i times the sign of the token's divergence relative to its bucket
    normalised = bucket_normalise(old - ref, result.bucket, mask, 10)
    expected_sign = torch.sign(result.polarity[:, None] * normalised)
    assert torch.equal(torch.sign(result.advantages)[mask], expected_sign[mask])


def test_varying_group_polarity_follows_outcome_advantage():
    scores = torch.tensor([1.0, 0.0, 0.0, 0.5, 0.5, 0.5])
    advantage = torch.tensor([1.2, -0.6, -0.6, 0.0, 0.0, 0.0])
    group = torch.tensor([0, 0, 0, 1, 1, 1])
    mask = torch.ones(6, 4, dtype=torch.bool)
    h = torch.rand(6, 4)
    result = ep_token_advantages(scores, advantage, group, h, -h, -2 * h, mask, EPConfig(reward_threshold=0.5))
    # group 1 does not vary and sits exactly at the threshold: no direction
    assert result.polarity.tolist() == [1.0, -1.0, -1.0, 0.0, 0.0, 0.0]


@SETTINGS
@given(st.integers(0, 2**31 - 1), st.integers(1, 4), st.integers(1, 5))
def test_bucket_normalisation_invariant_to_response_length_scaling(seed, stretch, num_buckets):
    """Stretching a response (each token repeated ``stretch`` times) keeps every copy in its token's bucket
    when the token's entropy interval lies inside one bucket, so the normalised values are unchanged.
    Integer entropies that fill each bucket exactly make that hold; scaling all entropies is a no-op too."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(3):
        per_bucket = [range(int(torch.randint(1, 4, (1,), generator=gen))) for _ in range(num_buckets)]
        # integer entropies filling every bucket to exactly 12 (a random composition of 12): exact in float64
        row = []
        for tokens in per_bucket:
            cuts = torch.randperm(11, generator=gen)[: len(tokens) - 1].add(1).sort().values
            edges = torch.cat([torch.tensor([0]), cuts, torch.tensor([12])])
            row.append(edges.diff().to(torch.float64))
        rows.append(torch.cat(row))
    length = max(len(r) for r in rows)
    entropy = torch.zeros(3, length, dtype=torch.float64)
    mask = torch.zeros(3, length, dtype=torch.bool)
    for i, r in enumerate(rows):
        entropy[i, : len(r)], mask[i, : len(r)] = r, True
    divergence = torch.randn(3, length, generator=gen, dtype=torch.float64)
    base = bucket_normalise(divergence, bucket_index(entropy, mask, num_buckets), mask, num_buckets)

    stretched_h = entropy.repeat_interleave(stretch, dim=1) * 7.0
    stretched_mask = mask.repeat_interleave(stretch, dim=1)
    stretched_div = divergence.repeat_interleave(stretch, dim=1)
    bucket = bucket_index(stretched_h, stretched_mask, num_buckets)
    stretched = bucket_normalise(stretched_div, bucket, stretched_mask, num_buckets)
    torch.testing.assert_close(stretched, base.repeat_interleave(stretch, dim=1), rtol=1e-12, atol=1e-12)
    tau = progress_coordinate(stretched_h, stretched_mask)
    assert torch.all(tau[stretched_mask] > 0) and torch.all(tau[stretched_mask] <= 1)


def test_progress_coordinate_ends_at_one_and_falls_back_to_position():
    entropy = torch.tensor([[0.5, 0.0, 1.5, 0.0], [0.0, 0.0, 0.0, 9.0]])
    mask = torch.tensor([[True, True, True, False], [True, True, True, False]])
    tau = progress_coordinate(entropy, mask)
    torch.testing.assert_close(tau[0], torch.tensor([0.25, 0.25, 1.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(tau[1], torch.tensor([1 / 3, 2 / 3, 1.0, 0.0], dtype=torch.float64))


def test_permutation_equivariant():
    batch = make_batch(5, groups=3, group_size=4, length=9)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(1))
    base = ep_token_advantages(*batch, EPConfig()).advantages
    permuted = ep_token_advantages(*(x[perm] for x in batch), EPConfig()).advantages
    torch.testing.assert_close(permuted, base[perm], rtol=1e-12, atol=1e-12)


def test_equal_entropies_and_single_token_buckets_give_finite_values():
    mask = torch.ones(2, 3, dtype=torch.bool)
    h = torch.ones(2, 3)
    result = ep_token_advantages(
        torch.tensor([1.0, 1.0]), torch.zeros(2), torch.tensor([0, 0]), h, -h, -h, mask, EPConfig()
    )
    assert torch.all(result.gate == 0.5)
    assert torch.all(torch.isfinite(result.advantages))


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda b: b.__setitem__(3, b[3].clone().fill_(math.nan)), "entropy has"),
        (lambda b: b.__setitem__(5, b[5][:, :-1]), "ref_log_prob has shape"),
        (lambda b: b.__setitem__(6, torch.zeros_like(b[6])), "no valid response token"),
        (lambda b: b.__setitem__(3, -b[3]), "negative entropy"),
        (lambda b: b.__setitem__(0, b[0][:-1]), "scores has shape"),
    ],
)
def test_bad_input_raises_precise_error(mutate, message):
    batch = list(make_batch(0, groups=2, group_size=2, length=5, mask_density=1.0))
    mutate(batch)
    with pytest.raises(EPInputError, match=message):
        ep_token_advantages(*batch, EPConfig())


def test_nan_on_padding_is_ignored():
    batch = list(make_batch(0, groups=2, group_size=2, length=5, mask_density=1.0))
    batch[6][:, -1] = False
    batch[4][:, -1] = math.nan
    assert torch.all(torch.isfinite(ep_token_advantages(*batch, EPConfig()).advantages))


@pytest.mark.parametrize("kwargs", [{"gamma": 0.0}, {"lam": -1.0}, {"num_buckets": 0}, {"num_buckets": 2.5}])
def test_bad_knobs_raise(kwargs):
    with pytest.raises(EPInputError):
        EPConfig(**kwargs)
