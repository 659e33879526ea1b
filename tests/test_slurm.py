"""The workflow on a real Slurm cluster (tests/slurm_cluster.py: Debian's slurm-wlm, munge, slurmdbd and MariaDB)
through profiles/slurm and the pinned snakemake-executor-plugin-slurm, for a GPU target whose GPUs are GRES on
placeholder devices: the same artifacts as the local run, GPUs requested exactly where the plan says, light
rules kept local, and a job cancelled with scancel rerun correctly by the next invocation.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from conftest import ENV, QUICK, REPO, SNAKEMAKE
from deepcast import manifest
from slurm_cluster import SlurmCluster, install_hint, missing_packages

PROFILE = REPO / "profiles" / "slurm"
MODEL_DIR = "results/models/tiny-deepseek-v3/v1"
TARGET_DIR = "results/targets/h200/tiny-deepseek-v3/v1"
# The default run's settings on a GPU target: the artifacts that do not depend on the target must come out the
# same as the local run's.
CONFIG = [*QUICK, "target=h200", "formats=[Q4_K_M, gptq-w4a16]"]
SHARED = ["checkpoint", "calibration", "gguf/bf16", "gguf/imatrix", "gguf/Q4_K_M", "compressed/gptq-w4a16"]
GPU_RULES = {"reference", "compress", "vllm_validate", "gguf_imatrix", "gguf_kld_base", "gguf_validate"}
CPU_RULES = {"calibrate", "gguf_convert", "gguf_quantize"}
LOCAL_RULES = {"plan", "corpus", "download", "gguf_bundle", "vllm_bundle", "report"}
CANARY = "hf_deepcastSLURMcanary0123456789"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    missing = missing_packages()
    # A missing package fails the test (make test installs them): a skipped cluster test would prove nothing.
    assert not missing, f"Slurm is not installed ({', '.join(missing)}). Fix: {install_hint(missing)}"
    with SlurmCluster(tmp_path_factory.mktemp("slurm")) as running:
        yield running


def on_slurm(workdir: Path, cluster: SlurmCluster, *args: str) -> subprocess.Popen:
    """The workflow submitted through the profile, with two threads per job (the cluster's 8 CPUs are 2 here)
    and quick status checks."""
    threads = [f"{rule}=2" for rule in yaml.safe_load((PROFILE / "profile.yaml").read_text())["set-threads"]]
    command = [str(SNAKEMAKE), "-s", str(REPO / "Snakefile"), "-d", str(workdir), "--profile", str(PROFILE),
               "--jobs", "3", "--latency-wait", "5", "--slurm-init-seconds-before-status-checks", "2",
               "--slurm-keep-successful-logs", "--set-threads", *threads, *args, "--config", *CONFIG]  # fmt: skip
    # The cluster's client wrappers first, then the venv's bin, which the rules call deepcast from. A canary
    # HF_TOKEN rides along, as the runner's secret would: no job script, log or artifact may hold it.
    path = os.pathsep.join([str(cluster.bin_dir), ENV["PATH"]])
    env = {**ENV, **cluster.env, "PATH": path, "HF_TOKEN": CANARY}
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def finished(process: subprocess.Popen, timeout: float = 2400) -> tuple[int, str]:
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        raise AssertionError(f"snakemake did not finish within {timeout:.0f} s:\n{output[-3000:]}") from None
    return process.returncode, output


def jobs(cluster: SlurmCluster, since: str) -> list[dict]:
    """Every job of this cluster since `since`, with the rule the executor named in its comment."""
    out = cluster.sacct("-X", "-P", "-n", "-S", since, "-o", "JobID,Comment,State,AllocTRES")
    rows = []
    for line in out.splitlines():
        jobid, comment, state, tres = line.split("|")
        if not comment.startswith("rule_"):
            continue  # the cluster's own self-check
        rule = comment.removeprefix("rule_").split("_wildcards_")[0]
        rows.append({"id": jobid, "rule": rule, "state": state, "tres": tres})
    return rows


@pytest.fixture(scope="module")
def slurm_run(cluster, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("slurm-run")
    since = time.strftime("%Y-%m-%dT%H:%M:%S")
    code, output = finished(on_slurm(workdir, cluster))
    assert code == 0, output[-4000:] + cluster.logs()
    return workdir, since, output


def test_every_cluster_job_completes_with_gpus_exactly_where_the_plan_puts_them(cluster, slurm_run):
    _, since, output = slurm_run
    rows = jobs(cluster, since)
    assert {row["rule"] for row in rows} == GPU_RULES | CPU_RULES, rows
    assert all(row["state"] == "COMPLETED" for row in rows), rows
    for row in rows:
        # h200: one GPU for the transformers and llm-compressor stages, the placement's one for llama.cpp's.
        assert ("gres/gpu=1" in row["tres"]) == (row["rule"] in GPU_RULES), row
    assert not {row["rule"] for row in rows} & LOCAL_RULES
    assert "localrule" in output  # Snakemake names the jobs it ran on the submit host


def test_gpu_jobs_see_their_gpu_and_local_jobs_no_scheduler(slurm_run):
    workdir, _, _ = slurm_run
    gpu_job = manifest.read(workdir / MODEL_DIR / "compressed/gptq-w4a16")["job"]
    assert gpu_job["slurm_job_id"] and gpu_job["cuda_visible_devices"].isdigit(), gpu_job  # one GPU of eight
    cpu_job = manifest.read(workdir / MODEL_DIR / "gguf/Q4_K_M")["job"]
    assert cpu_job["slurm_job_id"] and "cuda_visible_devices" not in cpu_job, cpu_job
    assert manifest.read(workdir / MODEL_DIR / "checkpoint")["job"] == {}  # the download ran locally
    assert manifest.read(workdir / TARGET_DIR / "llama.cpp/Q4_K_M/bundle")["job"] == {}


def test_the_token_reaches_no_job_script_log_or_artifact(cluster, slurm_run):
    workdir, _, output = slurm_run
    # Nothing deepcast or Snakemake writes holds it: the run's files, .snakemake/slurm_logs, the job scripts.
    holding = [p for p in workdir.rglob("*") if p.is_file() and CANARY.encode() in p.read_bytes()]
    assert holding == [] and CANARY not in output
    assert any((workdir / ".snakemake" / "slurm_logs").rglob("*.log"))  # the job logs were there to search
    # Slurm itself does: the plugin submits with --export=ALL (and refuses another --export), so slurmctld keeps
    # each job's environment in its root-only state directory until MinJobAge purges it. Exactly those files,
    # no log, no script (docs/reliability.md: log in with `hf auth login` on a cluster instead of exporting it).
    kept = [p for p in cluster.root.rglob("*") if p.is_file() and CANARY.encode() in p.read_bytes()]
    assert all(p.name == "environment" and "state" in p.parts for p in kept), kept


def test_artifacts_are_byte_identical_to_the_local_run(slurm_run, default_run):
    workdir, _, _ = slurm_run
    for artifact in SHARED:
        cluster_files = manifest.read(workdir / MODEL_DIR / artifact)["files"]
        local_files = manifest.read(default_run / MODEL_DIR / artifact)["files"]
        assert cluster_files == local_files, artifact


def test_a_job_cancelled_with_scancel_is_rerun_by_the_next_invocation(cluster, slurm_run, default_run):
    workdir, _, _ = slurm_run
    quantized = workdir / MODEL_DIR / "gguf/Q4_K_M"
    process = on_slurm(workdir, cluster, "--retries", "0", "--forcerun", "gguf_quantize")
    deadline = time.monotonic() + 600
    cancelled = None
    while cancelled is None and time.monotonic() < deadline and process.poll() is None:
        for line in cluster.run("squeue", "-h", "-t", "RUNNING", "-o", "%i|%k").stdout.splitlines():
            jobid, comment = line.split("|")
            if comment.startswith("rule_gguf_quantize_"):
                time.sleep(3)  # cancelled while it runs, not while it waits
                cluster.run("scancel", jobid)
                cancelled = jobid
        time.sleep(1)
    assert cancelled, "the gguf_quantize job never ran"
    code, output = finished(process, timeout=900)  # a missed cancellation would hang here, not pass
    assert code != 0 and "CANCELLED" in output, output[-3000:]
    local = manifest.read(default_run / MODEL_DIR / "gguf/Q4_K_M")
    # Nothing half-written at the final path: Snakemake removed it before the job, and the stage writes
    # to a temporary name first.
    assert not quantized.exists() or manifest.read(quantized)["files"] == local["files"]
    state = cluster.sacct("-X", "-P", "-n", "-j", cancelled, "-o", "State").split()
    assert state and state[0].startswith("CANCELLED"), state
    code, output = finished(on_slurm(workdir, cluster))
    assert code == 0, output[-4000:]
    assert manifest.read(quantized)["files"] == local["files"]
    validation = json.loads((workdir / TARGET_DIR / "llama.cpp/Q4_K_M/validation/validation.json").read_text())
    assert validation["gate"]["status"] == "passed", validation["gate"]


def test_the_dry_run_of_a_70b_on_eight_h100s_shows_each_rules_gpus(tmp_path):
    command = [str(SNAKEMAKE), "-n", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path), "--profile", str(PROFILE),
               "--config", "target=8xh100", "model=deepseek-ai/DeepSeek-R1-Distill-Llama-70B"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=ENV)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    requested, rule = {}, None
    for line in (result.stdout + result.stderr).splitlines():
        if line.startswith("rule ") and line.endswith(":"):
            rule = line.split()[1].rstrip(":")
        elif rule and line.strip().startswith("resources:"):
            gpus = [part for part in line.split(", ") if part.startswith("gpu=")]
            requested[rule] = gpus[0] if gpus else None
    # One GPU for the layer-by-layer quantizers and transformers; the whole placement for the validations.
    assert requested["compress"] == requested["reference"] == "gpu=1"
    assert requested["gguf_validate"] == "gpu=8" and requested["gguf_imatrix"] == "gpu=2"
    assert requested["trtllm_validate"] not in (None, "gpu=0")
    for cpu_only in ("gguf_convert", "gguf_quantize", "calibrate", "plan", "download", "gguf_bundle", "report"):
        assert requested[cpu_only] is None, cpu_only
