"""Every bad input of DESIGN.md section 6 is refused before any work, on 1 rank and under mpiexec:
a message naming file, dataset and problem, exit status 2, no traceback, nothing written."""
from __future__ import annotations

import re

import h5py
import numpy as np
import pytest

from conftest import cli, make_tokens, mpirun, read

VOCAB, D = 512, 64  # the tiny preset


def _tokens(path, tokens, lengths=None, **extra):
    with h5py.File(path, "w") as f:
        f["tokens"] = tokens
        if lengths is not None:
            f["lengths"] = lengths
        for k, v in extra.items():
            f[k] = v


def _acts(path, acts, attrs=None, lengths=None):
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("activations", data=acts)
        for k, v in (attrs or {}).items():
            ds.attrs[k] = v
        if lengths is not None:
            f["lengths"] = lengths


rng = np.random.default_rng()


def good_tokens(n=4, s=8):
    return rng.integers(0, VOCAB, size=(n, s))


def truncated(path):
    make_tokens(path, 64, 64, VOCAB, seed=1, ragged=False)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def truncated_header(path):
    make_tokens(path, 4, 8, VOCAB, seed=1)
    path.write_bytes(path.read_bytes()[:600])


CASES = {
    # name: (builder(path), dataset named in the message or None, words expected in the message)
    "missing_file": (lambda p: None, None, "no such file"),
    "empty_file": (lambda p: p.write_bytes(b""), None, "empty file"),
    "not_hdf5": (lambda p: p.write_text("tokens,1,2,3\n"), None, "not an HDF5 file"),
    "truncated_data": (truncated, None, "truncated"),
    "truncated_header": (truncated_header, None, "truncated"),
    "no_dataset": (lambda p: _tokens(p, good_tokens()) or _rename(p), "tokens", "neither"),
    "both_datasets": (lambda p: _tokens(p, good_tokens(), activations=np.zeros((4, 8, D), np.float32)),
                      None, "both"),
    "tokens_3d": (lambda p: _tokens(p, rng.integers(0, VOCAB, size=(2, 3, 4))), "tokens", "dimensions"),
    "tokens_float": (lambda p: _tokens(p, rng.random((4, 8))), "tokens", "dtype"),
    "token_too_big": (lambda p: _tokens(p, _with(good_tokens(), (2, 5), VOCAB)), "tokens", "outside the vocabulary"),
    "token_negative": (lambda p: _tokens(p, _with(good_tokens(), (1, 0), -3)), "tokens", "outside the vocabulary"),
    "empty_dataset": (lambda p: _tokens(p, np.zeros((0, 8), np.int64)), "tokens", "empty"),
    "length_zero": (lambda p: _tokens(p, good_tokens(), np.array([8, 0, 3, 8])), "lengths", "length 0"),
    "length_too_long": (lambda p: _tokens(p, good_tokens(), np.array([8, 9, 3, 8])), "lengths", "length 9"),
    "lengths_shape": (lambda p: _tokens(p, good_tokens(), np.array([8, 8])), "lengths", "shape"),
    "lengths_float": (lambda p: _tokens(p, good_tokens(), np.array([8.0, 8, 3, 8])), "lengths", "dtype"),
    "act_width": (lambda p: _acts(p, rng.standard_normal((2, 5, D + 1), dtype=np.float32)), "activations", "width"),
    "act_dtype": (lambda p: _acts(p, rng.integers(0, 9, size=(2, 5, D))), "activations", "dtype"),
    "act_uint16_no_attr": (lambda p: _acts(p, rng.integers(0, 9, size=(2, 5, D)).astype(np.uint16)),
                           "activations", "bfloat16"),
    "act_nan": (lambda p: _acts(p, _with(rng.standard_normal((2, 5, D), dtype=np.float32), (1, 3, 7), np.nan)),
                "activations", "NaN"),
    "act_inf": (lambda p: _acts(p, _with(rng.standard_normal((2, 5, D), dtype=np.float32), (0, 0, 0), np.inf)),
                "activations", "non-finite"),
}


def _with(a, idx, value):
    a = a.copy()
    a[idx] = value
    return a


def _rename(p):
    with h5py.File(p, "a") as f:
        f.move("tokens", "input_ids")


def _check_refused(proc, tmp_path, path, dataset, words):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    err = proc.stderr
    assert "Traceback" not in err, err
    assert str(path) in err, err
    if dataset:
        assert f"'{dataset}'" in err, err
    assert words.lower() in err.lower(), err
    assert not (tmp_path / "out.h5").exists() and not (tmp_path / "out.h5.partial").exists()


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_one_rank(tmp_path, case):
    build, dataset, words = CASES[case]
    path = tmp_path / "bad.h5"
    build(path)
    proc = cli("score", path, tmp_path / "out.h5", "--config", "tiny")
    _check_refused(proc, tmp_path, path, dataset, words)


@pytest.mark.parametrize("case", ["truncated_data", "token_too_big", "length_zero", "act_nan", "not_hdf5"])
def test_bad_input_distributed(tmp_path, case):
    build, dataset, words = CASES[case]
    path = tmp_path / "bad.h5"
    build(path)
    proc = mpirun(9, "score", path, tmp_path / "out.h5", "--config", "tiny")
    _check_refused(proc, tmp_path, path, dataset, words)
    assert proc.stderr.count("moe-mpi: error") == 1  # one message, from rank 0


def test_output_is_input(tmp_path):
    path = tmp_path / "in.h5"
    make_tokens(path, 3, 8, VOCAB, seed=2)
    before = path.read_bytes()
    proc = cli("score", path, path, "--config", "tiny")
    assert proc.returncode == 2 and "destroy the input" in proc.stderr
    assert path.read_bytes() == before


def test_output_directory_missing(tmp_path):
    path = tmp_path / "in.h5"
    make_tokens(path, 3, 8, VOCAB, seed=2)
    proc = cli("score", path, tmp_path / "nope" / "out.h5", "--config", "tiny")
    assert proc.returncode == 2 and "does not exist" in proc.stderr


def test_wrong_world_size(tmp_path):
    path = tmp_path / "in.h5"
    make_tokens(path, 3, 8, VOCAB, seed=2)
    proc = mpirun(4, "score", path, tmp_path / "out.h5", "--config", "tiny")
    assert proc.returncode == 2, proc.stderr
    assert "world size 4" in proc.stderr and "9 for --front-ranks 1" in proc.stderr and "10 for --front-ranks 2" in proc.stderr
    assert not (tmp_path / "out.h5.partial").exists()


def test_bad_config(tmp_path):
    path = tmp_path / "in.h5"
    make_tokens(path, 3, 8, VOCAB, seed=2)
    bad = tmp_path / "cfg.json"
    bad.write_text('{"n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 3}')
    proc = cli("score", path, tmp_path / "out.h5", "--config", bad)
    assert proc.returncode == 2 and "n_group=3" in proc.stderr and "Traceback" not in proc.stderr


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MB file system (tmpfs), where the machine lets us mount one."""
    import subprocess
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


@pytest.mark.parametrize("world", [1, 9])
def test_output_larger_than_the_disk(tmp_path, small_disk, world):
    """The output's datasets are allocated when it is created: one larger than the free space is refused
    then, with both sizes, not by a write failing mid-run; nothing is left on the full disk."""
    path = tmp_path / "in.h5"
    make_tokens(path, 200, 64, VOCAB, seed=int(np.random.SeedSequence().entropy % 2**31))
    out = small_disk / "out.h5"
    args = ("score", path, out, "--config", "tiny", "--save-hidden")
    proc = cli(*args) if world == 1 else mpirun(world, *args)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    # 200 x 64 tokens: hidden states 200*64*64*4 B, log-probs 200*64*4 B, the rest and HDF5's metadata small
    need = re.search(rf"{out}\.partial: needs ([0-9.]+) MB \(its datasets are allocated up front\) but "
                     rf"{small_disk} has ([0-9.]+) MB free", proc.stderr)
    assert need and 3.4 <= float(need[1]) <= 3.6 and float(need[2]) == 1.0, proc.stderr
    assert list(small_disk.iterdir()) == []
    cli("score", path, out, "--config", "tiny", check=True)       # without hidden states it fits (0.2 MB)
    assert read(out)["done"].all()


def test_failed_create_leaves_nothing(tmp_path, tiny_input, monkeypatch):
    """A write that fails while the output is created (a disk that fills from elsewhere): a message
    naming the file, and no .tmp or .partial left."""
    import errno

    from moe_mpi.config import ModelConfig
    from moe_mpi.io import outputs
    from moe_mpi.io.inputs import validate_input
    from moe_mpi.runtime.job import ScoreOptions
    made = []

    def fail_second(*a, **kw):
        if made:
            raise OSError(errno.ENOSPC, "No space left on device")
        made.append(a[1])
        return real(*a, **kw)

    real = outputs._contiguous
    monkeypatch.setattr(outputs, "_contiguous", fail_second)
    cfg = ModelConfig.load("tiny")
    out = tmp_path / "o.h5"
    opts = ScoreOptions(input=str(tiny_input), output=str(out), config="tiny")
    with pytest.raises(outputs.OutputError, match=r"o\.h5\.partial\.tmp: cannot be written \(.*No space left"):
        outputs.OutputFile.create(str(out), cfg, validate_input(str(tiny_input), cfg), opts.output_options())
    assert made and sorted(p.name for p in tmp_path.iterdir()) == [tiny_input.name]


@pytest.mark.parametrize("world", [1, 9])
def test_input_being_written(tmp_path, world):
    """An input that another process holds open for writing (HDF5's lock) is refused as that, not as a
    corrupt file."""
    path = tmp_path / "in.h5"
    make_tokens(path, 3, 8, VOCAB, seed=int(np.random.SeedSequence().entropy % 2**31))
    with h5py.File(path, "r+"):
        args = ("score", path, tmp_path / "out.h5", "--config", "tiny")
        proc = cli(*args) if world == 1 else mpirun(world, *args)
    _check_refused(proc, tmp_path, path, None, "is open for writing in another process")
    assert "corrupt" not in proc.stderr
