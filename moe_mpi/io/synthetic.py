"""Synthetic input files (``moe-mpi make-inputs``) and a readable summary of any file (``inspect``)."""
from __future__ import annotations

import json
import os

import h5py
import numpy as np

from ..config import ModelConfig


def make_inputs(path: str, cfg: ModelConfig, *, sequences: int, seq_len: int, ragged: bool,
                activations: bool, seed: int, act_dtype: str = "float32") -> None:
    """Random token ids (or activations) drawn from ``seed``; ragged lengths in [1, seq_len]."""
    if sequences < 1 or seq_len < 1:
        raise ValueError(f"--sequences and --seq-len must be >= 1, got {sequences} and {seq_len}")
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, seq_len + 1, size=sequences) if ragged else np.full(sequences, seq_len)
    tmp = f"{path}.tmp"
    with h5py.File(tmp, "w") as f:
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
    os.replace(tmp, path)


def describe(path: str) -> str:
    """What an HDF5 file holds, for people: datasets, shapes, dtypes, attributes, completion."""
    lines = [path]
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                extra = f" attrs={dict(obj.attrs)}" if obj.attrs else ""
                lines.append(f"  {name:28s} {str(obj.shape):22s} {obj.dtype}{extra}")
        f.visititems(visit)
        if "done" in f:
            done = f["done"][...]
            lines.append(f"  done: {int(done.sum())} of {done.size} sequences")
        for k in sorted(f.attrs):
            v = f.attrs[k]
            if isinstance(v, bytes):
                v = v.decode()
            text = str(v)
            lines.append(f"  @{k} = {text if len(text) < 100 else text[:97] + '...'}")
    return "\n".join(lines)
