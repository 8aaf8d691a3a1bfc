"""Copies into a peer GPU's memory by a kernel of this GPU's SMs (Triton), for the IPC transport's large
messages.

Where every GPU both sends to and receives from several peers at once (an exchange between fronts and
experts), copies by the copy engines move about 200 GB/s per GPU on a 4xH200 node, where a kernel of 32
programs writing the peer's memory over NVLink moves 280-330 GB/s
(``benchmarks/results/gpu_copy_engines_nvidia-h200.md``; NCCL's fused all-to-all moves about 234 in
the exchange benchmark).  A kernel costs the host more to launch than a copy (Triton's launcher), and
it holds SMs while it runs (on a GPU that processes share without MPS, it takes its turn like any
kernel), so the transport uses it only for messages of at least ``MOE_MPI_IPC_SM_COPY_MB`` (default
32 MB).  In the exchange benchmark on 4 H200s, messages of 59 MB (4096 tokens) moved faster by kernels
in all 7 same-machine comparisons (median 1.02x of the all-to-all, against 0.80x by the copy engines);
messages of 29 MB (2048 tokens) were faster in the median but much slower in some runs (0.43-1.06x,
against 0.80-0.90x), and messages of 15 MB slower (0.55-0.63x against 0.82-0.83x)
(``benchmarks/results/gpu_exchange_smcopy_ab_nvidia-h200.md``).
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:      # no Triton: the copy engines carry every message
    triton = None

CTAS = 32           # programs of one copy, each looping over 16 KB blocks
DEFAULT_MB = 32     # from here up, kernels: 4096 tokens of hidden 7168 bf16 is 59 MB, 2048 is 29 (see the docstring)


if triton is not None:
    @triton.jit
    def _copy_words(src, dst, n, BLOCK: tl.constexpr):
        """n int64 words from src to dst; program i takes blocks i, i + programs, ..."""
        for base in range(tl.program_id(0) * BLOCK, n, tl.num_programs(0) * BLOCK):
            offs = base + tl.arange(0, BLOCK)
            mask = offs < n
            tl.store(dst + offs, tl.load(src + offs, mask=mask, cache_modifier=".cg"), mask=mask,
                     cache_modifier=".cs")


def words_at(address: int, nbytes: int, device: torch.device) -> torch.Tensor:
    """The int64 words at a device address (this GPU's memory or a peer's, mapped) as a tensor of
    ``device``, for a kernel of that GPU to read or write; it does not own the memory."""
    storage = torch._C._construct_storage_from_data_pointer(address, device, nbytes)
    return torch.empty(0, dtype=torch.int64, device=device).set_(storage, 0, (nbytes // 8,), (1,))


def copy_words(dst: torch.Tensor, src: torch.Tensor, ctas: int = CTAS) -> None:
    """dst <- src (int64 word tensors of one length) by ``ctas`` programs, on the current stream."""
    _copy_words[(ctas,)](src, dst, src.numel(), BLOCK=2048, num_warps=8)


def sm_copy_threshold(device: torch.device) -> int | None:
    """Bytes from which the IPC transport copies a message by SMs, None for never:
    MOE_MPI_IPC_SM_COPY_MB (a number of MB; ``off`` for never), by default DEFAULT_MB where Triton
    is there (on CUDA only)."""
    raw = os.environ.get("MOE_MPI_IPC_SM_COPY_MB", "").strip().lower()
    usable = device.type == "cuda" and triton is not None and hasattr(torch._C, "_construct_storage_from_data_pointer")
    if raw == "off":
        return None
    if not raw:
        return int(DEFAULT_MB * 1e6) if usable else None
    try:
        mb = float(raw)
    except ValueError:
        raise ValueError(f"MOE_MPI_IPC_SM_COPY_MB must be a number of MB or 'off', got {raw!r}") from None
    if mb < 0:
        raise ValueError(f"MOE_MPI_IPC_SM_COPY_MB must be at least 0, got {raw!r}")
    if device.type != "cuda":
        return None
    if not usable:
        raise ValueError("MOE_MPI_IPC_SM_COPY_MB needs Triton (pip install triton) and a torch that can wrap a "
                         "device address in a tensor; this installation lacks one of them (set it to 'off')")
    return int(mb * 1e6)
