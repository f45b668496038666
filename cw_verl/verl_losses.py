"""CW-GRPO as verl functions: the ``cw_grpo`` advantage estimator and policy losses.

The policy losses are verl's PPO clipped objective (as ``compute_policy_loss_vanilla``: clip_ratio_low/
high, dual-clip ``clip_ratio_c``, ``rollout_is_weights``, every ``loss_agg_mode`` with verl's
``global_batch_info``) applied to ``w~ * A`` instead of ``A`` (paper Sec. 2.3, the loss l~_{i,t}). They
differ only in the *statistics scope*, the set of tokens whose mean, sigma and normaliser the weights
share (a semantic choice, not a knob to tune):

``cw_grpo_minibatch``
    all tokens of the optimizer mini-batch on all DP ranks. Computed once per mini-batch from the
    log-probs the batch already carries (``old_log_probs``: the policy that sampled it, recomputed by
    the actor, as in verl's ratio), so the update is the same for any micro-batch size, token packing
    and DP size, with no extra forward pass and three small collectives per mini-batch.
``cw_grpo_group``
    the paper's literal scope: each prompt's G responses (segments keyed by ``uid``), also from
    ``old_log_probs``, wherever the responses sit across ranks and micro-batches of the mini-batch.
``cw_grpo_microbatch``
    the tokens of one loss call on all DP ranks, with the current ``log_prob``. It changes with the
    micro-batch size and packing (see docs/fidelity.md's measurements).
``cw_grpo``
    :data:`DEFAULT_SCOPE`.

The wide scopes' statistics pass weighs every token of the mini-batch; a first loss call whose micro-batch
is the whole mini-batch (same values; on a GPU, same memory) applies those weights instead of computing
them again (:class:`StatisticsPass`): they are bitwise the weights :func:`cw_verl.weights.token_weights`
gives every other call.

Metrics (``actor/cw/...``) add no collective. ``sigma``, ``cov_mean``, ``num_tokens``, ``excluded_tokens``,
``weight_min`` and ``weight_max`` are exact for the whole scope (identical on every rank; with the group
scope, sigma is the token-weighted RMS over groups); ``weight_mean``, ``frac_below_half`` and the covariance
percentiles are over this rank's tokens in scope. verl averages all of them over micro-batches and ranks.

Bad input stops every rank of the data-parallel group together: the wide scopes check the mini-batch in
their statistics rounds and each micro-batch with one one-element all-gather per loss call (multi-rank
runs only); the per-call scope checks each call in its statistics rounds.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cw_verl.context import current_loss_call, current_train_batch
from cw_verl.distributed import group_gather, raise_together, resolve_data_parallel_group
from cw_verl.selection import Selection, SelectionRule, select, token_keys
from cw_verl.weights import (
    CovarianceInputError,
    ScopeStatistics,
    WeighedTokens,
    check_inputs,
    raise_for_bad_input,
    scope_statistics,
    token_weights,
)

CW_GRPO = "cw_grpo"
MICROBATCH, MINIBATCH, GROUP = "microbatch", "minibatch", "group"
DEFAULT_SCOPE = MINIBATCH

# The paper's Table 1 percentiles, as fractions of the valid tokens.
TABLE1_PERCENTILES = ((0.0001, "0.01pct"), (0.01, "1pct"), (0.2, "20pct"), (0.4, "40pct"))
SCOPE_METRICS = ("num_tokens", "excluded_tokens", "sigma", "cov_mean", "weight_min", "weight_max")
WEIGHT_METRICS = ("weight_min", "weight_max", "weight_mean", "frac_below_half")
RANK_METRICS = ("weight_mean", "frac_below_half") + tuple(
    f"cov_{side}_top_{name}" for side in ("pos", "neg") for _, name in TABLE1_PERCENTILES
)


def order_statistics(cov: torch.Tensor, valid: torch.Tensor, count: torch.Tensor, on_device: bool | None = None):
    """Table 1's thresholds over this rank's valid tokens: ``[8]`` = the value the top P reach (P in
    :data:`TABLE1_PERCENTILES`), then the value the bottom P fall below.

    ``cov``/``valid``: ``[B, T]``; ``count``: the number of valid tokens (a 0-d tensor). On a GPU a device
    sort (no host sync); on a CPU, where torch's sort is ten times slower than numpy's selection, nested
    ``numpy.partition`` calls, each on the part the previous one left. ``on_device`` forces one (tests).
    """
    fractions = torch.tensor([fraction for fraction, _ in TABLE1_PERCENTILES], dtype=torch.float64, device=cov.device)
    # Invalid positions sort last; the valid values are the first `count` of the ascending order.
    keyed = torch.addcmul(cov, 1.0 - valid, torch.tensor(1e18, dtype=cov.dtype, device=cov.device)).flatten()
    if cov.device.type != "cpu" if on_device is None else on_device:
        n = count.to(torch.float64)
        k = torch.clamp(torch.ceil(fractions * n), min=1).long()
        last = torch.clamp(n.long() - 1, min=0)
        ordered = torch.sort(keyed).values
        positions = torch.cat([torch.clamp(n.long() - k, min=0), torch.minimum(k - 1, last)])
        return torch.where(n > 0, ordered[positions].to(torch.float64), 0.0)
    n = int(count.item())
    if n == 0:
        return torch.zeros(2 * len(fractions), dtype=torch.float64, device=cov.device)
    values = keyed.detach().to(torch.float32).numpy()  # a fresh array: partitioned in place
    if n < len(values):
        values.partition(n - 1)  # the n valid values first
        values = values[:n]
    ks = [max(1, math.ceil(fraction * n)) for fraction, _ in TABLE1_PERCENTILES]
    # Nested selections: each one inside the part the previous one left, the widest first.
    bottom = sorted({k - 1 for k in ks}, reverse=True)
    values.partition(bottom[0])
    for wider, position in zip(bottom, bottom[1:], strict=False):
        values[:wider].partition(position)
    start = bottom[0] + 1
    for position in sorted({n - k for k in ks}):
        if position >= start:
            values[start:].partition(position - start)
            start = position + 1
    out = [values[n - k] for k in ks] + [values[k - 1] for k in ks]
    return torch.tensor(out, dtype=torch.float64, device=cov.device)


def _scope_metrics(stats: ScopeStatistics, tokens: WeighedTokens | None) -> torch.Tensor:
    """The ``actor/cw/*`` values on the device, in :data:`SCOPE_METRICS` + :data:`RANK_METRICS` order."""
    summary = stats.summary()
    if tokens is None:
        return torch.cat([summary, torch.zeros(len(RANK_METRICS), dtype=torch.float64, device=summary.device)])
    count = tokens.valid.sum()
    safe = count.clamp(min=1.0)
    below_half = ((tokens.weights < 0.5) & tokens.valid.bool()).sum()
    rank = torch.stack([tokens.weights.sum() / safe, below_half / safe]).to(torch.float64)
    rank = torch.where(count > 0, rank, torch.tensor([1.0, 0.0], dtype=torch.float64, device=rank.device))
    percentiles = order_statistics(tokens.cov, tokens.valid, count).to(summary.device)
    return torch.cat([summary, rank, percentiles])


def _metrics_dict(values: list[float]) -> dict[str, float]:
    names = SCOPE_METRICS + RANK_METRICS
    return {f"actor/cw/{name}": value for name, value in zip(names, values, strict=True)}


def uid_keys(uids) -> torch.Tensor:
    """Stable int64 segment keys for prompt uids (the same on every process, unlike ``hash``)."""
    return torch.tensor(
        [
            int.from_bytes(hashlib.blake2b(str(uid).encode(), digest_size=8).digest(), "little", signed=True)
            for uid in uids
        ],
        dtype=torch.int64,
        device="cpu",  # made on the host, where the uids are; moved to the device by the caller
    )


def row_uids(batch) -> list | None:
    """Each row's prompt ``uid`` in verl's batch (a TensorDict), or ``None`` when the batch has none."""
    if batch is None or "uid" not in batch.keys():
        return None
    from verl.utils import tensordict_utils as tu

    uids = tu.get(batch, "uid")
    return list(uids.tolist() if isinstance(uids, np.ndarray) else uids)


NO_UID = (
    "cw_grpo_group needs each sequence's prompt 'uid' in the actor's batch (verl's trainers put it there); "
    "none was found."
)


def _padded(batch, *fields):
    selected = batch.select(*fields)
    if any(getattr(selected[f], "is_nested", False) for f in fields):
        selected = selected.to_padded_tensor()
    return [selected[f] for f in fields]


@dataclass(frozen=True)
class MiniBatchStatistics:
    """A wide scope's statistics for one optimizer mini-batch, with its metrics read to the host once, and
    the Clip-Cov/KL-Cov selection made from them (``None`` for the CW losses)."""

    stats: ScopeStatistics
    metrics: dict[str, float]
    selection: Selection | None = None


@dataclass(frozen=True)
class StatisticsPass:
    """The mini-batch's ``[B, T]`` inputs and weighed tokens from the statistics pass, kept for the first loss
    call only: when that call's micro-batch is the whole mini-batch, its weights are these (the same
    operations on the same numbers, :func:`cw_verl.weights.token_weights`), and are not computed twice."""

    old_log_prob: torch.Tensor
    advantages: torch.Tensor
    mask: torch.Tensor
    tokens: WeighedTokens

    def weights_for(self, old_log_prob, advantages, mask, slots) -> torch.Tensor | None:
        """The pass's weights if the call's inputs (and segment slots) are the mini-batch's, else ``None``."""
        if not (old_log_prob.shape == self.old_log_prob.shape and old_log_prob.dtype == self.old_log_prob.dtype):
            return None
        if slots is not None and not _same_values(slots, self.tokens.slots):
            return None
        same = (
            _same_values(old_log_prob, self.old_log_prob)
            and _same_values(advantages, self.advantages)
            and _same_values(mask.to(torch.bool), self.mask.to(torch.bool))
        )
        return self.tokens.weights if same else None


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` hold the same values: at once for two views of the same memory, else
    ``torch.equal`` on a CPU. On a GPU ``torch.equal`` waits for the device, which costs more than the
    weights it would save: there only the same memory counts."""
    if a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride() and a.data_ptr() == b.data_ptr():
        return True
    return a.device.type == "cpu" and b.device.type == "cpu" and torch.equal(a, b)


def _group_rows_problem(stats: ScopeStatistics, rollout_n: int) -> torch.Tensor:
    """1.0 (on the device) when some prompt group of the mini-batch does not have ``rollout_n`` responses."""
    present = stats.rows > 0
    return (present & (stats.rows != rollout_n)).any().to(torch.float64)[None]


def mini_batch_statistics(
    scope: str, group, config, device, call_shape=None, rule: SelectionRule | None = None
) -> MiniBatchStatistics:
    """Statistics of this optimizer mini-batch in ``scope``, computed on its first loss call and cached.

    The mini-batch's ``old_log_probs``, ``advantages`` and ``response_mask`` are moved to ``device`` (where
    the micro-batches run); the statistics, weights and metrics stay there until one read to the host,
    which also carries every rank's input check. When the first call's ``[B, T]`` ``call_shape`` is the
    mini-batch's, the pass's weighed tokens are kept for that call (:class:`StatisticsPass`). With a
    selection ``rule`` (Clip-Cov, KL-Cov; :data:`MINIBATCH` scope only), the checked pass's ``c`` feed one more
    gather round that selects the mini-batch's tokens (:func:`cw_verl.selection.select`), cached with the
    statistics under ``(scope, rule)``.
    """
    call = current_train_batch()
    if call is None:
        raise RuntimeError(
            f"cw_grpo_{scope} computes its statistics once per optimizer mini-batch from the batch verl's engine "
            "trains on (BaseEngine.train_batch); call it through a verl engine, or use cw_grpo_microbatch."
        )
    cache_key = scope if rule is None else (scope, rule)
    if cache_key in call.statistics:
        return call.statistics[cache_key]
    fields = _padded(call.mini_batch, "old_log_probs", "advantages", "response_mask")
    old_log_prob, advantages, mask = (t.to(device, non_blocking=True) for t in fields)
    problem = check_inputs(old_log_prob, advantages, mask)
    row_keys, max_segments = None, 1
    if scope == GROUP:
        uids = row_uids(call.mini_batch)
        if uids is None:
            problem = problem or NO_UID
        else:
            row_keys = uid_keys(uids)
        global_rows = int(config.global_batch_info.get("global_batch_size") or len(mask))
        max_segments = max(1, global_rows // max(1, int(config.rollout_n)))
    stats, tokens = scope_statistics(
        old_log_prob, advantages, mask, group_gather(group), row_keys, max_segments, problem
    )
    checks = _group_rows_problem(stats, int(config.rollout_n)) if scope == GROUP else torch.zeros(1, device=device)
    values = torch.cat([checks.to(torch.float64), _scope_metrics(stats, tokens), stats.status.flatten()]).tolist()
    status = np.asarray(values[1 + len(SCOPE_METRICS) + len(RANK_METRICS) :]).reshape(-1, 3)
    if problem is None and tokens is None:
        problem = stats.local_problem
    raise_for_bad_input(status, problem, f"the cw_grpo_{scope} statistics of this mini-batch", (advantages, mask))
    if values[0] > 0:
        rows = sorted({int(r) for r in stats.rows[stats.rows > 0].tolist()})
        raise CovarianceInputError(
            f"cw_grpo_group: prompt groups in this mini-batch have {rows} responses, not rollout.n={config.rollout_n}; "
            "the group scope needs each prompt's responses in one mini-batch (ppo_mini_batch_size in whole "
            "prompts, one mini-batch per update, no multi-trajectory outputs)."
        )
    metrics = _metrics_dict(values[1 : 1 + len(SCOPE_METRICS) + len(RANK_METRICS)])
    selection = None
    if rule is not None:
        if metrics["actor/cw/excluded_tokens"] > 0:
            # Every rank has the same global count: all stop here, before the selection round.
            raise CovarianceInputError(
                f"{int(metrics['actor/cw/excluded_tokens'])} valid tokens of this mini-batch have a non-finite "
                "old log-prob; their ratio, and so Clip-Cov's and KL-Cov's loss, is undefined. Check the actor's "
                "old log-prob computation and the response mask."
            )
        keys = token_keys(old_log_prob, advantages, mask)
        k = rule.count(int(metrics["actor/cw/num_tokens"]))
        selection = select(rule, k, tokens.cov, tokens.valid, keys, group_gather(group))
    result = MiniBatchStatistics(stats, metrics, selection)
    call.statistics[cache_key] = result
    if call_shape is not None and tuple(call_shape) == tuple(mask.shape):
        call.first_call_weights[scope] = StatisticsPass(old_log_prob, advantages, mask, tokens)
    return result


def call_problem(scope_log_prob, old_log_prob, log_prob, advantages, response_mask) -> str | None:
    """Why one loss call's ``[B, T]`` tensors cannot be used (``None`` if they can): shapes and types only."""
    problem = check_inputs(scope_log_prob, advantages, response_mask)
    if problem is None and old_log_prob.shape != log_prob.shape:
        problem = f"old_log_prob has shape {tuple(old_log_prob.shape)}, log_prob {tuple(log_prob.shape)}"
    return problem


UNCOVERED = "cw_grpo_group: this micro-batch holds prompt groups that its optimizer mini-batch does not"


def cw_grpo_policy_loss(
    scope: str,
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config=None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """CW-GRPO policy loss in ``scope``: PPO's clipped loss with advantages ``w~ * A`` (paper Sec. 2.3).

    The clipped loss and its aggregation are verl's own (:func:`verl_ppo_loss`).

    Args:
        scope: :data:`MICROBATCH`, :data:`MINIBATCH` or :data:`GROUP`.
        old_log_prob: ``[B, T]`` log-probs of the sampled tokens under the policy that sampled them
            (as recomputed by verl's actor, or the rollout's in bypass mode).
        log_prob: ``[B, T]`` log-probs under the policy being trained (carries the gradient).
        advantages: ``[B, T]`` advantages from the estimator.
        response_mask: ``[B, T]`` valid-token mask.
        loss_agg_mode: verl's aggregation mode.
        config: the actor's ``ActorConfig`` (clip ratios, ``rollout_n``, ``global_batch_info`` for the
            mini-batch over all data-parallel ranks).
        rollout_is_weights: ``[B, T]`` rollout-correction importance weights, or ``None``.

    Returns:
        ``(loss, metrics)``: the scalar loss for this micro-batch, and the ``actor/pg_*``, ``actor/ppo_kl``
        and ``actor/cw/*`` metrics as floats.

    Raises:
        CovarianceInputError: on every rank of the data-parallel group together, when any rank's input is
            unusable.
    """
    if config is None:
        raise ValueError("cw_grpo needs the actor config (clip ratios, global_batch_info)")
    batch_info = getattr(config, "global_batch_info", None) or {}
    group = resolve_data_parallel_group(batch_info.get("dp_size"))
    if scope == MICROBATCH:
        call = _call_scope_weights(old_log_prob, log_prob, advantages, response_mask, group)
        # The tokens left out of the statistics (non-finite log-prob) weigh 0; keep their PPO term finite.
        log_prob = torch.nan_to_num(log_prob, nan=0.0, posinf=0.0, neginf=0.0)
    else:
        call = _mini_batch_scope_weights(scope, old_log_prob, log_prob, advantages, response_mask, config, group)
    weighted = reweighted_advantages(call.weights, advantages)
    old_log_prob = torch.nan_to_num(old_log_prob, nan=0.0, posinf=0.0, neginf=0.0)
    loss, pg_metrics = verl_ppo_loss(
        old_log_prob, log_prob, weighted.to(advantages.dtype), response_mask, loss_agg_mode, config, rollout_is_weights
    )
    # The call's one read to the host, after the loss is queued: every rank's checks, and the metrics.
    metrics = call.finish(call.checks.to(torch.float64).tolist())
    metrics.update(pg_metrics)
    return loss, metrics


@dataclass(frozen=True)
class _CallWeights:
    """One loss call's weights ``[B, T]`` (``w~``, 0 outside the statistics), its checks on the device, and
    ``finish(checks read to the host)``, which raises on every rank if any rank's check failed and otherwise
    returns the ``actor/cw/*`` metrics."""

    weights: torch.Tensor
    checks: torch.Tensor
    finish: Callable[[list[float]], dict[str, float]]


def _call_scope_weights(old_log_prob, log_prob, advantages, response_mask, group) -> _CallWeights:
    """``cw_grpo_microbatch``: this call's statistics, from the current log-probs, over the DP group; every
    rank's input check rides in their rounds."""
    problem = call_problem(log_prob, old_log_prob, log_prob, advantages, response_mask)
    stats, tokens = scope_statistics(log_prob, advantages, response_mask, group_gather(group), problem=problem)
    metric_count = len(SCOPE_METRICS) + len(RANK_METRICS)
    checks = torch.cat([_scope_metrics(stats, tokens), stats.status.flatten()])
    if tokens is None:
        raise_for_bad_input(np.asarray(checks.tolist()[metric_count:]).reshape(-1, 3), stats.local_problem)

    def finish(values: list[float]) -> dict[str, float]:
        raise_for_bad_input(np.asarray(values[metric_count:]).reshape(-1, 3), None, tokens=(advantages, response_mask))
        return _metrics_dict(values[:metric_count])

    return _CallWeights(tokens.weights, checks, finish)


def _mini_batch_scope_weights(scope, old_log_prob, log_prob, advantages, response_mask, config, group) -> _CallWeights:
    """``cw_grpo_minibatch``/``cw_grpo_group``: the weights from the mini-batch's statistics (computed on its
    first call, from ``old_log_probs``); one one-element all-gather per call, so that a bad micro-batch on one
    rank stops every rank here."""
    problem = call_problem(old_log_prob, old_log_prob, log_prob, advantages, response_mask)
    device = log_prob.device if isinstance(log_prob, torch.Tensor) else torch.device("cpu")
    call_shape = None if problem is not None else response_mask.shape
    scoped = mini_batch_statistics(scope, group, config, device, call_shape)
    stats, slots = scoped.stats, None
    flag = torch.zeros(1, dtype=torch.float64, device=device)
    if problem is None and scope == GROUP:
        call = current_loss_call()
        uids = row_uids(call.micro_batch if call else None)
        if uids is None:
            problem = NO_UID
        else:
            keys = uid_keys(uids).to(device, non_blocking=True)
            slots = stats.slots_of(keys).clamp(max=len(stats.keys) - 1)  # [B]: each row's segment
            flag = (stats.keys[slots] != keys).any().to(torch.float64)[None]
    checks = call_checks(problem, flag, group, device)
    # The first call of a mini-batch may be the whole mini-batch (one micro-batch per update).
    first = current_train_batch().first_call_weights.pop(scope, None)
    weights = None if first is None else first.weights_for(old_log_prob, advantages, response_mask, slots)
    if weights is None:
        mask = response_mask.to(torch.promote_types(log_prob.dtype, torch.float32))
        weights = token_weights(stats, old_log_prob, advantages, slots) * mask

    def finish(values: list[float]) -> dict[str, float]:
        raise_together(values, None, CovarianceInputError, group, UNCOVERED)
        return dict(scoped.metrics)

    return _CallWeights(weights, checks, finish)


def call_checks(problem: str | None, flag: torch.Tensor, group, device) -> torch.Tensor:
    """Every rank's ``[1]`` check of this loss call, gathered (one one-element all-gather; multi-rank only).

    Raises at once, on every rank, when any rank knows its call is unusable (``problem``); the checks done
    on the device (``flag``) are read with the call's metrics and raised by :func:`raise_together` then."""
    if problem is not None:
        flag = torch.ones(1, dtype=torch.float64, device=device)
    checks = group_gather(group)(flag).flatten() if group is not None else flag
    if problem is not None:
        raise_together(checks.tolist(), problem, CovarianceInputError, group, UNCOVERED)
    return checks


def reweighted_advantages(weights: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """Paper Sec. 2.3: the advantage of each token's PPO term, ``w~ * A``.

    Args:
        weights: ``[B, T]`` normalised weights ``w~``, 0 outside the statistics (and the mask).
        advantages: ``[B, T]`` the estimator's advantages; values outside the mask may be garbage (NaN
            included), so they are sanitised before the product and weigh 0.

    Returns:
        ``[B, T]`` ``w~ * A`` in the weights' dtype, without gradient through ``advantages``.
    """
    return weights * torch.nan_to_num(advantages.detach(), nan=0.0, posinf=0.0, neginf=0.0).to(weights.dtype)


def verl_ppo_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    weighted_advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str,
    config,
    rollout_is_weights: torch.Tensor | None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """verl's own PPO loss (``compute_policy_loss_vanilla``) on the reweighted advantages: paper Sec. 2.3's l~.

    As verl's Clip-Cov reuses verl's helpers: its clip ratios, dual clip, rollout-IS weights and every
    ``loss_agg_mode`` with ``config.global_batch_info`` reach the CW losses unchanged, and a gradient flows
    through ``weighted_advantages`` where it has one (``cw_grpo_authors``).

    Args:
        old_log_prob: ``[B, T]`` log-probs under the sampling policy (finite).
        log_prob: ``[B, T]`` log-probs under the policy being trained.
        weighted_advantages: ``[B, T]`` ``w~ * A``, 0 outside the mask.
        response_mask: ``[B, T]`` valid-token mask.
        loss_agg_mode: verl's aggregation mode.
        config: the actor's ``ActorConfig``.
        rollout_is_weights: ``[B, T]`` importance weights, or ``None``.

    Returns:
        ``(loss, metrics)``: verl's scalar loss and its ``actor/pg_clipfrac``, ``actor/ppo_kl`` and
        ``actor/pg_clipfrac_lower``. A call without valid tokens contributes a zero loss that still reaches
        every parameter (all ranks run the same backward), where verl would divide 0 by 0 when
        ``global_batch_info`` does not give the denominators.
    """
    from verl.trainer.ppo.core_algos import compute_policy_loss_vanilla

    loss, metrics = compute_policy_loss_vanilla(
        old_log_prob=old_log_prob,
        log_prob=log_prob,
        advantages=weighted_advantages,
        response_mask=response_mask,
        loss_agg_mode=loss_agg_mode,
        config=config,
        rollout_is_weights=rollout_is_weights,
    )
    return connected_zero_if_empty(loss, log_prob, response_mask), metrics


def connected_zero_if_empty(loss: torch.Tensor, log_prob: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """``loss``, or for a call without valid tokens a zero that still reaches every parameter (all ranks run the
    same backward) where verl's aggregation would divide 0 by 0 without ``global_batch_info``."""
    if not bool(response_mask.any()):
        return torch.where(response_mask.bool(), log_prob, 0.0).sum() * 0.0
    return loss


def verl_policy_loss(loss_mode: str, loss, first: str, summary: str):
    """verl's policy-loss signature for ``loss(first, old_log_prob, ...)``: the registered
    ``compute_policy_loss_<loss_mode>``, with ``first`` (a scope, a loss mode) bound and ``summary`` in its
    docstring."""

    def policy_loss(
        old_log_prob: torch.Tensor,
        log_prob: torch.Tensor,
        advantages: torch.Tensor,
        response_mask: torch.Tensor,
        loss_agg_mode: str = "token-mean",
        config=None,
        rollout_is_weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        return loss(first, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights)

    policy_loss.__name__ = policy_loss.__qualname__ = f"compute_policy_loss_{loss_mode}"
    policy_loss.__doc__ = f"""verl policy loss ``{loss_mode}``: {summary}

    Args:
        old_log_prob: ``[B, T]`` log-probs under the policy that sampled the batch.
        log_prob: ``[B, T]`` log-probs under the policy being trained.
        advantages: ``[B, T]`` advantages.
        response_mask: ``[B, T]`` valid-token mask.
        loss_agg_mode: verl's aggregation mode.
        config: the actor's ``ActorConfig``.
        rollout_is_weights: ``[B, T]`` importance weights, or ``None``.

    Returns:
        ``(loss, metrics)`` as :func:`{loss.__module__}.{loss.__name__}`.
    """
    return policy_loss


def _scoped_policy_loss(loss_mode: str, scope: str):
    return verl_policy_loss(loss_mode, cw_grpo_policy_loss, scope, f"CW-GRPO with the {scope} statistics scope.")


compute_policy_loss_cw_grpo = _scoped_policy_loss(CW_GRPO, DEFAULT_SCOPE)
compute_policy_loss_cw_grpo_minibatch = _scoped_policy_loss(f"{CW_GRPO}_{MINIBATCH}", MINIBATCH)
compute_policy_loss_cw_grpo_group = _scoped_policy_loss(f"{CW_GRPO}_{GROUP}", GROUP)
compute_policy_loss_cw_grpo_microbatch = _scoped_policy_loss(f"{CW_GRPO}_{MICROBATCH}", MICROBATCH)


VANILLA_WITH_CW_METRICS = "vanilla_cw_metrics"
"""A GRPO/PPO baseline's loss mode: verl's own ``vanilla`` loss, unchanged, plus the ``actor/cw/*`` metrics."""

GROUP_STATISTICS_LOSS_MODES = frozenset({f"{CW_GRPO}_{GROUP}", VANILLA_WITH_CW_METRICS})
"""Loss modes that compute per-prompt-group statistics (each prompt's responses in one mini-batch)."""


def compute_policy_loss_vanilla_cw_metrics(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config=None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """verl policy loss ``vanilla_cw_metrics``: verl's ``vanilla`` loss, and the covariance CW-GRPO would see.

    For a GRPO baseline beside CW-GRPO (paper Table 1 compares the covariance distribution with and without
    the reweighting): the loss and its gradient are exactly verl's ``compute_policy_loss_vanilla`` on the same
    arguments; the added metrics are the ``actor/cw/*`` covariance values of the mini-batch in the group scope
    (:data:`WEIGHT_METRICS` left out), as ``cw_grpo_group`` computes them. Costs the group scope's three
    small collectives once per mini-batch, and stops on the input it cannot use (non-finite advantages or
    log-probs in the mask, split prompt groups) as ``cw_grpo_group`` does.

    Args:
        old_log_prob: ``[B, T]`` log-probs under the policy that sampled the batch.
        log_prob: ``[B, T]`` log-probs under the policy being trained.
        advantages: ``[B, T]`` advantages.
        response_mask: ``[B, T]`` valid-token mask.
        loss_agg_mode: verl's aggregation mode.
        config: the actor's ``ActorConfig``.
        rollout_is_weights: ``[B, T]`` importance weights, or ``None``.

    Returns:
        ``(loss, metrics)``: verl's vanilla loss and metrics, with the ``actor/cw/*`` metrics added.
    """
    from verl.trainer.ppo.core_algos import compute_policy_loss_vanilla

    if config is None:
        raise ValueError(f"{VANILLA_WITH_CW_METRICS} needs the actor config (rollout_n, global_batch_info)")
    loss, metrics = compute_policy_loss_vanilla(
        old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights
    )
    batch_info = getattr(config, "global_batch_info", None) or {}
    group = resolve_data_parallel_group(batch_info.get("dp_size"))
    with torch.no_grad():
        scoped = mini_batch_statistics(GROUP, group, config, log_prob.device)
    # No weight metrics: this loss applies none, and a plot of them would suggest it did.
    covariance = {key: value for key, value in scoped.metrics.items() if key.rpartition("/")[2] not in WEIGHT_METRICS}
    return loss, {**metrics, **covariance}


def compute_cw_grpo_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: np.ndarray | None = None,
    config=None,
    **_: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``cw_grpo`` estimator: GRPO's group-normalised outcome advantage, unchanged.

    CW-GRPO reweights in the loss; the estimator only exists so that ``algorithm.adv_estimator=cw_grpo``
    selects the whole method (cw_verl makes the actor's ``loss_mode`` follow it). Honours
    ``algorithm.norm_adv_by_std_in_grpo`` like ``grpo``.

    Args:
        token_level_rewards: ``[B, T]`` rewards (the outcome reward at the last valid token).
        response_mask: ``[B, T]`` valid-token mask.
        index: ``[B]`` prompt uid of each row (responses to one prompt form a group).
        config: verl's ``algorithm`` config.

    Returns:
        ``(advantages, returns)``, both ``[B, T]``, as verl's ``compute_grpo_outcome_advantage``.
    """
    from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage

    if index is None:
        raise ValueError("cw_grpo normalises rewards within each prompt's group and needs the batch's 'uid' index")
    norm_by_std = True if config is None else bool(config.get("norm_adv_by_std_in_grpo", True))
    return compute_grpo_outcome_advantage(
        token_level_rewards=token_level_rewards,
        response_mask=response_mask,
        index=index,
        norm_adv_by_std_in_grpo=norm_by_std,
        config=config,
    )
