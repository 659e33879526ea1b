"""Per-stage figures of one pipeline run, from its manifests, its plans and a GPU memory trace.

    python bench/gpu_stages.py --results results --gpu-memory gpumem.csv --out run.json [--reproduce r.txt]
    python bench/gpu_stages.py --table run.json     # the markdown table docs/benchmarks.md shows

Each manifest gives its stage's wall time and end time; the trace (`nvidia-smi --query-gpu=timestamp,
memory.used -lms 250`) gives the device's peak memory inside that window, above the idle baseline. GPU jobs
ran one at a time (`--resources gpu=1`, as `deepcast rebuild` sets it on a one-GPU box), so a window's peak is
its own job's. The plan's figures beside them: per-GPU memory and the decode roofline of the artifact.
"""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from pathlib import Path

MIB = 1024 * 1024


def samples(trace: Path) -> list[tuple[float, float]]:
    """(unix time, MiB used) per line of an nvidia-smi trace."""
    rows = []
    for line in trace.read_text().splitlines():
        try:
            stamp, used = (field.strip() for field in line.split(","))
            moment = datetime.strptime(stamp, "%Y/%m/%d %H:%M:%S.%f").replace(tzinfo=UTC)
            rows.append((moment.timestamp(), float(used)))
        except ValueError:
            continue
    return rows


def plan_candidate(results: Path, manifest_dir: Path, fmt: str) -> dict | None:
    """The plan's candidate for `fmt` on the target whose folder holds this artifact."""
    for parent in manifest_dir.parents:
        plan = parent / "plan.json"
        if plan.is_file():
            chosen = json.loads(plan.read_text())
            return next((c for c in chosen["candidates"] if c["format"] == fmt and c["viable"]), None)
        if parent == results:
            return None
    return None


def stage_rows(results: Path, trace: list[tuple[float, float]]) -> list[dict]:
    baseline = min((used for _, used in trace), default=0.0)
    rows = []
    for path in sorted(results.rglob("manifest.json")):
        record = json.loads(path.read_text())
        end = datetime.strptime(record["created"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()
        wall = record.get("wall_time_s") or 0.0
        inside = [used for moment, used in trace if end - wall - 0.5 <= moment <= end + 1.0]
        artifact = path.parent
        params = record.get("params") or {}
        fmt = params.get("type") or params.get("scheme") or params.get("format") or artifact.parent.name
        row = {
            "stage": record["stage"],
            "artifact": str(artifact.relative_to(results)),
            "backend": (record.get("tools") or {}).get("backend"),
            "wall_time_s": wall,
            "host_peak_memory_gb": round((record.get("peak_memory_mb") or 0) / 1024, 2),
            "gpu_peak_memory_gb": round((max(inside) - baseline) * MIB / 1e9, 2) if inside else None,
        }
        if record["stage"].endswith("validate") and fmt:
            candidate = plan_candidate(results, artifact, fmt) or {}
            speed = (record.get("results") or {}).get("speed") or {}
            row |= {
                "format": fmt,
                "planned_gpu_memory_gb": candidate.get("gpu_memory_gb"),
                "planned_context": candidate.get("context"),
                "roofline_decode_tokens_per_s": candidate.get("decode_tokens_per_s"),
                "decode_tokens_per_s": speed.get("decode_tokens_per_s"),
                "prompt_tokens_per_s": speed.get("prompt_tokens_per_s"),
                "speed_status": speed.get("status"),
                "speed_reason": speed.get("reason"),
                "gate": ((record.get("results") or {}).get("gate") or {}).get("status"),
            }
        rows.append(row)
    return rows


def table(run: dict) -> str:
    lines = [
        "| stage | artifact | backend | wall s | GPU peak GB (planned) | decode tok/s (roofline) | prompt tok/s |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for row in run["stages"]:
        gpu = "" if row["gpu_peak_memory_gb"] is None else f"{row['gpu_peak_memory_gb']:.2f}"
        if row.get("planned_gpu_memory_gb") is not None:
            gpu += f" ({row['planned_gpu_memory_gb']:.2f})"
        decode = row.get("decode_tokens_per_s")
        roofline = row.get("roofline_decode_tokens_per_s")
        speed = "" if decode is None else f"{decode:,.1f}"
        if roofline is not None:
            speed += f" ({roofline:,.0f})"
        if decode is None and row.get("speed_status"):
            speed = row["speed_status"] + (f" ({roofline:,.0f})" if roofline is not None else "")
        prompt = "" if row.get("prompt_tokens_per_s") is None else f"{row['prompt_tokens_per_s']:,.0f}"
        lines.append(f"| {row['stage']} | {row['artifact']} | {row['backend']} | {row['wall_time_s']:.1f} | {gpu} "
                     f"| {speed} | {prompt} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path)
    parser.add_argument("--gpu-memory", type=Path)
    parser.add_argument("--reproduce", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--table", type=Path, help="Print the markdown table of a run JSON.")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(args.table.read_text())))
        return
    trace = samples(args.gpu_memory) if args.gpu_memory and args.gpu_memory.is_file() else []
    run = {
        "stages": stage_rows(args.results, trace),
        "gpu_baseline_mib": min((used for _, used in trace), default=None),
        "reproduce": args.reproduce.read_text().splitlines() if args.reproduce and args.reproduce.is_file() else [],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(run, indent=1) + "\n")
    print(table(run))


if __name__ == "__main__":
    main()
