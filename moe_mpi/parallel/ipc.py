"""The IPC transport: on one node, rows move GPU to GPU by a copy straight into memory that the
receiving rank lent the sender through CUDA IPC, and each message is signalled through a mailbox in
node-shared host memory that the GPUs write themselves; MPI launches the ranks, builds the rings and
carries nothing per message.

* Rings: every rank that receives from a peer keeps ``slots`` slots of ``max_rows`` rows for it in
  its own GPU memory (one allocation per rank, shared with the peers through ``cudaIpcGetMemHandle``).
  The sender maps it once (``cuIpcOpenMemHandle``) and writes a message with one ``cuMemcpyAsync``
  on a copy stream of its own for that peer: the copy engines move it over NVLink (or within the GPU
  for a peer that shares it), no SMs are held, and nothing waits for the partner to be ready.
  Messages of at least ``MOE_MPI_IPC_SM_COPY_MB`` (by default every message, for a rank whose peers
  are on two or more other GPUs) are copied instead by a kernel (``peer_copy``): faster where a GPU
  sends to and receives from several others at once, and fewer host calls, at the price of SMs
  (``benchmarks/results/gpu_copy_engines_nvidia-h200.md``).  A dispatch's sends that go by the kernel
  (one per expert) go in one launch on a stream of the transport's, whose last program writes their
  mailbox words once every row is in place (``MOE_MPI_IPC_KERNEL_SIGNALS=0``: by the driver after
  it); so do a reply's (one per front).  The messages a front's result or an expert's step takes
  out of their slots are copied (by the kernel in one launch, which writes the hand-backs too) and
  handed back together.  Words the driver writes go three or more to a call
  (``cuStreamBatchMemOp``).  So where the messages go by the kernel, a micro-batch's host calls do
  not grow with its peers: a launch for the sends (and a wait for their rows), one for the take-out.
* Mailboxes: each (sender, receiver, slot) has two 64-bit words in one MPI shared-memory window of
  the node, registered with CUDA in every process (``cuMemHostRegister``) so that streams can write
  them (``cuStreamWriteValue64``, which fences the work before it): ``filled`` (the message's step + 1
  in the high 32 bits and its row count in the low ones, written by the sender's copy stream once the
  copy is done: one word, so no reader sees one half new and the other old) and ``freed`` (how many
  times the receiver has emptied the slot, written by the receiver's compute stream after the copy
  out of it).
  A sender takes a slot whose ``freed`` count has caught up with its own count of fills; a receiver
  takes the slot whose ``filled`` word names its step, resets that word and copies the rows out.
  Neither host waits for the other's GPU or calls MPI per message: a message costs the sender a
  stream wait, the copy and one stream write, and the receiver a read of host memory, the copy out
  and one stream write (an MPI control word and a slot hand-back per message, with their tests
  and event queries, made this transport host-bound below 4096 tokens per micro-batch:
  ``benchmarks/results/gpu_exchange_trace_nvidia-h200.md``).
* A pair needs at least as many slots as a front keeps micro-batches in flight, as many as the pair can
  have messages outstanding: with fewer, a front could fill an expert's slots with later micro-batches
  while the expert, which takes steps in order, waits for an earlier one.

``backend="shm"`` runs the same protocol on CPUs over MPI shared-memory windows (rings and mailboxes)
with plain copies and host writes, so the tests exercise it on machines without GPUs; it relies on the
host's stores becoming visible in program order (x86), which the GPU path does not (the copy is fenced
before its word on the GPU, and the rows are read on the GPU).
"""
from __future__ import annotations

import atexit
import logging
import socket

import numpy as np
import torch
from mpi4py import MPI

from .cuda_driver import Driver, current_stream_handle, stream_writes_problem
from .exchange import exchange_pairs
from .ipc_messages import IpcExchange, IpcReceive, IpcRecv, IpcSend, SharedReady
from .ipc_rings import FILLED, FREED, Mailboxes, RecvRing, SendRing, filled_word
from .ops import FROM_FRONT, REPLY_FROM, REPLY_TO, SEND_TO, Described, OpExchange, OpReceive, OpSends, OpTransport
from .peer_copy import SmCopy, sm_copy_threshold

log = logging.getLogger("moe_mpi")
RING_SHARE = 0.2      # auto takes IPC only if the rings of the ranks on a GPU take at most this share of it


def ipc_possible(world, comms: dict, n_fronts: int, device: torch.device, ring_bytes_per_peer: int = 0,
                 share: float | None = None) -> str | None:
    """Why the IPC transport cannot serve this job (None if it can): every exchanging pair must be on
    one node, and each rank must see its peers' GPUs with peer access between them and have streams
    that can write host memory (the mailboxes); with ``share``,
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
        if not problems:
            why = stream_writes_problem(device)
            problems += [why] if why else []
        total = torch.cuda.get_device_properties(device).total_memory
        rings = sum(b for h, u, b in table if (h, u) == (host, uuid))
        if share is not None and rings > share * total:
            problems.append(f"the receive rings of the ranks on GPU {device.index} would take {rings / 1e9:.1f} GB, "
                            f"over {share:.0%} of its {total / 1e9:.0f} GB (lower --in-flight or "
                            "--micro-batch-tokens, or pass --transport ipc to take them anyway)")
    problems = world.allgather(problems[0] if problems else None)
    first = next((f"rank {r}: {p}" for r, p in enumerate(problems) if p), None)
    return first


class IPCTransport(OpTransport):
    """Copies into rings that receivers lent through CUDA IPC, signalled through mailboxes in shared
    host memory, one node (see the module's docstring).  ``max_rows``: the most rows of one message (a
    micro-batch's tokens); ``slots``: messages a pair may have outstanding (at least the micro-batches
    a front keeps in flight)."""

    name = "ipc"

    def __init__(self, layer_comms: dict, n_fronts: int, hidden: int, dtype: torch.dtype, device: torch.device,
                 world, max_rows: int, slots: int, backend: str = "cuda"):
        super().__init__(layer_comms, n_fronts, hidden, dtype, device)
        self.cuda = backend == "cuda"
        if self.cuda != (device.type == "cuda"):
            raise ValueError(f"IPC transport backend {backend!r} on device {device}")
        if self.cuda and device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.max_rows, self.slots = max(1, int(max_rows)), max(1, int(slots))
        if self.max_rows >= 2**32:
            raise ValueError(f"IPC transport: {self.max_rows} rows a message do not fit a mailbox word")
        self.row_bytes = hidden * torch.empty(0, dtype=dtype).element_size()
        self.slot_bytes = self.max_rows * self.row_bytes
        self.driver = Driver() if self.cuda else None
        # messages of at least this many bytes are copied by SMs rather than the copy engines (_build)
        self.sm_copy_bytes: int | None = None
        self.me = world.Get_rank()
        # the stream of the kernel copies of a dispatch's or a reply's sends, all in one launch
        self.batch_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.send_rings: dict[tuple, SendRing] = {}
        self.recv_rings: dict[tuple, RecvRing] = {}
        self._opened: dict[bytes, int] = {}
        self.events: list[int] = []                 # raw events for IpcSend's ``ready``, free to record
        self._build(world)
        atexit.register(self.boxes.free)

    def by_kernel(self, dst: int, src: int, nbytes: int) -> bool:
        """Whether a copy of nbytes from src to dst (device addresses) goes by the SM kernel (from
        ``sm_copy_bytes``, where the addresses suit it) rather than the copy engines."""
        return self.sm_copy is not None and nbytes >= self.sm_copy_bytes and SmCopy.fits(dst, src, nbytes)

    def copy(self, dst: int, src: int, nbytes: int, stream: int, word: tuple[int, int] | None = None) -> None:
        """nbytes from src to dst (device addresses) on ``stream``, by the kernel or the copy engines,
        then ``word`` (a mailbox's address and value) written once the copy is done: by the kernel's
        launch itself, or by the stream after the copy engines'."""
        if self.by_kernel(dst, src, nbytes):
            self.sm_copy.copy_many([(dst, src, nbytes)], stream, [word] if word else ())
        else:
            self.driver.copy_async(dst, src, nbytes, stream)
            if word:
                self.driver.write_value(stream, *word)

    def event(self) -> int:
        """A raw event from the pool (a new one if all are in use)."""
        return self.events.pop() if self.events else self.driver.new_event()

    # --- the exchange: OpTransport's, with fewer host calls ---
    def _dispatch(self, layer: int, step: int, x_ND: torch.Tensor, offsets: list[int], ready=None) -> OpExchange:
        """OpTransport's, with each message an address and a row count instead of a tensor of its own,
        its sends posted together (``_post``) and its replies taken together (``IpcExchange``): a front
        makes these for every expert of every micro-batch, and each host call costs microseconds."""
        comm, n_experts = self.comms[layer], len(offsets) - 1
        x_ND = x_ND.contiguous()
        y_ND = torch.empty(x_ND.shape, dtype=x_ND.dtype, device=x_ND.device)
        sends, recvs = [], []
        for e in range(n_experts):
            lo, n = offsets[e], offsets[e + 1] - offsets[e]
            dest, rank = self.n_fronts + e, self.n_fronts + layer * n_experts + e
            # (no look at its mailbox yet: the expert has not had this step's rows)
            recvs.append(self._queue(IpcRecv(self, comm, dest, step, y_ND, None,
                                             Described(REPLY_FROM, rank, e, layer, step), at=lo, n=n)))
            sends.append(IpcSend(self, comm, dest, step, x_ND, Described(SEND_TO, rank, e, layer, step), lo=lo, n=n))
        self._post(sends, ready)
        return IpcExchange(self, sends + recvs, recvs, y_ND)

    def _expect(self, layer: int, step: int, senders: list[int], capacities: list[int]) -> OpReceive:
        """An expert's receives for a step.  It takes steps in order, so each front's receives form an
        ordered queue (``Op.order``): a pass looks for the earliest step's message only, not for each
        of the several steps posted ahead (each look reads the ring's mailbox words)."""
        comm = self.comms[layer]
        ops = []
        for front, cap in zip(senders, capacities):
            op = IpcRecv(self, comm, front, step, None, cap, Described(FROM_FRONT, front, step))
            op.order = ("from", id(comm), front)
            ops.append(self._start(op))
        return IpcReceive(self, ops, senders)

    def _reply(self, layer: int, step: int, senders: list[int], ys: list[torch.Tensor]) -> OpSends:
        comm = self.comms[layer]
        sends = [IpcSend(self, comm, front, step, y.contiguous(), Described(REPLY_TO, front, step))
                 for front, y in zip(senders, ys)]
        self._post(sends, None)
        return OpSends(self, sends)

    def _reply_rows(self, layer: int, step: int, senders: list[int], y: torch.Tensor, counts: list[int]) -> OpSends:
        """``_reply`` by address: each front's rows of y, without a tensor of their own (an expert
        replies every step, and splitting y costs its host microseconds a view)."""
        comm, y, lo, sends = self.comms[layer], y.contiguous(), 0, []
        for front, n in zip(senders, counts):
            sends.append(IpcSend(self, comm, front, step, y, Described(REPLY_TO, front, step), lo=lo, n=n))
            lo += n
        self._post(sends, None)
        return OpSends(self, sends)

    def _post(self, sends: list[IpcSend], ready) -> None:
        """Start the sends of one dispatch or reply.  Those whose peer has a free slot and whose copy
        goes by the kernel go together: one wait for their rows, one launch and their mailbox words
        written together, on the transport's batch stream.  The rest go each on its pair's stream, now
        or once a slot is free.  Their rows are computed once ``ready`` (the caller's event) has
        passed, or else the compute stream's work so far (one event recorded for all of them)."""
        batch, alone = [], []           # (send, its free slot or None)
        for op in sends:
            slot = op.ring.take()
            if slot is not None and op.n and self.sm_copy is not None and self.by_kernel(
                    op.ring.address(slot), op.x.data_ptr() + op.lo * self.row_bytes, op.n * self.row_bytes):
                batch.append((op, slot))
            else:
                alone.append((op, slot))
        shared, handle = None, 0
        if self.cuda:
            if ready is not None:
                handle = ready.cuda_event
            else:
                uses = sum(1 for op, _ in alone if op.n) + bool(batch)
                shared = SharedReady(self, uses, current_stream_handle(self.device)) if uses else None
                handle = shared.handle if shared else 0
        if batch:
            self._send_batch(batch, handle)
            if shared is not None:
                shared.used()
        for op, slot in alone:
            op.arm(handle, ready, shared)
            if slot is None:
                self._start(op)         # (progress takes the first slot that comes free)
            else:
                op.send(slot)

    def _send_batch(self, batch: list[tuple[IpcSend, int]], ready: int) -> None:
        """Each (send, free slot): its rows copied into the peer's slot by the kernel, all in one
        launch once ``ready`` (a raw event, 0 for none) has passed, which then writes every mailbox."""
        stream, d, rb = self.batch_stream.cuda_stream, self.driver, self.row_bytes
        if ready:
            d.wait(stream, ready)
        copies, words = [], []
        for op, slot in batch:
            copies.append((op.ring.address(slot), op.x.data_ptr() + op.lo * rb, op.n * rb))
            op.ring.fills[slot] += 1
            words.append((op.ring.filled[slot], filled_word(op.step, op.n)))
        self.sm_copy.copy_many(copies, stream, words)       # (the launch writes the words, SmCopy)
        for x in {id(op.x): op.x for op, _ in batch}.values():
            x.record_stream(self.batch_stream)
        for op, _ in batch:
            op.done, op.x = True, None

    def take_out(self, recvs: list[tuple[IpcRecv, torch.Tensor, int]]) -> None:
        """Each (arrived message, x, at): its rows copied out of its slot into rows ``at``... of x
        (contiguous) on the current stream (those the kernel copies in one launch), and its slot
        handed back once the copies are done (the words written together: by the kernel's launch
        where the kernel copies any, else ``write_values``)."""
        if not recvs:
            return
        with self.lock:
            stream = current_stream_handle(self.device) if self.cuda else 0
            kernel, hand_back = [], []
            for op, x, at in recvs:
                if op.slot < 0:
                    raise RuntimeError(f"{op.what}: taken before it arrived")
                op.taken = True
                ring, slot, rows = op.ring, op.slot, op.n
                if rows and self.cuda:
                    # by address: a slice of x and of the slot, and copy_, cost three times as much
                    dst, src, nbytes = x.data_ptr() + at * self.row_bytes, ring.base + slot * self.slot_bytes, \
                        rows * self.row_bytes
                    if self.by_kernel(dst, src, nbytes):
                        kernel.append((dst, src, nbytes))
                    else:
                        self.driver.copy_async(dst, src, nbytes, stream)
                elif rows:
                    x[at:at + rows].copy_(ring.slot_tensors[slot][:rows])
                ring.box[slot, FILLED] = 0
                ring.takes[slot] += 1
                if self.cuda:
                    hand_back.append((ring.freed[slot], ring.takes[slot]))
                else:
                    ring.box[slot, FREED] = ring.takes[slot]
            if kernel:      # the hand-backs written by the kernel's launch, after every copy of the stream
                self.sm_copy.copy_many(kernel, stream, hand_back)
            elif hand_back:
                self.driver.write_values(stream, hand_back)

    # --- set-up ---
    def _build(self, world) -> None:
        pairs = exchange_pairs(self.comms, self.n_fronts, world)
        shape = (len(pairs), self.slots, self.max_rows, self.hidden)     # one ring per peer
        nbytes = len(pairs) * self.slots * self.slot_bytes
        if self.cuda:
            self.ring = torch.empty(shape, dtype=self.dtype, device=self.device)
            handle, offset = self.driver.export(self.ring.data_ptr())
        self.boxes = Mailboxes(world, self.slots, self.driver)     # (registered in the device's context)
        if not self.cuda:
            node = self.boxes.node
            self.window = MPI.Win.Allocate_shared(max(1, nbytes), 1, comm=node)
            buf, _ = self.window.Shared_query(node.Get_rank())
            self.ring = torch.frombuffer(buf, dtype=torch.uint8)[:nbytes].view(self.dtype).view(shape)
            handle, offset = node.Get_rank(), 0

        per_peer = self.slots * self.slot_bytes
        gpu = str(torch.cuda.get_device_properties(self.device).uuid) if self.cuda else None
        lent = [dict() for _ in range(world.Get_size())]     # what each peer needs from this rank
        for i, (comm, peer, wr) in enumerate(pairs):
            lent[wr] = {"handle": handle, "offset": offset + i * per_peer, "gpu": gpu}
        got = world.alltoall(lent)
        if self.cuda:
            peer_gpus = {got[wr]["gpu"] for _, _, wr in pairs} - {gpu}
            self.sm_copy_bytes = sm_copy_threshold(self.device, len(peer_gpus))
        box = self.boxes
        for i, (comm, peer, wr) in enumerate(pairs):
            theirs = got[wr]
            if self.cuda:
                remote = self._open(theirs["handle"]) + theirs["offset"]
            else:
                rbuf, _ = self.window.Shared_query(theirs["handle"])
                remote = np.frombuffer(rbuf, dtype=np.uint8)[theirs["offset"]:theirs["offset"] + per_peer]
            self.send_rings[(id(comm), peer)] = SendRing(
                self, wr, remote, box.of(self.me, wr),
                [box.address(self.me, wr, k, FILLED) for k in range(self.slots)] if self.cuda else [])
            self.recv_rings[(id(comm), peer)] = RecvRing(
                self, self.ring[i], box.of(wr, self.me),
                [box.address(wr, self.me, k, FREED) for k in range(self.slots)] if self.cuda else [])
        # compiled by the driver now, not inside a message's first send
        self.sm_copy = SmCopy(self.driver) if self.sm_copy_bytes is not None else None
        world.Barrier()
        log.info("IPC transport: %d peers, %d slots of %d rows each, %.1f MB of %s memory lent to them%s",
                 len(pairs), self.slots, self.max_rows, nbytes / 1e6, "GPU" if self.cuda else "shared",
                 "" if self.sm_copy_bytes is None else "; every message copied by SMs" if not self.sm_copy_bytes
                 else f"; messages from {self.sm_copy_bytes / 1e6:g} MB copied by SMs")

    def _open(self, handle: bytes) -> int:
        """A peer's allocation mapped into this process, once per allocation."""
        if handle not in self._opened:
            self._opened[handle] = self.driver.open_handle(handle)
        return self._opened[handle]
