"""The Triton kernels (``moe_mpi/model/kernels.py``, ``front_kernels.py``) against torch's code or fp64,
element by element, at odd sizes and tile edges.  They need a CUDA GPU with Triton (and the kernels
not turned off) and skip elsewhere.
"""
from __future__ import annotations

import os

import pytest
import torch

from moe_mpi.config import ModelConfig
from moe_mpi.model import front_kernels, kernels

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or kernels.triton is None
                                or os.environ.get("MOE_MPI_TRITON", "1") == "0",
                                reason="needs a CUDA GPU with Triton, kernels on")


@pytest.mark.parametrize("T", [1, 5, 16, 17, 64, 100, 300])
def test_fused_gate_up_kernel_matches_fp32(T):
    """The Triton gate/up + SwiGLU kernel computes silu(x Wg^T) * (x Wu^T) within bf16 rounding of the
    fp32 result, writing every element (the output is poisoned first), at odd sizes and tile edges, with
    the runtime's configuration and every other one of the benchmark's sweep that fits."""
    D, Fh = 320, 200                                    # neither a multiple of the kernel's tiles
    x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
    wg = (torch.randn(Fh, D, device="cuda") / D ** 0.5).bfloat16()
    wu = (torch.randn(Fh, D, device="cuda") / D ** 0.5).bfloat16()
    ref = torch.nn.functional.silu(x.float() @ wg.float().t()) * (x.float() @ wu.float().t())
    for cfg in [None] + kernels.fitting(kernels.SWEEP_CONFIGS, T):
        out = torch.full((T, Fh), float("nan"), device="cuda", dtype=torch.bfloat16)
        kernels.gate_up_swiglu(x, wg, wu, out=out, config=cfg)
        assert torch.isfinite(out).all(), cfg
        assert float((out.float() - ref).norm() / ref.norm()) < 1e-2, cfg


needs_tma = pytest.mark.skipif(not torch.cuda.is_available() or not kernels.tma_ok(torch.empty(16, 16, device="cuda")),
                               reason="needs a Hopper GPU and Triton's TMA descriptors")


@needs_tma
@pytest.mark.parametrize("T", [1, 5, 16, 17, 33, 64, 100, 128])
def test_tma_kernels_match_fp32(T):
    """The TMA gate/up + SwiGLU kernel and the TMA down kernel give the fp32 products within bf16 rounding
    at odd sizes and tile edges (rows past T, columns past F and D are the descriptors' padding), with
    the runtime's configuration and every other one of the benchmark's sweep that fits."""
    D, Fh = 320, 200
    x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
    wg = (torch.randn(Fh, D, device="cuda") / D ** 0.5).bfloat16()
    wu = (torch.randn(Fh, D, device="cuda") / D ** 0.5).bfloat16()
    wd = (torch.randn(D, Fh, device="cuda") / Fh ** 0.5).bfloat16()
    ref = torch.nn.functional.silu(x.float() @ wg.float().t()) * (x.float() @ wu.float().t())
    h = ref.bfloat16()
    for cfg in [None] + kernels.tma_fitting("gate/up", T):
        got = kernels.gate_up_swiglu_tma(x, wg, wu, config=cfg)
        assert got.shape == (T, Fh) and torch.isfinite(got).all(), cfg
        assert float((got.float() - ref).norm() / ref.norm()) < 1e-2, cfg
    for cfg in [None] + kernels.tma_fitting("down", T):
        y = kernels.down_tma(h, wd, config=cfg)
        want = h.float() @ wd.float().t()
        assert y.shape == (T, D) and torch.isfinite(y).all(), cfg
        assert float((y.float() - want).norm() / want.norm()) < 1e-2, cfg


@needs_tma
def test_graph_replay_gives_the_direct_kernels_bits():
    """Up to GRAPH_MAX_TOKENS the MLP replays its TMA kernels from a graph per token tile: call after
    call, with fresh inputs and token counts that share a tile, each row comes out bit for bit as the
    kernels launched directly give it, and an earlier result is not overwritten by a later call."""
    D, Fh = 320, 200
    wg = (torch.randn(Fh, D, device="cuda") / D ** 0.5).bfloat16()
    wu = (torch.randn(Fh, D, device="cuda") / D ** 0.5).bfloat16()
    wd = (torch.randn(D, Fh, device="cuda") / Fh ** 0.5).bfloat16()
    kept = []
    for T in [5, 16, 3, 17, 32, 1, 64, 40, 5]:
        x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
        got = kernels.swiglu_mlp(x, wg, wu, wd)
        want = kernels.down_tma(kernels.gate_up_swiglu_tma(x, wg, wu), wd)
        assert torch.equal(got, want), T
        kept.append((got, want.clone()))
    assert all(torch.equal(g, w) for g, w in kept)
    assert kernels.GRAPH_MAX_TOKENS <= min(kernels.TMA_MAX_TOKENS, kernels.TMA_DOWN_MAX_TOKENS)


def test_silu_mul_kernel_is_bitwise_torch_and_mlp_uses_the_kernels():
    """silu_mul gives torch's bits, on contiguous inputs and on the two halves of one product's output;
    the MLP on CUDA (kernels on), its gate and up weights stacked as the loader leaves them or not, agrees
    with fp32 within bf16 rounding on both sides of each switch between kernels, for 2-D and 3-D inputs."""
    from moe_mpi.model.layers import MLP
    g = 4 * torch.randn(300, 1000, device="cuda", dtype=torch.bfloat16)
    u = torch.randn(300, 1000, device="cuda", dtype=torch.bfloat16)
    assert torch.equal(kernels.silu_mul(g, u), torch.nn.functional.silu(g) * u)
    y = 4 * torch.randn(37, 2 * 1000, device="cuda", dtype=torch.bfloat16)
    assert torch.equal(kernels.silu_mul(y[:, :1000], y[:, 1000:]), torch.nn.functional.silu(y[:, :1000]) * y[:, 1000:])
    edges = {kernels.FUSED_MAX_TOKENS, kernels.TMA_DOWN_MAX_TOKENS, kernels.TMA_MAX_TOKENS}
    sizes = [(3, 256), (2, 500, 256), (0, 256)] + [(t, 256) for e in sorted(edges) for t in (e, e + 1)]
    for stack in (False, True):
        mlp = MLP(256, 512).to("cuda", torch.bfloat16).requires_grad_(False)
        if stack:
            before = {k: v.clone() for k, v in mlp.state_dict().items()}
            mlp.stack_gate_up_()
            assert kernels.stacked(mlp.gate_proj.weight, mlp.up_proj.weight) is not None
            assert all(torch.equal(before[k], v) for k, v in mlp.state_dict().items())
        w = {k: getattr(mlp, k).weight.float() for k in ("gate_proj", "up_proj", "down_proj")}
        for shape in sizes:
            x = torch.randn(*shape, device="cuda", dtype=torch.bfloat16)
            xf = x.float()
            want = (torch.nn.functional.silu(xf @ w["gate_proj"].t()) * (xf @ w["up_proj"].t())) @ w["down_proj"].t()
            got = mlp(x)
            assert got.shape == x.shape
            if x.numel():
                assert float((got.float() - want).norm() / want.norm()) < 1e-2, (stack, shape)


def test_loader_stacks_gate_and_up_on_cuda():
    """Built on CUDA, every MLP (experts, dense layers, shared experts) holds gate and up as the halves
    of one tensor, with the values a CPU build gives."""
    from moe_mpi.model.layers import MLP
    from moe_mpi.model.weights import build_expert, build_front
    cfg = ModelConfig.load("tiny")
    cpu = build_expert(cfg, 0, 1, dtype=torch.bfloat16)
    gpu = build_expert(cfg, 0, 1, dtype=torch.bfloat16, device="cuda")
    assert kernels.stacked(gpu.gate_proj.weight, gpu.up_proj.weight) is not None
    assert all(torch.equal(v.cpu(), cpu.state_dict()[k]) for k, v in gpu.state_dict().items())
    mlps = [m for m in build_front(cfg, dtype=torch.bfloat16, device="cuda").modules() if isinstance(m, MLP)]
    assert mlps and all(kernels.stacked(m.gate_proj.weight, m.up_proj.weight) is not None for m in mlps)


@pytest.mark.parametrize("width,rows", [(512, 300), (1536, 7), (7168, 64), (100, 1)])
def test_rms_norm_kernel_matches_transformers_formula(width, rows):
    """The RMSNorm kernel gives transformers' RMSNorm (fp32 statistics, rounded before the weight) for
    every element, on rows that are a strided split of a wider tensor as in MLA's latent: the same bits
    but for rare differences where the fp32 sum of squares rounds otherwise (one ulp in the normalised
    row, so at most two after the weight's product); and the module uses it on CUDA."""
    from moe_mpi.model.layers import RMSNorm
    wide = 3 * torch.randn(2, rows, width + 64, device="cuda", dtype=torch.bfloat16)
    x = wide[..., :width]                                   # rows strided by width + 64
    norm = RMSNorm(width, 1e-6).to("cuda", torch.bfloat16).requires_grad_(False)
    norm.weight.copy_(1 + 0.2 * torch.randn(width, device="cuda"))
    x32 = x.float()
    want = norm.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)
    got = front_kernels.rms_norm(x, norm.weight, 1e-6)
    assert got.shape == x.shape and torch.isfinite(got).all()
    steps = (got.view(torch.int16).int() - want.view(torch.int16).int()).abs()
    assert int(steps.max()) <= 2
    assert float((got == want).float().mean()) > 0.99
    with torch.inference_mode():
        assert torch.equal(norm(x), got)


@pytest.mark.parametrize("vocab", [5, 4095, 4097, 129280])
def test_token_logprobs_kernel_matches_fp32_log_softmax(vocab):
    """The fused log-softmax-and-gather kernel gives log_softmax(logits.float())[target] for every row
    (fp64 of the same bf16 logits as the reference), at vocabularies below, around and at the paper's
    size, with targets at both ends of the vocabulary and rows of very different scales."""
    n = 37
    scale = torch.logspace(-2, 1.5, n, device="cuda")[:, None]
    logits = (scale * torch.randn(n, vocab, device="cuda")).bfloat16()
    targets = torch.randint(0, vocab, (n,), device="cuda")
    targets[0], targets[1] = 0, vocab - 1
    targets[2] = logits[2].float().argmax()
    exact = torch.log_softmax(logits.double(), dim=-1).gather(1, targets[:, None])[:, 0]
    got = front_kernels.token_logprobs(logits, targets)
    torch_fp32 = torch.log_softmax(logits.float(), dim=-1).gather(1, targets[:, None])[:, 0]
    assert got.dtype == torch.float32 and got.shape == (n,)
    assert torch.allclose(torch_fp32.double(), exact, rtol=1e-6, atol=2e-5)    # the bound holds for torch
    assert torch.allclose(got.double(), exact, rtol=1e-6, atol=2e-5)


@pytest.mark.parametrize("top_k,with_shared", [(2, True), (2, False), (8, True)])
def test_combine_residual_kernel_matches_combine_then_add(top_k, with_shared):
    """The fused combine gives what routing.combine, the shared experts' add and the residual add give,
    for every element: the same bits at top-2 (two products sum alike in any order); at top-8, where
    torch sums the eight in another order, within three bf16 ulps of the operands' size: a different
    fp32 sum can round the combine to the neighbouring bf16 value, and each of the two adds after it
    can then round the other way too (an ulp of a sum can be many of a result that cancels); rows of
    padding (not routed) keep their bits."""
    from moe_mpi.model.routing import combine, plan_dispatch
    R, T, D, E = 300, 257, 7168, 16
    x = torch.randn(R, D, device="cuda", dtype=torch.bfloat16)
    rows = torch.randperm(R, device="cuda")[:T].sort().values
    ids = torch.argsort(torch.rand(T, E, device="cuda"), dim=1)[:, :top_k]
    w = torch.rand(T, top_k, device="cuda")
    plan = plan_dispatch(ids, E)
    y = torch.randn(T * top_k, D, device="cuda", dtype=torch.bfloat16)
    shared = torch.randn(T, D, device="cuda", dtype=torch.bfloat16) if with_shared else None
    moe = combine(y, plan, w).to(torch.bfloat16)
    if shared is not None:
        moe = moe + shared
    want = x.clone()
    want.index_copy_(0, rows, want.index_select(0, rows) + moe)
    got = front_kernels.combine_residual_(x.clone(), rows, y, plan.order_N, w, shared)
    pad = torch.ones(R, dtype=torch.bool, device="cuda")
    pad[rows] = False
    assert torch.equal(got[pad], x[pad])
    if top_k == 2:
        assert torch.equal(got, want)
    else:
        size = x.float().abs()
        size[rows] += combine(y.abs(), plan, w) + (0 if shared is None else shared.float().abs())
        assert bool(((got.float() - want.float()).abs() <= 3 * 2 ** -7 * size).all())


@pytest.mark.parametrize("interleave", [True, False])
def test_rope_cat_kernel_is_bitwise_apply_rope_and_cat(interleave, monkeypatch):
    """MLA's q and k built by the kernel have torch's bits (apply_rope's bf16 roundings, then cat),
    at the paper's head sizes with odd sequence and head counts, for queries (one rotary part per head)
    and keys (one shared by every head, repeated with stride 0); and MLA with the kernels agrees with
    MLA without them within bf16 rounding (its latent norms run the RMSNorm kernel)."""
    from moe_mpi.model.layers import MLA, apply_rope
    B, S, H, n, r = 2, 37, 5, 128, 64
    cos, sin = 2 * torch.rand(S, r // 2, device="cuda") - 1, 2 * torch.rand(S, r // 2, device="cuda") - 1
    q = torch.randn(B, S, H, n + r, device="cuda", dtype=torch.bfloat16)
    qt = q.transpose(1, 2)
    want = torch.cat([qt[..., :n], apply_rope(qt[..., n:], cos, sin, interleave)], dim=-1)
    assert torch.equal(front_kernels.rope_cat(q[..., :n], q[..., n:], cos, sin, interleave), want)
    kv = torch.randn(B, S, H, n + 128, device="cuda", dtype=torch.bfloat16)
    k_rot = torch.randn(B, S, r, device="cuda", dtype=torch.bfloat16)
    want = torch.cat([kv.transpose(1, 2)[..., :n],
                      apply_rope(k_rot[:, None], cos, sin, interleave).expand(B, H, S, r)], dim=-1)
    got = front_kernels.rope_cat(kv[..., :n], k_rot[:, :, None, :].expand(B, S, H, r), cos, sin, interleave)
    assert torch.equal(got, want)

    cfg = ModelConfig.load("tiny")
    mla = MLA(cfg).to("cuda", torch.bfloat16).requires_grad_(False)
    for p in mla.parameters():
        p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    x = torch.randn(2, 24, cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
    c, s = (2 * torch.rand(24, cfg.qk_rope_head_dim // 2, device="cuda") - 1 for _ in range(2))
    with torch.inference_mode():
        fused = mla(x, c, s)
        monkeypatch.setenv("MOE_MPI_TRITON", "0")
        plain = mla(x, c, s)
    assert float((fused.float() - plain.float()).norm() / plain.float().norm()) < 1e-2
