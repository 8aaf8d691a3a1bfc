"""How fast this host's CPUs run a fixed piece of pure-Python work (the kind a rank's host does between
driver calls): on one CPU alone, on two CPUs at once, and over time.

A virtual machine's vCPUs can run slower than they did a moment ago: the hypervisor may run two of
them on the hardware threads of one physical core, or share the cores with other guests, and nothing
in ``lscpu`` inside the guest says so (nor, on the lent GPU machines, the steal time).  A rank whose
CPU slows posts its micro-batches slower, and the exchange waits on the slowest rank.  No GPU and no
MPI needed:

    python benchmarks/host_cpus.py [--anchors 0,4,5] [--pick 4] [--json OUT.json]
    python benchmarks/host_cpus.py --timeline 20 --anchors 4,5    # each CPU's speed over 20 s

Pairs: for each anchor CPU a and every other CPU b allowed to this process, a and b run the work at the
same moment (one worker process pinned to each CPU, started together on the monotonic clock), and
each one's time over its time alone is its slowdown.  Pairs above ``--threshold`` are listed, and up
to ``--pick`` anchors no two of which were seen slowing each other.  A slowdown tied to particular
pairs means shared cores; one that comes and goes whatever the pair means the host's load.
Timeline: the work alone on each anchor in turn, round after round, so stretches of slow samples show.
On the lent 4xH200 guests every vCPU tried had them (``results/gpu_exchange_cpu_speed_nvidia-h200.md``).
Steal time (``/proc/stat``) over the run is reported too.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import time


def work(n: int) -> int:
    """Dictionary and integer work of the interpreter, no memory traffic to speak of."""
    d, s = dict.fromkeys(range(256), 1), 0
    for i in range(n):
        d[i & 255] = i
        s += d[(i * 7) & 255]
    return s


def worker(cpu: int, conn) -> None:
    os.sched_setaffinity(0, {cpu})
    work(20000)
    while True:
        msg = conn.recv()
        if msg is None:
            return
        start, n = msg
        while time.monotonic() < start:
            pass
        t0 = time.perf_counter()
        work(n)
        conn.send(time.perf_counter() - t0)


def steal_ticks() -> int:
    """Steal time of all CPUs so far, in clock ticks (0 where the kernel does not say)."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        return int(fields[8]) if len(fields) > 8 else 0
    except OSError:
        return 0


class Workers:
    def __init__(self, cpus: list[int]):
        ctx = mp.get_context("fork")
        self.conns, self.procs = {}, []
        for c in cpus:
            a, b = ctx.Pipe()
            p = ctx.Process(target=worker, args=(c, b), daemon=True)
            p.start()
            self.conns[c], self.procs = a, self.procs + [p]

    def run(self, cpus: list[int], n: int, repeats: int) -> dict[int, float]:
        """Each CPU's best time over ``repeats`` runs of ``work(n)`` on all of ``cpus`` at once."""
        best = dict.fromkeys(cpus, float("inf"))
        for _ in range(repeats):
            start = time.monotonic() + 0.005
            for c in cpus:
                self.conns[c].send((start, n))
            for c in cpus:
                best[c] = min(best[c], self.conns[c].recv())
        return best

    def close(self) -> None:
        for conn in self.conns.values():
            conn.send(None)
        for p in self.procs:
            p.join()


def pick(cpus: list[int], slow: dict[tuple[int, int], float], n: int, threshold: float) -> list[int]:
    """Up to n of ``cpus`` (the anchors: every pair of them was timed) no two of which were seen
    sharing (slowdown over ``threshold``), CPUs 0 and 1 last (CPU 0 usually takes the interrupts)."""
    bad = {frozenset(p) for p, s in slow.items() if s > threshold}
    out: list[int] = []
    for c in sorted(cpus, key=lambda c: (c < 2, c)):
        if all(frozenset((c, o)) not in bad for o in out):
            out.append(c)
        if len(out) == n:
            break
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--anchors", default="0,1,4,5,8,12,16", help="CPUs paired with every other CPU (the picks come from these)")
    p.add_argument("--n", type=int, default=300000, help="loop iterations of the work (about 10 ms a 1e5)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threshold", type=float, default=1.25, help="a slowdown above this counts as sharing")
    p.add_argument("--pick", type=int, default=4, help="CPUs to pick with no sharing seen between them")
    p.add_argument("--timeline", type=float, default=0, metavar="SECONDS",
                   help="instead: time the work alone on each anchor, one after another, for this long, "
                        "and print how its time varied (a CPU that is at times shared shows up as stretches "
                        "of slow samples)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    anchors = [int(a) for a in args.anchors.split(",") if int(a) in cpus]
    if args.timeline:
        return timeline(anchors, args)
    steal0, t0 = steal_ticks(), time.time()
    pool = Workers(cpus)
    try:
        pool.run(cpus, args.n, 1)       # every CPU busy once before anything is timed
        alone = {c: pool.run([c], args.n, args.repeats)[c] for c in cpus}
        slow: dict[tuple[int, int], float] = {}
        for a in anchors:
            for b in cpus:
                if b != a and (b, a) not in slow:
                    for _ in range(2):      # a pair over the threshold is timed again: noise seldom repeats
                        t = pool.run([a, b], args.n, args.repeats)
                        s = max(t[a] / alone[a], t[b] / alone[b])
                        slow[(a, b)] = min(s, slow.get((a, b), s))
                        if slow[(a, b)] <= args.threshold:
                            break
        chosen = pick(anchors, slow, args.pick, args.threshold)
        together = pool.run(chosen, args.n, args.repeats) if chosen else {}
    finally:
        pool.close()
    steal = (steal_ticks() - steal0) / os.sysconf("SC_CLK_TCK")
    wall = time.time() - t0
    shared = sorted(((a, b, s) for (a, b), s in slow.items() if s > args.threshold), key=lambda x: -x[2])
    median = statistics.median(slow.values()) if slow else float("nan")
    print(f"{len(cpus)} CPUs; work alone {min(alone.values()) * 1e3:.1f}-{max(alone.values()) * 1e3:.1f} ms "
          f"(CPU {min(alone, key=alone.get)} fastest, {max(alone, key=alone.get)} slowest)")
    print(f"pairs with anchors {anchors}: median slowdown {median:.2f}; over {args.threshold}: "
          + (", ".join(f"{a}+{b} {s:.2f}" for a, b, s in shared) or "none"))
    print(f"picked {chosen}: together {', '.join(f'{c} {together[c] / alone[c]:.2f}' for c in chosen)}")
    print(f"steal time over the run: {steal:.2f} CPU-s in {wall:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "alone_s": alone, "pair_slowdown": [[a, b, s] for (a, b), s in slow.items()],
                       "shared": shared, "picked": chosen, "picked_together": {c: together[c] / alone[c] for c in chosen},
                       "steal_cpu_s": steal, "wall_s": wall}, f, indent=1)
    return 0


def timeline(anchors: list[int], args) -> int:
    """The work alone on each anchor in turn, once each round, for ``args.timeline`` seconds: each
    sample's time, and per CPU the fastest, the median, the slowest and the share of samples at 1.5x
    the fastest or more."""
    steal0, t0 = steal_ticks(), time.monotonic()
    pool = Workers(anchors)
    samples: dict[int, list[tuple[float, float]]] = {c: [] for c in anchors}     # (seconds since start, time)
    try:
        pool.run(anchors, args.n, 1)
        while time.monotonic() - t0 < args.timeline:
            for c in anchors:
                samples[c].append((time.monotonic() - t0, pool.run([c], args.n, 1)[c]))
    finally:
        pool.close()
    steal = (steal_ticks() - steal0) / os.sysconf("SC_CLK_TCK")
    summary = {}
    for c, xs in samples.items():
        ts = [t for _, t in xs]
        fastest = min(ts)
        summary[c] = {"samples": len(ts), "fastest_ms": fastest * 1e3, "median_ms": statistics.median(ts) * 1e3,
                      "slowest_ms": max(ts) * 1e3, "slow_share": sum(t >= 1.5 * fastest for t in ts) / len(ts)}
        print(f"CPU {c}: {len(ts)} samples, fastest {fastest * 1e3:.1f} ms, median {summary[c]['median_ms']:.1f}, "
              f"slowest {summary[c]['slowest_ms']:.1f}; {summary[c]['slow_share']:.0%} at 1.5x the fastest or more")
    print(f"steal time over the run: {steal:.2f} CPU-s in {time.monotonic() - t0:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "summary": summary, "samples": samples, "steal_cpu_s": steal}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
