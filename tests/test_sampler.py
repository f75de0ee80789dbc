"""BalancedSampler invariants: balance, world-size independence of global batches, distinct draws per rank,
fresh reshuffles of small sources, purity in (seed, epoch, rank, world size), exact resume."""
import itertools
from collections import Counter

import numpy as np
import pytest

from sampler import BalancedSampler

SIZES = [5, 37, 200]  # uneven: one tiny, one small, one large source


def run(sampler):
    return [list(batch) for batch in sampler]


@pytest.mark.parametrize("world", [1, 2, 8])
def test_union_over_ranks_is_the_single_process_global_batch(world):
    G = 24
    single = run(BalancedSampler(SIZES, batch_size=G, seed=5))
    ranks = [run(BalancedSampler(SIZES, batch_size=G // world, rank=r, world_size=world, seed=5))
             for r in range(world)]
    assert all(len(r) == len(single) for r in ranks)
    for b, global_batch in enumerate(single):
        union = [key for r in range(world) for key in ranks[r][b]]
        assert union == global_batch  # same draws, same draw ids, in rank order
        draws = [key[3] for key in union]
        assert len(set(draws)) == G  # every draw goes to exactly one rank
        # distinct samples within a pass over a source: the largest source (8 of 200 per batch, passes aligned with
        # batches) never repeats; a tiny source (8 draws of 5) must, and a pass boundary inside a batch may
        large = [i for s, i, _, _ in union if s == 2]
        assert len(set(large)) == len(large) == 8


@pytest.mark.parametrize("world,accum", [(1, 8), (2, 4), (4, 2)])
def test_micro_batches_draw_what_a_larger_world_draws(world, accum):
    """Per optimizer step, `world` processes x `accum` micro-batches of 2 draw exactly what 8 processes x 2 draw: the
    same samples with the same draw ids (so the same augmentation); micro-batch m of rank r is rank r*accum + m's."""
    eight = [run(BalancedSampler(SIZES, batch_size=2, rank=r, world_size=8, seed=4)) for r in range(8)]
    for r in range(world):
        mine = run(BalancedSampler(SIZES, batch_size=2, rank=r, world_size=world, seed=4, accum_steps=accum))
        assert len(mine) == len(eight[0]) * accum
        for m in range(accum):
            assert mine[m::accum] == eight[r * accum + m]


@pytest.mark.parametrize("world", [1, 2, 8])
def test_every_global_batch_is_balanced(world):
    G = 24
    for r in range(world):
        for batch in BalancedSampler(SIZES, batch_size=G // world, rank=r, world_size=world):
            assert len(batch) == G // world
    for batch in BalancedSampler(SIZES, batch_size=G):
        assert Counter(s for s, *_ in batch) == {0: 8, 1: 8, 2: 8}
    # each rank's own batch is as balanced as its size allows (round-robin interleave)
    for batch in BalancedSampler(SIZES, batch_size=6, rank=1, world_size=4):
        assert Counter(s for s, *_ in batch) == {0: 2, 1: 2, 2: 2}


def test_near_equal_when_batch_does_not_divide_and_weights_respected():
    counts = np.array([[sum(1 for s, *_ in batch if s == k) for k in range(3)]
                       for batch in BalancedSampler(SIZES, batch_size=4, batches_per_epoch=3000)])
    assert set(counts.sum(1)) == {4} and counts.min() >= 1 and counts.max() <= 2  # 4 = 1 + 1 + 1 + one extra
    assert np.allclose(counts.mean(0), 4 / 3, atol=0.05)
    weighted = np.array([[sum(1 for s, *_ in batch if s == k) for k in range(3)]
                         for batch in BalancedSampler(SIZES, weights=[1, 1, 2], batch_size=5, batches_per_epoch=3000)])
    assert np.allclose(weighted.mean(0), [1.25, 1.25, 2.5], atol=0.05)


def test_small_sources_are_redrawn_with_fresh_shuffles():
    draws = [i for batch in BalancedSampler(SIZES, batch_size=6, seed=1) for s, i, *_ in batch if s == 0]
    rounds = [tuple(draws[k:k + 5]) for k in range(0, len(draws) - 4, 5)]
    assert len(rounds) >= 10
    assert all(sorted(r) == list(range(5)) for r in rounds)  # each pass is a permutation
    assert len(set(rounds)) > len(rounds) // 2  # and passes are shuffled afresh
    large = [i for batch in BalancedSampler(SIZES, batch_size=6, seed=1) for s, i, *_ in batch if s == 2]
    assert len(large) >= 200 and sorted(large[:200]) == list(range(200))  # the largest source: once per epoch


def test_order_is_a_pure_function_of_seed_epoch_rank_world():
    def keys(seed, epoch, rank=0, world=2):
        s = BalancedSampler(SIZES, batch_size=3, rank=rank, world_size=world, seed=seed)
        s.set_epoch(epoch)
        return run(s)
    assert keys(0, 0) == keys(0, 0)
    assert keys(0, 0) != keys(0, 1) and keys(0, 0) != keys(1, 0) and keys(0, 0, rank=0) != keys(0, 0, rank=1)
    assert all(e == 3 for batch in keys(0, 3) for _, _, e, _ in batch)  # the epoch rides in the key


@pytest.mark.parametrize("world,new_world", [(1, 1), (2, 2), (8, 8), (2, 4)])
def test_resume_mid_epoch_continues_with_the_next_batch(world, new_world):
    G = 8

    def sampler(rank, w):
        s = BalancedSampler(SIZES, batch_size=G // w, rank=rank, world_size=w, seed=2)
        s.set_epoch(1)
        return s
    uninterrupted = [run(sampler(r, new_world)) for r in range(new_world)]
    # a run of `world` ranks consumes 7 batches, checkpoints (the state is the same on every rank), and stops
    first = sampler(0, world)
    it = iter(first)
    for _ in range(7):
        next(it)
        first.advance()
    next(it)  # a prefetched batch that was never trained on must not count
    state = first.state_dict()
    for r in range(new_world):
        resumed = BalancedSampler(SIZES, batch_size=G // new_world, rank=r, world_size=new_world, seed=2)
        resumed.load_state_dict(state)
        resumed.set_epoch(1)  # the trainer's per-epoch call must not rewind a resumed epoch
        assert len(resumed) == len(uninterrupted[r]) - 7
        assert run(resumed) == uninterrupted[r][7:]
    # after the resumed epoch, the next epoch starts from its first batch
    resumed.set_epoch(2)
    full = sampler(new_world - 1, new_world)
    full.set_epoch(2)
    assert run(resumed) == run(full)


def test_resume_with_another_split_of_the_same_global_batch():
    # 8 processes x 2 checkpoint after 5 global batches; 1 process x 8 micro-batches of 2 continues with the sixth
    first = BalancedSampler(SIZES, batch_size=2, rank=3, world_size=8, seed=2)
    it = iter(first)
    for _ in range(5):
        next(it)
        first.advance()
    resumed = BalancedSampler(SIZES, batch_size=2, seed=2, accum_steps=8)
    resumed.load_state_dict(first.state_dict())
    whole = run(BalancedSampler(SIZES, batch_size=2, seed=2, accum_steps=8))
    assert len(resumed) == len(whole) - 5 * 8
    assert run(resumed) == whole[5 * 8:]


def test_state_mismatch_is_refused():
    state = BalancedSampler(SIZES, batch_size=4, seed=0).state_dict()
    with pytest.raises(ValueError, match="sizes"):
        BalancedSampler([5, 37, 201], batch_size=4).load_state_dict(state)
    with pytest.raises(ValueError, match="global_batch"):
        BalancedSampler(SIZES, batch_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        BalancedSampler(SIZES, batch_size=4, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="rank 2 outside world size 2"):
        BalancedSampler(SIZES, rank=2, world_size=2)


def test_epoch_length_covers_the_largest_source_relative_to_its_share():
    assert len(BalancedSampler(SIZES, batch_size=6)) == 100  # 200 / (1/3) / 6
    assert len(BalancedSampler(SIZES, weights=[1, 1, 2], batch_size=4)) == 100  # 200 / (1/2) / 4
    assert list(itertools.islice(BalancedSampler([3], batch_size=2), 1))[0] != []


def test_unequal_weights_with_several_leftover_slots_average_to_the_promised_counts():
    # G * w = 7 * [1, 2.5, 0.5, 1.5] / 5.5 = [1.27, 3.18, 0.64, 1.91]: floors [1, 3, 0, 1] leave 2 slots for 4 unequal
    # fractional parts, where draws weighted by the parts (Gumbel top-k) gave the last source 1.786 on average
    weights = [1, 2.5, 0.5, 1.5]
    sampler = BalancedSampler([40, 10, 25, 60], weights=weights, batch_size=7, batches_per_epoch=3000)
    counts = np.array([[sum(1 for s, *_ in batch if s == k) for k in range(4)] for batch in sampler])  # (3000, 4)
    ideal = 7 * np.array(weights) / sum(weights)
    assert (counts.sum(1) == 7).all()
    assert ((counts == np.floor(ideal)) | (counts == np.ceil(ideal))).all()  # each batch as balanced as it can be
    frac = ideal - np.floor(ideal)
    standard_error = np.sqrt(frac * (1 - frac) / len(counts))  # per-batch extras are independent Bernoulli(frac)
    assert (np.abs(counts.mean(0) - ideal) < 4 * standard_error).all(), (counts.mean(0), ideal)
