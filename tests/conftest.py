"""Shared helpers: run the CLI in a subprocess, launch under mpiexec with a timeout, make inputs."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MPIEXEC = shutil.which("mpiexec", path=str(BIN)) or shutil.which("mpiexec")
LAUNCH_TIMEOUT = float(os.environ.get("MOE_MPI_TEST_TIMEOUT", "240"))


# Launch as users do.  (Not MPICH's -disable-auto-cleanup: hydra then signals the survivors with
# SIGUSR1 whenever a rank exits, which moe-mpi must read as Slurm's time-limit warning.)
MPIEXEC_ARGS: list[str] = []


def env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def cli(*args, timeout: float = LAUNCH_TIMEOUT, check: bool = False) -> subprocess.CompletedProcess:
    """`moe-mpi ARGS` in a fresh process (one rank, no mpiexec)."""
    proc = subprocess.run([sys.executable, "-m", "moe_mpi", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env(), cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"moe-mpi {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def mpi_command(n: int, *args) -> list[str]:
    return [MPIEXEC, *MPIEXEC_ARGS, "-n", str(n), sys.executable, "-m", "mpi4py", "-m", "moe_mpi", *map(str, args)]


def mpi_python(n: int, *args) -> list[str]:
    """`mpiexec -n N python -m mpi4py ARGS`: a script or ``-m module`` under abort-on-error semantics
    (the caller runs it with a timeout)."""
    if MPIEXEC is None:
        pytest.skip("mpiexec not found")
    return [MPIEXEC, *MPIEXEC_ARGS, "-n", str(n), sys.executable, "-m", "mpi4py", *map(str, args)]


def mpirun(n: int, *args, timeout: float = LAUNCH_TIMEOUT, check: bool = False) -> subprocess.CompletedProcess:
    """`mpiexec -n N python -m mpi4py -m moe_mpi ARGS` with a timeout: a deadlock fails, never hangs CI.
    `python -m mpi4py` aborts the whole job when any rank dies with an unhandled exception."""
    if MPIEXEC is None:
        pytest.skip("mpiexec not found")
    cmd = mpi_command(n, *args)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env(), cwd=REPO)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"mpiexec -n {n} timed out after {timeout} s (deadlock?): {' '.join(cmd)}\n"
                             f"{(exc.stderr or b'')[-3000:]!r}") from None
    if check and proc.returncode != 0:
        raise AssertionError(f"mpiexec -n {n} moe-mpi {' '.join(map(str, args))} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return proc


def make_tokens(path: Path, n: int, s: int, vocab: int, *, seed: int, ragged: bool = True,
                min_len: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_len, s + 1, size=n) if ragged else np.full(n, s)
    with h5py.File(path, "w") as f:
        f["tokens"] = rng.integers(0, vocab, size=(n, s), dtype=np.int64)
        f["lengths"] = lengths
    return lengths


def read(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        out = {}
        f.visititems(lambda name, obj: out.__setitem__(name, obj[...]) if isinstance(obj, h5py.Dataset) else None)
        out["attrs"] = dict(f.attrs)
    return out


@pytest.fixture
def tiny_input(tmp_path) -> Path:
    path = tmp_path / "in.h5"
    make_tokens(path, 10, 24, 512, seed=np.random.SeedSequence().entropy % 2**32)
    return path
