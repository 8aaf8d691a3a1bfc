"""Injected faults: a killed rank, a hung rank, a rank that raises, the whole job killed, SIGTERM.
None may hang; every one ends with a message naming what happened; resumed output is bit-identical."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, cli, env, make_tokens, mpi_command, read

WORLD = 10  # tiny, F = 2
ARGS = ("--config", "tiny", "--front-ranks", "2", "-T", "48", "--save-routing", "--no-progress")
SUMMARY = Path(os.environ.get("MOE_MPI_FAULT_LOG", "/tmp/moe_mpi_faults.txt"))


def note(line: str) -> None:
    """What each fault did and how long the job took to end, for the closing note."""
    with SUMMARY.open("a") as fh:
        fh.write(line + "\n")


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    d = tmp_path_factory.mktemp("faults")
    path = d / "in.h5"
    make_tokens(path, 600, 48, 512, seed=int(np.random.SeedSequence().entropy % 2**31))
    return d, path


def start(n: int, *args, **kw) -> subprocess.Popen:
    return subprocess.Popen(mpi_command(n, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**env(), **kw.pop("extra_env", {})}, cwd=REPO, start_new_session=True)


def descendants(root: int) -> list[int]:
    """Every process under root (the launcher's proxies put ranks in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(pid))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def rank_pids(launcher: subprocess.Popen, n: int, timeout: float = 180) -> dict[int, int]:
    """World rank -> pid of the rank processes under this launcher (from PMI_RANK in /proc)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = {}
        for pid in descendants(launcher.pid):
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except (OSError, ProcessLookupError):
                continue
            if b"moe_mpi" in cmdline and b"python" in cmdline:
                for item in environ:
                    if item.startswith((b"PMI_RANK=", b"OMPI_COMM_WORLD_RANK=")):
                        pids[int(item.split(b"=")[1])] = pid
        if len(pids) == n:
            return pids
        time.sleep(0.2)
    raise AssertionError(f"did not find {n} rank processes")


def kill_all(launcher: subprocess.Popen) -> None:
    """SIGKILL the launcher and everything under it at once (a node that lost power, an OOM sweep),
    and wait until every one of them is gone."""
    victims = [launcher.pid, *descendants(launcher.pid)]
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    launcher.wait(timeout=60)
    deadline = time.monotonic() + 60
    while any(_running(pid) for pid in victims[1:]):
        assert time.monotonic() < deadline, "killed processes did not go away"
        time.sleep(0.1)


def _running(pid: int) -> bool:
    """Whether any thread of pid has yet to exit. A zombie leader is not enough: in a threaded rank
    (torch's pool) the leader turns Z while its other threads are still exiting, and the open files,
    with HDF5's lock on the output, go only with the last of them. Zombies count as gone (with no
    reaping init in the container they stay)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    return any(_state(f"{pid}/task/{tid}") not in ("Z", "X") for tid in tasks)


def _state(task: str) -> str:
    try:
        return Path(f"/proc/{task}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "X"


def wait_until_scoring(launcher: subprocess.Popen, out: Path, timeout: float = 180) -> None:
    """Until some sequences are committed: the job is past start-up and mid-run."""
    deadline = time.monotonic() + timeout
    state = Path(str(out) + ".partial.state.npz")
    while time.monotonic() < deadline:
        if state.exists() or launcher.poll() is not None:
            return
        time.sleep(0.1)
    raise AssertionError("job did not start scoring")


def finish(launcher: subprocess.Popen, timeout: float = 120) -> tuple[int, str, float]:
    t0 = time.monotonic()
    try:
        out, err = launcher.communicate(timeout=timeout)
        err = (out or "") + (err or "")   # hydra reports on stdout, moe-mpi on stderr
    except subprocess.TimeoutExpired:
        kill_all(launcher)
        raise AssertionError(f"the job did not end within {timeout} s after the fault (hang)") from None
    return launcher.returncode, err, time.monotonic() - t0


@pytest.mark.parametrize("transport", ["auto", "ipc"])
def test_killed_expert_ends_job_with_its_name(job, transport):
    """Also under the IPC transport, whose messages pass through shared memory with no MPI call that
    could fail when a peer dies: the launcher, or the watchdog, still ends the job."""
    d, path = job
    out = d / f"killed_{transport}.h5"
    p = start(WORLD, "score", path, out, *ARGS, "--transport", transport)
    pids = rank_pids(p, WORLD)
    wait_until_scoring(p, out)
    victim = 7                                  # expert 1 of MoE layer 1
    os.kill(pids[victim], signal.SIGKILL)
    rc, err, took = finish(p)
    assert rc != 0
    # MPICH's hydra tears the job down at once and says a process was killed; a front whose
    # exchange broke first, or the watchdog where the launcher lets survivors run on, names the rank.
    named = "Killed (signal 9)" in err or "rank 7 (expert 1 of MoE layer 1" in err
    assert named, err[-2000:]
    assert "Traceback" not in err
    assert not out.exists()
    note(f"SIGKILL expert rank 7 (pid {pids[victim]}, transport {transport}): ended after {took:.1f} s, rc={rc}: "
         + " / ".join(l.strip(" =") for l in err.splitlines() if "PID" in l or "rank 7" in l or "Killed" in l))


@pytest.mark.parametrize("transport", ["auto", "ipc"])
def test_hung_expert_hits_deadline(job, transport):
    d, path = job
    out = d / f"hung_{transport}.h5"
    p = start(WORLD, "score", path, out, *ARGS, "--deadline", "15", "--transport", transport)
    pids = rank_pids(p, WORLD)
    wait_until_scoring(p, out)
    os.kill(pids[4], signal.SIGSTOP)            # alive but silent: expert 2 of MoE layer 0
    stopped = time.monotonic()
    try:
        # meanwhile a user looks at the job's progress: its partial output is held open for writing
        look = cli("inspect", f"{out}.partial")
        assert look.returncode == 0 and "a job still running" in look.stdout, look.stdout + look.stderr
        assert re.search(r"done: \d+ of 600 sequences committed", look.stdout), look.stdout
        rc, err, _ = finish(p)
        took = time.monotonic() - stopped
    finally:
        try:
            os.kill(pids[4], signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert rc != 0, err[-2000:]
    assert "waited more than 15 s" in err and "rank 4 (expert 2 of MoE layer 0)" in err, f"rc={rc}\n{err[-3000:]}"
    assert "Traceback" not in err
    note(f"SIGSTOP expert rank 4, --deadline 15, transport {transport}: ended {took:.1f} s after the stop, rc={rc}: "
         f"{next(l for l in err.splitlines() if 'waited more than' in l)}")


def test_rank_that_raises_aborts_job(job):
    d, path = job
    out = d / "raise.h5"
    p = start(WORLD, "score", path, out, *ARGS, extra_env={"MOE_MPI_INJECT_FAULT_RANK": "5"})
    rc, err, took = finish(p, timeout=180)
    assert rc != 0
    assert "rank 5 (expert 3 of MoE layer 0, model layer 1) failed: RuntimeError: injected fault" in err, err[-2000:]
    assert "Traceback" not in err
    note(f"RuntimeError on expert rank 5: job ended, rc={rc}: "
         f"{next(l for l in err.splitlines() if 'injected' in l)}")


@pytest.fixture(scope="module")
def clean(job):
    d, path = job
    ref = d / "clean.h5"
    p = start(WORLD, "score", path, ref, *ARGS)
    rc, err, _ = finish(p, timeout=300)
    assert rc == 0, err
    return read(ref)


def _assert_identical(got: dict, ref: dict) -> None:
    for key in ("token_logprobs", "sequence_logprob", "routing/expert_ids", "expert_load", "done", "lengths"):
        assert np.array_equal(got[key], ref[key], equal_nan=True), key


def test_sigkill_whole_job_then_resume(job, clean):
    d, path = job
    out = d / "sigkill.h5"
    p = start(WORLD, "score", path, out, *ARGS)
    wait_until_scoring(p, out)
    time.sleep(1.0)
    kill_all(p)                                 # launcher and every rank, no warning
    assert not out.exists() and Path(str(out) + ".partial").exists()
    done_before = int(read(Path(str(out) + ".partial"))["done"].sum())
    q = start(WORLD, "score", path, out, *ARGS, "--resume")
    rc, err, _ = finish(q, timeout=300)
    assert rc == 0, err
    _assert_identical(read(out), clean)
    note(f"SIGKILL of the whole job mid-run ({done_before} of 600 sequences committed), then --resume: "
         "bit-identical to a clean run")


def test_sigterm_then_resume(job, clean):
    d, path = job
    out = d / "sigterm.h5"
    p = start(WORLD, "score", path, out, *ARGS)
    pids = rank_pids(p, WORLD)
    wait_until_scoring(p, out)
    t0 = time.monotonic()
    for pid in pids.values():                   # as Slurm signals every task before a time limit
        os.kill(pid, signal.SIGTERM)
    rc, err, _ = finish(p)
    took = time.monotonic() - t0
    assert rc != 0
    assert "interrupted by SIGTERM" in err and "--resume" in err, err[-2000:]
    assert not out.exists()
    partial = read(Path(str(out) + ".partial"))
    q = start(WORLD, "score", path, out, *ARGS, "--resume")
    rc2, err2, _ = finish(q, timeout=300)
    assert rc2 == 0, err2
    _assert_identical(read(out), clean)
    note(f"SIGTERM to every rank: ended after {took:.1f} s, rc={rc}, {int(partial['done'].sum())} of 600 "
         "sequences saved; --resume bit-identical to a clean run")


def test_ctrl_c_stops_cleanly(job):
    """Ctrl-C at mpiexec (hydra passes SIGINT to every rank): the same clean stop as SIGTERM, status 3,
    the finished sequences saved for --resume."""
    d, path = job
    out = d / "sigint.h5"
    p = start(WORLD, "score", path, out, *ARGS)
    wait_until_scoring(p, out)
    os.kill(p.pid, signal.SIGINT)
    rc, err, took = finish(p)
    assert rc == 3, err[-2000:]
    assert "interrupted by SIGINT" in err and "--resume" in err and "Traceback" not in err, err[-2000:]
    done = int(read(Path(f"{out}.partial"))["done"].sum())
    assert not out.exists() and done > 0
    note(f"SIGINT (Ctrl-C) to mpiexec: ended after {took:.1f} s, rc={rc}, {done} of 600 sequences saved")


def test_sigterm_one_rank_run(tmp_path):
    path, out, ref = tmp_path / "in.h5", tmp_path / "o.h5", tmp_path / "r.h5"
    make_tokens(path, 400, 48, 512, seed=3)
    cli("score", path, ref, "--config", "tiny", "-T", "48", check=True)
    p = subprocess.Popen([sys.executable, "-m", "moe_mpi", "score", path, out, "--config", "tiny", "-T", "48",
                          "--no-progress"], stderr=subprocess.PIPE, text=True, env=env(), cwd=REPO)
    wait_until_scoring(p, out)
    p.send_signal(signal.SIGTERM)
    rc, err, _ = finish(p)
    assert rc == 3 and "interrupted by SIGTERM" in err, err
    cli("score", path, out, "--config", "tiny", "-T", "48", "--resume", check=True)
    got, want = read(out), read(ref)
    for key in ("token_logprobs", "sequence_logprob", "expert_load", "done"):
        assert np.array_equal(got[key], want[key], equal_nan=True), key
