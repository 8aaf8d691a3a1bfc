"""The performance model against hand-worked numbers: DESIGN.md section 8's worked example, memory per
rank, a tiny config counted by hand, the ridge point, placements, hardware profiles and the CLI."""
import json
import math

import click
import numpy as np
import pytest
from click.testing import CliRunner

from moe_mpi.config import ModelConfig
from moe_mpi.perf import analytic, costs, hardware
from moe_mpi.perf.analytic import Layout
from moe_mpi.perf.cli import register

PAPER = ModelConfig.load("paper")
TINY = ModelConfig.load("tiny")
SEED = hardware.load("seed-h100")


def unit_hardware(**changes) -> hardware.Hardware:
    """1 MFLOP/s, memory and links so fast they never count, no fixed costs: times are FLOP / 1e6."""
    raw = {"base": "seed-h100", "peak_tflops": 1e-6, "mfu": 1.0, "mem_bw_tbs": 1e9, "mem_bw_util": 1.0,
           "intra_gbs": 1e12, "inter_gbs": 1e12, "msg_overhead_us": 0, "intra_latency_us": 0,
           "inter_latency_us": 0, "op_overhead_us": 0}
    raw.update(changes)
    return hardware.from_dict(raw, "unit")


def cli():
    @click.group()
    def main():
        pass
    register(main)
    return main


# --- DESIGN.md section 8: the worked numbers, to the digits given ---
def test_worked_numbers_paper_seed_h100():
    p = analytic.plan(PAPER, SEED, Layout())
    assert SEED.flops_per_s == pytest.approx(240e12) and SEED.mem_bytes_per_s == pytest.approx(1.44e12)
    assert p.expert_weight_bytes == 3 * 7168 * 18432 * 2
    assert round(p.expert_weight_bytes / 1e6, 1) == 792.7                 # MB
    assert p.expert_flops_per_row == 6 * 7168 * 18432
    assert round(p.expert_flops_per_row / 1e6, 1) == 792.7                # MFLOP
    assert round(p.expert_row_s * 1e6, 2) == 3.30                         # us at 240 TFLOP/s
    assert p.expert_weight_read_s == pytest.approx(792.7e6 / 1.44e12, rel=1e-4)
    assert math.floor(p.expert_weight_read_s * 1e6) / 1e3 == 0.550        # ms (0.5505)
    assert round(p.ridge_rows) == 167 and p.ridge_rows == pytest.approx(166.67, abs=0.01)


def test_worked_numbers_in_plan_text():
    out = CliRunner().invoke(cli(), ["plan", "--config", "paper", "--hardware", "seed-h100"])
    assert out.exit_code == 0, out.output
    for text in ("792.7 MB", "792.7 MFLOP", "3.303 us at 240 TFLOP/s", "792.7 MB / 1.44 TB/s = 0.5505 ms",
                 "166.7 tokens per expert per step", "world 14,849"):
        assert text in out.output, text


# --- memory per rank ---
def test_front_memory_paper_by_hand():
    # Parameters of one MLA layer: q_a 7168x1536 + q_b 1536x(128*56) + kv_a 7168x(512+16)
    # + kv_b 512x(128*(40+56)) + o (128*56)x7168.
    attn = 7168 * 1536 + 1536 * 128 * 56 + 7168 * 528 + 512 * 128 * 96 + 7168 * 7168
    assert attn == 83_476_480 == costs.attention_proj_params(PAPER)
    norms = 2 * 7168 + 1536 + 512                    # input, post-attention, q_a and kv_a norms
    bf16 = (2 * 129280 * 7168                        # embedding and LM head
            + 7168                                   # final norm
            + 61 * (attn + norms)
            + 3 * 3 * 7168 * 18432) * 2              # the three dense SwiGLU MLPs
    routers = 58 * (256 * 7168 + 256) * 4            # fp32 gate weights and correction biases
    mem = costs.front_memory_bytes(PAPER, 4096, 4, 2)
    assert mem["weights"] == bf16 + routers
    assert mem["weights"] / 1e9 == pytest.approx(16.70, abs=0.005)
    # activations: per in-flight micro-batch, residual and normed input (T x D) plus dispatch send and
    # receive buffers (T*K x D); one attention's q,k,v,out working set; the head's fp32 logits slice.
    T, D = 4096, 7168
    per_mb = 2 * T * D * 2 + 2 * T * 8 * D * 2
    working = max(T * 128 * (2 * 56 + 2 * 56) * 2, 3 * T * 18432 * 2)
    assert mem["activations"] == 4 * per_mb + working + 2 * 1024 * 129280 * 4


def test_expert_memory_and_fit():
    # F=1306 fronts x 4096 tokens x top-8 / 256 experts = 167,168 rows per expert per step
    p = analytic.plan(PAPER, SEED, Layout(front_ranks=1306, in_flight=72))
    rows = 1306 * 4096 * 8 / 256
    assert p.rows_per_expert == rows
    buffers = 2 * 2 * rows * 7168 * 2 + 3 * rows * 18432 * 2   # two steps in + out; gate, up, product
    assert p.expert_memory["total"] == pytest.approx(3 * 7168 * 18432 * 2 + buffers)
    assert p.expert_memory["total"] < 64e9
    assert p.front_memory["total"] > 64e9 and not p.fits       # 72 micro-batches of 4096 do not fit
    small = analytic.plan(PAPER, SEED, Layout(front_ranks=1306, micro_batch_tokens=1024, in_flight=72))
    assert small.fits


# --- a tiny config counted by hand ---
def test_tiny_flops_by_hand():
    # tiny: D=64, H=4, q_lora 32, kv_lora 16, nope 8 + rope 8 = qk 16, v 16, dense I=128, expert I=32,
    # E=4, K=2, V=512, one shared expert, 3 layers (layer 0 dense).
    # MLA projections: q_a 64x32=2048, q_b 32x(4*16)=2048, kv_a 64x24=1536, kv_b 16x(4*24)=1536,
    # o 64x64=4096 -> 11,264 weights -> 22,528 FLOP per token.
    # Scores for a causal sequence of S=8: token t does q.k and p.v over t+1 keys in 4 heads of 16+16
    # dims: 2*4*32*(t+1) FLOP; summed over t=0..7 that is 256*36 = 9,216, or 1,152 per token.
    per_token_attn = 22_528 + 1_152
    assert costs.attention(TINY, 8, 8, 2).flops == 8 * per_token_attn
    assert costs.router(TINY, 1, 2).flops == 2 * 64 * 4                     # 512
    assert costs.dense_mlp(TINY, 1, 2).flops == 6 * 64 * 128                # 49,152
    assert costs.expert(TINY, 1, 2).flops == 6 * 64 * 32                    # 12,288
    assert costs.lm_head(TINY, 1, 2).flops == 2 * 64 * 512                  # 65,536
    # One token through the front: 3 attentions, 1 dense MLP, 2 routers, 2 shared experts,
    # 2 combines (K*D multiply-adds each = 256), the head.
    front = 3 * per_token_attn + 49_152 + 2 * 512 + 2 * 12_288 + 2 * 256 + 65_536
    assert front == 211_840
    assert costs.flops_per_token(TINY, 8) == {"front": front, "experts": 2 * 2 * 12_288,
                                              "total": front + 2 * 2 * 12_288}
    # At 1 MFLOP/s with free memory and links, a front's work per step is FLOP / 1e6 seconds.
    st = analytic.stage_times(TINY, unit_hardware(), Layout(1, 8, 1, 8))
    assert st.front_stage_s.sum() == pytest.approx(8 * front / 1e6)
    assert st.front_stage_s[0] == pytest.approx(8 * (per_token_attn + 49_152) / 1e6)  # embed is free
    # Each expert gets 1 front x 8 tokens x top-2 / 4 experts = 4 rows: 4 x 12,288 FLOP.
    assert st.rows_LR.tolist() == [[4.0] * 4] * 2
    assert st.expert_rank_s == pytest.approx(np.full((2, 4), 4 * 12_288 / 1e6))
    # Idle-machine latency = the whole front path + two expert steps (free links).
    p = analytic.plan(TINY, unit_hardware(), Layout(1, 8, 1, 8))
    assert p.latency0_s == pytest.approx((8 * front + 2 * 4 * 12_288) / 1e6)
    assert p.bottleneck == "front compute" and p.tokens_per_s == pytest.approx(8 / p.latency0_s)


# --- the ridge point ---
@pytest.mark.parametrize("dtype, ridge", [("bfloat16", 100.0), ("float32", 200.0)])
def test_ridge_point(dtype, ridge):
    # 100 TFLOP/s over 1 TB/s is 100 FLOP per byte; an expert row does 6*D*I FLOP while the weights
    # are 3*D*I*b bytes, so the ridge is 100 * 3*D*I*b / (6*D*I) = 50*b rows.
    hw = hardware.from_dict({"base": "seed-h100", "peak_tflops": 100, "mfu": 1, "mem_bw_tbs": 1,
                             "mem_bw_util": 1, "dtype": dtype})
    p = analytic.plan(PAPER, hw, Layout())
    assert p.ridge_rows == pytest.approx(ridge)
    b = hardware.DTYPE_BYTES[dtype]
    t = analytic.expert_time_s(PAPER, hw, np.array([0.0, ridge / 2, 2 * ridge]), b)
    assert t[0] == 0.0                                                       # no rows: no weight read
    # memory-bound: the weights, plus the rows in and out (D values each)
    assert t[1] == pytest.approx((3 * 7168 * 18432 + ridge / 2 * 2 * 7168) * b / 1e12)
    assert t[2] == pytest.approx(2 * ridge * 6 * 7168 * 18432 / 100e12)      # compute-bound: FLOP
    # F=1 x 4096 tokens x 8/256 = 128 rows per expert: above the bf16 ridge, below the fp32 one.
    assert p.rows_per_expert == 128
    assert p.expert_bound == ("compute" if dtype == "bfloat16" else "memory")


# --- steady state ---
def test_steady_state_formulas_and_expert_ceiling():
    p = analytic.plan(PAPER, SEED, Layout(front_ranks=1, in_flight=4))
    assert p.tokens_per_s == pytest.approx(1 * 4096 / max(p.period_s, p.latency0_s / 4))
    assert p.latency_s == pytest.approx(4 * p.cycle_s)                       # Little's law
    assert p.tokens_per_s_per_rank == pytest.approx(p.tokens_per_s / 14_849)
    assert p.in_flight_needed == math.ceil(p.latency0_s / p.period_s)
    assert p.tokens_in_flight_to_saturate == pytest.approx(58 * p.ridge_rows * 256 / 8)
    # With enough fronts and micro-batches the compute-bound experts set the pace: each expert serves
    # K/E of every token, so tokens/s = E / (K * 3.303 us) = 9.69 M, whatever F beyond the balance.
    ceiling = 256 / (8 * 6 * 7168 * 18432 / 240e12)
    for F in (2000, 4000):
        q = analytic.plan(PAPER, SEED, Layout(front_ranks=F, micro_batch_tokens=1024, in_flight=200))
        assert q.bottleneck == "expert compute"
        assert q.tokens_per_s == pytest.approx(ceiling, rel=1e-3)
        assert q.expert_util_mean == pytest.approx(1.0, rel=1e-3)
    assert p.front_ranks_to_balance > 1000                                    # about 1,300 fronts


def test_imbalance_uses_the_busiest_expert():
    load = np.ones((2, 4))
    load[0, 0] = 5                          # layer 0: expert 0 gets 5/8 of the rows, the others 1/8
    p = analytic.plan(TINY, unit_hardware(), Layout(1, 8, 1, 8), expert_load=load)
    # 16 rows in layer 0: 10 to expert 0; layer 1 even: 4 each
    assert p.expert_mlp_s == pytest.approx(10 * 12_288 / 1e6)
    with pytest.raises(ValueError, match="shape"):
        analytic.plan(TINY, SEED, Layout(), expert_load=np.ones((3, 4)))


def test_shared_cores_and_host_overhead_by_hand():
    """On a CPU box all ranks' work shares the cores, and host_overhead scales that work: tiny, T=8, S=8,
    unit hardware, one node.  Work per step = F x front + the experts' rows x 12,288 FLOP each."""
    lay = Layout(front_ranks=2, micro_batch_tokens=8, in_flight=1, seq_len=8)
    base = analytic.plan(TINY, unit_hardware(shared_cores=3, ranks_per_node=None), lay)
    front = base.period_parts_s["front compute"]
    experts = 2 * 8 * 2 * 2 * 12_288 / 1e6          # F*T*K rows in each of 2 MoE layers
    assert base.period_parts_s["shared cores"] == pytest.approx((2 * front + experts) / 3)
    slow = analytic.plan(TINY, unit_hardware(shared_cores=3, ranks_per_node=None, host_overhead=2.5), lay)
    assert slow.period_parts_s["shared cores"] == pytest.approx(2.5 * (2 * front + experts) / 3)
    assert slow.period_parts_s["front compute"] == pytest.approx(2.5 * front)
    # Without shared cores (GPUs) the overhead is not applied: it is a property of oversubscribed hosts.
    gpu = analytic.plan(TINY, unit_hardware(host_overhead=2.5), lay)
    assert gpu.period_parts_s["front compute"] == pytest.approx(front)
    with pytest.raises(ValueError, match="host_overhead must be a number >= 1"):
        unit_hardware(host_overhead=0.5)


def test_host_overhead_from_a_run_by_hand(tmp_path):
    """A run's CPU seconds over the model's work for its tokens: tiny, unit hardware, F=1, T=8, 16 tokens
    = 2 steps; each step is the front's work plus 8 x 2 rows x 2 MoE layers x 12,288 FLOP of experts."""
    hw = unit_hardware(shared_cores=2, ranks_per_node=None)
    front = analytic.plan(TINY, hw, Layout(1, 8, 1, 8)).period_parts_s["front compute"]
    step = front + 8 * 2 * 2 * 12_288 / 1e6
    h = analytic.host_overhead(TINY, hw, front_ranks=1, micro_batch_tokens=8, seq_len=8, tokens=16,
                               cpu_seconds=2 * step * 2.5)
    assert h == pytest.approx(2.5)
    # the profile's own overhead does not enter the measurement
    assert analytic.host_overhead(TINY, unit_hardware(shared_cores=2, ranks_per_node=None, host_overhead=4),
                                  front_ranks=1, micro_batch_tokens=8, seq_len=8, tokens=16,
                                  cpu_seconds=2 * step * 2.5) == pytest.approx(2.5)
    # the CLI refuses outputs without CPU accounting, and GPU profiles
    import h5py
    old = tmp_path / "old.h5"
    with h5py.File(old, "w") as f:
        f.attrs["metrics"] = json.dumps({"busy_fraction": {}})
    res = CliRunner().invoke(cli(), ["plan", "--config", "tiny", "--hardware", "cpu", "--host-overhead-from", str(old)])
    assert res.exit_code == 2 and "no CPU accounting" in res.output
    res = CliRunner().invoke(cli(), ["plan", "--config", "tiny", "--hardware", "h200", "--host-overhead-from", str(old)])
    assert res.exit_code == 2 and "no shared_cores" in res.output


# --- placements ---
def test_alternative_placements():
    plans = analytic.placements(PAPER, SEED, Layout(front_ranks=1), [1, 2, 8, 3])
    assert [p.ranks_per_layer for p in plans] == [256, 128, 32, 86]          # 3: ceil(256/3)
    assert [p.expert_ranks for p in plans] == [14_848, 7_424, 1_856, 58 * 86]
    assert [p.world_size for p in plans] == [14_849, 7_425, 1_857, 58 * 86 + 1]
    for p in plans:
        assert p.expert_memory["weights"] == p.experts_per_rank * 3 * 7168 * 18432 * 2
        # 128 rows per expert is below the ridge: each hosted expert reads its weights once (and its
        # 128 rows in and out)
        one = (792_723_456 + 128 * 2 * 7168 * 2) / 1.44e12
        assert p.expert_mlp_s == pytest.approx(p.experts_per_rank * one)
    # Packing k experts per rank divides the fronts needed to keep experts busy by about k...
    k1, k8 = plans[0], plans[2]
    assert k1.front_ranks_to_balance / k8.front_ranks_to_balance == pytest.approx(8, rel=0.05)
    # ... and at their own balance both reach about the same tokens/s per GPU.
    b1 = analytic.plan(PAPER, SEED, Layout(k1.front_ranks_to_balance, 1024, 100, None, 1))
    b8 = analytic.plan(PAPER, SEED, Layout(k8.front_ranks_to_balance, 1024, 100, None, 8))
    assert b1.tokens_per_s_per_rank == pytest.approx(b8.tokens_per_s_per_rank, rel=0.05)
    assert b1.tokens_per_s == pytest.approx(8 * b8.tokens_per_s, rel=0.05)


def test_layout_errors():
    with pytest.raises(ValueError, match="whole sequences"):
        analytic.plan(PAPER, SEED, Layout(micro_batch_tokens=1024, seq_len=4096))
    with pytest.raises(ValueError, match="experts_per_rank"):
        analytic.plan(TINY, SEED, Layout(experts_per_rank=5))


# --- hardware profiles ---
def test_hardware_presets_and_json(tmp_path):
    assert set(hardware.PRESETS) >= {"seed-h100", "h100-sxm", "h200", "cpu"}
    path = tmp_path / "box.json"
    path.write_text(json.dumps({"base": "cpu", "matmul_gflops": 85, "mpi_gbs": 6, "mpi_latency_us": 40}))
    hw = hardware.load(path)
    assert hw.name == "box" and hw.flops_per_s == pytest.approx(85e9)
    assert hw.intra_gbs == hw.inter_gbs == 6 and hw.intra_latency_us == 40
    assert hw.shared_cores == 2 and hw.dtype == "float32"                  # the rest from the base
    path.write_text(json.dumps({"base": "cpu", "matmul_gflop": 85}))
    with pytest.raises(ValueError, match="unknown key 'matmul_gflop'"):
        hardware.load(path)
    path.write_text(json.dumps({"peak_tflops": 1}))
    with pytest.raises(ValueError, match="missing"):
        hardware.load(path)
    with pytest.raises(ValueError, match="mfu is a fraction"):
        hardware.from_dict({"base": "h200", "mfu": 1.5})
    with pytest.raises(ValueError, match="neither a preset"):
        hardware.load("no-such-card")


def test_link_model():
    # 8 ranks per node: inside one node everything is NVLink; across nodes the NIC sets the pace.
    assert SEED.link(8) == pytest.approx((450e9, 3e-6))
    bw, lat = SEED.link(14_849)
    assert lat == pytest.approx(5e-6) and bw == pytest.approx(50e9 / (1 - 7 / 14_848))


# --- the command line ---
def test_plan_json_and_errors(tmp_path):
    runner = CliRunner()
    out = runner.invoke(cli(), ["plan", "--config", "tiny", "--hardware", "cpu", "--front-ranks", "2",
                                "--micro-batch-tokens", "64", "--experts-per-rank", "1",
                                "--experts-per-rank", "2", "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    direct = analytic.plan(TINY, hardware.CPU, Layout(2, 64))
    assert data["plan"]["tokens_per_s"] == pytest.approx(direct.tokens_per_s)
    assert [a["experts_per_rank"] for a in data["placements"]] == [1, 2]
    assert data["plan"]["world_size"] == 2 + 8
    bad = runner.invoke(cli(), ["plan", "--config", "tiny", "--hardware", "nope"])
    assert bad.exit_code == 2 and "neither a preset" in bad.output
    bad = runner.invoke(cli(), ["plan", "--config", "tiny", "--experts-per-rank", "9"])
    assert bad.exit_code == 2 and "not in [1, 4]" in bad.output


def test_plan_with_expert_load_file(tmp_path):
    h5py = pytest.importorskip("h5py")
    path = tmp_path / "out.h5"
    with h5py.File(path, "w") as f:
        f["expert_load"] = np.array([[10, 2, 2, 2], [4, 4, 4, 4]], dtype=np.int64)
    out = CliRunner().invoke(cli(), ["plan", "--config", "tiny", "--hardware", "cpu", "--front-ranks", "1",
                                     "--micro-batch-tokens", "16", "--expert-load", str(path), "--json"])
    assert out.exit_code == 0, out.output
    # layer 0: expert 0 gets 10/16 of 1 x 16 x 2 = 32 rows
    assert json.loads(out.output)["plan"]["expert_bound"] in ("memory", "compute")
    expected = analytic.expert_time_s(TINY, hardware.CPU, np.array([20.0]), 4)[0]
    assert json.loads(out.output)["plan"]["expert_mlp_s"] == pytest.approx(expected)
