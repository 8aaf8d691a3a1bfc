"""The ``plan`` and ``report`` commands.  ``register(group)`` adds them to the main ``moe-mpi`` group."""
from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np

from ..config import ModelConfig
from . import analytic, hardware
from .analytic import Layout, Plan

DEFAULT_PACKINGS = (1, 2, 8, 32)


# --- number formatting: units always printed, 4 significant digits ---
def fmt_time(s: float) -> str:
    # ms from 0.1 ms up, so a weight read prints as the description writes it (0.5505 ms)
    for unit, scale, above in (("s", 1.0, 1.0), ("ms", 1e-3, 1e-4), ("us", 1e-6, 0.0)):
        if abs(s) >= above:
            return f"{s / scale:.4g} {unit}"
    return f"{s:g} s"


def fmt_bytes(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.4g} {unit}"
    return f"{n:.0f} B"


def fmt_count(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def format_plan(p: Plan, hw: hardware.Hardware, cfg: ModelConfig, alternatives: list[Plan]) -> str:
    D, I, E, L_moe = cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts, cfg.n_moe_layers
    gpu = "rank" if hw.shared_cores else "GPU"
    b = hardware.DTYPE_BYTES[p.dtype]
    rows_bytes = p.micro_batch_tokens * cfg.num_experts_per_tok * D * b     # one front's dispatch of a layer
    pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
    fit = lambda need: "fits" if need <= p.mem_limit_bytes else "DOES NOT FIT"  # noqa: E731
    lines = [
        f"moe-mpi plan: config {cfg.name}, hardware {hw.describe()}",
        f"layout: {p.front_ranks:,} front ranks + {p.expert_ranks:,} expert ranks ({E} experts x {L_moe} MoE "
        f"layers, {p.experts_per_rank} per rank) = world {p.world_size:,}",
        f"        micro-batch {p.micro_batch_tokens:,} tokens (sequences of {p.seq_len:,}), {p.in_flight} in "
        f"flight per front, {p.dtype}",
        "",
        "one expert",
        f"  weights          3 x {D} x {I} x {b} B = {fmt_bytes(p.expert_weight_bytes)}",
        f"  one token        6 x {D} x {I} = {p.expert_flops_per_row / 1e6:.4g} MFLOP = "
        f"{fmt_time(p.expert_row_s)} at {hw.flops_per_s / 1e12:g} TFLOP/s",
        f"  weights read     {fmt_bytes(p.expert_weight_bytes)} / {hw.mem_bytes_per_s / 1e12:g} TB/s = "
        f"{fmt_time(p.expert_weight_read_s)}",
        f"  ridge point      {p.ridge_rows:.4g} tokens per expert per step (this layout: "
        f"{fmt_count(p.rows_per_expert)} on average, {p.expert_bound}-bound)",
        "",
        f"memory per rank (card: {fmt_bytes(p.mem_limit_bytes)})",
        f"  front            {fmt_bytes(p.front_memory['total'])} = {fmt_bytes(p.front_memory['weights'])} weights"
        f" + {fmt_bytes(p.front_memory['activations'])} activations   {fit(p.front_memory['total'])}",
        f"  expert           {fmt_bytes(p.expert_memory['total'])} = {fmt_bytes(p.expert_memory['weights'])} "
        f"weights + {fmt_bytes(p.expert_memory['activations'])} buffers   {fit(p.expert_memory['total'])}",
        "",
        "per layer, one micro-batch",
        f"  attention        {fmt_time(p.attention_s):>11}   front, every layer",
        f"  router           {fmt_time(p.router_s):>11}   front, MoE layers (with the dispatch permutation)",
        f"  dense MLP        {fmt_time(p.dense_mlp_s):>11}   front, {cfg.first_k_dense_replace} dense layers",
        f"  dispatch         {fmt_time(p.dispatch_s):>11}   front -> experts, {fmt_bytes(rows_bytes)} per front",
        f"  expert MLP       {fmt_time(p.expert_mlp_s):>11}   busiest expert rank, all fronts' rows",
        f"  combine          {fmt_time(p.combine_s):>11}   experts -> front",
        f"  LM head          {fmt_time(p.lm_head_s):>11}   front, once",
        "",
        "steady state (one step = one micro-batch from every front)",
    ]
    for name, t in p.period_parts_s.items():
        mark = "  <- bottleneck" if name == p.bottleneck else ""
        lines.append(f"  {name + ' per step':<26}{fmt_time(t):>11}{mark}")
    lines += [
        f"  {'latency, idle machine':<26}{fmt_time(p.latency0_s):>11}",
        f"  tokens/s                  {fmt_count(p.tokens_per_s):>11}",
        f"  {'tokens/s per ' + gpu:<26}{fmt_count(p.tokens_per_s_per_rank):>11}",
        f"  {'useful TFLOP/s per ' + gpu:<26}{p.tflops_per_rank:>11.4g}   {pct(p.useful_flop_fraction)} of "
        f"{hw.flops_per_s / 1e12:g}; {p.flops_per_token['total'] / 1e9:.4g} GFLOP per token "
        f"({p.flops_per_token['experts'] / 1e9:.4g} in experts)",
        f"  latency per micro-batch   {fmt_time(p.latency_s):>11}   (= per sequence)",
        f"  front utilisation         {pct(p.front_util):>11}",
        f"  expert utilisation        {pct(p.expert_util_mean):>11}   mean ({pct(p.expert_util_max)} busiest)",
        f"  in flight per front       {p.in_flight:>11}   at least {p.in_flight_needed} to reach the bottleneck's "
        f"rate ({p.tokens_in_flight_needed:,} tokens in flight)",
        f"  tokens in flight to keep every expert at its ridge: {fmt_count(p.tokens_in_flight_to_saturate)} "
        f"({L_moe} layers x {p.ridge_rows:.4g} x {E}/{cfg.num_experts_per_tok})",
        f"  front ranks for experts as busy as fronts: {p.front_ranks_to_balance:,}",
    ]
    if alternatives:
        lines += ["", "placements: k experts of a layer per expert rank (same fronts, micro-batch, in flight)",
                  f"  {'k':>3} {'EP':>5} {'expert ranks':>12} {'world':>8} {'mem/expert rank':>15} "
                  f"{'bound':>7} {'tokens/s':>12} {'tok/s/' + gpu:>10} {'expert util':>11} {'latency':>10} "
                  f"{'F to balance':>12}"]
        fits = lambda a: "" if a.fits else " (does not fit)"  # noqa: E731
        for a in alternatives:
            lines.append(
                f"  {a.experts_per_rank:>3} {a.ranks_per_layer:>5} {a.expert_ranks:>12,} {a.world_size:>8,} "
                f"{fmt_bytes(a.expert_memory['total']):>15} {a.expert_bound:>7} {fmt_count(a.tokens_per_s):>12} "
                f"{fmt_count(a.tokens_per_s_per_rank):>10} {pct(a.expert_util_mean):>11} "
                f"{fmt_time(a.latency_s):>10} {a.front_ranks_to_balance:>12,}{fits(a)}")
    return "\n".join(lines)


def _load_expert_load(path: str | None) -> np.ndarray | None:
    if path is None:
        return None
    from .report import read_expert_load
    return read_expert_load(path)


def _packings(cfg: ModelConfig, given: tuple[int, ...]) -> list[int]:
    ks = given or tuple(k for k in DEFAULT_PACKINGS if k <= cfg.n_routed_experts)
    for k in ks:
        if not 1 <= k <= cfg.n_routed_experts:
            raise click.BadParameter(f"{k} is not in [1, {cfg.n_routed_experts}] (experts of a layer)",
                                     param_hint="--experts-per-rank")
    return list(ks)


def _load_inputs(config: str, hw_name: str) -> tuple[ModelConfig, hardware.Hardware]:
    try:
        return ModelConfig.load(config), hardware.load(hw_name)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


def _host_overhead_from(path: str, hw: hardware.Hardware) -> tuple[hardware.Hardware, str]:
    """The profile with the host overhead a run measured, and a line saying so."""
    from dataclasses import replace

    from .report import read_run
    if hw.shared_cores is None:
        raise click.UsageError(f"--host-overhead-from: hardware {hw.name!r} has no shared_cores; the host "
                               "overhead is a term of CPU boxes whose ranks share a few cores")
    try:
        run = read_run(path)
        nodes = 1 if hw.ranks_per_node is None else -(-run["world_size"] // hw.ranks_per_node)
        core_s = run["elapsed_s"] * hw.shared_cores * nodes     # the cores' time, idle gaps included
        kw = dict(front_ranks=run["front_ranks"], micro_batch_tokens=run["micro_batch_tokens"],
                  seq_len=min(run["seq_len"], run["micro_batch_tokens"]), tokens=run["tokens"])
        h = analytic.host_overhead(run["config"], hw, cpu_seconds=core_s, **kw)
        busy = analytic.host_overhead(run["config"], hw, cpu_seconds=run["cpu_seconds"], **kw)
    except (ValueError, KeyError) as exc:
        raise click.UsageError(f"--host-overhead-from {path}: {exc}") from None
    h = max(1.0, h)
    return replace(hw, host_overhead=h), (
        f"host_overhead {h:.3f} from {path} (F={run['front_ranks']}, {run['tokens']:,} tokens): "
        f"{run['elapsed_s']:.3g} s x {hw.shared_cores * nodes} cores per CPU-s of modelled work; its ranks' own "
        f"CPU time was {busy:.3f} of it ({run['cpu_seconds']:.3g} CPU-s), the rest cores left idle")


def plan_command(config, hw_name, front_ranks, micro_batch_tokens, in_flight, seq_len, experts_per_rank,
                 dtype, expert_load, simulate, micro_batches, routing_seed, as_json, host_overhead_from=None):
    """The performance model (DESIGN.md section 8): ranks, memory, per-layer times, steady state.

    The first --experts-per-rank value (default 1, the design's one expert per rank) is the main
    placement; all values are compared side by side.
    """
    cfg, hw = _load_inputs(config, hw_name)
    measured_from = None
    if host_overhead_from:
        hw, measured_from = _host_overhead_from(host_overhead_from, hw)
    ks = _packings(cfg, experts_per_rank)
    load = _load_expert_load(expert_load)
    layout = Layout(front_ranks, micro_batch_tokens, in_flight, seq_len, ks[0], dtype)
    try:
        main = analytic.plan(cfg, hw, layout, load)
        alternatives = analytic.placements(cfg, hw, layout, ks, load)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    sim = None
    if simulate:
        from .simulate import simulate as run_sim
        sim = run_sim(cfg, hw, layout, load, n_micro_batches=micro_batches, routing_seed=routing_seed)
    if as_json:
        out = {"config": cfg.name, "hardware": hw.to_dict(), "layout": layout.__dict__, "plan": main.to_dict(),
               "placements": [a.to_dict() for a in alternatives],
               "simulation": sim.to_dict() if sim else None}
        click.echo(json.dumps(out, indent=2, default=float))
        return
    if measured_from:
        click.echo(measured_from)
    click.echo(format_plan(main, hw, cfg, alternatives))
    if sim:
        click.echo(f"\nsimulation ({sim.n_micro_batches} micro-batches per front, {sim.n_events:,} events, "
                   f"{sim.wall_s:.2f} s): {fmt_count(sim.tokens_per_s)} tokens/s "
                   f"({sim.tokens_per_s / main.tokens_per_s:.3f} x the model), latency {fmt_time(sim.latency_s)}, "
                   f"front {100 * sim.front_util:.1f}%, experts {100 * sim.expert_util_mean:.1f}% "
                   f"({100 * sim.expert_util_max:.1f}% busiest)")


def report_command(trace, output, measured, config, hw_name, micro_batch_tokens, in_flight, seq_len, out_dir,
                   max_ranks):
    """PNG figures: a rank timeline from a Chrome trace, expert load from an output file, and measured
    throughput against the model's curve."""
    from . import report
    if not (trace or output or measured):
        raise click.UsageError("nothing to plot: give --trace, --output and/or --measured")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    try:
        if trace:
            written.append(report.plot_timeline(report.load_trace(trace), out / "timeline.png", max_ranks))
        if output:
            written.append(report.plot_expert_load(report.read_expert_load(output), out / "expert_load.png"))
        if measured:
            runs, meta = report.load_measured(measured)
            cfg, hw = _load_inputs(config or meta.get("config", "small"), hw_name or meta.get("hardware", "cpu"))
            written.append(report.plot_scaling(runs, cfg, hw, out / "scaling.png", micro_batch_tokens,
                                               in_flight, seq_len))
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    for path in written:
        click.echo(str(path))


def register(group: click.Group) -> None:
    """Add ``plan`` and ``report`` to the main command group."""
    hw_help = f"{'|'.join(hardware.PRESETS)} or a JSON profile (see moe_mpi/perf/hardware.py)"

    @group.command("plan", help=plan_command.__doc__)
    @click.option("--config", "config", default="paper", show_default=True, help="preset name or config JSON")
    @click.option("--hardware", "hw_name", default="seed-h100", show_default=True, help=hw_help)
    # -F, -T and their defaults are score's, so a plan predicts the run with the same flags.
    @click.option("--front-ranks", "-F", default=1, show_default=True, type=click.IntRange(min=1))
    @click.option("--micro-batch-tokens", "-T", default=2048, show_default=True, type=click.IntRange(min=1),
                  help="padded tokens per micro-batch (whole sequences)")
    @click.option("--in-flight", default=4, show_default=True, type=click.IntRange(min=1),
                  help="micro-batches in flight per front")
    @click.option("--seq-len", default=None, type=click.IntRange(min=1),
                  help="sequence length [default: micro-batch tokens, at most max_position_embeddings]")
    @click.option("--experts-per-rank", multiple=True, type=int,
                  help=f"k experts of a layer per rank; repeat to compare [default: {DEFAULT_PACKINGS}]")
    @click.option("--dtype", type=click.Choice(sorted(hardware.DTYPE_BYTES)), default=None,
                  help="[default: the hardware's]")
    @click.option("--expert-load", type=click.Path(exists=True, dir_okay=False), default=None,
                  help="an output .h5 whose expert_load [L_moe, E] sets each expert's share of the rows")
    @click.option("--host-overhead-from", type=click.Path(exists=True, dir_okay=False), default=None,
                  help="an output .h5 of a distributed run on this CPU box: its scoring time x the profile's "
                       "cores, per CPU-second of the model's work for its tokens, sets the profile's "
                       "host_overhead (shared-core profiles)")
    @click.option("--simulate", is_flag=True, help="also run the discrete-event simulator")
    @click.option("--micro-batches", default=None, type=click.IntRange(min=4),
                  help="micro-batches per front to simulate [default: max(8 x in-flight, 32)]")
    @click.option("--routing-seed", default=None, type=int,
                  help="simulate: draw each step's rows per expert at random (multinomial) with this seed")
    @click.option("--json", "as_json", is_flag=True, help="JSON instead of the table")
    def plan(**kw):
        plan_command(**kw)

    @group.command("report", help=report_command.__doc__)
    @click.option("--trace", type=click.Path(exists=True, dir_okay=False), help="Chrome-trace JSON")
    @click.option("--output", type=click.Path(exists=True, dir_okay=False), help="an output .h5 (expert_load)")
    @click.option("--measured", type=click.Path(exists=True, dir_okay=False),
                  help='measured throughput JSON: {"config", "hardware", "runs": [{"world_size", '
                       '"front_ranks", "tokens_per_s", ...}]}')
    @click.option("--config", default=None, help="model config for the curve [default: the JSON's, or small]")
    @click.option("--hardware", "hw_name", default=None, help=f"{hw_help} [default: the JSON's, or cpu]")
    @click.option("--micro-batch-tokens", default=None, type=click.IntRange(min=1))
    @click.option("--in-flight", default=None, type=click.IntRange(min=1))
    @click.option("--seq-len", default=None, type=click.IntRange(min=1))
    @click.option("--out-dir", default=".", show_default=True, type=click.Path(file_okay=False))
    @click.option("--max-ranks", default=64, show_default=True, type=click.IntRange(min=1),
                  help="ranks drawn in the timeline")
    def report(**kw):
        report_command(**kw)
