"""EP-GRPO on the entropies verl really computes: ``logsumexp(l) - sum(p * l)`` rounds below 0 on peaked
distributions (issue 19, item 3); within the stated tolerance that is 0, beyond it the estimator raises."""

import pytest
import torch
from verl.utils.torch_functional import entropy_from_logits, entropy_from_logits_with_chunking

from cw_verl.ep import EPConfig, EPInputError, ep_token_advantages
from cw_verl.ep.advantage import entropy_rounding_tolerance
from tests.megatron_ranks import vocab_parallel_entropies
from tests.ranks import run_on_ranks
from tests.test_ep_math import make_batch

GROUPS, GROUP_SIZE, LENGTH = 4, 4, 16


def peaked_logits(offset: float, gaps: tuple[float, float] = (5.0, 35.0), vocab: int = 64) -> torch.Tensor:
    """``[GROUPS * GROUP_SIZE * LENGTH, vocab]`` logits around ``offset``, one token per row ahead by ``gaps``: from
    spread to all but certain distributions, the kind a trained model produces on many tokens."""
    gen = torch.Generator().manual_seed(0)
    rows = GROUPS * GROUP_SIZE * LENGTH
    logits = torch.randn(rows, vocab, generator=gen) * 2 + offset
    top = torch.randint(0, vocab, (rows,), generator=gen)
    logits[torch.arange(rows), top] += gaps[0] + (gaps[1] - gaps[0]) * torch.rand(rows, generator=gen)
    return logits


def advantages_both_ways(entropy: torch.Tensor):
    """EP-GRPO on ``entropy`` as computed, and on the same entropy with its negatives set to 0."""
    scores, advantage, group, _, old, ref, mask = make_batch(0, GROUPS, GROUP_SIZE, LENGTH, mask_density=1.0)
    entropy = entropy.reshape(GROUPS * GROUP_SIZE, LENGTH)
    as_computed = ep_token_advantages(scores, advantage, group, entropy, old, ref, mask, EPConfig())
    as_zero = ep_token_advantages(scores, advantage, group, entropy.clamp(min=0), old, ref, mask, EPConfig())
    return as_computed, as_zero


def assert_rounded_negatives_count_as_zero(entropy: torch.Tensor):
    assert (entropy < 0).any(), "no negative entropy: the case under test did not occur"
    assert entropy.min() >= -entropy_rounding_tolerance(entropy.dtype)
    as_computed, as_zero = advantages_both_ways(entropy)
    for field in ("advantages", "gate", "bucket", "progress"):
        assert torch.equal(getattr(as_computed, field), getattr(as_zero, field)), field


@pytest.mark.parametrize(
    "function, dtype, offset, gaps",
    [
        # float32 logits far from 0: the two terms are large, their difference rounds either way.
        (entropy_from_logits, torch.float32, 30.0, (5.0, 35.0)),
        # bfloat16 all the way (verl's entropy_from_logits keeps the logits' dtype): coarser rounding.
        (entropy_from_logits, torch.bfloat16, -30.0, (8.0, 16.0)),
        # bfloat16 logits, float32 arithmetic (verl's chunked variant casts each chunk).
        (entropy_from_logits_with_chunking, torch.bfloat16, 30.0, (5.0, 35.0)),
    ],
)
def test_verls_entropy_rounds_below_zero_and_ep_grpo_counts_it_as_zero(function, dtype, offset, gaps):
    logits = peaked_logits(offset, gaps).to(dtype)
    entropy = function(logits)
    # verl's own function, not a hand-made negative: the exact entropy (float64) is >= 0 everywhere.
    assert (entropy_from_logits(logits.double()) >= 0).all()
    assert_rounded_negatives_count_as_zero(entropy)


# Logits where each precision rounds below 0 (found by scanning offsets and gaps; the float32 ones above).
MEGATRON_CASES = {torch.float32: (30.0, (5.0, 35.0)), torch.bfloat16: (-30.0, (8.0, 16.0))}


@pytest.fixture(scope="module")
def vocab_parallel_tp2():
    """Megatron's vocabulary-parallel entropy on 2 gloo ranks (TP=2), both precisions in one launch."""
    cases = [(peaked_logits(*MEGATRON_CASES[dtype]), dtype) for dtype in MEGATRON_CASES]
    ranks = run_on_ranks(vocab_parallel_entropies, 2, cases)
    return dict(zip(MEGATRON_CASES, zip(*ranks, strict=True), strict=True))


@pytest.mark.parametrize("dtype", list(MEGATRON_CASES))
def test_megatrons_vocab_parallel_entropy_on_tp2_rounds_below_zero_and_ep_grpo_counts_it_as_zero(
    vocab_parallel_tp2, dtype
):
    rank0, rank1 = vocab_parallel_tp2[dtype]
    assert torch.equal(rank0, rank1)  # reduced over the two vocabulary shards
    assert rank0.dtype == dtype
    assert_rounded_negatives_count_as_zero(rank0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_clearly_negative_entropy_still_raises(dtype):
    entropy = entropy_from_logits(peaked_logits(0.0)).clamp(min=0).to(dtype)
    entropy[5] = -0.1
    with pytest.raises(
        EPInputError,
        match=rf"negative entropy on 1 valid token\(s\) \(min -0\.1\), beyond the {dtype} rounding tolerance -6\.1e-05",
    ):
        advantages_both_ways(entropy)


def test_the_tolerance_follows_the_entropys_precision():
    float32 = entropy_rounding_tolerance(torch.float32)
    assert float32 == pytest.approx(6.1e-5, rel=0.01)
    # A float64 entropy is an upcast of verl's float32 at best: the same tolerance.
    assert entropy_rounding_tolerance(torch.float64) == float32
    assert entropy_rounding_tolerance(torch.bfloat16) == pytest.approx(float32 * 2**16)
    # Negatives on padding are not looked at.
    scores, advantage, group, entropy, old, ref, mask = make_batch(0, 2, 2, 5, mask_density=1.0)
    mask[:, -1] = False
    entropy[:, -1] = -1.0
    ep_token_advantages(scores, advantage, group, entropy, old, ref, mask, EPConfig())
