"""The distributed run against the 1-rank run (the oracle), under mpiexec at several world sizes."""
from __future__ import annotations

import json
import time

import h5py
import numpy as np
import pytest

from conftest import cli, make_tokens, mpirun, read

KEYS_EXACT = ("routing/expert_ids", "expert_load", "done", "lengths")


def assert_matches(got: dict, ref: dict, atol: float = 1e-5) -> None:
    for key in ("token_logprobs", "hidden", "sequence_logprob"):
        if key in ref:
            a, b = got[key], ref[key]
            assert np.array_equal(np.isnan(a), np.isnan(b)), key
            np.testing.assert_allclose(a[~np.isnan(a)], b[~np.isnan(b)], atol=atol, rtol=0, err_msg=key)
    for key in KEYS_EXACT:
        if key in ref:
            assert np.array_equal(got[key], ref[key]), key


@pytest.fixture(scope="module")
def ragged(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    path = d / "in.h5"
    make_tokens(path, 13, 40, 512, seed=int(np.random.SeedSequence().entropy % 2**31))
    ref = d / "ref.h5"
    cli("score", path, ref, "--config", "tiny", "--save-hidden", "--save-routing", "-T", "64", check=True)
    return path, read(ref)


@pytest.mark.parametrize("fronts,tokens", [(1, 64), (2, 40), (1, 1024), (2, 8)])
def test_matches_one_rank(tmp_path, ragged, fronts, tokens):
    """F = 1 and 2, micro-batches from one sequence (smaller than the fronts' shares) to all of them."""
    path, ref = ragged
    out = tmp_path / "out.h5"
    proc = mpirun(8 + fronts, "score", path, out, "--config", "tiny", "--front-ranks", fronts, "-T", tokens,
                  "--save-hidden", "--save-routing", "--in-flight", 3, check=True)
    assert "Traceback" not in proc.stderr
    got = read(out)
    assert_matches(got, ref)
    metrics = json.loads(got["attrs"]["metrics"])
    assert set(metrics["busy_fraction"]) == {f"front {f}" for f in range(fronts)} | {
        f"expert L{layer} E{e}" for layer in range(2) for e in range(4)}
    # tokens received per expert rank == the expert_load the fronts counted
    rows = [metrics["expert_rows_in"][f"expert L{layer} E{e}"] for layer in range(2) for e in range(4)]
    assert rows == ref["expert_load"].ravel().tolist()
    # every rank's CPU time while scoring, which the planner turns into a host overhead
    assert set(metrics["cpu_seconds"]) == set(metrics["busy_fraction"])
    assert all(v > 0 for v in metrics["cpu_seconds"].values())
    assert metrics["cpu_seconds_total"] == pytest.approx(sum(metrics["cpu_seconds"].values()), abs=1e-3)
    if (fronts, tokens) == (2, 40):
        from click.testing import CliRunner
        from moe_mpi.cli import main
        res = CliRunner().invoke(main, ["plan", "--config", "tiny", "--hardware", "cpu", "-F", "2", "-T", "40",
                                        "--host-overhead-from", str(out)])
        assert res.exit_code == 0, res.output
        assert res.output.startswith("host_overhead ") and f"{out} (F=2, " in res.output


def test_bitwise_repeatable_and_trace(tmp_path, ragged):
    path, _ = ragged
    a, b, trace = tmp_path / "a.h5", tmp_path / "b.h5", tmp_path / "t.json"
    args = ("--config", "tiny", "--front-ranks", 2, "-T", 24, "--save-hidden", "--save-routing")
    mpirun(10, "score", path, a, *args, "--trace", trace, check=True)
    mpirun(10, "score", path, b, *args, check=True)
    ra, rb = read(a), read(b)
    for key in ("token_logprobs", "hidden", "sequence_logprob", *KEYS_EXACT):
        assert np.array_equal(ra[key], rb[key], equal_nan=True), key
    events = json.loads(trace.read_text())["traceEvents"]
    ranks = {e["pid"] for e in events if e.get("ph") == "X"}
    assert ranks == set(range(10))
    cats = {e["cat"] for e in events if e.get("ph") == "X"}
    assert {"compute", "send"} <= cats


def test_resume_with_one_front_of_a_step_done(tmp_path, ragged):
    """A partial whose commit caught front 0's micro-batch of a step but not front 1's: --resume
    computes front 0's again (not written), so the experts multiply the same rows at that step as the
    uninterrupted run did, and the result is bit-identical to it (with front 0's dropped, front 1's
    rows went through the experts' products alone, which once rounded differently)."""
    from moe_mpi.config import ModelConfig
    from moe_mpi.io.inputs import validate_input
    from moe_mpi.io.outputs import OutputFile, SeqResult
    from moe_mpi.parallel.partition import make_plan
    from moe_mpi.runtime.job import ScoreOptions

    path, _ = ragged
    cfg = ModelConfig.load("tiny")
    args = ("--config", "tiny", "--front-ranks", 2, "-T", 24, "--save-routing", "--no-progress")
    full, half = tmp_path / "full.h5", tmp_path / "half.h5"
    mpirun(10, "score", path, full, *args, check=True)
    ref = read(full)
    plan = make_plan(ref["lengths"], 2, 24)
    step = next(j for j in plan.steps if plan.senders(j) == [0, 1])
    done = plan.per_front[0][step].tolist()
    spec = validate_input(str(path), cfg)
    opts = ScoreOptions(input=str(path), output=str(half), config="tiny", save_routing=True)
    out = OutputFile.create(str(half), cfg, spec, opts.output_options())
    n = ref["lengths"]
    results = [SeqResult(s, int(n[s]), ref["token_logprobs"][s, :n[s]], None, ref["routing/expert_ids"][:, s, :n[s]])
               for s in done]
    real = np.arange(ref["token_logprobs"].shape[1])[None, :] < n[done][:, None]
    load = np.stack([np.bincount(ref["routing/expert_ids"][layer, done][real].ravel(), minlength=cfg.n_routed_experts)
                     for layer in range(cfg.n_moe_layers)])
    out.write(results, load)
    out.close()
    proc = mpirun(10, "score", path, half, *args, "--resume", check=True)
    assert f"{int(n.sum() - n[done].sum())} tokens" in proc.stdout
    got = read(half)
    for key in ("token_logprobs", "sequence_logprob", *KEYS_EXACT):
        assert np.array_equal(got[key], ref[key], equal_nan=True), key


def test_experts_with_no_tokens(tmp_path):
    """One-token micro-batches: at each step most experts of each layer receive an empty message."""
    path = tmp_path / "in.h5"
    make_tokens(path, 6, 3, 512, seed=11, ragged=False)
    with h5py.File(path, "a") as f:
        f["lengths"][...] = [1, 1, 2, 1, 3, 1]
    ref, out = tmp_path / "ref.h5", tmp_path / "out.h5"
    cli("score", path, ref, "--config", "tiny", "--save-routing", "--save-hidden", check=True)
    mpirun(9, "score", path, out, "--config", "tiny", "-T", 1, "--save-routing", "--save-hidden", check=True)
    got, want = read(out), read(ref)
    assert_matches(got, want)
    assert (want["expert_load"] == 0).any() or want["expert_load"].sum() == 9 * 2 * 2


def test_activations_distributed(tmp_path):
    path, ref, out = tmp_path / "a.h5", tmp_path / "r.h5", tmp_path / "o.h5"
    cli("make-inputs", path, "--config", "tiny", "-n", 5, "-s", 12, "--activations", "--ragged", "--seed", 4,
        check=True)
    cli("score", path, ref, "--config", "tiny", check=True)
    mpirun(10, "score", path, out, "--config", "tiny", "--front-ranks", 2, "-T", 16, check=True)
    assert_matches(read(out), read(ref))


def test_nineteen_ranks_oversubscribed(tmp_path):
    """19 ranks on a 2-core machine (tiny16, F = 3): waiting ranks back off, so it ends in seconds."""
    path, ref, out = tmp_path / "in.h5", tmp_path / "r.h5", tmp_path / "o.h5"
    make_tokens(path, 12, 32, 512, seed=5)
    cli("score", path, ref, "--config", "tiny16", "--save-routing", check=True)
    t0 = time.monotonic()
    mpirun(19, "score", path, out, "--config", "tiny16", "--front-ranks", 3, "-T", 32, "--save-routing",
           check=True)
    print(f"19-rank tiny16 run: {time.monotonic() - t0:.1f} s wall including start-up")
    assert_matches(read(out), read(ref))


def test_bf16_distributed_repeatable(tmp_path, ragged):
    path, ref = ragged
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    for out in (a, b):
        mpirun(9, "score", path, out, "--config", "tiny", "--dtype", "bfloat16", "-T", 64, check=True)
    ra, rb = read(a), read(b)
    assert np.array_equal(ra["token_logprobs"], rb["token_logprobs"], equal_nan=True)
    one = tmp_path / "one.h5"
    cli("score", path, one, "--config", "tiny", "--dtype", "bfloat16", "-T", 64, check=True)
    diff = np.abs(ra["token_logprobs"] - read(one)["token_logprobs"])
    # bf16 GEMMs over differently sized batches round differently and can flip near-tie routes:
    # close on average, not bitwise.
    assert np.nanmean(diff) < 0.02, np.nanmean(diff)


def test_torch_profile_of_the_fronts(tmp_path, ragged, monkeypatch):
    """MOE_MPI_TORCH_PROFILE=DIR,FIRST,COUNT: each front writes its operator table and Chrome trace for
    that window of its micro-batches (here from the start until two have finished), and the scores are
    those of the 1-rank run all the same."""
    path, ref = ragged
    monkeypatch.setenv("MOE_MPI_TORCH_PROFILE", f"{tmp_path / 'prof'},0,2")
    out = tmp_path / "out.h5"
    mpirun(10, "score", path, out, "--config", "tiny", "--front-ranks", 2, "-T", 40, "--save-hidden",
           "--save-routing", check=True)
    assert_matches(read(out), ref)
    for f in (0, 1):
        table = (tmp_path / "prof" / f"front{f}.txt").read_text()
        assert "aten::" in table and "Self CPU" in table
        assert (tmp_path / "prof" / f"front{f}.json.gz").stat().st_size > 0


def test_recorder_counts_transport_passes_and_garbage_collections():
    """Passes over live messages add up in progress_s and become 'progress' spans when over 20 us;
    a full collection becomes a 'gc' span and adds to gc_s; stop_gc unhooks the callback."""
    import gc

    from moe_mpi.runtime.metrics import Recorder

    rec = Recorder(3, "front 0", tracing=True)
    rec.restart()
    t = rec.t0
    rec.add_progress(t + 1e-3, t + 1e-3 + 30e-6)
    rec.add_progress(t + 2e-3, t + 2e-3 + 10e-6)
    assert rec.progress_s == pytest.approx(40e-6)
    spans = [e for e in rec.events if e["cat"] == "progress"]
    assert len(spans) == 1 and spans[0]["ts"] == pytest.approx(1000.0) and spans[0]["dur"] == pytest.approx(30.0)
    before = len(gc.callbacks)
    rec.watch_gc()
    gc.collect()
    rec.stop_gc()
    assert len(gc.callbacks) == before
    collections = [e for e in rec.events if e["cat"] == "gc"]
    assert "gc gen2" in [e["name"] for e in collections] and rec.gc_s > 0
    assert rec.summary()["gc_s"] == rec.gc_s and rec.summary()["progress_s"] == rec.progress_s


def test_transport_pass_stops_each_ordered_queue_at_its_first_live_message():
    """A pass over live messages tests an ordered queue (one NCCL direction group) only up to its first
    message not done, and later ones on that queue when it has moved on; messages without an order
    are all tested on every pass; none is dropped."""
    import torch

    from moe_mpi.parallel.ops import Op, OpTransport

    class Fake(Op):
        def __init__(self, order, ready):
            self.order, self.ready, self.tests = order, ready, 0

        def progress(self) -> bool:
            self.tests += 1
            return self.ready

    tr = OpTransport({}, 1, 4, torch.float32, torch.device("cpu"))
    a = [Fake(("recv", 1, 2), False), Fake(("recv", 1, 2), True), Fake(("recv", 1, 2), True)]
    b = [Fake(("send", 1, 2), True), Fake(("send", 1, 2), False)]
    free = [Fake(None, False), Fake(None, True)]
    tr.live = [a[0], b[0], free[0], a[1], b[1], free[1], a[2]]
    tr._pass()
    assert [op.tests for op in a] == [1, 0, 0]            # stopped at the first of its queue
    assert [op.tests for op in b] == [1, 1] and [op.tests for op in free] == [1, 1]
    assert tr.live == [a[0], free[0], a[1], b[1], a[2]]
    a[0].ready = True
    tr._pass()
    assert [op.done for op in a] == [True, True, True] and [op.tests for op in a] == [2, 1, 1]
    assert tr.live == [free[0], b[1]]


def test_pass_interval_setting_is_read_and_checked(monkeypatch):
    """MOE_MPI_PASS_INTERVAL_US: unset, a test within 50 us of the last pass reuses it; a number of
    microseconds (0 included) sets that per transport; anything else names the variable."""
    import torch

    from moe_mpi.parallel.ops import OpTransport

    def made() -> OpTransport:
        return OpTransport({}, 1, 4, torch.float32, torch.device("cpu"))

    monkeypatch.delenv("MOE_MPI_PASS_INTERVAL_US", raising=False)
    assert made().PASS_INTERVAL == pytest.approx(50e-6)
    for raw, seconds in (("0", 0.0), (" 15 ", 15e-6), ("2.5", 2.5e-6)):
        monkeypatch.setenv("MOE_MPI_PASS_INTERVAL_US", raw)
        assert made().PASS_INTERVAL == pytest.approx(seconds)
    for bad in ("fast", "-1", "nan"):
        monkeypatch.setenv("MOE_MPI_PASS_INTERVAL_US", bad)
        with pytest.raises(ValueError, match="MOE_MPI_PASS_INTERVAL_US"):
            made()


def test_message_descriptions_are_formatted_when_read():
    """What a pending message reports (the watchdog's words) is the same text whether it was formatted
    when the message was made or, as now, when a report asks."""
    from moe_mpi.parallel.ops import REPLY_FROM, SEND_TO, Described, OpSends

    class Pending:
        done = False

        def __init__(self, what):
            self.what = what

    ops = [Pending(Described(SEND_TO, 7, 1, 1, 12)), Pending(Described(REPLY_FROM, 4, 2, 0, 3)), Pending("plain")]
    assert OpSends(None, ops).pending() == [
        "send to rank 7 (expert 1 of MoE layer 1), micro-batch step 12",
        "reply from rank 4 (expert 2 of MoE layer 0), micro-batch step 3", "plain"]
    assert f"{ops[0].what}: 3 rows" == "send to rank 7 (expert 1 of MoE layer 1), micro-batch step 12: 3 rows"
