"""CW-GRPO's covariance-aware advantage weights (paper Sec. 2.3) as small torch functions.

For the valid tokens of a statistics *segment* (N of them, possibly spread over many ranks)::

    c_t  = (logp_t - mean(logp)) * (A_t - mean(A))        # token covariance term, Sec. 2.3
    w_t  = exp(-c_t^2 / (2 sigma^2)),  sigma = std(c)      # Gaussian kernel, population std
    w~_t = w_t * N / sum(w)                                # mean 1 over the segment's N valid tokens

A segment is the set of tokens whose statistics are shared: everything in scope (one segment), or one
prompt's group of responses (the paper's G responses, one segment per group). Rows (sequences) carry an
int64 segment key; rows with equal keys on any rank form one segment.

This module knows nothing of verl or of process groups. Each rank reduces its ``[B, T]`` tokens to a
small table per round; a ``gather`` callable (see :mod:`cw_verl.distributed`) stacks the tables over the
reduction group and every rank merges the stack identically, on the inputs' device and without reading
anything back to the host. Each round needs the result of the one before, so three is the minimum:

1. token counts and sums of log-probs and advantages -> the means (and a first estimate of mean(c));
2. with the global means, every token's ``c``; sums of ``c - estimate`` and its square -> sigma, and the
   smallest and largest ``|c|``. The estimate is within rounding of mean(c), so sigma comes from centred
   values and never from the difference of raw moments E[c^2] - E[c]^2, which cancels when
   sigma << |mean(c)|;
3. with sigma and the smallest ``|c|``, the sum of the kernel ``exp(-(c^2 - c_min^2) / 2 sigma^2)`` -> the
   normaliser. The kernel is at most 1 and is 1 at the smallest ``|c|``, so the sum is at least 1: no
   0/0 when ``exp(-c^2 / 2 sigma^2)`` itself underflows everywhere.

Numerics. Per-token values are computed in the inputs' precision, at least float32 (float64 inputs stay
float64); every cross-row and cross-rank sum is float64. Each token's ``c`` is a pointwise function of the
global means, so it is the same number whichever rank or micro-batch holds the token, and so is its weight:
the weights applied by a loss call (:func:`token_weights`) are bitwise those of the statistics pass. A sigma
below the rounding error of the computed ``c`` themselves (:data:`FLOOR_ULPS` units of the compute
precision, scaled by the terms that round) is not a spread of ``c`` but noise, and counts as 0: then, as
whenever the exact ``c`` of a segment are all equal (e.g. any 2-token segment, or equal advantages), the
weights are exactly 1. A kernel value below the smallest normal number of the compute precision
(``|c|`` more than ~13 sigma above the smallest) is that number instead (about 1e-38 in float32): on a CPU
``exp`` of a result that underflows is 10-40 times slower than of any other, and no sum can see the difference.

Bad input. A valid token whose log-prob is not finite takes no part: it is left out of the statistics,
weighs 0, and is counted (``num_excluded``). A non-finite advantage at a valid token, or malformed tensors
on any rank, is an error raised on every rank together (:func:`raise_for_bad_input`), after the rounds
that every rank always joins, so that no rank is left waiting.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

Gather = Callable[[torch.Tensor], torch.Tensor]
"""Maps this rank's tensor to a stack ``[group_size, *shape]`` of every rank's tensor of the same shape,
in the same rank order on every rank. For a single process it is :func:`local_gather`."""

F64 = torch.float64
FLOOR_ULPS = 64.0
"""sigma at or below ``FLOOR_ULPS * eps * rms(|mean(logp)| |A - mean(A)| + |mean(A)| |logp - mean(logp)| + 3 |c|)``
(``eps`` of the compute precision) is rounding noise of the computed ``c`` (each is exact to about ``eps``
times that sum) and counts as 0."""
_NO_KEY = torch.iinfo(torch.int64).max  # sorts after every key: the slots of the stack that hold no segment


def kernel_limit(dtype: torch.dtype) -> float:
    """The largest kernel exponent kept in ``dtype``: ``exp(-limit)`` is still a normal number."""
    return float(math.floor(-math.log(torch.finfo(dtype).tiny)))


def local_gather(table: torch.Tensor) -> torch.Tensor:
    """The :data:`Gather` of a scope that lives on this process alone."""
    return table.unsqueeze(0)


class CovarianceInputError(ValueError):
    """Invalid input to the CW-GRPO weights: raised on every rank of the group at the same time."""


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Precision of the per-token arithmetic: the input's, at least float32."""
    return torch.promote_types(dtype, torch.float32)


def check_inputs(log_prob, advantages, mask) -> str | None:
    """Why these inputs cannot be used (``None`` if they can); a check of shapes and types only."""
    if not all(isinstance(t, torch.Tensor) for t in (log_prob, advantages, mask)):
        return "log_prob, advantages and response_mask must be torch tensors"
    if not (log_prob.shape == advantages.shape == mask.shape) or log_prob.dim() != 2:
        return (
            "log_prob, advantages and response_mask must have the same [batch, length] shape, got "
            f"{tuple(log_prob.shape)}, {tuple(advantages.shape)} and {tuple(mask.shape)}"
        )
    if not (log_prob.is_floating_point() and advantages.is_floating_point()):
        return f"log_prob and advantages must be floating point, got {log_prob.dtype} and {advantages.dtype}"
    return None


@dataclass(frozen=True)
class ScopeStatistics:
    """The statistics of every segment of a scope, identical on every rank (except ``local_problem``).

    Per-segment fields are ``[G]`` tensors on the inputs' device (float64 unless noted), one slot per
    row of the gathered stack (``G = ranks * max_segments``), sorted by key; slots with ``rows == 0``
    hold no segment. ``variance`` is that of ``c`` (0 below the rounding floor), ``cov_mean`` is mean(c)
    (the population covariance of log-prob and advantage). A token of the segment weighs
    ``w~ = norm * exp(-(|c| - abs_c_min) (|c| + abs_c_min) inv_two_var)`` (:func:`kernel`): the exponent is
    ``-(c^2 - c_min^2) / 2 sigma^2`` written so that it keeps its precision when sigma << |c|, and ``norm``
    is ``N / sum(kernel)``, the largest weight.
    ``status`` is ``[ranks, 3]``: per rank, unusable input (1/0), non-finite advantages at valid tokens
    (count), and the rank's compute precision eps. ``local_problem`` is why this rank's input was unusable.
    """

    keys: torch.Tensor  # int64
    rows: torch.Tensor
    num_tokens: torch.Tensor
    num_excluded: torch.Tensor
    logp_mean: torch.Tensor
    adv_mean: torch.Tensor
    cov_mean: torch.Tensor
    variance: torch.Tensor
    inv_two_var: torch.Tensor
    abs_c_min: torch.Tensor
    abs_c_max: torch.Tensor
    norm: torch.Tensor
    weight_min: torch.Tensor
    weight_max: torch.Tensor
    status: torch.Tensor
    local_problem: str | None = None

    def slots_of(self, row_keys: torch.Tensor | None) -> torch.Tensor | None:
        """The slot of each row's segment (``None``: a scope of one segment, whose slot is 0)."""
        if row_keys is None:
            return None
        return torch.searchsorted(self.keys, row_keys.to(self.keys.device, non_blocking=True))

    @property
    def total_tokens(self) -> int:
        """Tokens in the statistics (a read to the host)."""
        return int(self.num_tokens.sum().item())

    @property
    def sigma(self) -> float:
        """sigma of the scope; with several segments, their token-weighted RMS (a read to the host)."""
        return self.summary()[2].item()

    def summary(self) -> torch.Tensor:
        """``[6]`` float64 on the device: total tokens, excluded tokens, sigma (token-weighted RMS over
        segments), mean(c) (token-weighted), the smallest and the largest weight of the scope."""
        tokens = self.num_tokens.sum()
        safe = tokens.clamp(min=1.0)
        present = self.num_tokens > 0
        return torch.stack(
            [
                tokens,
                self.num_excluded.sum(),
                torch.sqrt((self.variance * self.num_tokens).sum() / safe),
                (self.cov_mean * self.num_tokens).sum() / safe,
                torch.where(present, self.weight_min, math.inf).amin().clamp(max=1.0),
                torch.where(present, self.weight_max, 0.0).amax().clamp(min=1.0),
            ]
        )


@dataclass(frozen=True)
class WeighedTokens:
    """This rank's ``[B, T]`` tokens after :func:`scope_statistics` (compute precision, on the device).

    ``valid`` is 1 at the tokens in the statistics (masked and with a finite log-prob), ``weights`` holds
    their ``w~`` and ``cov`` their ``c`` (both 0 elsewhere), ``slots`` each row's segment slot.
    """

    weights: torch.Tensor
    cov: torch.Tensor
    valid: torch.Tensor
    slots: torch.Tensor


def kernel_exponent(abs_c, abs_c_min, inv_two_var):
    """``(c^2 - c_min^2) / 2 sigma^2`` as ``(|c| - |c|_min) (|c| + |c|_min) / 2 sigma^2``: the difference is
    taken before the product, so it stays exact when sigma is tiny next to |c| (then c^2 / 2 sigma^2
    alone would be a huge number whose rounding exceeds the differences between tokens)."""
    return (abs_c - abs_c_min).mul_(abs_c + abs_c_min).mul_(inv_two_var)


def kernel(abs_c: torch.Tensor, abs_c_min, inv_two_var) -> torch.Tensor:
    """``exp(-(c^2 - c_min^2) / 2 sigma^2)`` of ``|c|`` (a new tensor), in (0, 1] where ``|c| >= c_min``.

    The exponent is clamped to ``[0, kernel_limit]``: below 0 it only occurs away from the valid tokens
    (whose weights are then masked, and must not overflow on the way), above the limit ``exp`` would
    underflow, which a CPU computes 10-40 times slower than any other value. NaN stays NaN.
    """
    # Negated on the [B, 1] factor rather than on the [B, T] product.
    negative_exponent = kernel_exponent(abs_c, abs_c_min, -inv_two_var)
    return negative_exponent.clamp_(-kernel_limit(negative_exponent.dtype), 0.0).exp_()


def _local_segments(row_keys: torch.Tensor | None, num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's sorted segment keys and each row's index into them (on the host, where keys are made)."""
    host = torch.device("cpu")
    if row_keys is None:
        return torch.zeros(1 if num_rows else 0, dtype=torch.int64, device=host), torch.zeros(
            num_rows, dtype=torch.int64, device=host
        )
    keys, index = torch.unique(row_keys.cpu(), return_inverse=True)
    return keys, index


def _segment_sum(per_row: torch.Tensor, row_segment: torch.Tensor, capacity: int) -> torch.Tensor:
    """``[B, k]`` row values summed into ``[capacity, k]`` segment rows (float64)."""
    out = torch.zeros(capacity, per_row.shape[1], dtype=F64, device=per_row.device)
    return out.index_add_(0, row_segment, per_row.to(F64))


# Round-1 table: row 0 holds this rank's status, rows 1.. one local segment each.
KEY, ROWS, N, EXCLUDED, SUM_L, SUM_A, SUM_LA, SUM_LL, SUM_AA = range(9)
MALFORMED, BAD_ADVANTAGES, EPS = range(3)
# Round-2 table: per local segment the sum of c - estimate, of its square, and the smallest and largest |c|.
DEVIATION, DEVIATION_SQUARED, C_MIN, C_MAX = range(4)


@dataclass(frozen=True)
class _Merge:
    """How the gathered round-1 stack maps onto global segment slots (the same on every rank)."""

    slot_of_entry: torch.Tensor  # [R * capacity] slot of each (rank, local segment) entry
    keys: torch.Tensor  # [G] sorted, _NO_KEY where empty
    sums: torch.Tensor  # [G, 8] ROWS..SUM_AA summed per slot
    status: torch.Tensor  # [R, 3]

    def total(self, column: int) -> torch.Tensor:
        """``[G]`` the round-1 ``column`` (:data:`N`, :data:`SUM_L`, ...) summed per slot."""
        return self.sums[:, column - ROWS]

    def add(self, entries: torch.Tensor) -> torch.Tensor:
        """Sum ``[R, capacity, k]`` per-entry values into ``[G, k]`` slots (:func:`_sum_by_rank`)."""
        return _sum_by_rank(
            entries.reshape(-1, entries.shape[-1]), self.slot_of_entry, len(self.keys), len(self.status)
        )

    def reduce(self, entries: torch.Tensor, how: str, empty: float) -> torch.Tensor:
        """``amin``/``amax`` of ``[R, capacity]`` per-entry values per slot (``empty`` where none)."""
        out = torch.full((len(self.keys),), empty, dtype=F64, device=entries.device)
        return out.scatter_reduce(0, self.slot_of_entry, entries.reshape(-1), reduce=how)


def _merge_round1(stack: torch.Tensor) -> _Merge:
    status = stack[:, 0, :3]
    entries = stack[:, 1:, :].reshape(-1, stack.shape[-1])
    present = entries[:, ROWS] > 0
    keys = torch.where(present, entries[:, KEY].contiguous().view(torch.int64), _NO_KEY)
    sorted_keys, order = torch.sort(keys, stable=True)
    new_segment = torch.ones_like(sorted_keys, dtype=torch.int64)
    new_segment[1:] = (sorted_keys[1:] != sorted_keys[:-1]).long()
    sorted_slot = torch.cumsum(new_segment, 0) - 1
    slot_of_entry = torch.empty_like(sorted_slot).scatter_(0, order, sorted_slot)
    slot_keys = torch.full_like(sorted_keys, _NO_KEY).scatter_(0, sorted_slot, sorted_keys)
    sums = _sum_by_rank(entries[:, ROWS:], slot_of_entry, len(keys), len(status))
    return _Merge(slot_of_entry, slot_keys, sums, status)


def _sum_by_rank(entries: torch.Tensor, slot_of_entry: torch.Tensor, num_slots: int, ranks: int) -> torch.Tensor:
    """``[R * capacity, k]`` rank-major entries summed into ``[num_slots, k]`` slots, one rank after another.

    A rank holds each segment at most once, so one rank's entries land in distinct slots (its empty entries
    add zeros): adding rank by rank fixes the order of every slot's sum, the same on every rank and in every
    run. One ``index_add_`` over all ranks would add on a GPU in whatever order its atomics run, and ranks
    could then disagree in the last bit."""
    out = torch.zeros(num_slots, entries.shape[1], dtype=F64, device=entries.device)
    for rank_entries, rank_slots in zip(entries.chunk(ranks), slot_of_entry.chunk(ranks), strict=True):
        out.index_add_(0, rank_slots, rank_entries)
    return out


def scope_statistics(
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    gather: Gather = local_gather,
    row_keys: torch.Tensor | None = None,
    max_segments: int = 1,
    problem: str | None = None,
) -> tuple[ScopeStatistics, WeighedTokens | None]:
    """Global statistics of every segment in scope (three gather rounds), and this rank's weighed tokens.

    Args:
        log_prob: ``[B, T]`` log-probs of the sampled tokens (any float dtype; used detached).
        advantages: ``[B, T]`` advantages.
        mask: ``[B, T]`` valid-token mask (nonzero = valid, as verl's ``response_mask``).
        gather: stacks a tensor over the scope's ranks (:func:`cw_verl.distributed.group_gather`).
        row_keys: ``[B]`` int64 segment key per row (e.g. a hash of the prompt's uid), on the host;
            ``None``: one segment.
        max_segments: the most segments any rank holds (every rank ships tables of that many rows).
        problem: why this rank's inputs are unusable, if the caller already knows; the inputs are
            checked here too (:func:`check_inputs`).

    Returns:
        ``(stats, tokens)``: the :class:`ScopeStatistics`, the same on every rank, and this rank's
        :class:`WeighedTokens` (``None`` if its inputs are unusable). Nothing is read back to the host:
        call :func:`raise_for_bad_input` with ``stats`` before using the results.
    """
    if problem is None:
        problem = check_inputs(log_prob, advantages, mask)
    device = log_prob.device if isinstance(log_prob, torch.Tensor) else torch.device("cpu")
    if problem is None:
        local_keys, row_segment = _local_segments(row_keys, log_prob.shape[0])
        if len(local_keys) > max_segments:
            problem = f"{len(local_keys)} segments on one rank, more than the {max_segments} announced"
    capacity = max(int(max_segments), 1)

    table = torch.zeros(capacity + 1, 9, dtype=F64, device=device)
    if problem is not None:
        # Join all three rounds with empty tables, so that every rank learns of the problem together.
        table[0, MALFORMED] = 1.0
        merge = _merge_round1(gather(table))
        stats = _finish(merge, gather(_empty_round2(capacity, device)), None, problem)
        return _normalise(stats, merge, gather(torch.zeros(capacity, 1, dtype=F64, device=device))), None

    # Round 1: counts and sums of each row's valid tokens (nothing here reads back to the host).
    dtype = compute_dtype(torch.promote_types(log_prob.dtype, advantages.dtype))
    row_segment = row_segment.to(device, non_blocking=True)
    mask_f = mask.to(dtype)
    logp = log_prob.detach().to(dtype)
    adv = advantages.detach().to(dtype)
    # A valid token with a non-finite log-prob is left out; one with a non-finite advantage is an error.
    valid = mask_f * torch.isfinite(logp)
    in_statistics = valid.bool()
    bad_advantages = (in_statistics & ~torch.isfinite(adv)).sum()
    logp0 = torch.nan_to_num(logp, nan=0.0, posinf=0.0, neginf=0.0).mul_(valid)
    adv0 = torch.nan_to_num(adv, nan=0.0, posinf=0.0, neginf=0.0).mul_(valid)
    num_valid = valid.sum(1)
    per_row = torch.stack(
        [
            torch.ones_like(num_valid),
            num_valid,
            mask_f.sum(1) - num_valid,
            logp0.sum(1),
            adv0.sum(1),
            (logp0 * adv0).sum(1),
            torch.linalg.vector_norm(logp0, dim=1).square_(),
            torch.linalg.vector_norm(adv0, dim=1).square_(),
        ],
        dim=1,
    )
    table[1 : len(local_keys) + 1, KEY] = local_keys.to(device, non_blocking=True).view(F64)
    table[1:, ROWS:] = _segment_sum(per_row, row_segment, capacity)
    table[0, BAD_ADVANTAGES] = bad_advantages
    table[0, EPS] = torch.finfo(dtype).eps
    merge = _merge_round1(gather(table))

    # Round 2: every token's c from the global means, summed about an estimate of mean(c); the extremes of
    # |c| over the valid tokens.
    slots = torch.searchsorted(merge.keys, local_keys.to(device, non_blocking=True))[row_segment]
    n = merge.total(N).clamp(min=1.0)
    logp_mean = merge.total(SUM_L) / n
    adv_mean = merge.total(SUM_A) / n
    cov_estimate = merge.total(SUM_LA) / n - logp_mean * adv_mean
    per_slot = torch.stack([logp_mean, adv_mean, cov_estimate], dim=1).to(dtype)[slots]
    centred_adv = adv0 - per_slot[:, 1:2]
    # Sec. 2.3: c = (logp - mean(logp)) * (A - mean(A)), 0 at invalid positions.
    cov = (logp0 - per_slot[:, 0:1]).mul_(valid).mul_(centred_adv)
    deviation = torch.addcmul(cov, valid, per_slot[:, 2:3], value=-1.0, out=centred_adv)
    abs_cov = cov.abs()
    has_tokens = num_valid > 0
    per_row = torch.stack(
        [
            deviation.sum(1).to(F64),
            torch.linalg.vector_norm(deviation, dim=1).square_().to(F64),
            torch.where(has_tokens, torch.where(in_statistics, abs_cov, math.inf).amin(1), math.inf).to(F64),
            torch.where(has_tokens, abs_cov.amax(1), -math.inf).to(F64),
        ],
        dim=1,
    )
    local = _empty_round2(capacity, device)
    local[:, :2].index_add_(0, row_segment, per_row[:, :2])
    local[:, C_MIN].scatter_reduce_(0, row_segment, per_row[:, C_MIN], reduce="amin")
    local[:, C_MAX].scatter_reduce_(0, row_segment, per_row[:, C_MAX], reduce="amax")
    stats = _finish(merge, gather(local), (logp_mean, adv_mean, cov_estimate), None)

    # Round 3: Sec. 2.3's w = exp(-c^2 / 2 sigma^2), as the kernel about the segment's smallest |c| (the same
    # w up to a factor per segment, which the normalisation w~ = w * N / sum(w) cancels), 0 at invalid positions.
    abs_c_min = stats.abs_c_min.to(dtype)[slots][:, None]
    weights = kernel(abs_cov, abs_c_min, stats.inv_two_var.to(dtype)[slots][:, None]).mul_(valid)
    stats = _normalise(stats, merge, gather(_segment_sum(weights.sum(1, keepdim=True), row_segment, capacity)))
    weights.mul_(stats.norm.to(dtype)[slots][:, None])
    return stats, WeighedTokens(weights=weights, cov=cov, valid=valid, slots=slots)


def _empty_round2(capacity: int, device) -> torch.Tensor:
    """A round-2 table without tokens: zero sums, and the extremes of nothing."""
    table = torch.zeros(capacity, 4, dtype=F64, device=device)
    table[:, C_MIN], table[:, C_MAX] = math.inf, -math.inf
    return table


def _finish(merge: _Merge, stack2: torch.Tensor, means, problem: str | None) -> ScopeStatistics:
    """Round-2 merge: mean(c) and its variance per slot, with the rounding floor."""
    n = merge.total(N)
    safe = n.clamp(min=1.0)
    if means is None:
        zero = torch.zeros_like(n)
        logp_mean = adv_mean = cov_estimate = zero
    else:
        logp_mean, adv_mean, cov_estimate = means
    round2 = merge.add(stack2[..., :2])
    mean_deviation = round2[:, DEVIATION] / safe
    # About an estimate within rounding of mean(c): no cancellation beyond that rounding.
    variance = (round2[:, DEVIATION_SQUARED] / safe - mean_deviation.square()).clamp(min=0.0)
    cov_mean = cov_estimate + mean_deviation
    # Second moments about the means, for the size of the rounding (the raw-moment form is only a bound).
    logp_var = (merge.total(SUM_LL) / safe - logp_mean.square()).clamp(min=0.0)
    adv_var = (merge.total(SUM_AA) / safe - adv_mean.square()).clamp(min=0.0)
    eps = merge.status[:, EPS].amax()
    noise = 3.0 * (logp_mean.square() * adv_var + adv_mean.square() * logp_var + 9.0 * (variance + cov_mean.square()))
    spread = variance > (FLOOR_ULPS * eps).square() * noise
    variance = torch.where(spread, variance, 0.0)
    zeros = torch.zeros_like(n)
    has_tokens = n > 0
    return ScopeStatistics(
        keys=merge.keys,
        rows=merge.total(ROWS),
        num_tokens=n,
        num_excluded=merge.total(EXCLUDED),
        logp_mean=logp_mean,
        adv_mean=adv_mean,
        cov_mean=cov_mean,
        variance=variance,
        inv_two_var=torch.where(spread, 0.5 / torch.where(spread, variance, 1.0), 0.0),
        abs_c_min=torch.where(has_tokens, merge.reduce(stack2[..., C_MIN], "amin", math.inf), 0.0),
        abs_c_max=torch.where(has_tokens, merge.reduce(stack2[..., C_MAX], "amax", -math.inf), 0.0),
        norm=zeros,
        weight_min=zeros,
        weight_max=zeros,
        status=merge.status,
        local_problem=problem,
    )


def _normalise(stats: ScopeStatistics, merge: _Merge, stack3: torch.Tensor) -> ScopeStatistics:
    """Round-3 merge: ``norm = N / sum(kernel)`` per slot (the largest weight), and the smallest weight."""
    has_tokens = stats.num_tokens > 0
    total = merge.add(stack3)[:, 0]
    norm = torch.where(has_tokens, stats.num_tokens / torch.where(has_tokens, total, 1.0), 1.0)
    largest_exponent = kernel_exponent(stats.abs_c_max, stats.abs_c_min, stats.inv_two_var)
    # As applied: clamped where the compute precision's kernel is (float32 unless every rank computes in float64).
    single = merge.status[:, EPS].amax() > torch.finfo(torch.float64).eps
    limit = torch.where(single, kernel_limit(torch.float32), kernel_limit(torch.float64))
    weight_min = norm * torch.exp(-torch.minimum(largest_exponent, limit))
    return replace(stats, norm=norm, weight_min=weight_min, weight_max=norm)


def token_weights(
    stats: ScopeStatistics,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    row_slots: torch.Tensor | None = None,
) -> torch.Tensor:
    """``w~`` of the tokens of some rows (e.g. a micro-batch) from the scope's statistics: a pointwise
    function, no collective.

    Args:
        stats: the scope's :class:`ScopeStatistics`.
        log_prob: ``[B, T]`` log-probs of the tokens (the ones the statistics were computed from).
        advantages: ``[B, T]`` their advantages.
        row_slots: ``[B]`` each row's segment slot (:meth:`ScopeStatistics.slots_of`); ``None`` for a scope
            of one segment.

    Returns:
        ``[B, T]`` weights in the compute precision, 0 where the log-prob is not finite (a token left
        out of the statistics). Positions outside the rows' masks get a value too: mask them.
    """
    dtype = compute_dtype(torch.promote_types(log_prob.dtype, advantages.dtype))
    params = _slot_params(stats, (stats.inv_two_var, stats.abs_c_min, stats.norm), dtype, row_slots)
    inv_two_var, abs_c_min, norm = params.unbind(1)
    # A non-finite log-prob's NaN |c| (an infinite one would be clamped to the smallest kernel, not 0) weighs 0 below.
    abs_cov = token_covariance(stats, log_prob, advantages, row_slots).abs_()
    weights = kernel(abs_cov, abs_c_min, inv_two_var).mul_(norm)
    return torch.nan_to_num_(weights, nan=0.0, posinf=0.0, neginf=0.0)


def _slot_params(stats: ScopeStatistics, fields, dtype, row_slots) -> torch.Tensor:
    """``[B or 1, len(fields), 1]``: per-segment fields for each row, in ``dtype``."""
    params = torch.stack(fields, dim=1).to(dtype)
    return (params[:1] if row_slots is None else params[row_slots])[:, :, None]


def token_covariance(
    stats: ScopeStatistics,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    row_slots: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sec. 2.3's ``c = (logp - mean(logp)) (A - mean(A))`` of some rows from the scope's means: a pointwise
    function, no collective, bitwise the ``c`` of the statistics pass at the tokens in the statistics.

    Args:
        stats: the scope's :class:`ScopeStatistics`.
        log_prob: ``[B, T]`` log-probs of the tokens (the ones the statistics were computed from).
        advantages: ``[B, T]`` their advantages.
        row_slots: ``[B]`` each row's segment slot, or ``None`` for a scope of one segment.

    Returns:
        ``[B, T]`` ``c`` in the compute precision; NaN where the log-prob is not finite, a value (to mask)
        outside the rows' masks.
    """
    dtype = compute_dtype(torch.promote_types(log_prob.dtype, advantages.dtype))
    logp_mean, adv_mean = _slot_params(stats, (stats.logp_mean, stats.adv_mean), dtype, row_slots).unbind(1)
    nan = math.nan
    logp = torch.nan_to_num(log_prob.detach().to(dtype), nan=nan, posinf=nan, neginf=nan)
    # The same operations as the statistics pass (scope_statistics), so that c is bitwise its own.
    return (logp - logp_mean).mul_(advantages.detach().to(dtype) - adv_mean)


def raise_for_bad_input(status, problem: str | None = None, what: str = "the statistics scope", tokens=None) -> None:
    """Raise :class:`CovarianceInputError` on every rank if any rank's input was bad.

    Args:
        status: ``ScopeStatistics.status`` read to the host (``[ranks, 3]``, e.g. ``.tolist()``).
        problem: this rank's own problem, if any (it leads the message on that rank).
        what: names the scope in the message.
        tokens: ``(advantages, mask)`` of this rank, to name its tokens with a non-finite advantage.
    """
    malformed = [rank for rank, row in enumerate(status) if row[MALFORMED] > 0]
    bad = {rank: int(row[BAD_ADVANTAGES]) for rank, row in enumerate(status) if row[BAD_ADVANTAGES] > 0}
    if problem is not None:
        raise CovarianceInputError(problem)
    if malformed:
        raise CovarianceInputError(
            f"rank(s) {malformed} of {what} got unusable input (see the error on those ranks); every rank stops."
        )
    if bad:
        where = ", ".join(f"rank {rank}: {count}" for rank, count in bad.items())
        here = locate_bad_advantages(*tokens) if tokens is not None else []
        mine = f"; here at (row, position) {here}" if here else ""
        raise CovarianceInputError(
            f"non-finite advantages at valid tokens of {what} ({where}{mine}); CW-GRPO weights are undefined. "
            "Check the advantage estimator and the rewards for inf/NaN."
        )


def locate_bad_advantages(advantages: torch.Tensor, mask: torch.Tensor, limit: int = 3) -> list[tuple[int, int]]:
    """``(row, position)`` of the first non-finite advantages at valid tokens (for error messages)."""
    bad = (~torch.isfinite(advantages.detach())) & mask.bool()
    return [tuple(index) for index in bad.nonzero()[:limit].tolist()]


def covariance_weights(
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    gather: Gather = local_gather,
    row_keys: torch.Tensor | None = None,
    max_segments: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, ScopeStatistics]:
    """Normalised CW-GRPO weights ``w~`` of this rank's ``[B, T]`` tokens, with statistics over the scope.

    Args:
        log_prob: ``[B, T]`` log-probs of the sampled tokens (any float dtype; used detached).
        advantages: ``[B, T]`` advantages.
        mask: ``[B, T]`` valid-token mask (nonzero = valid, as verl's ``response_mask``).
        gather: stacks a tensor over the scope's ranks (:func:`cw_verl.distributed.group_gather`).
        row_keys: ``[B]`` int64 segment key per row on the host (e.g. a hash of the prompt's uid);
            ``None``: one segment.
        max_segments: the most segments any rank holds.

    Returns:
        ``(weights, c, stats)``: ``[B, T]`` weights in the compute precision (1 at masked-out positions,
        0 at valid tokens with a non-finite log-prob), the token covariance ``c`` (0 at both) and the
        scope's :class:`ScopeStatistics`.

    Raises:
        CovarianceInputError: on every rank, when any rank's input is malformed or has a non-finite
            advantage at a valid token.
    """
    problem = check_inputs(log_prob, advantages, mask)
    stats, tokens = scope_statistics(log_prob, advantages, mask, gather, row_keys, max_segments, problem)
    raise_for_bad_input(stats.status.tolist(), stats.local_problem, tokens=(advantages, mask))
    outside = 1.0 - mask.to(tokens.weights.dtype)
    return tokens.weights + outside, tokens.cov, stats
