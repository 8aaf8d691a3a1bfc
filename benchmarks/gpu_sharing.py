"""What sharing one GPU between processes costs a rank's kernels, on 2 GPUs: the question behind the
layouts where ranks share GPUs (a front and two experts per GPU, or several experts on one GPU).

    python benchmarks/gpu_sharing.py            # needs 2 GPUs; writes results/gpu_sharing_<card>.{md,json}

A worker process on GPU 0 runs a fixed chain of bf16 matrix products (front-sized, expert-sized, and
front-sized with a host sync every 8 products, as a front that waits on its GPU) while other processes
on GPU 0 do one of these:

* nothing (they hold a CUDA context, no work): the baseline;
* wait in an NCCL receive from a process on GPU 1 that sends only once the worker is done (an NCCL
  kernel that spins on the GPU while it waits, as an exchange posted ahead of its data does);
* run expert-sized products back to back (two processes taking turns on the GPU);

and, within the worker itself, an NCCL receive pending on a side stream while it computes.  Reported:
the worker's time per product in each case over its time alone.  Without MPS, kernels of different
processes do not run at once: the GPU gives its contexts time slices, and a context whose only kernel
is a spinning NCCL receive still takes its slices.  With ``--mps`` (the default where
``nvidia-cuda-mps-control`` exists) every case runs once more under an MPS daemon of its own, where
kernels of different processes can run side by side.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_common import md_table  # noqa: E402
from gpu_common import RESULTS, card_slug, environment, mps_daemon, write_results  # noqa: E402

W, N1, N2, P = 0, 1, 2, 3          # worker, two neighbours on GPU 0, the peer on GPU 1
KERNELS = {                        # name: (rows, in, out, count, host sync every)
    "front-sized (2048x7168x2048)": (2048, 7168, 2048, 1500, 0),
    "front-sized, host sync every 8": (2048, 7168, 2048, 1500, 8),
    "expert-sized (2048x7168x18432)": (2048, 7168, 18432, 200, 0),
}
CASES = [  # name, neighbours waiting in NCCL, neighbours computing, worker's own pending receive
    ("alone", 0, 0, False),
    ("1 neighbour waiting in an NCCL receive", 1, 0, False),
    ("2 neighbours waiting in NCCL receives", 2, 0, False),
    ("1 neighbour computing", 0, 1, False),
    ("own NCCL receive pending on a side stream", 0, 0, True),
]


def _gemm(rows: int, k: int, n: int, dev) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device=dev).manual_seed(0)
    return (torch.randn(rows, k, device=dev, dtype=torch.bfloat16, generator=g),
            torch.randn(n, k, device=dev, dtype=torch.bfloat16, generator=g) / k ** 0.5)


def _proc(rank: int, port: int, barrier, stop, results, cases, tag) -> None:
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    dev = torch.device("cuda", 1 if rank == P else 0)
    torch.cuda.set_device(dev)
    store = dist.TCPStore("127.0.0.1", port, 4, is_master=rank == 0, timeout=timedelta(seconds=120))
    dist.init_process_group("nccl", store=store, rank=rank, world_size=4, timeout=timedelta(seconds=120))
    pair = {r: dist.new_group([r, P]) for r in (W, N1, N2)}       # 2-rank groups: one GPU each
    buf = torch.zeros(1 << 20, device=dev, dtype=torch.bfloat16)
    for r in (W, N1, N2):                                            # warm every pair up, in one order
        if rank == r:
            dist.recv(buf, src=P, group=pair[r])
        elif rank == P:
            dist.send(buf, dst=r, group=pair[r])
    torch.cuda.synchronize(dev)
    big = _gemm(2048, 7168, 18432, dev)
    for kname, (rows, k, n, count, every) in KERNELS.items():
        x, w = _gemm(rows, k, n, dev)
        for cname, n_wait, n_busy, own in cases:
            waiting = [N1, N2][:n_wait] + ([W] if own else [])
            busy = [N1, N2][:n_busy]
            barrier.wait()
            work = None
            if rank in waiting:
                side = torch.cuda.Stream(dev)
                with torch.cuda.stream(side):
                    work = dist.irecv(buf, src=P, group=pair[rank])
            time.sleep(0.05)                                         # the receive kernel is running
            barrier.wait()
            if rank == W:
                # the compute stream only: a device-wide sync would wait for the pending receive
                stream = torch.cuda.current_stream(dev)
                for _ in range(5):
                    torch.nn.functional.linear(x, w)
                stream.synchronize()
                t0 = time.perf_counter()
                for i in range(count):
                    torch.nn.functional.linear(x, w)
                    if every and (i + 1) % every == 0:
                        stream.synchronize()
                stream.synchronize()
                results[(tag, kname, cname)] = t = (time.perf_counter() - t0) / count
                print(f"{tag}: {kname}, {cname}: {1e6 * t:.1f} us per product", flush=True)
                stop.set()
            elif rank in busy:
                while not stop.is_set():
                    torch.nn.functional.linear(*big)
                    torch.cuda.current_stream(dev).synchronize()
            barrier.wait()
            if rank == W:
                stop.clear()
            if rank == P:
                for r in waiting:
                    dist.send(buf, dst=r, group=pair[r])
            if work is not None:
                work.wait()
            torch.cuda.synchronize(dev)
            barrier.wait()
    dist.destroy_process_group()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--channels", default="1,2",
                    help="also run the NCCL cases with NCCL_MAX_NCHANNELS set to each of these")
    ap.add_argument("--timeout", type=float, default=300, help="seconds for each run of the cases")
    ap.add_argument("--mps", action=argparse.BooleanOptionalAction,
                    default=shutil.which("nvidia-cuda-mps-control") is not None,
                    help="also run every case under CUDA MPS (default: where nvidia-cuda-mps-control exists)")
    args = ap.parse_args()
    if torch.cuda.device_count() < 2:
        raise SystemExit("gpu_sharing: needs 2 GPUs")
    ctx = mp.get_context("spawn")
    manager = ctx.Manager()
    results = manager.dict()
    nccl_cases = [c for c in CASES if c[1] or c[3]]
    runs = [("NCCL default", None, CASES, False)] + [(f"NCCL_MAX_NCHANNELS={c}", c, [CASES[0], *nccl_cases], False)
                                                    for c in args.channels.split(",") if c]
    if args.mps:
        runs.append(("NCCL default, MPS", None, CASES, True))
    work = tempfile.mkdtemp(prefix="moe_sharing_")
    failed = []
    for i, (tag, channels, cases, mps) in enumerate(runs):
        if channels is None:
            os.environ.pop("NCCL_MAX_NCHANNELS", None)
        else:
            os.environ["NCCL_MAX_NCHANNELS"] = channels      # the children inherit it
        with mps_daemon(Path(work) / f"run{i}") if mps else contextlib.nullcontext(True) as on:
            if on is None:
                print(f"{tag}: skipped, nvidia-cuda-mps-control is missing", flush=True)
                failed.append(tag)
                continue
            barrier, stop = ctx.Barrier(4), ctx.Event()
            port = 29500 + (os.getpid() * 7 + i) % 1000
            procs = [ctx.Process(target=_proc, args=(r, port, barrier, stop, results, cases, tag)) for r in range(4)]
            for p in procs:
                p.start()
            deadline = time.monotonic() + args.timeout
            for p in procs:
                p.join(timeout=max(1.0, deadline - time.monotonic()))
            if any(p.exitcode != 0 for p in procs):
                for p in procs:
                    if p.is_alive():
                        p.kill()
                print(f"gpu_sharing: a process failed ({tag}): exit codes {[p.exitcode for p in procs]}", flush=True)
                for log in sorted((Path(work) / f"run{i}" / "mps_log").glob("*.log")):
                    print(f"--- {log}:", *log.read_text().splitlines()[-15:], sep="\n", flush=True)
                failed.append(tag)
    os.environ.pop("NCCL_MAX_NCHANNELS", None)
    dev = torch.device("cuda", 0)
    rows = []
    for tag, _, cases, _ in runs:
        for kname in KERNELS:
            alone = results.get((tag, kname, "alone"))
            for cname, *_ in cases:
                t = results.get((tag, kname, cname))
                if t is not None:
                    rows.append({"nccl": tag, "kernel": kname, "case": cname, "us": 1e6 * t,
                                 "slowdown": t / alone if alone else float("nan")})
    cols = [("nccl", "NCCL", ""), ("kernel", "worker's products", ""), ("case", "other work on GPU 0", ""),
            ("us", "us per product", ".1f"), ("slowdown", "vs alone", ".2f")]
    env = environment(dev)
    md = "\n".join([f"# Sharing one GPU between processes ({env['card']})", "",
                    "A worker process on GPU 0 times a chain of bf16 matrix products while other processes "
                    "on GPU 0 hold a context and do nothing, wait in an NCCL receive from GPU 1 (sent once the "
                    "worker is done), or compute; and with an NCCL receive pending in the worker itself. "
                    "Without MPS, contexts of different processes take time slices; the rows marked MPS ran "
                    "under an MPS daemon started for them (every process a client), where kernels of "
                    "different processes can run at once.", "",
                    md_table(rows, cols), ""]
                   + ([f"Failed or skipped: {', '.join(failed)}.", ""] if failed else []))
    paths = write_results(args.out, f"gpu_sharing_{card_slug(dev)}", md,
                          {"environment": env, "rows": rows, "failed": failed})
    print(md)
    print("wrote", *paths)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
