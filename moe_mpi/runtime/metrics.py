"""Per-rank timing: busy (compute) vs waiting, micro-batch latencies, and optional trace spans.

Spans become a Chrome/Perfetto trace (``--trace``): one process row per rank, ``X`` events in
microseconds since the job's common start.
"""
from __future__ import annotations

import gc
import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Recorder:
    rank: int
    label: str
    tracing: bool
    t0: float = field(default_factory=time.perf_counter)
    cpu0: float = field(default_factory=time.process_time)
    busy: float = 0.0
    waiting: float = 0.0
    latencies: list = field(default_factory=list)
    rows_in: int = 0
    gc_s: float = 0.0
    progress_s: float = 0.0
    events: list = field(default_factory=list)
    _gc_hook: object = None

    def restart(self) -> None:
        """Start the clock (after set-up and a barrier, so ranks share a time origin)."""
        self.t0, self.cpu0 = time.perf_counter(), time.process_time()
        self.gc_s = self.progress_s = 0.0

    @contextmanager
    def span(self, name: str, cat: str = "compute", **args):
        start = time.perf_counter()
        try:
            yield args          # the caller may add to the span's arguments
        finally:
            end = time.perf_counter()
            if cat == "wait":
                self.waiting += end - start
            elif cat in ("compute", "send"):
                self.busy += end - start
            self._event(name, cat, start, end, args)

    def add_wait(self, start: float, end: float, name: str = "wait", **args) -> None:
        self.waiting += end - start
        if end - start > 20e-6:
            self._event(name, "wait", start, end, args)

    def add_progress(self, start: float, end: float) -> None:
        """A transport's pass over its live messages, made from a loop's test of a handle."""
        self.progress_s += end - start
        if end - start > 20e-6:
            self._event("progress", "progress", start, end)

    def watch_gc(self) -> None:
        """Record the interpreter's garbage collections: all in ``gc_s``, as 'gc' spans the full ones and
        any over 0.2 ms (one callback per collection)."""
        started = {}

        def callback(phase: str, info: dict) -> None:
            if phase == "start":
                started["t"] = time.perf_counter()
            elif "t" in started:
                start, end = started.pop("t"), time.perf_counter()
                self.gc_s += end - start
                if info.get("generation") == 2 or end - start > 200e-6:
                    self._event(f"gc gen{info.get('generation')}", "gc", start, end)

        self.stop_gc()
        gc.callbacks.append(callback)
        self._gc_hook = callback

    def stop_gc(self) -> None:
        if self._gc_hook in gc.callbacks:
            gc.callbacks.remove(self._gc_hook)
        self._gc_hook = None

    def _event(self, name: str, cat: str, start: float, end: float, args: dict | None = None) -> None:
        if self.tracing:
            self.events.append({"name": name, "cat": cat, "ph": "X", "pid": self.rank, "tid": 0,
                                "ts": round((start - self.t0) * 1e6, 1), "dur": round((end - start) * 1e6, 1),
                                "args": args or {}})

    def summary(self) -> dict:
        wall = time.perf_counter() - self.t0
        return {"rank": self.rank, "role": self.label, "wall_s": wall, "busy_s": self.busy,
                "wait_s": self.waiting, "busy_fraction": self.busy / wall if wall > 0 else 0.0,
                "rows_in": self.rows_in, "latencies": self.latencies, "cpu_s": time.process_time() - self.cpu0,
                "gc_s": self.gc_s, "progress_s": self.progress_s}


class Backoff:
    """Sleep a little more each time nothing progressed: waiting ranks leave the cores to others."""

    def __init__(self, first: float = 20e-6, cap: float = 2e-3):
        self.first, self.cap, self.delay = first, cap, first

    def reset(self) -> None:
        self.delay = self.first

    def pause(self) -> None:
        time.sleep(self.delay)
        self.delay = min(self.cap, self.delay * 2)


def aggregate(summaries: list[dict]) -> dict:
    """Job-level metrics from every rank's summary (on rank 0)."""
    lat = np.array([x for s in summaries for x in s["latencies"]], dtype=np.float64)
    return {
        "micro_batch_latency_p50_s": float(np.percentile(lat, 50)) if lat.size else None,
        "micro_batch_latency_p99_s": float(np.percentile(lat, 99)) if lat.size else None,
        "micro_batches": int(lat.size),
        "busy_fraction": {s["role"]: round(s["busy_fraction"], 4) for s in summaries},
        "expert_rows_in": {s["role"]: s["rows_in"] for s in summaries if s["role"].startswith("expert")},
        # CPU seconds (user + system, every thread) of each rank while scoring: with the model's work this
        # gives the host overhead of oversubscribed runs (moe-mpi plan --host-overhead-from)
        "cpu_seconds": {s["role"]: round(s["cpu_s"], 4) for s in summaries},
        "cpu_seconds_total": round(sum(s["cpu_s"] for s in summaries), 4),
    }


def write_trace(path: str, summaries: list[dict], events: list[list[dict]]) -> None:
    meta = [{"name": "process_name", "ph": "M", "pid": s["rank"], "args": {"name": s["role"]}} for s in summaries]
    meta += [{"name": "process_sort_index", "ph": "M", "pid": s["rank"], "args": {"sort_index": s["rank"]}}
             for s in summaries]
    with open(path, "w") as fh:
        json.dump({"traceEvents": meta + [e for rank_events in events for e in rank_events],
                   "displayTimeUnit": "ms"}, fh)


def format_table(summaries: list[dict]) -> str:
    lines = [f"{'rank':>5} {'role':28} {'busy':>7} {'wait':>7} {'busy %':>7} {'rows in':>9}"]
    for s in summaries:
        lines.append(f"{s['rank']:>5} {s['role']:28} {s['busy_s']:7.3f} {s['wait_s']:7.3f} "
                     f"{100 * s['busy_fraction']:6.1f}% {s['rows_in']:>9}")
    return "\n".join(lines)
