"""The expert MLP near the ridge point (128 and 256 tokens), where the runtime's expert misses the
roofline: candidate schedules timed side by side with the runtime's, the same way (sustained).

    python benchmarks/gpu_expert_ridge.py [--tokens 128,256] [--out DIR]

* ``runtime``: ``kernels.swiglu_mlp``, what an expert rank runs.
* ``chunks=n``: the intermediate dimension in n chunks; chunk c's gate/up product (and silu*mul) on one
  stream, its share of the down product on another, accumulating, so the down product of one chunk
  runs beside the gate/up of the next (each weight is still read once).
* ``chunks=n, graph``: the same schedule replayed from a CUDA graph, so the host's launches and stream
  switches cost nothing; ``bf16 addmm``: each chunk's down product added into the bf16 output by cuBLAS.
* ``swapped``: each product asked of cuBLAS the other way round, weights x tokens^T, so it picks among
  the kernels for a long first side (the output comes out transposed; one small copy turns it back);
  ``swapped gate/up`` / ``swapped down`` only one of the two products so.
* ``graph``: the runtime's calls replayed from a CUDA graph.
* ``cuBLASLt`` / ``fp32 reduction``: the runtime with torch's other BLAS front end, or with bf16
  reduced-precision reductions off (each changes which cuBLAS kernels are picked).
* ``TunableOp``: the runtime under torch's TunableOp, which times the BLAS solutions it has for each
  product's shape on first use and keeps the fastest; ``max-autotune``: the plain expert through
  ``torch.compile(mode="max-autotune-no-cudagraphs")``, which times Triton templates against cuBLAS.
* ``two streams``: gate and up products on two streams (as the expert benchmark's variant).
* ``NN``: the weights stored transposed, (D, 2F) and (F, D), so cuBLAS picks among other kernels.
* ``split-K=n gate/up`` / ``split-K=n both``: a product's reduction (the hidden dimension) cut in n
  parts, asked of cuBLAS as one batched product over strided views of the same weights (no copy), so
  its grid has n times the tiles (160 tokens make 192 tiles of the gate/up product's 192 x 160, 1.45
  waves on 132 SMs); the n partial products, rounded to bf16, are summed before the SwiGLU.
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

from gpu_common import card_slug, copy_bandwidth, expert_roofline_ms, expert_weights, gpu_clocks, matmul_peak, median, time_sustained  # noqa: E402
from moe_mpi.model import kernels  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", default="128,192,256")
    p.add_argument("--out", default="/tmp")
    p.add_argument("--variants", default="", help="comma-separated names to run (default: all)")
    p.add_argument("--rounds", type=int, default=1, help="times through every variant, one after another")
    args = p.parse_args()
    dev = torch.device("cuda")
    D, Fh = 7168, 18432
    w13, wd = expert_weights(dev)
    wg, wu = w13[:Fh], w13[Fh:]
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

    def swapped(gate_up=True, down=True):
        def run(x):
            if gate_up:                 # (2F, D) x (D, T): the weights are the product's long side
                y = torch.mm(w13, x.t())
                h = kernels.silu_mul(y[:Fh], y[Fh:]).t()
            else:
                y = F.linear(x, w13)
                h = kernels.silu_mul(y[:, :Fh], y[:, Fh:])
            if down:
                return torch.mm(wd, h.t()).t().contiguous()
            return F.linear(h, wd)
        return run

    def split_k(n, down=False):
        """The gate/up product (and with ``down`` the down product) as n partial products over the
        reduction dimension, one batched cuBLAS call on strided views of the weights, then summed."""
        def product(a, w):          # a (T, K) x w (N, K)^T, K cut in n: (n, T, K/n) x (n, K/n, N)
            T, K = a.shape
            parts = torch.bmm(a.view(T, n, K // n).transpose(0, 1), w.view(w.shape[0], n, K // n).permute(1, 2, 0))
            return parts.sum(0)

        def run(x):
            y = product(x, w13)
            h = kernels.silu_mul(y[:, :Fh], y[:, Fh:])
            return product(h, wd) if down else F.linear(h, wd)
        return run

    def two_streams(x):
        cur = torch.cuda.current_stream(dev)
        s1.wait_stream(cur)
        with torch.cuda.stream(s1):
            g = F.linear(x, wg)
        u = F.linear(x, wu)
        cur.wait_stream(s1)
        return F.linear(kernels.silu_mul(g, u), wd)

    def chunked(n, accumulate="fp32", record=True):
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
                    if accumulate == "fp32":
                        part = torch.mm(h, w_d.t(), out_dtype=torch.float32)
                        y = part if c == 0 else y.add_(part)
                    else:               # bf16: each chunk's product added into the output by cuBLAS (beta = 1)
                        y = F.linear(h, w_d) if c == 0 else torch.addmm(y, h, w_d.t())
            cur.wait_stream(s1)
            cur.wait_stream(s2)
            if record:
                for t in hs + [y]:
                    t.record_stream(cur)
            return y.to(torch.bfloat16)
        return run

    def graphed(make):
        """``make()``'s function replayed from a CUDA graph captured once per input (static input)."""
        cache = {}

        def run(x):
            key = (x.data_ptr(), x.shape)
            if key not in cache:
                fn = make()
                side = torch.cuda.Stream(dev)
                side.wait_stream(torch.cuda.current_stream(dev))
                with torch.cuda.stream(side):
                    for _ in range(2):
                        fn(x)
                torch.cuda.current_stream(dev).wait_stream(side)
                torch.cuda.synchronize(dev)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    out = fn(x)
                cache[key] = (g, out, fn)    # fn holds the weights the graph reads
            g, out, _ = cache[key]
            g.replay()
            return out
        return run

    def setting(get, put, value, fn):
        """``fn`` run with a torch setting (read by ``get``, written by ``put``) at ``value``, then restored."""
        def run(x):
            before = get()
            put(value)
            try:
                return fn(x)
            finally:
                put(before)
        return run

    def put_reduction(v):
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = v

    def tunable(fn):
        """``fn`` under torch's TunableOp: each GEMM shape's first call times the BLAS solutions torch
        registers for it and keeps the fastest (what it kept goes into the JSON)."""
        def run(x):
            torch.cuda.tunable.enable(True)
            torch.cuda.tunable.tuning_enable(True)
            try:
                return fn(x)
            finally:
                torch.cuda.tunable.enable(False)
        return run

    def compiled():
        def plain(x):
            y = F.linear(x, w13)
            return F.linear(F.silu(y[:, :Fh]) * y[:, Fh:], wd)
        return torch.compile(plain, mode="max-autotune-no-cudagraphs", dynamic=False)

    variants = {"runtime": runtime, "NN": nn, "two streams": two_streams,
                "graph": graphed(lambda: runtime),
                "swapped": swapped(), "swapped gate/up": swapped(down=False), "swapped down": swapped(gate_up=False),
                "cuBLASLt": setting(torch.backends.cuda.preferred_blas_library,
                                    torch.backends.cuda.preferred_blas_library, "cublaslt", runtime),
                "fp32 reduction": setting(lambda: torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction,
                                          put_reduction, False, runtime),
                "TunableOp": tunable(runtime), "max-autotune": compiled(),
                "split-K=2 gate/up": split_k(2), "split-K=2 both": split_k(2, down=True),
                "split-K=4 gate/up": split_k(4)}
    for n in (2, 3, 4):
        variants[f"chunks={n}"] = chunked(n)
        variants[f"chunks={n}, graph"] = graphed(lambda n=n: chunked(n, record=False))
        variants[f"chunks={n}, bf16 addmm, graph"] = graphed(lambda n=n: chunked(n, "bf16", record=False))
    if args.variants:
        variants = {k: v for k, v in variants.items() if k in args.variants.split(",")}
    rows = []
    for T in map(int, args.tokens.split(",")):
        x = torch.randn(T, D, device=dev).to(torch.bfloat16)
        ref = runtime(x).float()
        roof = expert_roofline_ms(T, D, Fh, peak_tf, bw_gb)
        for rnd, (name, fn) in ((r, v) for r in range(args.rounds) for v in variants.items()):
            try:
                err = ((fn(x).float() - ref).norm() / ref.norm()).item()
                ms = median(time_sustained(lambda: fn(x), dev, warm_s=0.15, run_s=0.2))
            except Exception as exc:     # a variant this torch cannot run
                print(f"T={T} {name}: {exc!r}", flush=True)
                continue
            rows.append({"tokens": T, "variant": name, "round": rnd, "ms": ms, "roofline_ms": roof,
                         "of_roofline": roof / ms,
                         "rel_err_vs_runtime": err, "clocks": gpu_clocks(dev)})
            print(f"T={T:5d} {name:12s} {ms:.4f} ms  roofline {roof:.4f}  of roofline {roof / ms:.3f}  "
                  f"rel err {err:.1e}", flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, f"gpu_expert_ridge_{card_slug(dev)}.json").write_text(
        json.dumps({"peak_tflops": peak_tf, "copy_gbps": bw_gb, "rows": rows,
                    "tunableop_results": [[str(v) for v in r] for r in torch.cuda.tunable.get_results()]
                    if "TunableOp" in variants else None, "torch": torch.__version__}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
