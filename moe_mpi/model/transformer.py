"""The DeepSeek-V3 transformer, split where the distributed runtime needs it split.

``FrontModel`` holds everything except the routed experts: embeddings, every layer's attention, the
dense MLPs, the routers and shared experts, the final norm and the LM head.  Its forward is a
generator: at each MoE layer it yields an ``ExpertRequest`` (the rows for every expert, grouped by
expert) and is sent back the experts' answers in the same order.  Whoever drives the generator decides
where the experts run: in this process (``run_local``), or on expert ranks over MPI, with several
generators (micro-batches) in flight at once.

Shape letters: B sequences, S positions, D model dim, T valid tokens, K top-k, N = T*K rows, E experts.
"""
from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from torch import nn

from ..config import ModelConfig
from . import front_kernels, kernels
from .layers import MLA, MLP, RMSNorm, rope_frequencies, rope_tables
from .routing import DispatchPlan, Router, combine_residual, permute, plan_dispatch


def to_device(a, device: torch.device) -> torch.Tensor:
    """A host array on ``device`` without waiting for the device: through pinned memory on a GPU."""
    t = torch.as_tensor(a)
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@dataclass(frozen=True)
class Batch:
    """Sequences padded to a common length S; positions at or after a sequence's length are padding.

    The lengths are also kept on the host, so that the positions of real tokens are known there and
    selecting them never waits for the device (a boolean mask would, to learn how many there are)."""
    lengths_B: torch.Tensor                 # (B,) int64
    tokens_BS: torch.Tensor | None = None   # (B, S) int64, or
    embeds_BSD: torch.Tensor | None = None  # (B, S, D) activations instead of tokens
    lengths_host: np.ndarray | None = None  # (B,) the same lengths on the host, if known

    @property
    def S(self) -> int:
        return (self.tokens_BS if self.tokens_BS is not None else self.embeds_BSD).shape[1]

    @property
    def valid_BS(self) -> torch.Tensor:
        return torch.arange(self.S, device=self.lengths_B.device)[None, :] < self.lengths_B[:, None]

    @cached_property
    def host_lengths(self) -> np.ndarray:
        if self.lengths_host is not None:
            return np.asarray(self.lengths_host, dtype=np.int64)
        return self.lengths_B.cpu().numpy().astype(np.int64)

    @cached_property
    def valid_T(self) -> torch.Tensor:
        """(T,) flat indices b*S + t of the real tokens, in row-major order, on the batch's device."""
        S, n = self.S, self.host_lengths
        idx = (np.arange(S)[None, :] + S * np.arange(len(n))[:, None])[np.arange(S)[None, :] < n[:, None]]
        return to_device(idx.astype(np.int64), self.lengths_B.device)

    @cached_property
    def scored(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(b, t) of every scored position, 1 <= t < length, row-major, on the batch's device."""
        S, n = self.S, self.host_lengths
        b, t = np.nonzero((np.arange(S)[None, :] >= 1) & (np.arange(S)[None, :] < n[:, None]))
        dev = self.lengths_B.device
        return to_device(b.astype(np.int64), dev), to_device(t.astype(np.int64), dev)


@dataclass(frozen=True)
class ExpertRequest:
    """One MoE layer's rows for its experts: rows [offsets[e], offsets[e+1]) of x_ND go to expert e."""
    moe_layer: int              # 0 .. n_moe_layers-1
    x_ND: torch.Tensor
    plan: DispatchPlan


@dataclass(frozen=True)
class FrontResult:
    hidden_BSD: torch.Tensor            # after the final norm
    expert_ids_LTK: list[torch.Tensor]  # per MoE layer, (T, K) chosen experts of the valid tokens
    expert_load_LE: torch.Tensor        # (L_moe, E) rows each expert received


class MoEFront(nn.Module):
    """The front-rank half of a MoE layer: router and shared experts (routed experts live elsewhere)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = Router(cfg)
        self.shared_experts = (MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
                               if cfg.n_shared_experts else None)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoEFront(cfg) if cfg.is_moe_layer(layer) else MLP(cfg.hidden_size, cfg.intermediate_size)


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class FrontModel(nn.Module):
    """Parameter names match a Hugging Face DeepSeek-V3 checkpoint (``model.layers.3.self_attn...``)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def _rope_frequencies(self, device: torch.device) -> tuple[torch.Tensor, float]:
        """RoPE's frequencies on ``device``, copied there once (a copy from pageable memory waits for
        the device, which would stall the micro-batches already queued)."""
        cache = self.__dict__.setdefault("_rope_cache", {})
        if device not in cache:
            inv_freq, scale = rope_frequencies(self.cfg)
            cache[device] = (inv_freq.to(device), scale)
        return cache[device]

    def forward_steps(self, batch: Batch) -> Generator[ExpertRequest, torch.Tensor, FrontResult]:
        cfg, m = self.cfg, self.model
        device = self.lm_head.weight.device
        if batch.tokens_BS is not None:
            x_BSD = m.embed_tokens(batch.tokens_BS)
        else:
            x_BSD = batch.embeds_BSD.to(self.dtype)
        S = x_BSD.shape[1]
        cos, sin = rope_tables(cfg, torch.arange(S, device=device), self._rope_frequencies(device))
        B, D = x_BSD.shape[0], x_BSD.shape[-1]
        valid_T = batch.valid_T
        ids_per_layer, load_per_layer = [], []

        for i, layer in enumerate(m.layers):
            x_BSD = x_BSD + layer.self_attn(layer.input_layernorm(x_BSD), cos, sin)
            h_BSD = layer.post_attention_layernorm(x_BSD)
            if not cfg.is_moe_layer(i):
                x_BSD = x_BSD + layer.mlp(h_BSD)
                continue
            # Only real tokens are routed: padding would cost expert work and skew expert_load.
            h_TD = h_BSD.reshape(B * S, D).index_select(0, valid_T)
            weights_TK, ids_TK = layer.mlp.gate(h_TD)
            plan = plan_dispatch(ids_TK, cfg.n_routed_experts)
            x_ND = permute(h_TD, plan)
            plan.record()
            y_ND = yield ExpertRequest(cfg.moe_index(i), x_ND, plan)
            shared_TD = None if layer.mlp.shared_experts is None else layer.mlp.shared_experts(h_TD)
            if kernels.enabled(y_ND) and x_BSD.is_contiguous():    # CUDA: one kernel, in place
                # x_BSD is this generator's own (the sum above), so it may be updated in place
                front_kernels.combine_residual_(x_BSD.view(B * S, D), valid_T, y_ND, plan.order_N, weights_TK,
                                                shared_TD)
            else:
                x_BSD = combine_residual(x_BSD.reshape(B * S, D), valid_T, y_ND, plan, weights_TK,
                                         shared_TD).view(B, S, D)
            ids_per_layer.append(ids_TK)
            load_per_layer.append(plan.counts_E)

        load = torch.stack(load_per_layer) if load_per_layer else torch.zeros(0, cfg.n_routed_experts,
                                                                               dtype=torch.int64)
        return FrontResult(m.norm(x_BSD), ids_per_layer, load)

    def logprobs(self, hidden_BSD: torch.Tensor, batch: Batch, rows_per_slice: int = 1024) -> torch.Tensor:
        """log p(tokens[t] | tokens[:t]) as (B, S) fp32; NaN at t = 0 and at padding.

        The vocabulary-wide softmax runs over slices of rows so its (rows, vocab) buffer stays bounded;
        on CUDA it is one kernel over the bf16 logits (``front_kernels.token_logprobs``), no fp32 copy.
        """
        tokens_BS = batch.tokens_BS
        B, S = tokens_BS.shape
        out_BS = torch.full((B, S), float("nan"), dtype=torch.float32, device=hidden_BSD.device)
        # position t-1 predicts token t, for 1 <= t < length
        b_idx, t_idx = batch.scored
        for lo in range(0, b_idx.numel(), rows_per_slice):
            b, t = b_idx[lo:lo + rows_per_slice], t_idx[lo:lo + rows_per_slice]
            logits = self.lm_head(hidden_BSD[b, t - 1])
            if kernels.enabled(logits):     # CUDA: fp32 log-softmax and gather in one pass
                lp = front_kernels.token_logprobs(logits, tokens_BS[b, t])
            else:
                lp = torch.log_softmax(logits.float(), dim=-1).gather(1, tokens_BS[b, t][:, None])[:, 0]
            out_BS[b, t] = lp
        return out_BS


class LocalExperts:
    """All routed experts of every MoE layer in this process: the 1-rank reference."""

    def __init__(self, experts: list[list[MLP]]):
        self.experts = experts          # [moe_layer][expert]

    def __call__(self, req: ExpertRequest) -> torch.Tensor:
        offsets = req.plan.offsets
        y_ND = torch.empty_like(req.x_ND)
        for e, expert in enumerate(self.experts[req.moe_layer]):
            lo, hi = offsets[e], offsets[e + 1]
            if hi > lo:
                y_ND[lo:hi] = expert(req.x_ND[lo:hi])
        return y_ND


def drive(steps: Generator[ExpertRequest, torch.Tensor, FrontResult], experts) -> FrontResult:
    """Run a forward generator to the end, answering each expert request with ``experts(req)``."""
    try:
        req = next(steps)
        while True:
            req = steps.send(experts(req))
    except StopIteration as stop:
        return stop.value
