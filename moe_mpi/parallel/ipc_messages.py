"""The IPC transport's messages (the protocol is in ``ipc``'s docstring): a send into a peer's slot,
a receive out of one of this rank's slots, the event that one dispatch's or reply's sends wait on, and
the handles a front's dispatch and an expert's step return.  The transport (``ipc.IPCTransport``)
posts and takes them out.
"""
from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

import torch

from .ipc_rings import MAX_STEP
from .ops import Op, OpExchange, OpReceive

if TYPE_CHECKING:
    from .ipc import IPCTransport


class SharedReady:
    """An event of the transport's pool recorded once on ``stream`` (the compute stream) for all the
    sends of one dispatch or reply (their rows are computed once it passes), back in the pool once the last of
    their copy streams waits for it."""
    __slots__ = ("tr", "handle", "left")

    def __init__(self, tr: "IPCTransport", uses: int, stream: int):
        self.tr, self.left, self.handle = tr, uses, tr.event()
        tr.driver.record(self.handle, stream)

    def used(self) -> None:
        self.left -= 1
        if self.left == 0:
            self.tr.events.append(self.handle)


class IpcSend(Op):
    """Rows lo...lo+n of x (all of them by default) to a peer.  Sent by the transport's ``_post``: in
    one launch with its dispatch's or reply's other kernel copies, or on its own on its pair's stream
    (``arm``, then ``send`` into the slot ``_post`` found free, or ``progress`` until one is)."""

    def __init__(self, tr: "IPCTransport", comm, peer: int, step: int, x: torch.Tensor, what,
                 lo: int = 0, n: int | None = None):
        self.tr, self.step, self.what = tr, step, what
        self.ring = tr.send_rings[(id(comm), peer)]
        self.x, self.lo, self.n = x, lo, x.shape[0] if n is None else n
        if self.n > tr.max_rows:
            raise RuntimeError(f"{what}: {self.n} rows, but the transport's slots hold {tr.max_rows}")
        if not 0 <= step <= MAX_STEP:
            raise RuntimeError(f"{what}: step {step} does not fit a mailbox word (at most {MAX_STEP})")
        self.ready, self.shared, self.caller_event = 0, None, None

    def arm(self, ready: int, caller_event=None, shared: SharedReady | None = None) -> None:
        """Its rows are computed once ``ready`` (a raw event handle) has passed: the caller's event
        (kept alive until posted) or ``shared``'s."""
        if self.tr.cuda and self.n:
            self.ready, self.caller_event, self.shared = ready, caller_event, shared

    def progress(self) -> bool:
        slot = self.ring.take()
        if slot is not None:
            self.send(slot)
        return slot is not None

    def send(self, slot: int) -> None:
        """Its rows into the peer's free ``slot`` on its pair's stream, and the slot's mailbox written."""
        self.ring.fill(slot, self.step, self.x, self.lo, self.n, self.ready)
        if self.shared is not None:
            self.shared.used()
        self.x, self.ready, self.shared, self.caller_event, self.done = None, 0, None, None, True


class IpcRecv(Op):
    """A message from a peer, to go into rows at...at+n of ``out`` (contiguous; n: all its rows by
    default) or, with no ``out``, a tensor of its own of at most ``cap`` rows; taken out of its slot by
    the transport's ``take_out``."""

    def __init__(self, tr: "IPCTransport", comm, peer: int, step: int, out: torch.Tensor | None,
                 cap: int | None, what, at: int = 0, n: int | None = None):
        self.tr, self.step, self.what, self.out, self.cap, self.at = tr, step, what, out, cap, at
        self.expected = None if out is None else (out.shape[0] - at if n is None else n)
        self.ring = tr.recv_rings[(id(comm), peer)]
        self.taken, self.n, self.slot = False, 0, -1
        if out is not None and not out.is_contiguous():
            raise ValueError(f"{what}: the rows' destination must be contiguous")

    def progress(self) -> bool:
        found = self.ring.find(self.step)
        if found is None:
            return False
        slot, rows = found
        if self.expected is not None and rows != self.expected:
            raise RuntimeError(f"{self.what}: {rows} rows announced, {self.expected} expected")
        if self.cap is not None and rows > self.cap:
            raise RuntimeError(f"{self.what}: {rows} rows announced, at most {self.cap} expected")
        self.n, self.slot = rows, slot
        return True

    def wait(self) -> None:
        if not self.taken:
            if self.out is None:
                self.out = torch.empty(self.n, self.tr.hidden, dtype=self.tr.dtype, device=self.tr.device)
            self.tr.take_out([(self, self.out, self.at)])

    @property
    def rows(self) -> torch.Tensor:
        return self.out.narrow(0, self.at, self.n)


class IpcExchange(OpExchange):
    """A front's dispatch: its replies are taken out of their slots into the result together (one
    launch for those the kernel copies, which writes all their slots' hand-backs too)."""

    def result(self) -> torch.Tensor:
        self.transport.take_out([(op, self.y_ND, op.at) for op in self.recvs if not op.taken])
        return self.y_ND


class IpcReceive(OpReceive):
    """An expert's receives for one step; ``joined`` takes every front's rows out of their slots
    straight into one tensor, together."""

    def joined(self) -> tuple[torch.Tensor, list[int]]:
        tr = self.transport
        counts = [op.n for op in self.ops]
        x = torch.empty(sum(counts), tr.hidden, dtype=tr.dtype, device=tr.device)
        ats = itertools.accumulate(counts, initial=0)
        tr.take_out([(op, x, at) for op, at in zip(self.ops, ats) if not op.taken])
        return x, counts
