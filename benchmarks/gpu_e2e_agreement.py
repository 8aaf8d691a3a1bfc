"""The end-to-end benchmark's correctness check: an fp32 run of the same weights and tokens, and how far
a bf16 run's log-probabilities and routing are from it (routing differences at near-ties, or downstream
of one, are explained; the rest are counted as unexplained)."""
from __future__ import annotations

import numpy as np
import torch

from moe_mpi.model.transformer import Batch, LocalExperts, drive
from moe_mpi.model.weights import build_all_experts, build_front


def fp32_reference(cfg, tokens: np.ndarray, lengths: np.ndarray, device, seed: int) -> dict:
    """Log-probabilities, routing and each route's top-k margin from an fp32 run of the same weights,
    one sequence at a time."""
    front = build_front(cfg, seed=seed, dtype=torch.float32, device=device)
    experts = LocalExperts(build_all_experts(cfg, seed=seed, dtype=torch.float32, device=device))
    captured = []
    for i, layer in enumerate(front.model.layers):
        if cfg.is_moe_layer(i):
            layer.mlp.gate.register_forward_hook(lambda m, inp, out: captured.append((m, inp[0])))
    N, S = tokens.shape
    K = cfg.num_experts_per_tok
    lp = np.full((N, S), np.nan, dtype=np.float32)
    ids = np.zeros((cfg.n_moe_layers, N, S, K), dtype=np.int16)
    margin = np.full((cfg.n_moe_layers, N, S), np.inf)
    with torch.inference_mode():
        for b in range(N):
            n = int(lengths[b])
            batch = Batch(torch.tensor([n], device=device), tokens_BS=torch.as_tensor(tokens[b:b + 1, :n], device=device))
            captured.clear()
            res = drive(front.forward_steps(batch), experts)
            lp[b, :n] = front.logprobs(res.hidden_BSD, batch)[0].cpu().numpy()
            for l, ((gate, h), ids_TK) in enumerate(zip(captured, res.expert_ids_LTK)):
                ids[l, b, :n] = ids_TK.cpu().numpy()
                choice = torch.sigmoid(h.float() @ gate.weight.float().t()) + gate.e_score_correction_bias.float()
                top = choice.topk(K + 1, dim=-1).values
                margin[l, b, :n] = (top[:, K - 1] - top[:, K]).cpu().numpy()
    del front, experts
    return {"token_logprobs": lp, "expert_ids": ids, "margin": margin}


def agreement(got: dict, ref: dict, n: int, lengths: np.ndarray, tol: float = 0.01) -> dict:
    """bf16 against fp32 on the first n sequences: log-prob differences, routing agreement, and the
    routing differences that are neither at a near-tie (top-k margin < tol in the fp32 run) nor
    downstream of an earlier one (a flip at layer l0, position t0 changes later layers at t >= t0)."""
    a, b = got["token_logprobs"][:n], ref["token_logprobs"][:n]
    m = ~np.isnan(b)
    d = np.abs(a[m] - b[m])
    out = {"sequences": n, "logprob_abs_diff_mean": float(d.mean()), "logprob_abs_diff_p99": float(np.percentile(d, 99)),
           "logprob_abs_diff_max": float(d.max()),
           "sequence_logprob_rel_diff_max": float(np.max(np.abs(np.nansum(a, 1) - np.nansum(b, 1))
                                                         / np.abs(np.nansum(b, 1))))}
    if "expert_ids" in got:
        S = a.shape[1]
        valid = np.arange(S)[None, :] < lengths[:n, None]
        diff = (np.sort(got["expert_ids"][:, :n], -1) != np.sort(ref["expert_ids"][:, :n], -1)).any(-1) & valid[None]
        unexplained = 0
        for l, s, t in np.argwhere(diff):
            near = ref["margin"][l, s, t] < tol
            downstream = any(diff[l0, s, : t + 1].any() for l0 in range(l))
            unexplained += int(not (near or downstream))
        out.update(routes=int(valid.sum() * diff.shape[0]), route_differences=int(diff.sum()),
                   route_agreement=float(1 - diff.sum() / (valid.sum() * diff.shape[0])),
                   route_differences_at_near_ties=int(diff.sum() - unexplained),
                   route_differences_unexplained=unexplained, near_tie_margin=tol)
    return out
