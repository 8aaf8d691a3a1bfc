"""Who computes which sequences, in which micro-batch.  Pure functions of the lengths, so every rank
(fronts and experts alike) derives the same plan without talking.

A micro-batch is a group of whole sequences (attention needs the whole prefix) whose padded size,
sequences x longest length, stays within the token budget; a sequence longer than the budget makes a
micro-batch on its own.  Step j of the exchange is every front's micro-batch j; an expert rank knows
from the plan which fronts send it a message at step j.

The plan is always made from every sequence of the input; a resumed run then drops the steps at which
every front's micro-batch is done, keeping the step numbers.  A step with any micro-batch left keeps
all of its micro-batches, the done ones too (computed again, not written: ``Prepared.replayed``):
an expert multiplies the rows of every front of a step as one matrix, and a product over fewer rows
need not round alike (a resumed run once differed from the uninterrupted one where a commit had
caught one front's micro-batch of a step and not the other's).  So a micro-batch meets the same
partners in every run of a layout, and a resumed run computes bit for bit what the uninterrupted run
computed.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def assign_fronts(lengths: np.ndarray, seqs: np.ndarray, n_fronts: int) -> list[np.ndarray]:
    """Balance sequences over fronts by tokens: longest first, each to the least-loaded front."""
    order = sorted(seqs.tolist(), key=lambda s: (-int(lengths[s]), s))
    load = [0] * n_fronts
    shares: list[list[int]] = [[] for _ in range(n_fronts)]
    for s in order:
        f = min(range(n_fronts), key=lambda i: (load[i], i))
        shares[f].append(s)
        load[f] += int(lengths[s])
    return [np.asarray(share, dtype=np.int64) for share in shares]


def pack_micro_batches(seqs: np.ndarray, lengths: np.ndarray, max_tokens: int) -> list[np.ndarray]:
    """Greedy packing of sequences (longest first, so padding stays small) into micro-batches whose
    padded size B x max(length) is at most max_tokens.  Each micro-batch is returned sorted by index."""
    order = sorted(seqs.tolist(), key=lambda s: (-int(lengths[s]), s))
    batches, current, width = [], [], 0
    for s in order:
        w = max(width, int(lengths[s]))
        if current and (len(current) + 1) * w > max_tokens:
            batches.append(np.sort(np.asarray(current, dtype=np.int64)))
            current, w = [], int(lengths[s])
        current.append(s)
        width = w
    if current:
        batches.append(np.sort(np.asarray(current, dtype=np.int64)))
    return batches


@dataclass(frozen=True)
class WorkPlan:
    per_front: list[dict[int, np.ndarray]]   # [front] {step: sequence indices}, steps increasing

    @property
    def n_fronts(self) -> int:
        return len(self.per_front)

    @property
    def steps(self) -> list[int]:
        """Every step at which some front has a micro-batch, increasing."""
        return sorted(set().union(*(mbs.keys() for mbs in self.per_front)))

    def senders(self, step: int) -> list[int]:
        """Fronts that have a micro-batch at this step (they, and only they, message the experts)."""
        return [f for f, mbs in enumerate(self.per_front) if step in mbs]

    def tokens(self, front: int, step: int, lengths: np.ndarray) -> int:
        return int(lengths[self.per_front[front][step]].sum())

    def without_done(self, done: np.ndarray) -> "WorkPlan":
        """Drop the steps at which every micro-batch's sequences are all done; the rest keep their step
        numbers and all their micro-batches (see the module's docstring)."""
        left = {j for mbs in self.per_front for j, seqs in mbs.items() if not done[seqs].all()}
        return WorkPlan([{j: seqs for j, seqs in mbs.items() if j in left} for mbs in self.per_front])


def make_plan(lengths: np.ndarray, n_fronts: int, max_tokens: int, done: np.ndarray | None = None) -> WorkPlan:
    """The plan for every sequence, less the micro-batches ``done`` marks complete."""
    if max_tokens < 1:
        raise ValueError(f"micro-batch tokens must be >= 1, got {max_tokens}")
    shares = assign_fronts(lengths, np.arange(len(lengths)), n_fronts)
    plan = WorkPlan([dict(enumerate(pack_micro_batches(share, lengths, max_tokens))) for share in shares])
    return plan if done is None else plan.without_done(done)
