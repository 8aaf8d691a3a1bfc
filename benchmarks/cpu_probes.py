"""The measurements behind the CPU calibration (``calibrate_cpu.py`` runs them): the GEMM rate of the
``small`` preset's own matmul mix in one-thread processes, one at a time or many at once; copy
bandwidth and the cost of a small op; MPI latency and bandwidth between two ranks, and a one-row round
trip through ``MPITransport`` waiting as the runtime does.  The GEMM and MPI workers run as
subprocesses of this file:

    python benchmarks/cpu_probes.py gemm --config small -T 512 --seq-len 128 --seconds 8
    mpiexec -n 2 python benchmarks/cpu_probes.py mpi OUT.json --config small
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
from cpu_common import PYTHON, ROOT  # noqa: E402

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
    cmd = [PYTHON, str(HERE), "gemm", "--config", config, "-T", str(tokens), "--seq-len", str(seq_len),
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


def main() -> None:
    ap = argparse.ArgumentParser(description="a worker of the CPU calibration")
    ap.add_argument("worker", choices=["gemm", "mpi"])
    ap.add_argument("out", nargs="?", help="mpi: where the rank 0 writes its JSON")
    ap.add_argument("--config", default="small")
    ap.add_argument("-T", "--micro-batch-tokens", type=int, default=512)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--seconds", type=float, default=8.0)
    args = ap.parse_args()
    if args.worker == "gemm":
        return gemm_worker(args.config, args.micro_batch_tokens, args.seq_len, args.seconds)
    from moe_mpi.config import ModelConfig
    return mpi_worker(args.out, ModelConfig.load(args.config).hidden_size)


if __name__ == "__main__":
    main()
