"""Quality gates: per-format thresholds from config, applied by every validation stage.

A failing gate stops the rule with the artifact, the figure and the threshold (nothing is written),
unless `validate.gates: warn`, which records the failure as a warning instead.
"""

from __future__ import annotations

from deepcast import tasks
from deepcast.config import ValidateSettings
from deepcast.errors import DeepcastError


def apply(artifact: str, fmt: str, results: dict, settings: ValidateSettings, reference_tasks: dict | None = None
          ) -> dict:  # fmt: skip
    """The gate record for `results`: perplexity ratio to the reference, KL divergence where measured, and each
    task's drop below the 16-bit model's score (`reference_tasks`) where both were measured."""
    gate = settings.thresholds.get(fmt) or settings.thresholds["*"]
    increase = (results["perplexity"] / results["perplexity_reference"] - 1) * 100
    failures = []
    if increase > gate.max_perplexity_increase_percent:
        failures.append(
            f"perplexity {results['perplexity']:.4g} is {increase:+.2f} % over the reference "
            f"{results['perplexity_reference']:.4g}; the gate allows {gate.max_perplexity_increase_percent:+g} %"
        )
    kld = results.get("kl_divergence")
    if kld is not None and gate.max_kl_divergence is not None and kld > gate.max_kl_divergence:
        failures.append(f"KL divergence {kld:.4g} exceeds the gate's {gate.max_kl_divergence:g}")
    failures += tasks.gate(results.get("tasks") or {}, reference_tasks, settings.max_task_drop_points)
    if failures and settings.gates == "fail":
        raise DeepcastError(
            f"quality gate failed for {artifact} ({fmt}): " + "; ".join(failures) + ". Fix: use a format with "
            "more bits, recalibrate, raise validate.thresholds (validate.max_task_drop_points for a task) for it, "
            "or set validate.gates: warn to keep it."
        )
    return {
        "status": "warned" if failures else "passed",
        "perplexity_increase_percent": round(increase, 4),
        "thresholds": {**gate.model_dump(), "max_task_drop_points": settings.max_task_drop_points},
        "failures": failures,
    }
