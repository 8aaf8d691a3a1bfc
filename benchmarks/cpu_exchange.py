"""The exchange's achieved bandwidth: our transport's dispatch + combine against plain mpi4py.

Launched under mpiexec by ``cpu_runtime.py`` (world = 1 front + E experts of one MoE layer, laid out
and connected exactly as the runtime does it: ``Layout`` + ``Communicators.create``).  For each row
count, one round trip is:

* ``transport``: the front's ``MPITransport.dispatch`` of E x rows rows (E messages) until its handle
  tests complete; each expert ``expect``s, takes ``rows()`` and ``reply``s them unchanged (no MLP);
* ``raw``: the same bytes between the same ranks with plain ``Irecv``/``Isend`` on preallocated numpy
  buffers and ``Waitall``: the floor the transport is measured against;
* ``raw-alloc``: ``raw`` receiving into buffers allocated in each round (``np.empty``), as the
  transport does (``torch.empty`` per dispatch and per expect): separates the cost of first-touching
  fresh pages from the transport's own bookkeeping.

How ranks wait (``--wait``): ``spin`` polls the transport's ``test()`` without pause and uses MPI's own
``Waitall`` for raw (the floor, when every rank has a core); ``backoff`` polls both with the runtime's
``Backoff`` sleeps, which is how the runtime waits and the only fair choice with more ranks than cores.
The implementations alternate in rounds, so load from other jobs falls on all alike.  Bytes counted per round trip
are both directions: 2 x E x rows x hidden x element size.  Rank 0 writes a JSON list of samples.

    mpiexec -n 1+E python benchmarks/cpu_exchange.py OUT.json --experts E --hidden 7168 --rows 8,64,512 [--wait backoff]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch
from mpi4py import MPI

from moe_mpi.parallel.exchange import MPITransport
from moe_mpi.parallel.topology import Communicators, Layout
from moe_mpi.runtime.metrics import Backoff

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


WAIT = "spin"   # how a rank waits: "spin" (poll without pause) or "backoff" (the runtime's Backoff)


def wait(test) -> None:
    """Poll ``test()`` until it returns True, the way WAIT says."""
    backoff = Backoff()
    while not test():
        if WAIT == "backoff":
            backoff.pause()


def waitall(reqs: list) -> None:
    """Plain MPI completion: Waitall (MPI's own wait) when spinning, else Testall with the back-off."""
    if WAIT == "spin":
        MPI.Request.Waitall(reqs)
    else:
        wait(lambda: MPI.Request.Testall(reqs))


def transport_round(tr: MPITransport, rank: int, step: int, x_ND: torch.Tensor, E: int, rows: int) -> float:
    t0 = time.perf_counter()
    if rank == 0:
        ex = tr.dispatch(0, step, x_ND, [e * rows for e in range(E + 1)])
        wait(ex.test)
        ex.result()
    else:
        recv = tr.expect(0, step, [0], [rows])
        wait(recv.test)
        wait(tr.reply(0, step, [0], recv.rows()).test)
    return time.perf_counter() - t0


def raw_round(comm, rank: int, x: np.ndarray, y: np.ndarray | None, E: int, nbytes: int) -> float:
    """x, y: the front's (E, nbytes) send and receive buffers; an expert uses x[0] as its buffer.
    ``y=None``: receive into buffers allocated in the round, as the transport does."""
    t0 = time.perf_counter()
    if y is None:
        y = np.empty((E, nbytes), np.uint8)
        if rank != 0:
            x = np.empty((1, nbytes), np.uint8)
    if rank == 0:
        reqs = []
        for e in range(E):
            reqs.append(comm.Irecv([y[e], MPI.BYTE], source=1 + e, tag=1))
            reqs.append(comm.Isend([x[e], MPI.BYTE], dest=1 + e, tag=1))
        waitall(reqs)
    else:
        waitall([comm.Irecv([x[0], MPI.BYTE], source=0, tag=1)])
        waitall([comm.Isend([x[0], MPI.BYTE], dest=0, tag=1)])
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--experts", type=int, required=True)
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--rows", default="8,64,512", help="rows per expert message, comma-separated")
    ap.add_argument("--dtypes", default="float32", help="comma-separated: float32, bfloat16")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--wait", choices=("spin", "backoff"), default="spin",
                    help="spin: poll test() / MPI Waitall; backoff: both poll with the runtime's Backoff "
                         "(for more ranks than cores, where spinning ranks starve the ones with work)")
    args = ap.parse_args()
    global WAIT
    WAIT = args.wait

    world = MPI.COMM_WORLD
    E, D = args.experts, args.hidden
    layout = Layout(n_fronts=1, n_moe_layers=1, n_experts=E)
    if world.Get_size() != layout.world_size:
        raise SystemExit(f"cpu_exchange.py: run with {layout.world_size} ranks (1 front + {E} experts)")
    torch.set_num_threads(1)
    comms = Communicators.create(world, layout)
    raw_comm = world.Dup()
    rank = world.Get_rank()
    samples = []
    step = 0
    for dtype_name in args.dtypes.split(","):
        dtype = DTYPES[dtype_name]
        tr = MPITransport(comms.layers, n_fronts=1, hidden=D, dtype=dtype)
        for rows in (int(r) for r in args.rows.split(",")):
            x_ND = torch.randn(E * rows, D).to(dtype)
            nbytes = rows * D * x_ND.element_size()
            x = np.ones((E, nbytes), np.uint8)
            y = np.empty((E, nbytes), np.uint8)
            times = {"transport": [], "raw": [], "raw-alloc": []}
            for _ in range(2):  # warm-up: first touches of buffers and the MPI connections
                transport_round(tr, rank, step, x_ND, E, rows)
                raw_round(raw_comm, rank, x, y, E, nbytes)
                step += 1
            for r in range(args.rounds):
                order = ("transport", "raw", "raw-alloc") if r % 2 == 0 else ("raw-alloc", "raw", "transport")
                for impl in order:
                    raw_comm.Barrier()
                    for _ in range(args.iters):
                        if impl == "transport":
                            times[impl].append(transport_round(tr, rank, step, x_ND, E, rows))
                            step += 1
                        else:
                            fresh = None if impl == "raw-alloc" else y
                            times[impl].append(raw_round(raw_comm, rank, x, fresh, E, nbytes))
            if rank == 0:
                moved = 2 * E * nbytes
                for impl, ts in times.items():
                    med = statistics.median(ts)
                    samples.append({"impl": impl, "experts": E, "wait": WAIT, "rows_per_expert": rows, "hidden": D,
                                    "dtype": dtype_name, "bytes_per_round_trip": moved,
                                    "round_trip_median_s": med, "round_trip_min_s": min(ts),
                                    "gbs_median": moved / med / 1e9, "gbs_best": moved / min(ts) / 1e9,
                                    "n": len(ts)})
    raw_comm.Free()
    comms.free()
    if rank == 0:
        with open(args.out, "w") as fh:
            json.dump(samples, fh, indent=1)


if __name__ == "__main__":
    main()
