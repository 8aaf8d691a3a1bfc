"""SwiGLU MLP kernels for CUDA: Triton where it is importable, cuBLAS and plain torch otherwise.

An expert at paper width (7168 x 18432) streams 793 MB of weights for every batch of tokens it gets.
For a few tokens that read is the whole cost; near the ridge point (about 160 tokens on an H200) the
products must also keep the tensor cores busy while the weights stream.  What runs, by token count T
(``swiglu_mlp``; the boundaries come from ``benchmarks/gpu_expert_mlp.py``'s sweeps, results in
``benchmarks/results/gpu_expert_mlp_*.md``):

* Hopper, T <= ``TMA_MAX_TOKENS``: ``gate_up_swiglu_tma``, silu(x w_gate^T) * (x w_up^T) in one Triton
  kernel whose tiles arrive by the tensor memory accelerator (TMA) and whose products are swapped,
  (weights x tokens): a few tokens are the narrow side of the tensor cores' product, so they do not pad
  its 64-row side.  The SwiGLU runs on the fp32 accumulators and only the result is rounded (torch
  rounds both products first: results differ by bf16 rounding).  Up to ``TMA_DOWN_MAX_TOKENS`` the down
  product is the same kind of kernel (``down_tma``).  Up to ``GRAPH_MAX_TOKENS`` the two replay from a
  CUDA graph per token tile (``MOE_MPI_EXPERT_GRAPHS=0`` launches them directly).
* before Hopper, T <= ``FUSED_MAX_TOKENS``: ``gate_up_swiglu``, the same SwiGLU through pointer loads.
* above: cuBLAS.  Where the gate and up weights are the two halves of one (2F, D) tensor
  (``MLP.stack_gate_up_``, which the weight loader does on CUDA), one product over both (one launch
  with twice the columns fills the card better than two); otherwise the two products on two streams
  (``gate_and_up``).  Then ``silu_mul``: silu(g) * u in one kernel, the same bits as torch's two.
* the down product above ``TMA_DOWN_MAX_TOKENS`` is cuBLAS's.

Each token count takes a fixed tile configuration: no autotuning in the runtime, so every run launches
the same kernels.  ``enabled(x)`` says whether the kernels run for ``x``; ``MOE_MPI_TRITON=0`` turns
them off.  The front's kernels (RMSNorm, rotary, combine, log-probabilities) are in ``front_kernels``.
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
try:  # host-side TMA descriptors (Triton 3.3 and later)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - depends on the install
    TensorDescriptor = None

TMA_MAX_TOKENS = 64         # Hopper: the TMA gate/up kernel up to here, cuBLAS above
TMA_DOWN_MAX_TOKENS = 64    # Hopper: the TMA down kernel up to here, cuBLAS above
GRAPH_MAX_TOKENS = 64       # Hopper: up to here both TMA kernels replay from a CUDA graph (_replayed)
FUSED_MAX_TOKENS = 16       # before Hopper: the pointer-load gate/up kernel up to here (H100 and H200 sweeps)
SKINNY_MAX_TOKENS = 4096    # what the pointer-load kernel accepts at all
SHARED_MEMORY_BYTES = 200 * 1024    # tiles a configuration may stage (Hopper: 227 KB a block)

_side_streams: dict[int, torch.cuda.Stream] = {}


def enabled(x: torch.Tensor) -> bool:
    """Whether the Triton kernels take ``x``: CUDA, bf16 or fp16, Triton importable, not turned off."""
    return (triton is not None and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
            and os.environ.get("MOE_MPI_TRITON", "1") != "0")


def swiglu_mlp(x_TD: torch.Tensor, w_gate_FD: torch.Tensor, w_up_FD: torch.Tensor,
               w_down_DF: torch.Tensor) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)) for (T, D) ``x`` on CUDA."""
    T = x_TD.shape[0]
    if T == 0:
        return x_TD.new_empty(0, w_down_DF.shape[0])
    x_TD = x_TD.contiguous()
    tma = tma_ok(x_TD, w_gate_FD, w_up_FD, w_down_DF)
    if (tma and T <= GRAPH_MAX_TOKENS and os.environ.get("MOE_MPI_EXPERT_GRAPHS", "1") != "0"
            and not torch.cuda.is_current_stream_capturing()):
        return _replayed(x_TD, w_gate_FD, w_up_FD, w_down_DF)
    if tma and T <= TMA_MAX_TOKENS:
        h_TF = gate_up_swiglu_tma(x_TD, w_gate_FD, w_up_FD)
    elif not tma and T <= FUSED_MAX_TOKENS:
        h_TF = gate_up_swiglu(x_TD, w_gate_FD, w_up_FD)
    else:
        both = stacked(w_gate_FD, w_up_FD)
        if both is not None:
            y_T2F = F.linear(x_TD, both)
            h_TF = silu_mul(y_T2F[:, :w_gate_FD.shape[0]], y_T2F[:, w_gate_FD.shape[0]:])
        else:
            h_TF = silu_mul(*gate_and_up(x_TD, w_gate_FD, w_up_FD))
    if tma and T <= TMA_DOWN_MAX_TOKENS:
        return down_tma(h_TF, w_down_DF)
    return F.linear(h_TF, w_down_DF)


_graphs: dict[tuple, tuple] = {}    # (weights, token tile, dtype, stream) -> (input buffer, output buffer, graph)


def _replayed(x_TD: torch.Tensor, w_gate_FD: torch.Tensor, w_up_FD: torch.Tensor,
              w_down_DF: torch.Tensor) -> torch.Tensor:
    """The TMA kernels for a few tokens, replayed from a CUDA graph captured once per token tile (and
    weights and stream): the tokens are copied into the graph's input rows, the rows past them keep
    whatever they held (each output row depends on its own input row only), and the result is copied
    out.  Three cheap launches instead of two Triton launches, whose host cost (47 and 63 us, measured on
    a lent H200 machine) can exceed the kernels' 0.2 ms at paper width.  The rows come out bit for bit as
    the kernels launched directly give them.  A capture synchronises the device (``torch.cuda.graph``
    does), so an expert captures its three tiles in its warm-up (``job.warm_up_expert``), before any
    exchange; a tile first met inside a run (a front's dense MLP on a short micro-batch, say) costs one
    such wait there.  After 64 captures in a process the rest launch directly: a graph is never
    destroyed while a replay of it may be queued."""
    T, D = x_TD.shape
    tile = _token_tile(T)
    stream = torch.cuda.current_stream(x_TD.device)
    key = (w_gate_FD.data_ptr(), w_up_FD.data_ptr(), w_down_DF.data_ptr(), w_gate_FD.shape, w_down_DF.shape,
           x_TD.dtype, tile, stream.cuda_stream)
    entry = _graphs.get(key)
    if entry is None:
        if len(_graphs) >= 64:
            return down_tma(gate_up_swiglu_tma(x_TD, w_gate_FD, w_up_FD), w_down_DF)
        x_buf = torch.zeros(tile, D, device=x_TD.device, dtype=x_TD.dtype)
        side = torch.cuda.Stream(x_TD.device)
        side.wait_stream(stream)
        with torch.cuda.stream(side):       # compile (and warm) outside the capture
            down_tma(gate_up_swiglu_tma(x_buf, w_gate_FD, w_up_FD), w_down_DF)
        stream.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            y_buf = down_tma(gate_up_swiglu_tma(x_buf, w_gate_FD, w_up_FD), w_down_DF)
        entry = _graphs[key] = (x_buf, y_buf, graph)
    x_buf, y_buf, graph = entry
    x_buf[:T].copy_(x_TD)
    graph.replay()
    return y_buf[:T].clone()


def stacked(w_gate_FD: torch.Tensor, w_up_FD: torch.Tensor) -> torch.Tensor | None:
    """The (2F, D) tensor whose halves the gate and up weights are, when they are (``MLP.stack_gate_up_``);
    None otherwise."""
    g, u = w_gate_FD, w_up_FD
    if (g.shape != u.shape or g.dtype != u.dtype or not g.is_contiguous() or not u.is_contiguous()
            or g.untyped_storage().data_ptr() != u.untyped_storage().data_ptr()
            or u.data_ptr() != g.data_ptr() + g.numel() * g.element_size()):
        return None
    Fh, D = w_gate_FD.shape
    return w_gate_FD.as_strided((2 * Fh, D), (D, 1))


_hopper: dict[int, bool] = {}     # by device index: compute capability 9 or more


def tma_ok(*tensors: torch.Tensor) -> bool:
    """Whether the TMA kernels can take these 2-D tensors: a Hopper or newer GPU, Triton with host-side
    descriptors, unit stride along rows, rows and base addresses 16-byte aligned."""
    if TensorDescriptor is None:
        return False
    dev = tensors[0].device
    if dev.index not in _hopper:
        _hopper[dev.index] = torch.cuda.get_device_capability(dev)[0] >= 9
    return _hopper[dev.index] and all(
        t.dim() == 2 and t.stride(1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0
        for t in tensors)


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
    def _silu_mul_kernel(g_ptr, u_ptr, h_ptr, Fh, stride_g, stride_u, BLOCK: tl.constexpr):
        # one row block per program: h[t, f] = silu(g[t, f]) * u[t, f], rows of g and u strided
        n_f = tl.cdiv(Fh, BLOCK)
        pid = tl.program_id(0)
        t = (pid // n_f).to(tl.int64)
        offs = (pid % n_f) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < Fh
        g = tl.load(g_ptr + t * stride_g + offs, mask=ok, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + t * stride_u + offs, mask=ok, other=0.0).to(tl.float32)
        # torch's formula with an exact exp and division, rounded to the storage type before the
        # product as torch's two kernels do: the same bits as F.silu(g) * u
        s = tl.math.div_rn(g, 1.0 + libdevice.exp(-g)).to(h_ptr.dtype.element_ty).to(tl.float32)
        tl.store(h_ptr + t * Fh + offs, (s * u).to(h_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _gate_up_tma_kernel(x_desc, wg_desc, wu_desc, h_desc, T, N, K, BLOCK_T: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr):
        # h = silu(x wg^T) * (x wu^T), (T, N) from (T, K).  Swapped products, (weight rows x tokens): the
        # weight tile is the 64-row side of the tensor cores' product and the few tokens its narrow side.
        # Token tiles vary fastest (see above).
        n_t = tl.cdiv(T, BLOCK_T)
        pid = tl.program_id(0)
        off_t = (pid % n_t) * BLOCK_T
        off_n = (pid // n_t) * BLOCK_N
        acc_g = tl.zeros((BLOCK_N, BLOCK_T), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_N, BLOCK_T), dtype=tl.float32)
        for k in tl.range(0, tl.cdiv(K, BLOCK_K), num_stages=STAGES):
            x = x_desc.load([off_t, k * BLOCK_K])          # rows past T and columns past K read as zeros
            acc_g = tl.dot(wg_desc.load([off_n, k * BLOCK_K]), x.T, acc_g)
            acc_u = tl.dot(wu_desc.load([off_n, k * BLOCK_K]), x.T, acc_u)
        h = acc_g * tl.sigmoid(acc_g) * acc_u
        h_desc.store([off_t, off_n], h.T.to(h_desc.dtype))   # clipped to (T, N)

    @triton.jit
    def _down_tma_kernel(h_desc, w_desc, y_desc, T, N, K, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, STAGES: tl.constexpr):
        # y = h w^T, (T, N) from (T, K), swapped as above: (output columns x tokens) tiles, the whole
        # reduction in each
        n_t = tl.cdiv(T, BLOCK_T)
        pid = tl.program_id(0)
        off_t = (pid % n_t) * BLOCK_T
        off_n = (pid // n_t) * BLOCK_N
        acc = tl.zeros((BLOCK_N, BLOCK_T), dtype=tl.float32)
        for k in tl.range(0, tl.cdiv(K, BLOCK_K), num_stages=STAGES):
            acc = tl.dot(w_desc.load([off_n, k * BLOCK_K]), h_desc.load([off_t, k * BLOCK_K]).T, acc)
        y_desc.store([off_t, off_n], acc.T.to(y_desc.dtype))

    # (BLOCK_N, BLOCK_K, STAGES, num_warps): output columns and reduction per tile; the token tile is the
    # smallest power of two from 16 that holds every token.  What the benchmark sweeps, and the runtime's choice: the
    # sweep's fastest from 16 to 64 tokens on an H200 (within 1% where another won).
    TMA_SWEEP = [(bn, bk, s, 4) for bn in (64, 128) for bk, s in ((64, 3), (64, 4), (64, 6), (128, 3), (128, 4))]
    TMA_GATE_UP = (64, 64, 3, 4)
    TMA_DOWN = (64, 128, 4, 4)

    def tma_fitting(kernel: str, tokens: int) -> list[tuple]:
        """The configurations of ``TMA_SWEEP`` whose pipeline fits in shared memory for ``tokens`` tokens:
        per stage the token tile and one ("down") or two ("gate/up") weight tiles, and the output tile."""
        bt = _token_tile(tokens)
        tiles = 2 if kernel == "gate/up" else 1
        return [c for c in TMA_SWEEP
                if (c[2] * (bt + tiles * c[0]) * c[1] + bt * c[0]) * 2 <= SHARED_MEMORY_BYTES]


def _token_tile(T: int) -> int:
    return max(16, triton.next_power_of_2(max(T, 1)))


def gate_up_swiglu_tma(x_TD: torch.Tensor, w_gate_FD: torch.Tensor, w_up_FD: torch.Tensor,
                       config: tuple | None = None) -> torch.Tensor:
    """silu(x w_gate^T) * (x w_up^T), (T, F), in one TMA Triton kernel (Hopper), for up to 128 tokens.
    ``config``: (BLOCK_N, BLOCK_K, stages, warps), overriding ``TMA_GATE_UP``."""
    return _swapped_tma(_gate_up_tma_kernel, "gate_up_swiglu_tma", x_TD, (w_gate_FD, w_up_FD), config or TMA_GATE_UP)


def down_tma(h_TF: torch.Tensor, w_down_DF: torch.Tensor, config: tuple | None = None) -> torch.Tensor:
    """h w_down^T, (T, D), in one TMA Triton kernel (Hopper), for up to 128 tokens.  ``config``:
    (BLOCK_N, BLOCK_K, stages, warps), overriding ``TMA_DOWN``."""
    return _swapped_tma(_down_tma_kernel, "down_tma", h_TF, (w_down_DF,), config or TMA_DOWN)


def _swapped_tma(kernel, name: str, x_TK: torch.Tensor, weights_NK: tuple, config: tuple) -> torch.Tensor:
    """Launch a swapped TMA kernel: (T, N) out of (T, K) input and (N, K) weights."""
    T, K = x_TK.shape
    N = weights_NK[0].shape[0]
    if T > 128 or any(w.shape != (N, K) for w in weights_NK):
        raise ValueError(f"{name}: weights {[tuple(w.shape) for w in weights_NK]} for input {tuple(x_TK.shape)} "
                         f"(at most 128 tokens)")
    bn, bk, stages, warps = config
    bt = _token_tile(T)
    out = torch.empty(T, N, device=x_TK.device, dtype=x_TK.dtype)
    descriptors = [TensorDescriptor.from_tensor(x_TK, [bt, bk])]
    descriptors += [TensorDescriptor.from_tensor(w, [bn, bk]) for w in weights_NK]
    descriptors.append(TensorDescriptor.from_tensor(out, [bt, bn]))
    kernel[(triton.cdiv(T, bt) * triton.cdiv(N, bn),)](*descriptors, T, N, K, BLOCK_T=bt, BLOCK_N=bn, BLOCK_K=bk,
                                                      STAGES=stages, num_warps=warps)
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


def silu_mul(g_TF: torch.Tensor, u_TF: torch.Tensor) -> torch.Tensor:
    """silu(g) * u in one Triton kernel, (T, F) contiguous; the same bits as ``F.silu(g) * u``.  ``g``
    and ``u`` are 2-D with unit stride along rows, their rows strided (two halves of one product's
    output, for one)."""
    if g_TF.shape != u_TF.shape or g_TF.dim() != 2:
        raise ValueError(f"silu_mul: shapes {tuple(g_TF.shape)} and {tuple(u_TF.shape)} (2-D, equal)")
    if g_TF.stride(1) != 1:
        g_TF = g_TF.contiguous()
    if u_TF.stride(1) != 1:
        u_TF = u_TF.contiguous()
    T, Fh = g_TF.shape
    h = torch.empty(T, Fh, device=g_TF.device, dtype=g_TF.dtype)
    block = min(2048, triton.next_power_of_2(max(Fh, 16)))
    if T:
        _silu_mul_kernel[(T * triton.cdiv(Fh, block),)](g_TF, u_TF, h, Fh, g_TF.stride(0), u_TF.stride(0),
                                                        BLOCK=block, num_warps=8 if block >= 1024 else 4)
    return h
