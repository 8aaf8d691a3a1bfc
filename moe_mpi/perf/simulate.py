"""A discrete-event simulator of the front/expert pipeline, vectorised over ranks.

Servers: each front's compute, its outgoing and incoming link; each expert rank's compute, incoming and
outgoing link.  A global micro-batch m is micro-batch m of every front at once (the expert of a layer
runs one batched MLP over what all fronts sent for m, DESIGN.md section 4), so one event moves all fronts
or all expert ranks of one layer a stage forward with numpy: the paper scale (61 layers, 14,848 expert
ranks) is about 240 events per micro-batch, not one per rank per token.  Fronts all carry T tokens per
micro-batch, so they move in lockstep and one stands for all of them, unless they compete for cores.

The stages of micro-batch m (front stage i is layer i's attention and MLP or router, see
``analytic.Stages``):

    FRONT(i) -> [DISPATCH(l) -> EXPERT(l) -> COMBINE(l)] -> FRONT(i+1) ... -> FRONT(L) (the head)

Each server works in first-come order of the events' earliest ready time; its start is
max(ready, free).  Link contention: a front's sends (or receives) of different layers and micro-batches
queue on its one link, and an expert rank's transfer takes at least its bytes / bandwidth after the first
front started sending.  A front's micro-batch slot is reused by micro-batch m + M when m leaves the head.
On a CPU box whose ranks share a few cores (``Hardware.shared_cores``) a rank computes only while it holds
a core; ranks that share a GPU take turns on it or get time slices (``gpu_sharing``).  Not modelled:
network topology beyond in-node / between nodes, CPU time spent in MPI copies.
"""
from __future__ import annotations

import heapq
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..config import ModelConfig
from . import analytic
from .analytic import Layout
from .hardware import DTYPE_BYTES, Hardware

FRONT, DISPATCH, EXPERT, COMBINE = range(4)


@dataclass(frozen=True)
class SimResult:
    tokens_per_s: float         # in the steady window (after a quarter of the micro-batches, before the drain)
    latency_s: float            # mean micro-batch latency in the window
    latency_p50_s: float        # its median
    front_util: float
    expert_util_mean: float
    expert_util_max: float
    n_micro_batches: int        # global micro-batches simulated (each = one per front)
    n_events: int
    sim_time_s: float           # simulated time until the last micro-batch left
    wall_s: float               # real time the simulation took
    trace_events: list | None   # Chrome-trace spans of the traced ranks

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "trace_events"}
        d["traced_spans"] = None if self.trace_events is None else len(self.trace_events)
        return d


class _Trace:
    """Chrome-trace spans of the first few ranks of each group (all would be millions at paper scale)."""

    def __init__(self, max_per_group: int | None):
        self.cap = max_per_group
        self.events: list[dict] = []

    def spans(self, first_rank: int, n: int, start: np.ndarray, end: np.ndarray, cat: str, name: str,
              args: dict) -> None:
        """Spans of ranks first_rank .. first_rank+n-1; a length-1 start/end stands for all n."""
        keep = n if self.cap is None else min(n, self.cap)
        start, end = np.broadcast_to(start, (n,)), np.broadcast_to(end, (n,))
        for j in range(keep):
            if end[j] > start[j]:
                self.events.append({"name": name, "ph": "X", "ts": float(start[j]) * 1e6,
                                    "dur": float(end[j] - start[j]) * 1e6, "pid": first_rank + j, "tid": 0,
                                    "cat": cat, "args": args})


class _Shared:
    """Servers that ranks share, in groups: the cores of each node on a CPU box (``cores``), or one GPU
    per group (``devices``, processes on one GPU take turns on it).  A compute span starts once its rank
    is free and one of its group's servers is."""

    def __init__(self, group_of_rank: np.ndarray, per_group: int):
        self.group = np.asarray(group_of_rank, dtype=int)
        self.free = np.zeros((int(self.group.max()) + 1, per_group))

    @classmethod
    def cores(cls, hw: Hardware, world: int) -> "_Shared":
        per_node = world if hw.ranks_per_node is None else hw.ranks_per_node
        return cls(np.arange(world) // per_node, hw.shared_cores)

    @classmethod
    def devices(cls, devices) -> "_Shared":
        """``devices``: the GPU of every rank, fronts first, then each MoE layer's expert ranks."""
        return cls(devices, 1)

    def start(self, first_rank: int, ready: np.ndarray, dur: np.ndarray) -> np.ndarray:
        dur = np.broadcast_to(dur, ready.shape)
        start = ready.copy()
        for j in np.argsort(ready, kind="stable"):      # earliest-ready rank takes the earliest-free server
            if dur[j] <= 0:
                continue
            g = self.group[first_rank + j]
            c = int(np.argmin(self.free[g]))
            start[j] = max(ready[j], self.free[g, c])
            self.free[g, c] = start[j] + dur[j]
        return start


class _Pipeline:
    """Servers' free times and one handler per kind of event.  A handler takes the time its stage is
    ready (per simulated front, or per expert rank R of the layer), books the servers it uses and
    returns when the next stage is ready."""

    def __init__(self, cfg: ModelConfig, hw: Hardware, layout: Layout, st: analytic.Stages,
                 window: tuple[int, int], rng: np.random.Generator | None, trace: _Trace | None,
                 devices=None, front_host_s=None, gpu_sharing: str = "turns", expert_load=None):
        self.cfg, self.hw, self.layout, self.st, self.rng, self.tr = cfg, hw, layout, st, rng, trace
        self.F, self.R = layout.front_ranks, layout.ranks_per_layer(cfg)
        world = layout.world_size(cfg)
        if devices is not None and len(devices) != world:
            raise ValueError(f"devices: {len(devices)} entries for {world} ranks")
        if devices is not None and hw.shared_cores is not None:
            raise ValueError("devices and shared cores: model one kind of sharing at a time")
        if gpu_sharing not in ("turns", "slices"):
            raise ValueError(f"gpu_sharing: {gpu_sharing!r}, expected 'turns' or 'slices'")
        slices = devices is not None and gpu_sharing == "slices"
        self.shared = (_Shared.cores(hw, world) if hw.shared_cores is not None
                       else _Shared.devices(devices) if devices is not None and not slices else None)
        # Time slices: every process on a GPU holds a kernel there nearly all the time (its work, or an
        # NCCL receive posted ahead of its data, which spins), so each runs at 1/k of a GPU that k
        # processes share; only the device part of a stage stretches, not its per-kernel host time.
        self.stretch_front = self.stretch_LR = self.device_front_s = None
        if slices:
            k = np.bincount(np.asarray(devices, dtype=int))[np.asarray(devices, dtype=int)].astype(float)
            self.stretch_front = k[:self.F]
            self.stretch_LR = k[self.F:].reshape(cfg.n_moe_layers, self.R)
            # the device part of each front stage: its roofline, without the per-kernel host time
            self.device_front_s = analytic.stage_times(cfg, replace(hw, op_overhead_us=0.0), layout,
                                                       expert_load).front_stage_s
        # identical fronts stay in lockstep: one stands for all, unless they share cores or GPUs or
        # differ in host time
        self.Fv = self.F if (self.shared or front_host_s is not None or slices) else 1
        # a front's host time per micro-batch (a floor under its stages), spread over the stages as
        # their device times are
        host = None if front_host_s is None else np.broadcast_to(np.asarray(front_host_s, float), (self.Fv,))
        self.host_share = None if host is None else host[None, :] * (
            st.front_stage_s / max(float(st.front_stage_s.sum()), 1e-30))[:, None]
        self.front_free, self.front_out_free, self.front_in_free = (np.zeros(self.Fv) for _ in range(3))
        L_moe = cfg.n_moe_layers
        self.rank_free, self.rank_in_free, self.rank_out_free = (np.zeros((L_moe, self.R)) for _ in range(3))
        self.bw, _ = hw.link(world)
        self.window = window
        self.front_spans: list = []                 # (start, end) of every front stage, mean over fronts
        self.hot_R = st.expert_rank_s.argmax(axis=1) if L_moe else np.zeros(0, int)   # busiest rank
        self.hot_spans: list = []                   # (layer, start, end, busy) of each layer's hot rank
        self.busy_LR = np.zeros((L_moe, self.R))    # compute seconds of the window's micro-batches

    def front(self, m: int, i: int, ready: np.ndarray) -> np.ndarray:
        """Stage i of micro-batch m on the fronts (layer i, or the head when i = L)."""
        st = self.st
        s0 = s = np.maximum(ready, self.front_free)
        if self.shared:
            s = self.shared.start(0, s, np.full(self.Fv, st.front_stage_s[i]))
        dur = st.front_stage_s[i]
        if self.stretch_front is not None:
            dur = dur + (self.stretch_front - 1.0) * self.device_front_s[i]
        e = s + dur
        if self.host_share is not None:
            e = np.maximum(e, s0 + self.host_share[i])
        self.front_free = e
        self.front_spans.append((float(s.sum()) / self.Fv, float(e.sum()) / self.Fv))
        if self.tr:
            L = self.cfg.num_hidden_layers
            self.tr.spans(0, self.F, s, e, "compute", "head" if i == L else f"layer {i}", {"mb": m, "layer": i})
        return e

    def dispatch(self, m: int, i: int, ready: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Fronts send to layer i's expert ranks; returns (ready per rank, compute s, transfer s)."""
        st, l = self.st, self.cfg.moe_index(i)
        s = np.maximum(ready, self.front_out_free)
        e = s + st.front_send_s
        self.front_out_free = e
        if self.rng is None:
            busy_R, xfer_R = st.expert_rank_s[l], st.rank_recv_s[l]
        else:
            busy_R, xfer_R = self._draw_rows(l)
        # The rank's link is busy for its transfer time only, streaming in as the fronts send; the
        # data is complete once the last front's send ended.
        in_start = np.maximum(s.min(), self.rank_in_free[l])
        self.rank_in_free[l] = in_start + xfer_R
        arrived = np.maximum(e.max(), in_start + xfer_R)
        if self.tr:
            args = {"mb": m, "layer": i}
            self.tr.spans(0, self.F, s, e, "send", f"dispatch {i}", args)
            self.tr.spans(self.F + l * self.R, self.R, in_start, arrived, "recv", f"dispatch {i}", args)
        return arrived + st.latency_s, busy_R, xfer_R

    def _draw_rows(self, l: int) -> tuple[np.ndarray, np.ndarray]:
        """One step's rows per expert drawn at random: (compute s, transfer s) per rank."""
        cfg, lay, b = self.cfg, self.layout, DTYPE_BYTES[self.layout.dtype or self.hw.dtype]
        total = self.F * lay.micro_batch_tokens * cfg.num_experts_per_tok
        share_E = self.st.rows_LE[l] / total
        rows_Rk = analytic.rank_groups(self.rng.multinomial(total, share_E)[None, :].astype(float),
                                       lay.experts_per_rank)[0]
        xfer_R = rows_Rk.sum(axis=1) * cfg.hidden_size * b / self.bw + self.F * self.hw.msg_overhead_s
        return analytic.expert_time_s(cfg, self.hw, rows_Rk, b).sum(axis=1), xfer_R

    def expert(self, m: int, i: int, ready: np.ndarray, busy_R: np.ndarray) -> np.ndarray:
        l = self.cfg.moe_index(i)
        s = np.maximum(ready, self.rank_free[l])
        if self.shared:
            s = self.shared.start(self.F + l * self.R, s, busy_R)
        if self.stretch_LR is not None:     # the expert's time is nearly all device time
            busy_R = busy_R * self.stretch_LR[l]
        e = s + busy_R
        self.rank_free[l] = e
        if self.window[0] <= m < self.window[1]:
            self.busy_LR[l] += busy_R
        j = self.hot_R[l]
        self.hot_spans.append((l, float(s[j]), float(e[j]), float(busy_R[j])))
        if self.tr:
            self.tr.spans(self.F + l * self.R, self.R, s, e, "compute", f"experts {i}", {"mb": m, "layer": i})
        return e

    def combine(self, m: int, i: int, ready: np.ndarray, xfer_R: np.ndarray) -> np.ndarray:
        """Expert ranks answer every front (as many rows as they got); returns the fronts' ready time."""
        st, l = self.st, self.cfg.moe_index(i)
        s = np.maximum(ready, self.rank_out_free[l])
        e = s + xfer_R
        self.rank_out_free[l] = e
        in_start = np.maximum(s.min(), self.front_in_free)
        self.front_in_free = in_start + st.front_recv_s
        arrived = np.maximum(e.max(), self.front_in_free)
        if self.tr:
            args = {"mb": m, "layer": i}
            self.tr.spans(self.F + l * self.R, self.R, s, e, "send", f"combine {i}", args)
            self.tr.spans(0, self.F, in_start, arrived, "recv", f"combine {i}", args)
        return arrived + st.latency_s


def simulate(cfg: ModelConfig, hw: Hardware, layout: Layout, expert_load: np.ndarray | None = None,
             n_micro_batches: int | None = None, routing_seed: int | None = None, trace: bool = False,
             trace_ranks_per_group: int | None = 8, devices=None, front_host_s=None,
             gpu_sharing: str = "turns") -> SimResult:
    """Run ``n_micro_batches`` global micro-batches (default max(8 M, 32), at least 3 M) through the
    pipeline and measure its steady state.

    ``expert_load`` (L_moe, E) sets each expert's share of the rows as in ``analytic.expert_rows``; with
    ``routing_seed`` every (micro-batch, layer) draws its rows per expert from a multinomial with those
    shares, so the busiest expert also varies by chance, as real routing does.  ``trace`` keeps
    Chrome-trace spans of the first ``trace_ranks_per_group`` fronts and expert ranks of each layer.
    ``devices`` (the GPU of every rank, fronts first, then each MoE layer's expert ranks) makes ranks
    that share a GPU share it as ``gpu_sharing`` says: ``"turns"``, one rank's work at a time, the GPU
    never idle while one has work; or ``"slices"``, time slices between processes as a GPU without MPS
    gives them, each of the k processes on a GPU running at 1/k of it all the time (each holds a kernel
    there nearly always: its work, or an NCCL receive posted ahead of its data, which spins; measured by
    ``benchmarks/gpu_sharing.py``).  ``front_host_s`` (seconds per micro-batch, one value or one per
    front) is a floor under each front's stages: the host time a front's loop needs per micro-batch
    (launching, reading, writing, posting), measured on a real run.  Latency is per front: from the
    micro-batch taking its slot at a front to its head finishing there.
    """
    t_wall = time.perf_counter()
    st = analytic.stage_times(cfg, hw, layout, expert_load)
    M, L = layout.in_flight, cfg.num_hidden_layers
    G = max(n_micro_batches or max(8 * M, 32), 3 * M, 4)
    window = _window(G, M)
    pipe = _Pipeline(cfg, hw, layout, st, window,
                     np.random.default_rng(routing_seed) if routing_seed is not None else None,
                     _Trace(trace_ranks_per_group) if trace else None, devices, front_host_s, gpu_sharing,
                     expert_load)
    started, done = np.zeros((G, pipe.Fv)), np.zeros((G, pipe.Fv))

    heap: list = []                 # (earliest ready time, sequence number, kind, micro-batch, layer)
    payload: dict = {}
    for m in range(min(M, G)):
        payload[(FRONT, m, 0)] = (np.zeros(pipe.Fv), None)
        heap.append((0.0, m, FRONT, m, 0))
    heapq.heapify(heap)
    n_events = seq = 0
    while heap:
        _, _, kind, m, i = heapq.heappop(heap)
        ready, extra = payload.pop((kind, m, i))
        n_events += 1
        if kind == FRONT:
            if i == 0:
                started[m] = ready                  # its slot came free: queueing counts as latency
            end = pipe.front(m, i, ready)
            if i == L:
                done[m] = end
                nxt = (FRONT, m + M, 0, end, None) if m + M < G else None
            elif st.moe_after_stage[i]:
                nxt = (DISPATCH, m, i, end, None)
            else:
                nxt = (FRONT, m, i + 1, end, None)
        elif kind == DISPATCH:
            at_R, busy_R, xfer_R = pipe.dispatch(m, i, ready)
            nxt = (EXPERT, m, i, at_R, (busy_R, xfer_R))
        elif kind == EXPERT:
            busy_R, xfer_R = extra
            nxt = (COMBINE, m, i, pipe.expert(m, i, ready, busy_R), xfer_R)
        else:
            nxt = (FRONT, m, i + 1, pipe.combine(m, i, ready, extra), None)
        if nxt is not None:
            k2, m2, i2, at, ex = nxt
            payload[(k2, m2, i2)] = (at, ex)
            seq += 1
            heapq.heappush(heap, (float(at.min()), seq, k2, m2, i2))

    return _steady_state(pipe, st, layout, G, started, done, n_events, time.perf_counter() - t_wall)


def _window(G: int, M: int) -> tuple[int, int]:
    """The steady window [lo, hi) of micro-batches: whole rounds of M, after a warm-up of a quarter and
    before the drain (once no new micro-batches enter, the last ones run faster than the steady state)."""
    lo = max(G // 4 // M * M, 1)
    return lo, lo + max((G - M - lo) // M * M, 1)


def _steady_state(pipe: _Pipeline, st: analytic.Stages, layout: Layout, G: int, started: np.ndarray,
                  done: np.ndarray, n_events: int, wall_s: float) -> SimResult:
    """Rates in the steady window (``_window``), between the completions of its first and last
    micro-batch.

    Two estimates of the time per global micro-batch, each of which runs short in a different
    transient, so the longer one is kept: (a) completions, which run ahead while a re-entrant front
    shifts its work in progress; (b) the work done in the window by the most utilised server (the
    fronts, or a layer's busiest expert rank), which runs ahead while that server drains a pile left
    by the start.
    """
    F, T = layout.front_ranks, layout.micro_batch_tokens
    lo, hi = pipe.window
    finished = np.sort(done.max(axis=1))
    t0, t1 = finished[lo], finished[hi]
    front_work = float(st.front_stage_s.sum())
    if pipe.stretch_front is not None:      # time slices: the mean front's stretched device work
        front_work += float((pipe.stretch_front - 1.0).mean()) * float(pipe.device_front_s.sum())
    if pipe.host_share is not None:
        front_work = max(front_work, float(pipe.host_share.sum(axis=0).max()))

    def busy_in_window(start: np.ndarray, end: np.ndarray) -> np.ndarray:
        return np.clip(end, t0, t1) - np.clip(start, t0, t1)

    spans = np.array(pipe.front_spans)
    utils = [(float(busy_in_window(spans[:, 0], spans[:, 1]).sum()) / (t1 - t0), front_work)]
    L_moe = st.expert_rank_s.shape[0]
    if pipe.hot_spans:
        hs = np.array(pipe.hot_spans)
        layer = hs[:, 0].astype(int)
        hot_util = np.bincount(layer, busy_in_window(hs[:, 1], hs[:, 2]), L_moe) / (t1 - t0)
        hot_work = np.bincount(layer, hs[:, 3], L_moe) / np.maximum(np.bincount(layer, None, L_moe), 1)
        utils += list(zip(hot_util, hot_work))
    util, work = max(utils)
    cycle = max(work / util, (t1 - t0) / (hi - lo))
    per_mb = hi - lo
    return SimResult(
        tokens_per_s=F * T / cycle,
        latency_s=float((done - started)[lo:hi].mean()),
        latency_p50_s=float(np.median((done - started)[lo:hi])),     # over micro-batches and fronts
        front_util=front_work / cycle,
        expert_util_mean=float(pipe.busy_LR.mean()) / (per_mb * cycle) if L_moe else 0.0,
        expert_util_max=float(pipe.busy_LR.max()) / (per_mb * cycle) if L_moe else 0.0,
        n_micro_batches=G, n_events=n_events, sim_time_s=float(finished[-1]), wall_s=wall_s,
        trace_events=pipe.tr.events if pipe.tr else None)


def write_trace(result: SimResult, path: str | Path, metadata: dict | None = None) -> None:
    """The traced spans as a Chrome-trace JSON file (chrome://tracing, Perfetto, ``moe-mpi report``)."""
    if result.trace_events is None:
        raise ValueError("this simulation kept no trace: run simulate(..., trace=True)")
    Path(path).write_text(json.dumps({"traceEvents": result.trace_events, "displayTimeUnit": "ms",
                                      "metadata": metadata or {}}))
