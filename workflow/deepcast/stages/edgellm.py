"""TensorRT Edge-LLM for Jetson: the ONNX export made on this host, the engine built on the device.

The pinned tensorrt-edgellm package exports (and for INT4/INT8 first quantizes, with the shared
calibration text) on the CPU; it pins its own torch, transformers and onnx, so it lives in its own
environment in the cache (`deepcast tools install edgellm`). The engine build (`llm_build`) needs
TensorRT and the device itself: engines are tied to the GPU and the TensorRT version, so the bundle
carries the export and `build_on_device.sh`, and that step is "not run here" on any other machine.
INT8 is ModelOpt's explicit SmoothQuant (Q/DQ nodes), not TensorRT's implicit INT8 calibrator, which
is deprecated since TensorRT 10.1 and removed in TensorRT 11.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from deepcast.errors import DeepcastError
from deepcast.files import atomic_path, cache_root
from deepcast.manifest import Recorder, verify
from deepcast.registry import Target

VERSION = "0.11.0"
# The export extra's own pins, plus ModelOpt and datasets for quantization (its `tools` extra pins these).
PACKAGES = ["torch==2.13.0", f"tensorrt-edgellm[export]=={VERSION}", "nvidia-modelopt==0.45.0", "datasets==5.0.0"]
QUANTIZATION = {"edgellm-fp16": None, "edgellm-int8": "int8_sq", "edgellm-int4": "int4_awq"}
ARCHITECTURES = ("Qwen2ForCausalLM", "LlamaForCausalLM")
JETPACK = "7.2"  # Orin's official JetPack for Edge-LLM 0.11 (CUDA 13.2)
CALIBRATION_SAMPLES = 16


def environment() -> Path:
    return cache_root() / "edgellm" / VERSION


def install(log=print) -> Path:
    """The exporter's own virtual environment in the cache (its pins conflict with deepcast's)."""
    from deepcast.tools import own_environment

    return own_environment(environment(), PACKAGES, log)


def _tool(name: str) -> Path:
    from deepcast.tools import environment_tool

    return environment_tool(environment(), name, "deepcast tools install edgellm")


def check_request(fmt: str, checkpoint: Path) -> str | None:
    if fmt not in QUANTIZATION:
        raise DeepcastError(f"unknown Edge-LLM format {fmt!r}. Fix: use one of {', '.join(QUANTIZATION)}.")
    architecture = json.loads((checkpoint / "config.json").read_text())["architectures"][0]
    if architecture not in ARCHITECTURES:
        raise DeepcastError(
            f"{fmt} is refused for {architecture}: Edge-LLM's attention plugin implements MHA/GQA "
            "only, not DeepSeek-V2/V3 multi-head latent attention. Fix: GGUF on the Jetson, or a "
            "distilled dense student."
        )
    return QUANTIZATION[fmt]


def _run(command: list, env: dict | None = None) -> None:
    print("$ " + " ".join(map(str, command)), flush=True)
    finished = subprocess.run(list(map(str, command)), stdout=sys.stdout, stderr=subprocess.STDOUT, env=env)
    if finished.returncode != 0:
        raise DeepcastError(
            f"{Path(command[0]).name} failed ({finished.returncode}); its output is in this rule's "
            "log. Fix: the message there."
        )


def export(checkpoint: Path, calibration: Path, out: Path, fmt: str) -> dict:
    """Quantize (INT4-AWQ, INT8-SQ) with the calibration text, then export the ONNX the device builds from."""
    quantization = check_request(fmt, checkpoint)
    exporter = _tool("tensorrt-edgellm-export")
    verify(checkpoint)  # after the cheap refusals, before the exporter reads any weight
    recorder = Recorder("edgellm_export", {"format": fmt, "quantization": quantization, "version": VERSION})
    started = time.time()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("HF_TOKEN", None)
    with atomic_path(out) as tmp:
        tmp.mkdir()
        source = checkpoint
        if quantization:
            recorder.input("samples.jsonl", calibration / "samples.jsonl")
            articles = tmp / "calibration.jsonl"
            _calibration_articles(calibration, checkpoint, articles)
            env["EDGELLM_QUANT_DATASET_CNN_DAILYMAIL"] = str(articles)  # its local-file override of the hub set
            _run(
                [
                    _tool("tensorrt-edgellm-quantize"),
                    "llm",
                    "--model_dir",
                    checkpoint,
                    "--output_dir",
                    tmp / "quant",
                    "--quantization",
                    quantization,
                    "--device",
                    "cpu",
                    "--num_samples",
                    CALIBRATION_SAMPLES,
                ],
                env,
            )
            source = tmp / "quant"
        _run([exporter, source, tmp / "onnx"], env)
        from deepcast.files import remove

        remove(tmp / "quant")
        remove(tmp / "calibration.jsonl")
        graph = tmp / "onnx" / "llm"
        if not (graph / "model.onnx").is_file():
            raise DeepcastError(f"the Edge-LLM export wrote no {graph / 'model.onnx'}. Fix: see this rule's log.")
        recorder.results = {
            "quantization": quantization,
            "export_seconds": round(time.time() - started, 1),
            "size_bytes": sum(p.stat().st_size for p in graph.iterdir()),
        }
        recorder.write(tmp)
    return recorder.results


def _calibration_articles(calibration: Path, checkpoint: Path, out: Path) -> None:
    """The shared calibration samples as the {"article": text} records Edge-LLM's quantizer reads."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    lines = (calibration / "samples.jsonl").read_text().splitlines()[:CALIBRATION_SAMPLES]
    out.write_text(
        "".join(json.dumps({"article": tokenizer.decode(json.loads(line)["input_ids"])}) + "\n" for line in lines)
    )


BUILD_ON_DEVICE = """#!/usr/bin/env bash
# Build and run the TensorRT Edge-LLM engine of this export ON THE JETSON ({target}).
# Needs JetPack {jetpack} (CUDA 13.2, TensorRT 10.x) and TensorRT Edge-LLM {version}'s C++ tree (the same
# version that exported onnx/: exports and engines are not portable across Edge-LLM or TensorRT versions).
#   EDGELLM_SRC=/path/to/TensorRT-Edge-LLM ./build_on_device.sh
set -euo pipefail
cd "$(dirname "$0")"
sha256sum --quiet --strict -c SHA256SUMS || {{ echo "bundle files do not match SHA256SUMS" >&2; exit 3; }}
[ "$(uname -m)" = aarch64 ] || {{ echo "run this on the Jetson (aarch64), not $(uname -m)" >&2; exit 4; }}
grep -q "R3[6-9]\\|R4" /etc/nv_tegra_release 2>/dev/null || echo "warning: JetPack {jetpack} expected" >&2
: "${{EDGELLM_SRC:?set EDGELLM_SRC to a TensorRT-Edge-LLM {version} checkout}}"
cmake -S "$EDGELLM_SRC" -B "$EDGELLM_SRC/build" -DTRT_PACKAGE_DIR=/usr -DCUDA_CTK_VERSION=13.2 \\
    -DEMBEDDED_TARGET=jetson-orin
cmake --build "$EDGELLM_SRC/build" -j"$(nproc)"
"$EDGELLM_SRC/build/examples/llm/llm_build" --onnxDir onnx/llm --engineDir engines --maxBatchSize {batch} \\
    --maxInputLen {input_len} --maxKVCacheCapacity {kv_capacity}
"$EDGELLM_SRC/build/examples/llm/llm_inference" --engineDir engines --inputFile input.json --outputFile output.json
cat output.json
"""

EDGELLM_README = """# {fmt} on {target} (TensorRT Edge-LLM)

`onnx/llm/` is the Edge-LLM export of {architecture} ({quantization}), made on the host; `build_on_device.sh` builds
the TensorRT engine on the Jetson and answers `input.json` (not run here: no Jetson, no TensorRT on the host).

| | |
|---|---|
| device | {description}, JetPack {jetpack} (CUDA 13.2); FP16, INT8 and INT4 only on Orin (no FP8/NVFP4) |
| weights | {weights_gb:.2f} GB in the export |
| KV cache | {kv_capacity:,} tokens ({kv} bytes per token; the plan's context on the shared {memory:.0f} GB) |
| build | `llm_build --maxBatchSize {batch} --maxInputLen {input_len} --maxKVCacheCapacity {kv_capacity}` |

INT8 is explicit quantization (ModelOpt SmoothQuant, Q/DQ nodes in the graph), not TensorRT's INT8 calibrator:
`IInt8EntropyCalibrator2` is deprecated since TensorRT 10.1 and removed in TensorRT 11.
"""


def bundle(artifact: Path, target: Target, out: Path, fmt: str) -> dict:
    """The export (hard links), build_on_device.sh with the plan's sizes, input.json, README, checksums."""
    from deepcast import planner
    from deepcast.files import link_or_copy, write_checksums
    from deepcast.manifest import read
    from deepcast.registry import shape_from_hf_config

    if target.gpu is None or target.gpu.interconnect != "unified":
        raise DeepcastError(
            f"Edge-LLM bundles are for Jetson targets; {target.name} is not one. "
            "Fix: a Jetson target, or trtllm-*/onnx-* formats for this one."
        )
    graph = artifact / "onnx" / "llm"
    runtime = json.loads((graph / "config.json").read_text())
    shape = shape_from_hf_config({**runtime, "architectures": ["LlamaForCausalLM"]})
    weights_gb = read(artifact)["results"]["size_bytes"] / planner.GB
    placed = planner.plan_vllm(shape, target, weights_gb, engine="tensorrt-edge-llm")
    sizes = {"batch": 1, "input_len": min(1024, placed.max_model_len), "kv_capacity": placed.max_model_len}
    recorder = Recorder("edgellm_bundle", {"target": target.name, "format": fmt, **sizes})
    recorder.input("model.onnx", graph / "model.onnx")
    with atomic_path(out) as tmp:
        (tmp / "onnx" / "llm").mkdir(parents=True)
        for path in sorted(graph.iterdir()):
            link_or_copy(path, tmp / "onnx" / "llm" / path.name)
        script = tmp / "build_on_device.sh"
        script.write_text(BUILD_ON_DEVICE.format(target=target.name, jetpack=JETPACK, version=VERSION, **sizes))
        script.chmod(0o755)
        request = {
            "batch_size": 1,
            "temperature": 0.0,
            "max_generate_length": 64,
            "requests": [{"messages": [{"role": "user", "content": "ROMEO."}]}],
        }
        (tmp / "input.json").write_text(json.dumps(request, indent=2) + "\n")
        (tmp / "README.md").write_text(
            EDGELLM_README.format(
                fmt=fmt,
                target=target.name,
                architecture=runtime.get("model"),
                quantization=QUANTIZATION[fmt] or "fp16",
                description=target.description,
                jetpack=JETPACK,
                weights_gb=weights_gb,
                kv=placed.kv_bytes_per_token,
                memory=target.gpu.memory_gb,
                **sizes,
            )
        )
        recorder.results = {**sizes, "files": sorted(write_checksums(tmp))}
        recorder.write(tmp)
    return recorder.results


PLUGINS = {None: "AttentionPlugin", "int4_awq": "Int4GroupwiseGemmPlugin", "int8_sq": "QuantizeLinear"}


def validate(bundle_dir: Path, out: Path, fmt: str) -> dict:
    """What can be checked off the device: checksums, the graph parses with its external data, the plugin
    and quantization nodes the format needs are there; the engine build and its answers are not run here."""
    from deepcast.files import verify_checksums
    from deepcast.stages.onnx import check_graph

    verify_checksums(bundle_dir)
    graph = bundle_dir / "onnx" / "llm" / "model.onnx"
    model = check_graph(graph)
    operators = sorted({node.op_type for node in model.graph.node})
    needed = {PLUGINS[None], PLUGINS[QUANTIZATION[fmt]]}
    missing = sorted(op for op in needed if not any(op in found for found in operators))
    if missing:
        raise DeepcastError(
            f"{graph} lacks the {', '.join(missing)} node(s) a {fmt} engine build needs. "
            "Fix: delete the export and rerun edgellm_export."
        )
    recorder = Recorder("edgellm_validate", {"format": fmt})
    recorder.input("model.onnx", graph)
    reason = "the engine is built on the Jetson with TensorRT (build_on_device.sh); this machine is not one"
    results = {
        "engine": "tensorrt-edge-llm",
        "graph": {
            "status": "passed",
            "operators": operators,
            "nodes": len(model.graph.node),
            "opset": [f"{o.domain or 'ai.onnx'}:{o.version}" for o in model.opset_import],
        },
        "engine_build": {"status": "not run here", "reason": reason},
        "quality": {"status": "not run here", "reason": "the graph needs Edge-LLM's TensorRT plugins to run"},
        "speed": {"status": "not measured here", "reason": reason},
        "size_bytes": sum(p.stat().st_size for p in graph.parent.iterdir()),
        "gate": {"status": "not run here", "reason": "no quality figures off the device"},
    }
    return recorder.save(out, results, {"validation.json": json.dumps(results, indent=2) + "\n"})
