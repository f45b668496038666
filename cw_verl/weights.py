"""CW-GRPO's covariance-aware advantage weights (paper Sec. 2.3) as small torch functions.

For the valid tokens of a statistics *segment* (N of them, possibly spread over many ranks)::

    c_t  = (logp_t - mean(logp)) * (A_t - mean(A))        # token covariance term, Sec. 2.3
    w_t  = exp(-c_t^2 / (2 sigma^2)),  sigma = std(c)      # Gaussian kernel, population std
    w~_t = w_t * N / sum(w)                                # mean 1 over the segment's N valid tokens

A segment is the set of tokens whose statistics are shared: everything in scope (one segment), or one
prompt's group of responses (the paper's literal G responses, one segment per group). Rows (sequences)
carry an integer segment key; rows with equal keys on any rank form one segment.

This module knows nothing of verl or of process groups. Every rank computes a small table of local
statistics; a ``gather`` callable (see :mod:`cw_verl.distributed`) stacks those tables over the
reduction group, and every rank merges the stack identically. Two such rounds give the exact global
result: the moments (means, covariance, sigma), then the normaliser ``sum(w)``, which depends
non-linearly on the moments and so cannot share the first round.

Numerics: statistics are accumulated in float64 whatever the input dtype (bf16 log-probs are normal).
Each rank centres its data on its own means and ships central co-moments; the merge shifts them to
the global means exactly (the parallel-moments identities of Chan et al. / Pebay), which stays
accurate where raw power sums would cancel. Means are computed so that a segment whose values are all
equal yields centred values that are exactly zero (then sigma is exactly 0 and the weights are 1),
instead of rounding noise that the kernel would blow up into arbitrary weights. The normaliser is a
log-sum-exp across ranks, so weights cannot underflow to 0/0 even when every ``c^2 / 2 sigma^2`` is large.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

Gather = Callable[[torch.Tensor], torch.Tensor]
"""Maps this rank's tensor to a stack ``[group_size, *shape]`` of every rank's tensor of the same shape,
in the same rank order on every rank. For a single process it is ``lambda t: t[None]``."""

F64 = torch.float64


def local_gather(table: torch.Tensor) -> torch.Tensor:
    """The :data:`Gather` of a scope that lives on this process alone."""
    return table.unsqueeze(0)


class CovarianceInputError(ValueError):
    """Invalid input to the CW-GRPO weights: raised on every rank of the group at the same time."""


@dataclass(frozen=True)
class Moments:
    """Global per-segment moments after round 1 (CPU float64 tensors ``[S]``)."""

    keys: torch.Tensor
    rows: torch.Tensor
    num_tokens: torch.Tensor
    logp_mean: torch.Tensor
    adv_mean: torch.Tensor
    cov_mean: torch.Tensor
    variance: torch.Tensor
    num_bad: int
    num_malformed: int


@dataclass(frozen=True)
class ScopeStatistics(Moments):
    """Global statistics of every segment in scope, identical on every rank (float64 tensors ``[S]``).

    ``keys`` are sorted. ``cov_mean`` is ``mean(c)`` (the population covariance of log-prob and
    advantage) and ``variance`` the population variance of ``c``; ``log_normaliser`` and ``q_shift``
    give ``w~ = exp(q_shift - c^2 / 2 variance + log_normaliser)``. ``rows`` counts sequences.
    """

    q_shift: torch.Tensor
    log_normaliser: torch.Tensor
    weight_min: torch.Tensor
    weight_max: torch.Tensor
    collective_rounds: int

    @property
    def total_tokens(self) -> int:
        return int(self.num_tokens.sum().item())

    @property
    def sigma(self) -> float:
        """sigma of the scope; with several segments, their token-weighted RMS."""
        total = self.num_tokens.sum()
        return math.sqrt((self.variance * self.num_tokens).sum().item() / total.item()) if total > 0 else 0.0

    @property
    def scope_cov_mean(self) -> float:
        """Token-weighted mean of ``c`` over every segment."""
        total = self.num_tokens.sum()
        return (self.cov_mean * self.num_tokens).sum().item() / total.item() if total > 0 else 0.0


@dataclass(frozen=True)
class CompactTokens:
    """The valid tokens of a ``[B, T]`` batch, flattened: positions, rows, log-probs and advantages (float64)."""

    shape: torch.Size
    index: torch.Tensor
    row: torch.Tensor
    logp: torch.Tensor
    adv: torch.Tensor

    @classmethod
    def from_padded(cls, log_prob, advantages, mask) -> CompactTokens:
        index = mask.bool().flatten().nonzero().squeeze(1)
        length = mask.shape[-1] if mask.dim() > 1 else 1
        return cls(
            shape=mask.shape,
            index=index,
            row=torch.div(index, max(length, 1), rounding_mode="floor"),
            logp=log_prob.detach().flatten()[index].to(F64),
            adv=advantages.detach().flatten()[index].to(F64),
        )

    @classmethod
    def checked(cls, log_prob, advantages, mask) -> tuple[CompactTokens, str | None]:
        """The valid tokens and ``None``, or no tokens and why the inputs are unusable (the caller still
        joins the collectives with them, so that every rank raises together)."""
        problem = check_inputs(log_prob, advantages, mask)
        if problem is not None:
            return cls.empty(getattr(log_prob, "device", None)), problem
        return cls.from_padded(log_prob, advantages, mask), None

    @classmethod
    def empty(cls, device=None) -> CompactTokens:
        """No tokens: what a rank with unusable input contributes while it still joins the collectives."""
        nothing = torch.zeros(0, dtype=F64, device=device)
        return cls(torch.Size([0, 0]), nothing.long(), nothing.long(), nothing, nothing)

    def scatter(self, values: torch.Tensor, fill: float) -> torch.Tensor:
        """A ``[B, T]`` tensor holding ``values`` at the valid positions and ``fill`` elsewhere."""
        out = torch.full((self.shape.numel(),), fill, dtype=values.dtype, device=values.device)
        return out.index_put_((self.index,), values).view(self.shape)


def check_inputs(log_prob, advantages, mask) -> str | None:
    """Why these inputs cannot be used (``None`` if they can)."""
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


# Columns of the round-1 table, one row per local segment. S_pq = sum x^p y^q with x = logp - local
# mean(logp), y = A - local mean(A); S_10 and S_01 (zero up to rounding) keep the merge exact. KEY holds
# the int64 segment key's bits; BAD counts non-finite valid tokens, MALFORMED ranks with unusable input.
KEY, ROWS, N, BAD, MALFORMED, MEAN_L, MEAN_A, S10, S01, S20, S11, S02, S21, S12, S22 = range(15)
ROUND1_COLUMNS = 15


def _per_token(per_segment: torch.Tensor, segment: torch.Tensor | None) -> torch.Tensor:
    """Each token's value of its segment (a broadcastable [1] tensor when there is one segment, whose
    tokens need no ``segment`` index at all)."""
    return per_segment if segment is None or per_segment.numel() == 1 else per_segment[segment]


def _segment_sum(values: torch.Tensor, segment: torch.Tensor | None, num_segments: int) -> torch.Tensor:
    if num_segments == 1:
        return values.sum(0, keepdim=True)
    out = torch.zeros((num_segments, *values.shape[1:]), dtype=values.dtype, device=values.device)
    return out.index_add_(0, segment, values)


def _exact_segment_means(values, segment, counts, num_segments):
    """Segment means with one correction pass: exactly v when every value of a segment equals v."""
    safe = counts.clamp(min=1)
    mean = _segment_sum(values, segment, num_segments) / safe
    # Sterbenz: values - mean is exact when mean is within a factor 2 of equal values, so the residual
    # cancels the first pass's rounding exactly in that case, and refines it in general.
    return mean + _segment_sum(values - _per_token(mean, segment), segment, num_segments) / safe


def local_round1(tokens: CompactTokens, row_keys: torch.Tensor | None, num_rows: int, max_segments: int):
    """This rank's round-1 table ``[max_segments, 15]`` (float64)."""
    device = tokens.logp.device
    table = torch.zeros(max_segments, ROUND1_COLUMNS, dtype=F64, device=device)
    if row_keys is None:
        local_keys, segment = torch.zeros(1, dtype=torch.int64, device=device), None
        rows_per_segment = torch.full((1,), float(num_rows), dtype=F64, device=device)
    else:
        local_keys, row_segment = torch.unique(row_keys.to(device), return_inverse=True)
        segment = row_segment[tokens.row]
        rows_per_segment = torch.bincount(row_segment, minlength=local_keys.numel()).to(F64)
    segments = local_keys.numel()
    if segments > max_segments:
        table[:, MALFORMED] = 1.0  # the caller raises (every rank does, after the gather)
        return table
    if segments == 1:
        counts = torch.full((1,), float(tokens.logp.numel()), dtype=F64, device=device)
    else:
        counts = torch.bincount(segment, minlength=segments).to(F64)
    mean_l = _exact_segment_means(tokens.logp, segment, counts, segments)
    mean_a = _exact_segment_means(tokens.adv, segment, counts, segments)
    x = tokens.logp - _per_token(mean_l, segment)
    y = tokens.adv - _per_token(mean_a, segment)
    xx, yy, xy = x * x, y * y, x * y
    if segments == 1:
        # Dot products: no [n, 8] temporary on the common single-segment path.
        dot = torch.dot
        sums = torch.stack([x.sum(), y.sum(), xx.sum(), xy.sum(), yy.sum(), dot(xx, y), dot(x, yy), dot(xy, xy)])[None]
    else:
        sums = _segment_sum(torch.stack([x, y, xx, xy, yy, xx * y, x * yy, xy * xy], dim=1), segment, segments)
    table[:segments, KEY] = local_keys.view(F64)
    table[:segments, ROWS] = rows_per_segment
    table[:segments, N] = counts
    table[:segments, BAD] = _segment_sum((~torch.isfinite(tokens.logp + tokens.adv)).to(F64), segment, segments)
    table[:segments, MEAN_L] = mean_l
    table[:segments, MEAN_A] = mean_a
    table[:segments, S10:] = sums
    return table


def merge_round1(stack: torch.Tensor) -> Moments:
    """Merge the gathered round-1 tables ``[R, S_max, 15]`` into per-segment moments, on every rank alike."""
    # One device-to-host copy; the merge is a few dozen flops per row.
    rows = stack.detach().to("cpu", F64).reshape(-1, ROUND1_COLUMNS)
    num_bad = int(rows[:, BAD].sum().item())
    num_malformed = int((rows[:, MALFORMED] > 0).sum().item())
    rows = rows[rows[:, ROWS] > 0]
    if len(rows) == 0:
        empty = torch.zeros(0, dtype=F64)
        return Moments(empty.long(), empty, empty, empty, empty, empty, empty, num_bad, num_malformed)
    keys, segment = torch.unique(rows[:, KEY].contiguous().view(torch.int64), return_inverse=True)
    count = len(keys)

    def per_segment(values):
        return torch.zeros(count, dtype=F64).index_add_(0, segment, values)

    n = rows[:, N]
    total = per_segment(n)
    safe_total = total.clamp(min=1)
    # Shift from the first non-empty row's mean, so that equal means merge to exactly that mean.
    order = torch.arange(len(rows), dtype=torch.int64)
    first = torch.full((count,), len(rows), dtype=torch.int64).scatter_reduce_(
        0, segment, torch.where(n > 0, order, len(rows)), reduce="amin"
    )
    has_tokens = first < len(rows)
    first = first.clamp(max=len(rows) - 1)
    ref_l = torch.where(has_tokens, rows[first, MEAN_L], 0.0)
    ref_a = torch.where(has_tokens, rows[first, MEAN_A], 0.0)
    mean_l = ref_l + per_segment(n * (rows[:, MEAN_L] - ref_l[segment])) / safe_total
    mean_a = ref_a + per_segment(n * (rows[:, MEAN_A] - ref_a[segment])) / safe_total
    # Shift each row's central sums to its segment's global means: sum (x + dl)^p (y + da)^q, binomially.
    dl = torch.where(n > 0, rows[:, MEAN_L] - mean_l[segment], 0.0)
    da = torch.where(n > 0, rows[:, MEAN_A] - mean_a[segment], 0.0)
    s10, s01, s20, s11, s02, s21, s12, s22 = (rows[:, i] for i in range(S10, S22 + 1))
    c11 = per_segment(s11 + da * s10 + dl * s01 + dl * da * n)
    c22 = per_segment(
        s22
        + 2 * da * s21
        + da * da * s20
        + 2 * dl * s12
        + 4 * dl * da * s11
        + 2 * dl * da * da * s10
        + dl * dl * s02
        + 2 * dl * dl * da * s01
        + dl * dl * da * da * n
    )
    cov = c11 / safe_total
    variance = (c22 / safe_total - cov * cov).clamp(min=0.0)
    return Moments(keys, per_segment(rows[:, ROWS]), total, mean_l, mean_a, cov, variance, num_bad, num_malformed)


def _q(tokens: CompactTokens, moments_l, moments_a, variance, segment):
    """Per-token c and q = c^2 / (2 sigma^2) of its segment (q = 0 where sigma = 0)."""
    c = (tokens.logp - _per_token(moments_l, segment)) * (tokens.adv - _per_token(moments_a, segment))
    # 1 / (2 sigma^2) per segment, 0 where sigma = 0 (then q = 0 and, with a zero shift, w~ = 1).
    inverse = torch.where(variance > 0, 0.5 / torch.where(variance > 0, variance, 1.0), 0.0)
    q = c * c * _per_token(inverse, segment)
    return c, q


def scope_statistics(
    tokens: CompactTokens,
    gather: Gather,
    row_keys: torch.Tensor | None = None,
    max_segments: int = 1,
    problem: str | None = None,
) -> tuple[ScopeStatistics, torch.Tensor, torch.Tensor]:
    """Global statistics of every segment (two gather rounds), plus this rank's tokens' ``c`` and ``q``.

    ``row_keys`` (int64 ``[B]``) assigns rows to segments; ``None`` puts everything in one segment.
    ``max_segments`` bounds the segments any rank holds (every rank ships a table of that many rows).
    ``problem``: this rank's inputs are unusable; it still joins round 1 so that every rank raises.
    """
    if problem is None:
        table = local_round1(tokens, row_keys, int(tokens.shape[0]), max_segments)
    else:
        table = torch.zeros(max_segments, ROUND1_COLUMNS, dtype=F64, device=tokens.logp.device)
        table[:, MALFORMED] = 1.0
    moments = merge_round1(gather(table))
    if problem is not None:
        raise CovarianceInputError(problem)
    if moments.num_malformed:
        raise CovarianceInputError(
            f"{moments.num_malformed} rank(s) of the statistics scope got unusable input (malformed tensors, or more "
            f"than {max_segments} segments on one rank); see the error on those ranks."
        )
    if moments.num_bad:
        raise CovarianceInputError(
            f"{moments.num_bad} valid token(s) in the statistics scope have a non-finite log-prob or advantage; "
            "CW-GRPO weights are undefined. Check the rollout/log-prob computation for inf/NaN."
        )

    device = tokens.logp.device
    keys_dev = moments.keys.to(device)
    if row_keys is None:
        global_segment = None
    else:
        global_segment = torch.searchsorted(keys_dev, row_keys.to(device)[tokens.row])
    variance = moments.variance.to(device)
    c, q = _q(tokens, moments.logp_mean.to(device), moments.adv_mean.to(device), variance, global_segment)
    num_segments = len(moments.keys)
    rounds = 1
    if (moments.variance > 0).any():
        # Round 2: per segment, the local min/max of q and the sum of exp(-(q - local min)).
        q_min = torch.full((num_segments,), math.inf, dtype=F64, device=device)
        q_max = torch.full((num_segments,), -math.inf, dtype=F64, device=device)
        if global_segment is None or num_segments == 1:
            if q.numel():
                q_min, q_max = q.min()[None], q.max()[None]
        else:
            q_min.scatter_reduce_(0, global_segment, q, reduce="amin")
            q_max.scatter_reduce_(0, global_segment, q, reduce="amax")
        local_sum = _segment_sum(torch.exp(_per_token(q_min, global_segment) - q), global_segment, num_segments)
        stack = gather(torch.stack([q_min, q_max, local_sum], dim=1)).detach().to("cpu", F64)
        rounds = 2
        q_shift = stack[..., 0].min(dim=0).values
        q_top = stack[..., 1].max(dim=0).values
        # Ranks without tokens of a segment carry (q_min=inf, sum=0) and contribute nothing.
        scaled = torch.where(stack[..., 2] > 0, stack[..., 2] * torch.exp(q_shift - stack[..., 0]), 0.0).sum(0)
        log_normaliser = torch.log(moments.num_tokens) - torch.log(scaled)
        has_spread = moments.variance > 0
        q_shift = torch.where(has_spread, q_shift, 0.0)
        log_normaliser = torch.where(has_spread, log_normaliser, 0.0)
        weight_max = torch.exp(log_normaliser)
        weight_min = torch.where(has_spread, torch.exp(q_shift - q_top + log_normaliser), 1.0)
    else:
        # sigma = 0 everywhere means every c of a segment is equal, hence every w: the normalised weights are 1.
        q_shift = log_normaliser = torch.zeros(num_segments, dtype=F64)
        weight_min = weight_max = torch.ones(num_segments, dtype=F64)
    stats = ScopeStatistics(
        **{f.name: getattr(moments, f.name) for f in dataclasses.fields(Moments)},
        q_shift=q_shift,
        log_normaliser=log_normaliser,
        weight_min=weight_min,
        weight_max=weight_max,
        collective_rounds=rounds,
    )
    return stats, c, q


def token_weights(
    tokens: CompactTokens, stats: ScopeStatistics, row_keys: torch.Tensor | None = None, q=None, c=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w~, c)`` of each valid token, from the scope's statistics (a pointwise function, no collective).

    ``q``/``c`` may be passed when :func:`scope_statistics` already computed them for these tokens.
    """
    device = tokens.logp.device
    if tokens.row.numel() == 0:
        return tokens.logp.clone(), tokens.logp.clone()
    keys = stats.keys.to(device)
    if row_keys is None:
        segment = None
        if len(keys) != 1:
            raise CovarianceInputError(f"statistics of {len(keys)} segments for tokens without segment keys")
    else:
        token_keys = row_keys.to(device)[tokens.row]
        segment = torch.searchsorted(keys, token_keys).clamp(max=max(len(keys) - 1, 0))
        if len(keys) == 0 or not torch.equal(keys[segment], token_keys):
            raise CovarianceInputError("tokens belong to a segment that the scope's statistics do not cover")
    if q is None or c is None:
        c, q = _q(tokens, stats.logp_mean.to(device), stats.adv_mean.to(device), stats.variance.to(device), segment)
    shift = (stats.q_shift + stats.log_normaliser).to(device)
    weights = torch.exp(_per_token(shift, segment) - q)
    return weights, c


def weigh_tokens(
    tokens: CompactTokens,
    gather: Gather,
    row_keys: torch.Tensor | None = None,
    max_segments: int = 1,
    problem: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, ScopeStatistics]:
    """``(w~, c, stats)`` of valid tokens: the scope's statistics (two gather rounds), then the pointwise weights."""
    stats, c, q = scope_statistics(tokens, gather, row_keys, max_segments, problem)
    weights, c = token_weights(tokens, stats, row_keys, q=q, c=c)
    return weights, c, stats


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
        row_keys: ``[B]`` int64 segment key per row (e.g. a hash of the prompt's uid); ``None``: one segment.
        max_segments: the most segments any rank holds.

    Returns:
        ``(weights, c, stats)``: float64 ``[B, T]`` weights (1 at masked-out positions), the token
        covariance ``c`` (0 at masked-out positions) and the scope's :class:`ScopeStatistics`.

    Defined degenerate cases: sigma = 0 (e.g. all advantages of a segment equal) gives weights 1; no
    valid tokens gives weights 1 and zero statistics; non-finite log-probs or advantages at valid
    positions raise :class:`CovarianceInputError` on every rank. Every rank joins every round, so a rank
    with no valid tokens, or with bad input, never leaves the others waiting.
    """
    tokens, problem = CompactTokens.checked(log_prob, advantages, mask)
    weights, c, stats = weigh_tokens(tokens, gather, row_keys, max_segments, problem)
    return tokens.scatter(weights, 1.0), tokens.scatter(c, 0.0), stats
