"""The NCCL transport: expert rows move GPU to GPU by NCCL point-to-point, while MPI stays the launcher
and the control plane (it bootstraps NCCL and carries every message's row count).

* Bootstrap: rank 0 of the MPI world opens a TCPStore; its address travels by MPI broadcast.
* Communicators: NCCL refuses two ranks of one GPU in one communicator, and a torch point-to-point
  communicator runs its operations in posting order on one stream, both directions alike (a receive
  posted ahead of a send on it would block that send).  So every exchanging pair of ranks on different
  GPUs gets two 2-rank groups, one per direction.  All are made when the transport is built, each
  warmed up by one message, in one global order, so no rank blocks in NCCL's initialisation waiting for
  a partner that is itself waiting for someone else.  Pairs that share a GPU use pinned host staging.
* Order: NCCL matches a pair's sends and receives in posting order.  The sender posts an MPI control
  message (step, rows) on CONTROL_TAG, then its NCCL send; the receiver posts its NCCL receive when the
  control message arrives, and MPI delivers control messages in the order they were sent.
* Who waits: an NCCL kernel waiting for its partner holds SMs.  Experts poll promptly, so a front's send
  is posted at once; a front can be busy for milliseconds, so an expert's reply waits for the front's
  go-ahead (GO_TAG, sent as the front posts its receive) before the send is posted.
"""
from __future__ import annotations

import atexit
import logging
import os
import socket
from collections import deque
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from mpi4py import MPI

from .devices import slot_of
from .exchange import CONTROL_TAG, GO_TAG, PeerFailure, as_bytes, exchange_pairs, test_requests, world_ranks
from .ops import Op, OpTransport
from .staged import StagedChannel

log = logging.getLogger("moe_mpi")


def init_process_group(world, backend: str = "nccl") -> None:
    """torch.distributed over every rank of the MPI world (same ranks), bootstrapped through MPI."""
    rank, size = world.Get_rank(), world.Get_size()
    if dist.is_initialized():
        if (dist.get_rank(), dist.get_world_size()) != (rank, size):
            raise RuntimeError(f"torch.distributed is already initialised as rank {dist.get_rank()} of "
                               f"{dist.get_world_size()}, but this is MPI rank {rank} of {size}")
        return
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")   # NVLink multicast can wedge shared GPUs
    timeout = timedelta(seconds=600)
    address = None
    if rank == 0:
        host = os.environ.get("MOE_MPI_STORE_HOST") or socket.gethostname()
        store = dist.TCPStore(host, 0, size, is_master=True, timeout=timeout, wait_for_workers=False)
        address = (host, store.port)
    address = world.bcast(address, root=0)
    if rank != 0:
        store = dist.TCPStore(address[0], address[1], size, is_master=False, timeout=timeout)
    dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=timeout)
    atexit.register(_shutdown)


def _shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class ControlPlane:
    """The control words (step, then ``words - 1`` values) a transport sends before each message on
    CONTROL_TAG.  ``await_control`` hands the receive of (comm, peer, step) its word's values through
    ``op.on_control(*values)``: at once if the word came already, else when ``poll`` sees it.  One
    receive is posted per word expected, each peer's in order; a word for a receive not made yet is
    kept, and the receive it used is posted again."""

    def __init__(self, words: int, who):
        self.words, self.who = words, who           # who(comm, peer): the peer named for reports
        self.posted: dict[tuple, deque] = {}        # (comm, peer) -> posted receives, in order
        self.waiting: dict[tuple, object] = {}      # (comm, peer, step) -> receive waiting for its word
        self.early: dict[tuple, tuple] = {}         # (comm, peer, step) -> values before its receive

    def await_control(self, comm, peer: int, step: int, op) -> None:
        key = (id(comm), peer, step)
        if key in self.early:
            op.on_control(*self.early.pop(key))
            return
        self.waiting[key] = op
        self._post(comm, peer)

    def _post(self, comm, peer: int) -> None:
        buf = np.zeros(self.words, dtype=np.int64)
        self.posted.setdefault((id(comm), peer), deque()).append(
            (comm.Irecv([buf, MPI.INT64_T], source=peer, tag=CONTROL_TAG), buf, comm))

    def expecting(self) -> bool:
        return any(self.posted.values())

    def poll(self) -> None:
        """Deliver arrived words, each peer's in arrival (= posting) order."""
        for (cid, peer), queue in self.posted.items():
            while queue and self._arrived(queue[0], peer):
                _, buf, comm = queue.popleft()
                step, values = int(buf[0]), tuple(int(v) for v in buf[1:])
                op = self.waiting.pop((cid, peer, step), None)
                if op is not None:
                    op.on_control(*values)
                else:
                    self.early[(cid, peer, step)] = values
                    self._post(comm, peer)

    def _arrived(self, posted: tuple, peer: int) -> bool:
        req, _, comm = posted
        try:
            return req.Test()
        except MPI.Exception as exc:
            raise PeerFailure.of(exc, [f"control message from {self.who(comm, peer)}"]) from None


class MPIPayload:
    """An MPI request standing in for an NCCL point-to-point operation (``backend="mpi"``, for tests on
    machines without GPUs): it completes in the same order (one tag per direction, MPI keeps order)."""
    TAG = 11

    def __init__(self, req, keep):
        self.req, self.keep = req, keep

    def is_completed(self) -> bool:
        return self.req.Test()

    def wait(self) -> None:
        self.req.Wait()


class Net:
    """Direction groups and the control plane of one rank."""

    def __init__(self, transport: "NCCLTransport", world, backend: str):
        self.t, self.world, self.backend = transport, world, backend
        self.me = world.Get_rank()
        self.ranks = {id(c): world_ranks(c, world) for c in transport.comms.values()}
        self.groups: dict[tuple[int, int], object] = {}
        # (step, rows) before every message
        self.control = ControlPlane(2, lambda comm, peer: f"rank {self.world_rank(comm, peer)}")
        self.gos: dict[tuple, deque] = {}           # (comm, peer) -> posted go-ahead receives, in order
        self.held: dict[tuple, "Send"] = {}         # (comm, peer, step) -> send waiting for its go-ahead
        # NCCL operations are posted from this stream, made to wait only for the event of their own
        # buffer: posted from the compute stream they would also wait for all compute queued since
        self.stream = torch.cuda.Stream(transport.device) if transport.device.type == "cuda" else None
        self.same_gpu = self._build(world, backend)

    def world_rank(self, comm, peer: int) -> int:
        return self.ranks[id(comm)][peer]

    def ready(self):
        """An event marking the compute stream's progress now (None on CPU)."""
        if self.stream is None:
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.t.device))
        return event

    def isend(self, x: torch.Tensor, dst: int, ready):
        if self.backend == "mpi":
            buf = as_bytes(x)
            return MPIPayload(self.world.Isend([buf, MPI.BYTE], dest=dst, tag=MPIPayload.TAG), buf)
        with torch.cuda.stream(self.stream):
            if ready is not None:
                self.stream.wait_event(ready)
            return dist.isend(x, dst=dst, group=self.groups[(self.me, dst)])

    def irecv(self, out: torch.Tensor, src: int, ready):
        if self.backend == "mpi":
            buf = as_bytes(out)
            return MPIPayload(self.world.Irecv([buf, MPI.BYTE], source=src, tag=MPIPayload.TAG), buf)
        with torch.cuda.stream(self.stream):
            if ready is not None:      # None: ``out`` was allocated on this stream, nothing to wait for
                self.stream.wait_event(ready)
            return dist.irecv(out, src=src, group=self.groups[(src, self.me)])

    def empty(self, rows: int) -> torch.Tensor:
        """A receive buffer from this stream's memory pool: free for a receive at once, where one taken
        on the compute stream would first wait for all compute queued there."""
        t = self.t
        if self.stream is None:
            return torch.empty(rows, t.hidden, dtype=t.dtype, device=t.device)
        with torch.cuda.stream(self.stream):
            return torch.empty(rows, t.hidden, dtype=t.dtype, device=t.device)

    def _build(self, world, backend: str) -> set[int]:
        """Make and warm up the direction groups; return the peers that share this rank's GPU."""
        device = self.t.device
        if device.type == "cuda":
            key = slot_of(device).key
        else:   # CPU tests: every rank its own "GPU", or rank % MOE_MPI_TEST_CPU_GPUS to exercise sharing
            fake = int(os.environ.get("MOE_MPI_TEST_CPU_GPUS", "0"))
            key = (socket.gethostname(), f"cpu {self.me % fake if fake else self.me}")
        peers = {wr for _, _, wr in exchange_pairs(self.t.comms, self.t.n_fronts, world)}
        table = world.allgather((key, sorted(peers)))
        keys = [k for k, _ in table]
        pairs = sorted({(min(r, p), max(r, p)) for r, (_, ps) in enumerate(table) for p in ps if keys[r] != keys[p]})
        if self.backend == "mpi":
            return {p for p in peers if keys[p] == key}
        for a, b in pairs:                      # every rank makes every group, in the same order
            for src, dst in ((a, b), (b, a)):
                group = dist.new_group([a, b], backend=backend, group_desc=f"moe_mpi_{src}_to_{dst}")
                if self.me in (a, b):
                    self.groups[(src, dst)] = group
        one = torch.zeros(1, dtype=self.t.dtype, device=device)
        for a, b in pairs:                      # one message per group, in the same global order
            if self.me not in (a, b):
                continue
            for src, dst in ((a, b), (b, a)):
                if self.me == src:
                    dist.send(one, dst=dst, group=self.groups[(src, dst)])
                else:
                    dist.recv(one, src=src, group=self.groups[(src, dst)])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return {p for p in peers if keys[p] == key}

    # --- control plane ---
    def await_control(self, comm, peer: int, step: int, op: "Recv") -> None:
        self.control.await_control(comm, peer, step, op)

    def await_go(self, comm, peer: int, step: int, op: "Send") -> None:
        self.held[(id(comm), peer, step)] = op
        self._post(self.gos, comm, peer, GO_TAG, 1)

    @staticmethod
    def _post(table: dict, comm, peer: int, tag: int, words: int) -> None:
        buf = np.zeros(words, dtype=np.int64)
        table.setdefault((id(comm), peer), deque()).append(
            (comm.Irecv([buf, MPI.INT64_T], source=peer, tag=tag), buf, comm))

    def _arrived(self, queue: deque, peer: int, what: str) -> bool:
        req, _, comm = queue[0]
        try:
            return req.Test()
        except MPI.Exception as exc:
            raise PeerFailure.of(exc, [f"{what} from rank {self.world_rank(comm, peer)}"]) from None

    def poll(self) -> None:
        """Deliver arrived control messages and go-aheads, each queue in arrival (= posting) order."""
        self.control.poll()
        for (cid, peer), queue in self.gos.items():
            while queue and self._arrived(queue, peer, "go-ahead"):
                _, buf, comm = queue.popleft()
                op = self.held.pop((cid, peer, int(buf[0])), None)
                if op is None:
                    raise RuntimeError(f"go-ahead for step {int(buf[0])} from rank {self.world_rank(comm, peer)} "
                                       "matches no send (internal error)")
                op.launch()


class Send(Op):
    def __init__(self, net: Net, comm, peer: int, step: int, x: torch.Tensor, what: str, ready=None):
        self.net, self.comm, self.peer, self.what, self.x = net, comm, peer, what, x
        # one direction group per pair: its operations run in posting order on one stream
        self.order = ("send", id(comm), peer)
        rows = x.shape[0]
        self.control = np.array([step, rows], dtype=np.int64)
        self.reqs = [comm.Isend([self.control, MPI.INT64_T], dest=peer, tag=CONTROL_TAG)]
        self.work, self.launched = None, rows == 0
        # x is computed once the compute stream gets here, or where the caller's event says
        self.ready = (ready or net.ready()) if rows else None
        if rows and peer < net.t.n_fronts:
            net.await_go(comm, peer, step, self)
        elif rows:
            self.launch()

    def launch(self) -> None:
        self.work = self.net.isend(self.x, self.net.world_rank(self.comm, self.peer), self.ready)
        self.launched = True

    def progress(self) -> bool:
        return (self.launched and test_requests(self.reqs, [self.what])
                and (self.work is None or self.work.is_completed()))


class Recv(Op):
    def __init__(self, net: Net, comm, peer: int, step: int, out: torch.Tensor | None, cap: int | None,
                 what: str, fresh: bool = False):
        self.net, self.comm, self.peer, self.step, self.what = net, comm, peer, step, what
        self.out, self.cap = out, cap
        self.order = ("recv", id(comm), peer)
        self.own = False            # out taken here, from the NCCL stream's pool
        self.work, self.reqs, self.arrived = None, [], False
        # out is free once the compute stream gets here, unless it is fresh from the NCCL stream's pool
        self.ready = net.ready() if out is not None and not fresh else None
        net.await_control(comm, peer, step, self)

    def on_control(self, rows: int) -> None:
        if self.out is not None and rows != self.out.shape[0]:
            raise RuntimeError(f"{self.what}: {rows} rows announced, {self.out.shape[0]} expected")
        if self.cap is not None and rows > self.cap:
            raise RuntimeError(f"{self.what}: {rows} rows announced, at most {self.cap} expected")
        t = self.net.t
        if self.out is None:
            self.out, self.ready, self.own = self.net.empty(rows), None, True
        if rows:
            self.work = self.net.irecv(self.out, self.net.world_rank(self.comm, self.peer), self.ready)
            if self.comm.Get_rank() < t.n_fronts:       # a front lets the expert's send go now
                self.go = np.array([self.step], dtype=np.int64)
                self.reqs.append(self.comm.Isend([self.go, MPI.INT64_T], dest=self.peer, tag=GO_TAG))
        self.arrived = True

    def progress(self) -> bool:
        return (self.arrived and test_requests(self.reqs, [self.what])
                and (self.work is None or self.work.is_completed()))

    def wait(self) -> None:
        if self.work is not None:
            self.work.wait()
        if self.own and self.out.is_cuda:     # used on the compute stream from now on
            self.out.record_stream(torch.cuda.current_stream(self.out.device))

    @property
    def rows(self) -> torch.Tensor:
        return self.out


class NcclChannel:
    def __init__(self, net: Net):
        self.net = net

    def send(self, comm, peer: int, step: int, x: torch.Tensor, *, sized: bool, what: str, ready=None) -> Op:
        return Send(self.net, comm, peer, step, x, what, ready)

    def recv(self, comm, peer: int, step: int, *, out: torch.Tensor | None = None, cap: int | None = None,
             what: str, fresh: bool = False) -> Op:
        return Recv(self.net, comm, peer, step, out, cap, what, fresh)

    def empty(self, rows: int) -> torch.Tensor:
        return self.net.empty(rows)


class NCCLTransport(OpTransport):
    """NCCL between ranks on different GPUs, pinned host staging between ranks sharing one.
    ``backend="mpi"`` runs the same protocol with MPI carrying the payloads too (for tests on machines
    without GPUs)."""

    name = "nccl"

    def __init__(self, layer_comms: dict, n_fronts: int, hidden: int, dtype: torch.dtype, device: torch.device,
                 world, backend: str = "nccl"):
        super().__init__(layer_comms, n_fronts, hidden, dtype, device)
        if backend != "mpi":
            init_process_group(world, backend)
        self.net = Net(self, world, backend)
        self.nccl = NcclChannel(self.net)
        self.staged = StagedChannel(hidden, dtype, device) if self.net.same_gpu else None
        if self.net.same_gpu:
            log.info("NCCL transport: peers on this rank's GPU (ranks %s) go through pinned host staging",
                     sorted(self.net.same_gpu))

    def channel(self, comm, peer: int):
        if self.staged is not None and self.net.world_rank(comm, peer) in self.net.same_gpu:
            return self.staged
        return self.nccl

    def _pass(self) -> None:
        self.net.poll()
        super()._pass()

    def background_progress(self) -> None:
        if self.net.control.expecting() or any(self.net.gos.values()):
            with self.lock:
                self.net.poll()
