"""The IPC transport's host cost per micro-batch without a GPU: its CUDA path run on CPU processes with
the driver stubbed, so the Python of a front's dispatch and result, and of an expert's step, can be
measured and profiled on any machine (device time is scarce; `gpu_exchange.py`'s posting column is the
same work with the real driver calls).

    mpiexec -n 4 python -m mpi4py benchmarks/ipc_host_model.py [--steps 3000] [--profile] [--kernel]

Four ranks: 2 fronts + 1 MoE layer x 2 experts, the exchange benchmark's layout.  The transport is built
on shared memory (its CPU backend), then rank 0 (a front) and afterwards rank 2 (an expert) switch to
the CUDA code path: a stub driver counts each call and makes the mailbox writes the GPU's stream would
make, and the rank plays its peers' part by writing their mailbox words (every message arrives at
once, every slot comes back at once), so only this rank's host work is timed.  No rows move: the stub
makes no copies.  ``torch.Tensor.record_stream`` is a no-op there (a C++ call of about 1 us on a GPU
host, `gpu_ipc_costs_nvidia-h200.md`), a real driver call costs 2-5 us on top of its Python here, and
the expert's joined tensor comes from the CPU's allocator rather than the GPU's caching one.
Prints, per micro-batch, each call's microseconds and the driver calls made; ``--out`` writes the JSON.
"""
from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
import time
import types
from pathlib import Path

import torch
from mpi4py import MPI

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_common import mpi_main  # noqa: E402
from moe_mpi.parallel import ipc  # noqa: E402
from moe_mpi.parallel.ipc_rings import FILLED, FREED, filled_word  # noqa: E402
from moe_mpi.parallel.peer_copy import SEGMENTS  # noqa: E402
from moe_mpi.parallel.topology import Communicators, Layout  # noqa: E402


class StubDriver:
    """The ``Driver`` calls the transport's hot path makes: counted, and the mailbox writes made on the
    host (an address here is a (words, slot, word) triple)."""

    def __init__(self):
        self.calls, self.events = 0, 0

    def copy_async(self, dst, src, nbytes, stream):
        self.calls += 1

    def record(self, event, stream):
        self.calls += 1

    def wait(self, stream, event):
        self.calls += 1

    def new_event(self):
        self.events += 1
        return self.events

    def write_value(self, stream, address, value):
        self.calls += 1
        words, slot, word = address
        words[slot, word] = value

    def write_values(self, stream, words):
        if len(words) > 2:          # as Driver.write_values: one batch call from three words on
            self.calls += 1
            for address, value in words:
                box, slot, word = address
                box[slot, word] = value
        else:
            for address, value in words:
                self.write_value(stream, address, value)


class StubKernel:
    """``SmCopy.copy_many`` as the signalling kernel makes it: a launch per SEGMENTS copies (counted as
    driver calls), the last of which writes the mailbox words (here, on the host)."""

    def __init__(self, driver: StubDriver):
        self.driver = driver

    def copy_many(self, copies, stream, words=()):
        n = sum(1 for _, _, nbytes in copies if nbytes >> 4)
        if n or words:
            self.driver.calls += max(1, -(-n // SEGMENTS))
        for (box, slot, word), value in words:
            box[slot, word] = value


def as_cuda(tr: ipc.IPCTransport, kernel: bool = False) -> StubDriver:
    """Switch a transport built on shared memory to its CUDA code path, with a stub driver; with
    ``kernel``, every message copied by the (stub) copy kernel, as ``MOE_MPI_IPC_SM_COPY_MB=0`` has it."""
    stub = StubDriver()
    tr.cuda, tr.driver, tr.sm_copy = True, stub, StubKernel(stub) if kernel else None
    tr.sm_copy_bytes = 0 if kernel else None
    tr.batch_stream = types.SimpleNamespace(cuda_stream=0)
    ipc.current_stream_handle = lambda device: 0
    torch.Tensor.record_stream = lambda self, stream: None
    for ring in tr.send_rings.values():
        ring.filled = [(ring.box, k, FILLED) for k in range(tr.slots)]
        ring.stream, ring.handle, ring.remote = None, 0, 1 << 40
    for i, ring in enumerate(tr.recv_rings.values()):
        ring.freed = [(ring.box, k, FREED) for k in range(tr.slots)]
        # a device address, as the GPU's allocation would give (the shared window's need not be 16-byte
        # aligned, which would send the take-outs down the copy engines' path under some MPIs)
        ring.base = (1 << 41) + i * tr.slots * tr.slot_bytes
    return stub


def model_front(tr, comm, experts: list[int], rows: int, steps: int, warm: int, prof) -> dict:
    """A front's dispatch, test and result per micro-batch, each expert replying at once."""
    x = torch.zeros(rows * len(experts), tr.hidden, dtype=tr.dtype)
    offsets = [rows * e for e in range(len(experts) + 1)]
    spent = dict.fromkeys(("dispatch", "test", "result"), 0.0)
    for s in range(steps):
        if s == warm and prof:
            prof.enable()
        t0 = time.perf_counter()
        h = tr.dispatch(0, s, x, offsets)
        t1 = time.perf_counter()
        for e in experts:         # the expert took the message out, and replied
            send = tr.send_rings[(id(comm), e)]
            send.box[:, FREED] = send.fills
            tr.recv_rings[(id(comm), e)].box[s % tr.slots, FILLED] = filled_word(s, rows)
        tr._passed = -1.0
        t2 = time.perf_counter()
        assert h.test()
        t3 = time.perf_counter()
        h.result()
        t4 = time.perf_counter()
        if s >= warm:
            for k, dt in zip(spent, (t1 - t0, t3 - t2, t4 - t3)):
                spent[k] += dt
    return spent


def model_expert(tr, comm, fronts: list[int], rows: int, steps: int, warm: int, depth: int, prof) -> dict:
    """An expert's step as the runtime makes it (receives posted ``depth`` ahead, joined, replied),
    every front's message there at once."""
    spent = dict.fromkeys(("expect", "test", "joined", "reply"), 0.0)
    recvs = {s: tr.expect(0, s, fronts, [rows] * len(fronts)) for s in range(depth)}
    replies = []
    for s in range(steps):
        for f in fronts:          # the front's message of step s arrived; the replies' slots came back
            tr.recv_rings[(id(comm), f)].box[s % tr.slots, FILLED] = filled_word(s, rows)
            send = tr.send_rings[(id(comm), f)]
            send.box[:, FREED] = send.fills
        tr._passed = -1.0
        if s == warm and prof:
            prof.enable()
        t0 = time.perf_counter()
        r = recvs.pop(s)
        assert r.test()
        t1 = time.perf_counter()
        x, counts = r.joined()
        t2 = time.perf_counter()
        replies.append(tr.reply_rows(0, s, r.senders, x, counts))
        t3 = time.perf_counter()
        recvs[s + depth] = tr.expect(0, s + depth, fronts, [rows] * len(fronts))
        t4 = time.perf_counter()
        replies = [h for h in replies if not h.test()]
        if s >= warm:
            for k, dt in zip(spent, (t4 - t3, t1 - t0, t2 - t1, t3 - t2)):
                spent[k] += dt
    return spent


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--warm-up", type=int, default=200)
    p.add_argument("--tokens", type=int, default=512, help="tokens per micro-batch per front (rows a message)")
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--in-flight", type=int, default=4)
    p.add_argument("--profile", action="store_true", help="print each modelled rank's cProfile, by own time")
    p.add_argument("--kernel", action="store_true",
                   help="every message by the copy kernel, which writes the mailbox words itself")
    p.add_argument("--out", help="write the results as JSON to this file")
    args = p.parse_args()
    world = MPI.COMM_WORLD
    layout = Layout(2, 1, 2)
    if world.Get_size() != layout.world_size:
        if world.Get_rank() == 0:
            print(f"run on {layout.world_size} ranks (2 fronts + 2 experts)", file=sys.stderr)
        return 2
    comms = Communicators.create(world, layout)
    tr = ipc.IPCTransport(comms.layers, layout.n_fronts, args.hidden, torch.bfloat16, torch.device("cpu"),
                          comms.world, args.tokens * layout.n_fronts, args.in_flight + 1, "shm")
    comm, me, results = tr.comms[0], world.Get_rank(), {}
    measured = args.steps - args.warm_up
    for rank, role in ((0, "front"), (2, "expert")):
        if me == rank:
            stub, prof = as_cuda(tr, args.kernel), cProfile.Profile() if args.profile else None
            if role == "front":
                spent = model_front(tr, comm, [2, 3], args.tokens, args.steps, args.warm_up, prof)
            else:
                spent = model_expert(tr, comm, [0, 1], args.tokens, args.steps, args.warm_up,
                                     max(2, args.in_flight), prof)
            per = {k: v / measured * 1e6 for k, v in spent.items()}
            results[role] = {"us": per, "total_us": sum(per.values()), "driver_calls": stub.calls / args.steps}
            print(f"{role} (2 peers): " + ", ".join(f"{k} {v:.1f}" for k, v in per.items())
                  + f"; {sum(per.values()):.1f} us a micro-batch, {stub.calls / args.steps:.1f} driver calls",
                  flush=True)
            if prof:
                prof.disable()
                pstats.Stats(prof).sort_stats("tottime").print_stats(15)
            if rank != 0:
                world.send(results[role], dest=0)
        elif me == 0 and rank != 0:
            results[role] = world.recv(source=rank)
        done = world.Ibarrier()         # the others sleep rather than spin while one rank is timed
        while not done.Test():
            time.sleep(0.001)
    if me == 0 and args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(mpi_main(main))
