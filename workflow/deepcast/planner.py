"""Memory arithmetic: where a model's weights and KV cache go on a target, and what context is left.

Every figure is written down with its source; [D] marks a figure derived here.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from deepcast.errors import DeepcastError
from deepcast.registry import ModelShape, Target

GB = 1e9

# Types whose quantizer needs an importance matrix (llama-quant.cpp, tensor_requires_imatrix).
NEEDS_IMATRIX = {"IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_S", "IQ1_M"}

KV_CACHE_BYTES = 2  # llama.cpp's default f16 K/V cache
# Per GPU: the CUDA context and cuBLAS workspace, 596 MiB ("unaccounted" in llama.cpp's memory breakdown on an
# H200), plus llama-server's compute buffer, 65 to 108 MiB at its default batch; both measured on the synthetic
# models (docs/benchmarks.md, "Planner accuracy on a synthetic model").
CUDA_CONTEXT_GB = 0.625
COMPUTE_BUFFER_GB = 0.115
GPU_RUNTIME_OVERHEAD_GB = CUDA_CONTEXT_GB + COMPUTE_BUFFER_GB
# [D] host process, tokenizer and compute buffers on the CPU backend.
CPU_RUNTIME_OVERHEAD_GB = 0.5
# Leave headroom for the driver, fragmentation and the OS.
USABLE_FRACTION = 0.92
MIN_CONTEXT = 2048
GOOD_CONTEXT = 8192  # a plan offering less ranks after those that offer this much


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
    gpu_memory_gb: float  # per GPU, at the chosen context (the fullest GPU's)
    system_memory_gb: float
    notes: list[str] = field(default_factory=list)
    cpu_moe_layers: int = 0  # --n-cpu-moe: the first N layers' experts in system RAM (0: all of them, or none)
    cpu_expert_share: float = 0.0  # the routed experts' fraction kept in system RAM

    def server_flags(self) -> list[str]:
        flags = ["-ngl", str(self.gpu_layers), "-c", str(self.context), "-t", str(self.threads)]
        if self.tensor_split:
            flags += ["--tensor-split", ",".join(f"{share:g}" for share in self.tensor_split)]
        if self.cpu_moe_layers:
            flags += ["--n-cpu-moe", str(self.cpu_moe_layers)]
        elif self.experts_on_cpu:
            flags += ["-ot", "exps=CPU"]
        return flags

    def as_dict(self) -> dict:
        return {**asdict(self), "server_flags": self.server_flags()}


def llama_cpp_gpu_gb(target: Target) -> float:
    """What llama.cpp can put on one of the target's GPUs: the usable fraction less the runtime allowance."""
    return target.gpu.memory_gb * USABLE_FRACTION - GPU_RUNTIME_OVERHEAD_GB


def plan_llama_cpp(
    shape: ModelShape,
    target: Target,
    weights_gb: float,
    expert_share: float,
    token_embd_gb: float = 0.0,
    context_cap: int | None = None,
) -> LlamaCppPlan:
    """Place a GGUF of `weights_gb` on `target`; `expert_share` is the routed experts' fraction of it and
    `token_embd_gb` the token embedding, which llama.cpp keeps in host memory at any offload.

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
    vram = llama_cpp_gpu_gb(target) * gpu.count
    split = [1.0] * gpu.count if gpu.count > 1 else []
    if gpu.interconnect == "unified":
        ram = 0.0  # one memory shared by CPU and GPU (Jetson): offloading to "system RAM" frees nothing
    layers = shape.layers + 1  # llama.cpp counts the output layer too
    offloadable_gb = weights_gb - token_embd_gb
    host_gb = CPU_RUNTIME_OVERHEAD_GB + token_embd_gb

    enough, good = min(MIN_CONTEXT, max_context), min(GOOD_CONTEXT, max_context)
    placements = []  # in order of preference; the first leaving a good context wins, else the first that fits

    context = context_for(vram - offloadable_gb)
    placements.append(
        LlamaCppPlan(
            layers,
            split,
            False,
            context,
            threads,
            weights_gb,
            kv,
            (offloadable_gb + context * kv / GB) / gpu.count,
            host_gb,
            [f"all layers on {gpu.count} GPU(s)"],
        )
    )
    experts_gb = weights_gb * expert_share
    if shape.is_moe and experts_gb + host_gb <= ram:
        context = context_for(vram - (offloadable_gb - experts_gb))
        placements.append(
            LlamaCppPlan(
                layers,
                split,
                True,
                context,
                threads,
                weights_gb,
                kv,
                (offloadable_gb - experts_gb + context * kv / GB) / gpu.count,
                experts_gb + host_gb,
                ["routed experts in system RAM (-ot exps=CPU), the rest on the GPUs"],
                cpu_expert_share=1.0,
            )
        )
    elif shape.is_moe:
        placed = _some_experts_on_cpu(shape, target, weights_gb, experts_gb, token_embd_gb, ram, max_context)
        placements += [placed] if placed else []
    for context in (good, enough):
        # Partial offload: as many layers as fit beside the cache; the rest in system RAM.
        per_layer_gb = offloadable_gb / layers
        gpu_layers = min(layers, max(0, int((vram - context * kv / GB) / per_layer_gb)))
        cpu_gb = weights_gb - gpu_layers * per_layer_gb
        if cpu_gb <= ram:
            placements.append(
                LlamaCppPlan(
                    gpu_layers,
                    split if gpu_layers else [],
                    False,
                    context,
                    threads,
                    weights_gb,
                    kv,
                    (gpu_layers * per_layer_gb + context * kv / GB) / gpu.count,
                    cpu_gb + CPU_RUNTIME_OVERHEAD_GB,
                    [f"{gpu_layers} of {layers} layers on the GPUs, the rest in system RAM"],
                )
            )
    for wanted in (good, enough):
        placed = next((p for p in placements if p.context >= wanted), None)
        if placed:
            return placed
    _require(False, weights_gb, vram + ram, "GPU memory plus system RAM", target)


def _greedy_runs(loads: list[float], capacity: float) -> list[int]:
    """Layers per GPU when each GPU takes layers in order until the next would pass `capacity`."""
    counts, load = [0], 0.0
    for layer in loads:
        if load + layer > capacity:
            counts.append(0)
            load = 0.0
        counts[-1] += 1
        load += layer
    return counts


def contiguous_split(loads: list[float], parts: int) -> list[int]:
    """Layers per GPU, in order, keeping the fullest GPU as light as contiguous runs allow (llama.cpp
    gives each GPU a run of layers, --tensor-split's shares)."""
    low, high = max(loads), sum(loads)  # one GPU holding everything always packs
    for _ in range(60):  # bisect the fullest GPU's load
        middle = (low + high) / 2
        low, high = (middle, high) if len(_greedy_runs(loads, middle)) > parts else (low, middle)
    counts = _greedy_runs(loads, high)
    return counts + [0] * (parts - len(counts))


def _some_experts_on_cpu(
    shape: ModelShape,
    target: Target,
    weights_gb: float,
    experts_gb: float,
    token_embd_gb: float,
    ram: float,
    max_context: int,
) -> LlamaCppPlan | None:
    """Routed experts of the first N layers in system RAM (--n-cpu-moe N), the rest of every layer on the
    GPUs, for when all the experts do not fit in RAM: the fewest N that leaves a good context (else the
    longest), layers split so that the fullest GPU holds as little as contiguous runs allow."""
    gpu, layers = target.gpu, shape.layers + 1
    moe_layers = shape.layers - shape.first_dense_layers
    expert_layer_gb = experts_gb / moe_layers
    shared_layer_gb = (weights_gb - token_embd_gb - experts_gb) / layers
    kv_layer = kv_bytes_per_token(shape) / shape.layers / GB  # per token; the output layer holds none
    per_gpu = llama_cpp_gpu_gb(target)
    wanted = min(max_context, GOOD_CONTEXT)
    best = None
    for on_cpu in range(1, moe_layers + 1):
        host_gb = CPU_RUNTIME_OVERHEAD_GB + token_embd_gb + on_cpu * expert_layer_gb
        if host_gb > ram:
            break
        first_gpu_experts = shape.first_dense_layers + on_cpu

        def loads(context: int, first: int = first_gpu_experts) -> list[float]:
            experts = [expert_layer_gb if i >= first else 0.0 for i in range(layers - 1)]
            return [shared_layer_gb + gb + context * kv_layer for gb in experts] + [shared_layer_gb]

        def fits(context: int) -> bool:
            return max(_gpu_loads(loads(context), contiguous_split(loads(context), gpu.count))) <= per_gpu

        if not fits(min(MIN_CONTEXT, max_context)):
            continue
        low, high = min(MIN_CONTEXT, max_context), max_context
        while low < high:  # the longest context that still fits
            middle = (low + high + 1) // 2
            low, high = (middle, high) if fits(middle) else (low, middle - 1)
        split = contiguous_split(loads(low), gpu.count)
        best = LlamaCppPlan(
            layers,
            [float(count) for count in split] if gpu.count > 1 else [],
            True,
            low,
            target.cpu_cores,
            weights_gb,
            kv_bytes_per_token(shape),
            max(_gpu_loads(loads(low), split)),
            host_gb,
            [
                f"routed experts of the first {first_gpu_experts} layers in system RAM (--n-cpu-moe), "
                f"the rest on the GPUs, {'/'.join(str(c) for c in split)} layers per GPU"
                if gpu.count > 1
                else f"routed experts of the first {first_gpu_experts} layers in system RAM (--n-cpu-moe), "
                "the rest on the GPU"
            ],
            cpu_moe_layers=first_gpu_experts,
            cpu_expert_share=on_cpu / moe_layers,
        )
        if low >= wanted:
            return best
    return best


def _gpu_loads(loads: list[float], split: list[int]) -> list[float]:
    sums, start = [], 0
    for count in split:
        sums.append(sum(loads[start : start + count]))
        start += count
    return sums


def _require(ok: bool, weights_gb: float, available_gb: float, where: str, target: Target) -> None:
    if not ok:
        raise DeepcastError(
            f"{weights_gb:.1f} GB of weights do not fit in the {available_gb:.1f} GB of usable {where} "
            f"of target {target.name}. Fix: a smaller quant type, a smaller model, or a bigger target."
        )


VLLM_GPU_MEMORY_UTILIZATION = 0.90  # vLLM's default --gpu-memory-utilization
VLLM_RESERVE_GB = 2.0  # [D] per GPU: profiled activations, CUDA graphs, NCCL buffers


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
        if self.engine == "vllm-cpu":  # no kernel compilation at start: minutes on a few cores, for no gain here
            flags.append("--enforce-eager")
        if self.tensor_parallel > 1:
            flags += ["--tensor-parallel-size", str(self.tensor_parallel)]
        if self.pipeline_parallel > 1:
            flags += ["--pipeline-parallel-size", str(self.pipeline_parallel)]
        return flags

    def cpu_kv_cache_gib(self) -> int:
        """VLLM_CPU_KVCACHE_SPACE for vLLM's CPU backend: whole GiB holding one sequence of the planned context.
        Setting it also skips vLLM's check that 92 % of the host's memory is free."""
        return max(1, math.ceil(self.max_model_len * self.kv_bytes_per_token / 2**30))

    def as_dict(self) -> dict:
        return {**asdict(self), "serve_flags": self.serve_flags()}


def plan_vllm(shape: ModelShape, target: Target, weights_gb: float, engine: str = "vllm") -> VllmPlan:
    """Tensor parallel over NVLink or PCIe peer-to-peer, pipeline parallel without it (4090s, 2080 Tis);
    the context is what the KV cache can hold after the weights. TensorRT-LLM is planned the same way."""
    kv = kv_bytes_per_token(shape)
    if target.gpu is None:
        ram = target.system_ram_gb * USABLE_FRACTION - CPU_RUNTIME_OVERHEAD_GB
        length = min(shape.max_context, int((ram - weights_gb) * GB / kv))
        _require(length >= min(MIN_CONTEXT, shape.max_context), weights_gb, ram, "system RAM", target)
        where = "vLLM's CPU backend" if engine == "vllm-cpu" else f"{engine} on the CPU"
        return VllmPlan(engine, 1, 1, "bfloat16", length, weights_gb, kv, 0.0, [where])
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
        engine,
        tp,
        pp,
        "bfloat16" if gpu.bf16 else "float16",
        length,
        weights_gb,
        kv,
        (weights_gb + length * kv / GB) / gpu.count,
        notes,
    )
