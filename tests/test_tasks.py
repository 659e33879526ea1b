"""lm-eval tasks from local files: the task YAMLs deepcast writes, what each backend scores, the 16-bit scores.

The servers' runs are in test_compress (vLLM) and test_gguf (llama-server), beside the bundles they serve."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import LOG_LIKELIHOOD_TASKS, TASK_DATA
from deepcast import tasks
from deepcast.config import ValidateSettings
from deepcast.errors import DeepcastError


def test_without_task_data_the_tasks_are_skipped_naming_the_setting():
    record = tasks.run(ValidateSettings(), "hf")
    assert record == {"status": "skipped", "reason": "no task data (validate.task_data)",
                      "tasks": ["hellaswag", "piqa", "winogrande"]}  # fmt: skip
    assert tasks.run(ValidateSettings(tasks=[]), "hf")["reason"] == "no tasks configured (validate.tasks)"


def test_the_task_yaml_reuses_the_upstream_definition_with_the_local_file_for_every_split(tmp_path):
    name, output_type = tasks.write_task_yaml("piqa", TASK_DATA["piqa"], tmp_path)
    written = yaml.safe_load((tmp_path / f"{name}.yaml").read_text())
    assert name == "deepcast_piqa" and output_type == "multiple_choice"
    assert written["include"].endswith("piqa/piqa.yaml") and written["dataset_path"] == "json"
    assert written["dataset_kwargs"]["data_files"] == dict.fromkeys(tasks.SPLITS, str(TASK_DATA["piqa"].resolve()))
    assert tasks.write_task_yaml("gsm8k", TASK_DATA["gsm8k"], tmp_path)[1] == "generate_until"


def test_an_unknown_task_or_a_missing_file_is_refused_with_the_fix(tmp_path):
    with pytest.raises(DeepcastError, match=r"lm-eval has no task 'no_such_task'. Fix: name a task"):
        tasks.write_task_yaml("no_such_task", TASK_DATA["piqa"], tmp_path)
    with pytest.raises(DeepcastError, match=r"validate.task_data\[piqa\] is .*missing.jsonl, which is not a file"):
        tasks.write_task_yaml("piqa", tmp_path / "missing.jsonl", tmp_path)


def test_the_reference_keeps_the_16bit_models_scores_on_the_fixture_items(wide_student):
    """hf on the 16-bit checkpoint, as the reference stage runs it: every fixture task measured on its six items,
    with its metric and standard error, and recorded in the manifest with the settings."""
    record = tasks.reference_scores(wide_student["reference"])
    assert record["status"] == "measured" and record["backend"] == "hf" and record["skipped"] == {}
    assert sorted(record["scores"]) == sorted(TASK_DATA)
    for name, score in record["scores"].items():
        assert score["samples"] == 6 and 0 <= score["value"] <= 1 and score["higher_is_better"], name
        assert score["metric"] == ("acc" if name in LOG_LIKELIHOOD_TASKS else "exact_match"), name
        assert score["stderr"] is not None, name
    manifest = json.loads((wide_student["reference"] / "manifest.json").read_text())
    assert manifest["params"]["tasks"]["task_limit"] == 6 and "task_data:piqa" in manifest["inputs"]


def test_llama_server_scores_only_generation_tasks_and_says_why():
    why = tasks.WHY_NOT["llama-server"].format(output_type="multiple_choice")
    assert "refuses echo" in why and tasks.BACKEND_TYPES["llama-server"] == {"generate_until"}
    assert tasks.BACKEND_TYPES["vllm"] == tasks.BACKEND_TYPES["hf"] >= tasks.LOG_LIKELIHOOD
