"""TensorRT Edge-LLM for the Jetson: the dense student's ONNX export made here, the bundle that builds its
engine on the device, the plan's choices and refusals."""

from __future__ import annotations

import json

import pytest
from conftest import REPO, damaged_copy, deepcast_cli
from deepcast import registry
from deepcast.errors import DeepcastError
from deepcast.stages import edgellm

CONFIG = REPO / "config"
JETSON = "jetson-agx-orin-64g"


@pytest.fixture(scope="session")
def jetson_bundle(student, tmp_path_factory):
    root = tmp_path_factory.mktemp("edgellm")
    edgellm.export(student["checkpoint"], student["calibration"], root / "export", "edgellm-fp16")
    edgellm.bundle(root / "export", registry.load_target(CONFIG, JETSON), root / "bundle", "edgellm-fp16")
    return root


def test_the_bundle_carries_the_export_and_the_device_build(jetson_bundle):
    bundle = jetson_bundle / "bundle"
    for name in ("model.onnx", "model.onnx.data", "embedding.safetensors", "config.json", "tokenizer.json"):
        assert (bundle / "onnx" / "llm" / name).is_file(), name
    script = (bundle / "build_on_device.sh").read_text()
    assert "-DEMBEDDED_TARGET=jetson-orin" in script and "-DCUDA_CTK_VERSION=13.2" in script
    assert 'llm_build" --onnxDir onnx/llm' in script and 'llm_inference" --engineDir engines' in script
    assert "--maxKVCacheCapacity 2048" in script  # the student's context: the plan's KV arithmetic caps at it
    assert "removed in TensorRT 11" in (bundle / "README.md").read_text()
    assert json.loads((bundle / "input.json").read_text())["requests"]


def test_validation_checks_the_graph_and_says_what_is_not_run(jetson_bundle):
    result = edgellm.validate(jetson_bundle / "bundle", jetson_bundle / "validation", "edgellm-fp16")
    assert "AttentionPlugin" in result["graph"]["operators"]
    assert result["engine_build"]["status"] == "not run here" and "Jetson" in result["engine_build"]["reason"]
    assert result["quality"]["status"] == "not run here" and result["gate"]["status"] == "not run here"


def test_refusals(checkpoint, calibration, jetson_bundle, tmp_path):
    with pytest.raises(DeepcastError, match="multi-head latent attention"):
        edgellm.export(checkpoint, calibration, tmp_path / "e", "edgellm-fp16")
    with pytest.raises(DeepcastError, match="Jetson targets"):
        edgellm.bundle(jetson_bundle / "export", registry.load_target(CONFIG, "h100"), tmp_path / "b", "edgellm-fp16")
    assert not (tmp_path / "e").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_checkpoint_is_refused_before_the_export(student, tmp_path, damage):
    copy, refusal = damaged_copy(student["checkpoint"], tmp_path, damage)
    with pytest.raises(DeepcastError, match=refusal):
        edgellm.export(copy, student["calibration"], tmp_path / "e", "edgellm-int8")
    assert not (tmp_path / "e").exists()


def test_the_jetson_plan_picks_edge_llm_and_refuses_the_rest_with_reasons():
    shown = deepcast_cli(
        "plan", "--model", "deepseek-r1-distill-qwen-7b", "--target", JETSON, "--config-dir", str(CONFIG), "--json"
    )
    assert shown.returncode == 0, shown.stderr
    plan = json.loads(shown.stdout)
    rows = {c["format"]: c for c in plan["candidates"]}
    for fmt in ("edgellm-fp16", "edgellm-int8", "edgellm-int4"):
        assert rows[fmt]["viable"] and rows[fmt]["built"] and rows[fmt]["context"] > 0, rows[fmt]
    assert {"edgellm-int4", "edgellm-fp16"} <= set(plan["chosen"])
    assert any("calibrator" in note for note in rows["edgellm-int8"]["notes"])
    engines = {(c["format"], c["engine"]): c for c in plan["candidates"]}
    assert "Jetson" in engines[("trtllm-fp8", "tensorrt-llm")]["reason"] and "aarch64" in rows["onnx-int4"]["reason"]
    mla = json.loads(
        deepcast_cli(
            "plan", "--model", "tiny-deepseek-v3", "--target", JETSON, "--config-dir", str(CONFIG), "--json"
        ).stdout
    )
    assert "MLA" in {c["format"]: c for c in mla["candidates"]}["edgellm-int4"]["reason"]
