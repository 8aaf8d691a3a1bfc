"""Exchange benchmark: dispatch + combine of paper-width micro-batches between GPUs, for each transport,
against torch.distributed.all_to_all_single on NCCL moving the same bytes, in one run.

    mpiexec -n 4 python benchmarks/gpu_exchange.py              # 2 fronts + 1 MoE layer x 2 experts, a GPU each
    mpiexec -n 6 python benchmarks/gpu_exchange.py --device cpu --small   # the protocol on CPU (gloo)

Each front sends every micro-batch of T tokens x top-k rows (split evenly over the layer's experts)
through the runtime's transport interface with several micro-batches in flight; each expert sends back
what it got (no compute), so every byte's round trip is checked.  The NCCL baselines move the same
bytes between the same ranks: one all_to_all_single for the dispatch and one for the combine of each
micro-batch ("a2a"), or one that carries micro-batch j's dispatch and j-1's combine together, both
directions at once ("a2a fused"); and the same messages posted straight over the NCCL transport's
pair groups, the ceiling of its design (``gpu_exchange_baselines.py``).  Bandwidth counts bytes that
cross between ranks (dispatch + combine), aggregate over all GPUs.  Results:
benchmarks/results/gpu_exchange_<card>.{md,json}, the markdown written by ``gpu_exchange_report.py``.
"""
from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import random
import sys
import time
from pathlib import Path

import torch
from mpi4py import MPI

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_common import RESULTS, card_slug, cpu_now, environment, inject_fault, mpi_main, placement, write_results  # noqa: E402
from gpu_exchange_baselines import PAIRS, pair_groups, post_overhead, rows_for, time_all_to_all, time_pairs  # noqa: E402
from gpu_exchange_report import report  # noqa: E402
from host_cpus import work as python_work  # noqa: E402
from moe_mpi.parallel.devices import bind_device  # noqa: E402
from moe_mpi.parallel.exchange import MPITransport, mpi_cuda_aware, with_progress_thread  # noqa: E402
from moe_mpi.parallel.ipc import IPCTransport  # noqa: E402
from moe_mpi.parallel.staged import StagedTransport  # noqa: E402
from moe_mpi.parallel.nccl import NCCLTransport, init_process_group  # noqa: E402
from moe_mpi.parallel.topology import Communicators, Layout  # noqa: E402


TRANSPORTS = ("ipc", "mpi", "mpi-staged", "nccl")
CPU_WORK = 30000        # iterations of host_cpus.work a rank's CPU speed is timed with


def make_transport(name: str, comms: Communicators, layout: Layout, hidden: int, dtype, device,
                   max_rows: int, slots: int):
    """As the runtime makes them (progress thread included), except that on CPUs the NCCL transport's
    protocol runs with MPI carrying the payloads (and IPC's over a shared-memory window, as it does
    in the runtime)."""
    args = (comms.layers, layout.n_fronts, hidden, dtype, device)
    if name == "ipc":
        return with_progress_thread(IPCTransport(*args, comms.world, max_rows, slots,
                                                 "cuda" if device.type == "cuda" else "shm"))
    if name == "mpi":
        return MPITransport(*args, device_buffers=device.type == "cuda")
    if name == "mpi-staged":
        return with_progress_thread(StagedTransport(*args))
    return with_progress_thread(NCCLTransport(*args, comms.world, backend="nccl" if device.type == "cuda" else "mpi"))


def micro_batch(front: int, step: int, n_rows: int, hidden: int, dtype, device) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(1000 * front + step)
    return torch.randn(n_rows, hidden, generator=g).to(device=device, dtype=dtype)


class HostClock:
    """Host seconds a rank spent inside the transport's calls: ``post`` (dispatch, result, expect, the
    joined take-out, reply) and ``poll`` (tests: the time a rank spends waiting for its peers goes here).
    Only ``post`` is work the host must do per micro-batch."""
    __slots__ = ("post", "poll")

    def __init__(self):
        self.post = self.poll = 0.0


class DriverTimer:
    """Host seconds and calls inside the IPC transport's CUDA driver calls (``--host-breakdown``): its
    driver's methods wrapped, so the Python around them can be told from the calls themselves."""
    METHODS = ("copy_async", "record", "wait", "write_value", "write_values", "launch", "new_event")

    def __init__(self, driver):
        self.seconds, self.calls, self.depth = 0.0, 0, 0
        for name in self.METHODS:
            setattr(driver, name, self._timed(getattr(driver, name)))

    def _timed(self, fn):
        def call(*a, **kw):
            if self.depth:          # inside another timed call (write_values makes write_value's)
                return fn(*a, **kw)
            self.depth += 1
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.seconds += time.perf_counter() - t0
                self.calls += 1
                self.depth -= 1
        return call

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0


def run_front(tr, layout: Layout, front: int, steps: list[int], rows: list[int], hidden, dtype, device,
              in_flight: int, xs: dict | None, clock: "HostClock") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """All micro-batches through every layer and back; returns each one's (rows back, rows sent), to
    be compared once the timing has stopped: the all-to-all baselines' loops make no check, and
    comparing in the loop cost the front's host three launches a micro-batch.  The host time inside
    the transport's calls is added to ``clock``: tests to ``poll``, the rest to ``post``."""
    offsets = [0]
    for r in rows:
        offsets.append(offsets[-1] + r)
    active, nxt, back = {}, 0, []
    while nxt < len(steps) or active:
        while len(active) < in_flight and nxt < len(steps):
            s = steps[nxt]
            nxt += 1
            x = xs[s] if xs is not None else micro_batch(front, s, offsets[-1], hidden, dtype, device)
            t0 = time.perf_counter()
            active[s] = [0, tr.dispatch(0, s, x, offsets), x]
            clock.post += time.perf_counter() - t0
        for s in list(active):
            layer, h, x = active[s]
            t0 = time.perf_counter()
            done = h.test()
            t1 = time.perf_counter()
            clock.poll += t1 - t0
            if not done:
                continue
            y = h.result()
            if layer + 1 < layout.n_moe_layers:
                active[s] = [layer + 1, tr.dispatch(layer + 1, s, y, offsets), x]
            clock.post += time.perf_counter() - t1
            if layer + 1 >= layout.n_moe_layers:
                back.append((y, x))
                del active[s]
    return back


def run_expert(tr, layout: Layout, layer: int, n_steps: int, rows_cap: int, depth: int, clock: "HostClock") -> None:
    """As the runtime's expert loop, with no MLP: every front's rows joined into one tensor and each
    front's part sent back.  Host time in the transport's calls goes to ``clock`` as ``run_front``'s does."""
    senders = list(range(layout.n_fronts))
    recvs, replies = {}, []

    def timed(what, f, *a):
        t0 = time.perf_counter()
        out = f(*a)
        setattr(clock, what, getattr(clock, what) + time.perf_counter() - t0)
        return out

    for s in range(min(depth, n_steps)):
        recvs[s] = timed("post", tr.expect, layer, s, senders, [rows_cap] * len(senders))
    for s in range(n_steps):
        r = recvs.pop(s)
        while not timed("poll", r.test):
            time.sleep(0)
        replies.append(timed("post", lambda: tr.reply_rows(layer, s, r.senders, *r.joined())))
        if s + depth < n_steps:
            recvs[s + depth] = timed("post", tr.expect, layer, s + depth, senders, [rows_cap] * len(senders))
        replies = [h for h in replies if not timed("poll", h.test)]
    while replies:
        replies = [h for h in replies if not timed("poll", h.test)]


def time_transport(tr, comms, layout, role, args, tokens, hidden, dtype, device, steps_order, xs,
                   timer: DriverTimer | None = None) -> tuple[float, int, float, dict]:
    """Seconds for every micro-batch (the slowest rank), micro-batches that came back wrong, the
    largest fraction of that time a rank's host spent inside the transport's calls, and each rank's
    host microseconds a micro-batch: posting, polling and (with ``timer``) in driver calls, with its
    CPU's speed (``cpu_work_ms``: the slower of ``cpu_work_seconds`` just before and just after)."""
    rows = rows_for(tokens, args.top_k, layout.n_experts)
    if timer is not None:
        timer.reset()
    cpu_before = cpu_work_seconds()
    comms.world.Barrier()
    inject_fault(comms.world.Get_rank())        # (the others are in their loops, waiting on this rank)
    t0 = time.perf_counter()
    back, clock = [], HostClock()
    if role.kind == "front":
        back = run_front(tr, layout, role.front, steps_order, rows, hidden, dtype, device, args.in_flight, xs, clock)
    else:
        run_expert(tr, layout, role.layer, len(steps_order), max(rows), max(2, args.in_flight), clock)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = comms.world.allreduce(time.perf_counter() - t0, op=MPI.MAX)
    cpu = max(cpu_before, cpu_work_seconds())
    bad = sum(int((y != x).any()) for y, x in back)     # every element of every micro-batch
    n = len(steps_order)
    mine = {"post": clock.post / n * 1e6, "poll": clock.poll / n * 1e6, "cpu_work_ms": cpu * 1e3}
    if timer is not None:
        mine.update(driver=timer.seconds / n * 1e6, driver_calls=timer.calls / n)
    per_rank = comms.world.allgather(mine)
    host = {k: [r[k] for r in per_rank] for k in mine}
    busiest = comms.world.allreduce(clock.post + clock.poll, op=MPI.MAX) / elapsed
    return elapsed, comms.world.allreduce(bad, op=MPI.SUM), busiest, host


def cpu_work_seconds() -> float:
    """Seconds this rank's CPU takes for a fixed piece of Python work (about 2.5 ms at full speed on the
    lent machines), timed just before and just after each timed repeat: the lent VMs' vCPUs at times
    run at half speed for seconds on end (``host_cpus.py``), and a rank's posting slows with them."""
    t0 = time.perf_counter()
    python_work(CPU_WORK)
    return time.perf_counter() - t0


def write_profile(prof: cProfile.Profile, path: Path, title: str) -> None:
    """A rank's profile as text: the functions by their own time, then by cumulative time, in
    microseconds (cProfile's own cost inflates the small ones; read them as shares)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    stats = pstats.Stats(prof).stats       # (file, line, name) -> (prim calls, calls, own s, cum s, callers)
    total = sum(v[2] for v in stats.values())
    lines = [title, f"{total * 1e6:.0f} us profiled in all", ""]
    for key, label in ((2, "own time"), (3, "cumulative time")):
        lines += [f"by {label}:", f"{'calls':>8} {'own us':>9} {'own/call':>9} {'cum us':>9} {'cum/call':>9}  function"]
        for (file, line, name), v in sorted(stats.items(), key=lambda kv: -kv[1][key])[:35]:
            where = f"{Path(file).name}:{line}({name})" if line else name
            lines.append(f"{v[1]:>8} {v[2] * 1e6:>9.0f} {v[2] * 1e6 / v[1]:>9.2f} {v[3] * 1e6:>9.0f} "
                         f"{v[3] * 1e6 / v[1]:>9.2f}  {where}")
        lines.append("")
    path.write_text("\n".join(lines))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--small", action="store_true", help="tiny sizes: a protocol check, not a benchmark")
    p.add_argument("--fronts", type=int, default=2)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--experts", type=int, default=2)
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--tokens", default="512,1024,2048,4096", help="tokens per micro-batch per front")
    p.add_argument("--micro-batches", type=int, default=64,
                   help="per front (16 before 2026-11-28's fourth session: with 4 in flight, the pipeline's "
                        "fill and drain then weighed on every run; a job streams thousands)")
    p.add_argument("--in-flight", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warm-up", type=int, default=None, metavar="N",
                   help="micro-batches run untimed before each transport's and baseline's timings (default: as many "
                        "as --micro-batches; 2 before 2026-11-27, when whichever ran first at a size ran cold)")
    p.add_argument("--transports", default="auto")
    p.add_argument("--shuffle", action="store_true", help="dispatch micro-batches out of step order")
    p.add_argument("--tag", default="", help="results named gpu_exchange_<tag>_<card> (a run under other settings)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--profile", metavar="DIR", help="run the timed repeats under cProfile and write each rank's "
                   "profile (by own and by cumulative time) to DIR/profile_<transport>_<tokens>_rank<r>.txt")
    p.add_argument("--host-breakdown", action="store_true", help="also time the IPC transport's CUDA driver "
                   "calls, to tell them from the Python around them in each rank's posting time")
    p.add_argument("--report", metavar="JSON", help="only rebuild the markdown of a results file (next to it)")
    args = p.parse_args()
    if args.report:
        path = Path(args.report)
        path.with_suffix(".md").write_text(report(json.loads(path.read_text())).rstrip() + "\n")
        print(f"wrote {path.with_suffix('.md')}")
        return 0
    if args.small:
        args.hidden, args.tokens, args.micro_batches, args.repeats = 64, "8,40", 6, 1

    world = MPI.COMM_WORLD
    layout = Layout(args.fronts, args.layers, args.experts)
    if world.Get_size() != layout.world_size:
        if world.Get_rank() == 0:
            print(f"need {layout.world_size} ranks for {args.fronts} fronts + {args.layers} x {args.experts} experts",
                  file=sys.stderr)
        return 2
    comms = Communicators.create(world, layout)
    role = layout.role(world.Get_rank())
    device = bind_device(comms.world, args.device)
    dtype = torch.bfloat16
    init_process_group(comms.world, "nccl" if device.type == "cuda" else "gloo")
    if args.transports == "auto":
        # on CPUs "mpi-staged" runs its chunk protocol with plain copies
        names = (["mpi"] if device.type == "cpu" or mpi_cuda_aware() else []) + ["mpi-staged", "nccl", "ipc"]
    else:
        names = args.transports.split(",")
        unknown = [n for n in names if n not in TRANSPORTS]
        if unknown:
            if world.Get_rank() == 0:
                print(f"--transports: no transport {unknown[0]!r} (choose from {', '.join(TRANSPORTS)})",
                      file=sys.stderr)
            return 2
    args.warm_up = min(args.micro_batches, args.micro_batches if args.warm_up is None else args.warm_up)
    max_rows = max(max(rows_for(int(t), args.top_k, layout.n_experts)) for t in args.tokens.split(","))
    transports = {n: make_transport(n, comms, layout, args.hidden, dtype, device, max_rows, args.in_flight + 1)
                  for n in names}
    # --host-breakdown: the IPC transport's driver calls timed (its CPU backend makes none)
    timers = {n: DriverTimer(tr.driver) for n, tr in transports.items()
              if args.host_breakdown and isinstance(tr, IPCTransport) and tr.driver is not None}
    groups = pair_groups(comms, layout, device, transports["nccl"]) if "nccl" in transports else None
    rank0 = world.Get_rank() == 0
    row_bytes = args.hidden * 2
    cpus_seen = set()       # the CPUs this rank's host was found on after its timed runs (placement)
    results = []
    for tokens in map(int, args.tokens.split(",")):
        rows = rows_for(tokens, args.top_k, layout.n_experts)
        bytes_total = 2 * args.micro_batches * layout.n_fronts * sum(rows) * row_bytes * layout.n_moe_layers
        order = list(range(args.micro_batches))
        if args.shuffle:
            rng = random.Random(role.front or 0)
            for i in range(0, len(order), args.in_flight):   # out of order within each window
                window = order[i:i + args.in_flight]
                rng.shuffle(window)
                order[i:i + args.in_flight] = window
        xs = None
        if role.kind == "front":
            xs = {s: micro_batch(role.front, s, sum(rows), args.hidden, dtype, device) for s in order}
        for name, tr in transports.items():
            timer = timers.get(name)
            time_transport(tr, comms, layout, role, args, tokens, args.hidden, dtype, device,
                           order if args.warm_up == len(order) else list(range(args.warm_up)), xs, timer)  # warm-up
            best, bad, host, per_mb = float("inf"), 0, None, None
            prof = cProfile.Profile() if args.profile else None
            for _ in range(args.repeats):
                if prof:
                    prof.enable()
                t, b, h, u = time_transport(tr, comms, layout, role, args, tokens, args.hidden, dtype, device, order,
                                            xs, timer)
                if prof:
                    prof.disable()
                if t < best:
                    best, host, per_mb = t, h, u
                bad += b
                cpus_seen.add(cpu_now())
            if prof:
                write_profile(prof, Path(args.profile) / f"profile_{name}_{tokens}_rank{world.Get_rank()}.txt",
                              f"rank {world.Get_rank()} ({role.kind}), {name}, {tokens} tokens, "
                              f"{args.repeats} repeats of {args.micro_batches} micro-batches, best {best * 1e3:.2f} ms")
            results.append({"transport": name, "tokens": tokens, "message_mb": rows[0] * row_bytes / 1e6,
                            "seconds": best, "gbps": bytes_total / best / 1e9, "wrong_micro_batches": bad,
                            "host_in_transport": host, "cpu_work_ms": per_mb.pop("cpu_work_ms"),
                            "host_us_per_micro_batch": per_mb})
        if groups is not None:
            time_pairs(groups, comms, layout, role, args, tokens, args.hidden, dtype, device, xs, args.warm_up)  # warm-up
            best, bad = float("inf"), 0
            for _ in range(args.repeats):
                t, b = time_pairs(groups, comms, layout, role, args, tokens, args.hidden, dtype, device, xs)
                best, bad = min(best, t), bad + b
            results.append({"transport": PAIRS, "tokens": tokens, "message_mb": rows[0] * row_bytes / 1e6,
                            "seconds": best, "gbps": bytes_total / best / 1e9, "wrong_micro_batches": bad})
        if layout.n_moe_layers == 1:
            for fused in (False, True):
                t = min(time_all_to_all(layout, role, args, tokens, args.hidden, dtype, device, fused)
                        for _ in range(args.repeats))
                results.append({"transport": "NCCL all_to_all_single" + (" fused" if fused else ""),
                                "tokens": tokens, "message_mb": rows[0] * row_bytes / 1e6, "seconds": t,
                                "gbps": bytes_total / t / 1e9, "wrong_micro_batches": None})
        best_a2a = max((r["gbps"] for r in results if r["tokens"] == tokens and r["transport"].startswith("NCCL all_to_all")),
                       default=None)
        for r in results:
            if r["tokens"] == tokens:
                r["vs_best_a2a"] = r["gbps"] / best_a2a if best_a2a else None
                r["gbps_per_gpu"] = r["gbps"] / layout.world_size
        if rank0:
            print(f"T={tokens}: " + ", ".join(f"{r['transport']} {r['gbps']:.1f} GB/s" for r in results
                                               if r["tokens"] == tokens), flush=True)

    ok = all(not r["wrong_micro_batches"] for r in results)
    where = comms.world.allgather(placement(device, cpus_seen))
    overhead = post_overhead(transports["nccl"], groups, comms, layout, args.hidden, dtype, device) if "nccl" in transports else {}
    if rank0:
        env = environment(device)
        settings = {k: v for k, v in sorted(os.environ.items()) if k.startswith(("NCCL_", "TORCH_NCCL_", "TORCH_FR_", "MOE_MPI_"))}
        slug = card_slug(device)
        data = {"args": vars(args), "environment": env, "settings": settings, "layout": vars(layout),
                "results": results, "post_overhead_us": overhead, "placement": where}
        md = report(data)
        stem = f"gpu_exchange_{args.tag + '_' if args.tag else ''}{slug}" + ("_small" if args.small else "")
        paths = write_results(args.out, stem, md, data)
        print(md.split("\n\n")[2])
        print(f"wrote {paths[0]} and {paths[1]}; round trips {'all correct' if ok else 'WRONG'}", flush=True)
    comms.free()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(mpi_main(main))
