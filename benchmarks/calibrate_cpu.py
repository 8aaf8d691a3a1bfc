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
import statistics
import subprocess
import sys
import time

from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_common import (BIN, FAILED_RUNS, PYTHON, RESULTS, ROOT, failures_md, load_average,  # noqa: E402
                        machine, md_table, mpiexec, run, world_size, write_results)
from cpu_probes import gemm_concurrent, single_thread_misc  # noqa: E402

PROBES = Path(__file__).resolve().parent / "cpu_probes.py"


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
        run(mpiexec(2, PYTHON, str(PROBES), "mpi", str(mpi_out), "--config", args.config))
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
