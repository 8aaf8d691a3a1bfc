"""The expert MLP near the ridge point (128 and 256 tokens), where the runtime's expert misses the
roofline: candidate schedules timed side by side with the runtime's, the same way (sustained).

    python benchmarks/gpu_expert_ridge.py [--tokens 128,256] [--out DIR]

* ``runtime``: ``kernels.swiglu_mlp``, what an expert rank runs.
* ``chunks=n``: the intermediate dimension in n chunks; chunk c's gate/up product (and silu*mul) on one
  stream, its share of the down product on another, accumulating, so the down product of one chunk
  runs beside the gate/up of the next (each weight is still read once).
* ``two streams``: gate and up products on two streams (as the expert benchmark's variant).
* ``NN``: the weights stored transposed, (D, 2F) and (F, D), so cuBLAS picks among other kernels.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_common import card_slug, copy_bandwidth, gpu_clocks, matmul_peak, median, time_sustained  # noqa: E402
from moe_mpi.model import kernels  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", default="128,192,256")
    p.add_argument("--out", default="/tmp")
    args = p.parse_args()
    dev = torch.device("cuda")
    D, Fh = 7168, 18432
    torch.manual_seed(0)
    w13 = (torch.randn(2 * Fh, D, device=dev) * 0.02).to(torch.bfloat16)
    wg, wu = w13[:Fh], w13[Fh:]
    wd = (torch.randn(D, Fh, device=dev) * 0.02).to(torch.bfloat16)
    w13_t = w13.t().contiguous()            # (D, 2F)
    wd_t = wd.t().contiguous()              # (F, D)
    peak = matmul_peak(dev, sustained=True)
    bw = copy_bandwidth(dev)
    peak_tf, bw_gb = peak["tflops"], bw["gbps"]
    s1, s2 = torch.cuda.Stream(dev), torch.cuda.Stream(dev)

    def runtime(x):
        return kernels.swiglu_mlp(x, wg, wu, wd)

    def nn(x):
        y = x @ w13_t
        return kernels.silu_mul(y[:, :Fh], y[:, Fh:]) @ wd_t

    def two_streams(x):
        cur = torch.cuda.current_stream(dev)
        s1.wait_stream(cur)
        with torch.cuda.stream(s1):
            g = F.linear(x, wg)
        u = F.linear(x, wu)
        cur.wait_stream(s1)
        return F.linear(kernels.silu_mul(g, u), wd)

    def chunked(n):
        size = Fh // n
        parts = [(torch.cat([wg[c * size:(c + 1) * size], wu[c * size:(c + 1) * size]]),
                  wd[:, c * size:(c + 1) * size]) for c in range(n)]

        def run(x):
            cur = torch.cuda.current_stream(dev)
            s1.wait_stream(cur)
            s2.wait_stream(cur)
            hs, y = [], None
            for c, (w_gu, w_d) in enumerate(parts):
                with torch.cuda.stream(s1):
                    gu = F.linear(x, w_gu)
                    h = kernels.silu_mul(gu[:, :size], gu[:, size:])
                    ev = torch.cuda.Event()
                    ev.record(s1)
                hs.append(h)
                with torch.cuda.stream(s2):
                    s2.wait_event(ev)
                    part = torch.mm(h, w_d.t(), out_dtype=torch.float32)
                    y = part if c == 0 else y.add_(part)
            cur.wait_stream(s2)
            for t in hs + [y]:
                t.record_stream(cur)
            return y.to(torch.bfloat16)
        return run

    variants = {"runtime": runtime, "NN": nn, "two streams": two_streams}
    for n in (2, 3, 4, 6):
        variants[f"chunks={n}"] = chunked(n)
    rows = []
    for T in map(int, args.tokens.split(",")):
        x = torch.randn(T, D, device=dev).to(torch.bfloat16)
        ref = runtime(x).float()
        roof = max(6 * T * D * Fh / (peak_tf * 1e12), (3 * D * Fh + 2 * T * D) * 2 / (bw_gb * 1e9)) * 1e3
        for name, fn in variants.items():
            try:
                err = ((fn(x).float() - ref).norm() / ref.norm()).item()
                ms = median(time_sustained(lambda: fn(x), dev, warm_s=0.15, run_s=0.2))
            except Exception as exc:     # a variant this torch cannot run
                print(f"T={T} {name}: {exc!r}", flush=True)
                continue
            rows.append({"tokens": T, "variant": name, "ms": ms, "roofline_ms": roof, "of_roofline": roof / ms,
                         "rel_err_vs_runtime": err, "clocks": gpu_clocks(dev)})
            print(f"T={T:5d} {name:12s} {ms:.4f} ms  roofline {roof:.4f}  of roofline {roof / ms:.3f}  "
                  f"rel err {err:.1e}", flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, f"gpu_expert_ridge_{card_slug(dev)}.json").write_text(
        json.dumps({"peak_tflops": peak_tf, "copy_gbps": bw_gb, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
