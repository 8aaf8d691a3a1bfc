"""What the input's sha256 (what --resume checks) costs in validation, side by side in one run:
validation as shipped (blocks digested in threads beside the check), the scan with the digest in the
same thread, and the scan alone (what validation was before it digested).  Ratios to the scan alone; the file is read
from the page cache after a first pass, so this is the CPU's share, the part the digest adds to.

    .venv/bin/python benchmarks/cpu_input_check.py [--sequences 200000 --seq-len 512] [--repeats 5]
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import time
from concurrent.futures import Future
from pathlib import Path
from statistics import median

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cpu_common import load_average, machine, md_table, write_results  # noqa: E402

from moe_mpi.config import ModelConfig  # noqa: E402
from moe_mpi.io import inputs  # noqa: E402


class _NoDigest:
    def update(self, data) -> None:
        pass

    def digest(self) -> bytes:
        return b""

    def hexdigest(self) -> str:
        return ""


class _SameThread:
    """A ThreadPoolExecutor stand-in that runs each call at once, in the caller's thread."""

    def __init__(self, *a, **kw):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def submit(self, fn, *args) -> Future:
        fut: Future = Future()
        fut.set_result(fn(*args))
        return fut


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sequences", type=int, default=200_000)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    cfg = ModelConfig.load("tiny")
    real_sha, real_pool = inputs.hashlib.sha256, inputs.ThreadPoolExecutor
    variants = {
        f"as shipped (digest in {inputs.HASH_THREADS} thread(s) beside the check)": (real_sha, real_pool),
        "digest in the same thread": (real_sha, _SameThread),
        "scan alone (no digest)": (lambda *a: _NoDigest(), _SameThread),
    }
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "in.h5"
        rng = np.random.default_rng()
        import h5py
        with h5py.File(path, "w") as f:
            f["tokens"] = rng.integers(0, cfg.vocab_size, size=(args.sequences, args.seq_len), dtype=np.int64)
            f["lengths"] = rng.integers(1, args.seq_len + 1, size=args.sequences)
        size = path.stat().st_size
        inputs.validate_input(str(path), cfg)               # into the page cache
        times = {name: [] for name in variants}
        for _ in range(args.repeats):                       # interleaved, so drift hits every variant
            for name, (sha, pool) in variants.items():
                inputs.hashlib.sha256, inputs.ThreadPoolExecutor = sha, pool
                try:
                    t0 = time.perf_counter()
                    inputs.validate_input(str(path), cfg)
                    times[name].append(time.perf_counter() - t0)
                finally:
                    inputs.hashlib.sha256, inputs.ThreadPoolExecutor = real_sha, real_pool
    base = median(times["scan alone (no digest)"])
    sha_alone = hashlib.sha256()
    block = np.zeros(1 << 24, np.int64)
    t0 = time.perf_counter()
    for _ in range(8):
        sha_alone.update(block.data)
    sha_rate = 8 * block.nbytes / (time.perf_counter() - t0) / 1e9
    rows = [{"variant": name, "median_s": median(t), "ratio": median(t) / base, "gbps": size / median(t) / 1e9}
            for name, t in times.items()]
    mach = machine()
    md = [f"# Input validation with and without the input's sha256 ({args.sequences} x {args.seq_len} int64 "
          f"tokens, {size / 1e9:.2f} GB, from the page cache)", "",
          f"Machine: {mach['cpu']}, {mach['cores']} cores; load average {load_average()}; "
          f"{args.repeats} repeats, interleaved; sha256 alone on this machine: {sha_rate:.2f} GB/s.", "",
          md_table(rows, [("variant", "validation", ""), ("median_s", "median s", ".3f"),
                          ("ratio", "x scan alone", ".2f"), ("gbps", "GB/s", ".2f")]), ""]
    out = write_results("cpu_input_check", "\n".join(md),
                        {"machine": mach, "bytes": size, "times_s": times, "sha256_gbps": sha_rate,
                         "args": vars(args)})
    print("\n".join(md))
    print(f"wrote {out[0]}")


if __name__ == "__main__":
    main()
