"""ONNX Runtime GenAI: int4 (CPU provider) and fp16 (CUDA provider) builds of the dense student, validated
through onnxruntime-genai on this CPU; refusals."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import REPO, damaged_copy, deepcast_cli
from deepcast import registry
from deepcast.config import OnnxSettings
from deepcast.errors import DeepcastError
from deepcast.files import write_checksums
from deepcast.stages import onnx

CONFIG = REPO / "config"


def target(name: str):
    return registry.load_target(CONFIG, name)


@pytest.fixture(scope="session")
def validated(student, tmp_path_factory):
    """onnx-int4 for the CPU target and onnx-fp16 for an H100, each built, bundled and validated."""
    root = tmp_path_factory.mktemp("onnx")
    results = {}
    for fmt, target_name in (("onnx-int4", "cpu"), ("onnx-fp16", "h100")):
        where = target(target_name)
        graph, bundle = root / f"{fmt}-graph", root / fmt / "bundle"
        onnx.build(student["checkpoint"], graph, fmt, onnx.provider_for(where), OnnxSettings())
        onnx.bundle(graph, where, bundle, fmt)
        results[fmt] = onnx.validate(
            bundle,
            student["reference"],
            root / fmt / "validation",
            fmt,
            4,
            target=where,
            teacher=student["checkpoint"],
        )
        results[fmt]["bundle"] = bundle
    return results


def test_builds_validate_through_onnxruntime_genai(validated):
    int4, fp16 = validated["onnx-int4"], validated["onnx-fp16"]
    assert int4["built_for"] == "cpu" and fp16["built_for"] == "cuda" and "not run here" in fp16["evaluated_on"]
    # fp16 keeps the 16-bit model; int4 (k_quant, lm_head included) loses more, within its gate.
    assert fp16["kl_divergence"] < 0.005 < int4["kl_divergence"] < 0.2, (fp16["kl_divergence"], int4["kl_divergence"])
    assert abs(fp16["perplexity_ratio_to_reference"] - 1) < 0.005 and int4["perplexity_ratio_to_reference"] < 1.1
    for result in (int4, fp16):
        assert result["tokens_scored"] == 8 * 255 and result["gate"]["status"] == "passed"
        assert result["smoke"]["deterministic"] and all(t.strip() for t in result["smoke"]["completions"])
        assert result["speed"]["status"] == "measured" and result["speed"]["decode_tokens_per_s"] > 0
        # Same tokens, same model: the teacher run, the base from the reference's float16 log-probabilities, whose
        # rounding alone reads 5e-7 (tests/test_reference.py).
        assert result["teacher"]["kl_divergence"] == pytest.approx(result["kl_divergence"], rel=1e-3, abs=1e-6)
    assert int4["size_bytes"] < fp16["size_bytes"] / 2


def test_bundle_contents_and_launch(validated):
    bundle = validated["onnx-int4"]["bundle"]
    for name in (
        "model.onnx",
        "model.onnx.data",
        "genai_config.json",
        "tokenizer.json",
        "chat.py",
        "launch.sh",
        "README.md",
        "SHA256SUMS",
    ):
        assert (bundle / name).is_file(), name
    readme = (bundle / "README.md").read_text()
    assert "-p int4 -e cpu" in readme and "algo_config=k_quant" in readme
    cuda = json.loads((validated["onnx-fp16"]["bundle"] / "genai_config.json").read_text())
    assert "cuda" in cuda["model"]["decoder"]["session_options"]["provider_options"][0]
    assert "onnxruntime-genai-cuda" in (validated["onnx-fp16"]["bundle"] / "launch.sh").read_text()


def test_refusals(checkpoint, student, tmp_path, monkeypatch):
    with pytest.raises(DeepcastError, match="multi-head latent attention"):
        onnx.build(checkpoint, tmp_path / "g", "onnx-int4", "cpu", OnnxSettings())
    with pytest.raises(DeepcastError, match="no onnx-fp16 graph for the cpu provider"):
        onnx.build(student["checkpoint"], tmp_path / "g", "onnx-fp16", "cpu", OnnxSettings())
    monkeypatch.setattr(onnx, "GENAI_VERSION", "0.17.0")
    with pytest.raises(DeepcastError, match="pip install onnxruntime-genai==0.17.0"):
        onnx.build(student["checkpoint"], tmp_path / "g", "onnx-int4", "cpu", OnnxSettings())
    assert not (tmp_path / "g").exists()


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_checkpoint_is_refused_before_the_build(student, tmp_path, damage):
    copy, refusal = damaged_copy(student["checkpoint"], tmp_path, damage)
    with pytest.raises(DeepcastError, match=refusal):
        onnx.build(copy, tmp_path / "g", "onnx-int4", "cpu", OnnxSettings())
    assert not (tmp_path / "g").exists()


def test_a_truncated_graph_is_refused(validated, student, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(validated["onnx-int4"]["bundle"], bundle)
    data = bundle / "model.onnx.data"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    with pytest.raises(DeepcastError, match="does not match its SHA256SUMS"):
        onnx.validate(bundle, student["reference"], tmp_path / "v", "onnx-int4", 4)
    write_checksums(bundle)  # a consistent but truncated bundle: the graph check catches it
    with pytest.raises(DeepcastError, match="truncated or missing"):
        onnx.validate(bundle, student["reference"], tmp_path / "v", "onnx-int4", 4)
    assert not (tmp_path / "v").exists()


def test_the_plan_lists_the_engine_formats_as_built():
    shown = deepcast_cli(
        "plan", "--model", "deepseek-r1-distill-qwen-7b", "--target", "h100", "--config-dir", str(CONFIG), "--json"
    )
    assert shown.returncode == 0, shown.stderr
    plan = json.loads(shown.stdout)
    rows = {(c["format"], c["engine"]): c for c in plan["candidates"]}
    for fmt, engine in (
        ("trtllm-fp8", "tensorrt-llm"),
        ("trtllm-int4-awq", "tensorrt-llm"),
        ("onnx-int4", "onnxruntime-genai"),
        ("onnx-fp16", "onnxruntime-genai"),
    ):
        row = rows[(fmt, engine)]
        assert row["viable"] and row["built"], row
        assert row["context"] > 0 and row["gpu_memory_gb"] > row["weights_gb"] and row["decode_tokens_per_s"] > 0
    assert {"trtllm-fp8", "trtllm-int4-awq", "onnx-int4"} <= set(plan["chosen"])
    assert "Blackwell" in rows[("trtllm-nvfp4", "tensorrt-llm")]["reason"]
