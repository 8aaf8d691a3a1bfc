"""The markdown report of ``gpu_exchange.py``, built from what its results JSON holds (so that
``--report JSON`` can rebuild it): the table, the target and by how much it is missed beside the
design's ceiling, and the host time per post."""
from __future__ import annotations

from cpu_common import md_table
from gpu_exchange_baselines import PAIRS


TARGET = 0.9      # the exchange against the best NCCL all-to-all at paper-width micro-batches (issue 5)


def verdict(results: list[dict]) -> str:
    """By how much the IPC transport (what ``auto`` takes on one node) and the NCCL transport (across
    nodes) miss or meet the target at each size, beside the point-to-point ceiling of NCCL's design
    measured in the same run."""
    lines = []
    for name, label in (("ipc", "the IPC transport (`auto` on one node)"), ("nccl", "the NCCL transport")):
        parts = []
        for tokens in sorted({r["tokens"] for r in results}):
            at = {r["transport"]: r for r in results if r["tokens"] == tokens}
            if name not in at or at[name].get("vs_best_a2a") is None:
                continue
            ours = at[name]["vs_best_a2a"]
            ceiling = at.get(PAIRS, {}).get("vs_best_a2a") if name == "nccl" else None
            parts.append(f"{tokens} tokens {ours:.2f}x" + ("" if ceiling is None else f" (ceiling {ceiling:.2f}x)"))
        if parts:
            worst = min(r["vs_best_a2a"] for r in results if r["transport"] == name and r.get("vs_best_a2a"))
            met = "**met**" if worst >= TARGET else "**missed**"
            lines.append(f"{label}: {met}; " + ", ".join(parts))
    if not lines:
        return ""
    return (f"Target: our exchange at {TARGET}x the best NCCL all-to-all's bandwidth. Measured: "
            + "; ".join(lines) + ". For NCCL the ceiling says how much of the gap is the design "
            "(one NCCL kernel per message on a 2-rank communicator of its own, where the all-to-all moves "
            "every peer's rows, both directions, in one kernel per rank) and how much the protocol."
            + cpu_speed(results))


def cpu_speed(results: list[dict]) -> str:
    """How fast the IPC runs' hosts were, where the run recorded it: each size's slowest rank's CPU
    work loop against the fastest any rank took in the run (about full speed)."""
    ipc = [r for r in results if r["transport"] == "ipc" and r.get("cpu_work_ms")]
    if not ipc:
        return ""
    fastest = fastest_cpu_ms(results)
    parts = ", ".join(f"{r['tokens']} tokens {max(r['cpu_work_ms']) / fastest:.1f}x" for r in ipc)
    return (f" The IPC transport's pace is its slowest rank's host (the table below): that rank's CPU work "
            f"loop took, against the fastest any rank took in this run ({fastest:.2f} ms): {parts}. Near 2x "
            "the rank's vCPU ran at about half speed, as the lent machines' do at times "
            "(`gpu_exchange_cpu_speed_nvidia-h200.md`).")


def fastest_cpu_ms(results: list[dict]) -> float:
    """The fastest CPU work loop any rank took in the run (about full speed), where recorded."""
    return min(min(r["cpu_work_ms"]) for r in results if r.get("cpu_work_ms"))


def report(data: dict) -> str:
    """The markdown of one run, from what its JSON holds (``--report`` rebuilds it from the file)."""
    args, env, layout = data["args"], data["environment"], data["layout"]
    results, overhead, settings = data["results"], data.get("post_overhead_us", {}), data.get("settings", {})
    n_moe, n_fronts, n_experts = layout["n_moe_layers"], layout["n_fronts"], layout["n_experts"]
    world = n_fronts + n_moe * n_experts
    # runs since --warm-up (2026-11-27): that many micro-batches untimed first, round trips checked after the timing
    warm_up = min(args["micro_batches"], args["warm_up"] or args["micro_batches"]) if "warm_up" in args else None
    cols = [("transport", "transport", ""), ("tokens", "tokens / micro-batch / front", "d"),
            ("message_mb", "MB per message", ".1f"), ("seconds", "time (s)", ".4f"),
            ("gbps", "GB/s (all GPUs)", ".1f"), ("gbps_per_gpu", "GB/s per GPU", ".1f"),
            ("vs_best_a2a", "vs best NCCL a2a", ".2f"), ("wrong_micro_batches", "wrong", "")]
    if any("host_in_transport" in r for r in results):
        cols.append(("host_in_transport", "busiest host in transport calls", ".2f"))
    md = [f"# Exchange: dispatch + combine between {world} ranks ({env['card']})", "",
          f"{n_fronts} fronts + {n_moe} MoE layer(s) x {n_experts} experts, one rank per "
          f"{'GPU' if args['device'] == 'cuda' else 'CPU process'}; hidden {args['hidden']} bf16, top-{args['top_k']}; "
          f"{args['micro_batches']} micro-batches per front, {args['in_flight']} in flight, best of {args['repeats']}"
          + (f", each transport and baseline warmed up with {warm_up} micro-batches untimed. " if warm_up else ". ") +
          "Bytes counted: every row's dispatch and combine. `a2a`: one all_to_all_single for the dispatch and "
          "one for the combine per micro-batch; `a2a fused`: one call carrying a dispatch and the previous "
          "combine. `" + PAIRS + "`: the same micro-batches over the transport's own 2-rank NCCL groups, "
          "posted in step order straight through torch.distributed with every row count known in advance "
          "(no control messages, no go-aheads): the ceiling of this transport's design, so its distance "
          "from `nccl` is the cost of the protocol and its distance from the all-to-all the cost of one "
          "communicator per pair and direction. `ipc`: each message copied into a ring the receiver lent "
          "through CUDA IPC (by our copy kernel where a rank's peers are on two or more other GPUs, else by a "
          "copy engine; `MOE_MPI_IPC_SM_COPY_MB` sets the size from which the kernel copies), its arrival "
          "and the slot's return written by the GPUs' streams into mailboxes in shared "
          "host memory (no MPI call per message; the protocol since 66820d9). "
          "'wrong' counts micro-batches whose round trip did not return the bytes sent ("
          + ("every element compared once each repeat's timing has stopped" if warm_up else
             "added up on the device, read at the end") + "). "
          "'busiest host in transport calls': the largest fraction of the "
          "time that one rank's host spent inside the transport's calls (posting, testing, taking "
          "results), for the best repeat; it counts the tests a waiting rank spins in, so near 1 it does "
          "not by itself say that a host sets the pace (runs since 2026-11-28 split it below).", "",
          md_table(results, cols), "", *([verdict(results), ""] if verdict(results) else []),
          "Host time to post one operation (mean of 200, microseconds): "
          + (", ".join(f"{k} {v:.1f}" for k, v in overhead.items()) or "not measured") + " (`nccl_*`: "
          "as the transport posts, through torch.distributed from its side stream after an event; `pg_*`: "
          "ProcessGroup.send/recv called directly). Each message "
          "of the NCCL transport costs one NCCL post on each side plus an MPI control message (and, "
          "towards a front, a go-ahead, so that no receive waits on a GPU that is computing), which is "
          "its distance from the point-to-point row, largest at small micro-batches.", "",
          *host_breakdown(results, n_fronts, args["micro_batches"]),
          *placement_lines(data.get("placement")),
          f"Environment: {env}; settings: {settings or 'defaults'}"]
    return "\n".join(md)


def host_breakdown(results: list[dict], n_fronts: int, micro_batches: int) -> list[str]:
    """Each rank's host microseconds a micro-batch inside the transports' calls, for the best repeat
    (runs since 2026-11-28 record it): posting, the host work a micro-batch needs, against polling,
    where a rank that waits for its peers spends the rest; with ``--host-breakdown``, the IPC
    transport's driver calls within them."""
    rows = []
    for r in results:
        per = r.get("host_us_per_micro_batch")
        if not per:
            continue
        for rank, post in enumerate(per["post"]):
            row = {"transport": r["transport"], "tokens": r["tokens"],
                   "rank": f"{rank} ({'front' if rank < n_fronts else 'expert'})", "post": post,
                   "poll": per["poll"][rank], "wall": r["seconds"] / micro_batches * 1e6}
            if r.get("cpu_work_ms"):
                row["cpu"] = r["cpu_work_ms"][rank]
            if "driver" in per:
                row.update(driver=per["driver"][rank], calls=per["driver_calls"][rank], python=post - per["driver"][rank])
            rows.append(row)
    if not rows:
        return []
    cols = [("transport", "transport", ""), ("tokens", "tokens", "d"), ("wall", "micro-batch, wall (us)", ".1f"),
            ("rank", "rank", ""), ("post", "posting (us)", ".1f"), ("poll", "polling (us)", ".1f")]
    if any("driver" in r for r in rows):
        cols += [("driver", "of posting and polling: driver calls (us)", ".1f"), ("calls", "driver calls", ".1f"),
                 ("python", "posting less driver calls (us)", ".1f")]
    speed = ""
    if any("cpu" in r for r in rows):
        cols.append(("cpu", "CPU work loop (ms)", ".2f"))
        fastest = fastest_cpu_ms(results)
        speed = (" 'CPU work loop': a fixed piece of Python work timed on the rank just before and just after "
                 "the repeat, the slower of the two (runs since 2026-11-28, fourth session): the rank's CPU "
                 f"speed. The fastest here, {fastest:.2f} ms, is about full speed; near twice that, the rank's "
                 "vCPU was running at half speed (the lent VMs' vCPUs at times do, for seconds on end: "
                 "`benchmarks/host_cpus.py`).")
    return ["Host time inside the transports' calls, microseconds a micro-batch, each rank, best repeat. "
            "Posting: dispatch and result on a front; expect, the joined take-out and reply on an expert "
            "(the work a micro-batch costs the host). Polling: tests, where a rank that waits for its peers "
            "or its GPU spends the time (so 'busiest host in transport calls' near 1 does not by itself "
            "mean a host is saturated)." + speed, "", md_table(rows, cols), ""]


def placement_lines(where: list[dict] | None) -> list[str]:
    """Where each rank's host ran (runs since 2026-11-28 record it)."""
    if not where:
        return []
    parts = []
    for rank, w in enumerate(where):
        text = f"rank {rank}: CPUs allowed {w['allowed']}, seen on {w['seen'] or '?'} (NUMA {w['seen_numa'] or '?'})"
        if w.get("gpu_near"):
            text += f", its GPU's CPUs {w['gpu_near']} (NUMA {w['gpu_numa'] or '?'})"
        parts.append(text)
    return ["Placement of the hosts (after the timed runs): " + "; ".join(parts) + ".", ""]
