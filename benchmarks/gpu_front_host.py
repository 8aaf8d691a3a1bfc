"""Host time of a front per micro-batch on a GPU: where the front's loop spends its CPU.

    python benchmarks/gpu_front_host.py            # paper-width slice, bf16, first visible GPU
    python benchmarks/gpu_front_host.py --small    # tiny preset (a check of the script)

The distributed slice's fronts are host-bound (``gpu_end_to_end``: their GPUs idle a fifth of the time
while their loop launches, posts and writes).  This runs one front's forward for one micro-batch at a
time with the experts answered instantly by a stub (``y = x``: no expert work on the GPU), and reports,
per micro-batch: the host time to queue the front's work, the GPU time it queues, the kernels and
operators it launches, the device-to-host synchronisations (CUDA's sync debug mode counts them), and
the Python functions that take the host time (cProfile).  Results: results/gpu_front_host_<card>.{md,json}.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cpu_common import md_table  # noqa: E402
from gpu_common import RESULTS, card_slug, environment, write_results  # noqa: E402
from gpu_end_to_end import slice_config  # noqa: E402
from moe_mpi.model.transformer import Batch, drive, to_device  # noqa: E402
from moe_mpi.model.weights import build_front  # noqa: E402


def run_front(front, batch) -> torch.Tensor:
    """One micro-batch through the front, each expert request answered with its own rows, then the
    head's log-probabilities (what a front computes for a micro-batch, without writing them)."""
    res = drive(front.forward_steps(batch), lambda req: req.x_ND)
    return front.logprobs(res.hidden_BSD, batch)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    dev = torch.device("cuda", 0)
    cfg = slice_config(args.small)
    front = build_front(cfg, seed=0, device=dev, dtype=torch.bfloat16)
    S = min(args.tokens, cfg.max_position_embeddings)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(1, S))
    lengths = np.array([S])
    batch = Batch(to_device(lengths, dev), tokens_BS=to_device(tokens, dev), lengths_host=lengths)

    with torch.inference_mode():
        for _ in range(3):
            run_front(front, batch)
        torch.cuda.synchronize(dev)
        # Host time per micro-batch, less the time spent waiting in event.synchronize: with the stub's
        # instant answers the front reads each MoE layer's expert counts (for expert_load) before its
        # GPU has reached them, a wait a distributed front never has (the answer comes after the
        # dispatch, which needed those counts).  Then the GPU's own time for the same work, queued
        # back to back with nothing waiting in between.
        waited = [0.0]
        sync = torch.cuda.Event.synchronize

        def timed_sync(event):
            t = time.perf_counter()
            sync(event)
            waited[0] += time.perf_counter() - t

        torch.cuda.Event.synchronize = timed_sync
        try:
            t0 = time.perf_counter()
            for _ in range(args.iters):
                run_front(front, batch)
            t_host = (time.perf_counter() - t0 - waited[0]) / args.iters
        finally:
            torch.cuda.Event.synchronize = sync
        torch.cuda.synchronize(dev)
        graph_free = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
        graph_free[0].record()
        for _ in range(args.iters):
            run_front(front, batch)
        graph_free[1].record()
        torch.cuda.synchronize(dev)
        t_gpu = graph_free[0].elapsed_time(graph_free[1]) / 1e3 / args.iters
        # synchronisations: CUDA's sync debug mode warns once per synchronising call
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            run_front(front, batch)
            torch.cuda.set_sync_debug_mode(0)
        syncs = [str(w.message).splitlines()[0][:120] for w in caught]
        torch.cuda.synchronize(dev)
        # operators and kernels per micro-batch
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            run_front(front, batch)
            torch.cuda.synchronize(dev)
        ev = prof.key_averages()
        from torch.autograd import DeviceType
        kernel_ms = sum(getattr(e, "device_time_total", 0) or getattr(e, "cuda_time_total", 0)
                        for e in prof.events() if e.device_type == DeviceType.CUDA) / 1e3
        n_ops = sum(e.count for e in ev if e.key.startswith("aten::"))
        n_launch = sum(e.count for e in ev if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx",
                                                        "cudaLaunchKernelExC"))
        top_ops = sorted((e for e in ev if e.key.startswith("aten::")), key=lambda e: -e.self_cpu_time_total)[:15]
        # Python functions by host time
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(args.iters):
            run_front(front, batch)
        pr.disable()
        torch.cuda.synchronize(dev)
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(25)
    rows = [{"op": e.key, "calls": e.count, "self_cpu_us": e.self_cpu_time_total} for e in top_ops]
    env = environment(dev)
    summary = {"tokens": S, "host_ms_per_mb": 1e3 * t_host, "gpu_ms_per_mb": 1e3 * t_gpu, "aten_ops": n_ops,
               "kernel_launches": n_launch, "syncs": len(syncs), "kernel_ms_per_mb": kernel_ms}
    md = [f"# A front's host time per micro-batch ({env['card']})", "",
          f"{cfg.name}: one micro-batch of {S} tokens through the front and its head (log-probabilities), experts "
          f"answered by a stub (no expert work). Host time to queue it, less the waits for expert counts that only this stub has: "
          f"**{summary['host_ms_per_mb']:.2f} ms**; wall time per micro-batch, back to back (the GPU's time "
          f"plus those waits): {summary['gpu_ms_per_mb']:.2f} ms; the kernels' own time: {kernel_ms:.2f} ms; "
          f"{n_ops} aten operators, {n_launch} kernel "
          f"launches, {len(syncs)} device-to-host synchronisations (the expert counts above).", "",
          "Synchronisations: " + ("; ".join(syncs) if syncs else "none"), "",
          "Operators by host time (one micro-batch):", "",
          md_table(rows, [("op", "operator", ""), ("calls", "calls", "d"), ("self_cpu_us", "self CPU us", ".0f")]), "",
          f"Python functions by host time ({args.iters} micro-batches):", "", "```", buf.getvalue().strip()[:6000], "```", "",
          f"Environment: {env}"]
    paths = write_results(args.out, f"gpu_front_host_{card_slug(dev)}" + ("_small" if args.small else ""),
                          "\n".join(md), {"environment": env, "summary": summary, "syncs": syncs, "ops": rows,
                                          "cprofile": buf.getvalue()})
    print("\n".join(md[:4]))
    print(buf.getvalue()[:3000])
    print(f"wrote {paths[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
