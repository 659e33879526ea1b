"""The perplexity and KL arithmetic of a validation, a chunk at a time against a block of positions at a time.

    .venv/bin/python bench/scoring.py     # about a minute on 2 cores; bench/results/scoring.json

`deepcast.perplexity.compare` on one batch of the default evaluation (4 chunks of 512 tokens, 255 scored
positions each) over the DeepSeek tokenizer's 129,280-token vocabulary, with the two models' logits fixed
in memory, so that only the arithmetic is timed: log-softmax of both, the scored tokens' NLL, the KL divergence
and the top-1 agreement. Once with `POSITIONS_PER_BLOCK` at a whole chunk (255), once at its value; alternated,
median of the rounds, and the two results must agree.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from deepcast import perplexity

REPO = Path(__file__).resolve().parent.parent
VOCAB, CONTEXT, CHUNKS = 129_280, 512, 4


class FixedLogits:
    """A model for `compare` (a callable without parameters) that returns the same logits for any input."""

    def __init__(self, logits: torch.Tensor):
        self.logits = logits

    def __call__(self, input_ids):
        return self


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "scoring.json")
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(CHUNKS, CONTEXT, VOCAB, generator=generator) * 3
    quantized = FixedLogits(base + 0.1 * torch.randn(base.shape, generator=generator))
    chunks = torch.randint(0, VOCAB, (CHUNKS, CONTEXT), generator=generator).tolist()
    blocks = {"a chunk (255 positions)": CONTEXT // 2 - 1, "a block (the default)": perplexity.POSITIONS_PER_BLOCK}
    seconds: dict[str, list[float]] = {name: [] for name in blocks}
    results = {}
    for _ in range(args.rounds):
        for name, size in blocks.items():
            perplexity.POSITIONS_PER_BLOCK = size
            started = time.perf_counter()
            results[name] = perplexity.compare(quantized, FixedLogits(base), chunks, CHUNKS).as_dict()
            seconds[name].append(time.perf_counter() - started)
    first, second = results.values()
    assert first["tokens_scored"] == second["tokens_scored"] and first["same_top_token_percent"] == second[
        "same_top_token_percent"], results  # fmt: skip
    assert abs(first["kl_divergence"] - second["kl_divergence"]) < 1e-5 * abs(first["kl_divergence"]) + 1e-9, results
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    chunk, block = medians.values()
    summary = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
               "threads": torch.get_num_threads(), "positions": CHUNKS * (CONTEXT // 2 - 1), "vocab": VOCAB,
               "seconds": seconds, "median_s": medians, "speedup": round(chunk / block, 2),
               "results": results}  # fmt: skip
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print("| positions at a time | seconds per batch (median) |\n|---|---:|")
    for name, value in medians.items():
        print(f"| {name} | {value:.2f} |")
    print(f"\nblocks against chunks: {chunk / block:.2f}x faster")


if __name__ == "__main__":
    main()
