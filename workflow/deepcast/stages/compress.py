"""llm-compressor schemes (GPTQ, AWQ, SmoothQuant+GPTQ INT8, FP8, RTN control) to compressed-tensors.

Every scheme reads the shared calibration set; none loads data of its own. Requests that cannot
work are refused before the model is loaded: a scheme the target cannot run, a group size that
does not divide a layer's input width, a recipe that does not parse, an architecture without AWQ
mappings. MoE models are calibrated with every routed expert seeing every token; the experts that
normal routing never reached on the calibration set are counted and reported in the manifest.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from deepcast import gates, sizes, tasks
from deepcast.config import ValidateSettings
from deepcast.errors import DeepcastError
from deepcast.files import atomic_path, require_space
from deepcast.manifest import Recorder, verify
from deepcast.registry import Target, shape_from_hf_config
from deepcast.serving import VLLM_CPU_VERSION


@dataclass(frozen=True)
class Scheme:
    name: str
    group_size: int | None  # None: per channel
    needs_calibration: bool
    format: str  # compressed-tensors format vLLM reads for it


SCHEMES = {
    s.name: s
    for s in (
        Scheme("gptq-w4a16", 128, True, "pack-quantized"),
        Scheme("awq-w4a16", 128, True, "pack-quantized"),
        Scheme("int8-w8a8", None, True, "int-quantized"),
        Scheme("fp8", None, False, "float-quantized"),
        Scheme("rtn-w4a16", 128, False, "pack-quantized"),
    )
}
# Router-free AWQ mappings (llm-compressor's built-in DeepseekV3 entry balances the router too and
# fails on dense first layers). Qwen2 and Llama use llm-compressor's own registry entries.
MLA_AWQ_MAPPINGS = [
    {"smooth_layer": "re:.*input_layernorm$", "balance_layers": ["re:.*(q|q_a)_proj$", "re:.*kv_a_proj_with_mqa$"]},
    {"smooth_layer": "re:.*q_a_layernorm$", "balance_layers": ["re:.*q_b_proj$"]},
    {"smooth_layer": "re:.*kv_a_layernorm$", "balance_layers": ["re:.*kv_b_proj$"]},
    {"smooth_layer": "re:.*post_attention_layernorm$", "balance_layers": ["re:.*gate_proj$", "re:.*up_proj$"]},
    {"smooth_layer": "re:.*up_proj$", "balance_layers": ["re:.*down_proj$"]},
]
AWQ_MAPPINGS = {"DeepseekV3ForCausalLM": MLA_AWQ_MAPPINGS, "DeepseekV2ForCausalLM": MLA_AWQ_MAPPINGS,
                "Qwen2ForCausalLM": None, "LlamaForCausalLM": None}  # fmt: skip
NOT_QUANTIZED = ("embed_tokens", "lm_head", "norm", "mlp.gate.", "e_score_correction")


def load_recipe(path: Path) -> dict:
    try:
        recipe = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as error:
        raise DeepcastError(f"recipe {path} does not parse: {error}. Fix the YAML or restore the default.") from None
    if not isinstance(recipe, dict) or not any(isinstance(v, dict) for v in recipe.values()):
        raise DeepcastError(f"recipe {path} has no stage of modifiers. Fix: start from config/recipes/.")
    return recipe


def linear_input_widths(checkpoint: Path) -> dict[str, int]:
    """Input width of every weight a Linear target would quantize, read from the safetensors headers."""
    from safetensors import safe_open

    widths = {}
    for path in sorted(checkpoint.glob("*.safetensors")):
        with safe_open(path, "pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                shape = handle.get_slice(name).get_shape()
                if name.endswith(".weight") and len(shape) == 2 and not any(k in name for k in NOT_QUANTIZED):
                    widths[name] = shape[1]
    return widths


def check_request(scheme_name: str, recipe: dict, checkpoint: Path, target: Target | None) -> Scheme:
    """Refuse, before any work, what cannot work; return the scheme."""
    scheme = SCHEMES.get(scheme_name)
    if scheme is None:
        raise DeepcastError(f"unknown scheme {scheme_name!r}. Fix: use one of {', '.join(SCHEMES)}.")
    if target is not None:
        from deepcast import compatibility
        from deepcast.stages.plan import engine_refusal

        architecture = json.loads((checkpoint / "config.json").read_text())["architectures"][0]
        reason = engine_refusal(scheme_name, "compressed", target, architecture, compatibility.load())
        if reason:
            raise DeepcastError(
                f"{scheme_name} is refused for target {target.name}: {reason}. "
                "Fix: choose a scheme `deepcast plan` lists as viable for this target (int8-w8a8 or W4A16 on GPUs "
                "before compute capability 8.9)."
            )
    group = _recipe_group_size(recipe) or scheme.group_size
    if group:
        bad = {n: w for n, w in linear_input_widths(checkpoint).items() if w % group}
        if bad:
            name, width = next(iter(bad.items()))
            raise DeepcastError(
                f"group size {group} does not divide the input width of {len(bad)} layer(s), e.g. {name} "
                f"({width}). Fix: a group size that divides every width, or per-channel quantization."
            )
    if scheme_name == "awq-w4a16":
        architecture = json.loads((checkpoint / "config.json").read_text())["architectures"][0]
        if architecture not in AWQ_MAPPINGS and not _recipe_has_mappings(recipe):
            raise DeepcastError(
                f"no AWQ mappings for {architecture}. Fix: add `mappings:` to the AWQModifier in the recipe, "
                f"or use gptq-w4a16 (mappings are known for {', '.join(AWQ_MAPPINGS)})."
            )
    return scheme


def _modifiers(recipe: dict) -> dict:
    found = {}
    for stage in recipe.values():
        for group in (stage or {}).values():
            if isinstance(group, dict):
                found.update(group)
    return found


def _recipe_group_size(recipe: dict) -> int | None:
    for modifier in _modifiers(recipe).values():
        for group in (modifier or {}).get("config_groups", {}).values():
            size = (group.get("weights") or {}).get("group_size")
            if size:
                return int(size)
    return None


def _recipe_has_mappings(recipe: dict) -> bool:
    return bool((_modifiers(recipe).get("AWQModifier") or {}).get("mappings"))


def _with_awq_mappings(recipe: dict, architecture: str) -> dict:
    mappings = AWQ_MAPPINGS.get(architecture)
    if mappings is None or _recipe_has_mappings(recipe):
        return recipe
    recipe = json.loads(json.dumps(recipe))
    _modifiers_ref(recipe)["AWQModifier"]["mappings"] = mappings
    return recipe


def _modifiers_ref(recipe: dict) -> dict:
    for stage in recipe.values():
        for group in (stage or {}).values():
            if isinstance(group, dict) and "AWQModifier" in group:
                return group
    raise DeepcastError("the awq-w4a16 recipe has no AWQModifier. Fix: restore config/recipes/awq-w4a16.yaml.")


def route_counts(model, samples: list[list[int]]) -> dict[str, list[int]]:
    """Tokens per routed expert under normal routing, from a plain forward pass."""
    import torch

    counts: dict[str, torch.Tensor] = {}

    def hook(name):
        def count(module, _inputs, outputs):
            indices = outputs[2].reshape(-1)
            counts[name] = counts.get(name, 0) + torch.bincount(indices, minlength=module.num_experts)

        return count

    handles = [
        m.register_forward_hook(hook(n)) for n, m in model.named_modules() if hasattr(m, "e_score_correction_bias")
    ]
    with torch.no_grad():
        for ids in samples:
            model(input_ids=torch.tensor([ids]))
    for handle in handles:
        handle.remove()
    return {name: c.tolist() for name, c in counts.items()}


def run(
    checkpoint: Path, calibration: Path, out: Path, scheme_name: str, recipe_path: Path, target: Target | None
) -> dict:
    recipe = load_recipe(recipe_path)
    scheme = check_request(scheme_name, recipe, checkpoint, target)
    config = json.loads((checkpoint / "config.json").read_text())
    architecture = config["architectures"][0]
    if scheme_name == "awq-w4a16":
        recipe = _with_awq_mappings(recipe, architecture)
    verify(checkpoint)  # after the cheap refusals, before any weight is read
    needed = sizes.checkpoint_size(architecture, shape_from_hf_config(config), scheme_name).total
    require_space(out, needed)  # before hours of calibration, not when saving

    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modeling.moe.linearize import linearize_moe
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not torch.accelerator.is_available():
        # AWQ pins its activation cache, which needs an accelerator; pinning only speeds copies up.
        from llmcompressor.pipelines.cache import IntermediatesCache

        IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None

    samples = [json.loads(line)["input_ids"] for line in (calibration / "samples.jsonl").read_text().splitlines()]
    recorder = Recorder("compress", {"scheme": scheme_name, "recipe": recipe, "architecture": architecture})
    recorder.input("recipe", recipe_path)
    recorder.input("samples.jsonl", calibration / "samples.jsonl")
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype="auto", trust_remote_code=False)
    linearize_moe(model)
    routes = route_counts(model, samples) if scheme.needs_calibration else {}
    never_routed = {name: [i for i, n in enumerate(c) if n == 0] for name, c in routes.items() if 0 in c}
    dataset = Dataset.from_dict({"input_ids": samples, "attention_mask": [[1] * len(s) for s in samples]})
    started = time.time()
    with atomic_path(out, needed) as tmp:
        tmp.mkdir()
        (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
        oneshot(
            model=model,
            processor=tokenizer,
            dataset=dataset if scheme.needs_calibration else None,
            recipe=str(tmp / "recipe.yaml"),
            num_calibration_samples=len(samples),
            max_seq_length=max(len(s) for s in samples),
            shuffle_calibration_samples=False,
            moe_calibrate_all_experts=True,
        )
        seconds = time.time() - started
        model.save_pretrained(tmp, save_compressed=True)
        tokenizer.save_pretrained(tmp)
        for name in ("generation_config.json",):
            if (checkpoint / name).exists() and not (tmp / name).exists():
                shutil.copy2(checkpoint / name, tmp / name)
        recorder.results = {
            "oneshot_seconds": round(seconds, 1),
            "device": "cuda" if torch.cuda.is_available() else "cpu",
            "bit_exact": not torch.cuda.is_available(),
            "calibration_samples": len(samples),
            "tokens_per_expert": routes,
            "experts_never_routed": never_routed,
            "note": "every routed expert was calibrated on every token (moe_calibrate_all_experts); "
            "experts_never_routed lists those normal routing did not reach on this calibration set",
        }
        recorder.write(tmp)
    return recorder.results


# What vLLM's compressed-tensors loader reads, per format: tensor suffix -> (dtype, shape from out, in, group).
LAYOUTS = {
    "pack-quantized": {
        "weight_packed": ("I32", lambda o, i, g: [o, i // 8]),
        "weight_scale": (None, lambda o, i, g: [o, i // g]),
        "weight_shape": ("I64", lambda o, i, g: [2]),
    },
    "int-quantized": {"weight": ("I8", lambda o, i, g: [o, i]), "weight_scale": (None, lambda o, i, g: [o, 1])},
    "float-quantized": {"weight": ("F8_E4M3", lambda o, i, g: [o, i]), "weight_scale": (None, lambda o, i, g: [o, 1])},
}


def check_layout(artifact: Path, checkpoint: Path, scheme: Scheme) -> dict:
    """The config and tensors a vLLM load of this scheme expects; any mismatch fails before deployment."""
    from safetensors import safe_open

    config = json.loads((artifact / "config.json").read_text())
    quant = config.get("quantization_config") or {}
    problems = []
    if quant.get("quant_method") != "compressed-tensors":
        problems.append(f"quantization_config.quant_method is {quant.get('quant_method')!r}")
    if quant.get("format") != scheme.format:
        problems.append(f"format is {quant.get('format')!r}, vLLM needs {scheme.format!r} for {scheme.name}")
    tensors = {}
    for path in artifact.glob("*.safetensors"):
        with safe_open(path, "pt") as handle:
            for name in handle.keys():  # noqa: SIM118
                piece = handle.get_slice(name)
                tensors[name] = (piece.get_dtype(), list(piece.get_shape()))
    source = {}
    for path in checkpoint.glob("*.safetensors"):
        with safe_open(path, "pt") as handle:
            for name in handle.keys():  # noqa: SIM118
                source[name] = list(handle.get_slice(name).get_shape())
    # The group size the checkpoint was written with: a recipe may override the scheme's default.
    groups = [(g.get("weights") or {}).get("group_size") for g in (quant.get("config_groups") or {}).values()]
    group_size = next((g for g in groups if g), None) or scheme.group_size
    checked = 0
    for name in linear_input_widths(checkpoint):
        base = name.removesuffix(".weight")
        out_features, in_features = source[name]
        for suffix, (dtype, shape) in LAYOUTS[scheme.format].items():
            found = tensors.get(f"{base}.{suffix}")
            expected = shape(out_features, in_features, group_size or in_features)
            if found is None:
                problems.append(f"{base}.{suffix} is missing")
            elif (dtype and found[0] != dtype) or found[1] != expected:
                problems.append(f"{base}.{suffix} is {found[0]} {found[1]}, expected {dtype or 'float'} {expected}")
        checked += 1
    embedding = tensors.get("model.embed_tokens.weight")
    if embedding is None or embedding[0] not in ("BF16", "F16", "F32"):
        problems.append(f"model.embed_tokens.weight should stay 16-bit, found {embedding}")
    if problems:
        raise DeepcastError(
            f"{artifact} is not what vLLM expects for {scheme.name}: {'; '.join(problems[:5])}"
            f"{f' (and {len(problems) - 5} more)' if len(problems) > 5 else ''}. "
            "Fix: requantize with the default recipe."
        )
    return {"format": scheme.format, "quantized_linears": checked, "ignore": quant.get("ignore", [])}


def serving_check(artifact: Path) -> dict:
    """Load and run the checkpoint in vLLM where vLLM and a GPU exist; otherwise say why it was not served."""
    import importlib.util

    import torch

    if importlib.util.find_spec("vllm") is None:
        return {"status": "not served here", "reason": "vLLM is not installed on this machine"}
    if not torch.cuda.is_available():
        return {"status": "not served here", "reason": "no GPU is visible on this machine"}
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(artifact), max_model_len=512, enforce_eager=True, gpu_memory_utilization=0.5)
    completion = llm.generate(["ROMEO.\n"], SamplingParams(max_tokens=16, temperature=0))[0].outputs[0].text
    if not completion.strip():
        raise DeepcastError(f"vLLM loaded {artifact} but answered an empty completion.")
    return {"status": "served", "engine": "vllm", "completion": completion}


# [D] vLLM computes in bf16 with its own kernels; transformers scores the same checkpoint in float32 on the CPU.
# Measured on the embedded student's three schemes: see docs/compress.md. A broken load differs by far more.
SERVED_PERPLEXITY_TOLERANCE = 0.03
DECODE_TOKENS = 64
VLLM_CPU_READY_S = 600  # about 70 s on 2 cores for a tiny model: three processes import torch and load the kernels


def vllm_cpu_serving(bundle_dir: Path, model_name: str, chunks: list[list[int]], perplexity: float,
                     estimate: float | None, settings: ValidateSettings | None = None
                     ) -> tuple[dict, dict, dict]:  # fmt: skip
    """The bundle's own launch.sh with vllm-cpu on loopback: the fixed prompts twice (identical), the perplexity of
    the reference chunks from prompt log-probs against transformers' figure for the same checkpoint, decode
    tokens/s, the lm-eval tasks through the server, a clean stop. Returns the serving record, speed and tasks."""
    from deepcast import serving, validation

    try:
        python = serving.vllm_bin() / "python3"
    except DeepcastError as missing:
        reason = f"vllm-cpu is not installed here ({missing})"
        skipped = {"status": "skipped", "reason": reason}
        return {"status": "not served here", "reason": reason}, validation.not_measured(reason, estimate), skipped
    with serving.serving(bundle_dir, {"VLLM_PYTHON": str(python)}, VLLM_CPU_READY_S, "vLLM") as server:
        ask = _completions(server.url, model_name)
        runs = [[ask(prompt, validation.SMOKE_TOKENS)["text"] for prompt in validation.PROMPTS] for _ in range(2)]
        nll = scored = 0.0
        for ids in chunks:  # the second half of each chunk, as perplexity.compare scores it
            logprobs = ask(ids, 1, prompt_logprobs=0)["prompt_logprobs"]
            for position in range(len(ids) // 2 + 1, len(ids)):
                nll -= logprobs[position][str(ids[position])]["logprob"]
                scored += 1
        started = time.perf_counter()
        ask(validation.PROMPTS[0], 1)
        first_token_s = time.perf_counter() - started
        started = time.perf_counter()
        ask(validation.PROMPTS[0], DECODE_TOKENS + 1, ignore_eos=True)
        decode_s = time.perf_counter() - started - first_token_s
        task_scores = tasks.run(settings or ValidateSettings(), "vllm", base_url=server.url, model_name=model_name,
                                tokenizer_dir=bundle_dir)  # fmt: skip
    served_perplexity = math.exp(nll / scored)
    difference = abs(served_perplexity / perplexity - 1)
    problems = serving_problems(runs, served_perplexity, perplexity, server.exit_code)
    if problems:
        fix = "Fix: rebuild the bundle from a fresh compress run; if it persists, report it with the validation log."
        raise DeepcastError(f"vLLM served bundle {bundle_dir} with {'; '.join(problems)}. {fix}")
    record = {
        "status": "served", "engine": "vllm-cpu", "vllm_cpu_version": serving.VLLM_CPU_VERSION,
        "ready_s": server.ready_s, "completions": runs[0], "deterministic": True,
        "perplexity": round(served_perplexity, 6), "perplexity_transformers": perplexity,
        "relative_difference": round(difference, 6), "tolerance": SERVED_PERPLEXITY_TOLERANCE,
        "tokens_scored": int(scored), "exit_code": server.exit_code,
    }  # fmt: skip
    speed = {
        "status": "measured", "engine": "vllm-cpu (loopback server)",
        "decode_tokens_per_s": round(DECODE_TOKENS / decode_s, 1), "roofline_decode_tokens_per_s": estimate,
    }  # fmt: skip
    return record, speed, task_scores


def serving_problems(runs: list[list[str]], served_perplexity: float, perplexity: float, exit_code: int | None
                     ) -> list[str]:  # fmt: skip
    """What keeps a served bundle from passing: empty or differing greedy answers, a perplexity apart from
    transformers' on the same tokens, an unclean stop."""
    problems = []
    if any(not text.strip() for text in runs[0]):
        problems.append(f"an empty completion: {runs[0]}")
    if runs[0] != runs[1]:
        problems.append(f"greedy completions that differ between two runs: {runs[0]} then {runs[1]}")
    difference = abs(served_perplexity / perplexity - 1)
    if difference > SERVED_PERPLEXITY_TOLERANCE:
        problems.append(f"perplexity {served_perplexity:.4f} on the reference chunks where transformers computes "
                        f"{perplexity:.4f} for the same checkpoint ({difference:.1%} apart; at most "
                        f"{SERVED_PERPLEXITY_TOLERANCE:.0%} allowed)")  # fmt: skip
    if exit_code != 0:
        problems.append(f"exit {exit_code} when stopped (0 expected)")
    return problems


def _completions(url: str, model_name: str):
    """A caller of the server's /v1/completions at temperature 0; extra fields go into the request."""
    import urllib.request

    def ask(prompt: str | list[int], max_tokens: int, **extra) -> dict:
        body = {"model": model_name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}
        request = urllib.request.Request(
            f"{url}/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=300) as response:
            return json.loads(response.read())["choices"][0]

    return ask


def validate(
    artifact: Path,
    checkpoint: Path,
    reference_dir: Path,
    out: Path,
    scheme_name: str,
    batch_size: int,
    settings: ValidateSettings | None = None,
    target: Target | None = None,
    plan_file: Path | None = None,
    teacher: Path | None = None,
    device: str = "auto",
) -> dict:
    """Quality against the 16-bit model on the reference tokens, smoke, speed, tasks, the gate; for a distilled
    student, also against its teacher on the same tokens. Runs on the evaluation device (the GPU where one is)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deepcast import validation
    from deepcast.files import verify_checksums

    settings = settings or ValidateSettings()
    verify_checksums(artifact)
    scheme = SCHEMES[scheme_name]
    layout = check_layout(artifact, checkpoint, scheme)
    engine = json.loads((artifact / "server.json").read_text())["engine"]
    recorder = Recorder("compress_validate", {"scheme": scheme_name, "batch_size": batch_size, "engine": engine})
    recorder.input("manifest.json", artifact / "manifest.json")
    device = validation.pick_device(device)
    if scheme.format == "int-quantized":
        model, loader = load_int8_dequantized(artifact), "deepcast int8 dequantizer + per-token activation quantization"
    else:
        # On a GPU in bf16, as the reference runs there: compressed-tensors keeps what it decompresses in the
        # checkpoint's dtype on CUDA, and a float32 input then meets bf16 expert weights.
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        model = AutoModelForCausalLM.from_pretrained(artifact, dtype=dtype, trust_remote_code=False)
        loader = "transformers (compressed-tensors decompression)"
    model = model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(artifact)
    estimate = validation.roofline(plan_file, scheme_name)
    elsewhere = validation.hardware_here(target) if target else "no target given"
    quality = validation.against_reference(model, reference_dir, batch_size, teacher)
    task_scores = None  # measured through the server where one serves the bundle here
    if engine == "vllm-cpu" and elsewhere:
        served, speed = {"status": "not served here", "reason": elsewhere}, validation.not_measured(elsewhere, estimate)
    elif engine == "vllm-cpu":
        chunks = json.loads((reference_dir / "chunks.json").read_text())
        served, speed, task_scores = vllm_cpu_serving(artifact, scheme_name, chunks, quality["perplexity"], estimate,
                                                      settings)  # fmt: skip
    elif engine != "transformers":
        served, speed = serving_check(artifact), validation.not_measured(
            f"{engine} is the planned engine and vLLM is not installed here", estimate
        )
    else:
        served = {"status": "not served here", "reason": "the plan serves this scheme with transformers"}
        speed = validation.not_measured(elsewhere, estimate) if elsewhere else validation.transformers_speed(
            model, tokenizer, estimate
        )
    results = {
        **quality,
        "engine": engine,
        "loaded_with": loader,
        "layout": layout,
        "smoke": validation.transformers_smoke(model, tokenizer),
        "serving": served,
        "speed": speed,
        # As users evaluate deployments: through the bundle's server where it was served, else the checkpoint.
        "tasks": task_scores or tasks.run(settings, "hf", model, tokenizer),
        "size_bytes": sum(p.stat().st_size for p in artifact.glob("*.safetensors")),
    }
    reference_tasks = tasks.reference_scores(reference_dir)
    results["gate"] = gates.apply(str(artifact.parent), scheme_name, results, settings, reference_tasks)
    return recorder.save(out, results, {"validation.json": json.dumps(results, indent=2) + "\n"})


VLLM_README = """# {title}

Start: `./launch.sh` (an OpenAI-compatible server: vLLM on port 8000, or `transformers serve` where the
plan chose transformers). It checks every file against `SHA256SUMS` first and refuses to start on a mismatch.

| | |
|---|---|
| scheme | {scheme} (compressed-tensors, {format}) |
| engine | {engine} |
| flags | `{flags}` |
| placement | {notes} |
| weights | {weights_gb:.2f} GB |
| GPU memory | {gpu_gb:.2f} GB per GPU at {length} tokens of context |
| KV cache | {kv} bytes per token |
"""


def bundle(artifact: Path, target: Target, out: Path, scheme_name: str, engine: str = "vllm") -> dict:
    """A bundle for `engine` (vllm, vllm-cpu or transformers): the compressed checkpoint, launch.sh with
    the target's flags, README, checksums."""
    from deepcast import planner
    from deepcast.files import link_or_copy, write_checksums, write_launch_script
    from deepcast.manifest import read
    from deepcast.registry import shape_from_hf_config

    verify(artifact)  # the bundle's checksums are taken from these files: they must be the ones compress wrote
    shape = shape_from_hf_config(json.loads((artifact / "config.json").read_text()))
    weights_gb = sum(p.stat().st_size for p in artifact.glob("*.safetensors")) / planner.GB
    plan = planner.plan_vllm(shape, target, weights_gb, engine)
    recorder = Recorder("vllm_bundle", {"target": target.name, "scheme": scheme_name, "plan": plan.as_dict()})
    recorder.input("manifest.json", artifact / "manifest.json")
    source = read(artifact)
    with atomic_path(out) as tmp:
        tmp.mkdir()
        for path in sorted(artifact.iterdir()):
            if path.is_file() and path.name != "manifest.json":
                link_or_copy(path, tmp / path.name)
        flags = " ".join(plan.serve_flags())
        served = f"--served-model-name {scheme_name}"
        title = f"{scheme_name} of {source['params']['architecture']} on {target.name}"
        if engine == "transformers":  # CPU: vLLM's CPU backend has no kernel for this scheme
            header = (
                f"# Serve {title} with `transformers serve` (needs transformers[serving]); extra arguments go to it."
            )
            command = 'transformers serve "$(pwd)"'
            preflight = ""
        elif engine == "vllm-cpu":
            header = (
                f"# Serve {title} with vLLM's CPU backend (vllm-cpu {VLLM_CPU_VERSION}, from\n"
                "# `deepcast tools install vllm`). VLLM_PYTHON is that environment's python (default: python3 on\n"
                "# PATH); extra arguments go to the server (for example --port 8000). The package's `vllm` command\n"
                "# fails on its own package name, so the module runs it."
            )
            command = f'"$VLLM_PYTHON" -m vllm.entrypoints.openai.api_server --model "$(pwd)" {served} {flags}'
            preflight = (
                'VLLM_PYTHON="${VLLM_PYTHON:-python3}"\n'
                f'export VLLM_CPU_KVCACHE_SPACE="${{VLLM_CPU_KVCACHE_SPACE:-{plan.cpu_kv_cache_gib()}}}"\n'
                'export HF_HUB_OFFLINE=1\n'
            )
        else:
            header = f"# Serve {title} with vLLM. Extra arguments go to `vllm serve` (for example --port 8000)."
            command = f'vllm serve "$(pwd)" {served} {flags}'
            preflight = ""
        write_launch_script(tmp, header, command, preflight)
        (tmp / "server.json").write_text(json.dumps(plan.as_dict(), indent=2) + "\n")
        (tmp / "README.md").write_text(VLLM_README.format(
            title=title, scheme=scheme_name, format=SCHEMES[scheme_name].format, engine=plan.engine, flags=flags,
            notes="; ".join(plan.notes), weights_gb=plan.weights_gb, gpu_gb=plan.gpu_memory_gb,
            length=plan.max_model_len, kv=plan.kv_bytes_per_token,
        ))  # fmt: skip
        recorder.results = {"serve_flags": plan.serve_flags(), "files": sorted(write_checksums(tmp))}
        recorder.write(tmp)
    return recorder.results


def load_int8_dequantized(artifact: Path):
    """W8A8 checkpoints in the int-quantized format vLLM serves, evaluated by transformers on any device.

    transformers 5.17 cannot regroup int-quantized MoE experts into its fused layout, so the int8
    weights are dequantized (weight * weight_scale, per output channel) into a float copy, and every
    quantized Linear quantizes its input per token to int8 and back, as vLLM's dynamic W8A8 does.
    """
    import torch
    from safetensors.torch import load_file

    from deepcast.validation import dequantized_model

    tensors = {}
    for path in sorted(artifact.glob("*.safetensors")):
        tensors.update(load_file(path))
    dense, quantized = {}, set()
    for name, tensor in tensors.items():
        base = name.removesuffix(".weight")
        if name.endswith(".weight_scale"):
            continue
        if name.endswith(".weight") and tensor.dtype == torch.int8:
            dense[name] = tensor.float() * tensors[f"{base}.weight_scale"].float()
            quantized.add(base)
        else:
            dense[name] = tensor.float() if tensor.is_floating_point() else tensor
    model = dequantized_model(artifact, dense)

    def quantize_input(_module, inputs):
        (x,) = inputs
        scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-8) / 127
        return (torch.round(x / scale).clamp(-128, 127) * scale,)

    hooked = {name for name, module in model.named_modules() if name in quantized}
    if hooked != quantized:
        raise DeepcastError(f"{len(quantized - hooked)} int8 layers have no module to evaluate them in, "
                            f"e.g. {sorted(quantized - hooked)[:2]}.")  # fmt: skip
    for name, module in model.named_modules():
        if name in quantized:
            module.register_forward_pre_hook(quantize_input)
    return model
