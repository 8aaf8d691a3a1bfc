"""Calibrate the performance model on this CPU box, then check its predictions against cpu_runtime.py.

    .venv/bin/python benchmarks/calibrate_cpu.py     # after benchmarks/cpu_runtime.py

Measures, side by side in one run:

* fp32 GEMM rate of one thread on the model's own shapes (every matmul of one micro-batch of the
  ``small`` preset, attention's SDPA included, weighted by how often the model runs each): one process
  alone, and per core when every core is busy: 2 processes, and as many processes as the distributed run
  has ranks (F + 12), all running the mix at once (their aggregate rate / cores);
* memory copy bandwidth and the fixed cost of one small torch op (one thread);
* MPI between two ranks (mpiexec -n 2): 8-byte ping-pong latency and bandwidth with plain mpi4py, and
  the round trip of a 1-row message through our ``MPITransport`` polled with the runtime's back-off
  (``Backoff``), which is what a rank waiting on an exchange really pays.

It writes ``results/cpu_hardware.json`` (a profile ``moe-mpi plan --hardware`` accepts: ``"base": "cpu"``
plus the measured keys), then runs ``moe-mpi plan`` for the layouts in ``results/cpu_runtime.json`` and
writes ``results/validation_cpu.md``: predicted vs measured tokens/s and micro-batch latency (p50).
Raw measurements: ``results/cpu_calibration.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_runtime import (BIN, FAILED_RUNS, PYTHON, RESULTS, ROOT, failures_md, load_average,  # noqa: E402
                         machine, md_table, mpiexec, run, world_size, write_results)

HERE = Path(__file__).resolve()


# --- the model's GEMM mix ---

def gemm_mix(config: str, tokens: int, seq_len: int) -> list[dict]:
    """Every matmul of one micro-batch of ``tokens`` tokens through the whole model: (name, rows, n, m,
    count).  SDPA is one entry, FLOP counted as the performance model counts them."""
    from moe_mpi.config import ModelConfig
    from moe_mpi.perf import costs
    cfg = ModelConfig.load(config)
    D, H, T = cfg.hidden_size, cfg.num_attention_heads, tokens
    L, L_moe, E, K = cfg.num_hidden_layers, cfg.n_moe_layers, cfg.n_routed_experts, cfg.num_experts_per_tok
    q = ([("q_proj", D, H * cfg.qk_head_dim)] if cfg.q_lora_rank is None else
         [("q_a_proj", D, cfg.q_lora_rank), ("q_b_proj", cfg.q_lora_rank, H * cfg.qk_head_dim)])
    attn = q + [("kv_a_proj", D, cfg.kv_lora_rank + cfg.qk_rope_head_dim),
                ("kv_b_proj", cfg.kv_lora_rank, H * (cfg.qk_nope_head_dim + cfg.v_head_dim)),
                ("o_proj", H * cfg.v_head_dim, D)]
    ops = [{"name": n, "rows": T, "n": a, "m": b, "count": L} for n, a, b in attn]
    ops.append({"name": "sdpa", "rows": T, "seq_len": seq_len, "count": L,
                "flops": costs.attention_score_flops_per_token(cfg, seq_len) * T})
    if L - L_moe:
        I = cfg.intermediate_size
        ops += [{"name": "dense_gate_up", "rows": T, "n": D, "m": I, "count": 2 * (L - L_moe)},
                {"name": "dense_down", "rows": T, "n": I, "m": D, "count": L - L_moe}]
    r, Im = T * K // E, cfg.moe_intermediate_size
    ops += [{"name": "router", "rows": T, "n": D, "m": E, "count": L_moe},
            {"name": "expert_gate_up", "rows": r, "n": D, "m": Im, "count": 2 * L_moe * E},
            {"name": "expert_down", "rows": r, "n": Im, "m": D, "count": L_moe * E},
            {"name": "lm_head", "rows": T, "n": D, "m": cfg.vocab_size, "count": 1}]
    for op in ops:
        op.setdefault("flops", 2.0 * op["rows"] * op.get("n", 0) * op.get("m", 0))
        if op["name"] == "sdpa":
            op["heads"], op["qk"], op["v"] = H, cfg.qk_head_dim, cfg.v_head_dim
    return ops


def make_op(op: dict):
    import torch
    import torch.nn.functional as F
    if op["name"] == "sdpa":
        B, S = max(1, op["rows"] // op["seq_len"]), op["seq_len"]
        q = torch.randn(B, op["heads"], S, op["qk"])
        k = torch.randn(B, op["heads"], S, op["qk"])
        v = torch.randn(B, op["heads"], S, op["v"])
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    x = torch.randn(op["rows"], op["n"])
    w = torch.randn(op["m"], op["n"]) * op["n"] ** -0.5
    return lambda: F.linear(x, w)


def schedule(ops: list[dict]) -> list[int]:
    """One micro-batch's ops (op i ``count`` times), spread evenly, so that any stretch of the loop
    runs them in about the model's proportions."""
    slots = [((k + 0.5) / op["count"], i) for i, op in enumerate(ops) for k in range(op["count"])]
    return [i for _, i in sorted(slots)]


def gemm_worker(config: str, tokens: int, seq_len: int, seconds: float) -> None:
    """One process, one thread: says 'ready', waits for a line on stdin, then runs the mix for
    ``seconds`` of wall time and prints the FLOP done, the wall and CPU seconds it took, and each op's
    median CPU time.  CPU time is what the rate per core is made of: it does not count time this
    process was runnable while other processes (its siblings, other jobs) had the cores."""
    import torch
    torch.set_num_threads(1)
    ops = gemm_mix(config, tokens, seq_len)
    fns = [make_op(op) for op in ops]
    order = schedule(ops)
    with torch.inference_mode():
        for fn in fns:
            fn()
        print("ready", flush=True)
        sys.stdin.readline()
        t0, c0 = time.perf_counter(), time.process_time()
        flops, per_op = 0.0, [[] for _ in ops]
        while time.perf_counter() - t0 < seconds:
            for i in order:
                cs = time.process_time()
                fns[i]()
                per_op[i].append(time.process_time() - cs)
                flops += ops[i]["flops"]
                if time.perf_counter() - t0 > seconds:
                    break
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(json.dumps({"flops": flops, "seconds": wall, "cpu_seconds": cpu,
                      "per_op_s": [statistics.median(t) if t else None for t in per_op]}), flush=True)


def gemm_concurrent(n: int, config: str, tokens: int, seq_len: int, seconds: float) -> dict:
    """``n`` one-thread processes running the mix at the same time; aggregate and per-process GFLOP/s."""
    cmd = [PYTHON, str(HERE), "--gemm-worker", "--config", config, "-T", str(tokens), "--seq-len", str(seq_len),
           "--seconds", str(seconds)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env)
             for _ in range(n)]
    for p in procs:
        if p.stdout.readline().strip() != "ready":
            sys.exit("gemm worker failed to start")
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    outs = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    per_proc = [o["flops"] / o["seconds"] / 1e9 for o in outs]
    per_cpu = [o["flops"] / o["cpu_seconds"] / 1e9 for o in outs]
    ops = gemm_mix(config, tokens, seq_len)
    # The mix's rate: the model's FLOP over the CPU time the model's op counts take at each op's median.
    med = [statistics.median(o["per_op_s"][i] for o in outs) for i in range(len(ops))]
    mix = sum(op["count"] * op["flops"] for op in ops) / sum(op["count"] * t for op, t in zip(ops, med))
    return {"processes": n, "aggregate_gflops": sum(per_proc), "per_process_gflops": statistics.mean(per_proc),
            "per_cpu_second_gflops": statistics.mean(per_cpu), "mix_gflops_per_cpu_second": mix / 1e9,
            "cpu_share": statistics.mean(o["cpu_seconds"] / o["seconds"] for o in outs),
            "per_op": [{"name": op["name"], "rows": op["rows"], "shape": f"{op.get('n', '')}x{op.get('m', '')}",
                        "count": op["count"], "gflops": op["flops"] / t / 1e9} for op, t in zip(ops, med)]}


# --- one thread: memory bandwidth and per-op overhead ---

def single_thread_misc() -> dict:
    """Copy bandwidth and the cost of a small op, one thread, in CPU time (robust to other jobs)."""
    import torch
    import torch.nn.functional as F
    torch.set_num_threads(1)
    n = 64 << 20
    src, dst = torch.ones(n // 4), torch.empty(n // 4)
    dst.copy_(src)
    ts = []
    for _ in range(10):
        t0 = time.process_time()
        dst.copy_(src)
        ts.append(time.process_time() - t0)
    copy_gbs = 2 * n / statistics.median(ts) / 1e9
    x, w = torch.randn(1, 8), torch.randn(8, 8)
    with torch.inference_mode():
        for _ in range(200):
            F.linear(x, w)
        ts = []
        for _ in range(20):
            t0 = time.process_time()
            for _ in range(200):
                F.linear(x, w)
            ts.append((time.process_time() - t0) / 200)
    return {"copy_gbs": copy_gbs, "copy_bytes": n, "op_overhead_us": statistics.median(ts) * 1e6}


# --- MPI between two ranks ---

def mpi_worker(out: str, transport_rows_hidden: int) -> None:
    import numpy as np
    import torch
    from mpi4py import MPI

    from moe_mpi.parallel.exchange import MPITransport
    from moe_mpi.parallel.topology import Communicators, Layout
    from moe_mpi.runtime.metrics import Backoff

    world = MPI.COMM_WORLD
    rank, peer = world.Get_rank(), 1 - world.Get_rank()
    comm = world.Dup()

    def pingpong(buf, iters: int) -> float:
        comm.Barrier()
        ts = []
        for _ in range(iters):
            t0 = time.perf_counter()
            if rank == 0:
                comm.Send([buf, MPI.BYTE], dest=peer, tag=3)
                comm.Recv([buf, MPI.BYTE], source=peer, tag=3)
            else:
                comm.Recv([buf, MPI.BYTE], source=peer, tag=3)
                comm.Send([buf, MPI.BYTE], dest=peer, tag=3)
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    res = {"latency_us": pingpong(np.zeros(8, np.uint8), 2000) / 2 * 1e6, "bandwidth": []}
    for size in (64 << 10, 512 << 10, 4 << 20, 32 << 20):
        buf = np.ones(size, np.uint8)
        pingpong(buf, 2)
        rtt = pingpong(buf, 20 if size < (8 << 20) else 8)
        res["bandwidth"].append({"bytes": size, "one_way_gbs": size / (rtt / 2) / 1e9})

    # A one-row exchange through the transport, each side waiting the way the runtime waits (Backoff).
    layout = Layout(n_fronts=1, n_moe_layers=1, n_experts=1)
    comms = Communicators.create(world, layout)
    tr = MPITransport(comms.layers, n_fronts=1, hidden=transport_rows_hidden, dtype=torch.float32)
    x = torch.randn(1, transport_rows_hidden)

    def wait(handle, how: str) -> None:
        backoff = Backoff()
        while not handle.test():
            if how == "backoff":
                backoff.pause()

    ts = {"spin": [], "backoff": []}
    step = 0
    for how in ("spin", "backoff") * 3:
        comm.Barrier()
        for _ in range(50):
            t0 = time.perf_counter()
            if rank == 0:
                wait(tr.dispatch(0, step, x, [0, 1]), how)
            else:
                recv = tr.expect(0, step, [0], [1])
                wait(recv, how)
                wait(tr.reply(0, step, [0], recv.rows()), how)
            ts[how].append(time.perf_counter() - t0)
            step += 1
    res["transport_one_row_round_trip_us"] = {k: statistics.median(v) * 1e6 for k, v in ts.items()}
    comms.free()
    comm.Free()
    if rank == 0:
        Path(out).write_text(json.dumps(res))


# --- prediction vs measurement ---

def measured_cpu(runs: list[dict], F: int, T: int) -> dict | None:
    """From cpu_runtime.json's runs of layout F: CPU seconds (from /proc, while scoring) per step of the
    front rank(s) per micro-batch, of the mean and busiest expert rank, and of the whole job; medians."""
    got = []
    for r in runs:
        c = r.get("cores_while_scoring")
        if r["layout"] != f"F={F}" or not c or not c.get("rank_cpu_s"):
            continue
        step_s = F * T / r["tokens_per_second"]
        cores = {int(k): v / c["seconds"] for k, v in c["rank_cpu_s"].items()}
        experts = [v for k, v in cores.items() if k >= F]
        got.append({"front": sum(v for k, v in cores.items() if k < F) / F * step_s,
                    "expert_mean": statistics.mean(experts) * step_s, "expert_max": max(experts) * step_s,
                    "job": c["job_cores"] * step_s, "job_cores": c["job_cores"], "other_cores": c["other_cores"]})
    return {k: statistics.median(g[k] for g in got) for k in got[0]} if got else None


def pieces(F: int, pl: dict, meas: dict, bd: dict, measured: dict, cores: int, n_mb_front: int) -> list[dict]:
    """The model's pieces against the measurement, per step (one micro-batch from every front)."""
    T = pl["micro_batch_tokens"]
    step_s = F * T / meas["tokens_per_second"]
    lay = f"F={F}"
    out = [{"layout": lay, "piece": "time per step, s (model: its bottleneck, shared cores)",
            "pred": pl["period_parts_s"].get("shared cores"), "meas": step_s, "kind": "wall"}]
    cpu = measured_cpu(measured["runs"], F, T)
    if cpu:
        out += [
            {"layout": lay, "piece": "front rank: compute per micro-batch, s", "kind": "CPU",
             "pred": pl["period_parts_s"]["front compute"], "meas": cpu["front"]},
            {"layout": lay, "piece": "expert rank: MLP per step, s (mean rank)", "kind": "CPU",
             "pred": pl["expert_mlp_s"], "meas": cpu["expert_mean"]},
            {"layout": lay, "piece": "expert rank: MLP per step, s (busiest rank)", "kind": "CPU",
             "pred": pl["expert_mlp_s"], "meas": cpu["expert_max"]},
            {"layout": lay, "piece": "whole job: CPU per step, s (all ranks)", "kind": "CPU",
             "pred": pl["period_parts_s"]["shared cores"] * cores, "meas": cpu["job"]},
            {"layout": lay, "piece": "cores this job had while scoring", "kind": "cores",
             "pred": float(cores), "meas": cpu["job_cores"]},
            {"layout": lay, "piece": "cores other jobs took meanwhile", "kind": "cores",
             "pred": 0.0, "meas": cpu["other_cores"]}]
    one = [r for r in measured["runs"] if r["layout"] == "1-rank, 1 thread" and r.get("cores_while_scoring")]
    if one:
        out.append({"layout": lay, "piece": "the same work in one process: 1-rank, 1 thread, CPU per step, s",
                    "kind": "CPU", "pred": pl["period_parts_s"]["shared cores"] * cores,
                    "meas": statistics.median(r["cores_while_scoring"]["job_cores"] * F * T / r["tokens_per_second"]
                                              for r in one)})
    out += [
        {"layout": lay, "piece": "front rank: compute spans per micro-batch, s", "kind": "wall",
         "pred": pl["period_parts_s"]["front compute"], "meas": bd.get("front", {}).get("compute", float("nan")) / n_mb_front},
        {"layout": lay, "piece": "expert rank: compute spans per step, s (mean rank)", "kind": "wall",
         "pred": pl["expert_mlp_s"], "meas": bd.get("expert", {}).get("compute", float("nan")) / n_mb_front}]
    return out



def plan(config: str, hw: str, F: int, T: int, M: int, S: int) -> dict:
    out = subprocess.run([str(BIN / "moe-mpi"), "plan", "--config", config, "--hardware", hw, "-F", str(F),
                          "-T", str(T), "--in-flight", str(M), "--seq-len", str(S), "--json", "--simulate"],
                         check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(out.stdout)


def pct(pred: float, meas: float) -> float:
    return 100.0 * (pred - meas) / meas


def main() -> None:
    ap = argparse.ArgumentParser(description="calibrate the performance model on this CPU box")
    ap.add_argument("--gemm-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mpi-worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--config", default="small")
    ap.add_argument("-T", "--micro-batch-tokens", type=int, default=None,
                    help="[default: cpu_runtime.json's, else 512]")
    ap.add_argument("--seq-len", type=int, default=None, help="[default: cpu_runtime.json's, else 128]")
    ap.add_argument("--seconds", type=float, default=8.0, help="length of each concurrent GEMM measurement")
    ap.add_argument("--runtime-json", default=str(RESULTS / "cpu_runtime.json"))
    ap.add_argument("--reuse", action="store_true",
                    help="take the measurements from results/cpu_calibration.json instead of measuring again; "
                         "only the predictions are redone")
    args = ap.parse_args()
    measured = json.loads(Path(args.runtime_json).read_text()) if Path(args.runtime_json).exists() else None
    T = args.micro_batch_tokens or (measured or {}).get("micro_batch_tokens", 512)
    S = args.seq_len or (measured or {}).get("seq_len", 128)
    if args.gemm_worker:
        return gemm_worker(args.config, T, S, args.seconds)
    if args.mpi_worker:
        from moe_mpi.config import ModelConfig
        return mpi_worker(args.mpi_worker, ModelConfig.load(args.config).hidden_size)

    t_start = time.perf_counter()
    M = (measured or {}).get("in_flight", 4)
    fronts = (measured or {}).get("fronts", [1, 2])
    world = world_size(args.config, fronts[0])
    if args.reuse:
        old = json.loads((RESULTS / "cpu_calibration.json").read_text())
        env, loads, misc, mpi = old["machine"], old["load_average"], old["single_thread"], old["mpi"]
        gemm = {int(k): v for k, v in old["gemm"].items()}
        cores = env["cores"]
        print(f"reusing the measurements of results/cpu_calibration.json ({env['cpu']}, {cores} cores)", flush=True)
    else:
        env = machine()
        cores = env["cores"]
        loads = {"start": load_average()}
        print(f"calibrating on {env['cpu']} ({cores} cores), load average {loads['start']}", flush=True)
        gemm = {}
        for n in sorted({1, cores, world}):
            gemm[n] = gemm_concurrent(n, args.config, T, S, args.seconds)
            print(f"  GEMM mix, {n:2d} process(es) at once: {gemm[n]['per_cpu_second_gflops']:.1f} GFLOP per "
                  f"CPU-second, {gemm[n]['aggregate_gflops']:.1f} GFLOP/s of wall time in all "
                  f"(load {load_average()[0]})", flush=True)
        misc = single_thread_misc()
        mpi_out = Path(RESULTS / ".cpu_mpi_calibration.tmp.json")
        run(mpiexec(2, PYTHON, str(HERE), "--mpi-worker", str(mpi_out), "--config", args.config))
        mpi = json.loads(mpi_out.read_text())
        mpi_out.unlink()
        loads["end"] = load_average()

    # The profile.  The model's "shared cores" term divides all ranks' work by the cores, so it wants the
    # rate a core gives while `world` ranks share the cores: FLOP per CPU-second of each of `world`
    # processes running at once (that counts what sharing costs a process, cache refills after a switch,
    # but not the time other jobs on the box took: the model assumes the cores are the job's).
    per_core_busy = gemm[world]["per_cpu_second_gflops"]
    from moe_mpi.config import ModelConfig
    cfg = ModelConfig.load(args.config)
    msg_bytes = T * cfg.num_experts_per_tok // cfg.n_routed_experts * cfg.hidden_size * 4
    bw = min(mpi["bandwidth"], key=lambda b: abs(b["bytes"] - msg_bytes))
    latency_rt = mpi["transport_one_row_round_trip_us"]["backoff"]
    profile = {
        "name": "cpu-calibrated", "base": "cpu",
        "_comment": (f"measured by benchmarks/calibrate_cpu.py on {env['cpu']}, {cores} cores, load average "
                     f"{loads['start']} -> {loads['end']}: matmul_gflops = fp32 GFLOP per CPU-second of {world} "
                     f"one-thread processes running the small preset's matmul mix at once "
                     f"(one process alone: {gemm[1]['per_cpu_second_gflops']:.1f}); mpi_gbs = mpi4py one-way "
                     f"bandwidth at {bw['bytes']} B (one expert's message); mpi_latency_us = half the round trip "
                     f"of a one-row exchange through MPITransport, waiting with the runtime's back-off "
                     f"(plain mpi4py: {mpi['latency_us']:.1f} us); op_overhead_us = one small torch op; "
                     f"mem_bw_tbs = one-thread copy bandwidth; msg_overhead_us left at the cpu preset's."),
        "matmul_gflops": round(per_core_busy, 2),
        "mpi_gbs": round(bw["one_way_gbs"], 2),
        "mpi_latency_us": round(latency_rt / 2, 1),
        "op_overhead_us": round(misc["op_overhead_us"], 1),
        "mem_bw_tbs": round(misc["copy_gbs"] / 1000, 4), "mem_bw_util": 1.0,
        "shared_cores": cores,
    }
    hw_path = RESULTS / "cpu_hardware.json"
    RESULTS.mkdir(parents=True, exist_ok=True)
    hw_path.write_text(json.dumps(profile, indent=2) + "\n")
    # A sensitivity check, not the calibration: the same profile with one process's rate on an idle core.
    idle_path = RESULTS / ".cpu_hardware_idle_core.tmp.json"
    idle_path.write_text(json.dumps({**profile, "name": "cpu-calibrated-idle-core",
                                     "matmul_gflops": round(gemm[1]["per_cpu_second_gflops"], 2)}))

    calib_rows = [
        *({"what": f"fp32 GEMM mix, {n} one-thread process{'es' if n > 1 else ''} at once: per CPU-second",
           "unit": "GFLOP/s per core", "value": gemm[n]["per_cpu_second_gflops"]} for n in sorted(gemm)),
        *({"what": f"fp32 GEMM mix, {n} process{'es' if n > 1 else ''} at once: wall-clock aggregate / {cores} cores "
                   "(less than the above when other jobs take the cores)",
           "unit": "GFLOP/s per core", "value": gemm[n]["aggregate_gflops"] / cores} for n in sorted(gemm)),
        {"what": "one-thread copy bandwidth (read + write)", "value": misc["copy_gbs"], "unit": "GB/s"},
        {"what": "one small torch op (F.linear 1x8x8)", "value": misc["op_overhead_us"], "unit": "us"},
        {"what": "mpi4py ping-pong latency, one way (8 B)", "value": mpi["latency_us"], "unit": "us"},
        *({"what": f"mpi4py bandwidth, one way, {b['bytes'] >> 10} KiB", "value": b["one_way_gbs"], "unit": "GB/s"}
          for b in mpi["bandwidth"]),
        {"what": "MPITransport one-row round trip, spinning on test()",
         "value": mpi["transport_one_row_round_trip_us"]["spin"], "unit": "us"},
        {"what": "MPITransport one-row round trip, runtime back-off", "value": latency_rt, "unit": "us"},
    ]
    per_op_rows = [{"op": o["name"], "rows": o["rows"], "shape": o["shape"], "count": o["count"],
                    **{f"p{n}": gemm[n]["per_op"][i]["gflops"] for n in gemm}}
                   for i, o in enumerate(gemm[1]["per_op"])]

    # --- predictions ---
    lines = [f"# Performance model vs measurement on this CPU box (`{args.config}` preset)", "",
             f"Machine: {env['cpu']}, {cores} cores, {env['mpi']}, torch {env['torch']}. Load average during "
             f"calibration {loads['start']} -> {loads['end']}"
             + (f"; during the measured runs (cpu_runtime.json) {measured['load_average_start']} -> "
                f"{measured['load_average_end']}" if measured else "")
             + ". The box is shared with other jobs.", "",
             "## Calibration (`benchmarks/results/cpu_hardware.json`)", "",
             md_table(calib_rows, [("what", "measured", ""), ("value", "value", ".2f"), ("unit", "unit", "")]), "",
             f"Profile: `{json.dumps({k: v for k, v in profile.items() if k != '_comment'})}`", "",
             f"GEMM rate per op (GFLOP per CPU-second, median, one thread), micro-batch of {T} tokens; columns = "
             "processes running the mix at once:", "",
             md_table(per_op_rows, [("op", "op", ""), ("rows", "rows", "d"), ("shape", "n x m", ""),
                                    ("count", "per micro-batch", "d")] +
                      [(f"p{n}", f"{n} proc", ".1f") for n in gemm]), ""]
    if not measured:
        lines += ["No `cpu_runtime.json` yet: run `benchmarks/cpu_runtime.py` first for the comparison."]
    else:
        by_layout = {s["layout"]: s for s in measured["summary"]}
        rows, parts = [], []
        for F in measured["fronts"]:
            meas = by_layout.get(f"F={F}")
            if meas is None:
                continue
            bd = measured["trace_breakdown"].get(f"F={F}", {}).get("seconds_per_rank", {})
            n_mb_front = -(-measured["sequences"] // F // max(1, T // S))
            for label, hw in (("cpu preset", "cpu"), ("calibrated", str(hw_path)),
                              ("calibrated, idle-core GEMM rate (sensitivity)", str(idle_path))):
                p = plan(args.config, hw, F, T, M, S)
                pl, sim = p["plan"], p["simulation"]
                rows.append({"layout": f"F={F} ({meas['world']} ranks)", "hardware": label,
                             "pred_tps": pl["tokens_per_s"], "sim_tps": sim["tokens_per_s"],
                             "meas_tps": meas["tokens_per_second"],
                             "err_tps": pct(pl["tokens_per_s"], meas["tokens_per_second"]),
                             "err_sim_tps": pct(sim["tokens_per_s"], meas["tokens_per_second"]),
                             "pred_lat": pl["latency_s"], "sim_lat": sim["latency_s"],
                             "meas_lat": meas["latency_p50_s"],
                             "err_lat": pct(pl["latency_s"], meas["latency_p50_s"]),
                             "bottleneck": pl["bottleneck"]})
                if label == "calibrated":
                    parts += pieces(F, pl, meas, bd, measured, cores, n_mb_front)
        # Host overhead: CPU-seconds the distributed ranks spent per CPU-second of the model's work, measured
        # on one layout and used to predict the others (never the layout it was measured on).
        overhead = {}
        for F in measured["fronts"]:
            cpu = measured_cpu(measured["runs"], F, T)
            work = next((p["pred"] for p in parts if p["layout"] == f"F={F}"
                         and p["piece"].startswith("whole job: CPU per step")), None)
            if cpu and work:
                overhead[F] = cpu["job"] / work
        cross = []
        for F in measured["fronts"]:
            meas = by_layout.get(f"F={F}")
            others = [G for G in overhead if G != F]
            if meas is None or not others:
                continue
            h = statistics.mean(overhead[G] for G in others)
            path = RESULTS / f".cpu_hardware_overhead_{F}.tmp.json"
            path.write_text(json.dumps({**profile, "name": "cpu-calibrated+overhead", "host_overhead": round(h, 3)}))
            p = plan(args.config, str(path), F, T, M, S)
            path.unlink()
            pl, sim = p["plan"], p["simulation"]
            label = f"calibrated + host overhead {h:.2f} measured at {', '.join(f'F={G}' for G in others)}"
            row = {"layout": f"F={F} ({meas['world']} ranks)", "hardware": label,
                   "pred_tps": pl["tokens_per_s"], "sim_tps": sim["tokens_per_s"],
                   "meas_tps": meas["tokens_per_second"],
                   "err_tps": pct(pl["tokens_per_s"], meas["tokens_per_second"]),
                   "err_sim_tps": pct(sim["tokens_per_s"], meas["tokens_per_second"]),
                   "pred_lat": pl["latency_s"], "sim_lat": sim["latency_s"], "meas_lat": meas["latency_p50_s"],
                   "err_lat": pct(pl["latency_s"], meas["latency_p50_s"]), "bottleneck": pl["bottleneck"],
                   "F": F, "overhead": h, "from": others}
            rows.append(row)
            cross.append(row)
        for p in parts:
            p["err"] = pct(p["pred"], p["meas"]) if p["pred"] and p["meas"] and p["meas"] == p["meas"] else None
        verdict = []
        for F in measured["fronts"]:
            cal = next((r for r in rows if r["layout"].startswith(f"F={F} ") and r["hardware"] == "calibrated"), None)
            got = {p["piece"].split(",")[0]: p for p in parts if p["layout"] == f"F={F}"}
            if cal is None:
                continue
            ok = abs(cal["err_tps"]) <= 25 and abs(cal["err_lat"]) <= 25
            line = (f"- **F={F}: {'within' if ok else 'not within'} 25%.** The calibrated model predicts "
                    f"{cal['pred_tps']:.0f} tokens/s against {cal['meas_tps']:.0f} measured ({cal['err_tps']:+.0f}%), "
                    f"latency {cal['pred_lat']:.3f} s against {cal['meas_lat']:.3f} s ({cal['err_lat']:+.0f}%).")
            one, job = got.get("the same work in one process: 1-rank"), got.get("whole job: CPU per step")
            if one and job:
                line += (f" Its work per step ({one['pred']:.3f} CPU-s) matches the 1-rank, 1-thread run doing the "
                         f"same tokens ({one['meas']:.3f} CPU-s, model {one['err']:+.0f}%), but the distributed "
                         f"ranks spent {job['meas']:.3f} CPU-s per step ({job['meas'] / job['pred']:.2f}x the "
                         "model's work)")
                oth = got.get("cores other jobs took meanwhile")
                if oth:
                    line += (f" and had {got['cores this job had while scoring']['meas']:.2f} of {cores} cores "
                             f"(other jobs took {oth['meas']:.2f})")
                if oth:
                    have = got["cores this job had while scoring"]["meas"]
                    line += (f". Together: {cal['pred_tps']:.0f} / {job['meas'] / job['pred']:.2f} x "
                             f"{have:.2f}/{cores} cores = {cal['pred_tps'] / (job['meas'] / job['pred']) * have / cores:.0f} "
                             f"tokens/s, against {cal['meas_tps']:.0f} measured")
                line += ("; this profile leaves out that overhead of many processes on few cores (waiting "
                         "ranks waking up to poll, context switches, per-call overheads of small matmuls, "
                         "cache sharing), which the profile's host_overhead carries in the rows below, and "
                         "the model has no term for other jobs on the box.")
            verdict.append(line)
        for r in cross:
            ok = abs(r["err_tps"]) <= 25 and abs(r["err_lat"]) <= 25
            verdict.append(
                f"- **F={r['F']} with the host overhead measured at {', '.join(f'F={G}' for G in r['from'])} "
                f"({r['overhead']:.2f} CPU-s per CPU-s of modelled work): {'within' if ok else 'not within'} 25%.** "
                f"Predicted {r['pred_tps']:.0f} tokens/s against {r['meas_tps']:.0f} measured ({r['err_tps']:+.0f}%; "
                f"simulated {r['err_sim_tps']:+.0f}%), latency {r['pred_lat']:.3f} s against {r['meas_lat']:.3f} s "
                f"({r['err_lat']:+.0f}%). The overhead comes from the other layout's CPU accounting, so this run's "
                "own measurement is not used to predict it.")
        lines += [
            "## Predicted vs measured", "",
            f"`moe-mpi plan --config {args.config} --hardware H -F F -T {T} --in-flight {M} --seq-len {S} --simulate` "
            f"against the medians in `cpu_runtime.json` ({measured['summary'][0]['runs']} round(s)). "
            "Error = (predicted - measured) / measured.", "",
            md_table(rows, [("layout", "layout", ""), ("hardware", "hardware", ""),
                            ("pred_tps", "model tokens/s", ".0f"), ("sim_tps", "simulated", ".0f"),
                            ("meas_tps", "measured", ".0f"), ("err_tps", "error (model)", "+.0f"),
                            ("err_sim_tps", "error (sim)", "+.0f"), ("pred_lat", "model latency (s)", ".3f"),
                            ("sim_lat", "simulated (s)", ".3f"), ("meas_lat", "measured p50 (s)", ".3f"),
                            ("err_lat", "error (model)", "+.0f"), ("bottleneck", "model's bottleneck", "")]),
            "", "Errors are in %.", "", *verdict, "",
            "## Piece by piece (calibrated profile)", "",
            md_table(parts, [("layout", "layout", ""), ("piece", "piece", ""), ("kind", "measured as", ""),
                             ("pred", "model", ".4f"),
                             ("meas", "measured", ".4f"), ("err", "error %", "+.0f")]), "",
            "Measured as: `CPU` = user + sys time of the rank processes while scoring (sampled from /proc by "
            "cpu_runtime.py, medians over rounds), per micro-batch or per step; `wall` = seconds inside the "
            "trace's compute spans (first round), which include time a rank was runnable without a core; "
            "`cores` = average cores in use while scoring. The model's pieces are CPU work on a core it "
            "assumes free; its whole-job work per step is its shared-cores time x cores. A step is one "
            "micro-batch from every front: F x T / tokens/s of wall time.", ""]
        idle_path.unlink()
    lines += failures_md()
    text = "\n".join(lines)
    (RESULTS / "validation_cpu.md").write_text(text.rstrip() + "\n")
    write_results("cpu_calibration", "\n".join(lines[:lines.index("## Predicted vs measured")]
                                                if "## Predicted vs measured" in lines else lines),
                  {"machine": env, "load_average": loads, "gemm": {str(k): v for k, v in gemm.items()},
                   "single_thread": misc, "mpi": mpi, "profile": profile, "failed_runs": FAILED_RUNS,
                   "wall_seconds": old["wall_seconds"] if args.reuse else time.perf_counter() - t_start})
    print(text)
    print(f"\nwrote {hw_path}, {RESULTS / 'validation_cpu.md'}, {RESULTS / 'cpu_calibration.md'} and .json "
          f"in {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
