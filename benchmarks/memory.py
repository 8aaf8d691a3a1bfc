"""Peak memory (RSS) of the 1-rank run as the input grows, and of every rank of a distributed run.

    .venv/bin/python benchmarks/memory.py

(a) The 1-rank run of the ``small`` preset on an input and on ones 4x and 10x larger (same sequence
    length, more sequences), each in a fresh process whose peak RSS is its ``ru_maxrss`` seen by a parent
    (``getrusage(RUSAGE_CHILDREN)``): memory should stay flat, since sequences stream through in
    micro-batches and results stream to the file.
(b) A distributed run per config (default ``small`` and ``tiny``, F = 1): every rank's process is found
    from outside (``/proc/PID/environ`` holds this benchmark's tag and ``PMI_RANK``) and its peak RSS
    (``VmHWM`` in ``/proc/PID/status``) polled until it exits.  An expert rank should hold one expert
    plus buffers plus the Python/torch runtime, never the model: each rank is shown against the model's
    parameter bytes, one expert's bytes and a bare runtime process (the same imports, no model), all
    measured or computed in the same run.

Results: ``benchmarks/results/cpu_memory.{md,json}``.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_common import (BIN, FAILED_RUNS, PYTHON, ROOT, ProcPoller, failures_md, load_average,  # noqa: E402
                        machine, md_table, run, score_cmd, write_results)

MB = 1e6
# A parent that runs one command and prints the peak RSS (KiB on Linux) of its finished children.
PEAK_OF = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)")
RUNTIME_ONLY = ("import numpy, h5py, torch, click, tqdm; from mpi4py import MPI; "
                "import moe_mpi.cli, moe_mpi.runtime.distributed, moe_mpi.runtime.single; "
                "torch.ones(1) @ torch.ones(1)")


def peak_rss_bytes(cmd: list[str], env: dict | None = None) -> tuple[float, float]:
    """(peak RSS of ``cmd`` in bytes, wall seconds), measured by a fresh parent process."""
    t0 = time.perf_counter()
    out = subprocess.run([PYTHON, "-c", PEAK_OF, *cmd], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, **(env or {})})
    if out.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{out.stderr[-3000:]}")
    return int(out.stdout.strip().splitlines()[-1]) * 1024.0, time.perf_counter() - t0


class RankWatcher(ProcPoller):
    """Polls /proc for processes carrying ``tag`` and PMI_RANK; keeps each rank's last VmHWM."""

    def __init__(self, tag: str, period: float = 0.1):
        super().__init__(period)
        self.tag = tag.encode()
        self.hwm: dict[int, int] = {}
        self.rss: dict[int, int] = {}
        self.pids: dict[int, int] = {}

    def poll(self) -> None:
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                env = Path(f"/proc/{d}/environ").read_bytes()
                if self.tag not in env:
                    continue
                fields = dict(kv.split(b"=", 1) for kv in env.split(b"\0") if b"=" in kv)
                if b"PMI_RANK" not in fields:
                    continue      # mpiexec and hydra's proxy carry the tag too
                rank = int(fields[b"PMI_RANK"])
                status = Path(f"/proc/{d}/status").read_text()
            except (OSError, ValueError):
                continue          # gone meanwhile
            kib = {line.split(":")[0]: int(line.split()[1]) for line in status.splitlines()
                   if line.startswith(("VmHWM", "VmRSS"))}
            if "VmHWM" in kib:
                self.hwm[rank] = max(self.hwm.get(rank, 0), kib["VmHWM"] * 1024)
                self.rss[rank] = kib["VmRSS"] * 1024
                self.pids[rank] = int(d)


def model_bytes(config: str, b: int = 4) -> dict:
    from moe_mpi.config import ModelConfig
    from moe_mpi.perf import costs
    cfg = ModelConfig.load(config)
    expert = costs.expert_params(cfg) * b
    front = costs.front_weight_bytes(cfg, b)
    return {"model": front + cfg.n_moe_layers * cfg.n_routed_experts * expert, "front": front, "expert": expert,
            "experts_all": cfg.n_moe_layers * cfg.n_routed_experts * expert}


def distributed(config: str, fronts: int, inp: str, out: str, tokens: int) -> dict:
    tag = f"moe_mpi_memory_{uuid.uuid4().hex}"
    cmd = score_cmd(fronts, inp, out, config, tokens, 4)
    with RankWatcher(tag) as watch:
        wall = run(cmd, env={"MOE_MPI_MEMORY_BENCH": tag})
    return {"hwm": watch.hwm, "wall": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description="peak RSS of the 1-rank run vs input size, and of every rank")
    ap.add_argument("--config", default="small", help="config of part (a)")
    ap.add_argument("--sequences", type=int, default=16, help="sequences of the smallest 1-rank input")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--scales", default="1,4,10", help="1-rank inputs: these multiples of --sequences")
    ap.add_argument("--dist-sequences", type=int, default=64, help="sequences of the distributed runs' input")
    ap.add_argument("-T", "--micro-batch-tokens", type=int, default=512)
    ap.add_argument("--dist-configs", default="small,tiny", help="configs of part (b), F = 1")
    args = ap.parse_args()
    t_start = time.perf_counter()
    loads = {"start": load_average()}
    work = Path(tempfile.mkdtemp(prefix="cpu_memory_"))
    moe = [str(BIN / "moe-mpi")]
    print(f"memory benchmark; load average {loads['start']}", flush=True)

    # (a) 1-rank, input and 10x input; one thread so the larger run's time stays predictable on a busy box.
    one_rank = []
    base_rss, _ = peak_rss_bytes([PYTHON, "-c", RUNTIME_ONLY])
    scales = [int(x) for x in args.scales.split(",")]
    for n in (k * args.sequences for k in scales):
        inp = str(work / f"in_{n}.h5")
        run(moe + ["make-inputs", inp, "--config", args.config, "--sequences", str(n), "--seq-len",
                   str(args.seq_len), "--seed", "1"])
        load = load_average()
        rss, wall = peak_rss_bytes(score_cmd(None, inp, str(work / f"out_{n}.h5"), args.config,
                                             args.micro_batch_tokens, 4), env={"OMP_NUM_THREADS": "1"})
        one_rank.append({"sequences": n, "tokens": n * args.seq_len, "peak_rss_MB": rss / MB, "wall_s": wall,
                         "load_1min": load[0], "over_runtime_MB": (rss - base_rss) / MB})
        print(f"  1-rank, {n} x {args.seq_len}: peak RSS {rss / MB:.0f} MB ({wall:.0f} s)", flush=True)
    mb = model_bytes(args.config)
    for r in one_rank:
        r["model_MB"] = mb["model"] / MB
        r["ratio_to_first"] = r["peak_rss_MB"] / one_rank[0]["peak_rss_MB"]

    # (b) every rank of a distributed run
    dist = {}
    for config in args.dist_configs.split(","):
        inp = str(work / f"in_dist_{config}.h5")
        run(moe + ["make-inputs", inp, "--config", config, "--sequences", str(args.dist_sequences), "--seq-len",
                   str(args.seq_len), "--seed", "1"])
        load = load_average()
        res = distributed(config, 1, inp, str(work / f"out_dist_{config}.h5"), args.micro_batch_tokens)
        from moe_mpi.config import ModelConfig
        from moe_mpi.parallel.topology import Layout
        layout = Layout.of(ModelConfig.load(config), 1)
        mbc = model_bytes(config)
        ranks = []
        for rank in range(layout.world_size):
            role = layout.role(rank)
            hwm = res["hwm"].get(rank)
            holds = mbc["front"] if role.kind == "front" else mbc["expert"]
            ranks.append({"rank": rank, "role": "front" if role.kind == "front" else
                          f"expert L{role.layer} E{role.expert}",
                          "peak_rss_MB": None if hwm is None else hwm / MB,
                          "over_runtime_MB": None if hwm is None else (hwm - base_rss) / MB,
                          "weights_held_MB": holds / MB, "model_MB": mbc["model"] / MB,
                          "rss_over_model": None if hwm is None else hwm / mbc["model"]})
        expert_rss = [r["peak_rss_MB"] for r in ranks if r["role"].startswith("expert") and r["peak_rss_MB"]]
        dist[config] = {"world": layout.world_size, "ranks": ranks, "wall_s": res["wall"], "load_1min": load[0],
                        "model_bytes": mbc, "expert_rss_MB_min": min(expert_rss), "expert_rss_MB_max": max(expert_rss),
                        "ranks_seen": len(res["hwm"])}
        print(f"  distributed {config} ({layout.world_size} ranks): expert ranks {min(expert_rss):.0f}-"
              f"{max(expert_rss):.0f} MB, front {ranks[0]['peak_rss_MB']:.0f} MB", flush=True)
    loads["end"] = load_average()

    env = machine()
    lines = ["# Peak memory (RSS) on CPU", "",
             f"Machine: {env['cpu']}, {env['cores']} cores, torch {env['torch']}, {env['mpi']}. Load average "
             f"{loads['start']} at the start, {loads['end']} at the end (shared box; memory does not depend on it).",
             "", f"A bare runtime process (Python + numpy, h5py, torch, mpi4py and moe_mpi imported, no model) peaks "
             f"at **{base_rss / MB:.0f} MB**: every rank pays this before it holds any weights.", "",
             f"## (a) 1-rank run, `{args.config}` preset: input size x{' / x'.join(map(str, scales))}", "",
             f"Model parameters (fp32): {mb['model'] / MB:.1f} MB ({mb['front'] / MB:.1f} MB front + "
             f"{mb['experts_all'] / MB:.1f} MB routed experts). Micro-batches of {args.micro_batch_tokens} tokens, "
             "OMP_NUM_THREADS=1.", "",
             md_table(one_rank, [("sequences", "sequences", "d"), ("tokens", "tokens", "d"),
                                 ("peak_rss_MB", "peak RSS (MB)", ".1f"), ("ratio_to_first", "x first", ".3f"),
                                 ("over_runtime_MB", "above bare runtime (MB)", ".1f"), ("model_MB", "model (MB)", ".1f"),
                                 ("wall_s", "job wall (s)", ".1f"), ("load_1min", "load (1 min)", ".2f")]), ""]
    for config, d in dist.items():
        mbc = d["model_bytes"]
        lines += [f"## (b) Distributed `{config}` run, F = 1, {d['world']} ranks: peak RSS of every rank", "",
                  f"Model parameters (fp32) {mbc['model'] / MB:.2f} MB; one expert {mbc['expert'] / MB:.3f} MB; "
                  f"a front's weights {mbc['front'] / MB:.2f} MB. Input {args.dist_sequences} x {args.seq_len}, "
                  f"micro-batches of {args.micro_batch_tokens} tokens; load (1 min) {d['load_1min']}; "
                  f"{d['ranks_seen']} of {d['world']} rank processes seen.", "",
                  md_table(d["ranks"], [("rank", "rank", "d"), ("role", "role", ""),
                                        ("peak_rss_MB", "peak RSS (MB)", ".1f"),
                                        ("over_runtime_MB", "above bare runtime (MB)", ".1f"),
                                        ("weights_held_MB", "weights it holds (MB)", ".3f"),
                                        ("model_MB", "whole model (MB)", ".2f"),
                                        ("rss_over_model", "RSS / model", ".2f")]), ""]
    lines += ["Peak RSS of a rank is its `VmHWM`, read from `/proc` while the job runs (the last reading before "
              "the process exits); of the 1-rank run, `ru_maxrss` of a fresh child. 'Above bare runtime' "
              "subtracts the bare runtime process's peak, measured in the same run; what is left is weights, "
              "buffers, MPI's shared-memory segments and allocator slack.", ""]
    lines += failures_md()
    text = "\n".join(lines)
    write_results("cpu_memory", text, {"failed_runs": FAILED_RUNS, "machine": env, "load_average": loads, "bare_runtime_rss_bytes": base_rss,
                                       "one_rank": one_rank, "model_bytes": mb, "distributed": dist,
                                       "wall_seconds": time.perf_counter() - t_start})
    print(text)
    print(f"wrote benchmarks/results/cpu_memory.md and .json in {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
