"""A front's per-row work in one pass each, for CUDA with Triton: what torch splits into many passes over
memory (``benchmarks/results/gpu_front_kernels_*.md`` times each against the torch code it replaces).

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

Every product and sum that torch rounds is an explicitly rounded ``mul_rn`` / ``add_rn`` / ``sub_rn``:
written with plain ``*``, ``+`` and ``-`` (even with each product cast to bf16 and back), a quarter of
the outputs of ``round(a * c) - round(b * s)`` differed from torch's by an ulp on an H200, and a few
of the combine's ``acc += y * w`` (an FMA candidate).  ``kernels.enabled(x)`` says whether these run
for ``x``, as for the MLP kernels; ``layers`` and ``routing`` hold the torch code each replaces.
"""
from __future__ import annotations

import torch

from .kernels import triton

if triton is not None:
    import triton.language as tl
    from triton.language.extra import libdevice

    @triton.jit
    def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, D, stride_x, stride_y, eps, BLOCK_D: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK_D)
        ok = offs < D
        x = tl.load(x_ptr + row * stride_x + offs, mask=ok, other=0.0).to(tl.float32)
        inv = tl.rsqrt(tl.sum(x * x, axis=0) * (1.0 / D) + eps)    # torch's mean: sum x 1/D
        # rounded to the activation type before the weight, as transformers does; the product is
        # rounded once more, as torch's bf16 x bf16 is (mul_rn: see the module's docstring)
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
        # sum over the slots in slot order, each answer times its weight, in fp32 (as combine()),
        # every operation explicitly rounded (see the module's docstring)
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
    if x_RD.stride(1) != 1:
        raise ValueError("combine_residual_: x is updated in place, so its rows must be contiguous")
    if y_ND.stride(1) != 1:
        y_ND = y_ND.contiguous()
    if shared_TD is not None and shared_TD.stride(1) != 1:
        shared_TD = shared_TD.contiguous()
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
