"""The benchmark scripts on CPUs: each GPU benchmark's procedure (its `--small` run, its report rebuilt
from its JSON, its pieces against hand-worked numbers or an independent reference), so that a broken
script fails here rather than in a device call, where time is scarce."""
from __future__ import annotations

import gzip
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, env, mpi_python


def test_exchange_benchmark_checks_round_trips_on_cpu(tmp_path):
    """benchmarks/gpu_exchange.py --small: every transport's round trips, dispatched out of order,
    two MoE layers."""
    run_env = dict(env(), MOE_MPI_STAGE_CHUNK_MB="0.002", MOE_MPI_TEST_CPU_GPUS="4")
    cmd = mpi_python(6, REPO / "benchmarks" / "gpu_exchange.py", "--device", "cpu", "--small", "--layers", 2,
                     "--shuffle", "--out", tmp_path)
    proc = subprocess.run(cmd,
                          capture_output=True, text=True, timeout=240, env=run_env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "round trips all correct" in proc.stdout
    # the markdown is a function of the JSON: --report rebuilds it to the byte
    md = next(tmp_path.glob("gpu_exchange_*_small.md"))
    written = md.read_text()
    assert "NCCL point-to-point, no control plane" in written
    # every rank's CPU speed, timed around each repeat, beside its host time
    data = json.loads(md.with_suffix(".json").read_text())
    for r in data["results"]:
        if "host_us_per_micro_batch" in r:
            assert len(r["cpu_work_ms"]) == 6 and all(ms > 0 for ms in r["cpu_work_ms"])   # (6 ranks on 2 cores: seconds, at times)
    assert "CPU work loop (ms)" in written
    # the verdict's account of the hosts' speed, by hand: the slowest IPC rank against the run's fastest
    sys.path.insert(0, str(REPO / "benchmarks"))
    from gpu_exchange_report import cpu_speed

    said = cpu_speed([{"transport": "ipc", "tokens": 512, "cpu_work_ms": [2.5, 2.6, 5.0, 2.7]},
                      {"transport": "nccl", "tokens": 512, "cpu_work_ms": [2.4, 2.6, 2.6, 2.6]},
                      {"transport": "ipc", "tokens": 1024, "cpu_work_ms": [3.0, 2.6, 2.5, 2.7]}])
    assert "(2.40 ms): 512 tokens 2.1x, 1024 tokens 1.2x." in said
    assert cpu_speed([{"transport": "ipc", "tokens": 512}]) == ""
    rebuilt = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_exchange.py"), "--report",
                              str(md.with_suffix(".json"))], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert rebuilt.returncode == 0, rebuilt.stderr[-2000:]
    assert md.read_text() == written


def test_every_benchmark_script_imports():
    """Each script under benchmarks/ imports on a CPU machine: most run only on the GPU machines, where
    a name a refactor moved (gpu_expert_mlp.py's md_table, once) would fail the call and waste its
    device time."""
    names = sorted(p.stem for p in (REPO / "benchmarks").glob("*.py"))
    probe = ("import importlib, sys, traceback\n"
             "for name in sys.argv[1:]:\n"
             "    try:\n"
             "        importlib.import_module(name)\n"
             "    except Exception:\n"
             "        print(f'{name}: {traceback.format_exc(limit=1).strip().splitlines()[-1]}')\n")
    proc = subprocess.run([sys.executable, "-c", probe, *names], capture_output=True, text=True, timeout=300,
                          env=env(), cwd=REPO / "benchmarks")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == "", proc.stdout
    assert len(names) > 20


def test_expert_benchmark_procedure_on_cpu(tmp_path):
    """benchmarks/gpu_expert_mlp.py --small on the CPU: every size's runtime row and the report, which
    --render rebuilds from the JSON to the byte."""
    script = REPO / "benchmarks" / "gpu_expert_mlp.py"
    proc = subprocess.run([sys.executable, str(script), "--device", "cpu", "--small", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env=env(), cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    md = next(tmp_path.glob("gpu_expert_mlp_*_small.md"))
    data = json.loads(md.with_suffix(".json").read_text())
    runtime = [r for r in data["rows"] if r["variant"] == "runtime"]
    assert len(runtime) >= 5 and all(r["ms"] > 0 and r["roofline_ms"] > 0 for r in runtime)
    assert data["checks_ok"]
    written = md.read_text()
    assert "| tokens | variant |" in written
    rebuilt = subprocess.run([sys.executable, str(script), "--render", str(md.with_suffix(".json"))],
                             capture_output=True, text=True, timeout=120, env=env(), cwd=REPO)
    assert rebuilt.returncode == 0, rebuilt.stderr[-2000:]
    assert md.read_text() == written


def test_exchange_benchmark_driver_timer_passes_every_argument_through():
    """--host-breakdown wraps the IPC transport's driver: each call reaches the driver with its
    positional and keyword arguments (the copy kernel's launch passes rows=) and its result, and is
    counted and timed."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from gpu_exchange import DriverTimer

    class Fake:
        def __init__(self):
            self.got = []

        def __getattr__(self, name):
            return lambda *a, **kw: self.got.append((name, a, kw)) or len(self.got)

        def write_values(self, stream, words):      # as Driver's: one or two words through write_value
            for address, value in words:
                self.write_value(stream, address, value)

    d = Fake()
    timer = DriverTimer(d)
    assert d.launch(1, 2, 3, 4, 5, rows=6) == 1 and d.copy_async(7, 8, 9, 10) == 2
    assert d.got == [("launch", (1, 2, 3, 4, 5), {"rows": 6}), ("copy_async", (7, 8, 9, 10), {})]
    assert timer.calls == 2 and timer.seconds >= 0
    d.write_values(1, [(2, 3), (4, 5)])
    assert d.got[2:] == [("write_value", (1, 2, 3), {}), ("write_value", (1, 4, 5), {})]
    assert timer.calls == 3, "calls made inside another are counted with it"
    timer.reset()
    assert timer.calls == 0


def test_expert_power_fit_and_bound_against_hand_worked_numbers(tmp_path):
    """benchmarks/gpu_expert_power.py's energy model: rows made from a known model (P0 100 W, 0.9 pJ a
    FLOP, 60 pJ a byte) give it back, with no residual; the power bound of 160 tokens at a 700 W cap,
    worked by hand: FLOPs 6 x 160 x 7168 x 18432 = 126,835,752,960 and bytes (3 x 7168 x 18432 +
    2 x 160 x 7168) x 2 = 797,310,976, so (0.114152 + 0.047839) J / 600 W = 0.26999 ms; and --render
    rebuilds the report from its JSON."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_expert_power as gp

    flops, nbytes = gp.expert_work(160)
    assert (flops, nbytes) == (126_835_752_960, 797_310_976)
    assert gp.power_bound_ms(flops, nbytes, 100.0, 0.9, 60.0, 700.0) == pytest.approx(0.26999, rel=1e-4)

    def row(kind, what, ms, f, b):
        return {"kind": kind, "what": what, "ms": ms, "flops": f, "bytes": b,
                "energy_mj": (100.0 * ms * 1e-3 + 0.9e-12 * f + 60e-12 * b) * 1e3, "power_w": 0.0,
                "sampled_power_w": 0.0, "sm_mhz": 1500.0, "throttle": "0x4", "calls": 10, "wall_s": 1.0}

    m, n, k = gp.GEMM
    rows = [{"kind": "idle", "what": "idle", "power_w": 80.0, "flops": 0.0, "bytes": 0.0},
            row("gemm", "product", 6.52, 2.0 * m * n * k, 2.0 * (m * k + k * n + m * n)),
            row("copy", "copy", 0.52, 0.0, 2.0 * gp.COPY_BYTES)]
    for tokens, ms in ((1, 0.20), (160, 0.28), (4096, 4.9)):
        rows.append(row("expert", f"expert, {tokens} tokens", ms, *gp.expert_work(tokens)))
    # the product and 12 copies at once in 8.15 ms: 6.52 / 8.15 = 0.8 of the product's rate, 12 x 0.52 / 8.15
    # = 0.766 of the copy's; left out of the fit, and the model (which made its energy) predicts it exactly
    rows.append(row("together", "both", 8.15, rows[1]["flops"], rows[1]["bytes"] + 12 * rows[2]["bytes"]))
    fit = gp.fit_energy([r for r in rows if r["kind"] not in ("idle", "together")])
    assert fit["p0_w"] == pytest.approx(100.0, rel=1e-6)
    assert fit["pj_per_flop"] == pytest.approx(0.9, rel=1e-6) and fit["pj_per_byte"] == pytest.approx(60.0, rel=1e-6)
    assert max(abs(v) for v in fit["residuals"]) < 1e-9
    data = {"card": "test card", "power_limit_w": 700.0, "seconds": 1.0, "warm_s": 0.1, "note": "", "rows": rows}
    md, out = gp.report(data)
    r160 = next(r for r in out["rows"] if r.get("what") == "expert, 160 tokens")
    assert r160["power_bound_ms"] == pytest.approx(0.26999, rel=1e-4)
    both = next(r for r in out["rows"] if r["kind"] == "together")
    assert both["of_peak"] == pytest.approx(0.8) and both["of_copy"] == pytest.approx(6.24 / 8.15)
    assert abs(both["residual"]) < 1e-9
    assert "0.80 of its ceiling and the copies at 0.77 of theirs, 1.57 in all" in md
    assert "| expert, 160 tokens |" in md
    path = tmp_path / "power.json"
    path.write_text(json.dumps(out))
    rebuilt = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_expert_power.py"), "--render", str(path)],
                             capture_output=True, text=True, timeout=120, env=env(), cwd=REPO)
    assert rebuilt.returncode == 0, rebuilt.stderr[-2000:]
    assert path.with_suffix(".md").read_text() == md


def test_host_cpu_probe_picks_cpus_seen_sharing_nothing(tmp_path):
    """benchmarks/host_cpus.py: ``pick`` against hand-made pair slowdowns, and both modes run end to end
    on this machine's CPUs (tiny work), writing their JSON."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from host_cpus import pick, work

    assert work(1000) == work(1000) > 0
    # 4 shares with 5 (2.0x) and 8 with 9 (1.9x); CPU 0 and 1 go last; 1.25 is the threshold
    slow = {(4, 5): 2.0, (4, 8): 1.0, (4, 9): 1.1, (5, 8): 1.02, (5, 9): 1.0, (8, 9): 1.9,
            (0, 4): 1.0, (0, 8): 1.0, (1, 4): 1.0, (1, 8): 1.0, (0, 1): 1.0}
    assert pick([0, 1, 4, 5, 8, 9], slow, 4, 1.25) == [4, 8, 0, 1]
    assert pick([0, 1, 4, 5, 8, 9], slow, 2, 1.25) == [4, 8]
    assert pick([4, 5], slow, 2, 2.5) == [4, 5]         # nothing over a higher threshold
    cpus = sorted(os.sched_getaffinity(0))[:2]
    anchors = ",".join(map(str, cpus))
    for mode, key in ((["--pick", "2"], "pair_slowdown"), (["--timeline", "0.3"], "summary")):
        out = tmp_path / f"{key}.json"
        proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "host_cpus.py"), "--anchors", anchors,
                               "--n", "2000", "--repeats", "1", "--json", str(out), *mode],
                              capture_output=True, text=True, timeout=120, cwd=REPO)
        assert proc.returncode == 0, proc.stderr[-2000:]
        data = json.loads(out.read_text())
        assert data[key]
        if key == "pair_slowdown":
            assert all(t > 0 for t in data["alone_s"].values()) and data["picked"]
        else:
            assert all(v["samples"] > 0 and v["fastest_ms"] > 0 for v in data["summary"].values())


@pytest.mark.parametrize("kernel", [False, True], ids=["copy engines", "copy kernel"])
def test_ipc_host_model_counts_the_driver_calls_of_a_micro_batch(tmp_path, kernel):
    """benchmarks/ipc_host_model.py runs the IPC transport's CUDA path on CPUs with the driver stubbed.
    A front with two experts makes 11 driver calls a micro-batch by the copy engines: one ready event,
    a wait, a copy and a mailbox word per send, a copy and a hand-back word per reply taken out; an
    expert with two fronts as many (one copy and one word per message taken out; the event, and a
    wait, copy and word per reply).  By the copy kernel, which writes the words itself, 4 each: the
    event, a wait and one launch for the sends, one launch for the take-out.  A change that adds a
    call per message shows here."""
    out = tmp_path / "model.json"
    cmd = mpi_python(4, REPO / "benchmarks" / "ipc_host_model.py", "--steps", 60, "--warm-up", 10, "--hidden", 64,
                     "--tokens", 8, "--out", out, *(["--kernel"] if kernel else []))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env(), cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())["results"]
    calls = 4 if kernel else 11
    assert res["front"]["driver_calls"] == calls and res["expert"]["driver_calls"] == calls
    assert set(res["front"]["us"]) == {"dispatch", "test", "result"}
    assert all(v > 0 for role in res.values() for v in role["us"].values())


def test_exchange_benchmark_rank_that_fails_ends_the_job_at_once(tmp_path):
    """A rank of an MPI-launched benchmark that raises ends the job with its traceback and a non-zero
    status, even where an exit hook would wait for the peers (as torch's NCCL teardown does; the
    injected fault registers one): the device call that found this hung until its timeout."""
    run_env = dict(env(), MOE_MPI_INJECT_FAULT_RANK="2")
    cmd = mpi_python(4, REPO / "benchmarks" / "gpu_exchange.py", "--device", "cpu", "--small", "--transports", "ipc",
                     "--out", tmp_path)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90, env=run_env, cwd=REPO)
    except subprocess.TimeoutExpired:
        pytest.fail("the job hung after a rank raised")
    assert proc.returncode != 0
    assert "injected fault on rank 2" in proc.stderr
    assert not list(tmp_path.glob("*.json"))
    bad = subprocess.run(mpi_python(4, REPO / "benchmarks" / "gpu_exchange.py", "--device", "cpu", "--small",
                                    "--transports", "ipc,nope", "--out", tmp_path),
                         capture_output=True, text=True, timeout=90, env=env(), cwd=REPO)
    assert bad.returncode == 2 and "no transport 'nope'" in bad.stderr


def test_end_to_end_benchmark_procedure_on_cpu(tmp_path):
    """benchmarks/gpu_end_to_end.py --small on CPU processes (device time is scarce: a broken script
    would waste it): two layouts, one repeated under its own name with an environment variable set, the
    one-process run, the report with the start-up columns, the agreement with fp32."""
    cmd = [sys.executable, REPO / "benchmarks" / "gpu_end_to_end.py", "--device", "cpu", "--small",
           "--variants", "fronts=1;fronts=1,rep=2,MOE_MPI_TEST_MARK=1", "--out", tmp_path, "--work", tmp_path / "w"]
    proc = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, timeout=400, env=env(), cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "env MOE_MPI_PROGRESS_THREAD=0 MOE_MPI_TEST_MARK=1" in proc.stdout
    res = json.loads(next(tmp_path.glob("gpu_end_to_end_*.json")).read_text())
    names = ["distributed, 1 fronts", "distributed, 1 fronts, MOE_MPI_TEST_MARK=1, repeat 2", "one process"]
    assert list(res["runs"]) == names
    for name in names[:2]:
        r = res["runs"][name]
        assert r["tokens"] == res["sequences"] * res["seq_len"]
        assert 0 < r["first_result_s"] < r["elapsed_s"] and r["steady_tokens_per_s"] > 0
    md = next(tmp_path.glob("gpu_end_to_end_*.md")).read_text()
    assert "tokens/s past start-up" in md and "Agreement of the one process" in md
    if importlib.util.find_spec("transformers") is not None:      # the outside baseline, and how runs compare
        hf = res["transformers"]
        assert hf["sequences"] == res["sequences"] and hf["tokens"] == res["sequences"] * res["seq_len"]
        assert list(hf["runs_vs_it"]) == names and hf["tokens_per_s"] > 0
        assert res["agreement"]["transformers, one process"]["logprob_abs_diff_mean"] < 0.05     # bf16 against fp32
        assert "Against the baseline a user would pick" in md


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@pytest.mark.parametrize("shared", ["tiny's", "none"])
def test_end_to_end_outside_baseline_holds_our_weights_on_cpu(shared):
    """The end-to-end benchmark's transformers baseline is our seeded model: in fp32, its log-probs of
    fresh random sequences (one of them shorter) match our fp32 run's at every position; with shared
    experts, and without (the paper slice's case: transformers then builds them zero-wide)."""
    pytest.importorskip("transformers")
    sys.path.insert(0, str(REPO / "benchmarks"))
    from gpu_e2e_agreement import fp32_reference
    from gpu_e2e_transformers import hf_score
    from gpu_end_to_end import slice_config

    cfg = slice_config(small=True)
    if shared == "none":
        cfg = cfg.replace(n_shared_experts=0)
    rng = np.random.default_rng()
    tokens = rng.integers(0, cfg.vocab_size, size=(3, 40))
    lengths = np.array([40, 23, 40])
    got = hf_score(cfg, tokens, lengths, torch.device("cpu"), 5, torch.float32, 3, 3)
    ref = fp32_reference(cfg, tokens, lengths, torch.device("cpu"), 5)["token_logprobs"]
    assert got["tokens"] == lengths.sum()
    np.testing.assert_array_equal(np.isnan(got["token_logprobs"]), np.isnan(ref))
    np.testing.assert_allclose(got["token_logprobs"], ref, atol=1e-4, equal_nan=True)


def test_end_to_end_benchmark_reads_start_up_and_rate_past_it_from_a_trace(tmp_path):
    """gpu_e2e_trace.steady_state on a made-up trace, against hand-worked numbers: 8 writes ending at
    2.0, 2.5, 3.0, 4.5, 5.0, 5.5, 6.0, 6.5 s after the first span began, the sixth carrying 2 sequences;
    the last three quarters are the writes after the second (index 2, at 3.0 s): 6 sequences in 3.5 s."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from gpu_e2e_trace import steady_state

    ends = [2.0, 2.5, 3.0, 4.5, 5.0, 5.5, 6.0, 6.5]
    t0 = 1_000_000.0     # trace clocks need not start at 0
    events = [{"name": "process_name", "ph": "M", "pid": 0, "args": {"name": "front 0"}},
              {"name": "compute mb0", "ph": "X", "pid": 0, "ts": t0, "dur": 5e5, "cat": "compute"}]
    events += [{"name": "write", "ph": "X", "pid": 0, "ts": t0 + 1e6 * e - 100.0, "dur": 100.0, "cat": "io",
                "args": {"sequences": 2 if i == 5 else 1}} for i, e in enumerate(ends)]
    # front 0 within the window (3.0 s to 6.5 s): 0.5 s of a wait from 2.5 s to 3.5 s, the last five
    # writes' 100 us each of io, and two of the four micro-batches it took up (read at 3.2 and 4.0 s)
    events += [{"name": "wait", "ph": "X", "pid": 0, "ts": t0 + 2.5e6, "dur": 1e6, "cat": "wait"}]
    events += [{"name": f"read mb{i}", "ph": "X", "pid": 0, "ts": t0 + 1e6 * at, "dur": 0.0, "cat": "io"}
               for i, at in enumerate([1.0, 3.2, 4.0, 6.6])]
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    got = steady_state(path, seq_len=2048)
    assert got["writes"] == 8
    assert got["first_result_s"] == pytest.approx(2.0)
    assert got["longest_pause_s"] == pytest.approx(1.5)
    assert got["steady_tokens_per_s"] == pytest.approx(6 * 2048 / 3.5)
    assert got["steady_window_s"] == pytest.approx(3.5)
    front = got["steady_fronts"]["front 0"]
    assert front["reads"] == 2
    assert front["wait_s"] == pytest.approx(0.5) and front["io_s"] == pytest.approx(5 * 100e-6)
    with gzip.open(tmp_path / "trace.json.gz", "wt") as f:
        f.write(path.read_text())
    assert steady_state(tmp_path / "trace.json.gz", seq_len=2048) == got
    path.write_text(json.dumps({"traceEvents": events[:4]}))       # two writes: too few to say
    assert steady_state(path, seq_len=2048) is None
