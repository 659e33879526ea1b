"""The summary and `deepcast report`: rows from validations, failed ones never shown as passed, the
"not measured here" path, and the files Snakemake's report embeds."""

from __future__ import annotations

import json

from conftest import REPO, deepcast_cli
from deepcast import registry, validation
from deepcast.manifest import Recorder
from deepcast.stages import report
from deepcast.stages.plan import make_plan

CONFIG = REPO / "config"


def validated(directory, results):
    (directory / "bundle").mkdir(parents=True)
    Recorder("gguf_validate", {}).save(directory / "validation", results, {"validation.json": json.dumps(results)})


def target_tree(tmp_path):
    """A target directory: a GGUF that passed, a checkpoint whose gate warned, a bundle whose validation failed."""
    root = tmp_path / "results/targets/cpu/tiny-deepseek-v3/v1"
    common = {"perplexity_reference": 80.0, "size_bytes": 2_000_000}
    measured = {"status": "measured", "decode_tokens_per_s": 700.0, "roofline_decode_tokens_per_s": 1500}
    gsm8k = {"metric": "exact_match", "value": 0.25, "stderr": 0.1, "higher_is_better": True, "samples": 20}
    tasks = {"status": "measured", "scores": {"gsm8k": gsm8k}, "skipped": {"piqa": "llama-server ..."}}
    validated(root / "llama.cpp/Q4_K_M", {**common, "perplexity": 80.4, "kl_divergence": 0.01,
              "same_top_token_percent": 95.0, "server": {"deterministic": True}, "gate": {"status": "passed"},
              "speed": measured, "tasks": tasks})  # fmt: skip
    validated(root / "vllm/gptq-w4a16", {**common, "engine": "vllm-cpu", "perplexity": 90.0, "kl_divergence": 0.3,
              "smoke": {"deterministic": True, "engine": "transformers"}, "gate": {"status": "warned"},
              "speed": {"status": "not measured here", "roofline_decode_tokens_per_s": 1200},
              "tasks": {"status": "skipped", "reason": "no task data (validate.task_data)"}})  # fmt: skip
    (root / "vllm/awq-w4a16/bundle").mkdir(parents=True)  # its validation failed: no validation directory
    plan = make_plan(CONFIG, "tiny-deepseek-v3", "cpu", REPO, ["Q4_K_M", "gptq-w4a16", "awq-w4a16"], False)
    (root / "plan.json").write_text(json.dumps(plan.as_dict()))
    return root


def test_rows_come_from_validations_and_a_failed_one_is_not_validated(tmp_path):
    rows = {row.artifact: row for row in report.collect(target_tree(tmp_path), 16_000_000)}
    assert rows["llama.cpp/Q4_K_M"].gate == "passed" and rows["llama.cpp/Q4_K_M"].delta_percent == 0.5
    assert rows["llama.cpp/Q4_K_M"].decode_tokens_per_s == "700.0 (roofline <= 1,500)"
    assert rows["llama.cpp/Q4_K_M"].smoke == "passed (llama-server)" and rows["llama.cpp/Q4_K_M"].bits_per_weight == 1.0
    assert rows["vllm/gptq-w4a16"].gate == "warned" and rows["vllm/gptq-w4a16"].engine == "vllm-cpu"
    assert rows["vllm/gptq-w4a16"].decode_tokens_per_s == "not measured here (roofline <= 1,200)"
    assert rows["vllm/awq-w4a16"].gate == "not validated" and rows["vllm/awq-w4a16"].perplexity is None
    assert rows["llama.cpp/Q4_K_M"].tasks == "gsm8k exact_match 0.250 ± 0.10 (n=20); piqa skipped"
    assert rows["vllm/gptq-w4a16"].tasks == "skipped: no task data (validate.task_data)"


def test_summary_writes_the_report_files(tmp_path, reference_dir):
    root = target_tree(tmp_path)
    results = report.summary(root, root / "plan.json", reference_dir, root / "summary")
    assert results == {"artifacts": 3, "validated": 2}
    table = (root / "summary/table.html").read_text()
    assert "llama.cpp/Q4_K_M" in table and "not validated" in table
    assert "<th>tasks</th>" in table and "gsm8k exact_match 0.250" in table
    assert "16-bit model on the same items: skipped: no task data (validate.task_data)" in table
    assert "<svg" in (root / "summary/quality-vs-size.svg").read_text()
    plan = (root / "summary/plan.html").read_text()
    assert "Chosen" in plan and "Refused" in plan and "onnxruntime-genai" in plan
    assert "not validated" in (root / "summary/provenance.html").read_text()


def test_cli_prints_the_table_and_fails_when_an_artifact_did_not_pass(tmp_path):
    target_tree(tmp_path)
    result = deepcast_cli("report", "--config-dir", str(CONFIG), cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert "llama.cpp/Q4_K_M" in result.stdout and "not validated" in result.stdout and "warned" in result.stdout
    assert "tasks of llama.cpp/Q4_K_M: gsm8k exact_match 0.250 ± 0.10 (n=20); piqa skipped" in result.stdout


def test_speed_is_not_measured_for_a_target_whose_hardware_is_elsewhere():
    h100 = registry.load_target(CONFIG, "h100")
    reason = validation.hardware_here(h100)
    assert reason.startswith("target h100 needs 1 x H100 SXM 80GB; this machine has")
    record = validation.not_measured(reason, 1500.0)
    assert record["status"] == "not measured here" and record["roofline_decode_tokens_per_s"] == 1500.0
    assert validation.hardware_here(registry.load_target(CONFIG, "cpu")) is None
