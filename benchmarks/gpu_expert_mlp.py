"""Expert MLP benchmark: one routed expert at paper width (SwiGLU 7168 x 18432, bf16) for 1..16384
tokens, against the roofline of the same card measured in the same run.

    python benchmarks/gpu_expert_mlp.py                      # on the first visible GPU
    python benchmarks/gpu_expert_mlp.py --device cpu --small  # a check of the script on a CPU

For T tokens the expert does 6 T D F flops and must move at least its weights (3 D F bf16 words)
plus its input and output (2 T D words).  Roofline time = max(flops / measured matrix-product peak,
bytes / measured device copy bandwidth); the fraction reported is roofline time / measured time.  The
peak is measured under sustained load, as every size is timed (``gpu_common.time_sustained``): the card
lowers its clocks under steady load; the burst peak and the fraction against it are reported too.
Variants: ``runtime`` is exactly what an expert rank runs (``moe_mpi.model.layers.MLP`` as the weight
loader builds it, which uses ``moe_mpi.model.kernels`` on CUDA); ``torch`` the plain torch expert;
``graph`` replays the runtime as a CUDA graph (no launch gaps); the others force one path of
``kernels.swiglu_mlp`` at every size: the TMA kernels, the pointer-load gate/up kernel, cuBLAS with one
product over the stacked gate and up weights, cuBLAS with two products on two streams.  Every
configuration of the TMA kernels' sweep list is timed at a few small sizes.
Sizes that miss 90% of the roofline get a kernel profile.  Results: benchmarks/results/gpu_expert_mlp_<card>.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_common import (RESULTS, card_slug, copy_bandwidth, environment, expert_roofline_ms,  # noqa: E402
                        gpu_clocks, matmul_peak, median, time_ms, time_sustained, write_results)
from cpu_common import md_table  # noqa: E402
from moe_mpi.config import ModelConfig  # noqa: E402
from moe_mpi.model import kernels  # noqa: E402
from moe_mpi.model.weights import build_expert  # noqa: E402


def variants(mlp, device):
    """name -> callable(x), or "graph" (built per size from the runtime module)."""
    def plain(x):   # what the runtime ran before kernels.py, and what it runs without Triton
        return mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))

    out = {"runtime": mlp, "torch": plain}
    if device.type == "cuda":
        out["graph"] = "graph"
        if kernels.enabled(torch.empty(1, device=device, dtype=torch.bfloat16)):
            w = (mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)
            both = kernels.stacked(w[0], w[1])
            if kernels.tma_ok(*w):
                out["TMA gate/up + down"] = lambda x: kernels.down_tma(kernels.gate_up_swiglu_tma(x, w[0], w[1]), w[2])
            out["pointer-load gate/up"] = lambda x: F.linear(kernels.gate_up_swiglu(x, w[0], w[1]), w[2])
            if both is not None:
                out["cuBLAS, one product"] = lambda x: F.linear(
                    kernels.silu_mul(*F.linear(x, both).split(w[0].shape[0], dim=1)), w[2])
            out["cuBLAS, two streams"] = lambda x: F.linear(kernels.silu_mul(*kernels.gate_and_up(x, w[0], w[1])), w[2])
    return out


MAX_TOKENS = {"TMA gate/up + down": 128, "pointer-load gate/up": 512}   # the largest size a forced variant runs


def graphed(fn, x):
    """``fn(x)`` captured in a CUDA graph; returns a replay function (same input buffer)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn(x)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn(x)
    return g.replay


def rel_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref.double()).norm() / ref.double().norm())


def profile(fn, device, iters: int = 5) -> list[dict]:
    """GPU kernels of ``fn`` by total time, from the PyTorch profiler."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    fn()
    torch.cuda.synchronize(device)
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize(device)
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", None)
        if t is None:
            t = getattr(e, "self_cuda_time_total", 0)
        if t > 0:
            rows.append({"kernel": e.key[:90], "us_per_call": t / max(e.count, 1), "calls_per_run": e.count / iters,
                         "us_per_run": t / iters})
    rows.sort(key=lambda r: -r["us_per_run"])
    total = sum(r["us_per_run"] for r in rows) or 1.0
    for r in rows:
        r["share"] = r["us_per_run"] / total
    return rows[:8]


def host_us(fn, device, n: int = 50) -> float:
    """Microseconds the host takes to issue one call of ``fn`` (the GPU runs behind and is not waited for)."""
    fn()
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    per_call = (time.perf_counter() - t0) / n
    torch.cuda.synchronize(device)
    return 1e6 * per_call


def tma_sweep(mlp, device, sizes, D: int) -> list[dict]:
    """Every configuration of the TMA kernels' sweep list, gate/up and down, at a few sizes (burst timings)."""
    rows = []
    wg, wu, wd = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
    for T in sizes:
        x = torch.randn(T, D, device=device, dtype=wg.dtype)
        h = kernels.gate_up_swiglu_tma(x, wg, wu)
        for kernel, fn, mine, nbytes in (
                ("gate/up", lambda c: kernels.gate_up_swiglu_tma(x, wg, wu, config=c), kernels.TMA_GATE_UP,
                 2 * wg.numel() * wg.element_size()),
                ("down", lambda c: kernels.down_tma(h, wd, config=c), kernels.TMA_DOWN, wd.numel() * wd.element_size())):
            for cfg in dict.fromkeys(kernels.tma_fitting(kernel, T) + [mine]):
                ms = median(time_ms(lambda: fn(cfg), device, warmup=3, iters=20))
                rows.append({"tokens": T, "kernel": kernel, "config": str(cfg), "us": 1e3 * ms,
                             "gbps": nbytes / (ms * 1e-3) / 1e9, "runtime's": cfg == mine})
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--small", action="store_true", help="small sizes: a check of the script, not a benchmark")
    p.add_argument("--max-tokens", type=int, default=16384)
    p.add_argument("--between", default="96,160,192,320,384,768",
                   help="sizes between the powers of two near the ridge point, timed for the runtime and torch "
                        "variants only (comma-separated; empty for none)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--render", metavar="JSON", help="rewrite the markdown of an earlier results JSON and exit")
    args = p.parse_args()
    if args.render:
        src = Path(args.render)
        src.with_suffix(".md").write_text(render(json.loads(src.read_text())).rstrip() + "\n")
        print(f"wrote {src.with_suffix('.md')}")
        return 0
    device = torch.device(args.device)
    cfg = ModelConfig.load("paper")
    if args.small:
        cfg = cfg.replace(hidden_size=256, moe_intermediate_size=512)
        args.max_tokens = min(args.max_tokens, 256)
    D, Fh = cfg.hidden_size, cfg.moe_intermediate_size
    dtype = torch.bfloat16
    warm_s, run_s = (0.02, 0.02) if args.small else (0.15, 0.2)

    burst = matmul_peak(device, small=args.small)
    peak = matmul_peak(device, small=args.small, sustained=True)
    copy = copy_bandwidth(device, small=args.small)
    print(f"measured: matrix-product peak {peak['tflops']:.0f} TFLOP/s sustained {peak['by_shape']} "
          f"(burst {burst['tflops']:.0f}), copy {copy['gbps']:.0f} GB/s; clocks {peak.get('clocks')}", flush=True)

    mlp = build_expert(cfg, 0, 0, dtype=dtype, device=device)
    impls = variants(mlp, device)
    sizes = [1 << i for i in range(args.max_tokens.bit_length()) if 1 << i <= args.max_tokens]
    between = sorted({int(t) for t in args.between.split(",") if t.strip() and int(t) <= args.max_tokens} - set(sizes))
    timed = sorted(sizes + between)

    # correctness against fp32 on fresh inputs, every variant
    checks = {}
    w = {k: getattr(mlp, k).weight.float() for k in ("gate_proj", "up_proj", "down_proj")}
    for T in (min(64, sizes[-1]), sizes[-1]):
        x = torch.randn(T, D, device=device, dtype=dtype)
        xf = x.float()
        ref = (F.silu(xf @ w["gate_proj"].t()) * (xf @ w["up_proj"].t())) @ w["down_proj"].t()
        for name, fn in impls.items():
            if fn == "graph":
                y = torch.full((T, D), float("nan"), device=device, dtype=dtype)
                replay = graphed(lambda inp: y.copy_(mlp(inp)), x)
                replay()
                got = y
            elif T > MAX_TOKENS.get(name, T):
                continue
            else:
                got = fn(x)
            checks[f"{name} T={T}"] = rel_error(got, ref)
    if "pointer-load gate/up" in impls:
        # the gate/up kernels alone, odd sizes, output poisoned first; silu_mul (on the two halves of
        # one product's output, as the runtime calls it) bit for bit against torch
        for T in (1, 7, 100, 300):
            x = torch.randn(T, D, device=device, dtype=dtype)
            xf = x.float()
            ref = F.silu(xf @ w["gate_proj"].t()) * (xf @ w["up_proj"].t())
            out = torch.full((T, Fh), float("nan"), device=device, dtype=dtype)
            kernels.gate_up_swiglu(x, mlp.gate_proj.weight, mlp.up_proj.weight, out=out)
            checks[f"gate_up_swiglu T={T}"] = rel_error(out, ref) if torch.isfinite(out).all() else float("inf")
            if "TMA gate/up + down" in impls and T <= 128:
                checks[f"gate_up_swiglu_tma T={T}"] = rel_error(
                    kernels.gate_up_swiglu_tma(x, mlp.gate_proj.weight, mlp.up_proj.weight), ref)
                checks[f"down_tma T={T}"] = rel_error(kernels.down_tma(ref.to(dtype), mlp.down_proj.weight),
                                                      ref.to(dtype).float() @ w["down_proj"].t())
        y = 4 * torch.randn(4096, 2 * Fh, device=device, dtype=dtype)
        g, u = y[:, :Fh], y[:, Fh:]
        checks["silu_mul elements differing from torch"] = float((kernels.silu_mul(g, u) != F.silu(g) * u).sum())
    checks_ok = all(e < 2e-2 for k, e in checks.items() if "differing" not in k) and \
        checks.get("silu_mul elements differing from torch", 0) == 0
    print("checks:", {k: f"{v:.1e}" for k, v in checks.items()}, flush=True)

    rows = []
    weight_bytes = 3 * D * Fh * 2
    for T in timed:
        x = torch.randn(T, D, device=device, dtype=dtype)
        flops = 6 * T * D * Fh
        nbytes = weight_bytes + 2 * T * D * 2
        roof_ms = expert_roofline_ms(T, D, Fh, peak["tflops"], copy["gbps"])
        burst_ms = expert_roofline_ms(T, D, Fh, burst["tflops"], copy["gbps"])
        for name, fn in impls.items():
            if T > MAX_TOKENS.get(name, T) or (T in between and name not in ("runtime", "torch")):
                continue
            if fn == "graph":
                y = torch.empty(T, D, device=device, dtype=dtype)
                call = graphed(lambda inp: y.copy_(mlp(inp)), x)
            else:
                call = (lambda f=fn: f(x))
            ms = median(time_sustained(call, device, warm_s=warm_s, run_s=run_s))
            issue = host_us(call, device) if device.type == "cuda" and name in ("runtime", "graph") else None
            clocks = gpu_clocks(device) if name == "runtime" else None     # just after the size's timed calls
            rows.append({"tokens": T, "variant": name, "ms": ms, "host_us": issue, "clocks": clocks,
                         "tflops": flops / (ms * 1e-3) / 1e12,
                         "gbps": nbytes / (ms * 1e-3) / 1e9, "roofline_ms": roof_ms, "fraction": roof_ms / ms,
                         "fraction_burst": burst_ms / ms,
                         "bound": "compute" if flops / (peak["tflops"] * 1e12) > nbytes / (copy["gbps"] * 1e9)
                         else "memory"})
        best = max((r for r in rows if r["tokens"] == T), key=lambda r: r["fraction"])
        run = next(r for r in rows if r["tokens"] == T and r["variant"] == "runtime")
        print(f"T={T:6d}: runtime {run['ms']:.3f} ms = {100 * run['fraction']:.0f}% of roofline; "
              f"best {best['variant']} {100 * best['fraction']:.0f}%", flush=True)
    after = gpu_clocks(device)

    sweep = []
    if "TMA gate/up + down" in impls:
        sweep = tma_sweep(mlp, device, [T for T in (1, 16, 32, 64, 128) if T <= sizes[-1]], D)
        for T, kernel in sorted({(r["tokens"], r["kernel"]) for r in sweep}):
            mine_rows = [r for r in sweep if r["tokens"] == T and r["kernel"] == kernel]
            best = min(mine_rows, key=lambda r: r["us"])
            mine = next(r for r in mine_rows if r["runtime's"])
            print(f"TMA {kernel} T={T}: best {best['config']} {best['us']:.1f} us; the runtime's "
                  f"{mine['us']:.1f} us", flush=True)

    profiles = {}
    if device.type == "cuda":
        for T in timed:
            run = next(r for r in rows if r["tokens"] == T and r["variant"] == "runtime")
            if run["fraction"] < 0.9:
                x = torch.randn(T, D, device=device, dtype=dtype)
                profiles[T] = profile(lambda: mlp(x), device)

    data = {"environment": environment(device), "config": {"hidden": D, "intermediate": Fh}, "peak": peak,
            "burst_peak": burst, "copy": copy, "clocks_after": after,
            "timing": {"warm_s": warm_s, "run_s": run_s, "peak_warm_s": 0.05 if args.small else 0.5},
            "fused_max_tokens": kernels.FUSED_MAX_TOKENS, "tma_max_tokens": kernels.TMA_MAX_TOKENS,
            "tma_down_max_tokens": kernels.TMA_DOWN_MAX_TOKENS,
            "graph_max_tokens": kernels.GRAPH_MAX_TOKENS if os.environ.get("MOE_MPI_EXPERT_GRAPHS", "1") != "0" else 0, "rows": rows, "checks": checks,
            "checks_ok": checks_ok, "tma_sweep": sweep, "profiles": profiles, "between": between}
    data["target_met"] = all(r["fraction"] >= 0.9 for r in rows if r["variant"] == "runtime")
    stem = f"gpu_expert_mlp_{card_slug(device)}" + ("_small" if args.small else "")
    paths = write_results(args.out, stem, render(data), data)
    print(md_table([r for r in rows if r["variant"] == "runtime"], COLUMNS))
    print(f"wrote {paths[0]} and {paths[1]}", flush=True)
    return 0 if checks_ok else 1


COLUMNS = [("tokens", "tokens", "d"), ("variant", "variant", ""), ("ms", "time (ms)", ".4f"),
           ("tflops", "TFLOP/s", ".1f"), ("gbps", "GB/s", ".0f"), ("roofline_ms", "roofline (ms)", ".4f"),
           ("fraction", "of roofline", ".2f"), ("fraction_burst", "of burst roofline", ".2f"), ("bound", "bound", ""),
           ("host_us", "host (us a call)", ".0f")]


def render(data: dict) -> str:
    """The results markdown from the results JSON (``--render FILE.json`` redoes it without a GPU)."""
    env, peak, burst, copy = data["environment"], data["peak"], data["burst_peak"], data["copy"]
    D, Fh = data["config"]["hidden"], data["config"]["intermediate"]
    timing = data.get("timing", {"warm_s": 0.15, "run_s": 0.2, "peak_warm_s": 0.5})
    rows, checks = data["rows"], data["checks"]
    runtime = [r for r in rows if r["variant"] == "runtime"]
    worst = min(runtime, key=lambda r: r["fraction"])
    missed = [r for r in runtime if r["fraction"] < 0.9]
    ridge = peak["tflops"] * 1e12 / (copy["gbps"] * 1e9)     # tokens where both times are equal
    shapes = lambda d: ", ".join(f"{k}: {v:.0f}" for k, v in d["by_shape"].items())  # noqa: E731
    md = [f"# Expert MLP at paper width ({env['card']})", "",
          f"SwiGLU {D} x {Fh}, bf16 weights and activations. Ceilings measured in this run: matrix-product "
          f"peak {peak['tflops']:.0f} TFLOP/s sustained (best of {shapes(peak)}; each shape run for "
          f"{timing['peak_warm_s']:.2f} s before {timing['peak_warm_s']:.2f} s of timed products; clocks just after: "
          f"{peak.get('clocks')}), {burst['tflops']:.0f} TFLOP/s in a burst (ten products after three "
          f"warm-ups: {shapes(burst)}); device copy {copy['gbps']:.0f} GB/s (read + write). "
          f"Roofline time = max(6 T D F / peak, (3 D F + 2 T D) x 2 bytes / copy bandwidth). Every size and "
          f"variant keeps the card busy for {timing['warm_s']} s before at least {timing['run_s']} s of timed "
          f"calls, as the sustained peak was measured: a card under steady load lowers its clocks (after the "
          f"sizes: {data.get('clocks_after')}), so the burst peak is not a rate an expert can keep. 'of burst "
          f"roofline' is the same time against the burst peak. Median of CUDA-event timings.", "",
          "Variants: `runtime` is exactly what an expert rank runs (`moe_mpi.model.layers.MLP`, which on "
          "CUDA uses `moe_mpi.model.kernels`: "
          + (f"on Hopper, the TMA Triton gate/up + SwiGLU kernel up to {data['tma_max_tokens']} tokens and the TMA "
             f"down kernel up to {data['tma_down_max_tokens']}"
             + (f", both replayed from a CUDA graph per token tile up to {data['graph_max_tokens']}"
                if data.get("graph_max_tokens") else "") + "; above, cuBLAS: one product over the gate and up "
             "weights stacked, joined by one Triton silu*mul kernel, and cuBLAS's down product); `torch` is the plain "
             "torch expert (what runs without Triton); `graph` replays the runtime as a CUDA graph; the others force "
             "one path at every size: `TMA gate/up + down` the TMA kernels launched directly, `pointer-load gate/up` "
             "the gate/up kernel "
             "that runs before Hopper, `cuBLAS, one product` and `cuBLAS, two streams` cuBLAS's gate and up as one "
             "product or as two on two streams." if "tma_max_tokens" in data else
             f"the fused Triton gate/up + SwiGLU kernel up to {data.get('fused_max_tokens', 16)} tokens, cuBLAS gate "
             "and up products on two streams above, joined by one Triton silu*mul kernel; the down product in "
             "cuBLAS); `torch` is the plain torch expert (what runs without Triton); `graph` replays the runtime as "
             "a CUDA graph; `Triton gate/up` forces the fused kernel; `cuBLAS, two streams` forces the cuBLAS path."),
          "",
          f"Target: the runtime's expert within 10% of the roofline at every size: "
          f"**{'met' if data['target_met'] else 'missed'}**; worst {100 * worst['fraction']:.1f}% at "
          f"{worst['tokens']} tokens."]
    if missed:
        md += ["", f"Why: the ridge point, where streaming the weights and doing the products take equal time, is "
               f"{ridge:.0f} tokens (peak / copy bandwidth). The sizes that miss, "
               + ", ".join(f"{r['tokens']} ({100 * r['fraction']:.1f}%)" for r in missed)
               + f", lie between {min(r['tokens'] for r in missed) / ridge:.2g}x and "
               f"{max(r['tokens'] for r in missed) / ridge:.2g}x of it. There a product must stream its weights and "
               "keep the tensor cores busy at once, and the roofline counts only the larger of the two times; "
               "neither cuBLAS's kernels nor the Triton kernels (their sweep is below) overlap the two fully. "
               "Far from the ridge the runtime is within 10%: the weights stream at nearly the copy bandwidth "
               "for a few tokens, the products run at nearly the sustained peak for thousands. The profiles "
               "below give each kernel's time at the missed sizes (a burst of five calls, so at higher clocks "
               "than the sustained timing). "
               + (f"Sizes between the powers of two ({', '.join(map(str, data['between']))}) are timed for the "
                  "`runtime` and `torch` variants only. " if data.get("between") else
                  "This sweep timed powers of two only. ")
               + "The schedules and BLAS choices tried against the miss are in `gpu_expert_ridge_<card>.md` "
               "(`benchmarks/gpu_expert_ridge.py`)."]
        clocked = [r for r in runtime if r.get("clocks")]
        if clocked:
            def clock(r):
                c = r["clocks"]
                return f"{r['tokens']} tokens: {c['sm_mhz']:.0f} MHz at {c['power_w']:.0f} W"
            md += ["", "SM clock and power just after each size's timed calls (the card caps its power at 700 W "
                   "and lowers its clock to stay under it; throttle reasons "
                   + ", ".join(sorted({r["clocks"].get("throttle", "?") for r in clocked})) + "): "
                   + "; ".join(clock(r) for r in clocked) + "."]
    md += ["", md_table(rows, COLUMNS), "",
           "Correctness (relative error against fp32, fresh random inputs; silu_mul must match torch bit for "
           "bit): " + ", ".join(f"{k}: {v:.1e}" for k, v in checks.items())
           + (" - ok" if data.get("checks_ok", True) else " - FAILED"), ""]
    if data.get("tma_sweep"):
        md += ["## TMA kernels: every configuration of the sweep (burst timings)", "",
               "Configuration: (BLOCK_N, BLOCK_K, stages, warps), the output columns and the reduction per tile; "
               "the token tile is the "
               "smallest power of two from 16 that holds every token.", "",
               md_table(data["tma_sweep"], [("tokens", "tokens", "d"), ("kernel", "kernel", ""),
                                            ("config", "configuration", ""), ("runtime's", "runtime's", ""),
                                            ("us", "us", ".1f"), ("gbps", "GB/s (its weights)", ".0f")]), ""]
    if data.get("skinny_sweep"):
        md += ["## Fused gate/up kernel: every configuration of the sweep (burst timings)", "",
               md_table(data["skinny_sweep"], [("tokens", "tokens", "d"), ("config", "configuration", ""),
                                               ("runtime's", "runtime's", ""), ("us", "us", ".1f"),
                                               ("gbps", "GB/s (both weights)", ".0f")]), ""]
    if data.get("profiles"):
        md += ["## Where the time goes (runtime variant, sizes under 90% of the roofline; kernels on two "
               "streams overlap, so their times add up to more than the call)", ""]
        for T, prof in data["profiles"].items():
            md += [f"T = {T}:", "", md_table(prof, [("kernel", "kernel", ""), ("calls_per_run", "calls", ".0f"),
                                                     ("us_per_run", "us per MLP", ".1f"), ("share", "share", ".2f")]), ""]
    md += [f"Environment: {env}"]
    return "\n".join(md)


if __name__ == "__main__":
    sys.exit(main())
