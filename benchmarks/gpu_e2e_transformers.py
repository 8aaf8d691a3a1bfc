"""The end-to-end benchmark's outside baseline: the slice as a user without this tool would score it,
Hugging Face ``transformers``' DeepseekV3ForCausalLM in one process on one GPU, with the same weights
and tokens.  Its defaults are kept (attention and experts implementations as transformers picks them),
the model is held in the run's dtype, and a sequence is one forward pass, log-softmax over the
vocabulary and the next tokens' entries, as ``moe-mpi score`` computes them."""
from __future__ import annotations

import time

import numpy as np
import torch

from moe_mpi.config import ModelConfig
from moe_mpi.model.weights import build_all_experts, build_front, expert_prefix


def hf_model(cfg: ModelConfig, seed: int, dtype: torch.dtype, device: torch.device):
    """transformers' model holding this tool's seeded weights (the names are the same, but
    transformers keeps each layer's experts in two stacked tensors: gate and up rows together, then
    down).  Every tensor of its state is filled from ours, and every one of ours is used, or this raises."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    hf_cfg = DeepseekV3Config(**{"num_key_value_heads": cfg.num_attention_heads, **cfg.to_dict()})
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = DeepseekV3ForCausalLM(hf_cfg).eval()
    finally:
        torch.set_default_dtype(old)
    ours = dict(build_front(cfg, seed=seed, dtype=dtype, device=device).named_parameters())
    for layer, experts in enumerate(build_all_experts(cfg, seed=seed, dtype=dtype, device=device)):
        for e, mlp in enumerate(experts):
            ours.update({expert_prefix(cfg, layer, e) + n: p for n, p in mlp.named_parameters()})
    used = set()

    def take(name: str) -> torch.Tensor:
        used.add(name)
        return ours[name]

    missing = []
    with torch.no_grad():
        for name, t in model.state_dict(keep_vars=True).items():
            stem = name.rsplit(".", 1)[0] + "."          # model.layers.i.mlp.experts.
            if t.numel() == 0:      # shared experts of width 0 where the config has none: nothing to fill
                continue
            if name in ours:
                src = take(name)
            elif name.endswith("mlp.experts.gate_up_proj"):
                src = torch.stack([torch.cat([take(f"{stem}{e}.gate_proj.weight"), take(f"{stem}{e}.up_proj.weight")])
                                   for e in range(cfg.n_routed_experts)])
            elif name.endswith("mlp.experts.down_proj"):
                src = torch.stack([take(f"{stem}{e}.down_proj.weight") for e in range(cfg.n_routed_experts)])
            else:
                missing.append(name)
                continue
            if src.shape != t.shape:
                raise ValueError(f"transformers' {name} is {tuple(t.shape)}, ours {tuple(src.shape)}")
            t.copy_(src)
    unused = sorted(set(ours) - used)
    if missing or unused:
        raise ValueError(f"weights do not map onto transformers' model: missing {missing[:5]}, unused {unused[:5]}")
    return model


def hf_score(cfg: ModelConfig, tokens: np.ndarray, lengths: np.ndarray, device: torch.device, seed: int,
             dtype: torch.dtype, n_timed: int, n_kept: int) -> dict:
    """Seconds to score the first ``n_timed`` sequences one by one (after one untimed), their tokens,
    and the log-probabilities of the first ``n_kept`` (NaN where there is no next-token score)."""
    import transformers

    model = hf_model(cfg, seed, dtype, device)
    N, S = tokens.shape
    lp = np.full((n_kept, S), np.nan, dtype=np.float32)

    def one(b: int) -> torch.Tensor:
        n = int(lengths[b])
        ids = torch.as_tensor(tokens[b:b + 1, :n], device=device)
        logits = model(input_ids=ids, use_cache=False).logits[0, :n - 1].float()
        return torch.log_softmax(logits, dim=-1).gather(-1, ids[0, 1:, None])[:, 0]

    kept = []
    with torch.inference_mode():
        one(0)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for b in range(n_timed):
            out = one(b)
            if b < n_kept:
                kept.append(out)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - t0
    for b, out in enumerate(kept):
        lp[b, 1:int(lengths[b])] = out.cpu().numpy()
    implementation = {k: getattr(model.config, k, None) for k in ("_attn_implementation", "_experts_implementation")}
    model = None        # its memory back before the fp32 reference is built
    return {"transformers": transformers.__version__, "implementation": implementation, "device": str(device),
            "sequences": n_timed,
            "tokens": int(lengths[:n_timed].sum()), "elapsed_s": elapsed,
            "tokens_per_s": float(lengths[:n_timed].sum()) / elapsed, "token_logprobs": lp}
