"""Bad input, catalogued (bench/bad_inputs.py, docs/reliability.md): every case ends in one message naming the
fix and writes nothing; the catalogue in the docs is the one tested."""

from __future__ import annotations

import importlib.util
import random

import pytest
from conftest import QUICK, REPO, error_of, snakemake

spec = importlib.util.spec_from_file_location("bad_inputs", REPO / "bench" / "bad_inputs.py")
catalogue = importlib.util.module_from_spec(spec)
spec.loader.exec_module(catalogue)


@pytest.mark.parametrize(("area", "what", "config", "fragment"), catalogue.CONFIG_CASES,
                         ids=[case[1] for case in catalogue.CONFIG_CASES])  # fmt: skip
def test_a_bad_config_is_refused_before_any_job_with_one_message(area, what, config, fragment, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # a closed port: no case may reach a hub
    message = catalogue.config_message(config)
    assert message is not None, f"{what}: {config} plans a run"
    assert fragment in message and "Fix" in message and "Traceback" not in message, message


def test_a_recipe_for_a_scheme_the_plan_does_not_build_is_not_checked(monkeypatch):
    """Only what the run builds is checked: a recipe left in the config for another scheme plans as before."""
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    unused = {"compress": {"schemes": ["gptq-w4a16"], "recipes": {"awq-w4a16": "/nonexistent.yaml"}}}
    assert catalogue.config_message(unused) is None
    used = {"compress": {"schemes": ["awq-w4a16"], "recipes": {"awq-w4a16": "/nonexistent.yaml"}}}
    assert "compress.recipes.awq-w4a16: /nonexistent.yaml does not exist" in catalogue.config_message(used)


@pytest.mark.parametrize(("area", "what", "args", "fragment", "env"), catalogue.COMMAND_CASES,
                         ids=[case[1] for case in catalogue.COMMAND_CASES])  # fmt: skip
def test_a_bad_command_exits_2_with_one_message_and_writes_nothing(area, what, args, fragment, env, tmp_path):
    def files() -> list:
        return sorted(path for path in tmp_path.rglob("*") if path.is_file())  # (an empty parent folder is no artifact)

    before = files()
    result = catalogue.command_result(args, env, tmp_path)
    message = error_of(result)  # exit status 2, no traceback
    errors = [line for line in message.splitlines() if line.startswith("deepcast: error:")]
    assert len(errors) == 1 and fragment in errors[0] and "Fix" in errors[0], message
    assert files() == sorted({*before, tmp_path / "not-a-pack.tar.xz"})


@pytest.mark.parametrize("case", [0, 14, 25], ids=["misspelt key", "missing calibration file", "imatrix type"])
def test_through_snakemake_a_bad_config_exits_1_and_leaves_no_results(case, tmp_path):
    _, _, config, fragment = catalogue.CONFIG_CASES[case]
    pairs = [f"{key}={value}" for key, value in config.items()]
    result = snakemake(tmp_path, "-n", "--config", *pairs)
    said = result.stdout + result.stderr  # Snakemake prints a WorkflowError on stdout
    assert result.returncode == 1 and "deepcast: " in said and fragment in said, said
    assert not (tmp_path / "results").exists() and not (tmp_path / "logs").exists()


def test_the_catalogue_in_the_docs_is_the_tested_one():
    text = (REPO / "docs" / "reliability.md").read_text()
    assert catalogue.render() in text, "run python bench/bad_inputs.py and paste it into docs/reliability.md"
    assert len(catalogue.CONFIG_CASES) + len(catalogue.COMMAND_CASES) >= 30


@pytest.mark.parametrize("stage", ["gguf_quantize", "compress"])
def test_a_seeded_kill_9_leaves_nothing_partial_and_the_rebuild_is_byte_identical(stage, default_run, tmp_path):
    """bench/faults.py's trial, on the suite's default run as the reference (the table: docs/reliability.md)."""
    spec = importlib.util.spec_from_file_location("faults", REPO / "bench" / "faults.py")
    faults = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(faults)
    assert faults.CONFIG == QUICK  # the reference was made with the same settings
    moment = random.Random(f"{stage}-0").uniform(0.5, 6.0 + faults.wall_time(default_run, stage))
    result = faults.trial(default_run, tmp_path / "scratch", stage, moment)
    assert result["complete_or_absent"] and result["recovered"] and result["identical"], result
