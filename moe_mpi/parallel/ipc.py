"""The IPC transport: on one node, rows move GPU to GPU by a copy straight into memory that the
receiving rank lent the sender through CUDA IPC; MPI stays the launcher and carries one small control
message per message.

* Rings: every rank that receives from a peer keeps ``slots`` slots of ``max_rows`` rows for it in
  its own GPU memory (one allocation per rank, shared with the peers through ``cudaIpcGetMemHandle``).
  The sender maps it once (``cuIpcOpenMemHandle``) and writes a message with one ``cuMemcpyAsync``
  on a copy stream of its own for that peer: the copy engines move it over NVLink (or within the GPU
  for a peer that shares it), no SMs are held, and nothing waits for the partner to be ready.
* Order on the GPU: each slot has two interprocess CUDA events.  The sender records ``filled`` after
  its copy, the receiver ``freed`` after the copy out of the slot (on its compute stream, into the
  tensor the runtime gets); the sender's copy stream waits for ``freed`` before it writes the slot
  again.  Neither host waits for the other's GPU.
* Control plane (MPI): the sender posts (step, rows, slot) on CONTROL_TAG once its copy is queued;
  the receiver takes a message as arrived when the control word is there and ``filled`` has passed
  (an event query), so the runtime never queues work behind a copy still in flight.  After the copy
  out, the receiver hands the slot back on GO_TAG.  A sender with no free slot waits for one.  The
  runtime gives a pair at least as many slots as a front keeps micro-batches in flight, as many as
  the pair can have messages outstanding: with fewer, a front could fill an expert's slots with later
  micro-batches while the expert, which takes steps in order, waits for an earlier one.

``backend="shm"`` runs the same protocol on CPUs over an MPI shared-memory window (the rings) with
plain copies, so the tests exercise it on machines without GPUs.
"""
from __future__ import annotations

import atexit
import ctypes
import logging
import socket
import time
from collections import deque

import numpy as np
import torch
from mpi4py import MPI

from .exchange import CONTROL_TAG, GO_TAG, ControlPlane, exchange_pairs, test_requests
from .ops import Op, OpTransport

log = logging.getLogger("moe_mpi")
CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS = 1
CU_EVENT_DISABLE_TIMING = 2


class _IpcHandle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_ubyte * 64)]


class Driver:
    """The CUDA driver calls torch has no Python API for (libcuda is always there with a GPU)."""

    def __init__(self):
        lib = ctypes.CDLL("libcuda.so.1")
        self.open = getattr(lib, "cuIpcOpenMemHandle_v2", None) or lib.cuIpcOpenMemHandle
        self.open.argtypes = [ctypes.POINTER(ctypes.c_uint64), _IpcHandle, ctypes.c_uint]
        self.get = lib.cuIpcGetMemHandle
        self.get.argtypes = [ctypes.POINTER(_IpcHandle), ctypes.c_uint64]
        self.range = getattr(lib, "cuMemGetAddressRange_v2", None) or lib.cuMemGetAddressRange
        self.range.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_size_t), ctypes.c_uint64]
        self.copy = lib.cuMemcpyAsync
        self.copy.argtypes = [ctypes.c_uint64, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_void_p]
        # events and streams by their raw handles: a message makes five of these calls on each side,
        # and torch's Stream and Event wrappers cost several times the driver call each
        self._record = lib.cuEventRecord
        self._record.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        self._wait = lib.cuStreamWaitEvent
        self._wait.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint]
        self._create = lib.cuEventCreate
        self._create.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_uint]

    def export(self, ptr: int) -> tuple[bytes, int]:
        """The IPC handle of the allocation holding ``ptr``, and ptr's offset in it."""
        base, size, handle = ctypes.c_uint64(0), ctypes.c_size_t(0), _IpcHandle()
        self.check(self.range(ctypes.byref(base), ctypes.byref(size), ptr), "cuMemGetAddressRange")
        self.check(self.get(ctypes.byref(handle), base.value), "cuIpcGetMemHandle")
        return bytes(handle), ptr - base.value

    @staticmethod
    def check(status: int, what: str) -> None:
        if status != 0:
            raise RuntimeError(f"{what} failed: CUDA driver error {status}")

    def open_handle(self, handle: bytes) -> int:
        ptr = ctypes.c_uint64(0)
        self.check(self.open(ctypes.byref(ptr), _IpcHandle.from_buffer_copy(handle), CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS),
                   "cuIpcOpenMemHandle (mapping a peer's receive buffer)")
        return ptr.value

    def copy_async(self, dst: int, src: int, nbytes: int, stream: int) -> None:
        self.check(self.copy(dst, src, nbytes, stream), "cuMemcpyAsync")

    def record(self, event: int, stream: int) -> None:
        self.check(self._record(event, stream), "cuEventRecord")

    def wait(self, stream: int, event: int) -> None:
        """``stream`` waits for ``event``'s latest record (as of this call)."""
        self.check(self._wait(stream, event, 0), "cuStreamWaitEvent")

    def new_event(self) -> int:
        event = ctypes.c_void_p(0)
        self.check(self._create(ctypes.byref(event), CU_EVENT_DISABLE_TIMING), "cuEventCreate")
        return event.value


_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def current_stream_handle(device: torch.device) -> int:
    """The raw handle of the device's current stream (torch's private accessor, a tenth of the cost of
    ``torch.cuda.current_stream``; that one where this torch lacks it)."""
    if _raw_stream is not None:
        return _raw_stream(device.index)
    return torch.cuda.current_stream(device).cuda_stream


RING_SHARE = 0.2      # auto takes IPC only if the rings of the ranks on a GPU take at most this share of it


def ipc_possible(world, comms: dict, n_fronts: int, device: torch.device, ring_bytes_per_peer: int = 0,
                 share: float | None = None) -> str | None:
    """Why the IPC transport cannot serve this job (None if it can): every exchanging pair must be on
    one node, and each rank must see its peers' GPUs with peer access between them; with ``share``,
    the receive rings of all ranks on one GPU (``ring_bytes_per_peer`` for each of a rank's peers) must
    take at most that share of its memory.  Collective."""
    peers = {wr for _, _, wr in exchange_pairs(comms, n_fronts, world)}
    uuid = str(torch.cuda.get_device_properties(device).uuid) if device.type == "cuda" else "cpu"
    table = world.allgather((socket.gethostname(), uuid, len(peers) * ring_bytes_per_peer))
    host = table[world.Get_rank()][0]
    problems = [f"rank {p} is on {table[p][0]}, this rank on {host}" for p in sorted(peers) if table[p][0] != host]
    if device.type == "cuda" and not problems:
        index = {str(torch.cuda.get_device_properties(i).uuid): i for i in range(torch.cuda.device_count())}
        for p in sorted(peers):
            j = index.get(table[p][1])
            if j is None:
                problems.append(f"rank {p}'s GPU {table[p][1]} is not visible to this rank")
            elif j != device.index and not torch.cuda.can_device_access_peer(device.index, j):
                problems.append(f"GPU {device.index} has no peer access to GPU {j} (rank {p})")
        total = torch.cuda.get_device_properties(device).total_memory
        rings = sum(b for h, u, b in table if (h, u) == (host, uuid))
        if share is not None and rings > share * total:
            problems.append(f"the receive rings of the ranks on GPU {device.index} would take {rings / 1e9:.1f} GB, "
                            f"over {share:.0%} of its {total / 1e9:.0f} GB (lower --in-flight or "
                            "--micro-batch-tokens, or pass --transport ipc to take them anyway)")
    problems = world.allgather(problems[0] if problems else None)
    first = next((f"rank {r}: {p}" for r, p in enumerate(problems) if p), None)
    return first


class SendRing:
    """This rank's view of one peer's ring for it: where to write, which slots are free."""

    def __init__(self, tr: "IPCTransport", comm, peer: int, remote, freed: list, filled: list):
        self.tr, self.comm, self.peer = tr, comm, peer
        self.remote = remote            # device address of slot 0 (GPU), or a uint8 array (shm)
        self.freed, self.filled = freed, filled     # the peer's events, this rank's events (raw handles)
        self.free = deque(range(tr.slots))
        self.credits: deque = deque()   # posted receives for slots handed back, oldest first
        self.stream = torch.cuda.Stream(tr.device) if tr.cuda else None
        self.handle = self.stream.cuda_stream if tr.cuda else 0

    def take(self) -> int | None:
        while self.credits and test_requests([self.credits[0][0]], [f"slot handed back by rank {self.peer}"]):
            _, buf = self.credits.popleft()
            self.free.append(int(buf[0]))
        if not self.free:
            return None
        slot = self.free.popleft()
        buf = np.zeros(1, dtype=np.int64)
        self.credits.append((self.comm.Irecv([buf, MPI.INT64_T], source=self.peer, tag=GO_TAG), buf))
        return slot

    def fill(self, slot: int, x: torch.Tensor, ready: int) -> None:
        """Copy x into the peer's slot once ``ready`` (a raw event handle, 0 for none) has passed and
        the peer has freed the slot."""
        tr, nbytes = self.tr, x.shape[0] * self.tr.row_bytes
        if not tr.cuda:
            start = slot * tr.slot_bytes
            self.remote[start:start + nbytes] = x.contiguous().view(-1).view(torch.uint8).numpy()
            return
        d = tr.driver
        if ready:
            d.wait(self.handle, ready)
        d.wait(self.handle, self.freed[slot])
        d.copy_async(self.remote + slot * tr.slot_bytes, x.data_ptr(), nbytes, self.handle)
        d.record(self.filled[slot], self.handle)
        x.record_stream(self.stream)


class RecvRing:
    """This rank's ring for one peer: the slots, and the events that order their use."""

    def __init__(self, tr: "IPCTransport", comm, peer: int, local: torch.Tensor, freed: list, filled: list):
        self.tr, self.comm, self.peer = tr, comm, peer
        self.slot_tensors = local.unbind(0)     # each slot a (max_rows, hidden) tensor
        self.freed, self.filled = freed, filled     # this rank's events (raw handles), the peer's events

    def ready(self, slot: int) -> bool:
        return not self.tr.cuda or self.filled[slot].query()

    def take_out(self, slot: int, rows: int, out: torch.Tensor | None) -> torch.Tensor:
        """The message's rows copied out of the slot (into ``out`` if given), and the slot handed back."""
        view = self.slot_tensors[slot][:rows]
        if out is None:
            out = view.clone()
        else:
            out.copy_(view)
        if self.tr.cuda:
            self.tr.driver.record(self.freed[slot], current_stream_handle(self.tr.device))
        buf = np.array([slot], dtype=np.int64)
        self.tr.small.append((self.comm.Isend([buf, MPI.INT64_T], dest=self.peer, tag=GO_TAG), buf))
        return out


class IpcSend(Op):
    def __init__(self, tr: "IPCTransport", comm, peer: int, step: int, x: torch.Tensor, what: str, ready=None):
        self.tr, self.comm, self.peer, self.step, self.what = tr, comm, peer, step, what
        self.ring = tr.send_rings[(id(comm), peer)]
        self.x, self.reqs, self.posted = x, [], False
        if x.shape[0] > tr.max_rows:
            raise RuntimeError(f"{what}: {x.shape[0]} rows, but the transport's slots hold {tr.max_rows}")
        # x is computed once the compute stream gets here (an event of the transport's pool, back in
        # the pool once the copy's stream waits for it), or where the caller's event says
        self.ready, self.pooled, self.caller_event = 0, False, None
        if tr.cuda and x.shape[0]:
            if ready is None:
                self.ready, self.pooled = tr.event(), True
                tr.driver.record(self.ready, current_stream_handle(tr.device))
            else:
                self.ready, self.caller_event = ready.cuda_event, ready    # (kept alive until posted)

    def progress(self) -> bool:
        if not self.posted:
            rows, slot = self.x.shape[0], -1
            if rows:
                slot = self.ring.take()
                if slot is None:
                    return False
                self.ring.fill(slot, self.x, self.ready)
                if self.pooled:
                    self.tr.events.append(self.ready)
            self.control = np.array([self.step, rows, slot], dtype=np.int64)
            self.reqs.append(self.comm.Isend([self.control, MPI.INT64_T], dest=self.peer, tag=CONTROL_TAG))
            self.posted, self.x, self.ready, self.caller_event = True, None, 0, None
        return test_requests(self.reqs, [self.what])


class IpcRecv(Op):
    def __init__(self, tr: "IPCTransport", comm, peer: int, step: int, out: torch.Tensor | None,
                 cap: int | None, what: str):
        self.tr, self.what, self.out, self.cap = tr, what, out, cap
        self.ring = tr.recv_rings[(id(comm), peer)]
        self.arrived, self.taken, self.n, self.slot = False, False, 0, -1
        tr.control.await_control(comm, peer, step, self)

    def on_control(self, rows: int, slot: int) -> None:
        if self.out is not None and rows != self.out.shape[0]:
            raise RuntimeError(f"{self.what}: {rows} rows announced, {self.out.shape[0]} expected")
        if self.cap is not None and rows > self.cap:
            raise RuntimeError(f"{self.what}: {rows} rows announced, at most {self.cap} expected")
        self.n, self.slot, self.arrived = rows, slot, True

    def progress(self) -> bool:
        return self.arrived and (self.n == 0 or self.ring.ready(self.slot))

    @property
    def announced(self) -> int:
        """The row count its control word gave (once arrived)."""
        return self.n

    def wait_into(self, out: torch.Tensor) -> None:
        """``wait``, with the rows copied out of the slot into ``out`` (``OpReceive.joined``)."""
        if self.out is None and not self.taken:
            self.out = out
        self.wait()

    def wait(self) -> None:
        if self.taken:
            return
        self.taken = True
        if self.n:
            with self.tr.lock:
                self.out = self.ring.take_out(self.slot, self.n, self.out)
        elif self.out is None:
            self.out = torch.empty(0, self.tr.hidden, dtype=self.tr.dtype, device=self.tr.device)

    @property
    def rows(self) -> torch.Tensor:
        return self.out


class IpcChannel:
    def __init__(self, tr: "IPCTransport"):
        self.tr = tr

    def send(self, comm, peer: int, step: int, x: torch.Tensor, *, sized: bool, what: str, ready=None) -> Op:
        return IpcSend(self.tr, comm, peer, step, x, what, ready)

    def recv(self, comm, peer: int, step: int, *, out: torch.Tensor | None = None, cap: int | None = None,
             what: str, fresh: bool = False) -> Op:
        return IpcRecv(self.tr, comm, peer, step, out, cap, what)


class IPCTransport(OpTransport):
    """Copies into rings that receivers lent through CUDA IPC, one node (see the module's docstring).
    ``max_rows``: the most rows of one message (a micro-batch's tokens); ``slots``: messages a pair
    may have outstanding (above the micro-batches a front keeps in flight)."""

    name = "ipc"

    def __init__(self, layer_comms: dict, n_fronts: int, hidden: int, dtype: torch.dtype, device: torch.device,
                 world, max_rows: int, slots: int, backend: str = "cuda"):
        super().__init__(layer_comms, n_fronts, hidden, dtype, device)
        self.cuda = backend == "cuda"
        if self.cuda != (device.type == "cuda"):
            raise ValueError(f"IPC transport backend {backend!r} on device {device}")
        if self.cuda and device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.world, self.max_rows, self.slots = world, max(1, int(max_rows)), max(1, int(slots))
        self.row_bytes = hidden * torch.empty(0, dtype=dtype).element_size()
        self.slot_bytes = self.max_rows * self.row_bytes
        self.driver = Driver() if self.cuda else None
        self.me = world.Get_rank()
        self.channel_ = IpcChannel(self)
        self.control = ControlPlane(3, lambda comm, peer: f"rank {peer} of a layer's communicator")  # (step, rows, slot)
        self.small: list = []                       # slot hand-backs in flight, with their buffers
        self.send_rings: dict[tuple, SendRing] = {}
        self.recv_rings: dict[tuple, RecvRing] = {}
        self._opened: dict[bytes, int] = {}
        self.events: list[int] = []                 # raw events for IpcSend's ``ready``, free to record
        self._keep: list = []                       # torch events whose raw handles the rings use
        self._build(world)
        atexit.register(self._flush)

    def channel(self, comm, peer: int) -> IpcChannel:
        return self.channel_

    def event(self) -> int:
        """A raw event from the pool (a new one if all are in use)."""
        return self.events.pop() if self.events else self.driver.new_event()

    # --- set-up ---
    def _build(self, world) -> None:
        pairs = exchange_pairs(self.comms, self.n_fronts, world)
        shape = (len(pairs), self.slots, self.max_rows, self.hidden)     # one ring per peer
        nbytes = len(pairs) * self.slots * self.slot_bytes
        if self.cuda:
            self.ring = torch.empty(shape, dtype=self.dtype, device=self.device)
            handle, offset = self.driver.export(self.ring.data_ptr())
        else:
            node = world.Split_type(MPI.COMM_TYPE_SHARED, key=world.Get_rank())
            self.window = MPI.Win.Allocate_shared(max(1, nbytes), 1, comm=node)
            buf, _ = self.window.Shared_query(node.Get_rank())
            self.ring = torch.frombuffer(buf, dtype=torch.uint8)[:nbytes].view(self.dtype).view(shape)
            handle, offset = node.Get_rank(), 0

        def events() -> list:
            return [torch.cuda.Event(interprocess=True) if self.cuda else None for _ in range(self.slots)]

        def shared(evs: list) -> list:
            return [e.ipc_handle() for e in evs] if self.cuda else evs

        def raw(evs: list) -> list:
            return [e.cuda_event for e in evs] if self.cuda else evs

        per_peer = self.slots * self.slot_bytes
        lent = [dict() for _ in range(world.Get_size())]     # what each peer needs from this rank
        mine_freed, mine_filled = {}, {}
        for i, (comm, peer, wr) in enumerate(pairs):
            mine_freed[wr], mine_filled[wr] = events(), events()
            lent[wr] = {"handle": handle, "offset": offset + i * per_peer, "freed": shared(mine_freed[wr]),
                        "filled": shared(mine_filled[wr])}
        got = world.alltoall(lent)
        for i, (comm, peer, wr) in enumerate(pairs):
            theirs, local = got[wr], self.ring[i]
            if self.cuda:
                remote = self._open(theirs["handle"]) + theirs["offset"]
                freed = [torch.cuda.Event.from_ipc_handle(self.device, h) for h in theirs["freed"]]
                filled = [torch.cuda.Event.from_ipc_handle(self.device, h) for h in theirs["filled"]]
            else:
                rbuf, _ = self.window.Shared_query(theirs["handle"])
                remote = np.frombuffer(rbuf, dtype=np.uint8)[theirs["offset"]:theirs["offset"] + per_peer]
                freed = filled = [None] * self.slots
            self._keep += [freed, filled, mine_freed[wr], mine_filled[wr]]   # the raw handles' events
            self.send_rings[(id(comm), peer)] = SendRing(self, comm, peer, remote, raw(freed), raw(mine_filled[wr]))
            self.recv_rings[(id(comm), peer)] = RecvRing(self, comm, peer, local, raw(mine_freed[wr]), filled)
        if not self.cuda:
            node.Free()
        world.Barrier()
        log.info("IPC transport: %d peers, %d slots of %d rows each, %.1f MB of %s memory lent to them",
                  len(pairs), self.slots, self.max_rows, nbytes / 1e6, "GPU" if self.cuda else "shared")

    def _open(self, handle: bytes) -> int:
        """A peer's allocation mapped into this process, once per allocation."""
        if handle not in self._opened:
            self._opened[handle] = self.driver.open_handle(handle)
        return self._opened[handle]

    # --- control plane ---
    def poll(self) -> None:
        """Deliver arrived control words; let finished slot hand-backs go."""
        self.control.poll()
        if self.small and MPI.Request.Testall([r for r, _ in self.small]):
            self.small.clear()

    def _pass(self) -> None:
        self.poll()
        super()._pass()

    def background_progress(self) -> None:
        if self.control.expecting():
            with self.lock:
                self.poll()

    def _flush(self, timeout: float = 5.0) -> None:
        """Complete the last slot hand-backs before MPI is finalised."""
        deadline = time.monotonic() + timeout
        while self.small and time.monotonic() < deadline:
            if MPI.Is_finalized() or MPI.Request.Testall([r for r, _ in self.small]):
                break
        self.small.clear()
