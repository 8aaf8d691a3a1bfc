"""GPU execution (docs/gpu.md).  Tests that need CUDA skip where torch sees no GPU, so CI stays CPU-only;
the transports' protocols (pinned staging, and NCCL's with MPI carrying the payloads) and the
device-independent random weights are checked on CPUs as well; the GPU benchmark scripts' procedures
are checked on CPUs in test_benchmarks.py.

On GPUs the reference is the 1-rank CPU fp32 run: bf16 outputs must agree within bf16 tolerance, and
routing must agree except at near-ties (top-k margin under 0.01 in the fp32 run) and downstream of
them (a route that flips at layer l, position t changes what later layers see at positions >= t).
"""
from __future__ import annotations

import os
import subprocess

import h5py
import numpy as np
import pytest
import torch

from conftest import REPO, cli, env, make_tokens, mpi_python, mpirun, read
from moe_mpi.config import ModelConfig
from moe_mpi.model.transformer import Batch, LocalExperts, drive
from moe_mpi.model.weights import build_all_experts, build_front, random_tensor
from moe_mpi.parallel.devices import Slot, describe_sharing, mps_control
from moe_mpi.parallel.exchange import mpi_cuda_aware

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
NEAR_TIE = 0.01


def route_margins(cfg: ModelConfig, tokens: np.ndarray, lengths: np.ndarray, seed: int = 0) -> np.ndarray:
    """(L_moe, B, S): the fp32 run's gap between the k-th and (k+1)-th choice score of each token
    (inf at padding).  Needs n_group == 1 (the tiny preset)."""
    assert cfg.n_group == 1
    front, experts = build_front(cfg, seed=seed), LocalExperts(build_all_experts(cfg, seed=seed))
    captured = []
    for i, layer in enumerate(front.model.layers):
        if cfg.is_moe_layer(i):
            layer.mlp.gate.register_forward_hook(lambda m, inp, out: captured.append((m, inp[0])))
    batch = Batch(torch.as_tensor(lengths), tokens_BS=torch.as_tensor(tokens))
    with torch.inference_mode():
        drive(front.forward_steps(batch), experts)
    K, valid = cfg.num_experts_per_tok, batch.valid_BS
    out = []
    for gate, h in captured:
        choice = torch.sigmoid(h.float() @ gate.weight.float().t()) + gate.e_score_correction_bias.float()
        top = choice.topk(K + 1, dim=-1).values
        m = torch.full(valid.shape, float("inf"))
        m[valid] = top[:, K - 1] - top[:, K]
        out.append(m.numpy())
    return np.stack(out)


def unexplained_routes(got_ids: np.ndarray, ref_ids: np.ndarray, margins: np.ndarray, tol: float = NEAR_TIE):
    """Routing differences (as sets of experts) neither at a near-tie nor downstream of an earlier flip."""
    diff = (np.sort(got_ids, -1) != np.sort(ref_ids, -1)).any(-1)
    bad = []
    for layer, b, t in np.argwhere(diff):
        near = margins[layer, b, t] < tol
        downstream = any(diff[l0, b, : t + 1].any() for l0 in range(layer))
        if not (near or downstream):
            bad.append((int(layer), int(b), int(t), float(margins[layer, b, t])))
    return diff.sum(), bad


def assert_bf16_agrees(got: dict, ref: dict, margins: np.ndarray) -> None:
    a, b = got["token_logprobs"], ref["token_logprobs"]
    assert np.array_equal(np.isnan(a), np.isnan(b))
    d = np.abs(a - b)[~np.isnan(b)]
    # bf16 weights and activations against fp32: ~0.01-0.02 on average at this size (CPU bf16 measured 0.018)
    assert d.mean() < 0.05, d.mean()
    n_diff, bad = unexplained_routes(got["routing/expert_ids"], ref["routing/expert_ids"], margins)
    assert not bad, f"{n_diff} routing differences, these not at near-ties: {bad[:10]}"
    assert n_diff <= 0.05 * ref["routing/expert_ids"][..., 0].size


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Tokens, the 1-rank CPU fp32 run of them (tiny preset) and its routing margins."""
    d = tmp_path_factory.mktemp("gpu")
    path = d / "in.h5"
    make_tokens(path, 12, 40, 512, seed=21)
    ref = d / "ref.h5"
    cli("score", path, ref, "--config", "tiny", "--save-routing", "--save-hidden", "-T", 64, check=True)
    with h5py.File(path) as f:
        margins = route_margins(ModelConfig.load("tiny"), f["tokens"][...], f["lengths"][...])
    return path, read(ref), margins


# --- on any machine ---

def test_random_weights_are_the_same_on_every_device():
    cfg = ModelConfig.load("tiny")
    name, shape = "model.layers.1.mlp.experts.2.down_proj.weight", (64, 32)
    fp32 = random_tensor(cfg, 5, name, shape)
    assert abs(float(fp32.std()) - cfg.initializer_range) < 0.1 * cfg.initializer_range
    assert torch.equal(random_tensor(cfg, 5, name, shape, dtype=torch.bfloat16), fp32.to(torch.bfloat16))
    assert not torch.equal(random_tensor(cfg, 6, name, shape), fp32)
    if torch.cuda.is_available():
        for dtype in (torch.float32, torch.bfloat16):
            on_gpu = random_tensor(cfg, 5, name, shape, device="cuda", dtype=dtype)
            assert torch.equal(on_gpu.cpu(), fp32.to(dtype))


@pytest.mark.parametrize("transport,thread,slots", [("mpi-staged", "0", ""), ("nccl", "0", ""), ("nccl", "1", ""),
                                                    ("ipc", "0", ""), ("ipc", "1", "3")])
def test_transport_protocols_on_cpu(tmp_path, reference, transport, thread, slots):
    """The staged transport's chunks, the NCCL transport's control/go-ahead protocol (MPI carrying
    the payloads, four pretend GPUs so that some pairs share one and take the staged path) and the IPC
    transport's rings and slot hand-backs (over an MPI shared-memory window), with and without the
    progress thread, give the 1-rank results exactly.  IPC also with as many slots per pair as
    micro-batches in flight, the least it allows."""
    path, ref, _ = reference
    out = tmp_path / "out.h5"
    run_env = dict(env(), MOE_MPI_TEST_NCCL_OVER_MPI="1", MOE_MPI_TEST_CPU_GPUS="4", MOE_MPI_STAGE_CHUNK_MB="0.002",
                   MOE_MPI_PROGRESS_THREAD=thread, **({"MOE_MPI_IPC_SLOTS": slots} if slots else {}))
    cmd = mpi_python(10, "-m", "moe_mpi", "score", path, out, "--config", "tiny", "--front-ranks", 2, "-T", 64,
                     "--in-flight", 3, "--save-routing", "--save-hidden", "--transport", transport)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=run_env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = read(out)
    np.testing.assert_allclose(got["token_logprobs"], ref["token_logprobs"], atol=1e-5, rtol=0)
    assert np.array_equal(got["routing/expert_ids"], ref["routing/expert_ids"])


def test_cpu_affinity_near_the_gpu(tmp_path, monkeypatch):
    """MOE_MPI_CPU_AFFINITY=gpu keeps a rank on the CPUs of its GPU's NUMA node that it may use, read
    from the GPU's PCI device in sysfs; unset or off leaves the launcher's binding; anything else is
    refused by name."""
    from types import SimpleNamespace

    from moe_mpi.parallel import devices

    assert devices.parse_cpulist("0-3,8,10-11\n") == {0, 1, 2, 3, 8, 10, 11}
    assert devices.format_cpulist({11, 0, 1, 2, 3, 8, 10}) == "0-3,8,10-11"
    pci = tmp_path / "0000:1b:00.0"
    pci.mkdir()
    (pci / "local_cpulist").write_text("4-7,36-39\n")
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda d: SimpleNamespace(pci_bus_id=0x1b, pci_device_id=0, pci_domain_id=0))
    gpu = torch.device("cuda", 0)
    assert devices.gpu_local_cpus(gpu, sysfs=str(tmp_path)) == {4, 5, 6, 7, 36, 37, 38, 39}
    assert devices.gpu_local_cpus(gpu, sysfs=str(tmp_path / "none")) is None
    taken = []
    monkeypatch.setattr(devices, "gpu_local_cpus", lambda d: {4, 5, 6, 7, 36, 37, 38, 39})
    monkeypatch.setattr(devices.os, "sched_getaffinity", lambda pid: set(range(0, 38)), raising=False)
    monkeypatch.setattr(devices.os, "sched_setaffinity", lambda pid, cpus: taken.append(set(cpus)), raising=False)
    monkeypatch.delenv("MOE_MPI_CPU_AFFINITY", raising=False)
    assert devices.pin_near_gpu(gpu) is None and taken == []
    monkeypatch.setenv("MOE_MPI_CPU_AFFINITY", "off")
    assert devices.pin_near_gpu(gpu) is None and taken == []
    monkeypatch.setenv("MOE_MPI_CPU_AFFINITY", "GPU")
    assert devices.pin_near_gpu(gpu) == "4-7,36-37" and taken == [{4, 5, 6, 7, 36, 37}]
    monkeypatch.setattr(devices, "gpu_local_cpus", lambda d: None)      # nothing known: left alone
    assert devices.pin_near_gpu(gpu) is None and len(taken) == 1
    monkeypatch.setenv("MOE_MPI_CPU_AFFINITY", "numa")
    with pytest.raises(ValueError, match="MOE_MPI_CPU_AFFINITY"):
        devices.pin_near_gpu(gpu)


def test_gpu_sharing_report_says_who_shares_and_who_runs_under_mps(tmp_path, monkeypatch):
    """Rank 0's log line: one GPU each; shared without MPS (with the hint); shared under MPS; a mix.
    The MPS check finds a daemon's control pipe where CUDA would look for it."""
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(tmp_path))
    assert mps_control() is None
    os.mkfifo(tmp_path / "control")
    assert mps_control() == str(tmp_path / "control")

    def slots(gpus, mps):
        return [Slot("n1", f"GPU-{g}", g, "H", m) for g, m in zip(gpus, mps)]

    assert describe_sharing(slots([0, 1, 2], [False] * 3)) == "GPUs: 3 ranks, one GPU each (H)"
    off = describe_sharing(slots([0, 1, 0, 1, 1], [False] * 5))
    assert off.splitlines()[:3] == [
        "GPUs: 5 ranks share 2 GPUs (each process has its own context; the GPU time-slices between them):",
        "  n1 GPU GPU-0 (H, index 0 for rank 0): ranks 0, 2",
        "  n1 GPU GPU-1 (H, index 1 for rank 1): ranks 1, 3, 4"]
    assert "nvidia-cuda-mps-control -d" in off.splitlines()[3]
    on = describe_sharing(slots([0, 1, 0, 1, 1], [True] * 5))
    assert on.splitlines()[0] == "GPUs: 5 ranks share 2 GPUs (under MPS, their kernels run side by side):"
    assert len(on.splitlines()) == 3
    mixed = describe_sharing(slots([0, 1, 0, 2], [True, False, False, False]))   # rank 1 is alone
    assert mixed.splitlines()[0] == "GPUs: 4 ranks share 3 GPUs (rank 2 found no MPS daemon and takes time slices):"


# --- on GPUs ---

@needs_cuda
def test_one_process_on_gpu_matches_cpu(tmp_path, reference):
    path, ref, margins = reference
    fp32, bf16 = tmp_path / "fp32.h5", tmp_path / "bf16.h5"
    cli("score", path, fp32, "--config", "tiny", "--device", "cuda", "--save-routing", "-T", 64, check=True)
    cli("score", path, bf16, "--config", "tiny", "--device", "cuda", "--dtype", "bfloat16", "--save-routing",
        "-T", 64, check=True)
    got = read(fp32)
    np.testing.assert_allclose(got["token_logprobs"], ref["token_logprobs"], atol=2e-3, rtol=0)
    n_diff, bad = unexplained_routes(got["routing/expert_ids"], ref["routing/expert_ids"], margins, tol=1e-4)
    assert not bad
    assert_bf16_agrees(read(bf16), ref, margins)


@needs_cuda
@pytest.mark.parametrize("transport", ["auto", "nccl", "mpi-staged", "ipc, SM copies"])
def test_distributed_on_gpus_matches_cpu_fp32(tmp_path, reference, transport, monkeypatch):
    """9 ranks over the visible GPUs (sharing them: the NCCL transport sends pairs on one GPU through
    pinned staging), bf16, against the 1-rank CPU fp32 run; "ipc, SM copies" copies every IPC message
    by the SM kernel instead of the copy engines."""
    if transport == "ipc, SM copies":
        monkeypatch.setenv("MOE_MPI_IPC_SM_COPY_MB", "0")
        transport = "ipc"
    path, ref, margins = reference
    out = tmp_path / "out.h5"
    proc = mpirun(9, "score", path, out, "--config", "tiny", "--device", "cuda", "--dtype", "bfloat16",
                  "--transport", transport, "-T", 40, "--in-flight", 3, "--save-routing", check=True)
    assert "GPUs:" in proc.stderr     # rank 0 reports the binding
    assert_bf16_agrees(read(out), ref, margins)


@needs_cuda
def test_mpi_transport_needs_a_cuda_aware_mpi(tmp_path, reference):
    if mpi_cuda_aware():
        pytest.skip("this MPI is CUDA-aware")
    path, _, _ = reference
    proc = mpirun(9, "score", path, tmp_path / "out.h5", "--config", "tiny", "--device", "cuda",
                  "--transport", "mpi")
    assert proc.returncode != 0
    assert "CUDA-aware" in proc.stderr


@needs_cuda
@pytest.mark.parametrize("sm_copies", [False, True], ids=["copy engines", "SM copies"])
def test_exchange_benchmark_round_trips_on_gpus(tmp_path, monkeypatch, sm_copies):
    if torch.cuda.device_count() < 4:
        pytest.skip("needs 4 GPUs: NCCL takes one GPU per rank")
    monkeypatch.setenv("MOE_MPI_IPC_SM_COPY_MB", "0" if sm_copies else "off")
    cmd = mpi_python(4, REPO / "benchmarks" / "gpu_exchange.py", "--small", "--out", tmp_path,
                     *(["--transports", "ipc"] if sm_copies else []))
    proc = subprocess.run(cmd,
                          capture_output=True, text=True, timeout=240, env=env(), cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "round trips all correct" in proc.stdout


@needs_cuda
def test_front_forward_never_waits_for_the_gpu():
    """The front queues a micro-batch's work up to each MoE layer, and its outputs, without a single
    device-to-host synchronisation (CUDA's sync debug mode raises on one), so one micro-batch's host
    work overlaps another's kernels; then the results agree with the same forward driven plainly."""
    from moe_mpi.model.transformer import to_device
    from moe_mpi.runtime.job import PendingResults

    cfg, dev = ModelConfig.load("tiny"), torch.device("cuda", 0)
    front = build_front(cfg, seed=1, device=dev, dtype=torch.bfloat16)
    experts = LocalExperts(build_all_experts(cfg, seed=1, device=dev, dtype=torch.bfloat16))
    rng = np.random.default_rng()
    lengths = rng.integers(1, 33, size=5)
    tokens = rng.integers(0, cfg.vocab_size, size=(5, 32))
    batch = Batch(to_device(lengths, dev), tokens_BS=to_device(tokens, dev), lengths_host=lengths)
    with torch.inference_mode():
        ref = drive(front.forward_steps(batch), experts)
        gen = front.forward_steps(batch)
        answers = 0
        try:
            torch.cuda.set_sync_debug_mode("error")
            req = next(gen)
            while True:
                torch.cuda.set_sync_debug_mode(0)        # the experts (elsewhere in a real run) may wait
                y = experts(req)
                answers += 1
                torch.cuda.set_sync_debug_mode("error")
                req = gen.send(y)
        except StopIteration as stop:
            res = stop.value
            pending = PendingResults(front, batch, np.arange(5), res, save_hidden=True, save_routing=True)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert answers == cfg.n_moe_layers
    assert torch.equal(res.hidden_BSD, ref.hidden_BSD)
    got = pending.get()
    want = PendingResults(front, batch, np.arange(5), ref, save_hidden=True, save_routing=True).get()
    for g, w in zip(got, want):
        assert g.length == w.length and np.array_equal(g.token_logprobs, w.token_logprobs, equal_nan=True)
        assert np.array_equal(g.expert_ids, w.expert_ids)


def test_ipc_slots_below_in_flight_are_refused(tmp_path, reference):
    """Fewer IPC slots per pair than micro-batches in flight could deadlock: refused before any work,
    naming the setting, with nothing written."""
    path, _, _ = reference
    out = tmp_path / "out.h5"
    cmd = mpi_python(10, "-m", "moe_mpi", "score", path, out, "--config", "tiny", "--front-ranks", 2,
                     "--in-flight", 3, "--transport", "ipc")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=dict(env(), MOE_MPI_IPC_SLOTS="2"),
                          cwd=REPO)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "MOE_MPI_IPC_SLOTS=2 is below --in-flight 3" in proc.stderr
    assert not out.exists() and not list(tmp_path.glob("out.h5*"))
