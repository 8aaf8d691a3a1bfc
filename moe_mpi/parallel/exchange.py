"""Moving expert rows between front and expert ranks: the transport behind dispatch and combine.

The runtime sees two calls on each side, each returning a handle it polls with ``test()``:

* front:  ``dispatch(layer, step, x_ND, offsets)`` sends expert e rows [offsets[e], offsets[e+1]) and
  receives the answers into a (N, D) tensor in the same order -> ``FrontExchange``;
* expert: ``expect(step, senders, capacities)`` receives one message per sending front ->
  ``ExpertReceive``; ``reply(step, senders, ys)`` sends each front its rows back -> ``Sends``.

Every message is one contiguous block of raw words (bf16 travels as its 16 bits); the receiver of a
dispatch sizes its buffer from the plan (a front sends an expert at most one row per token), and the
row count is read from the message status.  Tags are the step; each MoE layer has its own
communicator, so (communicator, step) names a (layer, micro-batch).  Every request is kept with its
buffer until it completes.

Transports (``make_transport`` picks one; the loops do not care which):

* ``mpi``: MPI on the tensors' own memory: host memory on CPU runs, device memory on GPU runs when the
  MPI library is CUDA-aware;
* ``mpi-staged``: GPU runs over an MPI that is not CUDA-aware: rows go through pinned host buffers in
  chunks, each chunk's device->host copy (on its own stream) overlapping the previous chunk's transfer;
* ``nccl`` (``nccl.py``): NCCL point-to-point between GPUs, with MPI carrying the row counts.
"""
from __future__ import annotations

import atexit
import ctypes
import logging
import os
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from mpi4py import MPI

# MPI guarantees tags up to 32767.  Data messages are tagged step % TAG_MOD (in-flight steps are far
# fewer, so wrapping is safe); the two tags above that carry the NCCL transport's row counts and go-aheads.
TAG_MOD = 32766
CONTROL_TAG = 32766
GO_TAG = 32767
log = logging.getLogger("moe_mpi")


class PeerFailure(RuntimeError):
    """An MPI request failed: the peer died (its process is gone) or the network failed."""

    @classmethod
    def of(cls, exc: Exception, peers: list[str]) -> "PeerFailure":
        what = exc.Get_error_string() if hasattr(exc, "Get_error_string") else str(exc)
        return cls(f"communication failed ({what.strip()}) while waiting on: {'; '.join(peers[:6])}; "
                   "a peer rank probably died")


def as_bytes(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor's storage as a writable uint8 array (no copy)."""
    assert t.is_contiguous() and t.device.type == "cpu"
    return t.view(-1).view(torch.uint8).numpy() if t.numel() else np.empty(0, np.uint8)


def mpi_buffer(t: torch.Tensor):
    """A contiguous tensor's bytes as an MPI buffer: a numpy view of host memory, or the device tensor
    itself (read through DLPack by a CUDA-aware MPI)."""
    if t.device.type == "cpu" or t.numel() == 0:
        return as_bytes(t.cpu())
    assert t.is_contiguous()
    return t.view(-1).view(torch.uint8)


def test_requests(reqs: list, what: list[str]) -> bool:
    """Testall that turns an MPI failure into a PeerFailure naming the peers."""
    if not reqs:
        return True
    try:
        return MPI.Request.Testall(reqs)
    except MPI.Exception as exc:
        raise PeerFailure.of(exc, what) from None


def mpi_cuda_aware() -> bool:
    """Whether this MPI library takes device pointers.  MOE_MPI_CUDA_AWARE=0/1 overrides the answer of
    ``MPIX_Query_cuda_support`` (Open MPI, MPICH), looked up in the libmpi this process loaded."""
    forced = os.environ.get("MOE_MPI_CUDA_AWARE")
    if forced in ("0", "1"):
        return forced == "1"
    try:
        with open("/proc/self/maps") as fh:
            libs = {line.split()[-1] for line in fh if "libmpi" in line and ".so" in line}
    except OSError:
        return False
    for path in sorted(libs):
        try:
            query = getattr(ctypes.CDLL(path), "MPIX_Query_cuda_support", None)
        except OSError:
            continue
        if query is not None:
            return bool(query())
    return False


@dataclass
class Requests:
    """MPI requests with the buffers they use, kept together until all complete."""
    reqs: list = field(default_factory=list)
    bufs: list = field(default_factory=list)
    peers: list = field(default_factory=list)   # a description of each request's peer, for deadline reports

    def add(self, req, buf, peer: str) -> None:
        self.reqs.append(req)
        self.bufs.append(buf)
        self.peers.append(peer)

    def test(self) -> bool:
        if not self.reqs:
            return True
        peers = self.pending()
        statuses = [MPI.Status() for _ in self.reqs]
        try:
            return MPI.Request.Testall(self.reqs, statuses)
        except MPI.Exception as exc:
            failed = [p for p, st in zip(self.peers, statuses) if st.Get_error() != MPI.SUCCESS]
            raise PeerFailure.of(exc, failed or peers) from None

    def pending(self) -> list[str]:
        return [p for r, p in zip(self.reqs, self.peers) if r != MPI.REQUEST_NULL]


class FrontExchange:
    def __init__(self, y_ND: torch.Tensor, reqs: Requests, device: torch.device):
        self.y_ND, self.reqs, self.device = y_ND, reqs, device

    def test(self) -> bool:
        return self.reqs.test()

    def result(self) -> torch.Tensor:
        """The experts' answers, on the compute device (staged back from host memory if need be)."""
        return self.y_ND.to(self.device, non_blocking=False)

    def pending(self) -> list[str]:
        return self.reqs.pending()


class ExpertReceive:
    def __init__(self, bufs: list[torch.Tensor], reqs: list, statuses: list, senders: list[int],
                 row_bytes: int, peers: list[str], device: torch.device):
        self.bufs, self.reqs, self.statuses, self.senders = bufs, reqs, statuses, senders
        self.row_bytes, self.peers, self.device = row_bytes, peers, device

    def test(self) -> bool:
        done = True
        for i, req in enumerate(self.reqs):
            if req != MPI.REQUEST_NULL:
                try:
                    finished = req.Test(self.statuses[i])
                except MPI.Exception as exc:
                    raise PeerFailure.of(exc, [self.peers[i]]) from None
                if finished:
                    self.reqs[i] = MPI.REQUEST_NULL
                else:
                    done = False
        return done

    def pending(self) -> list[str]:
        return [p for r, p in zip(self.reqs, self.peers) if r != MPI.REQUEST_NULL]

    def rows(self) -> list[torch.Tensor]:
        """Each sender's rows, trimmed to what it actually sent, on the compute device."""
        return [buf[: st.Get_count(MPI.BYTE) // self.row_bytes].to(self.device)
                for buf, st in zip(self.bufs, self.statuses)]


class MPITransport:
    """MPI on the tensors' own memory over the per-layer communicators: host memory, or device memory
    when ``device_buffers`` (a CUDA-aware MPI).  Device buffers are complete when Isend is posted (the
    compute stream is synchronised first: MPI knows no streams).  Without ``device_buffers`` GPU
    tensors are copied whole to host memory, unpinned and unpipelined: ``StagedTransport`` does that well."""

    name = "mpi"

    def __init__(self, layer_comms: dict, n_fronts: int, hidden: int, dtype: torch.dtype,
                 device: torch.device = torch.device("cpu"), device_buffers: bool = False):
        self.comms, self.n_fronts, self.hidden, self.dtype = layer_comms, n_fronts, hidden, dtype
        self.device = device
        self.row_bytes = hidden * torch.empty(0, dtype=dtype).element_size()
        self.buffer_device = device if device_buffers else torch.device("cpu")

    def _ready(self, t: torch.Tensor) -> torch.Tensor:
        """The tensor in the memory MPI reads, contiguous and finished computing."""
        t = t.contiguous()
        if self.buffer_device.type == "cuda":
            torch.cuda.current_stream(t.device).synchronize()
            return t
        return t.cpu()

    # --- front side ---
    def dispatch(self, layer: int, step: int, x_ND: torch.Tensor, offsets: list[int], ready=None) -> FrontExchange:
        comm, tag = self.comms[layer], step % TAG_MOD
        x_ND = self._ready(x_ND)
        y_ND = torch.empty_like(x_ND)
        reqs = Requests()
        for e in range(len(offsets) - 1):
            lo, hi = offsets[e], offsets[e + 1]
            dest = self.n_fronts + e
            world_rank = self.n_fronts + layer * (len(offsets) - 1) + e
            peer = f"rank {world_rank} (expert {e} of MoE layer {layer}), micro-batch step {step}"
            recv_buf = mpi_buffer(y_ND[lo:hi])
            reqs.add(comm.Irecv([recv_buf, MPI.BYTE], source=dest, tag=tag), recv_buf, "reply from " + peer)
            send_buf = mpi_buffer(x_ND[lo:hi])
            reqs.add(comm.Isend([send_buf, MPI.BYTE], dest=dest, tag=tag), send_buf, "send to " + peer)
        reqs.bufs.append(x_ND)
        return FrontExchange(y_ND, reqs, self.device)

    # --- expert side ---
    def expect(self, layer: int, step: int, senders: list[int], capacities: list[int]) -> ExpertReceive:
        comm, tag = self.comms[layer], step % TAG_MOD
        bufs, reqs, statuses, peers = [], [], [], []
        for front, cap in zip(senders, capacities):
            buf = torch.empty(cap, self.hidden, dtype=self.dtype, device=self.buffer_device)
            reqs.append(comm.Irecv([mpi_buffer(buf), MPI.BYTE], source=front, tag=tag))
            bufs.append(buf)
            statuses.append(MPI.Status())
            peers.append(f"rank {front} (front {front}), micro-batch step {step}")
        return ExpertReceive(bufs, reqs, statuses, senders, self.row_bytes, peers, self.device)

    def reply(self, layer: int, step: int, senders: list[int], ys: list[torch.Tensor]) -> Requests:
        comm, tag = self.comms[layer], step % TAG_MOD
        reqs = Requests()
        for front, y in zip(senders, ys):
            buf = mpi_buffer(self._ready(y))
            reqs.add(comm.Isend([buf, MPI.BYTE], dest=front, tag=tag), buf, f"reply to front {front}")
        return reqs


# --- transports built from one operation per message (staged and NCCL) ---

class Op:
    """One message in flight.  ``progress()`` moves it on without blocking and returns True once the
    message is sent, or received and its device copy enqueued; ``what`` names the peer for reports."""
    what: str = ""
    done: bool = False

    def progress(self) -> bool:
        raise NotImplementedError

    def wait(self) -> None:
        """Make the current stream (the host, for CPU tensors) wait until the received rows are in
        place (receives only)."""

    @property
    def rows(self) -> torch.Tensor:
        raise NotImplementedError


class OpExchange:
    """A front's dispatch: sends and reply receives; ``result()`` is the (N, D) answers on the device."""

    def __init__(self, transport: "OpTransport", ops: list[Op], recvs: list[Op], y_ND: torch.Tensor,
                 fresh: bool = False):
        self.transport, self.ops, self.recvs, self.y_ND, self.fresh = transport, ops, recvs, y_ND, fresh

    def test(self) -> bool:
        self.transport.progress()
        return all(op.done for op in self.ops)

    def result(self) -> torch.Tensor:
        for op in self.recvs:
            op.wait()
        if self.fresh:      # from another stream's pool, used on the compute stream from now on
            self.y_ND.record_stream(torch.cuda.current_stream(self.y_ND.device))
        return self.y_ND

    def pending(self) -> list[str]:
        return [op.what for op in self.ops if not op.done]


class OpReceive:
    """An expert's receives for one step, one per sending front."""

    def __init__(self, transport: "OpTransport", ops: list[Op], senders: list[int]):
        self.transport, self.ops, self.senders = transport, ops, senders

    def test(self) -> bool:
        self.transport.progress()
        return all(op.done for op in self.ops)

    def rows(self) -> list[torch.Tensor]:
        for op in self.ops:
            op.wait()
        return [op.rows for op in self.ops]

    def pending(self) -> list[str]:
        return [op.what for op in self.ops if not op.done]


class OpSends:
    def __init__(self, transport: "OpTransport", ops: list[Op]):
        self.transport, self.ops = transport, ops

    def test(self) -> bool:
        self.transport.progress()
        return all(op.done for op in self.ops)

    def pending(self) -> list[str]:
        return [op.what for op in self.ops if not op.done]


class OpTransport:
    """The exchange as messages, each through the channel ``channel(comm, peer)`` picks.  Every live
    message is progressed whenever any handle is tested, and, with ``start_progress_thread``, by a
    thread every few tens of microseconds: a front's loop runs a micro-batch for milliseconds between
    tests (much of it blocked on its GPU, the interpreter lock released), and a message that waits for
    it to answer (the go-ahead of an expert's reply) would wait as long."""

    name = "ops"

    def __init__(self, layer_comms: dict, n_fronts: int, hidden: int, dtype: torch.dtype, device: torch.device):
        self.comms, self.n_fronts, self.hidden, self.dtype = layer_comms, n_fronts, hidden, dtype
        self.device = device
        self.live: list[Op] = []
        self.lock = threading.RLock()      # the loop's thread and the progress thread
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def channel(self, comm, peer: int):
        raise NotImplementedError

    def progress(self) -> None:
        with self.lock:
            still = []
            for op in self.live:
                if not op.done:
                    op.done = op.progress()
                if not op.done:
                    still.append(op)
            self.live = still

    def background_progress(self) -> None:
        """What the progress thread does each round: everything here; the NCCL transport only its
        control plane (the part that waits on the other side), leaving the rest to the loops."""
        if self.live:
            self.progress()

    def start_progress_thread(self, interval: float = 100e-6) -> bool:
        """Progress live messages from a daemon thread too (needs MPI_THREAD_MULTIPLE)."""
        if MPI.Query_thread() < MPI.THREAD_MULTIPLE:
            log.warning("MPI gives no MPI_THREAD_MULTIPLE: messages progress only when the loops test them")
            return False

        def run() -> None:
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            while not self._stop.is_set():
                self.background_progress()
                time.sleep(interval)

        self._thread = threading.Thread(target=run, name="moe-mpi-exchange-progress", daemon=True)
        self._thread.start()
        atexit.register(self.stop_progress_thread)   # before MPI_Finalize (registered earlier, runs later)
        return True

    def stop_progress_thread(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _start(self, op: Op) -> Op:
        op.done = op.progress()
        if not op.done:
            self.live.append(op)
        return op

    # --- front side ---
    def dispatch(self, layer: int, step: int, x_ND: torch.Tensor, offsets: list[int], ready=None) -> OpExchange:
        """``ready``: a CUDA event after which x_ND is computed (else: the compute stream's work so far)."""
        with self.lock:
            return self._dispatch(layer, step, x_ND, offsets, ready)

    def _dispatch(self, layer: int, step: int, x_ND: torch.Tensor, offsets: list[int], ready=None) -> OpExchange:
        comm, n_experts = self.comms[layer], len(offsets) - 1
        x_ND = x_ND.contiguous()
        channels = [self.channel(comm, self.n_fronts + e) for e in range(n_experts)]
        # Answers land in a buffer that needs no wait for the compute stream when every channel can give
        # one (NCCL's stream pool); else in one from the compute stream, taken after its queued work.
        fresh = x_ND.is_cuda and all(hasattr(ch, "empty") for ch in channels)
        y_ND = channels[0].empty(x_ND.shape[0]) if fresh else torch.empty_like(x_ND)
        ops, recvs = [], []
        for e, ch in enumerate(channels):
            lo, hi = offsets[e], offsets[e + 1]
            dest = self.n_fronts + e
            peer = (f"rank {self.n_fronts + layer * n_experts + e} (expert {e} of MoE layer {layer}), "
                    f"micro-batch step {step}")
            recvs.append(self._start(ch.recv(comm, dest, step, out=y_ND[lo:hi], what="reply from " + peer,
                                             fresh=fresh)))
            ops.append(self._start(ch.send(comm, dest, step, x_ND[lo:hi], sized=True, what="send to " + peer,
                                           ready=ready)))
        return OpExchange(self, ops + recvs, recvs, y_ND, fresh)

    # --- expert side ---
    def expect(self, layer: int, step: int, senders: list[int], capacities: list[int]) -> OpReceive:
        with self.lock:
            return self._expect(layer, step, senders, capacities)

    def _expect(self, layer: int, step: int, senders: list[int], capacities: list[int]) -> OpReceive:
        comm = self.comms[layer]
        ops = [self._start(self.channel(comm, front).recv(
                   comm, front, step, cap=cap, what=f"rank {front} (front {front}), micro-batch step {step}"))
               for front, cap in zip(senders, capacities)]
        return OpReceive(self, ops, senders)

    def reply(self, layer: int, step: int, senders: list[int], ys: list[torch.Tensor]) -> OpSends:
        with self.lock:
            return self._reply(layer, step, senders, ys)

    def _reply(self, layer: int, step: int, senders: list[int], ys: list[torch.Tensor]) -> OpSends:
        comm = self.comms[layer]
        ops = [self._start(self.channel(comm, front).send(
                   comm, front, step, y.contiguous(), sized=False, what=f"reply to front {front} (step {step})"))
               for front, y in zip(senders, ys)]
        return OpSends(self, ops)


class StagedChannel:
    """Device rows through pinned host memory, in chunks of whole rows.

    Sending: the device->host copies of all chunks are enqueued at once on a copy stream (after the
    compute stream's work), and each chunk's Isend is posted as soon as its copy is done, so copies
    overlap transfers.  Receiving: each chunk's host->device copy is enqueued on another copy stream as
    soon as it arrives.  A message whose size the receiver does not know starts with a one-word
    header (its row count); chunks follow in order on the same tag (MPI keeps their order).
    """

    def __init__(self, hidden: int, dtype: torch.dtype, device: torch.device, chunk_bytes: int | None = None):
        self.hidden, self.dtype, self.device = hidden, dtype, device
        row_bytes = hidden * torch.empty(0, dtype=dtype).element_size()
        chunk_bytes = chunk_bytes or int(float(os.environ.get("MOE_MPI_STAGE_CHUNK_MB", "4")) * 2**20)
        self.rows_per_chunk = max(1, chunk_bytes // row_bytes)
        # On a CPU (tests of the protocol) the copies are plain and immediate.
        self.cuda = device.type == "cuda"
        self.d2h = torch.cuda.Stream(device) if self.cuda else None
        self.h2d = torch.cuda.Stream(device) if self.cuda else None

    def event(self, stream) -> "torch.cuda.Event | None":
        """An event recorded on ``stream`` now (None on a CPU, where every copy is already done)."""
        if not self.cuda:
            return None
        ev = torch.cuda.Event()
        ev.record(stream)
        return ev

    def host_buffer(self, like: torch.Tensor) -> torch.Tensor:
        return torch.empty(like.shape, dtype=like.dtype, pin_memory=self.cuda)

    def chunks(self, rows: int) -> list[tuple[int, int]]:
        return [(lo, min(lo + self.rows_per_chunk, rows)) for lo in range(0, rows, self.rows_per_chunk)]

    def send(self, comm, peer: int, step: int, x: torch.Tensor, *, sized: bool, what: str, ready=None) -> Op:
        return StagedSend(self, comm, peer, step % TAG_MOD, x, sized, what)

    def recv(self, comm, peer: int, step: int, *, out: torch.Tensor | None = None, cap: int | None = None,
             what: str, fresh: bool = False) -> Op:
        return StagedRecv(self, comm, peer, step % TAG_MOD, out, cap, what)


class StagedSend(Op):
    def __init__(self, ch: StagedChannel, comm, dest: int, tag: int, x: torch.Tensor, sized: bool, what: str):
        self.comm, self.dest, self.tag, self.what = comm, dest, tag, what
        self.reqs, self.keep = [], []
        if sized:
            header = np.array([x.shape[0]], dtype=np.int64)
            self.reqs.append(comm.Isend([header, MPI.INT64_T], dest=dest, tag=tag))
            self.keep.append(header)
        self.chunks = ch.chunks(x.shape[0])
        self.events, self.next = [], 0
        if self.chunks and not ch.cuda:
            self.host = x.clone()
            self.events = [None] * len(self.chunks)
        elif self.chunks:
            self.host = ch.host_buffer(x)
            ready = ch.event(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(ch.d2h):
                ch.d2h.wait_event(ready)
                for lo, hi in self.chunks:
                    self.host[lo:hi].copy_(x[lo:hi], non_blocking=True)
                    self.events.append(ch.event(ch.d2h))
            x.record_stream(ch.d2h)

    def progress(self) -> bool:
        while self.next < len(self.chunks) and (self.events[self.next] is None or self.events[self.next].query()):
            lo, hi = self.chunks[self.next]
            buf = as_bytes(self.host[lo:hi])
            self.reqs.append(self.comm.Isend([buf, MPI.BYTE], dest=self.dest, tag=self.tag))
            self.keep.append(buf)
            self.next += 1
        return self.next == len(self.chunks) and test_requests(self.reqs, [self.what])


class StagedRecv(Op):
    def __init__(self, ch: StagedChannel, comm, source: int, tag: int, out: torch.Tensor | None,
                 cap: int | None, what: str):
        self.ch, self.comm, self.source, self.tag, self.cap, self.what = ch, comm, source, tag, cap, what
        self.out, self.header, self.reqs, self.final = out, None, [], None
        if out is None:
            self.header = np.zeros(1, dtype=np.int64)
            self.header_req = comm.Irecv([self.header, MPI.INT64_T], source=source, tag=tag)
        else:
            self._post(out)

    def _post(self, out: torch.Tensor) -> None:
        self.out = out
        self.chunks = self.ch.chunks(out.shape[0])
        self.copied = [False] * len(self.chunks)
        if self.chunks:
            self.host = self.ch.host_buffer(out)
            self.reqs = [self.comm.Irecv([as_bytes(self.host[lo:hi]), MPI.BYTE], source=self.source, tag=self.tag)
                         for lo, hi in self.chunks]
            if self.ch.cuda:
                # out was allocated on the compute stream: copy into it only after what was queued there
                self.ready = self.ch.event(torch.cuda.current_stream(out.device))
                out.record_stream(self.ch.h2d)

    def progress(self) -> bool:
        if self.out is None:
            if not test_requests([self.header_req], [self.what]):
                return False
            rows = int(self.header[0])
            if self.cap is not None and rows > self.cap:
                raise RuntimeError(f"{self.what}: {rows} rows announced, at most {self.cap} expected")
            self._post(torch.empty(rows, self.ch.hidden, dtype=self.ch.dtype, device=self.ch.device))
        for k, req in enumerate(self.reqs):
            if not self.copied[k] and test_requests([req], [self.what]):
                lo, hi = self.chunks[k]
                if self.ch.cuda:
                    with torch.cuda.stream(self.ch.h2d):
                        self.ch.h2d.wait_event(self.ready)
                        self.out[lo:hi].copy_(self.host[lo:hi], non_blocking=True)
                else:
                    self.out[lo:hi].copy_(self.host[lo:hi])
                self.copied[k] = True
        if not all(self.copied):
            return False
        self.final = self.ch.event(self.ch.h2d)
        return True

    def wait(self) -> None:
        if self.final is not None:
            torch.cuda.current_stream(self.out.device).wait_event(self.final)

    @property
    def rows(self) -> torch.Tensor:
        return self.out


class StagedTransport(OpTransport):
    """GPU rows over an MPI that is not CUDA-aware: pinned host staging, chunked and pipelined."""

    name = "mpi-staged"

    def __init__(self, layer_comms: dict, n_fronts: int, hidden: int, dtype: torch.dtype, device: torch.device):
        super().__init__(layer_comms, n_fronts, hidden, dtype, device)
        self.staged = StagedChannel(hidden, dtype, device)

    def channel(self, comm, peer: int) -> StagedChannel:
        return self.staged


TRANSPORTS = ("auto", "mpi", "mpi-staged", "nccl")


def make_transport(name: str, layer_comms: dict, n_fronts: int, hidden: int, dtype: torch.dtype,
                   device: torch.device, world=None):
    """The transport for this run.  On CPUs ``auto`` and ``mpi`` are MPI on host memory and
    ``mpi-staged`` its chunked protocol with plain copies.  On GPUs ``auto`` takes MPI on device memory
    where the MPI library is CUDA-aware, else NCCL (bootstrapped from ``world``, which every rank must
    pass), else pinned host staging."""
    device = torch.device(device)
    if name not in TRANSPORTS:
        raise ValueError(f"--transport {name!r} is not one of {', '.join(TRANSPORTS)}")
    if device.type != "cuda":
        if name == "mpi-staged":
            return with_progress_thread(StagedTransport(layer_comms, n_fronts, hidden, dtype, device))
        if name == "nccl":
            if os.environ.get("MOE_MPI_TEST_NCCL_OVER_MPI") != "1":
                raise ValueError("--transport nccl moves GPU tensors: it needs --device cuda")
            from .nccl import NCCLTransport     # tests: the NCCL protocol with MPI carrying the payloads
            return with_progress_thread(NCCLTransport(layer_comms, n_fronts, hidden, dtype, device, world,
                                                      backend="mpi"))
        return MPITransport(layer_comms, n_fronts, hidden, dtype, device)
    cuda_aware = mpi_cuda_aware()
    if name == "auto":
        import torch.distributed as dist
        name = "mpi" if cuda_aware else ("nccl" if world is not None and dist.is_nccl_available() else "mpi-staged")
        log.info("transport: %s (MPI library %s CUDA-aware)", name, "is" if cuda_aware else "is not")
    if name == "mpi":
        if not cuda_aware:
            raise ValueError(f"--transport mpi on GPUs needs a CUDA-aware MPI, and "
                             f"{MPI.Get_library_version().splitlines()[0].strip()} is not one "
                             "(set MOE_MPI_CUDA_AWARE=1 if it is); use --transport nccl or mpi-staged")
        return MPITransport(layer_comms, n_fronts, hidden, dtype, device, device_buffers=True)
    if name == "mpi-staged":
        return with_progress_thread(StagedTransport(layer_comms, n_fronts, hidden, dtype, device))
    if world is None:
        raise ValueError("--transport nccl needs the world communicator to bootstrap NCCL")
    from .nccl import NCCLTransport
    return with_progress_thread(NCCLTransport(layer_comms, n_fronts, hidden, dtype, device, world))


def with_progress_thread(transport: OpTransport) -> OpTransport:
    """Start the transport's progress thread if MOE_MPI_PROGRESS_THREAD=1.  Off by default: on the
    paper-width slice it did not raise throughput (benchmarks/results/gpu_end_to_end_*)."""
    if os.environ.get("MOE_MPI_PROGRESS_THREAD", "0") == "1":
        transport.start_progress_thread()
    return transport
