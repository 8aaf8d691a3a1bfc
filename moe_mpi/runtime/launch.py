"""``moe-mpi score``'s entry: the 1-rank run or the distributed one, with the job's error policy.

* Bad input, bad output path, bad checkpoint, wrong world size: one line naming the problem, exit 2,
  nothing written at OUT.h5 (rank 0 checks; every rank learns the verdict and exits alike).
* Any other error on any rank: one line naming the rank, its role and layer, then MPI_Abort ends the
  whole job at once, never a hang.
"""
from __future__ import annotations

import logging
import sys
import time
import traceback

import numpy as np

from ..io.inputs import InputError
from ..io.outputs import OutputError
from ..model.weights import WeightError
from .interrupt import EXIT_INTERRUPTED, Interrupt
from .job import Interrupted, ScoreOptions, ipc_slots, load_config, prepare, run_attributes
from .watchdog import abort_job

log = logging.getLogger("moe_mpi")
USER_ERRORS = (InputError, OutputError, WeightError, ValueError)


def _mpi():
    from mpi4py import MPI
    return MPI


def mpi_library_version() -> str:
    # Open MPI 4.1's string ends in a NUL byte, which an HDF5 string attribute refuses
    return _mpi().Get_library_version().replace("\x00", "").strip().splitlines()[0]


def error(msg: str) -> None:
    print(f"moe-mpi: error: {msg}", file=sys.stderr, flush=True)


def launch(opts: ScoreOptions) -> int:
    MPI = _mpi()
    world = MPI.COMM_WORLD
    with Interrupt() as interrupt:
        return _launch(opts, world, interrupt)


def _launch(opts: ScoreOptions, world, interrupt: Interrupt) -> int:
    if world.Get_size() == 1:
        from .single import score_single
        try:
            attrs = score_single(opts, mpi_library_version(), interrupt)
        except Interrupted as exc:
            error(str(exc))
            return EXIT_INTERRUPTED
        except USER_ERRORS as exc:
            error(str(exc))
            return 2
        except Exception as exc:  # noqa: BLE001 - one line for the user; the traceback with -v
            print(f"moe-mpi: failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            if log.isEnabledFor(logging.DEBUG):
                traceback.print_exc()
            return 1
        summarize(opts, attrs)
        return 0
    try:
        return _distributed(opts, world, interrupt)
    except Exception as exc:  # noqa: BLE001 - any failure must end the whole job, loudly, at once
        who = getattr(exc, "rank_role", None) or f"rank {world.Get_rank()}"
        print(f"moe-mpi: {who} failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        if log.isEnabledFor(logging.DEBUG):
            traceback.print_exc()
        abort_job(world, 1)
        return 1


def _distributed(opts: ScoreOptions, comm_world, interrupt: Interrupt) -> int:
    from ..parallel.devices import bind_device
    from ..parallel.exchange import make_transport
    from ..parallel.topology import Communicators, check_world_size
    from .distributed import Context, Writer, run_expert, run_front, set_threads
    from .interrupt import StopControl
    from .watchdog import PeerWatch
    from .metrics import Recorder, aggregate, format_table, write_trace

    rank = comm_world.Get_rank()
    if rank != 0:
        logging.getLogger().setLevel(logging.WARNING)
    verdict, out = None, None
    if rank == 0:
        try:
            cfg = load_config(opts)
            check_world_size(cfg, comm_world.Get_size(), opts.front_ranks)
            prep, out = prepare(opts, cfg)
            verdict = ("ok", prep)
        except USER_ERRORS as exc:
            verdict = ("error", str(exc))
    verdict = comm_world.bcast(verdict, root=0)
    if verdict[0] == "error":
        if rank == 0:
            error(verdict[1])
        return 2
    prep = verdict[1]
    cfg = load_config(opts)
    layout = check_world_size(cfg, comm_world.Get_size(), opts.front_ranks)
    comms = Communicators.create(comm_world, layout)
    watch = PeerWatch(comms.world, lambda r: layout.role(r).describe(cfg)).start()
    try:
        role = layout.role(rank)
        set_threads(comms.world)
        device = bind_device(comms.world, opts.device)
        plan = prep.plan(layout.n_fronts, opts.micro_batch_tokens)
        label = f"front {role.front}" if role.kind == "front" else f"expert L{role.layer} E{role.expert}"
        rec = Recorder(rank, label, tracing=bool(opts.trace))
        lengths = prep.spec.lengths
        max_rows = max((plan.tokens(fr, st, lengths) for st in plan.steps for fr in plan.senders(st)), default=1)
        transport = make_transport(opts.transport, comms.layers, layout.n_fronts, cfg.hidden_size,
                                   opts.torch_dtype, device, world=comms.world, max_rows=max_rows,
                                   slots=ipc_slots(opts))
        control = StopControl(comms.world, layout.n_fronts, interrupt, is_front=role.kind == "front")
        ctx = Context(opts, cfg, layout, role, comms, prep, plan, transport, rec, device, control)
        transport.rec = rec       # passes over the live messages show in the trace ('progress' spans)
        n_tokens = prep.tokens_in(plan)
        if rank == 0:
            log.info("scoring %d tokens of %s on %d ranks: %d fronts + %d x %d experts, %d micro-batch steps",
                     n_tokens, opts.input, layout.world_size, layout.n_fronts, layout.n_moe_layers,
                     layout.n_experts, len(plan.steps))
        try:
            writer = Writer(ctx, out, n_tokens) if rank == 0 else None
            if role.kind == "front":
                run_front(ctx, writer)
            else:
                run_expert(ctx)
        except Exception as exc:
            exc.rank_role = role.describe(cfg)
            raise
        if rank == 0 and control.stopping:
            out.commit()
        if rank == 0 and control.stopping and not out.done.all():
            writer.close()
            done = int(out.done.sum())
            out.close()
            error(Interrupted.message(control.signal_name, done, prep.spec.n_seqs, opts.output))
            abort_job(comm_world, EXIT_INTERRUPTED)  # the experts still wait for steps that will not come
        elapsed = time.perf_counter() - rec.t0
        rec.stop_gc()
        summaries = comms.world.gather(rec.summary(), root=0)
        events = comms.world.gather(rec.events, root=0) if opts.trace else None
        if rank == 0:
            writer.close()
            metrics = aggregate(summaries)
            attrs = run_attributes(opts, cfg, world_size=layout.world_size, mpi_version=mpi_library_version(),
                                   elapsed=elapsed, tokens=n_tokens, metrics=metrics)
            out.finish(attrs)
            if opts.trace:
                write_trace(opts.trace, summaries, events)
            log.info("per-rank time (s):\n%s", format_table(summaries))
            summarize(opts, attrs)
        watch.stop()
        comms.world.Barrier()
    finally:
        comms.free()
    return 0


def summarize(opts: ScoreOptions, attrs: dict) -> None:
    """The closing lines a person reads: where the output went and what it says."""
    import h5py

    with h5py.File(opts.output, "r") as f:
        mean = None
        if "token_logprobs" in f:
            lp = f["sequence_logprob"][...]
            n_scored = int((f["lengths"][...] - 1).sum())
            mean = float(np.sum(lp) / max(n_scored, 1))
    m = attrs.get("metrics") or {}
    lat = ""
    if m.get("micro_batch_latency_p50_s") is not None:
        lat = (f", micro-batch latency p50 {1e3 * m['micro_batch_latency_p50_s']:.1f} ms"
               f" p99 {1e3 * m['micro_batch_latency_p99_s']:.1f} ms")
    print(f"wrote {opts.output}: {attrs['tokens']} tokens on {attrs['world_size']} rank(s) in "
          f"{attrs['elapsed_seconds']:.2f} s, {attrs['tokens_per_second']:.0f} tokens/s"
          + (f", mean log-prob {mean:.4f}" if mean is not None else "") + lat, flush=True)
