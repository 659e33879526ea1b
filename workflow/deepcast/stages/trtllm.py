"""TensorRT-LLM: ModelOpt checkpoints served by trtllm-serve's PyTorch backend.

There is no engine build any more (`trtllm-build` is gone from current releases): nvidia-modelopt
quantizes with the shared calibration set and exports a unified Hugging Face checkpoint, and
`trtllm-serve` loads it, tunes its kernels and captures CUDA graphs at start on the target GPU. The
bundle is that checkpoint, the `--extra_llm_api_options` file sized by the plan's memory arithmetic
and a launch script that checks the hardware before it starts.

Validation reads the exported checkpoint back (FP8 and INT4 weights dequantized with their scales,
activations fake-quantized with their exported input scales, AWQ's pre-quant scales applied), so its
figures are the artifact's, not the in-memory model's; the quantize step records ModelOpt's own
fake-quant figures before export beside them.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from deepcast import gates
from deepcast.config import TrtllmSettings, ValidateSettings
from deepcast.errors import DeepcastError
from deepcast.files import atomic_path
from deepcast.manifest import Recorder, verify
from deepcast.registry import Target
from deepcast.validation import pick_device

MODELOPT_VERSION = "0.47.0"  # requirements.lock; export layouts change between releases
TRTLLM_MIN_VERSION = "1.2"  # the first release whose trtllm-serve takes every key config.yml writes
NOT_RUN = "TensorRT-LLM tunes and runs on the target GPU; it is not run here"


@dataclass(frozen=True)
class Format:
    name: str
    modelopt_config: str | None  # an mtq.*_CFG preset; None: the 16-bit checkpoint itself
    quant_algo: str | None  # hf_quant_config.json's quant_algo
    min_compute_capability: float
    needs_cuda: bool = False  # calibration runs CUDA-only kernels

    @property
    def blocked(self) -> bool:
        return self.quant_algo in ("W4A16_AWQ", "W4A8_AWQ")


FORMATS = {
    f.name: f
    for f in (
        Format("trtllm-bf16", None, None, 8.0),
        Format("trtllm-fp8", "FP8_DEFAULT_CFG", "FP8", 8.9),
        Format("trtllm-int4-awq", "INT4_AWQ_CFG", "W4A16_AWQ", 8.0),
        Format("trtllm-w4a8-awq", "W4A8_AWQ_BETA_CFG", "W4A8_AWQ", 8.9),
        Format("trtllm-nvfp4", "NVFP4_DEFAULT_CFG", "NVFP4", 10.0, needs_cuda=True),
    )
}


def modelopt_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("nvidia-modelopt")
    except metadata.PackageNotFoundError:
        raise DeepcastError(
            f"nvidia-modelopt is not installed. Fix: `make install` (it pins nvidia-modelopt=={MODELOPT_VERSION})."
        ) from None


def check_request(fmt_name: str, checkpoint: Path, block_size: int, target: Target | None, device: str) -> Format:
    """Refuse, before loading anything, what cannot work; return the format."""
    from deepcast import compatibility
    from deepcast.stages.compress import linear_input_widths

    fmt = FORMATS.get(fmt_name)
    if fmt is None or fmt.modelopt_config is None:
        quantized = [name for name, f in FORMATS.items() if f.modelopt_config]
        raise DeepcastError(
            f"{fmt_name!r} is not a ModelOpt format. Fix: use one of {', '.join(quantized)} "
            "(trtllm-bf16 deploys the checkpoint itself)."
        )
    version = modelopt_version()
    if version != MODELOPT_VERSION:
        raise DeepcastError(
            f"nvidia-modelopt {version} is installed; deepcast reads the checkpoint layout of {MODELOPT_VERSION}. "
            f"Fix: pip install nvidia-modelopt=={MODELOPT_VERSION} (make install)."
        )
    architecture = json.loads((checkpoint / "config.json").read_text())["architectures"][0]
    reason = compatibility.load().architecture_refusal("tensorrt-llm", fmt_name, architecture)
    if target is not None:
        reason = reason or compatibility.load().check("tensorrt-llm", fmt_name, target, architecture)[0]
    if reason:
        raise DeepcastError(
            f"{fmt_name} is refused for {architecture}{f' on {target.name}' if target else ''}: "
            f"{reason}. Fix: a format `deepcast plan` lists as viable."
        )
    if fmt.needs_cuda and device != "cuda":
        raise DeepcastError(
            f"{fmt_name} calibration needs CUDA (ModelOpt's dynamic FP4 block quantizer has no CPU path). "
            "Fix: run this step on a GPU machine, or choose trtllm-fp8 or trtllm-int4-awq."
        )
    if fmt.blocked:
        bad = {n: w for n, w in linear_input_widths(checkpoint).items() if w % block_size}
        if bad:
            name, width = next(iter(bad.items()))
            raise DeepcastError(
                f"AWQ block size {block_size} does not divide the input width of {len(bad)} layer(s), e.g. {name} "
                f"({width}). Fix: set trtllm.awq_block_size to 64 (or another divisor) in the config."
            )
    return fmt


def _preset(fmt: Format, block_size: int) -> dict:
    """The ModelOpt preset with the configured AWQ block size."""
    import copy

    import modelopt.torch.quantization as mtq

    preset = copy.deepcopy(getattr(mtq, fmt.modelopt_config))
    for entry in preset["quant_cfg"]:
        if entry.get("quantizer_name") != "*weight_quantizer" or not fmt.blocked:
            continue
        stages = entry["cfg"] if isinstance(entry["cfg"], list) else [entry["cfg"]]
        for stage in stages:
            if stage.get("block_sizes", {}).get("type") == "static":
                stage["block_sizes"] = {-1: block_size, "type": "static"}
    return preset


def quantize(
    checkpoint: Path,
    calibration: Path,
    reference_dir: Path,
    out: Path,
    fmt_name: str,
    settings: TrtllmSettings,
    device: str = "auto",
    batch_size: int = 4,
    target: Target | None = None,
) -> dict:
    """mtq.quantize over the calibration samples, ModelOpt's fake-quant figures on the reference tokens,
    then export_hf_checkpoint into `out` (all or nothing)."""
    device = pick_device(device)
    fmt = check_request(fmt_name, checkpoint, settings.awq_block_size, target, device)
    verify(checkpoint)  # after the cheap refusals, before any weight is read

    import copy

    import modelopt.torch.quantization as mtq
    import torch
    from modelopt.torch.export import export_hf_checkpoint
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deepcast.perplexity import compare

    samples = [json.loads(line)["input_ids"] for line in (calibration / "samples.jsonl").read_text().splitlines()]
    chunks = json.loads((reference_dir / "chunks.json").read_text())
    preset = _preset(fmt, settings.awq_block_size)
    params = {
        "format": fmt_name,
        "modelopt_config": fmt.modelopt_config,
        "awq_block_size": settings.awq_block_size,
        "device": device,
    }
    recorder = Recorder("trtllm_quantize", params)
    recorder.input("samples.jsonl", calibration / "samples.jsonl")
    recorder.input("chunks.json", reference_dir / "chunks.json")
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype="auto", trust_remote_code=False).to(device).eval()
    stored_dtype = model.dtype
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def forward_loop(m) -> None:
        for index, ids in enumerate(samples, 1):
            m(input_ids=torch.tensor([ids], device=device))
            if index % max(1, len(samples) // 4) == 0:
                print(f"calibration {index}/{len(samples)} samples", flush=True)

    started = time.time()
    with torch.no_grad():
        model = mtq.quantize(model, preset, forward_loop)
    seconds = time.time() - started
    peak_gpu_gb = torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else None
    # ModelOpt's export rewrites the model (shared scales for fused projections), so its own figures come
    # first, from a float32 copy: the model itself stays in its stored dtype, which export keeps.
    base = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, trust_remote_code=False)
    fake_quant = compare(copy.deepcopy(model).float(), base.to(device).eval(), chunks, batch_size).as_dict()
    del base
    with atomic_path(out) as tmp:
        with torch.inference_mode():
            export_hf_checkpoint(model, dtype=stored_dtype, export_dir=tmp)
        AutoTokenizer.from_pretrained(checkpoint).save_pretrained(tmp)
        quant = json.loads((tmp / "hf_quant_config.json").read_text())["quantization"]
        recorder.results = {
            "quant_algo": quant["quant_algo"],
            "group_size": quant.get("group_size"),
            "exclude_modules": quant.get("exclude_modules", []),
            "quantize_seconds": round(seconds, 1),
            "peak_gpu_memory_gb": round(peak_gpu_gb, 3) if peak_gpu_gb is not None else None,
            "calibration_samples": len(samples),
            "fake_quant": fake_quant,
            "fake_quant_note": "ModelOpt's fake-quantized model before export, against the 16-bit model on the "
            "reference tokens",
        }
        recorder.write(tmp)
    return recorder.results


# What TensorRT-LLM's (and vLLM's modelopt) loader reads per quantized Linear: suffix -> (dtype, shape).
LAYOUTS = {
    "FP8": {
        "weight": ("F8_E4M3", lambda o, i, g: [o, i]),
        "weight_scale": ("F32", lambda o, i, g: []),
        "input_scale": ("F32", lambda o, i, g: []),
    },
    "W4A16_AWQ": {"weight": ("U8", lambda o, i, g: [o // 2, i]), "weight_scale": (None, lambda o, i, g: [o, i // g])},
    "W4A8_AWQ": {
        "weight": ("U8", lambda o, i, g: [o // 2, i]),
        "weight_scale": (None, lambda o, i, g: [o, i // g]),
        "weight_scale_2": ("F32", lambda o, i, g: []),
        "input_scale": ("F32", lambda o, i, g: []),
    },
}


def _tensor_table(directory: Path) -> dict[str, tuple[str, list[int]]]:
    from safetensors import safe_open

    table = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(path, "pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                piece = handle.get_slice(name)
                table[name] = (piece.get_dtype(), list(piece.get_shape()))
    return table


def check_layout(artifact: Path, checkpoint: Path, fmt: Format) -> dict:
    """hf_quant_config.json, config.json's quantization_config and every scale tensor the loaders read."""
    from deepcast.stages.compress import linear_input_widths

    problems = []
    quant_file = artifact / "hf_quant_config.json"
    if not quant_file.is_file():
        raise DeepcastError(f"{artifact} has no hf_quant_config.json. Fix: delete it and rerun trtllm_quantize.")
    quant = json.loads(quant_file.read_text())
    if (quant.get("producer") or {}).get("name") != "modelopt":
        problems.append(f"hf_quant_config.json producer is {quant.get('producer')}")
    algo = (quant.get("quantization") or {}).get("quant_algo")
    if algo != fmt.quant_algo:
        problems.append(f"quant_algo is {algo!r}, {fmt.name} needs {fmt.quant_algo!r}")
    config = json.loads((artifact / "config.json").read_text())
    if (config.get("quantization_config") or {}).get("quant_method") != "modelopt":
        problems.append("config.json's quantization_config.quant_method is not 'modelopt'")
    group = (quant.get("quantization") or {}).get("group_size") or 0
    tensors = _tensor_table(artifact)
    excluded = (quant.get("quantization") or {}).get("exclude_modules", [])
    checked = 0
    for name, in_features in linear_input_widths(checkpoint).items():
        base = name.removesuffix(".weight")
        if any(base == e or base.startswith(f"{e}.") for e in excluded):
            continue
        out_features = tensors.get(name, (None, [0, 0]))[1][0] * (2 if fmt.blocked else 1)
        for suffix, (dtype, shape) in LAYOUTS.get(algo, {}).items():
            found = tensors.get(f"{base}.{suffix}")
            expected = shape(out_features, in_features, group or in_features)
            if found is None:
                problems.append(f"{base}.{suffix} is missing")
            elif (dtype and found[0] != dtype) or found[1] != expected:
                problems.append(f"{base}.{suffix} is {found[0]} {found[1]}, expected {dtype or 'float'} {expected}")
        checked += 1
    if problems:
        raise DeepcastError(
            f"{artifact} is not the ModelOpt checkpoint TensorRT-LLM reads for {fmt.name}: {'; '.join(problems[:5])}"
            f"{f' (and {len(problems) - 5} more)' if len(problems) > 5 else ''}. Fix: delete it and rerun "
            "trtllm_quantize."
        )
    return {"quant_algo": algo, "group_size": group or None, "quantized_linears": checked, "exclude_modules": excluded}


def unpack_int4(packed):
    """ModelOpt's uint8 packing (two output channels per byte, low nibble first) back to int8 [out, in]."""
    import torch

    low = (packed & 0x0F).to(torch.int8)
    high = (packed >> 4).to(torch.int8)
    low, high = torch.where(low > 7, low - 16, low), torch.where(high > 7, high - 16, high)
    return torch.stack([low, high], dim=1).reshape(packed.shape[0] * 2, *packed.shape[1:])


def load_dequantized(artifact: Path):
    """The exported checkpoint as a float transformers model computing what the engine computes: weights
    dequantized with their scales, inputs scaled by AWQ's pre_quant_scale and fake-quantized to FP8 with
    their exported input_scale."""
    import torch
    from safetensors.torch import load_file

    from deepcast.validation import dequantized_model

    tensors = {}
    for path in sorted(artifact.glob("*.safetensors")):
        tensors.update(load_file(path))
    dense, pre_scales, input_scales = {}, {}, {}
    for name, tensor in tensors.items():
        if name.endswith((".weight_scale", ".weight_scale_2", ".input_scale", ".pre_quant_scale")):
            continue
        base = name.removesuffix(".weight")
        if name.endswith(".weight") and tensor.dtype == torch.float8_e4m3fn:
            dense[name] = tensor.float() * tensors[f"{base}.weight_scale"].float()
        elif name.endswith(".weight") and tensor.dtype == torch.uint8:
            values, scale = unpack_int4(tensor).float(), tensors[f"{base}.weight_scale"].float()
            dense[name] = values * scale.repeat_interleave(values.shape[-1] // scale.shape[-1], dim=-1)
        else:
            dense[name] = tensor.float() if tensor.is_floating_point() else tensor
        if f"{base}.pre_quant_scale" in tensors:
            pre_scales[base] = tensors[f"{base}.pre_quant_scale"].float()
        if f"{base}.input_scale" in tensors:
            input_scales[base] = tensors[f"{base}.input_scale"].float()
    model = dequantized_model(artifact, dense)

    def hook(pre_scale, input_scale):
        def quantize_input(_module, inputs):  # the scales follow the model to its device
            x = inputs[0] * pre_scale.to(inputs[0].device) if pre_scale is not None else inputs[0]
            if input_scale is not None:
                scale = input_scale.to(x.device)
                x = (x / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale
            return (x,)

        return quantize_input

    modules = dict(model.named_modules())
    missing = (set(pre_scales) | set(input_scales)) - set(modules)
    if missing:
        raise DeepcastError(
            f"{len(missing)} quantized layers of {artifact} have no module in the model, e.g. "
            f"{sorted(missing)[:2]}. Fix: delete the checkpoint and rerun trtllm_quantize."
        )
    for name in set(pre_scales) | set(input_scales):
        modules[name].register_forward_pre_hook(hook(pre_scales.get(name), input_scales.get(name)))
    return model.eval()


def serving_check(bundle_dir: Path, fmt: Format) -> dict:
    """Serve one prompt through TensorRT-LLM where it and a capable GPU exist; otherwise say why not."""
    import importlib.util

    from deepcast.tools import visible_gpus

    if importlib.util.find_spec("tensorrt_llm") is None:
        return {"status": "not run here", "reason": "TensorRT-LLM is not installed on this machine"}
    capabilities = [float(c) for c in visible_gpus("compute_cap")]
    if not capabilities or max(capabilities) < fmt.min_compute_capability:
        have = ", ".join(map(str, capabilities)) or "no GPU"
        return {
            "status": "not run here",
            "reason": f"{fmt.name} needs compute capability {fmt.min_compute_capability}; this machine has {have}",
        }
    from tensorrt_llm import LLM, SamplingParams

    llm = LLM(model=str(bundle_dir / "checkpoint"), max_seq_len=512)
    completion = llm.generate(["ROMEO.\n"], SamplingParams(max_tokens=16, temperature=0))[0].outputs[0].text
    if not completion.strip():
        raise DeepcastError(f"TensorRT-LLM loaded {bundle_dir} but answered an empty completion.")
    return {"status": "served", "engine": "tensorrt-llm", "completion": completion}


def validate(
    bundle_dir: Path,
    checkpoint: Path,
    reference_dir: Path,
    out: Path,
    fmt_name: str,
    batch_size: int,
    settings: ValidateSettings | None = None,
    target: Target | None = None,
    plan_file: Path | None = None,
    teacher: Path | None = None,
    device: str = "auto",
) -> dict:
    """Layout, quality of the exported checkpoint against the 16-bit model on the reference tokens (beside
    ModelOpt's fake-quant figures), smoke prompts, serving where TensorRT-LLM runs, the gate. The quality
    figures run on the evaluation device (the GPU where one is)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deepcast import validation
    from deepcast.files import verify_checksums
    from deepcast.manifest import read

    settings = settings or ValidateSettings()
    verify_checksums(bundle_dir)
    fmt = FORMATS[fmt_name]
    artifact = bundle_dir / "checkpoint"
    recorder = Recorder("trtllm_validate", {"format": fmt_name, "batch_size": batch_size})
    recorder.input("config.yml", bundle_dir / "config.yml")
    if fmt.quant_algo is None:
        layout, fake_quant = {"quant_algo": None, "note": "the 16-bit checkpoint itself"}, None
        model = AutoModelForCausalLM.from_pretrained(artifact, dtype=torch.float32, trust_remote_code=False).eval()
        loaded_with = "transformers"
    else:
        layout = check_layout(artifact, checkpoint, fmt)
        fake_quant = (read(bundle_dir)["results"].get("quantize") or {}).get("fake_quant")
        if fmt.quant_algo not in ("FP8", "W4A16_AWQ", "W4A8_AWQ"):
            raise DeepcastError(
                f"deepcast has no reader for {fmt.quant_algo} checkpoints on this machine, so "
                f"{fmt_name} cannot be validated here. Fix: validate it where TensorRT-LLM runs."
            )
        model, loaded_with = load_dequantized(artifact), "deepcast's reader of the ModelOpt checkpoint (dequantized)"
    model = model.to(pick_device(device))
    results = {
        **validation.against_reference(model, reference_dir, batch_size, teacher),
        "engine": "tensorrt-llm",
        "loaded_with": loaded_with,
        "layout": layout,
        "fake_quant": fake_quant,
        "smoke": validation.transformers_smoke(model, AutoTokenizer.from_pretrained(artifact)),
        "serving": serving_check(bundle_dir, fmt),
        "speed": validation.not_measured(NOT_RUN, validation.roofline(plan_file, fmt_name)),
        "size_bytes": sum(p.stat().st_size for p in artifact.glob("*.safetensors")),
    }
    if results["serving"]["status"] == "served":
        results["speed"]["reason"] = "served once for correctness; speed is trtllm-bench's job on the target"
    results["gate"] = gates.apply(str(bundle_dir.parent), fmt_name, results, settings)
    return recorder.save(out, results, {"validation.json": json.dumps(results, indent=2) + "\n"})


@dataclass
class ServePlan:
    """trtllm-serve's parallelism, sequence length and KV pool for one checkpoint on one target."""

    tensor_parallel: int
    pipeline_parallel: int
    expert_parallel: int
    max_seq_len: int
    max_batch_size: int
    max_num_tokens: int
    kv_pool_gb: float
    kv_bytes_per_token: int
    weights_gb: float
    notes: list[str]


def serve_plan(shape, target: Target, weights_gb: float, settings: TrtllmSettings) -> ServePlan:
    """Parallelism from the plan's placement; the KV pool is kv_cache_memory_fraction of what the weights
    and the runtime reserve leave, and max_seq_len what that pool holds (capped at the model's context)."""
    from deepcast import planner

    placed = planner.plan_vllm(shape, target, weights_gb, engine="tensorrt-llm")
    gpu = target.gpu
    free_gb = gpu.count * (gpu.memory_gb - planner.VLLM_RESERVE_GB) - weights_gb
    pool_gb = max(free_gb, 0) * settings.kv_cache_memory_fraction
    length = min(shape.max_context, int(pool_gb * planner.GB / placed.kv_bytes_per_token))
    experts = placed.tensor_parallel if shape.is_moe else 1
    return ServePlan(
        placed.tensor_parallel,
        placed.pipeline_parallel,
        experts,
        length,
        settings.max_batch_size,
        min(8192, length),
        round(pool_gb, 3),
        placed.kv_bytes_per_token,
        round(weights_gb, 3),
        placed.notes,
    )


def serve_config(plan: ServePlan, settings: TrtllmSettings) -> dict:
    """The --extra_llm_api_options YAML (TorchLlmArgs keys; it overrides the command line)."""
    config = {
        "tensor_parallel_size": plan.tensor_parallel,
        "pipeline_parallel_size": plan.pipeline_parallel,
        "moe_expert_parallel_size": plan.expert_parallel,
        "max_batch_size": plan.max_batch_size,
        "max_num_tokens": plan.max_num_tokens,
        "max_seq_len": plan.max_seq_len,
        "trust_remote_code": False,
        "kv_cache_config": {"free_gpu_memory_fraction": settings.kv_cache_memory_fraction, "dtype": "auto"},
    }
    if settings.cuda_graphs:
        config["cuda_graph_config"] = {"enable_padding": True, "max_batch_size": plan.max_batch_size}
    return config


TRTLLM_README = """# {title}

Start: `./launch.sh` (an OpenAI-compatible server on port 8000: `trtllm-serve`, PyTorch backend). It checks
every file against `SHA256SUMS`, that TensorRT-LLM {min_version} or newer is installed, and that the GPUs have
compute capability {capability} or newer and number at least {gpus}; then it starts. The first start tunes
kernels and captures CUDA graphs on this GPU (no engine file is built or shipped).

| | |
|---|---|
| format | {fmt} (ModelOpt {quant_algo}, unified Hugging Face checkpoint in `checkpoint/`) |
| hardware | {hardware}: {gpus} GPU(s), compute capability {capability}+ |
| parallelism | tensor {tp} x pipeline {pp}, experts {ep} ({notes}) |
| weights | {weights_gb:.2f} GB |
| KV cache | {pool_gb:.2f} GB: {kv_fraction:.0%} of what weights and {reserve:.1f} GB runtime per GPU leave |
| KV per token | {kv} bytes |
| max_seq_len | {length:,} tokens (what the pool holds, capped at the model's context) |
| batch | {batch} sequences, {num_tokens:,} tokens per step |

Unsupported: Turing (left with TensorRT-LLM 0.14) and Jetson (TensorRT Edge-LLM is the Jetson path).
FP8 and NVFP4 checkpoints also load in vLLM: `vllm serve checkpoint --quantization modelopt` (`modelopt_fp4`).
Install: `pip install tensorrt-llm` (or NVIDIA's release container), CUDA driver 575 or newer.
"""


def bundle(artifact: Path, target: Target, out: Path, fmt_name: str, settings: TrtllmSettings) -> dict:
    """checkpoint/ (hard links), config.yml from the plan's arithmetic, launch.sh with its preflight,
    README and checksums."""
    import yaml

    from deepcast import planner
    from deepcast.files import link_or_copy, write_checksums, write_launch_script
    from deepcast.manifest import read
    from deepcast.registry import shape_from_hf_config

    if target.gpu is None:
        raise DeepcastError(f"TensorRT-LLM needs a GPU; target {target.name} has none. Fix: a GPU target.")
    fmt = FORMATS[fmt_name]
    shape = shape_from_hf_config(json.loads((artifact / "config.json").read_text()))
    weights_gb = sum(p.stat().st_size for p in artifact.glob("*.safetensors")) / planner.GB
    plan = serve_plan(shape, target, weights_gb, settings)
    config = serve_config(plan, settings)
    recorder = Recorder("trtllm_bundle", {"target": target.name, "format": fmt_name, "serve_plan": plan.__dict__})
    source = read(artifact) if (artifact / "manifest.json").is_file() else {}
    capability = max(fmt.min_compute_capability, 8.0)
    gpus = plan.tensor_parallel * plan.pipeline_parallel
    with atomic_path(out) as tmp:
        (tmp / "checkpoint").mkdir(parents=True)
        for path in sorted(artifact.iterdir()):
            if path.is_file() and path.name != "manifest.json":
                link_or_copy(path, tmp / "checkpoint" / path.name)
        (tmp / "config.yml").write_text(yaml.safe_dump(config, sort_keys=False))
        preflight = (
            "python3 - <<'PY' || exit 4\n"
            "import sys\n"
            "try:\n"
            "    import tensorrt_llm\n"
            "except ImportError:\n"
            "    sys.exit('TensorRT-LLM is not installed: pip install tensorrt-llm, or use NVIDIA\\'s container')\n"
            "from packaging.version import Version\n"
            f"if Version(tensorrt_llm.__version__) < Version('{TRTLLM_MIN_VERSION}'):\n"
            f"    sys.exit(f'TensorRT-LLM {{tensorrt_llm.__version__}} is older than {TRTLLM_MIN_VERSION}')\n"
            "PY\n"
            "caps=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader) || "
            "{ echo 'no NVIDIA GPU visible' >&2; exit 4; }\n"
            f"usable=$(echo \"$caps\" | awk '$1 >= {capability}' | wc -l)\n"
            f'if [ "$usable" -lt {gpus} ]; then\n'
            f'    echo "{fmt_name} needs {gpus} GPU(s) of compute capability {capability}+; found: $caps" >&2\n'
            "    exit 4\n"
            "fi\n"
        )
        command = (
            "trtllm-serve checkpoint --backend pytorch --host 0.0.0.0 --port 8000 "
            f"--tp_size {plan.tensor_parallel} --pp_size {plan.pipeline_parallel} --ep_size {plan.expert_parallel} "
            f"--max_batch_size {plan.max_batch_size} --max_num_tokens {plan.max_num_tokens} "
            f"--max_seq_len {plan.max_seq_len} --kv_cache_free_gpu_memory_fraction {settings.kv_cache_memory_fraction} "
            "--extra_llm_api_options config.yml"
        )
        header = f"# Serve {fmt_name} on {target.name} with trtllm-serve. Extra arguments go to trtllm-serve."
        write_launch_script(tmp, header, command, preflight)
        (tmp / "README.md").write_text(
            TRTLLM_README.format(
                title=f"{fmt_name} of {shape_architecture(artifact)} on {target.name}",
                min_version=TRTLLM_MIN_VERSION,
                capability=capability,
                gpus=gpus,
                fmt=fmt_name,
                quant_algo=fmt.quant_algo or "none, 16-bit",
                hardware=target.description,
                tp=plan.tensor_parallel,
                pp=plan.pipeline_parallel,
                ep=plan.expert_parallel,
                notes="; ".join(plan.notes),
                weights_gb=plan.weights_gb,
                kv_fraction=settings.kv_cache_memory_fraction,
                reserve=planner.VLLM_RESERVE_GB,
                pool_gb=plan.kv_pool_gb,
                kv=plan.kv_bytes_per_token,
                length=plan.max_seq_len,
                batch=plan.max_batch_size,
                num_tokens=plan.max_num_tokens,
            )
        )
        recorder.results = {"config": config, "quantize": source.get("results"), "files": sorted(write_checksums(tmp))}
        recorder.write(tmp)
    return recorder.results


def shape_architecture(artifact: Path) -> str:
    return json.loads((artifact / "config.json").read_text())["architectures"][0]
