"""Copies by a kernel of this GPU's SMs for the IPC transport: a message's rows into a peer GPU's ring
over NVLink, or out of a slot of this GPU's own ring.

Where every GPU both sends to and receives from several peers at once (an exchange between fronts and
experts), copies by the copy engines move about 200 GB/s per GPU on a 4xH200 node, where a kernel of 32
programs writing the peer's memory over NVLink moves 280-330 GB/s
(``benchmarks/results/gpu_copy_engines_nvidia-h200.md``, measured with a Triton kernel of the same
shape).  The kernel is a few lines of PTX that the driver compiles for the GPU when the transport loads
it, launched with ``cuLaunchKernel`` through ctypes on raw addresses.  A launch costs the host 7-8 us,
more than a copy-engine ``cuMemcpyAsync`` (about 3 us), but makes up to SEGMENTS copies
(``benchmarks/results/gpu_exchange_batched_nvidia-h200.md``).  (Its Triton predecessor needed a tensor over each raw address, a stream context and
Triton's launcher for every message; with it, kernels were slower than the copy engines below 32 MB on 4
GPUs: ``benchmarks/results/gpu_exchange_smcopy_ab_nvidia-h200.md``.)  A kernel holds its SMs while it runs,
so it takes its turn with the compute of a GPU it shares.
"""
from __future__ import annotations

import ctypes
import os

import torch

from .ops import setting_at_least_0

CTAS = 32               # programs of one copy (SMs it may hold)
THREADS = 256           # threads of a program
UNROLL = 4              # 16-byte vectors each thread has in flight
MIN_CAPABILITY = (8, 0)     # the PTX's target
DEFAULT_MB = 8          # from here up, kernels, where a rank's peers are on 2+ other GPUs (sm_copy_threshold)
KERNEL = "moe_mpi_copy16"
SEGMENTS = 32           # copies one launch makes at most (three 64-bit words each in its argument)

# Up to SEGMENTS copies at once: row y of the grid makes copy y, whose (dst, src, n) are words 3y,
# 3y + 1, 3y + 2 of the one argument.  dst[i] = src[i] for the n 16-byte vectors i < n.  Thread t of a
# row (s threads) moves vectors t, t + s, t + 2s, t + 3s, then t + 4s... (four loads in flight before
# their stores), loads cached in L2 only, stores marked streaming: each byte is touched once.
PTX = r"""
.version 7.0
.target sm_80
.address_size 64

.visible .entry moe_mpi_copy16(
    .param .align 8 .b8 p_segs[SEGMENT_BYTES]
)
{
    .reg .pred %p<5>;
    .reg .b32 %r<21>;
    .reg .b64 %rd<24>;

    mov.u32 %r1, %ctaid.y;
    mul.wide.u32 %rd21, %r1, 24;
    mov.u64 %rd22, p_segs;              // the argument's address (param space), then this row's copy
    add.u64 %rd22, %rd22, %rd21;
    ld.param.u64 %rd1, [%rd22];
    ld.param.u64 %rd2, [%rd22+8];
    ld.param.u64 %rd3, [%rd22+16];
    cvta.to.global.u64 %rd1, %rd1;
    cvta.to.global.u64 %rd2, %rd2;
    mov.u32 %r1, %ctaid.x;
    mov.u32 %r2, %ntid.x;
    mov.u32 %r3, %tid.x;
    mov.u32 %r4, %nctaid.x;
    mul.wide.u32 %rd4, %r1, %r2;
    cvt.u64.u32 %rd5, %r3;
    add.u64 %rd4, %rd4, %rd5;           // i: this thread's first vector
    mul.wide.u32 %rd6, %r4, %r2;        // s: threads in the grid
    shl.b64 %rd7, %rd6, 4;              // s vectors in bytes
    shl.b64 %rd20, %rd6, 2;             // 4s
    setp.ge.u64 %p1, %rd4, %rd3;
    @%p1 bra DONE;
LOOP:
    shl.b64 %rd8, %rd4, 4;
    add.u64 %rd9, %rd2, %rd8;           // &src[i]
    add.u64 %rd10, %rd1, %rd8;          // &dst[i]
    add.u64 %rd11, %rd4, %rd6;
    add.u64 %rd12, %rd11, %rd6;
    add.u64 %rd13, %rd12, %rd6;
    setp.lt.u64 %p2, %rd11, %rd3;       // i + s < n
    setp.lt.u64 %p3, %rd12, %rd3;       // i + 2s < n
    setp.lt.u64 %p4, %rd13, %rd3;       // i + 3s < n
    add.u64 %rd14, %rd9, %rd7;
    add.u64 %rd15, %rd14, %rd7;
    add.u64 %rd16, %rd15, %rd7;
    ld.global.cg.v4.u32 {%r5, %r6, %r7, %r8}, [%rd9];
    @%p2 ld.global.cg.v4.u32 {%r9, %r10, %r11, %r12}, [%rd14];
    @%p3 ld.global.cg.v4.u32 {%r13, %r14, %r15, %r16}, [%rd15];
    @%p4 ld.global.cg.v4.u32 {%r17, %r18, %r19, %r20}, [%rd16];
    add.u64 %rd17, %rd10, %rd7;
    add.u64 %rd18, %rd17, %rd7;
    add.u64 %rd19, %rd18, %rd7;
    st.global.cs.v4.u32 [%rd10], {%r5, %r6, %r7, %r8};
    @%p2 st.global.cs.v4.u32 [%rd17], {%r9, %r10, %r11, %r12};
    @%p3 st.global.cs.v4.u32 [%rd18], {%r13, %r14, %r15, %r16};
    @%p4 st.global.cs.v4.u32 [%rd19], {%r17, %r18, %r19, %r20};
    add.u64 %rd4, %rd4, %rd20;
    setp.lt.u64 %p1, %rd4, %rd3;
    @%p1 bra LOOP;
DONE:
    ret;
}
""".replace("SEGMENT_BYTES", str(SEGMENTS * 24))


class SmCopy:
    """The copy kernel, loaded into the current device's context; ``copy_many(copies, stream)`` queues
    (dst, src, nbytes) copies between device addresses (this GPU's or a peer's, mapped) on a stream (raw
    handle), up to SEGMENTS of them in one launch.  One caller at a time: its argument buffer is
    reused (the transport's lock serialises them)."""

    def __init__(self, driver, ctas: int = CTAS):
        self.driver, self.ctas = driver, ctas
        try:
            self.function = driver.load_function(PTX, KERNEL)
        except RuntimeError as exc:
            raise RuntimeError(f"the IPC transport's copy kernel: {exc} (MOE_MPI_IPC_SM_COPY_MB=off leaves every "
                               "message to the copy engines)") from exc
        self.args = (ctypes.c_uint64 * (3 * SEGMENTS))()
        self.params = (ctypes.c_void_p * 1)(ctypes.addressof(self.args))

    @staticmethod
    def fits(dst: int, src: int, nbytes: int) -> bool:
        """Whether the kernel can make this copy (16-byte vectors: both addresses and the size aligned)."""
        return (dst | src | nbytes) % 16 == 0

    def copy(self, dst: int, src: int, nbytes: int, stream: int) -> None:
        self.copy_many([(dst, src, nbytes)], stream)

    def copy_many(self, copies: list[tuple[int, int, int]], stream: int) -> None:
        """Every (dst, src, nbytes) copy (each of which ``fits``), SEGMENTS to a launch: each copy a
        row of programs, as many programs a row as the largest copy of the launch needs, at most
        ``ctas``."""
        copies = [(d, s, n >> 4) for d, s, n in copies if n >> 4]
        for start in range(0, len(copies), SEGMENTS):
            chunk = copies[start:start + SEGMENTS]
            for i, (dst, src, vectors) in enumerate(chunk):
                self.args[3 * i], self.args[3 * i + 1], self.args[3 * i + 2] = dst, src, vectors
            programs = min(self.ctas, -(-max(v for _, _, v in chunk) // (THREADS * UNROLL)))
            self.driver.launch(self.function, programs, THREADS, stream, self.params, rows=len(chunk))


def sm_copy_threshold(device: torch.device, peer_gpus: int) -> int | None:
    """Bytes from which the IPC transport copies a message by SMs, None for never:
    MOE_MPI_IPC_SM_COPY_MB (a number of MB; ``off`` for never); by default DEFAULT_MB on GPUs of
    compute capability 8.0 or later (the kernel's target) for a rank whose peers are on at least two
    other GPUs (``peer_gpus``), else never; CPUs never.  Why 8 MB: on 4 H200s (2 fronts, 2 experts)
    the kernel for every message took the exchange at 1024 tokens (14.7 MB messages) from 0.66-0.93x of
    the fused all-to-all by the copy engines to 1.00-1.12x, and at 2048 from 0.81-0.97x to 1.23x; at 512
    (7.3 MB) it did not help (``benchmarks/results/gpu_exchange_threshold_ab_nvidia-h200.md``).  Why
    the peers count: a GPU sending to two and receiving from two gets about 200 GB/s from its copy
    engines and 280-330 from the kernel (4xH200, ``gpu_copy_engines_nvidia-h200.md``), but between two
    GPUs alone the engines are 2-9% faster than the kernel (``gpu_copy_engines_2gpus_nvidia-h200.md``),
    and one front and one expert on two GPUs exchanged faster by the engines at every size from 1024
    tokens up, in every round, by 0.05-0.30 of the all-to-all's bandwidth
    (``gpu_exchange_ptx_copy_nvidia-h200.md``)."""
    raw = os.environ.get("MOE_MPI_IPC_SM_COPY_MB", "").strip().lower()
    if raw == "off" or device.type != "cuda":
        if raw not in ("", "off"):
            sm_copy_mb(raw)         # checked on every rank alike
        return None
    capability = tuple(torch.cuda.get_device_capability(device))
    usable = capability >= MIN_CAPABILITY
    if not raw:
        return int(DEFAULT_MB * 1e6) if usable and peer_gpus >= 2 else None
    mb = sm_copy_mb(raw)
    if not usable:
        raise ValueError(f"MOE_MPI_IPC_SM_COPY_MB: the copy kernel needs a GPU of compute capability "
                         f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or later, and GPU {device.index} is "
                         f"{capability[0]}.{capability[1]} (set it to 'off')")
    return int(mb * 1e6)


def sm_copy_mb(raw: str) -> float:
    return setting_at_least_0("MOE_MPI_IPC_SM_COPY_MB", raw, "MB or 'off'")
