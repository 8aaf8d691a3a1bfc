"""The expert's two products near the ridge point with every algorithm cuBLASLt's heuristic offers, not
only the one torch takes: does some algorithm (another tile, a split reduction) close the miss?

    python benchmarks/gpu_blaslt.py [--tokens 96,128,160,192,256,320] [--algos 32] [--out DIR]

For each token count and product (gate/up: (T, 7168) x (36864, 7168)^T; down: (T, 18432) x
(7168, 18432)^T), ``cublasLtMatmulAlgoGetHeuristic`` is asked for up to ``--algos`` algorithms with a
32 MB workspace; each is timed in a burst (median of CUDA-event timings), beside torch's own product
(``F.linear``, what the runtime calls).  Then the whole expert with the fastest algorithm of each product
(and the runtime's silu*mul) is timed the way ``gpu_expert_mlp`` times the runtime (sustained), beside
the runtime, and checked against it.  cuBLASLt is reached through ctypes in the library torch loaded.
Writes ``gpu_blaslt_<card>.json`` and prints a table.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_common import card_slug, copy_bandwidth, expert_roofline_ms, expert_weights, gpu_clocks, matmul_peak, median, time_ms, time_sustained  # noqa: E402
from moe_mpi.model import kernels  # noqa: E402

CUDA_R_32F, CUDA_R_16BF = 0, 14
CUBLAS_COMPUTE_32F = 68
DESC_TRANSA, DESC_TRANSB = 3, 4
OP_N, OP_T = 0, 1
PREF_MAX_WORKSPACE_BYTES = 1
CONFIG_ATTRS = {"id": 0, "tile": 1, "split_k": 2, "reduction": 3, "swizzle": 4, "custom": 5, "stages": 6}


class Algo(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint64 * 8)]


class HeuristicResult(ctypes.Structure):
    _fields_ = [("algo", Algo), ("workspace_size", ctypes.c_size_t), ("state", ctypes.c_int),
                ("waves", ctypes.c_float), ("reserved", ctypes.c_int * 4)]


def load_cublaslt() -> ctypes.CDLL:
    """The cuBLASLt library torch has loaded (found in this process's memory map)."""
    torch.ones(8, 8, device="cuda", dtype=torch.bfloat16) @ torch.ones(8, 8, device="cuda", dtype=torch.bfloat16)
    paths = sorted({line.split()[-1] for line in open("/proc/self/maps") if "libcublasLt" in line})
    for name in paths + ["libcublasLt.so.13", "libcublasLt.so.12"]:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise RuntimeError("cuBLASLt not found in this process")


class Lt:
    """y (T, N) = x (T, K) @ w (N, K)^T in cuBLASLt's column-major terms: D (N x T) = A^T B, A = w as
    (K x N), B = x as (K x T)."""

    def __init__(self, device: torch.device):
        self.lib = load_cublaslt()
        self.handle = ctypes.c_void_p()
        self._check(self.lib.cublasLtCreate(ctypes.byref(self.handle)), "cublasLtCreate")
        self.workspace = torch.empty(32 << 20, dtype=torch.uint8, device=device)
        self.alpha, self.beta = ctypes.c_float(1.0), ctypes.c_float(0.0)

    @staticmethod
    def _check(status: int, what: str) -> None:
        if status != 0:
            raise RuntimeError(f"{what}: cuBLAS status {status}")

    def problem(self, T: int, N: int, K: int, ldx: int) -> tuple:
        lib, c = self.lib, ctypes
        desc = c.c_void_p()
        self._check(lib.cublasLtMatmulDescCreate(c.byref(desc), CUBLAS_COMPUTE_32F, CUDA_R_32F), "MatmulDescCreate")
        for attr, op in ((DESC_TRANSA, OP_T), (DESC_TRANSB, OP_N)):
            v = c.c_int32(op)
            self._check(lib.cublasLtMatmulDescSetAttribute(desc, attr, c.byref(v), c.c_size_t(4)), "DescSetAttribute")
        layouts = []
        for rows, cols, ld in ((K, N, K), (K, T, ldx), (N, T, N)):
            lay = c.c_void_p()
            self._check(lib.cublasLtMatrixLayoutCreate(c.byref(lay), CUDA_R_16BF, c.c_uint64(rows), c.c_uint64(cols),
                                                       c.c_int64(ld)), "MatrixLayoutCreate")
            layouts.append(lay)
        return desc, layouts

    def algos(self, problem: tuple, count: int) -> list[HeuristicResult]:
        lib, c = self.lib, ctypes
        desc, (a, b, d) = problem
        pref = c.c_void_p()
        self._check(lib.cublasLtMatmulPreferenceCreate(c.byref(pref)), "PreferenceCreate")
        ws = c.c_uint64(self.workspace.numel())
        self._check(lib.cublasLtMatmulPreferenceSetAttribute(pref, PREF_MAX_WORKSPACE_BYTES, c.byref(ws),
                                                             c.c_size_t(8)), "PreferenceSetAttribute")
        results = (HeuristicResult * count)()
        got = c.c_int(0)
        self._check(lib.cublasLtMatmulAlgoGetHeuristic(self.handle, desc, a, b, d, d, pref, count, results,
                                                       c.byref(got)), "AlgoGetHeuristic")
        return [results[i] for i in range(got.value) if results[i].state == 0]

    def config(self, algo: Algo) -> dict:
        out = {}
        for name, attr in CONFIG_ATTRS.items():
            v, written = ctypes.c_uint32(0), ctypes.c_size_t(0)
            if self.lib.cublasLtMatmulAlgoConfigGetAttribute(ctypes.byref(algo), attr, ctypes.byref(v),
                                                            ctypes.c_size_t(4), ctypes.byref(written)) == 0:
                out[name] = int(v.value)
        return out

    def matmul(self, problem: tuple, algo: Algo, x: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        desc, (a, b, d) = problem
        c = ctypes
        self._check(self.lib.cublasLtMatmul(
            self.handle, desc, c.byref(self.alpha), c.c_void_p(w.data_ptr()), a, c.c_void_p(x.data_ptr()), b,
            c.byref(self.beta), c.c_void_p(y.data_ptr()), d, c.c_void_p(y.data_ptr()), d, c.byref(algo),
            c.c_void_p(self.workspace.data_ptr()), c.c_size_t(self.workspace.numel()),
            c.c_void_p(torch.cuda.current_stream().cuda_stream)), "Matmul")
        return y


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", default="96,128,160,192,256,320")
    p.add_argument("--algos", type=int, default=32)
    p.add_argument("--out", default="/tmp")
    args = p.parse_args()
    dev = torch.device("cuda")
    D, Fh = 7168, 18432
    w13, wd = expert_weights(dev)
    wg, wu = w13[:Fh], w13[Fh:]
    lt = Lt(dev)
    peak = matmul_peak(dev, sustained=True)["tflops"]
    bw = copy_bandwidth(dev)["gbps"]
    rows, experts = [], []
    for T in map(int, args.tokens.split(",")):
        x = torch.randn(T, D, device=dev).to(torch.bfloat16)
        h = kernels.silu_mul(*F.linear(x, w13).split(Fh, dim=1))
        best = {}
        for name, inp, w, N, K in (("gate/up", x, w13, 2 * Fh, D), ("down", h, wd, D, Fh)):
            ref = F.linear(inp, w)
            torch_us = 1e3 * median(time_ms(lambda: F.linear(inp, w), dev, warmup=5, iters=30))
            prob = lt.problem(T, N, K, inp.stride(0))
            y = torch.empty(T, N, device=dev, dtype=torch.bfloat16)
            timed, offered = [], lt.algos(prob, args.algos)
            for i, r in enumerate(offered):
                try:
                    lt.matmul(prob, r.algo, inp, w, y)
                    err = ((y.float() - ref.float()).norm() / ref.float().norm()).item()
                    us = 1e3 * median(time_ms(lambda: lt.matmul(prob, r.algo, inp, w, y), dev, warmup=5, iters=30))
                except RuntimeError as exc:
                    print(f"T={T} {name} algo {i}: {exc}", flush=True)
                    continue
                timed.append({"tokens": T, "product": name, "index": i, "us": us, "torch_us": torch_us,
                              "waves": r.waves, "workspace": r.workspace_size, "rel_err": err, **lt.config(r.algo)})
            rows += timed
            fastest = min(timed, key=lambda t: t["us"])
            best[name] = (prob, offered[fastest["index"]].algo)
            print(f"T={T:4d} {name:8s} torch {torch_us:7.1f} us; heuristic #0 {timed[0]['us']:7.1f} us; "
                  f"fastest #{fastest['index']} {fastest['us']:7.1f} us (waves {fastest['waves']:.2f}, "
                  f"{ {k: fastest[k] for k in CONFIG_ATTRS if k in fastest} }) of {len(timed)}", flush=True)

        y13 = torch.empty(T, 2 * Fh, device=dev, dtype=torch.bfloat16)
        yo = torch.empty(T, D, device=dev, dtype=torch.bfloat16)

        def picked(x=x, y13=y13, yo=yo, best=best):
            lt.matmul(*best["gate/up"], x, w13, y13)
            hh = kernels.silu_mul(y13[:, :Fh], y13[:, Fh:])
            return lt.matmul(*best["down"], hh, wd, yo)

        def runtime(x=x):
            return kernels.swiglu_mlp(x, wg, wu, wd)

        roof = expert_roofline_ms(T, D, Fh, peak, bw)
        ref = runtime().float()
        err = ((picked().float() - ref).norm() / ref.norm()).item()
        for rnd in range(2):
            for label, fn in (("runtime", runtime), ("fastest cuBLASLt algorithms", picked)):
                ms = median(time_sustained(fn, dev, warm_s=0.15, run_s=0.2))
                experts.append({"tokens": T, "variant": label, "round": rnd, "ms": ms, "roofline_ms": roof,
                                "of_roofline": roof / ms, "rel_err_vs_runtime": err if label != "runtime" else 0.0,
                                "clocks": gpu_clocks(dev)})
                print(f"T={T:4d} {label:28s} {ms:.4f} ms  of roofline {roof / ms:.3f}", flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, f"gpu_blaslt_{card_slug(dev)}.json").write_text(json.dumps(
        {"peak_tflops": peak, "copy_gbps": bw, "torch": torch.__version__, "products": rows, "experts": experts},
        indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
