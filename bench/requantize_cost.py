"""What the disk-lean route costs in quality: each type made from a Q8_0 base (`--allow-requantize`, the
imatrix computed on that base) against the same type made from the 16-bit base, both scored against the
16-bit GGUF's logits on the same tokens (perplexity, mean KL divergence, top-1 agreement).

On the embedded models, through deepcast's own stage functions and the pinned llama.cpp build:

    .venv/bin/python bench/requantize_cost.py --workdir /tmp/requantize   # about 6 minutes on 2 cores

Writes bench/results/requantize-embedded.json and prints the markdown table docs/gguf.md carries.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from deepcast import tools
from deepcast.config import CalibrationSettings, DownloadSettings
from deepcast.stages import calibrate, corpus, download, gguf

REPO = Path(__file__).resolve().parent.parent
EMBEDDED = REPO / "workflow" / "deepcast" / "embedded"
MODELS = ["tiny-deepseek-v3", "tiny-llama-student"]
TYPES = ["Q6_K", "Q4_K_M", "IQ4_XS", "Q3_K_M", "Q2_K", "IQ2_XXS", "IQ1_S"]
CONTEXT, CHUNKS, THREADS = 512, 48, 2


def scores(output: str) -> dict:
    def last(pattern: str) -> float:
        return float(re.findall(pattern, output)[-1])

    return {
        "perplexity": last(r"Mean PPL\(Q\)\s+:\s+(-?[\d.]+)"),
        "kl_divergence": last(r"Mean\s+KLD:\s+(-?[\d.]+)"),
        "same_top_token_percent": last(r"Same top p:\s+([\d.]+)"),
    }


def measure(model: str, work: Path, texts: Path, llama: tools.LlamaCpp) -> dict:
    root = work / model
    checkpoint = root / "checkpoint"
    if not checkpoint.exists():
        download.run(str(EMBEDDED / model), "v1", checkpoint, DownloadSettings())
        calibrate.run(checkpoint, texts / "calibration.txt", root / "calibration", CalibrationSettings(samples=64))
    bases, matrices = {}, {}
    for base in ("bf16", "q8_0"):
        bases[base] = root / base
        if not bases[base].exists():
            gguf.convert(checkpoint, bases[base], base, llama)
        matrices[base] = root / f"imatrix-{base}"
        if not matrices[base].exists():
            gguf.imatrix(bases[base], root / "calibration", matrices[base], CONTEXT, THREADS, llama)
    logits = root / "kld-base"
    if not logits.exists():
        gguf.kld_base(bases["bf16"], texts / "evaluation.txt", logits, CONTEXT, CHUNKS, THREADS, llama)

    def against_16_bit(artifact: Path) -> dict:
        output = gguf.kl_divergence(artifact / gguf.MODEL, logits / gguf.KLD_BASE, CONTEXT, CHUNKS, THREADS, llama)
        return {**scores(output), "size_bytes": (artifact / gguf.MODEL).stat().st_size}

    rows = {"Q8_0 base": against_16_bit(bases["q8_0"])}
    for qtype in TYPES:
        for base in ("bf16", "q8_0"):
            out = root / f"{qtype}-from-{base}"
            if not out.exists():
                gguf.quantize(bases[base], out, qtype, matrices[base], [], THREADS, llama)
            rows.setdefault(qtype, {})[base] = against_16_bit(out)
    return {"16-bit perplexity": json.loads((logits / "manifest.json").read_text())["results"]["perplexity"], **rows}


def table(results: dict) -> str:
    lines = []
    for model, rows in results.items():
        lines += [
            f"\n**{model}** (16-bit GGUF perplexity {rows['16-bit perplexity']:.3f}; the Q8_0 base itself: KLD "
            f"{rows['Q8_0 base']['kl_divergence']:.6f}, perplexity {rows['Q8_0 base']['perplexity']:.3f})\n",
            "| type | perplexity from 16-bit | from Q8_0 | KLD from 16-bit | from Q8_0 | KLD ratio | top-1 from 16-bit "
            "| from Q8_0 |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for qtype in TYPES:
            a, b = rows[qtype]["bf16"], rows[qtype]["q8_0"]
            ratio = b["kl_divergence"] / a["kl_divergence"] if a["kl_divergence"] > 0 else float("nan")
            lines.append(
                f"| {qtype} | {a['perplexity']:.3f} | {b['perplexity']:.3f} | {a['kl_divergence']:.6f} | "
                f"{b['kl_divergence']:.6f} | {ratio:.3f} | {a['same_top_token_percent']:.2f} % | "
                f"{b['same_top_token_percent']:.2f} % |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "requantize-embedded.json")
    args = parser.parse_args()
    llama = tools.locate()
    texts = args.workdir / "corpus"
    if not texts.exists():
        corpus.run(texts)
    results = {model: measure(model, args.workdir, texts, llama) for model in MODELS}
    args.out.write_text(json.dumps({"chunks": CHUNKS, "context": CONTEXT, "models": results}, indent=2) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
