"""The scheduled-rebuild workflow: actionlint (with shellcheck) finds nothing, and it keeps its promises."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO

WORKFLOW = REPO / ".github" / "workflows" / "scheduled-rebuild.yml"
ACTIONLINT_CONFIG = REPO / ".github" / "actionlint.yaml"
BIN = Path(sys.executable).parent
# The venv's own tools first: `make install` puts actionlint and shellcheck there from requirements.lock.
SEARCH_PATH = os.pathsep.join([str(BIN), os.environ.get("PATH", "")])


def tool(name: str) -> str:
    """The installed tool's path; a missing tool fails the test, it never skips it."""
    found = shutil.which(name, path=SEARCH_PATH)
    assert found, f"{name} is not installed in {BIN} or on PATH: run `make install` (it is pinned in requirements.lock)"
    return found


@pytest.fixture(scope="module")
def workflow() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())


@pytest.fixture(scope="module")
def job(workflow) -> dict:
    (only,) = workflow["jobs"].values()
    return only


def triggers(workflow: dict) -> dict:
    # YAML 1.1 reads the bare key `on` as the boolean True.
    return workflow.get("on", workflow.get(True))


def step_running(job: dict, command: str) -> dict:
    steps = [step for step in job["steps"] if command in step.get("run", "")]
    assert len(steps) == 1, f"expected one step running {command!r}, found {len(steps)}"
    return steps[0]


def step_using(job: dict, action: str) -> dict:
    steps = [step for step in job["steps"] if step.get("uses", "").startswith(action + "@")]
    assert len(steps) == 1, f"expected one step using {action}, found {len(steps)}"
    return steps[0]


def test_actionlint_finds_nothing():
    actionlint, shellcheck = tool("actionlint"), tool("shellcheck")
    result = subprocess.run(
        [actionlint, "-no-color", "-config-file", str(ACTIONLINT_CONFIG), "-shellcheck", shellcheck, str(WORKFLOW)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PATH": SEARCH_PATH},
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_triggers_are_a_cron_schedule_and_a_manual_run(workflow):
    on = triggers(workflow)
    crons = [entry["cron"] for entry in on["schedule"]]
    assert crons, "no cron schedule"
    assert all(len(cron.split()) == 5 for cron in crons), crons
    inputs = on["workflow_dispatch"]["inputs"]
    assert {"target", "model"} <= set(inputs)
    assert not inputs["target"].get("required") and not inputs["model"].get("required")


def test_target_falls_back_to_the_variable_then_cpu(workflow, job):
    assert job["env"]["TARGET"] == "${{ inputs.target || vars.DEEPCAST_TARGET || 'cpu' }}"
    assert "inputs.model || vars.DEEPCAST_MODEL" in job["env"]["MODEL"]
    # One run per target at a time, queued rather than cancelled; the group names the same target.
    assert "inputs.target || vars.DEEPCAST_TARGET || 'cpu'" in workflow["concurrency"]["group"]
    assert workflow["concurrency"]["cancel-in-progress"] is False


def test_runs_on_the_self_hosted_gpu_runner(job):
    assert {"self-hosted", "gpu"} <= set(job["runs-on"])


def test_caches_live_on_the_runners_disk(workflow, job):
    env = {**workflow.get("env", {}), **job.get("env", {})}
    assert env["DEEPCAST_CACHE"] == "/var/cache/deepcast"
    assert env["SNAKEMAKE_OUTPUT_CACHE"] == "/var/cache/deepcast/snakemake-output"


def test_rebuild_gets_the_token_and_its_failure_fails_the_job(job):
    rebuild = step_running(job, "deepcast rebuild")
    assert rebuild["env"]["HF_TOKEN"] == "${{ secrets.HF_TOKEN }}"
    assert '--target "$TARGET"' in rebuild["run"] and "--cores all" in rebuild["run"]
    assert "continue-on-error" not in rebuild and "if" not in rebuild
    assert "|| true" not in rebuild["run"]
    steps = job["steps"]
    assert steps.index(step_running(job, "make install")) < steps.index(rebuild)


def test_no_expression_is_interpolated_into_a_script(job):
    for step in job["steps"]:
        assert "${{" not in step.get("run", ""), step


def test_actions_are_pinned_to_a_major_version(job):
    for step in job["steps"]:
        if "uses" in step:
            assert re.fullmatch(r"[\w.-]+/[\w.-]+@v\d+", step["uses"]), step["uses"]
    step_using(job, "actions/checkout")


def test_report_and_upload_run_even_when_the_rebuild_failed(job):
    steps = job["steps"]
    rebuild = step_running(job, "deepcast rebuild")
    report = step_running(job, "deepcast report")
    assert report["if"] == "always()" and report["continue-on-error"] is True
    assert '--html "results/report-$TARGET.html"' in report["run"]
    upload = step_using(job, "actions/upload-artifact")
    assert upload["if"] == "always()"
    assert steps.index(rebuild) < steps.index(report) < steps.index(upload)
    options = upload["with"]
    paths = [line.strip() for line in options["path"].splitlines() if line.strip()]
    assert "results/report-${{ env.TARGET }}.html" in paths
    assert {"results/**/manifest.json", "results/**/validation/**", "results/**/plan.json", "logs/**"} <= set(paths)
    assert "env.TARGET" in options["name"] and "github.run_id" in options["name"]
    assert options["if-no-files-found"] == "warn"
    assert options["retention-days"] == 30
