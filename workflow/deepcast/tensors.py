"""Every weight tensor of a model, from its shape alone: what size predictions and parameter counts need.

Two namings of the same weights: llama.cpp's GGUF tensors (as convert_hf_to_gguf.py writes them,
dimensions in ggml order, ne0 first = the row width a quant type's block must divide) and the
transformers checkpoint's (out_features, in_features) Linear weights that llm-compressor quantizes.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from math import prod

from deepcast.errors import DeepcastError
from deepcast.registry import ModelShape

# transformers architecture -> llama.cpp architecture (convert_hf_to_gguf.py's model classes).
LLAMA_CPP_ARCH = {
    "DeepseekV3ForCausalLM": "deepseek2",
    "DeepseekV2ForCausalLM": "deepseek2",
    "Qwen2ForCausalLM": "qwen2",
    "LlamaForCausalLM": "llama",
}


@dataclass(frozen=True)
class Tensor:
    name: str
    dims: tuple[int, ...]  # GGUF: ne0 first; checkpoint: (out_features, in_features)
    linear: bool = False  # a Linear weight llm-compressor quantizes (checkpoint naming only)
    count: int = 1  # identical tensors it stands for (a checkpoint's routed experts, one per expert)

    @property
    def numel(self) -> int:
        return prod(self.dims) * self.count


def llama_cpp_arch(architecture: str) -> str:
    if architecture not in LLAMA_CPP_ARCH:
        raise DeepcastError(
            f"architecture {architecture} is not one deepcast plans for. "
            f"Fix: use a model of {', '.join(sorted(LLAMA_CPP_ARCH))}."
        )
    return LLAMA_CPP_ARCH[architecture]


def _is_moe_layer(shape: ModelShape, layer: int) -> bool:
    return shape.is_moe and layer >= shape.first_dense_layers


@cache
def gguf_tensors(architecture: str, shape: ModelShape) -> tuple[Tensor, ...]:
    """The tensors convert_hf_to_gguf.py writes for the main model (multi-token-prediction layers are skipped)."""
    arch = llama_cpp_arch(architecture)
    h = shape.hidden
    tensors = [Tensor("token_embd.weight", (h, shape.vocab)), Tensor("output_norm.weight", (h,))]
    if not shape.tied_embeddings:
        tensors.append(Tensor("output.weight", (h, shape.vocab)))
    for i in range(shape.layers):
        blk = f"blk.{i}."
        layer = [Tensor(blk + "attn_norm.weight", (h,)), Tensor(blk + "ffn_norm.weight", (h,))]
        if arch == "deepseek2":
            qk = shape.qk_nope_head_dim + shape.qk_rope_head_dim
            if shape.q_lora_rank:
                layer += [
                    Tensor(blk + "attn_q_a.weight", (h, shape.q_lora_rank)),
                    Tensor(blk + "attn_q_a_norm.weight", (shape.q_lora_rank,)),
                    Tensor(blk + "attn_q_b.weight", (shape.q_lora_rank, shape.heads * qk)),
                ]
            else:
                layer.append(Tensor(blk + "attn_q.weight", (h, shape.heads * qk)))
            layer += [
                Tensor(blk + "attn_kv_a_mqa.weight", (h, shape.kv_lora_rank + shape.qk_rope_head_dim)),
                Tensor(blk + "attn_kv_a_norm.weight", (shape.kv_lora_rank,)),
                # kv_b is split per head into the absorbed K and V projections (MLA in llama.cpp)
                Tensor(blk + "attn_k_b.weight", (shape.qk_nope_head_dim, shape.kv_lora_rank, shape.heads)),
                Tensor(blk + "attn_v_b.weight", (shape.kv_lora_rank, shape.head_dim, shape.heads)),
                Tensor(blk + "attn_output.weight", (shape.heads * shape.head_dim, h)),
            ]
        else:
            q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
            layer += [
                Tensor(blk + "attn_q.weight", (h, q)),
                Tensor(blk + "attn_k.weight", (h, kv)),
                Tensor(blk + "attn_v.weight", (h, kv)),
                Tensor(blk + "attn_output.weight", (q, h)),
            ]
            if shape.attention_bias:
                layer += [Tensor(blk + f"attn_{n}.bias", (d,)) for n, d in (("q", q), ("k", kv), ("v", kv))]
        if _is_moe_layer(shape, i):
            n, f, s = shape.routed_experts, shape.moe_intermediate, shape.moe_intermediate * shape.shared_experts
            layer += [
                Tensor(blk + "ffn_gate_inp.weight", (h, n)),
                Tensor(blk + "ffn_gate_exps.weight", (h, f, n)),
                Tensor(blk + "ffn_up_exps.weight", (h, f, n)),
                Tensor(blk + "ffn_down_exps.weight", (f, h, n)),
            ]
            if architecture == "DeepseekV3ForCausalLM":  # the aux-loss-free router's bias
                layer.append(Tensor(blk + "exp_probs_b.bias", (n,)))
            if s:
                layer += [
                    Tensor(blk + "ffn_gate_shexp.weight", (h, s)),
                    Tensor(blk + "ffn_up_shexp.weight", (h, s)),
                    Tensor(blk + "ffn_down_shexp.weight", (s, h)),
                ]
        else:
            f = shape.intermediate
            layer += [
                Tensor(blk + "ffn_gate.weight", (h, f)),
                Tensor(blk + "ffn_up.weight", (h, f)),
                Tensor(blk + "ffn_down.weight", (f, h)),
            ]
        tensors += layer
    return tuple(tensors)


@cache
def checkpoint_tensors(architecture: str, shape: ModelShape) -> tuple[Tensor, ...]:
    """The transformers checkpoint's tensors of the main model; Linear weights marked (lm_head and routers aside)."""
    arch = llama_cpp_arch(architecture)
    h = shape.hidden
    tensors = [Tensor("model.embed_tokens.weight", (shape.vocab, h)), Tensor("model.norm.weight", (h,))]
    if not shape.tied_embeddings:
        tensors.append(Tensor("lm_head.weight", (shape.vocab, h)))

    def linear(name: str, out_features: int, in_features: int, count: int = 1) -> Tensor:
        return Tensor(name + ".weight", (out_features, in_features), linear=True, count=count)

    for i in range(shape.layers):
        p = f"model.layers.{i}."
        layer = [Tensor(p + "input_layernorm.weight", (h,)), Tensor(p + "post_attention_layernorm.weight", (h,))]
        a = p + "self_attn."
        if arch == "deepseek2":
            qk = shape.qk_nope_head_dim + shape.qk_rope_head_dim
            if shape.q_lora_rank:
                layer += [
                    linear(a + "q_a_proj", shape.q_lora_rank, h),
                    Tensor(a + "q_a_layernorm.weight", (shape.q_lora_rank,)),
                    linear(a + "q_b_proj", shape.heads * qk, shape.q_lora_rank),
                ]
            else:
                layer.append(linear(a + "q_proj", shape.heads * qk, h))
            layer += [
                linear(a + "kv_a_proj_with_mqa", shape.kv_lora_rank + shape.qk_rope_head_dim, h),
                Tensor(a + "kv_a_layernorm.weight", (shape.kv_lora_rank,)),
                linear(a + "kv_b_proj", shape.heads * (shape.qk_nope_head_dim + shape.head_dim), shape.kv_lora_rank),
                linear(a + "o_proj", h, shape.heads * shape.head_dim),
            ]
        else:
            q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
            layer += [linear(a + "q_proj", q, h), linear(a + "k_proj", kv, h), linear(a + "v_proj", kv, h)]
            layer.append(linear(a + "o_proj", h, q))
            if shape.attention_bias:
                layer += [Tensor(a + f"{n}_proj.bias", (d,)) for n, d in (("q", q), ("k", kv), ("v", kv))]
        m = p + "mlp."
        if _is_moe_layer(shape, i):
            f = shape.moe_intermediate
            layer.append(Tensor(m + "gate.weight", (shape.routed_experts, h)))
            if architecture == "DeepseekV3ForCausalLM":
                layer.append(Tensor(m + "gate.e_score_correction_bias", (shape.routed_experts,)))
            x, n = f"{m}experts.{shape.routed_experts - 1}.", shape.routed_experts  # one entry for all n
            layer += [
                linear(x + "gate_proj", f, h, n),
                linear(x + "up_proj", f, h, n),
                linear(x + "down_proj", h, f, n),
            ]
            if shape.shared_experts:
                s, x = f * shape.shared_experts, m + "shared_experts."
                layer += [linear(x + "gate_proj", s, h), linear(x + "up_proj", s, h), linear(x + "down_proj", h, s)]
        else:
            f = shape.intermediate
            layer += [linear(m + "gate_proj", f, h), linear(m + "up_proj", f, h), linear(m + "down_proj", h, f)]
        tensors += layer
    return tuple(tensors)


@cache
def parameter_count(architecture: str, shape: ModelShape) -> int:
    """Parameters of the main model (what '671B' counts: multi-token-prediction layers aside)."""
    return sum(t.numel for t in checkpoint_tensors(architecture, shape))


@cache
def mtp_parameter_count(architecture: str, shape: ModelShape) -> int:
    """Parameters the hub checkpoint adds for its multi-token-prediction layers (DeepSeek-V3: 14B of 685B):
    one MoE decoder layer, the 2h x h projection, and its own embedding and head copies."""
    if not shape.mtp_layers:
        return 0
    h = shape.hidden
    last = f"model.layers.{shape.layers - 1}."
    one_layer = sum(t.numel for t in checkpoint_tensors(architecture, shape) if t.name.startswith(last))
    per_mtp = one_layer + 2 * h * h + 2 * shape.vocab * h + 3 * h
    return shape.mtp_layers * per_mtp
