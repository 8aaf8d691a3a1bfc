"""The command line end to end on one rank: scoring, outputs read back by h5py and h5dump, layout,
make-inputs/inspect, resume of a half-done output."""
from __future__ import annotations

import json
import shutil
import subprocess

import h5py
import numpy as np
import pytest
import torch

from moe_mpi.config import ModelConfig
from moe_mpi.io.outputs import OutputFile, partial_path
from moe_mpi.io.inputs import validate_input
from moe_mpi.model.transformer import Batch, LocalExperts, drive
from moe_mpi.model.weights import build_all_experts, build_front
from moe_mpi.runtime.job import ScoreOptions

from conftest import REPO, cli, env, make_tokens, read


def reference_logprobs(cfg: ModelConfig, tokens: np.ndarray, lengths: np.ndarray, seed: int = 0) -> np.ndarray:
    """Each sequence alone through the model, unpadded: an independent path to the same numbers."""
    front = build_front(cfg, seed=seed)
    experts = LocalExperts(build_all_experts(cfg, seed=seed))
    out = np.full(tokens.shape, np.nan, dtype=np.float32)
    with torch.no_grad():
        for i, n in enumerate(lengths):
            t = torch.from_numpy(tokens[i:i + 1, :n].astype(np.int64))
            res = drive(front.forward_steps(Batch(torch.tensor([n]), tokens_BS=t)), experts)
            logits = front.lm_head(res.hidden_BSD[0]).float()
            lp = torch.log_softmax(logits, -1)[:-1].gather(1, t[0, 1:, None])[:, 0]
            out[i, 1:n] = lp.numpy()
    return out


def test_score_end_to_end(tmp_path, tiny_input):
    out = tmp_path / "out.h5"
    proc = cli("score", tiny_input, out, "--config", "tiny", "-T", "64", "--save-routing", "--save-hidden",
               check=True)
    assert "tokens/s" in proc.stdout and "mean log-prob" in proc.stdout
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out.h5.partial").exists()
    got = read(out)
    with h5py.File(tiny_input) as f:
        tokens, lengths = f["tokens"][...], f["lengths"][...]
    cfg = ModelConfig.load("tiny")
    ref = reference_logprobs(cfg, tokens, lengths)
    lp = got["token_logprobs"]
    assert np.array_equal(np.isnan(lp), np.isnan(ref))                 # NaN at t=0 and t>=length
    assert np.isnan(lp[:, 0]).all()
    np.testing.assert_allclose(lp[~np.isnan(lp)], ref[~np.isnan(ref)], atol=1e-5, rtol=0)
    np.testing.assert_allclose(got["sequence_logprob"], np.nansum(ref.astype(np.float64), axis=1), atol=1e-4)
    assert got["done"].all()
    assert np.array_equal(got["lengths"], lengths)
    ids = got["routing/expert_ids"]
    assert ids.shape == (cfg.n_moe_layers, 10, 24, cfg.num_experts_per_tok)
    valid = np.arange(24)[None, :] < lengths[:, None]
    assert (ids[:, valid] >= 0).all() and (ids[:, ~valid] == -1).all()
    load = np.stack([np.bincount(ids[layer][valid].ravel(), minlength=cfg.n_routed_experts)
                     for layer in range(cfg.n_moe_layers)])
    assert np.array_equal(got["expert_load"], load)
    assert got["expert_load"].sum() == lengths.sum() * cfg.num_experts_per_tok * cfg.n_moe_layers
    assert np.isnan(got["hidden"][~valid]).all() and np.isfinite(got["hidden"][valid]).all()
    attrs = got["attrs"]
    for key in ("config", "package_version", "torch_version", "mpi_library", "world_size", "front_ranks",
                "dtype", "device", "seed", "elapsed_seconds", "tokens_per_second"):
        assert key in attrs, key
    assert ModelConfig.from_dict(json.loads(attrs["config"])) == cfg


@pytest.mark.skipif(shutil.which("h5dump") is None, reason="h5dump (hdf5-tools) not installed")
def test_output_opens_in_h5dump(tmp_path, tiny_input):
    out = tmp_path / "out.h5"
    cli("score", tiny_input, out, "--config", "tiny", check=True)
    header = subprocess.run(["h5dump", "-H", str(out)], capture_output=True, text=True, check=True).stdout
    for name in ("token_logprobs", "sequence_logprob", "done", "expert_load", "lengths"):
        assert f'DATASET "{name}"' in header
    data = subprocess.run(["h5dump", "-d", "/done", str(out)], capture_output=True, text=True, check=True).stdout
    assert "DATA" in data


def test_activations_mode(tmp_path):
    cfg = ModelConfig.load("tiny")
    path, out = tmp_path / "act.h5", tmp_path / "out.h5"
    cli("make-inputs", path, "--config", "tiny", "-n", "3", "-s", "9", "--activations", "--ragged",
        "--act-dtype", "bfloat16", "--seed", "5", check=True)
    cli("score", path, out, "--config", "tiny", check=True)
    got = read(out)
    assert "token_logprobs" not in got
    with h5py.File(path) as f:
        bits, lengths = f["activations"][...], f["lengths"][...]
    x = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).float()
    front, experts = build_front(cfg), LocalExperts(build_all_experts(cfg))
    for i, n in enumerate(lengths):
        res = drive(front.forward_steps(Batch(torch.tensor([n]), embeds_BSD=x[i:i + 1, :n])), experts)
        np.testing.assert_allclose(got["hidden"][i, :n], res.hidden_BSD[0].detach().numpy(), atol=1e-5)
        assert np.isnan(got["hidden"][i, n:]).all()


def test_refuses_to_overwrite(tmp_path, tiny_input):
    out = tmp_path / "out.h5"
    cli("score", tiny_input, out, "--config", "tiny", check=True)
    before = out.read_bytes()
    proc = cli("score", tiny_input, out, "--config", "tiny")
    assert proc.returncode == 2 and "--overwrite" in proc.stderr and "Traceback" not in proc.stderr
    assert out.read_bytes() == before
    proc = cli("score", tiny_input, out, "--config", "tiny", "--resume")
    assert proc.returncode == 2 and "is complete already" in proc.stderr and "--overwrite" in proc.stderr
    assert out.read_bytes() == before
    cli("score", tiny_input, out, "--config", "tiny", "--overwrite", check=True)


def _partial(out, tiny_input, seqs) -> OutputFile:
    """OUT.h5.partial of the tiny input with random results for seqs written and committed (open)."""
    from moe_mpi.io.outputs import SeqResult
    cfg = ModelConfig.load("tiny")
    spec = validate_input(str(tiny_input), cfg)
    opts = ScoreOptions(input=str(tiny_input), output=str(out), config="tiny")
    part = OutputFile.create(str(out), cfg, spec, opts.output_options())
    rng = np.random.default_rng()
    part.write([SeqResult(s, int(spec.lengths[s]), rng.standard_normal(int(spec.lengths[s])).astype(np.float32),
                          None, None) for s in seqs],
               rng.integers(1, 9, size=(cfg.n_moe_layers, cfg.n_routed_experts)))
    return part


def test_commit_syncs_data_before_the_record(tmp_path, tiny_input, monkeypatch):
    """A node that crashes loses what its page cache held: each commit syncs the output's data to the disk
    before the record that calls them done, and the end syncs the file before renaming it complete,
    then its directory."""
    import os as _os
    from moe_mpi.io import outputs
    events = []
    real_fsync, real_replace = _os.fsync, _os.replace

    def fsync(fd):
        events.append(("fsync", _os.path.basename(_os.readlink(f"/proc/self/fd/{fd}"))))
        real_fsync(fd)

    def replace(a, b):
        events.append(("rename", _os.path.basename(str(a)), _os.path.basename(str(b))))
        real_replace(a, b)

    out = tmp_path / "o.h5"
    part = _partial(out, tiny_input, [])        # created, nothing committed yet
    monkeypatch.setattr(outputs.os, "fsync", fsync)
    monkeypatch.setattr(outputs.os, "replace", replace)
    part.commit_interval = 0.0
    from moe_mpi.io.outputs import SeqResult
    n = int(part.spec.lengths[4])
    part.write([SeqResult(4, n, np.random.default_rng().standard_normal(n).astype(np.float32), None, None)],
               np.ones((part.cfg.n_moe_layers, part.cfg.n_routed_experts), np.int64))
    assert events == [("fsync", "o.h5.partial"), ("fsync", "o.h5.partial.state.npz.tmp.npz"),
                      ("rename", "o.h5.partial.state.npz.tmp.npz", "o.h5.partial.state.npz")], events
    events.clear()
    part.finish({})
    assert events == [("fsync", "o.h5.partial"), ("rename", "o.h5.partial", "o.h5"), ("fsync", tmp_path.name)], events


def test_leftover_partial_needs_resume_or_overwrite(tmp_path, tiny_input):
    """A .partial left by an unfinished run is hours of work: a run without --resume or --overwrite
    refuses to replace it, and no run touches one that another process holds open (a job still
    writing it), whatever the flags."""
    from moe_mpi.io.outputs import state_path
    out = tmp_path / "o.h5"
    _partial(out, tiny_input, [3]).close()
    partial, state = tmp_path / "o.h5.partial", tmp_path / "o.h5.partial.state.npz"
    assert str(state) == state_path(str(out))
    before = partial.read_bytes(), state.read_bytes()

    proc = cli("score", tiny_input, out, "--config", "tiny")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert str(partial) in proc.stderr and "--resume" in proc.stderr and "--overwrite" in proc.stderr
    assert (partial.read_bytes(), state.read_bytes()) == before and not out.exists()

    with h5py.File(partial, "r+"):                     # another process writing it
        for flag in ("--resume", "--overwrite"):
            proc = cli("score", tiny_input, out, "--config", "tiny", flag)
            assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
            assert str(partial) in proc.stderr and "open in another process" in proc.stderr, proc.stderr
    assert (partial.read_bytes(), state.read_bytes()) == before and not out.exists()

    cli("score", tiny_input, out, "--config", "tiny", "--overwrite", check=True)
    assert out.exists() and not partial.exists() and not state.exists()
    assert read(out)["done"].all()


def test_resume_knows_the_input_by_its_contents(tmp_path, tiny_input):
    """--resume continues from a copy of the input at another path (a node's scratch disk), and refuses
    an input rewritten in place since the partial was made, even with the same shapes."""
    ref = tmp_path / "ref.h5"
    cli("score", tiny_input, ref, "--config", "tiny", check=True)
    moved = tmp_path / "scratch" / "copy.h5"
    moved.parent.mkdir()
    shutil.copy(tiny_input, moved)
    out = tmp_path / "o.h5"
    _partial(out, tiny_input, []).close()
    cli("score", moved, out, "--config", "tiny", "--resume", check=True)
    assert np.array_equal(read(out)["token_logprobs"], read(ref)["token_logprobs"], equal_nan=True)

    _partial(out, tiny_input, [2]).close()
    with h5py.File(tiny_input, "r+") as f:     # one token changed, inside sequence 0
        f["tokens"][0, 0] = (f["tokens"][0, 0] + 1) % 512
    before = (tmp_path / "o.h5.partial").read_bytes()
    proc = cli("score", tiny_input, out, "--config", "tiny", "--resume")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"{tiny_input} does not hold the input it was made from" in proc.stderr, proc.stderr
    assert (tmp_path / "o.h5.partial").read_bytes() == before


def test_input_digest(tmp_path, tiny_input):
    """The digest is of contents: equal for a copy, different for any one changed element, padding too."""
    cfg = ModelConfig.load("tiny")
    copy = tmp_path / "copy.h5"
    shutil.copy(tiny_input, copy)
    first = validate_input(str(tiny_input), cfg).sha256
    assert len(first) == 64 and validate_input(str(copy), cfg).sha256 == first
    with h5py.File(copy, "r+") as f:
        n, S = int(f["lengths"][-1]), f["tokens"].shape[1]
        f["lengths"][-1] = n - 1 if n > 1 else n + 1
    assert validate_input(str(copy), cfg).sha256 != first
    shutil.copy(tiny_input, copy)
    with h5py.File(copy, "r+") as f:
        i = int(np.argmin(f["lengths"][...]))
        assert f["lengths"][i] < S
        f["tokens"][i, S - 1] = (f["tokens"][i, S - 1] + 1) % 512      # padding
    assert validate_input(str(copy), cfg).sha256 != first


def test_inspect_partial_reports_committed_sequences(tmp_path, tiny_input):
    """`inspect` on a partial output counts what the commit record says is done (the truth; the HDF5
    copy can be a write behind after a kill), also while another process holds the file open."""
    out = tmp_path / "o.h5"
    part = _partial(out, tiny_input, np.random.default_rng().choice(10, size=3, replace=False).tolist())
    spec = part.spec
    part.f["done"][...] = False                 # killed after the commit record, before the HDF5 copy
    part.close()
    partial = f"{out}.partial"
    proc = cli("inspect", partial, check=True)
    assert f"done: 3 of {spec.n_seqs} sequences committed (o.h5.partial.state.npz)" in proc.stdout, proc.stdout
    assert "still running" not in proc.stdout
    with h5py.File(partial, "r+"):
        proc = cli("inspect", partial, check=True)
    assert "a job still running" in proc.stdout and f"done: 3 of {spec.n_seqs}" in proc.stdout, proc.stdout


def test_resume_of_half_done_output(tmp_path, tiny_input):
    """A partial file with some micro-batches done: --resume computes only the rest, and the result is
    bitwise identical to an uninterrupted run."""
    cfg = ModelConfig.load("tiny")
    full, half = tmp_path / "full.h5", tmp_path / "half.h5"
    cli("score", tiny_input, full, "--config", "tiny", "-T", "48", "--save-routing", check=True)
    ref = read(full)
    # Make a partial by hand: the first sequences done with their true rows, the rest untouched.
    opts = ScoreOptions(input=str(tiny_input), output=str(half), config="tiny", save_routing=True)
    spec = validate_input(str(tiny_input), cfg)
    out = OutputFile.create(str(half), cfg, spec, opts.output_options())
    from moe_mpi.io.outputs import SeqResult
    from moe_mpi.parallel.partition import make_plan
    first = make_plan(ref["lengths"], 1, 48).per_front[0]
    done = sorted(set(first[0]) | set(first[len(first) - 1]))   # two whole micro-batches
    results = [SeqResult(s, int(ref["lengths"][s]), ref["token_logprobs"][s, :ref["lengths"][s]], None,
                         ref["routing/expert_ids"][:, s, :ref["lengths"][s]]) for s in done]
    load = np.stack([np.bincount(ref["routing/expert_ids"][layer, done][
        np.arange(ref["token_logprobs"].shape[1])[None, :] < ref["lengths"][done][:, None]].ravel(),
        minlength=cfg.n_routed_experts) for layer in range(cfg.n_moe_layers)])
    out.write(results, load)
    out.close()
    assert partial_path(str(half)).endswith(".partial")
    proc = cli("score", tiny_input, half, "--config", "tiny", "-T", "48", "--save-routing", "--resume",
               "--no-progress", check=True)
    assert f"{int(ref['lengths'].sum() - ref['lengths'][done].sum())} tokens" in proc.stdout
    got = read(half)
    for key in ("token_logprobs", "sequence_logprob", "routing/expert_ids", "expert_load", "done", "lengths"):
        assert np.array_equal(got[key], ref[key], equal_nan=True), key


def test_commit_interval_defers_done_until_commit(tmp_path, tiny_input):
    """With a commit interval, written sequences count as done only once committed: a kill between
    commits leaves them not done (--resume recomputes them), and commit() or finish() records them."""
    from moe_mpi.io.outputs import SeqResult, state_path
    cfg = ModelConfig.load("tiny")
    out_path = tmp_path / "o.h5"
    spec = validate_input(str(tiny_input), cfg)
    opts = ScoreOptions(input=str(tiny_input), output=str(out_path), config="tiny")
    out = OutputFile.create(str(out_path), cfg, spec, opts.output_options())
    out.commit_interval = 3600.0
    rng = np.random.default_rng()
    n = spec.n_seqs

    def result(s):
        return SeqResult(s, int(spec.lengths[s]), rng.standard_normal(int(spec.lengths[s])).astype(np.float32),
                         None, None)

    def committed():
        with np.load(state_path(str(out_path))) as st:
            return np.unpackbits(st["done"], count=n).astype(bool), st["expert_load"]

    load = rng.integers(1, 9, size=(cfg.n_moe_layers, cfg.n_routed_experts))
    out.write([result(0)], load)                        # the first write commits at once
    done, got_load = committed()
    assert done.tolist() == [True] + [False] * (n - 1) and np.array_equal(got_load, load)
    out.write([result(1), result(2)], 2 * load)         # inside the interval: written, not committed
    done, got_load = committed()
    assert done.sum() == 1 and np.array_equal(got_load, load) and out.n_done == 3
    out.commit()
    done, got_load = committed()
    assert done[:3].all() and done.sum() == 3 and np.array_equal(got_load, 3 * load)
    out.close()


def test_resume_refuses_other_settings(tmp_path, tiny_input):
    out = tmp_path / "o.h5"
    cfg = ModelConfig.load("tiny")
    opts = ScoreOptions(input=str(tiny_input), output=str(out), config="tiny")
    OutputFile.create(str(out), cfg, validate_input(str(tiny_input), cfg), opts.output_options()).close()
    proc = cli("score", tiny_input, out, "--config", "tiny", "--resume", "--seed", "3")
    assert proc.returncode == 2 and "cannot resume" in proc.stderr and "seed" in proc.stderr


def test_layout_and_tools(tmp_path):
    proc = cli("layout", "--config", "tiny", "--front-ranks", "2", check=True)
    assert "world size: 10" in proc.stdout
    assert cli("layout", "--config", "paper", "--world-size", check=True).stdout.strip() == str(1 + 256 * 58)
    lay = json.loads(cli("layout", "--config", "tiny", "--json", check=True).stdout)
    assert lay["ranks"][1] == {"rank": 1, "kind": "expert", "front": None, "layer": 0, "expert": 0}
    assert lay["ranks"][8] == {"rank": 8, "kind": "expert", "front": None, "layer": 1, "expert": 3}
    path = tmp_path / "m.h5"
    cli("make-inputs", path, "--config", "tiny", "-n", "4", "-s", "8", check=True)
    assert "tokens" in cli("inspect", path, check=True).stdout
    for cmd in ("score", "make-inputs", "layout", "inspect", "export-model"):
        assert cli(cmd, "--help", check=True).stdout.startswith("Usage:")


def test_tools_do_not_clobber_files(tmp_path):
    """make-inputs and export-model refuse to replace what is there without --overwrite (an input, a
    checkpoint of hundreds of GB), and export-model never mixes its files into another checkpoint."""
    path = tmp_path / "in.h5"
    cli("make-inputs", path, "--config", "tiny", "-n", "4", "-s", "8", check=True)
    before = path.read_bytes()
    proc = cli("make-inputs", path, "--config", "tiny", "-n", "5", "-s", "8")
    assert proc.returncode == 2 and "already exists" in proc.stderr and "--overwrite" in proc.stderr, proc.stderr
    assert path.read_bytes() == before
    cli("make-inputs", path, "--config", "tiny", "-n", "5", "-s", "8", "--overwrite", check=True)
    assert read(path)["tokens"].shape == (5, 8)

    model = tmp_path / "model"
    cli("export-model", model, "--config", "tiny", check=True)
    files = {p.name: p.read_bytes() for p in model.iterdir()}
    assert sorted(files) == ["config.json", "model.safetensors"]
    proc = cli("export-model", model, "--config", "tiny", "--seed", "1")
    assert proc.returncode == 2 and "already holds a checkpoint" in proc.stderr and "--overwrite" in proc.stderr
    assert {p.name: p.read_bytes() for p in model.iterdir()} == files
    cli("export-model", model, "--config", "tiny", "--seed", "1", "--overwrite", check=True)
    assert sorted(p.name for p in model.iterdir()) == ["config.json", "model.safetensors"]
    assert (model / "model.safetensors").read_bytes() != files["model.safetensors"]

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "model-00001-of-00002.safetensors").write_bytes(b"weights")
    for extra in ((), ("--overwrite",)):
        proc = cli("export-model", sharded, "--config", "tiny", *extra)
        assert proc.returncode == 2 and "model-00001-of-00002.safetensors" in proc.stderr, proc.stderr
    assert [p.name for p in sharded.iterdir()] == ["model-00001-of-00002.safetensors"]


def test_bundled_model_matches_seeded_weights(tmp_path):
    """inputs/tiny-model is the tiny preset's seed-0 weights in Hugging Face layout."""
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    cli("score", "inputs/tiny.h5", a, "--model", "inputs/tiny-model", check=True)
    cli("score", "inputs/tiny.h5", b, "--config", "tiny", check=True)
    assert np.array_equal(read(a)["token_logprobs"], read(b)["token_logprobs"], equal_nan=True)


def test_warm_up_size_is_the_largest_micro_batch_row():
    """The made-up sequence a front warms up with is as long as the longest input sequence, capped by a
    micro-batch's tokens and the model's positions (hand-worked cases)."""
    from dataclasses import replace

    from moe_mpi.io.inputs import InputSpec
    from moe_mpi.runtime.job import Prepared, ScoreOptions, warm_up_size
    cfg = ModelConfig.load("tiny")
    spec = InputSpec("in.h5", "tokens", 3, 40, np.array([5, 30, 12]), None)
    prep = Prepared(spec, np.zeros(3, dtype=bool))
    opts = ScoreOptions("in.h5", "out.h5", micro_batch_tokens=16)
    assert warm_up_size(prep, opts, cfg) == 16                                   # a micro-batch's tokens
    assert warm_up_size(prep, replace(opts, micro_batch_tokens=100), cfg) == 30  # the longest sequence
    short = replace(cfg, max_position_embeddings=20)
    assert warm_up_size(prep, replace(opts, micro_batch_tokens=100), short) == 20  # the model's positions


def test_progress_in_a_batch_log(tmp_path):
    """Into a log file (stderr not a terminal) the progress bar is a plain ASCII line every
    MOE_MPI_PROGRESS_INTERVAL seconds (default 60), not ten a second."""
    import sys
    path = tmp_path / "in.h5"
    make_tokens(path, 2000, 64, 512, seed=int(np.random.SeedSequence().entropy % 2**31))

    def progress_lines(**extra) -> list[str]:
        proc = subprocess.run([sys.executable, "-m", "moe_mpi", "score", path, tmp_path / "o.h5", "--config", "tiny",
                               "-T", "128", "--overwrite"], capture_output=True, text=True, timeout=300,
                              env={**env(), **extra}, cwd=REPO, check=True)
        assert "\r" not in proc.stderr
        return [line for line in proc.stderr.splitlines() if line.startswith("score:")]

    default = progress_lines()
    assert 1 <= len(default) <= 2, default          # the first line, and one more if a minute went by
    every = progress_lines(MOE_MPI_PROGRESS_INTERVAL="0")
    assert len(every) >= 10, every
    assert all(line.isascii() for line in every), every
