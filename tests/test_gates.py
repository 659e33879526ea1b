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
    assert record["thresholds"] == DEFAULT_GATES["Q4_K_M"].model_dump()


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
    assert record["status"] == "passed" and record["thresholds"] == DEFAULT_GATES["*"].model_dump()
    with pytest.raises(DeepcastError, match=r"\+44.70 % over the reference"):
        gates.apply("a", "Q8_0", {**GOOD, "perplexity": 120.0}, ValidateSettings())


def test_config_key_is_validate():
    settings = load({"validate": {"gates": "warn", "thresholds": {"*": {"max_perplexity_increase_percent": 5}}}})
    assert settings.validation.gates == "warn" and settings.validation.thresholds["*"].max_kl_divergence is None
