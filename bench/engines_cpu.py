"""The engine branches against each other on the embedded dense student, on one machine's CPU and the same
reference tokens: onnxruntime-genai int4 (k_quant) against GGUF Q4_K_M and llm-compressor GPTQ/AWQ, and
ModelOpt FP8/INT4-AWQ (TensorRT-LLM's checkpoints, read back by deepcast) against llm-compressor FP8/AWQ.

The student's layers are 64 wide, so every 4-bit format uses groups of 64 or less: GPTQ and AWQ through
recipe overrides (bench/recipes/), ModelOpt through trtllm.awq_block_size 64; onnx-int4 keeps the builder's
block of 32 and Q4_K_M its own 32-weight blocks. Figures: perplexity, mean KL divergence to the 16-bit model
and top-1 agreement on 8 chunks of 512 tokens (2,040 scored), from each branch's validation.

    .venv/bin/python bench/engines_cpu.py --workdir /tmp/engines   # about 15 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / "bench" / "recipes"
MODEL = "tiny-llama-student"
WORKFLOW_FORMATS = ["onnx-int4", "Q4_K_M", "gptq-w4a16", "awq-w4a16", "fp8"]
MODELOPT_FORMATS = ["trtllm-fp8", "trtllm-int4-awq"]


def run_workflow(workdir: Path) -> None:
    snakemake = Path(sys.executable).with_name("snakemake")
    gptq, awq = RECIPES / "gptq-w4a16-g64.yaml", RECIPES / "awq-w4a16-g64.yaml"
    recipes = f"{{recipes: {{gptq-w4a16: {gptq}, awq-w4a16: {awq}}}}}"
    command = [
        str(snakemake),
        "-s",
        str(REPO / "Snakefile"),
        "-d",
        str(workdir),
        "--cores",
        "2",
        "--config",
        f"model={MODEL}",
        "target=cpu",
        f"formats=[{','.join(WORKFLOW_FORMATS)}]",
        "evaluation={max_chunks: 8}",
        f"compress={recipes}",
        "validate={gates: warn}",
    ]
    env = {**os.environ, "PATH": f"{snakemake.parent}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(command, check=True, env=env)


def run_modelopt(workdir: Path, shared: Path, target_dir: Path) -> None:
    from deepcast import registry
    from deepcast.config import TrtllmSettings
    from deepcast.stages import trtllm

    settings = TrtllmSettings(awq_block_size=64)
    h100 = registry.load_target(REPO / "config", "h100")  # a bundle needs a GPU target; validation runs here
    for fmt in MODELOPT_FORMATS:
        artifact, bundle = shared / "trtllm" / fmt, target_dir / "tensorrt-llm" / fmt
        if not (artifact / "manifest.json").is_file():
            trtllm.quantize(
                shared / "checkpoint", shared / "calibration", shared / "reference", artifact, fmt, settings
            )
        if not (bundle / "validation" / "manifest.json").is_file():
            trtllm.bundle(artifact, h100, bundle / "bundle", fmt, settings)
            trtllm.validate(
                bundle / "bundle", shared / "checkpoint", shared / "reference", bundle / "validation", fmt, 4
            )


def collect(target_dir: Path) -> list[dict]:
    rows = []
    for validation in sorted(target_dir.glob("*/*/validation/manifest.json")):
        results = json.loads(validation.read_text())["results"]
        row = {
            "engine": validation.parent.parent.parent.name,
            "format": validation.parent.parent.name,
            "perplexity": round(results["perplexity"], 3),
            "reference": round(results["perplexity_reference"], 3),
            "kl_divergence": round(results["kl_divergence"], 5),
            "same_top_token_percent": round(results["same_top_token_percent"], 2),
            "size_mb": round(results["size_bytes"] / 1e6, 2),
            "tokens_scored": results.get("tokens_scored"),
        }
        if results.get("fake_quant"):
            row["modelopt_fake_quant_kl_divergence"] = round(results["fake_quant"]["kl_divergence"], 5)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "engines-cpu.json")
    args = parser.parse_args()
    run_workflow(args.workdir)
    shared = args.workdir / "results" / "models" / MODEL / "v1"
    target_dir = args.workdir / "results" / "targets" / "cpu" / MODEL / "v1"
    run_modelopt(args.workdir, shared, target_dir)
    rows = collect(target_dir)
    args.json.write_text(json.dumps({"model": MODEL, "machine": os.uname().nodename, "rows": rows}, indent=2) + "\n")
    print("| engine | format | perplexity (ref) | KLD | top-1 % | MB |")
    for r in rows:
        print(
            f"| {r['engine']} | {r['format']} | {r['perplexity']} ({r['reference']}) | {r['kl_divergence']} | "
            f"{r['same_top_token_percent']} | {r['size_mb']} |"
        )


if __name__ == "__main__":
    main()
