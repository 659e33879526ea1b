"""Time deepcast's TensorRT-LLM quantize step (`deepcast.stages.trtllm.quantize`: ModelOpt's mtq.quantize over
the calibration samples, its fake-quant figures on the reference tokens, export_hf_checkpoint) on a
random-weight model of DeepSeek-R1-Distill-Qwen-1.5B's shape (Qwen2ForCausalLM: hidden 1536, 28 layers,
12/2 heads, FFN 8960, vocab 151936, untied embeddings, bfloat16), once per format.

Everything the stage reads is made here with fixed seeds: the checkpoint (plus the embedded tiny-llama-student
tokenizer, whose vocabulary does not match; calibration and reference go by token ids, so it only has to
load), 64 calibration samples of 512 random ids below 100000 and 8 reference chunks of 512. ModelOpt's CUDA
extensions are JIT-compiled (or found missing) in a timed step of their own before the first format, so
the stage's quantize_seconds do not include a compile.

Recorded per format: the stage's quantize_seconds, peak_gpu_memory_gb and fake-quant figures (meaningless in
absolute terms for random weights), the wall time of the whole quantize call, and the export's size on disk;
once: the GPU (nvidia-smi), package versions, the extension build. Random weights: the timing is real, the
quality is not.

Reproduce on the H200 (the `run` tool with carry [".trtllm-carry"], which holds wheels/ and tokenizer/: the
embedded tokenizer files are git-ignored, so they travel only when carried, tokenizer.json gzipped to stay
under the 64 MiB the working tree may take). The wheels, fetched here with `pip download --no-deps` for cp312
manylinux, are nvidia-modelopt 0.47.0, omegaconf 2.4.0, PuLP 3.3.2 (its bundled CBC binaries stripped: 16 of
its 16.4 MB, and quantize never solves an LP), pydantic 2.14.3, pydantic_core 2.50.4, annotated-types 0.8.0,
typing-inspection 0.4.5 and typing_extensions 4.16.0:

    set -o pipefail; { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --target /tmp/site .trtllm-carry/wheels/*.whl || exit 1; PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:workflow \
        python3 bench/trtllm_gpu.py --tokenizer-from .trtllm-carry/tokenizer --json $OUT/trtllm-gpu.json; } \
        2>&1 | tee $OUT/trtllm-gpu.log

A CPU dry run of the plumbing on a small shape (hidden 256, 2 layers; trtllm-nvfp4 needs CUDA and is refused):

    PYTHONPATH=workflow .venv/bin/python bench/trtllm_gpu.py --tiny --device cpu --json /tmp/trtllm-tiny.json
"""

from __future__ import annotations

import argparse
import gc
import gzip
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
import traceback
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "workflow/deepcast/embedded/tiny-llama-student"
FORMATS = ("trtllm-fp8", "trtllm-int4-awq", "trtllm-nvfp4")
SHAPE = {  # DeepSeek-R1-Distill-Qwen-1.5B's config.json
    "vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
    "num_attention_heads": 12, "num_key_value_heads": 2, "max_position_embeddings": 131072,
    "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
}  # fmt: skip
TINY = SHAPE | {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2}  # fmt: skip


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def gpu_info() -> dict:
    try:
        fields = "name,driver_version,memory.total,compute_cap"
        line = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"], check=True,
                              capture_output=True, text=True).stdout.strip().splitlines()[0]  # fmt: skip
    except (OSError, subprocess.CalledProcessError, IndexError) as error:
        return {"nvidia_smi": f"not available: {error}"}
    name, driver, memory, capability = (part.strip() for part in line.split(","))
    return {"name": name, "driver": driver, "memory_total": memory, "compute_capability": capability}


def versions() -> dict:
    import torch

    found = {"python": platform.python_version(), "torch_cuda": torch.version.cuda}
    for name in ("torch", "transformers", "nvidia-modelopt", "safetensors", "pydantic", "numpy"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def copy_tokenizer(source: Path, directory: Path) -> None:
    """tokenizer.json and tokenizer_config.json, each either as is or gzipped (the carry folder's copy)."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (source / name).is_file():
            shutil.copy(source / name, directory / name)
        else:
            (directory / name).write_bytes(gzip.decompress((source / f"{name}.gz").read_bytes()))


def make_checkpoint(directory: Path, shape: dict, device: str, tokenizer: Path) -> dict:
    """A random bf16 Qwen2ForCausalLM (seed 0) saved as safetensors, with a tokenizer that loads."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**shape, dtype="bfloat16")
    config.architectures = ["Qwen2ForCausalLM"]
    torch.manual_seed(0)
    with torch.device(device):  # initialising 1.8B parameters on the CPU takes minutes
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    parameters = sum(p.numel() for p in model.parameters())
    model.save_pretrained(directory)
    del model
    copy_tokenizer(tokenizer, directory)
    return {
        "parameters": parameters,
        "safetensors_bytes": sum(p.stat().st_size for p in directory.glob("*.safetensors")),
    }


def make_token_sets(calibration: Path, reference: Path, samples: int, chunks: int, length: int) -> None:
    import numpy as np

    calibration.mkdir(parents=True)
    reference.mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = [json.dumps({"input_ids": rng.integers(0, 100000, length).tolist()}) for _ in range(samples)]
    (calibration / "samples.jsonl").write_text("\n".join(lines) + "\n")
    (reference / "chunks.json").write_text(json.dumps(rng.integers(0, 100000, (chunks, length)).tolist()))


def build_extensions(device: str) -> dict:
    """Compile (or find missing) ModelOpt's CUDA extensions before any format is timed."""
    if device != "cuda":
        return {"status": "skipped: no CUDA"}
    from modelopt.torch.quantization import extensions

    built = {}
    for name in ("get_cuda_ext", "get_cuda_ext_fp8", "get_cuda_ext_mx"):
        started = time.time()
        try:
            ext = getattr(extensions, name)()
            status = "loaded" if ext is not None else "not built (ModelOpt falls back to its PyTorch path)"
        except Exception as error:  # record whatever the build raised
            status = f"failed: {type(error).__name__}: {error}"
        built[name] = {"status": status, "seconds": round(time.time() - started, 1)}
        log(f"extension {name}: {built[name]}")
    return built


def run_format(fmt: str, checkpoint: Path, calibration: Path, reference: Path, out: Path, device: str) -> dict:
    import torch
    from deepcast.config import TrtllmSettings
    from deepcast.stages.trtllm import quantize

    settings = TrtllmSettings(awq_block_size=128)
    started = time.time()
    try:
        results = quantize(checkpoint, calibration, reference, out, fmt, settings, device=device, batch_size=4)
    except Exception as error:  # a format that fails is a finding; the others still run
        traceback.print_exc()
        return {"status": "failed", "error": f"{type(error).__name__}: {error}",
                "wall_seconds": round(time.time() - started, 1)}  # fmt: skip
    wall = time.time() - started
    files = [p for p in out.rglob("*") if p.is_file()]
    record = {
        "status": "ok",
        "wall_seconds": round(wall, 1),
        "quantize_seconds": results["quantize_seconds"],
        "peak_gpu_memory_gb": results["peak_gpu_memory_gb"],
        "fake_quant": results["fake_quant"],
        "quant_algo": results["quant_algo"],
        "group_size": results["group_size"],
        "exclude_modules": results["exclude_modules"],
        "calibration_samples": results["calibration_samples"],
        "export_bytes": sum(p.stat().st_size for p in files),
        "export_safetensors_bytes": sum(p.stat().st_size for p in files if p.suffix == ".safetensors"),
        "export_files": sorted(p.relative_to(out).as_posix() for p in files),
    }
    if device == "cuda":
        record["process_peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 3)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="hidden 256, 2 layers, 8 samples: a plumbing check")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--formats", default=",".join(FORMATS), help="comma-separated deepcast format names")
    parser.add_argument("--json", type=Path, default=Path(os.environ.get("OUT", "bench/results")) / "trtllm-gpu.json")
    parser.add_argument("--tokenizer-from", type=Path, default=TOKENIZER,
                        help="a folder with tokenizer.json[.gz] and tokenizer_config.json[.gz]")  # fmt: skip
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    args = parser.parse_args()

    import torch

    shape = TINY if args.tiny else SHAPE
    samples, chunks, length = (8, 4, 128) if args.tiny else (64, 8, 512)
    report = {
        "what": "deepcast.stages.trtllm.quantize on random weights of DeepSeek-R1-Distill-Qwen-1.5B's shape",
        "tiny": args.tiny, "shape": shape, "dtype": "bfloat16", "device": args.device,
        "calibration": {"samples": samples, "length": length, "ids_below": 100000, "seed": 0},
        "reference": {"chunks": chunks, "length": length}, "settings": {"awq_block_size": 128, "batch_size": 4},
        "gpu": gpu_info(), "versions": versions(), "formats": {},
    }  # fmt: skip
    if args.device == "cuda":
        report["gpu"]["torch_name"] = torch.cuda.get_device_name()
    args.json.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")

    work = Path(tempfile.mkdtemp(prefix="trtllm-bench-")) if args.work is None else args.work
    work.mkdir(parents=True, exist_ok=True)
    try:
        started = time.time()
        report["checkpoint"] = make_checkpoint(work / "checkpoint", shape, args.device, args.tokenizer_from)
        make_token_sets(work / "calibration", work / "reference", samples, chunks, length)
        report["checkpoint"]["seconds"] = round(time.time() - started, 1)
        log(f"checkpoint and token sets: {report['checkpoint']}")
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
        started = time.time()  # ModelOpt's import, timed here rather than inside the first format
        import modelopt.torch.export
        import modelopt.torch.quantization  # noqa: F401

        report["modelopt_import_seconds"] = round(time.time() - started, 1)
        report["extensions"] = build_extensions(args.device)
        save()
        for fmt in args.formats.split(","):
            log(f"{fmt}: quantize")
            if args.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            out = work / f"out-{fmt}"
            report["formats"][fmt] = run_format(fmt, work / "checkpoint", work / "calibration", work / "reference",
                                                out, args.device)  # fmt: skip
            log(f"{fmt}: {json.dumps(report['formats'][fmt])}")
            save()
            shutil.rmtree(out, ignore_errors=True)
            gc.collect()
            if args.device == "cuda":
                torch.cuda.empty_cache()
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
        save()
    log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
