"""kill -9 in every stage that does work, then the documented recovery, against an uninterrupted run.

    python bench/faults.py --workdir /tmp/faults --trials 5 --seed 0   # the table in docs/reliability.md

One uninterrupted run of the quick configuration is the reference. Each trial copies it, reruns one stage
(`snakemake --forcerun RULE OUTPUT`) and sends SIGKILL to Snakemake's whole process group at a moment drawn
(seeded) over that stage's measured wall time; then it checks that the output path holds either nothing or a
complete artifact (its manifest and every file it lists), runs the recovery the stale-lock message names
(`snakemake --unlock`), rebuilds the output (`snakemake OUTPUT`) and compares every file with the reference's.
Deterministic stages must end byte-identical; a trial "recovered" when the rebuild succeeded.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SNAKEMAKE = Path(sys.executable).with_name("snakemake")
# tests/conftest.py's QUICK: the test suite's default run serves as the reference of its seeded subset.
CONFIG = ["calibration={samples: 16}", "compress={schemes: [gptq-w4a16]}", "evaluation={max_chunks: 8}"]
MODEL = "results/models/tiny-deepseek-v3/v1"
# Every rule that does work in the quick configuration, with the artifact it writes.
STAGES = {
    "download": f"{MODEL}/checkpoint",
    "calibrate": f"{MODEL}/calibration",
    "reference": f"{MODEL}/reference",
    "gguf_convert": f"{MODEL}/gguf/bf16",
    "gguf_imatrix": f"{MODEL}/gguf/imatrix",
    "gguf_quantize": f"{MODEL}/gguf/Q4_K_M",
    "gguf_kld_base": f"{MODEL}/gguf/kld-base",
    "compress": f"{MODEL}/compressed/gptq-w4a16",
}


def snakemake(workdir: Path, *args: str, **popen) -> subprocess.Popen:
    command = [str(SNAKEMAKE), "-s", str(REPO / "Snakefile"), "-d", str(workdir), "--cores", "2", *args,
               "--config", *CONFIG]  # fmt: skip
    env = {**os.environ, "PATH": f"{SNAKEMAKE.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **popen)


def run(workdir: Path, *args: str) -> None:
    process = snakemake(workdir, *args)
    _, err = process.communicate()
    if process.returncode:
        raise RuntimeError(f"snakemake {' '.join(args)} failed:\n{err[-3000:]}")


def files_of(artifact: Path) -> dict | None:
    """The manifest's file table of a complete artifact; None where nothing is; raises on a partial one."""
    if not artifact.exists():
        return None
    table = json.loads((artifact / "manifest.json").read_text())["files"]
    for name, entry in table.items():
        if (artifact / name).stat().st_size != entry["size"]:
            raise AssertionError(f"{artifact}/{name} is incomplete at the final path")
    return table


def trial(reference: Path, scratch: Path, stage: str, moment: float) -> dict:
    """One kill -9 `moment` seconds into rerunning `stage`, then the recovery."""
    output = STAGES[stage]
    if scratch.exists():
        shutil.rmtree(scratch)
    shutil.copytree(reference, scratch, symlinks=True)
    process = snakemake(scratch, "--forcerun", stage, output, start_new_session=True)
    time.sleep(moment)
    finished_first = process.poll() is not None
    if not finished_first:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    complete_or_absent = True
    try:
        files_of(scratch / output)
    except (AssertionError, OSError, json.JSONDecodeError, KeyError):
        complete_or_absent = False
    run(scratch, "--unlock")  # what Snakemake's stale-lock message says to run
    try:
        run(scratch, output)
        recovered = True
    except RuntimeError:
        recovered = False
    identical = recovered and files_of(scratch / output) == files_of(reference / output)
    return {"stage": stage, "moment_s": round(moment, 2), "killed": not finished_first,
            "complete_or_absent": complete_or_absent, "recovered": recovered, "identical": identical}  # fmt: skip


def wall_times(reference: Path) -> dict[str, float]:
    return {stage: json.loads((reference / out / "manifest.json").read_text())["wall_time_s"]
            for stage, out in STAGES.items()}  # fmt: skip


def trials(workdir: Path, stages: list[str], per_stage: int, seed: int) -> list[dict]:
    reference = workdir / "reference"
    if not (reference / STAGES["compress"] / "manifest.json").exists():
        run(reference, *STAGES.values())
    times, rng, rows = wall_times(reference), random.Random(seed), []
    for stage in stages:
        for _ in range(per_stage):
            # Snakemake spends a few seconds planning before the job starts: the window covers both.
            moment = rng.uniform(0.5, 6.0 + times[stage])
            rows.append(trial(reference, workdir / "scratch", stage, moment))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| stage | trials | killed mid-run | complete or absent after the kill | recovered | byte-identical |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for stage in dict.fromkeys(r["stage"] for r in rows):
        mine = [r for r in rows if r["stage"] == stage]
        count = {key: sum(r[key] for r in mine) for key in ("killed", "complete_or_absent", "recovered", "identical")}
        lines.append(f"| {stage} | {len(mine)} | {count['killed']} | {count['complete_or_absent']} | "
                     f"{count['recovered']} | {count['identical']} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--trials", type=int, default=5, help="per stage")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "faults.json")
    args = parser.parse_args()
    rows = trials(args.workdir, args.stages.split(","), args.trials, args.seed)
    args.out.write_text(json.dumps({"seed": args.seed, "config": CONFIG, "trials": rows}, indent=2) + "\n")
    print(table(rows), end="")


if __name__ == "__main__":
    main()
