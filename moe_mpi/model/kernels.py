"""SwiGLU MLP kernels for CUDA: Triton where it is importable, cuBLAS and plain torch otherwise.

An expert at paper width (7168 x 18432) streams 793 MB of weights for every batch of tokens it gets.
For a few tokens that read is the whole cost, and cuBLAS covers it poorly: its gate and up products
take 96 tiles of 192 columns each, which leaves a third of an H200's 132 multiprocessors idle
(``benchmarks/results/gpu_expert_mlp_*.md``).  So:

* up to ``FUSED_MAX_TOKENS`` tokens, ``gate_up_swiglu``: silu(x w_gate^T) * (x w_up^T) in one Triton
  kernel, one pass over both weights.  Each program owns a tile of output columns and of tokens, token
  tiles varying fastest so the programs that read one weight tile run together and share it in L2;
  hundreds of programs and no split of the reduction.  The SwiGLU runs on the fp32 accumulators and
  only the result is rounded (torch rounds both products first: results differ by bf16 rounding).
* above, cuBLAS's products, gate and up on two streams at once (``gate_and_up``: either alone leaves
  SMs idle), joined by ``silu_mul``: silu(g) * u in one kernel, the same bits as torch's two (five
  passes over T x F become three).
* the down product is cuBLAS's at every size: a Triton version (split over the reduction or not) was
  no faster at any size of the benchmark's sweeps.

Each token count takes a fixed tile configuration (``CONFIGS``), from the benchmark's sweeps on H100 and
H200: no autotuning in the runtime, so every run launches the same kernels.
``swiglu_mlp(x, gate, up, down)`` picks; ``enabled(x)`` says whether the kernels run for ``x``;
``MOE_MPI_TRITON=0`` turns them off.

The front's kernels (RMSNorm, rotary, combine, log-probabilities) are in ``front_kernels``.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

try:  # Triton ships with CUDA builds of torch; CPU-only installs go without it
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - depends on the install
    triton = None

FUSED_MAX_TOKENS = 16       # up to here the fused Triton gate/up beats cuBLAS (measured on H100 and H200)
SKINNY_MAX_TOKENS = 4096    # what the fused kernel accepts at all
SHARED_MEMORY_BYTES = 200 * 1024    # tiles a configuration may stage (Hopper: 227 KB a block)

_side_streams: dict[int, torch.cuda.Stream] = {}


def enabled(x: torch.Tensor) -> bool:
    """Whether the Triton kernels take ``x``: CUDA, bf16 or fp16, Triton importable, not turned off."""
    return (triton is not None and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
            and os.environ.get("MOE_MPI_TRITON", "1") != "0")


def swiglu_mlp(x_TD: torch.Tensor, w_gate_FD: torch.Tensor, w_up_FD: torch.Tensor,
               w_down_DF: torch.Tensor) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)) for (T, D) ``x`` on CUDA."""
    if x_TD.shape[0] <= FUSED_MAX_TOKENS:
        h_TF = gate_up_swiglu(x_TD, w_gate_FD, w_up_FD)
    else:
        h_TF = silu_mul(*gate_and_up(x_TD, w_gate_FD, w_up_FD))
    return F.linear(h_TF, w_down_DF)


def gate_and_up(x_TD: torch.Tensor, w_gate_FD: torch.Tensor, w_up_FD: torch.Tensor):
    """x w_gate^T and x w_up^T through cuBLAS, the gate product on a side stream while the up product
    runs on the current one."""
    main = torch.cuda.current_stream(x_TD.device)
    side = _side_streams.get(x_TD.device.index)
    if side is None:
        side = _side_streams[x_TD.device.index] = torch.cuda.Stream(x_TD.device)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        g = F.linear(x_TD, w_gate_FD)
    u = F.linear(x_TD, w_up_FD)
    main.wait_stream(side)
    g.record_stream(main)           # made on the side stream, used and freed on the current one
    return g, u


if triton is not None:
    def _config(bt: int, bf: int, bd: int, w: int, s: int):
        return triton.Config({"BLOCK_T": bt, "BLOCK_F": bf, "BLOCK_D": bd}, num_warps=w, num_stages=s)

    # What the benchmark sweeps (benchmarks/gpu_expert_mlp.py), and what the runtime launches: by the
    # largest token count each serves, the sweep's fastest there on an H200, and within 1% of the
    # fastest on an H100 except at 32 tokens (5%; the runtime uses cuBLAS there).
    SWEEP_CONFIGS = ([_config(bt, bf, 64, w, 3) for bt in (16, 32, 64, 128) for bf in (32, 64, 128) for w in (4, 8)]
                     + [_config(16, bf, 128, 4, s) for bf in (32, 64) for s in (3, 4)])
    CONFIGS = [(16, _config(16, 32, 128, 4, 3)), (32, _config(32, 64, 64, 4, 3)),
               (SKINNY_MAX_TOKENS, _config(64, 64, 64, 4, 3))]

    def _staged_bytes(cfg) -> int:
        """Shared memory a configuration's pipeline holds: x, gate and up tiles per stage."""
        k = cfg.kwargs
        return cfg.num_stages * (k["BLOCK_T"] + 2 * k["BLOCK_F"]) * k["BLOCK_D"] * 2

    def fitting(configs, tokens: int):
        """The configurations whose tiles fit in shared memory and whose token tile is no larger than
        ``tokens`` (rounded up to 16, the smallest product tile) need."""
        need = max(16, triton.next_power_of_2(max(tokens, 1)))
        return [c for c in configs if _staged_bytes(c) <= SHARED_MEMORY_BYTES and c.kwargs["BLOCK_T"] <= need]

    @triton.jit
    def _gate_up_swiglu_kernel(x_ptr, wg_ptr, wu_ptr, h_ptr, T, F, D, stride_x, stride_w, stride_h,
                               BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr):
        # Token tiles vary fastest, so the programs that read one weight tile run together and all but
        # the first find it in L2: the weights cross device memory about once whatever the token count.
        n_t = tl.cdiv(T, BLOCK_T)
        pid = tl.program_id(0)
        offs_t = (pid % n_t) * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_f = (pid // n_t) * BLOCK_F + tl.arange(0, BLOCK_F)
        offs_d = tl.arange(0, BLOCK_D)
        t_ok = offs_t < T
        f_ok = offs_f < F
        x_ptrs = x_ptr + offs_t[:, None] * stride_x + offs_d[None, :]
        wg_ptrs = wg_ptr + offs_f[:, None] * stride_w + offs_d[None, :]
        wu_ptrs = wu_ptr + offs_f[:, None] * stride_w + offs_d[None, :]
        acc_g = tl.zeros((BLOCK_T, BLOCK_F), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_T, BLOCK_F), dtype=tl.float32)
        for k in range(0, D, BLOCK_D):
            d_ok = (k + offs_d) < D
            x = tl.load(x_ptrs, mask=t_ok[:, None] & d_ok[None, :], other=0.0)
            wg = tl.load(wg_ptrs, mask=f_ok[:, None] & d_ok[None, :], other=0.0)
            wu = tl.load(wu_ptrs, mask=f_ok[:, None] & d_ok[None, :], other=0.0)
            acc_g = tl.dot(x, tl.trans(wg), acc_g)
            acc_u = tl.dot(x, tl.trans(wu), acc_u)
            x_ptrs += BLOCK_D
            wg_ptrs += BLOCK_D
            wu_ptrs += BLOCK_D
        h = acc_g * tl.sigmoid(acc_g) * acc_u
        h_ptrs = h_ptr + offs_t[:, None] * stride_h + offs_f[None, :]
        tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=t_ok[:, None] & f_ok[None, :])

    @triton.jit
    def _silu_mul_kernel(g_ptr, u_ptr, h_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < n
        g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        # torch's formula with an exact exp and division, rounded to the storage type before the
        # product as torch's two kernels do: the same bits as F.silu(g) * u
        s = tl.math.div_rn(g, 1.0 + libdevice.exp(-g)).to(h_ptr.dtype.element_ty).to(tl.float32)
        tl.store(h_ptr + offs, (s * u).to(h_ptr.dtype.element_ty), mask=ok)


def gate_up_swiglu(x_TD: torch.Tensor, w_gate_FD: torch.Tensor, w_up_FD: torch.Tensor,
                   out: torch.Tensor | None = None, config=None) -> torch.Tensor:
    """silu(x w_gate^T) * (x w_up^T), (T, F), in one Triton kernel, for up to ``SKINNY_MAX_TOKENS``
    tokens.  ``config`` (a ``triton.Config``) overrides the one ``CONFIGS`` gives for T tokens."""
    T, D = x_TD.shape
    Fh = w_gate_FD.shape[0]
    if T > SKINNY_MAX_TOKENS:
        raise ValueError(f"gate_up_swiglu: {T} tokens, at most {SKINNY_MAX_TOKENS}")
    if w_gate_FD.shape != (Fh, D) or w_up_FD.shape != (Fh, D):
        raise ValueError(f"gate_up_swiglu: weights {tuple(w_gate_FD.shape)} and {tuple(w_up_FD.shape)} "
                         f"for input {tuple(x_TD.shape)}")
    x_TD, w_gate_FD, w_up_FD = x_TD.contiguous(), w_gate_FD.contiguous(), w_up_FD.contiguous()
    h = out if out is not None else torch.empty(T, Fh, device=x_TD.device, dtype=x_TD.dtype)
    cfg = config or next(c for limit, c in CONFIGS if T <= limit)
    k = cfg.kwargs
    grid = (triton.cdiv(Fh, k["BLOCK_F"]) * triton.cdiv(T, k["BLOCK_T"]),)
    _gate_up_swiglu_kernel[grid](x_TD, w_gate_FD, w_up_FD, h, T, Fh, D, x_TD.stride(0), w_gate_FD.stride(0),
                                 h.stride(0), num_warps=cfg.num_warps, num_stages=cfg.num_stages, **k)
    return h


def silu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """silu(g) * u in one Triton kernel; the same bits as ``F.silu(g) * u``."""
    if g.shape != u.shape:
        raise ValueError(f"silu_mul: shapes {tuple(g.shape)} and {tuple(u.shape)}")
    g, u = g.contiguous(), u.contiguous()
    h = torch.empty_like(g)
    n = g.numel()
    block = 2048
    _silu_mul_kernel[(triton.cdiv(n, block),)](g, u, h, n, BLOCK=block, num_warps=8)
    return h
