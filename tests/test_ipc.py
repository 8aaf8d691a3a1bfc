"""The IPC transport's GPU-specific parts: when ``auto`` may take it (every pair on one node, rings
that fit the GPU), its copy kernel's setting, the kernel itself (PTX launched through the driver)
against the bytes it was given, and the stream writes of many mailbox words in one call.  The tests that need a GPU skip elsewhere; the transport's protocol
runs on CPUs in ``test_gpu.py`` and ``test_distributed.py``.
"""
from __future__ import annotations

import pytest
import torch

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_ipc_transport_says_which_pair_is_off_node(monkeypatch):
    """ipc_possible names the first rank whose peer is on another node; with every peer on this node
    (and CPU ranks, which need no peer access) it has nothing to say."""
    from moe_mpi.parallel import ipc

    class World:                     # what ipc_possible asks of the world: its rank and allgathers
        def __init__(self, hosts):
            self.hosts = hosts

        def Get_rank(self):
            return 0

        def allgather(self, obj):
            if isinstance(obj, tuple):           # (host, GPU, ring bytes) of every rank
                return [(h, "cpu", 0) for h in self.hosts]
            return [obj] + [None] * (len(self.hosts) - 1)

    monkeypatch.setattr(ipc, "exchange_pairs", lambda comms, n_fronts, world: [(None, 1, 1), (None, 2, 2)])
    monkeypatch.setattr(ipc.socket, "gethostname", lambda: "node-a")
    cpu = torch.device("cpu")
    assert ipc.ipc_possible(World(["node-a", "node-a", "node-a"]), {}, 1, cpu) is None
    why = ipc.ipc_possible(World(["node-a", "node-a", "node-b"]), {}, 1, cpu)
    assert why == "rank 0: rank 2 is on node-b, this rank on node-a"


@needs_cuda
def test_auto_leaves_ipc_whose_rings_take_too_much_of_the_gpu(monkeypatch):
    """With a share given (what --transport auto does), rings over that share of the GPU's memory are
    a reason not to take IPC, said with the sizes; without one (--transport ipc) they are taken."""
    from moe_mpi.parallel import ipc

    class World:
        def Get_rank(self):
            return 0

        def allgather(self, obj):
            return [obj]

    monkeypatch.setattr(ipc, "exchange_pairs", lambda comms, n_fronts, world: [(None, 0, 0)])
    dev = torch.device("cuda", 0)
    total = torch.cuda.get_device_properties(dev).total_memory
    assert ipc.ipc_possible(World(), {}, 1, dev, total // 10, share=0.2) is None
    why = ipc.ipc_possible(World(), {}, 1, dev, total // 2, share=0.2)
    assert why.startswith("rank 0: the receive rings of the ranks on GPU 0 would take") and "over 20%" in why
    assert ipc.ipc_possible(World(), {}, 1, dev, total // 2) is None


def test_sm_copy_setting_is_read_and_checked(monkeypatch):
    """MOE_MPI_IPC_SM_COPY_MB: unset, every IPC message is copied by the kernel on GPUs it runs on
    (compute capability 8.0 or later) for a rank whose peers are on two or more other GPUs, else all by
    the copy engines; a number of MB moves that size whatever the peers, 'off' turns kernels off;
    anything else, or a size asked for on an older GPU, is an error that names the variable."""
    from moe_mpi.parallel import peer_copy

    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    monkeypatch.delenv("MOE_MPI_IPC_SM_COPY_MB", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    assert peer_copy.sm_copy_threshold(gpu, 3) is None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert peer_copy.sm_copy_threshold(gpu, 2) == peer_copy.sm_copy_threshold(gpu, 3) == 0
    assert peer_copy.sm_copy_threshold(gpu, 1) is None         # one other GPU: the copy engines are faster
    assert peer_copy.sm_copy_threshold(gpu, 0) is None         # every peer on this GPU
    assert peer_copy.sm_copy_threshold(cpu, 3) is None          # CPU runs copy on the host
    monkeypatch.setenv("MOE_MPI_IPC_SM_COPY_MB", "8.5")
    assert peer_copy.sm_copy_threshold(gpu, 1) == peer_copy.sm_copy_threshold(gpu, 3) == 8_500_000
    assert peer_copy.sm_copy_threshold(cpu, 3) is None
    monkeypatch.setenv("MOE_MPI_IPC_SM_COPY_MB", "Off")
    assert peer_copy.sm_copy_threshold(gpu, 3) is None
    for bad in ("eight", "-1", "nan"):
        monkeypatch.setenv("MOE_MPI_IPC_SM_COPY_MB", bad)
        for device in (gpu, cpu):
            with pytest.raises(ValueError, match="MOE_MPI_IPC_SM_COPY_MB"):
                peer_copy.sm_copy_threshold(device, 3)
    monkeypatch.setenv("MOE_MPI_IPC_SM_COPY_MB", "0")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    with pytest.raises(ValueError, match="compute capability 8.0 or later, and GPU 0 is 7.5"):
        peer_copy.sm_copy_threshold(gpu, 3)


def test_kernel_signals_setting_is_read_and_checked(monkeypatch):
    """MOE_MPI_IPC_KERNEL_SIGNALS: unset or 1, the copy kernel writes the mailbox words; 0, the driver
    does; anything else is an error naming the variable, raised where the transport reads its copy
    settings (every rank alike), whether or not the kernel is used."""
    from moe_mpi.parallel import peer_copy

    monkeypatch.delenv("MOE_MPI_IPC_KERNEL_SIGNALS", raising=False)
    monkeypatch.delenv("MOE_MPI_IPC_SM_COPY_MB", raising=False)
    assert peer_copy.kernel_signals()
    monkeypatch.setenv("MOE_MPI_IPC_KERNEL_SIGNALS", "0")
    assert not peer_copy.kernel_signals()
    monkeypatch.setenv("MOE_MPI_IPC_KERNEL_SIGNALS", "yes")
    with pytest.raises(ValueError, match="MOE_MPI_IPC_KERNEL_SIGNALS"):
        peer_copy.sm_copy_threshold(torch.device("cpu"), 3)


@needs_cuda
@pytest.mark.parametrize("peer", [False, True])
def test_sm_copy_kernel_copies_every_byte_and_no_more(peer):
    """The IPC transport's copy kernel (PTX launched through the driver) moves every byte of random
    data, within a GPU or into a peer's memory, at sizes around its per-round span and a message's,
    and touches nothing past the end (a poisoned tail stays poisoned); a copy of 0 bytes is nothing."""
    from moe_mpi.parallel.cuda_driver import Driver
    from moe_mpi.parallel.peer_copy import THREADS, UNROLL, SmCopy

    if torch.cuda.get_device_capability(0) < (8, 0):
        pytest.skip("the copy kernel targets compute capability 8.0")
    if peer and (torch.cuda.device_count() < 2 or not torch.cuda.can_device_access_peer(0, 1)):
        pytest.skip("needs 2 GPUs with peer access")
    driver = Driver()
    torch.cuda.set_device(0)
    kernel = SmCopy(driver, ctas=3)
    span = 16 * THREADS * UNROLL * 3              # bytes the grid moves a round
    dst_device = torch.device("cuda", 1 if peer else 0)
    stream = torch.cuda.current_stream(0)
    for nbytes in (16, 4096, span - 16, span, span + 16, 3 * span + 48, 7 * 14336):
        src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device="cuda:0")
        dst = torch.full((nbytes + 4096,), 0xA5, dtype=torch.uint8, device=dst_device)
        if peer:
            dst[:1].copy_(src[:1])                # peer access on (torch's first copy turns it on)
            torch.cuda.synchronize(dst_device)
        kernel.copy(dst.data_ptr(), src.data_ptr(), nbytes, stream.cuda_stream)
        torch.cuda.synchronize(0)
        assert torch.equal(dst[:nbytes].cpu(), src.cpu()), nbytes
        assert bool((dst[nbytes:] == 0xA5).all()), nbytes
    kernel.copy(dst.data_ptr(), src.data_ptr(), 0, stream.cuda_stream)
    assert SmCopy.fits(4096, 8192, 14336) and not SmCopy.fits(4096, 8200, 14336) and not SmCopy.fits(0, 0, 8)


@needs_cuda
@pytest.mark.parametrize("signals", [True, False], ids=["kernel writes", "driver writes"])
def test_sm_copy_kernel_writes_the_mailbox_words_after_its_copies(signals):
    """``copy_many(copies, stream, words)``: every copy lands, and each (address, value) word of pinned
    host memory (the mailboxes' kind) holds its value once the stream is done: written by the
    signalling kernel's last program, or by the driver after the launch.  Launched again on the same
    stream (its counter reused), with more copies than one launch takes, with words alone (nothing to
    copy), and on a second stream (a counter of its own)."""
    from moe_mpi.parallel.cuda_driver import Driver
    from moe_mpi.parallel.peer_copy import SEGMENTS, SmCopy

    if torch.cuda.get_device_capability(0) < (8, 0):
        pytest.skip("the copy kernel targets compute capability 8.0")
    torch.cuda.set_device(0)
    driver = Driver()
    kernel = SmCopy(driver, ctas=4, signals=signals)
    words = torch.zeros(8, dtype=torch.int64).pin_memory()
    at = driver.device_address(words.data_ptr())
    g = torch.Generator().manual_seed(11)
    streams = [torch.cuda.current_stream(0), torch.cuda.Stream(0)]
    for round_, (n_copies, stream) in enumerate([(2, 0), (2, 0), (SEGMENTS + 3, 0), (0, 0), (3, 1)]):
        sizes = [16 * int(v) for v in torch.randint(1, 5000, (n_copies,), generator=g)]
        srcs = [torch.randint(0, 256, (n,), dtype=torch.uint8, device="cuda:0") for n in sizes]
        dsts = [torch.full((n,), 0xA5, dtype=torch.uint8, device="cuda:0") for n in sizes]
        values = [int(v) + (round_ << 40) for v in torch.randint(1, 2**31, (3,), generator=g)]
        kernel.copy_many([(d.data_ptr(), s.data_ptr(), n) for d, s, n in zip(dsts, srcs, sizes)],
                         streams[stream].cuda_stream, [(at + 8 * i, v) for i, v in enumerate(values)])
        streams[stream].synchronize()
        assert words[:3].tolist() == values, round_
        assert all(torch.equal(d, s) for d, s in zip(dsts, srcs)), round_
    assert words[3:].tolist() == [0] * 5
    assert bool((kernel._counters == 0).all()), "every launch left its stream's counter at 0"
    # streams past the counters' number have their words written by the driver
    kernel._counter_of.update({-k: 0 for k in range(1, len(kernel._counters) + 1)})
    third = torch.cuda.Stream(0)
    kernel.copy_many([], third.cuda_stream, [(at, 77)])
    third.synchronize()
    assert words[0].item() == 77 and third.cuda_stream not in kernel._counter_of


@needs_cuda
@pytest.mark.parametrize("peer", [False, True])
def test_sm_copy_kernel_makes_many_copies_in_a_launch(peer):
    """``copy_many``: more copies than one launch takes (so two launches), of different sizes (one of
    0 bytes, which is nothing), each from its own random source into its own place of one poisoned
    buffer: every copy lands whole where it was sent, and nothing else changes."""
    from moe_mpi.parallel.cuda_driver import Driver
    from moe_mpi.parallel.peer_copy import SEGMENTS, SmCopy

    if torch.cuda.get_device_capability(0) < (8, 0):
        pytest.skip("the copy kernel targets compute capability 8.0")
    if peer and (torch.cuda.device_count() < 2 or not torch.cuda.can_device_access_peer(0, 1)):
        pytest.skip("needs 2 GPUs with peer access")
    torch.cuda.set_device(0)
    kernel = SmCopy(Driver(), ctas=4)
    g = torch.Generator().manual_seed(7)
    sizes = [16 * int(v) for v in torch.randint(1, 3000, (SEGMENTS + 5,), generator=g)]
    sizes[3] = 0
    starts = [0]
    for n in sizes:
        starts.append(starts[-1] + n + 4096)          # a poisoned gap after each
    dst = torch.full((starts[-1],), 0xA5, dtype=torch.uint8, device=torch.device("cuda", 1 if peer else 0))
    srcs = [torch.randint(0, 256, (n,), dtype=torch.uint8, device="cuda:0") for n in sizes]
    if peer:
        dst[:1].copy_(srcs[0][:1])
        dst[:1].fill_(0xA5)
        torch.cuda.synchronize(dst.device)
    expected = torch.full((starts[-1],), 0xA5, dtype=torch.uint8)
    for src, at in zip(srcs, starts):
        expected[at:at + src.numel()] = src.cpu()
    kernel.copy_many([(dst.data_ptr() + at, src.data_ptr(), src.numel()) for src, at in zip(srcs, starts)],
                     torch.cuda.current_stream(0).cuda_stream)
    torch.cuda.synchronize(0)
    assert torch.equal(dst.cpu(), expected)


@needs_cuda
def test_stream_writes_many_words_in_one_call():
    """``Driver.write_values``: more words than one batch takes, each to its own place in pinned
    memory, every one lands, after the stream's work before it; and two words, which go one by one."""
    from moe_mpi.parallel.cuda_driver import MAX_MEM_OPS, Driver

    d = Driver()
    words = torch.zeros(MAX_MEM_OPS + 7, dtype=torch.int64).pin_memory()
    base = d.device_address(words.data_ptr())
    values = [(i + 1) << 32 | (3 * i) for i in range(words.numel())]
    stream = torch.cuda.Stream(0)
    with torch.cuda.stream(stream):
        torch.cuda._sleep(100_000_000)             # tens of milliseconds
    d.write_values(stream.cuda_stream, [(base + 8 * i, v) for i, v in enumerate(values)])
    assert not words.any(), "written before the stream's earlier work was done"
    stream.synchronize()
    assert words.tolist() == values
    d.write_values(stream.cuda_stream, [(base + 16, 7), (base, 2**40 + 1)])     # two: one call each
    stream.synchronize()
    assert words.tolist() == [2**40 + 1, values[1], 7] + values[3:]


def test_sm_copy_kernel_that_fails_to_load_says_how_to_do_without():
    """A driver that cannot compile the kernel's PTX: the error names the kernel, the driver call and
    the setting that leaves every message to the copy engines."""
    from moe_mpi.parallel.cuda_driver import Driver
    from moe_mpi.parallel.peer_copy import SmCopy

    class NoPtx:
        def load_functions(self, ptx, *names):
            Driver.check(218, f"cuModuleLoadData (compiling {names[0]})")

    with pytest.raises(RuntimeError, match=r"copy kernel: cuModuleLoadData \(compiling moe_mpi_copy16\) failed: "
                                           r"CUDA driver error 218 \(MOE_MPI_IPC_SM_COPY_MB=off"):
        SmCopy(NoPtx())
