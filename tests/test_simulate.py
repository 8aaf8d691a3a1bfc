"""The discrete-event simulator against the analytic model, imbalance, the paper scale, and the report
figures drawn from a simulated trace."""
import json
from collections import defaultdict

import click
import numpy as np
import pytest
from click.testing import CliRunner

from moe_mpi.config import ModelConfig
from moe_mpi.perf import analytic, hardware
from moe_mpi.perf.analytic import Layout
from moe_mpi.perf.cli import register
from moe_mpi.perf.simulate import simulate, write_trace

PAPER = ModelConfig.load("paper")
SEED = hardware.load("seed-h100")
CPU = hardware.load("cpu")


# Steady state: M well above the micro-batches needed to reach the bottleneck (in_flight_needed), so
# the pipeline runs at its busiest server's pace.  Bottlenecks covered: front compute, front links,
# expert compute, and the shared cores of a CPU box.
PAPER_8 = PAPER.replace(num_hidden_layers=8, first_k_dense_replace=1)   # paper width, 7 MoE layers


@pytest.mark.parametrize("cfg, hw, layout", [
    (ModelConfig.load("tiny"), SEED, Layout(2, 256, 24)),               # front links
    (ModelConfig.load("small"), SEED, Layout(2, 512, 16)),              # front compute
    (ModelConfig.load("small"), CPU, Layout(2, 512, 8)),                # shared cores
    (ModelConfig.load("tiny16"), SEED, Layout(3, 256, 24, None, 2)),    # two experts per rank
    (PAPER_8, SEED, Layout(2000, 1024, 16)),                            # expert compute, paper width
    (PAPER_8, SEED, Layout(500, 1024, 16, None, 8)),                    # eight paper experts per rank
], ids=["tiny-links", "small-front", "small-cpu-cores", "tiny16-k2", "paper8-experts", "paper8-k8"])
def test_steady_state_matches_analytic(cfg, hw, layout):
    p = analytic.plan(cfg, hw, layout)
    assert layout.in_flight >= 1.3 * p.in_flight_needed
    r = simulate(cfg, hw, layout)
    assert r.tokens_per_s == pytest.approx(p.tokens_per_s, rel=0.02), p.bottleneck
    assert r.front_util == pytest.approx(p.front_util, rel=0.03)
    assert r.expert_util_mean == pytest.approx(p.expert_util_mean, rel=0.03)


def test_one_micro_batch_in_flight_is_the_idle_latency():
    # With M=1 nothing queues: each micro-batch takes the analytic critical path, exactly.
    cfg = ModelConfig.load("small")
    layout = Layout(3, 256, 1)
    p = analytic.plan(cfg, SEED, layout)
    r = simulate(cfg, SEED, layout)
    assert r.latency_s == pytest.approx(p.latency0_s, rel=1e-9)
    assert r.tokens_per_s == pytest.approx(3 * 256 / p.latency0_s, rel=1e-9)


def test_imbalance_slows_in_the_expected_direction():
    # Paper width, 7 MoE layers, experts clearly the bottleneck: the layer's busiest expert sets the
    # step, so routing a larger share of the rows to one expert slows the whole pipeline, as the
    # analytic model says.
    cfg = PAPER_8
    layout = Layout(2000, 1024, 24)
    rates = []
    for hot in (1.0, 1.5, 3.0):
        load = np.ones((cfg.n_moe_layers, cfg.n_routed_experts))
        load[:, 7] = hot
        r = simulate(cfg, SEED, layout, expert_load=load)
        p = analytic.plan(cfg, SEED, layout, expert_load=load)
        assert p.bottleneck == "expert compute" and layout.in_flight >= 1.3 * p.in_flight_needed
        assert r.tokens_per_s == pytest.approx(p.tokens_per_s, rel=0.02)
        rates.append(r.tokens_per_s)
    assert rates[0] > rates[1] > rates[2]
    # 3x the rows at the hottest expert: about 3x slower (its share is 3/258 instead of 1/256)
    assert rates[0] / rates[2] == pytest.approx(3 * 256 / 258, rel=0.02)


def test_random_routing_is_slower_than_even():
    # Expert-bound, about 1,000 rows per expert per step: drawing each step's rows at random makes some
    # expert busier than the mean (by ~3 sigma = ~9% among 256) every step.  Micro-batches in flight
    # absorb much of it, since the busiest expert changes from step to step.
    cfg = PAPER_8
    layout = Layout(500, 64, 24)
    assert analytic.plan(cfg, SEED, layout).bottleneck == "expert compute"
    even = simulate(cfg, SEED, layout)
    drawn = simulate(cfg, SEED, layout, routing_seed=0)
    assert 0.9 * even.tokens_per_s < drawn.tokens_per_s < 0.995 * even.tokens_per_s


def test_slower_links_slow_a_link_bound_pipeline():
    cfg = ModelConfig.load("tiny")
    layout = Layout(2, 256, 24)
    assert analytic.plan(cfg, SEED, layout).bottleneck == "front links"
    fast = simulate(cfg, SEED, layout).tokens_per_s
    slow_hw = hardware.from_dict({**SEED.to_dict(), "intra_gbs": SEED.intra_gbs / 2,
                                  "inter_gbs": SEED.inter_gbs / 2})
    slow = simulate(cfg, slow_hw, layout).tokens_per_s
    assert slow < fast
    assert slow == pytest.approx(analytic.plan(cfg, slow_hw, layout).tokens_per_s, rel=0.02)


def test_trace_spans_respect_each_server():
    # A rank computes one thing at a time, and its link carries one transfer at a time per direction.
    cfg = ModelConfig.load("tiny")
    layout = Layout(2, 128, 4)
    r = simulate(cfg, SEED, layout, trace=True, trace_ranks_per_group=None)
    by_server = defaultdict(list)
    for ev in r.trace_events:
        assert ev["ph"] == "X" and ev["dur"] > 0 and 0 <= ev["pid"] < layout.world_size(cfg)
        direction = ev["cat"] if ev["cat"] != "compute" else "compute"
        by_server[(ev["pid"], direction)].append((ev["ts"], ev["ts"] + ev["dur"]))
    assert {pid for pid, _ in by_server} == set(range(layout.world_size(cfg)))
    for (pid, cat), spans in by_server.items():
        if cat != "compute" and pid >= layout.front_ranks:
            continue        # an expert's receive spans may overlap: the data streams in from all fronts
        spans.sort()
        for (s0, e0), (s1, _) in zip(spans, spans[1:]):
            assert s1 >= e0 - 1e-6, (pid, cat)


@pytest.mark.timeout(60)
def test_paper_scale_runs():
    # 61 layers, 256 experts x 58 MoE layers = 14,848 expert ranks, plus 1,306 fronts.
    layout = Layout(1306, 4096, 8)
    assert layout.world_size(PAPER) == 1306 + 14_848
    r = simulate(PAPER, SEED, layout)
    p = analytic.plan(PAPER, SEED, layout)
    assert r.n_micro_batches == 64 and r.n_events == 64 * (61 + 1 + 3 * 58)
    # M=8 is far below the ~70 micro-batches needed, so latency bounds both.
    assert p.cycle_s == pytest.approx(p.latency0_s / 8)
    assert r.tokens_per_s == pytest.approx(p.tokens_per_s, rel=0.03)
    assert r.latency_s == pytest.approx(p.latency0_s, rel=0.03)


def test_report_figures(tmp_path):
    pytest.importorskip("matplotlib")
    h5py = pytest.importorskip("h5py")
    cfg = ModelConfig.load("tiny")
    result = simulate(cfg, SEED, Layout(2, 128, 4), trace=True)
    trace = tmp_path / "trace.json"
    write_trace(result, trace)
    out_h5 = tmp_path / "out.h5"
    with h5py.File(out_h5, "w") as f:
        f["expert_load"] = np.array([[10, 2, 2, 2], [4, 4, 4, 4]], dtype=np.int64)
    measured = tmp_path / "measured.json"
    measured.write_text(json.dumps({"config": "tiny", "hardware": "cpu", "runs": [
        {"world_size": 9, "front_ranks": 1, "tokens_per_s": 900.0, "micro_batch_tokens": 128},
        {"world_size": 10, "front_ranks": 2, "tokens_per_s": 1500.0, "micro_batch_tokens": 128}]}))

    @click.group()
    def main():
        pass
    register(main)
    out = CliRunner().invoke(main, ["report", "--trace", str(trace), "--output", str(out_h5),
                                    "--measured", str(measured), "--out-dir", str(tmp_path / "figs")])
    assert out.exit_code == 0, out.output
    for name in ("timeline.png", "expert_load.png", "scaling.png"):
        png = (tmp_path / "figs" / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000, name
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"traceEvents": [{"ph": "X", "ts": 0}]}))
    out = CliRunner().invoke(main, ["report", "--trace", str(bad)])
    assert out.exit_code == 2 and "event 0 lacks dur, pid" in out.output


def test_ranks_sharing_a_gpu_take_turns_and_a_front_host_floor_sets_the_pace():
    """Hand-worked: with every expert rank on one GPU and enough in flight, a step takes the sum of all
    expert ranks' work (they take turns); one rank per GPU reproduces the plain simulation; a front
    host floor far above every stage's time makes each micro-batch cost exactly that floor."""
    cfg = PAPER_8
    layout = Layout(4, 2048, 16)
    st = analytic.stage_times(cfg, SEED, layout)
    F, world = layout.front_ranks, layout.world_size(cfg)
    plain = simulate(cfg, SEED, layout)
    own = simulate(cfg, SEED, layout, devices=list(range(world)))
    assert own.tokens_per_s == pytest.approx(plain.tokens_per_s, rel=1e-6)
    one_gpu = simulate(cfg, SEED, layout, devices=list(range(F)) + [F] * (world - F))
    step = float(st.expert_rank_s.sum())            # every expert rank of every layer, one after another
    assert step > float(st.front_stage_s.sum())     # the shared GPU is the bottleneck
    assert one_gpu.tokens_per_s == pytest.approx(F * layout.micro_batch_tokens / step, rel=0.02)
    floor = 20 * float(st.front_stage_s.sum())
    hosted = simulate(cfg, SEED, Layout(4, 2048, 4), front_host_s=floor)
    assert hosted.tokens_per_s == pytest.approx(F * layout.micro_batch_tokens / floor, rel=0.02)
    with pytest.raises(ValueError, match="entries"):
        simulate(cfg, SEED, layout, devices=[0, 1])


def test_time_slices_stretch_each_process_by_the_processes_on_its_gpu_and_latency_is_per_front():
    """Hand-worked, time slices: two fronts on one GPU and the experts on their own each run at half
    the GPU all the time, so a front's micro-batch costs its host part plus twice its device part, and
    the two fronts together finish 2 x T tokens in that time.  One process per GPU is the plain run.
    Latency is per front: with M in flight and fronts in step, M micro-batches of one front finish in
    M x its time per micro-batch (Little), not stretched by the other front's lag."""
    from dataclasses import replace
    cfg = PAPER_8
    layout = Layout(2, 2048, 4)
    F, world, T = layout.front_ranks, layout.world_size(cfg), layout.micro_batch_tokens
    st = analytic.stage_times(cfg, SEED, layout)
    device = float(analytic.stage_times(cfg, replace(SEED, op_overhead_us=0.0), layout).front_stage_s.sum())
    per_mb = float(st.front_stage_s.sum()) + device          # host part + 2 x device part
    plain = simulate(cfg, SEED, layout)
    own = simulate(cfg, SEED, layout, devices=list(range(world)), gpu_sharing="slices")
    assert own.tokens_per_s == pytest.approx(plain.tokens_per_s, rel=1e-6)
    fronts_share = [0, 0] + list(range(1, world - F + 1))
    sliced = simulate(cfg, SEED, layout, devices=fronts_share, gpu_sharing="slices")
    assert per_mb > float(st.expert_rank_s.max()) + 2 * st.front_send_s    # the fronts are the bottleneck
    assert sliced.tokens_per_s == pytest.approx(F * T / per_mb, rel=0.02)
    assert sliced.latency_p50_s == pytest.approx(layout.in_flight * per_mb, rel=0.05)
    with pytest.raises(ValueError, match="gpu_sharing"):
        simulate(cfg, SEED, layout, devices=fronts_share, gpu_sharing="mps")
