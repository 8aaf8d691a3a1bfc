"""The steady-state performance model of the front/expert pipeline (DESIGN.md section 8).

A *step* is one micro-batch from every front (F fronts x T tokens).  In a step every front runs all
layers' attention, routers, dense MLPs and the head on its T tokens, and sends/receives T*K rows per MoE
layer; every expert rank runs its experts once, on the rows all fronts sent it.  Each rank and each link
is a server, so the pipeline cannot finish steps faster than its busiest server (the *period*), and with
M micro-batches in flight per front it cannot beat Little's law either:

    tokens/s = F * T / max(period, latency0 / M)

where latency0 is one micro-batch's trip through all layers on an idle machine.  ``simulate`` checks this.

Every piece is timed by a roofline: max(FLOP / sustained FLOP/s, bytes / sustained bandwidth) plus a
fixed cost per op.  Shape letters: F fronts, L_moe MoE layers, E experts, R expert ranks per layer
(R = ceil(E / k) for k experts per rank), K top-k, T micro-batch tokens.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import numpy as np

from ..config import ModelConfig
from . import costs
from .hardware import DTYPE_BYTES, Hardware


@dataclass(frozen=True)
class Layout:
    front_ranks: int = 1
    micro_batch_tokens: int = 4096      # T tokens per micro-batch per front, in whole sequences
    in_flight: int = 4                  # M micro-batches in flight per front
    seq_len: int | None = None          # None: T, capped at max_position_embeddings
    experts_per_rank: int = 1           # k experts of the same layer per expert rank
    dtype: str | None = None            # None: the hardware's

    def check(self, cfg: ModelConfig) -> None:
        for f in ("front_ranks", "micro_batch_tokens", "in_flight", "experts_per_rank"):
            v = getattr(self, f)
            if not (isinstance(v, int) and v >= 1):
                raise ValueError(f"layout: {f} must be an integer >= 1, got {v!r}")
        if self.experts_per_rank > cfg.n_routed_experts:
            raise ValueError(f"layout: experts_per_rank={self.experts_per_rank} exceeds the "
                             f"{cfg.n_routed_experts} experts of a layer")
        S = self.sequence_length(cfg)
        if not 1 <= S <= self.micro_batch_tokens:
            raise ValueError(f"layout: seq_len={S} must be in [1, micro_batch_tokens={self.micro_batch_tokens}]: "
                             f"a micro-batch holds whole sequences")
        if self.dtype is not None and self.dtype not in DTYPE_BYTES:
            raise ValueError(f"layout: dtype must be one of {sorted(DTYPE_BYTES)}, got {self.dtype!r}")

    def sequence_length(self, cfg: ModelConfig) -> int:
        return self.seq_len if self.seq_len is not None else min(self.micro_batch_tokens,
                                                                   cfg.max_position_embeddings)

    def ranks_per_layer(self, cfg: ModelConfig) -> int:
        return -(-cfg.n_routed_experts // self.experts_per_rank)

    def expert_ranks(self, cfg: ModelConfig) -> int:
        return cfg.n_moe_layers * self.ranks_per_layer(cfg)

    def world_size(self, cfg: ModelConfig) -> int:
        return self.front_ranks + self.expert_ranks(cfg)


def piece_time_s(piece: costs.Piece, hw: Hardware) -> float:
    return max(piece.flops / hw.flops_per_s, piece.bytes / hw.mem_bytes_per_s) + piece.n_ops * hw.op_overhead_s


def expert_time_s(cfg: ModelConfig, hw: Hardware, rows: np.ndarray, b: int) -> np.ndarray:
    """Roofline time of one expert over ``rows`` rows (any shape, vectorised); 0 where it got none."""
    rows = np.asarray(rows, dtype=np.float64)
    one = costs.expert(cfg, 1.0, b)
    compute = rows * one.flops / hw.flops_per_s
    memory = (one.weight_bytes + rows * one.act_bytes) / hw.mem_bytes_per_s
    return np.where(rows > 0, np.maximum(compute, memory) + one.n_ops * hw.op_overhead_s, 0.0)


def expert_rows(cfg: ModelConfig, layout: Layout, expert_load: np.ndarray | None = None) -> np.ndarray:
    """(L_moe, E) rows each expert receives per step: F*T*K rows shared out in proportion to
    ``expert_load`` (counts or fractions, one row per MoE layer), evenly without one."""
    L, E = cfg.n_moe_layers, cfg.n_routed_experts
    total = layout.front_ranks * layout.micro_batch_tokens * cfg.num_experts_per_tok
    if expert_load is None:
        return np.full((L, E), total / E)
    load = np.asarray(expert_load, dtype=np.float64)
    if load.shape != (L, E) or (load < 0).any() or not np.isfinite(load).all():
        raise ValueError(f"expert_load must be finite, >= 0 and of shape (L_moe, E) = ({L}, {E}), "
                         f"got shape {load.shape}")
    sums = load.sum(axis=1, keepdims=True)
    share = np.where(sums > 0, load / np.where(sums > 0, sums, 1.0), 1.0 / E)
    return total * share


def rank_groups(x_LE: np.ndarray, k: int) -> np.ndarray:
    """(L, E) -> (L, R, k): consecutive experts share a rank; a last, partly filled rank gets zeros."""
    L, E = x_LE.shape
    R = -(-E // k)
    padded = np.zeros((L, R * k))
    padded[:, :E] = x_LE
    return padded.reshape(L, R, k)


@dataclass(frozen=True)
class Stages:
    """Durations (s) of each server's work in one step; the simulator replays these."""
    front_stage_s: np.ndarray       # (L + 1,) front work between exchanges: layer i's (combine of the
                                    # previous MoE layer,) attention and MLP or router; the last is the head
    moe_after_stage: np.ndarray     # (L + 1,) bool: stage i ends in a dispatch to MoE layer moe_index(i)
    front_send_s: float             # one front's dispatch of T*K rows of one layer
    front_recv_s: float             # one front's receipt of its T*K answers of one layer
    rank_recv_s: np.ndarray         # (L_moe, R) an expert rank's receipt of all fronts' rows
    expert_rank_s: np.ndarray       # (L_moe, R) its k experts' compute
    rank_send_s: np.ndarray         # (L_moe, R) its answers to all fronts
    latency_s: float                # one-way link latency
    rows_LR: np.ndarray             # (L_moe, R) rows per rank per step
    rows_LE: np.ndarray             # (L_moe, E) rows per expert per step


def stage_times(cfg: ModelConfig, hw: Hardware, layout: Layout,
                expert_load: np.ndarray | None = None) -> Stages:
    """Every server's work per step for this layout; ``expert_load`` as in ``expert_rows``."""
    layout.check(cfg)
    b = DTYPE_BYTES[layout.dtype or hw.dtype]
    T, S, F, k = (layout.micro_batch_tokens, layout.sequence_length(cfg), layout.front_ranks,
                  layout.experts_per_rank)
    K, L = cfg.num_experts_per_tok, cfg.num_hidden_layers
    R = layout.ranks_per_layer(cfg)
    t = lambda piece: piece_time_s(piece, hw)  # noqa: E731

    attn, router = t(costs.attention(cfg, T, S, b)), t(costs.router(cfg, T, b))
    dense = t(costs.dense_mlp(cfg, T, b))
    after_moe = t(costs.combine(cfg, T, b)) + t(costs.shared_experts(cfg, T, b))
    stages = np.zeros(L + 1)
    moe = np.zeros(L + 1, dtype=bool)
    for i in range(L):
        stages[i] = attn + (router if cfg.is_moe_layer(i) else dense)
        stages[i] += t(costs.embed(cfg, T, b)) if i == 0 else (after_moe if cfg.is_moe_layer(i - 1) else 0.0)
        moe[i] = cfg.is_moe_layer(i)
    stages[L] = t(costs.lm_head(cfg, T, b)) + (after_moe if L and cfg.is_moe_layer(L - 1) else 0.0)

    if hw.shared_cores is not None:   # on shared cores a rank's compute costs host_overhead times its work
        stages *= hw.host_overhead
    rows_LE = expert_rows(cfg, layout, expert_load)
    rows_LRk = rank_groups(rows_LE, k)
    rows_LR = rows_LRk.sum(axis=2)
    bw, latency = hw.link(layout.world_size(cfg))
    # A front sends one message per expert rank of the layer; a rank gets one from every front.
    front_bytes = costs.message_bytes(cfg, T * K, b) + (R - 1) * costs.COUNT_BYTES
    front_xfer = front_bytes / bw + R * hw.msg_overhead_s
    rank_bytes = rows_LR * cfg.hidden_size * b + F * costs.COUNT_BYTES
    rank_xfer = rank_bytes / bw + F * hw.msg_overhead_s
    return Stages(front_stage_s=stages, moe_after_stage=moe, front_send_s=front_xfer, front_recv_s=front_xfer,
                  rank_recv_s=rank_xfer, expert_rank_s=expert_time_s(cfg, hw, rows_LRk, b).sum(axis=2)
                  * (hw.host_overhead if hw.shared_cores is not None else 1.0),
                  rank_send_s=rank_xfer.copy(), latency_s=latency, rows_LR=rows_LR, rows_LE=rows_LE)


def moe_layer_latency_s(st: Stages, moe_layer: int) -> float:
    """Dispatch -> experts -> combine of one MoE layer on an idle machine: the slowest rank's answer or
    the front's receive, whichever ends last (this is what the simulator does with no queueing)."""
    l = moe_layer
    ready_R = np.maximum(st.front_send_s, st.rank_recv_s[l]) + st.latency_s + st.expert_rank_s[l]
    return max(float((ready_R + st.rank_send_s[l]).max()), float(ready_R.min()) + st.front_recv_s) + st.latency_s


@dataclass(frozen=True)
class Plan:
    config: str
    hardware: str
    front_ranks: int
    experts_per_rank: int
    ranks_per_layer: int
    expert_ranks: int
    world_size: int
    micro_batch_tokens: int
    seq_len: int
    in_flight: int
    dtype: str
    # one expert (the description's worked numbers)
    expert_weight_bytes: float
    expert_flops_per_row: float
    expert_row_s: float                 # compute time of one row
    expert_weight_read_s: float         # reading the weights once
    ridge_rows: float                   # rows per expert per step where compute time = weight read time
    rows_per_expert: float              # mean rows per expert per step
    expert_bound: str                   # "memory" or "compute", at the busiest rank
    # memory per rank (bytes)
    front_memory: dict
    expert_memory: dict
    mem_limit_bytes: float
    fits: bool
    # one micro-batch's pieces (s): per layer on the front, per step on the busiest expert rank
    attention_s: float
    router_s: float
    dense_mlp_s: float
    lm_head_s: float
    dispatch_s: float
    expert_mlp_s: float
    combine_s: float
    # steady state
    period_parts_s: dict                # per server kind: its busy time per step
    period_s: float
    bottleneck: str
    latency0_s: float                   # one micro-batch through the whole model, idle machine
    cycle_s: float                      # time per step at this in-flight count
    tokens_per_s: float
    tokens_per_s_per_rank: float
    latency_s: float                    # per micro-batch (= per sequence: it finishes with its micro-batch)
    front_util: float
    expert_util_mean: float
    expert_util_max: float
    in_flight_needed: int               # micro-batches per front to reach the period
    tokens_in_flight: int               # F * M * T
    tokens_in_flight_needed: int        # F * in_flight_needed * T
    tokens_in_flight_to_saturate: float  # every expert of every layer at its ridge at once
    front_ranks_to_balance: int         # F at which the experts become as busy as the fronts
    flops_per_token: dict               # useful FLOP per token: front, experts, total
    tflops_per_rank: float              # useful TFLOP/s per rank at this throughput
    useful_flop_fraction: float         # of the hardware's sustained FLOP/s (peak x MFU)

    def to_dict(self) -> dict:
        return asdict(self)


def plan(cfg: ModelConfig, hw: Hardware, layout: Layout, expert_load: np.ndarray | None = None) -> Plan:
    st = stage_times(cfg, hw, layout, expert_load)
    b = DTYPE_BYTES[layout.dtype or hw.dtype]
    F, T, M, k = layout.front_ranks, layout.micro_batch_tokens, layout.in_flight, layout.experts_per_rank
    E, K, L_moe = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.n_moe_layers
    S = layout.sequence_length(cfg)
    world = layout.world_size(cfg)

    one = costs.expert(cfg, 1.0, b)
    row_s = one.flops / hw.flops_per_s
    read_s = one.weight_bytes / hw.mem_bytes_per_s

    moe_lat = [moe_layer_latency_s(st, l) for l in range(L_moe)]
    latency0 = float(st.front_stage_s.sum()) + sum(moe_lat)
    parts = {"front compute": float(st.front_stage_s.sum()),
             "front links": L_moe * max(st.front_send_s, st.front_recv_s)}
    if L_moe:
        parts["expert compute"] = float(st.expert_rank_s.max())
        parts["expert links"] = float(max(st.rank_recv_s.max(), st.rank_send_s.max()))
    if hw.shared_cores is not None:
        # Oversubscribed CPU box: every rank's compute shares the node's cores.
        nodes = 1 if hw.ranks_per_node is None else -(-world // hw.ranks_per_node)
        parts["shared cores"] = (F * parts["front compute"] + float(st.expert_rank_s.sum())) / (
            hw.shared_cores * nodes)
    bottleneck = max(parts, key=parts.get)
    period = parts[bottleneck]
    cycle = max(period, latency0 / M)
    tokens_per_s = F * T / cycle

    rows_hot = float(expert_rows(cfg, layout, expert_load).max()) if L_moe else 0.0    # busiest expert
    rows_mean = F * T * K / E
    ridge = read_s / row_s
    front_mem = costs.front_memory_bytes(cfg, T, M, b)
    expert_mem = costs.expert_memory_bytes(cfg, rows_hot, k, b)
    mem_limit = hw.mem_bytes
    in_flight_needed = max(1, math.ceil(latency0 / period - 1e-9))
    flops = costs.flops_per_token(cfg, S)
    tflops_per_rank = tokens_per_s * flops["total"] / world / 1e12
    # The pieces as the description lists them: per layer for one micro-batch, per step at the experts.
    return Plan(
        config=cfg.name, hardware=hw.name, front_ranks=F, experts_per_rank=k,
        ranks_per_layer=layout.ranks_per_layer(cfg), expert_ranks=layout.expert_ranks(cfg), world_size=world,
        micro_batch_tokens=T, seq_len=S, in_flight=M, dtype=layout.dtype or hw.dtype,
        expert_weight_bytes=one.weight_bytes, expert_flops_per_row=one.flops, expert_row_s=row_s,
        expert_weight_read_s=read_s, ridge_rows=ridge, rows_per_expert=rows_mean,
        expert_bound="compute" if rows_hot >= ridge else "memory",
        front_memory=front_mem, expert_memory=expert_mem, mem_limit_bytes=mem_limit,
        fits=front_mem["total"] <= mem_limit and expert_mem["total"] <= mem_limit,
        attention_s=piece_time_s(costs.attention(cfg, T, S, b), hw),
        router_s=piece_time_s(costs.router(cfg, T, b), hw),
        dense_mlp_s=piece_time_s(costs.dense_mlp(cfg, T, b), hw),
        lm_head_s=piece_time_s(costs.lm_head(cfg, T, b), hw),
        dispatch_s=(max(st.front_send_s, float(st.rank_recv_s.max())) + st.latency_s) if L_moe else 0.0,
        expert_mlp_s=float(st.expert_rank_s.max()) if L_moe else 0.0,
        combine_s=(max(st.front_recv_s, float(st.rank_send_s.max())) + st.latency_s) if L_moe else 0.0,
        period_parts_s=parts, period_s=period, bottleneck=bottleneck, latency0_s=latency0, cycle_s=cycle,
        tokens_per_s=tokens_per_s, tokens_per_s_per_rank=tokens_per_s / world,
        latency_s=M * cycle, front_util=parts["front compute"] / cycle,
        expert_util_mean=float(st.expert_rank_s.mean()) / cycle if L_moe else 0.0,
        expert_util_max=float(st.expert_rank_s.max()) / cycle if L_moe else 0.0,
        in_flight_needed=in_flight_needed, tokens_in_flight=F * M * T,
        tokens_in_flight_needed=F * in_flight_needed * T,
        tokens_in_flight_to_saturate=L_moe * ridge * E / K,
        front_ranks_to_balance=_front_ranks_to_balance(cfg, hw, layout) if L_moe else F,
        flops_per_token=flops, tflops_per_rank=tflops_per_rank,
        useful_flop_fraction=tflops_per_rank * 1e12 / hw.flops_per_s,
    )


def _front_ranks_to_balance(cfg: ModelConfig, hw: Hardware, layout: Layout) -> int:
    """Smallest F whose (even) expert load keeps an expert rank as busy per step as a front is: fewer
    fronts leave experts idle, more leave fronts waiting.  The front's time does not depend on F."""
    def gap(F: int) -> float:
        st = stage_times(cfg, hw, Layout(F, layout.micro_batch_tokens, layout.in_flight, layout.seq_len,
                                         layout.experts_per_rank, layout.dtype))
        front = max(float(st.front_stage_s.sum()), cfg.n_moe_layers * max(st.front_send_s, st.front_recv_s))
        return float(st.expert_rank_s.max()) - front
    lo, hi = 1, 1
    if gap(lo) >= 0:
        return 1
    while gap(hi) < 0:
        lo, hi = hi, hi * 2
        if hi > 1 << 24:
            return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if gap(mid) < 0 else (lo, mid)
    return hi


def placements(cfg: ModelConfig, hw: Hardware, layout: Layout, experts_per_rank: list[int],
               expert_load: np.ndarray | None = None) -> list[Plan]:
    """The same fronts and micro-batches with k experts of a layer per expert rank, for each k."""
    out = []
    for k in experts_per_rank:
        lay = Layout(layout.front_ranks, layout.micro_batch_tokens, layout.in_flight, layout.seq_len, k,
                     layout.dtype)
        out.append(plan(cfg, hw, lay, expert_load))
    return out


def device_load_s(cfg: ModelConfig, hw: Hardware, layout: Layout, device_of_rank: list[int],
                  expert_load: np.ndarray | None = None) -> dict[int, float]:
    """Busy time per step of each device when several ranks share it (``device_of_rank[r]`` for every
    rank: fronts first, then the expert ranks layer by layer).  A device runs one rank's kernels at a
    time, so its ranks' device work adds up; the fixed per-op cost is the host's and is left out."""
    world = layout.world_size(cfg)
    if len(device_of_rank) != world:
        raise ValueError(f"device_of_rank has {len(device_of_rank)} entries for a world of {world} ranks")
    st = stage_times(cfg, replace(hw, op_overhead_us=0.0), layout, expert_load)
    work = [float(st.front_stage_s.sum())] * layout.front_ranks + [float(x) for x in st.expert_rank_s.ravel()]
    load: dict[int, float] = {}
    for dev, w in zip(device_of_rank, work):
        load[dev] = load.get(dev, 0.0) + w
    return load


def host_overhead(cfg: ModelConfig, hw: Hardware, *, front_ranks: int, micro_batch_tokens: int, seq_len: int,
                  tokens: float, cpu_seconds: float) -> float:
    """Seconds of the shared cores a run took per CPU-second of the model's work
    (``Hardware.host_overhead``): ``cpu_seconds`` (e.g. its scoring time x the cores it had, or the CPU
    time its ranks used) over what the model charges for its tokens, the fronts' work plus the experts'
    (both scale with the tokens; F x T tokens make one step)."""
    hw = replace(hw, host_overhead=1.0)
    st = stage_times(cfg, hw, Layout(front_ranks, micro_batch_tokens, 1, seq_len))
    work_per_step = front_ranks * float(st.front_stage_s.sum()) + float(st.expert_rank_s.sum())
    model = tokens / (front_ranks * micro_batch_tokens) * work_per_step
    if not (model > 0 and cpu_seconds > 0):
        raise ValueError(f"cannot take a host overhead from {cpu_seconds} CPU-s for {model} s of modelled work")
    return cpu_seconds / model
