"""Which examples make each step's global batch: a pure function of (seed, step), resumable on any
number of ranks (data.py states the rule; train.py draws from it). Tests: tests/test_data.py."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


class BatchSampler:
    """Which dataset and examples make the global batch of step k: a pure function of (seed, k), not
    of the world size, so a run resumed at step k on any number of ranks sees the same batches. Step
    k picks dataset d with probability weights[d] (default: proportional to size). d's j-th batch (j
    = earlier steps that picked d) is positions j*B .. (j+1)*B - 1 of its epoch orders laid end to
    end, each a permutation of d: every epoch holds every example once, nothing is dropped. A batch
    straddling two epochs takes the next one's first examples among those not in the previous one's
    tail (`_shuffle`), so no batch holds an example twice."""

    # dataset choices are drawn in blocks of steps, so reaching step k costs O(k / block)
    block = 1024

    def __init__(self, datasets: Sequence[Any], global_batch_size: int, seed: int = 0,
                 weights: Sequence[float] | None = None):
        self.sizes = [len(d) if hasattr(d, "__len__") else int(d) for d in datasets]
        self.batch_size, self.seed = global_batch_size, seed
        if not self.sizes or global_batch_size < 1:
            raise ValueError("need at least one dataset and a positive batch size, got "
                             f"{self.sizes}, {global_batch_size}")
        for d, size in enumerate(self.sizes):
            if size < global_batch_size:
                raise ValueError(f"dataset {d} has {size} examples, fewer than the global batch "
                                 f"size {global_batch_size}")
        weights = np.asarray(self.sizes if weights is None else weights, dtype=np.float64)
        if weights.shape != (len(self.sizes),) or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"weights must be {len(self.sizes)} non-negative numbers, not all "
                             f"zero: {weights}")
        self.weights = weights / weights.sum()
        self._choices: list[np.ndarray] = []  # per block of steps: the dataset each step picks
        # per block of steps: how many earlier steps picked the same dataset
        self._counts: list[np.ndarray] = []
        # picks per dataset in the blocks drawn so far
        self._picked = np.zeros(len(self.sizes), dtype=np.int64)
        # dataset -> {epoch: its order}, the last two built
        self._orders: dict[int, dict[int, np.ndarray]] = {}

    def _block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        while len(self._choices) <= b:
            rng = np.random.default_rng([self.seed, 1, len(self._choices)])
            choices = rng.choice(len(self.sizes), size=self.block, p=self.weights)  # (block,)
            counts = np.empty(self.block, dtype=np.int64)  # (block,)
            for d in range(len(self.sizes)):
                picks = choices == d
                counts[picks] = self._picked[d] + np.arange(picks.sum())
                self._picked[d] += picks.sum()
            self._choices.append(choices)
            self._counts.append(counts)
        return self._choices[b], self._counts[b]

    def _shuffle(self, d: int, epoch: int, previous: np.ndarray | None) -> np.ndarray:
        """Epoch `epoch` of dataset d, (size,), given the previous epoch's order (None where this
        epoch starts a batch). Its first batch holds `offset` examples of the previous epoch's end
        and the first B - offset of a fresh permutation that are not among them; every other example
        keeps the permutation's order."""
        size = self.sizes[d]
        order = np.random.default_rng([self.seed, 2, d, epoch]).permutation(size)  # (size,)
        offset = epoch * size % self.batch_size
        if offset == 0:
            return order
        in_tail = np.zeros(size, dtype=bool)
        in_tail[previous[size - offset:]] = True
        # size - offset >= B - offset candidates
        head = order[~in_tail[order]][:self.batch_size - offset]
        in_head = np.zeros(size, dtype=bool)
        in_head[head] = True
        return np.concatenate([head, order[~in_head[order]]])

    def _epoch_order(self, d: int, epoch: int) -> np.ndarray:
        """Dataset d's order in this epoch. It depends on the previous epoch's tail, and so on back
        to the last epoch that began on a batch boundary: epoch * size is a multiple of B every B /
        gcd(size, B) epochs. So reaching an epoch costs at most that many shuffles; running through,
        one per epoch (the last two are kept)."""
        built = self._orders.setdefault(d, {})
        if epoch not in built:
            cycle = self.batch_size // int(np.gcd(self.sizes[d], self.batch_size))
            first = epoch - epoch % cycle  # starts on a batch boundary: needs no previous epoch
            if epoch > first and epoch - 1 in built:
                # running through: continue from the previous epoch
                e, order = epoch - 1, built[epoch - 1]
            else:
                # random access (a resumed run): rebuild from the cycle's start
                e, order = first - 1, None
            while e < epoch:
                e, previous = e + 1, order
                order = self._shuffle(d, e, previous)
            self._orders[d] = {epoch: order} if previous is None else {epoch - 1: previous,
                                                                       epoch: order}
        return self._orders[d][epoch]

    def batch_for_step(self, step: int) -> tuple[int, list[int]]:
        """(dataset index, the global batch's example indices) for this step."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        b, offset = divmod(step, self.block)
        choices, counts = self._block(b)
        d, j = int(choices[offset]), int(counts[offset])  # step is dataset d's j-th batch
        # where the batch starts in d's epochs
        epoch, within = divmod(j * self.batch_size, self.sizes[d])
        batch = self._epoch_order(d, epoch)[within:within + self.batch_size]
        if len(batch) < self.batch_size:  # it straddles two epochs (B <= size: never more)
            batch = np.concatenate([batch,
                                    self._epoch_order(d, epoch + 1)[:self.batch_size - len(batch)]])
        return d, batch.tolist()


def rank_slice(batch: Sequence[int], rank: int, world_size: int) -> list[int]:
    """Rank r's contiguous share of a global batch: the shares are disjoint and their union is the
    batch."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    if len(batch) % world_size:
        raise ValueError(f"global batch size {len(batch)} is not divisible by world size "
                         f"{world_size}")
    per_rank = len(batch) // world_size
    return list(batch[rank * per_rank:(rank + 1) * per_rank])
