"""How fast GPU-to-GPU copies move in the patterns the IPC transport makes: one copy alone, one copy
split over several streams, one GPU sending to two or receiving from two, and the exchange benchmark's
pattern (2 fronts <-> 2 experts, every pair both ways at once) and patterns between; by the copy
engines (``cuMemcpyAsync`` between peer addresses, as the transport copies) and by the copy kernel
of ``moe_mpi.parallel.peer_copy`` on the sending GPU, which writes the peer's memory over NVLink, with a
given number of programs (SMs).  One process, 4 GPUs (on 2, the patterns between GPUs 0 and 1
only), peer access on.

    python benchmarks/gpu_copy_engines.py [--mb 58.7] [--repeats 20] [--ctas 16,32]

Bandwidths are per GPU out (bytes the busiest sending GPU sends / seconds on the GPUs, every copy
queued behind a gate first), the measure of gpu_exchange.py's 'GB/s per GPU'.  Writes
gpu_copy_engines_<card>.{md,json}.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_common import RESULTS, card_slug, environment, write_results  # noqa: E402
from moe_mpi.parallel.cuda_driver import Driver  # noqa: E402
from moe_mpi.parallel.peer_copy import SmCopy  # noqa: E402

HIDDEN = 7168
GATE_CYCLES = 200_000_000      # about 0.1 s at 2 GHz: time for the host to queue every copy


def timed(copies: list[tuple[int, int, int]], chunks: int, repeats: int, bufs: dict, kernels: dict | None,
          driver: Driver) -> tuple[float, float]:
    """Seconds for ``repeats`` rounds of every (src GPU, dst GPU, bytes) copy at once, each split into
    ``chunks`` streams of the sending GPU, on the GPUs: every copy stream waits behind a gate (a sleep
    kernel long enough for the host to queue every copy), so launch costs do not count; and the host's
    seconds to queue them.  ``kernels``: each GPU's copy kernel (SmCopy), None for the copy engines."""
    streams = {(i, c): torch.cuda.Stream(src) for i, (src, _, _) in enumerate(copies) for c in range(chunks)}
    senders = sorted({src for src, _, _ in copies})
    for d in range(torch.cuda.device_count()):
        torch.cuda.synchronize(d)
    gates = {}
    for d in senders:
        gates[d] = torch.cuda.Event(enable_timing=True)
        with torch.cuda.device(d), torch.cuda.stream(torch.cuda.Stream(d)):
            torch.cuda._sleep(GATE_CYCLES)
            gates[d].record()
    for (i, _), s in streams.items():
        s.wait_event(gates[copies[i][0]])
    t0 = time.perf_counter()
    for _ in range(repeats):
        for i, (src, dst, nbytes) in enumerate(copies):
            a, b = bufs[src], bufs[(dst, src)]
            step = nbytes // chunks
            for c in range(chunks):
                s = streams[(i, c)]
                to, frm = b["flat"].data_ptr() + c * step, a["flat"].data_ptr() + c * step
                if kernels:
                    kernels[src].copy(to, frm, step, s.cuda_stream)
                else:
                    driver.copy_async(to, frm, step, s.cuda_stream)
    queued = time.perf_counter() - t0
    ends = []
    for (i, _), s in streams.items():
        ends.append((copies[i][0], torch.cuda.Event(enable_timing=True)))
        ends[-1][1].record(s)
    for d in range(torch.cuda.device_count()):
        torch.cuda.synchronize(d)
    return max(gates[d].elapsed_time(e) for d, e in ends) / 1e3, queued


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", default="7.3,14.7,29.4,58.7",
                   help="message sizes in MB (512, 1024, 2048 and 4096 tokens of hidden 7168 bf16)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--ctas", default="16,32,66,132", help="programs of the copy kernel (SMs it may hold)")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    n = torch.cuda.device_count()
    if n < 2:
        print(f"needs 2 GPUs (4 for every pattern), have {n}")
        return 1
    driver = Driver()
    biggest = max(float(m) for m in args.mb.split(","))
    rows = int(biggest * 1e6 / (2 * HIDDEN)) + 8
    bufs = {}
    for s in range(n):
        bufs[s] = {"flat": torch.randn(rows, HIDDEN, device=f"cuda:{s}").to(torch.bfloat16)}
        for d in range(n):
            if d != s:   # where s's copies to d land, on d
                bufs[(d, s)] = {"flat": torch.empty(rows, HIDDEN, dtype=torch.bfloat16, device=f"cuda:{d}")}
    for s in range(n):
        for d in range(n):
            if d != s:      # peer access on (torch's first copy turns it on)
                bufs[(d, s)]["flat"][:1].copy_(bufs[s]["flat"][:1])
    exchange = [(0, 2), (0, 3), (1, 2), (1, 3), (2, 0), (3, 0), (2, 1), (3, 1)]
    patterns = [("one copy 0->1", [(0, 1)], 1), ("one copy 0->1 in 2 streams", [(0, 1)], 2),
                ("one copy 0->1 in 4 streams", [(0, 1)], 4), ("0->1 and 1->0", [(0, 1), (1, 0)], 1),
                ("0 sends to 1 and 2", [(0, 1), (0, 2)], 1), ("0 receives from 1 and 2", [(1, 0), (2, 0)], 1),
                ("pairs both ways: 0<->1, 2<->3", [(0, 1), (1, 0), (2, 3), (3, 2)], 1),
                ("ring 0->1->2->3->0", [(0, 1), (1, 2), (2, 3), (3, 0)], 1),
                ("0 sends to 2 and 3, which send to 0", [(0, 2), (0, 3), (2, 0), (3, 0)], 1),
                ("exchange: 2 fronts <-> 2 experts", exchange, 1),
                ("exchange, each copy in 2 streams", exchange, 2)]
    kernels = {}        # programs -> each GPU's kernel, loaded in that GPU's context
    for c in {int(c) for c in args.ctas.split(",")}:
        kernels[c] = {}
        for s in range(n):
            with torch.cuda.device(s):
                kernels[c][s] = SmCopy(driver, c)
    patterns = [p for p in patterns if max(max(pair) for pair in p[1]) < n]     # those this machine has GPUs for
    results = []
    for mb in (float(m) for m in args.mb.split(",")):
        nbytes = int(mb * 1e6) // (2 * HIDDEN * 4) * (2 * HIDDEN * 4)     # whole rows in every chunk
        engines = [("copy engines", None)] + [(f"kernel {c} CTAs", kernels[int(c)]) for c in args.ctas.split(",")]
        for engine, kernel in engines:
            for name, pairs, chunks in patterns:
                if kernel and chunks > 1:
                    continue
                copies = [(s, d, nbytes) for s, d in pairs]
                timed(copies, chunks, 2, bufs, kernel, driver)        # warm-up
                sec, queued = min(timed(copies, chunks, args.repeats, bufs, kernel, driver) for _ in range(3))
                if queued > GATE_CYCLES / 2.5e9:
                    print(f"  (queueing took {queued * 1e3:.0f} ms, longer than the gate: host-bound)")
                busiest = max(sum(s == t for s, _ in pairs) for t, _ in pairs)
                per_gpu = busiest * nbytes * args.repeats / sec / 1e9
                results.append({"mb": nbytes / 1e6, "engine": engine, "pattern": name, "chunks": chunks,
                                "seconds": sec, "gbps_per_sending_gpu": per_gpu})
                print(f"{nbytes / 1e6:6.1f} MB  {engine:12s}  {name:36s}  {per_gpu:6.0f} GB/s per sending GPU",
                      flush=True)
    dev = torch.device("cuda", 0)
    slug = card_slug(dev)
    lines = [f"# GPU-to-GPU copies in the IPC transport's patterns ({torch.cuda.get_device_name(0)})", "",
             f"`python benchmarks/gpu_copy_engines.py --repeats {args.repeats}`: each pattern's copies all "
             "at once, repeated; best of 3. GB/s: bytes the busiest sending GPU sends over the seconds.", "",
             "| MB | engine | pattern | GB/s per sending GPU |", "|---:|---|---|---:|"]
    lines += [f"| {r['mb']:.1f} | {r['engine']} | {r['pattern']} | {r['gbps_per_sending_gpu']:.0f} |" for r in results]
    lines += ["", f"Environment: {environment(dev)}"]
    write_results(Path(args.out), f"gpu_copy_engines_{slug}", "\n".join(lines) + "\n",
                  {"args": vars(args), "environment": environment(dev), "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
