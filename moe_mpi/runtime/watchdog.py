"""Noticing a rank that died (SIGKILL, OOM killer, segfault) and ending the job with its name.

MPI itself gives the survivors no word: they would wait on a peer that is gone until the launcher
tears the job down, and the launcher names a PID, not a role.  So each rank watches one neighbour on
its node (a ring over the node's ranks) through /proc, and the first to see its neighbour gone prints
which rank, role and layer died, then aborts the job.  Hangs of a live rank are the exchange
deadline's business, not this one's.
"""
from __future__ import annotations

import os
import sys
import threading
import time

EXIT_PEER_DIED = 4
ABORT_GRACE_S = 0.5


def abort_job(world, code: int) -> None:
    """MPI_Abort, after a moment: the launcher forwards a rank's stderr through a pipe and stops reading
    once the abort reaches it, so the line the rank just printed about why it ends the job would be lost."""
    time.sleep(ABORT_GRACE_S)
    world.Abort(code)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


class PeerWatch:
    def __init__(self, world, describe, interval: float = 0.5):
        from mpi4py import MPI

        self.world, self.interval = world, interval
        self._stop = threading.Event()
        self._thread = None
        local = world.Split_type(MPI.COMM_TYPE_SHARED)
        peers = local.allgather((world.Get_rank(), os.getpid()))
        me, n = local.Get_rank(), local.Get_size()
        local.Free()
        self.buddy = peers[(me + 1) % n] if n > 1 and os.path.isdir("/proc") else None
        self.describe = describe

    def start(self) -> "PeerWatch":
        if self.buddy is not None:
            self._thread = threading.Thread(target=self._run, name="moe-mpi-peer-watch", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Before any rank may exit: call on every rank, then a barrier, then leave."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        rank, pid = self.buddy
        while not self._stop.wait(self.interval):
            if _alive(pid):
                continue
            # If the whole job is being torn down (an abort elsewhere), we die within this second
            # and stay silent; otherwise the neighbour died alone and we say so.
            time.sleep(1.0)
            if self._stop.is_set():
                return
            print(f"moe-mpi: {self.describe(rank)} (pid {pid}) died without a word (killed by a signal, "
                  f"out of memory, or crashed); ending the job", file=sys.stderr, flush=True)
            abort_job(self.world, EXIT_PEER_DIED)
