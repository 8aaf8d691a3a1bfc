"""What the GPU benchmarks share: the card's name, the two measured ceilings (matrix-product peak and
device copy bandwidth), event timing, and writing a results table as markdown + JSON."""
from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def card_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{platform.machine()}"


def card_slug(device: torch.device) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3', for file names."""
    return re.sub(r"[^a-z0-9]+", "-", card_name(device).lower()).strip("-")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device: torch.device, *, warmup: int = 3, iters: int = 10) -> list[float]:
    """Milliseconds of each of ``iters`` calls of ``fn`` after ``warmup`` calls: CUDA events around each
    call on a GPU, the host clock after a synchronisation on a CPU."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    if device.type == "cuda":
        stream = torch.cuda.current_stream(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for start, end in events:
            start.record(stream)
            fn()
            end.record(stream)
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in events]
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return times


def time_sustained(fn, device: torch.device, *, warm_s: float = 0.3, run_s: float = 0.3,
                   min_iters: int = 10) -> list[float]:
    """Like ``time_ms``, but the card is kept busy with ``fn`` for ``warm_s`` seconds first and the
    timed calls last at least ``run_s``: a card under steady load lowers its clocks within a fraction
    of a second, so short bursts overstate what it sustains.  Measure a kernel and the ceiling it is
    compared with the same way."""
    fn()
    sync(device)
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < warm_s:
        for _ in range(4):
            fn()
        n += 4
        sync(device)
    per_call = max((time.perf_counter() - t0) / max(n, 1), 1e-6)
    return time_ms(fn, device, warmup=0, iters=max(min_iters, int(run_s / per_call)))


def gpu_clocks(device: torch.device) -> dict:
    """SM clock (MHz), power (W) and temperature (C) as nvidia-smi reads them now; {} without it."""
    if device.type != "cuda":
        return {}
    try:
        q = subprocess.run(["nvidia-smi", "-i", str(device.index or 0), "--query-gpu=clocks.sm,power.draw,"
                            "temperature.gpu,clocks_throttle_reasons.active", "--format=csv,noheader,nounits"],
                           capture_output=True, text=True, timeout=10).stdout.strip()
        sm, power, temp, reasons = [v.strip() for v in q.split(",")]
        return {"sm_mhz": float(sm), "power_w": float(power), "temp_c": float(temp), "throttle": reasons}
    except Exception:  # noqa: BLE001 - informative only
        return {}


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def matmul_peak(device: torch.device, small: bool = False, sustained: bool = False) -> dict:
    """Best bf16 matrix-product rate (TFLOP/s) over a few large shapes, on random data (zeros run faster).
    ``sustained``: timed with ``time_sustained`` (after the card has run them for a while), with the
    clocks read just after; otherwise ten products after three warm-ups."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = [(512, 512, 512)] if small else [(8192, 8192, 8192), (16384, 18432, 7168), (16384, 7168, 18432)]
    rates, clocks = {}, {}
    for m, n, k in shapes:
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        if sustained:
            ms = median(time_sustained(lambda: a @ b, device, warm_s=0.05 if small else 0.5,
                                       run_s=0.05 if small else 0.5))
            clocks[f"{m}x{n}x{k}"] = gpu_clocks(device)
        else:
            ms = median(time_ms(lambda: a @ b, device, warmup=3, iters=10))
        rates[f"{m}x{n}x{k}"] = 2 * m * n * k / (ms * 1e-3) / 1e12
        a = b = None        # freed before the next shape's operands (the lambdas hold them)
    out = {"tflops": max(rates.values()), "by_shape": rates}
    if sustained:
        out["clocks"] = clocks
    return out


def copy_bandwidth(device: torch.device, small: bool = False) -> dict:
    """Device-to-device copy bandwidth (GB/s), counting bytes read plus bytes written."""
    n = (1 << 22) if small else (1 << 30)   # bytes per buffer
    src = torch.empty(n, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    ms = median(time_ms(lambda: dst.copy_(src), device, warmup=3, iters=20))
    return {"gbps": 2 * n / (ms * 1e-3) / 1e9, "buffer_bytes": n}


def expert_roofline_ms(tokens: int, hidden: int, intermediate: int, tflops: float, gbps: float) -> float:
    """The SwiGLU expert's roofline time for ``tokens`` rows, in ms: max(6 T D F / peak, (3 D F + 2 T D)
    x 2 bytes / copy bandwidth), its products at the matrix-product peak or its bf16 weights, input and
    output streamed at the copy bandwidth, whichever takes longer."""
    T, D, F = tokens, hidden, intermediate
    return max(6 * T * D * F / (tflops * 1e12), (3 * D * F + 2 * T * D) * 2 / (gbps * 1e9)) * 1e3


def expert_weights(device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """An expert at paper width with random bf16 weights: the gate and up weights stacked as one
    (2 x 18432, 7168) tensor, as the loader keeps them on CUDA, and the (7168, 18432) down weights."""
    D, Fh = 7168, 18432
    torch.manual_seed(seed)
    w13 = (torch.randn(2 * Fh, D, device=device) * 0.02).to(torch.bfloat16)
    wd = (torch.randn(D, Fh, device=device) * 0.02).to(torch.bfloat16)
    return w13, wd


def mpi_main(main) -> int:
    """Run an mpiexec-launched benchmark's ``main``; on an error, print its traceback and MPI_Abort the
    job at once.  Left to ``python -m mpi4py`` and the interpreter's exit, a rank that raised after
    torch's ``init_process_group`` printed its traceback and the job then hung until the launcher's
    timeout (a device call of 2026-11-28 lost minutes that way), and the other ranks of a benchmark
    wait for their peers with no deadline of their own."""
    try:
        return main()
    except SystemExit:
        raise
    except BaseException:
        from mpi4py import MPI

        traceback.print_exc()
        sys.stderr.flush()
        time.sleep(0.5)         # the launcher stops forwarding stderr once the abort reaches it
        MPI.COMM_WORLD.Abort(1)
        return 1


def inject_fault(rank: int) -> None:
    """For the tests: raise here on the rank that MOE_MPI_INJECT_FAULT_RANK names, having first
    registered an exit hook that waits for the peers, as torch's process-group teardown waits on
    NCCL's (on CPUs, with gloo, there is no such wait to reproduce the hang ``mpi_main`` prevents)."""
    if os.environ.get("MOE_MPI_INJECT_FAULT_RANK") == str(rank):
        import atexit

        from mpi4py import MPI

        atexit.register(MPI.COMM_WORLD.Barrier)
        raise RuntimeError(f"injected fault on rank {rank} (MOE_MPI_INJECT_FAULT_RANK)")


def cpu_now() -> int | None:
    """The CPU this process last ran on (/proc/self/stat's field 39), None off Linux."""
    try:
        with open("/proc/self/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[36])
    except (OSError, IndexError, ValueError):
        return None


def numa_node(cpu: int | None) -> int | None:
    """The NUMA node of a CPU, from sysfs (None where unknown)."""
    if cpu is None:
        return None
    try:
        names = os.listdir(f"/sys/devices/system/cpu/cpu{cpu}")
    except OSError:
        return None
    return next((int(n[4:]) for n in names if n.startswith("node") and n[4:].isdigit()), None)


def placement(device: torch.device, cpus_seen: set[int]) -> dict:
    """Where a rank's host ran: the CPUs it may use, those it was seen on and their NUMA nodes, and on
    a GPU the CPUs next to it (its PCI device's local_cpulist)."""
    from moe_mpi.parallel.devices import format_cpulist, gpu_local_cpus

    seen = {c for c in cpus_seen if c is not None}
    out = {"allowed": format_cpulist(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
           "seen": format_cpulist(seen), "seen_numa": sorted({numa_node(c) for c in seen} - {None})}
    if device.type == "cuda":
        near = gpu_local_cpus(device)
        out["gpu_near"] = format_cpulist(near) if near else None
        out["gpu_numa"] = sorted({numa_node(c) for c in near} - {None}) if near else None
    return out


def write_results(out_dir: str | Path, stem: str, markdown: str, data: dict) -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / f"{stem}.md", out / f"{stem}.json"
    md.write_text(markdown.rstrip() + "\n")
    js.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return md, js


def environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "card": card_name(device)}
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        env["gpus_visible"] = torch.cuda.device_count()
        try:
            env["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception:  # noqa: BLE001 - informative only
            pass
    return env


@contextlib.contextmanager
def mps_daemon(work: str | Path):
    """Run what follows under CUDA MPS: start a control daemon of our own (pipe and log directories under
    ``work``, so no daemon of anyone else's is touched), point this process's environment, and so every
    process started from here, at it, and quit it afterwards.  Yields its environment variables, or
    None where ``nvidia-cuda-mps-control`` is missing.  Call it before this process first uses CUDA: a
    process that made its context before is not a client.  The GPUs' settings (compute mode) are left
    as they are; in the default mode MPS clients and other processes may share a GPU."""
    exe = shutil.which("nvidia-cuda-mps-control")
    if exe is None:
        yield None
        return
    pipe, logs = Path(work) / "mps_pipe", Path(work) / "mps_log"
    pipe.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    mps = {"CUDA_MPS_PIPE_DIRECTORY": str(pipe), "CUDA_MPS_LOG_DIRECTORY": str(logs)}
    env = dict(os.environ, **mps)
    subprocess.run([exe, "-d"], env=env, check=True, timeout=30)
    saved = {k: os.environ.get(k) for k in mps}
    os.environ.update(mps)
    try:
        yield mps
    finally:
        # the daemon quits once its clients are gone; this process may be one, so do not wait for it
        quit_ = subprocess.Popen([exe], stdin=subprocess.PIPE, env=env, text=True)
        quit_.stdin.write("quit\n")
        quit_.stdin.close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
