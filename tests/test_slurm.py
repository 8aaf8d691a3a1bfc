"""The shipped sbatch script on a real Slurm cluster (CI starts a one-node one with .ci/slurm-up.sh)."""
from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pytest

from conftest import REPO, cli, read

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


def sbatch(tmp_path, *args, timeout=600, env=None) -> tuple[int, str]:
    log = tmp_path / "job.out"
    proc = subprocess.run(["sbatch", "--wait", "--overcommit", "--exclusive", f"--output={log}", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env=None if env is None else {**os.environ, **env})
    return proc.returncode, (log.read_text() if log.exists() else "") + proc.stderr


def test_sbatch_score_matches_one_rank(tmp_path):
    out, ref = tmp_path / "out.h5", tmp_path / "ref.h5"
    cli("score", "inputs/tiny.h5", ref, "--model", "inputs/tiny-model", "--save-routing", check=True)
    # MOE_MPI_MPS=1 on a machine without MPS: said, and the job runs without it
    rc, log = sbatch(tmp_path, "--ntasks=9", "slurm/score.sbatch", "inputs/tiny.h5", out,
                     "--model", "inputs/tiny-model", "--save-routing", "--no-progress", "-T", "128",
                     env={"MOE_MPI_MPS": "1"})
    assert rc == 0, log
    assert "wrote" in log and "tokens/s" in log
    if shutil.which("nvidia-cuda-mps-control") is None:
        assert "MOE_MPI_MPS=1 but nvidia-cuda-mps-control is not on PATH: running without MPS" in log, log
    got, want = read(out), read(ref)
    lp, wl = got["token_logprobs"], want["token_logprobs"]
    assert np.array_equal(np.isnan(lp), np.isnan(wl))
    np.testing.assert_allclose(lp[~np.isnan(lp)], wl[~np.isnan(wl)], atol=1e-5, rtol=0)
    assert np.array_equal(got["routing/expert_ids"], want["routing/expert_ids"])
    assert got["attrs"]["world_size"] == 9


def test_sbatch_refuses_wrong_task_count(tmp_path):
    rc, log = sbatch(tmp_path, "--ntasks=5", "slurm/score.sbatch", "inputs/tiny.h5", tmp_path / "o.h5",
                     "--config", "tiny")
    assert rc != 0
    assert "needs exactly 9 MPI ranks" in log and "5 tasks" in log, log
    assert not (tmp_path / "o.h5").exists()
