"""Credit attribution over segments: exact Owen, exact Shapley and Monte-Carlo Shapley values.

docs/design.md section 2.5. A game is given by a value function that scores a batch of
coalitions at once:

    value_fn(masks) -> values      masks: (K, n) bool, row k = coalition k;  values: (K,) float

Every method works in three steps (the shape of shap's exact explainer):
1. enumerate the coalitions it needs, as integer codes (bit i set <=> player i in the coalition),
2. dedupe them and call `value_fn` ONCE on the (K, n) mask batch,
3. accumulate weighted marginal contributions by index lookups into the K values.

Exponential work states its cost: the classes `Owen` and `Shapley` refuse a game whose coalition
count exceeds their budget (`AttributionBudgetError`), or fall back to Monte-Carlo Shapley when
configured to.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import numpy as np

ValueFn = Callable[[np.ndarray], np.ndarray]
"""A game: bool masks (K, n) over a completion's n players -> coalition values (K,). Built by
`ospo.reward.Reward.coalition_value_fn`, read by every attribution method."""
Seed = int | np.random.Generator | None

log = logging.getLogger("ospo.attribution")

# Coalitions are encoded as int64 bit sets, so a game can have at most this many players.
MAX_PLAYERS = 62

__all__ = [
    "AttributionBudgetError",
    "CountingValueFn",
    "MAX_PLAYERS",
    "Owen",
    "Shapley",
    "ShapleyMC",
    "ValueFn",
    "check_unions",
    "mc_shapley_values",
    "owen_num_coalitions",
    "owen_values",
    "shapley_num_coalitions",
    "shapley_values",
]


class AttributionBudgetError(ValueError):
    """An exact attribution would need more coalitions than its budget allows."""


# ----------------------------------------------------------------------------- helpers


def check_unions(unions: Sequence[Sequence[int]]) -> list[list[int]]:
    """Validate a coalition structure and return it as sorted lists of ints.

    `unions` must partition 0..n-1 (n = total number of entries): every union non-empty, every
    index an int in range, each index in exactly one union.
    """
    if isinstance(unions, int | np.integer) or not isinstance(unions, Sequence | np.ndarray):
        raise TypeError(
            f"unions must be a list of lists of player indices, got {type(unions).__name__}"
        )
    out: list[list[int]] = []
    for k, union in enumerate(unions):
        if isinstance(union, int | np.integer) or not isinstance(union, Sequence | np.ndarray):
            raise TypeError(
                f"union {k} must be a list of player indices, got {type(union).__name__}: {union!r}"
            )
        if len(union) == 0:
            raise ValueError(f"union {k} is empty; every union must hold at least one player")
        members = []
        for p in union:
            if isinstance(p, bool) or not isinstance(p, int | np.integer):
                raise TypeError(f"union {k} holds {p!r}; player indices must be ints")
            members.append(int(p))
        out.append(sorted(members))
    flat = [p for union in out for p in union]
    n = len(flat)
    if n > MAX_PLAYERS:
        raise ValueError(f"{n} players; at most {MAX_PLAYERS} are supported (int64 coalitions)")
    seen: dict[int, int] = {}
    for k, union in enumerate(out):
        for p in union:
            if p < 0 or p >= n:
                raise ValueError(
                    f"union {k} holds player {p}, but the unions hold {n} players in all, so "
                    f"indices must lie in 0..{n - 1}; unions={out}"
                )
            if p in seen:
                where = "twice in union" if seen[p] == k else f"in unions {seen[p]} and"
                raise ValueError(
                    f"player {p} appears {where} {k}; unions must be disjoint; unions={out}"
                )
            seen[p] = k
    return out


def _check_n(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 0:
        raise ValueError(f"n must be a non-negative int (the number of players), got {n!r}")
    if n > MAX_PLAYERS:
        raise ValueError(f"n={n} players; at most {MAX_PLAYERS} are supported (int64 coalitions)")
    return int(n)


def _n_of(n_or_unions: int | Sequence[Sequence[int]]) -> int:
    if isinstance(n_or_unions, int | np.integer):
        return _check_n(n_or_unions)
    return sum(len(u) for u in check_unions(n_or_unions))


def _popcount(codes: np.ndarray) -> np.ndarray:
    """Number of set bits of each non-negative int64 code; same shape as `codes`."""
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(codes).astype(np.int64)
    as_bytes = codes.astype("<i8")[..., None].view(np.uint8)  # (..., 8)
    return np.unpackbits(as_bytes, axis=-1).sum(-1).astype(np.int64)


def _subset_codes(members: np.ndarray) -> np.ndarray:
    """All 2^b subsets of `members` (global player indices) as codes, local bit j = members[j]."""
    b = members.shape[0]
    local = np.arange(1 << b, dtype=np.int64)  # (2^b,)
    bits = (local[:, None] >> np.arange(b, dtype=np.int64)) & 1  # (2^b, b)
    return bits @ (np.int64(1) << members.astype(np.int64))  # (2^b,)


def _shapley_weights(size: int) -> np.ndarray:
    """w[s] = s! (size - s - 1)! / size!  for s = 0..size-1 (weight of a coalition of s others)."""
    f = math.factorial
    return np.array([f(s) * f(size - s - 1) / f(size) for s in range(size)], dtype=np.float64)


def _evaluate(value_fn: ValueFn, codes: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Dedupe `codes`, call value_fn once on their masks; return (values (K,), inverse).

    `inverse` has the shape of `codes` and indexes each code's value in `values`.
    """
    uniq, inverse = np.unique(codes.reshape(-1), return_inverse=True)  # (K,), (codes.size,)
    masks = ((uniq[:, None] >> np.arange(n, dtype=np.int64)) & 1).astype(bool)  # (K, n)
    values = np.asarray(value_fn(masks), dtype=np.float64)
    if values.size != uniq.shape[0] or values.ndim > 2:
        raise ValueError(
            f"value_fn returned shape {values.shape} for a ({uniq.shape[0]}, {n}) mask batch; "
            f"expected ({uniq.shape[0]},)"
        )
    return values.reshape(-1), inverse.reshape(codes.shape)


def _budget_message(method: str, n: int, sizes: list[int], need: int, budget: int) -> str:
    return (
        f"{method}: exact attribution over n={n} players (union sizes {sizes}) needs {need} "
        f"coalitions, over the budget max_coalitions={budget}. Raise `max_coalitions`, lower "
        f"`segmenter.max_segments`, or set `fallback=true` to use Monte-Carlo Shapley instead."
    )


# ----------------------------------------------------------------------------- counts


def shapley_num_coalitions(n: int) -> int:
    """Distinct coalitions evaluated by exact Shapley: all 2^n subsets (none when n == 0)."""
    n = _check_n(n)
    return 1 << n if n > 0 else 0


def owen_num_coalitions(unions: Sequence[Sequence[int]]) -> int:
    """Distinct coalitions evaluated by exact Owen.

    The coalitions Q_R + T are those made of whole unions plus at most one partial union:
    2^m (whole unions only) + 2^(m-1) * sum_k (2^(b_k) - 2) (union k strictly partial, any
    subset of the other m-1 unions whole). Never more than 2^n; none when n == 0.
    """
    sizes = [len(u) for u in check_unions(unions)]
    m = len(sizes)
    if m == 0:
        return 0
    return (1 << m) + (1 << (m - 1)) * sum((1 << b) - 2 for b in sizes)


# ----------------------------------------------------------------------------- exact values


def shapley_values(value_fn: ValueFn, n: int) -> np.ndarray:
    """Exact Shapley values from all 2^n coalitions, with one call to `value_fn`.

    phi_i = sum_{S subset N \\ {i}} |S|! (n - |S| - 1)! / n! * [v(S + i) - v(S)].
    """
    n = _check_n(n)
    if n == 0:
        return np.zeros(0, dtype=np.float64)
    codes = np.arange(1 << n, dtype=np.int64)  # (2^n,) already distinct
    values, inverse = _evaluate(value_fn, codes, n)
    v = values[inverse]  # (2^n,) v[code]
    phi = np.empty(n, dtype=np.float64)
    sizes = _popcount(codes)  # (2^n,)
    weights = _shapley_weights(n)
    for i in range(n):
        without = codes[(codes >> i) & 1 == 0]  # (2^(n-1),) coalitions S not holding i
        w = weights[sizes[without]]
        phi[i] = w @ (v[without | (1 << i)] - v[without])
    return phi


def owen_values(value_fn: ValueFn, unions: Sequence[Sequence[int]]) -> np.ndarray:
    """Exact Owen values for the coalition structure `unions`, with one call to `value_fn`.

    For player i in union k (m unions, union k of size b), with Q_R = players of the unions R:
        phi_i = sum_{R subset of other unions} sum_{T subset of union k \\ {i}}
                |R|! (m - |R| - 1)! / m!  *  |T|! (b - |T| - 1)! / b!
                * [v(Q_R + T + i) - v(Q_R + T)].
    Equivalently: the mean marginal contribution of i over all player orders in which the
    members of each union stand together.
    """
    unions = check_unions(unions)
    n = sum(len(u) for u in unions)
    if n == 0:
        return np.zeros(0, dtype=np.float64)
    m = len(unions)
    union_codes = np.array([sum(1 << p for p in u) for u in unions], dtype=np.int64)  # (m,)

    # 1. per union k, the grid of coalitions Q_R | T: (2^(m-1), 2^b_k)
    grids, r_weights, t_locals = [], [], []
    w_top = _shapley_weights(m)
    for k, union in enumerate(unions):
        others = np.delete(union_codes, k)  # (m-1,)
        r_local = np.arange(1 << (m - 1), dtype=np.int64)  # (2^(m-1),)
        r_bits = (r_local[:, None] >> np.arange(m - 1, dtype=np.int64)) & 1  # (2^(m-1), m-1)
        q_r = r_bits @ others  # (2^(m-1),) disjoint bits, so sum == bitwise or
        t_codes = _subset_codes(np.array(union))  # (2^b,)
        grids.append(q_r[:, None] | t_codes[None, :])  # (2^(m-1), 2^b)
        r_weights.append(w_top[r_bits.sum(1)])  # (2^(m-1),)
        t_locals.append(np.arange(1 << len(union), dtype=np.int64))

    # 2. one call on the deduplicated coalitions
    flat = np.concatenate([g.reshape(-1) for g in grids])
    values, inverse = _evaluate(value_fn, flat, n)

    # 3. accumulate, per union, weighted marginals by index lookups
    phi = np.empty(n, dtype=np.float64)
    offset = 0
    for k, union in enumerate(unions):
        g = grids[k]
        v = values[inverse[offset : offset + g.size]].reshape(g.shape)  # (2^(m-1), 2^b)
        offset += g.size
        b = len(union)
        w_low = _shapley_weights(b)
        t = t_locals[k]
        for j, player in enumerate(union):
            without = t[(t >> j) & 1 == 0]  # (2^(b-1),) local T not holding player
            w_t = w_low[_popcount(without)]  # (2^(b-1),)
            marg = v[:, without | (1 << j)] - v[:, without]  # (2^(m-1), 2^(b-1))
            phi[player] = r_weights[k] @ marg @ w_t
    return phi


# ----------------------------------------------------------------------------- Monte-Carlo


def mc_shapley_values(
    value_fn: ValueFn, n: int, num_permutations: int, seed: Seed = 0
) -> np.ndarray:
    """Monte-Carlo Shapley values from random permutations in antithetic pairs.

    Each pair is a uniformly random order and its reverse; an odd `num_permutations` is rounded
    up to the next even number. phi_i = mean over orders of v(P_i + i) - v(P_i), P_i = the
    players before i. Unbiased; every order's marginals sum to v(N) - v(empty), so every estimate
    is efficient. All prefix coalitions are collected, deduped and scored in one call.
    `seed` is an int, None, or a numpy Generator (used as is, so successive calls differ).
    """
    n = _check_n(n)
    if isinstance(num_permutations, bool) or not isinstance(num_permutations, int | np.integer):
        raise ValueError(f"num_permutations must be a positive int, got {num_permutations!r}")
    if num_permutations < 1:
        raise ValueError(f"num_permutations must be >= 1, got {num_permutations}")
    if n == 0:
        return np.zeros(0, dtype=np.float64)
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    pairs = (int(num_permutations) + 1) // 2
    base = rng.permuted(np.tile(np.arange(n, dtype=np.int64), (pairs, 1)), axis=1)  # (pairs, n)
    perms = np.concatenate([base, base[:, ::-1]])  # (P, n) antithetic: each order and its reverse
    num = perms.shape[0]
    prefix = np.cumsum(np.int64(1) << perms, axis=1)  # (P, n) coalition after each arrival
    codes = np.concatenate([np.zeros((num, 1), dtype=np.int64), prefix], axis=1)  # (P, n+1)
    values, inverse = _evaluate(value_fn, codes, n)
    v = values[inverse]  # (P, n+1)
    marginals = v[:, 1:] - v[:, :-1]  # (P, n) marginal of player perms[p, t]
    phi = np.zeros(n, dtype=np.float64)
    np.add.at(phi, perms.reshape(-1), marginals.reshape(-1))
    return phi / num


# ----------------------------------------------------------------------------- config classes


class _Exact:
    """Shared budget / fallback logic of the exact methods (config group `attribution`)."""

    method = ""

    def __init__(
        self,
        max_coalitions: int = 4096,
        fallback: bool = False,
        num_permutations: int = 64,
        seed: int = 0,
    ):
        if max_coalitions is not None and max_coalitions < 1:
            raise ValueError(f"max_coalitions must be >= 1 or None, got {max_coalitions}")
        if num_permutations < 1:
            raise ValueError(f"num_permutations must be >= 1, got {num_permutations}")
        self.max_coalitions = max_coalitions
        self.fallback = bool(fallback)
        self.num_permutations = int(num_permutations)
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self.last_num_coalitions = 0
        self.num_fallbacks = 0

    @classmethod
    def budget_check(cls, max_segments: int) -> int:
        """Worst-case coalition count over every game of `max_segments` players: 2^max_segments.

        For Owen the maximum over union structures is also 2^n (one union, or all singletons).
        """
        return shapley_num_coalitions(max_segments)

    def validate_budget(self, max_segments: int) -> int:
        """Raise AttributionBudgetError early if `max_segments` players could exceed the budget
        (and no fallback is configured); return the worst-case count."""
        need = self.budget_check(max_segments)
        if self.max_coalitions is not None and need > self.max_coalitions and not self.fallback:
            raise AttributionBudgetError(
                _budget_message(
                    self.method, max_segments, ["worst case"], need, self.max_coalitions
                )
            )
        return need

    def _count(self, unions: list[list[int]]) -> int:
        raise NotImplementedError

    def _exact(self, value_fn: ValueFn, unions: list[list[int]]) -> np.ndarray:
        raise NotImplementedError

    def __call__(self, value_fn: ValueFn, unions: Sequence[Sequence[int]]) -> np.ndarray:
        if isinstance(unions, int | np.integer):
            unions = [[i] for i in range(_check_n(unions))]
        unions = check_unions(unions)
        n = sum(len(u) for u in unions)
        if n == 0:
            self.last_num_coalitions = 0
            return np.zeros(0, dtype=np.float64)
        need = self._count(unions)
        if self.max_coalitions is not None and need > self.max_coalitions:
            message = _budget_message(
                self.method, n, [len(u) for u in unions], need, self.max_coalitions
            )
            if not self.fallback:
                raise AttributionBudgetError(message)
            self.num_fallbacks += 1
            level = logging.WARNING if self.num_fallbacks == 1 else logging.DEBUG
            log.log(
                level,
                "%s Falling back to Monte-Carlo Shapley with %d permutations "
                "(warned once per instance).",
                message,
                self.num_permutations,
            )
            return self._monte_carlo(value_fn, n)
        self.last_num_coalitions = need
        return self._exact(value_fn, unions)

    def _monte_carlo(self, value_fn: ValueFn, n: int) -> np.ndarray:
        counter = CountingValueFn(value_fn)
        phi = mc_shapley_values(counter, n, self.num_permutations, self.rng)
        self.last_num_coalitions = counter.rows
        return phi


class CountingValueFn:
    """A value function that counts the coalitions (mask rows) it is asked to score: the one
    coalition counter (attribution fall-backs, the RL step's `credit/coalitions`, the
    faithfulness table)."""

    def __init__(self, value_fn: ValueFn):
        self.value_fn = value_fn
        self.rows = 0

    def __call__(self, masks: np.ndarray) -> np.ndarray:
        self.rows += masks.shape[0]
        return self.value_fn(masks)


class Owen(_Exact):
    """Exact Owen values over the segmenter's coalition structure (`attribution=owen`)."""

    method = "owen"

    def _count(self, unions: list[list[int]]) -> int:
        return owen_num_coalitions(unions)

    def _exact(self, value_fn: ValueFn, unions: list[list[int]]) -> np.ndarray:
        return owen_values(value_fn, unions)


class Shapley(_Exact):
    """Exact Shapley values; ignores the union structure (`attribution=shapley`)."""

    method = "shapley"

    def _count(self, unions: list[list[int]]) -> int:
        return shapley_num_coalitions(sum(len(u) for u in unions))

    def _exact(self, value_fn: ValueFn, unions: list[list[int]]) -> np.ndarray:
        return shapley_values(value_fn, sum(len(u) for u in unions))


class ShapleyMC:
    """Monte-Carlo Shapley with antithetic permutation pairs (`attribution=shapley_mc`).

    The Generator `self.rng` is seeded once at construction: successive calls draw fresh
    permutations and a run is reproducible (save `rng.bit_generator.state` to resume). An odd `num_permutations` is rounded up to even.
    """

    method = "shapley_mc"

    def __init__(self, num_permutations: int = 32, seed: int = 0):
        if num_permutations < 1:
            raise ValueError(f"num_permutations must be >= 1, got {num_permutations}")
        self.num_permutations = int(num_permutations)
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self.last_num_coalitions = 0

    def validate_budget(self, max_segments: int) -> int:
        """Worst-case distinct coalitions for `max_segments` players; never raises."""
        n = _check_n(max_segments)
        if n == 0:
            return 0
        orders = self.num_permutations + self.num_permutations % 2
        return min(1 << n, 2 + orders * (n - 1))

    def __call__(self, value_fn: ValueFn, unions: Sequence[Sequence[int]]) -> np.ndarray:
        n = _n_of(unions)
        if n == 0:
            self.last_num_coalitions = 0
            return np.zeros(0, dtype=np.float64)
        counter = CountingValueFn(value_fn)
        phi = mc_shapley_values(counter, n, self.num_permutations, self.rng)
        self.last_num_coalitions = counter.rows
        return phi
