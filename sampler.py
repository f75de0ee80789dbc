"""Dataset-balanced distributed batch sampler.

The paper balances "all datasets in a mini-batch so each accounts for almost equal ratio". Here the unit is the
*global* batch of G = batch_size * world_size * accum_steps draws (one optimizer step), defined independently of how
it is split over processes and micro-batches:

  1. per global batch b, each source's count: floor(G * w_i), plus one for some sources, so that counts add up to G;
     a source gets the extra one with probability exactly its fractional part (systematic sampling), so its count
     averages G * w_i;
  2. each source's draws come from its own endless stream of fresh permutations (a small source is re-drawn with a
     new shuffle each time it runs out);
  3. the G draws are interleaved round-robin across sources; rank r takes the slice [r*A*B, (r+1)*A*B) and yields
     it as A = accum_steps micro-batches of B.

So the union over ranks and micro-batches of global batch b is exactly what one process with batch size G draws
(1 process x 8 micro-batches of 2 draws what 8 processes x 2 do), and each micro-batch is itself as balanced as B
allows. Everything is a pure function of (seed, epoch, sizes, weights, G); the rank, world size and accum_steps only
choose the slices. The resume position is the number of global batches consumed.
"""
import math

import numpy as np
import torch


class BalancedSampler(torch.utils.data.Sampler):
    """Batch sampler (pass as DataLoader(batch_sampler=...)): yields this rank's micro-batches of keys
    (source index, sample index, epoch, draw), draw = position of the sample in the epoch's global stream;
    accum_steps micro-batches per global batch.

    sizes: samples per source; weights: sampling weight per source (None = equal);
    batches_per_epoch: 0 = enough global batches that the source largest relative to its share is drawn ~once.
    """

    def __init__(self, sizes, weights=None, batch_size: int = 2, rank: int = 0, world_size: int = 1, seed: int = 0,
                 batches_per_epoch: int = 0, accum_steps: int = 1):
        if not sizes or min(sizes) <= 0:
            raise ValueError(f"BalancedSampler: every source needs at least one sample, got sizes {list(sizes)}")
        weights = [1.0] * len(sizes) if weights is None else [float(w) for w in weights]
        if len(weights) != len(sizes) or min(weights) <= 0:
            raise ValueError(f"BalancedSampler: need one positive weight per source, got {weights} for {len(sizes)}")
        if not 0 <= rank < world_size:
            raise ValueError(f"BalancedSampler: rank {rank} outside world size {world_size}")
        self.sizes = [int(n) for n in sizes]
        self.shares = np.asarray(weights) / sum(weights)  # (S,)
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.accum_steps = accum_steps
        self.global_batch = batch_size * world_size * accum_steps
        self.num_batches = batches_per_epoch or math.ceil(max(n / s for n, s in zip(self.sizes, self.shares))
                                                          / self.global_batch)
        self.epoch = 0
        self.consumed = 0  # global batches of this epoch the trainer has finished (advance())
        self._cache = (None, None, None)  # (epoch, counts, starts)
        self._perms = {}  # (epoch, source, round) -> permutation; only the latest rounds are kept

    # ---- the global stream, a pure function of (seed, epoch) ---------------------------------------------------------
    def _counts(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(num_batches, S) draws per source for each global batch of `epoch`, and (num_batches, S) the stream
        position of each source at the start of each batch."""
        if self._cache[0] == epoch:
            return self._cache[1], self._cache[2]
        ideal = self.global_batch * self.shares  # (S,)
        base = np.floor(ideal + 1e-9).astype(np.int64)
        extra = self.global_batch - int(base.sum())
        counts = np.tile(base, (self.num_batches, 1))  # (nb, S)
        if extra:
            # Systematic sampling, per batch: lay the fractional parts (each < 1, summing to `extra`) end to end in a
            # random order and pick the sources under the points u, u + 1, ..., u + extra - 1 (u uniform in [0, 1)).
            # A source is picked with probability exactly its fractional part, and at most once. (Weighted draws
            # without replacement, e.g. Gumbel top-k, give other inclusion probabilities once extra >= 2 and the
            # parts differ, and the counts would miss G * w_i.)
            frac = np.clip(ideal - base, 0.0, None)  # (S,)
            rng = np.random.default_rng([self.seed, epoch, 0])
            order = rng.permuted(np.tile(np.arange(len(frac)), (self.num_batches, 1)), axis=1)  # (nb, S)
            ends = np.cumsum(frac[order], axis=1)  # (nb, S), last column = extra up to rounding
            ends *= extra / ends[:, -1:]
            u = rng.random((self.num_batches, 1))  # (nb, 1)
            # points below each end, minus points below its start: 0 or 1 per source, `extra` per batch
            hits = np.ceil(ends - u) - np.ceil(np.concatenate([np.zeros((self.num_batches, 1)), ends[:, :-1]], 1) - u)
            np.add.at(counts, (np.arange(self.num_batches)[:, None], order), hits.astype(np.int64))
        starts = np.cumsum(counts, axis=0) - counts  # exclusive prefix sum
        self._cache = (epoch, counts, starts)
        return counts, starts

    def global_batch_at(self, epoch: int, b: int) -> list[tuple[int, int]]:
        """The G (source, sample) draws of global batch b, interleaved round-robin across sources."""
        counts, starts = self._counts(epoch)
        per_source = [self._stream(epoch, s, int(starts[b, s]), int(counts[b, s])) for s in range(len(self.sizes))]
        out = []
        for j in range(int(counts[b].max())):
            out.extend((s, draws[j]) for s, draws in enumerate(per_source) if j < len(draws))
        return out

    def _stream(self, epoch: int, source: int, start: int, count: int) -> list[int]:
        """Items [start, start+count) of the source's stream: concatenated fresh permutations of its samples."""
        n = self.sizes[source]
        out = []
        for p in range(start, start + count):
            k = p // n
            if (epoch, source, k) not in self._perms:
                # keep this round and the one before; drop older rounds and other epochs of this source
                self._perms = {key: v for key, v in self._perms.items()
                               if key[1] != source or (key[0] == epoch and key[2] >= k - 1)}
                self._perms[epoch, source, k] = np.random.default_rng([self.seed, epoch, 1, source, k]).permutation(n)
            out.append(int(self._perms[epoch, source, k][p % n]))
        return out

    # ---- iteration and position ---------------------------------------------------------------------------------------
    def __iter__(self):
        return self._batches(self.epoch, self.consumed)  # start captured now, not at the first next()

    def _batches(self, epoch: int, start: int):
        B, A = self.batch_size, self.accum_steps
        for b in range(start, self.num_batches):
            draws = self.global_batch_at(epoch, b)
            for m in range(A):
                first = (self.rank * A + m) * B  # this micro-batch's offset in the global batch
                yield [(s, i, epoch, b * self.global_batch + first + j)
                       for j, (s, i) in enumerate(draws[first:first + B])]

    def __len__(self) -> int:
        return (self.num_batches - self.consumed) * self.accum_steps  # micro-batches still to come this epoch

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its first batch (a no-op for the epoch a checkpoint was loaded into)."""
        if epoch != self.epoch:
            self.epoch, self.consumed = epoch, 0

    def advance(self, n: int = 1) -> None:
        """The trainer finished n more global batches. DataLoader workers prefetch ahead of the trainer, so the
        position must come from what was consumed, not from how far the iterator has run."""
        self.consumed += n

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed, "seed": self.seed, "sizes": self.sizes,
                "shares": self.shares.tolist(), "global_batch": self.global_batch, "num_batches": self.num_batches}

    def load_state_dict(self, state: dict) -> None:
        """Continue at the next global batch. The world size and accum_steps may differ from the saved run's as long
        as the global batch is the same (the stream does not depend on them)."""
        for key in ("seed", "sizes", "global_batch", "num_batches"):
            if state[key] != getattr(self, key):
                raise ValueError(f"sampler state: {key} {state[key]} differs from this run's {getattr(self, key)}")
        if not np.allclose(state["shares"], self.shares):
            raise ValueError(f"sampler state: source shares {state['shares']} differ from {self.shares.tolist()}")
        self.epoch, self.consumed = state["epoch"], state["consumed"]
