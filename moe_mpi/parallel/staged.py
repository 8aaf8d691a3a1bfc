"""GPU rows over an MPI that is not CUDA-aware: through pinned host buffers, chunked and pipelined."""
from __future__ import annotations

import os

import numpy as np
import torch
from mpi4py import MPI

from .exchange import TAG_MOD, as_bytes, test_requests
from .ops import Op, OpTransport

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
