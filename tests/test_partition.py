"""The work plan and the rank layout, on one process: hand-worked cases, then properties over random
lengths, fronts and budgets checked against independent references (a heap-based LPT, and the
contiguous-greedy characterisation of the packing)."""
from __future__ import annotations

import heapq
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_mpi.config import ModelConfig
from moe_mpi.parallel.partition import WorkPlan, assign_fronts, make_plan, pack_micro_batches
from moe_mpi.parallel.topology import Layout, Role, check_world_size

TINY = ModelConfig.load("tiny")     # 1 dense + 2 MoE layers x 4 experts
PAPER = ModelConfig.load("paper")   # 3 dense + 58 MoE layers x 256 experts

# The worked example used throughout: sequence index -> length.
LENGTHS = np.array([5, 3, 8, 1, 4])


def as_lists(arrays) -> list[list[int]]:
    return [a.tolist() for a in arrays]


def plan_as_lists(plan: WorkPlan) -> list[dict[int, list[int]]]:
    return [{j: seqs.tolist() for j, seqs in mbs.items()} for mbs in plan.per_front]


# --- assign_fronts: longest first, each to the least-loaded front, ties to the lowest front ---
def test_assign_fronts_worked_example():
    # Longest first: seq 2 (8), 0 (5), 4 (4), 1 (3), 3 (1).
    #   seq 2 -> loads [0, 0]  tie, front 0  -> [8, 0]
    #   seq 0 -> loads [8, 0]  front 1       -> [8, 5]
    #   seq 4 -> loads [8, 5]  front 1       -> [8, 9]
    #   seq 1 -> loads [8, 9]  front 0       -> [11, 9]
    #   seq 3 -> loads [11, 9] front 1       -> [11, 10]
    shares = assign_fronts(LENGTHS, np.arange(5), 2)
    assert as_lists(shares) == [[2, 1], [0, 4, 3]]          # in the order they were assigned
    assert [int(LENGTHS[s].sum()) for s in shares] == [11, 10]
    assert all(s.dtype == np.int64 for s in shares)


def test_assign_fronts_ties_go_to_lowest_index_and_front():
    # All lengths equal: the order is by index, and every tie of loads goes to the lowest front.
    shares = assign_fronts(np.array([2, 2, 2, 2, 2]), np.arange(5), 3)
    assert as_lists(shares) == [[0, 3], [1, 4], [2]]


def test_assign_fronts_more_fronts_than_sequences_and_subset():
    shares = assign_fronts(LENGTHS, np.array([4, 1]), 3)     # only sequences 4 and 1 are assigned
    assert as_lists(shares) == [[4], [1], []]
    assert shares[2].dtype == np.int64


def test_assign_fronts_one_front_is_longest_first():
    assert as_lists(assign_fronts(LENGTHS, np.arange(5), 1)) == [[2, 0, 4, 1, 3]]


# --- pack_micro_batches: padded size B x longest <= budget; an over-long sequence alone ---
def test_pack_worked_example_front_1():
    # Front 1 holds seqs 0 (5), 4 (4), 3 (1); budget 8.
    #   [0]: 1 x 5 = 5; adding 4 gives 2 x 5 = 10 > 8 -> close [0]
    #   [4]: 1 x 4 = 4; adding 3 gives 2 x 4 = 8 <= 8 -> [4, 3], returned sorted [3, 4]
    assert as_lists(pack_micro_batches(np.array([0, 4, 3]), LENGTHS, 8)) == [[0], [3, 4]]
    # Budget 10: [0, 4] is 2 x 5 = 10; adding 3 gives 3 x 5 = 15 > 10.
    assert as_lists(pack_micro_batches(np.array([0, 4, 3]), LENGTHS, 10)) == [[0, 4], [3]]
    # Budget 15: all three, 3 x 5.
    assert as_lists(pack_micro_batches(np.array([0, 4, 3]), LENGTHS, 15)) == [[0, 3, 4]]
    # Budget 14: one short of 3 x 5.
    assert as_lists(pack_micro_batches(np.array([0, 4, 3]), LENGTHS, 14)) == [[0, 4], [3]]


def test_pack_over_long_sequence_goes_alone():
    # Budget 6, longest first 2 (8), 0 (5), 4 (4), 1 (3), 3 (1): seq 2 exceeds the budget by itself
    # and goes alone; pairs led by 5 or 4 cost 2 x 5 = 10 and 2 x 4 = 8 > 6; [1, 3] costs 2 x 3 = 6.
    assert as_lists(pack_micro_batches(np.arange(5), LENGTHS, 6)) == [[2], [0], [4], [1, 3]]
    # Budget 1: only length-1 sequences fit; every sequence is alone.
    assert as_lists(pack_micro_batches(np.arange(5), LENGTHS, 1)) == [[2], [0], [4], [1], [3]]


def test_pack_whole_input_and_ties():
    # All five, budget 40 = 5 x 8: one micro-batch, sorted by index.
    assert as_lists(pack_micro_batches(np.arange(5), LENGTHS, 40)) == [[0, 1, 2, 3, 4]]
    # Equal lengths pack in index order: budget 6 holds 3 of length 2.
    assert as_lists(pack_micro_batches(np.array([4, 0, 3, 1, 2]), np.full(5, 2), 6)) == [[0, 1, 2], [3, 4]]


def test_pack_empty():
    assert pack_micro_batches(np.array([], dtype=np.int64), LENGTHS, 8) == []


# --- make_plan / WorkPlan ---
def test_make_plan_worked_example_budget_6():
    # Fronts from test_assign_fronts_worked_example: [2, 1] and [0, 4, 3].
    #   front 0, budget 6: 8 alone (over-long), then 3 -> {0: [2], 1: [1]}
    #   front 1, budget 6: 5, then 4 (2 x 5 > 6), then 1 (2 x 4 > 6) -> {0: [0], 1: [4], 2: [3]}
    plan = make_plan(LENGTHS, 2, 6)
    assert plan_as_lists(plan) == [{0: [2], 1: [1]}, {0: [0], 1: [4], 2: [3]}]
    assert plan.n_fronts == 2
    assert plan.steps == [0, 1, 2]
    assert plan.senders(0) == [0, 1]
    assert plan.senders(1) == [0, 1]
    assert plan.senders(2) == [1]
    assert plan.senders(3) == []
    assert [plan.tokens(0, 0, LENGTHS), plan.tokens(0, 1, LENGTHS)] == [8, 3]
    assert [plan.tokens(1, j, LENGTHS) for j in (0, 1, 2)] == [5, 4, 1]


def test_make_plan_worked_example_budget_8():
    plan = make_plan(LENGTHS, 2, 8)
    assert plan_as_lists(plan) == [{0: [2], 1: [1]}, {0: [0], 1: [3, 4]}]
    assert plan.tokens(1, 1, LENGTHS) == 1 + 4     # real tokens, not the padded 2 x 4


def test_without_done_keeps_step_numbers():
    plan = make_plan(LENGTHS, 2, 6)
    # Seq 0 done: front 1's step 0 is done but front 0's is not, so step 0 stays whole (front 1's
    # micro-batch is computed again, for the experts to see the rows the uninterrupted run had).
    done = np.array([True, False, False, False, False])
    p = plan.without_done(done)
    assert plan_as_lists(p) == plan_as_lists(plan)
    assert p.senders(0) == [0, 1]
    # Seq 3 done: front 1's step 2, alone at its step, goes; steps 0 and 1 keep their numbers.
    p = plan.without_done(np.array([False, False, False, True, False]))
    assert plan_as_lists(p) == [{0: [2], 1: [1]}, {0: [0], 1: [4]}]
    assert p.steps == [0, 1] and p.senders(2) == []
    # Seqs 0 and 2 done: nobody sends at step 0 any more; step 1 is still step 1.
    p = plan.without_done(np.array([True, False, True, False, False]))
    assert plan_as_lists(p) == [{1: [1]}, {1: [4], 2: [3]}]
    assert p.steps == [1, 2] and p.senders(0) == [] and p.senders(1) == [0, 1]
    # Everything done: an empty plan, still with both fronts.
    p = plan.without_done(np.ones(5, dtype=bool))
    assert plan_as_lists(p) == [{}, {}] and p.steps == [] and p.n_fronts == 2
    # The original plan is untouched (frozen, rebuilt rather than edited).
    assert plan_as_lists(plan) == [{0: [2], 1: [1]}, {0: [0], 1: [4], 2: [3]}]


def test_without_done_keeps_partly_done_micro_batch():
    plan = make_plan(LENGTHS, 2, 8)                        # front 1 step 1 is [3, 4]
    p = plan.without_done(np.array([False, False, False, True, False]))
    assert plan_as_lists(p) == plan_as_lists(plan)         # seq 4 is not done, so [3, 4] stays whole
    # [3, 4] done, but front 0's step 1 ([1]) is not: the step stays whole
    p = plan.without_done(np.array([False, False, False, True, True]))
    assert plan_as_lists(p) == plan_as_lists(plan)
    p = plan.without_done(np.array([False, True, False, True, True]))
    assert plan_as_lists(p) == [{0: [2]}, {0: [0]}]


def test_make_plan_done_argument_is_without_done():
    done = np.array([True, True, True, False, True])
    # Steps 0 ([2], [0]) and 1 ([1], [4]) all done: they go; front 1's step 2 ([3]) stays.
    assert plan_as_lists(make_plan(LENGTHS, 2, 6, done)) == [{}, {2: [3]}]
    assert plan_as_lists(make_plan(LENGTHS, 2, 6, done)) == plan_as_lists(make_plan(LENGTHS, 2, 6).without_done(done))


@pytest.mark.parametrize("bad", [0, -1, -2048])
def test_make_plan_refuses_budget_below_one(bad):
    with pytest.raises(ValueError, match=rf"micro-batch tokens must be >= 1, got {bad}"):
        make_plan(LENGTHS, 2, bad)


def test_make_plan_budget_one_is_accepted():
    plan = make_plan(LENGTHS, 1, 1)
    assert plan_as_lists(plan) == [{0: [2], 1: [0], 2: [4], 3: [1], 4: [3]}]


# --- properties over random inputs, against independent references ---
def lpt_reference(lengths: np.ndarray, n_fronts: int) -> list[list[int]]:
    """Longest-processing-time list scheduling with a heap of (load, front)."""
    heap = [(0, f) for f in range(n_fronts)]
    shares: list[list[int]] = [[] for _ in range(n_fronts)]
    for s in sorted(range(len(lengths)), key=lambda s: (-lengths[s], s)):
        load, f = heapq.heappop(heap)
        shares[f].append(s)
        heapq.heappush(heap, (load + int(lengths[s]), f))
    return shares


plans = st.tuples(
    st.lists(st.integers(1, 64), min_size=0, max_size=40).map(lambda xs: np.array(xs, dtype=np.int64)),
    st.integers(1, 9),          # fronts
    st.integers(1, 300),        # token budget
)


@settings(max_examples=200, deadline=None, database=None)
@given(plans)
def test_plan_properties(args):
    lengths, n_fronts, budget = args
    n = len(lengths)
    plan = make_plan(lengths, n_fronts, budget)
    assert plan.n_fronts == n_fronts

    # Every sequence exactly once across all fronts and micro-batches.
    everything = [s for mbs in plan.per_front for seqs in mbs.values() for s in seqs.tolist()]
    assert sorted(everything) == list(range(n))

    # The fronts are the LPT assignment (independent heap implementation), and balanced to within one
    # longest sequence: when the final-maximum front took its last sequence it was the least loaded.
    shares = lpt_reference(lengths, n_fronts)
    loads = [int(lengths[s].sum()) for s in shares]
    for f, mbs in enumerate(plan.per_front):
        assert sorted(s for seqs in mbs.values() for s in seqs.tolist()) == sorted(shares[f])
        assert sum(plan.tokens(f, j, lengths) for j in mbs) == loads[f]
    if n:
        assert max(loads) - min(loads) <= lengths.max()

    for f, mbs in enumerate(plan.per_front):
        # Steps of one front are 0, 1, 2, ... in increasing order.
        assert list(mbs) == list(range(len(mbs)))
        batches = list(mbs.values())
        for seqs in batches:
            assert seqs.dtype == np.int64 and len(seqs) >= 1
            assert np.all(np.diff(seqs) > 0)                            # sorted by index, no repeats
            assert len(seqs) * lengths[seqs].max() <= budget or len(seqs) == 1
        # Greedy, longest first: the batches are consecutive runs of the front's longest-first order,
        # and each closed because its next sequence would have broken the budget.
        by_length = sorted(shares[f], key=lambda s: (-lengths[s], s))
        runs = [sorted(seqs.tolist(), key=lambda s: (-lengths[s], s)) for seqs in batches]
        assert [s for run in runs for s in run] == by_length
        for run, nxt in zip(runs, runs[1:]):
            assert (len(run) + 1) * lengths[run[0]] > budget

    # senders and steps agree with the per-front dictionaries.
    assert plan.steps == sorted({j for mbs in plan.per_front for j in mbs})
    for j in plan.steps:
        assert plan.senders(j) == [f for f in range(n_fronts) if j in plan.per_front[f]]


@settings(max_examples=150, deadline=None, database=None)
@given(plans, st.data())
def test_without_done_properties(args, data):
    lengths, n_fronts, budget = args
    done = np.array(data.draw(st.lists(st.booleans(), min_size=len(lengths), max_size=len(lengths))),
                    dtype=bool)
    full = make_plan(lengths, n_fronts, budget)
    resumed = make_plan(lengths, n_fronts, budget, done)
    live_steps = {j for mbs in full.per_front for j, s in mbs.items() if not done[s].all()}
    for mbs, kept in zip(full.per_front, resumed.per_front):
        # Every micro-batch of a step with something left to do remains (the done ones too, so the
        # experts see that step's rows as before), under the same step numbers; no other remains.
        assert {j: s.tolist() for j, s in kept.items()} == {j: s.tolist() for j, s in mbs.items() if j in live_steps}
    left = [s for mbs in resumed.per_front for seqs in mbs.values() for s in seqs.tolist()]
    assert set(np.flatnonzero(~done).tolist()) <= set(left)      # nothing not done is lost
    assert set(resumed.steps) <= set(full.steps)


# --- topology: the rank map ---
def test_tiny_layout_one_front():
    lay = Layout.of(TINY, 1)
    assert (lay.n_fronts, lay.n_moe_layers, lay.n_experts) == (1, 2, 4)
    assert lay.n_expert_ranks == 8 and lay.world_size == 9
    # Rank 0 is the front; ranks 1-4 are experts 0-3 of MoE layer 0; ranks 5-8 of MoE layer 1.
    assert lay.role(0) == Role(0, "front", front=0)
    assert lay.role(1) == Role(1, "expert", layer=0, expert=0)
    assert lay.role(4) == Role(4, "expert", layer=0, expert=3)
    assert lay.role(5) == Role(5, "expert", layer=1, expert=0)
    assert lay.role(6) == Role(6, "expert", layer=1, expert=1)
    assert lay.role(8) == Role(8, "expert", layer=1, expert=3)
    assert lay.expert_rank(1, 1) == 6 and lay.expert_rank(0, 0) == 1 and lay.expert_rank(1, 3) == 8
    assert lay.layer_ranks(0) == [0, 1, 2, 3, 4]
    assert lay.layer_ranks(1) == [0, 5, 6, 7, 8]
    assert lay.role(6).describe(TINY) == "rank 6 (expert 1 of MoE layer 1, model layer 2)"
    assert lay.role(6).describe() == "rank 6 (expert 1 of MoE layer 1)"
    assert lay.role(0).describe(TINY) == "rank 0 (front 0)"


def test_tiny_layout_two_fronts():
    lay = Layout.of(TINY, 2)
    assert lay.world_size == 10
    assert lay.role(1) == Role(1, "front", front=1)
    assert lay.role(2) == Role(2, "expert", layer=0, expert=0)
    assert lay.role(6) == Role(6, "expert", layer=1, expert=0)    # 6 - 2 = 4 = 1 x 4 + 0
    assert lay.expert_rank(1, 3) == 9
    assert lay.layer_ranks(1) == [0, 1, 6, 7, 8, 9]


@pytest.mark.parametrize("n_fronts", [1, 2, 3, 8])
def test_role_and_expert_rank_are_inverse(n_fronts):
    lay = Layout.of(TINY, n_fronts)
    seen = []
    for layer in range(2):
        ranks = lay.layer_ranks(layer)
        assert ranks[:n_fronts] == list(range(n_fronts)) and len(ranks) == n_fronts + 4
        for e, r in enumerate(ranks[n_fronts:]):
            assert r == lay.expert_rank(layer, e) and lay.role(r) == Role(r, "expert", layer=layer, expert=e)
            seen.append(r)
    assert sorted(seen) == list(range(n_fronts, lay.world_size))   # every expert rank exactly once


@pytest.mark.parametrize("rank", [-1, 9, 100])
def test_role_outside_world(rank):
    with pytest.raises(ValueError, match=rf"rank {rank} outside world of 9"):
        Layout.of(TINY, 1).role(rank)


@pytest.mark.parametrize("bad", [0, -3])
def test_layout_refuses_no_fronts(bad):
    with pytest.raises(ValueError, match=rf"--front-ranks must be >= 1, got {bad}"):
        Layout.of(TINY, bad)


def test_paper_layout():
    # 61 layers, 3 dense: 58 MoE layers x 256 experts = 14,848 expert ranks.
    lay = Layout.of(PAPER, 1)
    assert lay.n_expert_ranks == 14_848 and lay.world_size == 14_849
    assert Layout.of(PAPER, 8).world_size == 14_856
    assert lay.role(14_848) == Role(14_848, "expert", layer=57, expert=255)
    assert lay.role(257) == Role(257, "expert", layer=1, expert=0)
    assert lay.expert_rank(57, 255) == 14_848
    assert lay.role(14_848).describe(PAPER) == "rank 14848 (expert 255 of MoE layer 57, model layer 60)"
    assert lay.layer_ranks(57)[:2] == [0, 14_593] and lay.layer_ranks(57)[-1] == 14_848
    with pytest.raises(ValueError, match="outside world of 14849"):
        lay.role(14_849)


def test_check_world_size():
    assert check_world_size(TINY, 1, 1) is None          # the single-process run
    assert check_world_size(TINY, 1, 5) is None          # whatever F says
    assert check_world_size(TINY, 9, 1) == Layout(1, 2, 4)
    assert check_world_size(TINY, 10, 2) == Layout(2, 2, 4)
    assert check_world_size(PAPER, 14_849, 1) == Layout(1, 58, 256)


def test_check_world_size_names_sizes_that_fit():
    with pytest.raises(ValueError) as exc:
        check_world_size(TINY, 10, 1)
    assert str(exc.value) == (
        "world size 10 does not fit config 'tiny' with --front-ranks 1: it needs F + 4 experts x 2 MoE "
        "layers = 9 ranks (9 for --front-ranks 1, 10 for --front-ranks 2, 12 for --front-ranks 4, "
        "16 for --front-ranks 8), or 1 rank for the single-process run")
    with pytest.raises(ValueError) as exc:
        check_world_size(PAPER, 64, 4)
    msg = str(exc.value)
    assert "world size 64" in msg and "= 14852 ranks" in msg
    assert re.findall(r"(\d+) for --front-ranks (\d+)", msg) == \
        [("14849", "1"), ("14850", "2"), ("14852", "4"), ("14856", "8")]


def test_check_world_size_refuses_no_fronts():
    with pytest.raises(ValueError, match="--front-ranks must be >= 1, got 0"):
        check_world_size(TINY, 9, 0)
