"""The 1-rank run: the whole model in one process.  It is the reference the distributed run is
checked against, so it uses the same work plan (one front), the same forward and the same writer."""
from __future__ import annotations

import logging
import time

import torch

from ..model.transformer import LocalExperts, drive
from ..model.weights import build_all_experts, build_front
from ..io.inputs import InputReader
from .job import (Interrupted, ScoreOptions, checkpoint, load_config, make_batch, prepare, progress_bar,
                  run_attributes, seq_results, warm_up_expert, warm_up_front, warm_up_size)

log = logging.getLogger("moe_mpi")


def score_single(opts: ScoreOptions, mpi_version: str = "none", interrupt=None) -> dict:
    cfg = load_config(opts)
    prep, out = prepare(opts, cfg)
    try:
        device = torch.device(opts.device)
        kw = dict(seed=opts.seed, dtype=opts.torch_dtype, device=device, checkpoint=checkpoint(opts))
        front = build_front(cfg, **kw)
        experts = LocalExperts(build_all_experts(cfg, **kw))
        n = warm_up_size(prep, opts, cfg)
        warm_up_front(front, cfg, prep.spec.mode, device, n)    # before the clock, as the distributed run
        # Triton compiles once per process, but on CUDA each expert captures its own graphs (kernels.py),
        # and a capture synchronises the device: every expert warms up, as each expert rank does.
        warm = [mlp for layer in experts.experts for mlp in layer]
        for mlp in warm if device.type == "cuda" else warm[:1]:
            warm_up_expert(mlp, cfg, opts.torch_dtype, device, tokens=n)
        plan = prep.plan(1, opts.micro_batch_tokens)
        reader = InputReader(prep.spec)
        n_tokens = prep.tokens_in(plan)
        log.info("scoring %d tokens of %s in one process, %d micro-batches", n_tokens, opts.input,
                 len(plan.steps))
        t0 = time.perf_counter()
        with torch.inference_mode(), progress_bar(n_tokens, opts.progress) as bar:
            for seqs in plan.per_front[0].values():
                if interrupt is not None and interrupt.signum:
                    out.commit()
                    raise Interrupted(Interrupted.message(interrupt.name, int(out.done.sum()),
                                                          prep.spec.n_seqs, opts.output))
                batch = make_batch(reader, seqs, device)
                res = drive(front.forward_steps(batch), experts)
                results = seq_results(front, batch, seqs, res, save_hidden=opts.save_hidden,
                                      save_routing=opts.save_routing)
                out.write(results, res.expert_load_LE.numpy())
                bar.update(int(batch.lengths_B.sum()))
        elapsed = time.perf_counter() - t0
        reader.close()
        attrs = run_attributes(opts, cfg, world_size=1, mpi_version=mpi_version, elapsed=elapsed,
                               tokens=n_tokens)
        out.finish(attrs)
        return attrs
    finally:
        out.close()
