"""The performance model against the 4-GPU paper-width slice: calibrate a hardware profile from the GPU
benchmarks' own measurements, predict every distributed run of ``gpu_end_to_end``, compare.

    python benchmarks/validate_gpu.py                 # reads benchmarks/results/gpu_*_<card>.json
    python benchmarks/validate_gpu.py --card nvidia-h200

Runs on any machine: it only reads results files.  The profile (``results/gpu_hardware_<card>.json``,
which ``moe-mpi plan --hardware`` accepts) takes, all from the GPU results files:

* ``peak_tflops``: the matrix-product peak measured in the end-to-end run;
* ``mfu``: the expert MLP's rate at the rows an expert gets per step (``gpu_expert_mlp``) / its peak;
* ``mem_bw_tbs``, ``mem_bw_util``: the measured copy bandwidth, and the share of it the expert reaches
  at one token (weights streamed);
* ``intra_gbs``, ``msg_overhead_us``: our NCCL transport's bandwidth per GPU at the slice's micro-batch
  and the host time to post one NCCL send and one receive (``gpu_exchange``);
* ``op_overhead_us``: the host time per kernel, fitted so the model's one-process time per
  micro-batch equals the one-process run's (the only number taken from the end-to-end file besides the
  peak).  The distributed runs are then predicted, never fitted.

The prediction is the plan's cycle (its busiest server, or Little's law with the micro-batches in flight)
and, because ranks share GPUs here (8 expert ranks on 1-2 GPUs, or a front and two experts per GPU), the
busiest GPU's device work per step (``analytic.device_load_s``), whichever is longer.
Writes ``results/validation_gpu_<card>.md`` and ``.json``.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cpu_common import md_table  # noqa: E402
from gpu_common import RESULTS  # noqa: E402
from moe_mpi.config import ModelConfig  # noqa: E402
from moe_mpi.perf import analytic, costs, hardware, simulate  # noqa: E402
from moe_mpi.perf.analytic import Layout  # noqa: E402


def load(name: str, card: str, where: Path) -> dict:
    path = where / f"{name}_{card}.json"
    if not path.exists():
        raise SystemExit(f"{path}: missing; run benchmarks/gpu_suite.sh on a GPU machine first")
    return json.loads(path.read_text())


def expert_rate(mlp: dict, rows: float) -> tuple[float, float]:
    """(TFLOP/s, GB/s) of the runtime's expert at the measured size nearest ``rows``."""
    got = [r for r in mlp["rows"] if r["variant"] == "runtime"]
    near = min(got, key=lambda r: abs(np.log(r["tokens"]) - np.log(max(rows, 1))))
    one = min(got, key=lambda r: r["tokens"])
    return near["tflops"], one["gbps"]


def exchange_rate(xch: dict, tokens: int) -> tuple[float, float]:
    """(GB/s per GPU of our NCCL transport at the micro-batch nearest ``tokens``, host us per message)."""
    got = [r for r in xch["results"] if r["transport"] == "nccl"]
    near = min(got, key=lambda r: abs(r["tokens"] - tokens))
    post = xch["post_overhead_us"]
    return near["gbps_per_gpu"], post["nccl_send_post_us"] + post["nccl_recv_post_us"]


def one_process_s(cfg: ModelConfig, hw: hardware.Hardware, T: int, S: int) -> tuple[float, int]:
    """The model's time for one micro-batch in one process (front work, then every expert of every MoE
    layer on its rows, nothing sent), and the kernels it launches."""
    st = analytic.stage_times(cfg, hw, Layout(1, T, 1, S))
    b = hardware.DTYPE_BYTES[hw.dtype]
    ops = sum(p.n_ops for p in (costs.attention(cfg, T, S, b), costs.embed(cfg, T, b), costs.lm_head(cfg, T, b)))
    ops = (cfg.num_hidden_layers - 1) * costs.attention(cfg, T, S, b).n_ops + ops
    ops += (cfg.num_hidden_layers - cfg.n_moe_layers) * costs.dense_mlp(cfg, T, b).n_ops
    ops += cfg.n_moe_layers * (costs.router(cfg, T, b).n_ops + costs.combine(cfg, T, b).n_ops
                               + costs.shared_experts(cfg, T, b).n_ops
                               + cfg.n_routed_experts * costs.expert(cfg, 1.0, b).n_ops)
    return float(st.front_stage_s.sum() + st.expert_rank_s.sum()), ops


def host_floor(window_s: float, fronts: list[tuple[float, float, float]]) -> tuple[float, float]:
    """(front 0's, the other fronts' mean) host seconds per micro-batch: the window of wall time less the
    time each front's trace spent waiting for answers, over the micro-batches it scored there; ``fronts``
    holds (wait seconds, io seconds, micro-batches), front 0 first.  With one front, the others' is front
    0's less its writing (its io spans)."""
    busy = [(window_s - wait) / n for wait, _, n in fronts]
    if len(busy) == 1:
        return busy[0], busy[0] - fronts[0][1] / fronts[0][2]
    return busy[0], float(np.mean(busy[1:]))


def front_host_s(run: dict, T: int) -> tuple[float, float]:
    """``host_floor`` over a whole run (start-up included)."""
    spans = run["trace_seconds_by_category"]
    fronts = sorted(k for k in spans if k.startswith("front "))
    n = run["tokens"] / (len(fronts) * T)
    return host_floor(run["elapsed_s"], [(spans[f].get("wait", 0.0), spans[f].get("io", 0.0), n) for f in fronts])


def front_host_steady_s(run: dict) -> tuple[float, float] | None:
    """``host_floor`` past the run's start-up: over the window of its last three quarters of results
    (``gpu_e2e_trace.steady_state``).  None for results without that window (runs before it was
    recorded)."""
    fronts, window = run.get("steady_fronts"), run.get("steady_window_s")
    if not fronts or not window or not all(v["reads"] for v in fronts.values()):
        return None
    return host_floor(window, [(fronts[f]["wait_s"], fronts[f]["io_s"], fronts[f]["reads"]) for f in sorted(fronts)])


def placement(name: str, F: int, n_experts: int, n_gpus: int) -> list[int]:
    """GPU of every rank (fronts first) as gpu_end_to_end launched it."""
    if "GPUs shared" in name:
        return [r % n_gpus for r in range(F + n_experts)]
    k = min(F, n_gpus - 1)
    return [f % k for f in range(F)] + [k + e % (n_gpus - k) for e in range(n_experts)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--card", default="nvidia-h200")
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--gpus", type=int, default=4,
                    help="which end-to-end file: gpu_end_to_end_<card> (4 GPUs) or gpu_end_to_end_<N>gpus_<card>")
    ap.add_argument("--calibrate-on", default=None,
                    help="the run whose trace gives the fronts' host time per micro-batch (default: "
                         "'distributed, 2 fronts' on 4 GPUs, 'distributed, 1 fronts, 8 in flight' on 2, "
                         "else the first run whose name starts so)")
    args = ap.parse_args()
    where = Path(args.results)
    tag = args.card if args.gpus == 4 else f"{args.gpus}gpus_{args.card}"
    e2e = load("gpu_end_to_end", tag, where)
    runs = {name: r for name, r in e2e["runs"].items() if re.match(r"distributed, (\d+) fronts", name)}
    if args.calibrate_on is None:     # that run, else the first whose name starts so, else the first
        preferred = "distributed, 2 fronts" if args.gpus == 4 else "distributed, 1 fronts, 8 in flight"
        args.calibrate_on = preferred if preferred in runs else next(
            (n for n in runs if n.startswith(preferred)), next(iter(runs), preferred))
    if args.calibrate_on not in runs:     # before anything is written
        raise SystemExit(f"--calibrate-on {args.calibrate_on!r}: not a distributed run of the results ({list(runs)})")
    mlp, xch = (load(n, args.card, where) for n in ("gpu_expert_mlp", "gpu_exchange"))
    cfg = ModelConfig.from_dict(e2e["config"], e2e["config"].get("name", "paper-slice"))
    T, S = e2e["micro_batch_tokens"], e2e["seq_len"]
    n_gpus = e2e["environment"].get("gpus_visible", 4) if "environment" in e2e else 4
    peak = float(np.mean(list(e2e["peak_tflops_per_gpu"].values())))
    rows = T * cfg.num_experts_per_tok / cfg.n_routed_experts          # per expert per step, one front
    tflops, gbps_1 = expert_rate(mlp, rows)
    link_gbs, post_us = exchange_rate(xch, T)
    profile = {"name": f"gpu-calibrated-{args.card}", "base": "h200", "peak_tflops": round(peak, 1),
               "mfu": round(min(1.0, tflops / peak), 4), "mem_bw_tbs": round(mlp["copy"]["gbps"] / 1e3, 4),
               "mem_bw_util": round(min(1.0, gbps_1 / mlp["copy"]["gbps"]), 4), "ranks_per_node": None,
               "intra_gbs": round(link_gbs, 2), "msg_overhead_us": round(post_us, 1), "op_overhead_us": 0.0,
               "dtype": "bfloat16"}
    hw0 = hardware.from_dict(profile, profile["name"])
    one = e2e["runs"]["one process"]
    n_mb = one["tokens"] / T
    meas_one = one["elapsed_s"] / n_mb
    base_one, ops = one_process_s(cfg, hw0, T, S)
    profile["op_overhead_us"] = round(max(0.0, (meas_one - base_one) / ops * 1e6), 2)
    profile["_comment"] = (
        f"calibrated by benchmarks/validate_gpu.py from gpu_end_to_end_{tag}.json and "
        f"gpu_expert_mlp/gpu_exchange_{args.card}.json: "
        f"peak = end-to-end run's matmul peak; mfu = runtime expert at {rows:.0f} rows ({tflops:.0f} TFLOP/s) / "
        f"peak; mem_bw = copy bandwidth, util = expert at 1 token; intra_gbs = our NCCL transport per GPU at "
        f"{T} tokens; msg_overhead = NCCL send + receive post; op_overhead fitted to the one-process run "
        f"({1e3 * meas_one:.2f} ms per micro-batch against {1e3 * base_one:.2f} ms of roofline over {ops} kernels)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    hw_path = out / f"gpu_hardware_{tag}.json"
    hw_path.write_text(json.dumps(profile, indent=2) + "\n")
    hw = hardware.load(hw_path)

    n_experts = cfg.n_moe_layers * cfg.n_routed_experts
    writer_s, other_s = front_host_s(e2e["runs"][args.calibrate_on], T)
    steady_floor = front_host_steady_s(e2e["runs"][args.calibrate_on])
    steady_table = []
    err = lambda x, m: 100 * (x - m) / m     # noqa: E731  (prediction vs measurement, %)
    table = []
    for name, r in runs.items():
        F = int(re.match(r"distributed, (\d+) fronts", name).group(1))
        M = int(re.search(r"(\d+) in flight", name).group(1)) if "in flight" in name else e2e["in_flight"]
        lay = Layout(F, T, M, S)
        devices = placement(name, F, n_experts, n_gpus)
        pl = analytic.plan(cfg, hw, lay)
        dev = analytic.device_load_s(cfg, hw, lay, devices)
        analytic_tps = F * T / max(pl.cycle_s, max(dev.values()))
        floor = [writer_s] + [other_s] * (F - 1)
        sim = simulate.simulate(cfg, hw, lay, n_micro_batches=max(16 * M, 64), devices=devices,
                                front_host_s=floor, gpu_sharing="turns")
        slices = simulate.simulate(cfg, hw, lay, n_micro_batches=max(16 * M, 64), devices=devices,
                                   front_host_s=floor, gpu_sharing="slices")
        meas_tps = r["tokens_per_s"]
        meas_p50 = r.get("latency_p50_ms", float("nan")) / 1e3
        meas_mean = M * F * T / meas_tps         # Little's law: M micro-batches of each front always in flight
        table.append({"run": name + (" (calibration: fit)" if name == args.calibrate_on else ""),
                      "calibration": name == args.calibrate_on, "F": F, "M": M, "meas_tps": meas_tps,
                      "sim_tps": sim.tokens_per_s, "err_tps": err(sim.tokens_per_s, meas_tps),
                      "slices_tps": slices.tokens_per_s, "err_slices": err(slices.tokens_per_s, meas_tps),
                      "analytic_tps": analytic_tps, "err_analytic": err(analytic_tps, meas_tps),
                      "meas_p50": meas_p50, "sim_p50": sim.latency_p50_s,
                      "err_p50": err(sim.latency_p50_s, meas_p50),
                      "slices_p50": slices.latency_p50_s, "err_slices_p50": err(slices.latency_p50_s, meas_p50),
                      "meas_mean": meas_mean, "sim_mean": sim.latency_s,
                      "err_mean": err(sim.latency_s, meas_mean),
                      "front_util": sim.front_util, "expert_util": sim.expert_util_max})
        if r.get("steady_tokens_per_s"):     # results since the start-up columns: the rate past start-up
            table[-1].update(meas_steady=r["steady_tokens_per_s"],
                             err_steady=err(sim.tokens_per_s, r["steady_tokens_per_s"]))
            if steady_floor is not None:     # and the host floor past start-up too
                sfloor = [steady_floor[0]] + [steady_floor[1]] * (F - 1)
                ssim, sslices = (simulate.simulate(cfg, hw, lay, n_micro_batches=max(16 * M, 64), devices=devices,
                                                   front_host_s=sfloor, gpu_sharing=sharing)
                                 for sharing in ("turns", "slices"))
                steady_table.append({"run": table[-1]["run"], "calibration": name == args.calibrate_on,
                                     "meas": r["steady_tokens_per_s"], "sim": ssim.tokens_per_s,
                                     "err": err(ssim.tokens_per_s, r["steady_tokens_per_s"]),
                                     "slices": sslices.tokens_per_s,
                                     "err_slices": err(sslices.tokens_per_s, r["steady_tokens_per_s"]),
                                     "first": r.get("first_result_s")})
    cols = [("run", "run", ""), ("meas_tps", "measured tokens/s", ".0f"), ("sim_tps", "simulated", ".0f"),
            ("err_tps", "error %", "+.0f"), ("slices_tps", "simulated, time slices", ".0f"),
            ("err_slices", "error %", "+.0f"), ("analytic_tps", "analytic (no host time)", ".0f"),
            ("err_analytic", "error %", "+.0f"), ("meas_p50", "latency p50 (s)", ".3f"),
            ("sim_p50", "simulated p50", ".3f"), ("err_p50", "error %", "+.0f"),
            ("slices_p50", "time slices p50", ".3f"), ("err_slices_p50", "error %", "+.0f"),
            ("meas_mean", "mean (s, Little)", ".3f"), ("sim_mean", "simulated mean", ".3f"),
            ("err_mean", "error %", "+.0f")]
    if any("meas_steady" in t for t in table):
        cols[2:2] = [("meas_steady", "measured past start-up", ".0f"), ("err_steady", "simulated vs it, %", "+.0f")]
    predicted = [t for t in table if not t["calibration"]]
    within = lambda key: sum(abs(t[key]) <= 25 for t in predicted)     # noqa: E731
    n_gpus_word = {2: "2-GPU", 4: "4-GPU"}.get(n_gpus, f"{n_gpus}-GPU")
    lines = [f"# Performance model vs the {n_gpus_word} paper-width slice ({e2e['environment']['card']})", "",
             f"Profile `{hw_path.name}` (from the GPU results files; `moe-mpi plan --hardware "
             f"benchmarks/results/{hw_path.name}` takes it): `{json.dumps({k: v for k, v in profile.items() if k != '_comment'})}`.",
             "", profile["_comment"] + ".", "",
             f"One process, one micro-batch of {T} tokens: model {1e3 * base_one:.2f} ms of device roofline + "
             f"{ops} kernels x {profile['op_overhead_us']:.1f} us = {1e3 * meas_one:.2f} ms, the measured time "
             "(this is the fit).", "",
             f"Each distributed run of `gpu_end_to_end_{tag}` predicted by the pipeline simulator "
             "(`moe_mpi.perf.simulate`) with two measured inputs beyond the profile: the GPU of every rank, "
             "and a floor of host time per micro-batch under each front's "
             f"stages, taken from one run's trace (`{args.calibrate_on}`: wall time minus the time the front "
             f"waited for answers, per micro-batch: {1e3 * writer_s:.1f} ms on front 0, which also writes the "
             f"outputs, {1e3 * other_s:.1f} ms on the others"
             + (", front 0's less its writing" if args.calibrate_on.startswith("distributed, 1 fronts") else "")
             + "). That run is the calibration, the others are predictions. 'simulated': ranks on one GPU take "
             "turns on it (one rank's work at a time, never idle while one has work); 'time slices': every "
             "process on a GPU shared by k runs at 1/k of it all the time (`gpu_sharing=\"slices\"`, the "
             "other bound, for processes that always hold a kernel there). The analytic column is "
             "`moe-mpi plan`'s steady state with the busiest GPU's summed device work, and no host time. "
             "Latency is per front, from a micro-batch taking its slot to its head finishing.", "",
             md_table(table, cols), "",
             *(["'Measured past start-up': the run's tokens/s over the last three quarters of its results, from "
                "its trace (`gpu_e2e_trace.steady_state`); the simulator's rate is a steady state, while the "
                "host floor it is given comes from the whole calibration run, start-up included.", ""]
               if any("meas_steady" in t for t in table) else []),
             f"Predicted runs within 25%: tokens/s {within('err_tps')} of {len(predicted)} with turns "
             f"({within('err_slices')} with time slices), median latency {within('err_p50')} of {len(predicted)} "
             f"({within('err_slices_p50')}). The measured mean latency comes from Little's law (M micro-batches "
             "of every front in flight, all the time); the runs record only the median and p99, and their "
             "p99 is 4-10x the median."]
    lines += ["", "How processes share a GPU here (`gpu_sharing_<card>.md`, measured on 2 H200s without MPS): a "
                  "process's matrix products run 2.0x slower while one other process on its GPU waits in an "
                  "NCCL receive, 3.0x with two (a spinning NCCL kernel takes its time slices like work does); "
                  "a chain that syncs with the host every 8 products runs 4.4x and 7.7x slower (each time its "
                  "queue runs dry it waits a time slice per busy neighbour); a neighbour computing with gaps "
                  "costs 1.05-1.6x. So neither bound is right for every layout: a front alone on its GPU and "
                  "experts that hold no kernel while idle take turns; a front sharing its GPU with experts "
                  "(`GPUs shared`), or with another front whose receives spin, sits between turns and time "
                  "slices, and pays a time slice per host sync on top. The layouts with a front on every GPU "
                  "next to its experts are where the model misses. The fronts' host time is a measured input "
                  "(its floor includes the front's own waits on its GPU inside compute spans), not derived "
                  "from the code."]
    if steady_table:
        sp = [t for t in steady_table if not t["calibration"]]
        lines += ["", "## Past start-up", "",
                  f"The same runs past their start-up: measured over the last three quarters of their results, "
                  f"simulated (turns, and time slices) with the host floor taken from the calibration run over the same part of "
                  f"it ({1e3 * steady_floor[0]:.1f} ms per micro-batch on front 0, {1e3 * steady_floor[1]:.1f} "
                  f"ms on the others).", "",
                  md_table(steady_table, [("run", "run", ""), ("first", "first results (s)", ".2f"),
                                          ("meas", "measured past start-up, tokens/s", ".0f"),
                                          ("sim", "simulated", ".0f"), ("err", "error %", "+.0f"),
                                          ("slices", "simulated, time slices", ".0f"),
                                          ("err_slices", "error %", "+.0f")]), "",
                  f"Predicted runs within 25%: {sum(abs(t['err']) <= 25 for t in sp)} of {len(sp)} with turns "
                  f"({sum(abs(t['err_slices']) <= 25 for t in sp)} with time slices)."]
    text = "\n".join(lines) + "\n"
    (out / f"validation_gpu_{tag}.md").write_text(text)
    (out / f"validation_gpu_{tag}.json").write_text(json.dumps(
        {"profile": profile, "calibrated_on": args.calibrate_on, "front_host_s": [writer_s, other_s],
         "front_host_steady_s": steady_floor, "runs": table, "past_start_up": steady_table}, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
