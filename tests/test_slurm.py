"""The shipped sbatch script on a real Slurm cluster (CI starts a one-node one with .ci/slurm-up.sh)."""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, cli, make_tokens, read

pytestmark = pytest.mark.skipif(shutil.which("sbatch") is None, reason="Slurm (sbatch) is not installed")


def _cluster_up() -> bool:
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return any(state.strip() in ("idle", "mixed", "allocated") for state in out.splitlines())


@pytest.fixture(scope="module", autouse=True)
def cluster():
    if not _cluster_up():
        pytest.skip("no Slurm cluster answering (start one with .ci/slurm-up.sh)")


FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}


def submit_and_wait(args: list, *, timeout: float = 600, env=None) -> tuple[int, str]:
    """sbatch, then the job's (or every array task's) end, polled twice a second with scontrol: sbatch
    --wait's own polling backs off to half a minute, which doubled these tests' time.  Returns the
    highest exit status, as sbatch --wait does, and sbatch's stderr."""
    proc = subprocess.run(["sbatch", "--parsable", "--overcommit", "--exclusive", *map(str, args)], capture_output=True,
                          text=True, timeout=60, cwd=REPO, env=None if env is None else {**os.environ, **env})
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.strip().split(";")[0]
    deadline = time.monotonic() + timeout
    while True:
        lines = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True,
                               timeout=30).stdout.splitlines()
        fields = [dict(f.split("=", 1) for f in line.split() if "=" in f) for line in lines]
        if fields and all(f.get("JobState") in FINAL_STATES for f in fields):
            return max(_status(f["ExitCode"]) for f in fields), proc.stderr
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job], timeout=30)
            raise AssertionError(f"job {job} did not end within {timeout} s: {lines}")
        time.sleep(0.5)


def _status(exit_code: str) -> int:
    """scontrol's ExitCode=status:signal as a shell would give it."""
    status, signal = (int(x) for x in exit_code.split(":"))
    return 128 + signal if signal else status


def sbatch(tmp_path, *args, timeout=600, env=None) -> tuple[int, str]:
    log = tmp_path / "job.out"
    rc, err = submit_and_wait([f"--output={log}", *args], timeout=timeout, env=env)
    return rc, (log.read_text() if log.exists() else "") + err


@pytest.mark.parametrize("launch", ["mpiexec", "srun", "multinode"])
def test_sbatch_score_matches_one_rank(tmp_path, launch):
    """score.sbatch with mpiexec and with srun (--mpi=pmi2 for the MPICH wheel), and score-multinode.sbatch
    (a hostfile from the allocation, here of one node), each against the 1-rank run."""
    out, ref = tmp_path / "out.h5", tmp_path / "ref.h5"
    cli("score", "inputs/tiny.h5", ref, "--model", "inputs/tiny-model", "--save-routing", check=True)
    # MOE_MPI_MPS=1 on a machine without MPS: said, and the job runs without it
    env = {"MOE_MPI_MPS": "1", "MOE_MPI_LAUNCHER": "srun" if launch == "srun" else "mpiexec"}
    script = ["--nodes=1", "slurm/score-multinode.sbatch"] if launch == "multinode" else ["slurm/score.sbatch"]
    rc, log = sbatch(tmp_path, "--ntasks=9", *script, "inputs/tiny.h5", out,
                     "--model", "inputs/tiny-model", "--save-routing", "--no-progress", "-T", "128", env=env)
    assert rc == 0, log
    assert "wrote" in log and "tokens/s" in log
    running = next(line for line in log.splitlines() if "running: " in line)
    assert {"mpiexec": "running: mpiexec -n 9 python", "srun": "running: srun --mpi=pmi2 --ntasks=9",
            "multinode": "running: mpiexec -n 9 -f "}[launch] in running, running
    if shutil.which("nvidia-cuda-mps-control") is None:
        assert "MOE_MPI_MPS=1 but nvidia-cuda-mps-control is not on PATH: running without MPS" in log, log
    _matches_one_rank(out, ref)
    got, want = read(out), read(ref)
    assert np.array_equal(got["routing/expert_ids"], want["routing/expert_ids"])
    assert got["attrs"]["world_size"] == 9


def test_sbatch_refuses_wrong_task_count(tmp_path):
    rc, log = sbatch(tmp_path, "--ntasks=5", "slurm/score.sbatch", "inputs/tiny.h5", tmp_path / "o.h5",
                     "--config", "tiny")
    assert rc != 0
    assert "needs exactly 9 MPI ranks" in log and "5 tasks" in log, log
    assert not (tmp_path / "o.h5").exists()


def _matches_one_rank(out: Path, ref: Path) -> None:
    got, want = read(out), read(ref)
    lp, wl = got["token_logprobs"], want["token_logprobs"]
    assert np.array_equal(np.isnan(lp), np.isnan(wl))
    np.testing.assert_allclose(lp[~np.isnan(lp)], wl[~np.isnan(wl)], atol=1e-5, rtol=0)
    assert got["done"].all() and np.array_equal(got["expert_load"], want["expert_load"])


def test_sbatch_requeue_after_time_limit_warning(tmp_path):
    """Slurm's time-limit warning (SIGUSR1 to the batch shell, as --signal=B:USR1@300 sends it) mid-run:
    the ranks flush, the job requeues itself, the next run resumes, and sbatch --wait returns 0."""
    path, out, ref = tmp_path / "in.h5", tmp_path / "out.h5", tmp_path / "ref.h5"
    make_tokens(path, 600, 48, 512, seed=int(np.random.SeedSequence().entropy % 2**31))
    args = ("--config", "tiny", "-T", "48", "--no-progress")
    cli("score", path, ref, *args, check=True)
    log = tmp_path / "job.out"
    job = subprocess.Popen(["sbatch", "--wait", "--parsable", "--overcommit", "--exclusive", "--ntasks=9",
                            f"--output={log}", "slurm/score.sbatch", path, out, *args],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        job_id = job.stdout.readline().strip().split(";")[0]
        assert job_id.isdigit(), job_id
        state = Path(f"{out}.partial.state.npz")
        deadline = time.monotonic() + 300
        while not state.exists():                   # past start-up, some sequences committed
            assert job.poll() is None and time.monotonic() < deadline, log.read_text() if log.exists() else ""
            time.sleep(0.2)
        subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True, timeout=30)
        _, err = job.communicate(timeout=480)
    finally:
        if job.poll() is None:
            subprocess.run(["scancel", job_id or "0"], timeout=30)
            job.kill()
    text = log.read_text() + err
    assert job.returncode == 0, text
    assert "got SIGUSR1" in text and f"requeueing job {job_id} (restart 1)" in text, text
    assert "found" in text and "adding --resume" in text and "wrote" in text, text
    assert not Path(f"{out}.partial").exists() and not state.exists()
    _matches_one_rank(out, ref)


def test_sbatch_array_scores_each_input_once(tmp_path):
    """One array task per input; resubmitting skips what is done; a list where two inputs share an
    output name is refused by every task before any work."""
    inputs = tmp_path / "inputs"
    (inputs / "a").mkdir(parents=True)
    (inputs / "b").mkdir()
    names = [inputs / "a" / "first.h5", inputs / "b" / "second.hdf5"]
    for i, p in enumerate(names):
        make_tokens(p, 6 + i, 24, 512, seed=int(np.random.SeedSequence().entropy % 2**31))
    listing = tmp_path / "list.txt"
    listing.write_text(f"# inputs\n  {names[0]}  \n\n{names[1]}\n")
    outdir = tmp_path / "out"

    def array(lst: Path) -> tuple[int, str]:
        rc, err = submit_and_wait(["--array=0-1", "--ntasks=9", f"--output={tmp_path}/array-%A_%a.out",
                                   "slurm/score-array.sbatch", lst, outdir, "--config", "tiny", "--no-progress"])
        logs = sorted(tmp_path.glob("array-*.out"))
        text = "".join(p.read_text() for p in logs) + err
        for p in logs:
            p.unlink()
        return rc, text

    rc, text = array(listing)
    assert rc == 0, text
    outs = [outdir / "first.scores.h5", outdir / "second.scores.h5"]
    for p, o in zip(names, outs):
        ref = tmp_path / f"{o.stem}.ref.h5"
        cli("score", p, ref, "--config", "tiny", check=True)
        _matches_one_rank(o, ref)
    stamps = [o.stat().st_mtime_ns for o in outs]
    rc, text = array(listing)                       # again: nothing left to do
    assert rc == 0 and text.count("already exists, nothing to do") == 2, text
    assert [o.stat().st_mtime_ns for o in outs] == stamps

    clash = tmp_path / "clash.txt"
    clash.write_text(f"{names[0]}\n{inputs / 'b' / 'first.h5'}\n")
    shutil.copy(names[1], inputs / "b" / "first.h5")
    outdir = tmp_path / "out2"
    rc, text = array(clash)
    assert rc != 0 and text.count("more than one input would be written to the same output") == 2, text
    assert "first.scores.h5" in text and not outdir.exists()


@pytest.mark.parametrize("mpi", ["mpich", "openmpi"])
def test_multinode_hostfile(tmp_path, mpi):
    """score-multinode.sbatch's hostfile for an allocation of several nodes with uneven task counts
    (Slurm's compressed SLURM_TASKS_PER_NODE), in MPICH's and Open MPI's formats, handed to score.sbatch
    and removed afterwards.  Fake allocation, stub score.sbatch and mpiexec: no nodes needed."""
    stub = tmp_path / "stub"
    stub.mkdir()
    (stub / "score.sbatch").write_text('echo "args: $*"; echo "hostfile: $MOE_MPI_HOSTFILE"; cat "$MOE_MPI_HOSTFILE"\n')
    (stub / "mpiexec").write_text("#!/bin/sh\necho '" + ("mpirun (Open MPI) 4.1.6" if mpi == "openmpi" else
                                                         "HYDRA build details:") + "'\n")
    (stub / "mpiexec").chmod(0o755)
    env = {**os.environ, "SLURM_JOB_NODELIST": "gpu[01-03],cpu7", "SLURM_TASKS_PER_NODE": "8(x3),2",
           "SLURM_JOB_ID": f"9{os.getpid()}", "MOE_MPI_SLURM_DIR": str(stub), "MOE_MPI_MPIEXEC": str(stub / "mpiexec"),
           "MOE_MPI_VENV": str(tmp_path / "no-venv"), "TMPDIR": str(tmp_path)}
    proc = subprocess.run(["bash", "slurm/score-multinode.sbatch", "in.h5", "out.h5", "--config", "x"],
                          capture_output=True, text=True, timeout=60, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr
    sep = " slots=" if mpi == "openmpi" else ":"
    lines = proc.stdout.splitlines()
    assert lines[0] == "args: in.h5 out.h5 --config x"
    assert lines[2:] == [f"gpu01{sep}8", f"gpu02{sep}8", f"gpu03{sep}8", f"cpu7{sep}2"], proc.stdout
    assert not Path(lines[1].split(": ", 1)[1]).exists()          # removed at the end

    bad = subprocess.run(["bash", "slurm/score-multinode.sbatch", "in.h5", "out.h5"], capture_output=True, text=True,
                         timeout=60, cwd=REPO, env={**env, "SLURM_TASKS_PER_NODE": "8(x2),2"})
    assert bad.returncode == 2 and "does not match the 4 nodes" in bad.stderr, bad.stderr
