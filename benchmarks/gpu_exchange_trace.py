"""Where an IPC exchange's time goes: the exchange benchmark's IPC run with every message's life
stamped on every rank (one node, so the monotonic clock is shared), and each copy's start and end on
its GPU.  A diagnostic for the small micro-batches, whose time hardly depends on their size.

    mpiexec -n 4 python -m mpi4py benchmarks/gpu_exchange_trace.py --tokens 512 --out DIR

Writes DIR/exchange_trace_rank<r>.json (host stamps, GPU copy times) and prints a summary: per
message, the time from the sender's post to the receiver seeing in its mailbox that the copy landed,
and to the rows being taken; per step, each side's host time inside the transport.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from mpi4py import MPI

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_common import mpi_main  # noqa: E402
from gpu_exchange import make_transport, time_transport  # noqa: E402
from gpu_exchange_baselines import rows_for  # noqa: E402
from moe_mpi.parallel import ipc  # noqa: E402
from moe_mpi.parallel.devices import bind_device  # noqa: E402
from moe_mpi.parallel.nccl import init_process_group  # noqa: E402
from moe_mpi.parallel.topology import Communicators, Layout  # noqa: E402

STAMPS: list = []
COPIES: list = []       # (peer, slot, start event, end event)


def now() -> float:
    return time.monotonic()


def instrument() -> None:
    """Wrap the IPC operations so each stamps its stages ('landed': the receiver finds its mailbox says
    the copy is done; files from before the mailboxes also have 'control', the control word seen)."""
    send_init, send_one = ipc.IpcSend.__init__, ipc.IpcSend.send
    recv_init, recv_progress = ipc.IpcRecv.__init__, ipc.IpcRecv.progress
    # every take goes through the transport's take_out; sends go one by one (fill) or together (_send_batch)
    take_out, send_batch = ipc.IPCTransport.take_out, ipc.IPCTransport._send_batch
    fill = ipc.SendRing.fill

    def s_init(self, tr, comm, peer, step, *rest, **kw):
        self._stamp = (step, peer)
        STAMPS.append((now(), "send_made", step, peer))
        send_init(self, tr, comm, peer, step, *rest, **kw)

    def s_send(self, slot):
        t0 = now()
        send_one(self, slot)
        STAMPS.append((t0, "send_post_start", *self._stamp))
        STAMPS.append((now(), "send_posted", *self._stamp))

    def r_init(self, tr, comm, peer, step, *rest, **kw):
        self._stamp = (step, peer)
        STAMPS.append((now(), "recv_made", step, peer))
        recv_init(self, tr, comm, peer, step, *rest, **kw)

    def r_progress(self):
        out = recv_progress(self)
        if out:
            STAMPS.append((now(), "landed", *self._stamp))
        return out

    def t_take_out(self, recvs):
        t0 = now()
        take_out(self, recvs)
        t1 = now()
        for op, _, _ in recvs:
            STAMPS.append((t0, "take_start", *op._stamp))
            STAMPS.append((t1, "taken", *op._stamp))

    def t_send_batch(self, batch, ready):      # (GPUs only: the copy kernel's batches)
        t0 = now()
        # the launch's start and end on the GPU, the wait for the rows included
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(self.batch_stream)
        send_batch(self, batch, ready)
        b.record(self.batch_stream)
        for op, slot in batch:
            COPIES.append((op.ring.peer, slot, t0, a, b))
        t1 = now()
        for op, _ in batch:
            STAMPS.append((t0, "send_post_start", *op._stamp))
            STAMPS.append((t1, "send_posted", *op._stamp))

    def s_fill(self, slot, step, x, lo, n, ready):
        if not self.tr.cuda or not n:
            return fill(self, slot, step, x, lo, n, ready)
        # the copy's own start and end on the GPU, after the wait the transport puts before it
        if ready:
            self.tr.driver.wait(self.handle, ready)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(self.stream)
        fill(self, slot, step, x, lo, n, 0)
        b.record(self.stream)
        COPIES.append((self.peer, slot, now(), a, b))

    ipc.IpcSend.__init__, ipc.IpcSend.send = s_init, s_send
    ipc.IpcRecv.__init__, ipc.IpcRecv.progress = r_init, r_progress
    ipc.IPCTransport.take_out, ipc.IPCTransport._send_batch = t_take_out, t_send_batch
    ipc.SendRing.fill = s_fill


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fronts", type=int, default=2)
    p.add_argument("--experts", type=int, default=2)
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--micro-batches", type=int, default=16)
    p.add_argument("--in-flight", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="/tmp")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--report", metavar="DIR", help="only summarise the exchange_trace_rank*.json in DIR")
    args = p.parse_args()
    if args.report:
        ranks = [json.loads(f.read_text()) for f in sorted(Path(args.report).glob("exchange_trace_rank*.json"))]
        print(summary(ranks, argparse.Namespace(**ranks[0]["args"])) if "args" in ranks[0] else summary(ranks, args))
        return 0
    args.shuffle = False
    world = MPI.COMM_WORLD
    layout = Layout(args.fronts, 1, args.experts)
    comms = Communicators.create(world, layout)
    role = layout.role(world.Get_rank())
    device = bind_device(comms.world, args.device)
    init_process_group(comms.world, "nccl" if device.type == "cuda" else "gloo")
    instrument()
    rows = rows_for(args.tokens, args.top_k, layout.n_experts)
    tr = make_transport("ipc", comms, layout, args.hidden, torch.bfloat16, device, max(rows), args.in_flight + 1)
    order = list(range(args.micro_batches))
    xs = None
    if role.kind == "front":
        g = torch.Generator().manual_seed(role.front)
        xs = {s: torch.randn(sum(rows), args.hidden, generator=g).to(device, torch.bfloat16) for s in order}
    time_transport(tr, comms, layout, role, args, args.tokens, args.hidden, torch.bfloat16, device, [0, 1], xs)
    runs = []
    for _ in range(args.repeats):
        STAMPS.clear()
        COPIES.clear()
        t0 = now()
        t, bad, host, _ = time_transport(tr, comms, layout, role, args, args.tokens, args.hidden, torch.bfloat16,
                                      device, order, xs)
        runs.append({"t0": t0, "seconds": t, "bad": bad, "host": host})
    # the last stamped repeat's stamps; copy times on this rank's GPU (events synchronised by time_transport)
    ref = COPIES[0][3] if COPIES else None
    copies = [{"peer": peer, "slot": slot, "queued": q, "start_ms": ref.elapsed_time(a) if ref else 0.0,
               "ms": a.elapsed_time(b)} for peer, slot, q, a, b in COPIES]
    me = world.Get_rank()
    data = {"args": {k: v for k, v in vars(args).items() if k != "report"}, "rank": me, "role": role.kind, "runs": runs, "stamps": STAMPS, "copies": copies,
            "copy_ref_queued": COPIES[0][2] if COPIES else None}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, f"exchange_trace_rank{me}.json").write_text(json.dumps(data))
    everyone = world.gather(data, root=0)
    if me == 0:
        print(summary(everyone, args))
    comms.free()
    return 0


def summary(ranks: list[dict], args) -> str:
    """Per message stage times (median, microseconds) and each rank's busy time."""
    out = [f"IPC exchange, {args.tokens} tokens per micro-batch per front, {args.micro_batches} micro-batches, "
           f"{args.in_flight} in flight: " + ", ".join(f"{r['seconds'] * 1e3:.2f} ms" for r in ranks[0]["runs"])]
    for d in ranks:
        cp = [c["ms"] * 1e3 for c in d["copies"]]
        if cp:
            out.append(f"rank {d['rank']} ({d['role']}): {len(cp)} copies, median {statistics.median(cp):.1f} us, "
                       f"max {max(cp):.1f} us")
        by = {}
        for t, kind, step, peer in d["stamps"]:
            by.setdefault(kind, []).append(t)
        spans = [t1 - t0 for (t0, k0, *_), (t1, k1, *_) in zip(d["stamps"], d["stamps"][1:])
                 if k0 == "send_post_start" and k1 == "send_posted"]
        if spans:
            out.append(f"  posting a send: median {statistics.median(spans) * 1e6:.1f} us")
        takes = [t1 - t0 for (t0, k0, *_), (t1, k1, *_) in zip(d["stamps"], d["stamps"][1:])
                 if k0 == "take_start" and k1 == "taken"]
        if takes:
            out.append(f"  taking a received message: median {statistics.median(takes) * 1e6:.1f} us")
        starts = sorted((step, t) for t, kind, step, peer in d["stamps"] if kind == "take_start" and peer == 0)
        gaps = [t1 - t0 for (_, t0), (_, t1) in zip(starts, starts[1:])]
        if d["role"] == "expert" and gaps:
            per_step = len(spans) / max(len(starts), 1)
            out.append(f"  one step to the next (its first take): median {statistics.median(gaps) * 1e6:.0f} us, of which "
                       f"about {per_step * statistics.median(spans) * 1e6:.0f} us posting sends and "
                       f"{per_step * statistics.median(takes) * 1e6:.0f} us taking messages")
    # message latencies: sender's post -> receiver's control/landed/taken, matched by (step, ranks)
    posted, seen = {}, {}
    for d in ranks:
        for t, kind, step, peer in d["stamps"]:
            if kind == "send_posted":
                posted[(d["rank"], peer, step)] = t
            elif kind in ("control", "landed", "taken"):
                seen.setdefault((peer, d["rank"], step), {})[kind] = t
    # peers are layer-communicator ranks; with one MoE layer they equal world ranks
    for direction, test in (("dispatch", lambda s, r: s < args.fronts), ("combine", lambda s, r: s >= args.fronts)):
        lat = {k: [] for k in ("control", "landed", "taken")}
        for (s, r, step), t in posted.items():
            if not test(s, r) or (s, r, step) not in seen:
                continue
            for k in lat:
                if k in seen[(s, r, step)]:
                    lat[k].append(seen[(s, r, step)][k] - t)
        out.append(f"{direction}: post -> " + ", ".join(
            f"{k} median {statistics.median(v) * 1e6:.0f} us (max {max(v) * 1e6:.0f})" for k, v in lat.items() if v))
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(mpi_main(main))
