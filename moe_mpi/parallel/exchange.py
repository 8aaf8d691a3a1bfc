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
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from mpi4py import MPI

TAG_MOD = 32768  # MPI guarantees tags up to 32767; in-flight steps are far fewer, so wrapping is safe


def as_bytes(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor's storage as a writable uint8 array (no copy)."""
    assert t.is_contiguous() and t.device.type == "cpu"
    return t.view(-1).view(torch.uint8).numpy() if t.numel() else np.empty(0, np.uint8)


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
        return MPI.Request.Testall(self.reqs) if self.reqs else True

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
                if req.Test(self.statuses[i]):
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
    """Host-memory transport over the per-layer communicators.  Tensors on a GPU are staged through
    host memory (this MPI need not be CUDA-aware)."""

    name = "mpi"

    def __init__(self, layer_comms: dict, n_fronts: int, hidden: int, dtype: torch.dtype,
                 device: torch.device = torch.device("cpu")):
        self.comms, self.n_fronts, self.hidden, self.dtype = layer_comms, n_fronts, hidden, dtype
        self.device = device
        self.row_bytes = hidden * torch.empty(0, dtype=dtype).element_size()

    # --- front side ---
    def dispatch(self, layer: int, step: int, x_ND: torch.Tensor, offsets: list[int]) -> FrontExchange:
        comm, tag = self.comms[layer], step % TAG_MOD
        x_ND = x_ND.contiguous().cpu()
        y_ND = torch.empty_like(x_ND)
        reqs = Requests()
        for e in range(len(offsets) - 1):
            lo, hi = offsets[e], offsets[e + 1]
            dest = self.n_fronts + e
            peer = f"expert {e} of MoE layer {layer} (micro-batch step {step})"
            recv_buf = as_bytes(y_ND[lo:hi])
            reqs.add(comm.Irecv([recv_buf, MPI.BYTE], source=dest, tag=tag), recv_buf, "reply from " + peer)
            send_buf = as_bytes(x_ND[lo:hi])
            reqs.add(comm.Isend([send_buf, MPI.BYTE], dest=dest, tag=tag), send_buf, "send to " + peer)
        reqs.bufs.append(x_ND)
        return FrontExchange(y_ND, reqs, self.device)

    # --- expert side ---
    def expect(self, layer: int, step: int, senders: list[int], capacities: list[int]) -> ExpertReceive:
        comm, tag = self.comms[layer], step % TAG_MOD
        bufs, reqs, statuses, peers = [], [], [], []
        for front, cap in zip(senders, capacities):
            buf = torch.empty(cap, self.hidden, dtype=self.dtype)
            reqs.append(comm.Irecv([as_bytes(buf), MPI.BYTE], source=front, tag=tag))
            bufs.append(buf)
            statuses.append(MPI.Status())
            peers.append(f"front {front} (micro-batch step {step})")
        return ExpertReceive(bufs, reqs, statuses, senders, self.row_bytes, peers, self.device)

    def reply(self, layer: int, step: int, senders: list[int], ys: list[torch.Tensor]) -> Requests:
        comm, tag = self.comms[layer], step % TAG_MOD
        reqs = Requests()
        for front, y in zip(senders, ys):
            buf = as_bytes(y.contiguous().cpu())
            reqs.add(comm.Isend([buf, MPI.BYTE], dest=front, tag=tag), buf, f"reply to front {front}")
        return reqs


def make_transport(name: str, layer_comms: dict, n_fronts: int, hidden: int, dtype: torch.dtype,
                   device: torch.device):
    """The transport for this run: ``auto`` picks the fastest one that works here."""
    if name in ("auto", "mpi", "mpi-staged"):
        return MPITransport(layer_comms, n_fronts, hidden, dtype, device)
    raise ValueError(f"--transport {name} is not available in this build")
