"""The CUDA driver calls the IPC transport makes that torch has no Python API for, by ctypes (libcuda
is always there with a GPU): mapping peers' memory (CUDA IPC), events and streams by raw handle, host
memory that streams write (the mailboxes), and its copy kernel (PTX loaded and launched by hand)."""
from __future__ import annotations

import ctypes

import torch

CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS = 1
CU_EVENT_DISABLE_TIMING = 2
CU_MEMHOSTREGISTER_PORTABLE_DEVICEMAP = 1 | 2
CU_STREAM_MEM_OP_WRITE_VALUE_64 = 5
MEM_OP_WORDS = 6            # a CUstreamBatchMemOpParams is a union of six 64-bit words
MAX_MEM_OPS = 255           # cuStreamBatchMemOp takes fewer than 256 at once


class _IpcHandle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_ubyte * 64)]


class Driver:
    """libcuda's functions, bound once per transport."""

    def __init__(self):
        lib = ctypes.CDLL("libcuda.so.1")
        self.open = getattr(lib, "cuIpcOpenMemHandle_v2", None) or lib.cuIpcOpenMemHandle
        self.open.argtypes = [ctypes.POINTER(ctypes.c_uint64), _IpcHandle, ctypes.c_uint]
        self.get = lib.cuIpcGetMemHandle
        self.get.argtypes = [ctypes.POINTER(_IpcHandle), ctypes.c_uint64]
        self.range = getattr(lib, "cuMemGetAddressRange_v2", None) or lib.cuMemGetAddressRange
        self.range.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_size_t), ctypes.c_uint64]
        self.copy = lib.cuMemcpyAsync
        self.copy.argtypes = [ctypes.c_uint64, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_void_p]
        # events and streams by their raw handles: torch's Stream and Event wrappers cost several
        # times the driver call each, and a message makes some on each side
        self._record = lib.cuEventRecord
        self._record.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        self._wait = lib.cuStreamWaitEvent
        self._wait.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint]
        self._create = lib.cuEventCreate
        self._create.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_uint]
        # the mailboxes: host memory the streams write
        self._write = getattr(lib, "cuStreamWriteValue64_v2", None) or lib.cuStreamWriteValue64
        self._write.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint]
        # several words in one call: (operation, address, value, flags, alias, pad) per write, the
        # operation filled in once; one buffer, reused (the transport's lock serialises its callers)
        self._batch = getattr(lib, "cuStreamBatchMemOp_v2", None) or lib.cuStreamBatchMemOp
        self._batch.argtypes = [ctypes.c_void_p, ctypes.c_uint, ctypes.c_void_p, ctypes.c_uint]
        self._mem_ops = (ctypes.c_uint64 * (MEM_OP_WORDS * MAX_MEM_OPS))()
        self._mem_ops[::MEM_OP_WORDS] = [CU_STREAM_MEM_OP_WRITE_VALUE_64] * MAX_MEM_OPS
        self._register = getattr(lib, "cuMemHostRegister_v2", None) or lib.cuMemHostRegister
        self._register.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
        self._unregister = lib.cuMemHostUnregister
        self._unregister.argtypes = [ctypes.c_void_p]
        self._device_ptr = getattr(lib, "cuMemHostGetDevicePointer_v2", None) or lib.cuMemHostGetDevicePointer
        self._device_ptr.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.c_void_p, ctypes.c_uint]
        # a kernel of our own (peer_copy's PTX)
        self._load = lib.cuModuleLoadData
        self._load.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_char_p]
        self._function = lib.cuModuleGetFunction
        self._function.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p, ctypes.c_char_p]
        self._launch = lib.cuLaunchKernel
        self._launch.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 7 + [ctypes.c_void_p] * 3

    def export(self, ptr: int) -> tuple[bytes, int]:
        """The IPC handle of the allocation holding ``ptr``, and ptr's offset in it."""
        base, size, handle = ctypes.c_uint64(0), ctypes.c_size_t(0), _IpcHandle()
        self.check(self.range(ctypes.byref(base), ctypes.byref(size), ptr), "cuMemGetAddressRange")
        self.check(self.get(ctypes.byref(handle), base.value), "cuIpcGetMemHandle")
        return bytes(handle), ptr - base.value

    @staticmethod
    def check(status: int, what: str) -> None:
        if status != 0:
            raise RuntimeError(f"{what} failed: CUDA driver error {status}")

    def open_handle(self, handle: bytes) -> int:
        ptr = ctypes.c_uint64(0)
        self.check(self.open(ctypes.byref(ptr), _IpcHandle.from_buffer_copy(handle), CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS),
                   "cuIpcOpenMemHandle (mapping a peer's receive buffer)")
        return ptr.value

    def copy_async(self, dst: int, src: int, nbytes: int, stream: int) -> None:
        self.check(self.copy(dst, src, nbytes, stream), "cuMemcpyAsync")

    def record(self, event: int, stream: int) -> None:
        self.check(self._record(event, stream), "cuEventRecord")

    def wait(self, stream: int, event: int) -> None:
        """``stream`` waits for ``event``'s latest record (as of this call)."""
        self.check(self._wait(stream, event, 0), "cuStreamWaitEvent")

    def new_event(self) -> int:
        event = ctypes.c_void_p(0)
        self.check(self._create(ctypes.byref(event), CU_EVENT_DISABLE_TIMING), "cuEventCreate")
        return event.value

    def write_value(self, stream: int, address: int, value: int) -> None:
        """``stream`` writes ``value`` to the 64-bit word at ``address`` once its work so far is done."""
        self.check(self._write(stream, address, value, 0), "cuStreamWriteValue64")

    def write_values(self, stream: int, words: list[tuple[int, int]]) -> None:
        """``write_value`` for each (address, value), in order: from three words on in one call
        (``cuStreamBatchMemOp``); one or two by ``cuStreamWriteValue64`` each, which costs the host
        1.8 us a call where the batch of two cost 2.6 (4xH200, ``gpu_exchange_batched_nvidia-h200.md``)."""
        if len(words) <= 2:
            for address, value in words:
                self.write_value(stream, address, value)
            return
        ops = self._mem_ops
        for start in range(0, len(words), MAX_MEM_OPS):
            chunk = words[start:start + MAX_MEM_OPS]
            for i, (address, value) in enumerate(chunk):
                ops[MEM_OP_WORDS * i + 1], ops[MEM_OP_WORDS * i + 2] = address, value
            self.check(self._batch(stream, len(chunk), ops, 0), "cuStreamBatchMemOp")

    def device_address(self, ptr: int) -> int:
        """The device address of registered (or pinned) host memory."""
        device = ctypes.c_uint64(0)
        self.check(self._device_ptr(ctypes.byref(device), ptr, 0), "cuMemHostGetDevicePointer")
        return device.value

    def register_host(self, ptr: int, nbytes: int) -> int:
        """Host memory made writable by every GPU's streams (pinned); its device address."""
        self.check(self._register(ptr, nbytes, CU_MEMHOSTREGISTER_PORTABLE_DEVICEMAP),
                   "cuMemHostRegister (the IPC mailboxes)")
        return self.device_address(ptr)

    def unregister_host(self, ptr: int) -> None:
        self._unregister(ptr)

    def load_functions(self, ptx: str, *names: str) -> list[int]:
        """Kernels ``names`` of PTX source, compiled once by the driver for the current context's GPU."""
        module = ctypes.c_void_p(0)
        self.check(self._load(ctypes.byref(module), ptx.encode()), f"cuModuleLoadData (compiling {', '.join(names)})")
        functions = []
        for name in names:
            function = ctypes.c_void_p(0)
            self.check(self._function(ctypes.byref(function), module, name.encode()), f"cuModuleGetFunction ({name})")
            functions.append(function.value)
        return functions

    def launch(self, function: int, blocks: int, threads: int, stream: int, params, rows: int = 1) -> None:
        """A grid of ``blocks`` x ``rows`` programs of ``function`` on ``stream``; ``params``: the array
        of pointers to its arguments."""
        self.check(self._launch(function, blocks, rows, 1, threads, 1, 1, 0, stream, params, None), "cuLaunchKernel")


def stream_writes_problem(device: torch.device) -> str | None:
    """Why this GPU's streams cannot write host memory for the mailboxes (None if they can): one
    ``cuStreamWriteValue64`` and one batch of three into pinned memory, read back."""
    try:
        d = Driver()
        words = torch.zeros(4, dtype=torch.int64).pin_memory()
        stream = torch.cuda.Stream(device)
        at = d.device_address(words.data_ptr())
        d.write_value(stream.cuda_stream, at, 12345)
        d.write_values(stream.cuda_stream, [(at + 8, 678), (at + 16, 2**40 + 9), (at + 24, 5)])
        stream.synchronize()
        if words.tolist() != [12345, 678, 2**40 + 9, 5]:
            return f"GPU {device.index}: a stream's writes to host memory did not arrive"
    except (RuntimeError, AttributeError, OSError) as exc:
        return f"GPU {device.index} cannot write host memory from a stream ({exc})"
    return None


_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def current_stream_handle(device: torch.device) -> int:
    """The raw handle of the device's current stream (torch's private accessor, a tenth of the cost of
    ``torch.cuda.current_stream``; that one where this torch lacks it)."""
    if _raw_stream is not None:
        return _raw_stream(device.index)
    return torch.cuda.current_stream(device).cuda_stream
