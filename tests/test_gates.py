"""Quality gates: thresholds per format from config; fail names the artifact, figure and threshold; warn keeps it."""

from __future__ import annotations

import pytest
from deepcast import gates
from deepcast.config import DEFAULT_GATES, Gate, ValidateSettings, load
from deepcast.errors import DeepcastError

GOOD = {"perplexity": 83.1, "perplexity_reference": 82.93, "kl_divergence": 0.015}


def test_a_result_inside_the_gate_passes():
    record = gates.apply("results/x/Q4_K_M", "Q4_K_M", GOOD, ValidateSettings())
    assert record["status"] == "passed" and record["perplexity_increase_percent"] == pytest.approx(0.205, abs=0.001)
    assert record["thresholds"] == {**DEFAULT_GATES["Q4_K_M"].model_dump(), "max_task_drop_points": 5.0}


def test_a_failing_gate_names_the_artifact_the_figure_and_the_threshold():
    tight = ValidateSettings(thresholds={"*": Gate(max_perplexity_increase_percent=0.1, max_kl_divergence=0.01)})
    with pytest.raises(DeepcastError) as error:
        gates.apply("results/x/Q4_K_M", "Q4_K_M", GOOD, tight)
    message = str(error.value)
    assert message.startswith("quality gate failed for results/x/Q4_K_M (Q4_K_M): perplexity 83.1 is +0.20 %")
    assert "over the reference 82.93" in message
    assert "the gate allows +0.1 %" in message and "KL divergence 0.015 exceeds the gate's 0.01" in message
    assert "validate.gates: warn" in message


def test_warn_records_the_failure_instead():
    tight = ValidateSettings(gates="warn", thresholds={"*": Gate(max_perplexity_increase_percent=0.1)})
    record = gates.apply("results/x/Q4_K_M", "Q4_K_M", GOOD, tight)
    assert record["status"] == "warned" and len(record["failures"]) == 1


def test_formats_without_their_own_gate_take_the_catch_all():
    record = gates.apply("a", "IQ1_S", {**GOOD, "perplexity": 120.0}, ValidateSettings())
    assert record["status"] == "passed"
    assert record["thresholds"] == {**DEFAULT_GATES["*"].model_dump(), "max_task_drop_points": 5.0}
    with pytest.raises(DeepcastError, match=r"\+44.70 % over the reference"):
        gates.apply("a", "Q8_0", {**GOOD, "perplexity": 120.0}, ValidateSettings())


def test_config_key_is_validate():
    settings = load({"validate": {"gates": "warn", "thresholds": {"*": {"max_perplexity_increase_percent": 5}}}})
    assert settings.validation.gates == "warn" and settings.validation.thresholds["*"].max_kl_divergence is None


def scored(**values: tuple[float, float | None]) -> dict:
    """A task record as tasks.run writes it: name -> (accuracy, its standard error)."""
    return {
        "status": "measured",
        "scores": {
            name: {"metric": "acc", "value": value, "stderr": stderr, "higher_is_better": True, "samples": 100}
            for name, (value, stderr) in values.items()
        },
    }


def test_the_task_gate_fails_a_drop_beyond_its_points_and_beyond_the_noise_of_the_items():
    reference = scored(piqa=(0.70, 0.02), hellaswag=(0.50, 0.02))
    # piqa falls 8 points (beyond 5 and beyond 2 x 2.8 combined stderr); hellaswag 3 points: inside the gate.
    results = {**GOOD, "tasks": scored(piqa=(0.62, 0.02), hellaswag=(0.47, 0.02))}
    with pytest.raises(DeepcastError) as error:
        gates.apply("results/x/Q4_K_M", "Q4_K_M", results, ValidateSettings(), reference)
    message = str(error.value)
    assert "piqa acc 0.620 is 8.0 points below the 16-bit model's 0.700; the gate allows 5.7" in message
    assert "hellaswag" not in message and "validate.max_task_drop_points" in message


def test_a_task_drop_inside_the_noise_of_a_few_items_passes_and_unmeasured_tasks_are_not_gated():
    reference = scored(piqa=(0.70, 0.20))
    record = gates.apply("a", "Q4_K_M", {**GOOD, "tasks": scored(piqa=(0.40, 0.20))}, ValidateSettings(), reference)
    assert record["status"] == "passed"  # 30 points, but 2 x 28 points of standard error on so few items
    skipped = {**GOOD, "tasks": {"status": "skipped", "reason": "no task data (validate.task_data)"}}
    assert gates.apply("a", "Q4_K_M", skipped, ValidateSettings(), reference)["status"] == "passed"
    tight = ValidateSettings(max_task_drop_points=1.0, gates="warn")
    record = gates.apply("a", "Q4_K_M", {**GOOD, "tasks": scored(piqa=(0.68, 0.0))}, tight, scored(piqa=(0.70, 0.0)))
    assert record["status"] == "warned" and record["failures"] == [
        "piqa acc 0.680 is 2.0 points below the 16-bit model's 0.700; the gate allows 1.0"
    ]
