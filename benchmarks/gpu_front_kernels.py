"""A front's Triton kernels against plain torch, side by side in one run: each fused piece at paper
width, and a whole front micro-batch with the kernels on and off.  Each torch side is the code the
runtime runs with ``MOE_MPI_TRITON=0``.

    python benchmarks/gpu_front_kernels.py            # paper-width slice, bf16, first visible GPU
    python benchmarks/gpu_front_kernels.py --small    # tiny preset (a check of the script)

* Head: log p of each row's next token from 1024 rows of bf16 logits over the paper's vocabulary:
  torch's ``log_softmax(logits.float()).gather`` against ``front_kernels.token_logprobs``, both checked
  against log-softmax in fp64 of the same logits.
* RMSNorm of 2048 x 7168 bf16 rows: ``layers.rms_norm`` against ``front_kernels.rms_norm``: the
  fraction of outputs with the same bits, and the largest difference in units of the last place.
* A MoE layer's combine of 2048 tokens with the shared experts' and the residual's adds (both paths
  copy the residual first; the runtime's kernel updates it in place): ``routing.combine_residual``
  against ``front_kernels.combine_residual_``.
* MLA's queries of 2048 tokens: ``layers.rope_cat`` against ``front_kernels.rope_cat``.
* A front micro-batch (``gpu_front_host.run_front``: the slice's front for 2048 tokens, experts
  answered by a stub, then the head): GPU time back to back and host time to queue it, with
  ``MOE_MPI_TRITON=0`` (torch for every kernel, the baseline) and on, alternated over several rounds.

Results: results/gpu_front_kernels_<card>.{md,json}.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cpu_common import md_table  # noqa: E402
from gpu_common import RESULTS, card_slug, environment, time_ms, write_results  # noqa: E402
from gpu_end_to_end import slice_config  # noqa: E402
from gpu_front_host import run_front  # noqa: E402
from moe_mpi.model import front_kernels, kernels  # noqa: E402
from moe_mpi.model.layers import rms_norm, rope_cat  # noqa: E402
from moe_mpi.model.routing import combine_residual, plan_dispatch  # noqa: E402
from moe_mpi.model.transformer import Batch, to_device  # noqa: E402
from moe_mpi.model.weights import build_front  # noqa: E402


def torch_logprobs(logits, targets):
    return torch.log_softmax(logits.float(), dim=-1).gather(1, targets[:, None])[:, 0]


def ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in bf16 units of the last place between same-signed ``a`` and ``b``."""
    ia, ib = a.view(torch.int16).int(), b.view(torch.int16).int()
    return int((ia - ib).abs().max())


def head(dev, rows: int, vocab: int, hidden: int) -> list[dict]:
    g = torch.Generator(device=dev).manual_seed(0)
    w = torch.randn(vocab, hidden, device=dev, generator=g, dtype=torch.bfloat16) / hidden ** 0.5
    h = 3 * torch.randn(rows, hidden, device=dev, generator=g, dtype=torch.bfloat16)
    logits = h @ w.t()
    targets = torch.randint(0, vocab, (rows,), device=dev, generator=g)
    exact = torch.log_softmax(logits.double(), dim=-1).gather(1, targets[:, None])[:, 0]
    out = []
    for name, fn in (("torch: log_softmax(logits.float()).gather", torch_logprobs),
                     ("Triton: front_kernels.token_logprobs", front_kernels.token_logprobs)):
        got = fn(logits, targets)
        ms = statistics.median(time_ms(lambda: fn(logits, targets), dev, warmup=3, iters=20))
        out.append({"piece": "head", "how": name, "ms": ms, "gbps_logits_read": rows * vocab * 2 / ms / 1e6,
                    "max_abs_err_vs_fp64": float((got.double() - exact).abs().max())})
    return out


def norm(dev, rows: int, hidden: int) -> list[dict]:
    g = torch.Generator(device=dev).manual_seed(1)
    x = torch.randn(rows, hidden, device=dev, generator=g, dtype=torch.bfloat16)
    w = (1 + 0.1 * torch.randn(hidden, device=dev, generator=g)).bfloat16()
    want = rms_norm(x, w, 1e-6)
    got = front_kernels.rms_norm(x, w, 1e-6)
    same, far = float((got == want).float().mean()), ulps(got, want)
    out = []
    for name, fn in (("torch: layers.rms_norm", rms_norm), ("Triton: front_kernels.rms_norm", front_kernels.rms_norm)):
        ms = statistics.median(time_ms(lambda: fn(x, w, 1e-6), dev, warmup=3, iters=20))
        out.append({"piece": "rms_norm", "how": name, "ms": ms, "same_bits": same if "Triton" in name else 1.0,
                    "max_ulps": far if "Triton" in name else 0})
    return out


def moe_combine(dev, tokens: int, hidden: int, top_k: int, n_experts: int) -> list[dict]:
    """A MoE layer's combine, shared experts' add and residual add, as the front runs them."""
    g = torch.Generator(device=dev).manual_seed(2)
    x = torch.randn(tokens, hidden, device=dev, generator=g, dtype=torch.bfloat16)
    rows = torch.arange(tokens, device=dev)
    ids = torch.argsort(torch.rand(tokens, n_experts, device=dev, generator=g), dim=1)[:, :top_k]
    w = torch.rand(tokens, top_k, device=dev, generator=g)
    plan = plan_dispatch(ids, n_experts)
    y = torch.randn(tokens * top_k, hidden, device=dev, generator=g, dtype=torch.bfloat16)
    shared = torch.randn(tokens, hidden, device=dev, generator=g, dtype=torch.bfloat16)

    def torch_path():
        return combine_residual(x, rows, y, plan, w, shared)

    def triton_path():
        return front_kernels.combine_residual_(x.clone(), rows, y, plan.order_N, w, shared)

    same = float((torch_path() == triton_path()).float().mean())
    return [{"piece": f"MoE combine + residual (top-{top_k})", "how": name, "ms": statistics.median(
                time_ms(fn, dev, warmup=3, iters=20)), "same_bits": 1.0 if fn is torch_path else same}
            for name, fn in (("torch: routing.combine_residual", torch_path),
                             ("Triton: front_kernels.combine_residual_", triton_path))]


def qk_build(dev, tokens: int, heads: int, nope: int, rope: int, interleave: bool) -> list[dict]:
    """MLA's queries of one micro-batch: the rotary part rotated and joined to the rest, per head."""
    g = torch.Generator(device=dev).manual_seed(3)
    q = torch.randn(1, tokens, heads, nope + rope, device=dev, generator=g, dtype=torch.bfloat16)
    cos, sin = (2 * torch.rand(tokens, rope // 2, device=dev, generator=g) - 1 for _ in range(2))

    def torch_path():
        return rope_cat(q[..., :nope], q[..., nope:], cos, sin, interleave)

    def triton_path():
        return front_kernels.rope_cat(q[..., :nope], q[..., nope:], cos, sin, interleave)

    same = float((torch_path() == triton_path()).float().mean())
    return [{"piece": f"MLA queries: rotary + concatenation ({heads} heads)", "how": name,
             "ms": statistics.median(time_ms(fn, dev, warmup=3, iters=20)),
             "same_bits": 1.0 if fn is torch_path else same}
            for name, fn in (("torch: layers.rope_cat", torch_path), ("Triton: front_kernels.rope_cat", triton_path))]


def front_round(front, batch, dev, iters: int) -> tuple[float, float]:
    """GPU ms per micro-batch back to back, and host ms to queue one (the stub's count waits included:
    the same in both settings)."""
    for _ in range(2):
        run_front(front, batch)
    torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    ev[0].record()
    for _ in range(iters):
        run_front(front, batch)
    ev[1].record()
    host = (time.perf_counter() - t0) / iters
    torch.cuda.synchronize(dev)
    return ev[0].elapsed_time(ev[1]) / iters, 1e3 * host


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    dev = torch.device("cuda", 0)
    if not kernels.enabled(torch.empty(1, device=dev, dtype=torch.bfloat16)):
        raise SystemExit("the Triton kernels are off here (Triton missing or MOE_MPI_TRITON=0)")
    cfg = slice_config(args.small)
    with torch.inference_mode():
        pieces = head(dev, min(1024, args.tokens), cfg.vocab_size, cfg.hidden_size)
        pieces += norm(dev, args.tokens, cfg.hidden_size)
        pieces += moe_combine(dev, args.tokens, cfg.hidden_size, cfg.num_experts_per_tok, cfg.n_routed_experts)
        pieces += qk_build(dev, args.tokens, cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                           cfg.rope_interleave)
        torch.cuda.empty_cache()
        front = build_front(cfg, seed=0, device=dev, dtype=torch.bfloat16)
        S = min(args.tokens, cfg.max_position_embeddings)
        tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(1, S))
        lengths = np.array([S])
        batch = Batch(to_device(lengths, dev), tokens_BS=to_device(tokens, dev), lengths_host=lengths)
        rounds = {"0": [], "1": []}
        for _ in range(args.rounds):
            for setting in ("0", "1"):
                os.environ["MOE_MPI_TRITON"] = setting
                rounds[setting].append(front_round(front, batch, dev, args.iters))
        lp = {}
        for setting in ("0", "1"):
            os.environ["MOE_MPI_TRITON"] = setting
            lp[setting] = run_front(front, batch)[0, 1:].double()
        os.environ["MOE_MPI_TRITON"] = "1"
    whole = []
    for setting, name in (("0", "torch (MOE_MPI_TRITON=0)"), ("1", "Triton kernels (default)")):
        gpu = statistics.median(r[0] for r in rounds[setting])
        host = statistics.median(r[1] for r in rounds[setting])
        whole.append({"how": name, "gpu_ms": gpu, "host_ms": host, "rounds_gpu_ms": [r[0] for r in rounds[setting]]})
    speedup = whole[0]["gpu_ms"] / whole[1]["gpu_ms"]
    lp_diff = float((lp["0"] - lp["1"]).abs().max())
    env = environment(dev)
    md = [f"# A front's kernels: Triton against torch ({env['card']})", "",
          f"{cfg.name}; every timing is a median of CUDA-event timings in this one run.", "",
          "Pieces (1024 rows of logits over the vocabulary of "
          f"{cfg.vocab_size}; RMSNorm and the MoE combine of {args.tokens} x {cfg.hidden_size}):", "",
          md_table(pieces, [("piece", "piece", ""), ("how", "how", ""), ("ms", "ms", ".3f"),
                            ("gbps_logits_read", "GB/s of bf16 logits read", ".0f"),
                            ("max_abs_err_vs_fp64", "max abs error vs fp64", ".2e"),
                            ("same_bits", "outputs with torch's bits", ".4f"), ("max_ulps", "max ulps from torch", "d")]),
          "",
          f"A front micro-batch of {S} tokens (experts answered by a stub, then the head), "
          f"{args.rounds} rounds of {args.iters} micro-batches, the settings alternated:", "",
          md_table(whole, [("how", "kernels", ""), ("gpu_ms", "GPU ms per micro-batch", ".2f"),
                           ("host_ms", "host ms to queue one", ".2f")]), "",
          f"**Triton kernels: {speedup:.3f}x the torch front's GPU time per micro-batch.** Largest difference "
          f"of the micro-batch's log-probabilities between the two settings: {lp_diff:.2e}.", "",
          f"Environment: {env}"]
    data = {"environment": env, "args": vars(args), "pieces": pieces, "front": whole, "speedup": speedup,
            "logprob_max_diff": lp_diff}
    paths = write_results(args.out, f"gpu_front_kernels_{card_slug(dev)}" + ("_small" if args.small else ""),
                          "\n".join(md), data)
    print("\n".join(md))
    print(f"wrote {paths[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
