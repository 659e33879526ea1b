"""kill -9 in every stage that does work, then the documented recovery, against an uninterrupted run.

    python bench/faults.py --workdir /tmp/faults --trials 5 --seed 0   # the table in docs/reliability.md
    python bench/faults.py --workdir /tmp/faults --trials 3 --seed 1 --stages distill_signal,distill_train,...

Each scenario's uninterrupted run is a reference: the quick configuration, a distillation, the dense student's
engine builds. Each trial copies one, reruns one stage (`snakemake --forcerun RULE OUTPUT`) and sends SIGKILL to
Snakemake's whole process group at a moment drawn (seeded) over that stage's measured wall time; then it checks
that the output path holds either nothing or a complete artifact (its manifest and every file it lists), runs the
recovery the stale-lock message names (`snakemake --unlock`), rebuilds the output (`snakemake OUTPUT`) and
compares every file with the reference's. Deterministic stages must end byte-identical; a trial "recovered" when
the rebuild succeeded. The stages run replace their earlier trials in the results file; the others are kept.
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
from typing import NamedTuple

REPO = Path(__file__).resolve().parent.parent
SNAKEMAKE = Path(sys.executable).with_name("snakemake")
# tests/conftest.py's QUICK: the test suite's default run serves as the reference of its seeded subset.
CONFIG = ["calibration={samples: 16}", "compress={schemes: [gptq-w4a16]}", "evaluation={max_chunks: 8}"]
MODEL = "results/models/tiny-deepseek-v3/v1"
STUDENT = "results/models/tiny-llama-student/v1"
CPU = "results/targets/cpu/tiny-deepseek-v3/v1"


class Scenario(NamedTuple):
    """One reference run: its config and every rule that does work in it, with the artifact it writes (a glob
    where the path holds a digest, as a trained student's does: that run asks for everything up to `until`)."""

    config: list[str]
    stages: dict[str, str]
    until: str | None = None


SCENARIOS = {
    "quick": Scenario(CONFIG, {
        "download": f"{MODEL}/checkpoint",
        "calibrate": f"{MODEL}/calibration",
        "reference": f"{MODEL}/reference",
        "gguf_convert": f"{MODEL}/gguf/bf16",
        "gguf_imatrix": f"{MODEL}/gguf/imatrix",
        "gguf_quantize": f"{MODEL}/gguf/Q4_K_M",
        "gguf_kld_base": f"{MODEL}/gguf/kld-base",
        "compress": f"{MODEL}/compressed/gptq-w4a16",
        "gguf_validate": f"{CPU}/llama.cpp/Q4_K_M/validation",
        "vllm_validate": f"{CPU}/vllm/gptq-w4a16/validation",
    }),
    # The teacher's signal and one student trained from it (tests/test_distill.py's example, fewer steps).
    "distill": Scenario([
        "distill={students: [{name: tiny-prune, kind: prune}], steps: 10, batch_size: 4, window: 128, "
        "loss_positions: 64, control: false}",
        "formats=[Q4_K_M]", "calibration={samples: 16}", "evaluation={max_chunks: 8}",
    ], {
        "distill_signal": f"{MODEL}/distill/signal",
        "distill_train": "results/models/tiny-prune/*/checkpoint",
    }, until="distill_train"),
    # The engine builds of the dense student: ModelOpt and the ONNX builder for a Hopper target ...
    "engines": Scenario([
        "model=tiny-llama-student", "target=h100", "formats=[trtllm-fp8, onnx-int4]",
        "calibration={samples: 16}", "evaluation={max_chunks: 8}",
    ], {
        "trtllm_quantize": f"{STUDENT}/trtllm/trtllm-fp8",
        "onnx_build": f"{STUDENT}/onnx/onnx-int4-cuda",
        "onnx_validate": "results/targets/h100/tiny-llama-student/v1/onnxruntime-genai/onnx-int4/validation",
    }),
    # ... and Edge-LLM's exporter for a Jetson.
    "jetson": Scenario([
        "model=tiny-llama-student", "target=jetson-agx-orin-64g", "formats=[edgellm-int8]",
        "calibration={samples: 16}", "evaluation={max_chunks: 8}",
    ], {"edgellm_export": f"{STUDENT}/edgellm/edgellm-int8"}),
}
STAGES = {stage: name for name, scenario in SCENARIOS.items() for stage in scenario.stages}
# Validations measure speed, so their files differ from run to run: they must be complete, not identical.
MEASURES_SPEED = {"gguf_validate", "vllm_validate", "onnx_validate"}


def snakemake(workdir: Path, config: list[str], *args: str, **popen) -> subprocess.Popen:
    command = [str(SNAKEMAKE), "-s", str(REPO / "Snakefile"), "-d", str(workdir), "--cores", "2", *args,
               "--config", *config]  # fmt: skip
    env = {**os.environ, "PATH": f"{SNAKEMAKE.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **popen)


def run(workdir: Path, config: list[str], *args: str) -> None:
    process = snakemake(workdir, config, *args)
    _, err = process.communicate()
    if process.returncode:
        raise RuntimeError(f"snakemake {' '.join(args)} failed:\n{err[-3000:]}")


def output_of(reference: Path, stage: str) -> str:
    """The stage's artifact path relative to the run, its glob resolved in the reference."""
    pattern = SCENARIOS[STAGES[stage]].stages[stage]
    (match,) = reference.glob(pattern)
    return str(match.relative_to(reference))


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
    config, output = SCENARIOS[STAGES[stage]].config, output_of(reference, stage)
    if scratch.exists():
        shutil.rmtree(scratch)
    shutil.copytree(reference, scratch, symlinks=True)
    process = snakemake(scratch, config, "--forcerun", stage, output, start_new_session=True)
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
    run(scratch, config, "--unlock")  # what Snakemake's stale-lock message says to run
    try:
        run(scratch, config, output)
        recovered = files_of(scratch / output) is not None
    except (RuntimeError, AssertionError):
        recovered = False
    if stage in MEASURES_SPEED:
        identical = None
    else:
        identical = recovered and files_of(scratch / output) == files_of(reference / output)
    return {"stage": stage, "moment_s": round(moment, 2), "killed": not finished_first,
            "complete_or_absent": complete_or_absent, "recovered": recovered, "identical": identical}  # fmt: skip


def wall_time(reference: Path, stage: str) -> float:
    """The stage's wall time in the reference run, from its artifact's manifest."""
    return json.loads((reference / output_of(reference, stage) / "manifest.json").read_text())["wall_time_s"]


def reference_run(workdir: Path, scenario: str) -> Path:
    """The scenario's uninterrupted run (made once, kept in `workdir`)."""
    reference, stages = workdir / f"reference-{scenario}", SCENARIOS[scenario].stages
    done = reference / ".complete"
    if not done.exists():
        targets = ["--until", SCENARIOS[scenario].until] if SCENARIOS[scenario].until else list(stages.values())
        run(reference, SCENARIOS[scenario].config, *targets)
        done.touch()
    return reference


def trials(workdir: Path, stages: list[str], per_stage: int, seed: int) -> list[dict]:
    rng, rows = random.Random(seed), []
    for stage in stages:
        reference = reference_run(workdir, STAGES[stage])
        seconds = wall_time(reference, stage)
        for _ in range(per_stage):
            # Snakemake spends a few seconds planning before the job starts: the window covers both.
            moment = rng.uniform(0.5, 6.0 + seconds)
            rows.append(trial(reference, workdir / "scratch", stage, moment))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| stage | trials | killed mid-run | complete or absent after the kill | recovered | byte-identical |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for stage in dict.fromkeys(r["stage"] for r in rows):
        mine = [r for r in rows if r["stage"] == stage]
        keys = ("killed", "complete_or_absent", "recovered", "identical")
        count = {key: sum(bool(r[key]) for r in mine) for key in keys}
        identical = "n/a (it measures speed)" if stage in MEASURES_SPEED else count["identical"]
        lines.append(f"| {stage} | {len(mine)} | {count['killed']} | {count['complete_or_absent']} | "
                     f"{count['recovered']} | {identical} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--trials", type=int, default=5, help="per stage")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "faults.json")
    args = parser.parse_args()
    stages = args.stages.split(",")
    rows = [{**row, "seed": args.seed} for row in trials(args.workdir, stages, args.trials, args.seed)]
    # The stages run now replace their earlier trials; the other stages' trials are kept.
    kept = json.loads(args.out.read_text())["trials"] if args.out.exists() else []
    rows = [row for row in kept if row["stage"] not in stages] + rows
    rows.sort(key=lambda row: list(STAGES).index(row["stage"]))
    scenarios = {name: scenario.config for name, scenario in SCENARIOS.items()}
    args.out.write_text(json.dumps({"scenarios": scenarios, "trials": rows}, indent=2) + "\n")
    print(table(rows), end="")


if __name__ == "__main__":
    main()
