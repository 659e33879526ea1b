"""The planner's predictions against the GPU measurements in bench/results/synthetic-*.json.

    python bench/planner_accuracy.py

Sizes: `sizes.gguf_size` from the shape, against each GGUF llama-quantize wrote. Memory: what the plan
holds on the GPU for a load (the weights less `token_embd`, which llama.cpp keeps in host memory, + KV cache
at the context + the per-GPU runtime allowance), against the peak GPU memory of llama-server's process
sampled from NVML. Prints markdown tables.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from deepcast import planner, sizes
from deepcast.registry import ModelShape

REPO = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024


def architecture(result: dict) -> str:
    name = result["model"]["registry"].removesuffix(".yaml")
    return yaml.safe_load((REPO / "config" / "models" / f"{name}.yaml").read_text())["architecture"]


def main() -> None:
    for path in sorted((REPO / "bench" / "results").glob("synthetic-*.json")):
        result = json.loads(path.read_text())
        shape, arch = ModelShape(**result["model"]["shape"]), architecture(result)
        print(f"\n### {path.stem}: {arch}, {result['model']['shape']}\n")
        print("| GGUF | imatrix | overrides | file bytes | predicted | error |\n|---|---|---|---|---|---|")
        worst = 0.0
        for name, gguf in result["gguf"].items():
            qtype = gguf.get("type", name)
            overrides = gguf.get("overrides") or []
            predicted = sizes.gguf_size(arch, shape, qtype, gguf.get("imatrix", False), overrides).total
            error = predicted / gguf["size_bytes"] - 1
            worst = max(worst, abs(error))
            print(f"| {qtype} | {'yes' if gguf.get('imatrix') else 'no'} | {' '.join(overrides) or '-'} | "
                  f"{gguf['size_bytes']:,} | {predicted:,} | {error:+.3%} |")  # fmt: skip
        print(f"\nLargest size error: {worst:.3%}\n")
        print("| load | context | measured peak GB | predicted GB | error |\n|---|---|---|---|---|")
        kv = planner.kv_bytes_per_token(shape)
        for load in result["loads"]:
            if load["tool"] != "llama-server":
                continue
            gguf = result["gguf"][load["model"]]
            # token_embd stays in host memory: the file less that tensor is what goes to the GPU.
            embedding = sizes.gguf_size(arch, shape, gguf.get("type", load["model"]), gguf.get("imatrix", False),
                                        gguf.get("overrides") or []).token_embd  # fmt: skip
            predicted = (gguf["size_bytes"] - embedding + load["context"] * kv) / 1e9 + planner.GPU_RUNTIME_OVERHEAD_GB
            measured = load["memory"]["process_peak_mib"] * MIB / 1e9
            print(f"| {load['model']} | {load['context']:,} | {measured:.3f} | {predicted:.3f} | "
                  f"{predicted / measured - 1:+.1%} |")  # fmt: skip


if __name__ == "__main__":
    main()
