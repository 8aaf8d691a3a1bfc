"""CPU runtime benchmark: the 1-rank run against the distributed run of the same input, in one invocation.

    .venv/bin/python benchmarks/cpu_runtime.py            # small preset, 64 x 128 tokens, F = 1 and 2

One input (fixed seed) is scored by:

* ``1-rank``: the whole model in one process (``moe-mpi score``), torch's default threads;
* ``1-rank, 1 thread``: the same with ``OMP_NUM_THREADS=1``, the thread count every distributed rank gets;
* ``F=1``, ``F=2``: ``mpiexec -n F+12``, one rank per expert of each MoE layer, with ``--trace``.

The layouts run in rounds (1-rank, 1 thread, F=1, F=2, then again), so drifting load from other jobs
falls on all of them; each ratio is taken between runs of the same round.  Then the exchange probe
(``cpu_exchange.py``) times our transport's dispatch + combine against plain mpi4py on the same ranks.

On a box with fewer cores than ranks the distributed run's 13+ processes share the cores with each
other (and with whatever else runs there): the point is the ratio and where the time goes, not to beat
the 1-rank run.  Results: ``benchmarks/results/cpu_runtime.{md,json}``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_common import (BIN, FAILED_RUNS, PYTHON, RESULTS, CoreSampler, failures_md, load_average,  # noqa: E402
                        machine, md_table, mpiexec, read_attrs, run, run_timed, score_cmd, world_size,
                        write_results)


def max_logprob_diff(a: str, b: str) -> dict:
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        la, lb = fa["token_logprobs"][...], fb["token_logprobs"][...]
        sa, sb = fa["sequence_logprob"][...], fb["sequence_logprob"][...]
    same_mask = bool(np.array_equal(np.isnan(la), np.isnan(lb)))
    ok = ~np.isnan(la) & ~np.isnan(lb)
    return {"max_abs_token_logprob": float(np.abs(la[ok] - lb[ok]).max()),
            "max_abs_sequence_logprob": float(np.abs(sa - sb).max()), "nan_mask_equal": same_mask}


def trace_breakdown(path: str, n_fronts: int, n_experts: int) -> dict:
    """Where the ranks' time went (seconds per category, from the Chrome trace) and, per MoE-layer
    exchange, the front's dispatch -> resume time against the slowest expert's compute for that step."""
    events = [e for e in json.load(open(path))["traceEvents"] if e.get("ph") == "X"]
    per = defaultdict(lambda: defaultdict(float))
    for e in events:
        per["front" if e["pid"] < n_fronts else "expert"][e["cat"]] += e["dur"] * 1e-6
    counts = {"front": n_fronts, "expert": len({e["pid"] for e in events if e["pid"] >= n_fronts})}
    by_role = {role: {cat: round(t / counts[role], 4) for cat, t in cats.items()} for role, cats in per.items()}
    sent, resumed, expert = {}, {}, defaultdict(float)
    for e in events:
        a = e.get("args", {})
        if e["pid"] < n_fronts and e["cat"] == "send" and "layer" in a:
            sent[(e["pid"], a["step"], a["layer"])] = e["ts"] + e["dur"]
        elif e["pid"] < n_fronts and e["cat"] == "compute" and a.get("after_layer", -1) >= 0:
            resumed[(e["pid"], a["step"], a["after_layer"])] = e["ts"]
        elif e["pid"] >= n_fronts and e["cat"] == "compute":
            layer = (e["pid"] - n_fronts) // n_experts
            expert[(a["step"], layer)] = max(expert[(a["step"], layer)], e["dur"])
    trips, rest = [], []
    for key, t_sent in sent.items():
        if key in resumed:
            trip = (resumed[key] - t_sent) * 1e-6
            trips.append(trip)
            rest.append(trip - expert[(key[1], key[2])] * 1e-6)
    return {"seconds_per_rank": by_role, "exchanges": len(trips),
            "exchange_round_trip_p50_s": statistics.median(trips) if trips else None,
            "slowest_expert_compute_p50_s": statistics.median(
                [expert[(s, l)] * 1e-6 for (_, s, l) in sent if (s, l) in expert]) if expert else None,
            "round_trip_minus_expert_compute_p50_s": statistics.median(rest) if rest else None}


def exchange_probe(work: Path, experts: int, rows: str, hidden: int) -> list[dict]:
    """cpu_exchange.py with 1 front + ``experts`` ranks; spinning waits only if every rank has a core."""
    out = work / f"exchange_E{experts}.json"
    how = "spin" if 1 + experts <= len(os.sched_getaffinity(0)) else "backoff"
    run(mpiexec(1 + experts, PYTHON, str(Path(__file__).parent / "cpu_exchange.py"), str(out),
                "--experts", str(experts), "--rows", rows, "--hidden", str(hidden), "--dtypes", "float32,bfloat16",
                "--wait", how))
    return json.loads(out.read_text())


def summarise(runs: list[dict], name: str, ref: str) -> dict:
    mine = [r for r in runs if r["layout"] == name]
    tps = [r["tokens_per_second"] for r in mine]
    rounds = {r["round"]: r for r in runs if r["layout"] == ref}
    ratios = [r["tokens_per_second"] / rounds[r["round"]]["tokens_per_second"] for r in mine if r["round"] in rounds]
    m0 = mine[0]
    lat50 = [r["latency_p50_s"] for r in mine if r["latency_p50_s"] is not None]
    lat99 = [r["latency_p99_s"] for r in mine if r["latency_p99_s"] is not None]
    walls = [r["job_wall_s"] for r in mine]
    ref_walls = {r["round"]: r["job_wall_s"] for r in runs if r["layout"] == ref}
    ref_cpu = {r["round"]: r["job_cpu_s"] for r in runs if r["layout"] == ref}
    return {"layout": name, "world": m0["world"], "threads": m0["threads"], "runs": len(mine),
            "tokens_per_second": statistics.median(tps), "tps_min": min(tps), "tps_max": max(tps),
            "ratio_to_1rank": statistics.median(ratios) if ratios else None,
            "latency_p50_s": statistics.median(lat50) if lat50 else None,
            "latency_p99_s": statistics.median(lat99) if lat99 else None,
            "latency_mean_s": statistics.median(r["elapsed_seconds"] / r["micro_batches"] for r in mine),
            "job_wall_s": statistics.median(walls),
            "job_wall_ratio_to_1rank": statistics.median(
                [r["job_wall_s"] / ref_walls[r["round"]] for r in mine if r["round"] in ref_walls]),
            "job_cpu_s": statistics.median(r["job_cpu_s"] for r in mine),
            "job_cpu_ratio_to_1rank": statistics.median(
                [r["job_cpu_s"] / ref_cpu[r["round"]] for r in mine if r["round"] in ref_cpu]),
            "load_avg_1min": [r["load_before"][0] for r in mine],
            **scoring_cores(mine)}


def scoring_cores(runs: list[dict]) -> dict:
    """Medians over runs of the cores this job and other jobs used while scoring, and this job's CPU
    seconds per 1000 tokens scored (CPU cost, less sensitive to the load than wall time)."""
    got = [r for r in runs if r.get("cores_while_scoring")]
    if not got:
        return {"job_cores": None, "other_cores": None, "core_s_per_ktok": None}
    med = lambda key: statistics.median(r["cores_while_scoring"][key] for r in got)  # noqa: E731
    return {"job_cores": med("job_cores"), "other_cores": med("other_cores"),
            "core_s_per_ktok": statistics.median(r["cores_while_scoring"]["job_cores"] * 1000 / r["tokens_per_second"]
                                                 for r in got)}


def main() -> None:
    ap = argparse.ArgumentParser(description="1-rank vs distributed run of the small preset on this CPU box")
    ap.add_argument("--config", default="small")
    ap.add_argument("--sequences", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--micro-batch-tokens", "-T", type=int, default=512)
    ap.add_argument("--in-flight", type=int, default=4)
    ap.add_argument("--fronts", default="1,2", help="front-rank counts of the distributed runs")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of all layouts (fewer if over --budget)")
    ap.add_argument("--budget", type=float, default=280.0, help="seconds; no new round starts past it")
    ap.add_argument("--exchange-rows", default="8,64,512", help="rows per expert message in the probe")
    ap.add_argument("--exchange-hidden", type=int, default=7168, help="row width in the probe (paper: 7168)")
    args = ap.parse_args()

    t_start = time.perf_counter()
    from moe_mpi.config import ModelConfig
    cfg = ModelConfig.load(args.config)
    fronts = [int(f) for f in args.fronts.split(",")]
    layouts = [("1-rank", None, {}), ("1-rank, 1 thread", None, {"OMP_NUM_THREADS": "1"})]
    layouts += [(f"F={f}", f, {}) for f in fronts]
    work = Path(tempfile.mkdtemp(prefix="cpu_runtime_"))
    inp = str(work / "in.h5")
    run([str(BIN / "moe-mpi"), "make-inputs", inp, "--config", args.config, "--sequences", str(args.sequences),
         "--seq-len", str(args.seq_len), "--seed", "1"])
    n_mb = -(-args.sequences // max(1, args.micro_batch_tokens // args.seq_len))
    print(f"{args.config}: {args.sequences} x {args.seq_len} tokens, micro-batches of {args.micro_batch_tokens} "
          f"tokens, {args.in_flight} in flight; load average {load_average()}", flush=True)

    default_threads = machine()["torch_default_threads"]
    runs, outputs, traces = [], {}, {}
    round_walls: list[float] = []
    for rnd in range(args.rounds):
        spent = time.perf_counter() - t_start
        if rnd and spent + max(round_walls) > args.budget:
            print(f"round {rnd + 1} skipped: {spent:.0f} s spent, a round takes about {max(round_walls):.0f} s, "
                  f"budget {args.budget:.0f} s", flush=True)
            break
        t_round = time.perf_counter()
        for name, f, env in layouts:
            out = str(work / f"out_{name.replace(' ', '').replace(',', '_')}_{rnd}.h5")
            trace = str(work / f"trace_{name}_{rnd}.json") if f else None
            load = load_average()
            tag = f"cpu_runtime_{uuid.uuid4().hex}"
            with CoreSampler(tag) as cores:
                wall, cpu = run_timed(score_cmd(f, inp, out, args.config, args.micro_batch_tokens, args.in_flight,
                                                trace), {**env, "MOE_MPI_BENCH_TAG": tag})
            a = read_attrs(out)
            # The scoring phase ends when the output is renamed into place, `elapsed_seconds` after it began.
            done = os.path.getmtime(out)
            scoring = cores.window(done - float(a["elapsed_seconds"]), done)
            m = a["metrics"] or {}
            world = int(a["world_size"])
            runs.append({"layout": name, "round": rnd, "fronts": f, "world": world,
                         "threads": int(env.get("OMP_NUM_THREADS", default_threads))
                         if f is None else max(1, len(os.sched_getaffinity(0)) // world),
                         "tokens_per_second": float(a["tokens_per_second"]),
                         "elapsed_seconds": float(a["elapsed_seconds"]), "job_wall_s": wall, "job_cpu_s": cpu,
                         "micro_batches": m.get("micro_batches", n_mb),
                         "latency_p50_s": m.get("micro_batch_latency_p50_s"),
                         "latency_p99_s": m.get("micro_batch_latency_p99_s"),
                         "busy_fraction": m.get("busy_fraction"), "expert_rows_in": m.get("expert_rows_in"),
                         "load_before": load, "load_after": load_average(), "cores_while_scoring": scoring})
            outputs[(rnd, name)] = out
            if trace:
                traces.setdefault(name, trace)
            print(f"  round {rnd + 1} {name:17s} {a['tokens_per_second']:8.0f} tokens/s  "
                  f"(job {wall:5.1f} s, load {load[0]})", flush=True)
        round_walls.append(time.perf_counter() - t_round)

    names = [name for name, _, _ in layouts]
    summary = [summarise(runs, n, "1-rank") for n in names]
    by_round = {(r["round"], r["layout"]): r for r in runs}
    per_run = []
    for r in sorted(runs, key=lambda r: (r["round"], names.index(r["layout"]))):
        c = r.get("cores_while_scoring") or {}
        r = {**r, "round": r["round"] + 1}
        ref, ref1 = by_round.get((r["round"] - 1, "1-rank")), by_round.get((r["round"] - 1, "1-rank, 1 thread"))
        per_run.append({**r, "load": r["load_before"][0],
                        "x_1rank": r["tokens_per_second"] / ref["tokens_per_second"] if ref else None,
                        "x_1rank_1t": r["tokens_per_second"] / ref1["tokens_per_second"] if ref1 else None,
                        "latency_mean_s": r["elapsed_seconds"] / r["micro_batches"],
                        "job_cores": c.get("job_cores"), "other_cores": c.get("other_cores"),
                        "core_s_per_ktok": c["job_cores"] * 1000 / r["tokens_per_second"] if c else None})
    # every run against the 1-rank run of round 1
    agree = {f"{n} (round {rnd + 1})": max_logprob_diff(outputs[(0, "1-rank")], out)
             for (rnd, n), out in outputs.items() if (rnd, n) != (0, "1-rank")}
    for row in per_run:
        key = f"{row['layout']} (round {row['round']})"
        row["max_abs_dlogprob"] = agree[key]["max_abs_token_logprob"] if key in agree else 0.0
    breakdown = {n: trace_breakdown(traces[n], int(n[2:]), cfg.n_routed_experts) for n in traces}

    print(f"exchange probe: 1 front + 1 expert, then 1 front + {cfg.n_routed_experts} experts", flush=True)
    probe = exchange_probe(work, 1, args.exchange_rows, args.exchange_hidden)
    probe += exchange_probe(work, cfg.n_routed_experts, args.exchange_rows, args.exchange_hidden)
    load_end = load_average()

    # --- the tables ---
    env = machine()
    lines = [f"# CPU runtime: 1-rank vs distributed (`{args.config}` preset)", "",
             f"Machine: {env['cpu']}, {env['cores']} cores, torch {env['torch']}, {env['mpi']}. "
             f"Load average (1/5/15 min) at the start {runs[0]['load_before']}, at the end {load_end}: "
             "this box is shared with other jobs, so absolute rates move from run to run; compare within a round.",
             "",
             f"Input: {args.sequences} sequences x {args.seq_len} tokens (seed 1), micro-batches of "
             f"{args.micro_batch_tokens} tokens ({n_mb} per front at F=1), {args.in_flight} in flight per front, "
             f"fp32. {len(round_walls)} round(s) of every layout, one row per run; ratios are taken within a "
             "round, and every output is compared with round 1's 1-rank output.",
             "",
             f"**Read this first.** The distributed run puts {world_size(args.config, 1)}+ processes "
             f"(1 thread each) on {env['cores']} cores, shared with each other and with other jobs: the same "
             "work on the same cores plus start-up, exchanges and ranks waiting their turn for a core, so it "
             "cannot beat a 1-rank run that gets the cores, and is not meant to; what the table shows is the "
             "ratio and the overheads. Where a distributed row comes out ahead of `1-rank`, the 1-rank run lost "
             "more to the other jobs on the box than the distributed run lost to its overheads (torch's "
             "2 OpenMP threads stall whenever another process takes one of the cores); the `1-rank, 1 thread` "
             "row is the steadier reference.",
             "",
             md_table(per_run, [("round", "round", "d"), ("layout", "layout", ""), ("world", "ranks", "d"),
                                ("threads", "threads/rank", "d"), ("load", "load (1 min)", ".2f"),
                                ("tokens_per_second", "tokens/s", ".0f"), ("x_1rank", "x 1-rank", ".2f"),
                                ("x_1rank_1t", "x 1-rank 1 thread", ".2f"),
                                ("latency_p50_s", "mb latency p50 (s)", ".3f"), ("latency_p99_s", "p99 (s)", ".3f"),
                                ("latency_mean_s", "elapsed/mb (s)", ".3f"),
                                ("job_wall_s", "job wall incl. start-up (s)", ".1f"),
                                ("job_cpu_s", "job CPU incl. start-up (s)", ".1f"),
                                ("job_cores", "cores this job used while scoring", ".2f"),
                                ("other_cores", "cores other jobs used meanwhile", ".2f"),
                                ("core_s_per_ktok", "CPU s per 1k tokens while scoring", ".2f"),
                                ("max_abs_dlogprob", "max abs dlogprob vs 1-rank", ".2e")]),
             "",
             "Medians over rounds (what `calibrate_cpu.py` compares against): "
             + "; ".join(f"{s['layout']} {s['tokens_per_second']:.0f} tokens/s" for s in summary) + ".",
             "",
             "tokens/s = scored tokens / `elapsed_seconds` (after weights are built, as `score` reports it). "
             "Job wall and job CPU (user + sys of every process of the job, from `getrusage`) include start-up "
             "(imports, weights, MPI); CPU seconds move less with the load than wall time does. "
             "The cores columns sample /proc every 0.2 s during the scoring phase (the `elapsed_seconds` "
             "before the output appears): CPU time of this job's processes, and of the whole box minus "
             "this job. "
             "The 1-rank run records no per-micro-batch latency: `elapsed/mb` is its mean time per micro-batch, "
             "run one after another. The distributed latency is a micro-batch's admission-to-result time with "
             f"{args.in_flight} in flight, so it is about in-flight x the time per micro-batch.",
             ""]
    # busy fraction per rank
    dist_names = [n for n in names if n.startswith("F=")]
    roles = []
    for n in dist_names:
        r = next(r for r in runs if r["layout"] == n)
        roles += [k for k in (r["busy_fraction"] or {}) if k not in roles]
    busy_rows = []
    for role in roles:
        row = {"rank role": role}
        for n in dist_names:
            vals = [r["busy_fraction"].get(role) for r in runs if r["layout"] == n and r["busy_fraction"]]
            vals = [v for v in vals if v is not None]
            row[n] = statistics.median(vals) if vals else None
            rows_in = [r["expert_rows_in"].get(role) for r in runs if r["layout"] == n and r["expert_rows_in"]]
            row[n + " rows"] = rows_in[0] if rows_in and rows_in[0] is not None else None
        busy_rows.append(row)
    lines += ["## Busy fraction per rank (compute + posting sends, over the rank's wall time)", "",
              md_table(busy_rows, [("rank role", "rank role", "")] +
                       [c for n in dist_names for c in ((n, f"busy {n}", ".1%"), (n + " rows", f"rows in {n}", ".0f"))]),
              ""]
    # CPU per rank while scoring, per 1000 tokens
    tokens = args.sequences * args.seq_len
    cpu_rows = []
    for r in runs:
        c = r.get("cores_while_scoring")
        if r["round"] != 0 or not c:
            continue
        per_ktok = lambda cores: cores * 1000 / r["tokens_per_second"]  # noqa: E731
        row = {"layout": r["layout"], "job": per_ktok(c["job_cores"]), "other": c["other_cores"]}
        if r["fronts"]:
            F, cpu = r["fronts"], {int(k): v / c["seconds"] for k, v in c["rank_cpu_s"].items()}
            bd = breakdown[r["layout"]]["seconds_per_rank"]
            n_exp = r["world"] - F
            row.update({"fronts": per_ktok(sum(v for k, v in cpu.items() if k < F)),
                        "experts": per_ktok(sum(v for k, v in cpu.items() if k >= F)),
                        "front_spans": bd["front"].get("compute", 0) * F * 1000 / tokens,
                        "expert_spans": bd["expert"].get("compute", 0) * n_exp * 1000 / tokens})
            row["launcher"] = max(0.0, row["job"] - row["fronts"] - row["experts"])
        cpu_rows.append(row)
    lines += ["## CPU seconds per 1000 tokens while scoring (round 1)", "",
              md_table(cpu_rows, [("layout", "layout", ""), ("job", "whole job", ".3f"),
                                  ("fronts", "front rank(s)", ".3f"), ("experts", "expert ranks (all)", ".3f"),
                                  ("launcher", "mpiexec + proxy", ".3f"),
                                  ("front_spans", "front compute spans (wall)", ".3f"),
                                  ("expert_spans", "expert compute spans (wall)", ".3f"),
                                  ("other", "cores other jobs used", ".2f")]),
              "",
              "CPU time (user + sys from /proc) of each process in the scoring window, per 1000 tokens scored; "
              "the span columns are the wall time the trace puts inside compute spans, which includes time a "
              "rank was runnable but had no core. CPU beyond the 1-rank, 1-thread run's is the distributed "
              "run's overhead: polling and back-off wake-ups of waiting ranks, MPI, context switches, and "
              "smaller matmuls per call.",
              ""]
    # trace breakdown
    bd_rows = []
    for n, b in breakdown.items():
        for role, cats in b["seconds_per_rank"].items():
            bd_rows.append({"layout": n, "role": f"{role} (mean per rank)", **{c: cats.get(c) for c in
                                                                                ("compute", "send", "io", "wait")}})
    lines += ["## Where the time goes (from `--trace`, first round)", "",
              md_table(bd_rows, [("layout", "layout", ""), ("role", "ranks", ""), ("compute", "compute (s)", ".3f"),
                                 ("send", "posting sends (s)", ".3f"), ("io", "read/write (s)", ".3f"),
                                 ("wait", "waiting (s)", ".3f")]),
              "",
              md_table([{"layout": n, **b} for n, b in breakdown.items()],
                       [("layout", "layout", ""), ("exchanges", "MoE exchanges", "d"),
                        ("exchange_round_trip_p50_s", "dispatch -> front resumes, p50 (s)", ".4f"),
                        ("slowest_expert_compute_p50_s", "slowest expert's MLP, p50 (s)", ".4f"),
                        ("round_trip_minus_expert_compute_p50_s", "difference, p50 (s)", ".4f")]),
              "",
              "The round trip is what a front sees: from posting a micro-batch's dispatch to computing on the "
              "answers. It includes the expert's MLP, the transfers, the expert waiting for a core, and the "
              "front itself being busy with other micro-batches' attention when the answers arrive (it only "
              "looks between pieces of work), so the difference is an upper bound on exchange overhead.",
              ""]
    # exchange probe
    by = {(p["experts"], p["rows_per_expert"], p["dtype"], p["impl"]): p for p in probe}
    ex_rows = []
    for (E, rows, dtype, impl), p in by.items():
        if impl != "transport":
            continue
        raw, alloc = by[(E, rows, dtype, "raw")], by.get((E, rows, dtype, "raw-alloc"))
        ex_rows.append({"ranks": f"1 front + {E} expert{'s' if E > 1 else ''}", "wait": p.get("wait"),
                        "rows": rows, "dtype": dtype,
                        "MB": p["bytes_per_round_trip"] / 1e6, "transport": p["gbs_median"], "raw": raw["gbs_median"],
                        "alloc": alloc["gbs_median"] if alloc else None,
                        "ratio": p["gbs_median"] / raw["gbs_median"],
                        "t_us": p["round_trip_median_s"] * 1e6, "raw_us": raw["round_trip_median_s"] * 1e6})
    lines += [f"## The exchange's achieved bandwidth (rows of width {args.exchange_hidden}, paper width)", "",
              "`benchmarks/cpu_exchange.py` under mpiexec: the front dispatches `rows` rows to each expert through "
              "`MPITransport` on the runtime's per-layer communicator (`Communicators.create`), each expert "
              "`expect`s them and `reply`s them unchanged (no MLP); against plain mpi4py `Irecv`/`Isend` + "
              "`Waitall` of the same bytes between the same ranks on preallocated buffers (raw), and raw "
              "receiving into freshly allocated buffers (raw-alloc, as the transport does). Waiting: `spin` "
              "(transport polled without pause, raw with MPI's Waitall: the floor, used when every rank has a "
              "core) or `backoff` (both polled with the runtime's Backoff, as the runtime waits; used when ranks "
              "outnumber cores, where spinning ranks starve those with work). GB/s counts both "
              "directions: 2 x experts x rows x width x element size per round trip; medians of "
              "interleaved rounds.", "",
              md_table(ex_rows, [("ranks", "ranks", ""), ("wait", "waiting", ""), ("rows", "rows/expert", "d"), ("dtype", "dtype", ""),
                                 ("MB", "MB per round trip", ".2f"), ("transport", "transport GB/s", ".2f"),
                                 ("raw", "raw GB/s", ".2f"), ("alloc", "raw-alloc GB/s", ".2f"),
                                 ("ratio", "transport / raw", ".2f"), ("t_us", "transport round trip (us)", ".0f"),
                                 ("raw_us", "raw round trip (us)", ".0f")]),
              ""]
    lines += failures_md()
    text = "\n".join(lines)
    write_results("cpu_runtime", text, {"failed_runs": FAILED_RUNS,
        "config": args.config, "sequences": args.sequences, "seq_len": args.seq_len,
        "micro_batch_tokens": args.micro_batch_tokens, "in_flight": args.in_flight, "fronts": fronts,
        "machine": env, "load_average_start": runs[0]["load_before"], "load_average_end": load_end,
        "summary": summary, "runs": runs, "agreement": agree, "trace_breakdown": breakdown,
        "exchange_probe": probe, "wall_seconds": time.perf_counter() - t_start})
    print(text)
    print(f"\nwrote {RESULTS / 'cpu_runtime.md'} and .json in {time.perf_counter() - t_start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
