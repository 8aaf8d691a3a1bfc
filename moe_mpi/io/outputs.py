"""The output HDF5 file: written as ``OUT.h5.partial``, renamed to ``OUT.h5`` only when complete.

Crash safety: every dataset is contiguous and allocated (with its fill value) when the file is
created, so during the run the file's metadata never changes -- a run only overwrites preallocated
bytes.  The commit record of which sequences are done, and the expert load they caused, lives in a
small side file (``OUT.h5.partial.state.npz``) replaced atomically after their data are flushed and
synced to the disk.  A job killed at any moment, or a node that crashes with writes in its page cache,
thus leaves a readable ``.partial`` whose committed sequences are complete; ``--resume`` recomputes
the rest and counts their expert load exactly once.  The complete file is synced before its rename.

A commit costs a flush and two fsyncs (milliseconds on a local disk), so finished sequences are
committed at most every ``commit_interval`` seconds (``--commit-interval``), and always on a clean stop
(signal) and at the end: a job killed outright loses at most that many seconds of work.  The first
write commits at once.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import h5py
import numpy as np

from .. import __version__
from ..config import ModelConfig
from .files import held_for_writing, written_whole
from .inputs import InputSpec

def identity(cfg: ModelConfig, spec: InputSpec, opts: "OutputOptions") -> dict:
    """The attributes that must match for --resume to continue a partial file.  The input is known by
    its contents, not its path: a file copied to another place (a node's scratch disk) still resumes, one
    rewritten in place does not."""
    return {"input_sha256": spec.sha256, "input_mode": spec.mode, "n_seqs": spec.n_seqs, "seq_len": spec.seq_len,
            "config": cfg.to_json(), "dtype": opts.dtype, "seed": opts.seed, "model": opts.model or "",
            "save_hidden": opts.save_hidden, "save_routing": opts.save_routing}


class OutputError(ValueError):
    pass


def partial_path(out: str) -> str:
    return f"{out}.partial"


def state_path(out: str) -> str:
    return f"{out}.partial.state.npz"


@dataclass(frozen=True)
class OutputOptions:
    dtype: str
    seed: int
    model: str | None
    save_hidden: bool
    save_routing: bool
    device: str = "cpu"


@dataclass
class SeqResult:
    """What one sequence produced; arrays are trimmed to the sequence's length."""
    seq: int
    length: int
    token_logprobs: np.ndarray | None   # (len,) float32, NaN at 0
    hidden: np.ndarray | None           # (len, D) float32
    expert_ids: np.ndarray | None       # (L_moe, len, K) int16


def check_output_path(out: str, in_path: str, *, overwrite: bool, resume: bool) -> None:
    """Refuse outputs that would destroy the input, land nowhere, or clobber a result."""
    out_abs, in_abs = os.path.realpath(out), os.path.realpath(in_path)
    if out_abs == in_abs or os.path.realpath(partial_path(out)) == in_abs:
        raise OutputError(f"{out}: the output path is the input file; writing it would destroy the input")
    parent = os.path.dirname(out_abs)
    if not os.path.isdir(parent):
        raise OutputError(f"{out}: output directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"{out}: output directory {parent} is not writable")
    if os.path.exists(out) and not overwrite:
        raise OutputError(f"{out}: already exists; pass --overwrite to replace it")
    partial = partial_path(out)
    if resume and not os.path.exists(partial):
        if os.path.exists(out):
            raise OutputError(f"{out}: is complete already, there is no {partial} to resume; pass --overwrite "
                              "(without --resume) to redo it")
        raise OutputError(f"{out}: --resume given but {partial} does not exist")
    if os.path.exists(partial):
        if held_for_writing(partial):
            raise OutputError(f"{partial}: is open in another process, likely a job still writing it; "
                              "wait for that job to end (or cancel it), then run again")
        if not resume and not overwrite:
            raise OutputError(f"{partial}: left by an earlier run that did not finish; pass --resume to "
                              "continue it, or --overwrite to discard it and start again")


def _contiguous(group: h5py.Group, name: str, shape, dtype, fill) -> h5py.Dataset:
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_ALLOC)
    return group.create_dataset(name, shape=shape, dtype=dtype, fillvalue=fill, dcpl=dcpl, track_times=False)


METADATA_BYTES = 64 << 10    # what the file needs beyond its datasets' bytes (about 10 kB), with room to spare


def output_datasets(cfg: ModelConfig, spec: InputSpec, opts: OutputOptions) -> dict[str, tuple]:
    """name -> (shape, dtype, fill value) of every dataset of the output."""
    N, S, D = spec.n_seqs, spec.seq_len, cfg.hidden_size
    L, E, K = cfg.n_moe_layers, cfg.n_routed_experts, cfg.num_experts_per_tok
    out = {}
    if spec.mode == "tokens":
        out["token_logprobs"] = ((N, S), np.float32, np.nan)
        out["sequence_logprob"] = ((N,), np.float64, np.nan)
    if opts.save_hidden or spec.mode == "activations":
        out["hidden"] = ((N, S, D), np.float32, np.nan)
    if opts.save_routing:
        out["routing/expert_ids"] = ((L, N, S, K), np.int16, -1)
    out["expert_load"] = ((L, E), np.int64, 0)
    out["done"] = ((N,), np.bool_, False)
    out["lengths"] = ((N,), np.int64, 0)
    return out


def load_state(path: str, n_seqs: int) -> tuple[np.ndarray, np.ndarray]:
    """The commit record (``OUT.h5.partial.state.npz``): which sequences are done, and their expert load."""
    with np.load(path) as st:
        return np.unpackbits(st["done"], count=n_seqs).astype(bool), st["expert_load"].astype(np.int64)


def _attr(f: h5py.File, key: str):
    value = f.attrs.get(key)
    if isinstance(value, bytes):
        return value.decode()
    return value.item() if isinstance(value, np.generic) else value


def _sync_directory(path: str) -> None:
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _size(n: int) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


class OutputFile:
    """Owns the ``.partial`` file of one run; only one rank ever opens it."""

    @classmethod
    def create(cls, out: str, cfg: ModelConfig, spec: InputSpec, opts: OutputOptions) -> "OutputFile":
        """A new partial file with every dataset allocated, after checking that the disk holds it: a
        file system that fills up refuses the run here, before any work, not hours in."""
        path = partial_path(out)
        datasets = output_datasets(cfg, spec, opts)
        need = sum(int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype, _ in datasets.values())
        need += METADATA_BYTES + 2 * (spec.n_seqs // 8 + 8 * cfg.n_moe_layers * cfg.n_routed_experts)  # + state file
        fs = os.statvfs(os.path.dirname(os.path.abspath(path)))
        free = fs.f_bavail * fs.f_frsize
        if need > free:
            raise OutputError(f"{path}: needs {_size(need)} (its datasets are allocated up front) but "
                              f"{os.path.dirname(os.path.abspath(path))} has {_size(free)} free")
        try:
            with written_whole(path) as tmp:    # a kill during creation leaves only the .tmp behind
                with h5py.File(tmp, "w") as f:
                    for name, (shape, dtype, fill) in datasets.items():
                        group, _, leaf = name.rpartition("/")
                        _contiguous(f.require_group(group) if group else f, leaf, shape, dtype, fill)
                    f["lengths"][...] = spec.lengths
                    f.attrs.update({**identity(cfg, spec, opts), "input_file": os.path.realpath(spec.path),
                                    "device": opts.device, "moe_mpi_version": __version__, "complete": False})
                if os.path.exists(state_path(out)):     # an earlier run's record goes before its file
                    os.remove(state_path(out))
        except OSError as exc:
            raise OutputError(f"{path}.tmp: cannot be written ({exc}); nothing was kept") from None
        return cls(h5py.File(path, "r+"), out, cfg, spec)

    @classmethod
    def reopen(cls, out: str, cfg: ModelConfig, spec: InputSpec, opts: OutputOptions) -> "OutputFile":
        """Open a partial file for --resume, refusing one made from another input or settings."""
        path = partial_path(out)
        try:
            f = h5py.File(path, "r+")
        except OSError as exc:
            if held_for_writing(path):
                raise OutputError(f"{path}: is open in another process, likely a job still writing it; wait "
                                  "for that job to end (or cancel it), then resume") from None
            raise OutputError(f"{path}: cannot be opened to resume ({exc}); run with --overwrite to discard "
                              "it and start again") from None
        wanted = identity(cfg, spec, opts)
        attrs = {key: _attr(f, key) for key in (*wanted, "input_file")}
        for key, want in wanted.items():
            have = attrs[key]
            if have == want:
                continue
            f.close()
            if key != "input_sha256":
                raise OutputError(f"{path}: cannot resume, it was made with {key}={have!r} but this run has "
                                  f"{key}={want!r}")
            if have is None:
                raise OutputError(f"{path}: cannot resume, it was made by a moe-mpi older than 2026-11-27 that "
                                  "did not record its input's sha256; run with --overwrite to start again")
            raise OutputError(f"{path}: cannot resume, {spec.path} does not hold the input it was made from "
                              f"({attrs['input_file']}, contents sha256 {have[:12]}..., now {want[:12]}...); run "
                              "with --overwrite to start again")
        self = cls(f, out, cfg, spec)
        # The side file is the truth; the HDF5 copies of done/expert_load may be a write behind.
        f["done"][...] = self.done
        f["expert_load"][...] = self.load
        f.flush()
        return self

    def __init__(self, file: h5py.File, out: str, cfg: ModelConfig, spec: InputSpec):
        self.f, self.out, self.path, self.cfg, self.spec = file, out, partial_path(out), cfg, spec
        # Datasets opened once: looking one up by name on every write took half of a write's time
        # (a sequence's three small writes, 0.7 ms, against 0.35 ms with the handles kept)
        self.ds = {name: file[name] for name in ("token_logprobs", "sequence_logprob", "hidden",
                                                 "routing/expert_ids") if name in file}
        self.commit_interval = 0.0      # seconds between commits; 0 commits every write
        self._last_commit = -float("inf")
        self._pending_seqs: list[int] = []
        self._pending_load = None
        self.done = np.zeros(spec.n_seqs, dtype=bool)
        self.load = np.zeros((cfg.n_moe_layers, cfg.n_routed_experts), dtype=np.int64)
        if os.path.exists(state_path(out)):
            self.done, self.load = load_state(state_path(out), spec.n_seqs)

    def _commit_state(self) -> None:
        tmp = state_path(self.out) + ".tmp.npz"
        with open(tmp, "wb") as fh:
            np.savez(fh, done=np.packbits(self.done), expert_load=self.load)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, state_path(self.out))

    def done_mask(self) -> np.ndarray:
        return self.done.copy()

    def write(self, results: list[SeqResult], expert_load_LE: np.ndarray) -> None:
        """Write finished sequences; they count as done once committed (see the module docstring)."""
        ds = self.ds
        for r in sorted(results, key=lambda r: r.seq):
            n = r.length
            if r.token_logprobs is not None:
                ds["token_logprobs"][r.seq, :n] = r.token_logprobs
                ds["sequence_logprob"][r.seq] = np.nansum(r.token_logprobs.astype(np.float64))
            if r.hidden is not None and "hidden" in ds:
                ds["hidden"][r.seq, :n] = r.hidden
            if r.expert_ids is not None and "routing/expert_ids" in ds:
                ds["routing/expert_ids"][:, r.seq, :n] = r.expert_ids
        self._pending_seqs.extend(r.seq for r in results)
        if expert_load_LE.size:
            self._pending_load = (expert_load_LE.astype(np.int64) if self._pending_load is None
                                  else self._pending_load + expert_load_LE)
        if time.monotonic() - self._last_commit >= self.commit_interval:
            self.commit()

    @property
    def n_done(self) -> int:
        """Sequences committed or written and waiting for the next commit."""
        return int(self.done.sum()) + len(self._pending_seqs)

    def commit(self) -> None:
        """Flush the data written so far and sync it to the disk, then mark those sequences done: the order
        that makes a kill safe, and a node's crash (its page cache lost, the job requeued elsewhere)."""
        self._last_commit = time.monotonic()
        if not self._pending_seqs and self._pending_load is None:
            return
        f = self.f
        f.flush()
        self._sync()
        self.done[self._pending_seqs] = True
        if self._pending_load is not None:
            self.load += self._pending_load
        self._pending_seqs, self._pending_load = [], None
        self._commit_state()
        f["done"][...] = self.done
        f["expert_load"][...] = self.load
        f.flush()

    def finish(self, attrs: dict) -> None:
        """Record run attributes, close, and move the file to its final path."""
        self.commit()
        for k, v in attrs.items():
            self.f.attrs[k] = json.dumps(v) if isinstance(v, (dict, list)) else (str(v) if isinstance(v, str) else v)
        self.f.attrs["complete"] = True
        self.f.flush()
        self._sync()                    # all on the disk before the name says complete
        self.f.close()
        os.replace(self.path, self.out)
        _sync_directory(self.out)       # and the new name too
        if os.path.exists(state_path(self.out)):
            os.remove(state_path(self.out))

    def _sync(self) -> None:
        os.fsync(self.f.id.get_vfd_handle())

    def close(self) -> None:
        if self.f.id.valid:
            self.f.close()
