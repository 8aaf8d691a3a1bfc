"""End-to-end benchmark: a paper-width slice scored on 4 GPUs by the distributed runtime against the
same slice and the same tokens in one process on one GPU, in one run.

    python benchmarks/gpu_end_to_end.py                       # needs 4 GPUs for the target layout
    python benchmarks/gpu_end_to_end.py --device cpu --small  # the whole procedure on CPUs, tiny model

The slice: hidden 7168, MLA 128 heads x 56, dense and expert MLP hidden 18432, vocabulary 129280;
3 layers (1 dense, 2 MoE), 4 experts per MoE layer, top-2.  Distributed layouts (``--variants``):
``place=split`` (an MPMD launch) puts F fronts alone on the first GPUs and the 8 expert ranks on the
rest (time-sliced), so every exchanging pair is on two GPUs;
``place=shared`` binds all ranks round-robin over the 4 GPUs, a front and two experts per GPU (the
pairs on one GPU exchange by copies within it under the IPC transport, which ``auto`` takes on one
node, and through pinned host memory under NCCL's; ``transport=`` picks one per run).  Reported: tokens/s
of both runs and their ratio, end-to-end MFU (useful model flops over GPUs x the matrix-product peak
measured in this run), busy fraction per rank (the runtime's host spans) and GPU utilisation
(nvidia-smi, sampled over each scoring window), micro-batch latency p50/p99, and the agreement of the
bf16 outputs with an fp32 run of the same tokens (log-probabilities, routing and its near-ties).
Beside them, the baseline a user without this tool would pick: transformers' DeepseekV3ForCausalLM
with the same weights, in this process on GPU 0, over the first ``--transformers-sequences``
(``gpu_e2e_transformers.py``); every run's tokens/s is also given against it.
Results: benchmarks/results/gpu_end_to_end_<card>.{md,json} and the distributed run's trace.

``--mps`` runs everything (this process, every launch and the one-process run) under a CUDA MPS daemon
started for the purpose, so that kernels of the processes sharing a GPU can run side by side instead of
taking time slices; its files are named ``..._mps_<card>``.
"""
from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_common import RESULTS, card_slug, environment, matmul_peak, mps_daemon, write_results  # noqa: E402
from gpu_e2e_agreement import agreement, fp32_reference  # noqa: E402
from gpu_e2e_report import report  # noqa: E402
from gpu_e2e_trace import steady_state, trace_summary  # noqa: E402
from gpu_e2e_transformers import hf_score  # noqa: E402
from moe_mpi.config import ModelConfig  # noqa: E402
from moe_mpi.model.transformer import Batch, LocalExperts, drive  # noqa: E402
from moe_mpi.model.weights import build_all_experts, build_front  # noqa: E402

SLICE = dict(num_hidden_layers=3, first_k_dense_replace=1, n_routed_experts=4, num_experts_per_tok=2,
             n_group=1, topk_group=1)


def slice_config(small: bool) -> ModelConfig:
    if small:
        return ModelConfig.load("tiny")
    return ModelConfig.load("paper").replace(name="paper-slice", **SLICE)


def model_flops(cfg: ModelConfig, lengths: np.ndarray) -> float:
    """Useful flops of scoring these sequences: every matrix product the model needs (attention scores
    over the causal half only, the LM head only where a next token is scored); no padding."""
    D, H = cfg.hidden_size, cfg.num_attention_heads
    qk, v = cfg.qk_head_dim, cfg.v_head_dim
    q = D * cfg.q_lora_rank + cfg.q_lora_rank * H * qk if cfg.q_lora_rank else D * H * qk
    proj = q + D * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank * H * (cfg.qk_nope_head_dim + v) \
        + H * v * D
    per_token = cfg.num_hidden_layers * 2 * proj
    per_token += cfg.first_k_dense_replace * 6 * D * cfg.intermediate_size
    per_token += cfg.n_moe_layers * (cfg.num_experts_per_tok * 6 * D * cfg.moe_intermediate_size
                                     + 2 * D * cfg.n_routed_experts
                                     + 6 * D * cfg.moe_intermediate_size * cfg.n_shared_experts)
    L = lengths.astype(np.float64)
    attn = cfg.num_hidden_layers * 2 * H * (qk + v) * (L * (L + 1) / 2)
    head = 2 * D * cfg.vocab_size * np.maximum(L - 1, 0)
    return float(per_token * L.sum() + attn.sum() + head.sum())


class GpuSampler:
    """nvidia-smi utilization.gpu of every GPU every 100 ms, time-stamped on arrival."""

    def __init__(self):
        self.samples: list[tuple[float, int, float]] = []
        self.proc = None
        if shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=index,utilization.gpu",
                                          "--format=csv,noheader,nounits", "-lms", "100"],
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                idx, util = (x.strip() for x in line.split(","))
                self.samples.append((time.time(), int(idx), float(util)))
            except ValueError:
                continue

    def mean(self, t0: float, t1: float) -> dict[int, float]:
        per: dict[int, list[float]] = {}
        for t, idx, u in self.samples:
            if t0 <= t <= t1:
                per.setdefault(idx, []).append(u)
        return {i: sum(v) / len(v) / 100 for i, v in sorted(per.items())}

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()


def mpiexec() -> list[str]:
    exe = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
    if exe is None:
        raise SystemExit("mpiexec not found")
    version = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
    extra = ["--allow-run-as-root"] if ("Open MPI" in version or "OpenRTE" in version) and os.geteuid() == 0 else []
    return [exe, *extra]


def run(cmd: list[str], env: dict, log: Path, timeout: float) -> tuple[int, float, str]:
    """Run a command; return its status, the wall time at which it printed its summary line
    ('wrote ...'), and its output."""
    t_summary = None
    lines = []
    with subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True) as proc:
        deadline = time.time() + timeout

        def kill():
            while proc.poll() is None:
                if time.time() > deadline:
                    proc.kill()
                    return
                time.sleep(0.5)

        threading.Thread(target=kill, daemon=True).start()
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("wrote ") and t_summary is None:
                t_summary = time.time()
        rc = proc.wait()
    out = "".join(lines)
    log.write_text(" ".join(cmd) + "\n\n" + out)
    return rc, t_summary or time.time(), out


def read_out(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        d = {k: f[k][...] for k in ("token_logprobs", "lengths")}
        if "routing/expert_ids" in f:
            d["expert_ids"] = f["routing/expert_ids"][...]
        d["attrs"] = {k: (json.loads(v) if k == "metrics" else v) for k, v in f.attrs.items()
                      if k in ("tokens_per_second", "elapsed_seconds", "tokens", "metrics", "world_size")}
    return d


def profile_single(cfg, tokens, lengths, device, seed: int) -> list[dict]:
    """GPU time by kernel of two bf16 micro-batches of the one-process run (after one warm-up)."""
    from torch.profiler import ProfilerActivity, profile

    front = build_front(cfg, seed=seed, dtype=torch.bfloat16, device=device)
    experts = LocalExperts(build_all_experts(cfg, seed=seed, dtype=torch.bfloat16, device=device))

    def one(b):
        n = int(lengths[b])
        batch = Batch(torch.tensor([n], device=device), tokens_BS=torch.as_tensor(tokens[b:b + 1, :n], device=device))
        res = drive(front.forward_steps(batch), experts)
        front.logprobs(res.hidden_BSD, batch).cpu()

    with torch.inference_mode():
        one(0)
        torch.cuda.synchronize(device)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            one(1)
            one(2)
            torch.cuda.synchronize(device)
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        if t > 0:
            rows.append({"kernel": e.key[:100], "calls": e.count, "ms": t / 1e3})
    total = sum(r["ms"] for r in rows) or 1.0
    rows.sort(key=lambda r: -r["ms"])
    for r in rows:
        r["share"] = r["ms"] / total
    return rows[:15]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--small", action="store_true", help="tiny model on CPUs: a check of the procedure")
    p.add_argument("--sequences", type=int, default=512)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--micro-batch-tokens", type=int, default=2048)
    p.add_argument("--in-flight", type=int, default=4)
    p.add_argument("--variants", default="fronts=2;fronts=2,in_flight=8;fronts=3;fronts=4,place=shared,in_flight=8",
                   help="distributed runs, ';'-separated, each "
                        "'fronts=F,in_flight=N,thread=0|1,place=split|shared,channels=N,transport=T,NAME=VALUE,rep=K' "
                        "(channels: NCCL_MAX_NCHANNELS for that run; an upper-case NAME: an environment "
                        "variable for that run, e.g. NCCL_CUMEM_ENABLE=0; rep: a run of a layout once more, named apart): "
                        "split puts the fronts alone on the first GPUs (at most all but one) and the experts on "
                        "the rest; shared binds every rank round-robin over every GPU (a front and some "
                        "experts per GPU)")
    p.add_argument("--check-sequences", type=int, default=8, help="sequences compared against fp32")
    p.add_argument("--transformers-sequences", type=int, default=64, metavar="N",
                   help="sequences scored by the outside baseline, transformers' DeepseekV3ForCausalLM in this "
                        "process on GPU 0 (0: none)")
    p.add_argument("--transport", default="auto")
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--work", default=None, help="scratch directory (default: a temporary one)")
    p.add_argument("--mps", action="store_true", help="run everything under a CUDA MPS daemon of its own")
    p.add_argument("--steady", metavar="TRACE", help="only print steady_state() of a saved trace (.json[.gz])")
    args = p.parse_args()
    if args.steady:
        print(json.dumps(steady_state(Path(args.steady), args.seq_len), indent=1))
        return 0
    work = Path(args.work or tempfile.mkdtemp(prefix="moe_e2e_"))
    work.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        if args.mps:      # before this process first uses CUDA, so that it is a client too
            if stack.enter_context(mps_daemon(work)) is None:
                raise SystemExit("--mps: nvidia-cuda-mps-control is not on PATH")
        return run_all(args, work)


def run_all(args, work: Path) -> int:
    if args.small:
        args.sequences, args.seq_len, args.micro_batch_tokens, args.check_sequences = 12, 48, 96, 4
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    cfg = slice_config(args.small)
    cfg_path = work / "slice.json"
    cfg_path.write_text(json.dumps(cfg.to_dict(), indent=1))
    n_gpus = torch.cuda.device_count() if device.type == "cuda" else 0

    # the same tokens for every run
    rng = np.random.default_rng(args.seed)
    tokens = rng.integers(0, cfg.vocab_size, size=(args.sequences, args.seq_len), dtype=np.int64)
    lengths = np.full(args.sequences, args.seq_len, dtype=np.int64)
    inp = work / "tokens.h5"
    with h5py.File(inp, "w") as f:
        f["tokens"], f["lengths"] = tokens, lengths
    flops = model_flops(cfg, lengths)

    peaks = {}
    if device.type == "cuda":
        for g in range(n_gpus):
            peaks[g] = matmul_peak(torch.device("cuda", g))["tflops"]
            torch.cuda.empty_cache()
    else:
        peaks[0] = matmul_peak(device, small=True)["tflops"]
    peak = sum(peaks.values()) / len(peaks)
    print(f"matrix-product peak (TFLOP/s) per GPU: {peaks}", flush=True)

    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("NCCL_NVLS_ENABLE", "0")
    env.setdefault("OMP_NUM_THREADS", "4")
    common = ["--config", str(cfg_path), "--device", args.device, "--dtype", "bfloat16",
              "--micro-batch-tokens", str(args.micro_batch_tokens), "--in-flight", str(args.in_flight),
              "--save-routing", "--no-progress", "--overwrite", "--seed", str(args.seed)]
    py = [sys.executable, "-m", "mpi4py", "-m", "moe_mpi", "score", str(inp)]
    n_experts = cfg.n_moe_layers * cfg.n_routed_experts

    sampler = GpuSampler() if device.type == "cuda" else None
    launches = []   # (name, returncode, output file, time of its summary line, GPUs, trace, layout)
    for i, variant in enumerate(args.variants.split(";")):
        opts = dict(kv.split("=") for kv in variant.split(",") if kv)     # fronts=2,in_flight=8,thread=0
        F, in_flight = int(opts.get("fronts", 2)), int(opts.get("in_flight", args.in_flight))
        thread, place = opts.get("thread", "0"), opts.get("place", "split")
        name = (f"distributed, {F} fronts" + (", GPUs shared" if place == "shared" else "")
                + (f", {in_flight} in flight" if in_flight != args.in_flight else "")
                + (", progress thread" if thread == "1" else "")
                + (f", NCCL channels {opts['channels']}" if "channels" in opts else "")
                + (f", transport {opts['transport']}" if "transport" in opts else "")
                + "".join(f", {k}={v}" for k, v in opts.items() if k.isupper())
                + (f", repeat {opts['rep']}" if "rep" in opts else "")
                + (", MPS" if args.mps else ""))
        out, trace = work / f"dist{i}.h5", work / f"trace{i}.json"
        rest = [*common, "--front-ranks", str(F), "--transport", opts.get("transport", args.transport),
                "--trace", str(trace),
                "--in-flight", str(in_flight)]
        envs = [f"MOE_MPI_PROGRESS_THREAD={thread}"]
        if "channels" in opts:      # at most this many NCCL channels (and SMs held by a pending transfer)
            envs.append(f"NCCL_MAX_NCHANNELS={opts['channels']}")
        envs += [f"{k}={v}" for k, v in opts.items() if k.isupper()]
        if device.type == "cpu" or n_gpus < 2 or place == "shared":
            cmd = [*mpiexec(), "-n", str(F + n_experts), "env", *envs, *py, str(out), *rest]
            where = (f"{F} fronts and {n_experts} experts bound round-robin to GPUs 0-{n_gpus - 1} by rank "
                     "(one launch; a front shares its GPU with experts)" if n_gpus else f"{F} fronts and {n_experts} experts on CPU processes")
        else:
            k = min(F, n_gpus - 1)
            front_gpus = ",".join(map(str, range(k)))
            expert_gpus = ",".join(map(str, range(k, n_gpus)))
            cmd = [*mpiexec(), "-n", str(F), "env", f"MOE_MPI_GPUS={front_gpus}", *envs, *py, str(out), *rest,
                   ":", "-n", str(n_experts), "env", f"MOE_MPI_GPUS={expert_gpus}", *envs, *py, str(out), *rest]
            where = (f"{F} fronts on GPU(s) {front_gpus}, {n_experts} experts on GPU(s) {expert_gpus} "
                     "(MPMD launch, MOE_MPI_GPUS per group)")
        print(f"{name}:", " ".join(cmd), flush=True)
        rc, t_end, log = run(cmd, env, work / f"dist{i}.log", args.timeout)
        print(log[-1500:], flush=True)
        launches.append((name, rc, out, t_end, max(n_gpus, 1), trace,
                         f"{where}, {in_flight} micro-batches in flight per front, exchange progress "
                         f"thread {'off' if thread == '0' else 'on'}"))
    single_out = work / "single.h5"
    # GPU 0 only; an MPS client takes the GPUs its server sees, so there it is left to pick device 0
    single_env = dict(env, CUDA_VISIBLE_DEVICES="0") if device.type == "cuda" and not args.mps else env
    single_cmd = [sys.executable, "-m", "moe_mpi", "score", str(inp), str(single_out), *common]
    print("one process:", " ".join(single_cmd), flush=True)
    rc, t_end, log = run(single_cmd, single_env, work / "single.log", args.timeout)
    print(log[-800:], flush=True)
    launches.append(("one process", rc, single_out, t_end, 1, None,
                     ("one process on GPU 0" if n_gpus else "one process") + (", MPS" if args.mps else "")))
    if sampler:
        sampler.stop()

    res = {"config": cfg.to_dict(), "sequences": args.sequences, "seq_len": args.seq_len,
           "micro_batch_tokens": args.micro_batch_tokens, "in_flight": args.in_flight, "model_flops": flops,
           "peak_tflops_per_gpu": peaks, "returncodes": {name: rc for name, rc, *_ in launches}}
    runs, traces = {}, {}
    for name, rc, path, t_end, gpus, trace, layout in launches:
        if rc or not path.exists():
            print(f"{name} failed (exit {rc}); logs in {work}", file=sys.stderr)
            continue
        d = read_out(path)
        el = float(d["attrs"]["elapsed_seconds"])
        r = {"layout": layout, "tokens": int(d["attrs"]["tokens"]), "elapsed_s": el,
             "tokens_per_s": float(d["attrs"]["tokens_per_second"]), "gpus": gpus,
             "mfu": flops / (el * gpus * peak * 1e12)}
        m = d["attrs"].get("metrics")
        if m:
            r.update(latency_p50_ms=1e3 * m["micro_batch_latency_p50_s"], latency_p99_ms=1e3 * m["micro_batch_latency_p99_s"],
                     busy_fraction=m["busy_fraction"])
        if sampler:
            r["gpu_utilization"] = sampler.mean(t_end - el, t_end)
        if trace is not None and trace.exists():
            traces[name] = trace
            r["trace_seconds_by_category"] = trace_summary(trace)
            steady = steady_state(trace, args.seq_len)
            if steady:
                r.update(steady)
        runs[name] = (r, d)
    res["runs"] = {k: v[0] for k, v in runs.items()}
    dists = [k for k in runs if k.startswith("distributed")]
    if dists and "one process" in runs:
        one = runs["one process"][0]["tokens_per_s"]
        for k in dists:
            res["runs"][k]["speedup"] = runs[k][0]["tokens_per_s"] / one
            if "steady_tokens_per_s" in res["runs"][k]:
                res["runs"][k]["steady_speedup"] = res["runs"][k]["steady_tokens_per_s"] / one
        res["best"] = max(dists, key=lambda k: runs[k][0]["tokens_per_s"])
        res["speedup"] = res["runs"][res["best"]]["speedup"]

    # the outside baseline, the fp32 reference of the first sequences, and the one-process profile
    n = min(args.check_sequences, args.sequences)
    hf = None
    if args.transformers_sequences > 0:
        k = min(args.transformers_sequences, args.sequences)
        try:
            hf = hf_score(cfg, tokens, lengths, device, args.seed, torch.bfloat16, k, min(n, k))
        except Exception as exc:    # an outside library's model: its failure is reported, the runs kept
            res["transformers"] = {"skipped": f"{type(exc).__name__}: {exc}"}
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if hf is not None:
        lp = hf.pop("token_logprobs")
        hf["mfu"] = model_flops(cfg, lengths[:hf["sequences"]]) / (hf["elapsed_s"] * peak * 1e12)
        hf["runs_vs_it"] = {name: r["tokens_per_s"] / hf["tokens_per_s"] for name, r in res["runs"].items()}
        res["transformers"] = hf
    ref = fp32_reference(cfg, tokens[:n], lengths[:n], device, args.seed)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    res["agreement"] = {name: agreement(d, ref, n, lengths) for name, (_, d) in runs.items()}
    if hf is not None and hf["sequences"] >= n:
        res["agreement"]["transformers, one process"] = agreement({"token_logprobs": lp}, ref, n, lengths)
    if device.type == "cuda":
        res["profile_single"] = profile_single(cfg, tokens, lengths, device, args.seed)

    env_info = environment(device)
    # the target layout has 4 GPUs; runs on other machines say how many they had
    slug = ((f"{n_gpus}gpus_" if device.type == "cuda" and n_gpus != 4 else "") + ("mps_" if args.mps else "")
            + card_slug(device)
            + ("_small" if args.small else ""))
    if res.get("best") in traces:   # the trace of the headline run
        Path(args.out).mkdir(parents=True, exist_ok=True)
        with open(traces[res["best"]], "rb") as src, \
                gzip.open(Path(args.out) / f"gpu_end_to_end_{slug}_trace.json.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
    md = report(res, env_info, args)
    write_results(args.out, f"gpu_end_to_end_{slug}", md, {**res, "environment": env_info, "args": vars(args)})
    print(md, flush=True)
    return 0 if all(rc == 0 for _, rc, *_ in launches) else 1


if __name__ == "__main__":
    sys.exit(main())
