"""The NCCL baselines of ``gpu_exchange.py``, moving the same rows between the same ranks as the
transports it times: ``all_to_all_single`` (plain, and fused: one call carrying a dispatch and the
previous combine), the same messages posted straight over the NCCL transport's own 2-rank pair groups
with every row count known in advance (``time_pairs``: the ceiling of that transport's design), and the
host time to post one operation."""
from __future__ import annotations

import time

import numpy as np
import torch
import torch.distributed as dist
from mpi4py import MPI

PAIRS = "NCCL point-to-point, no control plane"


def rows_for(tokens: int, top_k: int, n_experts: int) -> list[int]:
    """A front's rows per expert for a micro-batch: T*K rows split as evenly as possible."""
    n = tokens * top_k
    return [n // n_experts + (1 if e < n % n_experts else 0) for e in range(n_experts)]


def time_all_to_all(layout, role, args, tokens, hidden, dtype, device, fused: bool) -> float:
    """NCCL all_to_all_single moving the same rows between the same ranks (one MoE layer)."""
    world = dist.get_world_size()
    rows = rows_for(tokens, args.top_k, layout.n_experts)
    F, E = layout.n_fronts, layout.n_experts
    if role.kind == "front":
        send = [0] * F + rows               # dispatch: this front's rows to each expert
        recv = [0] * F + rows               # combine: the rows back
    else:
        send = [rows[role.expert]] * F + [0] * E
        recv = [rows[role.expert]] * F + [0] * E
    assert len(send) == world
    n_send, n_recv = sum(send), sum(recv)
    if role.kind == "front":
        disp_in, disp_out, disp_si, disp_so = n_send, 0, send, [0] * world
        comb_in, comb_out, comb_si, comb_so = 0, n_recv, [0] * world, recv
    else:
        disp_in, disp_out, disp_si, disp_so = 0, n_recv, [0] * world, recv
        comb_in, comb_out, comb_si, comb_so = n_send, 0, send, [0] * world
    bufs = {k: torch.randn(max(n, 1), hidden, device=device).to(dtype)
            for k, n in (("di", disp_in), ("do", disp_out), ("ci", comb_in), ("co", comb_out))}

    def a2a(inp, out, si, so):
        dist.all_to_all_single(out[: sum(so)], inp[: sum(si)], output_split_sizes=so, input_split_sizes=si)

    def step_plain():
        a2a(bufs["di"], bufs["do"], disp_si, disp_so)
        a2a(bufs["ci"], bufs["co"], comb_si, comb_so)

    # fused: this rank sends its dispatch rows and its combine rows in one call
    f_si = [a + b for a, b in zip(disp_si, comb_si)]
    f_so = [a + b for a, b in zip(disp_so, comb_so)]
    f_in = torch.randn(max(sum(f_si), 1), hidden, device=device).to(dtype)
    f_out = torch.empty(max(sum(f_so), 1), hidden, device=device, dtype=dtype)

    def step_fused():
        a2a(f_in, f_out, f_si, f_so)

    step = step_fused if fused else step_plain
    n = args.micro_batches + (1 if fused else 0)   # fused: one more call drains the last combine
    for _ in range(min(n, args.warm_up)):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return MPI.COMM_WORLD.allreduce(time.perf_counter() - t0, op=MPI.MAX)


def pair_groups(comms, layout, device, tr) -> dict:
    """The 2-rank groups, one per direction of every front-expert pair: the NCCL transport's own on GPUs
    (made and warmed up when it was built), gloo ones made here on CPUs (every rank makes every group,
    in one order)."""
    if device.type == "cuda":
        return tr.net.groups
    me, groups = comms.world.Get_rank(), {}
    experts = range(layout.n_fronts, layout.world_size)
    for a in range(layout.n_fronts):
        for b in experts:
            for src, dst in ((a, b), (b, a)):
                g = dist.new_group([a, b], backend="gloo")
                if me in (a, b):
                    groups[(src, dst)] = g
    return groups


def time_pairs(groups, comms, layout, role, args, tokens, hidden, dtype, device, xs,
               n_steps: int | None = None) -> tuple[float, int]:
    """The same micro-batches over the same 2-rank NCCL groups as the transport, posted straight through
    torch.distributed in step order, with no control plane: every row count is known in advance, so a
    front posts a micro-batch's sends and its reply receives at once (each next layer's sends queued on
    the GPU behind the last layer's receives) and an expert its receives and, queued behind them, its
    replies.  What point-to-point NCCL can do for this pattern; the transport's distance from it is the
    cost of its protocol (row counts, go-aheads, polling)."""
    rows = rows_for(tokens, args.top_k, layout.n_experts)
    offsets = np.concatenate([[0], np.cumsum(rows)]).tolist()
    F, E, me = layout.n_fronts, layout.n_experts, comms.world.Get_rank()
    steps = range(args.micro_batches if n_steps is None else n_steps)
    comms.world.Barrier()
    t0 = time.perf_counter()
    bad = 0
    if role.kind == "front":
        window, outs, sends = [], {}, []
        for s in steps:
            x = xs[s]
            for layer in range(layout.n_moe_layers):
                y = torch.empty_like(x)
                works = []
                for e in range(E):
                    peer = F + layer * E + e
                    lo, hi = offsets[e], offsets[e + 1]
                    sends.append(dist.isend(x[lo:hi], dst=peer, group=groups[(me, peer)]))
                    works.append(dist.irecv(y[lo:hi], src=peer, group=groups[(peer, me)]))
                for w in works:         # the next layer's sends wait for these rows (on the GPU)
                    w.wait()
                x = y
            outs[s] = x
            window.append(works)
            if device.type == "cuda" and len(window) >= args.in_flight:   # (gloo's wait() blocked)
                while not all(w.is_completed() for w in window[0]):
                    time.sleep(0)
                window.pop(0)
                sends = [w for w in sends if not w.is_completed()]
        for w in sends:     # each work waited for once: gloo's wait() hangs on one it has waited for
            w.wait()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        bad = sum(int(not torch.equal(outs[s], xs[s])) for s in steps)
    else:
        n = rows[role.expert]
        sends = []
        for s in steps:
            bufs, works = [], []
            for f in range(F):
                bufs.append(torch.empty(n, hidden, dtype=dtype, device=device))
                works.append(dist.irecv(bufs[-1], src=f, group=groups[(f, me)]))
            for f, (buf, w) in enumerate(zip(bufs, works)):
                w.wait()
                sends.append(dist.isend(buf, dst=f, group=groups[(me, f)]))
            sends = [w for w in sends if not w.is_completed()]
        for w in sends:
            w.wait()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = comms.world.allreduce(time.perf_counter() - t0, op=MPI.MAX)
    return elapsed, comms.world.allreduce(bad, op=MPI.SUM)


def post_overhead(tr, groups, comms, layout, hidden, dtype, device, n: int = 200) -> dict:
    """Host microseconds to post one NCCL point-to-point operation (through the transport's groups,
    as the runtime posts them) and one MPI Isend of a control message, between front 0 and the
    first expert; every rank takes part in the closing reduction."""
    me, a, b = comms.world.Get_rank(), 0, layout.n_fronts
    out = {}
    if me in (a, b) and hasattr(tr, "net") and tr.channel(comms.layers[0], b if me == a else a) is tr.nccl:
        x = torch.zeros(1, hidden, dtype=dtype, device=device)
        works, t_post = [], 0.0
        for _ in range(n):
            ready = tr.net.ready()
            t0 = time.perf_counter()
            works.append(tr.net.isend(x, b, ready) if me == a else tr.net.irecv(x, a, ready))
            t_post += time.perf_counter() - t0
        for w in works:
            w.wait()
        out["nccl_send_post_us" if me == a else "nccl_recv_post_us"] = 1e6 * t_post / n
        # the same operation as ProcessGroup.send/recv called directly: no torch.distributed argument
        # checks, no side stream, no event: what is left is ProcessGroupNCCL's own and NCCL's
        group = groups[(a, b)]          # the a-to-b direction, on both sides
        peer = dist.get_group_rank(group, b if me == a else a)
        works, t_post = [], 0.0
        for _ in range(n):
            t0 = time.perf_counter()
            works.append(group.send([x], peer, 0) if me == a else group.recv([x], peer, 0))
            t_post += time.perf_counter() - t0
        for w in works:
            w.wait()
        out["pg_send_post_us" if me == a else "pg_recv_post_us"] = 1e6 * t_post / n
        buf = np.zeros(2, dtype=np.int64)
        t_post, reqs = 0.0, []
        for _ in range(n):
            t0 = time.perf_counter()
            reqs.append(comms.world.Isend([buf, MPI.INT64_T], dest=b, tag=5) if me == a
                        else comms.world.Irecv([buf.copy(), MPI.INT64_T], source=a, tag=5))
            t_post += time.perf_counter() - t0
        MPI.Request.Waitall(reqs)
        out["mpi_isend_post_us" if me == a else "mpi_irecv_post_us"] = 1e6 * t_post / n
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    merged = {}
    for d in comms.world.allgather(out):
        merged.update(d)
    return merged
