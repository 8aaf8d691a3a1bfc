"""Helpers the CPU benchmarks share: paths, machine facts, launching and timing runs (failed runs are
recorded and retried), markdown tables and results files, and sampling the cores a job uses (/proc)."""
from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py

ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / ".venv" / "bin"
PYTHON = str(BIN / "python")
RESULTS = Path(__file__).resolve().parent / "results"


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def machine() -> dict:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch
    from mpi4py import MPI
    return {"cpu": model or platform.processor(), "cores": len(os.sched_getaffinity(0)),
            "torch_default_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__,
            "mpi": MPI.Get_library_version().strip().splitlines()[0]}


def world_size(config: str, fronts: int) -> int:
    out = subprocess.run([str(BIN / "moe-mpi"), "layout", "--config", config, "-F", str(fronts), "--world-size"],
                         check=True, capture_output=True, text=True)
    return int(out.stdout.strip())


def mpiexec(n: int, *args: str) -> list[str]:
    """MPICH's mpiexec without ``-disable-auto-cleanup``: with it, hydra (MPICH 5.0.2) sends SIGUSR1 to
    the ranks still running whenever a rank exits, even with status 0, and a rank that gets it after
    ``moe-mpi score`` has put back the default SIGUSR1 action (between the closing barrier and exit)
    dies of it: the job fails with "signal 10" after writing a complete output.  Auto-cleanup only
    matters when a rank dies, which a benchmark reports as a failure anyway."""
    return [str(BIN / "mpiexec"), "-n", str(n), *args]


def score_cmd(fronts: int | None, inp: str, out: str, config: str, tokens: int, in_flight: int,
              trace: str | None = None) -> list[str]:
    """``fronts=None``: the 1-rank run; else the distributed launch of F + experts ranks."""
    opts = [inp, out, "--config", config, "-T", str(tokens), "--in-flight", str(in_flight),
            "--no-progress", "--overwrite"]
    if fronts is None:
        return [str(BIN / "moe-mpi"), "score", *opts]
    opts += ["--front-ranks", str(fronts)] + (["--trace", trace] if trace else [])
    return mpiexec(world_size(config, fronts), PYTHON, "-m", "mpi4py", "-m", "moe_mpi", "score", *opts)


FAILED_RUNS: list[dict] = []   # runs that failed and were retried; every results file lists them


def run_timed(cmd: list[str], env: dict | None = None, timeout: float = 600, retries: int = 1) -> tuple[float, float]:
    """Run to completion; returns (wall seconds, CPU seconds of all its processes, user + sys) of the
    attempt that succeeded.  A failed attempt is recorded in FAILED_RUNS and retried ``retries`` times;
    then the benchmark stops with the command's output."""
    for attempt in range(retries + 1):
        t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                              env={**os.environ, **(env or {})})
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode == 0:
            return time.perf_counter() - t0, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
        tail = (proc.stdout[-600:] + proc.stderr[-1400:]).strip()
        FAILED_RUNS.append({"command": " ".join(cmd), "exit_status": proc.returncode, "output_tail": tail,
                            "load": load_average()})
        print(f"  run failed (exit status {proc.returncode}){', retrying' if attempt < retries else ''}: "
              f"{tail.splitlines()[-1] if tail else ''}", flush=True)
    sys.exit(f"failed (exit status {proc.returncode}): {' '.join(cmd)}\n--- stdout:\n{proc.stdout[-2000:]}"
             f"\n--- stderr:\n{proc.stderr[-3000:]}")


def run(cmd: list[str], env: dict | None = None, timeout: float = 600, retries: int = 1) -> float:
    """``run_timed``'s wall seconds."""
    return run_timed(cmd, env, timeout, retries)[0]


def failures_md() -> list[str]:
    if not FAILED_RUNS:
        return []
    lines = ["## Failed runs (retried)", ""]
    for f in FAILED_RUNS:
        last = f["output_tail"].splitlines()
        lines.append(f"- exit status {f['exit_status']} (load {f['load'][0]}): `{f['command'][:160]}`"
                     f"{' ...' if len(f['command']) > 160 else ''}: {last[-1] if last else ''}")
    return lines + [""]


def read_attrs(path: str) -> dict:
    with h5py.File(path, "r") as f:
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
    attrs["metrics"] = json.loads(attrs["metrics"]) if "metrics" in attrs else None
    return attrs


def md_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Markdown table; columns are (key, header, format spec; '' for text)."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    rule = "|" + "|".join("---:" if f else "---" for _, _, f in columns) + "|"
    body = []
    for r in rows:
        cells = [("n/a" if r.get(k) is None else (format(r[k], f) if f else str(r[k]))) for k, _, f in columns]
        body.append("| " + " | ".join(cells) + " |")
    return "\n".join([head, rule, *body])


def write_results(stem: str, markdown: str, data: dict) -> tuple[Path, Path]:
    RESULTS.mkdir(parents=True, exist_ok=True)
    md, js = RESULTS / f"{stem}.md", RESULTS / f"{stem}.json"
    md.write_text(markdown.rstrip() + "\n")
    js.write_text(json.dumps(data, indent=2, default=float) + "\n")
    return md, js


class ProcPoller:
    """A daemon thread that calls ``poll()`` every ``period`` s while its ``with`` block runs."""

    def __init__(self, period: float):
        self.period = period
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def poll(self) -> None:
        raise NotImplementedError

    def _loop(self) -> None:
        while not self.stop.is_set():
            self.poll()
            time.sleep(self.period)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


class CoreSampler(ProcPoller):
    """Samples, every ``period`` s, the CPU time of the whole box (/proc/stat) and of each process
    carrying ``tag`` in its environment (this job: mpiexec, its proxy and every rank, a rank known by
    its PMI_RANK), so that a window of the run splits into cores this job used, per rank, and cores
    other jobs used."""

    def __init__(self, tag: str, period: float = 0.2):
        super().__init__(period)
        self.tag = tag.encode()
        self.hz = os.sysconf("SC_CLK_TCK")
        self.samples: list[tuple[float, float, dict]] = []   # (time.time(), box busy s, {pid: CPU s})
        self.ranks: dict[int, int | None] = {}               # pid -> PMI_RANK (None: launcher, 1-rank run)
        self.strangers: set[int] = set()                     # pids without the tag: other jobs

    def box_busy_s(self) -> float:
        f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = f[3] + f[4]                                    # idle + iowait
        return (sum(f[:8]) - idle) / self.hz

    def job_s(self) -> dict:
        seen = {}
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            pid = int(d)
            try:
                if pid in self.strangers:
                    continue
                if self.ranks.get(pid) is None:     # again until it has a rank: fork comes before exec
                    env = Path(f"/proc/{d}/environ").read_bytes()
                    if self.tag not in env:
                        # our own child between fork and exec still shows our environment: ask again
                        ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
                        if ppid != os.getpid():
                            self.strangers.add(pid)
                        continue
                    fields = dict(kv.split(b"=", 1) for kv in env.split(b"\0") if b"=" in kv)
                    self.ranks[pid] = int(fields[b"PMI_RANK"]) if b"PMI_RANK" in fields else None
                stat = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()
                seen[pid] = (int(stat[11]) + int(stat[12])) / self.hz     # utime + stime
            except (OSError, IndexError, ValueError):
                continue
        return seen

    def poll(self) -> None:
        self.samples.append((time.time(), self.box_busy_s(), self.job_s()))

    def window(self, start: float, end: float) -> dict | None:
        """Average cores busy in [start, end] (wall-clock times): the whole box, this job, the rest, and
        CPU seconds of each rank of the job in the window."""
        inside = [s for s in self.samples if start <= s[0] <= end]
        if len(inside) < 2 or inside[-1][0] - inside[0][0] < 0.5:
            return None
        (t0, b0, p0), (t1, b1, p1) = inside[0], inside[-1]
        cpu = {pid: p1[pid] - p0.get(pid, p1[pid]) for pid in p1}     # processes alive at both ends
        per_rank = {self.ranks[pid]: c for pid, c in cpu.items() if self.ranks.get(pid) is not None}
        box, job = (b1 - b0) / (t1 - t0), sum(cpu.values()) / (t1 - t0)
        return {"box_cores_busy": box, "job_cores": job, "other_cores": max(0.0, box - job),
                "seconds": t1 - t0, "rank_cpu_s": {str(r): c for r, c in sorted(per_rank.items())}}
