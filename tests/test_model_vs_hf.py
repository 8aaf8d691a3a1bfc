"""Our model against the independent reference, ``transformers``' DeepseekV3ForCausalLM.

Each case builds a tiny random DeepSeek-V3 with transformers, saves it as a Hugging Face checkpoint,
loads that with our ``Checkpoint`` and compares in fp32: token log-probs, the final hidden state, and the
experts chosen per token in every MoE layer.  transformers runs each sequence alone on its true length;
we run a padded ragged batch, so padding must not leak into real positions.

Routing is made non-trivial on purpose: initializer_range 0.2 spreads the router logits, the
e_score_correction_bias is drawn nonzero after construction (transformers initialises it to zero), and
norm and bias weights are perturbed away from their 1 / 0 initial values so that a weight loaded into
the wrong place changes the answer.

Shape letters: B sequences, S positions, D model dim, T valid tokens, K top-k, E routed experts.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import DeepseekV2Config, DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: E402
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter  # noqa: E402

from moe_mpi.config import ModelConfig  # noqa: E402
from moe_mpi.model.routing import Router  # noqa: E402
from moe_mpi.model.transformer import Batch, FrontResult, LocalExperts, drive  # noqa: E402
from moe_mpi.model.weights import Checkpoint, build_all_experts, build_front  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # n_shared_experts=0

ATOL = 1e-4

# Common tiny shape; each case overrides what it exercises.
BASE = dict(
    vocab_size=97, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
    num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
    q_lora_rank=16, kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
    n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1,
    norm_topk_prob=True, routed_scaling_factor=2.5, initializer_range=0.2, max_position_embeddings=64,
)

CASES = {
    # DeepSeek-V3's own recipe in miniature: q LoRA, grouped noaux_tc, one shared expert, YaRN with both
    # mscales (so the attention scale and the cos/sin amplitude both change).
    "v3-yarn-groups": dict(
        n_group=4, topk_group=2, num_experts_per_tok=3,
        max_position_embeddings=1024,
        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, mscale=1.0,
                             mscale_all_dim=0.7, original_max_position_embeddings=256,
                             beta_fast=32, beta_slow=1),
    ),
    # DeepSeek-V2-Lite-like attention (plain q_proj), no shared expert, every layer MoE, one group,
    # attention biases, split-half rope, unnormalised gate weights.
    "plain-q-noshared-allmoe": dict(
        q_lora_rank=None, n_shared_experts=0, first_k_dense_replace=0, num_hidden_layers=2,
        n_routed_experts=6, n_group=1, topk_group=1, num_experts_per_tok=2, norm_topk_prob=False,
        attention_bias=True, rope_interleave=False,
        rope_parameters=dict(rope_type="default", rope_theta=500.0),
    ),
    # Two shared experts, two dense layers before the MoE ones, YaRN from the factor alone (no mscale
    # keys: cos/sin amplitude 0.1 ln(factor) + 1, attention scale unchanged), split-half rope, tied
    # embeddings (the checkpoint holds no lm_head.weight).
    "two-shared-dense2-tied": dict(
        n_shared_experts=2, first_k_dense_replace=2, num_hidden_layers=4, n_routed_experts=12,
        n_group=3, topk_group=1, num_experts_per_tok=2, routed_scaling_factor=1.0,
        rope_interleave=False, tie_word_embeddings=True,
        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=2.0,
                             original_max_position_embeddings=32),
    ),
    # Many small groups (2 experts each, the noaux_tc minimum), 3 of 8 groups kept, top-4, unusual
    # YaRN betas and mscales, unnormalised gate weights.
    "many-groups-unnormalised": dict(
        num_hidden_layers=2, n_routed_experts=16, n_group=8, topk_group=3, num_experts_per_tok=4,
        norm_topk_prob=False, qk_nope_head_dim=4, qk_rope_head_dim=4,
        max_position_embeddings=512,
        rope_parameters=dict(rope_type="yarn", rope_theta=100.0, factor=8.0, mscale=0.707,
                             mscale_all_dim=1.0, original_max_position_embeddings=64,
                             beta_fast=16, beta_slow=2),
    ),
    # No MoE layer at all: the front runs alone and the generator never yields.
    "all-dense": dict(num_hidden_layers=2, first_k_dense_replace=2),
}

LENGTHS = [12, 1, 7, 2, 10]   # ragged, including a 1-token sequence (no predictions at all)
S = max(LENGTHS)


def make_hf(overrides: dict, seed: int) -> DeepseekV3ForCausalLM:
    """A random transformers model whose every tensor matters to the result."""
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**{**BASE, **overrides})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(1.0, 0.2)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.1)
        for module in model.modules():
            if hasattr(module, "e_score_correction_bias"):
                module.e_score_correction_bias.normal_(0.0, 0.1)
    return model


def moe_gates(model: DeepseekV3ForCausalLM) -> list[torch.nn.Module]:
    return [layer.mlp.gate for layer in model.model.layers if hasattr(layer.mlp, "gate")]


@dataclass
class HFRun:
    """transformers' answers, each sequence run alone on its true length."""
    logprobs: list[torch.Tensor]        # per sequence, (L-1,) log p(token t | tokens < t) for t >= 1
    hidden: list[torch.Tensor]          # per sequence, (L, D) after the final norm
    ids_LTK: list[torch.Tensor]         # per MoE layer, (T, K) chosen experts of all valid tokens
    logits_LTE: list[torch.Tensor]      # per MoE layer, (T, E) router logits


def run_hf(model: DeepseekV3ForCausalLM, tokens_BS: torch.Tensor, lengths: list[int]) -> HFRun:
    gates = moe_gates(model)
    captured: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in gates]

    def recorder(i):
        def hook(_module, _inputs, out):
            router_logits, _weights, topk_indices = out
            captured[i].append((topk_indices.clone(), router_logits.clone()))
        return hook

    logprobs, hidden = [], []
    handles = [g.register_forward_hook(recorder(i)) for i, g in enumerate(gates)]
    try:
        with torch.no_grad():
            for b, L in enumerate(lengths):
                ids_1L = tokens_BS[b:b + 1, :L]
                logits = model(input_ids=ids_1L).logits[0].float()
                lp = torch.log_softmax(logits, dim=-1)[:-1].gather(1, ids_1L[0, 1:, None])[:, 0]
                logprobs.append(lp)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        for b, L in enumerate(lengths):
            hidden.append(model.model(input_ids=tokens_BS[b:b + 1, :L]).last_hidden_state[0])
    return HFRun(logprobs, hidden,
                 [torch.cat([c[0] for c in per_layer]) for per_layer in captured],
                 [torch.cat([c[1] for c in per_layer]) for per_layer in captured])


@dataclass
class Pair:
    name: str
    hf: DeepseekV3ForCausalLM
    ckpt_dir: object
    cfg: ModelConfig
    tokens_BS: torch.Tensor
    batch: Batch
    ours: FrontResult
    ours_logprobs_BS: torch.Tensor
    ref: HFRun
    front: object
    experts: object


def run_ours(front, experts, batch: Batch) -> FrontResult:
    with torch.no_grad():
        return drive(front.forward_steps(batch), LocalExperts(experts))


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory) -> Pair:
    name = request.param
    seed = 1000 + list(CASES).index(name)
    hf = make_hf(CASES[name], seed)
    ckpt_dir = tmp_path_factory.mktemp(name)
    hf.save_pretrained(ckpt_dir)

    cfg = ModelConfig.load(ckpt_dir)
    ckpt = Checkpoint(ckpt_dir)
    front = build_front(cfg, checkpoint=ckpt)
    experts = build_all_experts(cfg, checkpoint=ckpt)

    gen = torch.Generator().manual_seed(seed)
    tokens_BS = torch.randint(0, cfg.vocab_size, (len(LENGTHS), S), generator=gen)
    batch = Batch(torch.tensor(LENGTHS), tokens_BS=tokens_BS)
    ours = run_ours(front, experts, batch)
    with torch.no_grad():
        lp_BS = front.logprobs(ours.hidden_BSD, batch)
    return Pair(name, hf, ckpt_dir, cfg, tokens_BS, batch, ours, lp_BS, run_hf(hf, tokens_BS, LENGTHS),
                front, experts)


# --- fp32 agreement ------------------------------------------------------------------------------------

def test_config_read_from_checkpoint(pair: Pair):
    """The config we run is the one transformers ran: a wrong field would make every other test moot."""
    hf_cfg, cfg = pair.hf.config, pair.cfg
    for f in ("vocab_size", "hidden_size", "num_hidden_layers", "first_k_dense_replace", "q_lora_rank",
              "n_routed_experts", "num_experts_per_tok", "n_group", "topk_group", "n_shared_experts",
              "norm_topk_prob", "routed_scaling_factor", "rope_interleave", "attention_bias",
              "tie_word_embeddings", "rms_norm_eps"):
        assert getattr(cfg, f) == getattr(hf_cfg, f), f
    assert cfg.rope_theta == hf_cfg.rope_parameters["rope_theta"]
    assert cfg.softmax_scale == pytest.approx(pair.hf.model.layers[0].self_attn.scaling, rel=1e-12)


def test_logprobs_match_hf(pair: Pair):
    lp_BS = pair.ours_logprobs_BS
    for b, L in enumerate(LENGTHS):
        ref = pair.ref.logprobs[b]
        assert ref.shape == (L - 1,)
        torch.testing.assert_close(lp_BS[b, 1:L], ref, atol=ATOL, rtol=0, msg=f"sequence {b} (length {L})")


def test_logprobs_nan_exactly_where_undefined(pair: Pair):
    lp_BS = pair.ours_logprobs_BS
    assert lp_BS.shape == (len(LENGTHS), S) and lp_BS.dtype == torch.float32
    for b, L in enumerate(LENGTHS):
        assert torch.isnan(lp_BS[b, 0]), f"sequence {b}: t=0 has no prediction"
        assert torch.isnan(lp_BS[b, L:]).all(), f"sequence {b}: padding from t={L} must be NaN"
        assert torch.isfinite(lp_BS[b, 1:L]).all(), f"sequence {b}: real positions must be finite"
        assert (lp_BS[b, 1:L] <= 0).all()


def test_final_hidden_matches_hf(pair: Pair):
    hidden_BSD = pair.ours.hidden_BSD
    assert hidden_BSD.shape == (len(LENGTHS), S, pair.cfg.hidden_size)
    for b, L in enumerate(LENGTHS):
        torch.testing.assert_close(hidden_BSD[b, :L], pair.ref.hidden[b], atol=ATOL, rtol=0,
                                   msg=f"sequence {b} (length {L})")


def test_expert_choices_match_hf(pair: Pair):
    """Same set of K experts per token in every MoE layer (order within the K may differ: transformers
    takes an unsorted top-k)."""
    cfg, ours = pair.cfg, pair.ours
    T = sum(LENGTHS)
    assert len(ours.expert_ids_LTK) == len(pair.ref.ids_LTK) == cfg.n_moe_layers
    assert ours.expert_load_LE.shape == (cfg.n_moe_layers, cfg.n_routed_experts)
    for l, (ids_TK, ref_TK) in enumerate(zip(ours.expert_ids_LTK, pair.ref.ids_LTK)):
        assert ids_TK.shape == ref_TK.shape == (T, cfg.num_experts_per_tok)
        mismatch = (ids_TK.sort(dim=1).values != ref_TK.sort(dim=1).values).any(dim=1)
        assert not mismatch.any(), f"MoE layer {l}: tokens {mismatch.nonzero()[:, 0].tolist()} differ"
        # every chosen expert is distinct, and the load counts exactly those rows
        assert (ids_TK.sort(dim=1).values.diff(dim=1) != 0).all()
        assert torch.equal(ours.expert_load_LE[l], torch.bincount(ref_TK.flatten(), minlength=cfg.n_routed_experts))


def test_routing_is_not_trivial(pair: Pair):
    """Guards the routing comparison's teeth: the bias and the group limit must actually change some
    choices, and several experts must be used, or matching transformers would prove little."""
    cfg = pair.cfg
    if cfg.n_moe_layers == 0:
        pytest.skip("no MoE layer")
    gates = moe_gates(pair.hf)
    bias_moved = group_moved = False
    for l, (ref_TK, logits_TE) in enumerate(zip(pair.ref.ids_LTK, pair.ref.logits_LTE)):
        assert ref_TK.unique().numel() >= min(cfg.n_routed_experts, 4), f"MoE layer {l} uses few experts"
        scores_TE = logits_TE.sigmoid()
        plain_TK = scores_TE.topk(cfg.num_experts_per_tok, dim=1).indices.sort(dim=1).values
        biased_TK = (scores_TE + gates[l].e_score_correction_bias).topk(cfg.num_experts_per_tok, dim=1)
        biased_TK = biased_TK.indices.sort(dim=1).values
        chosen_TK = ref_TK.sort(dim=1).values
        bias_moved |= bool((plain_TK != biased_TK).any())
        group_moved |= bool((biased_TK != chosen_TK).any())
    assert bias_moved, "e_score_correction_bias never changed a choice"
    if cfg.topk_group < cfg.n_group:
        assert group_moved, "the group limit never changed a choice"


def test_activations_path_matches_hf_inputs_embeds(pair: Pair):
    """Batch(embeds_BSD=...) skips the embedding table, as transformers' inputs_embeds does."""
    D = pair.cfg.hidden_size
    gen = torch.Generator().manual_seed(7)
    embeds_BSD = torch.randn(len(LENGTHS), S, D, generator=gen) * 0.5
    ours = run_ours(pair.front, pair.experts, Batch(torch.tensor(LENGTHS), embeds_BSD=embeds_BSD))
    with torch.no_grad():
        for b, L in enumerate(LENGTHS):
            ref = pair.hf.model(inputs_embeds=embeds_BSD[b:b + 1, :L]).last_hidden_state[0]
            torch.testing.assert_close(ours.hidden_BSD[b, :L], ref, atol=ATOL, rtol=0,
                                       msg=f"sequence {b} (length {L})")


def test_padding_content_is_irrelevant(pair: Pair):
    """Changing what sits in the padding changes nothing at real positions (bitwise: same shapes,
    same kernels, only masked-out values differ)."""
    tokens_BS = pair.tokens_BS.clone()
    valid_BS = pair.batch.valid_BS
    tokens_BS[~valid_BS] = (tokens_BS[~valid_BS] + 1) % pair.cfg.vocab_size
    batch = Batch(pair.batch.lengths_B, tokens_BS=tokens_BS)
    ours = run_ours(pair.front, pair.experts, batch)
    assert torch.equal(ours.hidden_BSD[valid_BS], pair.ours.hidden_BSD[valid_BS])
    for a, b in zip(ours.expert_ids_LTK, pair.ours.expert_ids_LTK):
        assert torch.equal(a, b)


def test_latent_norms_use_default_eps(tmp_path):
    """Only the block norms and the final norm take rms_norm_eps.  A large eps makes a mix-up obvious
    (differences of 0.1 to 1 on the final hidden state instead of 1e-6)."""
    hf = make_hf({**CASES["v3-yarn-groups"], "rms_norm_eps": 1e-2}, seed=99)
    hf.save_pretrained(tmp_path)
    cfg, ckpt = ModelConfig.load(tmp_path), Checkpoint(tmp_path)
    assert cfg.rms_norm_eps == 1e-2
    front, experts = build_front(cfg, checkpoint=ckpt), build_all_experts(cfg, checkpoint=ckpt)
    tokens_BS = torch.randint(0, cfg.vocab_size, (len(LENGTHS), S), generator=torch.Generator().manual_seed(5))
    ours = run_ours(front, experts, Batch(torch.tensor(LENGTHS), tokens_BS=tokens_BS))
    ref = run_hf(hf, tokens_BS, LENGTHS)
    for b, L in enumerate(LENGTHS):
        torch.testing.assert_close(ours.hidden_BSD[b, :L], ref.hidden[b], atol=ATOL, rtol=0)


# --- bf16 smoke ----------------------------------------------------------------------------------------

def test_bf16_close_to_hf_bf16(tmp_path):
    """Same checkpoint in bf16 on both sides.  transformers is loaded with from_pretrained(dtype=bf16),
    which keeps the router in fp32 as we do; ``model.to(torch.bfloat16)`` would also round the router
    weight and flip some expert choices (log-probs then differ by up to ~0.25), comparing two different
    routings rather than two implementations.  On CPU the two bf16 runs currently agree bitwise; the
    bound stays loose because other expert kernels may round differently.  Guard against a vacuous pass:
    the bf16 run must really differ from fp32, by about as much as transformers' bf16 run does."""
    name = "v3-yarn-groups"
    hf = make_hf(CASES[name], seed=1000)
    hf.save_pretrained(tmp_path)
    hf16 = DeepseekV3ForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    # transformers keeps the router in fp32 (_keep_in_fp32_modules_strict), as we do
    assert hf16.model.layers[1].mlp.gate.weight.dtype == torch.float32
    assert hf16.lm_head.weight.dtype == torch.bfloat16

    cfg, ckpt = ModelConfig.load(tmp_path), Checkpoint(tmp_path)
    front16 = build_front(cfg, checkpoint=ckpt, dtype=torch.bfloat16)
    experts16 = build_all_experts(cfg, checkpoint=ckpt, dtype=torch.bfloat16)
    assert front16.dtype == torch.bfloat16 and experts16[0][0].up_proj.weight.dtype == torch.bfloat16
    assert front16.model.layers[1].mlp.gate.weight.dtype == torch.float32

    gen = torch.Generator().manual_seed(3)
    tokens_BS = torch.randint(0, cfg.vocab_size, (len(LENGTHS), S), generator=gen)
    batch = Batch(torch.tensor(LENGTHS), tokens_BS=tokens_BS)
    res16 = run_ours(front16, experts16, batch)
    assert res16.hidden_BSD.dtype == torch.bfloat16
    with torch.no_grad():
        lp16_BS = front16.logprobs(res16.hidden_BSD, batch)
    ref16 = run_hf(hf16, tokens_BS, LENGTHS)
    ref32 = run_hf(hf, tokens_BS, LENGTHS)

    ours = torch.cat([lp16_BS[b, 1:L] for b, L in enumerate(LENGTHS)])
    theirs = torch.cat(ref16.logprobs)
    exact = torch.cat(ref32.logprobs)
    assert torch.isfinite(ours).all()
    err = (ours - theirs).abs()
    assert err.max() < 0.1, f"bf16 log-probs differ from transformers' bf16 by up to {err.max():.3f}"
    assert err.mean() < 0.03
    # honest: bf16 really is lower precision here, and both bf16 runs err by a similar amount
    assert (ours - exact).abs().mean() > 1e-3
    assert (ours - exact).abs().mean() < 3 * (theirs - exact).abs().mean() + 1e-3


# --- softmax scoring (DeepSeek-V2) ---------------------------------------------------------------------

@pytest.mark.parametrize("topk_method", ["greedy", "group_limited_greedy"])
def test_softmax_router_matches_deepseek_v2(topk_method):
    D, E, K, G, TG, scale = 24, 16, 4, 4, 2, 1.5
    cfg = ModelConfig(hidden_size=D, n_routed_experts=E, num_experts_per_tok=K, n_group=G, topk_group=TG,
                      scoring_func="softmax", topk_method=topk_method, norm_topk_prob=False,
                      routed_scaling_factor=scale)
    v2cfg = DeepseekV2Config(hidden_size=D, num_attention_heads=4, n_routed_experts=E,
                             num_experts_per_tok=K, n_group=G, topk_group=TG, topk_method=topk_method,
                             norm_topk_prob=False, routed_scaling_factor=scale)
    gen = torch.Generator().manual_seed(11)
    weight_ED = torch.randn(E, D, generator=gen) * 0.5
    h_TD = torch.randn(200, D, generator=gen)

    ours, ref = Router(cfg), DeepseekV2TopkRouter(v2cfg)
    with torch.no_grad():
        ours.weight.copy_(weight_ED)
        ours.e_score_correction_bias.normal_(0, 1.0, generator=gen)  # must be ignored without noaux_tc
        ref.weight.copy_(weight_ED)
        w_TK, ids_TK = ours(h_TD)
        _, ref_w_TK, ref_ids_TK = ref(h_TD)

    ids_sorted, perm = ids_TK.sort(dim=1)
    ref_sorted, ref_perm = ref_ids_TK.sort(dim=1)
    assert torch.equal(ids_sorted, ref_sorted)
    torch.testing.assert_close(w_TK.gather(1, perm), ref_w_TK.gather(1, ref_perm), atol=1e-6, rtol=0)
    if topk_method == "group_limited_greedy":
        # the group limit must have bitten for the comparison to test it
        plain = h_TD @ weight_ED.t()
        plain_ids = plain.softmax(-1).topk(K, dim=1).indices.sort(dim=1).values
        assert (plain_ids != ids_sorted).any()
        groups_TK = ids_TK // (E // G)
        assert all(len(set(row)) <= TG for row in groups_TK.tolist())


def test_stacked_gate_and_up_weights_change_nothing_but_storage():
    """``MLP.stack_gate_up_`` (what the loader does on CUDA) keeps names, shapes, values and outputs:
    gate and up become the two halves of one (2F, D) tensor, which ``kernels.stacked`` finds, and a
    later ``load_state_dict`` writes through into it; unrelated or separate tensors are not taken for it."""
    from moe_mpi.model import kernels
    from moe_mpi.model.layers import MLP
    torch.manual_seed(1)
    mlp = MLP(24, 40).requires_grad_(False)
    x = torch.randn(3, 5, 24)
    before = {k: v.clone() for k, v in mlp.state_dict().items()}
    want = mlp(x)
    assert kernels.stacked(mlp.gate_proj.weight, mlp.up_proj.weight) is None
    mlp.stack_gate_up_()
    both = kernels.stacked(mlp.gate_proj.weight, mlp.up_proj.weight)
    assert both is not None and both.shape == (80, 24)
    assert torch.equal(both, torch.cat([before["gate_proj.weight"], before["up_proj.weight"]]))
    assert list(mlp.state_dict()) == list(before)
    assert all(torch.equal(before[k], v) for k, v in mlp.state_dict().items())
    assert torch.equal(mlp(x), want)
    fresh = {k: torch.randn_like(v) for k, v in before.items()}
    mlp.load_state_dict(fresh)
    assert torch.equal(kernels.stacked(mlp.gate_proj.weight, mlp.up_proj.weight),
                       torch.cat([fresh["gate_proj.weight"], fresh["up_proj.weight"]]))
    mlp.stack_gate_up_()                                    # a second call leaves it as it is
    assert kernels.stacked(mlp.gate_proj.weight, mlp.up_proj.weight) is not None
    whole = torch.randn(80, 24)
    assert kernels.stacked(whole[40:], whole[:40]) is None  # the wrong order
    assert kernels.stacked(whole[:40], whole[40:]) is not None
    assert kernels.stacked(whole[:40, :12], whole[40:, :12]) is None   # not contiguous
