"""Conversion and quantization throughput against this machine's sequential disk write, on a synthetic model.

    .venv/bin/python bench/throughput.py --workdir /tmp/throughput   # about 10 minutes on 2 cores, 15 GB of disk

A random-weight model in the shape of DeepSeek-R1-Distill-Qwen-1.5B (as a Llama: bench/synthetic_llama_cpp.py's
`checkpoint`; 1.78 B parameters, 3.55 GB of bf16 safetensors) goes through deepcast's own stage functions:
the download (a local source: copy and hash), the 16-bit GGUF conversion and Q8_0 and Q4_K_M quantizations
with the pinned llama.cpp build. Each stage's wall time and bytes written give its throughput, next to the
same tool run bare (convert_hf_to_gguf.py and llama-quantize on the same input, without deepcast's checks,
hashes and manifest) and next to the disk's sequential write, measured first: 4 GiB in 64 MiB blocks, then
fsync, the median of three. The stages write through the page cache, as the tools do; `sync` after each
stage is timed too, so what reached the disk is counted.

Writes bench/results/throughput.json and prints the markdown table docs/benchmarks.md carries.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from deepcast import tools  # noqa: E402
from deepcast.config import DownloadSettings  # noqa: E402
from deepcast.files import remove  # noqa: E402
from deepcast.stages import download, gguf  # noqa: E402
from synthetic_llama_cpp import checkpoint as synthetic_checkpoint  # noqa: E402

SHAPE = REPO / "config" / "models" / "deepseek-r1-distill-qwen-1.5b.yaml"
TOKENIZER = REPO / "workflow" / "deepcast" / "embedded" / "tiny-deepseek-v3"
BLOCK = 64 << 20


def disk_write(directory: Path, size: int = 4 << 30) -> float:
    """Sequential write to `directory`'s disk, bytes/s: `size` bytes in 64 MiB blocks, then fsync."""
    block = os.urandom(BLOCK)
    path = directory / "disk-write.bin"
    started = time.perf_counter()
    with open(path, "wb", buffering=0) as handle:
        for _ in range(size // BLOCK):
            handle.write(block)
        os.fsync(handle.fileno())
    seconds = time.perf_counter() - started
    path.unlink()
    return size / seconds


def size_of(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def timed(what: str, function, out: Path) -> dict:
    """`function()`, then `sync`: wall time, sync time, bytes under `out`."""
    started = time.perf_counter()
    function()
    wall = time.perf_counter() - started
    started = time.perf_counter()
    os.sync()
    flushed = time.perf_counter() - started
    written = size_of(out)
    print(f"{what}: {wall:.1f} s (+{flushed:.1f} s sync), {written / 1e9:.2f} GB", flush=True)
    return {"seconds": round(wall, 2), "sync_seconds": round(flushed, 2), "bytes_written": written}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "throughput.json")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    llama = tools.locate()
    work = args.workdir

    write_speeds = [disk_write(work) for _ in range(3)]
    disk = statistics.median(write_speeds)
    print(f"disk sequential write: {disk / 1e9:.2f} GB/s (median of {[round(s / 1e9, 2) for s in write_speeds]})")

    source = work / "synthetic-source"
    if not (source / "config.json").is_file():
        synthetic_checkpoint.callback(SHAPE, TOKENIZER, source, 8960)
    os.sync()
    for name in ("checkpoint", "bf16", "Q8_0", "Q4_K_M", "bare-bf16.gguf", "bare-Q8_0.gguf", "bare-Q4_K_M.gguf"):
        remove(work / name)

    steps = {}
    checkpoint = work / "checkpoint"
    steps["download (local copy + sha256)"] = timed(
        "download", lambda: download.run(str(source), "v1", checkpoint, DownloadSettings()), checkpoint
    )
    steps["gguf_convert bf16"] = timed("convert", lambda: gguf.convert(checkpoint, work / "bf16", "bf16", llama),
                                       work / "bf16")  # fmt: skip
    for qtype in ("Q8_0", "Q4_K_M"):
        steps[f"gguf_quantize {qtype}"] = timed(
            qtype, lambda qtype=qtype: gguf.quantize(work / "bf16", work / qtype, qtype, None, [], args.threads, llama),
            work / qtype,
        )  # fmt: skip

    bare = {}
    converter = [sys.executable, str(llama.converter), str(source), "--outtype", "bf16"]
    bare["convert_hf_to_gguf.py bf16"] = timed(
        "bare convert",
        lambda: subprocess.run([*converter, "--outfile", str(work / "bare-bf16.gguf")], check=True,
                               capture_output=True, env=llama.converter_env()),
        work / "bare-bf16.gguf",
    )  # fmt: skip
    for qtype in ("Q8_0", "Q4_K_M"):
        command = [str(llama.tool("llama-quantize")), str(work / "bare-bf16.gguf"), str(work / f"bare-{qtype}.gguf"),
                   qtype, str(args.threads)]  # fmt: skip
        bare[f"llama-quantize {qtype}"] = timed(
            f"bare {qtype}", lambda command=command: subprocess.run(command, check=True, capture_output=True),
            work / f"bare-{qtype}.gguf",
        )  # fmt: skip

    for figures in (*steps.values(), *bare.values()):
        figures["write_gb_per_s"] = round(figures["bytes_written"] / figures["seconds"] / 1e9, 3)
        figures["ratio_to_disk"] = round(figures["bytes_written"] / figures["seconds"] / disk, 3)
        total = figures["seconds"] + figures["sync_seconds"]
        figures["ratio_to_disk_with_sync"] = round(figures["bytes_written"] / total / disk, 3)
    results = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "model": f"{SHAPE.stem} shape, random bf16 weights, {size_of(source) / 1e9:.2f} GB",
        "threads": args.threads,
        "disk_write_gb_per_s": round(disk / 1e9, 3),
        "disk_write_samples_gb_per_s": [round(s / 1e9, 3) for s in write_speeds],
        "stages": steps,
        "bare_tools": bare,
    }
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\ndisk sequential write: {disk / 1e9:.2f} GB/s\n")
    print("| step | seconds | + sync | GB written | GB/s | ratio to disk write | with sync |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, figures in (*steps.items(), *bare.items()):
        cells = [figures["seconds"], figures["sync_seconds"], figures["bytes_written"] / 1e9, figures["write_gb_per_s"],
                 figures["ratio_to_disk"], figures["ratio_to_disk_with_sync"]]  # fmt: skip
        print(f"| {name} | " + " | ".join(f"{cell:.2f}" for cell in cells) + " |")


if __name__ == "__main__":
    main()
