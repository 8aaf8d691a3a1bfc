"""What the end-to-end benchmark reads from a distributed run's trace (``moe-mpi score --trace``):
seconds per span category and rank, and the start-up and the rate past it.

    python benchmarks/gpu_end_to_end.py --steady TRACE    # steady_state() of a saved trace
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np


def load(path: Path) -> tuple[dict[int, str], list[dict]]:
    """A run's trace (``--trace``, .json or .json.gz): each process's name (its rank's role) by pid, and
    the spans."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as f:
        trace = json.load(f)["traceEvents"]
    names = {e["pid"]: e["args"]["name"] for e in trace if e.get("ph") == "M" and e.get("name") == "process_name"}
    return names, [e for e in trace if e.get("ph") == "X"]


def trace_summary(path: Path) -> dict:
    """Per rank: seconds in each span category of the distributed run's trace."""
    names, events = load(path)
    per: dict[str, dict[str, float]] = {}
    for e in events:
        cat = per.setdefault(names.get(e["pid"], str(e["pid"])), {})
        cat[e["cat"]] = cat.get(e["cat"], 0.0) + e["dur"] / 1e6
    return per


def steady_state(path: Path, seq_len: int) -> dict | None:
    """When results first came and how fast they came after the start-up, from a run's trace: rank 0
    writes every micro-batch's results as they arrive ('write' spans, ``sequences`` each).  Returns the
    seconds from the start of scoring to the first write, the longest pause between two writes, and
    tokens/s over the last three quarters of the writes (the window from the write at the first quarter
    to the last); and per front, within that window, the seconds its spans waited for answers ('wait')
    and spent reading and writing ('io'), and the micro-batches it took up ('read' spans), from which
    ``validate_gpu.py`` takes a front's host time per micro-batch past start-up.  None without writes."""
    names, events = load(path)
    writes = sorted((e["ts"] + e["dur"], e.get("args", {}).get("sequences", 1)) for e in events if e["name"] == "write")
    if len(writes) < 4:
        return None
    t0 = min(e["ts"] for e in events)
    t = np.array([w for w, _ in writes], dtype=np.float64) / 1e6 - t0 / 1e6
    q = len(writes) // 4
    seqs = sum(n for _, n in writes[q + 1:])
    lo, hi = writes[q][0], writes[-1][0]          # the window, in the trace's microseconds
    fronts: dict[str, dict] = {}
    for e in events:
        name = names.get(e["pid"], "")
        if not name.startswith("front"):
            continue
        f = fronts.setdefault(name, {"wait_s": 0.0, "io_s": 0.0, "reads": 0})
        inside = max(0.0, min(hi, e["ts"] + e["dur"]) - max(lo, e["ts"])) / 1e6
        if e.get("cat") in ("wait", "io"):
            f[f"{e['cat']}_s"] += inside
        if e["name"].startswith("read") and lo <= e["ts"] < hi:
            f["reads"] += 1
    return {"first_result_s": float(t[0]), "longest_pause_s": float(np.diff(t).max()),
            "steady_tokens_per_s": seqs * seq_len / float(t[-1] - t[q]), "writes": len(writes),
            "steady_window_s": float(t[-1] - t[q]), "steady_fronts": dict(sorted(fronts.items()))}
