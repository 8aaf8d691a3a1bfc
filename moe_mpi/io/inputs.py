"""Reading and validating input HDF5 files (DESIGN.md section 6).

An input holds either ``tokens`` int [N, S] (with optional ``lengths`` int [N]) or ``activations``
[N, S, D] as float32, float16, or bfloat16 stored as uint16 with the attribute ``dtype="bfloat16"``.
Everything is checked before any work, in bounded memory (row blocks), and every refusal names the
file, the dataset and the problem.
"""
from __future__ import annotations

import hashlib
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import h5py
import numpy as np
import torch

from ..config import ModelConfig
from .files import held_for_writing

SCAN_ELEMENTS = 1 << 24  # elements read per block while scanning a dataset (and per block of its digest)
HASH_THREADS = max(1, min(4, len(os.sched_getaffinity(0)) - 1))   # beside the one that checks


class InputError(ValueError):
    """A bad input file: names the file, the dataset and the problem."""

    def __init__(self, path: str, dataset: str | None, problem: str):
        self.path, self.dataset, self.problem = str(path), dataset, problem
        where = f"{path}" + (f", dataset '{dataset}'" if dataset else "")
        super().__init__(f"{where}: {problem}")


@dataclass(frozen=True)
class InputSpec:
    path: str
    mode: str                 # "tokens" or "activations"
    n_seqs: int
    seq_len: int
    lengths: np.ndarray       # (N,) int64
    act_dtype: str | None     # activations only: float32, float16 or bfloat16
    sha256: str = ""          # of the dataset's shape, dtype and bytes and of the lengths (what --resume checks)

    @property
    def dataset(self) -> str:
        return self.mode

    @property
    def n_tokens(self) -> int:
        return int(self.lengths.sum())


def _blocks(n_rows: int, row_elems: int):
    step = max(1, SCAN_ELEMENTS // max(row_elems, 1))
    for lo in range(0, n_rows, step):
        yield lo, min(n_rows, lo + step)


def _open(path: str) -> h5py.File:
    if not os.path.exists(path):
        raise InputError(path, None, "no such file")
    if os.path.isdir(path):
        raise InputError(path, None, "is a directory, not an HDF5 file")
    if os.path.getsize(path) == 0:
        raise InputError(path, None, "empty file (0 bytes), not an HDF5 file")
    if not h5py.is_hdf5(path):
        raise InputError(path, None, "not an HDF5 file (no HDF5 signature)")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        if held_for_writing(path):
            raise InputError(path, None, "is open for writing in another process (HDF5's file lock): wait until "
                                         "the writer closes it") from None
        raise InputError(path, None, f"cannot be opened as HDF5, truncated or corrupt? ({exc})") from None


def _read(path: str, name: str, ds: h5py.Dataset, sel) -> np.ndarray:
    try:
        return ds[sel]
    except (OSError, RuntimeError, ValueError) as exc:
        raise InputError(path, name, f"read failed, file truncated or corrupt? ({exc})") from None


def validate_input(path: str, cfg: ModelConfig) -> InputSpec:
    """Check everything about an input file against a config; return what it holds."""
    path = str(path)
    try:
        return _validate(path, cfg)
    except InputError:
        raise
    except (OSError, RuntimeError, KeyError, TypeError, ValueError) as exc:
        # A corrupt file fails deep inside HDF5 in many ways (bad heap, header, dangling link...).
        raise InputError(path, None, f"cannot be read, file corrupt? ({type(exc).__name__}: {exc})") from None


def _validate(path: str, cfg: ModelConfig) -> InputSpec:
    with _open(path) as f:
        has_tok, has_act = "tokens" in f, "activations" in f
        if has_tok == has_act:
            found = ", ".join(sorted(f.keys())) or "nothing"
            what = "both 'tokens' and 'activations' (keep one)" if has_tok else \
                "neither 'tokens' [N, S] nor 'activations' [N, S, D]"
            raise InputError(path, "tokens" if not has_tok else None, f"holds {what}; found: {found}")
        mode = "tokens" if has_tok else "activations"
        ds = f[mode]
        if not isinstance(ds, h5py.Dataset):
            raise InputError(path, mode, "is a group, expected a dataset")
        want_ndim = 2 if mode == "tokens" else 3
        if ds.ndim != want_ndim:
            shape = "[N, S]" if mode == "tokens" else "[N, S, D]"
            raise InputError(path, mode, f"has {ds.ndim} dimensions {ds.shape}, expected {want_ndim} {shape}")
        N, S = ds.shape[:2]
        if N == 0 or S == 0:
            raise InputError(path, mode, f"is empty (shape {ds.shape}): no sequences to score")

        act_dtype = None
        if mode == "tokens":
            if ds.dtype.kind not in "iu":
                raise InputError(path, mode, f"has dtype {ds.dtype}, expected an integer type")
        else:
            D = ds.shape[2]
            if D != cfg.hidden_size:
                raise InputError(path, mode, f"has width {D}, the model's hidden_size is {cfg.hidden_size}")
            act_dtype = _activation_dtype(path, ds)

        lengths = _lengths(path, f, N, S)

        # One pass checks the valid region (padding is not looked at) and digests everything.  The digest
        # is the sha256 of the header, the lengths and each scan block's sha256, so that blocks hash in
        # threads beside the check (sha256 lets go of the GIL): blocks are part of its definition.
        digest = hashlib.sha256(f"{mode} {ds.shape} {ds.dtype.str}\n".encode())
        digest.update(np.ascontiguousarray(lengths, dtype="<i8").tobytes())
        with ThreadPoolExecutor(HASH_THREADS, thread_name_prefix="input-digest") as hasher:
            _scan(path, cfg, mode, ds, lengths, act_dtype, digest, hasher)
    return InputSpec(path=path, mode=mode, n_seqs=N, seq_len=S, lengths=lengths, act_dtype=act_dtype,
                     sha256=digest.hexdigest())


def _scan(path: str, cfg: ModelConfig, mode: str, ds: h5py.Dataset, lengths: np.ndarray, act_dtype: str | None,
          digest, hasher: ThreadPoolExecutor) -> None:
    """Ids in range / values finite in the valid region, block by block; every block into the digest."""
    N, S = ds.shape[:2]
    hashed: deque = deque()
    row_elems = int(np.prod(ds.shape[1:]))
    for lo, hi in _blocks(N, row_elems):
        block = np.ascontiguousarray(_read(path, mode, ds, np.s_[lo:hi]))
        hashed.append(hasher.submit(_sha256, block.data))
        if len(hashed) > HASH_THREADS:  # blocks in memory: the threads' and this one
            digest.update(hashed.popleft().result())
        valid = np.arange(S)[None, :] < lengths[lo:hi, None]
        if mode == "tokens":
            bad = valid & ((block < 0) | (block >= cfg.vocab_size))
            if bad.any():
                r, c = np.argwhere(bad)[0]
                raise InputError(path, mode, f"token id {block[r, c]} at [{lo + r}, {c}] is outside the "
                                             f"vocabulary [0, {cfg.vocab_size})")
        else:
            values = decode_activations(block, act_dtype).float().numpy()
            bad = valid & ~np.isfinite(values).all(axis=-1)
            if bad.any():
                r, c = np.argwhere(bad)[0]
                raise InputError(path, mode, f"non-finite value (NaN or Inf) at sequence {lo + r}, position {c}")
    while hashed:
        digest.update(hashed.popleft().result())


def _sha256(data) -> bytes:
    return hashlib.sha256(data).digest()


def _activation_dtype(path: str, ds: h5py.Dataset) -> str:
    declared = ds.attrs.get("dtype")
    if isinstance(declared, bytes):
        declared = declared.decode(errors="replace")
    kind, size = ds.dtype.kind, ds.dtype.itemsize   # either byte order is fine
    if kind == "u" and size == 2:
        if not (isinstance(declared, str) and declared == "bfloat16"):
            raise InputError(path, "activations", "is uint16 without the attribute dtype='bfloat16'; "
                                                  "store float32/float16, or bfloat16 bits with that attribute")
        return "bfloat16"
    if kind == "f" and size in (2, 4):
        return "float32" if size == 4 else "float16"
    raise InputError(path, "activations", f"has dtype {ds.dtype}, expected float32, float16 or "
                                          "bfloat16 (uint16 with attribute dtype='bfloat16')")


def _lengths(path: str, f: h5py.File, N: int, S: int) -> np.ndarray:
    if "lengths" not in f:
        return np.full(N, S, dtype=np.int64)
    ds = f["lengths"]
    if not isinstance(ds, h5py.Dataset) or ds.shape != (N,):
        raise InputError(path, "lengths", f"has shape {getattr(ds, 'shape', None)}, expected [{N}] "
                                          "(one length per sequence)")
    if ds.dtype.kind not in "iu":
        raise InputError(path, "lengths", f"has dtype {ds.dtype}, expected an integer type")
    lengths = _read(path, "lengths", ds, ()).astype(np.int64)
    bad = np.flatnonzero((lengths < 1) | (lengths > S))
    if bad.size:
        i = int(bad[0])
        raise InputError(path, "lengths", f"sequence {i} has length {lengths[i]}, lengths must be in [1, {S}] "
                                          f"({bad.size} out of range)")
    return lengths


def decode_activations(block: np.ndarray, act_dtype: str) -> torch.Tensor:
    block = np.ascontiguousarray(block, dtype=block.dtype.newbyteorder("="))   # native byte order
    if act_dtype == "bfloat16":
        return torch.from_numpy(block.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(block)


class InputReader:
    """Reads chosen sequences, trimmed to their longest length, as tensors ready for ``Batch``."""

    def __init__(self, spec: InputSpec):
        self.spec = spec
        self.file = h5py.File(spec.path, "r")
        self.ds = self.file[spec.mode]

    def read(self, seqs: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(data, lengths) of sequences ``seqs`` (increasing indices): data is (B, S') tokens int64
        or (B, S', D) activations, S' the longest of their lengths."""
        lengths = self.spec.lengths[seqs]
        width = int(lengths.max())
        block = self.ds[np.asarray(seqs), :width]
        if self.spec.mode == "tokens":
            data = torch.from_numpy(block.astype(np.int64))
            data[torch.arange(width)[None, :] >= torch.from_numpy(lengths)[:, None]] = 0
        else:
            data = decode_activations(block, self.spec.act_dtype).clone()
            data[torch.arange(width)[None, :] >= torch.from_numpy(lengths)[:, None]] = 0
        return data, torch.from_numpy(lengths)

    def close(self) -> None:
        self.file.close()
