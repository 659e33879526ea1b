"""ONNX Runtime GenAI: the model builder's fp32/fp16/int4 graphs for the CPU or CUDA execution provider.

The builder covers Qwen2 and Llama (the R1-Distill bases), not MLA; a DeepSeek-V2/V3 model is refused
before any work. Its INT4 is weight-only (k_quant or rtn, no calibration data), so every ONNX format
reads the checkpoint alone. Validation runs the graph through onnxruntime-genai on this machine's CPU:
one append of each reference chunk returns the logits of the whole chunk, so perplexity, KL divergence
and top-1 agreement compare with every other format on the same tokens.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from deepcast import gates
from deepcast.config import OnnxSettings, ValidateSettings
from deepcast.errors import DeepcastError
from deepcast.files import atomic_path
from deepcast.manifest import Recorder, verify
from deepcast.registry import Target

GENAI_VERSION = "0.18.0"  # requirements.lock; the builder's options and graph layout change between releases
PRECISION = {"onnx-fp32": "fp32", "onnx-fp16": "fp16", "onnx-int4": "int4"}
# What the builder offers per execution provider (its printed valid combinations).
PROVIDERS = {"cpu": ("fp32", "int4"), "cuda": ("fp32", "fp16", "int4")}
ARCHITECTURES = ("Qwen2ForCausalLM", "LlamaForCausalLM")
CUDA_NOT_RUN = " (the graph was built for CUDA; its CUDA run is not run here)"


def genai_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("onnxruntime-genai")
    except metadata.PackageNotFoundError:
        raise DeepcastError(
            f"onnxruntime-genai is not installed. Fix: `make install` (it pins onnxruntime-genai=={GENAI_VERSION})."
        ) from None


def provider_for(target: Target | None) -> str:
    return "cuda" if target is not None and target.gpu is not None else "cpu"


def check_request(fmt: str, provider: str, checkpoint: Path) -> str:
    """Refuse, before any work, what the builder cannot make; return the builder's precision."""
    precision = PRECISION.get(fmt)
    if precision is None:
        raise DeepcastError(f"unknown ONNX format {fmt!r}. Fix: use one of {', '.join(PRECISION)}.")
    if precision not in PROVIDERS.get(provider, ()):
        offered = ", ".join(f"onnx-{p}" for p in PROVIDERS.get(provider, ()))
        raise DeepcastError(f"the builder writes no {fmt} graph for the {provider} provider. Fix: use {offered}.")
    version = genai_version()
    if version != GENAI_VERSION:
        raise DeepcastError(
            f"onnxruntime-genai {version} is installed; deepcast drives the {GENAI_VERSION} builder. "
            f"Fix: pip install onnxruntime-genai=={GENAI_VERSION} (make install)."
        )
    architecture = json.loads((checkpoint / "config.json").read_text())["architectures"][0]
    if architecture not in ARCHITECTURES:
        raise DeepcastError(
            f"{fmt} is refused for {architecture}: the onnxruntime-genai model builder covers "
            f"{', '.join(ARCHITECTURES)} "
            "(the R1-Distill bases), not DeepSeek-V2/V3 multi-head latent attention. Fix: GGUF or a vLLM scheme for "
            "this model, or ONNX for a distilled dense student."
        )
    return precision


def build(checkpoint: Path, out: Path, fmt: str, provider: str, settings: OnnxSettings) -> dict:
    """Run the pinned model builder into a temporary directory, then move the graph into place."""
    precision = check_request(fmt, provider, checkpoint)
    verify(checkpoint)  # after the cheap refusals, before the builder reads any weight
    options = ["hf_remote=false", "hf_token=false"]
    if precision == "int4":
        options += [f"algo_config={settings.int4_algorithm}", f"block_size={settings.int4_block_size}"]
    recorder = Recorder("onnx_build", {"format": fmt, "provider": provider, "extra_options": options})
    started = time.time()
    with atomic_path(out) as tmp, tempfile.TemporaryDirectory() as cache:
        command = [
            sys.executable,
            "-m",
            "onnxruntime_genai.models.builder",
            "-i",
            str(checkpoint),
            "-o",
            str(tmp),
            "-p",
            precision,
            "-e",
            provider,
            "-c",
            cache,
            "--extra_options",
            *options,
        ]
        print("$ " + " ".join(command), flush=True)
        finished = subprocess.run(command, stdout=sys.stdout, stderr=subprocess.STDOUT, check=False)
        if finished.returncode != 0 or not (tmp / "model.onnx").is_file():
            raise DeepcastError(
                f"the onnxruntime-genai builder failed ({finished.returncode}) for {fmt} on {provider}; "
                "its output is in this rule's log. Fix: the message there."
            )
        genai_config = json.loads((tmp / "genai_config.json").read_text())
        recorder.results = {
            "precision": precision,
            "provider": provider,
            "build_seconds": round(time.time() - started, 1),
            "builder_command": [
                "python",
                "-m",
                "onnxruntime_genai.models.builder",
                "-i",
                "CHECKPOINT",
                "-o",
                "OUT",
                "-p",
                precision,
                "-e",
                provider,
                "--extra_options",
                *options,
            ],
            "size_bytes": sum(p.stat().st_size for p in tmp.glob("model.onnx*")),
            "context_length": genai_config["model"]["context_length"],
        }
        recorder.write(tmp)
    return recorder.results


def check_graph(graph: Path):
    """The ONNX file parses and every external tensor lies inside its data file. (onnx.checker refuses
    hard-linked data files, which is how bundles share them; loading the graph in a session checks the rest.)"""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load(str(graph), load_external_data=False)
    except (DecodeError, OSError, ValueError) as error:
        raise DeepcastError(
            f"{graph} does not parse: {error}. Fix: delete the bundle and the graph it was made from, then rerun them."
        ) from None
    if not model.graph.node:
        raise DeepcastError(f"{graph} has no nodes. Fix: delete the bundle and the graph it was made from, rerun them.")
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        data = graph.parent / info["location"]
        end = int(info.get("offset", 0)) + int(info.get("length", 0))
        if not data.is_file() or data.stat().st_size < end:
            raise DeepcastError(
                f"{graph}'s tensor {tensor.name} lies beyond {data.name} (truncated or missing). "
                "Fix: delete the bundle and the graph it was made from, then rerun them."
            )
    return model


class GenaiModel:
    """An onnxruntime-genai model on the CPU provider, called like a transformers model for perplexity."""

    def __init__(self, directory: Path):
        import onnxruntime_genai as og

        config = og.Config(str(directory))
        config.clear_providers()  # the CPU provider, whatever the graph was built for
        self.og, self.model = og, og.Model(config)

    def __call__(self, input_ids):
        import numpy as np
        import torch

        rows = []
        for row in input_ids.numpy().astype(np.int32):
            params = self.og.GeneratorParams(self.model)
            params.set_search_options(max_length=len(row), batch_size=1)
            generator = self.og.Generator(self.model, params)
            generator.append_tokens(row[None, :])
            rows.append(torch.from_numpy(np.asarray(generator.get_output("logits"), dtype=np.float32)[0]))
        return SimpleNamespace(logits=torch.stack(rows))

    def greedy(self, ids: list[int], new_tokens: int) -> list[int]:
        import numpy as np

        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(ids) + new_tokens, do_sample=False, batch_size=1)
        generator = self.og.Generator(self.model, params)
        generator.append_tokens(np.array([ids], dtype=np.int32))
        out = []
        while not generator.is_done() and len(out) < new_tokens:
            generator.generate_next_token()
            out.append(int(generator.get_next_tokens()[0]))
        return out


def smoke(model: GenaiModel, tokenizer) -> dict:
    """Greedy completions of the fixed prompts, twice: non-empty and identical."""
    from deepcast.validation import PROMPTS, SMOKE_TOKENS

    runs = []
    for _ in range(2):
        runs.append(
            [
                tokenizer.decode(model.greedy(tokenizer(p).input_ids, SMOKE_TOKENS), skip_special_tokens=True)
                for p in PROMPTS
            ]
        )
    if any(not text.strip() for text in runs[0]):
        raise DeepcastError(f"onnxruntime-genai gave an empty completion: {runs[0]}")
    if runs[0] != runs[1]:
        raise DeepcastError(f"onnxruntime-genai's greedy generation is not deterministic: {runs[0]} then {runs[1]}")
    return {
        "status": "passed",
        "engine": "onnxruntime-genai (CPU provider)",
        "deterministic": True,
        "completions": runs[0],
    }


def cpu_speed(
    model: GenaiModel, vocab: int, estimate: float | None, prompt_tokens: int = 256, new_tokens: int = 32
) -> dict:
    """Prompt and decode tokens per second through onnxruntime-genai on this machine's CPU."""
    import numpy as np
    import torch

    ids = np.random.default_rng(0).integers(100, vocab - 1, prompt_tokens).tolist()
    started = time.perf_counter()
    model(input_ids=torch.tensor([ids]))
    prompt_s = time.perf_counter() - started
    started = time.perf_counter()
    produced = len(model.greedy(ids[:8], new_tokens))
    decode_s = time.perf_counter() - started
    return {
        "status": "measured",
        "engine": "onnxruntime-genai",
        "where": "this machine's CPU, CPU provider",
        "prompt_tokens_per_s": round(prompt_tokens / prompt_s, 1),
        "decode_tokens_per_s": round(produced / decode_s, 1),
        "roofline_decode_tokens_per_s": estimate,
    }


def validate(
    bundle_dir: Path,
    reference_dir: Path,
    out: Path,
    fmt: str,
    batch_size: int,
    settings: ValidateSettings | None = None,
    target: Target | None = None,
    plan_file: Path | None = None,
    teacher: Path | None = None,
) -> dict:
    """Quality against the 16-bit model on the reference tokens, smoke prompts twice and CPU speed, all through
    onnxruntime-genai; the gate."""
    from transformers import AutoTokenizer

    from deepcast import validation
    from deepcast.files import verify_checksums

    settings = settings or ValidateSettings()
    verify_checksums(bundle_dir)
    check_graph(bundle_dir / "model.onnx")
    provider = json.loads((bundle_dir / "bundle.json").read_text())["provider"]
    recorder = Recorder("onnx_validate", {"format": fmt, "provider": provider, "batch_size": batch_size})
    recorder.input("model.onnx", bundle_dir / "model.onnx")
    model = GenaiModel(bundle_dir)
    vocab = json.loads((bundle_dir / "genai_config.json").read_text())["model"]["vocab_size"]
    results = {
        **validation.against_reference(model, reference_dir, batch_size, teacher),
        "engine": "onnxruntime-genai",
        "built_for": provider,
        "evaluated_on": "CPU provider" + (CUDA_NOT_RUN if provider == "cuda" else ""),
        "smoke": smoke(model, AutoTokenizer.from_pretrained(bundle_dir)),
        "speed": cpu_speed(model, vocab, validation.roofline(plan_file, fmt)),
        "size_bytes": sum(p.stat().st_size for p in bundle_dir.glob("model.onnx*")),
    }
    if provider == "cuda":
        results["speed"]["note"] = "this machine's CPU, not the target's GPU"
    results["gate"] = gates.apply(str(bundle_dir.parent), fmt, results, settings)
    return recorder.save(out, results, {"validation.json": json.dumps(results, indent=2) + "\n"})


CHAT = '''"""Chat with this bundle through onnxruntime-genai: python3 chat.py "a prompt" [max new tokens]."""

import sys
from pathlib import Path

import onnxruntime_genai as og

model = og.Model(str(Path(__file__).parent))
tokenizer = og.Tokenizer(model)
prompt = sys.argv[1] if len(sys.argv) > 1 else sys.stdin.read()
params = og.GeneratorParams(model)
ids = tokenizer.encode(prompt)
params.set_search_options(max_length=len(ids) + int(sys.argv[2] if len(sys.argv) > 2 else 256), do_sample=False)
generator = og.Generator(model, params)
generator.append_tokens(ids)
stream = tokenizer.create_stream()
while not generator.is_done():
    generator.generate_next_token()
    print(stream.decode(generator.get_next_tokens()[0]), end="", flush=True)
print()
'''

ONNX_README = """# {title}

Start: `./launch.sh "a prompt"` (greedy completion through onnxruntime-genai's {provider} provider; the
bundle's `chat.py`). It checks every file against `SHA256SUMS` and that {package} is installed first.

| | |
|---|---|
| format | {fmt} (onnxruntime-genai model builder, `-p {precision} -e {provider}`) |
| engine | onnxruntime-genai {version} ({package}) |
| placement | {placement} |
| weights | {weights_gb:.2f} GB (model.onnx and its external data) |
| context | {context:,} tokens ({memory}) |

The graph uses com.microsoft contrib operators (GroupQueryAttention, MatMulNBits): it runs in ONNX Runtime,
not in a bare TensorRT build. Build command: `{command}`.
"""


def bundle(artifact: Path, target: Target, out: Path, fmt: str) -> dict:
    """The ONNX files, genai_config.json and tokenizer (hard links), chat.py, launch.sh, README, checksums."""
    from deepcast import planner
    from deepcast.files import link_or_copy, write_checksums, write_launch_script
    from deepcast.manifest import read
    from deepcast.registry import shape_from_hf_config

    built = read(artifact)["results"]
    provider = built["provider"]
    if provider != provider_for(target):
        raise DeepcastError(
            f"{artifact} was built for the {provider} provider; target {target.name} needs "
            f"{provider_for(target)}. Fix: rerun onnx_build for this target."
        )
    weights_gb = built["size_bytes"] / planner.GB
    config = json.loads((artifact / "genai_config.json").read_text())["model"]
    shape = shape_from_hf_config(
        {
            "architectures": ["LlamaForCausalLM"],
            "hidden_size": config["decoder"]["hidden_size"],
            "num_hidden_layers": config["decoder"]["num_hidden_layers"],
            "num_attention_heads": config["decoder"]["num_attention_heads"],
            "num_key_value_heads": config["decoder"]["num_key_value_heads"],
            "head_dim": config["decoder"]["head_size"],
            "vocab_size": config["vocab_size"],
            "intermediate_size": 1,
            "max_position_embeddings": config["context_length"],
        }
    )
    one_device = (
        target if target.gpu is None else target.model_copy(update={"gpu": target.gpu.model_copy(update={"count": 1})})
    )
    placed = planner.plan_vllm(shape, one_device, weights_gb, engine="onnxruntime-genai")
    package = "onnxruntime-genai-cuda" if provider == "cuda" else "onnxruntime-genai"
    recorder = Recorder("onnx_bundle", {"target": target.name, "format": fmt, "provider": provider})
    recorder.input("manifest.json", artifact / "manifest.json")
    with atomic_path(out) as tmp:
        tmp.mkdir()
        for path in sorted(artifact.iterdir()):
            if path.is_file() and path.name != "manifest.json":
                link_or_copy(path, tmp / path.name)
        (tmp / "chat.py").write_text(CHAT)
        (tmp / "bundle.json").write_text(
            json.dumps(
                {
                    "format": fmt,
                    "provider": provider,
                    "package": package,
                    "version": GENAI_VERSION,
                    "context": placed.max_model_len,
                },
                indent=2,
            )
            + "\n"
        )
        preflight = (
            "python3 -c 'import onnxruntime_genai' 2>/dev/null || "
            f"{{ echo 'onnxruntime-genai is not installed: pip install {package}=={GENAI_VERSION}' >&2; exit 4; }}\n"
        )
        header = f"# Greedy completion with {fmt} through onnxruntime-genai ({provider}). Arguments go to chat.py."
        write_launch_script(tmp, header, "python3 chat.py", preflight)
        memory = (
            f"{placed.gpu_memory_gb:.2f} GB of GPU memory with the KV cache"
            if target.gpu
            else f"{weights_gb:.2f} GB of RAM for the weights plus the KV cache"
        )
        (tmp / "README.md").write_text(
            ONNX_README.format(
                title=f"{fmt} on {target.name}",
                provider=provider,
                package=package,
                fmt=fmt,
                precision=built["precision"],
                version=GENAI_VERSION,
                placement="; ".join(placed.notes),
                weights_gb=weights_gb,
                context=placed.max_model_len,
                memory=memory,
                command=" ".join(built["builder_command"]),
            )
        )
        recorder.results = {
            "provider": provider,
            "context": placed.max_model_len,
            "files": sorted(write_checksums(tmp)),
        }
        recorder.write(tmp)
    return recorder.results
