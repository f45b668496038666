"""Clip-Cov's and KL-Cov's token selection over a whole scope, the same for any sharding (torch only).

verl's ``clip_cov`` and ``kl_cov`` pick tokens by their covariance ``c = (log pi - mean) (A - mean)`` inside
each loss call, so the means, the count ``k = max(int(ratio N), 1)`` and the tokens chosen move with the
micro-batch size and the DP size (verl issue #7829). Here the selection is made once for a scope (the
optimizer mini-batch on every rank), from the ``c`` of :func:`cw_verl.weights.scope_statistics`, and is
then a pointwise predicate of a token (:meth:`Selection.members`), so every loss call that holds the token
agrees on it, whatever micro-batch it sits in.

Each eligible token has an order pair ``(primary, key)`` and the selection is the ``k`` smallest pairs
(lexicographic) of the scope:

* :data:`TOP` (KL-Cov): every valid token, ``primary = -c``: the ``k`` largest ``c``, ties broken by the key;
* :data:`DRAW` (Clip-Cov): the candidates ``lb < c < ub``, ``primary = 0``: ``k`` of them with the smallest
  keys, a uniform draw when the keys are pseudo-random.

A token's key (:func:`token_keys`) is a 62-bit hash of its row's valid old log-probs and advantages (their
bits) and of its position in the response: a function of the token alone, so the same on any rank and in
any micro-batch, fresh at every step (the old log-probs change with the policy), and the same again after a
resume. Two tokens agree in key only if their rows agree in every valid old log-prob and advantage (e.g. the
same response twice) or the hash collides (about ``n^2 / 2^63`` for ``n`` tokens); two such tokens with the
same ``c`` are selected together, so the count can then exceed ``k`` (:attr:`Selection.selected` is
``min(k, eligible)`` and does not count such a twin).

One gather round: each rank ships its own ``k`` smallest pairs and its count of eligible tokens, ``[k + 1, 2]``
float64 (``16 (k + 1)`` bytes); every rank merges the same stack into the same threshold pair.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cw_verl.weights import Gather

TOP, DRAW = "top", "draw"
F64 = torch.float64
_M32 = 0xFFFFFFFF
_KEY_PAD = 1 << 62  # above every key: the slots of a rank's table that hold no token
_MIX = 0x45D9F3B  # 27 bits: a product with a 32-bit word stays below 2^59, exact in int64 on every device


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mix of ``x`` in ``[0, 2^32)`` (int64), exact on every device (no overflow)."""
    x = ((x >> 16) ^ x) * _MIX & _M32
    x = ((x >> 16) ^ x) * _MIX & _M32
    return (x >> 16) ^ x


def _chain(seed: int, *words: torch.Tensor) -> torch.Tensor:
    """``_hash32`` folded over ``words`` (int64 in ``[0, 2^32)``) from ``seed``."""
    h = torch.full((), seed, dtype=torch.int64, device=words[0].device)
    for word in words:
        h = _hash32((h * 31 + word) & _M32)
    return h


def _bits(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two 32-bit words of each value as float64 (exact for every float dtype), as int64."""
    bits = values.detach().to(F64).contiguous().view(torch.int64)
    return bits & _M32, (bits >> 32) & _M32


def token_keys(old_log_prob: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each token's sharding-independent 62-bit key (int64 in ``[0, 2^62)``).

    Args:
        old_log_prob: ``[B, T]`` the old log-probs the selection is made from.
        advantages: ``[B, T]`` advantages.
        mask: ``[B, T]`` valid-token mask; positions outside it do not enter the row's identity.

    Returns:
        ``[B, T]`` int64 keys; column ``t`` is response position ``t``. Positions outside the mask get a value too.
    """
    valid = mask.bool()
    positions = torch.arange(old_log_prob.shape[1], dtype=torch.int64, device=old_log_prob.device).expand(
        old_log_prob.shape
    )
    words = (*_bits(torch.where(valid, old_log_prob.detach(), 0.0)), *_bits(torch.where(valid, advantages, 0.0)))
    rows = []
    for seed in (1, 2):  # two independent 32-bit row hashes: a 64-bit row identity
        per_token = torch.where(valid, _chain(seed, positions, *words), 0)
        rows.append((per_token.sum(1, keepdim=True) & _M32).expand(old_log_prob.shape))
    high = _chain(3, *rows, positions)
    low = _chain(4, *rows, positions)
    return (high << 30) | (low >> 2)


@dataclass(frozen=True)
class SelectionRule:
    """Which tokens a scope selects: ``kind`` :data:`TOP` or :data:`DRAW`, ``k = max(int(ratio N), 1)``,
    and for :data:`DRAW` the candidates' open covariance interval ``(lb, ub)``."""

    kind: str
    ratio: float
    lb: float = -math.inf
    ub: float = math.inf

    def __post_init__(self):
        if self.kind not in (TOP, DRAW):
            raise ValueError(f"selection kind must be {TOP!r} or {DRAW!r}, got {self.kind!r}")
        if not (math.isfinite(self.ratio) and self.ratio > 0):
            raise ValueError(f"the selection ratio must be a finite number > 0, got {self.ratio}")
        if math.isnan(self.lb) or math.isnan(self.ub):
            raise ValueError(f"the covariance bounds must be numbers, got lb={self.lb}, ub={self.ub}")

    def count(self, num_tokens: int) -> int:
        """``k = max(int(ratio N), 1)`` for a scope of ``N`` valid tokens (verl's count)."""
        return max(int(self.ratio * num_tokens), 1)

    def eligible(self, cov: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` bool: the tokens that may be selected."""
        valid = valid.bool()
        return valid & (cov > self.lb) & (cov < self.ub) if self.kind == DRAW else valid

    def primary(self, cov: torch.Tensor) -> torch.Tensor:
        """The first member of each token's order pair (smaller is selected first)."""
        return -cov if self.kind == TOP else torch.zeros_like(cov)


@dataclass(frozen=True)
class Selection:
    """A scope's selection, identical on every rank: the tokens whose pair ``(primary, key)`` is at most the
    threshold pair. ``eligible``: tokens that could be selected (all valid tokens, or Clip-Cov's candidates)
    in the scope; ``selected``: ``min(k, eligible)``, how many were (a twin of the k-th token, equal in ``c`` and
    key, is selected too and not counted); ``kth_cov``: the covariance of the last token selected (KL-Cov's
    threshold; NaN when nothing was, and for Clip-Cov)."""

    rule: SelectionRule
    k: int
    threshold: torch.Tensor  # [2] float64: primary, key (bits of an int64)
    eligible: int
    selected: int
    kth_cov: float

    def members(
        self, cov: torch.Tensor, valid: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor
    ) -> torch.Tensor:
        """Which of these tokens are selected: a pointwise test, no collective.

        Args:
            cov: ``[B, T]`` the tokens' ``c`` from the scope's means, as the statistics pass computed them.
            valid: ``[B, T]`` valid-token mask.
            old_log_prob: ``[B, T]`` the old log-probs the selection was made from (for :func:`token_keys`).
            advantages: ``[B, T]`` their advantages.

        Returns:
            ``[B, T]`` bool, False outside ``valid``.
        """
        eligible = self.rule.eligible(cov, valid)
        primary = self.rule.primary(cov).to(F64)
        bound, bound_key = self.threshold[0], self.threshold[1:].view(torch.int64)[0]
        inside = primary < bound
        at_bound = eligible & (primary == bound)
        # Only the tokens at the threshold's primary need their keys (KL-Cov: ties of c, rare; Clip-Cov: every
        # candidate when k < candidates). On a CPU the keys cost several times verl's loss, so they are made only
        # when some token is there; on a GPU they are cheap and the test would wait for the device.
        if cov.device.type != "cpu" or bool(at_bound.any()):
            inside |= at_bound & (token_keys(old_log_prob, advantages, valid) <= bound_key)
        return eligible & inside


def _smallest_pairs(primary: torch.Tensor, keys: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` (or fewer) lexicographically smallest ``(primary, key)`` pairs of flat tensors, unordered.

    A selection of the ``k``-th primary and a top-k of the keys tied with it: no sort of all tokens."""
    if len(primary) <= k:
        return primary, keys
    bound = torch.kthvalue(primary, k).values
    below = primary < bound
    tied = primary == bound
    need = k - int(below.sum())
    tied_keys = torch.where(tied, keys, _KEY_PAD)
    chosen = torch.topk(tied_keys, need, largest=False).indices
    return torch.cat([primary[below], primary[chosen]]), torch.cat([keys[below], keys[chosen]])


def select(
    rule: SelectionRule,
    k: int,
    cov: torch.Tensor,
    valid: torch.Tensor,
    keys: torch.Tensor,
    gather: Gather,
) -> Selection:
    """The scope's selection, in one gather round (every rank must call it with the same ``k``).

    Args:
        rule: what to select.
        k: how many, from the scope's token count (:meth:`SelectionRule.count`).
        cov: ``[B, T]`` this rank's tokens' ``c`` (from the scope's global means).
        valid: ``[B, T]`` this rank's tokens in scope.
        keys: ``[B, T]`` their :func:`token_keys`.
        gather: stacks a tensor over the scope's ranks.

    Returns:
        The :class:`Selection`, the same on every rank (its counts read to the host once).
    """
    eligible = rule.eligible(cov, valid)
    primary, own_keys = _smallest_pairs(rule.primary(cov)[eligible].to(F64), keys[eligible], k)
    table = torch.full((k + 1, 2), math.inf, dtype=F64, device=cov.device)
    table[1:, 1] = torch.tensor(_KEY_PAD, dtype=torch.int64, device=cov.device).view(F64)
    table[0] = torch.stack([eligible.sum().to(F64), torch.zeros((), dtype=F64, device=cov.device)])
    table[1 : len(primary) + 1, 0] = primary
    table[1 : len(primary) + 1, 1] = own_keys.contiguous().view(F64)
    stack = gather(table)
    entries = stack[:, 1:, :].reshape(-1, 2)
    entry_keys = entries[:, 1].contiguous().view(torch.int64)
    # Lexicographic order of (primary, key): by key, then stably by primary.
    order = torch.sort(entry_keys, stable=True).indices
    order = order[torch.sort(entries[order, 0], stable=True).indices]
    total = stack[:, 0, 0].sum()
    count = torch.clamp(total, max=float(k)).to(torch.int64)
    last = entries[order[torch.clamp(count - 1, min=0)]]
    # Fewer eligible tokens than k: all of them (a pair above every token's).
    everything = torch.tensor([math.inf, 0.0], dtype=F64, device=cov.device)
    everything[1:] = torch.tensor([_KEY_PAD], dtype=torch.int64, device=cov.device).view(F64)
    threshold = torch.where(total > k, last, everything)
    kth = torch.where(count > 0, -last[0] if rule.kind == TOP else torch.tensor(math.nan, dtype=F64), math.nan)
    eligible_total, selected, kth_cov = torch.stack([total, count.to(F64), kth.to(F64)]).tolist()
    return Selection(rule, k, threshold, int(eligible_total), int(selected), kth_cov)
