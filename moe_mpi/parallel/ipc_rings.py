"""The IPC transport's rings and mailboxes (the protocol is in ``ipc``'s docstring): the node's
mailbox words in shared host memory, and each pair's ring as its sender sees it (where to write, which
slots came back) and as its receiver does (which slot holds a step; the transport takes the rows out).
"""
from __future__ import annotations

import mmap
from typing import TYPE_CHECKING

import numpy as np
import torch
from mpi4py import MPI

from .cuda_driver import Driver

if TYPE_CHECKING:
    from .ipc import IPCTransport

FILLED, FREED = range(2)       # a mailbox's words
MAX_STEP = 2**31 - 2           # the largest step a ``filled`` word can name


def filled_word(step: int, rows: int) -> int:
    """The ``filled`` word that announces ``step``'s message of ``rows`` rows (``RecvRing.find`` reads it)."""
    return (step + 1) << 32 | rows


class Mailboxes:
    """The node's mailboxes, (sender, receiver, slot, word) over node-local ranks, in one MPI
    shared-memory window (node rank 0's, page-aligned) that every process registers with CUDA."""

    def __init__(self, world, slots: int, driver: "Driver | None"):
        self.node = world.Split_type(MPI.COMM_TYPE_SHARED, key=world.Get_rank())
        n = self.node.Get_size()
        self.local = {wr: i for i, wr in enumerate(self.node.allgather(world.Get_rank()))}
        shape = (n, n, slots, 2)
        nbytes = int(np.prod(shape)) * 8
        span = -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE
        self.window = MPI.Win.Allocate_shared(span + mmap.PAGESIZE if self.node.Get_rank() == 0 else 0, 1,
                                              comm=self.node)
        buf, _ = self.window.Shared_query(0)
        raw = np.frombuffer(buf, dtype=np.uint8)
        skip = -raw.ctypes.data % mmap.PAGESIZE
        self.words = raw[skip:skip + nbytes].view(np.int64).reshape(shape)
        if self.node.Get_rank() == 0:
            self.words[...] = 0
        self.node.Barrier()
        self.driver, self.host = driver, raw.ctypes.data + skip
        self.device = driver.register_host(self.host, span) if driver else 0

    def of(self, sender: int, receiver: int) -> np.ndarray:
        """The (slots, 2) words of one pair (world ranks), a view."""
        return self.words[self.local[sender], self.local[receiver]]

    def address(self, sender: int, receiver: int, slot: int, word: int) -> int:
        """A word's device address (for a stream to write it)."""
        s, r = self.local[sender], self.local[receiver]
        return self.device + 8 * (((s * self.words.shape[1] + r) * self.words.shape[2] + slot) * 2 + word)

    def free(self) -> None:
        if self.driver is not None:
            self.driver.unregister_host(self.host)
            self.driver = None


class SendRing:
    """This rank's view of one peer's ring for it: where to write, and which slots the peer has emptied."""

    def __init__(self, tr: "IPCTransport", peer: int, remote, box: np.ndarray, filled: list[int]):
        self.tr, self.peer = tr, peer
        self.remote = remote            # device address of slot 0 (GPU), or a uint8 array (shm)
        self.box, self.freed = box, box[:, FREED]
        self.filled = filled            # device addresses of the slots' ``filled`` words (GPU)
        self.fills = [0] * tr.slots     # times this rank has filled each slot
        self.stream = torch.cuda.Stream(tr.device) if tr.cuda else None
        self.handle = self.stream.cuda_stream if tr.cuda else 0

    def take(self) -> int | None:
        """A slot the peer has emptied as often as this rank filled it, or None."""
        for slot, (freed, fills) in enumerate(zip(self.freed.tolist(), self.fills)):
            if freed == fills:
                return slot
        return None

    def address(self, slot: int) -> int:
        """The device address of a slot (GPU)."""
        return self.remote + slot * self.tr.slot_bytes

    def fill(self, slot: int, step: int, x: torch.Tensor, lo: int, n: int, ready: int) -> None:
        """Copy rows lo...lo+n of x (contiguous) into the peer's slot once ``ready`` (a raw event
        handle, 0 for none) has passed, then say so in the slot's mailbox, on this pair's stream."""
        tr, nbytes = self.tr, n * self.tr.row_bytes
        self.fills[slot] += 1
        word = filled_word(step, n)
        if not tr.cuda:
            start = slot * tr.slot_bytes
            self.remote[start:start + nbytes] = x[lo:lo + n].contiguous().view(-1).view(torch.uint8).numpy()
            self.box[slot, FILLED] = word
            return
        if not nbytes:
            tr.driver.write_value(self.handle, self.filled[slot], word)
            return
        if ready:
            tr.driver.wait(self.handle, ready)
        tr.copy(self.address(slot), x.data_ptr() + lo * tr.row_bytes, nbytes, self.handle, (self.filled[slot], word))
        x.record_stream(self.stream)


class RecvRing:
    """This rank's ring for one peer: the slots, and their mailboxes."""

    def __init__(self, tr: "IPCTransport", local: torch.Tensor, box: np.ndarray, freed: list[int]):
        self.tr = tr
        self.slot_tensors = local.unbind(0)     # each slot a (max_rows, hidden) tensor
        self.base = local.data_ptr()            # slot 0's address
        self.box, self.filled = box, box[:, FILLED]
        self.freed = freed                      # device addresses of the slots' ``freed`` words (GPU)
        self.takes = [0] * tr.slots             # times this rank has emptied each slot (IPCTransport.take_out)

    def find(self, step: int) -> tuple[int, int] | None:
        """The slot holding ``step``'s message and its row count, once its rows are there; else None."""
        for slot, word in enumerate(self.filled.tolist()):
            if word >> 32 == step + 1:
                return slot, word & 0xFFFFFFFF
        return None
