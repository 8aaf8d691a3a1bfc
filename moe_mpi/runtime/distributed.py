"""The distributed run: F front ranks and one rank per (MoE layer, expert).

Rank 0 checks the input and output first and tells every rank what to do (or that the job is refused).
Every rank then derives the same work plan from the sequence lengths, builds only its own weights and
runs its loop:

* a front keeps up to ``in_flight`` micro-batches going; each is a forward generator that stops at
  every MoE layer while its rows are with that layer's experts, and meanwhile the front computes
  attention for the others;
* an expert receives step j's rows from every front that has a micro-batch j, runs one batched MLP,
  and sends each front its rows back, with the next steps' receives already posted.

Finished sequences travel to rank 0, the only writer.  Waiting ranks back off (sleep) instead of
spinning, and every wait has a deadline after which the rank names the peers it waits for and the job
is aborted.
"""
from __future__ import annotations

import gzip
import logging
import os
import shutil
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from mpi4py import MPI

from ..config import ModelConfig
from ..io.inputs import InputReader
from ..model.transformer import FrontModel
from ..model.weights import build_expert, build_front
from ..parallel.partition import WorkPlan
from ..parallel.topology import Communicators, Layout, Role
from .job import (PendingResults, Prepared, ScoreOptions, checkpoint, make_batch, progress_bar, warm_up_expert,
                  warm_up_front, warm_up_size)
from .interrupt import StopControl
from .metrics import Backoff, Recorder

log = logging.getLogger("moe_mpi")
RESULT_TAG = 7


class DeadlineError(RuntimeError):
    pass


@dataclass
class Context:
    """Everything a rank's loop needs, passed explicitly."""
    opts: ScoreOptions
    cfg: ModelConfig
    layout: Layout
    role: Role
    comms: Communicators
    prep: Prepared
    plan: WorkPlan
    transport: object
    rec: Recorder
    device: torch.device
    control: StopControl

    def weights_kw(self) -> dict:
        return dict(seed=self.opts.seed, dtype=self.opts.torch_dtype, device=self.device,
                    checkpoint=checkpoint(self.opts))


class Waiter:
    """Back-off plus deadline for a loop that polls requests.

    Experts give up later than fronts: when an expert hangs, the fronts waiting on it report it by
    name before the other experts (which then merely wait on the stalled fronts) time out.
    """

    def __init__(self, ctx: Context):
        # GPU ranks are not oversubscribed, and a front asleep past a finished exchange idles its GPU
        backoff = Backoff() if ctx.device.type == "cpu" else Backoff(cap=5e-5)
        self.ctx, self.backoff, self.last = ctx, backoff, time.monotonic()
        self.deadline = ctx.opts.deadline * (1.0 if ctx.role.kind == "front" else 1.5)

    def progressed(self) -> None:
        self.backoff.reset()
        self.last = time.monotonic()

    def idle(self, pending) -> None:
        start = time.perf_counter()
        if time.monotonic() - self.last > self.deadline:
            waiting = "; ".join(pending()[:8]) or "nothing (internal error)"
            raise DeadlineError(f"{self.ctx.role.describe(self.ctx.cfg)} waited more than "
                                f"{self.deadline:g} s for: {waiting}")
        self.backoff.pause()
        self.ctx.rec.add_wait(start, time.perf_counter())


@dataclass
class MicroBatch:
    step: int
    seqs: np.ndarray
    batch: object
    gen: object
    t_start: float
    exchange: object = None     # posted: waiting for the experts' answers
    request: object = None      # routed: waiting for its rows per expert to reach the host
    finishing: object = None    # done: waiting for its outputs to reach the host
    layer: int = -1


class Writer:
    """Rank 0's side of the results: its own and those other fronts send it."""

    def __init__(self, ctx: Context, out, n_tokens: int):
        self.ctx, self.out = ctx, out
        self.fronts_left = ctx.layout.n_fronts - 1
        self.incoming: deque = deque()     # receives of matched messages, in matching order
        self.bar = progress_bar(n_tokens, ctx.opts.progress)

    def write(self, results, load) -> None:
        with self.ctx.rec.span("write", "io", sequences=len(results)):
            self.out.write(results, load)
        self.bar.update(sum(r.length for r in results))

    def poll(self) -> bool:
        """Take up what other fronts sent, without blocking: a message larger than MPI's eager limit
        moves only when its sender next enters MPI, which a front computing a micro-batch does not
        for milliseconds (a blocking receive here took 1.6 ms per message, median, on 4 H200s, an
        eighth of front 0's time).  Messages are matched as they come (``improbe``), received
        without blocking, and handled in the order they matched, so a front's "done" comes after its
        results."""
        world, got = self.ctx.comms.world, False
        while (msg := world.improbe(source=MPI.ANY_SOURCE, tag=RESULT_TAG)) is not None:
            self.incoming.append(msg.irecv())
        while self.incoming:
            arrived, message = self.incoming[0].test()
            if not arrived:
                break
            self.incoming.popleft()
            kind, payload = message
            if kind == "result":
                self.write(*payload)
            else:
                front, admitted_upto = payload
                self.ctx.control.front_done(front, admitted_upto)
                self.fronts_left -= 1
            got = True
        return got

    def close(self) -> None:
        self.bar.close()


class TorchProfile:
    """``MOE_MPI_TORCH_PROFILE=DIR[,FIRST,COUNT]``: a front records PyTorch's profiler (host operators and
    GPU kernels) from when it has admitted FIRST micro-batches of its own until it has finished COUNT
    more (default 32 and 16), and writes DIR/<name>.txt (operators by host time) and DIR/<name>.json.gz
    (a Chrome trace).  A diagnostic for where a front's loop spends its time; off by default."""

    def __init__(self, name: str, device, out_dir: str, first: int, count: int):
        from torch.profiler import ProfilerActivity, profile
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        self.name, self.out, self.first, self.count = name, out_dir, first, count
        self.prof = profile(activities=acts)
        self.state = "waiting"

    @classmethod
    def from_env(cls, name: str, device) -> "TorchProfile | None":
        spec = os.environ.get("MOE_MPI_TORCH_PROFILE")
        if not spec:
            return None
        parts = spec.split(",")
        nums = [int(v) for v in parts[1:3]] + [32, 16][len(parts[1:3]):]
        return cls(name, device, parts[0], nums[0], nums[1])

    def at_step(self, admitted: int, finished: int) -> None:
        """Called each loop with the micro-batches this front has admitted and finished so far."""
        if self.state == "waiting" and admitted >= self.first:
            self.prof.start()
            self.state, self.until = "on", finished + self.count
        elif self.state == "on" and finished >= self.until:
            self.finish()

    def finish(self) -> None:
        if self.state != "on":
            return
        self.prof.stop()
        self.state = "done"
        out = Path(self.out)
        out.mkdir(parents=True, exist_ok=True)
        table = self.prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=70)
        (out / f"{self.name}.txt").write_text(table)
        raw = out / f"{self.name}.json"
        self.prof.export_chrome_trace(str(raw))
        with open(raw, "rb") as src, gzip.open(f"{raw}.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        raw.unlink()


def run_front(ctx: Context, writer: Writer | None) -> None:
    opts, f = ctx.opts, ctx.role.front
    front: FrontModel = build_front(ctx.cfg, **ctx.weights_kw())
    warm_up_front(front, ctx.cfg, ctx.prep.spec.mode, ctx.device, warm_up_size(ctx.prep, ctx.opts, ctx.cfg))
    reader = InputReader(ctx.prep.spec)
    mine = list(ctx.plan.per_front[f].items())   # [(step, sequences)]
    world = ctx.comms.world
    sends: list = []
    active: deque[MicroBatch] = deque()
    ctx.comms.world.Barrier()
    ctx.rec.restart()
    ctx.rec.watch_gc()
    waiter = Waiter(ctx)  # the deadline counts from here, not from start-up

    def advance(mb: MicroBatch, y) -> bool:
        """Compute until the micro-batch's next MoE layer or its end, then post its exchange or deliver
        its results if the device has got that far (else a later poll does).  True once delivered."""
        with ctx.rec.span(f"compute mb{mb.step}", "compute", step=mb.step, after_layer=mb.layer):
            mb.exchange = None
            try:
                mb.request = mb.gen.send(y)
                mb.layer = mb.request.moe_layer
            except StopIteration as stop:
                mb.finishing = PendingResults(front, mb.batch, mb.seqs, stop.value, save_hidden=opts.save_hidden,
                                              save_routing=opts.save_routing)
        if mb.request is not None:
            post(mb)
            return False
        return deliver(mb)

    def post(mb: MicroBatch) -> bool:
        req = mb.request
        if not req.plan.ready():
            return False
        with ctx.rec.span(f"dispatch mb{mb.step} L{req.moe_layer}", "send", step=mb.step, layer=req.moe_layer):
            mb.exchange = ctx.transport.dispatch(req.moe_layer, mb.step, req.x_ND, req.plan.offsets,
                                                 ready=req.plan.event)
            mb.request = None
        return True

    def deliver(mb: MicroBatch) -> bool:
        if not mb.finishing.ready():
            return False
        if ctx.prep.replayed(mb.seqs):       # written by the run this one resumes
            mb.finishing = None
            return True
        with ctx.rec.span(f"collect mb{mb.step}", "io", step=mb.step):
            results, load = mb.finishing.get(), mb.finishing.load
        mb.finishing = None
        ctx.rec.latencies.append(time.perf_counter() - mb.t_start)
        if writer is not None:
            writer.write(results, load)
        else:
            with ctx.rec.span(f"results mb{mb.step}", "send", step=mb.step):
                sends.append(world.isend(("result", (results, load)), dest=0, tag=RESULT_TAG))
        return True

    def pending() -> list[str]:
        out = []
        for mb in active:
            if mb.exchange is not None:
                out += mb.exchange.pending()
            else:
                out.append(f"this front's {ctx.device} to finish micro-batch step {mb.step}")
        return out

    next_step, admitted_upto, control = 0, 0, ctx.control
    profiler = TorchProfile.from_env(f"front{f}", ctx.device)
    with torch.inference_mode():
        while True:
            if profiler is not None:
                profiler.at_step(next_step, len(ctx.rec.latencies))
            control.poll(admitted_upto)
            upcoming = mine[next_step][0] if next_step < len(mine) else None
            if not active and (upcoming is None or control.finished_early(upcoming)):
                break
            progressed = False
            while (len(active) < opts.in_flight and next_step < len(mine)
                   and control.may_admit(mine[next_step][0])):
                step, seqs = mine[next_step]
                with ctx.rec.span(f"read mb{step}", "io"):
                    batch = make_batch(reader, seqs, ctx.device)
                mb = MicroBatch(step, seqs, batch, front.forward_steps(batch), time.perf_counter())
                next_step, admitted_upto = next_step + 1, step + 1
                if not advance(mb, None):
                    active.append(mb)
                progressed = True
            for mb in list(active):
                if mb.request is not None:
                    progressed |= post(mb)
                elif mb.finishing is not None:
                    if deliver(mb):
                        active.remove(mb)
                        progressed = True
                elif mb.exchange.test():
                    if advance(mb, mb.exchange.result()):
                        active.remove(mb)
                    progressed = True
            if writer is not None:
                progressed |= writer.poll()
            if progressed:
                waiter.progressed()
            else:
                waiter.idle(pending)
    if profiler is not None:
        profiler.finish()
    reader.close()
    if writer is None:
        sends.append(world.isend(("done", (f, admitted_upto)), dest=0, tag=RESULT_TAG))
        while not MPI.Request.Testall(sends):
            waiter.idle(lambda: ["rank 0 (the writer) to take this front's results"])
    else:
        control.front_done(0, admitted_upto)
        while writer.fronts_left > 0:
            control.poll(admitted_upto)
            if writer.poll():
                waiter.progressed()
            else:
                waiter.idle(lambda: [f"results from {writer.fronts_left} more front(s)"])


def run_expert(ctx: Context) -> None:
    role, plan, lengths = ctx.role, ctx.plan, ctx.prep.spec.lengths
    mlp = build_expert(ctx.cfg, role.layer, role.expert, **ctx.weights_kw())
    warm_up_expert(mlp, ctx.cfg, ctx.opts.torch_dtype, ctx.device, tokens=warm_up_size(ctx.prep, ctx.opts, ctx.cfg),
                   fronts=ctx.layout.n_fronts)
    steps, depth = plan.steps, max(2, ctx.opts.in_flight)
    receives: dict = {}
    replies: deque = deque()

    def post(step: int) -> None:
        senders = plan.senders(step)
        caps = [plan.tokens(fr, step, lengths) for fr in senders]
        receives[step] = ctx.transport.expect(role.layer, step, senders, caps)

    ctx.comms.world.Barrier()
    ctx.rec.restart()
    ctx.rec.watch_gc()
    waiter = Waiter(ctx)
    for step in steps[:depth]:
        post(step)
    # Fault injection for the reliability tests: this rank raises at its third step.
    fault = os.environ.get("MOE_MPI_INJECT_FAULT_RANK") == str(role.rank)
    with torch.inference_mode():
        for i, step in enumerate(steps):
            recv = receives.pop(step)
            while not recv.test():
                while replies and replies[0].test():
                    replies.popleft()
                ctx.control.poll()
                waiter.idle(lambda: recv.pending() + [p for r in replies for p in r.pending()])
            waiter.progressed()
            if fault and i == 2:
                raise RuntimeError("injected fault (MOE_MPI_INJECT_FAULT_RANK)")
            with ctx.rec.span(f"expert step {step}", "compute", step=step) as span:
                x, counts = recv.joined()       # every front's rows, one tensor
                span["rows"] = sum(counts)
                y = mlp(x) if x.shape[0] else x
            ctx.rec.rows_in += sum(counts)
            with ctx.rec.span(f"reply step {step}", "send", step=step):
                replies.append(ctx.transport.reply_rows(role.layer, step, recv.senders, y, counts))
            if i + depth < len(steps):
                post(steps[i + depth])
            while replies and replies[0].test():
                replies.popleft()
    while replies:
        if replies[0].test():
            replies.popleft()
        else:
            waiter.idle(lambda: [p for r in replies for p in r.pending()])


def set_threads(world) -> None:
    """Share the node's cores among its ranks: oversubscribed ranks must not fight over threads."""
    local = world.Split_type(MPI.COMM_TYPE_SHARED)
    n_local = local.Get_size()
    local.Free()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, cores // n_local))
