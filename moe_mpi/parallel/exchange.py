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
* ``mpi-staged`` (``staged.py``): GPU runs over an MPI that is not CUDA-aware: rows go through pinned
  host buffers in chunks, each chunk's device->host copy (on its own stream) overlapping the previous
  chunk's transfer;
* ``nccl`` (``nccl.py``): NCCL point-to-point between GPUs, with MPI carrying the row counts;
* ``ipc`` (``ipc.py``): one node: copies straight into receive rings the peers lent through CUDA IPC
  (an MPI shared-memory window on CPUs), with MPI carrying a control word per message.

The last three are built from one operation per message (``ops.py``).
"""
from __future__ import annotations

import ctypes
import logging
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from mpi4py import MPI

from .ops import join_rows

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


def world_ranks(comm, world) -> list[int]:
    """World rank of each rank of ``comm``, in ``comm`` order."""
    group, wgroup = comm.Get_group(), world.Get_group()
    try:
        return MPI.Group.Translate_ranks(group, list(range(comm.Get_size())), wgroup)
    finally:
        group.Free()
        wgroup.Free()


def exchange_pairs(comms: dict, n_fronts: int, world) -> list[tuple[object, int, int]]:
    """Everyone this rank exchanges rows with (a front: every expert; an expert: every front), as
    (layer communicator, peer's rank in it, peer's world rank), layer by layer."""
    out = []
    for _, comm in sorted(comms.items()):
        ranks, mine = world_ranks(comm, world), comm.Get_rank()
        others = range(n_fronts, len(ranks)) if mine < n_fronts else range(n_fronts)
        out += [(comm, r, ranks[r]) for r in others]
    return out


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
                 row_bytes: int, peers: list[str], device: torch.device, hidden: int, dtype: torch.dtype):
        self.bufs, self.reqs, self.statuses, self.senders = bufs, reqs, statuses, senders
        self.row_bytes, self.peers, self.device, self.hidden, self.dtype = row_bytes, peers, device, hidden, dtype

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

    def joined(self) -> tuple[torch.Tensor, list[int]]:
        """Every sender's rows in one tensor, in sender order, and each sender's count."""
        return join_rows(self.rows(), self.hidden, self.dtype, self.device)


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
        return ExpertReceive(bufs, reqs, statuses, senders, self.row_bytes, peers, self.device, self.hidden,
                             self.dtype)

    def reply(self, layer: int, step: int, senders: list[int], ys: list[torch.Tensor]) -> Requests:
        comm, tag = self.comms[layer], step % TAG_MOD
        reqs = Requests()
        for front, y in zip(senders, ys):
            buf = mpi_buffer(self._ready(y))
            reqs.add(comm.Isend([buf, MPI.BYTE], dest=front, tag=tag), buf, f"reply to front {front}")
        return reqs

    def reply_rows(self, layer: int, step: int, senders: list[int], y: torch.Tensor, counts: list[int]) -> Requests:
        """``reply`` with every sender's rows in one tensor, ``counts[i]`` rows for ``senders[i]``."""
        return self.reply(layer, step, senders, list(y.split(counts)))


TRANSPORTS = ("auto", "mpi", "mpi-staged", "nccl", "ipc")


def make_transport(name: str, layer_comms: dict, n_fronts: int, hidden: int, dtype: torch.dtype,
                   device: torch.device, world=None, max_rows: int | None = None, slots: int = 5):
    """The transport for this run.  On CPUs ``auto`` and ``mpi`` are MPI on host memory,
    ``mpi-staged`` its chunked protocol with plain copies and ``ipc`` copies through an MPI
    shared-memory window.  On GPUs ``auto`` takes IPC where every exchanging pair is on one node with
    peer access between their GPUs, else MPI on device memory where the MPI library is CUDA-aware,
    else NCCL, else pinned host staging.  ``world`` (every rank must pass it) bootstraps NCCL and IPC;
    ``max_rows`` (the most rows of one message) and ``slots`` (messages one pair may have outstanding)
    size IPC's receive rings.  Collective over ``world``."""
    from .staged import StagedTransport

    device = torch.device(device)
    if name not in TRANSPORTS:
        raise ValueError(f"--transport {name!r} is not one of {', '.join(TRANSPORTS)}")
    if name == "ipc" or (name == "auto" and device.type == "cuda" and world is not None and max_rows):
        from .ipc import RING_SHARE, IPCTransport, ipc_possible

        if world is None or not max_rows:
            raise ValueError("--transport ipc needs the world communicator and the largest message's rows")
        ring = slots * max_rows * hidden * torch.empty(0, dtype=dtype).element_size()
        why_not = ipc_possible(world, layer_comms, n_fronts, device, ring, RING_SHARE if name == "auto" else None)
        if why_not is None:
            if name == "auto":
                log.info("transport: ipc (every exchanging pair on one node)")
            return with_progress_thread(IPCTransport(layer_comms, n_fronts, hidden, dtype, device, world,
                                                     max_rows, slots, "cuda" if device.type == "cuda" else "shm"))
        if name == "ipc":
            raise ValueError(f"--transport ipc needs every exchanging pair of ranks on one node, each rank "
                             f"seeing its peers' GPUs with peer access; {why_not}")
        log.info("transport: not ipc (%s)", why_not)
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


def with_progress_thread(transport):
    """Start the transport's progress thread if MOE_MPI_PROGRESS_THREAD=1.  Off by default: on the
    paper-width slice it did not raise throughput (benchmarks/results/gpu_end_to_end_*)."""
    if os.environ.get("MOE_MPI_PROGRESS_THREAD", "0") == "1":
        transport.start_progress_thread()
    return transport
