"""Dense building blocks of DeepSeek-V3: RMSNorm, rotary embedding (with YaRN), MLA attention, SwiGLU MLP.

Pure torch, no MPI.  Parameter names follow the Hugging Face checkpoint layout so a state dict loads as is.

Shape letters: B sequences, S positions, H heads, D model dim, T flattened tokens, F MLP hidden.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from . import front_kernels, kernels


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if kernels.enabled(x) and self.weight.dtype == x.dtype:     # CUDA: one Triton kernel
            return front_kernels.rms_norm(x, self.weight, self.eps)
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in torch: statistics in fp32, then back to the activation dtype before the weight, as
    transformers does."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)).  Used for dense layers, shared experts and routed experts."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def stack_gate_up_(self) -> "MLP":
        """Keep the gate and up weights as the two halves of one (2F, D) tensor, so that on CUDA the two
        products run as one (``kernels.swiglu_mlp``).  Names, shapes and values are unchanged; the
        weight loader calls this on CUDA."""
        g, u = self.gate_proj.weight, self.up_proj.weight
        if g.device.type != "meta" and g.shape == u.shape and g.dtype == u.dtype and kernels.stacked(g, u) is None:
            both = torch.cat([g.detach(), u.detach()])
            g.data, u.data = both[:g.shape[0]], both[g.shape[0]:]
        return self

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        if kernels.enabled(x_TD):   # CUDA: Triton for few tokens, cuBLAS for many (kernels.py)
            y = kernels.swiglu_mlp(x_TD.reshape(-1, x_TD.shape[-1]), self.gate_proj.weight, self.up_proj.weight,
                                   self.down_proj.weight)
            return y.reshape(*x_TD.shape[:-1], y.shape[-1])
        return self.down_proj(F.silu(self.gate_proj(x_TD)) * self.up_proj(x_TD))


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_tables(cfg: ModelConfig, positions_S: torch.Tensor,
                frequencies: tuple[torch.Tensor, float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every rotary pair at the given positions, each (S, rope_dim / 2), fp32.
    ``frequencies``: ``rope_frequencies(cfg)`` already on the positions' device, to skip the copy."""
    inv_freq, attention_factor = frequencies or rope_frequencies(cfg)
    angles = positions_S.float()[:, None] * inv_freq.to(positions_S.device)[None, :]
    return angles.cos() * attention_factor, angles.sin() * attention_factor


def rope_frequencies(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """(inverse frequency of every rotary pair, fp32 on the CPU; attention scale), YaRN included."""
    dim = cfg.qk_rope_head_dim
    base = cfg.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    inv_freq = 1.0 / pos_freqs
    attention_factor = 1.0
    yarn = cfg.yarn
    if yarn:
        factor = float(yarn["factor"])
        orig = int(yarn.get("original_max_position_embeddings") or cfg.max_position_embeddings)
        mscale, mscale_all = yarn.get("mscale"), yarn.get("mscale_all_dim")
        attention_factor = yarn.get("attention_factor") or (
            _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all) if mscale and mscale_all
            else _yarn_mscale(factor))
        beta_fast = yarn.get("beta_fast") or 32
        beta_slow = yarn.get("beta_slow") or 1

        def correction_dim(rotations: float) -> float:
            return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if yarn.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
        extrapolation = 1 - ramp  # 1: keep the original frequency (high-frequency dims)
        inv_freq = inv_freq / factor * (1 - extrapolation) + inv_freq * extrapolation
    return inv_freq, attention_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Rotate the last dim of x (..., S, R) by (S, R/2) tables.

    DeepSeek stores rotary pairs interleaved, (x0, x1), (x2, x3), ...; the output is laid out
    [rotated evens | rotated odds], which is what transformers does and leaves q.k unchanged.
    """
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


# DeepSeek (and transformers) build the q/kv latent norms with the default eps, not rms_norm_eps.
LATENT_NORM_EPS = 1e-6


class MLA(nn.Module):
    """Multi-head latent attention (DeepSeek-V2/V3), causal, without a KV cache (we score whole sequences)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        H, D = cfg.num_attention_heads, cfg.hidden_size
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(D, H * cfg.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(D, cfg.q_lora_rank, bias=cfg.attention_bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * cfg.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=cfg.attention_bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, H * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(H * cfg.v_head_dim, D, bias=cfg.attention_bias)

    def forward(self, x_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Causal self-attention over each row.  Padding after a sequence's length never reaches the
        positions before it (causality), so ragged batches need no extra mask."""
        cfg = self.cfg
        B, S, _ = x_BSD.shape
        H, nope, rope, dv = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim

        if cfg.q_lora_rank is None:
            q = self.q_proj(x_BSD)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BSD)))
        kv_a = self.kv_a_proj_with_mqa(x_BSD)
        kv_latent, k_rot = kv_a.split([cfg.kv_lora_rank, rope], dim=-1)     # (B, S, kv_lora), (B, S, rope)
        kv = self.kv_b_proj(self.kv_a_layernorm(kv_latent)).view(B, S, H, nope + dv)

        q = q.view(B, S, H, nope + rope)
        q = self._rope_cat(q[..., :nope], q[..., nope:], cos, sin)            # (B, H, S, qk)
        k = self._rope_cat(kv[..., :nope], k_rot[:, :, None, :], cos, sin)    # rotary part shared by heads
        v = kv[..., nope:].transpose(1, 2)                                    # (B, H, S, dv)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=cfg.softmax_scale)
        out = out.transpose(1, 2).reshape(B, S, H * dv)                       # (B, S, H*dv)
        return self.o_proj(out)

    def _rope_cat(self, nope_BSHn: torch.Tensor, rot_BSHr: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor) -> torch.Tensor:
        """``rope_cat``; on CUDA one kernel with the same bits (``front_kernels.rope_cat``)."""
        if kernels.enabled(nope_BSHn):
            B, S, H, _ = nope_BSHn.shape
            return front_kernels.rope_cat(nope_BSHn, rot_BSHr.expand(B, S, H, rot_BSHr.shape[-1]), cos, sin,
                                          self.cfg.rope_interleave)
        return rope_cat(nope_BSHn, rot_BSHr, cos, sin, self.cfg.rope_interleave)


def rope_cat(nope_BSHn: torch.Tensor, rot_BSHr: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
             interleave: bool) -> torch.Tensor:
    """cat([nope, apply_rope(rot)]) per head, as (B, H, S, n + r) for attention; ``rot`` has H heads or
    one for all (rotated once, then repeated)."""
    B, S, H, _ = nope_BSHn.shape
    r = rot_BSHr.shape[-1]
    rot = apply_rope(rot_BSHr.transpose(1, 2), cos, sin, interleave)          # (B, H or 1, S, r)
    return torch.cat([nope_BSHn.transpose(1, 2), rot.expand(B, H, S, r)], dim=-1)
