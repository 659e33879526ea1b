"""The compressed-tensors validation against the GGUF validation of the same tokens, at several chunk counts.

    .venv/bin/python bench/validation_cost.py --workdir /tmp/validation-cost   # about 10 minutes on 2 cores

One workflow directory, the quick configuration (one GPTQ W4A16 checkpoint and the Q4_K_M GGUF, both for the
cpu target) at `evaluation.max_chunks` 4, then 16, then 48: each change reruns the reference, the KL-divergence
base and the two validations, nothing else; then `--repeats` - 1 more runs of the two validations alone
(`--forcerun`). Per chunk count and validation, the median over the runs: the job's wall time (Snakemake's
metadata), the stage's own time and its process's peak memory (its manifest), and the tokens it scored.
Memory that grew with the chunks would show here; time grows with them, as it must.

Writes bench/results/validation-cost.json and prints the markdown table docs/benchmarks.md carries.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from overhead import QUICK, recorded_seconds, snakemake  # noqa: E402

TARGET = "results/targets/cpu/tiny-deepseek-v3/v1"
VALIDATIONS = {"compressed-tensors (gptq-w4a16)": f"{TARGET}/vllm/gptq-w4a16/validation",
               "GGUF (Q4_K_M)": f"{TARGET}/llama.cpp/Q4_K_M/validation"}  # fmt: skip
RULES = ("vllm_validate", "gguf_validate")


def measured(workdir: Path, path: str) -> dict:
    """One validation's last run: its job's time, its stage's time and peak memory, the tokens it scored."""
    record = json.loads((workdir / path / "manifest.json").read_text())
    results = json.loads((workdir / path / "validation.json").read_text())
    walls = recorded_seconds(workdir)
    command = next(cmd for cmd in walls if f"--out {path} " in cmd + " ")
    return {"job_s": walls[command], "stage_s": record["wall_time_s"], "peak_memory_mb": record["peak_memory_mb"],
            "tokens_scored": results.get("tokens_scored")}  # fmt: skip


def table(rows: list[dict]) -> str:
    """The markdown table of the medians; both validations score the reference's chunks (the GGUF one through
    llama-perplexity, which does not report its count)."""
    lines = ["| chunks | validation | tokens scored | job (s) | stage (s) | peak memory (MB) | time vs GGUF |",
             "|---:|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for row in rows:
        gguf = next(r for r in rows if r["chunks"] == row["chunks"] and r["validation"].startswith("GGUF"))
        tokens = row["tokens_scored"] or "the same"
        lines.append(f"| {row['chunks']} | {row['validation']} | {tokens} | {row['job_s']:.1f} | {row['stage_s']:.1f} "
                     f"| {row['peak_memory_mb']:.0f} | {row['job_s'] / gguf['job_s']:.2f} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--chunks", default="4,16,48")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="runs of the two validations per chunk count")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "validation-cost.json")
    parser.add_argument("--table", action="store_true", help="print the table of the results file and stop")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(args.out.read_text())["rows"]))
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for chunks in map(int, args.chunks.split(",")):
        settings = [item for item in QUICK if not item.startswith("evaluation=")]
        config = [*settings, f"evaluation={{max_chunks: {chunks}}}"]
        runs = {name: [] for name in VALIDATIONS}
        for repeat in range(args.repeats):
            again = ["--forcerun", *RULES] if repeat else []
            snakemake(args.workdir, "--cores", str(args.cores), "--config", *config, *again)
            for name, path in VALIDATIONS.items():
                runs[name].append(measured(args.workdir, path))
        for name, measures in runs.items():
            median = {key: statistics.median(run[key] for run in measures) for key in ("job_s", "stage_s")}
            rows.append({"chunks": chunks, "validation": name, **median,
                         "peak_memory_mb": max(run["peak_memory_mb"] for run in measures),
                         "tokens_scored": measures[0]["tokens_scored"], "runs": measures})  # fmt: skip
            print({key: value for key, value in rows[-1].items() if key != "runs"}, flush=True)
    results = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
               "config": QUICK, "repeats": args.repeats, "rows": rows}  # fmt: skip
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print("\n" + table(rows))


if __name__ == "__main__":
    main()
