"""Building the model's pieces with weights: seeded random, or read from a Hugging Face checkpoint.

Every tensor has a checkpoint name (``model.layers.5.mlp.experts.3.up_proj.weight``).  Random weights
are drawn from a generator seeded by (seed, name), so an expert rank that builds only expert 3 of
layer 5 gets exactly the values the 1-rank reference gets.  Checkpoint weights are read tensor by
tensor with safetensors' lazy access, so a rank reads only its own tensors.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from ..config import ModelConfig
from ..io.files import written_whole
from .layers import MLP
from .transformer import FrontModel

# Tensors kept in fp32 whatever the model dtype, as transformers keeps them.
FP32_SUFFIXES = ("mlp.gate.weight", "mlp.gate.e_score_correction_bias")


class WeightError(ValueError):
    """A checkpoint tensor is missing or has the wrong shape."""


def expert_prefix(cfg: ModelConfig, moe_layer: int, expert: int) -> str:
    return f"model.layers.{cfg.first_k_dense_replace + moe_layer}.mlp.experts.{expert}."


def tensor_seed(seed: int, name: str) -> int:
    digest = hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


# The counter-based generator behind random weights (see ``random_fill_``).
_M32 = 0xFFFFFFFF
_HASH_MUL = 0x45D9F3B                              # < 2**31: every product stays below 2**63
_IRWIN_HALL_STD = ((65536.0 ** 2 - 1) / 3) ** 0.5  # std of a sum of four uniform 16-bit integers


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mix of non-negative int64 values below 2**32, exact on every device."""
    x = x ^ (x >> 16)
    x = (x * _HASH_MUL) & _M32
    x = x ^ (x >> 16)
    x = (x * _HASH_MUL) & _M32
    return x ^ (x >> 16)


def random_fill_(out: torch.Tensor, key: int, std: float) -> torch.Tensor:
    """Fill ``out`` in place with seeded values of mean 0 and standard deviation ``std``.

    Counter-based: value i depends only on (key, i), computed in exact integer arithmetic on the tensor's
    own device, so a GPU rank draws its weights in place and gets bit-identical values to a CPU rank
    (drawing paper-width weights with torch.randn on the CPU and copying them took minutes per rank).
    Each value is a sum of four uniform 16-bit integers, centred and scaled (Irwin-Hall, within
    +-3.47 std of the mean), which is all that random test weights need.
    """
    flat = out.view(-1)
    k1, k2 = key & _M32, (key >> 32) & _M32
    scale = std / _IRWIN_HALL_STD
    chunk = 1 << (24 if out.device.type == "cuda" else 17)
    for lo in range(0, flat.numel(), chunk):
        n = min(chunk, flat.numel() - lo)
        # two 32-bit words per value; counters above 2**32 wrap into a new key
        i = torch.arange(2 * lo, 2 * (lo + n), dtype=torch.int64, device=out.device)
        h = _hash32(_hash32((i & _M32) ^ k1) ^ ((k2 + (i >> 32)) & _M32)).view(n, 2)
        s = ((h & 0xFFFF) + (h >> 16)).sum(dim=1) - 2 * 65535     # (n,) integers in [-131070, 131070]
        flat[lo:lo + n] = (s.to(torch.float32) * scale).to(out.dtype)
    return out


def random_tensor(cfg: ModelConfig, seed: int, name: str, shape: tuple[int, ...], *,
                  device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The seeded value of one named tensor, made on ``device`` in ``dtype``: the same numbers on
    every device (each value is rounded from the same fp32 value)."""
    if name.endswith("norm.weight"):
        return torch.ones(shape, device=device, dtype=dtype)
    std = cfg.initializer_range
    if name.endswith("e_score_correction_bias"):
        std = 0.1 / max(cfg.n_routed_experts, 1) ** 0.5  # small, nonzero: exercises the bias path
    out = torch.empty(shape, device=device, dtype=dtype)
    return random_fill_(out, tensor_seed(seed, name), std)


class Checkpoint:
    """Lazy reader of a Hugging Face safetensors directory (config.json + *.safetensors)."""

    def __init__(self, directory: str | Path):
        from safetensors import safe_open

        self.dir = Path(directory)
        index = self.dir / "model.safetensors.index.json"
        if index.exists():
            self.where = {k: self.dir / v for k, v in json.loads(index.read_text())["weight_map"].items()}
        else:
            self.where = {}
            for f in sorted(self.dir.glob("*.safetensors")):
                with safe_open(f, "pt") as st:
                    self.where.update({k: f for k in st.keys()})
        if not self.where:
            raise WeightError(f"checkpoint {self.dir}: no *.safetensors files found")
        if any(k.endswith("weight_scale_inv") for k in self.where):
            raise WeightError(f"checkpoint {self.dir}: holds FP8 weights (weight_scale_inv tensors); "
                              "convert it to bf16 first (DeepSeek's inference/fp8_cast_bf16.py)")
        self._open = safe_open

    def get(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name not in self.where:
            raise WeightError(f"checkpoint {self.dir}: tensor {name} is missing")
        with self._open(self.where[name], "pt") as st:
            t = st.get_tensor(name)
        if tuple(t.shape) != tuple(shape):
            raise WeightError(f"checkpoint {self.dir}: tensor {name} has shape {tuple(t.shape)}, "
                              f"expected {tuple(shape)}")
        return t


def fill_(module: nn.Module, prefix: str, cfg: ModelConfig, *, seed: int, dtype: torch.dtype,
          device: torch.device, checkpoint: Checkpoint | None) -> nn.Module:
    """Materialise a module built on the meta device: each tensor from the checkpoint or the seed."""
    module.to_empty(device=device)
    with torch.no_grad():
        for local, p in module.named_parameters():
            name = prefix + local
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                name = "model.embed_tokens.weight"
            want = torch.float32 if name.endswith(FP32_SUFFIXES) else dtype
            if checkpoint is not None:
                src = checkpoint.get(name, tuple(p.shape))
            else:
                src = random_tensor(cfg, seed, name, tuple(p.shape), device=device, dtype=want)
            p.data = src.to(device=device, dtype=want)
            p.requires_grad_(False)
        if device.type == "cuda":       # one product for gate and up (kernels.swiglu_mlp)
            for m in module.modules():
                if isinstance(m, MLP):
                    m.stack_gate_up_()
    return module


def build_front(cfg: ModelConfig, *, seed: int = 0, dtype=torch.float32, device="cpu",
                checkpoint: Checkpoint | None = None) -> FrontModel:
    with torch.device("meta"):
        front = FrontModel(cfg)
    return fill_(front, "", cfg, seed=seed, dtype=dtype, device=torch.device(device), checkpoint=checkpoint)


def build_expert(cfg: ModelConfig, moe_layer: int, expert: int, *, seed: int = 0, dtype=torch.float32,
                 device="cpu", checkpoint: Checkpoint | None = None) -> MLP:
    """One routed expert, and nothing else: what an expert rank holds."""
    with torch.device("meta"):
        mlp = MLP(cfg.hidden_size, cfg.moe_intermediate_size)
    return fill_(mlp, expert_prefix(cfg, moe_layer, expert), cfg, seed=seed, dtype=dtype,
                 device=torch.device(device), checkpoint=checkpoint)


def build_all_experts(cfg: ModelConfig, **kw) -> list[list[MLP]]:
    return [[build_expert(cfg, l, e, **kw) for e in range(cfg.n_routed_experts)]
            for l in range(cfg.n_moe_layers)]


def export_checkpoint(cfg: ModelConfig, directory: str | Path, *, seed: int = 0,
                      dtype: torch.dtype = torch.float32, overwrite: bool = False) -> Path:
    """Seeded weights as a Hugging Face DeepSeek-V3 directory (for tests and the bundled tiny model).  A
    directory that holds a checkpoint is refused (a real one can be hundreds of GB), unless ``overwrite``
    and it is one of ours (config.json and model.safetensors only); each file is written whole, then
    renamed."""
    from safetensors.torch import save_file

    out = Path(directory)
    if out.is_dir():
        held = sorted(p.name for p in out.iterdir()
                      if p.name == "config.json" or p.name.endswith((".safetensors", ".safetensors.index.json")))
        if held and not overwrite:
            raise ValueError(f"{out} already holds a checkpoint ({', '.join(held)}); pass --overwrite to replace "
                             "an earlier export")
        foreign = [n for n in held if n not in ("config.json", "model.safetensors")]
        if foreign:
            raise ValueError(f"{out} holds checkpoint files an export does not write ({', '.join(foreign)}): "
                             "export into an empty directory")
    out.mkdir(parents=True, exist_ok=True)
    tensors = {n: p.detach().contiguous() for n, p in build_front(cfg, seed=seed, dtype=dtype).named_parameters()}
    for layer, experts in enumerate(build_all_experts(cfg, seed=seed, dtype=dtype)):
        for e, mlp in enumerate(experts):
            pre = expert_prefix(cfg, layer, e)
            tensors.update({pre + n: p.detach().contiguous() for n, p in mlp.named_parameters()})
    hf = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
          "num_key_value_heads": cfg.num_attention_heads, **cfg.to_dict()}
    if dtype == torch.bfloat16:
        hf["torch_dtype"] = "bfloat16"
    with written_whole(str(out / "model.safetensors")) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})
    with written_whole(str(out / "config.json")) as tmp:
        Path(tmp).write_text(json.dumps(hf, indent=2) + "\n")
    return out
