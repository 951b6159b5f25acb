"""ospo.module.PromptSchedule and step_seed: which prompts each rank trains on, and seeding."""

import itertools
from collections import Counter

import numpy as np
import pytest

from ospo.data import Sample
from ospo.step import PromptSchedule, step_seed

B, WORLD = 3, 2
N_TRAIN = 24  # divisible by B * WORLD: one epoch = 4 steps


def _split(n=N_TRAIN):
    return [
        Sample(qid=f"q{i:02d}", request=f"request {i}", messages=[], gains={f"p{i}": 1.0})
        for i in range(n)
    ]


def _qids(schedule, step):
    return [s.qid for s in schedule(step)]


def _ranks(samples, seed=0, batch=B, world=WORLD):
    return [PromptSchedule(samples, batch, seed, rank=r, world=world) for r in range(world)]


def test_ranks_never_share_a_prompt_within_a_step():
    for n in (N_TRAIN, 25):  # also across an epoch boundary (25 is not divisible by 6)
        ranks = _ranks(_split(n))
        for step in range(20):
            per_rank = [_qids(r, step) for r in ranks]
            assert all(len(q) == B for q in per_rank)
            assert not set(per_rank[0]) & set(per_rank[1]), (n, step, per_rank)


def test_one_epoch_covers_the_split_exactly_once():
    samples = _split()
    ranks = _ranks(samples)
    steps_per_epoch = N_TRAIN // (B * WORLD)
    epochs = []
    for epoch in range(3):
        steps = range(epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch)
        seen = [q for step in steps for r in ranks for q in _qids(r, step)]
        assert Counter(seen) == Counter(s.qid for s in samples), epoch
        epochs.append(seen)
    assert epochs[0] != epochs[1] != epochs[2]  # a fresh permutation each epoch
    # the samples themselves are handed out, not copies
    assert all(s in samples for s in ranks[1](0))


def test_ranks_take_consecutive_batches_of_one_sequence():
    """Step s on rank r = positions (s * world + r) * B ... of the single-process sequence."""
    samples = _split(25)
    single = PromptSchedule(samples, B, seed=3)
    ranks = _ranks(samples, seed=3)
    for step in range(12):
        for r, sched in enumerate(ranks):
            assert _qids(sched, step) == _qids(single, step * WORLD + r)


def test_schedule_is_a_pure_function_of_seed_step_rank():
    samples = _split(25)
    steps = list(range(15))
    reference = {(r, s): _qids(sched, s) for r, sched in enumerate(_ranks(samples)) for s in steps}
    rng = np.random.default_rng(0)
    order = list(itertools.product(range(WORLD), steps))
    rng.shuffle(order)
    fresh = _ranks(samples)  # new objects, called out of order (a resumed run starts mid-way)
    for r, s in order:
        assert _qids(fresh[r], s) == reference[(r, s)]
        assert _qids(_ranks(samples)[r], s) == reference[(r, s)]  # a brand-new one per call
    assert len({tuple(v) for v in reference.values()}) > 1


def test_seeds_give_different_orders():
    samples = _split()
    first_epoch = {}
    for seed in range(4):
        ranks = _ranks(samples, seed=seed)
        first_epoch[seed] = [q for step in range(4) for r in ranks for q in _qids(r, step)]
        assert sorted(first_epoch[seed]) == sorted(s.qid for s in samples)
    assert len({tuple(v) for v in first_epoch.values()}) == 4


def test_empty_split_is_refused():
    with pytest.raises(ValueError, match="empty"):
        PromptSchedule([], B, seed=0)


def test_step_seed():
    assert step_seed(0, 5, 1) == step_seed(0, 5, 1)  # deterministic
    assert step_seed(0, 5) == step_seed(0, 5, 0)  # rank 0 by default
    grid = {
        (seed, step, rank): step_seed(seed, step, rank)
        for seed in range(3)
        for step in range(20)
        for rank in range(4)
    }
    assert len(set(grid.values())) == len(grid)  # differs by seed, step and rank
    assert all(isinstance(v, int) and 0 <= v < 2**64 for v in grid.values())  # torch.manual_seed
    assert step_seed(0, 1, 0) != step_seed(0, 0, 1)  # not a function of step + rank
    assert step_seed(1, 0, 0) != step_seed(0, 1, 0)


def test_pinned_values():
    """Pinned seeds and prompts: a run resumed from an older checkpoint, or repeated with the
    same seed, samples the same rollouts only if these stay as they are."""
    assert [step_seed(0, 0, 0), step_seed(0, 1, 0), step_seed(0, 0, 1), step_seed(7, 3, 1)] == [
        2968811710,
        3964924996,
        3831201730,
        1060801321,
    ]
    ranks = _ranks(_split(), seed=0)
    assert [_qids(r, 0) for r in ranks] == [["q18", "q04", "q21"], ["q10", "q11", "q02"]]
    assert [_qids(r, 4) for r in ranks] == [["q11", "q17", "q19"], ["q16", "q20", "q14"]]
