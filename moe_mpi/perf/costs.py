"""FLOP, byte and memory counts of the model's pieces.  Pure arithmetic on a ModelConfig, no timing.

A matmul of a (T, n) input by an (n, m) weight costs 2*T*n*m FLOP (one multiply and one add) and reads
the n*m weights once per call, whatever T is.  Norms, rotary, SiLU and softmax are a few FLOP per
element: they are counted as memory traffic of activations, not as FLOP.

Shape letters: T tokens of a micro-batch, S sequence length, D model dim, H heads, E experts, K top-k,
V vocabulary, I MLP hidden size.  ``b`` is bytes per element of the run's dtype.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config import ModelConfig

ROUTER_BYTES = 4        # the router's weights and scores are fp32 (routing.Router), whatever the dtype
COUNT_BYTES = 8         # one int64 row count travels ahead of each message's payload
LOGIT_ROWS = 1024       # rows per slice of the vocabulary softmax (FrontModel.logprobs)


@dataclass(frozen=True)
class Piece:
    """One piece of work run by one rank: its FLOP, the bytes it moves through memory, its op count."""
    name: str
    flops: float
    weight_bytes: float         # read once per call, independent of the number of tokens
    act_bytes: float            # activations written and read
    n_ops: int                  # kernels launched (each pays the hardware's fixed op overhead)

    @property
    def bytes(self) -> float:
        return self.weight_bytes + self.act_bytes

    def __add__(self, other: "Piece") -> "Piece":
        return Piece(f"{self.name}+{other.name}", self.flops + other.flops,
                     self.weight_bytes + other.weight_bytes, self.act_bytes + other.act_bytes,
                     self.n_ops + other.n_ops)


# --- parameter counts ---
def attention_proj_params(cfg: ModelConfig) -> int:
    """Weights of MLA's projections: q (low-rank or plain), kv_a, kv_b, o."""
    D, H = cfg.hidden_size, cfg.num_attention_heads
    if cfg.q_lora_rank is None:
        q = D * H * cfg.qk_head_dim
    else:
        q = D * cfg.q_lora_rank + cfg.q_lora_rank * H * cfg.qk_head_dim
    kv_a = D * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    kv_b = cfg.kv_lora_rank * H * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    o = H * cfg.v_head_dim * D
    return q + kv_a + kv_b + o


def norm_params(cfg: ModelConfig) -> int:
    """RMSNorm weights of one layer: input, post-attention, and MLA's latent norms."""
    q_norm = cfg.q_lora_rank or 0
    return 2 * cfg.hidden_size + q_norm + cfg.kv_lora_rank


def mlp_params(dim: int, hidden: int) -> int:
    """SwiGLU: gate and up (dim -> hidden), down (hidden -> dim)."""
    return 3 * dim * hidden


def expert_params(cfg: ModelConfig) -> int:
    return mlp_params(cfg.hidden_size, cfg.moe_intermediate_size)


def router_params(cfg: ModelConfig) -> int:
    return cfg.n_routed_experts * cfg.hidden_size + cfg.n_routed_experts     # weight + correction bias


def shared_expert_params(cfg: ModelConfig) -> int:
    return mlp_params(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)


def front_weight_bytes(cfg: ModelConfig, b: int) -> float:
    """Everything a front rank holds: embeddings, every layer's attention and norms, the dense MLPs, the
    routers and shared experts of the MoE layers, the final norm and the LM head."""
    L, L_moe = cfg.num_hidden_layers, cfg.n_moe_layers
    params = (2 * cfg.vocab_size * cfg.hidden_size + cfg.hidden_size
              + L * (attention_proj_params(cfg) + norm_params(cfg))
              + (L - L_moe) * mlp_params(cfg.hidden_size, cfg.intermediate_size)
              + L_moe * shared_expert_params(cfg))
    return params * b + L_moe * router_params(cfg) * ROUTER_BYTES


# --- per-call pieces ---
def _matmuls(name: str, T: float, shapes: list[tuple[int, int]], b: int, extra_act: float = 0.0,
             extra_ops: int = 0) -> Piece:
    """Plain matmuls (n -> m) applied to T rows: FLOP, weights once, inputs and outputs once each."""
    flops = sum(2.0 * T * n * m for n, m in shapes)
    weights = sum(n * m for n, m in shapes) * b
    acts = sum(T * (n + m) for n, m in shapes) * b + extra_act
    return Piece(name, flops, float(weights), float(acts), len(shapes) + extra_ops)


def attention_score_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """The S^2 part, averaged over a causal sequence of S tokens: token t attends to t+1 keys, so
    q.k (qk_head_dim) and p.v (v_head_dim) cost 2*H*(qk+v)*(t+1) FLOP; the mean of t+1 is (S+1)/2."""
    return cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * (seq_len + 1)


def attention(cfg: ModelConfig, T: float, seq_len: int, b: int) -> Piece:
    """MLA of one layer over T tokens in sequences of seq_len, with its input norm; no KV cache."""
    D, H = cfg.hidden_size, cfg.num_attention_heads
    if cfg.q_lora_rank is None:
        q_shapes = [(D, H * cfg.qk_head_dim)]
    else:
        q_shapes = [(D, cfg.q_lora_rank), (cfg.q_lora_rank, H * cfg.qk_head_dim)]
    shapes = q_shapes + [(D, cfg.kv_lora_rank + cfg.qk_rope_head_dim),
                         (cfg.kv_lora_rank, H * (cfg.qk_nope_head_dim + cfg.v_head_dim)),
                         (H * cfg.v_head_dim, D)]
    # Norms, rotary, the q/k concatenation and a fused (flash) attention read and write q, k, v, out
    # about twice each; the S x S scores never reach memory.
    qkv_out = H * (2 * cfg.qk_head_dim + 2 * cfg.v_head_dim)
    extra_act = 2.0 * T * (2 * D + qkv_out) * b
    proj = _matmuls("attention", T, shapes, b, extra_act, extra_ops=8)
    score = attention_score_flops_per_token(cfg, seq_len) * T
    return Piece("attention", proj.flops + score, proj.weight_bytes, proj.act_bytes, proj.n_ops)


def router(cfg: ModelConfig, T: float, b: int) -> Piece:
    """Gate scores (fp32), grouped top-k, and the dispatch permutation; plus the post-attention norm."""
    D, E, K = cfg.hidden_size, cfg.n_routed_experts, cfg.num_experts_per_tok
    flops = 2.0 * T * D * E
    acts = T * D * (ROUTER_BYTES + 2 * b) + 4.0 * T * E * ROUTER_BYTES + 2.0 * T * K * D * b   # + permute
    return Piece("router", flops, float(router_params(cfg) * ROUTER_BYTES), acts, 12)


def mlp(name: str, dim: int, hidden: int, T: float, b: int) -> Piece:
    """SwiGLU over T rows; silu(gate) * up writes and reads the (T, hidden) intermediates once more."""
    return _matmuls(name, T, [(dim, hidden), (dim, hidden), (hidden, dim)], b,
                    extra_act=3.0 * T * hidden * b, extra_ops=2)


def dense_mlp(cfg: ModelConfig, T: float, b: int) -> Piece:
    return mlp("dense_mlp", cfg.hidden_size, cfg.intermediate_size, T, b)


def shared_experts(cfg: ModelConfig, T: float, b: int) -> Piece:
    if cfg.n_shared_experts == 0:
        return Piece("shared_experts", 0.0, 0.0, 0.0, 0)
    return mlp("shared_experts", cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts, T, b)


def expert(cfg: ModelConfig, rows: float, b: int) -> Piece:
    """One routed expert over the rows it received in one step.

    Memory traffic is the weights plus the rows in and out.  The (rows, I) intermediates are left out:
    at the few hundred rows where the memory term matters they fit in the card's L2, and the
    description's roofline (and the 0.22 ms flat expert time measured on H200) is weights only.
    """
    D, I = cfg.hidden_size, cfg.moe_intermediate_size
    return Piece("expert", 2.0 * rows * mlp_params(D, I), float(mlp_params(D, I) * b),
                 2.0 * rows * D * b, 5)


def combine(cfg: ModelConfig, T: float, b: int) -> Piece:
    """Unpermute the K answers per token and sum them with the gate weights (fp32), add the residual."""
    K, D = cfg.num_experts_per_tok, cfg.hidden_size
    return Piece("combine", 2.0 * T * K * D, 0.0, T * K * D * (b + 4) + 3.0 * T * D * b, 4)


def embed(cfg: ModelConfig, T: float, b: int) -> Piece:
    return Piece("embed", 0.0, 0.0, 2.0 * T * cfg.hidden_size * b, 1)


def lm_head(cfg: ModelConfig, T: float, b: int) -> Piece:
    """Final norm, logits in slices of LOGIT_ROWS rows, fp32 log-softmax and gather.  The head's weights
    are read once per slice; the fp32 logits are written once and read twice (max, then sum).  That is
    torch's path; on CUDA one kernel reads the bf16 logits once (``front_kernels.token_logprobs``), so the
    bytes here bound it from above (the head's product dominates at paper width either way)."""
    D, V = cfg.hidden_size, cfg.vocab_size
    slices = max(1.0, -(-T // LOGIT_ROWS))
    return Piece("lm_head", 2.0 * T * D * V, slices * D * V * b,
                 2.0 * T * D * b + 3.0 * T * V * 4, int(4 * slices) + 1)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
    """Useful FLOP of one token through the model, on the fronts and on the experts (K of each layer)."""
    L, L_moe, b = cfg.num_hidden_layers, cfg.n_moe_layers, 2        # b does not change FLOP
    front = (L * attention(cfg, 1, seq_len, b).flops + (L - L_moe) * dense_mlp(cfg, 1, b).flops
             + L_moe * (router(cfg, 1, b).flops + shared_experts(cfg, 1, b).flops + combine(cfg, 1, b).flops)
             + lm_head(cfg, 1, b).flops)
    experts = L_moe * cfg.num_experts_per_tok * expert(cfg, 1, b).flops
    return {"front": front, "experts": experts, "total": front + experts}


# --- messages ---
def message_bytes(cfg: ModelConfig, rows: float, b: int) -> float:
    """Payload of rows (T*K routed rows, or what one expert answers) plus the count that travels first.
    bf16 travels as raw 16-bit words: b bytes per element, no conversion."""
    return rows * cfg.hidden_size * b + COUNT_BYTES


# --- memory per rank ---
def front_memory_bytes(cfg: ModelConfig, T: int, in_flight: int, b: int) -> dict[str, float]:
    """Weights, plus activations: each in-flight micro-batch keeps its residual stream and its dispatch
    send and receive buffers (T*K rows each); one at a time runs a layer, whose largest working set is
    attention's q, k, v (or the dense MLP's hidden), and the head's fp32 logits slice."""
    D, K, H = cfg.hidden_size, cfg.num_experts_per_tok, cfg.num_attention_heads
    per_mb = T * D * b * 2 + 2 * T * K * D * b
    qkv = T * H * (2 * cfg.qk_head_dim + 2 * cfg.v_head_dim) * b
    mlp_hidden = 3 * T * max(cfg.intermediate_size, cfg.moe_intermediate_size * cfg.n_shared_experts) * b
    logits = 2 * min(T, LOGIT_ROWS) * cfg.vocab_size * 4
    weights = front_weight_bytes(cfg, b)
    acts = in_flight * per_mb + max(qkv, mlp_hidden) + logits
    return {"weights": weights, "activations": float(acts), "total": weights + acts}


EXPERT_STEPS_BUFFERED = 2  # an expert receives step s+1 while it computes step s; later senders wait


def expert_memory_bytes(cfg: ModelConfig, rows: float, experts_per_rank: int, b: int) -> dict[str, float]:
    """k experts' weights; receive and send buffers of ``rows`` rows per expert for two steps; and one
    MLP's working set (gate, up and their product: 3 x rows x I) for the expert running now."""
    D, I = cfg.hidden_size, cfg.moe_intermediate_size
    weights = experts_per_rank * expert_params(cfg) * b
    acts = EXPERT_STEPS_BUFFERED * experts_per_rank * 2 * rows * D * b + 3 * rows * I * b
    return {"weights": float(weights), "activations": float(acts), "total": float(weights + acts)}
