"""Transports built from one operation per message (the pinned-host staging and NCCL transports).

Each message is an ``Op`` on a *channel* (``OpTransport.channel(comm, peer)`` picks one per peer);
``OpTransport`` keeps every live operation and moves all of them on whenever any handle is tested, or
from a progress thread.  The handles (``OpExchange``, ``OpReceive``, ``OpSends``) are what the
runtime's loops poll, the same calls as ``exchange.MPITransport``'s.
"""
from __future__ import annotations

import atexit
import logging
import os
import threading
import time

import torch
from mpi4py import MPI

log = logging.getLogger("moe_mpi")
# what each message is, for reports (Described)
SEND_TO = "send to rank {} (expert {} of MoE layer {}), micro-batch step {}"
REPLY_FROM = "reply from rank {} (expert {} of MoE layer {}), micro-batch step {}"
FROM_FRONT = "rank {0} (front {0}), micro-batch step {1}"
REPLY_TO = "reply to front {} (step {})"


def join_rows(rows: list[torch.Tensor], hidden: int, dtype: torch.dtype,
              device: torch.device) -> tuple[torch.Tensor, list[int]]:
    """Senders' rows as one (rows, hidden) tensor, and each sender's count."""
    x = torch.cat(rows) if rows else torch.empty(0, hidden, dtype=dtype, device=device)
    return x, [r.shape[0] for r in rows]


def setting_at_least_0(name: str, raw: str, unit: str) -> float:
    """An environment setting's value ``raw`` as a number of at least 0, or an error naming it."""
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number of {unit}, got {raw!r}") from None
    if not value >= 0:
        raise ValueError(f"{name} must be at least 0, got {raw!r}")
    return value


def pass_interval(default: float) -> float:
    """Seconds a test reuses the last pass over the live messages: MOE_MPI_PASS_INTERVAL_US
    (microseconds, at least 0), else ``default``."""
    raw = os.environ.get("MOE_MPI_PASS_INTERVAL_US", "").strip()
    if not raw:
        return default
    return setting_at_least_0("MOE_MPI_PASS_INTERVAL_US", raw, "microseconds") * 1e-6


class Described:
    """A message's description for reports, formatted only if one is made: a front would otherwise
    format two for each expert of every micro-batch, microseconds of its host each time."""
    __slots__ = ("text", "args")

    def __init__(self, text: str, *args):
        self.text, self.args = text, args

    def __str__(self) -> str:
        return self.text.format(*self.args)

    __repr__ = __str__


class Op:
    """One message in flight.  ``progress()`` moves it on without blocking and returns True once the
    message is sent, or received and its device copy enqueued; ``what`` names the peer for reports.
    Operations with the same ``order`` key (not None) complete in the order they were made, and their
    ``progress()`` only tests, so a pass stops at the first of them not done yet.  (Where the order
    they reach the network differs, as when a front dispatches micro-batches out of step order, one
    that is done waits to be taken up until the one made before it is.)"""
    what: "str | Described" = ""
    done: bool = False
    order: tuple | None = None

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
        return [str(op.what) for op in self.ops if not op.done]


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

    def joined(self) -> tuple[torch.Tensor, list[int]]:
        """Every sender's rows in one (rows, hidden) tensor, in sender order, and each sender's count
        (the IPC transport's copy them straight out of its slots into it)."""
        tr = self.transport
        return join_rows(self.rows(), tr.hidden, tr.dtype, tr.device)

    def pending(self) -> list[str]:
        return [str(op.what) for op in self.ops if not op.done]


class OpSends:
    def __init__(self, transport: "OpTransport", ops: list[Op]):
        self.transport, self.ops = transport, ops

    def test(self) -> bool:
        self.transport.progress()
        return all(op.done for op in self.ops)

    def pending(self) -> list[str]:
        return [str(op.what) for op in self.ops if not op.done]


class OpTransport:
    """The exchange as messages, each through the channel ``channel(comm, peer)`` picks.  Every live
    message is progressed whenever any handle is tested, and, with ``start_progress_thread``, by a
    thread every few tens of microseconds: a front's loop runs a micro-batch for milliseconds between
    tests (much of it blocked on its GPU, the interpreter lock released), and a message that waits for
    it to answer (the go-ahead of an expert's reply) would wait as long.

    A pass over every live message costs tens of microseconds, and a front's loop tests each of its
    micro-batches in turn; so a test within ``PASS_INTERVAL`` of the end of the last pass reuses that
    pass's outcome instead of making another (a front with 8 micro-batches in flight made up to 8 passes
    per turn of its loop, while a profile showed its GPU waiting for the host's next launch)."""

    name = "ops"
    PASS_INTERVAL = 50e-6      # seconds; MOE_MPI_PASS_INTERVAL_US sets it per transport (pass_interval)
    rec = None      # a Recorder: the loops' passes become 'progress' spans in the trace

    def __init__(self, layer_comms: dict, n_fronts: int, hidden: int, dtype: torch.dtype, device: torch.device):
        self.comms, self.n_fronts, self.hidden, self.dtype = layer_comms, n_fronts, hidden, dtype
        self.device = device
        self.live: list[Op] = []
        self.lock = threading.RLock()      # the loop's thread and the progress thread
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._passed = -1.0            # perf_counter() at the end of the last pass
        self.PASS_INTERVAL = pass_interval(self.PASS_INTERVAL)

    def channel(self, comm, peer: int):
        raise NotImplementedError

    def progress(self) -> None:
        """Move every live message on, unless a pass ended less than PASS_INTERVAL ago."""
        if time.perf_counter() - self._passed < self.PASS_INTERVAL:
            return
        with self.lock:
            start = time.perf_counter()
            self._pass()
            self._passed = time.perf_counter()
        if self.rec is not None:
            self.rec.add_progress(start, self._passed)

    def _pass(self) -> None:
        """One pass over the live messages, each ordered queue up to its first message not done (a front
        with 8 micro-batches in flight has up to 64 live, mostly behind one another on a few queues);
        the caller holds the lock."""
        still, stuck = [], set()
        for op in self.live:
            if op.order is not None and op.order in stuck:
                still.append(op)
                continue
            if not op.done:
                op.done = op.progress()
            if not op.done:
                still.append(op)
                if op.order is not None:
                    stuck.add(op.order)
        self.live = still

    def background_progress(self) -> None:
        """What the progress thread does each round: everything here; the NCCL transport only its
        control plane (the part that waits on the other side), leaving the rest to the loops."""
        if self.live:
            with self.lock:
                self._pass()

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

    def _queue(self, op: Op) -> Op:
        """``_start`` for a message that cannot have moved yet: live, first looked at by the next pass."""
        op.done = False
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
            dest, rank = self.n_fronts + e, self.n_fronts + layer * n_experts + e
            recvs.append(self._start(ch.recv(comm, dest, step, out=y_ND[lo:hi], fresh=fresh,
                                             what=Described(REPLY_FROM, rank, e, layer, step))))
            ops.append(self._start(ch.send(comm, dest, step, x_ND[lo:hi], sized=True, ready=ready,
                                           what=Described(SEND_TO, rank, e, layer, step))))
        return OpExchange(self, ops + recvs, recvs, y_ND, fresh)

    # --- expert side ---
    def expect(self, layer: int, step: int, senders: list[int], capacities: list[int]) -> OpReceive:
        with self.lock:
            return self._expect(layer, step, senders, capacities)

    def _expect(self, layer: int, step: int, senders: list[int], capacities: list[int]) -> OpReceive:
        comm = self.comms[layer]
        ops = [self._start(self.channel(comm, front).recv(
                   comm, front, step, cap=cap, what=Described(FROM_FRONT, front, step)))
               for front, cap in zip(senders, capacities)]
        return OpReceive(self, ops, senders)

    def reply(self, layer: int, step: int, senders: list[int], ys: list[torch.Tensor]) -> OpSends:
        with self.lock:
            return self._reply(layer, step, senders, ys)

    def reply_rows(self, layer: int, step: int, senders: list[int], y: torch.Tensor, counts: list[int]) -> OpSends:
        """``reply`` with every sender's rows in one tensor, ``counts[i]`` rows for ``senders[i]`` in
        order (as ``joined`` gave them)."""
        with self.lock:
            return self._reply_rows(layer, step, senders, y, counts)

    def _reply_rows(self, layer: int, step: int, senders: list[int], y: torch.Tensor, counts: list[int]) -> OpSends:
        return self._reply(layer, step, senders, list(y.split(counts)))

    def _reply(self, layer: int, step: int, senders: list[int], ys: list[torch.Tensor]) -> OpSends:
        comm = self.comms[layer]
        ops = [self._start(self.channel(comm, front).send(
                   comm, front, step, y.contiguous(), sized=False, what=Described(REPLY_TO, front, step)))
               for front, y in zip(senders, ys)]
        return OpSends(self, ops)
