"""Figures as PNG: a timeline of every rank's busy and waiting spans from a Chrome trace, expert load per
layer from an output file, and measured throughput against the model's curve.  Drawn on matplotlib's Agg
canvas without pyplot, so no display is needed and no global state is touched.

Trace format (what ``score --trace`` and ``simulate.write_trace`` write)::

    {"traceEvents": [{"name", "ph": "X", "ts": us, "dur": us, "pid": rank, "tid": 0,
                      "cat": "compute" | "send" | "recv" | "wait" | ..., "args": {...}}, ...]}

Measured-throughput format::

    {"config": "small", "hardware": "cpu" or "profile.json",
     "runs": [{"world_size": 14, "front_ranks": 2, "tokens_per_s": 1234.5,
               "micro_batch_tokens": 512, "in_flight": 4, "seq_len": 128}, ...]}

(a bare list of runs works too; ``micro_batch_tokens``, ``in_flight`` and ``seq_len`` are optional).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..config import ModelConfig
from . import analytic
from .hardware import Hardware

CATEGORY_COLOURS = {"compute": "tab:blue", "send": "tab:orange", "recv": "tab:green", "wait": "lightgrey",
                    "io": "tab:purple"}
# A rank computes and moves data at the same time: compute fills the middle of its row, sends a thin
# band on top and receives one below, so overlapping spans stay visible.  (y offset, height)
CATEGORY_BANDS = {"compute": (-0.25, 0.5), "send": (-0.45, 0.18), "recv": (0.27, 0.18)}


def load_trace(path: str | Path) -> list[dict]:
    """The complete ("ph": "X") spans of a Chrome-trace JSON file, checked."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"trace {path}: cannot read it as JSON ({exc})") from None
    events = raw.get("traceEvents") if isinstance(raw, dict) else raw
    if not isinstance(events, list):
        raise ValueError(f"trace {path}: expected {{\"traceEvents\": [...]}} or a list of events")
    spans = []
    for n, ev in enumerate(events):
        if not isinstance(ev, dict) or ev.get("ph") != "X":
            continue            # metadata, instant and counter events are not spans
        missing = [k for k in ("ts", "dur", "pid") if k not in ev]
        if missing:
            raise ValueError(f"trace {path}: event {n} lacks {', '.join(missing)}")
        spans.append(ev)
    if not spans:
        raise ValueError(f"trace {path}: no complete (\"ph\": \"X\") events")
    return spans


def plot_timeline(spans: list[dict], out_png: str | Path, max_ranks: int = 64) -> Path:
    """One row per rank (pid), a bar per span coloured by category; gaps are idle time.  With more
    ranks than ``max_ranks`` the lowest-numbered ones are drawn (fronts come first in the rank map)."""
    ranks = sorted({int(ev["pid"]) for ev in spans})
    shown = ranks[:max_ranks]
    row = {r: i for i, r in enumerate(shown)}
    t0 = min(float(ev["ts"]) for ev in spans)
    by_cat: dict[str, dict[int, list]] = {}
    for ev in spans:
        r = int(ev["pid"])
        if r in row:
            by_cat.setdefault(str(ev.get("cat", "other")), {}).setdefault(r, []).append(
                ((float(ev["ts"]) - t0) / 1e3, float(ev["dur"]) / 1e3))       # ms
    fig = Figure(figsize=(12, 1.5 + 0.22 * len(shown)))
    ax = fig.subplots()
    for cat, per_rank in sorted(by_cat.items(), key=lambda kv: kv[0] in CATEGORY_BANDS):
        colour = CATEGORY_COLOURS.get(cat, None)
        offset, height = CATEGORY_BANDS.get(cat, (-0.45, 0.9))
        for n, (r, bars) in enumerate(per_rank.items()):
            ax.broken_barh(bars, (row[r] + offset, height), facecolors=colour, label=cat if n == 0 else None)
    ax.set_yticks(range(len(shown)), [str(r) for r in shown], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("time (ms)")
    ax.set_ylabel("rank")
    extra = f" (first {len(shown)} of {len(ranks)} ranks)" if len(shown) < len(ranks) else ""
    ax.set_title(f"rank timeline{extra}; gaps are idle")
    ax.legend(loc="upper right", fontsize=8)
    return _save(fig, out_png)


def read_expert_load(path: str | Path) -> np.ndarray:
    """The ``expert_load`` dataset [L_moe, E] of an output file, as int64."""
    import h5py
    try:
        with h5py.File(path, "r") as f:
            if "expert_load" not in f:
                raise ValueError(f"{path}: no dataset 'expert_load' (datasets: {', '.join(f.keys())})")
            load = np.asarray(f["expert_load"][...])
    except OSError as exc:
        raise ValueError(f"{path}: not a readable HDF5 file ({exc})") from None
    if load.ndim != 2:
        raise ValueError(f"{path}: expert_load must be 2-D [L_moe, E], got shape {load.shape}")
    return load.astype(np.int64)


def read_run(path: str | Path) -> dict:
    """What a distributed run's output says about the run: its config, layout, tokens and CPU time."""
    import h5py
    try:
        with h5py.File(path, "r") as f:
            attrs = dict(f.attrs)
    except OSError as exc:
        raise ValueError(f"{path}: not a readable HDF5 file ({exc})") from None
    metrics = json.loads(attrs.get("metrics", "{}") or "{}")
    if "cpu_seconds_total" not in metrics:
        raise ValueError(f"{path}: no CPU accounting in its metrics (distributed runs record it; the 1-rank "
                         "run and outputs of older versions do not)")
    cfg = attrs["config"]
    return {"config": ModelConfig.from_dict(json.loads(cfg if isinstance(cfg, str) else cfg.decode()), "run"),
            "front_ranks": int(attrs["front_ranks"]), "micro_batch_tokens": int(attrs["micro_batch_tokens"]),
            "seq_len": int(attrs["seq_len"]), "tokens": int(attrs["tokens"]),
            "cpu_seconds": float(metrics["cpu_seconds_total"]), "elapsed_s": float(attrs["elapsed_seconds"]),
            "world_size": int(attrs["world_size"])}


def plot_expert_load(load_LE: np.ndarray, out_png: str | Path) -> Path:
    """Left: each expert's rows over its layer's mean (1 = even).  Right: the busiest expert over the
    mean per layer, which is how much slower than even routing that layer's step is."""
    load = np.asarray(load_LE, dtype=np.float64)
    mean_L = load.mean(axis=1, keepdims=True)
    rel = np.divide(load, mean_L, out=np.ones_like(load), where=mean_L > 0)
    fig = Figure(figsize=(13, 4.5))
    ax0, ax1 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 1]})
    im = ax0.imshow(rel, aspect="auto", cmap="viridis", interpolation="nearest")
    ax0.set_xlabel("expert")
    ax0.set_ylabel("MoE layer")
    ax0.set_title("rows per expert / layer mean")
    fig.colorbar(im, ax=ax0)
    ax1.plot(rel.max(axis=1), np.arange(len(rel)), marker=".")
    ax1.axvline(1.0, color="grey", lw=0.8)
    ax1.invert_yaxis()
    ax1.set_xlabel("busiest / mean")
    ax1.set_title("imbalance per layer")
    return _save(fig, out_png)


def load_measured(path: str | Path) -> tuple[list[dict], dict]:
    """(runs, metadata) of a measured-throughput JSON file, checked."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"measured file {path}: cannot read it as JSON ({exc})") from None
    meta = raw if isinstance(raw, dict) else {}
    runs = raw.get("runs") if isinstance(raw, dict) else raw
    if not isinstance(runs, list) or not runs:
        raise ValueError(f"measured file {path}: expected a non-empty list of runs (or {{\"runs\": [...]}})")
    for n, run in enumerate(runs):
        for key in ("front_ranks", "tokens_per_s"):
            if not isinstance(run, dict) or not isinstance(run.get(key), (int, float)):
                raise ValueError(f"measured file {path}: run {n} needs a number {key!r}")
    return runs, {k: v for k, v in meta.items() if k != "runs"}


def scaling_curve(cfg: ModelConfig, hw: Hardware, layout: analytic.Layout,
                  front_ranks: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(world sizes, model tokens/s) for the layout at each front-rank count."""
    worlds, rates = [], []
    for F in front_ranks:
        p = analytic.plan(cfg, hw, analytic.Layout(F, layout.micro_batch_tokens, layout.in_flight,
                                                   layout.seq_len, layout.experts_per_rank, layout.dtype))
        worlds.append(p.world_size)
        rates.append(p.tokens_per_s)
    return np.array(worlds), np.array(rates)


def plot_scaling(runs: list[dict], cfg: ModelConfig, hw: Hardware, out_png: str | Path,
                 micro_batch_tokens: int | None = None, in_flight: int | None = None,
                 seq_len: int | None = None) -> Path:
    """Measured tokens/s against world size, the model's prediction for each measured layout, and the
    model's curve over front-rank counts at the first run's micro-batch and in-flight settings."""
    def layout_of(run: dict, F: int) -> analytic.Layout:
        return analytic.Layout(F, int(micro_batch_tokens or run.get("micro_batch_tokens", 4096)),
                               int(in_flight or run.get("in_flight", 4)),
                               seq_len or run.get("seq_len"), int(run.get("experts_per_rank", 1)))

    fronts = sorted({int(r["front_ranks"]) for r in runs})
    measured_world = [int(r.get("world_size", layout_of(r, int(r["front_ranks"])).world_size(cfg))) for r in runs]
    predicted = [analytic.plan(cfg, hw, layout_of(r, int(r["front_ranks"]))).tokens_per_s for r in runs]
    curve_F = sorted(set(np.unique(np.geomspace(1, max(4 * fronts[-1], 8), 24).astype(int)).tolist()) | set(fronts))
    worlds, rates = scaling_curve(cfg, hw, layout_of(runs[0], 1), curve_F)

    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    ax.plot(worlds, rates, "-", color="tab:blue", label=f"model ({hw.name}), varying front ranks")
    ax.plot(measured_world, predicted, "x", color="tab:blue", ms=8, label="model at each measured layout")
    ax.plot(measured_world, [r["tokens_per_s"] for r in runs], "o", color="tab:red", label="measured")
    ax.set_xlabel("world size (ranks)")
    ax.set_ylabel("tokens/s")
    if max(worlds.max(), max(measured_world)) > 20 * min(worlds.min(), min(measured_world)):
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set_title(f"throughput vs ranks, config {cfg.name}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out_png)


def _save(fig: Figure, out_png: str | Path) -> Path:
    out = Path(out_png)
    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out
