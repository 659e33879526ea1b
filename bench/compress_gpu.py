"""Time one llm-compressor scheme through deepcast's compress stage on a random-weight model of a real
DeepSeek shape (R1-Distill-Qwen-1.5B by default: 28 layers, hidden 1536, 12/2 heads, FFN 8960).

    python bench/compress_gpu.py --shape config/models/deepseek-r1-distill-qwen-1.5b.yaml \
        --tokenizer-from results/models/tiny-deepseek-v3/v1/checkpoint \
        --calibration results/models/tiny-deepseek-v3/v1/calibration --scheme gptq-w4a16

Prints one JSON line: wall time of oneshot, peak GPU memory, the GPU, parameter count.
Random weights: the timing is real, the quality is meaningless.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import click
import torch
import yaml


@click.command()
@click.option("--shape", type=click.Path(exists=True, path_type=Path), required=True, help="A registry model file.")
@click.option("--tokenizer-from", type=click.Path(exists=True, path_type=Path), required=True)
@click.option("--calibration", type=click.Path(exists=True, path_type=Path), required=True)
@click.option("--scheme", default="gptq-w4a16", show_default=True)
@click.option("--recipes", type=click.Path(exists=True, path_type=Path), default=Path("config/recipes"))
@click.option("--intermediate", default=8960, show_default=True, help="FFN width (Qwen-1.5B: hardware.md C.4).")
def main(shape: Path, tokenizer_from: Path, calibration: Path, scheme: str, recipes: Path, intermediate: int) -> None:
    from deepcast.stages import compress
    from transformers import Qwen2Config, Qwen2ForCausalLM

    entry = yaml.safe_load(shape.read_text())
    s = entry["shape"]
    config = Qwen2Config(
        vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=intermediate,
        num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
        max_position_embeddings=4096, tie_word_embeddings=s.get("tied_embeddings", False),
    )  # fmt: skip
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "checkpoint"
        Qwen2ForCausalLM(config).to(torch.bfloat16).save_pretrained(checkpoint)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tokenizer_from / name, checkpoint / name)
        (checkpoint / "manifest.json").write_text("{}")
        parameters = sum(p.numel() for p in Qwen2ForCausalLM(config).parameters())
        torch.cuda.reset_peak_memory_stats()
        started = time.time()
        results = compress.run(checkpoint, calibration, Path(tmp) / "out", scheme, recipes / f"{scheme}.yaml", None)
        wall = time.time() - started
    print(json.dumps({
        "model_shape": entry["name"], "parameters": parameters, "scheme": scheme,
        "calibration_samples": results["calibration_samples"], "oneshot_seconds": results["oneshot_seconds"],
        "stage_seconds": round(wall, 1), "peak_gpu_memory_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None, "torch": torch.__version__,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
