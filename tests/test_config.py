"""ModelConfig: presets, real config.json files, transformers' defaults, and validation messages."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

from moe_mpi.config import PRESET_DIR, ModelConfig, preset_names

REPO = Path(__file__).resolve().parents[1]
# A small valid config; each validation case breaks one thing in it.
SMALL = dict(vocab_size=64, hidden_size=32, num_hidden_layers=3, first_k_dense_replace=1, intermediate_size=48,
             num_attention_heads=4, q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4,
             v_head_dim=8, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
             moe_intermediate_size=16, n_shared_experts=1)


# --- presets and real files ---------------------------------------------------------------------------------

def test_preset_names():
    names = preset_names()
    assert {"tiny", "paper", "deepseek-v3"} <= set(names)
    assert names == sorted(p.stem for p in PRESET_DIR.glob("*.json"))


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_loads_and_round_trips(name):
    cfg = ModelConfig.load(name)
    assert cfg.name == name
    assert ModelConfig.from_dict(json.loads(cfg.to_json())) == cfg
    assert cfg.n_moe_layers == cfg.num_hidden_layers - cfg.first_k_dense_replace


def test_paper_preset_is_the_described_model():
    """DESIGN.md section 2: 61 layers (3 dense), hidden 7168, MLA 128 heads x 56, expert and dense MLP 18432,
    DeepSeek-V3 routing (256 experts, top-8, 8 groups / 4), no shared expert."""
    c = ModelConfig.load("paper")
    assert (c.num_hidden_layers, c.first_k_dense_replace, c.n_moe_layers) == (61, 3, 58)
    assert c.hidden_size == 7168 == c.num_attention_heads * c.v_head_dim
    assert (c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.qk_head_dim) == (128, 40, 16, 56)
    assert c.intermediate_size == c.moe_intermediate_size == 18432
    assert (c.n_routed_experts, c.num_experts_per_tok, c.n_group, c.topk_group) == (256, 8, 8, 4)
    assert (c.scoring_func, c.topk_method, c.routed_scaling_factor, c.n_shared_experts) == ("sigmoid", "noaux_tc", 2.5, 0)
    assert (c.q_lora_rank, c.kv_lora_rank, c.vocab_size) == (1536, 512, 129280)
    assert c.n_routed_experts * c.n_moe_layers == 14848


def test_deepseek_v3_config_json_loads_as_is():
    """inputs/configs/deepseek-v3.json is DeepSeek-V3's own config.json shape (old-style rope_scaling with
    "type", extra fields such as moe_layer_freq and architectures)."""
    path = REPO / "inputs" / "configs" / "deepseek-v3.json"
    raw = json.loads(path.read_text())
    assert "moe_layer_freq" in raw and "architectures" in raw
    c = ModelConfig.load(path)
    assert (c.num_hidden_layers, c.first_k_dense_replace, c.moe_intermediate_size, c.n_shared_experts) == (61, 3, 2048, 1)
    assert (c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim) == (128, 128, 64, 128)
    assert (c.n_group, c.topk_group, c.num_experts_per_tok) == (8, 4, 8)
    assert c.max_position_embeddings == 163840
    assert c.yarn is not None and c.yarn["factor"] == 40 and c.yarn["original_max_position_embeddings"] == 4096
    # 1/sqrt(192) times mscale(40, mscale_all_dim=1)^2, as transformers computes it
    assert c.softmax_scale == pytest.approx(192 ** -0.5 * (0.1 * math.log(40) + 1) ** 2, rel=1e-12)
    assert ModelConfig.load("deepseek-v3") == c


def test_transformers_written_config_loads(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = transformers.DeepseekV3Config(
        vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=4,
        first_k_dense_replace=2, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=None,
        kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=6, v_head_dim=8, n_routed_experts=12,
        num_experts_per_tok=3, n_group=3, topk_group=2, n_shared_experts=2, norm_topk_prob=False,
        routed_scaling_factor=1.5, rms_norm_eps=1e-5, rope_interleave=False, attention_bias=True,
        tie_word_embeddings=True, max_position_embeddings=256,
        rope_parameters=dict(rope_type="yarn", rope_theta=5000.0, factor=4.0, mscale=0.9, mscale_all_dim=0.8,
                             original_max_position_embeddings=64, beta_fast=24, beta_slow=2))
    hf.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" in raw and "transformers_version" in raw      # new-style file, extra fields
    c = ModelConfig.load(tmp_path)
    for f in dataclasses.fields(ModelConfig):
        if f.name not in ("name", "rope_theta", "rope_scaling") and hasattr(hf, f.name):
            assert getattr(c, f.name) == getattr(hf, f.name), f.name
    assert c.rope_theta == 5000.0
    assert c.yarn == {k: v for k, v in hf.rope_parameters.items() if k != "rope_theta"}
    assert c.name == str(tmp_path / "config.json")


def test_transformers_default_rope_means_no_scaling(tmp_path):
    transformers = pytest.importorskip("transformers")
    transformers.DeepseekV3Config(rope_parameters=dict(rope_type="default", rope_theta=123.0)).save_pretrained(tmp_path)
    c = ModelConfig.load(tmp_path)
    assert c.rope_theta == 123.0 and c.rope_scaling is None and c.yarn is None


def test_unknown_fields_ignored():
    c = ModelConfig.from_dict({**SMALL, "moe_layer_freq": 1, "architectures": ["X"], "_comment": "hi",
                               "quantization_config": {"fmt": "e4m3"}})
    assert c == ModelConfig.from_dict(SMALL)


def test_v2_lite_style_null_groups_mean_one_group():
    """DeepSeek-V2-Lite writes n_group/topk_group as null with greedy softmax routing."""
    c = ModelConfig.from_dict({**SMALL, "n_group": None, "topk_group": None, "topk_method": "greedy",
                               "scoring_func": "softmax", "q_lora_rank": None})
    assert (c.n_group, c.topk_group, c.q_lora_rank) == (1, 1, None)


# --- missing fields take transformers' defaults -------------------------------------------------------------

def _hf_default_fields():
    transformers = pytest.importorskip("transformers")
    hf = transformers.DeepseekV3Config()
    return hf, [f.name for f in dataclasses.fields(ModelConfig) if f.name != "name" and hasattr(hf, f.name)
                and f.name not in ("rope_theta", "rope_scaling")]


DEFAULT_FIELDS = ["vocab_size", "hidden_size", "num_hidden_layers", "first_k_dense_replace", "intermediate_size",
                  "num_attention_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                  "v_head_dim", "attention_bias", "rope_interleave", "max_position_embeddings", "n_routed_experts",
                  "num_experts_per_tok", "n_group", "topk_group", "moe_intermediate_size", "n_shared_experts",
                  "norm_topk_prob", "routed_scaling_factor", "rms_norm_eps", "initializer_range", "hidden_act",
                  "tie_word_embeddings"]


def test_default_field_list_is_complete():
    _, fields = _hf_default_fields()
    assert sorted(fields) == sorted(DEFAULT_FIELDS)


@pytest.mark.parametrize("field", DEFAULT_FIELDS)
def test_missing_field_takes_transformers_default(field):
    hf, _ = _hf_default_fields()
    assert getattr(ModelConfig.from_dict({}), field) == getattr(hf, field)


def test_missing_rope_takes_transformers_default():
    hf, _ = _hf_default_fields()
    c = ModelConfig.from_dict({})
    assert hf.rope_parameters["rope_type"] == "default" and c.rope_scaling is None
    assert c.rope_theta == hf.rope_parameters["rope_theta"]


# --- validation ---------------------------------------------------------------------------------------------

POSITIVE_INTS = ["vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
                 "kv_lora_rank", "qk_rope_head_dim", "v_head_dim", "n_routed_experts", "num_experts_per_tok",
                 "moe_intermediate_size"]

BAD = [  # (change, the field or value the message must name)
    *[({f: 0}, f) for f in POSITIVE_INTS],
    *[({f: -2}, f) for f in POSITIVE_INTS],
    ({"hidden_size": 32.0}, "hidden_size"),
    ({"qk_nope_head_dim": -1}, "qk_nope_head_dim"),
    ({"qk_rope_head_dim": 3}, "qk_rope_head_dim"),
    ({"q_lora_rank": 0}, "q_lora_rank"),
    ({"first_k_dense_replace": -1}, "first_k_dense_replace"),
    ({"first_k_dense_replace": 4}, "first_k_dense_replace"),
    ({"num_experts_per_tok": 9}, "num_experts_per_tok"),
    ({"n_group": 0}, "n_group"),
    ({"n_group": 3}, "n_group"),
    ({"topk_group": 0}, "topk_group"),
    ({"topk_group": 3}, "topk_group"),
    ({"n_group": 4, "topk_group": 1, "num_experts_per_tok": 3}, "topk_group"),   # 1 group of 2 < 3 choices
    ({"n_group": 8, "topk_group": 4}, "noaux_tc"),                               # groups of 1 expert
    ({"scoring_func": "relu"}, "scoring_func"),
    ({"topk_method": "random"}, "topk_method"),
    ({"n_shared_experts": -1}, "n_shared_experts"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rms_norm_eps": 0.0}, "rms_norm_eps"),
    ({"rope_theta": -1.0}, "rope_theta"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 0.5}}, "rope_scaling.factor"),
    ({"rope_scaling": {"rope_type": "yarn"}}, "rope_scaling.factor"),
]


@pytest.mark.parametrize("change,names", BAD, ids=[f"{k}" for k, _ in BAD])
def test_validation_names_the_bad_field(change, names):
    with pytest.raises(ValueError, match=names):
        ModelConfig(**{**SMALL, **change})
    with pytest.raises(ValueError, match=names):
        ModelConfig.from_dict({**SMALL, **change})


def test_valid_edge_values_accepted():
    # the limits themselves are legal: all layers dense, top-k = all experts, one group, no nope dims
    ModelConfig(**{**SMALL, "first_k_dense_replace": 3})
    ModelConfig(**{**SMALL, "first_k_dense_replace": 0})
    ModelConfig(**{**SMALL, "num_experts_per_tok": 8, "topk_group": 2})
    ModelConfig(**{**SMALL, "n_group": 1, "topk_group": 1})
    ModelConfig(**{**SMALL, "qk_nope_head_dim": 0, "q_lora_rank": None, "n_shared_experts": 0})
    ModelConfig(**{**SMALL, "n_group": 8, "topk_group": 4, "topk_method": "group_limited_greedy",
                   "scoring_func": "softmax"})   # 1-expert groups are fine without noaux_tc's top-2




@pytest.mark.parametrize("field", [
    "hidden_size", "n_routed_experts",
    "rope_theta",
    "rms_norm_eps",
    "qk_nope_head_dim",
    "n_group",
    "q_lora_rank",
])
def test_wrong_type_from_json_names_the_field(field):
    with pytest.raises(ValueError, match=field):
        ModelConfig.from_dict({**SMALL, field: "big"})


def test_mla_refuses_grouped_kv_heads():
    with pytest.raises(ValueError, match="num_key_value_heads"):
        ModelConfig.from_dict({**SMALL, "num_key_value_heads": 2})
    assert ModelConfig.from_dict({**SMALL, "num_key_value_heads": 4}) == ModelConfig.from_dict(SMALL)
    assert ModelConfig.from_dict({**SMALL, "num_key_value_heads": None}) == ModelConfig.from_dict(SMALL)


def test_mla_refuses_grouped_kv_heads_against_default_heads():
    with pytest.raises(ValueError, match="num_key_value_heads"):
        ModelConfig.from_dict({"num_key_value_heads": 64})


def test_load_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**SMALL, "n_group": 3}))
    with pytest.raises(ValueError, match=r"bad\.json.*n_group"):
        ModelConfig.load(bad)
    broken = tmp_path / "broken.json"
    broken.write_text("{ not json")
    with pytest.raises(ValueError, match=r"broken\.json.*JSON"):
        ModelConfig.load(broken)
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"list\.json"):
        ModelConfig.load(listed)
    with pytest.raises(ValueError, match="no-such-preset.*tiny"):
        ModelConfig.load("no-such-preset")


def test_config_is_frozen():
    c = ModelConfig.from_dict(SMALL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.hidden_size = 8
    assert c.replace(n_shared_experts=0).n_shared_experts == 0 and c.n_shared_experts == 1
    with pytest.raises(ValueError, match="n_group"):
        c.replace(n_group=3)
