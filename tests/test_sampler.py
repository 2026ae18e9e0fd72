"""Tests for plumbing/sampler.py: the global batch of step k is a pure function of (seed, k), every
example comes once an epoch, weights pick the datasets, ranks take disjoint slices.

Run: python -m pytest -q tests/test_sampler.py
"""

from collections import Counter

import pytest

from plumbing.sampler import BatchSampler, rank_slice


def test_sampler_deterministic_and_resumable():
    sizes = [100, 37, 64]
    first, second = BatchSampler(sizes, 8, seed=3), BatchSampler(sizes, 8, seed=3)
    steps = list(range(0, 3000, 7))
    run = [first.batch_for_step(k) for k in steps]
    assert run == [second.batch_for_step(k) for k in steps]
    # Random access (a resumed run) gives the same batches as running through.
    assert BatchSampler(sizes, 8, seed=3).batch_for_step(2999) == first.batch_for_step(2999)
    assert run != [BatchSampler(sizes, 8, seed=4).batch_for_step(k) for k in steps]
    for d, batch in run:  # one dataset per batch, no example twice in a batch
        assert 0 <= min(batch) and max(batch) < sizes[d] and len(set(batch)) == 8


@pytest.mark.parametrize("sizes, batch_size",
                         [([100, 37, 64], 8), ([10, 13], 8), ([9, 24], 8), ([5], 5)])
def test_sampler_sees_every_example_exactly_once_per_epoch(sizes, batch_size):
    """Each dataset's batches, laid end to end and cut every len(dataset) examples, are whole
    epochs: each one holds every example exactly once (no remainder is dropped), and no batch holds
    an example twice, also where a batch straddles two epochs. Random access equals running through,
    across BatchSampler.block."""
    sampler = BatchSampler(sizes, batch_size, seed=5)
    steps = 3000
    run = [sampler.batch_for_step(k) for k in range(steps)]
    streams = {d: [] for d in range(len(sizes))}
    for d, batch in run:
        assert len(batch) == batch_size and len(set(batch)) == batch_size
        streams[d].extend(batch)
    for d, stream in streams.items():
        epochs = len(stream) // sizes[d]
        assert epochs >= 3
        for e in range(epochs):
            assert sorted(stream[e * sizes[d]:(e + 1) * sizes[d]]) == list(range(sizes[d])), (d, e)
        assert stream[:sizes[d]] != stream[sizes[d]:2 * sizes[d]]  # each epoch reshuffled
    # out of order, each on a fresh sampler and on one reused
    for k in [2999, 0, 1500, 1023, 1024, 7, 2500, 3]:
        assert BatchSampler(sizes, batch_size, seed=5).batch_for_step(k) == run[k]
        assert sampler.batch_for_step(k) == run[k]


def test_sampler_epochs_and_weights():
    sampler = BatchSampler([40], 8, seed=0)
    epochs = [[sampler.batch_for_step(k)[1] for k in range(5 * e, 5 * e + 5)] for e in range(2)]
    for batches in epochs:  # an epoch is 40 // 8 = 5 disjoint batches covering the dataset
        assert sorted(i for b in batches for i in b) == list(range(40))
    assert epochs[0] != epochs[1]  # reshuffled
    # Default weights: proportional to size. Independent check on the empirical frequencies.
    counts = Counter(BatchSampler([300, 100], 4).batch_for_step(k)[0] for k in range(4000))
    assert abs(counts[0] / 4000 - 0.75) < 0.03
    assert {BatchSampler([300, 100], 4, weights=[0, 1]).batch_for_step(k)[0]
            for k in range(200)} == {1}
    with pytest.raises(ValueError,
                       match="dataset 1 has 3 examples, fewer than the global batch size 4"):
        BatchSampler([10, 3], 4)


def test_rank_slices_partition_the_global_batch():
    sampler = BatchSampler([50, 70], 12, seed=1)
    for step in range(20):
        d, batch = sampler.batch_for_step(step)
        slices = [rank_slice(batch, r, 2) for r in range(2)]
        assert slices[0] + slices[1] == batch and not set(slices[0]) & set(slices[1])
        assert rank_slice(batch, 0, 1) == batch
    assert [rank_slice(list(range(12)), r, 3) for r in range(3)] == \
        [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    with pytest.raises(ValueError, match="global batch size 12 is not divisible by world size 5"):
        rank_slice(list(range(12)), 0, 5)
    with pytest.raises(ValueError, match=r"rank 2 is not in \[0, 2\)"):
        rank_slice(list(range(12)), 2, 2)
