"""`deepcast reproduce`: replay an artifact's recorded command in a scratch directory and compare."""

from __future__ import annotations

import json

from conftest import deepcast_cli
from deepcast import reproduce


def made_by_the_cli(tmp_path):
    out = tmp_path / "corpus"
    result = deepcast_cli("corpus", "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    return out


def tamper(artifact, **tools):
    """Pretend a file came out different (and, optionally, that a GPU made the artifact)."""
    manifest = json.loads((artifact / "manifest.json").read_text())
    manifest["files"]["train.txt"]["sha256"] = "0" * 64
    manifest["tools"].update(tools)
    (artifact / "manifest.json").write_text(json.dumps(manifest))


def test_a_cpu_artifact_reproduces_bit_identically(tmp_path):
    artifact = made_by_the_cli(tmp_path)
    result = deepcast_cli("reproduce", str(artifact), "--scratch", str(tmp_path / "scratch"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["bit_identical"] and report["reproduced"] and report["files_compared"] == 3
    assert report["check"] == "bit-identical files"


def test_a_differing_cpu_file_fails_and_is_named(tmp_path):
    artifact = made_by_the_cli(tmp_path)
    tamper(artifact)
    result = deepcast_cli("reproduce", str(artifact), "--scratch", str(tmp_path / "scratch"), cwd=tmp_path)
    assert result.returncode == 1
    assert json.loads(result.stdout)["differing_files"] == ["train.txt"]


def test_a_gpu_artifact_is_checked_on_its_figures_within_the_tolerance(tmp_path):
    artifact = made_by_the_cli(tmp_path)
    tamper(artifact, backend="cuda")
    result = deepcast_cli("reproduce", str(artifact), "--scratch", str(tmp_path / "scratch"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert not report["bit_identical"] and report["reproduced"] and "within 1 %" in report["check"]


def test_times_and_peak_memory_are_not_figures_of_the_artifact():
    # Measured on the H200: trtllm-fp8 quantized in 5.7 s the first time (kernels compiled), 2 s the second.
    results = {"quant_algo": "FP8", "quantize_seconds": 5.7, "oneshot_seconds": 10.1, "load_time_s": 1.2,
               "peak_gpu_memory_gb": 0.204, "fake_quant": {"kl_divergence": 0.0131}}  # fmt: skip
    assert reproduce.figures(results) == {"quant_algo": "FP8", "fake_quant": {"kl_divergence": 0.0131}}
