"""compressed-tensors sizes on a random-weight model of a real DeepSeek shape, against the planner.

    python bench/synthetic_compressed_sizes.py [--shape config/models/deepseek-r1-distill-qwen-1.5b.yaml]

Writes each layout llm-compressor produces (W4A16 group 128 as GPTQ/AWQ/RTN write it, W8A8 int8 and
FP8 per channel) with its data-free quantizer on the CPU: the layout, not the values, sets the size,
and calibration-based GPTQ/AWQ/SmoothQuant write the same tensors. Prints a markdown table.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import click
import torch
import yaml
from deepcast import sizes
from deepcast.registry import ModelShape

LAYOUTS = {"rtn-w4a16": "W4A16", "int8-w8a8": "W8A8", "fp8": "FP8_DYNAMIC"}


@click.command()
@click.option("--shape", "shape_file", type=click.Path(exists=True, path_type=Path),
              default=Path("config/models/deepseek-r1-distill-qwen-1.5b.yaml"), show_default=True)  # fmt: skip
def main(shape_file: Path) -> None:
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import Qwen2Config, Qwen2ForCausalLM

    entry = yaml.safe_load(shape_file.read_text())
    shape = ModelShape(**entry["shape"])
    config = Qwen2Config(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        max_position_embeddings=4096, tie_word_embeddings=shape.tied_embeddings,
    )  # fmt: skip
    torch.manual_seed(0)
    print(f"| {entry['name']} | file bytes | predicted | error |\n|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "bf16"
        Qwen2ForCausalLM(config).to(torch.bfloat16).save_pretrained(base)
        rows = [("bf16", base, None)]
        for scheme, preset in LAYOUTS.items():
            model = Qwen2ForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
            out = Path(tmp) / scheme
            oneshot(model=model, recipe=QuantizationModifier(targets="Linear", scheme=preset, ignore=["lm_head"]),
                    output_dir=str(out))  # fmt: skip
            rows.append((scheme, out, scheme))
        for name, directory, scheme in rows:
            actual = sum(p.stat().st_size for p in directory.glob("*.safetensors"))
            predicted = sizes.checkpoint_size(entry["architecture"], shape, scheme).total
            print(f"| {name} | {actual:,} | {predicted:,} | {predicted / actual - 1:+.3%} |")


if __name__ == "__main__":
    main()
