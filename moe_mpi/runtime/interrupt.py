"""Stopping early on SIGTERM or SIGUSR1 (what Slurm sends before a time limit), or on a first Ctrl-C
(SIGINT; a second one raises KeyboardInterrupt at once), without losing work.

A signal only sets a flag; the loops poll it.  In a distributed run the fronts must agree where to
stop, because an expert's step j waits for every front that has a micro-batch j:

1. any rank that is signalled tells rank 0;
2. rank 0 tells every front to stop admitting micro-batches; each answers with the first step it has
   not admitted (a front that already finished reported that with its results);
3. rank 0 sends back the largest of these, S; every front completes its micro-batches before S, so
   every exchange it starts has all its partners, and its results reach the writer.

Rank 0 then leaves a ``.partial`` whose done sequences are complete and ends the job with exit status
``EXIT_INTERRUPTED``; ``--resume`` finishes the rest.
"""
from __future__ import annotations

import logging
import signal

from mpi4py import MPI

log = logging.getLogger("moe_mpi")

STOP_TAG = 9
EXIT_INTERRUPTED = 3
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class Interrupt:
    """Turns SIGTERM/SIGUSR1/SIGINT into a flag for as long as it is installed."""

    def __init__(self):
        self.signum: int | None = None
        self._old = {}

    def __enter__(self) -> "Interrupt":
        for sig in SIGNALS:
            if signal.getsignal(sig) is not signal.SIG_IGN:     # a background job's SIGINT stays ignored
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def _handle(self, signum, frame) -> None:
        self.signum = self.signum or signum
        if signum == signal.SIGINT:     # the next Ctrl-C is Python's again: a user who will not wait
            signal.signal(signal.SIGINT, self._old.get(signal.SIGINT, signal.default_int_handler))

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "signal"


class StopControl:
    """One rank's part in agreeing where to stop (see the module docstring)."""

    def __init__(self, world, n_fronts: int, interrupt: Interrupt, is_front: bool):
        self.world, self.n_fronts, self.interrupt = world, n_fronts, interrupt
        self.rank, self.is_front = world.Get_rank(), is_front
        self.reported = False
        self.stopping = False          # fronts: stop admitting until stop_at is known
        self.stop_at: int | None = None
        self.signal_name: str | None = None
        self._sends: list = []
        # rank 0 only
        self._admitted: dict[int, int] = {}
        self._finished: dict[int, int] = {}

    # --- every rank ---
    def poll(self, admitted_upto: int = 0) -> None:
        if self.interrupt.signum and not self.reported:
            self.reported = True
            self._send(0, ("signal", self.rank, self.interrupt.name))
        if self.rank == 0:
            self._poll_root(admitted_upto)
        elif self.is_front:
            while self.world.iprobe(source=0, tag=STOP_TAG):
                kind, value = self.world.recv(source=0, tag=STOP_TAG)
                if kind == "stop":
                    self.stopping, self.signal_name = True, value
                    self._send(0, ("admitted", self.rank, admitted_upto))
                else:
                    self.stop_at = value
        MPI.Request.Testall(self._sends)

    def may_admit(self, step: int) -> bool:
        return not self.stopping or (self.stop_at is not None and step < self.stop_at)

    def finished_early(self, next_step: int | None) -> bool:
        """True once stopping and no step this front has left is before the stop step."""
        return self.stopping and self.stop_at is not None and (next_step is None or next_step >= self.stop_at)

    def front_done(self, front: int, admitted_upto: int) -> None:
        """Rank 0 learns that a front has finished all it will do (its last step + 1)."""
        self._finished[front] = admitted_upto
        self._admitted.setdefault(front, admitted_upto)

    def _send(self, dest: int, msg) -> None:
        self._sends.append(self.world.isend(msg, dest=dest, tag=STOP_TAG))

    # --- rank 0 ---
    def _poll_root(self, admitted_upto: int) -> None:
        while self.world.iprobe(source=MPI.ANY_SOURCE, tag=STOP_TAG):
            kind, who, value = self.world.recv(source=MPI.ANY_SOURCE, tag=STOP_TAG)
            if kind == "signal":
                self._begin(value)
            else:
                self._admitted[who] = value
        if self.interrupt.signum and not self.stopping:
            self._begin(self.interrupt.name)
        if self.stopping and self.stop_at is None:
            self._admitted.setdefault(0, admitted_upto)
            if len(self._admitted) == self.n_fronts:
                self.stop_at = max(self._admitted.values())
                log.info("fronts stop before micro-batch step %d", self.stop_at)
                for f in range(1, self.n_fronts):
                    if f not in self._finished:
                        self._send(f, ("stop_at", self.stop_at))

    def _begin(self, name: str) -> None:
        if self.stopping:
            return
        self.stopping, self.signal_name = True, name
        log.warning("%s received: finishing the micro-batches in flight, then saving and stopping", name)
        for f in range(1, self.n_fronts):
            if f not in self._finished:
                self._send(f, ("stop", name))
