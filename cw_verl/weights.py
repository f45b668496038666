"""CW-GRPO's covariance-aware advantage weights (paper Sec. 2.3) as small torch functions.

For the valid tokens of a statistics scope (N of them, possibly spread over many ranks)::

    c_t  = (logp_t - mean(logp)) * (A_t - mean(A))        # token covariance term, Sec. 2.3
    w_t  = exp(-c_t^2 / (2 sigma^2)),  sigma = std(c)      # Gaussian kernel, population std
    w~_t = w_t * N / sum(w)                                # mean 1 over the N valid tokens

This module knows nothing of verl or of process groups. Every rank computes a small vector of local
statistics; a ``gather`` callable (see :mod:`cw_verl.distributed`) stacks those vectors over the
reduction group, and every rank merges the stack identically. Two such rounds make the exact global
result: the moments (means, covariance, sigma), then the normaliser ``sum(w)``, which depends
non-linearly on the moments and cannot be fused into the first round.

Numerics: statistics are accumulated in float64 whatever the input dtype (bf16 log-probs are
normal). Each rank centres its data on its own mean and ships central co-moments; the merge shifts
them to the global mean exactly (the parallel-moments identities of Chan et al. / Pebay), which stays
accurate where raw power sums would cancel. Means are computed so that a scope whose values are all
equal yields centred values that are exactly zero (then sigma is exactly 0 and the weights are 1),
instead of rounding noise that the kernel would blow up into arbitrary weights. The normaliser is a
log-sum-exp over ranks, so weights cannot underflow to 0/0 even when every ``c^2 / 2 sigma^2`` is large.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

Gather = Callable[[torch.Tensor], torch.Tensor]
"""Maps this rank's 1-D statistics vector to a ``[group_size, K]`` stack, in the same rank order on
every rank of the reduction group. For a single process it is ``lambda v: v[None]``."""


def local_gather(vector: torch.Tensor) -> torch.Tensor:
    """The :data:`Gather` of a scope that lives on this process alone."""
    return vector.unsqueeze(0)


class CovarianceInputError(ValueError):
    """Invalid input to the CW-GRPO weights: raised on every rank of the group at the same time."""


@dataclass(frozen=True)
class CovarianceStats:
    """Statistics of one scope (all ranks of the group), identical on every rank.

    ``cov_mean`` is ``mean(c)``, i.e. the population covariance of log-prob and advantage, and
    ``sigma`` the population std of ``c``. ``weight_min``/``weight_max`` are the extreme normalised
    weights over the whole scope. ``collective_rounds`` counts the gather rounds that were used.
    """

    num_tokens: int
    logp_mean: float
    adv_mean: float
    cov_mean: float
    sigma: float
    weight_min: float
    weight_max: float
    collective_rounds: int


# Layout of the round-1 vector. Central sums S_pq = sum x^p y^q with x = logp - local mean(logp),
# y = A - local mean(A); S_00 is the count and S_10, S_01 (zero up to rounding) keep the merge exact.
# _BAD counts non-finite valid tokens, _MALFORMED ranks whose inputs could not be used at all.
_N, _BAD, _MALFORMED, _MEAN_L, _MEAN_A, _S10, _S01, _S20, _S11, _S02, _S21, _S12, _S22 = range(13)
_ROUND1_LEN = 13


def _check_inputs(log_prob: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor) -> str | None:
    if not all(isinstance(t, torch.Tensor) for t in (log_prob, advantages, mask)):
        return "log_prob, advantages and response_mask must be torch tensors"
    if not (log_prob.shape == advantages.shape == mask.shape):
        return (
            "log_prob, advantages and response_mask must have the same shape, got "
            f"{tuple(log_prob.shape)}, {tuple(advantages.shape)} and {tuple(mask.shape)}"
        )
    if not (log_prob.is_floating_point() and advantages.is_floating_point()):
        return f"log_prob and advantages must be floating point, got {log_prob.dtype} and {advantages.dtype}"
    return None


def _exact_mean(values: torch.Tensor, valid: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Masked mean with one correction pass: exactly v when every valid value equals v."""
    safe_count = count.clamp(min=1)
    mean = torch.where(valid, values, 0.0).sum() / safe_count
    # Sterbenz: values - mean is exact when mean is within a factor 2 of equal values, so the residual
    # cancels the rounding of the first pass exactly in that case, and refines it in general.
    return mean + torch.where(valid, values - mean, 0.0).sum() / safe_count


def local_moments(log_prob: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Round-1 statistics of this rank's valid tokens, as a float64 vector.

    Non-finite values at valid positions are counted (so that every rank can raise together after the
    gather) and left out of the sums (so that the gathered vector itself stays finite).
    """
    valid = mask.bool()
    logp = log_prob.detach().to(torch.float64)
    adv = advantages.detach().to(torch.float64)
    finite = torch.isfinite(logp) & torch.isfinite(adv)
    use = valid & finite
    count = use.sum().to(torch.float64)
    num_bad = (valid & ~finite).sum().to(torch.float64)
    mean_l = _exact_mean(logp, use, count)
    mean_a = _exact_mean(adv, use, count)
    x = torch.where(use, logp - mean_l, 0.0)
    y = torch.where(use, adv - mean_a, 0.0)
    xx, yy, xy = x * x, y * y, x * y
    sums = torch.stack([x, y, xx, xy, yy, xx * y, x * yy, xy * xy]).flatten(1).sum(dim=1)
    return torch.cat([torch.stack([count, num_bad, torch.zeros_like(count), mean_l, mean_a]), sums])


@dataclass(frozen=True)
class _Moments:
    num_tokens: int
    num_bad: int
    num_malformed_ranks: int
    logp_mean: float
    adv_mean: float
    cov_mean: float
    variance_c: float


def merge_moments(stack: torch.Tensor) -> _Moments:
    """Merge per-rank round-1 vectors ``[R, 12]`` into global moments, identically on every rank."""
    # One device-to-host copy; the merge is a few dozen flops on R rows.
    stack = stack.detach().to("cpu", torch.float64)
    n = stack[:, _N]
    total = n.sum()
    num_bad = int(stack[:, _BAD].sum().item())
    num_malformed = int(stack[:, _MALFORMED].sum().item())
    if total.item() == 0:
        return _Moments(0, num_bad, num_malformed, 0.0, 0.0, 0.0, 0.0)
    # Shift from the first non-empty rank's mean, so that equal means merge to exactly that mean.
    first = int(torch.nonzero(n > 0)[0, 0])
    ref_l, ref_a = stack[first, _MEAN_L], stack[first, _MEAN_A]
    mean_l = ref_l + (n * (stack[:, _MEAN_L] - ref_l)).sum() / total
    mean_a = ref_a + (n * (stack[:, _MEAN_A] - ref_a)).sum() / total
    # Shift each rank's central sums to the global means: sum (x + dl)^p (y + da)^q, binomially.
    dl = torch.where(n > 0, stack[:, _MEAN_L] - mean_l, 0.0)
    da = torch.where(n > 0, stack[:, _MEAN_A] - mean_a, 0.0)
    s10, s01, s20, s11, s02 = (stack[:, i] for i in (_S10, _S01, _S20, _S11, _S02))
    s21, s12, s22 = stack[:, _S21], stack[:, _S12], stack[:, _S22]
    c11 = (s11 + da * s10 + dl * s01 + dl * da * n).sum()
    c22 = (
        s22
        + 2 * da * s21
        + da * da * s20
        + 2 * dl * s12
        + 4 * dl * da * s11
        + 2 * dl * da * da * s10
        + dl * dl * s02
        + 2 * dl * dl * da * s01
        + dl * dl * da * da * n
    ).sum()
    cov = c11 / total
    variance_c = (c22 / total - cov * cov).clamp(min=0.0)
    return _Moments(
        int(total.item()), num_bad, num_malformed, mean_l.item(), mean_a.item(), cov.item(), variance_c.item()
    )


def token_covariance(
    log_prob: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, logp_mean: float, adv_mean: float
) -> torch.Tensor:
    """``c`` of Sec. 2.3 for every position (float64); 0 where the mask is off."""
    valid = mask.bool()
    x = log_prob.detach().to(torch.float64) - logp_mean
    y = advantages.detach().to(torch.float64) - adv_mean
    return torch.where(valid, x * y, 0.0)


def covariance_weights(
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    gather: Gather = local_gather,
) -> tuple[torch.Tensor, torch.Tensor, CovarianceStats]:
    """Normalised CW-GRPO weights ``w~`` for this rank's tokens, with global statistics.

    Args:
        log_prob: ``[B, T]`` log-probs of the sampled tokens (any float dtype; used detached).
        advantages: ``[B, T]`` advantages.
        mask: ``[B, T]`` valid-token mask (nonzero = valid, as verl's ``response_mask``).
        gather: stacks a 1-D vector over the statistics scope's ranks (:mod:`cw_verl.distributed`).

    Returns:
        ``(weights, c, stats)``: float64 weights (1 at masked-out positions), the token covariance
        ``c`` (0 at masked-out positions) and the scope's :class:`CovarianceStats`.

    Defined degenerate cases: sigma = 0 (e.g. all advantages equal) gives weights 1; a scope without
    valid tokens gives weights 1 and zero statistics; non-finite log-probs or advantages at valid
    positions raise :class:`CovarianceInputError` on every rank. Every rank joins every round, so a
    rank with no valid tokens, or with bad input, never leaves the others waiting.
    """
    problem = _check_inputs(log_prob, advantages, mask)
    if problem is None:
        round1 = local_moments(log_prob, advantages, mask)
    else:
        # Still join the round, flagged, so the other ranks raise instead of hanging.
        device = log_prob.device if isinstance(log_prob, torch.Tensor) else None
        round1 = torch.zeros(_ROUND1_LEN, dtype=torch.float64, device=device)
        round1[_MALFORMED] = 1.0
    moments = merge_moments(gather(round1))
    if problem is not None:
        raise CovarianceInputError(problem)
    if moments.num_malformed_ranks:
        raise CovarianceInputError(
            f"{moments.num_malformed_ranks} other rank(s) of the statistics scope got malformed input "
            "(see their error); no CW-GRPO weights can be computed."
        )
    if moments.num_bad:
        raise CovarianceInputError(
            f"{moments.num_bad} valid token(s) in the statistics scope have a non-finite log-prob or "
            "advantage; CW-GRPO weights are undefined. Check the rollout/log-prob computation for inf/NaN."
        )

    valid = mask.bool()
    c = token_covariance(log_prob, advantages, mask, moments.logp_mean, moments.adv_mean)
    ones = torch.ones_like(c)
    if moments.num_tokens == 0 or moments.variance_c == 0.0:
        # sigma = 0 means every c is equal, hence every w is equal: the normalised weights are 1.
        stats = CovarianceStats(
            moments.num_tokens, moments.logp_mean, moments.adv_mean, moments.cov_mean, 0.0, 1.0, 1.0, 1
        )
        return ones, c, stats

    # q = c^2 / (2 sigma^2); w = exp(-q). Shift by the scope's smallest q (log-sum-exp across ranks).
    q = c * c / (2.0 * moments.variance_c)
    # The appended sentinels keep min/max defined for a rank that holds no (valid) tokens at all.
    sentinels = q.new_tensor([math.inf, -math.inf])
    q_valid_min = torch.cat([torch.where(valid, q, math.inf).flatten(), sentinels[:1]]).min()
    q_valid_max = torch.cat([torch.where(valid, q, -math.inf).flatten(), sentinels[1:]]).max()
    local_sum = torch.where(valid, torch.exp(-(q - q_valid_min)), 0.0).sum()
    round2 = torch.stack([q_valid_min, q_valid_max, local_sum])
    stack2 = gather(round2).detach().to("cpu", torch.float64)
    q_min, q_max = stack2[:, 0].min(), stack2[:, 1].max()
    # Ranks without valid tokens carry (q_min=inf, sum=0) and contribute nothing.
    shifted = torch.where(stack2[:, 2] > 0, stack2[:, 2] * torch.exp(-(stack2[:, 0] - q_min)), 0.0)
    normaliser = moments.num_tokens / shifted.sum().item()
    weights = torch.where(valid, torch.exp(-(q - q_min.item())) * normaliser, ones)
    stats = CovarianceStats(
        num_tokens=moments.num_tokens,
        logp_mean=moments.logp_mean,
        adv_mean=moments.adv_mean,
        cov_mean=moments.cov_mean,
        sigma=math.sqrt(moments.variance_c),
        weight_min=math.exp(-(q_max - q_min).item()) * normaliser,
        weight_max=normaliser,
        collective_rounds=2,
    )
    return weights, c, stats
