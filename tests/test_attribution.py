"""Tests for ospo.attribution: axioms, hand-computed values, one-call batching, budgets."""

from __future__ import annotations

import itertools
import logging
import math

import numpy as np
import pytest

from ospo.attribution import (
    AttributionBudgetError,
    Owen,
    Shapley,
    ShapleyMC,
    check_unions,
    mc_shapley_values,
    owen_num_coalitions,
    owen_values,
    shapley_num_coalitions,
    shapley_values,
)

# ----------------------------------------------------------------------------- games


def codes_of(masks: np.ndarray) -> np.ndarray:
    """(K, n) bool -> (K,) int codes, bit i = player i."""
    return (masks.astype(np.int64) << np.arange(masks.shape[1], dtype=np.int64)).sum(1)


class TableGame:
    """v(S) = table[code(S)]; records every call to check batching."""

    def __init__(self, table: np.ndarray):
        self.table = np.asarray(table, dtype=np.float64)
        self.n = int(round(math.log2(self.table.shape[0])))
        self.calls: list[np.ndarray] = []

    def __call__(self, masks: np.ndarray) -> np.ndarray:
        assert masks.dtype == bool and masks.ndim == 2 and masks.shape[1] == self.n
        self.calls.append(masks.copy())
        return self.table[codes_of(masks)]

    def v(self, players) -> float:
        return float(self.table[sum(1 << p for p in players)])


def random_game(n: int, rng: np.random.Generator) -> TableGame:
    table = rng.normal(size=1 << n)
    table[0] = rng.normal() + 3.0  # v(empty) != 0 on purpose
    return TableGame(table)


def game_from(n: int, fn) -> TableGame:
    """Table game from a function of the player set."""
    return TableGame(
        np.array([fn({i for i in range(n) if c >> i & 1}) for c in range(1 << n)], dtype=float)
    )


def random_partition(n: int, rng: np.random.Generator) -> list[list[int]]:
    labels = rng.integers(0, rng.integers(1, n + 1), size=n)
    order = sorted(set(labels.tolist()))
    return [sorted(np.flatnonzero(labels == lab).tolist()) for lab in order]


def all_partitions(items: list[int]):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in all_partitions(rest):
        yield [[first], *part]
        for k in range(len(part)):
            yield [*part[:k], [first, *part[k]], *part[k + 1 :]]


# ----------------------------------------------------------------------------- references


def shapley_by_orders(game: TableGame) -> np.ndarray:
    """Mean marginal contribution over all n! orders (independent of the subset formula)."""
    n = game.n
    phi = np.zeros(n)
    orders = list(itertools.permutations(range(n)))
    for order in orders:
        before: list[int] = []
        for p in order:
            phi[p] += game.v([*before, p]) - game.v(before)
            before.append(p)
    return phi / len(orders)


def owen_by_orders(game: TableGame, unions: list[list[int]]) -> np.ndarray:
    """Mean marginal contribution over the orders where each union's members stand together."""
    phi = np.zeros(game.n)
    count = 0
    for union_order in itertools.permutations(unions):
        for inner in itertools.product(*(itertools.permutations(u) for u in union_order)):
            before: list[int] = []
            for p in itertools.chain(*inner):
                phi[p] += game.v([*before, p]) - game.v(before)
                before.append(p)
            count += 1
    return phi / count


# ----------------------------------------------------------------------------- hand example

# Three players, unions A = {0, 1}, B = {2}.
# v: {} 1, {0} 3, {1} 2, {2} 4, {0,1} 6, {0,2} 5, {1,2} 8, {0,1,2} 10
HAND = TableGame(np.array([1, 3, 2, 6, 4, 5, 8, 10], dtype=float))  # index = code
HAND_UNIONS = [[0, 1], [2]]
# Owen (each of the 2 union orders has weight 1/2; inside A each order weight 1/2):
#   player 2: 1/2 [v(2) - v()] + 1/2 [v(012) - v(01)]          = 1/2*3 + 1/2*4        = 3.5
#   player 0: R={}:  1/2 [v(0) - v()]    + 1/2 [v(01) - v(1)]   = 1/2*2 + 1/2*4 = 3
#             R={B}: 1/2 [v(02) - v(2)]  + 1/2 [v(012) - v(12)] = 1/2*1 + 1/2*2 = 1.5
#             phi_0 = 1/2*3 + 1/2*1.5                                                 = 2.25
#   player 1: R={}:  1/2 [v(1) - v()]    + 1/2 [v(01) - v(0)]   = 1/2*1 + 1/2*3 = 2
#             R={B}: 1/2 [v(12) - v(2)]  + 1/2 [v(012) - v(02)] = 1/2*4 + 1/2*5 = 4.5
#             phi_1 = 1/2*2 + 1/2*4.5                                                 = 3.25
HAND_OWEN = [2.25, 3.25, 3.5]
# Shapley (weights 1/3 for |S| = 0 or 2, 1/6 for |S| = 1):
#   player 0: 2/3 + 4/6 + 1/6 + 2/3 = 13/6;  player 1: 1/3 + 3/6 + 4/6 + 5/3 = 19/6;
#   player 2: 3/3 + 2/6 + 6/6 + 4/3 = 11/3.   Both sum to v(N) - v() = 9.
HAND_SHAPLEY = [13 / 6, 19 / 6, 11 / 3]


def test_hand_computed_owen_differs_from_shapley():
    np.testing.assert_allclose(owen_values(HAND, HAND_UNIONS), HAND_OWEN, atol=1e-12)
    np.testing.assert_allclose(shapley_values(HAND, 3), HAND_SHAPLEY, atol=1e-12)
    assert not np.allclose(HAND_OWEN, HAND_SHAPLEY)


def test_weighted_majority_known_values():
    # weights [3, 1, 1, 1], win iff weight >= 4: the big player is pivotal unless first -> 3/4.
    game = game_from(4, lambda s: float(sum(3 if p == 0 else 1 for p in s) >= 4))
    np.testing.assert_allclose(shapley_values(game, 4), [3 / 4, 1 / 12, 1 / 12, 1 / 12])
    # unions {0}, {1,2,3}: the quotient game is unanimity of 2 unions -> 1/2 each;
    # the three symmetric small players split their union's 1/2.
    np.testing.assert_allclose(owen_values(game, [[0], [1, 2, 3]]), [1 / 2, 1 / 6, 1 / 6, 1 / 6])


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_exact_values_match_permutation_definitions(n):
    rng = np.random.default_rng(n)
    for _ in range(4):
        game = random_game(n, rng)
        unions = random_partition(n, rng)
        np.testing.assert_allclose(shapley_values(game, n), shapley_by_orders(game), atol=1e-10)
        np.testing.assert_allclose(
            owen_values(game, unions), owen_by_orders(game, unions), atol=1e-10
        )


def test_unions_given_in_any_order_and_unsorted():
    rng = np.random.default_rng(5)
    game = random_game(5, rng)
    ref = owen_by_orders(game, [[0, 3], [1, 4], [2]])
    np.testing.assert_allclose(owen_values(game, [[2], [4, 1], [3, 0]]), ref, atol=1e-10)


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_efficiency(n):
    rng = np.random.default_rng(10 + n)
    for _ in range(5):
        game = random_game(n, rng)
        total = game.table[-1] - game.table[0]
        assert shapley_values(game, n).sum() == pytest.approx(total, abs=1e-9)
        assert owen_values(game, random_partition(n, rng)).sum() == pytest.approx(total, abs=1e-9)


def test_symmetry():
    rng = np.random.default_rng(2)
    n, i, j = 6, 1, 4
    base = random_game(n, rng)

    def swapped(code: int) -> int:
        bi, bj = code >> i & 1, code >> j & 1
        return code & ~((1 << i) | (1 << j)) | (bi << j) | (bj << i)

    sym = TableGame(np.array([(base.table[c] + base.table[swapped(c)]) / 2 for c in range(1 << n)]))
    phi = shapley_values(sym, n)
    assert phi[i] == pytest.approx(phi[j], abs=1e-10)
    owen = owen_values(sym, [[0, 1, 4], [2, 3], [5]])
    assert owen[i] == pytest.approx(owen[j], abs=1e-10)
    assert not np.isclose(phi[0], phi[2])  # the game is not trivially symmetric


def test_null_player_gets_zero():
    rng = np.random.default_rng(3)
    n, null = 5, 2
    base = random_game(n, rng)
    game = TableGame(np.array([base.table[c & ~(1 << null)] for c in range(1 << n)]))
    assert shapley_values(game, n)[null] == pytest.approx(0.0, abs=1e-12)
    assert owen_values(game, [[0, 2], [1, 3, 4]])[null] == pytest.approx(0.0, abs=1e-12)
    assert owen_values(game, [[2], [0, 1], [3, 4]])[null] == pytest.approx(0.0, abs=1e-12)
    assert mc_shapley_values(game, n, 6, seed=0)[null] == pytest.approx(0.0, abs=1e-12)


def test_linearity():
    rng = np.random.default_rng(4)
    n, a, b = 5, 2.5, -0.7
    v, w = random_game(n, rng), random_game(n, rng)
    mix = TableGame(a * v.table + b * w.table)
    unions = [[0, 4], [1], [2, 3]]
    np.testing.assert_allclose(
        shapley_values(mix, n), a * shapley_values(v, n) + b * shapley_values(w, n), atol=1e-10
    )
    np.testing.assert_allclose(
        owen_values(mix, unions),
        a * owen_values(v, unions) + b * owen_values(w, unions),
        atol=1e-10,
    )
    # the same seed draws the same permutations, so Monte-Carlo is linear too
    np.testing.assert_allclose(
        mc_shapley_values(mix, n, 10, 7),
        a * mc_shapley_values(v, n, 10, 7) + b * mc_shapley_values(w, n, 10, 7),
        atol=1e-10,
    )


def test_additive_game_gives_own_weights():
    n = 6
    weights = np.array([0.5, -1.0, 2.0, 0.0, 3.5, -0.25])
    game = game_from(n, lambda s: 1.7 + sum(weights[p] for p in s))
    np.testing.assert_allclose(shapley_values(game, n), weights, atol=1e-12)
    np.testing.assert_allclose(owen_values(game, [[0, 1, 2], [3], [4, 5]]), weights, atol=1e-12)
    np.testing.assert_allclose(mc_shapley_values(game, n, 4, 1), weights, atol=1e-12)


@pytest.mark.parametrize("n", [1, 3, 6])
def test_owen_equals_shapley_for_trivial_structures(n):
    rng = np.random.default_rng(20 + n)
    game = random_game(n, rng)
    phi = shapley_values(game, n)
    np.testing.assert_allclose(owen_values(game, [[i] for i in range(n)]), phi, atol=1e-10)
    np.testing.assert_allclose(owen_values(game, [list(range(n))]), phi, atol=1e-10)


def test_quotient_game_property():
    rng = np.random.default_rng(6)
    n = 7
    for _ in range(5):
        game = random_game(n, rng)
        unions = random_partition(n, rng)
        m = len(unions)
        # game between unions: u(R) = v(players of the unions in R)
        quotient = TableGame(
            np.array(
                [
                    game.v([p for k in range(m) if r >> k & 1 for p in unions[k]])
                    for r in range(1 << m)
                ]
            )
        )
        owen = owen_values(game, unions)
        sums = [owen[u].sum() for u in unions]
        np.testing.assert_allclose(sums, shapley_values(quotient, m), atol=1e-10)


# ----------------------------------------------------------------------------- batching


def test_one_call_without_duplicates_and_counts():
    rng = np.random.default_rng(7)
    for n in range(1, 8):
        for _ in range(3):
            unions = random_partition(n, rng)
            game = random_game(n, rng)
            owen_values(game, unions)
            assert len(game.calls) == 1
            codes = codes_of(game.calls[0])
            assert len(np.unique(codes)) == len(codes) == owen_num_coalitions(unions)
            game = random_game(n, rng)
            shapley_values(game, n)
            assert len(game.calls) == 1
            assert len(np.unique(codes_of(game.calls[0]))) == 1 << n == shapley_num_coalitions(n)


def test_owen_coalition_count_never_exceeds_two_to_the_n():
    for n in range(1, 8):
        counts = [owen_num_coalitions(p) for p in all_partitions(list(range(n)))]
        assert max(counts) == 1 << n == Owen.budget_check(n) == Shapley.budget_check(n)
    assert owen_num_coalitions([[0, 1], [2, 3]]) == 12  # 2^2 + 2 * (2 + 2)
    assert owen_num_coalitions([]) == shapley_num_coalitions(0) == 0  # n == 0: no call


def test_mc_one_call_no_duplicates():
    game = random_game(6, np.random.default_rng(8))
    mc_shapley_values(game, 6, 20, seed=3)
    assert len(game.calls) == 1
    codes = codes_of(game.calls[0])
    assert len(np.unique(codes)) == len(codes)
    assert {0, (1 << 6) - 1} <= set(codes.tolist())


def test_empty_game_does_not_call_value_fn():
    def boom(masks):
        raise AssertionError("value_fn must not be called for n == 0")

    assert owen_values(boom, []).shape == (0,)
    assert shapley_values(boom, 0).shape == (0,)
    assert mc_shapley_values(boom, 0, 8, 0).shape == (0,)
    for method in (Owen(), Shapley(), ShapleyMC()):
        assert method(boom, []).shape == (0,)
        assert method.last_num_coalitions == 0


def test_single_player():
    game = TableGame(np.array([2.0, 5.0]))
    for phi in (
        owen_values(game, [[0]]),
        shapley_values(game, 1),
        mc_shapley_values(game, 1, 3, 0),
    ):
        np.testing.assert_allclose(phi, [3.0])


@pytest.mark.parametrize(
    "unions, match",
    [
        ([[0, 1], [1]], "player 1 appears"),
        ([[0, 2]], "indices must lie in 0..1"),
        ([[0], []], "union 1 is empty"),
        ([[0, -1]], "indices must lie"),
        ([[0, 0]], "twice in union 0"),
        ([[0, 1.0]], "must be ints"),
        (3, "list of lists"),
    ],
)
def test_bad_unions_are_named(unions, match):
    with pytest.raises((ValueError, TypeError), match=match):
        check_unions(unions)
    with pytest.raises((ValueError, TypeError), match=match):
        owen_values(lambda m: np.zeros(len(m)), unions)


def test_bad_value_fn_shape():
    with pytest.raises(ValueError, match="value_fn returned shape"):
        shapley_values(lambda m: np.zeros((len(m), 2)), 2)


# ----------------------------------------------------------------------------- Monte-Carlo


def test_mc_seeded_and_efficient():
    rng = np.random.default_rng(9)
    game = random_game(7, rng)
    total = game.table[-1] - game.table[0]
    a = mc_shapley_values(game, 7, 16, seed=11)
    np.testing.assert_array_equal(a, mc_shapley_values(game, 7, 16, seed=11))
    assert not np.array_equal(a, mc_shapley_values(game, 7, 16, seed=12))
    for seed in range(10):
        for num in (1, 2, 3, 8):
            assert mc_shapley_values(game, 7, num, seed).sum() == pytest.approx(total, abs=1e-10)


def test_mc_odd_count_rounds_up_and_antithetic_pair_is_exact_for_two():
    game = random_game(5, np.random.default_rng(10))
    np.testing.assert_array_equal(
        mc_shapley_values(game, 5, 3, seed=4), mc_shapley_values(game, 5, 4, seed=4)
    )
    two = random_game(2, np.random.default_rng(11))  # an order and its reverse = all orders
    np.testing.assert_allclose(mc_shapley_values(two, 2, 2, 0), shapley_values(two, 2))


def test_mc_error_shrinks_with_permutations():
    rng = np.random.default_rng(12)
    game = random_game(8, rng)
    exact = shapley_values(game, 8)

    def mean_error(num):
        return np.mean(
            [np.abs(mc_shapley_values(game, 8, num, s) - exact).mean() for s in range(6)]
        )

    small, large = mean_error(8), mean_error(512)
    assert large < small / 3  # ~ 1/sqrt(64) = 1/8 expected


def test_mc_rejects_bad_counts():
    with pytest.raises(ValueError, match="num_permutations"):
        mc_shapley_values(lambda m: np.zeros(len(m)), 3, 0, 0)


def test_shapley_mc_class_reproducible_run_fresh_calls():
    game = random_game(6, np.random.default_rng(13))
    unions = [[0, 1, 2], [3, 4, 5]]
    one, two = ShapleyMC(num_permutations=4, seed=5), ShapleyMC(num_permutations=4, seed=5)
    first, second = one(game, unions), one(game, unions)
    assert not np.array_equal(first, second)
    np.testing.assert_array_equal(first, two(game, unions))
    np.testing.assert_array_equal(second, two(game, unions))
    assert 0 < one.last_num_coalitions <= 2 + 4 * 5 == one.validate_budget(6)
    assert ShapleyMC(num_permutations=4)(game, 6).shape == (6,)  # an int n works too


# ----------------------------------------------------------------------------- classes, budget


def test_classes_match_functions():
    rng = np.random.default_rng(14)
    game = random_game(5, rng)
    unions = [[0, 1], [2, 3, 4]]
    owen = Owen()
    np.testing.assert_allclose(owen(game, unions), owen_values(game, unions))
    assert owen.last_num_coalitions == owen_num_coalitions(unions) == 4 + 2 * (2 + 6)
    shapley = Shapley()
    np.testing.assert_allclose(shapley(game, unions), shapley_values(game, 5))
    assert shapley.last_num_coalitions == 32


def test_budget_error_states_the_cost():
    game = random_game(6, np.random.default_rng(15))
    with pytest.raises(AttributionBudgetError) as err:
        Owen(max_coalitions=20)(game, [[0, 1, 2], [3, 4, 5]])
    text = str(err.value)
    need = owen_num_coalitions([[0, 1, 2], [3, 4, 5]])  # 4 + 2 * (6 + 6) = 28
    assert need == 28
    for part in ("owen", "n=6", "[3, 3]", "28", "max_coalitions=20", "max_segments", "fallback"):
        assert part in text
    with pytest.raises(AttributionBudgetError, match="64 coalitions"):
        Shapley(max_coalitions=63)(game, [[0, 1, 2], [3, 4, 5]])
    assert isinstance(err.value, ValueError)
    assert len(game.calls) == 0


def test_validate_budget_fails_early():
    with pytest.raises(AttributionBudgetError, match="4096"):
        Owen(max_coalitions=1000).validate_budget(12)
    assert Owen(max_coalitions=1000, fallback=True).validate_budget(12) == 4096
    assert Shapley().validate_budget(12) == 4096


def test_fallback_is_efficient_and_warns(caplog):
    game = random_game(7, np.random.default_rng(16))
    total = game.table[-1] - game.table[0]
    owen = Owen(max_coalitions=16, fallback=True, num_permutations=8, seed=1)
    with caplog.at_level(logging.WARNING, logger="ospo.attribution"):
        phi = owen(game, [[0, 1, 2], [3, 4], [5, 6]])
    assert phi.sum() == pytest.approx(total, abs=1e-10)
    assert len(game.calls) == 1
    assert owen.last_num_coalitions == len(game.calls[0])
    records = [r for r in caplog.records if r.name == "ospo.attribution"]
    assert records and records[0].levelno == logging.WARNING
    assert (
        "Monte-Carlo" in records[0].getMessage() and "max_coalitions=16" in records[0].getMessage()
    )
    again = Owen(max_coalitions=16, fallback=True, num_permutations=8, seed=1)
    np.testing.assert_array_equal(again(game, [[0, 1, 2], [3, 4], [5, 6]]), phi)


def test_exact_within_budget_is_default_12_players():
    # the default budget (4096) fits 12 segments in any structure
    game = game_from(12, lambda s: float(len(s) ** 2))
    phi = Owen()(game, [[0, 1, 2, 3], [4, 5, 6, 7, 8], [9, 10, 11]])
    assert phi.sum() == pytest.approx(144.0)
    assert len(game.calls) == 1


def test_rng_state_round_trip_resumes_the_stream():
    game = random_game(5, np.random.default_rng(17))
    method = ShapleyMC(num_permutations=4, seed=3)
    method(game, 5)
    state = method.rng.bit_generator.state
    expected = method(game, 5)
    resumed = ShapleyMC(num_permutations=4, seed=99)
    resumed.rng.bit_generator.state = state
    np.testing.assert_array_equal(resumed(game, 5), expected)
