"""Model configuration: one frozen dataclass in Hugging Face DeepSeek-V3 ``config.json`` field names.

A real checkpoint's ``config.json`` loads as it is: fields we do not use are ignored and missing ones
take the defaults that ``transformers``' ``DeepseekV3Config`` gives them.  Presets live as JSON files in
``moe_mpi/configs/`` (also reachable as ``inputs/configs/`` in the source tree).
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PRESET_DIR = Path(__file__).parent / "configs"

SCORING_FUNCS = ("sigmoid", "softmax")
TOPK_METHODS = ("noaux_tc", "group_limited_greedy", "greedy")


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


@dataclass(frozen=True)
class ModelConfig:
    # --- sizes ---
    vocab_size: int = 129280
    hidden_size: int = 7168
    num_hidden_layers: int = 61
    first_k_dense_replace: int = 3          # layers [0, k) are dense, the rest MoE
    intermediate_size: int = 18432          # dense-layer MLP hidden size
    # --- MLA attention ---
    num_attention_heads: int = 128
    q_lora_rank: int | None = 1536          # None: plain q_proj (DeepSeek-V2-Lite)
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    attention_bias: bool = False
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None        # None or {"type"/"rope_type": "yarn", "factor": ..., ...}
    rope_interleave: bool = True
    max_position_embeddings: int = 4096
    # --- MoE ---
    n_routed_experts: int = 256
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    moe_intermediate_size: int = 2048
    n_shared_experts: int = 1
    scoring_func: str = "sigmoid"           # sigmoid (V3) or softmax (V2)
    topk_method: str = "noaux_tc"           # noaux_tc (V3), group_limited_greedy / greedy (V2)
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    # --- misc ---
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        def need(cond: bool, what: str) -> None:
            if not cond:
                raise ValueError(f"config {self.name!r}: {what}")

        self._check_types()

        for f in ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size",
                  "num_attention_heads", "kv_lora_rank", "qk_rope_head_dim", "v_head_dim",
                  "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size"):
            v = getattr(self, f)
            need(isinstance(v, int) and v > 0, f"{f} must be a positive integer, got {v!r}")
        need(self.qk_nope_head_dim >= 0, f"qk_nope_head_dim must be >= 0, got {self.qk_nope_head_dim}")
        need(self.qk_rope_head_dim % 2 == 0, f"qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")
        need(self.q_lora_rank is None or self.q_lora_rank > 0,
             f"q_lora_rank must be null or positive, got {self.q_lora_rank!r}")
        need(0 <= self.first_k_dense_replace <= self.num_hidden_layers,
             f"first_k_dense_replace must be in [0, num_hidden_layers={self.num_hidden_layers}], "
             f"got {self.first_k_dense_replace}")
        need(self.num_experts_per_tok <= self.n_routed_experts,
             f"num_experts_per_tok={self.num_experts_per_tok} exceeds n_routed_experts={self.n_routed_experts}")
        need(self.n_group >= 1 and self.n_routed_experts % self.n_group == 0,
             f"n_group={self.n_group} must be >= 1 and divide n_routed_experts={self.n_routed_experts}")
        need(1 <= self.topk_group <= self.n_group,
             f"topk_group={self.topk_group} must be in [1, n_group={self.n_group}]")
        per_group = self.n_routed_experts // self.n_group
        need(self.topk_group * per_group >= self.num_experts_per_tok,
             f"topk_group={self.topk_group} groups of {per_group} experts cannot hold "
             f"num_experts_per_tok={self.num_experts_per_tok} choices")
        need(self.topk_method != "noaux_tc" or per_group >= 2 or self.n_group == 1,
             f"n_group={self.n_group} leaves {per_group} expert per group, but noaux_tc scores a group by "
             "its top-2 experts: use fewer groups")
        need(self.scoring_func in SCORING_FUNCS,
             f"scoring_func must be one of {SCORING_FUNCS}, got {self.scoring_func!r}")
        need(self.topk_method in TOPK_METHODS,
             f"topk_method must be one of {TOPK_METHODS}, got {self.topk_method!r}")
        need(self.n_shared_experts >= 0, f"n_shared_experts must be >= 0, got {self.n_shared_experts}")
        need(self.hidden_act == "silu", f"hidden_act must be 'silu' (SwiGLU), got {self.hidden_act!r}")
        need(self.rms_norm_eps > 0, f"rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        need(self.rope_theta > 0, f"rope_theta must be > 0, got {self.rope_theta}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            need(kind in ("yarn", "default"), f"rope_scaling type must be 'yarn' or 'default', got {kind!r}")
            if kind == "yarn":
                need(float(self.rope_scaling.get("factor", 0)) >= 1,
                     f"rope_scaling.factor must be >= 1, got {self.rope_scaling.get('factor')!r}")

    def _check_types(self) -> None:
        """JSON gives any type anywhere: refuse wrong ones by field name before comparing values."""
        for f in dataclasses.fields(self):
            v, kind = getattr(self, f.name), str(f.type)
            ok = True
            if kind.startswith("int"):
                ok = (isinstance(v, int) and not isinstance(v, bool)) or (v is None and "None" in kind)
            elif kind == "float":
                ok = isinstance(v, (int, float)) and not isinstance(v, bool)
            elif kind == "bool":
                ok = isinstance(v, bool)
            elif kind == "str":
                ok = isinstance(v, str)
            elif kind.startswith("dict"):
                ok = v is None or isinstance(v, dict)
            if not ok:
                raise ValueError(f"config {self.name!r}: {f.name} must be of type {kind}, got {v!r}")

    # --- derived sizes ---
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def n_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace

    def moe_index(self, layer: int) -> int:
        """Position of a model layer among the MoE layers (0 for the first MoE layer)."""
        return layer - self.first_k_dense_replace

    @property
    def yarn(self) -> dict | None:
        if self.rope_scaling is None:
            return None
        kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
        return dict(self.rope_scaling) if kind == "yarn" else None

    @property
    def softmax_scale(self) -> float:
        """Attention scale: 1/sqrt(qk_head_dim), times mscale^2 under YaRN (as transformers does)."""
        scale = self.qk_head_dim ** -0.5
        yarn = self.yarn
        if yarn and yarn.get("mscale_all_dim"):
            factor = float(yarn["factor"])
            m = 0.1 * float(yarn["mscale_all_dim"]) * math.log(factor) + 1.0 if factor > 1 else 1.0
            scale *= m * m
        return scale

    # --- I/O ---
    @classmethod
    def from_dict(cls, raw: dict[str, Any], name: str = "custom") -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in raw.items() if k in known}
        # transformers >= 5 writes rope settings as rope_parameters; older checkpoints as rope_theta/rope_scaling.
        rope = raw.get("rope_parameters")
        if isinstance(rope, dict):
            values.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
            if rope.get("rope_type", "default") != "default":
                values.setdefault("rope_scaling", {k: v for k, v in rope.items() if k != "rope_theta"})
        # An explicit null means "no grouping"; a missing field takes transformers' default.
        for key in ("n_group", "topk_group"):
            if key in values and values[key] is None:
                values[key] = 1
        nkv = raw.get("num_key_value_heads")
        heads = raw.get("num_attention_heads", cls.num_attention_heads)
        if nkv is not None and nkv != heads:
            raise ValueError(f"config {name!r}: MLA needs num_key_value_heads == num_attention_heads, "
                             f"got {nkv} and {heads}")
        values["name"] = name
        try:
            return cls(**values)
        except TypeError as exc:  # wrong value types that dataclass construction trips over
            raise ValueError(f"config {name!r}: {exc}") from None

    @classmethod
    def load(cls, name_or_path: str | Path) -> "ModelConfig":
        """A preset name (``tiny``, ``paper``, ...), a JSON file, or a checkpoint directory."""
        path = Path(name_or_path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            preset = PRESET_DIR / f"{name_or_path}.json"
            if not preset.exists():
                raise ValueError(f"config {str(name_or_path)!r} is neither a file nor a preset "
                                 f"(presets: {', '.join(preset_names())})")
            path = preset
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"config file {path}: not valid JSON ({exc})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"config file {path}: expected a JSON object")
        return cls.from_dict(raw, name=path.stem if path.parent == PRESET_DIR else str(path))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("name")
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)
