"""What Snakemake costs: the default pipeline's tool invocations run directly and through Snakemake, in one run.

    .venv/bin/python bench/overhead.py --workdir /tmp/overhead            # the quick configuration, 2 cores
    .venv/bin/python bench/overhead.py --workdir /tmp/overhead --full     # the default configuration

The direct chain takes the jobs, their shell commands and their threads from Snakemake's dry run (the same
commands, inputs and threads, in an order the DAG allows) and runs each with `bash -c "set -euo pipefail; ..."`
and the thread variables Snakemake's shell sets, in a fresh directory. Then Snakemake runs the same workflow in
another fresh directory, one job at a time (`--resources serial=1`), as the direct chain does. Per rule: the
direct wall time, the wall time Snakemake's metadata records for the job, and the work inside (the stage manifest's
`wall_time_s`, from the stage's start to its manifest: the rest is process start and imports). Then the no-op
run of the finished directory against a one-rule Snakefile's no-op, the median of `--repeats` runs each. Last,
Snakemake's own floor: a chain of as many jobs as the pipeline's, each a `touch`, run the same way (start-up,
scheduling, the shell and the metadata of each job, and nothing of ours).

Writes bench/results/overhead.json and prints the markdown tables docs/benchmarks.md carries.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

# The quick configuration is tests/conftest.py's QUICK, which the suite checks bench/faults.py's CONFIG against.
from faults import CONFIG as QUICK
from faults import REPO, SNAKEMAKE

ENV = {**os.environ, "PATH": f"{SNAKEMAKE.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
# The variables Snakemake's shell() sets to the job's threads (snakemake/shell.py).
THREAD_VARIABLES = ["OMP_NUM_THREADS", "GOTO_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                    "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS"]  # fmt: skip
ONE_RULE = 'rule all:\n    output: "done.txt"\n    shell: "echo done > {output}"\n'


def snakemake(workdir: Path, *args: str, snakefile: Path = REPO / "Snakefile") -> tuple[float, str]:
    started = time.perf_counter()
    result = subprocess.run([str(SNAKEMAKE), "-s", str(snakefile), "-d", str(workdir), *args],
                            capture_output=True, text=True, env=ENV)  # fmt: skip
    wall = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"snakemake {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return wall, result.stdout + result.stderr


def planned_jobs(dry_run: str) -> list[dict]:
    """The jobs that run a command, from a dry run's printout (`printshellcmds` is on in the default profile),
    in its order."""
    jobs = []
    for block in re.split(r"\n(?=\[[A-Z][a-z]{2} [A-Z][a-z]{2} )", dry_run):
        rule = re.search(r"^(?:local)?rule (\w+):", block, re.MULTILINE)
        command = re.search(r"^Shell command: (.+)$", block, re.MULTILINE)  # the rules' commands are one line
        if not rule or not command or command.group(1).strip() == "None":
            continue
        fields = dict(re.findall(r"^    (\w+): (.+)$", block, re.MULTILINE))
        outputs = fields["output"].split(", ") if "output" in fields else []
        paths = outputs + [fields[name] for name in ("log", "benchmark") if name in fields]
        threads = int(fields.get("threads", 1))
        jobs.append({"rule": rule.group(1), "command": command.group(1).strip(), "threads": threads,
                     "paths": paths, "outputs": outputs})  # fmt: skip
    return jobs


def work_inside(workdir: Path, outputs: list[str]) -> float | None:
    """The stage's own wall time, from the manifest of its first output that has one."""
    for output in outputs:
        path = workdir / output
        manifest = path / "manifest.json" if path.is_dir() else path.with_name("manifest.json")
        if manifest.is_file():
            return json.loads(manifest.read_text()).get("wall_time_s")
    return None


def run_direct(workdir: Path, jobs: list[dict]) -> float:
    """Every job's command in order, as Snakemake's shell runs it; each job's wall time goes into the job."""
    started = time.perf_counter()
    for job in jobs:
        for path in job["paths"]:
            (workdir / path).parent.mkdir(parents=True, exist_ok=True)
        env = {**ENV, **dict.fromkeys(THREAD_VARIABLES, str(job["threads"]))}
        begun = time.perf_counter()
        result = subprocess.run(["bash", "-c", f"set -euo pipefail; {job['command']}"], cwd=workdir, env=env,
                                capture_output=True, text=True)  # fmt: skip
        job["direct_s"] = round(time.perf_counter() - begun, 3)
        if result.returncode != 0:
            sys.exit(f"{job['rule']} failed when run directly:\n{job['command']}\n{result.stderr[-3000:]}")
        job["work_s"] = work_inside(workdir, job["outputs"])
        print(f"direct {job['rule']}: {job['direct_s']:.1f} s", flush=True)
    return time.perf_counter() - started


def recorded_seconds(workdir: Path) -> dict[str, float]:
    """Each job's wall time in Snakemake, by shell command: its metadata records (the file backend's JSON, one per
    output) hold when the job was marked incomplete and when it was recorded finished. Cached rules have no
    `benchmark:` file, so this is the one measure every rule has."""
    seconds = {}
    for record_file in (workdir / ".snakemake" / "metadata").iterdir():
        record = json.loads(record_file.read_text())
        if record.get("shellcmd") and record.get("starttime") and record.get("endtime"):
            seconds[record["shellcmd"].strip()] = round(record["endtime"] - record["starttime"], 3)
    return seconds


def chain_snakefile(count: int) -> str:
    """`count` jobs, each waiting for the one before it and touching a file."""
    rules = [f'rule all:\n    input: "step{count}.txt"\n']
    for step in range(1, count + 1):
        waits = f'    input: "step{step - 1}.txt"\n' if step > 1 else ""
        rules.append(f'rule step{step}:\n{waits}    output: "step{step}.txt"\n    shell: "touch {{output}}"\n')
    return "\n".join(rules)


def median_noop(workdir: Path, repeats: int, *args: str, snakefile: Path = REPO / "Snakefile") -> float:
    walls = []
    for _ in range(repeats):
        wall, said = snakemake(workdir, *args, snakefile=snakefile)
        if "Nothing to be done" not in said:
            sys.exit(f"the no-op run in {workdir} did something:\n{said[-2000:]}")
        walls.append(wall)
    return statistics.median(walls)


def table(jobs: list[dict]) -> str:
    def seconds(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    lines = ["| rule | direct (s) | through Snakemake (s) | ratio | work inside (s) | start-up (s) |",
             "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for job in jobs:
        ratio = job["snakemake_s"] / job["direct_s"] if job.get("snakemake_s") else None
        start_up = job["direct_s"] - job["work_s"] if job["work_s"] is not None else None
        lines.append(f"| {job['rule']} | {job['direct_s']:.2f} | {seconds(job.get('snakemake_s'))} | "
                     f"{seconds(ratio)} | {seconds(job['work_s'])} | {seconds(start_up)} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--full", action="store_true", help="the default configuration, not the quick one")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "overhead.json")
    args = parser.parse_args()
    config = [] if args.full else ["--config", *QUICK]
    shutil.rmtree(args.workdir, ignore_errors=True)
    direct_dir, through_dir, one_rule_dir = (args.workdir / name for name in ("direct", "snakemake", "one-rule"))
    for directory in (direct_dir, through_dir, one_rule_dir):
        directory.mkdir(parents=True)

    dry_s, dry_run = snakemake(direct_dir, "-n", "--cores", str(args.cores), *config)
    jobs = planned_jobs(dry_run)
    direct_s = run_direct(direct_dir, jobs)
    snakemake_s, _ = snakemake(through_dir, "--cores", str(args.cores), "--resources", "serial=1",
                               "--default-resources", "serial=1", *config)  # fmt: skip
    recorded = recorded_seconds(through_dir)
    for job in jobs:
        job["snakemake_s"] = recorded.get(job["command"])
    noop_s = median_noop(through_dir, args.repeats, "--cores", str(args.cores), *config)
    one_rule = one_rule_dir / "Snakefile"
    one_rule.write_text(ONE_RULE)
    snakemake(one_rule_dir, "--cores", "1", snakefile=one_rule)
    one_rule_noop_s = median_noop(one_rule_dir, args.repeats, "--cores", "1", snakefile=one_rule)
    chain_dir = args.workdir / "chain"
    chain_dir.mkdir()
    (chain_dir / "Snakefile").write_text(chain_snakefile(len(jobs)))
    chain_s, _ = snakemake(chain_dir, "--cores", str(args.cores), "--resources", "serial=1",
                           "--default-resources", "serial=1", snakefile=chain_dir / "Snakefile")  # fmt: skip

    jobs_s = sum(job["snakemake_s"] or 0 for job in jobs)
    results = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "config": "default" if args.full else QUICK,
        "cores": args.cores,
        "direct_chain_s": round(direct_s, 2),
        "snakemake_s": round(snakemake_s, 2),
        "ratio": round(snakemake_s / direct_s, 3),
        "snakemake_jobs_s": round(jobs_s, 2),
        "snakemake_between_jobs_s": round(snakemake_s - jobs_s, 2),
        "dry_run_s": round(dry_s, 2),
        "noop_s": round(noop_s, 2),
        "one_rule_noop_s": round(one_rule_noop_s, 2),
        "noop_ratio": round(noop_s / one_rule_noop_s, 3),
        "snakemake_floor_s": round(chain_s, 2),
        "beyond_floor_s": round(snakemake_s - direct_s - chain_s, 2),
        "jobs": jobs,
    }
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(table(jobs))
    print(f"\n| | s |\n|---|---:|\n| direct chain | {direct_s:.1f} |\n| through Snakemake | {snakemake_s:.1f} "
          f"(ratio {results['ratio']:.3f}) |\n| of which between jobs | {results['snakemake_between_jobs_s']:.1f} |\n"
          f"| no-op run (median of {args.repeats}) | {noop_s:.2f} |\n| one-rule Snakefile no-op | "
          f"{one_rule_noop_s:.2f} (ratio {results['noop_ratio']:.2f}) |\n| Snakemake's floor: {len(jobs)} jobs that "
          f"touch a file | {chain_s:.2f} |\n| through Snakemake less the direct chain and the floor | "
          f"{results['beyond_floor_s']:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
