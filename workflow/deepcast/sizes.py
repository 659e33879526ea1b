"""Artifact sizes from a model's shape, before anything is downloaded.

GGUF: the type llama-quantize gives each tensor, ported from llama.cpp 0.3.36's
src/llama-quant.cpp (llama_tensor_get_type_impl, tensor_type_fallback), times the
bytes per block of that type (ggml-common.h), plus the tokenizer metadata.
compressed-tensors: the packed weights, scales and shape tensors llm-compressor
writes for each quantized Linear, plus the 16-bit tensors it leaves alone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from deepcast.registry import ModelShape
from deepcast.tensors import Tensor, checkpoint_tensors, gguf_tensors, llama_cpp_arch

# (elements per block, bytes per block): ggml-common.h block structs (checked against gguf-py's
# GGML_QUANT_SIZES by a test).
GGML_BLOCK = {
    "F32": (1, 4), "F16": (1, 2), "BF16": (1, 2),
    "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q8_0": (32, 34),
    "Q2_K": (256, 84), "Q3_K": (256, 110), "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210),
    "IQ2_XXS": (256, 66), "IQ2_XS": (256, 74), "IQ2_S": (256, 82), "IQ3_XXS": (256, 98), "IQ3_S": (256, 110),
    "IQ1_S": (256, 50), "IQ1_M": (256, 56), "IQ4_NL": (32, 18), "IQ4_XS": (256, 136),
}  # fmt: skip

# llama-quantize file types -> the default tensor type (llama_ftype_get_default_type).
FTYPE_DEFAULT = {
    "F32": "F32", "F16": "F16", "BF16": "BF16", "Q8_0": "Q8_0", "Q4_0": "Q4_0", "Q4_1": "Q4_1",
    "Q5_0": "Q5_0", "Q5_1": "Q5_1", "Q6_K": "Q6_K", "Q5_K_M": "Q5_K", "Q5_K_S": "Q5_K",
    "Q4_K_M": "Q4_K", "Q4_K_S": "Q4_K", "Q3_K_L": "Q3_K", "Q3_K_M": "Q3_K", "Q3_K_S": "Q3_K",
    "Q2_K": "Q2_K", "Q2_K_S": "Q2_K", "IQ4_NL": "IQ4_NL", "IQ4_XS": "IQ4_XS", "IQ3_M": "IQ3_S",
    "IQ3_S": "IQ3_S", "IQ3_XS": "IQ3_S", "IQ3_XXS": "IQ3_XXS", "IQ2_M": "IQ2_S", "IQ2_S": "IQ2_XS",
    "IQ2_XS": "IQ2_XS", "IQ2_XXS": "IQ2_XXS", "IQ1_M": "IQ1_M", "IQ1_S": "IQ1_S",
}  # fmt: skip
IQ_LOW = {"IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M"}
# A 256-block type on rows it does not divide falls back to a 32-block type (tensor_type_fallback).
FALLBACK = {
    "IQ1_S": "IQ4_NL", "IQ1_M": "IQ4_NL", "IQ2_XXS": "IQ4_NL", "IQ2_XS": "IQ4_NL", "IQ2_S": "IQ4_NL",
    "IQ3_XXS": "IQ4_NL", "IQ3_S": "IQ4_NL", "IQ4_XS": "IQ4_NL", "Q2_K": "Q4_0", "Q3_K": "Q4_0",
    "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0",
}  # fmt: skip
# [D] GGUF metadata per vocabulary entry: the token string with its 8-byte length, its int32 type,
# and about as many BPE merges. Measured 40.5 bytes on the DeepSeek-V3 tokenizer (tiny model's GGUFs).
METADATA_BYTES_PER_TOKEN = 40.5
GGUF_FIXED_BYTES = 8192  # [D] header, hyperparameters, tensor infos' slack and alignment


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name == "token_embd.weight":
        return "token_embd"
    for key, category in (
        ("attn_qkv.weight", "attn_qkv"), ("attn_kv_b.weight", "attn_kv_b"), ("attn_v.weight", "attn_v"),
        ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"), ("attn_output.weight", "attn_output"),
        ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down"),
    ):  # fmt: skip
        if key in name:
            return category
    return "other"


def _quantizable(tensor: Tensor) -> bool:
    name = tensor.name
    return (
        len(tensor.dims) >= 2
        and name.endswith("weight")
        and "_norm.weight" not in name
        and "ffn_gate_inp.weight" not in name
    )


@dataclass
class _State:
    """quantize_state_impl: the counters llama-quantize keeps while it walks the tensors."""

    n_expert: int
    n_gqa: int
    n_layer: int
    is_70b: bool
    has_imatrix: bool
    tied: bool
    n_attention_wv: int
    i_attention_wv: int = 0
    i_ffn_down: int = 0
    i_ffn_gate: int = 0
    i_ffn_up: int = 0


def _layer(state: _State, counter: int, name: str) -> int:
    """llama.cpp takes the layer from the name for MoE models and from a running counter otherwise."""
    if state.n_expert > 1:
        return int(re.match(r"blk\.(\d+)\.", name).group(1))
    return counter


def _mixture_type(s: _State, new: str, tensor: Tensor, ftype: str, category: str) -> str:
    """llama_tensor_get_type_impl for the types deepcast offers (Falcon and MXFP4 branches left out)."""
    if category == "output" or (s.tied and category == "token_embd"):
        if tensor.dims[0] % GGML_BLOCK[new][0]:
            return "Q8_0"
        if ftype in IQ_LOW or ftype == "IQ3_XXS":
            return "Q5_K"
        return new if new == "Q8_0" else "Q6_K"
    if category == "token_embd":
        if ftype in ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ1_M"):
            return "Q2_K"
        if ftype in ("IQ2_S", "IQ2_M", "IQ3_XXS"):
            return "IQ3_S"
        return new
    attn_v = category in ("attn_v", "attn_qkv", "attn_kv_b")
    if ftype in IQ_LOW:
        if attn_v:
            s.i_attention_wv += 1
            if s.n_gqa >= 4 or s.n_expert >= 4:
                return "Q4_K"
            return "IQ3_S" if ftype in ("IQ2_S", "IQ2_M") else "Q2_K"
        if s.n_expert == 8 and category == "attn_k":
            return "Q4_K"
        if category == "ffn_down":
            if s.i_ffn_down < s.n_layer // 8:
                new = "IQ3_S" if ftype in ("IQ2_S", "IQ2_M") else "Q2_K"
            s.i_ffn_down += 1
            return new
        if category == "attn_output":
            if s.n_expert == 8:
                return "Q5_K"
            if ftype in ("IQ1_S", "IQ1_M"):
                return "IQ2_XXS"
            if ftype in ("IQ2_S", "IQ2_M"):
                return "IQ3_S"
        return new
    if attn_v:
        i, n = s.i_attention_wv, s.n_attention_wv
        if ftype == "Q2_K":
            new = "Q4_K" if s.n_gqa >= 4 else "Q3_K"
        elif ftype == "Q2_K_S" and s.n_gqa >= 4:
            new = "Q4_K"
        elif ftype == "IQ3_XXS":
            new = "Q4_K" if s.n_gqa >= 4 else ("IQ3_S" if not s.has_imatrix else "IQ3_XXS")
        elif (ftype in ("IQ3_XS", "IQ3_S") and s.n_gqa >= 4) or ftype == "IQ3_M":
            new = "Q4_K"
        elif ftype == "Q3_K_M":
            new = "Q5_K" if i < 2 else "Q4_K"
        elif ftype == "Q3_K_L" or (ftype in ("IQ4_NL", "IQ4_XS") and s.n_gqa >= 4):
            new = "Q5_K"
        elif ftype in ("Q4_K_M", "Q5_K_M") and _use_more_bits(i, n):
            new = "Q6_K"
        elif ftype == "Q4_K_S" and i < 4:
            new = "Q5_K"
        if s.is_70b and new in ("Q3_K", "Q4_K"):
            new = "Q5_K"
        if s.n_expert == 8:
            new = "Q8_0"
        s.i_attention_wv += 1
        return new
    if category == "attn_k":
        if s.n_expert == 8:
            return "Q8_0"
        return {"IQ3_XS": "IQ3_XXS", "IQ3_XXS": "IQ2_S"}.get(ftype, new)
    if category == "attn_q":
        return {"IQ3_XS": "IQ3_XXS", "IQ3_XXS": "IQ2_S"}.get(ftype, new)
    if category == "ffn_down":
        i, n = _layer(s, s.i_ffn_down, tensor.name), s.n_layer
        if ftype == "Q2_K":
            new = "Q3_K"
        elif ftype == "Q2_K_S":
            new = "Q4_K" if i < n // 8 else new
        elif ftype == "IQ3_XXS" and not s.has_imatrix:
            new = "Q4_K" if i < n // 8 else "Q3_K"
        elif ftype == "Q3_K_M":
            new = "Q5_K" if i < n // 16 else "Q4_K"
        elif ftype == "IQ3_M" and (i < n // 8 or (s.n_expert == 8 and _use_more_bits(i, n))):
            new = "Q4_K"
        elif ftype == "Q3_K_L":
            new = "Q5_K"
        elif ftype == "Q4_K_M":
            new = "Q6_K" if _use_more_bits(i, n) else new
        elif i < n // 8 and ftype in ("IQ4_NL", "IQ4_XS") and not s.has_imatrix:
            new = "Q5_K"
        elif ftype == "Q5_K_M" and _use_more_bits(i, n):
            new = "Q6_K"
        elif ftype == "Q4_K_S" and i < n // 8:
            new = "Q5_K"
        elif ftype in ("Q4_0", "Q5_0") and s.has_imatrix and i < n // 8:
            new = "Q4_1" if ftype == "Q4_0" else "Q5_1"
        s.i_ffn_down += 1
        return new
    if category == "attn_output":
        if s.n_expert == 8:
            eight = {"Q2_K", "IQ3_XS", "IQ3_XXS", "Q3_K_S", "Q3_K_M", "IQ4_NL", "Q4_K_S", "Q4_K_M", "IQ3_S", "IQ3_M"}
            return "Q5_K" if ftype in eight | {"IQ4_XS"} else new
        return {"Q2_K": "Q3_K", "IQ3_XXS": "IQ3_S", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K", "IQ3_M": "Q4_K"}.get(ftype, new)
    if category == "attn_qkv":
        return {"Q3_K_M": "Q4_K", "Q3_K_L": "Q4_K", "IQ3_M": "Q4_K", "Q4_K_M": "Q5_K", "Q5_K_M": "Q6_K"}.get(ftype, new)
    if category in ("ffn_gate", "ffn_up"):
        counter = "i_ffn_gate" if category == "ffn_gate" else "i_ffn_up"
        i, n = _layer(s, getattr(s, counter), tensor.name), s.n_layer
        if ftype == "IQ3_XS" and n // 8 <= i < 7 * n // 8:
            new = "IQ3_XXS"
        setattr(s, counter, getattr(s, counter) + 1)
    return new


def _fallback(tensor: Tensor, qtype: str) -> str:
    columns = tensor.dims[0]
    if columns % GGML_BLOCK[qtype][0] == 0:
        return qtype
    fallback = FALLBACK.get(qtype, qtype)
    return fallback if columns % GGML_BLOCK[fallback][0] == 0 else "F16"


def _source_type(tensor: Tensor, sixteen_bit: str) -> str:
    """What convert_hf_to_gguf.py writes: 1-D tensors, norms and routers in F32, the rest 16-bit."""
    if len(tensor.dims) < 2 or "ffn_gate_inp" in tensor.name or tensor.name.endswith("_norm.weight"):
        return "F32"
    return sixteen_bit


def tensor_bytes(tensor: Tensor, qtype: str) -> int:
    block, size = GGML_BLOCK[qtype]
    return tensor.numel // block * size


def gguf_tensor_types(
    architecture: str,
    shape: ModelShape,
    ftype: str,
    imatrix: bool = True,
    overrides: list[str] | None = None,
) -> dict[str, str]:
    """The type of every tensor in the GGUF that `llama-quantize --imatrix ... [--tensor-type ...] ftype` writes."""
    tensors = gguf_tensors(architecture, shape)
    if ftype in ("BF16", "F16", "F32"):
        return {t.name: _source_type(t, ftype) for t in tensors}
    default = FTYPE_DEFAULT[ftype]
    patterns = [(re.compile(p.partition("=")[0]), p.partition("=")[2].upper()) for p in overrides or []]
    state = _State(
        n_expert=shape.routed_experts,
        # llama.cpp stores MLA as one shared latent head (head_count_kv 1)
        n_gqa=shape.heads if shape.is_mla else shape.heads // shape.kv_heads,
        n_layer=shape.layers,
        is_70b=llama_cpp_arch(architecture) == "llama" and shape.layers == 80,
        has_imatrix=imatrix,
        tied=shape.tied_embeddings,
        n_attention_wv=sum(_category(t.name) in ("attn_v", "attn_qkv", "attn_kv_b") for t in tensors),
    )
    types = {}
    for tensor in tensors:
        if not _quantizable(tensor):
            types[tensor.name] = _source_type(tensor, "BF16")
            continue
        manual = next((qtype for pattern, qtype in patterns if pattern.search(tensor.name)), None)
        chosen = manual or _mixture_type(state, default, tensor, ftype, _category(tensor.name))
        types[tensor.name] = _fallback(tensor, chosen)
    return types


@dataclass(frozen=True)
class Size:
    """Predicted bytes of an artifact's weights, the routed experts' part of them, and the token embedding's
    (llama.cpp keeps `token_embd` in host memory whatever the offload: its rows are looked up on the CPU)."""

    total: int
    experts: int
    token_embd: int = 0

    @property
    def expert_share(self) -> float:
        return self.experts / self.total if self.total else 0.0


def _is_routed_expert(name: str) -> bool:
    return "_exps." in name or ".experts." in name


def gguf_size(
    architecture: str, shape: ModelShape, ftype: str, imatrix: bool = True, overrides: list[str] | None = None
) -> Size:
    """Predicted size of the GGUF file: tensor data plus tokenizer metadata."""
    types = gguf_tensor_types(architecture, shape, ftype, imatrix, overrides)
    data = experts = embedding = 0
    for tensor in gguf_tensors(architecture, shape):
        size = tensor_bytes(tensor, types[tensor.name])
        data += size
        experts += size if _is_routed_expert(tensor.name) else 0
        embedding += size if tensor.name == "token_embd.weight" else 0
    return Size(data + int(shape.vocab * METADATA_BYTES_PER_TOKEN) + GGUF_FIXED_BYTES, experts, embedding)


# compressed-tensors layouts per quantized Linear (out x in), as llm-compressor 0.14 saves them:
# pack-quantized W4A16: int32 weight_packed (8 values per int32), a bf16 weight_scale per group,
# int64 weight_shape[2]; int-quantized W8A8 and float-quantized FP8: one byte per weight and a bf16 scale
# per output channel. Everything else keeps its 16-bit dtype. onnx-int4 is the onnxruntime-genai
# builder's MatMulNBits with its default block of 32. nvfp4 (ModelOpt): 4-bit values with an FP8 scale per
# block of 16 and an FP32 second-level scale per tensor.
W4_GROUP = {"gptq-w4a16": 128, "awq-w4a16": 128, "rtn-w4a16": 128, "onnx-int4": 32}
NVFP4_BLOCK = 16
SAFETENSORS_ENTRY_BYTES = 64  # [D] JSON header bytes per tensor beside its name


def _linear_bytes(out_features: int, in_features: int, scheme: str) -> tuple[int, int]:
    """(bytes, tensors written) for one quantized Linear."""
    if scheme in W4_GROUP:
        groups = -(-in_features // W4_GROUP[scheme])
        return out_features * in_features // 2 + out_features * groups * 2 + 16, 3
    if scheme == "nvfp4":
        return out_features * in_features // 2 + out_features * -(-in_features // NVFP4_BLOCK) + 8, 4
    return out_features * in_features + out_features * 2, 2


def checkpoint_size(architecture: str, shape: ModelShape, scheme: str | None = None) -> Size:
    """Predicted safetensors bytes of the 16-bit checkpoint (scheme None) or of a quantized scheme."""
    total = experts = 0
    for tensor in checkpoint_tensors(architecture, shape):
        if scheme and tensor.linear:
            size, count = _linear_bytes(*tensor.dims, scheme)
            size, count = size * tensor.count, count * tensor.count
        else:
            size, count = tensor.numel * (4 if tensor.name.endswith("e_score_correction_bias") else 2), tensor.count
        size += count * (SAFETENSORS_ENTRY_BYTES + len(tensor.name) + 12)
        total += size
        experts += size if _is_routed_expert(tensor.name) else 0
    return Size(total, experts)
