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
DEFAULT_MB = 0          # from here up (every message), kernels, where a rank's peers are on 2+ other GPUs (sm_copy_threshold)
KERNEL = "moe_mpi_copy16"
SIGNAL_KERNEL = "moe_mpi_copy16_signal"
SEGMENTS = 32           # copies one launch makes at most (three 64-bit words each in its argument)
WORDS = 32              # mailbox words the signalling kernel writes at most
COUNTERS = 64           # streams whose signalling launches have a counter of their own, at most

# Up to SEGMENTS copies at once: row y of the grid makes copy y, whose (dst, src, n) are words 3y,
# 3y + 1, 3y + 2 of the one argument.  dst[i] = src[i] for the n 16-byte vectors i < n.  Thread t of a
# row (s threads) moves vectors t, t + s, t + 2s, t + 3s, then t + 4s... (four loads in flight before
# their stores), loads cached in L2 only, stores marked streaming: each byte is touched once.
_BODY = r"""
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
"""

# The signalling kernel: the copies, then each program's writes fenced for the whole system
# (membar.sys), its first thread counts the program done in a counter of the launch's stream, and the
# last program to finish fences again and writes the mailbox words, (address, value) pairs after the
# segments, then sets the counter back to 0 for the stream's next launch.  So a word is seen (by the
# host, or a peer) only after every row of the launch is in place, as cuStreamWriteValue64 after the
# copy would have it, without the driver call.
_PTX = r"""
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
""" + _BODY + r"""DONE:
    ret;
}

.visible .entry moe_mpi_copy16_signal(
    .param .align 8 .b8 p_segs[SIGNAL_BYTES]
)
{
    .reg .pred %p<5>;
    .reg .b32 %r<24>;
    .reg .b64 %rd<32>;
""" + _BODY + r"""DONE:
    membar.sys;
    bar.sync 0;
    setp.ne.u32 %p1, %r3, 0;
    @%p1 bra END;
    mov.u32 %r21, %nctaid.y;
    mul.lo.u32 %r21, %r21, %r4;
    sub.u32 %r21, %r21, 1;              // programs in the grid, less one
    mov.u64 %rd22, p_segs;
    ld.param.u64 %rd23, [%rd22+COUNTER_AT];
    cvta.to.global.u64 %rd23, %rd23;
    atom.global.add.u32 %r22, [%rd23], 1;
    setp.ne.u32 %p1, %r22, %r21;        // not the last program
    @%p1 bra END;
    membar.sys;
    ld.param.u64 %rd24, [%rd22+COUNT_AT];
    add.u64 %rd25, %rd22, WORDS_AT;     // the first word's (address, value)
    mov.u64 %rd26, 0;
WORD:
    setp.ge.u64 %p2, %rd26, %rd24;
    @%p2 bra RESET;
    ld.param.u64 %rd27, [%rd25];
    ld.param.u64 %rd28, [%rd25+8];
    cvta.to.global.u64 %rd27, %rd27;
    st.volatile.global.u64 [%rd27], %rd28;
    add.u64 %rd25, %rd25, 16;
    add.u64 %rd26, %rd26, 1;
    bra WORD;
RESET:
    st.global.u32 [%rd23], 0;
END:
    ret;
}
"""
PTX = _PTX.replace("SEGMENT_BYTES", str(SEGMENTS * 24)).replace("SIGNAL_BYTES", str(SEGMENTS * 24 + 16 + WORDS * 16)) \
    .replace("COUNTER_AT", str(SEGMENTS * 24)).replace("COUNT_AT", str(SEGMENTS * 24 + 8)) \
    .replace("WORDS_AT", str(SEGMENTS * 24 + 16))


class SmCopy:
    """The copy kernels, loaded into the current device's context; ``copy_many(copies, stream, words)``
    queues (dst, src, nbytes) copies between device addresses (this GPU's or a peer's, mapped) on a
    stream (raw handle), up to SEGMENTS of them in one launch, then has the (address, value) mailbox
    ``words`` written once every copy is done: by the last launch itself (the signalling kernel), so a
    message costs its host one driver call in all where the copy engines take three (a wait, the copy
    and the stream write); ``MOE_MPI_IPC_KERNEL_SIGNALS=0`` writes them by the driver after the launch
    instead.  One caller at a time: the argument buffers are reused (the transport's lock serialises
    them)."""

    def __init__(self, driver, ctas: int = CTAS, signals: bool | None = None):
        self.driver, self.ctas = driver, ctas
        try:
            self.function, self.signal_function = driver.load_functions(PTX, KERNEL, SIGNAL_KERNEL)
        except RuntimeError as exc:
            raise RuntimeError(f"the IPC transport's copy kernel: {exc} (MOE_MPI_IPC_SM_COPY_MB=off leaves every "
                               "message to the copy engines)") from exc
        self.signals = kernel_signals() if signals is None else signals
        self.args = (ctypes.c_uint64 * (3 * SEGMENTS))()
        self.params = (ctypes.c_void_p * 1)(ctypes.addressof(self.args))
        self.signal_args = (ctypes.c_uint64 * (3 * SEGMENTS + 2 + 2 * WORDS))()
        self.signal_params = (ctypes.c_void_p * 1)(ctypes.addressof(self.signal_args))
        # the signalling kernel's counters of finished programs, one per stream (zero between launches)
        self._counters = torch.zeros(COUNTERS, dtype=torch.int32, device=torch.device("cuda", torch.cuda.current_device()))
        self._counter_of: dict[int, int] = {}
        torch.cuda.synchronize()            # the zeros are in place before any stream's first launch

    @staticmethod
    def fits(dst: int, src: int, nbytes: int) -> bool:
        """Whether the kernel can make this copy (16-byte vectors: both addresses and the size aligned)."""
        return (dst | src | nbytes) % 16 == 0

    def copy(self, dst: int, src: int, nbytes: int, stream: int) -> None:
        self.copy_many([(dst, src, nbytes)], stream)

    def copy_many(self, copies: list[tuple[int, int, int]], stream: int, words: list[tuple[int, int]] = ()) -> None:
        """Every (dst, src, nbytes) copy (each of which ``fits``), SEGMENTS to a launch: each copy a
        row of programs, as many programs a row as the largest copy of the launch needs, at most
        ``ctas``; then each (address, value) of ``words`` (64-bit words, device addresses) written."""
        copies = [(d, s, n >> 4) for d, s, n in copies if n >> 4]
        chunks = [copies[start:start + SEGMENTS] for start in range(0, len(copies), SEGMENTS)]
        counter = self._counter(stream) if words and self.signals and len(words) <= WORDS else None
        signal = counter is not None
        if signal and not chunks:
            chunks = [[(0, 0, 0)]]          # nothing to copy: one program, to write the words
        for k, chunk in enumerate(chunks):
            last = signal and k == len(chunks) - 1
            args = self.signal_args if last else self.args
            for i, (dst, src, vectors) in enumerate(chunk):
                args[3 * i], args[3 * i + 1], args[3 * i + 2] = dst, src, vectors
            if last:
                at = 3 * SEGMENTS
                args[at], args[at + 1] = counter, len(words)
                for i, (address, value) in enumerate(words):
                    args[at + 2 + 2 * i], args[at + 3 + 2 * i] = address, value
            programs = max(1, min(self.ctas, -(-max(v for _, _, v in chunk) // (THREADS * UNROLL))))
            self.driver.launch(self.signal_function if last else self.function, programs, THREADS, stream,
                               self.signal_params if last else self.params, rows=len(chunk))
        if words and not signal:
            self.driver.write_values(stream, list(words))

    def _counter(self, stream: int) -> int | None:
        """The device address of ``stream``'s counter for the signalling kernel (launches on one stream
        run one after another, so they can share one; two streams' launches may run at once); None
        once COUNTERS streams have one (the driver then writes that stream's words)."""
        at = self._counter_of.get(stream)
        if at is None and len(self._counter_of) < COUNTERS:
            at = self._counter_of[stream] = self._counters.data_ptr() + 4 * len(self._counter_of)
        return at


def kernel_signals() -> bool:
    """MOE_MPI_IPC_KERNEL_SIGNALS: whether the copy kernel writes the mailbox words itself (1, the
    default) or leaves them to the driver's stream writes after it (0)."""
    raw = os.environ.get("MOE_MPI_IPC_KERNEL_SIGNALS", "1").strip()
    if raw not in ("0", "1"):
        raise ValueError(f"MOE_MPI_IPC_KERNEL_SIGNALS={raw!r}: expected 0 or 1")
    return raw == "1"


def sm_copy_threshold(device: torch.device, peer_gpus: int) -> int | None:
    """Bytes from which the IPC transport copies a message by SMs, None for never:
    MOE_MPI_IPC_SM_COPY_MB (a number of MB; ``off`` for never); by default DEFAULT_MB on GPUs of
    compute capability 8.0 or later (the kernel's target) for a rank whose peers are on at least two
    other GPUs (``peer_gpus``), else never; CPUs never.  Why every message (0 MB): on 4 H200s (2 fronts,
    2 experts) the kernel for every message took the exchange at 1024 tokens (14.7 MB messages) from
    0.66-0.93x of the fused all-to-all by the copy engines to 1.00-1.12x, and at 2048 from 0.81-0.97x to
    1.23x (``benchmarks/results/gpu_exchange_threshold_ab_nvidia-h200.md``).  At 512 tokens (7.3 MB)
    that A/B saw no gain under the lent machines' CPU noise; with each rank's CPU speed recorded, ranks
    at full speed posted a median 61 us a micro-batch with the kernel against 71 by the copy engines
    (4 driver calls against 11; 64 micro-batches a front, while fewer runs of 16 showed 72 against 72),
    and the exchange read 1.03x against 0.83-0.89x
    (``gpu_exchange_kernel_512_nvidia-h200.md``); until then the default was 8 MB.  Why
    the peers count: a GPU sending to two and receiving from two gets about 200 GB/s from its copy
    engines and 280-330 from the kernel (4xH200, ``gpu_copy_engines_nvidia-h200.md``), but between two
    GPUs alone the engines are 2-9% faster than the kernel (``gpu_copy_engines_2gpus_nvidia-h200.md``),
    and one front and one expert on two GPUs exchanged faster by the engines at every size from 1024
    tokens up, in every round, by 0.05-0.30 of the all-to-all's bandwidth
    (``gpu_exchange_ptx_copy_nvidia-h200.md``)."""
    kernel_signals()                # MOE_MPI_IPC_KERNEL_SIGNALS checked on every rank alike, used or not
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
