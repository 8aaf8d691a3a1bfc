"""Fuzzed input files: every file is either scored or refused with a message naming it, never a hang, a
traceback or a stray output.  Each drawn file also goes through an independent oracle, written from the
input contract (tokens int [N, S] with ids in the vocabulary, or activations [N, S, hidden] float32,
float16 or bfloat16 bits with dtype='bfloat16', finite; optional int lengths in [1, S]; padding never
looked at), not from the validator's code, that says whether it must be scored or must be refused;
truncated and random-byte files must be refused.

Corrupt files that once escaped validation with a raw HDF5 exception are kept at the end, with their
minimal files."""
from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from conftest import REPO, env, read
from moe_mpi.io.inputs import InputError
from moe_mpi.io.outputs import OutputError
from moe_mpi.runtime.job import ScoreOptions
from moe_mpi.runtime.single import score_single

VOCAB, D = 512, 64                      # the tiny preset
SIGNATURE = b"\x89HDF\r\n\x1a\n"        # the first 8 bytes of every HDF5 file
INTS = [np.dtype(t) for t in (np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64)]
FLOATS = [np.dtype(t) for t in (np.float16, np.float32, np.float64)]
ALL_DTYPES = INTS + FLOATS + [np.dtype(bool)]
EXAMPLES = int(os.environ.get("MOE_MPI_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large, HealthCheck.filter_too_much])


# --- what a file holds ---
@dataclass(frozen=True)
class Data:
    name: str
    array: np.ndarray
    attrs: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        values = np.array2string(self.array, threshold=200, max_line_width=200)
        return f"Data({self.name!r}, {self.array.dtype}{list(self.array.shape)}, attrs={self.attrs!r}, {values})"


@dataclass(frozen=True)
class Recipe:
    kind: str                           # "hdf5", "truncated" (an hdf5 cut short) or "bytes" (raw)
    datasets: tuple = ()
    keep: float = 1.0                   # truncated: fraction of the bytes kept (at least one is cut)
    raw: bytes = b""                    # bytes: the whole file

    def get(self, name: str) -> Data | None:
        return next((d for d in self.datasets if d.name == name), None)


def write(recipe: Recipe, path: Path) -> None:
    if recipe.kind == "bytes":
        path.write_bytes(recipe.raw)
        return
    with h5py.File(path, "w") as f:
        for d in recipe.datasets:
            ds = f.create_dataset(d.name, data=d.array)
            for k, v in d.attrs.items():
                ds.attrs[k] = v
    if recipe.kind == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[:min(int(len(data) * recipe.keep), len(data) - 1)])


# --- the oracle: must this file be scored (True) or refused (False)? ---
def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def expected_ok(recipe: Recipe) -> bool:
    if recipe.kind != "hdf5":
        return False
    tok, act = recipe.get("tokens"), recipe.get("activations")
    if (tok is None) == (act is None):
        return False                                    # neither, or both
    main = tok or act
    a = main.array
    if a.ndim != (2 if tok else 3) or a.shape[0] == 0 or a.shape[1] == 0:
        return False
    N, S = a.shape[:2]
    lengths = [S] * N
    if (ld := recipe.get("lengths")) is not None:
        if ld.array.shape != (N,) or ld.array.dtype not in INTS:
            return False
        lengths = [int(v) for v in ld.array]
        if not all(1 <= n <= S for n in lengths):
            return False
    if tok:
        return a.dtype in INTS and all(0 <= int(v) < VOCAB for i in range(N) for v in a[i, :lengths[i]])
    if a.shape[2] != D:
        return False
    declared = act.attrs.get("dtype")
    if a.dtype == np.uint16 and declared in ("bfloat16", b"bfloat16"):
        values = bf16_to_float32(a)
    elif a.dtype in (np.float32, np.float16):
        values = a.astype(np.float32)
    else:
        return False
    return all(np.isfinite(values[i, :lengths[i]]).all() for i in range(N))


# --- strategies ---
# Values come as "usual" ones (valid ids, finite numbers, lengths in [1, S]) and "odd" ones (ids out of
# the vocabulary, negatives, NaN/Inf, lengths 0 or S + 1, the dtype's extremes).
def usual_values(dtype: np.dtype, bf16: bool = False, lengths_for: int | None = None) -> st.SearchStrategy:
    if dtype == np.bool_:
        return st.booleans()
    if dtype.kind == "f":
        return st.floats(-4, 4, width=dtype.itemsize * 8)
    if bf16:      # bfloat16 bits of 0, 1, -1, 0.125 and the largest finite value
        return st.sampled_from([0x0000, 0x3F80, 0xBF80, 0x3E00, 0x7F7F])
    info = np.iinfo(dtype)
    lo, hi = (1, max(1, lengths_for)) if lengths_for is not None else (0, VOCAB - 1)
    return st.integers(max(lo, int(info.min)), min(hi, int(info.max)))


def odd_values(dtype: np.dtype, bf16: bool = False, lengths_for: int | None = None) -> st.SearchStrategy:
    if dtype == np.bool_:
        return st.booleans()
    if dtype.kind == "f":
        return st.sampled_from([math.nan, math.inf, -math.inf, float(np.finfo(dtype).max)])
    if bf16:      # +Inf, -Inf, NaN, a negative NaN, or any bits at all
        return st.one_of(st.sampled_from([0x7F80, 0xFF80, 0x7FC0, 0xFFC1]), st.integers(0, 0xFFFF))
    info = np.iinfo(dtype)
    odd = [-1, 0, lengths_for + 1, 2**63] if lengths_for is not None else [-1, -7, VOCAB, VOCAB + 1, 2**31 - 1]
    return st.sampled_from(sorted({v for v in odd + [int(info.min), int(info.max)] if info.min <= v <= info.max}))


@st.composite
def array(draw, dtype: np.dtype, shape: tuple, dirt: str, **kind) -> np.ndarray:
    """dirt: "none" (usual values only), "one" (usual values and one odd value), "any" (any odd values)."""
    usual = usual_values(dtype, **kind)
    if dirt == "one":
        usual = st.one_of(usual, st.just(draw(odd_values(dtype, **kind))))
    elif dirt == "any":
        usual = st.one_of(usual, usual, odd_values(dtype, **kind))
    return draw(hnp.arrays(dtype, shape, elements=usual))


DIRT = st.sampled_from(["none", "none", "one", "any"])
DIM = st.sampled_from([0, 1, 1, 2, 3, 4])
ACT_DTYPES = [np.dtype(np.float32), np.dtype(np.float16), np.dtype(np.uint16)]


def bf16_attr(dtype: np.dtype, name: str) -> dict:
    return {"dtype": "bfloat16"} if dtype == np.uint16 and name == "activations" else {}


@st.composite
def main_dataset(draw, name: str) -> Data:
    """tokens, activations or another name, of any rank (mostly the right one), shape and dtype."""
    natural = {"tokens": 2, "activations": 3}.get(name, 2)
    ndim = draw(st.one_of(st.just(natural), st.just(natural), st.integers(1, 4)))
    shape = [draw(DIM) for _ in range(ndim)]
    if name == "activations":
        shape[-1] = draw(st.sampled_from([D, D, D, D, 0, 3, D + 1]))
    preferred = INTS if name == "tokens" else ACT_DTYPES
    dtype = draw(st.one_of(st.sampled_from(preferred), st.sampled_from(ALL_DTYPES)))
    attrs = {}
    if dtype == np.uint16 or draw(st.integers(0, 9)) == 0:
        declared = draw(st.sampled_from([None, "bfloat16", "bfloat16", b"bfloat16", "float16", 7]))
        if declared is not None:
            attrs["dtype"] = declared
    bf16 = dtype == np.uint16 and name == "activations"
    return Data(name, draw(array(dtype, tuple(shape), draw(DIRT), bf16=bf16)), attrs)


@st.composite
def lengths_dataset(draw, main: Data) -> Data:
    shape = main.array.shape
    S = shape[1] if len(shape) > 1 else 1
    ld_shape = shape[:1] if shape and draw(st.integers(0, 4)) else tuple(draw(st.lists(DIM, max_size=2)))
    dtype = draw(st.one_of(st.sampled_from(INTS), st.sampled_from(ALL_DTYPES)))
    return Data("lengths", draw(array(dtype, ld_shape, draw(DIRT), lengths_for=S)))


@st.composite
def recipes(draw) -> Recipe:
    """An HDF5 file of anything, sometimes cut short."""
    name = draw(st.sampled_from(["tokens", "tokens", "activations", "activations", "other"]))
    main = draw(main_dataset(name))
    datasets = [main]
    if draw(st.booleans()):
        datasets.append(draw(lengths_dataset(main)))
    if draw(st.integers(0, 7)) == 0:     # both tokens and activations, or something else besides
        second = draw(st.sampled_from([n for n in ("tokens", "activations", "other2") if n != name]))
        datasets.append(draw(main_dataset(second)))
    truncated = draw(st.integers(0, 4)) == 0
    keep = draw(st.floats(0, 1, exclude_max=True)) if truncated else 1.0
    return Recipe("truncated" if truncated else "hdf5", tuple(datasets), keep=keep)


@st.composite
def plausible_recipes(draw) -> Recipe:
    """Shaped like a real input, so that most are scored: the right dataset, rank and width; at most one
    kind of odd value; sometimes odd values in the padding only, which must not matter."""
    name = draw(st.sampled_from(["tokens", "activations"]))
    N, S = draw(st.integers(1, 4)), draw(st.integers(1, 5))
    shape = (N, S) if name == "tokens" else (N, S, D)
    dtype = draw(st.sampled_from(INTS + [np.dtype(bool)] if name == "tokens" else ACT_DTYPES + [np.dtype(np.float64)]))
    attrs = bf16_attr(dtype, name) if draw(st.integers(0, 5)) else {}
    bf16 = dtype == np.uint16 and name == "activations"
    dirt = draw(st.sampled_from(["none", "none", "one"]))
    main = draw(array(dtype, shape, dirt, bf16=bf16))
    datasets = []
    if draw(st.booleans()):
        ldtype = draw(st.sampled_from(INTS))
        lengths = draw(array(ldtype, (N,), draw(st.sampled_from(["none", "none", "one"])), lengths_for=S))
        datasets.append(Data("lengths", lengths))
        if draw(st.booleans()):
            pad = np.arange(S)[None, :] >= lengths.astype(np.int64)[:, None]
            main = main.copy()
            main[pad] = draw(odd_values(dtype, bf16=bf16))
    return Recipe("hdf5", (Data(name, main, attrs), *datasets))


raw_files = st.one_of(st.just(b""), st.binary(min_size=1, max_size=512),
                      st.binary(max_size=512).map(lambda b: SIGNATURE + b)).map(lambda raw: Recipe("bytes", raw=raw))


# --- running and checking ---
_serial = itertools.count()


def paths(tmp_path: Path) -> tuple[Path, Path]:
    d = tmp_path / f"ex{next(_serial)}"
    d.mkdir()
    return d / "in.h5", d / "out.h5"


def score(inp: Path, out: Path):
    """Score in-process; return None on success, the exception if it was a user error."""
    try:
        score_single(ScoreOptions(input=str(inp), output=str(out), config="tiny", progress=False))
    except (InputError, OutputError, ValueError) as exc:
        return exc
    return None


def assert_refused_cleanly(exc: Exception, inp: Path, out: Path) -> None:
    assert str(inp) in str(exc), f"refusal does not name the input: {type(exc).__name__}: {exc}"
    if isinstance(exc, InputError):
        assert not out.exists() and not Path(f"{out}.partial").exists()


def assert_scored(recipe: Recipe, out: Path) -> None:
    assert out.exists()
    assert not Path(f"{out}.partial").exists() and not Path(f"{out}.partial.state.npz").exists()
    res = read(out)
    tok = recipe.get("tokens")
    main = tok or recipe.get("activations")
    N, S = main.array.shape[:2]
    ld = recipe.get("lengths")
    lengths = ld.array.astype(np.int64) if ld is not None else np.full(N, S)
    assert res["attrs"]["complete"]
    assert res["done"].all() and res["done"].shape == (N,)
    np.testing.assert_array_equal(res["lengths"], lengths)
    for i, n in enumerate(lengths):
        if tok is not None:
            lp = res["token_logprobs"][i]
            assert np.isnan(lp[0]) and np.isnan(lp[n:]).all()
            assert np.isfinite(lp[1:n]).all() and (lp[1:n] <= 0).all()
            assert res["sequence_logprob"][i] == pytest.approx(float(lp[1:n].astype(np.float64).sum()), abs=1e-4)
        else:
            assert res["hidden"].shape == (N, S, D) and np.isnan(res["hidden"][i, n:]).all()


def check_scored_or_refused(tmp_path: Path, recipe: Recipe) -> bool:
    """Score or refuse as the oracle says, cleanly either way; True if it was scored."""
    inp, out = paths(tmp_path)
    write(recipe, inp)
    exc = score(inp, out)
    want = expected_ok(recipe)
    event(f"{recipe.kind}: {'scored' if exc is None else type(exc).__name__}")
    if exc is None:
        assert want, "scored a file the oracle says must be refused"
        assert_scored(recipe, out)
    else:
        assert_refused_cleanly(exc, inp, out)
        assert not want, f"refused a valid file: {exc}"
    return exc is None


@FUZZ
@given(recipe=recipes())
def test_fuzzed_input_is_scored_or_refused(tmp_path, recipe):
    check_scored_or_refused(tmp_path, recipe)


def test_fuzzed_plausible_input_is_scored_or_refused(tmp_path):
    scored = []

    @settings(FUZZ, max_examples=max(1, EXAMPLES * 3 // 10))
    @given(recipe=plausible_recipes())
    def run(recipe):
        scored.append(check_scored_or_refused(tmp_path, recipe))

    run()
    assert any(scored), "no plausible file was scored: the success path went untested"


@settings(max_examples=60, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(recipe=raw_files)
def test_random_bytes_are_refused(tmp_path, recipe):
    """Empty files, random bytes, random bytes behind the HDF5 signature: refused, nothing written."""
    inp, out = paths(tmp_path)
    write(recipe, inp)
    exc = score(inp, out)
    assert isinstance(exc, InputError), f"{type(exc).__name__}: {exc}"
    assert_refused_cleanly(exc, inp, out)


def test_oracle_sanity():
    """The oracle on hand-made files: it must accept valid ones (padding ignored) and refuse bad ones,
    or the fuzz's checks against it would be empty."""
    tokens = np.array([[1, 511, 600], [0, 3, -1]])
    assert not expected_ok(Recipe("hdf5", (Data("tokens", tokens),)))
    assert expected_ok(Recipe("hdf5", (Data("tokens", tokens), Data("lengths", np.array([2, 2])))))
    assert not expected_ok(Recipe("hdf5", (Data("tokens", tokens), Data("lengths", np.array([2.0, 2.0])))))
    bits = np.full((1, 2, D), 0x3F80, np.uint16)
    bits[0, 1, 5] = 0x7FC0                                          # NaN in the padding only
    lengths = Data("lengths", np.array([1], np.uint8))
    assert expected_ok(Recipe("hdf5", (Data("activations", bits, {"dtype": "bfloat16"}), lengths)))
    assert not expected_ok(Recipe("hdf5", (Data("activations", bits, {"dtype": "bfloat16"}),)))
    assert not expected_ok(Recipe("hdf5", (Data("activations", bits),)))
    assert not expected_ok(Recipe("truncated", (Data("tokens", tokens[:, :2]),), keep=0.99))


CLI_RUNS = 3
CLI_TIMEOUT = 180


def test_fuzzed_bad_input_cli(tmp_path):
    """The real command on drawn bad files: exit status 2, a message naming the file, no traceback,
    nothing written, and never a hang.  Hypothesis draws the files; the commands run side by side."""
    runs = []

    @settings(max_examples=CLI_RUNS, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])
    @given(recipe=st.one_of(recipes(), raw_files))
    def launch(recipe):
        assume(not expected_ok(recipe))
        inp, out = paths(tmp_path)
        write(recipe, inp)
        cmd = [sys.executable, "-m", "moe_mpi", "score", str(inp), str(out), "--config", "tiny", "--no-progress"]
        runs.append((recipe, inp, out, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                        text=True, env=env(), cwd=REPO)))

    try:
        launch()
        assert len(runs) == CLI_RUNS
        for recipe, inp, out, proc in runs:
            try:
                _, err = proc.communicate(timeout=CLI_TIMEOUT)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"moe-mpi score hung on {recipe!r}") from None
            assert proc.returncode == 2, (recipe, proc.returncode, err[-2000:])
            assert "Traceback" not in err, (recipe, err)
            assert str(inp) in err, (recipe, err)
            assert not out.exists() and not Path(f"{out}.partial").exists(), recipe
    finally:
        for *_, proc in runs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


# --- bugs found by the fuzzing, pinned with their minimal files ---
def _tokens_file(path: Path) -> bytearray:
    """A valid 1 x 1 tokens file (token 0), as bytes to corrupt."""
    with h5py.File(path, "w") as f:
        f["tokens"] = np.zeros((1, 1), np.int64)
    return bytearray(path.read_bytes())


def _corrupt_heap_signature(path: Path) -> None:
    data = _tokens_file(path)
    i = data.index(b"HEAP")                  # the root group's local heap
    data[i:i + 4] = b"XEAP"
    path.write_bytes(data)


def _corrupt_link_name(path: Path) -> None:
    data = _tokens_file(path)
    i = data.index(b"tokens")                # the link name, in the local heap
    data[i] = 0xFF                           # now b"\xffokens", not UTF-8
    path.write_bytes(data)


def _corrupt_object_header(path: Path) -> None:
    data = _tokens_file(path)
    with h5py.File(path, "r") as f:
        addr = h5py.h5o.get_info(f["tokens"].id).addr
    data[addr] = 0                           # the dataset's object header version byte
    path.write_bytes(data)


def _dangling_link(path: Path) -> None:
    with h5py.File(path, "w") as f:
        f["tokens"] = h5py.SoftLink("/nowhere")


def _dtype_attribute_array(path: Path) -> None:
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("activations", data=np.full((1, 1, D), 0x3F80, np.uint16))
        ds.attrs["dtype"] = np.array([b"bfloat16", b"bfloat16"])


CORRUPT = {
    # name: (builder, the exception HDF5 raises deep inside, what happens) -- each must become an InputError
    "corrupt_heap_signature": (_corrupt_heap_signature, RuntimeError,
                               "`'tokens' in f` raises RuntimeError (bad local heap signature)"),
    "corrupt_link_name": (_corrupt_link_name, TypeError,
                          "f.keys() yields bytes; ', '.join(sorted(f.keys())) raises TypeError"),
    "corrupt_object_header": (_corrupt_object_header, KeyError,
                              "f['tokens'] raises KeyError (bad object header version number)"),
    "dangling_soft_link": (_dangling_link, KeyError, "f['tokens'] raises KeyError (component not found)"),
    "dtype_attribute_array": (_dtype_attribute_array, AssertionError,
                              "declared != 'bfloat16' on an array attribute: ValueError 'truth value of an "
                              "array is ambiguous', which does not name the file"),
}


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_known_bad_file_is_refused(tmp_path, case):
    build = CORRUPT[case][0]
    inp, out = paths(tmp_path)
    build(inp)
    exc = score(inp, out)
    assert exc is not None, "scored a corrupt file"
    assert_refused_cleanly(exc, inp, out)
