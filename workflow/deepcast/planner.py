"""Memory arithmetic: where a model's weights and KV cache go on a target, and what context is left.

Every figure is written down with its source; [D] marks a figure derived here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from deepcast.errors import DeepcastError
from deepcast.registry import ModelShape, Target

GB = 1e9

# Whole-file bits per weight of llama.cpp's types on Llama-3.1-8B: tools/quantize/README.md
# (shared/reference/hardware.md D.1). Q4_0 from the perplexity scoreboard (same section).
GGUF_BITS_PER_WEIGHT = {
    "F32": 32.0,
    "BF16": 16.0005,
    "F16": 16.0005,
    "Q8_0": 8.5008,
    "Q6_K": 6.5633,
    "Q5_K_M": 5.7036,
    "Q5_K_S": 5.5704,
    "Q4_K_M": 4.8944,
    "Q4_K_S": 4.6672,
    "Q4_0": 4.64,
    "IQ4_NL": 4.6818,
    "IQ4_XS": 4.4597,
    "Q3_K_L": 4.2979,
    "Q3_K_M": 4.0,
    "Q3_K_S": 3.6429,
    "IQ3_M": 3.7628,
    "IQ3_XXS": 3.2548,
    "Q2_K": 3.1593,
    "Q2_K_S": 2.9697,
    "IQ2_M": 2.9294,
    "IQ2_XXS": 2.3824,
    "IQ1_M": 2.1460,
    "IQ1_S": 2.0042,
}
# Types whose quantizer needs an importance matrix (llama-quant.cpp, tensor_requires_imatrix).
NEEDS_IMATRIX = {"IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_S", "IQ1_M"}

KV_CACHE_BYTES = 2  # llama.cpp's default f16 K/V cache
# [D] per GPU: CUDA context (~0.3 GB) plus llama.cpp compute buffers (~0.5 GB at batch 512).
GPU_RUNTIME_OVERHEAD_GB = 0.8
# [D] host process, tokenizer and compute buffers on the CPU backend.
CPU_RUNTIME_OVERHEAD_GB = 0.5
# Leave headroom for the driver, fragmentation and the OS.
USABLE_FRACTION = 0.92
MIN_CONTEXT = 2048


def kv_bytes_per_token(shape: ModelShape) -> int:
    """MLA caches the latent and the rope key per layer; GQA caches K and V for every KV head."""
    if shape.is_mla:
        return shape.layers * (shape.kv_lora_rank + (shape.qk_rope_head_dim or 0)) * KV_CACHE_BYTES
    return 2 * shape.layers * shape.kv_heads * shape.head_dim * KV_CACHE_BYTES


@dataclass
class LlamaCppPlan:
    """llama-server placement for one GGUF on one target, with the arithmetic behind it."""

    gpu_layers: int
    tensor_split: list[float]
    experts_on_cpu: bool
    context: int
    threads: int
    weights_gb: float
    kv_bytes_per_token: int
    gpu_memory_gb: float  # per GPU, at the chosen context
    system_memory_gb: float
    notes: list[str] = field(default_factory=list)

    def server_flags(self) -> list[str]:
        flags = ["-ngl", str(self.gpu_layers), "-c", str(self.context), "-t", str(self.threads)]
        if self.tensor_split:
            flags += ["--tensor-split", ",".join(f"{share:g}" for share in self.tensor_split)]
        if self.experts_on_cpu:
            flags += ["-ot", "exps=CPU"]
        return flags

    def as_dict(self) -> dict:
        return {**asdict(self), "server_flags": self.server_flags()}


def plan_llama_cpp(
    shape: ModelShape, target: Target, weights_gb: float, expert_share: float, context_cap: int | None = None
) -> LlamaCppPlan:
    """Place a GGUF of `weights_gb` on `target`; `expert_share` is the routed experts' fraction of it.

    Order of preference: everything on the GPUs; attention and shared weights on the GPUs with the
    routed experts in system RAM (-ot exps=CPU); some layers on the GPUs; everything on the CPU.
    """
    kv = kv_bytes_per_token(shape)
    max_context = min(shape.max_context, context_cap or shape.max_context)
    ram = target.system_ram_gb * USABLE_FRACTION - CPU_RUNTIME_OVERHEAD_GB
    threads = target.cpu_cores

    def context_for(free_gb: float) -> int:
        return max(0, min(max_context, int(free_gb * GB / kv)))

    if target.gpu is None:
        context = context_for(ram - weights_gb)
        _require(context >= min(MIN_CONTEXT, max_context), weights_gb, ram, "system RAM", target)
        return LlamaCppPlan(
            0,
            [],
            False,
            context,
            threads,
            weights_gb,
            kv,
            0.0,
            weights_gb + context * kv / GB,
            ["CPU only: weights and KV cache in system RAM"],
        )

    gpu = target.gpu
    per_gpu = gpu.memory_gb * USABLE_FRACTION - GPU_RUNTIME_OVERHEAD_GB
    vram = per_gpu * gpu.count
    split = [1.0] * gpu.count if gpu.count > 1 else []
    layers = shape.layers + 1  # llama.cpp counts the output layer too

    context = context_for(vram - weights_gb)
    if context >= min(MIN_CONTEXT, max_context):
        return LlamaCppPlan(
            layers,
            split,
            False,
            context,
            threads,
            weights_gb,
            kv,
            (weights_gb + context * kv / GB) / gpu.count,
            CPU_RUNTIME_OVERHEAD_GB,
            [f"all layers on {gpu.count} GPU(s)"],
        )

    experts_gb = weights_gb * expert_share
    if shape.is_moe and experts_gb <= ram:
        context = context_for(vram - (weights_gb - experts_gb))
        if context >= min(MIN_CONTEXT, max_context):
            return LlamaCppPlan(
                layers,
                split,
                True,
                context,
                threads,
                weights_gb,
                kv,
                (weights_gb - experts_gb + context * kv / GB) / gpu.count,
                experts_gb,
                ["routed experts in system RAM (-ot exps=CPU), the rest on the GPUs"],
            )

    # Partial offload: as many layers as fit beside a MIN_CONTEXT cache; the rest in system RAM.
    context = min(MIN_CONTEXT, max_context)
    per_layer_gb = weights_gb / layers
    gpu_layers = max(0, int((vram - context * kv / GB) / per_layer_gb))
    cpu_gb = weights_gb - gpu_layers * per_layer_gb
    _require(cpu_gb <= ram, weights_gb, vram + ram, "GPU memory plus system RAM", target)
    return LlamaCppPlan(
        gpu_layers,
        split if gpu_layers else [],
        False,
        context,
        threads,
        weights_gb,
        kv,
        (gpu_layers * per_layer_gb + context * kv / GB) / gpu.count,
        cpu_gb,
        [f"{gpu_layers} of {layers} layers on the GPUs, the rest in system RAM"],
    )


def _require(ok: bool, weights_gb: float, available_gb: float, where: str, target: Target) -> None:
    if not ok:
        raise DeepcastError(
            f"{weights_gb:.1f} GB of weights do not fit in the {available_gb:.1f} GB of usable {where} "
            f"of target {target.name}. Fix: a smaller quant type, a smaller model, or a bigger target."
        )


def expert_share(entry) -> float:
    """Routed experts' share of the weights, from total and active counts: active = dense + E * k / n."""
    shape = entry.shape
    if not shape.is_moe:
        return 0.0
    experts = (entry.parameters_b - entry.active_parameters_b) / (1 - shape.experts_per_token / shape.routed_experts)
    return min(1.0, experts / entry.parameters_b)


def plan_from_registry(model, target: Target, qtype: str) -> LlamaCppPlan | None:
    """The plan from registry figures alone (before any download); None for models outside the registry."""
    if model.entry is None:
        return None
    entry = model.entry
    weights_gb = entry.parameters_b * 1e9 * GGUF_BITS_PER_WEIGHT.get(qtype, 16.0) / 8 / GB
    return plan_llama_cpp(entry.shape, target, weights_gb, expert_share(entry))


# compressed-tensors bits per quantized Linear weight: 4-bit values plus one 16-bit scale per group
# of 128 (W4A16); 8-bit values plus one scale per output channel (W8A8, FP8). Embeddings, norms and
# routers stay 16-bit.
COMPRESSED_BITS = {"gptq-w4a16": 4 + 16 / 128, "awq-w4a16": 4 + 16 / 128, "rtn-w4a16": 4 + 16 / 128,
                   "int8-w8a8": 8.0, "fp8": 8.0}  # fmt: skip
VLLM_GPU_MEMORY_UTILIZATION = 0.90  # vLLM's default --gpu-memory-utilization
VLLM_RESERVE_GB = 2.0  # [D] per GPU: profiled activations, CUDA graphs, NCCL buffers


def compressed_weights_gb(shape: ModelShape, parameters_b: float, scheme: str) -> float:
    embeddings = shape.vocab * shape.hidden * (1 if shape.tied_embeddings else 2)
    linear = parameters_b * 1e9 - embeddings
    return (linear * COMPRESSED_BITS[scheme] / 8 + embeddings * 2) / GB


@dataclass
class VllmPlan:
    """vllm serve flags for one compressed checkpoint on one target, with the arithmetic behind them."""

    engine: str
    tensor_parallel: int
    pipeline_parallel: int
    dtype: str
    max_model_len: int
    weights_gb: float
    kv_bytes_per_token: int
    gpu_memory_gb: float
    notes: list[str] = field(default_factory=list)

    def serve_flags(self) -> list[str]:
        flags = ["--dtype", self.dtype, "--max-model-len", str(self.max_model_len)]
        if self.tensor_parallel > 1:
            flags += ["--tensor-parallel-size", str(self.tensor_parallel)]
        if self.pipeline_parallel > 1:
            flags += ["--pipeline-parallel-size", str(self.pipeline_parallel)]
        return flags

    def as_dict(self) -> dict:
        return {**asdict(self), "serve_flags": self.serve_flags()}


def plan_vllm(shape: ModelShape, target: Target, weights_gb: float) -> VllmPlan:
    """Tensor parallel over NVLink or PCIe peer-to-peer, pipeline parallel without it (4090s, 2080 Tis);
    the context is what the KV cache can hold after the weights."""
    kv = kv_bytes_per_token(shape)
    if target.gpu is None:
        ram = target.system_ram_gb * USABLE_FRACTION - CPU_RUNTIME_OVERHEAD_GB
        length = min(shape.max_context, int((ram - weights_gb) * GB / kv))
        _require(length >= min(MIN_CONTEXT, shape.max_context), weights_gb, ram, "system RAM", target)
        return VllmPlan(
            "vllm-cpu",
            1,
            1,
            "bfloat16",
            length,
            weights_gb,
            kv,
            0.0,
            ["vLLM's CPU backend; transformers also loads it (compressed-tensors decompresses on CPU)"],
        )
    gpu = target.gpu
    peer_to_peer = gpu.interconnect in ("nvlink", "pcie-p2p")
    tp, pp = (gpu.count, 1) if peer_to_peer else (1, gpu.count)
    if tp > 1 and shape.heads % tp:
        tp, pp = 1, gpu.count
    budget = gpu.count * (gpu.memory_gb * VLLM_GPU_MEMORY_UTILIZATION - VLLM_RESERVE_GB) - weights_gb
    length = min(shape.max_context, int(max(budget, 0) * GB / kv))
    _require(
        length >= min(MIN_CONTEXT, shape.max_context),
        weights_gb,
        gpu.count * (gpu.memory_gb * VLLM_GPU_MEMORY_UTILIZATION - VLLM_RESERVE_GB),
        "GPU memory",
        target,
    )
    notes = [
        f"tensor parallel over {tp} GPUs"
        if tp > 1
        else f"pipeline parallel over {pp} GPUs (no peer-to-peer link)"
        if pp > 1
        else "one GPU"
    ]
    return VllmPlan(
        "vllm",
        tp,
        pp,
        "bfloat16" if gpu.bf16 else "float16",
        length,
        weights_gb,
        kv,
        (weights_gb + length * kv / GB) / gpu.count,
        notes,
    )


def compress_refusal(scheme: str, target: Target, entry=None) -> str | None:
    """Why a compressed-tensors scheme cannot run on a target (or, given a registry entry, does not fit)."""
    from deepcast.stages.compress import SCHEMES

    needed = SCHEMES[scheme].min_compute_capability
    capability = target.gpu.compute_capability if target.gpu else None
    if needed is not None and (capability is None or capability < needed):
        have = f"compute capability {capability}" if capability else "no GPU"
        return f"FP8 tensor cores need compute capability {needed} or newer; the target has {have}"
    if entry is not None:
        try:
            plan_vllm(entry.shape, target, compressed_weights_gb(entry.shape, entry.parameters_b, scheme))
        except DeepcastError as error:
            return str(error)
    return None
