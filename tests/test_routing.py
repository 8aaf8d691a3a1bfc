"""The router and the dispatch/combine index maths, on hand-worked cases.  No MPI, no transformers.

Shape letters: T tokens, D model dim, E routed experts, K experts per token, N = T*K routed rows.
"""
from __future__ import annotations

import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_mpi.config import ModelConfig
from moe_mpi.model.routing import Router, combine, permute, plan_dispatch
from moe_mpi.model.transformer import Batch, ExpertRequest, LocalExperts, drive
from moe_mpi.model.weights import build_all_experts, build_front

# --- plan_dispatch: worked by hand -----------------------------------------------------------------------
#
# ids_TK = [[2, 0], [0, 1], [2, 1], [3, 0]] with E = 5.  Flat (token*K + slot) indices 0..7 hold experts
#   flat:    0  1  2  3  4  5  6  7
#   expert:  2  0  0  1  2  1  3  0
# Stable sort by expert:  e0 <- 1, 2, 7   e1 <- 3, 5   e2 <- 0, 4   e3 <- 6   e4 <- nothing
IDS_TK = torch.tensor([[2, 0], [0, 1], [2, 1], [3, 0]])
E = 5
ORDER = [1, 2, 7, 3, 5, 0, 4, 6]
COUNTS = [3, 2, 2, 1, 0]
OFFSETS = [0, 3, 5, 7, 8, 8]
TOKENS = [0, 1, 3, 1, 2, 0, 2, 3]          # ORDER // K


def test_plan_worked_example():
    plan = plan_dispatch(IDS_TK, E)
    assert plan.order_N.tolist() == ORDER
    assert plan.counts_E.tolist() == COUNTS
    assert plan.counts_E.dtype == torch.int64 and plan.counts_E.device.type == "cpu"
    assert plan.offsets == OFFSETS
    assert plan.token_N.tolist() == TOKENS
    assert (plan.n_tokens, plan.top_k) == (4, 2)


def test_plan_second_worked_example():
    # [[2,0],[0,1],[2,2]]: flat experts 2 0 0 1 2 2 -> e0 <- 1, 2   e1 <- 3   e2 <- 0, 4, 5   (E = 3);
    # token 2 names expert 2 twice (the router never does; the plan maths need not care)
    plan = plan_dispatch(torch.tensor([[2, 0], [0, 1], [2, 2]]), 3)
    assert plan.order_N.tolist() == [1, 2, 3, 0, 4, 5]
    assert plan.counts_E.tolist() == [2, 1, 3]
    assert plan.offsets == [0, 2, 3, 6]
    assert plan.token_N.tolist() == [0, 1, 1, 0, 2, 2]


def test_plan_top1_and_trailing_empty_experts():
    plan = plan_dispatch(torch.tensor([[1], [1], [0]]), 4)
    assert plan.order_N.tolist() == [2, 0, 1]
    assert plan.counts_E.tolist() == [1, 2, 0, 0]
    assert plan.offsets == [0, 1, 3, 3, 3]


def test_plan_no_tokens():
    plan = plan_dispatch(torch.empty(0, 3, dtype=torch.int64), 4)
    assert plan.order_N.numel() == 0
    assert plan.counts_E.tolist() == [0, 0, 0, 0]
    assert plan.offsets == [0, 0, 0, 0, 0]
    y = combine(torch.empty(0, 6), plan, torch.empty(0, 3))
    assert y.shape == (0, 6)


def test_permute_worked_example():
    x_TD = torch.arange(4)[:, None] * 10.0 + torch.arange(3)     # row t = [10t, 10t+1, 10t+2]
    rows = permute(x_TD, plan_dispatch(IDS_TK, E))
    assert rows.tolist() == [[10.0 * t, 10.0 * t + 1, 10.0 * t + 2] for t in TOKENS]


def test_combine_worked_example():
    # Row n of y holds n+1.  Token t slot k sits at row ORDER.index(t*K + k):
    #   t0: slot0 -> row 5 (6), slot1 -> row 0 (1)      0.5*6   + 0.25*1 =  3.25
    #   t1: slot0 -> row 1 (2), slot1 -> row 3 (4)      1*2     + 2*4    = 10
    #   t2: slot0 -> row 6 (7), slot1 -> row 4 (5)      0.125*7 + 4*5    = 20.875
    #   t3: slot0 -> row 7 (8), slot1 -> row 2 (3)      3*8     + 0.5*3  = 25.5
    plan = plan_dispatch(IDS_TK, E)
    y_ND = torch.arange(1.0, 9.0)[:, None].repeat(1, 2)
    w_TK = torch.tensor([[0.5, 0.25], [1.0, 2.0], [0.125, 4.0], [3.0, 0.5]])
    out = combine(y_ND, plan, w_TK)
    assert out.dtype == torch.float32
    assert out.tolist() == [[3.25] * 2, [10.0] * 2, [20.875] * 2, [25.5] * 2]


def test_combine_bf16_rows_sum_in_fp32():
    # 256 + 1 is not representable in bf16 (8 bits of mantissa) but is in fp32
    plan = plan_dispatch(torch.tensor([[0, 1]]), 2)
    y_ND = torch.tensor([[256.0], [1.0]], dtype=torch.bfloat16)
    out = combine(y_ND, plan, torch.ones(1, 2))
    assert out.dtype == torch.float32 and out.item() == 257.0


# --- invariants on random plans ----------------------------------------------------------------------------

@st.composite
def routed(draw):
    E = draw(st.integers(1, 9))
    K = draw(st.integers(1, E))
    T = draw(st.integers(0, 12))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)]) if T else torch.empty(0, K, dtype=torch.int64)
    return ids, E, gen


@settings(max_examples=60, deadline=None, database=None)
@given(routed())
def test_plan_invariants(case):
    ids_TK, E, _ = case
    T, K = ids_TK.shape
    plan = plan_dispatch(ids_TK, E)
    flat = ids_TK.reshape(-1)
    assert sorted(plan.order_N.tolist()) == list(range(T * K))            # a permutation
    assert plan.counts_E.tolist() == [int((flat == e).sum()) for e in range(E)]
    for e in range(E):
        lo, hi = plan.offsets[e], plan.offsets[e + 1]
        block = plan.order_N[lo:hi]
        assert (flat[block] == e).all()
        assert block.tolist() == sorted(block.tolist())                    # token order within an expert


def combine_by_loop(y_ND, plan, w_TK):
    """The combine written the slow, obvious way: for each token, sum its K weighted answers in slot order."""
    T, K = w_TK.shape
    row_of = {flat: n for n, flat in enumerate(plan.order_N.tolist())}
    out = torch.zeros(T, y_ND.shape[1])
    for t in range(T):
        acc = torch.zeros(y_ND.shape[1])
        for k in range(K):
            acc = acc + w_TK[t, k] * y_ND[row_of[t * K + k]].float()
        out[t] = acc
    return out


@settings(max_examples=40, deadline=None, database=None)
@given(routed())
def test_combine_equals_per_token_loop(case):
    ids_TK, E, gen = case
    T, K = ids_TK.shape
    plan = plan_dispatch(ids_TK, E)
    y_ND = torch.randn(T * K, 5, generator=gen)
    w_TK = torch.rand(T, K, generator=gen)
    torch.testing.assert_close(combine(y_ND, plan, w_TK), combine_by_loop(y_ND, plan, w_TK), atol=1e-6, rtol=1e-6)


def test_permute_then_identity_experts_then_combine():
    # Experts that return their input: each token gets back (sum of its weights) * x.
    gen = torch.Generator().manual_seed(0)
    T, K, E, D = 30, 3, 7, 4
    ids_TK = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
    x_TD, w_TK = torch.randn(T, D, generator=gen), torch.rand(T, K, generator=gen)
    plan = plan_dispatch(ids_TK, E)
    torch.testing.assert_close(combine(permute(x_TD, plan), plan, w_TK), x_TD * w_TK.sum(1, keepdim=True))


# --- the combine does not depend on how the experts' work was split -----------------------------------------

def rowwise_expert(e: int, x_ND: torch.Tensor) -> torch.Tensor:
    """An expert whose answer for a row depends on that row only (no GEMM), so any split is exact."""
    return torch.tanh(x_ND * (0.3 + 0.1 * e)) + 0.01 * e


def test_combine_bitwise_independent_of_work_split():
    gen = torch.Generator().manual_seed(1)
    T, K, E, D = 40, 4, 8, 6
    # expert E-1 is never chosen: its empty block must be harmless in every split
    ids_TK = torch.stack([torch.randperm(E - 1, generator=gen)[:K] for _ in range(T)])
    x_TD, w_TK = torch.randn(T, D, generator=gen), torch.rand(T, K, generator=gen)
    plan = plan_dispatch(ids_TK, E)
    rows = permute(x_TD, plan)
    off = plan.offsets

    # (a) one call per expert, written in expert order
    y_a = torch.empty_like(rows)
    for e in range(E):
        y_a[off[e]:off[e + 1]] = rowwise_expert(e, rows[off[e]:off[e + 1]])
    # (b) the same blocks arriving in a shuffled order, each expert's rows split into single-row calls
    y_b = torch.empty_like(rows)
    arrival = list(range(E))
    random.Random(3).shuffle(arrival)
    for e in arrival:
        for n in range(off[e + 1] - 1, off[e] - 1, -1):
            y_b[n:n + 1] = rowwise_expert(e, rows[n:n + 1])
    assert plan.counts_E[E - 1] == 0
    ref = combine(y_a, plan, w_TK)
    assert torch.equal(combine(y_b, plan, w_TK), ref)

    # (c) the tokens in two micro-batches, each planned and combined on its own
    halves = []
    for sl in (slice(0, 17), slice(17, T)):
        p = plan_dispatch(ids_TK[sl], E)
        r, o = permute(x_TD[sl], p), p.offsets
        y = torch.cat([rowwise_expert(e, r[o[e]:o[e + 1]]) for e in range(E)])
        halves.append(combine(y, p, w_TK[sl]))
    assert torch.equal(torch.cat(halves), ref)


class ShuffledSplitExperts(LocalExperts):
    """Answers every expert's block in a shuffled order, halving each block into two separate calls."""

    def __call__(self, req):
        off = req.plan.offsets
        y_ND = torch.full_like(req.x_ND, float("nan"))
        order = list(range(len(self.experts[req.moe_layer])))
        random.Random(req.moe_layer).shuffle(order)
        for e in order:
            lo, hi = off[e], off[e + 1]
            mid = (lo + hi) // 2
            for a, b in ((mid, hi), (lo, mid)):
                if b > a:
                    y_ND[a:b] = self.experts[req.moe_layer][e](req.x_ND[a:b])
        return y_ND


def test_model_output_independent_of_expert_call_order():
    """End to end: the same answers delivered in another order give the same hidden state.  GEMMs of
    different row counts may round differently, so this is close, not bitwise; routing is exact."""
    cfg = ModelConfig.load("tiny")
    front, experts = build_front(cfg, seed=4), build_all_experts(cfg, seed=4)
    lengths = torch.tensor([9, 1, 5])
    batch = Batch(lengths, tokens_BS=torch.randint(0, cfg.vocab_size, (3, 9), generator=torch.Generator().manual_seed(2)))
    with torch.no_grad():
        a = drive(front.forward_steps(batch), LocalExperts(experts))
        b = drive(front.forward_steps(batch), ShuffledSplitExperts(experts))
    valid = batch.valid_BS
    torch.testing.assert_close(a.hidden_BSD[valid], b.hidden_BSD[valid], atol=1e-6, rtol=0)
    for x, y in zip(a.expert_ids_LTK, b.expert_ids_LTK):
        assert torch.equal(x, y)
    assert a.expert_load_LE.sum().item() == cfg.n_moe_layers * int(lengths.sum()) * cfg.num_experts_per_tok


def test_local_experts_skip_empty_experts():
    """An expert that receives no rows is never called (an expert rank with nothing to do sends nothing)."""
    cfg = ModelConfig.load("tiny")
    experts = build_all_experts(cfg, seed=0)
    called = []

    class Spy(torch.nn.Module):
        def __init__(self, e, inner):
            super().__init__()
            self.e, self.inner = e, inner

        def forward(self, x):
            called.append((self.e, x.shape[0]))
            return self.inner(x)

    ids_TK = torch.tensor([[0, 2], [2, 0], [0, 2]])            # experts 1 and 3 get nothing
    plan = plan_dispatch(ids_TK, cfg.n_routed_experts)
    x_TD = torch.randn(3, cfg.hidden_size)
    req = ExpertRequest(0, permute(x_TD, plan), plan)
    y = LocalExperts([[Spy(e, m) for e, m in enumerate(experts[0])]])(req)
    assert called == [(0, 3), (2, 3)]
    assert plan.counts_E.tolist() == [3, 0, 3, 0]
    with torch.no_grad():
        torch.testing.assert_close(y[:3], experts[0][0](x_TD))
        torch.testing.assert_close(y[3:], experts[0][2](x_TD))


# --- the router, worked by hand ------------------------------------------------------------------------------

def sig(v: float) -> float:
    return 1 / (1 + math.exp(-v))


def hand_router(**kw) -> Router:
    """E = 4 experts in 2 groups ({0,1}, {2,3}), D = 4, weight = identity so logits = the input."""
    base = dict(hidden_size=4, n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1,
                routed_scaling_factor=2.5)
    router = Router(ModelConfig(**{**base, **kw}))
    with torch.no_grad():
        router.weight.copy_(torch.eye(4))
        router.e_score_correction_bias.zero_()
    return router


H = torch.tensor([[0.0, 1.0, -1.0, 2.0]])


def test_router_noaux_tc_worked_example():
    # sigmoid scores s = [.5, .731, .269, .881]; bias [0, 0, .5, 0] -> choice [.5, .731, .769, .881]
    # group scores (sum of top 2): g0 = 1.231, g1 = 1.650 -> group 1 kept -> experts 3, 2 (descending)
    # gate weights use the unbiased scores: [s3, s2] / (s3 + s2) * 2.5
    router = hand_router()
    with torch.no_grad():
        router.e_score_correction_bias.copy_(torch.tensor([0.0, 0.0, 0.5, 0.0]))
        w, ids = router(H)
    s2, s3 = sig(-1.0), sig(2.0)
    assert ids.tolist() == [[3, 2]]
    torch.testing.assert_close(w, torch.tensor([[s3, s2]]) / (s2 + s3) * 2.5)


def test_router_noaux_tc_without_bias_picks_other_group():
    # unbiased: g0 = .5 + .731 = 1.231 > g1 = .269 + .881 = 1.150 -> group 0 -> experts 1, 0
    with torch.no_grad():
        w, ids = hand_router()(H)
    s0, s1 = sig(0.0), sig(1.0)
    assert ids.tolist() == [[1, 0]]
    torch.testing.assert_close(w, torch.tensor([[s1, s0]]) / (s0 + s1) * 2.5)


def test_router_unnormalised_and_ungrouped():
    # topk_group = n_group: no group limit -> best two overall: 3 (.881), 1 (.731); raw scores * 2.5
    with torch.no_grad():
        w, ids = hand_router(topk_group=2, norm_topk_prob=False)(H)
    assert ids.tolist() == [[3, 1]]
    torch.testing.assert_close(w, torch.tensor([[sig(2.0), sig(1.0)]]) * 2.5)


@pytest.mark.parametrize("method", ["greedy", "group_limited_greedy"])
def test_router_softmax_worked_example(method):
    # softmax of [0, 1, -1, 2]: p = e^x / Z.  greedy: experts 3, 1.  group_limited_greedy ranks groups by
    # their best expert: g0 = p1, g1 = p3 -> group 1 -> experts 3, 2.  The bias is ignored by both.
    router = hand_router(scoring_func="softmax", topk_method=method, norm_topk_prob=False,
                         routed_scaling_factor=1.0)
    with torch.no_grad():
        router.e_score_correction_bias.fill_(10.0)
        w, ids = router(H)
    p = torch.tensor([0.0, 1.0, -1.0, 2.0]).softmax(-1)
    expect = [3, 1] if method == "greedy" else [3, 2]
    assert ids.tolist() == [expect]
    torch.testing.assert_close(w, p[expect][None])
