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

Two more serve a front, whose per-row work torch splits into many passes over memory:

* ``rms_norm``: transformers' RMSNorm (statistics in fp32, normalised row rounded to the activation
  type, then times the weight) in one pass, where torch makes eight (cast, square, mean, add, rsqrt,
  product, cast back, weight).  The same bits but where the fp32 sum of squares, added up in another
  order, rounds differently.
* ``token_logprobs``: log p of one token per row from a row of bf16 logits, log-softmax in fp32
  (online max and sum over the vocabulary) and the gather in one pass.  torch's path writes the
  logits again in fp32 and reads them twice: at the paper's vocabulary (129,280) 1.6 GB per 1024 rows.
* ``combine_residual_``: the experts' answers weighted and summed per token (fp32), the shared
  experts' output and the residual added, in place, in one pass, with combine()'s roundings; torch
  takes a dozen kernels and an fp32 copy of every answer.
* ``rope_cat``: MLA's queries and keys, the rotary part rotated and joined to the rest, in the
  (B, H, S, d) layout attention takes, in one pass with torch's roundings (torch: nine kernels and two
  concatenations per tensor).
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

    @triton.jit
    def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, D, stride_x, stride_y, eps, BLOCK_D: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK_D)
        ok = offs < D
        x = tl.load(x_ptr + row * stride_x + offs, mask=ok, other=0.0).to(tl.float32)
        inv = tl.rsqrt(tl.sum(x * x, axis=0) * (1.0 / D) + eps)    # torch's mean: sum x 1/D
        # rounded to the activation type before the weight, as transformers does; the product is
        # rounded once more, as torch's bf16 x bf16 is (mul_rn: see _combine_residual_kernel)
        n = libdevice.mul_rn(x, inv).to(y_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * stride_y + offs, libdevice.mul_rn(w, n).to(y_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _token_logprobs_kernel(logits_ptr, target_ptr, out_ptr, V, stride, BLOCK_V: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * stride
        offs = tl.arange(0, BLOCK_V)
        # a running max and sum per lane, rescaled as the max grows; lanes are merged at the end
        m = tl.full([BLOCK_V], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK_V], tl.float32)
        for start in range(0, V, BLOCK_V):
            ok = start + offs < V
            x = tl.load(base + start + offs, mask=ok, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, x)
            live = m_new > float("-inf")        # a lane that has seen only padding keeps s = 0
            s = tl.where(live, s * tl.exp(m - m_new) + tl.exp(x - m_new), 0.0)
            m = m_new
        top = tl.max(m, axis=0)
        total = tl.sum(tl.where(m > float("-inf"), s * tl.exp(m - top), 0.0), axis=0)
        target = tl.load(target_ptr + row)
        picked = tl.load(base + target).to(tl.float32)
        tl.store(out_ptr + row, picked - top - tl.log(total))

    @triton.jit
    def _combine_residual_kernel(x_ptr, rows_ptr, y_ptr, src_ptr, w_ptr, shared_ptr, D, stride_x, stride_y,
                                 stride_s, K: tl.constexpr, HAS_SHARED: tl.constexpr, BLOCK_D: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        ok = offs < D
        # sum over the slots in slot order, each answer times its weight, in fp32 (as combine()).
        # Every product and sum is an explicitly rounded mul_rn / add_rn: plain * and + are fused
        # into FMAs and, around a round trip through bf16, lose torch's roundings (a quarter of the
        # outputs of a * b - c * d differed from torch's on an H200)
        acc = tl.zeros([BLOCK_D], tl.float32)
        for k in tl.static_range(K):
            src = tl.load(src_ptr + t * K + k)
            w = tl.load(w_ptr + t * K + k).to(tl.float32)
            y = tl.load(y_ptr + src * stride_y + offs, mask=ok, other=0.0).to(tl.float32)
            acc = libdevice.add_rn(acc, libdevice.mul_rn(y, w))
        ty = x_ptr.dtype.element_ty
        moe = acc.to(ty).to(tl.float32)
        if HAS_SHARED:
            shared = tl.load(shared_ptr + t * stride_s + offs, mask=ok, other=0.0).to(tl.float32)
            moe = libdevice.add_rn(moe, shared).to(ty).to(tl.float32)
        row = tl.load(rows_ptr + t)
        x = tl.load(x_ptr + row * stride_x + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(x_ptr + row * stride_x + offs, libdevice.add_rn(x, moe).to(ty), mask=ok)
    @triton.jit
    def _rope_cat_kernel(nope_ptr, rot_ptr, cos_ptr, sin_ptr, out_ptr, S, H,
                         n_sb, n_ss, n_sh, r_sb, r_ss, r_sh,
                         NOPE: tl.constexpr, HALF: tl.constexpr, INTERLEAVE: tl.constexpr,
                         BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
        bs = tl.program_id(0).to(tl.int64)
        b, s = bs // S, bs % S
        hs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        h_ok = hs < H
        width = NOPE + 2 * HALF
        out_row = out_ptr + ((b * H + hs[:, None].to(tl.int64)) * S + s) * width      # (B, H, S, width)
        jn = tl.arange(0, BLOCK_N)
        n_ok = h_ok[:, None] & (jn[None, :] < NOPE)
        part = tl.load(nope_ptr + b * n_sb + s * n_ss + hs[:, None] * n_sh + jn[None, :], mask=n_ok)
        tl.store(out_row + jn[None, :], part, mask=n_ok)
        r = tl.arange(0, BLOCK_R)
        r_ok = h_ok[:, None] & (r[None, :] < HALF)
        if INTERLEAVE:
            i1, i2 = 2 * r, 2 * r + 1
        else:
            i1, i2 = r, r + HALF
        rot = rot_ptr + b * r_sb + s * r_ss + hs[:, None] * r_sh
        x1 = tl.load(rot + i1[None, :], mask=r_ok, other=0.0).to(tl.float32)
        x2 = tl.load(rot + i2[None, :], mask=r_ok, other=0.0).to(tl.float32)
        ty = out_ptr.dtype.element_ty
        # the tables rounded to the activations' type, every product and sum rounded as torch's are
        # (explicitly rounded operations, as in _combine_residual_kernel)
        c = tl.load(cos_ptr + s * HALF + r, mask=r < HALF, other=0.0).to(ty).to(tl.float32)[None, :]
        sn = tl.load(sin_ptr + s * HALF + r, mask=r < HALF, other=0.0).to(ty).to(tl.float32)[None, :]
        lo = libdevice.sub_rn(libdevice.mul_rn(x1, c).to(ty).to(tl.float32),
                              libdevice.mul_rn(x2, sn).to(ty).to(tl.float32))
        hi = libdevice.add_rn(libdevice.mul_rn(x2, c).to(ty).to(tl.float32),
                              libdevice.mul_rn(x1, sn).to(ty).to(tl.float32))
        tl.store(out_row + NOPE + r[None, :], lo.to(ty), mask=r_ok)
        tl.store(out_row + NOPE + HALF + r[None, :], hi.to(ty), mask=r_ok)

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMSNorm of the last dimension of CUDA ``x`` in one Triton kernel (rows may be
    strided, e.g. a split of a wider projection)."""
    D = x.shape[-1]
    if weight.shape != (D,) or weight.dtype != x.dtype:
        raise ValueError(f"rms_norm: weight {tuple(weight.shape)} {weight.dtype} for input "
                         f"{tuple(x.shape)} {x.dtype}")
    x2 = x.reshape(-1, D)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty(x2.shape, device=x.device, dtype=x.dtype)
    if x2.shape[0]:
        block = triton.next_power_of_2(D)
        _rms_norm_kernel[(x2.shape[0],)](x2, weight.contiguous(), y, D, x2.stride(0), y.stride(0), eps,
                                         BLOCK_D=block, num_warps=max(1, min(16, block // 512)))
    return y.view(x.shape)


def token_logprobs(logits_NV: torch.Tensor, targets_N: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits.float())[n, targets[n]] for each row n, as (N,) fp32, in one Triton kernel
    over CUDA bf16/fp16 ``logits_NV``."""
    N, V = logits_NV.shape
    if targets_N.shape != (N,):
        raise ValueError(f"token_logprobs: {tuple(targets_N.shape)} targets for {N} rows")
    if logits_NV.stride(-1) != 1:
        logits_NV = logits_NV.contiguous()
    out = torch.empty(N, device=logits_NV.device, dtype=torch.float32)
    if N:
        _token_logprobs_kernel[(N,)](logits_NV, targets_N.contiguous(), out, V, logits_NV.stride(0),
                                     BLOCK_V=4096, num_warps=8)
    return out


def combine_residual_(x_RD: torch.Tensor, rows_T: torch.Tensor, y_ND: torch.Tensor, order_N: torch.Tensor,
                      weights_TK: torch.Tensor, shared_TD: torch.Tensor | None = None) -> torch.Tensor:
    """In place, for each routed token t: x[rows[t]] += bf16(bf16(sum_k w[t, k] y[slot (t, k)]) + shared[t]),
    the experts' answers ``y_ND`` in dispatch order (``order_N[i]``: the flat slot t*K + k of row i).
    The same roundings as ``routing.combine`` followed by the residual add, in one pass; the slot sum
    runs in slot order, so the bits are combine()'s wherever torch sums the K products in that order
    (always for K = 2)."""
    T, K = weights_TK.shape
    D = x_RD.shape[1]
    if y_ND.shape != (T * K, D) or rows_T.shape != (T,) or order_N.shape != (T * K,):
        raise ValueError(f"combine_residual_: x {tuple(x_RD.shape)}, rows {tuple(rows_T.shape)}, answers "
                         f"{tuple(y_ND.shape)}, order {tuple(order_N.shape)}, weights {tuple(weights_TK.shape)}")
    if x_RD.stride(1) != 1 or y_ND.stride(1) != 1 or (shared_TD is not None and shared_TD.stride(1) != 1):
        raise ValueError("combine_residual_: rows must be contiguous")
    if not T:
        return x_RD
    src_N = torch.empty_like(order_N)           # the answer row of each (token, slot)
    src_N[order_N] = torch.arange(T * K, device=order_N.device)
    block = min(1024, triton.next_power_of_2(D))
    shared = shared_TD if shared_TD is not None else y_ND
    _combine_residual_kernel[(T, triton.cdiv(D, block))](
        x_RD, rows_T, y_ND, src_N, weights_TK.contiguous(), shared, D, x_RD.stride(0), y_ND.stride(0),
        shared.stride(0), K=K, HAS_SHARED=shared_TD is not None, BLOCK_D=block, num_warps=4)
    return x_RD


def rope_cat(nope_BSHn: torch.Tensor, rot_BSHr: torch.Tensor, cos_SR: torch.Tensor, sin_SR: torch.Tensor,
             interleave: bool) -> torch.Tensor:
    """cat([nope, apply_rope(rot)]) per head, laid out (B, H, S, n + r) for attention, in one pass:
    what MLA builds its queries and keys with (``rot`` may repeat one row over the heads, stride 0).
    The same bits as ``layers.apply_rope`` and ``torch.cat``."""
    B, S, H, n = nope_BSHn.shape
    r = rot_BSHr.shape[-1]
    if rot_BSHr.shape[:3] != (B, S, H) or cos_SR.shape != (S, r // 2) or sin_SR.shape != cos_SR.shape:
        raise ValueError(f"rope_cat: nope {tuple(nope_BSHn.shape)}, rot {tuple(rot_BSHr.shape)}, "
                         f"tables {tuple(cos_SR.shape)}")
    if nope_BSHn.stride(-1) != 1 or rot_BSHr.stride(-1) != 1:
        raise ValueError("rope_cat: the last dimension must be contiguous")
    out = torch.empty(B, H, S, n + r, device=nope_BSHn.device, dtype=nope_BSHn.dtype)
    block_h = min(16, triton.next_power_of_2(H))
    _rope_cat_kernel[(B * S, triton.cdiv(H, block_h))](
        nope_BSHn, rot_BSHr, cos_SR.contiguous(), sin_SR.contiguous(), out, S, H,
        nope_BSHn.stride(0), nope_BSHn.stride(1), nope_BSHn.stride(2),
        rot_BSHr.stride(0), rot_BSHr.stride(1), rot_BSHr.stride(2),
        NOPE=n, HALF=r // 2, INTERLEAVE=interleave, BLOCK_H=block_h,
        BLOCK_N=triton.next_power_of_2(n), BLOCK_R=triton.next_power_of_2(max(r // 2, 1)), num_warps=4)
    return out


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
