"""The router and the index maths of dispatch and combine.  Pure torch, no MPI.

Shape letters: T tokens, D model dim, E routed experts, K experts per token, G groups,
N = T*K routed rows.

The dispatch plan sorts the N (token, slot) pairs by expert, stably, so expert e receives the rows
``order[offsets[e]:offsets[e+1]]`` in token order.  The combine puts each returned row back in its
(token, slot) place and sums over the K slots in slot order: the result depends neither on how the
experts were spread over ranks nor on when their answers arrived.
"""
from __future__ import annotations


import torch
from torch import nn

from ..config import ModelConfig


class Router(nn.Module):
    """DeepSeek's gate: score, bias-corrected grouped top-k, normalise, scale.  Runs in fp32."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        E = cfg.n_routed_experts
        self.weight = nn.Parameter(torch.empty(E, cfg.hidden_size, dtype=torch.float32))
        self.e_score_correction_bias = nn.Parameter(torch.zeros(E, dtype=torch.float32))

    def forward(self, h_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (weights_TK fp32, ids_TK int64), the ids in descending order of choice score."""
        cfg = self.cfg
        T, E, G = h_TD.shape[0], cfg.n_routed_experts, cfg.n_group
        logits_TE = h_TD.float() @ self.weight.float().t()
        if cfg.scoring_func == "sigmoid":
            scores_TE = logits_TE.sigmoid()
        else:
            scores_TE = logits_TE.softmax(dim=-1)
        # The bias only selects experts; the gate weights use the unbiased scores.
        if cfg.topk_method == "noaux_tc":
            choice_TE = scores_TE + self.e_score_correction_bias.float()
        else:
            choice_TE = scores_TE
        if cfg.topk_method != "greedy" and G > 1:
            choice_TGe = choice_TE.view(T, G, E // G)
            if cfg.topk_method == "noaux_tc":
                group_TG = choice_TGe.topk(2, dim=-1).values.sum(dim=-1)
            else:
                group_TG = choice_TGe.amax(dim=-1)
            keep_TG = torch.zeros_like(group_TG, dtype=torch.bool)
            keep_TG.scatter_(1, group_TG.topk(cfg.topk_group, dim=-1).indices, True)
            fill = float("-inf") if cfg.topk_method == "noaux_tc" else 0.0
            choice_TE = choice_TGe.masked_fill(~keep_TG[..., None], fill).view(T, E)
        ids_TK = choice_TE.topk(cfg.num_experts_per_tok, dim=-1, sorted=True).indices
        weights_TK = scores_TE.gather(1, ids_TK)
        if cfg.norm_topk_prob:
            weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
        return weights_TK * cfg.routed_scaling_factor, ids_TK


class DispatchPlan:
    """Where each routed row goes; small enough to keep per micro-batch while it is in flight.

    The rows per expert are needed on the host (message sizes); on a GPU they are copied there without
    waiting: ``ready()`` says whether the copy has landed, ``counts_E`` waits for it.  Until then the
    host is free to queue other micro-batches' work, which a blocking copy would have drained."""

    def __init__(self, order_N: torch.Tensor, counts_E: torch.Tensor, n_tokens: int, top_k: int):
        self.order_N = order_N      # (N,) flat (token*K + slot) index of each row, grouped by expert
        self.n_tokens, self.top_k = n_tokens, top_k
        self.event = None           # on a GPU: passed once the counts (and, after record(), the rows) are
        if counts_E.device.type == "cuda":
            host = torch.empty(counts_E.shape, dtype=counts_E.dtype, pin_memory=True)
            host.copy_(counts_E, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
            counts_E = host
        self._counts_E = counts_E

    def record(self) -> None:
        """Move the event to the compute stream's position now, so that it also covers the rows for the
        experts computed after the plan (the transports order their sends after it)."""
        if self.event is not None:
            self.event.record()

    def ready(self) -> bool:
        return self.event is None or self.event.query()

    @property
    def counts_E(self) -> torch.Tensor:
        """(E,) rows per expert, int64 on the CPU."""
        if self.event is not None:
            self.event.synchronize()
        return self._counts_E

    @property
    def token_N(self) -> torch.Tensor:
        return self.order_N // self.top_k

    @property
    def offsets(self) -> list[int]:
        """E+1 row offsets: expert e owns rows [offsets[e], offsets[e+1])."""
        return [0] + torch.cumsum(self.counts_E, 0).tolist()


def plan_dispatch(ids_TK: torch.Tensor, n_experts: int) -> DispatchPlan:
    T, K = ids_TK.shape
    flat_N = ids_TK.reshape(-1)
    order_N = torch.sort(flat_N, stable=True).indices
    # not bincount: on a GPU it reads the largest id back to the host to size its output
    counts_E = torch.zeros(n_experts, dtype=torch.int64, device=flat_N.device).index_add_(
        0, flat_N, torch.ones_like(flat_N))
    return DispatchPlan(order_N=order_N, counts_E=counts_E, n_tokens=T, top_k=K)


def permute(x_TD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """Rows for the experts, grouped by expert: (N, D)."""
    return x_TD.index_select(0, plan.token_N)


def combine(y_ND: torch.Tensor, plan: DispatchPlan, weights_TK: torch.Tensor) -> torch.Tensor:
    """Weighted sum of the experts' answers per token, in slot order, in fp32: (T, D) fp32."""
    T, K, D = plan.n_tokens, plan.top_k, y_ND.shape[-1]
    slots_ND = torch.empty_like(y_ND)
    slots_ND[plan.order_N] = y_ND
    y_TKD = slots_ND.view(T, K, D).float()                                 # (T, K, D)
    return (y_TKD * weights_TK[..., None].float()).sum(dim=1)


def combine_residual(x_RD: torch.Tensor, rows_T: torch.Tensor, y_ND: torch.Tensor, plan: DispatchPlan,
                     weights_TK: torch.Tensor, shared_TD: torch.Tensor | None = None) -> torch.Tensor:
    """x with x[rows[t]] += combine(...)[t] rounded to x's dtype (+ shared[t]), out of place: a MoE
    layer's output added to the residual at the routed rows (without a boolean mask)."""
    moe_TD = combine(y_ND, plan, weights_TK).to(x_RD.dtype)
    if shared_TD is not None:
        moe_TD = moe_TD + shared_TD
    out = x_RD.clone()
    out.index_copy_(0, rows_T, out.index_select(0, rows_T) + moe_TD)
    return out
