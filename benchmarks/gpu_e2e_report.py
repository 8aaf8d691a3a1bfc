"""The markdown report of ``gpu_end_to_end.py``: the runs side by side, where the best run's time goes
(milliseconds per micro-batch per front, and what the MFU target asks of the speed-up), busy fractions,
trace categories, agreement with fp32, and the one-process kernel profile."""
from __future__ import annotations

from cpu_common import md_table


def why(res: dict) -> list[str]:
    """Where the best distributed run's time goes, in milliseconds per micro-batch, against the one-process
    run, and what the MFU target asks of the speed-up."""
    runs, best = res["runs"], res.get("best")
    if not best or "one process" not in runs:
        return []
    one, r = runs["one process"], runs[best]
    mb_tokens = res["micro_batch_tokens"]
    n_mb = one["tokens"] / mb_tokens
    t1 = 1e3 * one["elapsed_s"] / n_mb
    need = 0.6 * r["gpus"] / one["mfu"]
    reach = ("more than the number of GPUs: the one-process MFU is below 0.60" if need > r["gpus"] else
             f"against {r.get('speedup', 0):.2f}x measured: every GPU would have to work at the one-process "
             f"run's rate {need / r['gpus']:.0%} of the time")
    out = [f"Why ({best}): one process takes {t1:.1f} ms per micro-batch of {mb_tokens} tokens (all layers and "
           f"experts, MFU {one['mfu']:.3f}). End-to-end MFU = speed-up x one-process MFU / GPUs, so MFU 0.60 on "
           f"{r['gpus']} GPUs needs a speed-up of {need:.2f}x, {reach}."]
    cats = r.get("trace_seconds_by_category") or {}
    fronts = {k: v for k, v in cats.items() if k.startswith("front")}
    if fronts:
        per = n_mb / len(fronts)      # micro-batches per front
        spans = ("compute", "io", "send", "progress", "wait")
        wall = 1e3 * r["elapsed_s"] / per
        rows = [{"rank": k, **{c: 1e3 * v.get(c, 0.0) / per for c in spans}, "gc": 1e3 * v.get("gc", 0.0) / per}
                for k, v in fronts.items()]
        for row in rows:        # the loop's own time between spans (gc may fall inside spans)
            row["other"] = wall - sum(row[c] for c in spans)
        busy = max(row["compute"] + row["io"] + row["send"] for row in rows)
        out += ["", f"Per front, ms per micro-batch ({per:.0f} micro-batches each, {wall:.1f} ms of scoring time "
                    "each; 'compute' is host time between exchanges, including waits for the front's own GPU; "
                    "'progress' the transport's passes over live messages made from the loop's tests; 'other' "
                    "the loop's time outside every span; 'gc' the interpreter's garbage collections, where "
                    "recorded, inside the other columns):", "",
                md_table(rows, [("rank", "rank", "")] + [(c, c, ".1f") for c in spans + ("other", "gc")]),
                "", f"The busiest front spends {busy:.1f} ms per micro-batch outside waits, so {len(fronts)} fronts "
                    f"bound the run at {len(fronts) * t1 / busy:.2f}x the one-process rate; measured "
                    f"{r.get('speedup', float('nan')):.2f}x."]
    return out + [""]


def baseline(res: dict) -> list[str]:
    """The runs against the outside baseline: transformers' model in one process on one GPU."""
    hf = res.get("transformers")
    if not hf:
        return []
    if "skipped" in hf:
        return [f"Outside baseline (transformers' DeepseekV3ForCausalLM): not run, {hf['skipped']}.", ""]
    impl = ", ".join(f"{k.strip('_').split('_')[0]} {v}" for k, v in hf["implementation"].items() if v)
    vs = "; ".join(f"{name} {x:.2f}x" for name, x in hf["runs_vs_it"].items())
    return [f"**Against the baseline a user would pick**, transformers {hf['transformers']}'s DeepseekV3ForCausalLM "
            f"with the same weights ({impl}; bf16; one process on {hf['device']}, one sequence a forward pass, then "
            f"log-softmax and the next tokens' entries, as `score` computes them), the first {hf['sequences']} "
            f"sequences: {hf['tokens_per_s']:.0f} tokens/s, MFU {hf['mfu']:.3f}. Each run's tokens/s against it: "
            f"{vs}.", ""]


def report(res: dict, env: dict, args) -> str:
    runs = res["runs"]
    rows = []
    for name, r in runs.items():
        rows.append({"run": name, "gpus": r["gpus"], "tokens": r["tokens"], "elapsed": r["elapsed_s"],
                     "tps": r["tokens_per_s"], "speedup": r.get("speedup"), "mfu": r["mfu"],
                     "first": r.get("first_result_s"), "steady": r.get("steady_tokens_per_s"),
                     "steady_x": r.get("steady_speedup"),
                     "p50": r.get("latency_p50_ms"), "p99": r.get("latency_p99_ms"),
                     "util": ", ".join(f"GPU{g} {u:.2f}" for g, u in r.get("gpu_utilization", {}).items()) or None})
    cols = [("run", "run", ""), ("gpus", "GPUs", "d"), ("tokens", "tokens", "d"), ("elapsed", "scoring (s)", ".2f"),
            ("tps", "tokens/s", ".0f"), ("speedup", "vs one process", ".2f"), ("mfu", "MFU", ".3f"),
            ("first", "first results (s)", ".2f"), ("steady", "tokens/s past start-up", ".0f"),
            ("steady_x", "past start-up vs one process", ".2f"),
            ("p50", "latency p50 (ms)", ".1f"), ("p99", "latency p99 (ms)", ".1f"),
            ("util", "GPU utilisation (nvidia-smi)", "")]
    c = res["config"]
    lines = [f"# End to end: paper-width slice, distributed vs one process ({env['card']})", "",
             f"Slice: hidden {c['hidden_size']}, MLA {c['num_attention_heads']} x "
             f"{c['qk_nope_head_dim'] + c['qk_rope_head_dim']}, MLP hidden {c['intermediate_size']}, "
             f"{c['num_hidden_layers']} layers ({c['first_k_dense_replace']} dense), {c['n_routed_experts']} experts, "
             f"top-{c['num_experts_per_tok']}, vocabulary {c['vocab_size']}; bf16. The same {res['sequences']} "
             f"sequences x {res['seq_len']} tokens in every run, micro-batches of {res['micro_batch_tokens']} tokens, "
             f"{res['in_flight']} in flight per front. MFU = {res['model_flops'] / 1e12:.1f} TFLOP of useful model "
             f"work (every matrix product the model needs: causal half of attention, LM head at scored positions) / "
             f"(scoring time x GPUs x matrix-product peak measured in this run, "
             f"{sum(res['peak_tflops_per_gpu'].values()) / len(res['peak_tflops_per_gpu']):.0f} TFLOP/s per GPU).", "",
             "Layouts: " + "; ".join(f"{k}: {r['layout']}" for k, r in runs.items()) + ".", "",
             md_table(rows, cols), "",
             "'tokens/s' is all tokens over the scoring time.  'First results' and 'tokens/s past start-up' "
             "come from the run's trace (rank 0 writes each micro-batch's results as they arrive): seconds "
             "until the first write, and the rate over the last three quarters of the writes, which leaves "
             "out the pipeline filling up; the one-process run has no trace and is compared as measured.", ""]
    failed = [k for k, rc in res["returncodes"].items() if rc]
    if failed:
        lines += [f"Failed runs (see logs): {', '.join(failed)}.", ""]
    if res.get("best"):
        best = runs[res["best"]]
        speed, mfu = res["speedup"], best["mfu"]
        lines += [f"**Best distributed run ({res['best']}): {speed:.2f}x the one-process tokens/s** (target 3x: "
                  f"{'met' if speed >= 3 else f'missed by {3 - speed:.2f}x'}); its MFU {mfu:.3f} (target 0.60: "
                  f"{'met' if mfu >= 0.6 else f'missed by {0.6 - mfu:.3f}'}).", ""]
    lines += baseline(res)
    lines += why(res)
    for name, r in runs.items():
        if r.get("busy_fraction"):
            lines += [f"Busy fraction per rank, {name} (host time in compute and send spans / wall time; a front's "
                      "compute spans include waiting for its own GPU, an expert's only launching work):", "",
                      ", ".join(f"{k} {v:.2f}" for k, v in r["busy_fraction"].items()), ""]
        if r.get("trace_seconds_by_category"):
            tr = [{"rank": k, **cats} for k, cats in r["trace_seconds_by_category"].items()]
            cats = sorted({k for row in tr for k in row if k != "rank"})
            lines += [f"Seconds per span category in the trace, {name}:", "",
                      md_table(tr, [("rank", "rank", "")] + [(k, k, ".2f") for k in cats]), ""]
    for name, a in res.get("agreement", {}).items():
        lines += [f"Agreement of the {name} bf16 run with fp32 (same weights, first {a['sequences']} sequences): "
                  f"|log p| difference mean {a['logprob_abs_diff_mean']:.4f}, p99 {a['logprob_abs_diff_p99']:.3f}, "
                  f"max {a['logprob_abs_diff_max']:.3f}; sequence log-prob relative difference max "
                  f"{a['sequence_logprob_rel_diff_max']:.2e}"
                  + (f"; routing {100 * a['route_agreement']:.2f}% identical, {a['route_differences']} differences of "
                     f"which {a['route_differences_at_near_ties']} at near-ties (fp32 top-k margin < "
                     f"{a['near_tie_margin']}) or downstream of one, {a['route_differences_unexplained']} unexplained"
                     if "route_agreement" in a else "") + ".", ""]
    if res.get("profile_single"):
        lines += ["One-process profile (GPU time by kernel, two micro-batches):", "",
                  md_table(res["profile_single"], [("kernel", "kernel", ""), ("calls", "calls", "d"),
                                                   ("ms", "ms", ".2f"), ("share", "share", ".3f")]), ""]
    lines += [f"Environment: {env}"]
    return "\n".join(lines)
