"""Expert MLP benchmark: one routed expert at paper width (SwiGLU 7168 x 18432, bf16) for 1..16384
tokens, against the roofline of the same card measured in the same run.

    python benchmarks/gpu_expert_mlp.py                      # on the first visible GPU
    python benchmarks/gpu_expert_mlp.py --device cpu --small  # a check of the script on a CPU

For T tokens the expert does 6 T D F flops and must move at least its weights (3 D F bf16 words)
plus its input and output (2 T D words).  Roofline time = max(flops / measured matrix-product peak,
bytes / measured device copy bandwidth); the fraction reported is roofline time / measured time.
Variants: ``runtime`` is exactly what an expert rank runs (``moe_mpi.model.layers.MLP``, weights from
``build_expert``); ``graph`` replays it as a CUDA graph (no launch gaps); ``fused gate|up`` does the
gate and up projections as one product over concatenated weights.  Sizes that miss 90% of the
roofline get a kernel profile.  Results: benchmarks/results/gpu_expert_mlp_<card>.{md,json}.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_common import (RESULTS, card_slug, copy_bandwidth, environment, matmul_peak, md_table, median,  # noqa: E402
                        time_ms, write_results)
from moe_mpi.config import ModelConfig  # noqa: E402
from moe_mpi.model.weights import build_expert  # noqa: E402


def variants(mlp, device):
    w1, w3, w2 = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
    w13 = torch.cat([w1, w3])       # (2F, D)
    n = w1.shape[0]

    def fused(x):
        h = x @ w13.t()
        return (F.silu(h[:, :n]) * h[:, n:]) @ w2.t()

    out = {"runtime": mlp, "fused gate|up": fused}
    if device.type == "cuda":
        out["graph"] = "graph"      # built per size from the runtime module
    return out


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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--small", action="store_true", help="small sizes: a check of the script, not a benchmark")
    p.add_argument("--max-tokens", type=int, default=16384)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    device = torch.device(args.device)
    cfg = ModelConfig.load("paper")
    if args.small:
        cfg = cfg.replace(hidden_size=256, moe_intermediate_size=512)
        args.max_tokens = min(args.max_tokens, 256)
    D, Fh = cfg.hidden_size, cfg.moe_intermediate_size
    dtype = torch.bfloat16

    peak = matmul_peak(device, small=args.small)
    copy = copy_bandwidth(device, small=args.small)
    print(f"measured: matrix-product peak {peak['tflops']:.0f} TFLOP/s {peak['by_shape']}, "
          f"copy {copy['gbps']:.0f} GB/s", flush=True)

    mlp = build_expert(cfg, 0, 0, dtype=dtype, device=device)
    impls = variants(mlp, device)
    sizes = [1 << i for i in range(args.max_tokens.bit_length()) if 1 << i <= args.max_tokens]

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
            else:
                got = fn(x)
            checks[f"{name} T={T}"] = rel_error(got, ref)
    checks_ok = all(e < 2e-2 for e in checks.values())
    print("relative error vs fp32:", {k: f"{v:.1e}" for k, v in checks.items()}, flush=True)

    rows = []
    weight_bytes = 3 * D * Fh * 2
    for T in sizes:
        x = torch.randn(T, D, device=device, dtype=dtype)
        flops = 6 * T * D * Fh
        nbytes = weight_bytes + 2 * T * D * 2
        roof_ms = max(flops / (peak["tflops"] * 1e12), nbytes / (copy["gbps"] * 1e9)) * 1e3
        iters = 30 if T <= 2048 else 15
        for name, fn in impls.items():
            if fn == "graph":
                y = torch.empty(T, D, device=device, dtype=dtype)
                call = graphed(lambda inp: y.copy_(mlp(inp)), x)
            else:
                call = (lambda f=fn: f(x))
            ms = median(time_ms(call, device, warmup=5, iters=iters))
            rows.append({"tokens": T, "variant": name, "ms": ms, "tflops": flops / (ms * 1e-3) / 1e12,
                         "gbps": nbytes / (ms * 1e-3) / 1e9, "roofline_ms": roof_ms, "fraction": roof_ms / ms,
                         "bound": "compute" if flops / (peak["tflops"] * 1e12) > nbytes / (copy["gbps"] * 1e9)
                         else "memory"})
        best = max((r for r in rows if r["tokens"] == T), key=lambda r: r["fraction"])
        run = next(r for r in rows if r["tokens"] == T and r["variant"] == "runtime")
        print(f"T={T:6d}: runtime {run['ms']:.3f} ms = {100 * run['fraction']:.0f}% of roofline; "
              f"best {best['variant']} {100 * best['fraction']:.0f}%", flush=True)

    profiles = {}
    if device.type == "cuda":
        for T in sizes:
            run = next(r for r in rows if r["tokens"] == T and r["variant"] == "runtime")
            if run["fraction"] < 0.9 and (T in (1, 16, 128, 256, 512, 1024, 4096, 16384)):
                x = torch.randn(T, D, device=device, dtype=dtype)
                profiles[T] = profile(lambda: mlp(x), device)

    runtime = [r for r in rows if r["variant"] == "runtime"]
    worst = min(runtime, key=lambda r: r["fraction"])
    passed = all(r["fraction"] >= 0.9 for r in runtime)
    env = environment(device)
    cols = [("tokens", "tokens", "d"), ("variant", "variant", ""), ("ms", "time (ms)", ".4f"),
            ("tflops", "TFLOP/s", ".1f"), ("gbps", "GB/s", ".0f"), ("roofline_ms", "roofline (ms)", ".4f"),
            ("fraction", "of roofline", ".2f"), ("bound", "bound", "")]
    md = [f"# Expert MLP at paper width ({env['card']})", "",
          f"SwiGLU {D} x {Fh}, bf16 weights and activations. Ceilings measured in this run: matrix-product "
          f"peak {peak['tflops']:.0f} TFLOP/s (best of {', '.join(f'{k}: {v:.0f}' for k, v in peak['by_shape'].items())}), "
          f"device copy {copy['gbps']:.0f} GB/s (read + write). Roofline time = max(6 T D F / peak, "
          f"(3 D F + 2 T D) x 2 bytes / copy bandwidth). Median of CUDA-event timings.", "",
          f"Target: the runtime's expert within 10% of the roofline at every size: "
          f"**{'met' if passed else 'missed'}**; worst {100 * worst['fraction']:.0f}% at {worst['tokens']} tokens.", "",
          md_table(rows, cols), "",
          "Correctness (relative error against fp32, fresh random inputs): "
          + ", ".join(f"{k}: {v:.1e}" for k, v in checks.items()) + (" - ok" if checks_ok else " - FAILED"), ""]
    if profiles:
        md += ["## Where the time goes (runtime variant, sizes under 90% of the roofline)", ""]
        for T, prof in profiles.items():
            md += [f"T = {T}:", "", md_table(prof, [("kernel", "kernel", ""), ("calls_per_run", "calls", ".0f"),
                                                     ("us_per_run", "us per MLP", ".1f"), ("share", "share", ".2f")]), ""]
    md += [f"Environment: {env}"]
    stem = f"gpu_expert_mlp_{card_slug(device)}" + ("_small" if args.small else "")
    paths = write_results(args.out, stem, "\n".join(md), {
        "environment": env, "config": {"hidden": D, "intermediate": Fh}, "peak": peak, "copy": copy,
        "rows": rows, "checks": checks, "profiles": profiles, "target_met": passed})
    print(md_table([r for r in rows if r["variant"] == "runtime"], cols))
    print(f"wrote {paths[0]} and {paths[1]}", flush=True)
    return 0 if checks_ok else 1


if __name__ == "__main__":
    sys.exit(main())
