"""Which GPU each rank computes on: bound by node-local rank, with GPU sharing reported.

MPI numbers the ranks of one node 0..n-1 (``Split_type(COMM_TYPE_SHARED)``); node-local rank i takes
GPU i mod n_gpus of the GPUs it may use: those it sees, or the device indices listed in MOE_MPI_GPUS.
With more ranks than GPUs, ranks share GPUs: that works (each process has its own CUDA context and
the GPU time-slices between them, or, under CUDA MPS, runs their kernels side by side), and rank 0 logs
who shares which GPU and whether each rank found an MPS daemon.  To place roles on GPUs, give
each group of ranks its own MOE_MPI_GPUS in an MPMD launch, e.g. the fronts on GPUs 0-1 and the experts
on GPUs 2-3 (docs/gpu.md); unlike CUDA_VISIBLE_DEVICES this leaves every GPU visible to every rank.
With MOE_MPI_CPU_AFFINITY=gpu each rank also keeps to the CPUs of its GPU's NUMA node (``pin_near_gpu``).
"""
from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass

import torch

log = logging.getLogger("moe_mpi")


@dataclass(frozen=True)
class Slot:
    """The GPU one rank computes on, named so that ranks can compare (their device indices need not
    agree when their CUDA_VISIBLE_DEVICES differ)."""
    host: str
    uuid: str           # the GPU's UUID; "cpu" for a CPU rank
    index: int          # CUDA device index as this rank sees it (-1 on CPU)
    name: str
    mps: bool = False   # an MPS control daemon's pipe was there when this rank made its CUDA context

    @property
    def key(self) -> tuple[str, str]:
        return self.host, self.uuid


def slot_of(device: torch.device) -> Slot:
    host = socket.gethostname()
    if device.type != "cuda":
        return Slot(host, "cpu", -1, "cpu")
    props = torch.cuda.get_device_properties(device)
    return Slot(host, str(getattr(props, "uuid", f"index-{device.index}")), device.index, props.name,
                mps_control() is not None)


def mps_control() -> str | None:
    """The control pipe of the CUDA MPS daemon this process's CUDA contexts go through, if there is one
    (``$CUDA_MPS_PIPE_DIRECTORY/control``, by default under /tmp/nvidia-mps)."""
    pipe = os.path.join(os.environ.get("CUDA_MPS_PIPE_DIRECTORY") or "/tmp/nvidia-mps", "control")
    return pipe if os.path.exists(pipe) else None


def local_rank(world) -> tuple[int, int]:
    """This rank's number among the ranks of its node, and how many there are."""
    from mpi4py import MPI

    local = world.Split_type(MPI.COMM_TYPE_SHARED, key=world.Get_rank())
    try:
        return local.Get_rank(), local.Get_size()
    finally:
        local.Free()


def bind_device(world, kind: str) -> torch.device:
    """The device of this rank for ``--device kind``; on GPUs the CUDA current device is set to it and
    the binding of every rank is logged by rank 0.  Collective over ``world``."""
    if kind == "cpu":
        return torch.device("cpu")
    if kind != "cuda":
        raise ValueError(f"--device must be cpu or cuda, got {kind!r}")
    rank = world.Get_rank()
    if not torch.cuda.is_available():
        raise ValueError(f"--device cuda: rank {rank} on {socket.gethostname()} sees no CUDA GPU "
                         f"(torch {torch.__version__}, CUDA_VISIBLE_DEVICES="
                         f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
    lrank, _ = local_rank(world)
    mine = usable_gpus(torch.cuda.device_count())
    device = torch.device("cuda", mine[lrank % len(mine)])
    torch.cuda.set_device(device)
    pinned = pin_near_gpu(device)
    slots = world.allgather(slot_of(device))
    pins = world.allgather(pinned)
    if rank == 0:
        log.info("%s", describe_sharing(slots))
        if any(p is not None for p in pins):
            log.info("CPU affinity (MOE_MPI_CPU_AFFINITY=gpu): %s",
                     "; ".join(f"rank {r} CPUs {p}" for r, p in enumerate(pins) if p is not None))
    return device


def parse_cpulist(text: str) -> set[int]:
    """A kernel CPU list ("0-15,32-47") as a set of CPU numbers."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if part:
            lo, _, hi = part.partition("-")
            cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def format_cpulist(cpus: set[int]) -> str:
    """The inverse of ``parse_cpulist``: runs of CPUs as lo-hi."""
    out: list[list[int]] = []      # [first, last] of each run
    for c in sorted(cpus):
        if out and out[-1][1] == c - 1:
            out[-1][1] = c
        else:
            out.append([c, c])
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in out)


def gpu_local_cpus(device: torch.device, sysfs: str = "/sys/bus/pci/devices") -> set[int] | None:
    """The CPUs of the NUMA node the GPU hangs off (its PCI device's ``local_cpulist``), None where the
    kernel or torch does not say."""
    props = torch.cuda.get_device_properties(device)
    bus = getattr(props, "pci_bus_id", None)
    if bus is None:
        return None
    path = os.path.join(sysfs, f"{getattr(props, 'pci_domain_id', 0):04x}:{bus:02x}:"
                               f"{getattr(props, 'pci_device_id', 0):02x}.0", "local_cpulist")
    try:
        with open(path) as f:
            return parse_cpulist(f.read()) or None
    except (OSError, ValueError):
        return None


def pin_near_gpu(device: torch.device) -> str | None:
    """With MOE_MPI_CPU_AFFINITY=gpu, keep this process on the CPUs next to its GPU (those of the GPU's
    NUMA node that it may use): a rank's host makes a dozen driver calls and reads mailbox words per
    message, each slower from the far socket.  Returns the CPU list taken, or None (the setting off,
    or nothing to take).  ``off`` or unset leaves the launcher's binding alone."""
    how = os.environ.get("MOE_MPI_CPU_AFFINITY", "").strip().lower()
    if how in ("", "off"):
        return None
    if how != "gpu":
        raise ValueError(f"MOE_MPI_CPU_AFFINITY must be 'gpu' or 'off', got {how!r}")
    if not hasattr(os, "sched_setaffinity"):
        return None
    near = gpu_local_cpus(device)
    allowed = os.sched_getaffinity(0)
    take = (near or set()) & allowed
    if not take or take == allowed:
        return None
    os.sched_setaffinity(0, take)
    return format_cpulist(take)


def usable_gpus(n_visible: int) -> list[int]:
    """The device indices this rank may take: MOE_MPI_GPUS (comma-separated), or every visible one."""
    listed = os.environ.get("MOE_MPI_GPUS", "").strip()
    if not listed:
        return list(range(n_visible))
    try:
        gpus = [int(x) for x in listed.split(",")]
    except ValueError:
        raise ValueError(f"MOE_MPI_GPUS={listed!r}: expected comma-separated device indices like 0,1") from None
    bad = [g for g in gpus if not 0 <= g < n_visible]
    if bad:
        raise ValueError(f"MOE_MPI_GPUS={listed!r}: no GPU {bad[0]} among the {n_visible} visible here")
    return gpus


def sharing(slots: list[Slot]) -> dict[tuple[str, str], list[int]]:
    """GPU key -> the ranks that compute on it, for a list of every rank's slot."""
    users: dict[tuple[str, str], list[int]] = {}
    for rank, slot in enumerate(slots):
        users.setdefault(slot.key, []).append(rank)
    return users


def describe_sharing(slots: list[Slot]) -> str:
    users = sharing(slots)
    if all(len(r) == 1 for r in users.values()):
        return f"GPUs: {len(slots)} ranks, one GPU each ({slots[0].name})"
    shared = [r for ranks in users.values() if len(ranks) > 1 for r in ranks]
    without = [r for r in shared if not slots[r].mps]
    if not without:
        how = "under MPS, their kernels run side by side"
    elif len(without) == len(shared):
        how = "each process has its own context; the GPU time-slices between them"
    else:
        one = len(without) == 1
        how = f"rank{'' if one else 's'} {_ranks(without)} found no MPS daemon and take{'s' if one else ''} time slices"
    lines = [f"GPUs: {len(slots)} ranks share {len(users)} GPUs ({how}):"]
    for (host, uuid), ranks in users.items():
        first = slots[ranks[0]]
        lines.append(f"  {host} GPU {uuid[:13]} ({first.name}, index {first.index} for rank {ranks[0]}): "
                     f"ranks {_ranks(ranks)}")
    if without:
        lines.append("  Without MPS a process gets 1/k of a GPU that k processes keep busy, and a rank "
                     "waiting in an NCCL receive keeps it busy (one waiting for an IPC copy does not); "
                     "an MPS daemon on each node (nvidia-cuda-mps-control -d) before the launch lets "
                     "kernels run side by side: docs/gpu.md")
    return "\n".join(lines)


def _ranks(ranks: list[int]) -> str:
    return ", ".join(map(str, ranks))
