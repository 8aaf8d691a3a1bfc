"""A scoring job: its options, the checks made before any work, and the pieces every runtime shares
(building the model's parts, turning a forward's result into per-sequence outputs, final attributes).
"""
from __future__ import annotations

import os
import platform
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from .. import __version__
from ..config import ModelConfig
from ..io.inputs import InputReader, InputSpec, validate_input
from ..io.outputs import OutputFile, OutputOptions, SeqResult, check_output_path
from ..model.kernels import FUSED_MAX_TOKENS, TMA_DOWN_MAX_TOKENS, TMA_MAX_TOKENS
from ..model.transformer import Batch, FrontModel, FrontResult, drive, to_device
from ..model.weights import Checkpoint

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class ScoreOptions:
    input: str
    output: str
    config: str | None = None           # preset name or JSON path (ignored with model)
    model: str | None = None            # Hugging Face checkpoint directory
    front_ranks: int = 1
    micro_batch_tokens: int = 2048
    in_flight: int = 4                  # micro-batches in flight per front
    dtype: str = "float32"
    device: str = "cpu"
    save_hidden: bool = False
    save_routing: bool = False
    resume: bool = False
    overwrite: bool = False
    trace: str | None = None
    seed: int = 0
    deadline: float = 300.0             # seconds an exchange may wait before the job is aborted
    commit_interval: float = 5.0        # seconds between commits of finished sequences (0: every write)
    progress: bool = True
    transport: str = "auto"
    extra: dict = field(default_factory=dict)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def output_options(self) -> OutputOptions:
        return OutputOptions(dtype=self.dtype, seed=self.seed,
                             model=os.path.realpath(self.model) if self.model else None,
                             save_hidden=self.save_hidden, save_routing=self.save_routing, device=self.device)


def load_config(opts: ScoreOptions) -> ModelConfig:
    return ModelConfig.load(opts.model if opts.model else (opts.config or "tiny"))


def checkpoint(opts: ScoreOptions) -> Checkpoint | None:
    return Checkpoint(opts.model) if opts.model else None


class Interrupted(RuntimeError):
    """Stopped by a signal after saving every finished sequence."""

    @staticmethod
    def message(signal_name: str, done: int, total: int, output: str) -> str:
        return (f"interrupted by {signal_name}: {done} of {total} sequences are done and saved in "
                f"{output}.partial; run the same command with --resume to finish")


@dataclass(frozen=True)
class Prepared:
    """What the checks found: the input's shape and which sequences are already done (resume)."""
    spec: InputSpec
    done: np.ndarray          # (N,) bool

    def plan(self, n_fronts: int, max_tokens: int):
        from ..parallel.partition import make_plan
        return make_plan(self.spec.lengths, n_fronts, max_tokens, self.done)

    def tokens_in(self, plan) -> int:
        """Tokens of the plan's sequences still to be written (not those of micro-batches replayed)."""
        return int(sum(self.spec.lengths[seqs[~self.done[seqs]]].sum()
                       for mbs in plan.per_front for seqs in mbs.values()))

    def replayed(self, seqs: np.ndarray) -> bool:
        """Whether a micro-batch of the plan is done already, computed again only so that the experts
        see its step's rows as the uninterrupted run did; its results are not written."""
        return bool(self.done[seqs].all())


def ipc_slots(opts: ScoreOptions) -> int:
    """Slots per pair in the IPC transport's rings: MOE_MPI_IPC_SLOTS, by default --in-flight + 1.
    Fewer than --in-flight could deadlock: a pair can have that many messages outstanding, and an
    expert takes them in step order, so a sender waiting for a slot held by a later step would wait
    for good."""
    raw = os.environ.get("MOE_MPI_IPC_SLOTS", "")
    try:
        slots = int(raw) if raw else opts.in_flight + 1
    except ValueError:
        raise ValueError(f"MOE_MPI_IPC_SLOTS must be a whole number, got {raw!r}") from None
    if slots < opts.in_flight:
        raise ValueError(f"MOE_MPI_IPC_SLOTS={slots} is below --in-flight {opts.in_flight}: a front and an "
                         "expert can have that many messages outstanding, and a sender waiting for a slot "
                         "held by a later micro-batch would wait for good")
    return slots


def prepare(opts: ScoreOptions, cfg: ModelConfig) -> tuple[Prepared, OutputFile]:
    """Every check that can fail on bad input, then open (or reopen) the output.  Raises InputError,
    OutputError or WeightError with a message for the user; nothing is written before all pass."""
    if opts.micro_batch_tokens < 1:
        raise ValueError(f"--micro-batch-tokens must be >= 1, got {opts.micro_batch_tokens}")
    ipc_slots(opts)
    if not opts.commit_interval >= 0:
        raise ValueError(f"--commit-interval must be >= 0 seconds, got {opts.commit_interval}")
    spec = validate_input(opts.input, cfg)
    check_output_path(opts.output, opts.input, overwrite=opts.overwrite or opts.resume, resume=opts.resume)
    ck = checkpoint(opts)
    if ck is not None:
        verify_checkpoint(ck, cfg)
    if opts.resume:
        out = OutputFile.reopen(opts.output, cfg, spec, opts.output_options())
    else:
        out = OutputFile.create(opts.output, cfg, spec, opts.output_options())
    out.commit_interval = opts.commit_interval
    return Prepared(spec, out.done_mask()), out


def verify_checkpoint(ck: Checkpoint, cfg: ModelConfig) -> None:
    """Shapes of every tensor the run will read, from the safetensors headers (no data read)."""
    from safetensors import safe_open

    from ..model.layers import MLP
    from ..model.weights import WeightError, expert_prefix

    with torch.device("meta"):
        front = FrontModel(cfg)
        expert = MLP(cfg.hidden_size, cfg.moe_intermediate_size)
    wanted = {n: tuple(p.shape) for n, p in front.named_parameters()}
    if cfg.tie_word_embeddings:
        wanted.pop("lm_head.weight")
    for layer in range(cfg.n_moe_layers):
        for e in range(cfg.n_routed_experts):
            pre = expert_prefix(cfg, layer, e)
            wanted.update({pre + n: tuple(p.shape) for n, p in expert.named_parameters()})
    by_file: dict = {}
    for name in wanted:
        if name not in ck.where:
            raise WeightError(f"checkpoint {ck.dir}: tensor {name} is missing")
        by_file.setdefault(ck.where[name], []).append(name)
    for path, names in by_file.items():
        with safe_open(path, "pt") as st:
            for name in names:
                shape = tuple(st.get_slice(name).get_shape())
                if shape != wanted[name]:
                    raise WeightError(f"checkpoint {ck.dir}: tensor {name} has shape {shape}, "
                                      f"expected {wanted[name]}")


def make_batch(reader: InputReader, seqs: np.ndarray, device: torch.device) -> Batch:
    data, lengths = reader.read(seqs)
    host = lengths.numpy().astype(np.int64)
    if reader.spec.mode == "tokens":
        return Batch(to_device(lengths, device), tokens_BS=to_device(data, device), lengths_host=host)
    return Batch(to_device(lengths, device), embeds_BSD=to_device(data, device), lengths_host=host)


class PendingResults:
    """A finished micro-batch's outputs on their way to the host.  On a GPU the copies run behind the
    queued work: ``ready()`` says whether they have landed, ``get()`` waits for them and splits them
    into per-sequence rows for the output file."""

    def __init__(self, front: FrontModel, batch: Batch, seqs: np.ndarray, res: FrontResult, *,
                 save_hidden: bool, save_routing: bool):
        self.seqs, self.lengths = seqs, batch.host_lengths
        self.load = res.expert_load_LE.numpy()
        dev = {}
        if batch.tokens_BS is not None:
            dev["logprobs"] = front.logprobs(res.hidden_BSD, batch)
        if save_hidden or batch.tokens_BS is None:
            dev["hidden"] = res.hidden_BSD.float()
        if save_routing and res.expert_ids_LTK:
            dev["ids"] = torch.stack(res.expert_ids_LTK).to(torch.int16)      # (L, T, K)
        self.event = None
        if res.hidden_BSD.device.type == "cuda":
            self.host = {k: torch.empty(v.shape, dtype=v.dtype, pin_memory=True).copy_(v, non_blocking=True)
                         for k, v in dev.items()}
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = dev

    def ready(self) -> bool:
        return self.event is None or self.event.query()

    def get(self) -> list[SeqResult]:
        if self.event is not None:
            self.event.synchronize()
        h = {k: v.numpy() for k, v in self.host.items()}
        logprobs, hidden, ids = h.get("logprobs"), h.get("hidden"), None
        if "ids" in h:
            starts = np.concatenate([[0], np.cumsum(self.lengths)])
            ids = [h["ids"][:, starts[b]:starts[b + 1]] for b in range(len(self.seqs))]
        return [SeqResult(seq=int(s), length=int(n),
                          token_logprobs=None if logprobs is None else logprobs[b, :n],
                          hidden=None if hidden is None else hidden[b, :n],
                          expert_ids=None if ids is None else ids[b])
                for b, (s, n) in enumerate(zip(self.seqs, self.lengths))]


def seq_results(front: FrontModel, batch: Batch, seqs: np.ndarray, res: FrontResult, *,
                save_hidden: bool, save_routing: bool) -> list[SeqResult]:
    """Split a micro-batch's result into per-sequence rows for the output file (waits for the device)."""
    return PendingResults(front, batch, seqs, res, save_hidden=save_hidden, save_routing=save_routing).get()


def progress_bar(total_tokens: int, enabled: bool) -> tqdm:
    """The progress bar of the rank that writes: tqdm's on a terminal; into a batch log (stderr not a
    terminal) a plain line every MOE_MPI_PROGRESS_INTERVAL seconds (default 60) instead of ten a
    second, which over a day-long job made a log of hundreds of thousands of lines."""
    tty = sys.stderr.isatty()
    interval = 0.1 if tty else float(os.environ.get("MOE_MPI_PROGRESS_INTERVAL", "60"))
    return tqdm(total=total_tokens, unit="tok", desc="score", leave=False, disable=not enabled, ascii=not tty,
                mininterval=interval, maxinterval=max(interval, 10.0))


def run_attributes(opts: ScoreOptions, cfg: ModelConfig, *, world_size: int, mpi_version: str,
                   elapsed: float, tokens: int, metrics: dict | None = None) -> dict:
    attrs = {
        "package_version": __version__, "torch_version": torch.__version__, "mpi_library": mpi_version,
        "python_version": platform.python_version(), "world_size": world_size,
        "front_ranks": opts.front_ranks if world_size > 1 else 1, "dtype": opts.dtype, "device": opts.device,
        "seed": opts.seed, "micro_batch_tokens": opts.micro_batch_tokens, "elapsed_seconds": elapsed,
        "tokens": tokens, "tokens_per_second": tokens / elapsed if elapsed > 0 else 0.0,
    }
    if metrics:
        attrs["metrics"] = metrics
    return attrs


def warm_up_size(prep: "Prepared", opts: "ScoreOptions", cfg: ModelConfig) -> int:
    """Tokens of the made-up sequence a front warms up with: as long as the largest micro-batch's rows
    (the longest input sequence, at most a micro-batch's tokens), so the kernels the real shapes pick
    are loaded before the clock too, not only those of a tiny batch."""
    longest = int(prep.spec.lengths.max()) if len(prep.spec.lengths) else 1
    return max(1, min(opts.micro_batch_tokens, longest, cfg.max_position_embeddings))


def warm_up_front(front: FrontModel, cfg: ModelConfig, mode: str, device: torch.device, n: int = 16) -> None:
    """One forward pass of a made-up sequence of ``n`` tokens, experts answering zeros, before the clock
    starts.  The first call of each kernel loads its module, creates the cuBLAS and cuDNN handles and
    compiles Triton kernels: seconds on a GPU, which inside the scoring window held the first
    micro-batches of every front (the end-to-end benchmark's first results came 2.5-3.4 s after the
    start).  A 16-token warm-up left the kernels of the real shapes (cuBLAS picks by shape, cuDNN builds
    a plan per shape) to the first micro-batches: the first run on a machine still started late
    (0.6-1.25 s), unless a benchmark at the real shapes had run on it before; so callers pass the real
    size (``warm_up_size``)."""
    lengths = torch.tensor([n], device=device)
    host = np.array([n], dtype=np.int64)
    with torch.inference_mode():
        if mode == "tokens":
            batch = Batch(lengths, tokens_BS=torch.arange(n, device=device).remainder(cfg.vocab_size)[None],
                          lengths_host=host)
        else:
            batch = Batch(lengths, embeds_BSD=torch.zeros(1, n, cfg.hidden_size, device=device), lengths_host=host)
        res = drive(front.forward_steps(batch), lambda req: torch.zeros_like(req.x_ND))
        if mode == "tokens":
            front.logprobs(res.hidden_BSD, batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warm_up_expert(mlp, cfg: ModelConfig, dtype: torch.dtype, device: torch.device, tokens: int = 0,
                   fronts: int = 1) -> None:
    """The expert's MLP on made-up rows of each size class its kernels specialise on (one row, a few, a
    multiple of 16, each token tile of the TMA kernels and the first size past each kernel), and on the
    rows a step brings with balanced routing when each of ``fronts`` fronts sends ``tokens`` tokens,
    before the clock starts: Triton compiles each class on first use."""
    typical = tokens * cfg.num_experts_per_tok * fronts // max(1, cfg.n_routed_experts)
    edges = {FUSED_MAX_TOKENS, TMA_DOWN_MAX_TOKENS, TMA_MAX_TOKENS}
    with torch.inference_mode():
        for rows in sorted({1, 2, max(1, typical)} | edges | {e + 1 for e in edges}):
            mlp(torch.ones(rows, cfg.hidden_size, device=device, dtype=dtype))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
