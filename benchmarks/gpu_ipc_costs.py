"""Host cost of each call an IPC message makes (two ranks on two GPUs of one node): what posting a send
and taking a received message are made of.

    mpiexec -n 2 python -m mpi4py benchmarks/gpu_ipc_costs.py
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
from mpi4py import MPI

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_common import mpi_main  # noqa: E402
from moe_mpi.parallel.cuda_driver import Driver  # noqa: E402
from moe_mpi.parallel.peer_copy import SmCopy  # noqa: E402


def per_call_us(fn, n: int = 200) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e6


def main() -> int:
    comm = MPI.COMM_WORLD
    me, peer = comm.Get_rank(), 1 - comm.Get_rank()
    dev = torch.device("cuda", me)
    torch.cuda.set_device(dev)
    drv = Driver()
    rows, hidden = 512, 7168
    ring = torch.empty(2, rows, hidden, dtype=torch.bfloat16, device=dev)
    handle, off = drv.export(ring.data_ptr())
    evs = [torch.cuda.Event(interprocess=True) for _ in range(2)]
    theirs = comm.sendrecv((handle, off, [e.ipc_handle() for e in evs]), dest=peer, source=peer)
    remote = drv.open_handle(theirs[0]) + theirs[1]
    remote_evs = [torch.cuda.Event.from_ipc_handle(dev, h) for h in theirs[2]]
    comm.Barrier()
    s = torch.cuda.Stream(dev)
    cur = torch.cuda.current_stream(dev)
    x = torch.randn(rows, hidden, device=dev).to(torch.bfloat16)
    y = torch.empty_like(x)
    nbytes = x.numel() * 2
    plain = torch.cuda.Event()
    plain.record(cur)
    out = {}
    out["torch.cuda.Event()"] = per_call_us(lambda: torch.cuda.Event())
    out["Event.record (plain)"] = per_call_us(lambda: plain.record(cur))
    out["Event.record (interprocess, own)"] = per_call_us(lambda: evs[0].record(s))
    out["Stream.wait_event (plain)"] = per_call_us(lambda: s.wait_event(plain))
    torch.cuda.synchronize()
    comm.Barrier()
    out["Stream.wait_event (peer's interprocess)"] = per_call_us(lambda: s.wait_event(remote_evs[0]))
    out["Event.query (peer's interprocess)"] = per_call_us(lambda: remote_evs[1].query())
    out["Event.query (plain)"] = per_call_us(lambda: plain.query())
    torch.cuda.synchronize()
    out["cuMemcpyAsync 0 bytes (ctypes)"] = per_call_us(lambda: drv.copy_async(y.data_ptr(), x.data_ptr(), 0, s))
    out["cuMemcpyAsync 7.3 MB within GPU"] = per_call_us(lambda: drv.copy_async(y.data_ptr(), x.data_ptr(), nbytes, s), 50)
    torch.cuda.synchronize()
    out["cuMemcpyAsync 7.3 MB to peer's ring"] = per_call_us(lambda: drv.copy_async(remote, x.data_ptr(), nbytes, s), 50)
    torch.cuda.synchronize()
    kernel = SmCopy(drv)
    out["SM copy kernel 7.3 MB within GPU"] = per_call_us(lambda: kernel.copy(y.data_ptr(), x.data_ptr(), nbytes, s.cuda_stream), 50)
    torch.cuda.synchronize()
    out["SM copy kernel 7.3 MB to peer's ring"] = per_call_us(lambda: kernel.copy(remote, x.data_ptr(), nbytes, s.cuda_stream), 50)
    torch.cuda.synchronize()
    half = nbytes // 2 // 16 * 16
    out["SM copy kernel, 2 copies of 3.7 MB in one launch"] = per_call_us(
        lambda: kernel.copy_many([(y.data_ptr(), x.data_ptr(), half), (remote, x.data_ptr() + half, half)],
                                 s.cuda_stream), 50)
    torch.cuda.synchronize()
    box = torch.zeros(2, dtype=torch.int64).pin_memory()
    at = drv.device_address(box.data_ptr())
    out["cuStreamWriteValue64"] = per_call_us(lambda: drv.write_value(s.cuda_stream, at, 1))
    out["cuStreamBatchMemOp, 2 words"] = per_call_us(lambda: drv.write_values(s.cuda_stream, [(at, 1), (at + 8, 2)]))
    torch.cuda.synchronize()
    out["Tensor.copy_ 7.3 MB"] = per_call_us(lambda: y.copy_(x), 50)
    out["Tensor.clone 7.3 MB"] = per_call_us(lambda: x.clone(), 50)
    out["ring[0, :rows] view"] = per_call_us(lambda: ring[0, :rows])
    out["torch.empty 7.3 MB"] = per_call_us(lambda: torch.empty(rows, hidden, dtype=torch.bfloat16, device=dev))
    out["Tensor.record_stream"] = per_call_us(lambda: x.record_stream(s))
    out["Tensor.data_ptr"] = per_call_us(lambda: x.data_ptr())
    out["Stream.cuda_stream"] = per_call_us(lambda: s.cuda_stream)
    out["torch.cuda.current_stream"] = per_call_us(lambda: torch.cuda.current_stream(dev))
    torch.cuda.synchronize()
    bufs = []

    def isend():
        b = np.array([1, 2, 3], dtype=np.int64)
        bufs.append((comm.Isend([b, MPI.INT64_T], dest=peer, tag=7), b))
    out["np.array + Isend (3 words)"] = per_call_us(isend)
    got = [np.zeros(3, np.int64) for _ in range(len(bufs))]
    rq = [comm.Irecv([g, MPI.INT64_T], source=peer, tag=7) for g in got]
    MPI.Request.Waitall(rq + [r for r, _ in bufs])
    r0 = comm.Irecv([np.zeros(1, np.int64), MPI.INT64_T], source=peer, tag=9)
    out["Request.Test (pending)"] = per_call_us(lambda: r0.Test())
    out["Request.Testall 1 (pending)"] = per_call_us(lambda: MPI.Request.Testall([r0]))
    comm.Send([np.zeros(1, np.int64), MPI.INT64_T], dest=peer, tag=9)
    r0.Wait()
    torch.cuda.synchronize()
    res = comm.gather(out, root=0)
    if me == 0:
        print(f"{'call':45s} " + " ".join(f"rank {r:d} (us)" for r in range(len(res))))
        for k in out:
            print(f"{k:45s} " + " ".join(f"{d[k]:12.2f}" for d in res))
    comm.Barrier()
    return 0


if __name__ == "__main__":
    sys.exit(mpi_main(main))
