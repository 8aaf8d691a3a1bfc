"""Hardware profiles for the performance model: one frozen dataclass, presets, and JSON loading.

Fields carry their units in their names (``peak_tflops``, ``intra_gbs`` = GB/s, ``*_us``); the SI
properties (``flops_per_s``, ``mem_bytes_per_s``, ...) are what the model computes with.
Units: MB = 1e6 bytes, GB = 1e9, TB/s = 1e12 bytes/s, TFLOPS = 1e12 FLOP/s.

A JSON profile (``--hardware FILE.json``) holds any subset of the fields, optionally on top of a preset
(``"base": "cpu"``).  Three calibration keys take measured numbers directly:

- ``matmul_gflops``: measured GEMM rate of one rank -> ``peak_tflops = matmul_gflops / 1000``, ``mfu = 1``;
- ``mpi_gbs``: measured point-to-point MPI bandwidth -> both ``intra_gbs`` and ``inter_gbs``;
- ``mpi_latency_us``: measured one-way MPI latency -> both ``intra_latency_us`` and ``inter_latency_us``.

Example, a calibrated CPU box: ``{"base": "cpu", "matmul_gflops": 85, "mpi_gbs": 12, "mpi_latency_us": 40}``.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclass(frozen=True)
class Hardware:
    name: str
    # --- one rank's device ---
    peak_tflops: float              # dense matmul peak in the run's dtype
    mfu: float                      # fraction of peak a large GEMM reaches
    mem_bw_tbs: float               # memory bandwidth
    mem_bw_util: float              # fraction of it that streaming weights reaches
    mem_gb: float                   # memory one rank may use
    op_overhead_us: float = 0.0     # fixed cost per kernel/op (launch, Python dispatch); 0 = ideal
    # --- links ---
    ranks_per_node: int | None = 8  # ranks that share a node's fast fabric; None = one node holds all
    intra_gbs: float = 450.0        # per-rank, per-direction bandwidth inside a node
    intra_latency_us: float = 3.0
    inter_gbs: float = 50.0         # per-rank, per-direction bandwidth between nodes
    inter_latency_us: float = 5.0
    msg_overhead_us: float = 0.5    # per-message injection cost: paid once per message, not overlapped
    # --- host ---
    shared_cores: int | None = None  # set on CPU boxes: all ranks of a node share this many cores
    host_overhead: float = 1.0       # with shared_cores: CPU-seconds the runtime spends per CPU-second of
                                     # modelled work (polling waits, context switches, small ops); measured
                                     # from a run's CPU accounting by benchmarks/calibrate_cpu.py
    dtype: str = "bfloat16"          # the run's default dtype on this hardware
    note: str = ""

    def __post_init__(self) -> None:
        for f in ("peak_tflops", "mfu", "mem_bw_tbs", "mem_bw_util", "mem_gb", "intra_gbs", "inter_gbs"):
            v = getattr(self, f)
            if not (isinstance(v, (int, float)) and v > 0):
                raise ValueError(f"hardware {self.name!r}: {f} must be a positive number, got {v!r}")
        for f in ("op_overhead_us", "intra_latency_us", "inter_latency_us", "msg_overhead_us"):
            v = getattr(self, f)
            if not (isinstance(v, (int, float)) and v >= 0):
                raise ValueError(f"hardware {self.name!r}: {f} must be a number >= 0, got {v!r}")
        if not (isinstance(self.host_overhead, (int, float)) and self.host_overhead >= 1):
            raise ValueError(f"hardware {self.name!r}: host_overhead must be a number >= 1, got {self.host_overhead!r}")
        for f in ("mfu", "mem_bw_util"):
            if getattr(self, f) > 1:
                raise ValueError(f"hardware {self.name!r}: {f} is a fraction in (0, 1], got {getattr(self, f)}")
        for f in ("ranks_per_node", "shared_cores"):
            v = getattr(self, f)
            if v is not None and not (isinstance(v, int) and v >= 1):
                raise ValueError(f"hardware {self.name!r}: {f} must be null or an integer >= 1, got {v!r}")
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"hardware {self.name!r}: dtype must be one of {sorted(DTYPE_BYTES)}, "
                             f"got {self.dtype!r}")

    # --- SI units for the model ---
    @property
    def flops_per_s(self) -> float:
        """Sustained FLOP/s of one rank: peak x MFU."""
        return self.peak_tflops * 1e12 * self.mfu

    @property
    def mem_bytes_per_s(self) -> float:
        """Sustained memory bandwidth of one rank: peak x utilisation."""
        return self.mem_bw_tbs * 1e12 * self.mem_bw_util

    @property
    def mem_bytes(self) -> float:
        return self.mem_gb * 1e9

    @property
    def op_overhead_s(self) -> float:
        return self.op_overhead_us * 1e-6

    @property
    def msg_overhead_s(self) -> float:
        return self.msg_overhead_us * 1e-6

    @property
    def ridge_flop_per_byte(self) -> float:
        """Arithmetic intensity above which a kernel is compute-bound."""
        return self.flops_per_s / self.mem_bytes_per_s

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    def link(self, world: int) -> tuple[float, float]:
        """(bytes/s, latency s) one rank sees when it talks to all other ranks evenly.

        The share of its peers on its own node goes over the intra-node fabric, the rest over the
        network, both at once; the slower part sets the time, and any off-node peer sets the latency.
        """
        per_node = world if self.ranks_per_node is None else self.ranks_per_node
        if world <= 1 or per_node >= world:
            return self.intra_gbs * 1e9, self.intra_latency_us * 1e-6
        on_node = (per_node - 1) / (world - 1)
        seconds_per_byte = max(on_node / (self.intra_gbs * 1e9), (1 - on_node) / (self.inter_gbs * 1e9))
        return 1.0 / seconds_per_byte, self.inter_latency_us * 1e-6

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        return (f"{self.name}: {self.flops_per_s / 1e12:g} TFLOP/s ({self.peak_tflops:g} x {self.mfu:g}), "
                f"{self.mem_bytes_per_s / 1e12:g} TB/s ({self.mem_bw_tbs:g} x {self.mem_bw_util:g}), "
                f"{self.mem_gb:g} GB, links {self.intra_gbs:g} GB/s in-node / {self.inter_gbs:g} GB/s "
                f"between nodes, {self.dtype}")


# The description's card: its own numbers for compute, HBM and memory.  It says nothing about links,
# so those are a DGX H100's: NVLink 4 at 450 GB/s per direction per GPU, one 400 Gb/s NIC per GPU.
SEED_H100 = Hardware(
    name="seed-h100", peak_tflops=400.0, mfu=0.60, mem_bw_tbs=1.8, mem_bw_util=0.80, mem_gb=64.0,
    ranks_per_node=8, intra_gbs=450.0, intra_latency_us=3.0, inter_gbs=50.0, inter_latency_us=5.0,
    msg_overhead_us=0.5, note="the source description's H100 (links: DGX H100 assumption)")

# Data-sheet peaks (dense BF16), at the fractions measured on the lent H200s (DESIGN.md section 9):
# about 700 of 989 TFLOP/s in a large expert GEMM, weights streamed at about 3.6 of 4.8 TB/s.
H100_SXM = Hardware(
    name="h100-sxm", peak_tflops=989.0, mfu=0.70, mem_bw_tbs=3.35, mem_bw_util=0.75, mem_gb=80.0,
    op_overhead_us=4.0, ranks_per_node=8, intra_gbs=450.0, intra_latency_us=3.0, inter_gbs=50.0,
    inter_latency_us=5.0, msg_overhead_us=0.5, note="data sheet x efficiency measured on H200")

# Links: NCCL send/recv between two H200s moved about 357 GB/s (section 9); the NIC is the same as H100's.
H200 = Hardware(
    name="h200", peak_tflops=989.0, mfu=0.70, mem_bw_tbs=4.8, mem_bw_util=0.75, mem_gb=141.0,
    op_overhead_us=4.0, ranks_per_node=8, intra_gbs=357.0, intra_latency_us=3.0, inter_gbs=50.0,
    inter_latency_us=5.0, msg_overhead_us=0.5, note="data sheet x efficiency measured on H200")

# One rank = one core running fp32 torch.  Starting numbers from a 2-core AMD EPYC box (single-thread
# fp32 GEMM about 80-95 GFLOP/s) and MPICH shared memory (about 12 GB/s, section 9); latency and
# per-op overhead include Python and the back-off of waiting ranks.  Calibrate with a JSON profile.
CPU = Hardware(
    name="cpu", peak_tflops=0.09, mfu=0.85, mem_bw_tbs=0.010, mem_bw_util=1.0, mem_gb=16.0,
    op_overhead_us=10.0, ranks_per_node=None, intra_gbs=12.0, intra_latency_us=50.0, inter_gbs=12.0,
    inter_latency_us=50.0, msg_overhead_us=5.0, shared_cores=2, dtype="float32",
    note="one core per rank, fp32; all ranks share the node's cores")

PRESETS = {hw.name: hw for hw in (SEED_H100, H100_SXM, H200, CPU)}

# Calibration keys: a measured number -> the fields it sets.
_CALIBRATION = {
    "matmul_gflops": lambda v: {"peak_tflops": v / 1000.0, "mfu": 1.0},
    "mpi_gbs": lambda v: {"intra_gbs": v, "inter_gbs": v},
    "mpi_latency_us": lambda v: {"intra_latency_us": v, "inter_latency_us": v},
}


def from_dict(raw: dict[str, Any], name: str = "custom") -> Hardware:
    """A profile from a dict of fields, calibration keys and an optional ``base`` preset."""
    raw = dict(raw)
    raw.pop("_comment", None)
    base_name = raw.pop("base", None)
    if base_name is not None and base_name not in PRESETS:
        raise ValueError(f"hardware {name!r}: base {base_name!r} is not a preset ({', '.join(PRESETS)})")
    values = PRESETS[base_name].to_dict() if base_name else {}
    values["name"] = name
    fields = {f.name for f in dataclasses.fields(Hardware)}
    for key, v in raw.items():
        if key in _CALIBRATION:
            if not (isinstance(v, (int, float)) and v > 0):
                raise ValueError(f"hardware {name!r}: {key} must be a positive number, got {v!r}")
            values.update(_CALIBRATION[key](float(v)))
        elif key in fields:
            values[key] = v
        else:
            raise ValueError(f"hardware {name!r}: unknown key {key!r}; known: "
                             f"{', '.join(sorted(fields | set(_CALIBRATION) | {'base'}))}")
    missing = [f.name for f in dataclasses.fields(Hardware)
               if f.name not in values and f.default is dataclasses.MISSING]
    if missing:
        raise ValueError(f"hardware {name!r}: missing {', '.join(missing)} (or give \"base\": a preset)")
    return Hardware(**values)


def load(name_or_path: str | Path) -> Hardware:
    """A preset name (seed-h100, h100-sxm, h200, cpu) or a JSON profile file."""
    if str(name_or_path) in PRESETS:
        return PRESETS[str(name_or_path)]
    path = Path(name_or_path)
    if not path.is_file():
        raise ValueError(f"hardware {str(name_or_path)!r} is neither a preset ({', '.join(PRESETS)}) "
                         f"nor a JSON file")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"hardware file {path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"hardware file {path}: expected a JSON object")
    return from_dict(raw, name=str(raw.pop("name", path.stem)))
