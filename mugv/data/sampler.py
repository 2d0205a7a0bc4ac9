"""Token-budget packing sampler, balanced across data-parallel ranks.

The MUG-V paper (arXiv 2510.17519, Sec. 4) trains on clips of mixed resolution and length
packed into sequences of a fixed token budget, with "balanced sampling" so that every
data-parallel rank gets about the same amount of work per step; the public code does not
include it. This is our implementation:

1. Each epoch visits every clip exactly once, in an order drawn from ``(seed, epoch)``.
2. Clips are taken in that order and placed on the least-loaded rank of the current
   *global step* (``num_replicas`` bins of ``token_budget`` tokens each). When a clip fits
   on no rank, the step is topped up with the clips among the next ``lookahead`` that
   still fit, then closed, and a new one starts with that clip.
3. A closed step is rebalanced with the longest-processing-time rule (clips sorted by
   size, each to the least-loaded rank) when that keeps every bin within the budget.
4. Only the last step of an epoch can leave a rank empty; it is then padded with the
   smallest clips of the epoch (as ``DistributedSampler`` pads), or dropped with
   ``drop_last=True``.

With ``groups`` (e.g. the preprocessed directory of each clip) and ``group_weights``, the
order of step 1 is a weighted draw instead of a permutation: an epoch is ``len(clips)``
draws, each picking a group with probability proportional to its weight (``torch.multinomial``
on a generator seeded by ``(seed, epoch)``), then the group's next clip in a permutation of
its members (redrawn for every pass through the group, seeded by ``(seed, epoch, group,
pass)``). A group is then drawn at its weight whatever its size: small groups repeat within
an epoch, large ones are subsampled. Steps 2-4 are unchanged.

Every rank computes the same plan from the seed, so no communication is needed, and the
state (``seed``, ``epoch``, ``step``) is three integers saved with the checkpoint.
A rank's clips are packed into one sequence with ``cu_seqlens`` by the trainer.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from mugv.config import ConfigError

__all__ = ["PackedStep", "PackingSampler"]


@dataclass(frozen=True)
class PackedStep:
    """One global step of the plan.

    Attributes:
        epoch: epoch index.
        step: step index within the epoch.
        per_rank: ``num_replicas`` lists of clip indices (each list packs into one sequence).
        indices: this rank's clip indices (``per_rank[rank]``).
        tokens: this rank's token count.
        global_tokens: token count over all ranks (the loss normalizer).
    """

    epoch: int
    step: int
    per_rank: tuple[tuple[int, ...], ...]
    indices: tuple[int, ...]
    tokens: int
    global_tokens: int


class PackingSampler:
    """Packs clips into per-rank sequences of at most ``token_budget`` tokens.

    Args:
        num_tokens: tokens of each clip (``len(num_tokens)`` clips), e.g. latent
            ``T * H/p * W/p`` (+ start/end tokens). Each must be in ``[1, token_budget]``.
        token_budget: the most tokens one rank processes per step.
        num_replicas: data-parallel world size (default 1).
        rank: this rank (``0 <= rank < num_replicas``).
        seed: seed of the per-epoch clip order; the plan depends on nothing else.
        shuffle: draw a new order each epoch (False: the index order every epoch).
        drop_last: drop a final step that would leave a rank empty instead of padding it.
        lookahead: when the next clip does not fit, the step is first topped up with the
            fitting clips among the next ``lookahead`` ones (better fill, same coverage).
        groups: the group (``0 .. G-1``) of each clip, for weighted sampling (None: every
            epoch visits each clip once).
        group_weights: ``G`` sampling weights (>= 0, not all 0; normalized), with ``groups``.

    Raises:
        ConfigError: empty ``num_tokens``, a clip longer than the budget or shorter than 1,
            bad ``rank``/``num_replicas``, fewer clips than ranks; ``groups`` not one int in
            ``[0, G)`` per clip, ``group_weights`` negative, all 0, or a positive weight on a
            group without clips.

    Iterating yields :class:`PackedStep` forever (epoch after epoch) from the saved position.
    """

    def __init__(
        self,
        num_tokens: Sequence[int],
        token_budget: int,
        *,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        lookahead: int = 16,
        groups: Sequence[int] | None = None,
        group_weights: Sequence[float] | None = None,
    ) -> None:
        sizes = [int(n) for n in num_tokens]
        if not sizes:
            raise ConfigError("PackingSampler: num_tokens is empty (no clips)")
        if token_budget < 1:
            raise ConfigError(f"PackingSampler: token_budget must be >= 1, got {token_budget}")
        bad = [i for i, n in enumerate(sizes) if n < 1 or n > token_budget]
        if bad:
            i = bad[0]
            raise ConfigError(
                f"PackingSampler: clip {i} has {sizes[i]} tokens, outside [1, token_budget={token_budget}] "
                f"({len(bad)} such clips); raise the budget or drop long clips"
            )
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ConfigError(f"PackingSampler: expected 0 <= rank < num_replicas, got rank={rank}, {num_replicas=}")
        if len(sizes) < num_replicas:
            raise ConfigError(f"PackingSampler: {len(sizes)} clips cannot feed {num_replicas} ranks")
        self.sizes = sizes
        self.token_budget = int(token_budget)
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = int(seed)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.lookahead = max(0, int(lookahead))
        self.groups: list[int] | None = None
        self.group_weights: list[float] | None = None
        if (groups is None) != (group_weights is None):
            raise ConfigError("PackingSampler: groups and group_weights go together")
        if groups is not None:
            w = [float(x) for x in group_weights]
            gs = [int(x) for x in groups]
            if len(gs) != len(sizes) or any(not 0 <= x < len(w) for x in gs):
                raise ConfigError(f"PackingSampler: groups must give one group in [0, {len(w)}) per clip "
                                  f"({len(sizes)} clips), got {len(gs)} entries")
            if any(not x >= 0 for x in w) or sum(w) <= 0:
                raise ConfigError(f"PackingSampler: group_weights must be >= 0 and not all 0, got {w}")
            members = [[c for c, x in enumerate(gs) if x == j] for j in range(len(w))]
            empty = [j for j, m in enumerate(members) if w[j] > 0 and not m]
            if empty:
                raise ConfigError(f"PackingSampler: groups {empty} have a positive weight but no clips")
            total = sum(w)
            self.groups, self.group_weights, self._members = gs, [x / total for x in w], members
        self.epoch = 0
        self.step = 0  # next step within self.epoch
        self._plan_cache: tuple[int, list[tuple[tuple[int, ...], ...]]] | None = None

    # -- planning ---------------------------------------------------------------------
    def order(self, epoch: int) -> list[int]:
        """The clip visiting order of ``epoch``: a permutation drawn from ``seed + epoch``, or
        with groups ``len(clips)`` weighted draws (module docstring)."""
        if self.groups is not None:
            return self._weighted_order(epoch)
        if not self.shuffle:
            return list(range(len(self.sizes)))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.sizes), generator=g).tolist()

    def _weighted_order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        picks = torch.multinomial(torch.tensor(self.group_weights, dtype=torch.float64), len(self.sizes),
                                  replacement=True, generator=g).tolist()
        used = [0] * len(self._members)
        perms: dict[int, list[int]] = {}
        out = []
        for j in picks:
            members = self._members[j]
            n_pass, r = divmod(used[j], len(members))
            used[j] += 1
            if r == 0:  # a new pass through group j: a new permutation of its members
                if self.shuffle:
                    gp = torch.Generator().manual_seed(
                        (self.seed * 1_000_003 + epoch) * 7_919 + j * 104_729 + n_pass * 15_485_863)
                    perms[j] = torch.randperm(len(members), generator=gp).tolist()
                else:
                    perms[j] = list(range(len(members)))
            out.append(members[perms[j][r]])
        return out

    def _balance(self, clips: list[int]) -> tuple[tuple[int, ...], ...]:
        """LPT assignment of ``clips`` to ranks (falls back to the greedy one if it overflows)."""
        heap = [(0, r) for r in range(self.num_replicas)]
        bins: list[list[int]] = [[] for _ in range(self.num_replicas)]
        for c in sorted(clips, key=lambda c: (-self.sizes[c], c)):
            load, r = heapq.heappop(heap)
            bins[r].append(c)
            heapq.heappush(heap, (load + self.sizes[c], r))
        if max(load for load, _ in heap) > self.token_budget:
            return ()
        return tuple(tuple(b) for b in bins)

    def plan(self, epoch: int) -> list[tuple[tuple[int, ...], ...]]:
        """All steps of ``epoch``: a list of ``num_replicas``-tuples of clip-index tuples."""
        if self._plan_cache is not None and self._plan_cache[0] == epoch:
            return self._plan_cache[1]
        r_n, budget = self.num_replicas, self.token_budget
        steps: list[tuple[tuple[int, ...], ...]] = []
        bins: list[list[int]] = [[] for _ in range(r_n)]
        loads = [0] * r_n

        def close() -> None:
            clips = [c for b in bins for c in b]
            if clips:
                steps.append(self._balance(clips) or tuple(tuple(b) for b in bins))

        pending = list(self.order(epoch))
        pos = 0

        def least() -> int:
            return min(range(r_n), key=lambda i: (loads[i], i))

        while pos < len(pending):
            c = pending[pos]
            r = least()
            if loads[r] + self.sizes[c] > budget:
                # Fill the step from the next few clips that still fit, then close it.
                j = pos + 1
                while j < min(pos + 1 + self.lookahead, len(pending)):
                    c2, r2 = pending[j], least()
                    if loads[r2] + self.sizes[c2] <= budget:
                        bins[r2].append(c2)
                        loads[r2] += self.sizes[c2]
                        pending.pop(j)
                    else:
                        j += 1
                close()
                bins, loads = [[] for _ in range(r_n)], [0] * r_n
                r = 0
            bins[r].append(c)
            loads[r] += self.sizes[c]
            pos += 1
        close()
        last = steps[-1]
        if any(len(b) == 0 for b in last):
            if self.drop_last and len(steps) > 1:
                steps.pop()
            else:  # pad the empty ranks with the smallest clips (any epoch order is fine)
                pool = range(len(self.sizes)) if self.groups is None else \
                    [c for c in range(len(self.sizes)) if self.group_weights[self.groups[c]] > 0]
                fill = sorted(pool, key=lambda c: (self.sizes[c], c))
                padded, k = [list(b) for b in last], 0
                for b in padded:
                    if not b:
                        b.append(fill[k % len(fill)])
                        k += 1
                steps[-1] = tuple(tuple(b) for b in padded)
        self._plan_cache = (epoch, steps)
        return steps

    # -- iteration ------------------------------------------------------------------------
    def next_step(self) -> PackedStep:
        """The next global step (advances the position; rolls over to the next epoch)."""
        plan = self.plan(self.epoch)
        if self.step >= len(plan):
            self.epoch, self.step = self.epoch + 1, 0
            plan = self.plan(self.epoch)
        per_rank = plan[self.step]
        out = PackedStep(
            epoch=self.epoch,
            step=self.step,
            per_rank=per_rank,
            indices=per_rank[self.rank],
            tokens=sum(self.sizes[c] for c in per_rank[self.rank]),
            global_tokens=sum(self.sizes[c] for b in per_rank for c in b),
        )
        self.step += 1
        return out

    def __iter__(self) -> Iterator[PackedStep]:
        while True:
            yield self.next_step()

    # -- checkpointing ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Position and the settings the plan depends on (plain ints/bools)."""
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "step": self.step,
            "num_replicas": self.num_replicas,
            "token_budget": self.token_budget,
            "num_clips": len(self.sizes),
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
            "group_weights": self.group_weights,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore the position saved by :meth:`state_dict`.

        Raises:
            ConfigError: the saved plan settings (world size, budget, clip count, shuffle,
                drop_last, group weights) differ from this sampler's, so the position would mean other clips.
        """
        for key in ("num_replicas", "token_budget", "num_clips", "shuffle", "drop_last", "group_weights"):
            mine = self.state_dict()[key]
            if key in state and state[key] != mine:
                raise ConfigError(
                    f"PackingSampler.load_state_dict: checkpoint has {key}={state[key]}, this run has {mine}; "
                    "resume with the same data and world size"
                )
        self.seed, self.epoch, self.step = int(state["seed"]), int(state["epoch"]), int(state["step"])
        self._plan_cache = None
