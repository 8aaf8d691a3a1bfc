"""The expert MLP's power: does the card's power cap hold the expert back near the ridge point?

    python benchmarks/gpu_expert_power.py [--tokens 1,64,...] [--seconds 2] [--out DIR]
    python benchmarks/gpu_expert_power.py --render RESULTS.json      # the report again, from its JSON

The expert benchmark (``gpu_expert_mlp.py``) misses its roofline most between 96 and 320 tokens, where
streaming the weights and doing the products take about as long as each other, and reads the card at
its 700 W cap there (instantaneous samples).  Here each workload runs for ``--seconds`` after a
warm-up, and the card's energy counter (NVML, through ctypes) gives its mean power and the energy of a
call; NVML's power, SM clock and throttle reasons are also sampled every 10 ms.  The workloads: the
runtime's expert (``kernels.swiglu_mlp``) at each token count, a large matrix product (the compute
ceiling), a device copy (the memory ceiling), the two at once on two streams (can the card run both at
full rate?), and the idle card.

A linear model of a call's energy is then fitted to the product, the copy and the expert (least squares,
relative errors; the two at once are left out, to test it):
E = P0 t + e_flop F + e_byte B, with t the call's time, F its FLOPs and B its bytes to or from device
memory.  At the cap P a call cannot take less than (e_flop F + e_byte B) / (P - P0): the **power
bound**.  Two questions follow.  Is the expert's time near the ridge the power bound, i.e. is the card
there at its cap?  And could any kernel with the ceilings' energy per FLOP and per byte reach 90% of
the roofline under that cap?
"""
from __future__ import annotations

import argparse
import ctypes
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cpu_common import md_table  # noqa: E402

D, FH = 7168, 18432
GEMM = (16384, 18432, 7168)         # the compute ceiling: one of matmul_peak's shapes
COPY_BYTES = 1 << 30                # the memory ceiling: a copy of 1 GiB (read + write counted)


class Nvml:
    """The NVML readings this script needs, for the GPU with torch's ``uuid``."""

    def __init__(self, uuid: str):
        lib = ctypes.CDLL("libnvidia-ml.so.1")
        self.lib = lib
        self._check(lib.nvmlInit_v2(), "nvmlInit")
        self.handle = ctypes.c_void_p()
        name = uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"
        self._check(lib.nvmlDeviceGetHandleByUUID(name.encode(), ctypes.byref(self.handle)), "nvmlDeviceGetHandleByUUID")

    @staticmethod
    def _check(status: int, what: str) -> None:
        if status != 0:
            raise RuntimeError(f"{what} failed: NVML error {status}")

    def _read(self, fn, ctype, *args):
        value = ctype()
        self._check(fn(self.handle, *args, ctypes.byref(value)), fn.__name__)
        return value.value

    def energy_mj(self) -> int:
        return self._read(self.lib.nvmlDeviceGetTotalEnergyConsumption, ctypes.c_ulonglong)

    def power_w(self) -> float:
        return self._read(self.lib.nvmlDeviceGetPowerUsage, ctypes.c_uint) / 1e3

    def power_limit_w(self) -> float:
        return self._read(self.lib.nvmlDeviceGetEnforcedPowerLimit, ctypes.c_uint) / 1e3

    def sm_mhz(self) -> int:
        return self._read(self.lib.nvmlDeviceGetClockInfo, ctypes.c_uint, ctypes.c_int(1))   # NVML_CLOCK_SM

    def throttle(self) -> int:
        return self._read(self.lib.nvmlDeviceGetCurrentClocksThrottleReasons, ctypes.c_ulonglong)


def measure(fn, nvml: Nvml, seconds: float, warm_s: float, device) -> dict:
    """``fn`` run back to back for ``seconds`` after ``warm_s`` of the same: ms a call (CUDA events),
    the card's mean power from its energy counter, and NVML's samples every 10 ms.  ``fn`` None: the
    idle card for ``seconds``."""
    import torch

    samples, stop = [], threading.Event()

    def sample():
        while not stop.is_set():
            samples.append((nvml.power_w(), nvml.sm_mhz(), nvml.throttle()))
            time.sleep(0.01)

    if fn is not None:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < warm_s:
            for _ in range(8):
                fn()
            torch.cuda.synchronize(device)
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0, t0, calls = nvml.energy_mj(), time.perf_counter(), 0
    start.record()
    while time.perf_counter() - t0 < seconds:
        if fn is None:
            time.sleep(0.05)
            continue
        for _ in range(8):
            fn()
        calls += 8
        torch.cuda.synchronize(device)
    end.record()
    torch.cuda.synchronize(device)
    t1, e1 = time.perf_counter(), nvml.energy_mj()
    stop.set()
    thread.join()
    wall = t1 - t0
    reasons = 0
    for _, _, r in samples:
        reasons |= r
    return {"calls": calls, "wall_s": wall, "ms": start.elapsed_time(end) / calls if calls else None,
            "power_w": (e1 - e0) / 1e3 / wall, "energy_mj": (e1 - e0) / calls if calls else None,
            "sampled_power_w": float(np.mean([p for p, _, _ in samples])) if samples else None,
            "sm_mhz": float(np.mean([m for _, m, _ in samples])) if samples else None,
            "throttle": f"0x{reasons:x}"}


def fit_energy(rows: list[dict]) -> dict:
    """Least squares (relative): energy_mj = P0 ms + e_flop FLOPs + e_byte bytes over ``rows`` (each
    with ms, energy_mj, flops, bytes).  Returns P0 in W, e_flop in pJ/FLOP, e_byte in pJ/byte, and each
    row's residual as a fraction of its energy."""
    a = np.array([[r["ms"] * 1e-3, r["flops"], r["bytes"]] for r in rows], dtype=float)
    e = np.array([r["energy_mj"] * 1e-3 for r in rows], dtype=float)
    w = 1.0 / e                                    # relative errors: every workload counts alike
    scaled = a * w[:, None]
    norms = np.linalg.norm(scaled, axis=0)         # seconds, FLOPs and bytes differ by 1e15: each column scaled to 1
    coef, *_ = np.linalg.lstsq(scaled / norms, e * w, rcond=None)
    coef = coef / norms
    resid = (a @ coef - e) / e
    return {"p0_w": float(coef[0]), "pj_per_flop": float(coef[1]) * 1e12, "pj_per_byte": float(coef[2]) * 1e12,
            "residuals": [float(v) for v in resid]}


def power_bound_ms(flops: float, nbytes: float, p0_w: float, pj_per_flop: float, pj_per_byte: float,
                   cap_w: float) -> float:
    """The least time (ms) of a call at ``cap_w`` by the energy model: its work's energy over the power
    left above P0."""
    return (flops * pj_per_flop + nbytes * pj_per_byte) * 1e-12 / (cap_w - p0_w) * 1e3


def expert_work(tokens: int) -> tuple[float, float]:
    """FLOPs and bytes (weights, input and output, bf16) of one expert call."""
    return 6.0 * tokens * D * FH, (3.0 * D * FH + 2.0 * tokens * D) * 2


def analyse(data: dict) -> dict:
    """The fit, the ceilings, and per expert size its roofline, power bound and what 90% would need."""
    rows = [r for r in data["rows"] if r["kind"] in ("gemm", "copy", "expert")]
    fit = fit_energy(rows)
    for r, res in zip(rows, fit["residuals"]):
        r["residual"] = res
    for r in data["rows"]:          # workloads left out of the fit: the model's prediction error there
        if r["kind"] == "together":
            predicted = fit["p0_w"] * r["ms"] * 1e-3 + (r["flops"] * fit["pj_per_flop"] + r["bytes"] * fit["pj_per_byte"]) * 1e-12
            r["residual"] = predicted / (r["energy_mj"] * 1e-3) - 1
    gemm = next(r for r in rows if r["kind"] == "gemm")
    copy = next(r for r in rows if r["kind"] == "copy")
    peak_tf = gemm["flops"] / (gemm["ms"] * 1e-3) / 1e12
    bw_gb = copy["bytes"] / (copy["ms"] * 1e-3) / 1e9
    cap = data["power_limit_w"]
    # the ceilings' own energy per FLOP and per byte, above the fitted P0: the most frugal the card showed
    best_flop = (gemm["energy_mj"] * 1e-3 - fit["p0_w"] * gemm["ms"] * 1e-3) / gemm["flops"] * 1e12
    best_byte = (copy["energy_mj"] * 1e-3 - fit["p0_w"] * copy["ms"] * 1e-3) / copy["bytes"] * 1e12
    for r in data["rows"]:
        if r["kind"] == "together":     # the product's and the copy's rates, each against its ceiling
            r["of_peak"] = gemm["flops"] / (r["ms"] * 1e-3) / (peak_tf * 1e12)
            r["of_copy"] = (r["bytes"] - gemm["bytes"]) / (r["ms"] * 1e-3) / (bw_gb * 1e9)
    for r in rows:
        if r["kind"] != "expert":
            continue
        roof = max(r["flops"] / (peak_tf * 1e12), r["bytes"] / (bw_gb * 1e9)) * 1e3
        r["roofline_ms"] = roof
        r["of_roofline"] = roof / r["ms"]
        r["power_bound_ms"] = power_bound_ms(r["flops"], r["bytes"], fit["p0_w"], fit["pj_per_flop"],
                                             fit["pj_per_byte"], cap)
        r["of_power_bound"] = r["power_bound_ms"] / r["ms"]
        # at 90% of the roofline, with the ceilings' energy per FLOP and per byte: the power it would draw
        t = roof / 0.9
        r["power_at_90_w"] = fit["p0_w"] + (r["flops"] * best_flop + r["bytes"] * best_byte) * 1e-12 / (t * 1e-3)
    return {"fit": fit, "peak_tflops": peak_tf, "copy_gbps": bw_gb, "cap_w": cap,
            "ceiling_pj_per_flop": best_flop, "ceiling_pj_per_byte": best_byte, "rows": data["rows"]}


def report(data: dict) -> tuple[str, dict]:
    """The markdown report, and the data with the analysis added (as the JSON keeps it)."""
    a = analyse(data)
    fit = a["fit"]
    idle = next((r for r in data["rows"] if r["kind"] == "idle"), None)
    lines = [f"# The expert MLP's power at paper width ({data['card']})", "",
             data.get("note", "").strip(), "",
             f"SwiGLU {D} x {FH}, bf16, the runtime's expert (`kernels.swiglu_mlp`). Each workload ran "
             f"{data['seconds']:g} s back to back after {data['warm_s']:g} s of the same; 'power' is the "
             "energy counter's difference over that time, 'sampled' NVML's power readings every 10 ms, "
             "'SM MHz' the mean of the sampled clocks, 'throttle' every reason NVML gave during the run "
             "(0x4: the software power cap). "
             f"The card's enforced power limit: {a['cap_w']:.0f} W"
             + (f"; idle it drew {idle['power_w']:.0f} W." if idle else "."), "",
             f"Ceilings in this run: {a['peak_tflops']:.0f} TFLOP/s (a {GEMM[0]}x{GEMM[1]}x{GEMM[2]} product), "
             f"{a['copy_gbps']:.0f} GB/s (a copy of {COPY_BYTES >> 20} MiB, read + write counted). "
             "Roofline = max(FLOPs / peak, bytes / copy bandwidth), as in `gpu_expert_mlp_<card>.md`.", "",
             f"Energy model fitted to the product, the copy and the expert (least squares on relative errors): "
             f"E = {fit['p0_w']:.0f} W x t + {fit['pj_per_flop']:.3f} pJ per FLOP + {fit['pj_per_byte']:.1f} pJ "
             f"per byte; residuals {min(fit['residuals']) * 100:+.1f}% to {max(fit['residuals']) * 100:+.1f}%. "
             f"Above that {fit['p0_w']:.0f} W, the product ceiling spent {a['ceiling_pj_per_flop']:.3f} pJ per "
             f"FLOP (its operands' traffic included) and the copy {a['ceiling_pj_per_byte']:.1f} pJ per byte. 'power bound' = (e_flop F + e_byte B) "
             f"/ (cap - P0): the least time a call with the model's energy can take at the cap. 'power at 90%': "
             "what the card would draw running the call at 90% of the roofline with the ceilings' energy per "
             "FLOP and per byte.", ""]
    cols = [("what", "workload", ""), ("ms", "ms a call", ".4f"), ("power_w", "power (W)", ".0f"),
            ("sampled_power_w", "sampled (W)", ".0f"), ("sm_mhz", "SM MHz", ".0f"), ("throttle", "throttle", ""),
            ("energy_mj", "mJ a call", ".1f"), ("residual", "model residual", "+.3f"),
            ("of_roofline", "of roofline", ".3f"), ("power_bound_ms", "power bound (ms)", ".4f"),
            ("of_power_bound", "of power bound", ".3f"), ("power_at_90_w", "power at 90% (W)", ".0f")]
    for r in a["rows"]:
        if r["kind"] == "together":
            lines += [f"'{r['what']}' (left out of the fit): the product ran at {r['of_peak']:.2f} of its ceiling and "
                      f"the copies at {r['of_copy']:.2f} of theirs, {r['of_peak'] + r['of_copy']:.2f} in all (2 would be "
                      f"both at full rate, 1 one after the other); the model's prediction of its energy is off by "
                      f"{r['residual'] * 100:+.1f}%.", ""]
    lines.append(md_table(a["rows"], cols))
    data_out = dict(data, analysis={k: v for k, v in a.items() if k != "rows"})
    return "\n".join(lines) + "\n", data_out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", default="1,16,64,96,128,160,192,256,320,512,1024,4096,16384")
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--warm", type=float, default=0.5)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--note", default="", help="a line for the report's head (where and how it ran)")
    p.add_argument("--render", metavar="JSON", help="only rebuild the report from a results JSON")
    args = p.parse_args()
    if args.render:
        data = json.loads(Path(args.render).read_text())
        md, _ = report(data)
        Path(args.render).with_suffix(".md").write_text(md)
        print(md)
        return 0

    import torch

    from gpu_common import card_name, card_slug, expert_weights
    from moe_mpi.model import kernels

    dev = torch.device("cuda", torch.cuda.current_device())
    nvml = Nvml(str(torch.cuda.get_device_properties(dev).uuid))
    w13, wd = expert_weights(dev)
    wg, wu = w13[:FH], w13[FH:]
    rows = [dict(measure(None, nvml, args.seconds, 0, dev), kind="idle", what="idle", flops=0.0, bytes=0.0)]
    print(f"idle {rows[0]['power_w']:.0f} W", flush=True)
    m, n, k = GEMM
    a = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    b = torch.randn(k, n, device=dev, dtype=torch.bfloat16)
    src = torch.empty(COPY_BYTES, dtype=torch.uint8, device=dev).random_()
    dst = torch.empty_like(src)
    gemm = ("gemm", f"product {m}x{n}x{k}", lambda: a @ b, 2.0 * m * n * k, 2.0 * (m * k + k * n + m * n))
    copy = ("copy", f"copy {COPY_BYTES >> 20} MiB", lambda: dst.copy_(src), 0.0, 2.0 * COPY_BYTES)

    def run(kind, what, fn, flops, nbytes):
        r = dict(measure(fn, nvml, args.seconds, args.warm, dev), kind=kind, what=what, flops=flops, bytes=nbytes)
        rows.append(r)
        print(f"{what:28s} {r['ms']:.4f} ms  {r['power_w']:.0f} W  {r['sm_mhz']:.0f} MHz  {r['energy_mj']:.1f} mJ "
              f"throttle {r['throttle']}", flush=True)
        return r

    g, c = run(*gemm), run(*copy)
    # the product and copies of about as long on a second stream, at once: can the card do both?
    copies, side = max(1, round(g["ms"] / c["ms"])), torch.cuda.Stream(dev)

    def together():
        cur = torch.cuda.current_stream(dev)
        side.wait_stream(cur)
        with torch.cuda.stream(side):
            for _ in range(copies):
                dst.copy_(src)
        out = a @ b
        cur.wait_stream(side)
        return out

    run("together", f"product + {copies} copies at once", together, gemm[3], gemm[4] + copies * copy[4])
    for T in map(int, args.tokens.split(",")):
        x = torch.randn(T, D, device=dev).to(torch.bfloat16)
        run("expert", f"expert, {T} tokens", lambda x=x: kernels.swiglu_mlp(x, wg, wu, wd), *expert_work(T))
    data = {"card": card_name(dev), "power_limit_w": nvml.power_limit_w(), "seconds": args.seconds,
            "warm_s": args.warm, "note": args.note, "torch": torch.__version__, "rows": rows}
    md, data = report(data)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"gpu_expert_power_{card_slug(dev)}"
    (out / f"{stem}.json").write_text(json.dumps(data, indent=1))
    (out / f"{stem}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
