"""Synthetic input files (``moe-mpi make-inputs``) and a readable summary of any file (``inspect``)."""
from __future__ import annotations

import json
import os

import h5py
import numpy as np

from ..config import ModelConfig
from .files import held_for_writing, written_whole
from .outputs import load_state


def make_inputs(path: str, cfg: ModelConfig, *, sequences: int, seq_len: int, ragged: bool,
                activations: bool, seed: int, act_dtype: str = "float32", overwrite: bool = False) -> None:
    """Random token ids (or activations) drawn from ``seed``; ragged lengths in [1, seq_len].  An
    existing file is replaced only with ``overwrite``."""
    if sequences < 1 or seq_len < 1:
        raise ValueError(f"--sequences and --seq-len must be >= 1, got {sequences} and {seq_len}")
    if os.path.exists(path) and not overwrite:
        raise ValueError(f"{path} already exists; pass --overwrite to replace it")
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, seq_len + 1, size=sequences) if ragged else np.full(sequences, seq_len)
    with written_whole(path) as tmp, h5py.File(tmp, "w") as f:
        if activations:
            ds = f.create_dataset("activations", shape=(sequences, seq_len, cfg.hidden_size),
                                  dtype=np.uint16 if act_dtype == "bfloat16" else act_dtype,
                                  chunks=(1, seq_len, cfg.hidden_size))
            for i in range(sequences):
                x = rng.standard_normal((seq_len, cfg.hidden_size), dtype=np.float32)
                if act_dtype == "bfloat16":  # round to nearest even, keep the top 16 bits
                    bits = x.view(np.uint32)
                    x = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
                ds[i] = x
            if act_dtype == "bfloat16":
                ds.attrs["dtype"] = "bfloat16"
        else:
            f.create_dataset("tokens", data=rng.integers(0, cfg.vocab_size, size=(sequences, seq_len),
                                                         dtype=np.int32), chunks=(1, seq_len))
        f.create_dataset("lengths", data=lengths.astype(np.int32))
        f.attrs["generator"] = json.dumps({"seed": seed, "config": cfg.name, "ragged": ragged})


def describe(path: str) -> str:
    """What an HDF5 file holds, for people: datasets, shapes, dtypes, attributes, completion.  A partial
    output that a running job holds open is read without HDF5's lock (its layout never changes during a
    run; values may be mid-write), and its progress comes from the commit record beside it."""
    lines = [path]
    try:
        f = h5py.File(path, "r")
    except OSError:
        if not held_for_writing(path):
            raise
        f = h5py.File(path, "r", locking=False)
        lines.append("  (open for writing in another process, a job still running: read without HDF5's lock)")
    with f:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                extra = f" attrs={dict(obj.attrs)}" if obj.attrs else ""
                lines.append(f"  {name:28s} {str(obj.shape):22s} {obj.dtype}{extra}")
        f.visititems(visit)
        state = f"{path}.state.npz"     # OUT.h5.partial -> OUT.h5.partial.state.npz
        if "done" in f and path.endswith(".partial") and os.path.exists(state):
            done, _ = load_state(state, f["done"].shape[0])
            lines.append(f"  done: {int(done.sum())} of {done.size} sequences committed ({os.path.basename(state)})")
        elif "done" in f:
            done = f["done"][...]
            lines.append(f"  done: {int(done.sum())} of {done.size} sequences")
        for k in sorted(f.attrs):
            v = f.attrs[k]
            if isinstance(v, bytes):
                v = v.decode()
            text = str(v)
            lines.append(f"  @{k} = {text if len(text) < 100 else text[:97] + '...'}")
    return "\n".join(lines)
